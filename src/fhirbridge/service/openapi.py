"""The OpenAPI 3.1 description of the HTTP API (/openapi.json) and a docs page rendered from it (/docs).

The page is plain server-rendered HTML: no JavaScript, nothing fetched from a CDN at run time."""
from __future__ import annotations

import html
from typing import Any

from flask import Blueprint, Response, jsonify

from fhirbridge import VERSION
from fhirbridge.steps import ALL_STEPS
from fhirbridge.store.case_query import DEFAULT_LIMIT, MAX_LIMIT, SORTS

docs = Blueprint("docs", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}
CASE_STEPS = ALL_STEPS  # steps.Step, in order


def _q(name: str, description: str, enum: list[str] | None = None) -> dict:
    """A string query parameter."""
    return {"name": name, "in": "query", "description": description,
            "schema": {"type": "string", **({"enum": enum} if enum else {})}}
CASE = {"$ref": "#/components/schemas/Case"}
ORDER = {"type": "object", "required": ["id", "state", "url"],
         "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": ["pending", "placed", "failed"]},
                        "service_request": {"type": ["string", "null"]}, "case": {"type": ["string", "null"]},
                        "error": {"type": ["string", "null"]}, "attempts": {"type": "integer"},
                        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
                        "hospital": {"type": "string"}, "url": {"type": "string"}}}
FOLLOW_UP = {"type": "object", "required": ["id", "kind", "seq", "state"],
             "properties": {"id": {"type": "string"}, "kind": {"type": "string", "enum": ["question", "correction"]},
                            "seq": {"type": "integer"},
                            "state": {"type": "string", "enum": ["asked", "sent", "answered", "filed",
                                                                 "needs_review", "failed"]},
                            "asked_by": {"type": ["string", "null"]}, "created_at": {"type": "number"},
                            "sent_at": {"type": ["number", "null"]}, "answered_at": {"type": ["number", "null"]},
                            "filed_at": {"type": ["number", "null"]},
                            "communication": {"type": ["string", "null"]}, "note": {"type": ["string", "null"]},
                            "error": {"type": ["string", "null"]}}}
REQUESTER_PATTERN = r"^(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}$"   # as ehr.order.REQUESTER


def _errors(*codes: int) -> dict:
    text = {400: "Bad request: the message says what is wrong", 401: "Missing or wrong bearer token",
            403: "Not allowed", 404: "Not found", 409: "Conflicts with the Case's state",
            413: "Too large", 422: "An Idempotency-Key used again for a different order",
            502: "The EHR refused", 503: "The EHR is unreachable; try again"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _ok(description: str, schema: dict, status: str = "200") -> dict:
    return {status: {"description": description, "content": {"application/json": {"schema": schema}}}}


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "fhirbridge", "version": VERSION,
             "description": "Second-opinion referrals over HL7 FHIR R4: staff API, reviewer pull API, health. "
                            "Errors are JSON `{error: {status, message}}`; FHIR endpoints answer OperationOutcome."},
    "components": {
        "securitySchemes": {"staff": {"type": "http", "scheme": "bearer",
                                      "description": "[api] tokens (every scope), a scoped [[api.keys]] key, or an "
                                                     "OAuth2 JWT access token from [api.oauth]'s issuer. Scopes: "
                                                     "orders:write, cases:read, cases:write, audit:read; a missing "
                                                     "scope is a 403"},
                            "reviewer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                         "description": "a JWT signed with the reviewer's registered key (iss = sub "
                                                        "= its identifier, aud = <public_url>/reviewer, lifetime "
                                                        "<= 300 s, unique jti: `fhirbridge reviewer token`), or its "
                                                        "api_token; each reviewer sees only its own Cases"},
                            "ehr": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                    "description": "CDS Hooks 2.0: a JWT signed by a trusted EHR ([[cds.issuers]]: "
                                                   "iss, its JWK Set by kid), aud = the URL called, exp <= 300 s "
                                                   "after iat, a jti used once"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["status", "message"],
                "properties": {"status": {"type": "integer"}, "message": {"type": "string"}}}}},
            "Case": {"type": "object", "required": ["id", "step"], "properties": {
                "id": {"type": "string"}, "hospital": {"type": "string"},
                "step": {"type": "string", "enum": list(CASE_STEPS)},
                "service_request": {"type": "string"}, "patient": {"type": "string"},
                "reviewer": {"type": "string"}, "profile": {"type": "string"},
                "task": {"type": ["string", "null"]}, "package_id": {"type": ["string", "null"]},
                "opinion_id": {"type": ["string", "null"]}, "document_reference": {"type": ["string", "null"]},
                "attempts": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
                "created_at": {"type": "number"}, "updated_at": {"type": "number"},
                "due_at": {"type": ["number", "null"]}, "overdue_at": {"type": ["number", "null"]},
                "overdue": {"type": "boolean"},
                "events": {"type": "array", "items": {"type": "object", "properties": {
                    "at": {"type": "number"}, "kind": {"type": "string"}, "detail": {"type": "object"}}}}}},
            "Order": {"type": "object", "required": ["patient", "question", "requester"], "additionalProperties": False,
                      "properties": {"hospital": {"type": "string"}, "patient": {"type": "string", "minLength": 1},
                                     "question": {"type": "string", "minLength": 1},
                                     "reviewer": {"type": "string"}, "profile": {"type": "string"},
                                     "requester": {"type": "string", "pattern": REQUESTER_PATTERN},
                                     "priority": {"type": "string", "enum": ["routine", "urgent", "asap", "stat"]}}},
            "Reason": {"type": "object", "required": ["reason"],
                       "properties": {"reason": {"type": "string", "minLength": 1}}},
        },
    },
    "paths": {
        "/api/orders": {"post": {
            "summary": "Place a second-opinion order (for EHRs that cannot write ServiceRequests)",
            "security": [{"staff": []}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
            "description": ("Without `Prefer: respond-async` the order is written to the EHR within the request: "
                            "201 with the ServiceRequest and the Case; 202 when the EHR did not answer (the order "
                            "is kept and placed as soon as it does). With `Prefer: respond-async` (RFC 7240) the "
                            "order is recorded and answered 202 at once, a worker places it; follow the Location. "
                            "An `Idempotency-Key` makes a retry answer the same order instead of placing a second; "
                            "the same key with other fields is 422."),
            "parameters": [{"name": "Prefer", "in": "header", "schema": {"type": "string", "enum": ["respond-async"]}},
                           {"name": "Idempotency-Key", "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
            "responses": {**_ok("The ServiceRequest written to the EHR and the Case opened for it",
                                {"type": "object", "properties": {"service_request": {"type": "string"}, "case": CASE,
                                                                  "order": ORDER}},
                                "201"),
                          **_ok("Accepted: the order is placed in the EHR by a worker (see Location)",
                                {"type": "object", "properties": {"order": ORDER}}, "202"),
                          **_errors(400, 401, 403, 422, 502, 503)}}},
        "/api/orders/{order_id}": {"get": {
            "summary": "An accepted order: pending, placed (its ServiceRequest and Case) or failed (why)",
            "security": [{"staff": []}],
            "parameters": [{"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("The order", {"type": "object", "properties": {"order": ORDER}}),
                          **_errors(401, 403, 404)}}},
        "/api/cases": {"get": {
            "summary": "List Cases, one page at a time (filtered and sorted in the database)",
            "description": f"Newest update first unless `sort`/`dir` say otherwise. `limit` defaults to "
                           f"{DEFAULT_LIMIT} and is at most {MAX_LIMIT}; `next` is an opaque cursor: pass it as "
                           "`cursor` (with the same filters and sort) for the following page, null on the last. "
                           "An unknown or malformed parameter is a 400 naming it.",
            "parameters": [_q("step", "one or more (comma-separated) steps", enum=None),
                           _q("hospital", "a configured hospital's name"),
                           _q("case", "a Case id or its first characters"),
                           _q("order", "ServiceRequest/<id> (or the id)"),
                           _q("patient", "Patient/<id> (or the id)"),
                           _q("reviewer", "a configured reviewer's name"),
                           _q("created_from", "created on or after: YYYY-MM-DD (UTC day) or an ISO 8601 date-time"),
                           _q("created_to", "created before an ISO 8601 date-time, or on or before YYYY-MM-DD"),
                           _q("overdue", "awaiting an opinion past the reviewer's target", enum=["true", "false"]),
                           _q("failed", "failed, or retrying after an error", enum=["true", "false"]),
                           _q("needs_review", "a person must check the chart", enum=["true", "false"]),
                           _q("sort", "the order", enum=list(SORTS)),
                           _q("dir", "the direction (default desc)", enum=["asc", "desc"]),
                           {"name": "limit", "in": "query", "description": f"page size, 1 to {MAX_LIMIT}",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                       "default": DEFAULT_LIMIT}},
                           _q("cursor", "the `next` of the page before")],
            "responses": {**_ok("One page of Cases", {"type": "object", "required": ["cases", "next", "limit"],
                                                      "properties": {"cases": {"type": "array", "items": CASE},
                                                                     "next": {"type": ["string", "null"]},
                                                                     "limit": {"type": "integer"}}}),
                          **_errors(400, 401, 403)}}},
        "/api/audit": {"get": {
            "summary": "The accounting of disclosures for one patient (BALP AuditEvents: what was sent, to whom)",
            "security": [{"staff": []}],
            "parameters": [{"name": "patient", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("Disclosures and opinions filed", {"type": "object"}), **_errors(400, 401, 403)}}},
        "/api/outcomes": {"get": {
            "summary": "Outcomes of the filed opinions read from the chart, as a FHIR R4 MeasureReport (type summary; "
                       "docs/outcomes.md)", "security": [{"staff": []}],
            "parameters": [{"name": "hospital", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The MeasureReport", "content": {
                "application/fhir+json": {"schema": {"type": "object"}}}}, **_errors(400, 401, 403)}}},
        "/api/cases/{case_id}": {"get": {
            "summary": "One Case with its event history", "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("The Case", CASE), **_errors(401, 403, 404)}}},
        "/api/cases/{case_id}/retry": {"post": {
            "summary": "Resume a failed Case at the step that failed (or retry a waiting one now)",
            "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("The Case", CASE), **_errors(401, 403, 404, 409, 502, 503)}}},
        "/api/cases/{case_id}/cancel": {"post": {
            "summary": "Cancel a Case (its Task in the EHR becomes cancelled)", "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Reason"}}}},
            "responses": {**_ok("The Case", CASE), **_errors(400, 401, 403, 404, 409)}}},
        # Issue 16 part 2: a reviewer's requests for more records, and the physician's answer.
        "/api/cases/{case_id}/requests": {"get": {
            "summary": "The Case's requests for more records (CDex data-request Tasks in the EHR); for an open one "
                       "the records that could answer it, those its FHIR query finds proposed",
            "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("The requests", {"type": "object"}), **_errors(401, 403, 404, 502, 503)}}},
        "/api/cases/{case_id}/requests/{task_id}/answer": {"post": {
            "summary": "Answer a request: records to add and/or a document (written to the EHR as a "
                       "DocumentReference first); the supplement package follows (step supplement)",
            "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "records": {"type": "array", "items": {"type": "string"}},
                    "document": {"type": "object", "required": ["content_type", "data"], "properties": {
                        "title": {"type": "string"},
                        "content_type": {"type": "string", "enum": ["application/pdf", "text/plain"]},
                        "data": {"type": "string", "contentEncoding": "base64"},
                        "code": {"type": "string", "description": "system|code, e.g. http://loinc.org|18842-5"}}}}}}}},
            "responses": {**_ok("The Case, at step supplement", CASE, "202"),
                          **_errors(400, 401, 403, 404, 409, 413, 502, 503)}}},
        "/api/cases/{case_id}/held": {"post": {
            "summary": "A Case held for required records (step await_records): collect again, or send without them "
                       "(every missing item confirmed by name; recorded with who confirmed)",
            "security": [{"staff": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["action"], "properties": {
                    "action": {"type": "string", "enum": ["collect-again", "send-without"]},
                    "confirm": {"type": "array", "items": {"type": "string"}}}}}}},
            "responses": {**_ok("The Case", CASE), **_errors(400, 401, 403, 404, 409)}}},
        # Follow-up questions on a filed opinion (loop/followup.py): states and references, never the texts.
        "/api/cases/{case_id}/follow-ups": {
            "post": {
                "summary": "Ask the reviewer a follow-up question about the Case's filed opinion (sent by a worker: "
                           "a Communication in the EHR and a sealed message to the reviewer)",
                "security": [{"staff": []}],
                "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["question"],
                    "properties": {"question": {"type": "string", "minLength": 1, "maxLength": 8000},
                                   "asked_by": {"type": "string", "pattern": REQUESTER_PATTERN}}}}}},
                "responses": {**_ok("Recorded; it is being sent", FOLLOW_UP, "202"),
                              **_errors(400, 401, 403, 404, 409)}},
            "get": {
                "summary": "The Case's follow-up questions and corrected opinions, with how many may still be asked",
                "security": [{"staff": []}],
                "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {**_ok("Follow-ups", {"type": "object", "properties": {
                    "case": {"type": "string"}, "limit": {"type": "integer"}, "remaining": {"type": "integer"},
                    "open": {"type": "integer"}, "follow_ups": {"type": "array", "items": FOLLOW_UP}}}),
                    **_errors(401, 403, 404)}}},
        "/reviewer/follow-ups": {"get": {
            "summary": "The follow-up questions sent to the calling reviewer and not yet answered",
            "security": [{"reviewer": []}],
            "responses": {**_ok("Questions", {"type": "object"}), **_errors(401)}}},
        "/reviewer/follow-ups/{followup_id}/message": {"get": {
            "summary": "A follow-up question, sealed (answer it with `fhirbridge reviewer answer --follow-up`, "
                       "then POST the answer to /reviewer/opinions)",
            "security": [{"reviewer": []}],
            "parameters": [{"name": "followup_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The sealed question",
                                  "content": {"application/jose+json": {"schema": {"type": "string"}}}},
                          **_errors(401, 404)}}},
        "/reviewer/cases": {"get": {
            "summary": "The calling reviewer's Cases awaiting its opinion, with their sealed files",
            "security": [{"reviewer": []}],
            "responses": {**_ok("Cases", {"type": "object"}), **_errors(401)}}},
        "/reviewer/cases/{case_id}/package/{name}": {"get": {
            "summary": "One sealed file of a Case's package (package.jwe or attachments/att-NNN.jwe)",
            "security": [{"reviewer": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The sealed file",
                                  "content": {"application/jose+json": {"schema": {"type": "string"}}}},
                          **_errors(401, 404, 409)}}},
        "/reviewer/opinions": {"post": {
            "summary": "Submit a sealed opinion, a corrected opinion or the answer to a follow-up question (the file "
                       "`fhirbridge reviewer answer` writes); an answer to a question never asked is a 404; an "
                       "opinion for a Case still sending the records the reviewer asked for is a 503 with "
                       "Retry-After (send the same file again then)",
            "security": [{"reviewer": []}],
            "requestBody": {"required": True, "content": {"application/jose+json": {"schema": {"type": "string"}}}},
            "responses": {**_ok("Accepted; it is being filed", {"type": "object"}, "202"),
                          **_errors(400, 401, 404, 409, 413, 503)}}},
        "/reviewer/cases/{case_id}/requests": {"post": {
            "summary": "Ask the hospital for more records (a CDex data-request Task, part of the referral)",
            "security": [{"reviewer": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["text"],
                "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 2000},
                               "query": {"type": "string", "description": "a FHIR search for this patient "
                                         "(CDex data-request-query), e.g. "
                                         "DocumentReference?type=http://loinc.org|18842-5"}}}}}},
            "responses": {**_ok("The data request Task", {"type": "object"}, "201"),
                          **_errors(400, 401, 404, 409, 502, 503)}}},
        "/reviewer/cases/{case_id}/decline": {"post": {
            "summary": "Decline a Case (its Task becomes rejected with the reason)", "security": [{"reviewer": []}],
            "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Reason"}}}},
            "responses": {**_ok("Declined", {"type": "object"}), **_errors(400, 401, 404, 409)}}},
        "/fhir/notify/{hospital}": {"post": {
            "summary": "FHIR Subscription notifications from the EHR (R4 Subscriptions Backport, rest-hook)",
            "description": "Bearer token set by `fhirbridge subscribe`. Answers are FHIR OperationOutcome.",
            "parameters": [{"name": "hospital", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "the hospital's name in environment-variable form"}],
            "requestBody": {"required": True, "content": {"application/fhir+json": {"schema": {"type": "object"}}}},
            "responses": {str(c): {"description": d,
                                   "content": {"application/fhir+json": {"schema": {"type": "object"}}}}
                          for c, d in ((200, "Taken in (OperationOutcome)"), (400, "Not a notification Bundle"),
                                       (401, "Missing or wrong subscription token"), (404, "Unknown hospital"),
                                       (413, "Too large"), (415, "Not FHIR JSON"))}}},
        "/fhir/CodeSystem/{cs_id}": {"get": {
            "summary": "One of fhirbridge's own code systems (FHIR R4 CodeSystem read); public",
            "parameters": [{"name": "cs_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {str(c): {"description": d,
                                   "content": {"application/fhir+json": {"schema": {"type": "object"}}}}
                          for c, d in ((200, "The CodeSystem"), (404, "No such code system (OperationOutcome)"))}}},
        "/fhir/CodeSystem": {"get": {
            "summary": "Find fhirbridge's code systems by canonical url (FHIR search; searchset Bundle); public",
            "parameters": [{"name": "url", "in": "query", "schema": {"type": "string"},
                            "description": "canonical url, optionally with |version"},
                           {"name": "version", "in": "query", "schema": {"type": "string"}}],
            "responses": {str(c): {"description": d,
                                   "content": {"application/fhir+json": {"schema": {"type": "object"}}}}
                          for c, d in ((200, "searchset Bundle"), (400, "Unsupported parameter (OperationOutcome)"))}}},
        "/cds-services": {"get": {
            "summary": "CDS Hooks discovery: the order-sign and order-select services with their prefetch "
                       "templates (public; 404 when [cds] is not enabled)",
            "responses": {**_ok("Discovery document", {"type": "object", "properties": {
                "services": {"type": "array", "items": {"type": "object"}}}}), **_errors(404)}}},
        "/cds-services/{service_id}": {"post": {
            "summary": "A CDS Hooks call (order-sign, order-select): cards suggesting a second opinion",
            "security": [{"ehr": []}],
            "parameters": [{"name": "service_id", "in": "path", "required": True,
                            "schema": {"type": "string",
                                       "enum": ["fhirbridge-order-sign", "fhirbridge-order-select"]}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {**_ok("Cards", {"type": "object", "properties": {
                "cards": {"type": "array", "items": {"type": "object"}}}}), **_errors(400, 401, 404)}}},
        "/cds-services/{service_id}/feedback": {"post": {
            "summary": "CDS Hooks feedback: a card accepted (its suggestion's order is placed once) or overridden",
            "security": [{"ehr": []}],
            "parameters": [{"name": "service_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {**_ok("Recorded", {"type": "object"}), **_errors(400, 401, 404, 502, 503)}}},
        "/.well-known/jwks.json": {"get": {
            "summary": "The hospitals' public keys (JWKS): reviewers verify packages and seal opinions with them",
            "responses": {"200": {"description": "JWK Set", "content": {"application/jwk-set+json": {
                "schema": {"type": "object"}}}}}}},
        "/healthz": {"get": {"summary": "The process is alive", "responses": _ok("Alive", {"type": "object"})}},
        "/readyz": {"get": {"summary": "The store and every hospital's EHR are reachable",
                            "responses": {**_ok("Ready", {"type": "object"}),
                                          "503": {"description": "Not ready; `checks` says what is not"}}}},
    },
}


@docs.get("/openapi.json")
def openapi_json():
    return jsonify(SPEC)


@docs.get("/docs")
def docs_page():
    rows = []
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            auth = ", ".join(next(iter(s)) for s in op.get("security", [])) or "none"
            codes = ", ".join(op.get("responses", {}))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{auth}</td><td>{codes}</td></tr>")
    body = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fhirbridge API</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
            "</style></head><body>"
            f"<h1>fhirbridge API {VERSION}</h1><p>{html.escape(SPEC['info']['description'])}</p>"
            "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>"
            "<table><thead><tr><th>Method</th><th>Path</th><th>What</th><th>Auth</th><th>Answers</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></body></html>")
    return Response(body, content_type="text/html; charset=utf-8")
