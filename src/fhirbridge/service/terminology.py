"""fhirbridge's own code systems, served so a receiver can resolve every code it meets (issue 13, C6).

    GET /fhir/CodeSystem/<id>                  the CodeSystem resource (R4 http.html#read)
    GET /fhir/CodeSystem?url=<canonical>       a searchset Bundle (R4 search; `url` may carry `|<version>`,
                                               or a `version` parameter may be given)

Public, like a terminology server's read: the code systems hold no PHI, no Case and nothing of a hospital
but the names of its collection profiles. Answers are application/fhir+json, errors an OperationOutcome. The
resources come from `config/terminology.py`: the shipped mappings/codesystems/*.json and the collection
profiles of each served hospital's mappings (hospitals sharing the shipped mappings serve the same one).
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from fhirbridge.config.terminology import Terminology, load_terminology
from fhirbridge.jsonutil import dumps
from fhirbridge.service.http import service

terminology = Blueprint("terminology", __name__, url_prefix="/fhir/CodeSystem")
FHIR_JSON = "application/fhir+json"


def _code_systems() -> dict[str, dict]:
    """Every code system of every served hospital's mappings, by url. Loaded once per app and mappings folder."""
    _cache: dict[str, Terminology] = current_app.extensions.setdefault("fhirbridge.terminology", {})
    out: dict[str, dict] = {}
    for app in service().apps:
        key = str(app.config.mappings_dir)
        if key not in _cache:
            _cache[key] = load_terminology(app.config.mappings_dir)
        out.update(_cache[key].by_url)
    return out


def _fhir(body: dict, status: int = 200) -> Response:
    resp = Response(dumps(body), status=status, content_type=FHIR_JSON)
    resp.headers["Cache-Control"] = "public, max-age=300"
    return resp


def _outcome(status: int, code: str, diagnostics: str) -> Response:
    return Response(dumps({"resourceType": "OperationOutcome",
                           "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}),
                    status=status, content_type=FHIR_JSON)


@terminology.get("/<cs_id>")
def read(cs_id: str):
    found = next((cs for cs in _code_systems().values() if cs["id"] == cs_id), None)
    if found is None:
        return _outcome(404, "not-found", f"no CodeSystem/{cs_id[:64]} here")
    return _fhir(found)


@terminology.get("")
def search():
    unknown = sorted(set(request.args) - {"url", "version", "_format"})
    if unknown:
        # R4 search.html#errors: a server may refuse a parameter it does not support; silently ignoring one
        # would answer a different question.
        return _outcome(400, "not-supported", f"unsupported search parameter {unknown[0][:64]!r} (supported: url, "
                                              "version)")
    url, _, pinned = request.args.get("url", "").partition("|")
    version = pinned or request.args.get("version", "")
    matches = [cs for u, cs in _code_systems().items()
               if (not url or u == url) and (not version or cs.get("version") == version)]
    base = (service().config.public_url or request.host_url).rstrip("/")
    return _fhir({"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                  "entry": [{"fullUrl": f"{base}/fhir/CodeSystem/{cs['id']}", "resource": cs,
                             "search": {"mode": "match"}} for cs in matches]})
