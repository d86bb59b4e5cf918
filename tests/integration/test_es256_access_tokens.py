"""Access tokens signed with ES256 (IDP_ACCESS_TOKEN_SIGNING_ALG=ES256, issue 8: a tenth
of RS256's signing CPU), on a provider and database of their own: the EC key is published
in JWKS next to the RSA one, access tokens name it and verify with it, ID tokens stay
RS256, userinfo, introspection and refresh accept them, the key decides the algorithm
(no confusion between the two keys), and a rotation replaces both keys without breaking
live tokens."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from idp.accounts.service import create_user
from idp.cli import main
from idp.migrate import upgrade
from idp.oidc.clients import create_client
from tests.conftest import LiveServer, postgres_database
from tests.helpers import Browser, ClientInfo, UserInfo
from tests.integration.test_rfc9700 import get_tokens, refresh


@pytest.fixture(scope="module")
def es256(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    kind = os.environ.get("DARBAZA_TEST_DB", "sqlite")
    if kind == "sqlite":
        path: Path = tmp_path_factory.mktemp("es256") / "darbaza.sqlite3"
        url = f"sqlite:///{path}"
        upgrade(url)
        yield from _serve(url, redis_url)
    else:
        with postgres_database(kind, "darbaza_es256") as url:
            yield from _serve(url, redis_url)


def _serve(url: str, redis_url: str) -> Iterator[LiveServer]:
    live = LiveServer.serve(url, redis_url, access_token_signing_alg="ES256")
    with live.services.db.transaction() as session:
        live.services.keys.ensure_key(session)
    try:
        yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def apps(es256: LiveServer) -> dict[str, ClientInfo]:
    with es256.services.db.transaction() as session:
        web, web_secret = create_client(session, name="Web", redirect_uris=["https://rp.example.test/cb"],
                                        client_id="web-" + secrets.token_hex(4), trusted=True,
                                        grant_types=["authorization_code", "refresh_token"],
                                        scopes=["openid", "profile", "offline_access"])
        machine, machine_secret = create_client(session, name="Machine", redirect_uris=[],
                                                client_id="machine-" + secrets.token_hex(4),
                                                grant_types=["client_credentials"], scopes=["openid"])
        return {"web": ClientInfo(web.client_id, web_secret, "https://rp.example.test/cb", ""),
                "machine": ClientInfo(machine.client_id, machine_secret, "", "")}


@pytest.fixture
def person(es256: LiveServer) -> UserInfo:
    password = "correct horse battery " + secrets.token_hex(4)
    with es256.services.db.transaction() as session:
        user = create_user(session, es256.services.passwords, login=f"es-{secrets.token_hex(4)}",
                           display_name="E S", password=password, roles=["student"])
        return UserInfo(id=user.id, login=user.login, password=password, subject=user.subject)


def header(token: str) -> dict[str, Any]:
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def jwks(live: LiveServer) -> dict[str, Any]:
    return requests.get(live.url + "/jwks.json", timeout=10).json()


def machine_token(live: LiveServer, app: ClientInfo) -> str:
    answer = requests.post(live.url + "/token", data={"grant_type": "client_credentials"},
                           auth=(app.client_id, app.client_secret), timeout=10)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def introspect(live: LiveServer, app: ClientInfo, token: str) -> dict[str, Any]:
    answer = requests.post(live.url + "/introspect", data={"token": token},
                           auth=(app.client_id, app.client_secret), timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def userinfo_status(live: LiveServer, token: str) -> int:
    return requests.get(live.url + "/userinfo", headers={"Authorization": "Bearer " + token}, timeout=10).status_code


def signed_in(live: LiveServer, person: UserInfo) -> Browser:
    browser = Browser(live.url)
    answer = browser.sign_in(person.login, person.password)
    assert answer.status_code == 303, answer.text[:300]
    return browser


def test_access_tokens_are_es256_and_id_tokens_stay_rs256(es256, apps, person):
    keys = {k["kid"]: k for k in jwks(es256)["keys"]}
    by_alg = {k["alg"]: k for k in keys.values()}
    assert set(by_alg) == {"RS256", "ES256"}
    assert by_alg["ES256"]["kty"] == "EC" and by_alg["ES256"]["crv"] == "P-256" and by_alg["ES256"]["use"] == "sig"
    assert "d" not in by_alg["ES256"] and "d" not in by_alg["RS256"]  # public halves only

    token = machine_token(es256, apps["machine"])
    assert header(token) == {"alg": "ES256", "kid": by_alg["ES256"]["kid"], "typ": "at+jwt"}
    claims = jwt.decode(token, KeySet.import_key_set(jwks(es256)), algorithms=["ES256"]).claims
    assert claims["client_id"] == apps["machine"].client_id and claims["iss"] == es256.url
    assert introspect(es256, apps["machine"], token)["active"] is True

    tokens = get_tokens(es256, signed_in(es256, person), apps["web"], person, scope="openid profile offline_access")
    assert header(tokens["access_token"])["alg"] == "ES256"
    assert header(tokens["id_token"])["alg"] == "RS256"
    assert header(tokens["id_token"])["kid"] == by_alg["RS256"]["kid"]
    jwt.decode(tokens["id_token"], KeySet.import_key_set(jwks(es256)), algorithms=["RS256"])
    info = requests.get(es256.url + "/userinfo", headers={"Authorization": "Bearer " + tokens["access_token"]},
                        timeout=10)
    assert info.status_code == 200 and info.json()["sub"] == person.subject
    renewed = refresh(es256, apps["web"], tokens["refresh_token"])
    assert renewed.status_code == 200, renewed.text
    assert header(renewed.json()["access_token"])["alg"] == "ES256"
    assert userinfo_status(es256, renewed.json()["access_token"]) == 200


def _forge(token: str, header_fields: dict[str, Any], key: Any, alg: str) -> str:
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=" * (-len(token.split(".")[1]) % 4)))
    fields = {k: v for k, v in {**header(token), **header_fields, "alg": alg}.items() if v is not None}
    return jwt.encode(fields, claims, key, algorithms=[alg])


def test_the_key_decides_the_algorithm(es256, apps, person):
    tokens = get_tokens(es256, signed_in(es256, person), apps["web"], person, scope="openid profile")
    good = tokens["access_token"]
    assert userinfo_status(es256, good) == 200
    keys = {k["alg"]: k for k in jwks(es256)["keys"]}
    forged = {
        # an RS256 header naming the EC key, signed by a stranger's RSA key
        "rs256-on-ec-kid": _forge(good, {"kid": keys["ES256"]["kid"]}, RSAKey.generate_key(2048), "RS256"),
        # an ES256 header naming the RSA key, signed by a stranger's EC key
        "es256-on-rsa-kid": _forge(good, {"kid": keys["RS256"]["kid"]}, ECKey.generate_key("P-256"), "ES256"),
        # a stranger's EC key under the real EC kid
        "es256-stranger": _forge(good, {}, ECKey.generate_key("P-256"), "ES256"),
        # HMAC with the EC public key's coordinates as the secret
        "hs256": _forge(good, {}, OctKey.import_key(keys["ES256"]["x"].encode()), "HS256"),
        # ES256 with the kid removed
        "no-kid": _forge(good, {"kid": None}, ECKey.generate_key("P-256"), "ES256"),
    }
    for name, token in forged.items():
        assert userinfo_status(es256, token) == 401, name
        assert introspect(es256, apps["web"], token) == {"active": False}, name
    # The ID token (RS256, typ JWT) is no access token either.
    assert userinfo_status(es256, tokens["id_token"]) == 401


def test_a_rotation_replaces_both_keys_and_live_tokens_keep_working(es256, apps, person):
    settings = es256.services.settings
    before = machine_token(es256, apps["machine"])
    old_kids = {k["kid"] for k in jwks(es256)["keys"]}
    env = {"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url,
           "IDP_SECRET_KEY": settings.secret_key, "IDP_ISSUER": settings.issuer,
           "IDP_ACCESS_TOKEN_SIGNING_ALG": "es256"}
    done = CliRunner().invoke(main, ["keys", "rotate"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    lines = done.output.strip().splitlines()
    assert lines[0].startswith("new ES256 signing key ") and lines[-1].startswith("new signing key ")
    new_ec, new_rsa = lines[0].rsplit(" ", 1)[-1], lines[-1].rsplit(" ", 1)[-1]
    assert not {new_ec, new_rsa} & old_kids
    # The CLI process announced nothing to this one: the key cache (1 s in tests) or the
    # unknown kid of a new token brings the new keys.
    published = {k["kid"] for k in jwks(es256)["keys"]}
    deadline = time.monotonic() + 30  # the key cache is 1 s; the rest is for a loaded machine
    while time.monotonic() < deadline:
        if {new_ec, new_rsa} <= published:
            break
        time.sleep(0.1)
        published = {k["kid"] for k in jwks(es256)["keys"]}
    assert {new_ec, new_rsa} | old_kids <= published
    time.sleep(1.1)  # past the key cache time: every new token is signed with the new keys
    after = machine_token(es256, apps["machine"])
    assert header(after)["kid"] == new_ec and header(after)["alg"] == "ES256"
    assert introspect(es256, apps["machine"], before)["active"] is True  # signed with the old EC key
    assert introspect(es256, apps["machine"], after)["active"] is True
    tokens = get_tokens(es256, signed_in(es256, person), apps["web"], person, scope="openid profile")
    assert header(tokens["id_token"])["kid"] == new_rsa


def test_the_setting_takes_only_the_two_algorithms():
    from idp.config import Settings, SettingsError

    assert Settings.from_env(environ={"IDP_ACCESS_TOKEN_SIGNING_ALG": "es256"}).access_token_signing_alg == "ES256"
    for bad in ("HS256", "none", "PS256", ""):
        with pytest.raises(SettingsError, match="IDP_ACCESS_TOKEN_SIGNING_ALG"):
            Settings.from_env(environ={"IDP_ACCESS_TOKEN_SIGNING_ALG": bad})
