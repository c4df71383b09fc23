"""The demo's stand-in PACS answers QIDO-RS and WADO-RS as fhirbridge's own DICOMweb client expects: every
instance of the demo study retrieved byte for byte, paging, a study it does not hold, and read-only. (The
PACS of every other test is Orthanc, tests/kit/pacs.py; this tests the stand-in only.)"""
from __future__ import annotations

import hashlib

import pytest
import requests

from fhirbridge.demo.dicom_study import SLICES, write_demo_study
from fhirbridge.demo.dicomweb_standin import LABEL, RunningStandIn
from fhirbridge.dicomweb import DicomwebClient, DicomwebError


@pytest.fixture
def standin(tmp_path):
    study_uid, paths = write_demo_study(tmp_path / "study", "FB-DEMO", "DEMO^PATIENT")
    with RunningStandIn(tmp_path / "study") as running:
        yield running, study_uid, paths


def test_qido_lists_the_study_its_series_and_every_instance_across_pages(standin):
    running, study_uid, paths = standin
    with DicomwebClient(running.url, page_size=5) as pacs:
        studies = pacs.search_studies({"StudyInstanceUID": study_uid})
        assert [s["0020000D"]["Value"] for s in studies] == [[study_uid]]
        [series] = pacs.search_series(study_uid)
        assert series["00080060"]["Value"] == ["MR"]
        instances = pacs.search_instances(study_uid, series["0020000E"]["Value"][0])
    assert len(instances) == SLICES                     # 16 over pages of 5: limit/offset honoured
    assert {i["00080018"]["Value"][0] for i in instances} == {p.stem for p in paths}


def test_wado_retrieves_every_instance_byte_for_byte(standin, tmp_path):
    running, study_uid, paths = standin
    with DicomwebClient(running.url) as pacs:
        [series] = pacs.search_series(study_uid)
        got = pacs.retrieve_series(study_uid, series["0020000E"]["Value"][0], tmp_path / "into")
        whole = pacs.retrieve_study(study_uid, tmp_path / "study-into")
    want = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == want
    assert {i.sop_instance_uid: i.sha256 for i in whole.instances} == want


def test_a_study_it_does_not_hold_is_not_found_and_it_is_read_only_and_labelled(standin, tmp_path):
    running, study_uid, paths = standin
    with DicomwebClient(running.url) as pacs, pytest.raises(DicomwebError) as exc:
        pacs.retrieve_study("1.2.3.4.5", tmp_path / "none")
    assert exc.value.kind == "not-found"
    answer = requests.post(f"{running.url}/studies", data=b"", timeout=10)
    assert answer.status_code == 405 and answer.headers["X-Fhirbridge-Demo"] == LABEL
    listed = requests.get(f"{running.url}/studies", timeout=10)
    assert listed.headers["X-Fhirbridge-Demo"] == LABEL and listed.headers["Content-Type"] == "application/dicom+json"
