"""The DICOMweb client against a real PACS (Orthanc): QIDO-RS search, WADO-RS retrieve byte for byte,
STOW-RS store, authentication (PS3.18 10.4-10.6)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pydicom
import pytest

from fhirbridge.dicomweb import DicomwebClient, DicomwebError, make_auth
from tests.kit.dicom_studies import Study, make_study, sha256_file
from tests.kit.faultproxy import FaultProxy
from tests.kit.pacs import Pacs

RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tags(item: dict, tag: str):
    return (item.get(tag) or {}).get("Value", [None])[0]


def test_search_lists_the_study_its_series_and_instances(dicomweb: DicomwebClient, study: Study):
    studies = dicomweb.search_studies({"StudyInstanceUID": study.study_uid})
    assert [_tags(s, "0020000D") for s in studies] == [study.study_uid]
    series = dicomweb.search_series(study.study_uid)
    assert {_tags(s, "0020000E") for s in series} == set(study.series)
    assert sorted(_tags(s, "00080060") for s in series) == ["CT", "CT", "MR", "OT"]
    for series_uid, paths in study.series.items():
        instances = dicomweb.search_instances(study.study_uid, series_uid)
        expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        assert {_tags(i, "00080018") for i in instances} == expected


def test_search_pages_through_every_match(pacs: Pacs, study: Study):
    # A page smaller than the study: limit/offset (PS3.18 8.3.4.4) until a short page.
    with DicomwebClient(pacs.dicomweb_url, page_size=5) as client:
        assert len(client.search_instances(study.study_uid)) == len(study.files)


def test_a_retrieved_study_is_byte_identical_private_and_in_its_own_transfer_syntax(
        dicomweb: DicomwebClient, study: Study, tmp_path: Path):
    got = dicomweb.retrieve_study(study.study_uid, tmp_path)
    uploaded = study.hashes()
    assert got.folder == tmp_path / study.study_uid
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == uploaded
    for instance in got.instances:
        assert sha256_file(instance.path) == instance.sha256 == uploaded[instance.sop_instance_uid]
        assert instance.path == got.folder / instance.series_instance_uid / f"{instance.sop_instance_uid}.dcm"
        assert _mode(instance.path) == 0o600
        assert _mode(instance.path.parent) == 0o700
    assert _mode(got.folder) == 0o700
    assert set(got.series()) == set(study.series)
    # The compressed series came back compressed (transfer-syntax=*: as stored, never transcoded).
    rle = [i for i in got.instances if i.transfer_syntax_uid == RLE_LOSSLESS]
    assert len(rle) == 4
    multiframe = [i for i in got.instances if i.frames > 1]
    assert [i.frames for i in multiframe] == [6]
    assert [p.name for p in tmp_path.iterdir()] == [study.study_uid]   # no staging folder left behind


def test_bundled_files_come_back_identical_in_their_transfer_syntaxes(dicomweb: DicomwebClient,
                                                                      bundled: list[Study], tmp_path: Path):
    syntaxes = set()
    for source in bundled:
        (series_uid,) = source.series
        got = dicomweb.retrieve_series(source.study_uid, series_uid, tmp_path)
        (instance,) = got.instances
        assert got.folder == tmp_path / source.study_uid / series_uid
        assert instance.sha256 == sha256_file(source.files[0])
        syntaxes.add(instance.transfer_syntax_uid)
    # explicit and implicit VR little endian, JPEG 2000, RLE Lossless
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.91", RLE_LOSSLESS} <= syntaxes


def test_retrieving_again_replaces_the_earlier_copy(dicomweb: DicomwebClient, study: Study, tmp_path: Path):
    series_uid = next(iter(study.series))
    first = dicomweb.retrieve_series(study.study_uid, series_uid, tmp_path)
    (first.folder / "stray.txt").write_text("left from an earlier run")
    second = dicomweb.retrieve_series(study.study_uid, series_uid, tmp_path)
    assert second.folder == first.folder
    assert sorted(p.name for p in second.folder.iterdir()) == sorted(
        f"{i.sop_instance_uid}.dcm" for i in second.instances)
    assert [p.name for p in (tmp_path / study.study_uid).iterdir()] == [series_uid]


def test_stow_stores_every_instance_and_they_retrieve_identical(pacs: Pacs, dicomweb: DicomwebClient,
                                                                tmp_path: Path):
    new = make_study(tmp_path / "new", ct_slices=5, mr_slices=3, frames=3, rle_slices=2, seed=99)
    before = pacs.instance_count()
    result = dicomweb.store(new.files)
    assert result.status == 200 and result.failed == {}
    assert set(result.stored) == set(new.hashes())
    assert pacs.instance_count() == before + len(new.files)
    got = dicomweb.retrieve_study(new.study_uid, tmp_path / "out")
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == new.hashes()


def test_stow_into_another_study_is_refused_by_the_pacs(pacs: Pacs, dicomweb: DicomwebClient, tmp_path: Path):
    # PS3.18 10.5: instances POSTed to /studies/{uid} must belong to that study; Orthanc answers 409 with a
    # FailedSOPSequence, and nothing is stored.
    new = make_study(tmp_path / "new", ct_slices=2, mr_slices=1, frames=2, rle_slices=1, seed=98)
    before = pacs.instance_count()
    with pytest.raises(DicomwebError) as err:
        dicomweb.store(new.files, study_uid="1.2.826.0.1.3680043.8.498.2")
    assert (err.value.kind, err.value.status, err.value.transient) == ("refused", 409, False)
    assert pacs.instance_count() == before


def test_stow_refuses_a_file_that_is_not_dicom_before_sending(dicomweb: DicomwebClient, tmp_path: Path):
    bogus = tmp_path / "report.pdf"
    bogus.write_bytes(b"%PDF-1.7\n" + b"\0" * 300)
    with pytest.raises(DicomwebError) as err:
        dicomweb.store([bogus])
    assert err.value.kind == "not-dicom" and not err.value.transient


@pytest.fixture(scope="module")
def secured_pacs(tmp_path_factory: pytest.TempPathFactory, pacs: Pacs):
    """A second Orthanc that asks for HTTP Basic credentials (one registered user)."""
    server = Pacs.start(tmp_path_factory.mktemp("secured-pacs"), users={"reader": "s3cret-pacs"})
    try:
        yield server
    finally:
        server.stop()


def test_basic_auth_is_sent_and_wrong_credentials_are_a_transient_401(secured_pacs: Pacs, tmp_path: Path):
    study = make_study(tmp_path / "s", ct_slices=2, mr_slices=1, frames=2, rle_slices=1, seed=7)
    secured_pacs.upload(study.files)
    good = make_auth({"type": "basic", "username": "reader", "password": "s3cret-pacs"})
    assert "s3cret" not in repr(good)
    with DicomwebClient(secured_pacs.dicomweb_url, auth=good) as client:
        got = client.retrieve_study(study.study_uid, tmp_path / "out")
        assert {i.sop_instance_uid: i.sha256 for i in got.instances} == study.hashes()
    for auth in (None, make_auth({"type": "basic", "username": "reader", "password": "wrong"})):
        with DicomwebClient(secured_pacs.dicomweb_url, auth=auth) as client, pytest.raises(DicomwebError) as err:
            client.search_studies()
        # As for the EHR: credentials fixed by IT let every waiting Case resume by itself.
        assert (err.value.kind, err.value.status, err.value.transient) == ("unauthorized", 401, True)
        assert "s3cret" not in str(err.value) and "wrong" not in str(err.value)


class _BearerGate(FaultProxy):
    """The PACS behind a gate that wants `Authorization: Bearer <one of tokens>` (a PACS behind an OAuth proxy)."""

    tokens: set[str] = set()

    def admit(self, method, path, headers, body):
        if headers.get("Authorization", "") not in {f"Bearer {t}" for t in self.tokens}:
            return 401, b'{"error": "invalid_token"}'
        return {"Authorization": ""}   # Orthanc itself asks for nothing


def test_bearer_and_a_token_source_are_sent_with_every_request(pacs: Pacs, study: Study, tmp_path: Path):
    gate = _BearerGate(pacs.dicomweb_url)
    try:
        gate.tokens = {"tok-1"}
        with DicomwebClient(gate.base_url, auth=make_auth({"type": "bearer", "token": "tok-1"})) as client:
            assert client.search_studies({"StudyInstanceUID": study.study_uid})
        issued = iter(["tok-2", "tok-3", "tok-3", "tok-3", "tok-3", "tok-3"])
        asked = []

        def source() -> str:
            asked.append(token := next(issued))
            return token
        with DicomwebClient(gate.base_url, auth=make_auth(source)) as client:
            gate.tokens = {"tok-2"}
            assert client.search_studies({"StudyInstanceUID": study.study_uid})
            gate.tokens = {"tok-3"}   # renewed: the source's new token goes with the next request
            series_uid = next(iter(study.series))
            got = client.retrieve_series(study.study_uid, series_uid, tmp_path)
            assert len(got.instances) == len(study.series[series_uid])
            gate.tokens = set()
            with pytest.raises(DicomwebError) as err:
                client.search_studies()
            assert err.value.kind == "unauthorized" and err.value.transient
        assert asked[:2] == ["tok-2", "tok-3"]
    finally:
        gate.close()


def test_the_pacs_url_must_be_http(tmp_path: Path):
    with pytest.raises(ValueError):
        DicomwebClient("file:///etc")
    with pytest.raises(ValueError):
        make_auth({"type": "kerberos"})
    with DicomwebClient("http://127.0.0.1:9") as client, pytest.raises(DicomwebError) as err:
        client.retrieve_series("1.2.3/../..", "1.2", tmp_path)
    assert err.value.kind == "refused"   # a UID is checked (PS3.5 9.1) before it reaches a URL or a path


@pytest.mark.parametrize("chunk_size", [7, 131, 133])
def test_small_reads_split_the_preamble_and_the_delimiters_anywhere(pacs: Pacs, study: Study, tmp_path: Path,
                                                                   chunk_size: int):
    # Network reads smaller than a preamble: "DICM" is checked across them, never from a half-written file.
    series_uid = list(study.series)[1]
    with DicomwebClient(pacs.dicomweb_url, chunk_size=chunk_size) as client:
        got = client.retrieve_series(study.study_uid, series_uid, tmp_path)
    hashes = study.hashes()
    assert len(got.instances) == len(study.series[series_uid])
    assert all(hashes[i.sop_instance_uid] == i.sha256 == sha256_file(i.path) for i in got.instances)
