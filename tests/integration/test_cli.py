"""The `darbaza` command line, run the way an operator runs it (click's runner with the
same IDP_* environment), checked through the provider's HTTP endpoints."""

from __future__ import annotations

import json
import time

import requests
from click.testing import CliRunner

from idp.cli import main
from tests.helpers import Browser


def run(server, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    settings = server.services.settings
    env = {
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
        "IDP_ARGON2_MEMORY_COST": str(settings.argon2_memory_cost),
        "IDP_ARGON2_TIME_COST": str(settings.argon2_time_cost),
    }
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def test_db_upgrade_is_idempotent(server):
    first = run(server, "db", "upgrade")
    second = run(server, "db", "upgrade")
    assert first.exit_code == 0 and second.exit_code == 0
    assert "up to date" in second.output


def test_users_create_then_sign_in(server, browser):
    result = run(server, "users", "create", "Bolot.Student", "--name", "Болот Ибраев", "--role", "student",
                 "--password-stdin", input="a long passphrase for bolot\n")
    assert result.exit_code == 0, result.output
    assert "created bolot.student" in result.output
    response = browser.sign_in("BOLOT.student", "a long passphrase for bolot")
    assert response.status_code == 303
    assert "Болот Ибраев" in browser.get("/").text


def test_users_create_rejects_bad_input_clearly(server):
    run(server, "users", "create", "dup.user", "--name", "X", "--role", "student")
    dup = run(server, "users", "create", "dup.user", "--name", "Y", "--role", "student")
    assert dup.exit_code != 0 and "already taken" in dup.output
    bad_role = run(server, "users", "create", "someone", "--name", "Z", "--role", "wizard")
    assert bad_role.exit_code != 0 and "unknown role" in bad_role.output
    bad_login = run(server, "users", "create", "no spaces", "--name", "Z", "--role", "student")
    assert bad_login.exit_code != 0 and "login must be" in bad_login.output


def test_users_create_generates_password_when_none_given(server, browser):
    result = run(server, "users", "create", "gen.pass", "--name", "Generated", "--role", "student")
    assert result.exit_code == 0
    password = result.output.split("password: ")[1].strip()
    assert len(password) >= 15
    assert browser.sign_in("gen.pass", password).status_code == 303


def test_clients_create_and_client_credentials(server):
    result = run(server, "clients", "create", "Timetable sync", "--grant", "client_credentials", "--scope", "roles")
    assert result.exit_code == 0, result.output
    creds = json.loads(result.output)
    token = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                          auth=(creds["client_id"], creds["client_secret"]), timeout=10)
    assert token.status_code == 200
    assert token.json()["scope"] == "roles"


def test_clients_create_refuses_plain_http_redirect(server):
    result = run(server, "clients", "create", "Bad app", "--redirect-uri", "http://app.example.test/cb")
    assert result.exit_code != 0
    assert "https" in result.output


def test_keys_rotate_keeps_old_key_published(server, browser, make_user, make_client):
    user = make_user()
    client = make_client()
    params, verifier, _ = browser.authorize(client, user)
    tokens = requests.post(server.url + "/token", data={"grant_type": "authorization_code", "code": params["code"],
                           "redirect_uri": client.redirect_uri, "code_verifier": verifier},
                           auth=(client.client_id, client.client_secret), timeout=10).json()
    old_kids = {k["kid"] for k in requests.get(server.url + "/jwks.json", timeout=10).json()["keys"]}
    result = run(server, "keys", "rotate")
    assert result.exit_code == 0
    new_kid = result.output.split()[-1]
    time.sleep(1.2)  # the provider re-reads keys within key_cache_seconds (1 s in tests)
    kids = {k["kid"] for k in requests.get(server.url + "/jwks.json", timeout=10).json()["keys"]}
    assert new_kid in kids and old_kids <= kids
    # A token signed with the old key still works.
    info = requests.get(server.url + "/userinfo", headers={"Authorization": "Bearer " + tokens["access_token"]},
                        timeout=10)
    assert info.status_code == 200
    # New tokens are signed with the new key.
    params, verifier, _ = browser.authorize(client, user)
    fresh = requests.post(server.url + "/token", data={"grant_type": "authorization_code", "code": params["code"],
                          "redirect_uri": client.redirect_uri, "code_verifier": verifier},
                          auth=(client.client_id, client.client_secret), timeout=10).json()
    import base64

    header = json.loads(base64.urlsafe_b64decode(fresh["id_token"].split(".")[0] + "=="))
    assert header["kid"] == new_kid


def test_demo_seed_prints_logins_every_time(server, tmp_path):
    first = run(server, "demo", "seed", "--out", str(tmp_path))
    second = run(server, "demo", "seed", "--out", str(tmp_path))
    assert first.exit_code == 0 and second.exit_code == 0
    assert "admin" in first.output
    assert first.output == second.output
    # Pupils sign in with the printed password at once; staff start with required actions.
    passwords = {line.split()[0]: line.split()[1]
                 for line in (tmp_path / "demo-logins.txt").read_text(encoding="utf-8").splitlines() if line.strip()}
    response = Browser(server.url).sign_in("aibek.student", passwords["aibek.student"])
    assert response.status_code == 303 and response.headers["Location"] == "/"
    response = Browser(server.url).sign_in("nurgul.teacher", passwords["nurgul.teacher"])
    assert response.status_code == 303 and response.headers["Location"].endswith("/password/change-required")

