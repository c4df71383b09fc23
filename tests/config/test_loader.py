"""fhirbridge.config.loader.load: values, path resolution, every error naming file + dotted key, env overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.starter import write_starter
from fhirbridge.errors import ConfigError

SPINE = {"name": "spine-center", "display": "Spine Center", "jwks": "keys/spine.public.jwks.json",
         "profiles": ["spine", "default"], "system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2",
         "outbox": "outbox/spine"}
ONCO = {"name": "onco", "display": "Oncology Board", "jwks": "/etc/fhirbridge/onco.public.jwks.json",
        "profiles": ["oncology"], "system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.3",
        "outbox": "outbox/onco"}


def make(tmp_path: Path, reviewers=(SPINE, ONCO), **kw) -> Path:
    return write_starter(tmp_path / "site", reviewers=[dict(r) for r in reviewers], **kw)["config"]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in the starter config"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def load(path: Path, env: dict | None = None) -> config.Config:
    return config.load(path, environ=env or {})


def config_error(path: Path, env: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, env)
    return info.value


def assert_names(err: ConfigError, path: Path, key: str | None) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    assert err.file == str(path)
    if key is not None:
        assert err.key == key, msg
        assert f": {key}: " in msg, msg


# --- a valid configuration -------------------------------------------------------------------------

def test_starter_config_loads_with_expected_values(tmp_path):
    path = make(tmp_path, fhir_base_url="https://ehr.example.org/fhir/", hospital_name="St. Elsewhere",
                identifier_value="urn:oid:2.999.7")
    cfg = load(path)
    site = (tmp_path / "site").resolve()
    assert cfg.file == path
    assert cfg.base_dir == site
    h = cfg.hospital
    assert h.name == "St. Elsewhere"
    assert h.fhir_base_url == "https://ehr.example.org/fhir"  # trailing slash stripped
    assert (h.identifier_system, h.identifier_value) == ("urn:ietf:rfc:3986", "urn:oid:2.999.7")
    assert h.auth.type == "none" and h.auth.token is None and h.auth.password is None
    assert (h.http.timeout_connect, h.http.timeout_read, h.http.retries, h.http.max_retry_after,
            h.http.page_size) == (5.0, 30.0, 4, 30.0, 100)
    assert isinstance(h.http.retries, int) and isinstance(h.http.timeout_connect, float)
    assert list(cfg.reviewers) == ["spine-center", "onco"]
    spine = cfg.reviewers["spine-center"]
    assert spine.display == "Spine Center"
    assert spine.profiles == ("spine", "default")
    assert (spine.identifier_system, spine.identifier_value) == ("urn:ietf:rfc:3986", "urn:oid:2.999.1.2")
    assert spine.transport.type == "outbox"
    assert cfg.default_reviewer == "spine-center"  # the starter routes to the first reviewer
    assert cfg.reviewer("onco") is cfg.reviewers["onco"]
    assert cfg.reviewer_by_identifier("urn:ietf:rfc:3986", "urn:oid:2.999.1.3").name == "onco"
    assert cfg.reviewer_by_identifier(None, "urn:oid:2.999.1.2").name == "spine-center"
    assert cfg.reviewer_by_identifier("urn:other", "urn:oid:2.999.1.2") is None
    assert (cfg.inline_attachment_limit, cfg.max_attachment_bytes, cfg.package_lifetime_days) == (
        262144, 536870912, 30)
    assert cfg.mappings_dir == config.PACKAGE_MAPPINGS


def test_relative_paths_resolve_against_the_config_directory_not_the_cwd(tmp_path, monkeypatch):
    path = make(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(path)
    site = (tmp_path / "site").resolve()
    assert cfg.data_dir == site / "var"
    assert cfg.inbox == site / "var" / "inbox"
    assert cfg.hospital.keys == site / "keys" / "hospital.private.jwks.json"
    assert cfg.reviewers["spine-center"].jwks == site / "keys" / "spine.public.jwks.json"
    assert cfg.reviewers["spine-center"].transport.path == site / "outbox" / "spine"
    # absolute paths are kept as they are
    assert cfg.reviewers["onco"].jwks == Path("/etc/fhirbridge/onco.public.jwks.json")
    # the same file given by a relative path from another cwd resolves the same way
    monkeypatch.chdir(tmp_path)
    assert load(Path("site/fhirbridge.toml")).data_dir == site / "var"


def test_default_store_url_is_sqlite_in_data_dir(tmp_path):
    path = make(tmp_path)
    edit(path, 'data_dir = "var"', 'data_dir = "state"')
    cfg = load(path)
    site = (tmp_path / "site").resolve()
    assert cfg.data_dir == site / "state"
    assert cfg.store_url == f"sqlite:///{site / 'state' / 'fhirbridge.db'}"


def test_explicit_store_url_and_mappings_dir(tmp_path):
    path = make(tmp_path)
    mdir = tmp_path / "site" / "mymappings" / "collect"
    mdir.mkdir(parents=True)
    edit(path, 'data_dir = "var"', 'data_dir = "var"\nstore_url = "postgresql+psycopg://fb@db/fb"\n'
                                   'mappings_dir = "mymappings"')
    cfg = load(path)
    assert cfg.store_url == "postgresql+psycopg://fb@db/fb"
    assert cfg.mappings_dir == (tmp_path / "site" / "mymappings").resolve()


def test_transport_https_loads(tmp_path):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'type = "outbox"', 'type = "https"\nurl = "https://opinions.example/in"\n#')
    edit(path, 'path = "outbox/spine"', "")
    t = load(path).reviewers["spine-center"].transport
    assert (t.type, t.url, t.path) == ("https", "https://opinions.example/in", None)


# --- every error names the file and the dotted key -------------------------------------------------

def test_missing_fhir_base_url(tmp_path):
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"', "")
    err = config_error(path)
    assert_names(err, path, "hospital.fhir_base_url")
    assert "required" in str(err)


def test_empty_fhir_base_url(tmp_path):
    path = make(tmp_path, fhir_base_url="  ")
    assert_names(config_error(path), path, "hospital.fhir_base_url")


@pytest.mark.parametrize("url", ["ftp://ehr.example/fhir", "ehr.example/fhir", "file:///etc/passwd"])
def test_non_http_fhir_base_url(tmp_path, url):
    path = make(tmp_path, fhir_base_url=url)
    err = config_error(path)
    assert_names(err, path, "hospital.fhir_base_url")
    assert "http" in err.detail


@pytest.mark.parametrize("url", ["http://ehr.hospital.example/fhir", "http://demo-ehr:8090/fhir",
                                 "http://127.0.0.1.evil.example/fhir", "http://127.0.0.1@evil.example/fhir"])
def test_a_plain_http_ehr_on_another_host_is_refused(tmp_path, url):
    """Issue 13, S11: every record comes from the EHR and the credentials go to it: https, or plain http to
    this machine only."""
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"', f'fhir_base_url = "{url}"')
    err = config_error(path)
    assert_names(err, path, "hospital.fhir_base_url")
    assert "https://" in err.detail and "127.0.0.1, localhost or ::1" in err.detail


def test_allow_plain_http_lets_a_demo_ehr_on_a_container_network_in(tmp_path):
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"',
         'fhir_base_url = "http://demo-ehr:8090/fhir"\nallow_plain_http = true')
    assert load(path).hospital.fhir_base_url == "http://demo-ehr:8090/fhir"


@pytest.mark.parametrize("url", ["https://ehr.example/fhir", "http://127.0.0.1:8090/fhir", "http://localhost/fhir",
                                 "http://[::1]:8090/fhir"])
def test_an_https_or_loopback_ehr_is_accepted(tmp_path, url):
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"', f'fhir_base_url = "{url}"')
    assert load(path).hospital.fhir_base_url == url


def test_a_plain_http_token_url_on_another_host_is_refused(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "smart"\nclient_id = "fb"\ntoken_url = "http://ehr.hospital.example/token"')
    err = config_error(path)
    assert_names(err, path, "hospital.auth.token_url")
    assert "https://" in err.detail


def test_unknown_top_level_key(tmp_path):
    path = make(tmp_path)
    path.write_text("fhir_base_url = \"http://x\"\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    err = config_error(path)
    assert_names(err, path, "fhir_base_url")
    assert "unknown key" in err.detail


def test_unknown_top_level_section(tmp_path):
    path = make(tmp_path)
    path.write_text(path.read_text(encoding="utf-8") + "\n[hopsital]\nname = \"x\"\n", encoding="utf-8")
    assert_names(config_error(path), path, "hopsital")


def test_typo_next_to_the_real_key_is_an_unknown_key(tmp_path):
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"',
         'fhir_base_url = "http://127.0.0.1:8090/fhir"\nfhir_base_ur1 = "http://elsewhere.example/fhir"')
    err = config_error(path)
    assert_names(err, path, "hospital.fhir_base_ur1")
    assert "unknown key" in err.detail


def test_typo_instead_of_the_real_key_is_reported(tmp_path):
    path = make(tmp_path)
    edit(path, 'fhir_base_url = "http://127.0.0.1:8090/fhir"', 'fhir_base_ur1 = "http://127.0.0.1:8090/fhir"')
    err = config_error(path)
    # the missing key is reported first; either way the file and a hospital.* key are named
    assert err.key in ("hospital.fhir_base_url", "hospital.fhir_base_ur1")
    assert_names(err, path, err.key)


@pytest.mark.parametrize("section_line, extra, key", [
    ("[hospital.auth]", "tokn = \"x\"", "hospital.auth.tokn"),
    ("[hospital.http]", "retry = 3", "hospital.http.retry"),
    ("[hospital.identifier]", "sytem = \"x\"", "hospital.identifier.sytem"),
    ("[fhirbridge]", "data_dri = \"x\"", "fhirbridge.data_dri"),
    ("[routing]", "default = \"x\"", "routing.default"),
    ("[reviewers.transport]", "pth = \"x\"", "reviewers[0].transport.pth"),
    ("[reviewers.identifier]", "val = \"x\"", "reviewers[0].identifier.val"),
])
def test_unknown_nested_keys(tmp_path, section_line, extra, key):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, section_line, f"{section_line}\n{extra}")
    err = config_error(path)
    assert_names(err, path, key)
    assert "unknown key" in err.detail


def test_unknown_key_in_reviewer_entry(tmp_path):
    path = make(tmp_path, reviewers=[SPINE, ONCO])
    edit(path, 'name = "onco"', 'name = "onco"\nprofile = ["oncology"]')
    assert_names(config_error(path), path, "reviewers[1].profile")


@pytest.mark.parametrize("old, new, key, want", [
    ("retries = 4", 'retries = "x"', "hospital.http.retries", "int"),
    ("retries = 4", "retries = true", "hospital.http.retries", "int"),
    ("retries = 4", "retries = 4.5", "hospital.http.retries", "int"),
    ("timeout_read = 30.0", 'timeout_read = "slow"', "hospital.http.timeout_read", "float"),
    ('name = "General Hospital"', "name = 7", "hospital.name", "str"),
    ("package_lifetime_days = 30", "package_lifetime_days = 0", "fhirbridge.package_lifetime_days", "greater than 0"),
    ("page_size = 100", "page_size = -5", "hospital.http.page_size", "greater than 0"),
    ('data_dir = "var"', 'data_dir = "var"\nstore_url = "mysql://x"', "fhirbridge.store_url", "sqlite"),
    ('data_dir = "var"', 'data_dir = "var"\nmappings_dir = "nowhere"', "fhirbridge.mappings_dir", "collect"),
    ('profiles = ["spine", "default"]', "profiles = [1, 2]", "reviewers[0].profiles", "profile"),
])
def test_wrong_types_and_values(tmp_path, old, new, key, want):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, old, new)
    err = config_error(path)
    assert_names(err, path, key)
    assert want in err.detail


def test_int_is_accepted_for_float_keys(tmp_path):
    path = make(tmp_path)
    edit(path, "timeout_read = 30.0", "timeout_read = 12")
    value = load(path).hospital.http.timeout_read
    assert value == 12.0 and isinstance(value, float)


def test_unknown_auth_type(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "kerberos"')
    err = config_error(path)
    assert_names(err, path, "hospital.auth.type")
    assert "kerberos" in err.detail and "bearer" in err.detail


def test_basic_auth_without_password(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "basic"\nusername = "fhirbridge"')
    err = config_error(path)
    assert_names(err, path, "hospital.auth.password")
    assert "FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD" in err.detail


def test_basic_auth_with_password_loads(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "basic"\nusername = "fhirbridge"\npassword = "pw-in-file"')
    auth = load(path).hospital.auth
    assert (auth.type, auth.username, auth.password) == ("basic", "fhirbridge", "pw-in-file")


def test_bearer_without_token(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "bearer"')
    err = config_error(path)
    assert_names(err, path, "hospital.auth.token")
    assert "FHIRBRIDGE_HOSPITAL__AUTH__TOKEN" in err.detail


def test_duplicate_reviewer_names(tmp_path):
    path = make(tmp_path, reviewers=[SPINE, dict(SPINE, value="urn:oid:2.999.1.9")])
    err = config_error(path)
    assert_names(err, path, "reviewers[1].name")
    assert "spine-center" in err.detail and "twice" in err.detail


def test_default_reviewer_must_be_configured(tmp_path):
    path = make(tmp_path)
    edit(path, 'default_reviewer = "spine-center"', 'default_reviewer = "cardio"')
    err = config_error(path)
    assert_names(err, path, "routing.default_reviewer")
    assert "cardio" in err.detail


def test_reviewer_lookup_by_unknown_name_is_a_config_error(tmp_path):
    cfg = load(make(tmp_path))
    with pytest.raises(ConfigError) as info:
        cfg.reviewer("cardio")
    assert "cardio" in str(info.value) and "spine-center" in str(info.value)


def test_reviewer_missing_required_keys(tmp_path):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'jwks = "keys/spine.public.jwks.json"', "")
    assert_names(config_error(path), path, "reviewers[0].jwks")


@pytest.mark.parametrize("url", ["http://opinions.example/in", "ftp://opinions.example/in"])
def test_https_transport_needs_an_https_url(tmp_path, url):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'type = "outbox"', f'type = "https"\nurl = "{url}"\n#')
    edit(path, 'path = "outbox/spine"', "")
    err = config_error(path)
    assert_names(err, path, "reviewers[0].transport.url")
    assert "https://" in err.detail


def test_https_transport_allows_plain_http_to_loopback_for_tests(tmp_path):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'type = "outbox"', 'type = "https"\nurl = "http://127.0.0.1:9000/in"\n#')
    edit(path, 'path = "outbox/spine"', "")
    assert load(path).reviewers["spine-center"].transport.url == "http://127.0.0.1:9000/in"


@pytest.mark.parametrize("url", ["http://127.0.0.1.evil.example/in", "http://127.0.0.1@evil.example/in"])
def test_https_transport_loopback_exception_is_only_loopback(tmp_path, url):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'type = "outbox"', f'type = "https"\nurl = "{url}"\n#')
    edit(path, 'path = "outbox/spine"', "")
    assert_names(config_error(path), path, "reviewers[0].transport.url")


def test_unknown_transport_type(tmp_path):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'type = "outbox"', 'type = "carrier-pigeon"')
    assert_names(config_error(path), path, "reviewers[0].transport.type")


def test_invalid_toml(tmp_path):
    path = make(tmp_path)
    edit(path, "[routing]", "[routing\n")
    err = config_error(path)
    assert_names(err, path, None)
    assert err.key is None
    assert "not valid TOML" in err.detail


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = make(tmp_path, hospital_name="Universitätsklinikum")
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    assert_names(config_error(path), path, None)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "fhirbridge.toml"
    err = config_error(path)
    assert_names(err, path, None)
    assert "not found" in err.detail and "fhirbridge init" in err.detail


def test_config_file_found_from_env_then_cwd(tmp_path, monkeypatch):
    path = make(tmp_path)
    monkeypatch.setenv("FHIRBRIDGE_CONFIG", str(path))
    assert config.find_config_file() == path
    assert config.find_config_file("explicit.toml") == Path("explicit.toml")
    monkeypatch.delenv("FHIRBRIDGE_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert config.find_config_file() == tmp_path / "fhirbridge.toml"


def test_config_error_is_exit_code_2(tmp_path):
    assert config_error(tmp_path / "x.toml").exit_code == 2


# --- environment overrides -------------------------------------------------------------------------

def test_env_overrides_fhir_base_url(tmp_path):
    path = make(tmp_path)
    cfg = load(path, {"FHIRBRIDGE_HOSPITAL__FHIR_BASE_URL": "https://ehr.prod.example/fhir/"})
    assert cfg.hospital.fhir_base_url == "https://ehr.prod.example/fhir"


def test_env_names_are_case_insensitive(tmp_path):
    cfg = load(make(tmp_path), {"fhirbridge_hospital__fhir_base_url": "https://lower.example/fhir"})
    assert cfg.hospital.fhir_base_url == "https://lower.example/fhir"


def test_env_override_is_validated_like_the_file(tmp_path):
    path = make(tmp_path)
    err = config_error(path, {"FHIRBRIDGE_HOSPITAL__FHIR_BASE_URL": "gopher://x"})
    assert_names(err, path, "hospital.fhir_base_url")


def test_env_supplies_bearer_token(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "bearer"')
    cfg = load(path, {"FHIRBRIDGE_HOSPITAL__AUTH__TOKEN": "s3cr3t-t0ken-abc"})
    assert cfg.hospital.auth.type == "bearer"
    assert cfg.hospital.auth.token == "s3cr3t-t0ken-abc"


def test_env_can_set_auth_type_and_token_together(tmp_path):
    cfg = load(make(tmp_path), {"FHIRBRIDGE_HOSPITAL__AUTH__TYPE": "bearer",
                                "FHIRBRIDGE_HOSPITAL__AUTH__TOKEN": "tok-xyz"})
    assert (cfg.hospital.auth.type, cfg.hospital.auth.token) == ("bearer", "tok-xyz")


def test_env_numeric_coercion(tmp_path):
    cfg = load(make(tmp_path), {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "7",
                                "FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": "2.5",
                                "FHIRBRIDGE_FHIRBRIDGE__PACKAGE_LIFETIME_DAYS": "14"})
    assert cfg.hospital.http.retries == 7 and type(cfg.hospital.http.retries) is int
    assert cfg.hospital.http.timeout_read == 2.5
    assert cfg.package_lifetime_days == 14


def test_env_non_numeric_for_int_key_names_the_key(tmp_path):
    path = make(tmp_path)
    err = config_error(path, {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "many"})
    assert_names(err, path, "hospital.http.retries")


@pytest.mark.parametrize("env, attr", [
    ({"FHIRBRIDGE_HOSPITAL__AUTH__TYPE": "basic", "FHIRBRIDGE_HOSPITAL__AUTH__USERNAME": "fb",
      "FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD": "0012345678"}, ("auth", "password")),
    ({"FHIRBRIDGE_HOSPITAL__AUTH__TYPE": "bearer", "FHIRBRIDGE_HOSPITAL__AUTH__TOKEN": "1234567890"},
     ("auth", "token")),
    ({"FHIRBRIDGE_HOSPITAL__IDENTIFIER__VALUE": "0012345678"}, ("identifier_value",)),
])
def test_env_numeric_looking_string_values_stay_strings(tmp_path, env, attr):
    cfg = load(make(tmp_path), env)
    obj = cfg.hospital
    for a in attr:
        obj = getattr(obj, a)
    assert obj == list(env.values())[-1]


def test_env_reviewer_addressed_by_name(tmp_path):
    path = make(tmp_path)
    cfg = load(path, {"FHIRBRIDGE_REVIEWERS__SPINE_CENTER__TRANSPORT__PATH": "/srv/outbox/spine",
                      "FHIRBRIDGE_REVIEWERS__ONCO__DISPLAY": "Tumour Board"})
    assert cfg.reviewers["spine-center"].transport.path == Path("/srv/outbox/spine")
    assert cfg.reviewers["onco"].display == "Tumour Board"
    assert cfg.reviewers["onco"].transport.path == (tmp_path / "site" / "outbox" / "onco").resolve()


def test_env_reviewer_switched_to_https(tmp_path):
    path = make(tmp_path, reviewers=[SPINE])
    edit(path, 'path = "outbox/spine"', "")
    cfg = load(path, {"FHIRBRIDGE_REVIEWERS__SPINE_CENTER__TRANSPORT__TYPE": "https",
                      "FHIRBRIDGE_REVIEWERS__SPINE_CENTER__TRANSPORT__URL": "https://spine.example/in",
                      "FHIRBRIDGE_REVIEWERS__SPINE_CENTER__TRANSPORT__TOKEN": "rev-token"})
    t = cfg.reviewers["spine-center"].transport
    assert (t.type, t.url, t.token) == ("https", "https://spine.example/in", "rev-token")
    assert "rev-token" not in repr(t) and "rev-token" not in repr(cfg)


def test_env_unknown_reviewer_name(tmp_path):
    path = make(tmp_path)
    err = config_error(path, {"FHIRBRIDGE_REVIEWERS__CARDIO__TRANSPORT__PATH": "/x"})
    assert_names(err, path, "reviewers")
    assert "FHIRBRIDGE_REVIEWERS__CARDIO__TRANSPORT__PATH" in err.detail
    assert "cardio" in err.detail


def test_env_unknown_key_is_an_error(tmp_path):
    path = make(tmp_path)
    err = config_error(path, {"FHIRBRIDGE_HOSPITAL__FHIR_BASE_UR1": "https://x.example"})
    assert_names(err, path, "hospital.fhir_base_ur1")


def test_unrelated_env_vars_are_ignored(tmp_path):
    cfg = load(make(tmp_path), {"FHIRBRIDGE_CONFIG": "/elsewhere.toml", "PATH": "/bin",
                                "OTHER_HOSPITAL__FHIR_BASE_URL": "https://x.example"})
    assert cfg.hospital.fhir_base_url == "http://127.0.0.1:8090/fhir"


def test_load_uses_os_environ_by_default(tmp_path, monkeypatch):
    path = make(tmp_path)
    monkeypatch.setenv("FHIRBRIDGE_HOSPITAL__HTTP__PAGE_SIZE", "25")
    assert config.load(path).hospital.http.page_size == 25
    assert config.load(path, environ={}).hospital.http.page_size == 100


# --- secrets stay out of reprs ---------------------------------------------------------------------

def test_auth_repr_hides_token_and_password(tmp_path):
    path = make(tmp_path)
    edit(path, 'type = "none"', 'type = "bearer"')
    cfg = load(path, {"FHIRBRIDGE_HOSPITAL__AUTH__TOKEN": "tok-SECRET-4711"})
    assert cfg.hospital.auth.token == "tok-SECRET-4711"
    for text in (repr(cfg.hospital.auth), str(cfg.hospital.auth), repr(cfg.hospital), repr(cfg)):
        assert "tok-SECRET-4711" not in text
    assert "bearer" in repr(cfg.hospital.auth)

    basic = make(tmp_path / "b")
    edit(basic, 'type = "none"', 'type = "basic"\nusername = "fb"')
    cfg = load(basic, {"FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD": "pw-SECRET-0815"})
    assert cfg.hospital.auth.password == "pw-SECRET-0815"
    assert "pw-SECRET-0815" not in repr(cfg.hospital.auth)
    assert "pw-SECRET-0815" not in repr(cfg)


def test_errors_do_not_echo_secret_values(tmp_path):
    path = make(tmp_path)
    err = config_error(path, {"FHIRBRIDGE_HOSPITAL__AUTH__TYPE": "basic",
                              "FHIRBRIDGE_HOSPITAL__AUTH__TOKEN": "tok-SECRET-1"})
    assert "tok-SECRET-1" not in str(err)


def test_service_lease_seconds(tmp_path):
    """[service] lease_seconds sets how long a claimed step is held; 0 or less is refused, env overrides."""
    path = make(tmp_path)
    path.write_text(path.read_text() + "\n[service]\nlease_seconds = 12.5\n")
    assert config.load(path, environ={}).service.lease_seconds == 12.5
    assert config.load(path, environ={"FHIRBRIDGE_SERVICE__LEASE_SECONDS": "3"}).service.lease_seconds == 3.0
    path.write_text(path.read_text().replace("lease_seconds = 12.5", "lease_seconds = 0"))
    assert_names(config_error(path), path, "service.lease_seconds")


def test_hospitals_must_not_share_an_ehr_or_an_env_name(tmp_path):
    (tmp_path / "collect").mkdir()
    hospital = """
[[hospitals]]
name = "{name}"
keys = "k.json"
fhir_base_url = "{url}"
[hospitals.identifier]
system = "urn:ietf:rfc:3986"
value = "{value}"
"""
    path = tmp_path / "fhirbridge.toml"

    def write(second_name: str, second_url: str) -> ConfigError:
        path.write_text(hospital.format(name="General Hospital", url="http://127.0.0.1:8090/fhir", value="urn:oid:1")
                        + hospital.format(name=second_name, url=second_url, value="urn:oid:2"))
        return config_error(path)

    err = write("Second Hospital", "http://127.0.0.1:8090/fhir")
    assert "share one EHR" in err.detail and err.key == "hospitals[1].fhir_base_url"
    err = write("General-Hospital", "http://127.0.0.1:8091/fhir")
    assert "become 'general_hospital'" in err.detail and err.key == "hospitals[1].name"


def test_reviewer_api_tokens_must_be_long_and_distinct(tmp_path):
    path = make(tmp_path)
    text = path.read_text()
    path.write_text(text.replace('profiles = ["spine"', 'api_token = "short"\nprofiles = ["spine"', 1))
    assert "at least 16" in config_error(path).detail
    token = "x" * 20
    text2 = text.replace('profiles = [', f'api_token = "{token}"\nprofiles = [')
    path.write_text(text2)
    assert "same as another reviewer" in config_error(path).detail
