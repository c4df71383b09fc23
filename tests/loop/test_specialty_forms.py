"""Issue 16, parts 1 and 4, through the whole loop against the real EHR: the package carries the order's
priority, the referring physician and the due date the Case has; the opinion form is the one of the Case's
collection profile, and what the EHR files holds that form's answers as Observations with the form's codes,
ending with the outcome every form shares."""
from __future__ import annotations

import base64

import pytest

from fhirbridge import jsonutil
from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import form_for, studies_of
from fhirbridge.loop.document import person_name
from fhirbridge.loop.receive import receive_file

pytestmark = pytest.mark.sekmet

CS = "http://fhirbridge.org/fhir/CodeSystem/"
OUTCOME = '''
concordance = "partially-concordant"
diagnosis_comment = "Refined: the level is L5-S1."
recommendation = "non-surgical-care"
risks_benefits = "Conservative care first; surgery stays an option."
urgency = "urgent"
'''

ANSWERS = {
    "spine": ('surgical_indication = "not-indicated"\nlevels = "L5-S1"\n'
              'conservative_tried = ["NSAIDs"]\nconservative_advised = ["Physiotherapy for 12 weeks"]\n',
              {"surgical-indication": (CS + "opinion-answer", "not-indicated")}),
    "cardiac": ('intervention_indication = "uncertain"\nmedical_therapy = "therapy-optimise"\n'
                'further_tests = ["Stress echocardiography"]\n',
                {"intervention-indication": (CS + "opinion-answer", "uncertain"),
                 "medical-therapy": (CS + "opinion-answer", "therapy-optimise")}),
    "oncology": ('histology = "confirmed"\ngrade = "revised"\ngrade_detail = "G2, not G3"\ntnm_stage = "revised"\n'
                 'tnm = "cT2 cN0 cM0"\ntreatment_sequencing = "sequence-changed"\n'
                 'sequencing_detail = "Neoadjuvant chemotherapy before surgery"\n'
                 'clinical_trials = ["NCT00000000: example trial"]\n',
                 {"histology-review": (CS + "opinion-answer", "confirmed"),
                  "grade-review": (CS + "opinion-answer", "revised"),
                  "stage-review": (CS + "opinion-answer", "revised"),
                  "treatment-sequencing": (CS + "opinion-answer", "sequence-changed")}),
    "radiology": ('missed_findings = "yes"\nmissed_detail = ["Foraminal stenosis L5-S1 left"]\n',
                  {"missed-findings": ("http://snomed.info/sct", "373066001")}),
}


def _filed_document(fhir, case) -> dict:
    docref = fhir.read_ref(case.document_reference)
    binary = fhir.read_ref(docref["content"][0]["attachment"]["url"])
    return jsonutil.loads(base64.b64decode(binary["data"]))


def _observations(document: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in document["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            code = r["code"]["coding"][0]
            assert code["system"] == CS + "opinion-observation"
            out.setdefault(code["code"], []).append(r)
    return out


@pytest.mark.parametrize("profile", sorted(ANSWERS))
def test_each_specialty_form_is_chosen_by_the_profile_and_filed_with_its_codes(hospital, seeded, fhir, profile):
    sr = hospital.order(seeded["patient"], profile=profile, priority="urgent")
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_opinion", case.last_error
    opened = hospital.open(case)

    # Part 1: urgency, the referring physician and the one due date travel in the signed package.
    assert opened.manifest["priority"] == "urgent" and envelope.urgency_rank("urgent") < 3
    practitioner = fhir.read_ref(hospital.physician())
    requester = envelope.requester(opened.claims)
    assert requester["reference"] == hospital.physician() and requester["name"] == person_name(practitioner) != ""
    assert envelope.due_at(opened.claims) == case.due_at == opened.claims["due_at"] != opened.claims["exp"]
    assert case.due_at == opened.claims["iat"] + hospital.app.config.reviewer(case.reviewer).turnaround_days * 86400

    # Part 4: the form of the Case's profile, with the outcome block every form ends with.
    mappings = hospital.app.config.mappings_dir
    assert form_for(opened, mappings) == profile
    text, expected = ANSWERS[profile]
    text += OUTCOME     # before any [[array of tables]]: TOML keys after one would belong to its last entry
    if profile == "radiology":
        studies = list(studies_of(opened))
        assert studies, "the radiology profile collects the patient's imaging studies"
        text += "".join(f'[[study_agreement]]\nstudy = "{s}"\nscore = "{"2b" if i == 0 else "1"}"\n'
                        f'comment = "re-read {i}"\n' for i, s in enumerate(studies))
    receive_file(hospital.app, hospital.answer(case, text))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error

    document = _filed_document(fhir, case)
    form = load_opinion_form(mappings, profile)
    assert document["entry"][0]["resource"]["title"] == form.title
    obs = _observations(document)
    for code, (system, value) in {**expected, "concordance": (CS + "concordance", "partially-concordant"),
                                  "recommendation": (CS + "recommendation", "non-surgical-care"),
                                  "urgency": ("http://hl7.org/fhir/request-priority", "urgent")}.items():
        assert len(obs[code]) == 1, code
        coding = obs[code][0]["valueCodeableConcept"]["coding"][0]
        assert (coding["system"], coding["code"]) == (system, value), code
    if profile == "radiology":
        scored = obs["radpeer-score"]
        assert [o["valueCodeableConcept"]["coding"][0]["code"] for o in scored] == \
            ["2b"] + ["1"] * (len(studies) - 1)
        assert all(o["valueCodeableConcept"]["coding"][0]["system"] == CS + "radpeer" for o in scored)
        package_studies = studies_of(opened)
        for o, key in zip(scored, studies, strict=True):
            uid = next(i for i in package_studies[key]["identifier"] if i["system"] == "urn:dicom:uid")
            assert o["derivedFrom"][0]["identifier"] == {"system": "urn:dicom:uid", "value": uid["value"]}
            assert o["derivedFrom"][0]["type"] == "ImagingStudy"
        assert scored[0]["note"] == [{"text": "re-read 0"}]
    else:
        assert "radpeer-score" not in obs
