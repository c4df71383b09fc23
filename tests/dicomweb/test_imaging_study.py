"""The EHR describes the study the PACS holds: an ImagingStudy in sekmet (StudyInstanceUID as urn:oid, an
Endpoint with connectionType dicom-wado-rs) from which the client finds and fetches every instance."""
from __future__ import annotations

from pathlib import Path

from fhirbridge.dicomweb import DicomwebClient
from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.validate import validate
from tests.kit.dicom_studies import Study, endpoint_resource, imaging_study_resource
from tests.kit.pacs import Pacs


def test_an_imaging_study_in_the_ehr_leads_to_every_instance_in_the_pacs(fhir: FhirClient, seeded: dict,
                                                                         pacs: Pacs, study: Study,
                                                                         tmp_path: Path):
    endpoint, _ = fhir.create(endpoint_resource(pacs.dicomweb_url))
    resource = imaging_study_resource(study, seeded["patient"], f"Endpoint/{endpoint['id']}")
    assert validate(resource) == []
    created, _ = fhir.create(resource)

    # What collect will do with it: read it back, find the UID and the Endpoint, retrieve, compare.
    stored = fhir.read("ImagingStudy", created["id"], strict=True)
    (uid,) = [i["value"] for i in stored["identifier"] if i["system"] == "urn:dicom:uid"]
    where = fhir.read_ref(stored["endpoint"][0]["reference"])
    assert where["connectionType"]["code"] == "dicom-wado-rs"
    with DicomwebClient(where["address"]) as pacs_client:
        got = pacs_client.retrieve_study(uid.removeprefix("urn:oid:"), tmp_path)
    assert len(got.instances) == stored["numberOfInstances"]
    by_series = got.series()
    for series in stored["series"]:
        assert {i.sop_instance_uid for i in by_series[series["uid"]]} == {i["uid"] for i in series["instance"]}
        assert {i.modality for i in by_series[series["uid"]]} == {series["modality"]["code"]}
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == study.hashes()
