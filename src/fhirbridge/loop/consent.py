"""Patient consent to this disclosure: FHIR R4 Consent (https://hl7.org/fhir/R4/consent.html).

The disclosure being decided is always the same: this patient's records, to ONE reviewer organisation,
for treatment (v3-ActReason TREAT, as the BALP disclosure AuditEvent says), now. Only the patient's active
privacy Consents are read (`Consent?patient=<id>&status=active`; scope consentscope#patient-privacy, or no
scope coding), and only while the root provision's period covers now.

How a Consent is read (consent.html "Consent Rules"): `policyRule` is the base rule (v3-ActCode OPTOUT /
OPTOUTE: nothing may be shared; anything else: sharing is allowed); the root `provision.type` overrides it,
and nested provisions are exceptions to their parent, the most specific matching one deciding. Within a
provision every criterion must hold (AND), and any value of a repeating criterion may match (OR). A
provision concerns this disclosure when its period covers now, its recipients (actors with role
v3-ParticipationType IRCP/PRCP, or with a role we do not know) are absent or include the reviewer
organisation, its purpose is absent or includes TREAT, and its actions are not only collect/correct.
`class`, `code`, `securityLabel`, `data`, `dataPeriod` and actors in other roles (e.g. AUT: the author of
the records) restrict which records a provision is about.

Outcomes:
- whole denial: a deny that concerns this disclosure and restricts no records, with no permit exception
  for it, stops the Case (`ConsentDenied`, permanent) before anything is sent;
- category denial: matching records are withheld and named in the manifest with the Consent (see
  `Consents.withhold_reason` for when they are not named);
- when in doubt, deny. Whatever cannot be decided (an invalid Consent, a recipient we cannot identify, a
  record without a date under a `dataPeriod` deny) counts for a deny and never for a permit; conflicting
  Consents or sibling provisions: deny wins.

The Patient and the order are the referral itself: only a whole denial keeps them back.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fhirbridge.errors import ConsentDenied, FhirError
from fhirbridge.fhir.elements import clinical_date, has_coding, iter_references, parse_fhir_date
from fhirbridge.fhir.validate import validate as validate_resource

# Withheld reasons starting with this are kept by the hospital (collected.jwe) but never shown to the
# reviewer: a record held back for a sensitivity label or singled out by a patient's Consent is not named.
POLICY = "policy: "

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

PRIVACY = (SCOPE_SYSTEM, "patient-privacy")
OPT_OUT = {(ACT_CODE, "OPTOUT"), (ACT_CODE, "OPTOUTE")}
PURPOSE = (ACT_REASON, "TREAT")
RECIPIENT_ROLES = {"IRCP", "PRCP"}              # information recipient, primary information recipient
DISCLOSING_ACTIONS = {(CONSENT_ACTION, c) for c in ("disclose", "access", "use")}
OTHER_ACTIONS = {(CONSENT_ACTION, c) for c in ("collect", "correct")}   # never about sending records out
# Where a record keeps the codes a provision's `code` is compared with.
CODE_FIELDS = ("category", "code", "type", "medicationCodeableConcept")
_ORG_REF = re.compile(r"(?:^|/)Organization/[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Disclosure:
    """The disclosure being decided: to the organisation with identifier `recipient`, at `now`.
    `resolve` says whether a literal reference (an actor) is that organisation: True, False, or None when
    it cannot be told."""
    recipient: tuple[str, str]
    now: datetime
    resolve: Callable[[str], bool | None] = lambda ref: None


@dataclass
class Provision:
    """One provision, its type resolved (a root without one takes the base rule)."""
    type: str
    applies: bool                                   # concerns this disclosure (period, recipient, purpose, action)
    classes: frozenset = frozenset()                # resource type codes or profile URLs
    codes: frozenset = frozenset()                  # (system, code)
    labels: frozenset = frozenset()                 # (system, code) of meta.security
    data: tuple = ()                                # (meaning, "Type/id")
    parties: tuple = ()                             # "Type/id" of actors in a non-recipient role; None: unknown
    data_period: tuple | None = None                # (start, end) datetimes, either may be None
    names_recipient: bool = False                   # applies because an actor is the reviewer
    children: list[Provision] = field(default_factory=list)

    @property
    def restricted(self) -> bool:
        return bool(self.classes or self.codes or self.labels or self.data or self.parties or self.data_period)

    @property
    def sensitive(self) -> bool:
        """Selects records by clinical meaning or one by one: saying which were withheld would disclose it."""
        return bool(self.codes or self.labels or self.data or self.parties)


@dataclass
class ConsentRule:
    ref: str                  # "Consent/<id>"
    base: Provision           # the base rule (policyRule), unrestricted
    root: Provision | None


class _Unclear(Exception):
    pass


# ---------------------------------------------------------------- reading a Consent

def parse(consent: dict, d: Disclosure) -> ConsentRule | None:
    """The Consent as rules for this disclosure; None when it does not concern it (not active, not a privacy
    Consent, or outside its period). Raises ConsentDenied when it cannot be evaluated."""
    ref = f"Consent/{consent.get('id')}"
    if consent.get("status") != "active":
        return None
    scopes = _codings(consent.get("scope"))
    if scopes and PRIVACY not in scopes:
        return None  # about treatment, research or advance directives: not about disclosure
    # Fail safe: a privacy Consent we cannot read might deny this disclosure, so it is never taken as
    # silence. The reasons name element paths only (fhir/validate.py), never values.
    reasons = validate_resource(consent)
    try:
        if reasons:
            raise _Unclear("is not valid FHIR (" + "; ".join(reasons[:3]) + ")")
        policy = {(c.get("system"), c.get("code")) for c in consent.get("policyRule", {}).get("coding", [])}
        base = Provision(type="deny" if policy & OPT_OUT else "permit", applies=True)
        prov = consent.get("provision")
        if prov is None:
            return ConsentRule(ref, base, None)
        if not _covers(prov.get("period"), d.now):
            return None  # not yet, or no longer, in force
        return ConsentRule(ref, base, _provision(prov, prov.get("type") or base.type, d))
    except _Unclear as exc:
        raise ConsentDenied(f"patient consent {ref} {exc}: it cannot be evaluated, so nothing was sent; "
                            f"correct it in the EHR, then `fhirbridge retry`", consent=ref) from None


def _provision(p: dict, ptype: str | None, d: Disclosure) -> Provision:
    if ptype is None:
        raise _Unclear("has a nested provision without a type (permit or deny)")
    if ptype not in ("permit", "deny"):
        raise _Unclear("has a provision whose type is neither permit nor deny")
    deny = ptype == "deny"
    recipients, parties = [], []
    for actor in p.get("actor", []):
        roles = _codings(actor.get("role"))
        if roles and all(s == PARTICIPATION and c not in RECIPIENT_ROLES for s, c in roles):
            parties.append(_rel(actor.get("reference", {}).get("reference")))
        else:
            recipients.append(_is_recipient(actor.get("reference", {}), d))
    purposes = {(c.get("system"), c.get("code")) for c in p.get("purpose", [])}
    actions = [_codings(cc) for cc in p.get("action", [])]
    applies = (_covers(p.get("period"), d.now)
               and (not recipients or any(r is True or (deny and r is None) for r in recipients))
               and (not purposes or PURPOSE in purposes)
               and _concerns_disclosure(actions, deny))
    # A criterion we cannot compare records with would silently widen a permit, or turn a category deny
    # into one about everything: unclear instead.
    for c in p.get("class", []):
        if not (c.get("system") in (None, RESOURCE_TYPES) or "/StructureDefinition/" in (c.get("code") or "")):
            raise _Unclear(f"restricts by a class from {c.get('system')}, which fhirbridge cannot match")
    if any(not _codings(cc) for cc in p.get("code", [])) or any(not c.get("code") for c in p.get("securityLabel", [])):
        raise _Unclear("restricts by a code or security label without a coding")
    data_period = None
    if p.get("dataPeriod"):
        data_period = (_when(p["dataPeriod"].get("start")), _when(p["dataPeriod"].get("end"), end=True))
    return Provision(
        type=ptype, applies=applies,
        classes=frozenset(c.get("code") for c in p.get("class", [])),
        codes=frozenset(sc for cc in p.get("code", []) for sc in _codings(cc)),
        labels=frozenset((c.get("system"), c.get("code")) for c in p.get("securityLabel", [])),
        data=tuple((x.get("meaning"), _rel(x.get("reference", {}).get("reference"))) for x in p.get("data", [])),
        parties=tuple(parties), data_period=data_period, names_recipient=bool(recipients),
        # A nested provision without a type is an exception that does not say which way: unclear.
        children=[_provision(c, c.get("type"), d) for c in p.get("provision", [])])


def _concerns_disclosure(actions: list[set], deny: bool) -> bool:
    """A deny counts unless every action is one that never sends records out; a permit only when an action
    is one that does (an action given as text alone is known to neither)."""
    if not actions:
        return True
    if deny:
        return not all(codes and codes <= OTHER_ACTIONS for codes in actions)
    return any(codes & DISCLOSING_ACTIONS for codes in actions)


def _is_recipient(ref: dict, d: Disclosure) -> bool | None:
    ident = ref.get("identifier") or {}
    if ident.get("system") and ident.get("value"):
        return (ident["system"], ident["value"]) == d.recipient
    if isinstance(ref.get("reference"), str):
        return d.resolve(ref["reference"])
    return None


def _covers(period: dict | None, now: datetime) -> bool:
    if not period:
        return True
    start, end = _when(period.get("start")), _when(period.get("end"), end=True)
    return (start is None or start <= now) and (end is None or now < end)


def _when(value: str | None, *, end: bool = False) -> datetime | None:
    """A Period bound; an end given as a date includes that whole day (month, year): R4 datatypes.html#Period."""
    if value is None:
        return None
    parsed = parse_fhir_date(value) if isinstance(value, str) else None
    if parsed is None:
        raise _Unclear("has a period that cannot be read")
    if end and len(value) == 4:
        return parsed.replace(year=parsed.year + 1)
    if end and len(value) == 7:
        return (parsed + timedelta(days=32)).replace(day=1)
    if end and len(value) == 10:
        return parsed + timedelta(days=1)
    return parsed


def _codings(cc: dict | None) -> set[tuple[str | None, str | None]]:
    return {(c.get("system"), c.get("code")) for c in (cc or {}).get("coding", [])}


def _rel(ref: str | None) -> str | None:
    """'Type/id' of a literal reference, absolute or relative; None for anything else."""
    if not isinstance(ref, str) or ref.startswith(("#", "urn:")):
        return None
    parts = ref.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


# ---------------------------------------------------------------- deciding

def whole_denial(rule: ConsentRule) -> Provision | None:
    """The provision that denies this whole disclosure, if any."""
    root = rule.root
    if root is None or not root.applies:
        return rule.base if rule.base.type == "deny" else None
    if root.restricted:  # about some records; for the rest the base rule holds
        return rule.base if rule.base.type == "deny" and not _permits_any(root) else None
    return _whole(root)


def _permits_any(p: Provision) -> bool:
    return p.type == "permit" or any(c.applies and _permits_any(c) for c in p.children)


def _whole(p: Provision) -> Provision | None:
    if p.type == "deny" and not any(c.applies and c.type == "permit" for c in p.children):
        return p
    for c in p.children:
        if c.applies and not c.restricted and (hit := _whole(c)):
            return hit
    return None


def decide(rule: ConsentRule, res: dict) -> list[Provision]:
    """The provisions from the root down to the one that decides about this record (the last)."""
    root = rule.root
    if root is None or not root.applies or not matches(root, res):
        return [rule.base]
    return _decide(root, res, [root])


def _decide(p: Provision, res: dict, path: list[Provision]) -> list[Provision]:
    found = [_decide(c, res, path + [c]) for c in p.children if c.applies and matches(c, res)]
    return next((f for f in found if f[-1].type == "deny"), found[0] if found else path)


def matches(p: Provision, res: dict) -> bool:
    """Whether the provision is about this record. What cannot be told counts as a match for a deny only."""
    deny = p.type == "deny"
    ref = f"{res.get('resourceType')}/{res.get('id')}"
    if p.classes and not p.classes & ({res.get("resourceType")} | set(res.get("meta", {}).get("profile", []))):
        return False
    if p.codes and not has_coding(res, CODE_FIELDS, tuple(p.codes)):
        return False
    if p.labels and not p.labels & {(s.get("system"), s.get("code")) for s in res.get("meta", {}).get("security", [])}:
        return False
    if p.data or p.parties:
        refs = {_rel(r) for r in iter_references(res)}
        # instance: that record; related/dependents/authoredby: records pointing at it (wider is safe for a deny)
        if p.data and not any(target == ref or (meaning != "instance" and target in refs) or (deny and target is None)
                              for meaning, target in p.data):
            return False
        if p.parties and not any(party in refs or (deny and party is None) for party in p.parties):
            return False
    if p.data_period:
        when, (start, end) = clinical_date(res), p.data_period
        if when is None:
            return deny
        if (start and when < start) or (end and when >= end):
            return False
    return True


# ---------------------------------------------------------------- the step's view

@dataclass
class Consents:
    """The patient's Consents that concern this disclosure, none of which denies it as a whole."""
    rules: list[ConsentRule] = field(default_factory=list)

    @property
    def refs(self) -> list[str]:
        return [r.ref for r in self.rules]

    def withhold_reason(self, res: dict) -> str | None:
        """Why the patient's consent keeps this record back, or None.

        Records kept back by resource type or date are named to the reviewer (the issue: the manifest names
        them), like records outside the profile. Records kept back by code, security label, instance or
        person are not (POLICY, like sensitivity labels in loop/collect.py): a patient singles records out that
        way because of what they say, and naming them would point the reviewer at exactly that. When
        several Consents deny a record, an unnamed reason wins for the same reason."""
        reasons = []
        for rule in self.rules:
            path = decide(rule, res)
            if path[-1].type != "deny":
                continue
            if any(p.sensitive for p in path):
                return f"{POLICY}patient consent ({rule.ref}) denies disclosure of this record"
            reasons.append(f"patient consent ({rule.ref}) denies disclosure of {_what(path)}")
        return reasons[0] if reasons else None

    def denies_any(self, resources: list[dict]) -> bool:
        return any(self.withhold_reason(r) for r in resources)


def _what(path: list[Provision]) -> str:
    classes = next((p.classes for p in reversed(path) if p.classes), None)
    period = next((p.data_period for p in reversed(path) if p.data_period), None)
    what = (", ".join(sorted(c.rsplit("/", 1)[-1] for c in classes)) + " records") if classes else "records"
    if period:
        start, end = (f"{x:%Y-%m-%d}" if x else "…" for x in period)
        what += f" dated {start} to {end}"
    return what if classes or period else "records other than those it permits"


def evaluate(consents: list[dict], d: Disclosure, reviewer_name: str) -> Consents:
    """Rules for this disclosure from the patient's Consents; ConsentDenied if one denies it as a whole."""
    out = Consents()
    for c in consents:
        rule = parse(c, d)
        if rule is None:
            continue
        hit = whole_denial(rule)
        if hit is not None:
            to = f"this reviewer ({reviewer_name})" if hit.names_recipient else "external parties"
            raise ConsentDenied(f"patient consent {rule.ref} denies disclosure to {to}: nothing was sent; "
                                f"if the Consent is withdrawn or corrected, `fhirbridge retry` resumes the Case",
                                consent=rule.ref)
        if rule.root is not None and rule.root.applies:  # else its base rule permits: nothing to apply
            out.rules.append(rule)
    return out


def check(app, patient_ref: str, reviewer, *, now: datetime | None = None) -> Consents:
    """Search the EHR for the patient's active Consents and evaluate them for sending to `reviewer`."""
    ident = reviewer.organization_ref()["identifier"]
    recipient = (ident["system"], ident["value"])
    cache: dict[str, bool | None] = {}

    def resolve(ref: str) -> bool | None:
        if not _ORG_REF.search(ref.split("/_history")[0]):
            return False  # a person, role or group: not the reviewer organisation
        if ref not in cache:
            try:
                org = app.ehr.read_ref(ref)
                cache[ref] = recipient in {(i.get("system"), i.get("value")) for i in org.get("identifier", [])}
            except FhirError as exc:
                if exc.transient:
                    raise
                cache[ref] = None  # cannot be told: counts for a deny, not for a permit
        return cache[ref]

    found = [c for c in app.ehr.search("Consent", {"patient": patient_ref, "status": "active"})
             if c.get("resourceType") == "Consent"]
    d = Disclosure(recipient=recipient, now=now or datetime.now(UTC), resolve=resolve)
    return evaluate(found, d, reviewer.display or reviewer.name)
