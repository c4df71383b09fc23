"""Structural validation of FHIR resources against the fhir.resources models.

We receive FHIR R4 (4.0.1) but validate with the R4B (4.3) models: fhir.resources ships no separate R4 package
any more, and for the resource types we exchange (Patient, Condition, Observation, DiagnosticReport,
ImagingStudy, Procedure, MedicationRequest/Statement, DocumentReference, ServiceRequest, Binary, Bundle...)
R4B only added optional elements, so valid R4 stays valid R4B. The EHR simulator validates with the same models.

Reasons never quote element values: a value may be PHI (a name, a note). They name the element path
("DiagnosticReport.result[1].reference") and what is wrong with it.
"""
from __future__ import annotations

import os
import re
from functools import cache
from typing import Any

from pydantic import ValidationError

from fhirbridge.errors import InvalidResource

# pydantic error types whose default message could be generic or echo an input; we say it our way instead.
_SHORT = {
    "missing": "field required",
    "model_field_validation.missing": "field required",
    "extra_forbidden": "unknown element",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "decimal_type": "expected a number",
    "decimal_parsing": "expected a number",
    "bool_type": "expected a boolean",
    "bool_parsing": "expected a boolean",
    "list_type": "expected an array",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
}
_MAX_REASON = 200
_CHOICE_MANY_RE = re.compile(r"Any of one field value is expected from this list \[(.*)", re.S)
_CHOICE_NONE_RE = re.compile(r"Expect any of field value from this list \[(.*)", re.S)


@cache
def _model(resource_type: str):
    """The R4B model class, or None when fhir.resources does not know the type."""
    # Imported on first use: fhir.resources takes ~0.3 s to load, which every CLI command would pay.
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def validate(resource: Any) -> list[str]:
    """Reasons why `resource` is not a structurally valid FHIR resource; an empty list means valid."""
    if not isinstance(resource, dict):
        return ["not a JSON object"]
    rtype = resource.get("resourceType")
    if not rtype or not isinstance(rtype, str):
        return ["missing resourceType"]
    model = _model(rtype)
    if model is None:
        # The type name comes from the data but is not PHI; cap it in case it is garbage.
        return [f"unknown resourceType {rtype[:64]}"]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return _reasons(rtype, exc)
    except (ValueError, TypeError) as exc:  # model-level validators outside pydantic's error collection
        return [f"{rtype}: {_scrub(str(exc), None)}"]
    return []


def check(resource: Any, where: str | None = None) -> None:
    """Raise InvalidResource naming the resource (`where`, else "Type/id") when it does not validate."""
    reasons = validate(resource)
    if reasons:
        raise InvalidResource(where or describe(resource), reasons)


def describe(resource: Any) -> str:
    """"Type/id" for messages ("Type/?" without an id, "resource" when it has no type)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return "resource"
    rid = resource.get("id")
    return f"{resource['resourceType']}/{rid if isinstance(rid, str) and rid else '?'}"


def _reasons(rtype: str, exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        path = _path(rtype, err.get("loc", ()))
        text = _SHORT.get(err.get("type", "")) or _scrub(err.get("msg", "invalid"), err.get("input"))
        reason = f"{path}: {text}"[:_MAX_REASON]
        if reason not in out:
            out.append(reason)
    return out


def _path(rtype: str, loc: tuple) -> str:
    """('result', 1, 'display') -> 'DiagnosticReport.result[1].display'."""
    path = rtype
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and not part.startswith("__"):
            path += f".{part}"
        # anything else (pydantic's union/validator tags, "__root__") names no element: skip it
    return path


def _scrub(msg: str, value: Any) -> str:
    """Drop pydantic's "Value error, " prefix and any echo of the offending value."""
    msg = msg.removeprefix("Value error, ").strip()
    # fhir.resources' wording for choice elements (value[x], medication[x]...): two given, or a required one missing
    for pattern, template in ((_CHOICE_MANY_RE, "at most one {}[x] element is allowed"),
                              (_CHOICE_NONE_RE, "one {}[x] element is required")):
        choice = pattern.search(msg)
        if choice:
            stem = os.path.commonprefix(re.findall(r"'([A-Za-z]+)'", choice.group(1)))
            return template.format(stem) if stem else "invalid choice element"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= 2 and text in msg:
            msg = msg.replace(text, "<value>")
    return msg or "invalid"
