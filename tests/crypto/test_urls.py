"""crypto.urls: the one rule for where credentials and records may go (issue 13, S11)."""
from __future__ import annotations

import pytest

from fhirbridge.crypto.urls import https_or_loopback, is_https_or_loopback
from fhirbridge.errors import ConfigError


@pytest.mark.parametrize("url", ["https://ehr.example/fhir", "https://10.0.0.5:8443/fhir", "http://127.0.0.1:8090/fhir",
                                 "http://localhost/fhir", "http://[::1]:8090/fhir"])
def test_https_or_plain_http_to_this_machine_is_allowed(url):
    assert is_https_or_loopback(url) and https_or_loopback(url, "hospital.fhir_base_url") == url


@pytest.mark.parametrize("url", ["http://ehr.example/fhir", "http://demo-ehr:8090/fhir", "http://10.0.0.5/fhir",
                                 "http://127.0.0.1.evil.example/fhir", "http://127.0.0.1@evil.example/fhir",
                                 "http://localhost@evil.example/", "ftp://127.0.0.1/", "https:///fhir",
                                 "http://[::1/fhir", "127.0.0.1:8090/fhir", ""])
def test_anything_else_is_refused_naming_the_setting(url):
    assert not is_https_or_loopback(url)
    with pytest.raises(ConfigError) as err:
        https_or_loopback(url, "hospital.auth.token_url", file="/etc/fhirbridge/fhirbridge.toml")
    assert err.value.key == "hospital.auth.token_url" and err.value.file == "/etc/fhirbridge/fhirbridge.toml"
    assert "https://" in str(err.value)
    assert not url or url not in str(err.value)      # never echoed: a URL can carry credentials
