"""The demo's CDS Hooks scene: the demo EHR, as a CDS client, calls fhirbridge's order-sign service when the
surgeon signs an elective spinal fusion, shows the card, and sends the feedback "accepted" that places the
second-opinion order (docs/cds-hooks.md).

The EHR's side is played here: its signing key (ES384), its JWK Set served on a loopback port for as long as
the scene lasts, the signed JWT of each call. fhirbridge's side is the real app (`service.app.create_app`: the
blueprint, the rules, the store), called in this process through Flask's test client, with a copy of the demo's
configuration that adds `[service] public_url` and `[cds]` (the demo's own configuration is left as it is).
"""
from __future__ import annotations

import http.server
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from joserfc import jwt as jose_jwt

from fhirbridge import jsonutil
from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing, generate_jwks, public_jwks
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

SIGN = "fhirbridge-order-sign"
PUBLIC_URL = "http://127.0.0.1:8080"   # what the JWTs name as their audience (the service's default address)
ISSUER = "urn:fhirbridge:demo:ehr"
# SNOMED CT 55705006 "Spinal fusion (procedure)": one of the codes of mappings/cds/second-opinion.toml.
SPINAL_FUSION = {"system": "http://snomed.info/sct", "code": "55705006", "display": "Spinal fusion"}


class _Jwks(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # http.server's method name
        body = self.server.jwks  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/jwk-set+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


@dataclass
class Accepted:
    card: dict
    service_request: dict
    case_id: str | None


def run_scene(app: App, config_path: Path, *, patient: str, physician: str, say) -> Accepted:
    """Write the draft fusion order, call order-sign with prefetch, print the card, accept its suggestion."""
    ring = KeyRing(private := generate_jwks())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    server.jwks = jsonutil.dumps(public_jwks(private))  # type: ignore[attr-defined]
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    jwks_url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    cds_config = config_path.with_name("fhirbridge-cds.toml")
    cds_config.write_text(config_path.read_text() + f'\n[service]\npublic_url = "{PUBLIC_URL}"\n'
                          f'\n[cds]\n[[cds.issuers]]\niss = "{ISSUER}"\njwks_url = "{jwks_url}"\n')
    svc = Service(config.load(cds_config))
    try:
        client = create_app(svc=svc).test_client()
        draft, _ = app.ehr.create({"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
                                   "priority": "routine", "code": {"coding": [SPINAL_FUSION],
                                                                   "text": "Posterior lumbar fusion L4-L5"},
                                   "subject": {"reference": patient}, "requester": {"reference": physician},
                                   "authoredOn": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        say(f"draft order ServiceRequest/{draft['id']}: {draft['code']['text']} (SNOMED CT 55705006), routine")
        pid = patient.removeprefix("Patient/")
        # What the EHR prefetches (the discovery's templates), so fhirbridge reads nothing while the surgeon waits.
        prefetch = {"patient": app.ehr.read_ref(patient), "priorSecondOpinions": {
            "resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": r} for r in app.ehr.search("ServiceRequest", {
                    "patient": pid, "code": app.order_codes.search_token()})]}}
        body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "fhirServer": app.hospital.fhir_base_url,
                "context": {"userId": physician, "patientId": pid, "draftOrders": {
                    "resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}},
                "prefetch": prefetch}
        started = time.monotonic()
        r = _post(client, ring, f"/cds-services/{SIGN}", body)
        cards = r.get("cards", [])
        if len(cards) != 1:
            raise FhirbridgeError(f"the order-sign service answered {len(cards)} cards, not one: {r}")
        card = cards[0]
        say(f"order-sign answered in {(time.monotonic() - started) * 1000:.0f} ms with one card "
            f"({card['indicator']}):")
        say(f"  | {card['summary']}")
        for line in card["detail"].splitlines():
            if line.strip():
                say(f"  | {line.strip()}")
        suggestion = card["suggestions"][0]
        resource = suggestion["actions"][0]["resource"]
        say(f"  | suggestion: {suggestion['label']} (create ServiceRequest, reasonReference "
            f"{resource['reasonReference'][0]['reference']})")
        for link in card.get("links", []):
            say(f"  | link ({link['type']}): {link['label']}: {link['url']}")
        say("the surgeon accepts the suggestion; the EHR sends the feedback")
        fb = _post(client, ring, f"/cds-services/{SIGN}/feedback", {"feedback": [{
            "card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion["uuid"]}],
            "outcomeTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]})["feedback"][0]
        sr = app.ehr.read_ref(fb["service_request"])
        return Accepted(card=card, service_request=sr, case_id=fb.get("case"))
    finally:
        svc.stop(wait=True)
        server.shutdown()
        server.server_close()
        serving.join(timeout=5)


def _post(client, ring: KeyRing, path: str, body: dict) -> dict:
    key = ring.signing_key()
    now = int(time.time())
    token = jose_jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT"},
                            {"iss": ISSUER, "sub": "demo-ehr", "aud": PUBLIC_URL + path, "iat": now, "exp": now + 60,
                             "jti": uuid.uuid4().hex}, key, algorithms=["ES384"])
    r = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    if r.status_code != 200:
        raise FhirbridgeError(f"{path} answered {r.status_code}: {r.get_json()}")
    return r.get_json()
