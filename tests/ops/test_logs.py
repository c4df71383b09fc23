"""Structured logs (logs.py): JSON lines with the Case id on every step line and the request id on every
request line, readable text on a terminal, and neither PHI nor secrets on any line."""
from __future__ import annotations

import io
import json
import logging

import pytest

from fhirbridge.config import loader as config
from fhirbridge.errors import FhirError
from fhirbridge.loop.receive import receive_file
from fhirbridge.ops import logs
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import SEEDED_FAMILY, SEEDED_GIVEN
from tests.kit.logcapture import captured_logs, lines

pytestmark = pytest.mark.sekmet


@pytest.fixture
def captured():
    """Our handler on the root logger at DEBUG, JSON into a buffer."""
    with captured_logs("DEBUG") as buf:
        yield buf


def test_a_referral_logs_json_with_case_ids_and_no_phi(captured, hospital, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"

    got = lines(captured)   # every line is one JSON object (json.loads would fail otherwise)
    assert got and all({"time", "level", "logger", "message"} <= set(line) for line in got)
    steps = [line for line in got if line["logger"] == "fhirbridge.loop.runner"]
    assert len(steps) >= 4 and all(line["case_id"] == case.id for line in steps)
    assert [line["message"] for line in steps][:4] == ["collect: ok -> seal", "seal: ok -> deliver",
                                                       "deliver: ok -> await_opinion", "file: ok -> done"]
    opened = [line for line in got if line["message"].startswith(f"case {case.id} opened")]
    assert opened and opened[0]["case_id"] == case.id
    text = captured.getvalue()
    for phi in (SEEDED_FAMILY, SEEDED_GIVEN, "Is surgery indicated now?"):
        assert phi not in text


def test_requests_carry_a_request_id(captured, hospital):
    svc = Service(config.load(hospital.config_path))
    try:
        app = create_app(svc=svc)

        @app.get("/log-something/<case_id>")
        def _log(case_id):
            logging.getLogger("fhirbridge.test").warning("about a case")
            return "ok"
        client = app.test_client()
        resp = client.get("/healthz", headers={"X-Request-ID": "req-from-the-proxy-42"})
        assert resp.headers["X-Request-ID"] == "req-from-the-proxy-42"
        made = client.get("/healthz", headers={"X-Request-ID": "not ok; <script>" + "x" * 80}).headers["X-Request-ID"]
        assert len(made) == 32 and made.isalnum()
        # A line logged while serving a request carries its id (and the Case id of a /api/cases/<id> URL).
        client.get("/log-something/case-123", headers={"X-Request-ID": "rid-7"})
    finally:
        svc.stop(wait=True)
    line = [x for x in lines(captured) if x["logger"] == "fhirbridge.test"][0]
    assert (line["request_id"], line["case_id"]) == ("rid-7", "case-123")
    logging.getLogger("fhirbridge.test").warning("after the request")
    assert "request_id" not in lines(captured)[-1] and "case_id" not in lines(captured)[-1]


def test_secrets_and_query_strings_are_masked():
    jwt = "eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJmYiJ9.c2lnbmF0dXJl"
    text = logs.redact(f"Authorization: Bearer abc.def-123 token {jwt} "
                       "GET /fhir/Patient?family=Zeltwanger&given=Anna failed; form access_token=s3cr3t&x=1")
    assert "abc.def-123" not in text and jwt not in text and "s3cr3t" not in text
    assert "Zeltwanger" not in text and "/fhir/Patient?…" in text
    assert logs.redact("GET ServiceRequest?… (search) -> what? nothing") == \
        "GET ServiceRequest?… (search) -> what? nothing"


def test_exception_text_is_kept_only_for_our_own_errors(captured):
    log = logging.getLogger("fhirbridge.test")
    for exc in (ValueError("family name Zeltwanger is too long"), FhirError("EHR answered 503 to GET Patient/1")):
        try:
            raise exc
        except Exception:
            log.exception("step failed")
    first, second = [x["exception"] for x in lines(captured)[-2:]]
    assert first["type"] == "ValueError" and "Zeltwanger" not in json.dumps(first) and first["stack"]
    assert second["type"] == "FhirError" and second["message"] == "EHR answered 503 to GET Patient/1"


def test_text_on_a_terminal_json_otherwise(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("FHIRBRIDGE_LOG_FORMAT", raising=False)
    assert isinstance(logs.formatter(stream=Tty()), logs.TextFormatter)
    assert isinstance(logs.formatter(stream=io.StringIO()), logs.JsonFormatter)
    monkeypatch.setenv("FHIRBRIDGE_LOG_FORMAT", "json")
    assert isinstance(logs.formatter(stream=Tty()), logs.JsonFormatter)
    monkeypatch.setenv("FHIRBRIDGE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="FHIRBRIDGE_LOG_FORMAT"):
        logs.formatter()
    record = logging.LogRecord("fhirbridge.loop.runner", logging.INFO, __file__, 1, "collect: ok -> seal", (), None)
    record.case_id = "3f2a"
    line = logs.TextFormatter().format(record)
    assert "INFO" in line and "[case=3f2a]" in line and line.endswith("collect: ok -> seal")


def test_gunicorn_access_lines_become_fields():
    atoms = {"h": "10.0.0.1", "m": "GET", "U": "/api/cases", "s": "200", "B": "512", "M": "7",
             "{x-request-id}o": "rid-9"}
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(h)s %(m)s", (), None)
    record.args = atoms
    got = json.loads(logs.JsonFormatter().format(record))
    assert (got["method"], got["path"], got["status"], got["duration_ms"], got["request_id"]) == (
        "GET", "/api/cases", 200, 7, "rid-9")
