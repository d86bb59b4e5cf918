"""Personal data (issue 9, Kyrgyz law on personal information): a person downloads
everything held about them as JSON from the account page; staff produce the same for a
request (console, admin API, CLI), with a reason in the journal; never a secret in it."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import requests
from sqlalchemy import select

from idp.accounts.models import User
from idp.audit.models import AuditEvent
from idp.breach import service as breach_service
from idp.oidc.models import AccessToken, Consent, RefreshToken, token_hash
from idp.privacy import FORMAT
from tests.helpers import Browser
from tests.integration.admin.test_admin_api import Api, machine_client, token_for
from tests.integration.test_cli import run

# The refresh token value given to each account by with_history (never in an export).
REFRESH_VALUES: dict[int, str] = {}


def events(server, action: str, subject: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.subject == subject).order_by(AuditEvent.seq)))


def signed_in(server, person) -> Browser:  # type: ignore[no-untyped-def]
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303, response.text[:300]
    return browser


def secrets_of(server, person) -> list[str]:  # type: ignore[no-untyped-def]
    """Every secret the export must never contain."""
    with server.services.db.transaction() as session:
        user = session.get(User, person.id)
        stored = [user.password_hash, user.totp_secret_encrypted]
    found = [person.password, *(s for s in stored if s), *(person.recovery_codes or [])]
    if person.totp_secret:
        found.append(person.totp_secret)
    return found


def assert_no_secrets(text: str, forbidden: list[str]) -> None:
    for secret in forbidden:
        assert secret not in text
    for prefix in ("$argon2", "totp_secret", "password_hash", "code_hash", "token_hash", "secret_hash"):
        assert prefix not in text, prefix


def with_history(server, make_user, make_client):  # type: ignore[no-untyped-def]
    """A teacher (authenticator app, recovery codes) with a breach report and a consent."""
    person = make_user(roles=("teacher",), email=f"t-{secrets.token_hex(4)}@school.example",
                       display_name="Айгерим Токонова")
    client = make_client(name="School diary " + secrets.token_hex(3))
    svc = server.services
    with svc.db.transaction() as session:
        user = session.get(User, person.id)
        case = breach_service.open_case(session, user=user, door="account", category="other",
                                        description="Someone knows my password", noticed_at=None, contact=None,
                                        login_given=None, ip="127.0.0.1", actor=f"user:{person.id}", svc=svc)
        number = case.number
        # Support dealt with it: the account can sign in again with its password.
        user.must_change_password = False
        user.locked = False
        session.add(Consent(user_id=person.id, client_id=client.client_id, scopes=["openid", "profile"]))
        # Tokens issued to the app: one valid and one expired access token, a refresh token.
        now, family = int(time.time()), "fam-" + secrets.token_hex(6)
        for jti, expires in ((secrets.token_hex(8), now + 600), (secrets.token_hex(8), now - 600)):
            session.add(AccessToken(jti=jti, family_id=family, client_id=client.client_id, user_id=person.id,
                                    scope="openid", issued_at=now - 700, expires_at=expires))
        REFRESH_VALUES[person.id] = "refresh-" + secrets.token_urlsafe(24)
        session.add(RefreshToken(token_hash=token_hash(REFRESH_VALUES[person.id]), family_id=family, client_id=client.client_id,
                                 user_id=person.id, scope="openid", issued_at=now, expires_at=now + 86400))
    return person, client, number


def test_a_person_downloads_their_own_data_without_any_secret(server, make_user, make_client):
    person, client, number = with_history(server, make_user, make_client)
    browser = signed_in(server, person)
    account = browser.get("/")
    assert 'href="/account/data.json"' in account.text

    response = browser.get("/account/data.json")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert "no-store" in response.headers["Cache-Control"]
    data = response.json()
    assert data["format"] == FORMAT and data["generated_at"].endswith("Z")
    assert data["account"]["login"] == person.login
    assert data["account"]["display_name"] == "Айгерим Токонова"
    assert data["account"]["roles"] == ["teacher"]
    assert data["two_factor"]["authenticator_app"]["enabled_at"]
    assert data["two_factor"]["recovery_codes_left"] == len(person.recovery_codes)
    assert data["sessions"] and data["sessions"][0]["ip"] == "127.0.0.1"
    assert [(c["client_id"], c["scopes"]) for c in data["consents"]] == [(client.client_id, ["openid", "profile"])]
    assert data["consents"][0]["app"].startswith("School diary ")
    [app] = data["apps"]
    assert (app["client_id"], app["valid_access_tokens"], app["valid_refresh_tokens"]) == (client.client_id, 1, 1)
    assert app["last_issued_at"]
    refresh_value = REFRESH_VALUES[person.id]
    assert refresh_value not in response.text and token_hash(refresh_value) not in response.text
    assert [r["number"] for r in data["breach_reports"]] == [number]
    report = data["breach_reports"][0]
    assert report["description"] == "Someone knows my password"
    assert [s["action"] for s in report["steps"]][:2] == ["report", "contain"]
    assert any(e["action"] == "account:login:success" and e["by"] == "self" for e in data["journal"])
    assert any(e["action"] == "breach:case:report" for e in data["journal"])
    assert data["obligations_accepted"], "a teacher has accepted the obligation"
    assert_no_secrets(response.text, secrets_of(server, person))
    # The session key (the cookie's stand-in) is not in it either.
    for value in browser.http.cookies.values():
        assert value not in response.text
    exported = events(server, "privacy:export:self", f"user:{person.id}")
    assert exported and exported[-1].actor == f"user:{person.id}" and exported[-1].ip == "127.0.0.1"


def test_nobody_else_gets_it(server, make_user):
    person = make_user()
    anonymous = Browser(server.url)
    response = anonymous.get("/account/data.json")
    assert response.status_code in (302, 303) and "/login" in response.headers["Location"]
    assert person.login not in response.text
    other = make_user()
    data = signed_in(server, other).get("/account/data.json").json()
    assert data["account"]["login"] == other.login
    assert person.login not in json.dumps(data)
    assert not events(server, "privacy:export:self", f"user:{person.id}")


def test_an_old_sign_in_must_confirm_before_downloading(server, make_user):
    """A session left open on a shared computer does not hand the data out."""
    person = make_user()
    browser = signed_in(server, person)
    sessions = server.services.sessions.list(person.id)
    assert sessions
    # Age the session's authentication past the re-authentication window.
    redis = server.services.redis
    raw = json.loads(redis.get(sessions[0].key))
    raw["authenticated_at"] = raw["authenticated_at"] - server.services.settings.reauth_max_age_seconds - 120
    redis.set(sessions[0].key, json.dumps(raw), keepttl=True)
    response = browser.get("/account/data.json")
    assert response.status_code == 303 and "/login/reauth" in response.headers["Location"]
    assert not events(server, "privacy:export:self", f"user:{person.id}")


def test_staff_produce_it_for_a_request_with_a_reason(server, make_user, make_client):
    person, _client, number = with_history(server, make_user, make_client)
    admin = make_user(roles=("school_admin",))
    console = signed_in(server, admin)
    account_page = console.get(f"/admin/accounts/{person.id}")
    assert 'id="personal-data-export"' in account_page.text
    form = console.get(f"/admin/accounts/{person.id}/personal-data")
    assert form.status_code == 200
    refused = console.submit(form, f"/admin/accounts/{person.id}/personal-data", reason="")
    assert refused.status_code == 400 and "Enter a reason" in refused.text
    reason = "Written request from the teacher, 26 Nov, reg. no. 17"
    response = console.submit(form, f"/admin/accounts/{person.id}/personal-data", reason=reason)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["Cache-Control"] == "no-store"
    data = response.json()
    assert data["format"] == FORMAT and data["account"]["login"] == person.login
    assert [r["number"] for r in data["breach_reports"]] == [number]
    assert_no_secrets(response.text, secrets_of(server, person))
    journalled = events(server, "privacy:export:admin", f"user:{person.id}")
    assert journalled and journalled[-1].reason == reason and journalled[-1].actor == f"user:{admin.id}"
    # Tech support handles cases but does not hand out personal data.
    support = signed_in(server, make_user(roles=("tech_support",)))
    assert 'id="personal-data-export"' not in support.get(f"/admin/accounts/{person.id}").text
    assert support.get(f"/admin/accounts/{person.id}/personal-data").status_code == 403


def test_the_admin_api_produces_it_with_a_reason(server, make_user, make_client):
    person = make_user()
    api = Api(server.url, token_for(server, machine_client(make_client, ["privacy:data:export"])))
    missing = api.post(f"/users/{person.id}/personal-data", json={})
    assert missing.status_code == 422  # the API answers a body missing a field with 422
    response = api.post(f"/users/{person.id}/personal-data", json={"reason": "Request by e-mail, ticket 42"})
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json()["format"] == FORMAT and response.json()["account"]["login"] == person.login
    assert_no_secrets(response.text, secrets_of(server, person))
    journalled = events(server, "privacy:export:admin", f"user:{person.id}")
    assert journalled[-1].reason == "Request by e-mail, ticket 42" and journalled[-1].actor.startswith("client:")
    assert api.post("/users/999999999/personal-data", json={"reason": "x"}).status_code == 404
    reader = Api(server.url, token_for(server, machine_client(make_client, ["admin:users:read"])))
    assert reader.post(f"/users/{person.id}/personal-data", json={"reason": "x"}).status_code == 403
    document = requests.get(server.url + "/admin/api/v1/openapi.json", timeout=10).json()
    assert "/users/{user_id}/personal-data" in document["paths"]


def test_the_cli_writes_it_to_a_private_file(server, make_user, tmp_path: Path):
    person = make_user(roles=("teacher",))
    out = tmp_path / "export.json"
    result = run(server, "users", "export", person.login, "--reason", "Paper request no. 5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert os.stat(out).st_mode & 0o777 == 0o600
    text = out.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["format"] == FORMAT and data["account"]["login"] == person.login
    assert_no_secrets(text, secrets_of(server, person))
    journalled = events(server, "privacy:export:admin", f"user:{person.id}")
    assert journalled[-1].reason == "Paper request no. 5" and journalled[-1].actor.startswith("cli")
    printed = run(server, "users", "export", person.login, "--reason", "Second copy")
    assert printed.exit_code == 0 and json.loads(printed.output)["account"]["login"] == person.login
    assert run(server, "users", "export", person.login).exit_code != 0  # a reason is required
    unknown = run(server, "users", "export", "no-such-" + secrets.token_hex(3), "--reason", "x")
    assert unknown.exit_code != 0 and "no account" in unknown.output
