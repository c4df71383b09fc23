"""GET /api/cases at scale: one page at a time with a keyset cursor, filters in the database, the page size
bounded, and every bad parameter a 400 that names it (the list used to return every Case: 54 MB at 100k)."""
from __future__ import annotations

import pytest

from tests.service.test_api import served, staff  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.sekmet


def load(svc, n: int) -> list[dict]:
    key = svc.apps[0].hospital.key
    rows = [{"id": f"listed-{i:04d}", "hospital": key, "service_request": f"ServiceRequest/list-{i}",
             "patient": f"Patient/list-{i % 7}", "reviewer": "spine-center" if i % 2 else "other-center",
             "profile": "default", "step": ("await_opinion", "done", "failed")[i % 3],
             "created_at": 1_700_000_000.0 + i * 3600, "updated_at": 1_700_000_000.0 + i * 60,
             "overdue_at": 1_700_000_500.0 if i % 6 == 0 else None} for i in range(n)]
    svc.store.load_cases(rows)
    return rows


def test_the_list_is_paged_with_a_cursor_and_a_bounded_page_size(served):  # noqa: F811
    _h, svc, client = served
    rows = load(svc, 130)
    first = client.get("/api/cases", headers=staff()).get_json()
    assert first["limit"] == 50 and len(first["cases"]) == 50 and first["next"]
    seen, cursor = [c["id"] for c in first["cases"]], first["next"]
    while cursor:
        page = client.get(f"/api/cases?cursor={cursor}", headers=staff()).get_json()
        seen += [c["id"] for c in page["cases"]]
        cursor = page["next"]
    ours = [c for c in seen if c.startswith("listed-")]
    assert ours == [r["id"] for r in sorted(rows, key=lambda r: r["updated_at"], reverse=True)]
    assert len(seen) == len(set(seen))
    big = client.get("/api/cases?limit=200", headers=staff()).get_json()
    assert len(big["cases"]) == len(seen) and big["next"] is None
    assert client.get("/api/cases?limit=201", headers=staff()).status_code == 400


def test_filters_select_in_the_database_and_combine(served):  # noqa: F811
    _h, svc, client = served
    rows = load(svc, 60)

    def ids(query):
        r = client.get(f"/api/cases?limit=200&{query}", headers=staff())
        assert r.status_code == 200, r.get_json()
        return sorted(c["id"] for c in r.get_json()["cases"] if c["id"].startswith("listed-"))

    def expect(pred):
        return sorted(r["id"] for r in rows if pred(r))

    assert ids("case=listed-001") == expect(lambda r: r["id"].startswith("listed-001"))
    assert ids("order=list-12") == ["listed-0012"]
    assert ids("patient=list-3") == expect(lambda r: r["patient"] == "Patient/list-3")
    assert ids("reviewer=other-center&step=failed") == expect(
        lambda r: r["reviewer"] == "other-center" and r["step"] == "failed")
    assert ids("step=done,failed") == expect(lambda r: r["step"] in ("done", "failed"))
    assert ids("overdue=true") == expect(lambda r: r["step"] == "await_opinion" and r["overdue_at"])
    assert ids("failed=true") == expect(lambda r: r["step"] == "failed")
    # 2023-11-14T22:13:20Z is the first Case's creation; one per hour after it.
    assert ids("created_from=2023-11-15T00:00:00%2B00:00&created_to=2023-11-15T03:00:00%2B00:00") == [
        "listed-0002", "listed-0003", "listed-0004"]
    assert ids("created_from=2023-11-14&created_to=2023-11-14") == ["listed-0000", "listed-0001"]
    oldest = client.get("/api/cases?sort=created&dir=asc&limit=1&case=listed-", headers=staff()).get_json()
    assert oldest["cases"][0]["id"] == "listed-0000"


@pytest.mark.parametrize(("query", "message"), [
    ("overdue=yes", 'overdue must be "true" or "false"'),
    ("step=awaiting", "step must be one of"),
    ("limit=0", "limit must be a whole number from 1 to 200"),
    ("limit=ten", "limit must be a whole number"),
    ("sort=patient", "sort must be one of updated, created"),
    ("dir=up", 'dir must be "asc" or "desc"'),
    ("cursor=%21%21", "the cursor is not one this service gave out"),
    ("created_from=yesterday", "created_from must be a date (YYYY-MM-DD)"),
    ("colour=blue", "unknown parameter 'colour'"),
    ("hospital=Nowhere", "hospital"),
])
def test_a_bad_parameter_is_a_400_that_names_it(served, query, message):  # noqa: F811
    _h, _svc, client = served
    r = client.get(f"/api/cases?{query}", headers=staff())
    assert r.status_code == 400 and message in r.get_json()["error"]["message"], r.get_json()


def test_a_cursor_of_another_sort_is_refused(served):  # noqa: F811
    _h, svc, client = served
    load(svc, 5)
    nxt = client.get("/api/cases?limit=2", headers=staff()).get_json()["next"]
    r = client.get(f"/api/cases?limit=2&sort=created&cursor={nxt}", headers=staff())
    assert r.status_code == 400 and "another sort order" in r.get_json()["error"]["message"]
