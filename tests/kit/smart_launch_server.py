"""A test EHR that launches SMART apps: SMART App Launch v2, EHR launch
(https://hl7.org/fhir/smart-app-launch/app-launch.html), in front of the session's sekmet.

Why this exists: sekmet 0.1.1 implements only the client_credentials grant (Backend Services); its
/auth/authorize answers an OAuth error, so a user-facing launch cannot be tested against it. This server does
what a conforming EHR does for a public client with PKCE, and checks every parameter the spec requires:

    /ehr/chart?patient=..&user=..            the "EHR": a chart page with a link that launches the app
    <fhir>/.well-known/smart-configuration   discovery (authorization/token endpoints, launch-ehr, S256)
    /authorize                               checks client_id, redirect_uri, launch, scope, state, aud, PKCE
    /token                                   checks the code, redirect_uri, client_id and code_verifier;
                                             answers access_token, token_type, scope, patient and an RS256
                                             id_token naming the user (fhirUser)
    /jwks                                    the id_token's verification key
    <fhir>/...                               everything else is proxied to sekmet, with the bearer token checked

`host` may be "localhost" while fhirbridge runs on 127.0.0.1: two different sites to the browser, so
the redirect back from /authorize is cross-site, as it is between a real EHR and the hospital's service.
"""
from __future__ import annotations

import base64
import hashlib
import html
import secrets
import time
import uuid
from urllib.parse import urlencode

import requests
from flask import Flask, Response, abort, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.kit.browser import LiveServer

CODE_SECONDS = 60


class SmartLaunchServer:
    def __init__(self, sekmet_url: str, *, client_id: str, host: str = "127.0.0.1"):
        self.sekmet = sekmet_url.rstrip("/")
        self.client_id = client_id
        self.redirect_uri: str | None = None      # registered once the app's address is known
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-ehr-1", "use": "sig", "alg": "RS256"})
        self.launches: dict[str, dict] = {}       # launch id -> {"patient", "user", "used"}
        self.codes: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.refusals: list[str] = []             # why /authorize or /token said no (for assertions)
        self.id_token_override: dict | None = None
        self.live = LiveServer(self._app())
        self.url = self.live.url.replace("127.0.0.1", host)
        self.fhir_base = f"{self.url}/fhir"

    def close(self) -> None:
        self.live.close()

    def register(self, redirect_uri: str) -> None:
        self.redirect_uri = redirect_uri

    def new_launch(self, patient: str, user: str | None, app_context: str | None = None) -> str:
        launch = secrets.token_urlsafe(16)
        self.launches[launch] = {"patient": patient.removeprefix("Patient/"), "user": user, "used": False,
                                 "app_context": app_context}
        return launch

    def chart_url(self, app_launch_url: str, patient: str, user: str | None, app_context: str | None = None) -> str:
        """`app_context`: a CDS Hooks card link's appContext, handed to the app in the token response."""
        return f"{self.url}/ehr/chart?" + urlencode({"patient": patient, "user": user or "", "app": app_launch_url,
                                                     **({"app_context": app_context} if app_context else {})})

    # --- the server ---------------------------------------------------------------------------------
    def _app(self) -> Flask:
        app = Flask("test-ehr")

        @app.get("/ehr/chart")
        def chart():
            launch = self.new_launch(request.args["patient"], request.args.get("user") or None,
                                     request.args.get("app_context") or None)
            target = f"{request.args['app']}?" + urlencode({"iss": self.fhir_base, "launch": launch})
            return (f"<!doctype html><html lang=en><title>Test EHR</title><h1>Test EHR: chart</h1>"
                    f"<p>Patient {html.escape(request.args['patient'])}</p>"
                    f"<p><a id=launch href=\"{html.escape(target)}\">Second opinion</a></p>")

        @app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration():
            return jsonify({
                "issuer": self.fhir_base, "jwks_uri": f"{self.url}/jwks",
                "authorization_endpoint": f"{self.url}/authorize", "token_endpoint": f"{self.url}/token",
                "grant_types_supported": ["authorization_code"],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": ["openid", "fhirUser", "launch", "patient/*.rs", "user/*.rs"],
                "response_types_supported": ["code"],
                "capabilities": ["launch-ehr", "client-public", "context-ehr-patient", "sso-openid-connect",
                                 "permission-v2"],
                "code_challenge_methods_supported": ["S256"],
            })

        @app.get("/jwks")
        def jwks():
            return jsonify({"keys": [self.key.as_dict(private=False)]})

        @app.get("/authorize")
        def authorize():
            a = request.args
            if a.get("client_id") != self.client_id or not self.redirect_uri \
                    or a.get("redirect_uri") != self.redirect_uri:
                return self._refuse("unknown client or redirect_uri", 400)     # never redirect to an unknown URI
            problem = None
            launch = self.launches.get(a.get("launch", ""))
            if a.get("response_type") != "code":
                problem = "unsupported_response_type"
            elif launch is None or launch["used"]:
                problem = "invalid_request: unknown or used launch"
            elif "launch" not in a.get("scope", "").split():
                problem = "invalid_scope: launch scope missing"
            elif not a.get("state"):
                problem = "invalid_request: state missing"
            elif a.get("aud") != self.fhir_base:
                problem = "invalid_request: aud is not this FHIR server"
            elif a.get("code_challenge_method") != "S256" or not a.get("code_challenge"):
                problem = "invalid_request: PKCE S256 required"
            if problem:
                self.refusals.append(problem)
                return redirect(f"{self.redirect_uri}?" + urlencode({"error": problem.split(":")[0],
                                                                    "state": a.get("state", "")}))
            launch["used"] = True
            code = secrets.token_urlsafe(24)
            self.codes[code] = {"launch": launch, "challenge": a["code_challenge"], "scope": a["scope"],
                                "redirect_uri": a["redirect_uri"], "at": time.time()}
            return redirect(f"{self.redirect_uri}?" + urlencode({"code": code, "state": a["state"]}))

        @app.post("/token")
        def token():
            f = request.form
            grant = self.codes.pop(f.get("code", ""), None)     # single use
            if f.get("grant_type") != "authorization_code" or grant is None:
                return self._token_error("invalid_grant")
            if time.time() - grant["at"] > CODE_SECONDS or f.get("redirect_uri") != grant["redirect_uri"] \
                    or f.get("client_id") != self.client_id:
                return self._token_error("invalid_grant")
            verifier = f.get("code_verifier", "").encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
            if challenge != grant["challenge"]:
                return self._token_error("invalid_grant: PKCE verifier does not match")
            access = secrets.token_urlsafe(32)
            launch = grant["launch"]
            self.tokens[access] = {"patient": launch["patient"], "expires": time.time() + 3600}
            body = {"access_token": access, "token_type": "Bearer", "expires_in": 3600, "scope": grant["scope"],
                    "patient": launch["patient"], "need_patient_banner": True,
                    # CDS Hooks 2.0: a smart link's appContext reaches the app in the token response.
                    **({"appContext": launch["app_context"]} if launch.get("app_context") else {})}
            if {"openid", "fhirUser"} <= set(grant["scope"].split()) and launch["user"]:
                body["id_token"] = self._id_token(launch["user"])
            resp = jsonify(body)
            resp.headers["Cache-Control"] = "no-store"
            return resp

        @app.route("/fhir/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        def proxy(rest: str):
            given = request.headers.get("Authorization", "")[7:]
            if rest != "metadata" and (given not in self.tokens or self.tokens[given]["expires"] < time.time()):
                abort(401)
            r = requests.request(request.method, f"{self.sekmet}/{rest}", params=request.args,
                                 data=request.get_data(), timeout=30,
                                 headers={k: v for k, v in request.headers.items()
                                          if k.lower() in ("accept", "content-type", "prefer", "if-match",
                                                           "if-none-exist", "if-none-match")})
            return Response(r.content, status=r.status_code, content_type=r.headers.get("Content-Type"))

        return app

    def _id_token(self, user: str) -> str:
        now = int(time.time())
        claims = {"iss": self.fhir_base, "sub": user.split("/")[-1], "aud": self.client_id, "iat": now,
                  "exp": now + 300, "fhirUser": f"{self.fhir_base}/{user}", "jti": str(uuid.uuid4())}
        claims.update(self.id_token_override or {})
        return jwt.encode({"alg": "RS256", "kid": "test-ehr-1"}, claims, self.key, algorithms=["RS256"])

    def _refuse(self, why: str, status: int):
        self.refusals.append(why)
        return Response(why, status=status, content_type="text/plain")

    def _token_error(self, error: str):
        self.refusals.append(error)
        return jsonify({"error": error.split(":")[0], "error_description": error}), 400


# The physician app's client id at the test EHR.
CLIENT_ID = "fhirbridge-physician-test"


def configure_physician_app(h, smart: SmartLaunchServer, public_url: str | None = None) -> None:
    """Configure test hospital `h` (tests/kit/hospital.py) for the physician app, launched from `smart` as
    CLIENT_ID (and served at `public_url`, when given)."""
    text = h.config_path.read_text()
    if public_url:
        text += f'\n[service]\npublic_url = "{public_url}"\n'
    text += f'\n[physician_app]\nclient_id = "{CLIENT_ID}"\n[[physician_app.issuers]]\nurl = "{smart.fhir_base}"\n'
    h.config_path.write_text(text)
