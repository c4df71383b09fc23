"""Loads and checks the declarative mappings (mappings/*.toml): order codes, collection profiles, opinion form,
EHR write profiles, CDS Hooks rules (mappings/cds/).

A mistake in a mapping file is a ConfigError naming the file and key, found at start-up rather than
half-way through a Case.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.errors import ConfigError

COLLECTABLE = ("Condition", "DiagnosticReport", "ImagingStudy", "Procedure", "MedicationStatement",
               "MedicationRequest", "DocumentReference")
# Referenced types worth carrying so the records make sense on their own (who reported, what was
# measured, which drug, where the images are). Collect follows references to them; doctor checks each.
FOLLOW_TYPES = ("Practitioner", "PractitionerRole", "Organization", "Observation", "Medication", "Endpoint",
                "Specimen", "Location")
# `studies`: one choice per imaging study in the package (a radiology re-read scores each study it re-reads).
FIELD_KINDS = ("choice", "text", "list", "answers", "studies")
CHOICE_KINDS = ("choice", "studies")
# Where fhirbridge's own code systems live (config/terminology.py defines and serves them): one base, a domain
# the project controls, since codes written into charts keep naming it (R4 resource.html#canonical).
CANONICAL_BASE = "http://fhirbridge.org/fhir/CodeSystem/"
COLLECTION_PROFILE_SYSTEM = CANONICAL_BASE + "collection-profile"


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("mapping file not found", file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text (TOML files must be UTF-8)", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def _no_unknown(table: dict, allowed: set[str], path: Path, prefix: str = "") -> None:
    """A misspelt key in a mapping must not be ignored: `security_label` for `security_labels` would
    disclose the records it was meant to withhold."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError("unknown key (check the spelling)", file=str(path), key=prefix + unknown[0])


def _str_list(value, path: Path, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("must be a list of strings", file=str(path), key=key)
    return tuple(value)


def _coding(value, path: Path, key: str) -> dict:
    if not isinstance(value, dict) or not value.get("system") or not value.get("code"):
        raise ConfigError("must be a table with system and code", file=str(path), key=key)
    return {k: value[k] for k in ("system", "code", "display") if value.get(k)}


def _token_list(value, path: Path, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "|" in v for v in value):
        raise ConfigError('must be a list of "system|code" strings', file=str(path), key=key)
    return tuple(tuple(v.split("|", 1)) for v in value)


# --- order codes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OrderCodes:
    match: tuple[dict, ...]
    order_code: dict
    order_category: dict
    profile_system: str
    profile_by_specialty: dict[tuple[str, str], str]

    def search_token(self) -> str:
        return ",".join(f"{c['system']}|{c['code']}" for c in self.match)

    def matches(self, service_request: dict) -> bool:
        wanted = {(c["system"], c["code"]) for c in self.match}
        codings = service_request.get("code", {}).get("coding", [])
        return any((c.get("system"), c.get("code")) in wanted for c in codings)


def load_order_codes(mappings_dir: Path) -> OrderCodes:
    path = mappings_dir / "codes" / "orders.toml"
    raw = _read(path)
    items = raw.get("order_codes")
    if not isinstance(items, list) or not items:
        raise ConfigError("needs at least one [[order_codes]] entry", file=str(path), key="order_codes")
    match = tuple(_coding(c, path, f"order_codes[{i}]") for i, c in enumerate(items))
    order = raw.get("order", {})
    profile = raw.get("profile", {})
    _no_unknown(raw, {"order_codes", "order", "profile"}, path)
    _no_unknown(profile, {"order_detail_system", "by_specialty"}, path, "profile.")
    known_profiles = set(profile_names(mappings_dir))
    by_spec = {}
    for i, item in enumerate(profile.get("by_specialty", [])):
        c = _coding(item, path, f"profile.by_specialty[{i}]")
        name = str(item.get("profile") or "default")
        if name not in known_profiles:
            raise ConfigError(f"names profile {name!r}, which is not in {mappings_dir / 'collect'}",
                              file=str(path), key=f"profile.by_specialty[{i}].profile")
        by_spec[(c["system"], c["code"])] = name
    return OrderCodes(match=match, order_code=_coding(order.get("code"), path, "order.code"),
                      order_category=_coding(order.get("category"), path, "order.category"),
                      profile_system=str(profile.get("order_detail_system", COLLECTION_PROFILE_SYSTEM)),
                      profile_by_specialty=by_spec)


# --- collection profiles -------------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceRule:
    type: str
    lookback: bool = True
    categories: tuple[tuple[str, str], ...] = ()
    types: tuple[tuple[str, str], ...] = ()
    modalities: tuple[str, ...] = ()
    statuses_excluded: tuple[str, ...] = ("entered-in-error",)


@dataclass(frozen=True)
class ImagingRule:
    """A profile's `[imaging]` table (issue 15): which images of the ImagingStudies it keeps travel with the
    package. Studies are taken newest first (`started`); a series is skipped when its modality is not listed
    or its description or ImageType holds one of `skip_series` (localizers, scouts); caps are in bytes."""

    modalities: tuple[str, ...] = ()          # empty: every modality
    most_recent: int = 3
    skip_series: tuple[str, ...] = ("localizer", "scout", "survey")
    max_study_bytes: int = 2 * 1024 ** 3
    max_package_bytes: int = 4 * 1024 ** 3
    required: bool = False                    # a study withheld (missing, over a cap, refused) fails the Case


@dataclass(frozen=True)
class Expectation:
    """One `[[expect]]` entry of a profile (issue 16 part 6): a record a reviewer of this specialty expects, the
    record list patients are told to bring. A record counts when one of `codes` (LOINC document or report
    codes) is its `type` (DocumentReference) or `code` (DiagnosticReport, Observation, Procedure), or when its
    resource type is in `resources` (and, for ImagingStudy, one of `modalities` is its modality)."""

    name: str
    codes: tuple[tuple[str, str], ...] = ()
    resources: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    required: bool = False                    # with the profile's `hold`: the Case waits for it (or a person)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    lookback_days: int
    rules: dict[str, ResourceRule]
    withhold_labels: tuple[tuple[str, str], ...] = field(default=())
    file: Path | None = None
    imaging: ImagingRule | None = None         # None: the ImagingStudy resources travel without their images
    expect: tuple[Expectation, ...] = ()       # the packet's checklist (loop/checklist.py)
    hold: bool = False                         # hold the Case at await_records while a required item is missing


def load_profile(mappings_dir: Path, name: str) -> Profile:
    path = mappings_dir / "collect" / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (mappings_dir / "collect").glob("*.toml")))
        raise ConfigError(f"no collection profile {name!r} (known: {known})", file=str(path))
    return _profile(path, _read(path))


def _profile(path: Path, raw: dict) -> Profile:
    _no_unknown(raw, {"name", "description", "lookback_days", "withhold", "resources", "imaging", "expect", "hold"},
                path)
    lookback = raw.get("lookback_days", 730)
    if not isinstance(lookback, int) or lookback <= 0:
        raise ConfigError("must be a positive number of days", file=str(path), key="lookback_days")
    resources = raw.get("resources")
    if not isinstance(resources, dict) or not resources:
        raise ConfigError("needs at least one [resources.<Type>] table", file=str(path), key="resources")
    rules = {}
    allowed_keys = {"lookback", "categories", "types", "modalities", "statuses_excluded"}
    for rtype, spec in resources.items():
        key = f"resources.{rtype}"
        if rtype not in COLLECTABLE:
            raise ConfigError(f"cannot collect {rtype}; collectable: {', '.join(COLLECTABLE)}", file=str(path),
                              key=key)
        spec = spec or {}
        unknown = set(spec) - allowed_keys
        if unknown:
            raise ConfigError("unknown key", file=str(path), key=f"{key}.{sorted(unknown)[0]}")
        lookback_flag = spec.get("lookback", True)
        if not isinstance(lookback_flag, bool):
            raise ConfigError("must be true or false", file=str(path), key=f"{key}.lookback")
        rules[rtype] = ResourceRule(
            type=rtype, lookback=lookback_flag,
            categories=_token_list(spec.get("categories", []), path, f"{key}.categories"),
            types=_token_list(spec.get("types", []), path, f"{key}.types"),
            modalities=_str_list(spec.get("modalities", []), path, f"{key}.modalities"),
            statuses_excluded=_str_list(spec.get("statuses_excluded", ["entered-in-error"]), path,
                                        f"{key}.statuses_excluded"))
    withhold = raw.get("withhold", {})
    if not isinstance(withhold, dict):
        raise ConfigError("must be a table", file=str(path), key="withhold")
    _no_unknown(withhold, {"security_labels"}, path, "withhold.")
    return Profile(name=str(raw.get("name", path.stem)), description=str(raw.get("description", "")),
                   lookback_days=lookback, rules=rules,
                   withhold_labels=_token_list(withhold.get("security_labels", []), path,
                                               "withhold.security_labels"),
                   file=path, imaging=_imaging(raw["imaging"], path) if "imaging" in raw else None,
                   expect=_expectations(raw.get("expect", []), path), hold=_flag(raw.get("hold", False), path, "hold"))


def _flag(value: object, path: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("must be true or false", file=str(path), key=key)
    return value


def _expectations(items: object, path: Path) -> tuple[Expectation, ...]:
    if not isinstance(items, list):
        raise ConfigError("must be a list of [[expect]] tables", file=str(path), key="expect")
    out: list[Expectation] = []
    for i, spec in enumerate(items):
        key = f"expect[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError("must be a table", file=str(path), key=key)
        _no_unknown(spec, {"name", "codes", "resources", "modalities", "required"}, path, key + ".")
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("needs a name (what the reviewer expects, in words)", file=str(path), key=key + ".name")
        resources = _str_list(spec.get("resources", []), path, key + ".resources")
        for rtype in resources:
            if rtype not in COLLECTABLE + FOLLOW_TYPES:
                raise ConfigError(f"{rtype} is never collected", file=str(path), key=key + ".resources")
        item = Expectation(name=name.strip(), codes=_token_list(spec.get("codes", []), path, key + ".codes"),
                           resources=resources, modalities=_str_list(spec.get("modalities", []), path,
                                                                     key + ".modalities"),
                           required=_flag(spec.get("required", False), path, key + ".required"))
        if not item.codes and not item.resources:
            raise ConfigError("needs codes or resources (how a record is recognised)", file=str(path), key=key)
        if name.strip() in {e.name for e in out}:
            raise ConfigError("two [[expect]] entries have this name", file=str(path), key=key + ".name")
        out.append(item)
    return tuple(out)


def _imaging(spec: object, path: Path) -> ImagingRule:
    if not isinstance(spec, dict):
        raise ConfigError("must be a table", file=str(path), key="imaging")
    fields = ImagingRule.__dataclass_fields__
    _no_unknown(spec, set(fields), path, "imaging.")
    default = ImagingRule()
    values: dict = {}
    for name in ("most_recent", "max_study_bytes", "max_package_bytes"):
        value = spec.get(name, getattr(default, name))
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError("must be a whole number greater than 0", file=str(path), key=f"imaging.{name}")
        values[name] = value
    for name in ("modalities", "skip_series"):
        values[name] = _str_list(spec.get(name, list(getattr(default, name))), path, f"imaging.{name}")
    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise ConfigError("must be true or false", file=str(path), key="imaging.required")
    return ImagingRule(required=required, **values)


def profile_names(mappings_dir: Path) -> list[str]:
    return sorted(p.stem for p in (mappings_dir / "collect").glob("*.toml"))


def collected_types(mappings_dir: Path) -> tuple[str, ...]:
    """Every type collect searches: each profile's resource types, then the referenced types it follows."""
    out: list[str] = []
    for name in profile_names(mappings_dir):
        out += [t for t in load_profile(mappings_dir, name).rules if t not in out]
    return (*out, *(t for t in FOLLOW_TYPES if t not in out))


# --- opinion form --------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpinionField:
    name: str
    kind: str
    label: str
    section: str
    required: bool
    choices: dict[str, dict]
    observation_code: dict | None


@dataclass(frozen=True)
class OpinionForm:
    doc_type: dict
    doc_category: dict
    title: str
    section_codes: dict[str, dict]
    fields: dict[str, OpinionField]
    file: Path


FORM_KEYS = {"document", "sections", "fields"}
DOCUMENT_KEYS = {"type", "category", "title"}
FIELD_KEYS = {"kind", "required", "label", "section", "observation", "observation_code", "choices"}
CODING_KEYS = {"system", "code", "display"}


def _table(value, path: Path, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, got {type(value).__name__}", file=str(path), key=key)
    return value


def _form_coding(value, path: Path, key: str) -> dict:
    """A coding in the opinion form: a misspelt `dispaly` would silently drop the text the EHR shows."""
    coding = _coding(value, path, key)
    _no_unknown(value, CODING_KEYS, path, f"{key}.")
    for k in CODING_KEYS & set(value):
        if not isinstance(value[k], str):
            raise ConfigError("must be text", file=str(path), key=f"{key}.{k}")
    return coding


def _typed(spec: dict, name: str, typ: type, default, path: Path, key: str):
    value = spec.get(name, default)
    if not isinstance(value, typ):
        # `required = "false"` must not count as true (and `required = 1` is not a boolean either).
        want = {bool: "true or false", str: "text"}.get(typ, typ.__name__)
        raise ConfigError(f"must be {want}", file=str(path), key=f"{key}.{name}")
    return value


def _form_field(fname: str, spec, path: Path) -> OpinionField:
    key = f"fields.{fname}"
    spec = _table(spec, path, key)
    kind = spec.get("kind")
    if kind not in FIELD_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(FIELD_KINDS)}", file=str(path), key=f"{key}.kind")
    choices = {}
    if kind in CHOICE_KINDS:
        raw_choices = spec.get("choices")
        if not isinstance(raw_choices, dict) or not raw_choices:
            raise ConfigError("a choice field needs [choices]", file=str(path), key=f"{key}.choices")
        choices = {k: _form_coding(v, path, f"{key}.choices.{k}") for k, v in raw_choices.items()}
    elif "choices" in spec:
        raise ConfigError(f"only a choice or studies field has choices (this one is {kind!r})", file=str(path),
                          key=f"{key}.choices")
    observation = _typed(spec, "observation", bool, False, path, key)
    obs = None
    if observation:
        if kind not in CHOICE_KINDS:
            raise ConfigError("only a choice or studies field can be recorded as an Observation", file=str(path),
                              key=f"{key}.observation")
        obs = _form_coding(spec.get("observation_code"), path, f"{key}.observation_code")
    elif "observation_code" in spec:
        raise ConfigError("observation_code without observation = true would never be used", file=str(path),
                          key=f"{key}.observation_code")
    required = _typed(spec, "required", bool, False, path, key)
    label = _typed(spec, "label", str, fname, path, key)
    section = _typed(spec, "section", str, "Comments", path, key)
    # Checked after the keys above, so a misspelt required key is reported as that key being missing.
    _no_unknown(spec, FIELD_KEYS, path, f"{key}.")
    return OpinionField(name=fname, kind=kind, label=label, section=section, required=required, choices=choices,
                        observation_code=obs)


@lru_cache(maxsize=8)
def load_opinion_form(mappings_dir: Path, name: str = "default") -> OpinionForm:
    """Load mappings/opinion/<name>.toml. Unknown keys are errors at every level: a misspelt `requried`
    ignored would quietly make a required field of the opinion optional."""
    path = mappings_dir / "opinion" / f"{name}.toml"
    raw = _read(path)
    doc = _table(raw.get("document", {}), path, "document")
    fields = {fname: _form_field(fname, spec, path)
              for fname, spec in _table(raw.get("fields", {}), path, "fields").items()}
    if not fields:
        raise ConfigError("defines no [fields.*]", file=str(path), key="fields")
    sections = {title: _form_coding(c, path, f"sections.{title}")
                for title, c in _table(raw.get("sections", {}), path, "sections").items()}
    form = OpinionForm(doc_type=_form_coding(doc.get("type"), path, "document.type"),
                       doc_category=_form_coding(doc.get("category"), path, "document.category"),
                       title=_typed(doc, "title", str, "Second opinion", path, "document"),
                       section_codes=sections, fields=fields, file=path)
    _no_unknown(doc, DOCUMENT_KEYS, path, "document.")
    _no_unknown(raw, FORM_KEYS, path)
    return form


def opinion_form_names(mappings_dir: Path) -> list[str]:
    return sorted(p.stem for p in (mappings_dir / "opinion").glob("*.toml"))


# --- EHR write profiles ----------------------------------------------------------------------------

EHR_PROFILE_KEYS = {"description", "source", "capabilities"}


@dataclass(frozen=True)
class EhrProfile:
    """mappings/ehr/<name>.toml: what one kind of EHR does for the write-back, capability by name (the names and
    their values are checked by ehr/capabilities.py, which knows them; this loader checks the file's shape)."""

    name: str
    description: str
    source: str                       # where the behaviours are documented (each value cites its section)
    values: dict                      # capability name -> value, as written
    file: Path


def _ehr_dirs(mappings_dir: Path) -> tuple[Path, ...]:
    # A hospital's own mappings folder made before EHR profiles existed has no ehr/: the shipped ones still apply,
    # and a profile of the same name in the hospital's folder wins.
    return tuple(dict.fromkeys((Path(mappings_dir) / "ehr", PACKAGE_MAPPINGS / "ehr")))


def ehr_profile_names(mappings_dir: Path) -> list[str]:
    return sorted({p.stem for d in _ehr_dirs(mappings_dir) for p in d.glob("*.toml")})


def load_ehr_profile(mappings_dir: Path, name: str) -> EhrProfile:
    """The EHR profile `name`; a ConfigError naming the known ones when there is none."""
    path = next((d / f"{name}.toml" for d in _ehr_dirs(mappings_dir) if (d / f"{name}.toml").is_file()), None)
    if path is None or "/" in name or name.startswith("."):
        raise ConfigError(f"no EHR profile {name!r} (known: auto, {', '.join(ehr_profile_names(mappings_dir))})",
                          key="hospital.ehr.profile")
    raw = _read(path)
    _no_unknown(raw, EHR_PROFILE_KEYS, path)
    values = _table(raw.get("capabilities", {}), path, "capabilities")
    for key in ("description", "source"):
        if not isinstance(raw.get(key, ""), str):
            raise ConfigError("must be text", file=str(path), key=key)
    return EhrProfile(name=name, description=raw.get("description", ""), source=raw.get("source", ""),
                      values=dict(values), file=path)


# --- CDS Hooks rules (mappings/cds/*.toml; docs/cds-hooks.md) ----------------------------------------

# CDS Hooks 2.0 card.indicator; "critical" is left out on purpose: a second opinion never blocks signing.
CDS_INDICATORS = ("info", "warning")
REQUEST_PRIORITIES = ("routine", "urgent", "asap", "stat")
CDS_RULE_KEYS = {"id", "profile", "summary", "detail", "indicator", "codes", "priorities", "lookback_months"}


@dataclass(frozen=True)
class CdsRule:
    id: str
    profile: str                          # the collection profile: which reviewers fit, and the order's profile
    summary: str                          # card.summary (CDS Hooks: fewer than 140 characters)
    detail: str                           # card.detail: why (GitHub-flavoured Markdown in the spec)
    indicator: str
    codes: frozenset[tuple[str, str]]     # (system, code) of the draft orders that trigger it
    priorities: tuple[str, ...]           # R4 request-priority values it fires at (never stat)
    lookback_months: int                  # a second opinion on the same question this recent: no card
    file: Path

    def matches(self, codings: list) -> bool:
        return any((c.get("system"), c.get("code")) in self.codes for c in codings if isinstance(c, dict))


def _cds_rule(item, defaults: dict, path: Path, key: str, profiles: set[str]) -> CdsRule:
    if not isinstance(item, dict):
        raise ConfigError("must be a table ([[rules]])", file=str(path), key=key)
    _no_unknown(item, CDS_RULE_KEYS, path, key + ".")
    for name in ("id", "profile", "summary", "detail"):
        if not isinstance(item.get(name), str) or not item[name].strip():
            raise ConfigError("is required (non-empty text)", file=str(path), key=f"{key}.{name}")
    if len(item["summary"]) >= 140:
        raise ConfigError("must be shorter than 140 characters (CDS Hooks card.summary)", file=str(path),
                          key=f"{key}.summary")
    if item["profile"] not in profiles:
        raise ConfigError(f"names profile {item['profile']!r}, which is not in collect/ "
                          f"(known: {', '.join(sorted(profiles))})", file=str(path), key=f"{key}.profile")
    indicator = item.get("indicator", "info")
    if indicator not in CDS_INDICATORS:
        raise ConfigError(f"{indicator!r} is not one of {', '.join(CDS_INDICATORS)}", file=str(path),
                          key=f"{key}.indicator")
    codes = _token_list(item.get("codes"), path, f"{key}.codes")
    if not codes:
        raise ConfigError("needs at least one code", file=str(path), key=f"{key}.codes")
    priorities = _str_list(item.get("priorities", defaults.get("priorities", ["routine", "urgent"])), path,
                           f"{key}.priorities")
    bad = [p for p in priorities if p not in REQUEST_PRIORITIES]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not an R4 request-priority ({', '.join(REQUEST_PRIORITIES)})",
                          file=str(path), key=f"{key}.priorities")
    if "stat" in priorities:
        # An emergency order must never wait for a prompt about a second opinion.
        raise ConfigError("must not include stat: emergency orders never get a second-opinion card",
                          file=str(path), key=f"{key}.priorities")
    months = item.get("lookback_months", defaults.get("lookback_months", 6))
    if not isinstance(months, int) or isinstance(months, bool) or months < 0:
        raise ConfigError("must be a whole number of months (0: no lookback)", file=str(path),
                          key=f"{key}.lookback_months")
    return CdsRule(id=item["id"].strip(), profile=item["profile"], summary=item["summary"].strip(),
                   detail=item["detail"].strip(), indicator=indicator, codes=frozenset(codes),
                   priorities=tuple(priorities), lookback_months=months, file=path)


def load_cds_rules(mappings_dir: Path) -> tuple[CdsRule, ...]:
    """Every rule of mappings/cds/*.toml, in file and then rule order (the first matching rule makes the card).
    A folder without rule files gives no rules; a bad file is a ConfigError naming the file and key."""
    folder = Path(mappings_dir) / "cds"
    profiles = set(profile_names(Path(mappings_dir)))
    rules: list[CdsRule] = []
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        raw = _read(path)
        _no_unknown(raw, {"defaults", "rules"}, path)
        defaults = raw.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ConfigError("must be a table", file=str(path), key="defaults")
        _no_unknown(defaults, {"priorities", "lookback_months"}, path, "defaults.")
        items = raw.get("rules", [])
        if not isinstance(items, list):
            raise ConfigError("must be an array of tables ([[rules]])", file=str(path), key="rules")
        for i, item in enumerate(items):
            rule = _cds_rule(item, defaults, path, f"rules[{i}]", profiles)
            if any(r.id == rule.id for r in rules):
                raise ConfigError(f"rule id {rule.id!r} is used twice (ids name the cards' rule in feedback)",
                                  file=str(path), key=f"rules[{i}].id")
            rules.append(rule)
    return tuple(rules)


# --- everything at once ----------------------------------------------------------------------------

def check_all(mappings_dir: Path) -> None:
    """Load every mapping file (order codes, each collection profile, each opinion form, each EHR profile), so a
    mistake in any of them is a ConfigError at start-up rather than half-way through a Case that happens to use it."""
    mappings_dir = Path(mappings_dir)
    load_order_codes(mappings_dir)
    names = profile_names(mappings_dir)
    if "default" not in names:
        raise ConfigError("no default.toml collection profile (used when an order names none)",
                          file=str(mappings_dir / "collect"))
    for name in names:
        load_profile(mappings_dir, name)
    for name in opinion_form_names(mappings_dir):
        # Not through the cache: a file edited since it was last loaded must be read again.
        load_opinion_form.__wrapped__(mappings_dir, name)
    for name in ehr_profile_names(mappings_dir):
        load_ehr_profile(mappings_dir, name)
    load_cds_rules(mappings_dir)
