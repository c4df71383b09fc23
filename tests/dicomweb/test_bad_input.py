"""Bad answers from the PACS, each a clear DicomwebError (transient or not) with nothing partial left under a
final name: the fault proxy (tests/kit/faultproxy.py) sits between the client and a real Orthanc."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from fhirbridge.dicomweb import DicomwebClient, DicomwebError
from fhirbridge.errors import FhirbridgeError
from fhirbridge.loop.runner import is_transient
from tests.kit.dicom_studies import Study
from tests.kit.faultproxy import FaultProxy
from tests.kit.pacs import Pacs


def _series(study: Study, n: int = 0) -> str:
    return list(study.series)[n]


def _wado(study: Study, series_uid: str) -> str:
    return rf"/studies/{re.escape(study.study_uid)}/series/{re.escape(series_uid)}$"


def _client(proxy: FaultProxy, **kw) -> DicomwebClient:
    kw.setdefault("retries", 0)
    kw.setdefault("backoff", 0)
    return DicomwebClient(proxy.base_url, **kw)


def _assert_nothing_left(into: Path, study: Study) -> None:
    """Neither a final folder nor a staging folder: a failed retrieval leaves no instance on disk."""
    left = [p for p in into.rglob("*") if not (p.is_dir() and p == into / study.study_uid)]
    assert left == []


def _retrieve_fails(proxy: FaultProxy, study: Study, into: Path, **kw) -> DicomwebError:
    series_uid = _series(study)
    with _client(proxy, **kw) as client, pytest.raises(DicomwebError) as err:
        client.retrieve_series(study.study_uid, series_uid, into)
    _assert_nothing_left(into, study)
    # The loop's runner reads it as it reads FhirError: transient leaves the Case at its step.
    assert isinstance(err.value, FhirbridgeError) and is_transient(err.value) == err.value.transient
    return err.value


def test_an_answer_cut_off_mid_transfer_is_transient(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="truncate")
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("truncated", True)
    assert pacs_proxy.injected["truncate"] == 1


def test_a_multipart_body_without_its_closing_boundary_is_truncated(pacs_proxy: FaultProxy, study: Study,
                                                                    tmp_path: Path):
    # A complete HTTP answer whose multipart body stops inside its last instance (a PACS that crashed mid-answer
    # behind a buffering gateway): the last part is never finished, so never taken for a whole instance.
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite",
                   rewrite=lambda body: body[:-1000])
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("truncated", True)
    assert "closing boundary" in str(err)


def test_a_part_without_the_dicm_preamble_is_not_dicom(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite",
                   rewrite=lambda body: body.replace(b"DICM", b"NOPE", 1))
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("not-dicom", False)
    assert "PS3.10 7.1" in str(err)


def test_a_part_of_another_media_type_is_not_dicom(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite",
                   rewrite=lambda body: body.replace(b"Content-Type: application/dicom", b"Content-Type: text/html", 1))
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("not-dicom", False)


@pytest.mark.filterwarnings("ignore::UserWarning")   # pydicom says what it could not parse: that is the point
def test_a_part_with_an_unreadable_header_is_not_dicom(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    # "DICM" is there, but what follows is not a file meta group pydicom can read.
    def garble(body: bytes) -> bytes:
        at = body.index(b"DICM") + 4
        return body[:at] + b"\xff" * 64 + body[at + 64:]
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite", rewrite=garble)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("not-dicom", False)


def _drop_last_part(body: bytes) -> bytes:
    boundary = body.split(b"\r\n", 1)[0]          # "--<boundary>"
    parts = body.split(b"\r\n" + boundary)
    # parts: [first part (starting with the boundary line), ..., "--\r\n" epilogue]
    return (b"\r\n" + boundary).join(parts[:-2] + parts[-1:])


def test_fewer_instances_than_qido_lists_is_a_mismatch(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite", rewrite=_drop_last_part)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("mismatch", False)
    n = len(study.series[_series(study)])
    assert f"with {n - 1} instances where its QIDO-RS search lists {n}" in str(err)


def test_a_series_count_the_answer_does_not_match_is_a_mismatch_without_an_instance_search(
        pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    # A caller with the series-level QIDO-RS count (NumberOfSeriesRelatedInstances) checks against it, and the
    # instance-level search (slow on Orthanc) is not made.
    n = len(study.series[_series(study)])
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite", rewrite=_drop_last_part)
    series_uid = _series(study)
    with _client(pacs_proxy) as client, pytest.raises(DicomwebError) as err:
        client.retrieve_series(study.study_uid, series_uid, tmp_path, expected=n)
    _assert_nothing_left(tmp_path, study)
    assert (err.value.kind, err.value.transient) == ("mismatch", False)
    assert f"with {n - 1} instances where its QIDO-RS search counts {n}" in str(err.value)
    assert pacs_proxy.count("GET", r"/instances") == 0


def test_a_series_retrieved_against_its_count_arrives_whole(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    series_uid = _series(study)
    with _client(pacs_proxy) as client:
        got = client.retrieve_series(study.study_uid, series_uid, tmp_path, expected=len(study.series[series_uid]))
    assert len(got.instances) == len(study.series[series_uid])
    assert sorted(i.number for i in got.instances) == list(range(1, len(got.instances) + 1))
    assert all(i.image_type[:2] == ("ORIGINAL", "PRIMARY") for i in got.instances)
    assert pacs_proxy.count("GET", r"/instances") == 0


def test_an_instance_qido_lists_but_wado_does_not_send_is_a_mismatch(pacs_proxy: FaultProxy, study: Study,
                                                                     tmp_path: Path):
    def one_more(body: bytes) -> bytes:
        items = json.loads(body)
        ghost = json.loads(json.dumps(items[0]))
        ghost["00080018"]["Value"] = ["1.2.3.4.5.6.7.8.9"]
        return json.dumps(items + [ghost]).encode()
    pacs_proxy.add(method="GET", path=rf"/series/{re.escape(_series(study))}/instances\?", action="rewrite",
                   rewrite=one_more)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("mismatch", False)
    assert "1 missing" in str(err)


def test_an_instance_of_another_series_is_a_mismatch(pacs: Pacs, pacs_proxy: FaultProxy, study: Study,
                                                     tmp_path: Path):
    # The PACS answers series A's retrieve with series B's instances (same count would not be enough to notice).
    other = requests.get(f"{pacs.dicomweb_url}/studies/{study.study_uid}/series/{_series(study, 1)}",
                         headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    other_boundary = other.content.split(b"\r\n", 1)[0]

    def swap(body: bytes) -> bytes:
        return other.content.replace(other_boundary, body.split(b"\r\n", 1)[0])
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="rewrite", rewrite=swap)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("mismatch", False)
    assert f"of series {_series(study, 1)}" in str(err)


def test_a_study_the_pacs_does_not_have_is_not_found(dicomweb: DicomwebClient, tmp_path: Path):
    with pytest.raises(DicomwebError) as err:
        dicomweb.retrieve_study("1.2.826.0.1.3680043.8.498.1", tmp_path)
    assert (err.value.kind, err.value.transient) == ("not-found", False)
    assert list(tmp_path.iterdir()) == []


def test_a_404_from_wado_is_not_found(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), status=404)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.status, err.transient) == ("not-found", 404, False)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_transient(pacs_proxy: FaultProxy, study: Study, tmp_path: Path, status: int):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), status=status)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.status, err.transient) == ("unauthorized", status, True)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient_after_the_retries(pacs_proxy: FaultProxy, study: Study, tmp_path: Path,
                                                       status: int):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), status=status)
    err = _retrieve_fails(pacs_proxy, study, tmp_path, retries=2)
    assert (err.kind, err.status, err.transient) == ("unavailable", status, True)
    tries = pacs_proxy.count("GET", _wado(study, _series(study)))
    assert tries == (1 if status == 500 else 3)   # 500 is not retried (RETRY_STATUSES: 429, 502, 503, 504)


def test_a_503_once_is_retried_and_the_series_arrives(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), status=503, times=1,
                   headers={"Retry-After": "0"})
    with _client(pacs_proxy, retries=2) as client:
        got = client.retrieve_series(study.study_uid, _series(study), tmp_path)
    hashes = study.hashes()
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == {
        i.sop_instance_uid: hashes[i.sop_instance_uid] for i in got.instances}
    assert len(got.instances) == len(study.series[_series(study)])


def test_a_pacs_too_slow_to_answer_is_transient(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="delay", delay=2.0)
    err = _retrieve_fails(pacs_proxy, study, tmp_path, timeout=(2.0, 0.5))
    assert (err.kind, err.transient) == ("unavailable", True)
    assert "in time" in str(err)


@pytest.mark.parametrize("action", ["drop", "lose-response"])
def test_a_connection_dropped_without_an_answer_is_transient(pacs_proxy: FaultProxy, study: Study, tmp_path: Path,
                                                             action: str):
    # drop: the PACS never sees the request; lose-response: it answered, and the answer was lost on the way.
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action=action)
    err = _retrieve_fails(pacs_proxy, study, tmp_path)
    assert (err.kind, err.transient) == ("unavailable", True)
    assert pacs_proxy.injected[action] == 1


def test_a_lost_answer_is_asked_again_and_the_series_arrives(pacs_proxy: FaultProxy, study: Study, tmp_path: Path):
    pacs_proxy.add(method="GET", path=_wado(study, _series(study)), action="lose-response", times=1)
    with _client(pacs_proxy, retries=1) as client:
        got = client.retrieve_series(study.study_uid, _series(study), tmp_path)
    assert len(got.instances) == len(study.series[_series(study)])
    assert pacs_proxy.count("GET", _wado(study, _series(study))) == 2


def test_an_unreachable_pacs_is_transient(tmp_path: Path):
    with DicomwebClient("http://127.0.0.1:9/dicom-web", retries=0) as client, pytest.raises(DicomwebError) as err:
        client.search_studies()
    assert (err.value.kind, err.value.transient) == ("unavailable", True)


def test_a_retrieval_over_its_cap_stops_and_leaves_nothing(dicomweb: DicomwebClient, study: Study, tmp_path: Path):
    with pytest.raises(DicomwebError) as err:
        dicomweb.retrieve_series(study.study_uid, _series(study), tmp_path, max_bytes=20_000)
    assert (err.value.kind, err.value.transient) == ("too-large", False)
    _assert_nothing_left(tmp_path, study)


def test_a_staging_folder_left_by_a_crash_is_swept_on_the_next_retrieval(dicomweb: DicomwebClient, study: Study,
                                                                         tmp_path: Path):
    series_uid = _series(study)
    stale = tmp_path / study.study_uid / f".partial-{series_uid}-dead"
    stale.mkdir(parents=True)
    (stale / "part-000001.tmp").write_bytes(b"half an instance")
    got = dicomweb.retrieve_series(study.study_uid, series_uid, tmp_path)
    assert [p.name for p in (tmp_path / study.study_uid).iterdir()] == [series_uid]
    assert len(got.instances) == len(study.series[series_uid])
