"""The reviewer's commands for the images (issue 15): `reviewer open --extract DIR` writes every instance of the
package byte for byte by study and series, with a DICOMDIR; `reviewer import-pacs` stores them in the reviewer's
OWN PACS (a second Orthanc) by STOW-RS and checks by QIDO-RS that it lists every one; a corrupted series
attachment is refused naming it, with no traceback."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.kit.cli import run
from tests.kit.dicom_studies import Study, endpoint_resource, imaging_study_resource, make_study, sha256_file
from tests.kit.pacs import Pacs, find_orthanc

pytestmark = pytest.mark.sekmet


def _orthanc(directory: Path):
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = Pacs.start(directory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hospital_pacs(tmp_path_factory):
    yield from _orthanc(tmp_path_factory.mktemp("hospital-pacs"))


@pytest.fixture(scope="module")
def reviewer_pacs(tmp_path_factory):
    """The reviewer's own PACS: a second Orthanc, empty."""
    yield from _orthanc(tmp_path_factory.mktemp("reviewer-pacs"))


@pytest.fixture(scope="module")
def mr_study(hospital_pacs: Pacs, tmp_path_factory) -> Study:
    """An MR study: one MR series of 10 slices (the other series make_study writes are left out)."""
    generated = make_study(tmp_path_factory.mktemp("mr"), ct_slices=1, mr_slices=10, frames=1, rle_slices=1)
    generated.series = {k: v for k, v in generated.series.items()
                        if pydicom.dcmread(v[0], stop_before_pixels=True).Modality == "MR"}
    hospital_pacs.upload(generated.files)
    return generated


@pytest.fixture
def delivered(hospital, fhir, hospital_pacs, mr_study):
    h = hospital
    h.config_path.write_text(h.config_path.read_text() + f'\n[hospital.pacs]\nurl = "{hospital_pacs.dicomweb_url}"\n')
    h.app.close()
    h.app = h.new_app()
    patient, _ = fhir.create({"resourceType": "Patient", "name": [{"family": "Stow-Testpatient"}]})
    endpoint, _ = fhir.create(endpoint_resource(hospital_pacs.dicomweb_url))
    fhir.create(imaging_study_resource(mr_study, f"Patient/{patient['id']}", f"Endpoint/{endpoint['id']}"))
    case = h.delivered_case(f"Patient/{patient['id']}")
    r = h.reviewers[case.reviewer]
    return h.package_path(case), r.files["private_keys"]


def test_open_extract_writes_every_instance_byte_identical_with_a_dicomdir(delivered, mr_study, tmp_path, capsys):
    package, key = delivered
    out = tmp_path / "extracted"
    code, stdout, err = run(capsys, "reviewer", "open", package, "--key", key, "--extract", out)
    assert code == 0, err
    got = {p.stem: sha256_file(p) for p in out.glob("*/*/*.dcm")}
    assert got == mr_study.hashes()
    assert "DICOMDIR" in stdout
    assert len(pydicom.dcmread(out / "DICOMDIR").DirectoryRecordSequence) >= len(got)


def test_import_pacs_lands_every_instance_in_the_reviewers_own_pacs(delivered, mr_study, reviewer_pacs, capsys):
    package, key = delivered
    before = reviewer_pacs.instance_count()
    code, stdout, err = run(capsys, "reviewer", "import-pacs", package, "--key", key,
                            "--url", reviewer_pacs.dicomweb_url)
    assert code == 0, err
    assert f"stored {len(mr_study.files)} instances" in stdout
    assert reviewer_pacs.instance_count() - before == len(mr_study.files)
    with reviewer_pacs.session() as http:
        r = http.get(reviewer_pacs.dicomweb_url + f"/studies/{mr_study.study_uid}/instances", timeout=(2, 30))
    assert {i["00080018"]["Value"][0] for i in r.json()} == set(mr_study.hashes())


def test_a_corrupted_series_attachment_is_refused_by_name_and_nothing_of_it_stays(delivered, mr_study, tmp_path,
                                                                                  capsys):
    package, key = delivered
    att = sorted((package / "attachments").glob("att-*.jwe"))[-1]
    data = bytearray(att.read_bytes())
    data[len(data) // 2] ^= 0x01
    att.write_bytes(bytes(data))
    out = tmp_path / "extracted"
    code, stdout, err = run(capsys, "reviewer", "open", package, "--key", key, "--extract", out)
    assert code != 0
    assert att.name in err and "Traceback" not in err
    assert not list(out.glob(f"{mr_study.study_uid}/*"))    # its one series: nothing, not even a .partial-
