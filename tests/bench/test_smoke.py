"""The benchmark harness (bench/) in its smallest form: it runs and its figures are well-formed. Correctness
only: no timing is asserted here (timing goals live in bench/, measured side by side)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from fhirbridge.demo.localehr import find_sekmet
from fhirbridge.errors import FhirbridgeError

# bench/ is not an installed package: it is imported from the repository root, which pyproject.toml's
# [tool.pytest.ini_options] pythonpath puts on sys.path however pytest was started.
pytestmark = pytest.mark.sekmet


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    try:
        find_sekmet()
    except FhirbridgeError as exc:
        pytest.skip(str(exc))
    from bench.common import Bench
    b = Bench(tmp_path_factory.mktemp("bench"))
    yield b
    b.close()


def test_collect_loop_and_writeback_run_on_a_tiny_patient(bench):
    from bench import collect_bench, loop_bench, writeback_bench
    naive = importlib.util.find_spec("fhirclient") is not None
    c = collect_bench.run(bench, [10], {10: 1}, naive=naive, log=lambda _m: None)
    row = c["rows"][0]
    assert row["requests"]["fhirbridge"] >= 8          # patient, 7 searches, follow-ups
    assert set(row["median_s"]) >= {"fhirbridge", "bound"}
    wb = writeback_bench.run(bench, 1, log=lambda _m: None)
    assert wb["round_trips"]["raw"] == 1
    assert "POST /fhir" in wb["requests"]["file_opinion"]
    loop = loop_bench.run(bench, [10], 1, log=lambda _m: None)
    assert loop["rows"][0]["cases_per_hour"] > 0


def test_write_plans_bench_files_with_each_plan(bench):
    from bench import plans_bench
    wp = plans_bench.run(bench, 1, log=lambda _m: None)
    assert set(wp["round_trips"]) == {"atomic", "ledger", "once"}
    assert "POST /fhir" in wp["requests"]["atomic"]
    assert "POST /fhir/DocumentReference" in wp["requests"]["ledger"]
    assert "POST /fhir/Provenance" in wp["requests"]["once"]


def test_seal_contenders_run_in_their_own_processes(tmp_path):
    from bench import seal_bench
    out = seal_bench.run(tmp_path, [{"name": "tiny", "resources": 10, "attachment_mb": [1]}], 1, log=lambda _m: None)
    row = out["rows"][0]
    assert set(row["peak_extra_rss_bytes"]) == {"fhirbridge", "bound", "joserfc one-shot"}
    assert row["payload_bytes"] > 1 << 20


def test_the_outcomes_tick_bench_claims_one_page_on_each_store(tmp_path):
    from bench import outcomes_bench
    out = outcomes_bench.run(tmp_path, 200, 1, log=lambda _m: None)
    assert out["closed"] == 200 and len(out["median_s"]) == 3 and out["large_vs_small"] > 0


@pytest.mark.skipif(not os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL"),
                    reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set")
def test_claims_on_sqlite_and_postgres_hand_out_no_case_twice(tmp_path):
    from bench import claims_bench
    out = claims_bench.run(tmp_path, 50, 1, url=os.environ["FHIRBRIDGE_TEST_POSTGRES_URL"], log=lambda _m: None)
    assert set(out["engines"]) == {"sqlite", "postgresql"}
    for engine in out["engines"].values():
        assert engine["cases"] == 50 * (claims_bench.OTHERS_PER_DUE + 1)
        assert all(r["duplicates"] == 0 and r["missed"] == 0 for r in engine["rows"].values())


def test_wado_contenders_retrieve_the_same_series(tmp_path):
    from bench import wado_bench
    from tests.kit.pacs import find_orthanc
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    out = wado_bench.run(tmp_path, 2, 1, log=lambda _m: None)
    assert set(out["median_s"]) == {"raw GET", "fhirbridge", "fhirbridge, fsync off"}
    assert out["instances"] == 4 and out["answer_bytes"] > out["payload_bytes"]


def test_cds_bench_answers_every_contender_under_load(bench):
    from bench import cds_bench
    out = cds_bench.run(bench, 1, 2, log=lambda _m: None)
    row = out["sqlite"]
    assert set(row["calls"]) == set(cds_bench.CONTENDERS) and all(n > 0 for n in row["calls"].values())
    assert set(row["p95_vs_floor"]) == {"card, prefetch", "card, no prefetch"}
