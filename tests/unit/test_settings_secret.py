"""The development secret key is public: a provider with a public issuer refuses it."""

from __future__ import annotations

import pytest

from idp.config import Settings, SettingsError


def test_a_public_issuer_refuses_the_development_secret_key():
    with pytest.raises(SettingsError, match="IDP_SECRET_KEY"):
        Settings.from_env(environ={"IDP_ISSUER": "https://id.school.example"})
    with pytest.raises(SettingsError, match="IDP_SECRET_KEY"):
        Settings.from_env(environ={"IDP_ISSUER": "https://id.school.example", "IDP_SECRET_KEY": " "})


def test_a_set_key_or_a_loopback_issuer_is_accepted():
    assert Settings.from_env(environ={"IDP_ISSUER": "https://id.school.example",
                                      "IDP_SECRET_KEY": "x" * 48}).secret_key == "x" * 48
    assert Settings.from_env(environ={"IDP_ISSUER": "http://127.0.0.1:8000"}).issuer == "http://127.0.0.1:8000"
    assert Settings.from_env(environ={"IDP_ISSUER": "http://localhost:8000"}).issuer == "http://localhost:8000"
