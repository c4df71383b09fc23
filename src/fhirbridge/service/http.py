"""What the blueprints share: the Service of this app, bearer tokens, JSON bodies and errors, Case lookup.

Every error of /api and /reviewer is a JSON body with a clear message ({"error": {"status", "message"}}).
"""
from __future__ import annotations

from flask import Response, current_app, g, jsonify, request

from fhirbridge import jsonutil
from fhirbridge.errors import CaseError
from fhirbridge.service.scheduler import Service


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def service() -> Service:
    return current_app.extensions["fhirbridge"]


def json_error(status: int, message: str):
    return jsonify({"error": {"status": status, "message": message}}), status


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def json_body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json)")
    return data


def visible(case) -> bool:
    app = service().app_for_key(case.hospital)
    return app is not None and g.staff.may_see(app.hospital.name)


def find_case(case_id: str):
    try:
        case = service().store.get(case_id)
    except CaseError:
        raise ApiError(404, f"no Case {case_id}") from None
    if "staff" in g and not visible(case):
        raise ApiError(404, f"no Case {case_id}")   # another hospital's Case does not exist for this token
    return case


def app_of(case):
    app = service().app_for_key(case.hospital)
    if app is None:
        raise ApiError(409, "this Case belongs to a hospital that is no longer configured")
    return app


def json_response(obj: dict, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(jsonutil.dumps(obj), status=status, content_type=content_type)
