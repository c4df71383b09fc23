"""Images travel with the referral (issue 15, "Done when"): a spine Case whose patient has an MR study in the PACS
(sekmet ImagingStudy + Endpoint dicom-wado-rs, Orthanc holding generated series) goes through collect and seal,
and the reviewer's one-pass extract gives every instance byte for byte. Each kind of bad input ends as the issue
says: transient faults leave the Case at collect to resume (reusing what arrived), a study the PACS lacks, a count
mismatch, a part that is not DICOM or a study over its cap is withheld with its reason, or fails the Case where
the profile requires images."""
from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path

import pydicom
import pytest

from fhirbridge import jsonutil
from fhirbridge.crypto import jws
from fhirbridge.errors import RejectedOpinion
from fhirbridge.exchange.key_images import DCM
from fhirbridge.exchange.reviewer import extract, open_package, sealed_answer
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.actions import retry
from fhirbridge.loop.receive import receive_file
from tests.kit.dicom_studies import Study, endpoint_resource, imaging_study_resource, make_study, sha256_file
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import SAMPLE_ANSWER, TestHospital, docrefs
from tests.kit.pacs import Pacs, find_orthanc

pytestmark = pytest.mark.sekmet


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc of this module's own, not tests/dicomweb's session one: these Cases fault and count the PACS's
    answers, which the DICOMweb tests' uploads and fault rules would disturb (tried: five tests then fail)."""
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = Pacs.start(tmp_path_factory.mktemp("pacs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def study(pacs: Pacs, tmp_path_factory) -> Study:
    """CT, MR, a multi-frame OT (not a spine modality) and an RLE CT series, in the PACS."""
    generated = make_study(tmp_path_factory.mktemp("study"), ct_slices=6, mr_slices=8, frames=3, rle_slices=3)
    pacs.upload(generated.files)
    return generated


def _with_pacs(h: TestHospital, url: str, **extra) -> None:
    lines = [f'url = "{url}"'] + [f"{k} = {v}" for k, v in extra.items()]
    h.config_path.write_text(h.config_path.read_text() + "\n[hospital.pacs]\n" + "\n".join(lines) + "\n")
    h.app.close()
    h.app = h.new_app()


def _profile(h: TestHospital, name: str, **imaging) -> None:
    """Change keys of the [imaging] table of the hospital's own copy of the profile."""
    path = Path(h.app.config.mappings_dir) / "collect" / f"{name}.toml"
    text = path.read_text()
    for key, value in imaging.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    path.write_text(text)


def _patient_with(fhir: FhirClient, study: Study, endpoint_url: str, *, tweak=None) -> str:
    """A patient of its own (the seeded one is collected by other tests) with the study in the EHR."""
    patient, _ = fhir.create({"resourceType": "Patient", "name": [{"family": "Images-Testpatient"}]})
    endpoint, _ = fhir.create(endpoint_resource(endpoint_url))
    resource = imaging_study_resource(study, f"Patient/{patient['id']}", f"Endpoint/{endpoint['id']}")
    if tweak:
        tweak(resource)
    fhir.create(resource)
    return f"Patient/{patient['id']}"


def _spine_series(study: Study) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the series a spine profile keeps (not the multi-frame OT)."""
    hashes = study.hashes()
    keep = {}
    for paths in study.series.values():
        if pydicom.dcmread(paths[0], stop_before_pixels=True).Modality == "OT":
            continue
        for p in paths:
            uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            keep[uid] = hashes[uid]
    return keep


def test_a_spine_case_carries_every_instance_byte_identical_to_the_reviewer(hospital, fhir, pacs, study, tmp_path):
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)
    patient = _patient_with(fhir, study, pacs.dicomweb_url)
    case = h.delivered_case(patient)
    r = h.reviewers[case.reviewer]
    opened = open_package(h.package_path(case), r.key, r.trusted, verify_attachments=False)
    (entry,) = opened.manifest["imaging"]
    assert (entry["study_uid"], entry["status"]) == (study.study_uid, "included")
    assert entry["instances"] == len(_spine_series(study)) and len(entry["series"]) == 3
    series_atts = [a for a in opened.manifest["attachments"] if "dicom" in a]
    assert {a["content_type"] for a in series_atts} == {"application/x-tar"}
    assert {a["dicom"]["modality"] for a in series_atts} == {"CT", "MR"}

    # The document's ImagingStudy points into the package, never at the hospital's PACS.
    (img,) = [e["resource"] for e in opened.document["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    assert "endpoint" not in img and all("endpoint" not in s for s in img["series"])
    files = {x["valueUrl"] for s in img["series"] for x in s.get("extension", [])}
    assert files == {a["file"] for a in series_atts}
    assert pacs.dicomweb_url not in str(opened.document)

    out = tmp_path / "extracted"
    extract(opened, r.key, out)
    got = {p.stem: sha256_file(p) for p in out.glob(f"{study.study_uid}/*/*.dcm")}
    assert got == _spine_series(study)
    assert (out / "DICOMDIR").is_file()


def test_a_study_the_pacs_does_not_have_is_withheld_with_its_reason(hospital, fhir, pacs, study):
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)

    def unknown(resource):
        resource["identifier"][0]["value"] = "urn:oid:2.25.1234567890123456789"
    case = h.delivered_case(_patient_with(fhir, study, pacs.dicomweb_url, tweak=unknown))
    (entry,) = h.open(case).manifest["imaging"]
    assert (entry["status"], entry["kind"]) == ("withheld", "not-found")
    assert "does not have" in entry["reason"] and pacs.dicomweb_url not in entry["reason"]


def test_a_radiology_case_fails_when_its_required_images_cannot_be_sent(hospital, fhir, pacs, study):
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)

    def unknown(resource):
        resource["identifier"][0]["value"] = "urn:oid:2.25.99887766554433"
    sr = h.order(_patient_with(fhir, study, pacs.dicomweb_url, tweak=unknown), profile="radiology")
    h.run()
    case = h.case_for(sr)
    assert case.step == "failed" and case.data["failed_step"] == "collect"
    assert "requires the images" in case.last_error and "2.25.99887766554433" in case.last_error


def test_a_count_the_imaging_study_does_not_match_is_withheld(hospital, fhir, pacs, study):
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)

    def one_more(resource):
        mr = next(s for s in resource["series"] if s["modality"]["code"] == "MR")
        mr["numberOfInstances"] += 1
    case = h.delivered_case(_patient_with(fhir, study, pacs.dicomweb_url, tweak=one_more))
    (entry,) = h.open(case).manifest["imaging"]
    assert (entry["status"], entry["kind"]) == ("withheld", "mismatch")
    assert not [a for a in h.open(case).manifest["attachments"] if "dicom" in a]


def test_a_study_over_the_cap_is_withheld_or_fails_a_profile_that_requires_it(hospital, fhir, pacs, study):
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)
    _profile(h, "spine", max_study_bytes=20000)
    case = h.delivered_case(_patient_with(fhir, study, pacs.dicomweb_url))
    (entry,) = h.open(case).manifest["imaging"]
    assert (entry["status"], entry["kind"]) == ("withheld", "too-large")
    _profile(h, "spine", required="true")
    sr = h.order(_patient_with(fhir, study, pacs.dicomweb_url))
    h.run()
    failed = h.case_for(sr)
    assert failed.step == "failed" and "size cap" in failed.last_error


def test_a_part_that_is_not_dicom_is_withheld(hospital, fhir, pacs, study):
    h = hospital
    proxy = FaultProxy(pacs.dicomweb_url)
    try:
        proxy.add(method="GET", path=r"/series/[0-9.]+$", action="rewrite",
                  rewrite=lambda body: body.replace(b"DICM", b"NOPE", 1))
        _with_pacs(h, proxy.base_url)
        case = h.delivered_case(_patient_with(fhir, study, proxy.base_url))
    finally:
        proxy.close()
    (entry,) = h.open(case).manifest["imaging"]
    assert (entry["status"], entry["kind"]) == ("withheld", "not-dicom")


@pytest.mark.parametrize("fault", [dict(status=503), dict(status=401), dict(status=404, times=1),
                                   dict(action="truncate"), dict(action="delay", delay=3.0),
                                   dict(action="rewrite", rewrite=lambda body: body[:-1000])])
def test_a_pacs_fault_leaves_the_case_at_collect_and_it_resumes(hospital, fhir, pacs, study, fault):
    """5xx, 401, a truncated answer, a multipart body without its end and a PACS too slow are transient: the Case
    waits at collect, then resumes; series that arrived before are reused (not asked for again). A 404 from
    WADO-RS for a study QIDO-RS lists is not transient: it is withheld (asserted separately below)."""
    h = hospital
    proxy = FaultProxy(pacs.dicomweb_url)
    try:
        _with_pacs(h, proxy.base_url, retries=0, timeout_read=1.0, parallel_series=1)
        patient = _patient_with(fhir, study, proxy.base_url)
        mr = next(u for u, paths in study.series.items()
                  if pydicom.dcmread(paths[0], stop_before_pixels=True).Modality == "MR")
        rule = proxy.add(method="GET", path=rf"/series/{re.escape(mr)}$", **fault)
        sr = h.order(patient)
        h.run()
        case = h.case_for(sr)
        if fault.get("status") == 404:
            assert case.step == "await_opinion"
            (entry,) = h.open(case).manifest["imaging"]
            assert entry["kind"] == "not-found"
            return
        assert case.step == "collect" and case.attempts == 1, (case.step, case.last_error)
        assert case.last_error
        def asked(uid):
            return proxy.count("GET", rf"/series/{re.escape(uid)}$")
        kept = {u for u, paths in study.series.items()       # the OT series is not a spine modality
                if pydicom.dcmread(paths[0], stop_before_pixels=True).Modality != "OT"}
        # The PACS lists series in no fixed order, and collect stops at the fault: the series after the MR one
        # may not have been asked for yet.
        arrived = {u for u in kept - {mr} if asked(u)}
        before = {u: asked(u) for u in study.series}
        rule.times = rule.hits      # the PACS is back
        retry(h.app, case)          # only its backoff is lost: what the next scheduled run would do
        h.run(intake=False)
        case = h.case_for(sr)
        assert case.step == "await_opinion", case.last_error
        # The series that failed is asked for once more and those not reached once; those that arrived before
        # are reused (their hashes checked), never asked for again.
        again = {u: asked(u) - before[u] for u in study.series}
        assert again == {u: (0 if u in arrived or u not in kept else 1) for u in study.series}
    finally:
        proxy.close()
    assert h.open(case).manifest["imaging"][0]["status"] == "included"


def test_key_images_marked_by_the_reviewer_are_filed_in_the_chart_exactly_once(hospital, fhir, pacs, study,
                                                                               tmp_path):
    """Issue 15 part 5: the frames the reviewer marked travel back with the opinion and are filed with it. In the
    EHR (sekmet): one DocumentReference, whose Binary is the signed opinion document holding the DCM 121180 "Key
    Images" section and, as its entries, ImagingStudy selections of exactly the marked instances and frames
    (docs/imaging.md, "Key images"); its text note names them; filing again writes nothing new."""
    h = hospital
    _with_pacs(h, pacs.dicomweb_url)
    patient = _patient_with(fhir, study, pacs.dicomweb_url)
    case = h.delivered_case(patient)
    r = h.reviewers[case.reviewer]
    opened = open_package(h.package_path(case), r.key, r.trusted)
    series = {a["dicom"]["modality"]: a["dicom"] for a in opened.manifest["attachments"] if "dicom" in a}
    mr, ct = series["MR"], series["CT"]
    marked = [
        {"study_uid": mr["study_uid"], "series_uid": mr["series_uid"], "sop_uid": mr["instances"][2]["sop_uid"],
         "sop_class_uid": mr["instances"][2]["sop_class_uid"], "modality": "MR", "frame": 1},
        {"study_uid": ct["study_uid"], "series_uid": ct["series_uid"], "sop_uid": ct["instances"][0]["sop_uid"],
         "sop_class_uid": ct["instances"][0]["sop_class_uid"], "modality": "CT", "frame": 1},
    ]
    sealed, claims, _doc = sealed_answer(opened, tomllib.loads(SAMPLE_ANSWER), r.key, r.trusted,
                                         mappings_dir=h.app.config.mappings_dir, key_images=marked)
    opinion = tmp_path / f"opinion-{claims['jti']}.jwe"
    opinion.write_bytes(sealed)
    receive_file(h.app, opinion)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert docrefs(fhir, case) == 1

    doc = fhir.read_ref(case.document_reference)
    stored = jsonutil.loads(base64.b64decode(fhir.read_ref(doc["content"][0]["attachment"]["url"])["data"]))
    jws.verify_bundle(stored, r.key)      # the reviewer's signed document, as it was sent
    composition = stored["entry"][0]["resource"]
    (section,) = [s for s in composition["section"]
                  if any(c.get("code") == "121180" and c.get("system") == DCM for c in s["code"]["coding"])]
    by_url = {e["fullUrl"]: e["resource"] for e in stored["entry"]}
    selections = [by_url[e["reference"]] for e in section["entry"]]
    assert {s["resourceType"] for s in selections} == {"ImagingStudy"}
    (selection,) = selections                      # both marked images are of the one study
    assert selection["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_uid}"}
    got = {(s["uid"], s["modality"]["code"], i["uid"], i["sopClass"]["code"], i.get("title"))
           for s in selection["series"] for i in s["instance"]}
    assert {(g[0], g[1], g[2], g[3]) for g in got} == {
        (k["series_uid"], k["modality"], k["sop_uid"], f"urn:oid:{k['sop_class_uid']}") for k in marked}
    assert all("1" in str(g[4]) for g in got)      # the frame numbers
    assert "endpoint" not in selection             # a logical reference, never a link into the hospital
    for k in marked:
        assert k["sop_uid"] in section["text"]["div"]
    note = base64.b64decode(doc["content"][1]["attachment"]["data"]).decode()
    assert "key images" in note.casefold() and all(k["sop_uid"] in note for k in marked)

    # The same opinion again: refused, and the chart still holds one note.
    with pytest.raises(RejectedOpinion, match="already has its opinion filed"):
        receive_file(h.app, opinion)
    h.run(intake=False)
    assert docrefs(fhir, case) == 1
