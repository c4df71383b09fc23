"""The Case list in SQL (store/case_query.py): filtered pages with a keyset cursor, grouped counts, and the
filed opinion's summary, the same on SQLite and PostgreSQL (FHIRBRIDGE_TEST_POSTGRES_URL)."""
from __future__ import annotations

import os

import pytest

from fhirbridge.errors import CaseError
from fhirbridge.store.case_query import CaseFilter, encode_cursor
from fhirbridge.store.store import Store
from tests.kit.hospital import pg_schema

PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set (e.g. "
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
STEPS = ["collect", "await_opinion", "done", "failed", "needs_review"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'store.db'}")
        yield s
        s.close()
    else:
        with pg_schema("fb_list") as url:
            s = Store(url)
            yield s
            s.close()


def fill(store: Store, n: int = 25) -> list[dict]:
    """n Cases, one second apart, spread over two hospitals, two reviewers and five steps; two share an
    updated_at so the id must break the tie."""
    rows = []
    for i in range(n):
        rows.append({"id": f"case-{i:03d}", "hospital": "north" if i % 3 else "south",
                     "service_request": f"ServiceRequest/{i}", "patient": f"Patient/p{i % 4}",
                     "reviewer": "spine" if i % 2 else "heart", "profile": "default", "step": STEPS[i % 5],
                     "created_at": 1000.0 + i, "updated_at": 2000.0 + (i if i != 7 else 6),
                     "last_error": "EHR unreachable" if i % 5 == 0 and i % 2 else None,
                     "overdue_at": 1500.0 if i % 5 == 1 and i < 10 else None})
    store.load_cases(rows)
    return rows


def all_pages(store: Store, flt: CaseFilter | None = None, **kw) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = store.page_cases(flt, cursor=cursor, **kw)
        pages.append([c.id for c in page.cases])
        if page.next is None:
            return pages
        cursor = page.next


def test_pages_follow_each_other_without_gaps_or_repeats_newest_first(store):
    rows = fill(store)
    pages = all_pages(store, limit=10)
    assert [len(p) for p in pages] == [10, 10, 5]
    flat = [i for p in pages for i in p]
    expected = [r["id"] for r in sorted(rows, key=lambda r: (r["updated_at"], r["id"]), reverse=True)]
    assert flat == expected
    # The tie on updated_at (case-006 and case-007) is broken by the id, across the page boundary too.
    assert flat.index("case-007") == flat.index("case-006") - 1


def test_ascending_by_creation_and_a_case_moving_meanwhile_is_neither_skipped_nor_repeated(store):
    fill(store)
    first = store.page_cases(sort="created", descending=False, limit=5)
    assert [c.id for c in first.cases] == [f"case-{i:03d}" for i in range(5)]
    store.update("case-002", step="failed")          # Cases change while someone pages
    store.update("case-009", step="failed")
    seen, cursor = [c.id for c in first.cases], first.next
    while cursor:
        page = store.page_cases(sort="created", descending=False, limit=5, cursor=cursor)
        seen += [c.id for c in page.cases]
        cursor = page.next
    assert seen == [f"case-{i:03d}" for i in range(25)]


def test_every_filter_is_applied_in_the_database(store):
    rows = fill(store)

    def ids(**kw):
        return sorted(i for p in all_pages(store, CaseFilter(**kw), limit=7) for i in p)

    def expect(pred):
        return sorted(r["id"] for r in rows if pred(r))

    assert ids(case_id="case-01") == expect(lambda r: r["id"].startswith("case-01"))
    assert ids(case_id="case_0") == []                       # LIKE wildcards are literal
    assert ids(service_request="ServiceRequest/12") == ["case-012"]
    assert ids(patient="Patient/p1") == expect(lambda r: r["patient"] == "Patient/p1")
    assert ids(reviewer="spine") == expect(lambda r: r["reviewer"] == "spine")
    assert ids(steps=("done", "failed")) == expect(lambda r: r["step"] in ("done", "failed"))
    assert ids(hospitals=("south",)) == expect(lambda r: r["hospital"] == "south")
    assert ids(hospitals=()) == []
    assert ids(created_from=1005.0, created_to=1010.0) == [f"case-{i:03d}" for i in range(5, 10)]
    assert ids(overdue=True) == ["case-001", "case-006"]
    assert ids(failed=True) == expect(lambda r: r["step"] == "failed" or (r["step"] == "collect" and r["last_error"]))
    assert ids(needs_review=True) == expect(lambda r: r["step"] == "needs_review")
    assert ids(reviewer="heart", steps=("done",), hospitals=("north",)) == expect(
        lambda r: r["reviewer"] == "heart" and r["step"] == "done" and r["hospital"] == "north")
    assert store.count_cases(CaseFilter(reviewer="spine")) == len(expect(lambda r: r["reviewer"] == "spine"))
    assert CaseFilter(hospitals=("north", "south")).narrowed_to(["south"]).hospitals == ("south",)


def test_counts_are_grouped_per_step_and_per_reviewer(store):
    rows = fill(store)
    by_step = store.count_by_step()
    assert by_step == {s: sum(r["step"] == s for r in rows) for s in STEPS}
    assert sum(store.count_by_step(("south",)).values()) == sum(r["hospital"] == "south" for r in rows)
    per = store.reviewer_counts()
    assert per["spine"]["done"] == sum(r["reviewer"] == "spine" and r["step"] == "done" for r in rows)
    assert per["heart"].get("overdue", 0) + per["spine"].get("overdue", 0) == 2


def test_a_bad_cursor_sort_or_limit_is_refused_with_a_reason(store):
    fill(store, 3)
    with pytest.raises(CaseError, match="not one this service gave out"):
        store.page_cases(cursor="not-a-cursor!")
    with pytest.raises(CaseError, match="another sort order"):
        store.page_cases(cursor=encode_cursor("created", True, 1.0, "x"))
    with pytest.raises(CaseError, match="sort must be one of"):
        store.page_cases(sort="patient")
    with pytest.raises(CaseError, match="limit must be between 1 and 200"):
        store.page_cases(limit=0)


def test_the_filed_summary_is_counted_and_its_turnaround_quantiles_read(store):
    fill(store)
    done = [c for c in store.page_cases(CaseFilter(steps=("done",)), limit=200).cases]
    assert store.unsummarised(100) and {c.id for c in store.unsummarised(100)} == {c.id for c in done}
    for i, c in enumerate(done):
        store.set_summary(c.id, concordance="concordant" if i % 2 else "discordant",
                          recommendation="proceed-as-planned", filed_at=3000.0, turnaround_seconds=86400.0 * (i + 1))
    assert store.unsummarised(100) == []
    counts = store.conclusion_counts()
    assert sum(counts.values()) == len(done)
    assert counts[("concordant", "proceed-as-planned")] == len(done) // 2
    heart = [c for c in done if c.reviewer == "heart"]
    days = sorted(c.turnaround_seconds for c in (store.get(x.id) for x in heart))
    median, p90 = store.turnaround_quantiles("heart", (0.5, 0.9))
    rank = [days[max(0, int(len(days) * q + 0.5) - 1)] for q in (0.5, 0.9)]
    assert [median, p90] == rank
    assert store.turnaround_quantiles("nobody", (0.5,)) == [None]
