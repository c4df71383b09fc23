"""The configuration model: frozen dataclasses for one deployment (hospitals, reviewers, the service,
the API, audit, metrics, the physician app), made by the loader and read by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fhirbridge.errors import ConfigError

ENV_PREFIX = "FHIRBRIDGE_"
DEFAULT_FILE = "fhirbridge.toml"
# src/fhirbridge/mappings is a symlink to the project-level mappings/ (so a wheel ships them too).
PACKAGE_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"


@dataclass(frozen=True)
class Auth:
    type: str = "none"  # none | basic | bearer | smart (SMART Backend Services)
    username: str | None = None
    password: str | None = None
    token: str | None = None
    # smart: the client registered at the EHR, the private JWKS that signs its client assertions (default:
    # the hospital's own keys), the token endpoint (default: discovered), scopes (default: what the configured
    # features request, fhir.auth.FEATURES via App.smart_scopes) and the assertion's algorithm (default: from
    # the key type).
    client_id: str | None = None
    keys: Path | None = None
    token_url: str | None = None
    scopes: tuple[str, ...] | None = None
    alg: str | None = None
    fhir_base_url: str | None = None  # set from the hospital: the SMART configuration is found under it

    def as_dict(self) -> dict:
        d: dict[str, object] = {"type": self.type, "username": self.username, "password": self.password,
                                "token": self.token}
        if self.type == "smart":
            d.update(client_id=self.client_id, keys=self.keys, token_url=self.token_url, scopes=self.scopes,
                     alg=self.alg, fhir_base_url=self.fhir_base_url)
        return d

    def __repr__(self) -> str:  # never show secrets
        return f"Auth(type={self.type!r})"


@dataclass(frozen=True)
class Http:
    timeout_connect: float = 5.0
    timeout_read: float = 30.0
    retries: int = 4
    max_retry_after: float = 30.0
    page_size: int = 100


@dataclass(frozen=True)
class EhrSettings:
    """`[hospital.ehr]`: the vendor profile (mappings/ehr/<profile>.toml; "auto": from the CapabilityStatement
    alone) and capabilities pinned by name (ehr/capabilities.py checks the names and values)."""

    profile: str = "auto"
    pins: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pacs:
    """`[hospital.pacs]`: the hospital's PACS over DICOMweb (issue 15). Its presence turns image retrieval on for
    this hospital. `url` (the DICOMweb base) is used for a study whose ImagingStudy names no reachable
    dicom-wado-rs Endpoint; `auth` as the EHR's (type "smart": the EHR's SMART Backend Services token)."""

    url: str | None = None
    auth: Auth = field(default_factory=Auth)
    timeout_connect: float = 5.0
    timeout_read: float = 60.0
    retries: int = 4
    parallel_series: int = 2     # series retrieved at once (WADO-RS), per Case

    def __repr__(self) -> str:
        return f"Pacs(url={self.url!r}, auth={self.auth!r})"


@dataclass(frozen=True)
class Hospital:
    name: str
    identifier_system: str
    identifier_value: str
    fhir_base_url: str
    keys: Path
    auth: Auth = field(default_factory=Auth)
    http: Http = field(default_factory=Http)
    # PEM: the X.509 certificate of the signing key, then its issuers; sent as x5c (Da Vinci CDex) so a
    # receiver without our JWKS can verify. None: signatures name the key by kid only.
    certificate_chain: Path | None = None
    ehr: EhrSettings = field(default_factory=EhrSettings)
    # IANA time zone the dashboard shows this hospital's times in (UTC on hover); checked by the loader.
    time_zone: str = "UTC"
    pacs: Pacs | None = None          # None: images are not fetched (the package carries ImagingStudy only)

    def organization_ref(self) -> dict:
        return {"identifier": {"system": self.identifier_system, "value": self.identifier_value},
                "display": self.name}

    @property
    def key(self) -> str:
        """What Cases are filed under: the organisation identifier, which stays put when the display name or
        the EHR's URL changes (a key that changed would make intake reopen, and resend, every order)."""
        return f"{self.identifier_system}|{self.identifier_value}"


@dataclass(frozen=True)
class Transport:
    type: str  # outbox | https
    path: Path | None = None
    url: str | None = None
    token: str | None = None  # bearer token for the reviewer's endpoint, if it wants one

    def __repr__(self) -> str:
        return f"Transport(type={self.type!r}, path={self.path!r}, url={self.url!r})"


@dataclass(frozen=True)
class Reviewer:
    name: str
    display: str
    identifier_system: str
    identifier_value: str
    jwks: Path | None                 # the reviewer's public keys in a file ...
    transport: Transport
    profiles: tuple[str, ...] = ()
    turnaround_days: float = 14.0     # target from delivery to opinion; later Cases are flagged overdue
    api_token: str | None = None      # static token for the reviewer API (optional: signed JWTs need none)
    jwks_url: str | None = None       # ... or published at a URL (cached, refreshed on an unknown kid)
    follow_up_limit: int = 3          # follow-up questions per filed opinion this reviewer answers (0: none)

    def organization_ref(self) -> dict:
        return {"identifier": {"system": self.identifier_system, "value": self.identifier_value},
                "display": self.display}

    def due_at(self, sent_at: float) -> float:
        """When this reviewer's opinion on a package issued at `sent_at` (epoch seconds) is due: the one
        source of the due date. Seal writes it into the package's signed claims (`due_at`) and the Case's
        `due_at` column, so the reviewer's inbox, `reviewer open`, the physician page, the dashboard and the
        overdue flag all show the same instant."""
        return sent_at + self.turnaround_days * 86400


@dataclass(frozen=True)
class ServiceTimes:
    """How often the service's scheduler ticks, in seconds."""
    poll_seconds: float = 60.0        # intake poll of each EHR (also catches missed subscription events)
    work_seconds: float = 5.0         # claim and run due steps
    inbox_seconds: float = 30.0       # receive opinions dropped in the inbox
    overdue_seconds: float = 600.0    # flag Cases past their reviewer's turnaround target
    outcomes_seconds: float = 3600.0  # follow the planned treatment of filed opinions (loop/outcomes.py)
    # How long a claimed step (or polling cursor) stays a worker's without renewal: a killed replica's work
    # is taken over after this. None: loop.runner.LEASE_SECONDS (300 s).
    lease_seconds: float | None = None


STAFF_SCOPES = ("orders:write", "cases:read", "cases:write", "audit:read")


@dataclass(frozen=True, repr=False)
class ApiKey:
    """A scoped staff API key: only its SHA-256 is configured (the key itself is shown once when made)."""
    name: str
    sha256: str
    scopes: tuple[str, ...]
    hospitals: tuple[str, ...] = ()   # empty: every hospital of the deployment

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, scopes={self.scopes!r})"


@dataclass(frozen=True)
class OAuthSettings:
    """[api.oauth]: staff bearer tokens are JWT access tokens from the hospital's identity provider."""
    issuer: str
    audience: str
    jwks: Path | None = None
    jwks_url: str | None = None
    scope_claim: str = "scope"        # space-separated string (RFC 8693 "scope") or a list ("scp")


@dataclass(frozen=True)
class AuditSettings:
    """[audit]: also write each AuditEvent (disclosure, opinion filed) to the hospital's EHR."""
    write_to_ehr: bool = False


@dataclass(frozen=True)
class OutcomeSettings:
    """[outcomes]: how long the planned treatment of a filed opinion is followed in the chart (docs/outcomes.md)."""
    window_days: float = 180.0        # nothing decided within this many days after filing is an outcome too


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: Prometheus metrics at /metrics (ops/metrics.py). They name hospitals and reviewers, so a
    bearer token guards them; `unauthenticated` opens them where only a scrape network reaches the port."""
    enabled: bool = True
    token: str | None = None
    unauthenticated: bool = False

    def __repr__(self) -> str:
        return f"MetricsSettings(enabled={self.enabled!r}, unauthenticated={self.unauthenticated!r})"


@dataclass(frozen=True)
class PhysicianApp:
    """[physician_app]: the SMART on FHIR EHR-launch ordering app (ui/physician.py). `issuers` maps each EHR
    FHIR base URL allowed to launch it (the SMART `iss`) to the configured hospital whose orders it places;
    without entries, a hospital's own fhir_base_url is the only issuer for it."""
    client_id: str
    issuers: tuple[tuple[str, str], ...] = ()     # (iss, hospital name)
    # Besides "launch", which is always asked for (fhirclient adds it): who the user is (SMART fhirUser in an
    # OpenID Connect id_token) and read access to the patient in context.
    scope: str = "openid fhirUser patient/Patient.rs"

    def hospital_for(self, iss: str, hospitals: dict[str, Hospital]) -> str | None:
        iss = iss.rstrip("/")
        if self.issuers:
            return next((h for url, h in self.issuers if url == iss), None)
        return next((h.name for h in hospitals.values() if h.fhir_base_url == iss), None)


@dataclass(frozen=True)
class CdsIssuer:
    """One EHR trusted to call the CDS Hooks services: the `iss` of its signed JWTs, where its public keys are
    (CDS Hooks 2.0 "Trusting CDS Clients": the JWK Set at a URL agreed out of band; a `jku` header must name
    it), and the configured hospital whose EHR it is (its order codes, reviewers and FHIR server)."""
    iss: str
    jwks_url: str
    hospital: str


@dataclass(frozen=True)
class CdsSettings:
    """[cds]: the CDS Hooks 2.0 services (service/cds_hooks.py, ehr/cds.py)."""
    enabled: bool = True
    issuers: tuple[CdsIssuer, ...] = ()
    # The EHR's time budget for one hook call: a fetch from the EHR (only when prefetch is missing) gets at most
    # this long, and when it runs out the answer is no card rather than a late one.
    time_budget_ms: int = 500

    def issuer(self, iss: object) -> CdsIssuer | None:
        return next((i for i in self.issuers if isinstance(iss, str) and i.iss == iss.rstrip("/")), None)


@dataclass(frozen=True)
class Config:
    file: Path | None
    base_dir: Path
    data_dir: Path
    store_url: str
    mappings_dir: Path
    inbox: Path
    hospitals: dict[str, Hospital]
    reviewers: dict[str, Reviewer]
    default_reviewer: str | None
    service: ServiceTimes = field(default_factory=ServiceTimes)
    api_tokens: tuple[str, ...] = ()
    public_url: str | None = None
    inline_attachment_limit: int = 256 * 1024
    max_attachment_bytes: int = 512 * 1024 * 1024
    package_lifetime_days: int = 30
    audit: AuditSettings = field(default_factory=AuditSettings)
    api_keys: tuple[ApiKey, ...] = ()
    oauth: OAuthSettings | None = None
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    physician_app: PhysicianApp | None = None
    cds: CdsSettings | None = None
    outcomes: OutcomeSettings = field(default_factory=OutcomeSettings)

    @property
    def hospital(self) -> Hospital:
        """The hospital, when the deployment serves one; with several, name one (hospital_named)."""
        if len(self.hospitals) != 1:
            raise ConfigError(f"{len(self.hospitals)} hospitals are configured: name one with --hospital "
                              f"({', '.join(self.hospitals)})", file=str(self.file), key="hospitals")
        return next(iter(self.hospitals.values()))

    def hospital_named(self, name: str | None) -> Hospital:
        if name is None:
            return self.hospital
        for h in self.hospitals.values():
            if name in (h.name, h.key, env_name(h.name)):
                return h
        raise ConfigError(f"no hospital named {name!r} (configured: {', '.join(self.hospitals)})",
                          file=str(self.file), key="hospitals")

    def hospital_by_key(self, key: str) -> Hospital | None:
        return next((h for h in self.hospitals.values() if h.key == key), None)

    def reviewer(self, name: str) -> Reviewer:
        try:
            return self.reviewers[name]
        except KeyError:
            known = ", ".join(sorted(self.reviewers)) or "none configured"
            raise ConfigError(f"no reviewer named {name!r} (known: {known})", file=str(self.file),
                              key="reviewers") from None

    def reviewer_by_identifier(self, system: str | None, value: str | None) -> Reviewer | None:
        for r in self.reviewers.values():
            if r.identifier_value == value and (system is None or r.identifier_system == system):
                return r
        return None


def env_name(name: object) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(name or "").lower())
