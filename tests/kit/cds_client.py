"""A CDS Hooks 2.0 client that plays the EHR: it signs each call's JWT with its own key, serves the public half
as a JWK Set on a loopback HTTP server (the `jwks_url` fhirbridge is configured to trust), and builds
order-sign / order-select requests with or without prefetch.

    with EhrCdsClient(issuer="https://ehr.test") as ehr:
        hospital.config_path.write_text(text + ehr.config_block(hospital_name))
        r = ehr.call(client, "fhirbridge-order-sign", ehr.order_sign(patient, user, [draft]), audience=...)
"""
from __future__ import annotations

import http.server
import threading
import time
import uuid

from joserfc import jwt as jose_jwt

from fhirbridge import jsonutil
from fhirbridge.crypto.keys import KeyRing, generate_jwks, public_jwks

SNOMED, CPT = "http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"
SPINE_FUSION = {"system": SNOMED, "code": "55705006", "display": "Spinal fusion"}


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(self.server.body)  # type: ignore[attr-defined]

    def log_message(self, *_args):
        pass


class EhrCdsClient:
    __test__ = False

    def __init__(self, issuer: str = "https://ehr.test"):
        self.issuer = issuer
        self.private = generate_jwks()
        self.ring = KeyRing(self.private)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JwksHandler)
        self._server.body = jsonutil.dumps(public_jwks(self.private))  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.jwks_url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EhrCdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config_block(self, hospital: str, *, budget_ms: int = 2000) -> str:
        return (f'\n[cds]\ntime_budget_ms = {budget_ms}\n[[cds.issuers]]\niss = "{self.issuer}"\n'
                f'jwks_url = "{self.jwks_url}"\nhospital = "{hospital}"\n')

    # --- signing --------------------------------------------------------------------------------------
    def jwt(self, audience: str, *, ring: KeyRing | None = None, iss: str | None = None, exp_in: int = 120,
            iat_offset: int = 0, jti: str | None = None, header: dict | None = None) -> str:
        key = (ring or self.ring).signing_key()
        now = int(time.time()) + iat_offset
        claims = {"iss": iss or self.issuer, "sub": "ehr-cds-client", "aud": audience, "iat": now,
                  "exp": now + exp_in, "jti": jti or uuid.uuid4().hex}
        return jose_jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT", **(header or {})}, claims, key,
                               algorithms=["ES384"])

    # --- requests -------------------------------------------------------------------------------------
    @staticmethod
    def draft(code: dict, *, priority: str | None = "routine", id: str | None = None, patient: str = "x",
              type_: str = "ServiceRequest") -> dict:
        res: dict = {"resourceType": type_, "status": "draft", "intent": "order",
                     "subject": {"reference": f"Patient/{patient}"}}
        if type_ == "ServiceRequest":
            res["code"] = {"coding": [code], "text": code.get("display", "")}
        else:
            res["medicationCodeableConcept"] = {"coding": [code]}
        if priority:
            res["priority"] = priority
        if id:
            res["id"] = id
        return res

    @staticmethod
    def order_sign(patient: str, user: str, drafts: list[dict], *, prefetch: dict | None = None,
                   fhir_server: str | None = None, token: str | None = None) -> dict:
        body: dict = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()),
                      "context": {"userId": user, "patientId": patient,
                                  "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                                  "entry": [{"resource": d} for d in drafts]}}}
        if prefetch is not None:
            body["prefetch"] = prefetch
        if fhir_server:
            body["fhirServer"] = fhir_server
            if token:
                body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                             "scope": "patient/Patient.read patient/ServiceRequest.read",
                                             "subject": "fhirbridge"}
        return body

    @classmethod
    def order_select(cls, patient: str, user: str, drafts: list[dict], selections: list[str], **kw) -> dict:
        body = cls.order_sign(patient, user, drafts, **kw)
        body["hook"] = "order-select"
        body["context"]["selections"] = selections
        return body

    def call(self, client, service_id: str, body: dict, *, public_url: str, token: str | None = None):
        path = f"/cds-services/{service_id}"
        return client.post(path, json=body, headers={
            "Authorization": f"Bearer {token or self.jwt(public_url + path)}"})

    def feedback(self, client, service_id: str, items: list[dict], *, public_url: str, token: str | None = None):
        path = f"/cds-services/{service_id}/feedback"
        return client.post(path, json={"feedback": items}, headers={
            "Authorization": f"Bearer {token or self.jwt(public_url + path)}"})
