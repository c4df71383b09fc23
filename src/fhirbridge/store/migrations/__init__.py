"""Schema migrations for the Case store (Alembic), run by fhirbridge itself.

`Store(url)` brings the database to the newest revision when it starts (`upgrade`); `fhirbridge db
upgrade` / `fhirbridge db current` do it on demand. The scripts live in this package (env.py,
versions/), so an installed wheel migrates without an alembic.ini or a source checkout.

Several replicas (or gunicorn workers) start at once against one database, so the upgrade runs in ONE
transaction that first takes a lock: on PostgreSQL a transaction-level advisory lock
(`pg_advisory_xact_lock`, keyed on the database and schema), on SQLite `BEGIN IMMEDIATE` (the database
file's write lock). The first process migrates; the others wait, then find the schema at head and do
nothing. PostgreSQL DDL is transactional, so a failed upgrade leaves nothing half-done; the lock is
released by the commit or rollback, or by the connection closing if the process dies.

A database made before migrations existed (by `metadata.create_all`: the tables but no
`alembic_version`) is adopted: what the pre-service releases lacked (the `cursors` table, the
`cases.due_at`/`overdue_at` columns) is added, and it is stamped at 0001 before upgrading.
"""
from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path


class _Chatter(logging.Filter):
    """Alembic announces its dialect on every context (every time a Store opens) and its plugins on import;
    keep only what it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume", "setup plugin", "setting up"))


# Installed before alembic is imported: its plugins announce themselves at import time.
for _name in ("alembic.runtime.migration", "alembic.runtime.plugins"):
    logging.getLogger(_name).addFilter(_Chatter())

from alembic import command, op  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.migration import MigrationContext  # noqa: E402
from alembic.operations import Operations  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from alembic.util import CommandError  # noqa: E402
from sqlalchemy import Column, Connection, Engine, Float, inspect, text  # noqa: E402

from fhirbridge.errors import FhirbridgeError  # noqa: E402

log = logging.getLogger("fhirbridge.store.migrations")

SCRIPT_LOCATION = Path(__file__).resolve().parent
INITIAL = "0001"
# The tables of the first releases; `cases` among them means the database predates migrations.
LEGACY_TABLES = ("cases", "events", "seen_messages")


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    # configparser interpolation: a "%" in the install path must be doubled.
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision shipped with this version of fhirbridge."""
    newest = _scripts().get_current_head()
    if newest is None:
        raise FhirbridgeError(f"no migration scripts in {SCRIPT_LOCATION / 'versions'} (a broken install?)")
    return newest


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty (or pre-migration) database."""
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database to `revision` (default: head); returns (before, after). Safe to call from many
    processes at once, and a no-op (without taking the lock) when the database is already at head."""
    target = head() if revision == "head" else revision
    if current(engine) == target:
        return target, target
    with engine.connect() as conn:
        _lock(conn)
        before = _revision(conn)  # read again under the lock: another process may have just migrated
        if before is not None and not _known(before):
            raise FhirbridgeError(f"the store database is at schema revision {before}, which this fhirbridge "
                                  f"does not know (its newest is {head()}): was it upgraded by a newer version?")
        if before is None and _adopt_legacy(conn):
            command.stamp(alembic_config(conn), INITIAL)
            log.info("adopted a database made before migrations: stamped at %s", INITIAL)
        if _revision(conn) != target:
            command.upgrade(alembic_config(conn), revision)
        after = _revision(conn)
        conn.commit()
    if after != before:
        log.info("store schema upgraded from %s to %s", before or "none", after)
    return before, after


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _lock(conn: Connection) -> None:
    """Open the migration transaction holding the lock that serialises migrating processes."""
    if conn.dialect.name == "postgresql":
        db, schema = conn.execute(text("SELECT current_database(), current_schema()")).one()
        # One lock per database and schema: deployments sharing a server in separate schemas don't wait
        # for each other. Advisory lock keys are signed 64-bit integers.
        key = int.from_bytes(hashlib.sha256(f"fhirbridge.migrate:{db}:{schema}".encode()).digest()[:8], "big",
                             signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    elif conn.dialect.name == "sqlite":
        # pysqlite opens transactions lazily and not at all for DDL; take the write lock up front so two
        # processes cannot both find the database empty (busy_timeout makes the second one wait).
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        raise FhirbridgeError(f"unsupported store database {conn.dialect.name!r}")


def _adopt_legacy(conn: Connection) -> bool:
    """True when the database holds the tables of a pre-migration release; fills in what revision 0001 has
    that such a release lacked, in the migration transaction."""
    tables = set(inspect(conn).get_table_names())
    if "cases" not in tables:
        return False
    missing = [t for t in LEGACY_TABLES if t not in tables]
    if missing:
        raise FhirbridgeError(f"the store database has a `cases` table but no {', '.join(missing)}: it was not "
                              "made by fhirbridge, or is damaged; refusing to migrate it")
    initial = _scripts().get_revision(INITIAL).module
    with Operations.context(MigrationContext.configure(conn)):
        if "cursors" not in tables:
            initial.create_cursors()
        columns = {c["name"] for c in inspect(conn).get_columns("cases")}
        for name in ("due_at", "overdue_at"):
            if name not in columns:
                op.add_column("cases", Column(name, Float()))
    return True
