"""FHIR Subscription notifications from the EHR (R4 Subscriptions Backport, rest-hook). Implemented in
full with `fhirbridge subscribe`; see docs/architecture.md."""
from __future__ import annotations

from flask import Blueprint

notify = Blueprint("notify", __name__, url_prefix="/fhir")
