"""The Case store's schema is Alembic-migrated: fresh databases reach head, databases made before migrations
existed are adopted, upgrades repeat as no-ops, and processes starting at once do not race the migration.

SQLite always; PostgreSQL (one fresh schema per test) when FHIRBRIDGE_TEST_POSTGRES_URL is set.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)

from fhirbridge.cli import main as cli
from fhirbridge.errors import FhirbridgeError
from fhirbridge.store import migrations
from fhirbridge.store.store import Store
from fhirbridge.store.tables import metadata
from tests.kit import processes
from tests.kit.hospital import pg_schema

PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set (e.g. "
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
TABLES = {"cases", "cursors", "events", "seen_messages", "audit_events", "write_ledger", "order_requests", "outcomes",
          "cds_cards", "followups"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with pg_schema("fb_mig") as u:
            yield u


def differences(engine) -> list:
    """What Alembic autogenerate would write to get from the database to store.metadata: nothing, at head."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def old_case(store: Store, case_id: str) -> None:
    """A Case as a database at an older revision holds it: only the columns every revision has (the Store's
    own reads select the newest columns, so they serve a database at head only)."""
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO cases (id, hospital, service_request, patient, reviewer, profile, step, "
                          "attempts, created_at, updated_at, data) VALUES (:id, 'h', 'ServiceRequest/1', "
                          "'Patient/1', 'r', 'default', 'collect', 0, 1.0, 1.0, '{}')"), {"id": case_id})


def old_step(store: Store, case_id: str) -> str:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT step FROM cases WHERE id = :id"), {"id": case_id}).scalar_one()


def versions(engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


def revision_before(revision: str) -> str:
    """The revision a shipped script builds on (its down_revision): the chain is renumbered as revisions land."""
    script = next((migrations.SCRIPT_LOCATION / "versions").glob(f"{revision}_*.py"))
    return re.search(r'^down_revision = "(\d+)"', script.read_text(), re.M).group(1)


def test_the_shipped_scripts_have_one_head():
    assert migrations.head() == "0014"
    assert (migrations.SCRIPT_LOCATION / "env.py").is_file()
    assert (migrations.SCRIPT_LOCATION / "script.py.mako").is_file()


def test_a_fresh_database_is_brought_to_head(url):
    store = Store(url)
    try:
        assert store.schema_revision() == migrations.head()
        insp = inspect(store.engine)
        assert set(insp.get_table_names()) == TABLES | {"alembic_version"}
        for name in TABLES:
            assert [c["name"] for c in insp.get_columns(name)] == [c.name for c in metadata.tables[name].columns]
        assert [ix["column_names"] for ix in insp.get_indexes("events")] == [["case_id"]]
        assert sorted(ix["column_names"] for ix in insp.get_indexes("audit_events")) == [["case_id"], ["patient"]]
        assert [uq["name"] for uq in insp.get_unique_constraints("cases")] == ["uq_case_per_order"]
        assert differences(store.engine) == []
        case, created = store.open_case(case_id="c1", hospital="h", service_request="ServiceRequest/1",
                                        patient="Patient/1", reviewer="r", profile="default")
        assert created and store.claim(worker="w").id == "c1"
    finally:
        store.close()


def test_upgrading_again_is_a_no_op(url):
    Store(url).close()
    store = Store(url, create=False)
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, stmt, *_a: statements.append(stmt))
    try:
        assert store.upgrade() == (migrations.head(), migrations.head())
        again = Store(url)
        assert again.schema_revision() == migrations.head()
        again.close()
        assert versions(store.engine) == [migrations.head()]
        # Nothing written and no lock taken: at head, a start only reads the version.
        assert not [s for s in statements if s.split()[0].upper() not in ("SELECT", "PRAGMA", "SHOW")], statements
    finally:
        store.close()


def test_the_initial_revision_downgrades_to_nothing_and_back(url):
    from alembic import command
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), "base")
            conn.commit()
        assert set(inspect(store.engine).get_table_names()) == {"alembic_version"}
        assert store.schema_revision() is None
        assert store.upgrade() == (None, migrations.head())
        assert differences(store.engine) == []
    finally:
        store.close()


def test_the_audit_revision_upgrades_a_0001_database_keeping_its_data_and_downgrades(url):
    from alembic import command
    store = Store(url, create=False)
    try:
        assert store.upgrade("0001") == (None, "0001")
        assert "audit_events" not in inspect(store.engine).get_table_names()
        old_case(store, "c1")
        assert store.upgrade("0002") == ("0001", "0002")
        assert old_step(store, "c1") == "collect"
        assert store.add_audit(id="a1", hospital="h", patient="Patient/1", case_id="c1", kind="disclosure",
                               recipient="s|v", resource={"resourceType": "AuditEvent"})
        assert not store.add_audit(id="a1", hospital="h", patient="Patient/1", case_id="c1", kind="disclosure",
                                   recipient="s|v", resource={"resourceType": "AuditEvent"})
        [row] = store.list_audit(patient="Patient/1", unsent=True)
        assert row["resource"] == {"resourceType": "AuditEvent"} and row["sent_to_ehr"] is False
        store.mark_audit("a1", sent=True)
        assert store.list_audit(unsent=True) == [] and store.list_audit(patient="Patient/2") == []
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), "0001")
            conn.commit()
        assert "audit_events" not in inspect(store.engine).get_table_names()
        assert store.schema_revision() == "0001" and old_step(store, "c1") == "collect"
    finally:
        store.close()


def test_the_audit_retry_revision_keeps_what_is_owed_and_downgrades(url):
    """0004 adds what a refused AuditEvent copy needs to be retried with backoff (attempts, last try, next
    try) to a 0003 database, keeping its rows; a row owed before the upgrade is due at once."""
    from alembic import command
    store = Store(url, create=False)
    try:
        assert store.upgrade("0003") == (None, "0003")
        store.add_audit(id="a1", hospital="h", patient="Patient/1", case_id="c1", kind="disclosure",
                        recipient="s|v", resource={"resourceType": "AuditEvent"})
        assert store.upgrade("0004") == ("0003", "0004")
        [due] = store.audit_due(hospital="h", now=time.time())
        assert (due["id"], due["ehr_attempts"], due["ehr_retry_at"]) == ("a1", 0, None)
        assert store.audit_refused("a1", error="EHR answered 422", now=100.0, backoff=lambda n: 30.0 * n) == 1
        assert store.audit_refused("a1", error="EHR answered 422", now=200.0, backoff=lambda n: 30.0 * n) == 2
        owed = store.audit_owed(hospital="h")
        assert (owed["count"], owed["last_error"], owed["last_tried_at"], owed["next_attempt_at"]) == (
            1, "EHR answered 422", 200.0, 260.0)
        assert store.audit_due(hospital="h", now=259.0) == [] and len(store.audit_due(hospital="h", now=260.0)) == 1
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), "0003")
            conn.commit()
        assert "ehr_attempts" not in {c["name"] for c in inspect(store.engine).get_columns("audit_events")}
        assert [r["id"] for r in store.list_audit(unsent=True)] == ["a1"]
    finally:
        store.close()


def _create_all_of(md: MetaData, url: str) -> None:
    engine = create_engine(url)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO cases (id, hospital, service_request, patient, reviewer, profile, step, "
                          "attempts, created_at, updated_at, data) VALUES ('old', 'h', 'ServiceRequest/9', "
                          "'Patient/1', 'r', 'default', 'await_opinion', 0, 1.0, 1.0, '{}')"))
    engine.dispose()


def test_a_database_made_by_create_all_is_adopted(url):
    _create_all_of(metadata, url)
    store = Store(url)
    try:
        assert store.schema_revision() == migrations.head()
        assert versions(store.engine) == [migrations.head()]
        assert store.get("old").step == "await_opinion"          # the data is kept
        assert differences(store.engine) == []
    finally:
        store.close()


def _pre_service_metadata() -> MetaData:
    """The schema of the releases before the service (no cursors table, no cases.due_at/overdue_at)."""
    md = MetaData()
    Table("cases", md,
          Column("id", String(64), primary_key=True), Column("hospital", String(200), nullable=False),
          Column("service_request", String(200), nullable=False), Column("patient", String(200), nullable=False),
          Column("reviewer", String(200), nullable=False), Column("profile", String(100), nullable=False),
          Column("step", String(40), nullable=False), Column("task", String(200)), Column("package_id", String(64)),
          Column("opinion_id", String(200)), Column("document_reference", String(200)),
          Column("attempts", Integer, nullable=False), Column("last_error", Text),
          Column("next_attempt_at", Float), Column("claimed_by", String(200)), Column("claimed_until", Float),
          Column("created_at", Float, nullable=False), Column("updated_at", Float, nullable=False),
          Column("data", JSON, nullable=False),
          UniqueConstraint("hospital", "service_request", name="uq_case_per_order"))
    Table("events", md, Column("id", Integer, primary_key=True, autoincrement=True),
          Column("case_id", String(64), nullable=False, index=True), Column("at", Float, nullable=False),
          Column("kind", String(80), nullable=False), Column("detail", JSON, nullable=False))
    Table("seen_messages", md, Column("jti", String(200), primary_key=True),
          Column("case_id", String(64), nullable=False), Column("at", Float, nullable=False))
    return md


def test_an_early_install_is_adopted_and_completed(url):
    _create_all_of(_pre_service_metadata(), url)
    store = Store(url)
    try:
        assert store.schema_revision() == migrations.head()
        assert differences(store.engine) == []                   # cursors and the two columns were added
        assert store.get("old").due_at is None
        assert store.claim_cursor("h", "orders", worker="w", lease_seconds=60) == (True, None)
    finally:
        store.close()


def test_a_foreign_cases_table_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cases (id TEXT PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(FhirbridgeError, match="not made by fhirbridge"):
        Store(url)


def test_a_database_from_a_newer_version_is_refused_with_a_clear_message(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(FhirbridgeError, match="9999_future.*newer version"):
        Store(url)


# --- several processes starting at once -----------------------------------------------------------------

STARTER = textwrap.dedent("""
    import sys, time
    from fhirbridge.store.store import Store
    url, at = sys.argv[1], float(sys.argv[2])
    while time.time() < at:      # everyone imported: start together
        time.sleep(0.001)
    store = Store(url, create=False)
    before, after = store.upgrade()
    print(f"{before} {after}")
""")


def _upgrade_at_once(url: str, n: int) -> list[str]:
    at = time.time() + 3.0
    procs: list[subprocess.Popen] = []
    try:   # each in its own process group, and none left behind if one fails or hangs
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", STARTER, url, str(at)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outs.append(out.strip())
        return outs
    finally:
        for p in procs:
            processes.stop(p)


def test_processes_starting_at_once_migrate_exactly_once(url):
    outs = _upgrade_at_once(url, 4)
    head = migrations.head()
    # Every process succeeds; exactly one ran the migration, the others found it done under the lock.
    assert sorted(outs) == sorted([f"None {head}"] + [f"{head} {head}"] * 3), outs
    engine = create_engine(url)
    try:
        assert versions(engine) == [head]
        assert differences(engine) == []
    finally:
        engine.dispose()


# --- the command ----------------------------------------------------------------------------------------

def test_db_current_and_upgrade_commands(tmp_path, capsys):
    assert cli.main(["init", str(tmp_path / "site")]) == 0
    cfg = str(tmp_path / "site" / "fhirbridge.toml")
    capsys.readouterr()
    assert cli.main(["--config", cfg, "db", "current"]) == 0
    out = capsys.readouterr().out
    assert "none" in out and "db upgrade" in out              # `current` changes nothing
    assert cli.main(["--config", cfg, "db", "upgrade"]) == 0
    assert capsys.readouterr().out.strip() == f"store schema upgraded from none to {migrations.head()} (head)"
    assert cli.main(["--config", cfg, "db", "upgrade"]) == 0
    assert capsys.readouterr().out.strip() == f"store schema at {migrations.head()} (head)"
    assert cli.main(["--config", cfg, "db", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"store schema at {migrations.head()} (head)"


def test_the_migrations_ship_in_the_package_data():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for pattern in ("migrations/env.py", "migrations/script.py.mako", "migrations/versions/*.py"):
        assert pattern in pyproject


def test_the_claim_index_revision_upgrades_and_downgrades(url):
    from alembic import command
    store = Store(url, create=False)
    try:
        assert store.upgrade("0002") == (None, "0002")
        old_case(store, "c1")
        assert "ix_cases_claim" not in {ix["name"] for ix in inspect(store.engine).get_indexes("cases")}
        assert store.upgrade("0003") == ("0002", "0003")
        assert "ix_cases_claim" in {ix["name"] for ix in inspect(store.engine).get_indexes("cases")}
        assert store.upgrade() == ("0003", migrations.head())
        assert differences(store.engine) == []
        assert store.claim(hospital="h").id == "c1"
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), "0002")
            conn.commit()
        assert "ix_cases_claim" not in {ix["name"] for ix in inspect(store.engine).get_indexes("cases")}
    finally:
        store.close()


def test_the_write_ledger_revision_upgrades_and_downgrades(url):
    """0005 adds the write ledger of the POST-only write plans to a 0004 database, keeping its Cases; a write
    is recorded intended, then sent (counted), then confirmed with the server's id."""
    from alembic import command
    store = Store(url, create=False)
    try:
        assert store.upgrade("0004") == (None, "0004")
        old_case(store, "c1")
        assert "write_ledger" not in inspect(store.engine).get_table_names()
        assert store.upgrade() == ("0004", migrations.head())
        assert differences(store.engine) == []
        ident = "urn:ietf:rfc:3986|urn:uuid:x"
        store.ledger_record("c1", "DocumentReference", identifier=ident, state="intended")
        store.ledger_record("c1", "DocumentReference", identifier=ident, state="sent", sent=True)
        row = store.ledger_record("c1", "DocumentReference", identifier=ident, state="confirmed",
                                  server_id="DocumentReference/9")
        assert (row["state"], row["server_id"], row["attempts"]) == ("confirmed", "DocumentReference/9", 1)
        assert set(store.ledger("c1")) == {"DocumentReference"} and store.ledger("c2") == {}
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), "0004")
            conn.commit()
        assert "write_ledger" not in inspect(store.engine).get_table_names()
        assert old_step(store, "c1") == "collect"
        assert store.upgrade() == ("0004", migrations.head())
    finally:
        store.close()


def test_the_cds_cards_revision_upgrades_and_downgrades(url):
    """0009 adds the CDS Hooks cards (issue 18) to a 0005 database, keeping its Cases; feedback is recorded
    once per card (the first outcome stays)."""
    from alembic import command
    prior = revision_before("0009")
    store = Store(url, create=False)
    try:
        assert store.upgrade(prior) == (None, prior)
        old_case(store, "c1")
        assert "cds_cards" not in inspect(store.engine).get_table_names()
        assert store.upgrade("0009") == (prior, "0009")
        assert "cds_cards" in inspect(store.engine).get_table_names()
        row = {"card_id": "card-1", "hospital": "h", "service": "fhirbridge-order-sign", "hook_instance": "i",
               "patient": "Patient/1", "ordered_by": "Practitioner/1", "draft_order": "ServiceRequest/d",
               "draft_code": "http://snomed.info/sct|55705006", "rule": "spine-elective"}
        assert store.record_cds_call("jti-1", "ehr", [row]) is True
        assert store.record_cds_call("jti-1", "ehr", [row]) is False        # a replayed JWT records nothing
        assert store.record_cds_call("jti-2", "ehr", [row]) is True         # the same card again: one row
        assert store.cds_feedback("card-1", outcome="overridden") is True
        assert store.cds_feedback("card-1", outcome="overridden") is False       # a repeat changes nothing
        assert store.cds_feedback("card-1", outcome="accepted") is True          # its order exists: followed
        assert store.cds_feedback("card-1", outcome="overridden") is False
        assert store.cds_card("card-1")["outcome"] == "accepted"
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), prior)
            conn.commit()
        assert "cds_cards" not in inspect(store.engine).get_table_names()
        assert old_step(store, "c1") == "collect"
    finally:
        store.close()


def test_the_order_requests_revision_upgrades_and_downgrades(url):
    """0012 adds the accepted orders (loop/accepted_orders.py) to a database of the revision before it, keeping
    its Cases; the last revision's downgrade removes the table again."""
    from alembic import command

    from fhirbridge.store.order_requests import OrderRequests
    store = Store(url, create=False)
    try:
        store.upgrade()
        before = revision_before("0012")
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), before)
            conn.commit()
        assert store.schema_revision() == before
        assert "order_requests" not in inspect(store.engine).get_table_names()
        old_case(store, "c1")
        assert store.upgrade("0012") == (before, "0012")
        store.upgrade()
        assert differences(store.engine) == []
        row, created = OrderRequests(store).add("o1", hospital="h", fingerprint="f" * 64)
        assert created and row["state"] == "pending" and store.get("c1").step == "collect"
        assert OrderRequests(store).add("o1", hospital="h", fingerprint="f" * 64)[1] is False
    finally:
        store.close()


def test_the_outcomes_revision_upgrades_and_downgrades(url):
    """0010 adds the outcomes of filed opinions (issue 18 part 2) to a 0005 database, keeping its Cases; a row
    opened twice is one row, and a due row is claimed by one worker only."""
    from alembic import command
    prior = revision_before("0010")
    store = Store(url, create=False)
    try:
        assert store.upgrade(prior) == (None, prior)
        old_case(store, "c1")
        assert "outcomes" not in inspect(store.engine).get_table_names()
        assert store.upgrade("0010") == (prior, "0010")
        row = dict(case_id="c1", hospital="h", reviewer="r", profile="spine", patient="Patient/1",
                   order_ref="ServiceRequest/1", filed_at=100.0, window_ends=200.0, recommendation="non-surgical-care",
                   concordance="concordant")
        assert store.outcomes.open(**row) is True and store.outcomes.open(**row) is False
        assert [o.case_id for o in store.outcomes.claim_due("h", now=150.0, lease=60, limit=10)] == ["c1"]
        assert store.outcomes.claim_due("h", now=150.0, lease=60, limit=10) == []     # claimed until 210
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), prior)
            conn.commit()
        assert "outcomes" not in inspect(store.engine).get_table_names()
        assert old_step(store, "c1") == "collect"
        assert store.upgrade("0010") == (prior, "0010")
    finally:
        store.close()


def test_the_case_list_revision_adds_its_indexes_and_summary_columns(url):
    """0006 adds the Case list's indexes and the filed opinion's summary columns to a database of the revision
    before it, keeping its Cases, and takes them away again on downgrade."""
    from alembic import command
    prior = revision_before("0006")
    store = Store(url, create=False)
    try:
        assert store.upgrade(prior) == (None, prior)
        old_case(store, "c1")
        assert "ix_cases_updated" not in {ix["name"] for ix in inspect(store.engine).get_indexes("cases")}
        assert store.upgrade("0006") == (prior, "0006")
        assert {"ix_cases_updated", "ix_cases_step_updated", "ix_cases_patient", "ix_cases_turnaround"} <= {
            ix["name"] for ix in inspect(store.engine).get_indexes("cases")}
        columns = {c["name"] for c in inspect(store.engine).get_columns("cases")}
        assert {"concordance", "recommendation", "filed_at", "turnaround_seconds"} <= columns
        assert old_step(store, "c1") == "collect"
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), prior)
            conn.commit()
        assert "concordance" not in {c["name"] for c in inspect(store.engine).get_columns("cases")}
        assert old_step(store, "c1") == "collect"
    finally:
        store.close()


def test_the_followups_revision_upgrades_and_downgrades(url):
    """0013 adds the follow-ups (store/followups.py: questions, their addenda, corrected opinions) to a database
    of the revision before it, keeping its Cases; its downgrade removes the table again."""
    from alembic import command

    from fhirbridge.store.followups import FollowUps, OverLimit
    store = Store(url, create=False)
    try:
        store.upgrade()
        before = revision_before("0013")
        with store.engine.connect() as conn:
            command.downgrade(migrations.alembic_config(conn), before)
            conn.commit()
        assert store.schema_revision() == before
        assert "followups" not in inspect(store.engine).get_table_names()
        old_case(store, "c1")
        assert store.upgrade("0013") == (before, "0013")
        store.upgrade()
        assert differences(store.engine) == []
        rows = FollowUps(store)
        first = rows.add("q1", case_id="c1", hospital="h", reviewer="r", kind="question", state="asked", limit=1)
        assert first["seq"] == 1 and store.get("c1").step == "collect"
        with pytest.raises(OverLimit):
            rows.add("q2", case_id="c1", hospital="h", reviewer="r", kind="question", state="asked", limit=1)
    finally:
        store.close()
