"""What every step needs: configuration, the Case store, the EHR client, keys, mappings, progress output."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fhirbridge.config import mappings as mappings_load
from fhirbridge.config.model import Config, Hospital, env_name
from fhirbridge.crypto import certs, files
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.crypto.remote_jwks import RemoteJwks
from fhirbridge.ehr import capabilities, write_plan
from fhirbridge.errors import FhirError
from fhirbridge.fhir import capability_statement
from fhirbridge.fhir.auth import feature_needs, make_auth, needed_scopes
from fhirbridge.fhir.client import FhirClient
from fhirbridge.ops import metrics
from fhirbridge.store.store import Store

log = logging.getLogger("fhirbridge")


def _quiet(_msg: str) -> None:
    pass


def make_install_private(config: Config) -> None:
    """Narrow what an older version (or a wide umask) left open to other users: the data folder, its cases/
    folder and every Case folder to 0700 (what a Case folder holds is then out of others' reach), the
    hospitals' key files to 0600; the SQLite files are the store's (`store._private_sqlite_file`). Each path
    narrowed is logged as a warning (issue 13, S11: outside Docker/systemd the data folder was 0755). One
    lstat per Case folder, at every start: no walk of the files inside."""
    data_dir = config.data_dir
    files.narrow(data_dir, files.PRIVATE_DIR)
    cases = data_dir / "cases"
    files.narrow(cases, files.PRIVATE_DIR)
    try:
        names = os.listdir(cases)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        files.narrow(cases / name, files.PRIVATE_DIR)
    key_files = {h.keys for h in config.hospitals.values()} | {h.auth.keys for h in config.hospitals.values()
                                                                if h.auth.keys is not None}
    files.narrow_files(sorted(key_files))


@dataclass
class App:
    """Everything a step needs, for ONE hospital. A deployment serving several hospitals makes one App per
    hospital (`App.per_hospital`), all sharing one Case store; each works only its own hospital's Cases."""

    config: Config
    progress: Callable[[str], None] = field(default=_quiet)
    hospital_name: str | None = None
    shared_store: Store | None = None

    def __post_init__(self) -> None:
        make_install_private(self.config)

    @cached_property
    def hospital(self) -> Hospital:
        return self.config.hospital_named(self.hospital_name)

    @classmethod
    def per_hospital(cls, config: Config, **kw) -> list[App]:
        store = Store(config.store_url)
        return [cls(config, hospital_name=name, shared_store=store, **kw) for name in config.hospitals]

    @cached_property
    def store(self) -> Store:
        return self.shared_store or Store(self.config.store_url)

    @cached_property
    def ehr(self) -> FhirClient:
        h = self.hospital
        # Only SMART asks for scopes, and they follow the write plan, which may need the CapabilityStatement:
        # other auth types never wait for it here.
        scopes = self.smart_scopes if h.auth.type == "smart" else None
        return FhirClient(h.fhir_base_url, auth=make_auth(h.auth.as_dict(), default_scopes=scopes),
                          timeout=(h.http.timeout_connect, h.http.timeout_read), retries=h.http.retries,
                          max_retry_after=h.http.max_retry_after, page_size=h.http.page_size,
                          observer=metrics.ehr_observer(h.name, h.fhir_base_url))

    @cached_property
    def capabilities(self) -> capabilities.Capabilities:
        """What the EHR offers the write-back: its CapabilityStatement, then the vendor profile, then the pins
        (ehr/capabilities.py). Read once per App; a failure is not cached, so the next use reads again."""
        return capabilities.discover(self.hospital.ehr, self.config.mappings_dir, self._read_statement)

    def _read_statement(self) -> capability_statement.ServerStatement:
        """GET [base]/metadata WITHOUT our credentials: the scopes to ask for follow from it, so it is read before
        any token exists. R4 http.html#capabilities and SMART App Launch (conformance) have servers serve it
        unauthenticated; one that answers 401 anyway is asked again with basic or bearer credentials."""
        h = self.hospital
        what = "the EHR's CapabilityStatement (GET metadata), which the write plan and the SMART scopes follow"
        attempts = [None, make_auth(h.auth.as_dict())] if h.auth.type in ("basic", "bearer") else [None]
        for i, auth in enumerate(attempts):
            with FhirClient(h.fhir_base_url, auth=auth, timeout=(h.http.timeout_connect, h.http.timeout_read),
                            retries=h.http.retries, max_retry_after=h.http.max_retry_after,
                            observer=metrics.ehr_observer(h.name, h.fhir_base_url)) as client:
                try:
                    return capability_statement.parse(client.capabilities())
                except FhirError as exc:
                    if exc.status == 401 and i + 1 < len(attempts):
                        continue
                    raise FhirError(f"could not read {what}: {exc} (tried again on the next run; a profile and "
                                    "pins in [hospital.ehr] that fix every capability need no statement, "
                                    "docs/ehr.md)", status=exc.status, transient=exc.transient) from exc
                except ValueError:
                    raise FhirError(f"could not read {what}: the answer is not a CapabilityStatement (is "
                                    "fhir_base_url the FHIR base?)", transient=False) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    @cached_property
    def write_plan(self) -> write_plan.WritePlan:
        return write_plan.choose(self.capabilities)

    @cached_property
    def smart_needs(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """What each feature this configuration uses asks of the EHR (fhir.auth.FEATURES); the write-back's
        needs are the writes of the write plan, and an EHR without Task writes is never asked for them."""
        plan = self.write_plan
        return feature_needs(mappings_load.collected_types(self.config.mappings_dir),
                             audit_copies=self.config.audit.write_to_ehr,
                             physician_app=self.config.physician_app is not None,
                             writeback=plan.writes, task_write=plan.task_write, followups=plan.followup_writes)

    @property
    def smart_scopes(self) -> tuple[str, ...]:
        """The SMART scopes asked for unless [hospital.auth] scopes says otherwise: exactly smart_needs."""
        return needed_scopes(self.smart_needs)

    @cached_property
    def hospital_keys(self) -> KeyRing:
        # Messages that reach a reviewer name key sets by label, never by their file (issue 13, S9).
        return KeyRing.load(self.hospital.keys, label="the hospital's key set")

    @cached_property
    def hospital_x5c(self) -> list[str] | None:
        """The `x5c` of the hospital's signing key (`hospital.certificate_chain`, checked to hold that key),
        or None when no chain is configured."""
        chain = self.hospital.certificate_chain
        return None if chain is None else certs.load_x5c(chain, self.hospital_keys.signing_key().public_key)

    @cached_property
    def order_codes(self) -> mappings_load.OrderCodes:
        return mappings_load.load_order_codes(self.config.mappings_dir)

    def reviewer_keys(self, name: str, kid: object = None) -> KeyRing:
        """The reviewer's public keys: its file, or its published JWKS (cached; fetched again when `kid`,
        the key that signed what is being checked, is not in the cached copy)."""
        reviewer = self.config.reviewer(name)
        label = f"the key set registered for reviewer {reviewer.name}"
        if reviewer.jwks is not None:
            return KeyRing.load(reviewer.jwks, label=label)
        cache = self.config.data_dir / "jwks-cache" / f"reviewer-{env_name(name)}.jwks.json"
        assert reviewer.jwks_url is not None  # the loader requires jwks or jwks_url
        return RemoteJwks.shared(reviewer.jwks_url, cache).keys(kid).labelled(label)

    def profile(self, name: str) -> mappings_load.Profile:
        return mappings_load.load_profile(self.config.mappings_dir, name)

    def case_dir(self, case_id: str) -> Path:
        return files.private_dir(self.config.data_dir / "cases" / case_id)

    def __enter__(self) -> App:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if "ehr" in self.__dict__:
            self.ehr.close()
        if "store" in self.__dict__ and self.shared_store is None:
            self.store.close()
