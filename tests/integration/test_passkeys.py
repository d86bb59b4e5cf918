"""Passkeys (WebAuthn, issue 4; NIST 800-63B-4 §2.2.2 / N23) through HTTP, with a
software authenticator (tests/soft_webauthn.py) answering what the browser's
``navigator.credentials`` would, the way idp/static/passkeys.js sends it."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from sqlalchemy import select

from idp.accounts.models import Passkey, User
from idp.audit.models import AuditEvent
from idp.notify.models import OutboxMessage
from tests.helpers import Browser, decode_verified
from tests.soft_webauthn import TEST_AAGUID, SoftAuthenticator, b64url

REJECTED = {"error": "passkey_rejected",
            "message": "The passkey was not accepted. Try again or sign in with your password."}


# --- helpers -------------------------------------------------------------------------

def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def authenticator(server, **kw: Any) -> SoftAuthenticator:
    return SoftAuthenticator(origin=server.url, **kw)


def page_token(page: requests.Response, button_id: str) -> str:
    """The form token the page hands to passkeys.js on the button ``button_id``."""
    button = re.search(rf'<button[^>]*id="{button_id}"[^>]*>', page.text, re.S)
    assert button, f"no #{button_id} on {page.url}:\n{page.text[:1500]}"
    field = re.search(r'data-csrf-field="([^"]+)"', button.group(0)).group(1)
    return re.search(rf'<input type="hidden" id="{field}" value="([^"]+)">', page.text).group(1)


def post_json(browser: Browser, path: str, token: str | None, body: dict[str, Any] | None = None) -> requests.Response:
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["X-CSRFToken"] = token
    return browser.post(path, json=body or {}, headers=headers)


def register(browser: Browser, auth: SoftAuthenticator, name: str = "", **create_kw: Any) -> requests.Response:
    """The account page's "Add a passkey": options, the authenticator, then verify."""
    page = browser.get("/account/2fa")
    assert page.status_code == 200, page.text[:500]
    token = page_token(page, "passkey-register")
    options = post_json(browser, "/account/passkeys/options", token)
    assert options.status_code == 200, options.text[:500]
    credential = auth.create(options.json()["publicKey"], **create_kw)
    return post_json(browser, "/account/passkeys", token, {"credential": credential, "name": name})


def signed_in_with_passkey(server, make_user, *, name: str = "Phone", auth: SoftAuthenticator | None = None,
                           **user_fields: Any):
    person = make_user(**user_fields)
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    auth = auth or authenticator(server)
    added = register(browser, auth, name)
    assert added.status_code == 200 and added.json()["ok"] is True, added.text[:500]
    return person, browser, auth


def passwordless(browser: Browser, auth: SoftAuthenticator, *, flow: str = "", next_url: str = "",
                 **get_kw: Any) -> tuple[requests.Response, dict[str, Any], dict[str, Any]]:
    """"Sign in with a passkey" on /login; returns the answer, the options and the assertion."""
    page = browser.get("/login" + (f"?flow={flow}" if flow else ""))
    token = page_token(page, "passkey-signin")
    options = post_json(browser, "/login/passkey/options", token)
    assert options.status_code == 200, options.text[:500]
    public_key = options.json()["publicKey"]
    assertion = auth.get(public_key, **get_kw)
    answer = post_json(browser, "/login/passkey", token, {"credential": assertion, "flow": flow, "next": next_url})
    return answer, public_key, assertion


def second_step_page(browser: Browser, person) -> requests.Response:
    page = browser.get("/login?next=/")
    response = browser.submit(page, "/login", login=person.login, password=person.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/second-factor"), \
        response.text[:500]
    step = browser.get("/login/second-factor")
    assert step.status_code == 200
    return step


def db_passkeys(server, user_id: int) -> list[Passkey]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(Passkey).where(Passkey.user_id == user_id).order_by(Passkey.id)))
        for row in rows:
            session.expunge(row)
        return rows


def events(server, action: str, user_id: int | None = None) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        query = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        if user_id is not None:
            query = query.where(AuditEvent.subject == f"user:{user_id}")
        rows = list(session.scalars(query))
        for row in rows:
            session.expunge(row)
        return rows


def mails(server, address: str) -> list[OutboxMessage]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(OutboxMessage).where(OutboxMessage.to_address == address).order_by(OutboxMessage.id)))
        for row in rows:
            session.expunge(row)
        return rows


def session_key(browser: Browser) -> str:
    return "sess:" + hashlib.sha256(browser.http.cookies["darbaza"].encode()).hexdigest()


def session_data(server, browser: Browser) -> dict[str, Any]:
    return json.loads(server.services.redis.get(session_key(browser)) or "{}")


def age_sign_in(server, browser: Browser, seconds: float) -> None:
    """Make the browser's sign-in ``seconds`` older (its session lives in Redis)."""
    data = session_data(server, browser)
    data["authenticated_at"] -= seconds
    server.services.redis.set(session_key(browser), json.dumps(data), keepttl=True)


def signed_in(browser: Browser) -> bool:
    return browser.get("/account/2fa").status_code == 200


# --- account: add, list, rename, remove ------------------------------------------------

def test_register_list_rename_and_remove_a_passkey(server, make_user):
    address = f"pk-{secrets.token_hex(4)}@example.test"
    person, browser, auth = signed_in_with_passkey(server, make_user, name="  My\tphone\x00 ", email=address,
                                                   locale="en")
    [stored] = db_passkeys(server, person.id)
    # The name as typed, cleaned; only the public key is stored, with the counter.
    assert stored.name == "My phone" and stored.credential_id == auth.credential_id
    assert stored.aaguid == "d0a1b2c3-d4e5-f607-1829-3a4b5c6d7e8f" and TEST_AAGUID.hex() in stored.aaguid.replace("-", "")
    assert stored.backed_up is True and stored.transports == "internal,hybrid" and stored.sign_count == 1
    assert stored.public_key == auth.cose_public_key() and stored.last_used_at is None

    listing = browser.get("/account/2fa")
    assert listing.status_code == 200
    row = re.search(r'<td class="passkey-name">My phone</td>\s*<td>([0-9: -]+)</td>\s*<td><span class="muted">never</span>',
                    listing.text)
    assert row, listing.text
    assert f'href="/account/passkeys/{stored.id}"' in listing.text
    # The next one is offered as "Passkey 2"; an empty name becomes that default.
    assert 'value="Passkey 2"' in listing.text
    second = register(browser, authenticator(server), "")
    assert second.status_code == 200 and second.json()["name"] == "Passkey 2"

    add_events = events(server, "mfa:passkey:add", person.id)
    assert [e.details["name"] for e in add_events] == ["My phone", "Passkey 2"]
    assert add_events[0].details["method"] == "webauthn" and add_events[0].actor == f"user:{person.id}"
    added_mail = mails(server, address)
    assert [m.template for m in added_mail] == ["mfa_added", "mfa_added"]
    assert "a passkey" in added_mail[0].body_text and "authenticator app" not in added_mail[0].body_text

    detail = browser.get(f"/account/passkeys/{stored.id}")
    assert detail.status_code == 200 and 'value="My phone"' in detail.text
    renamed = browser.submit(detail, f"/account/passkeys/{stored.id}/rename", name="Old laptop")
    assert renamed.status_code == 303 and renamed.headers["Location"].endswith("/account/2fa")
    assert '<td class="passkey-name">Old laptop</td>' in browser.get("/account/2fa").text
    [rename] = events(server, "mfa:passkey:rename", person.id)
    assert rename.details == {"passkey": stored.id, "from": "My phone", "to": "Old laptop"}
    blank = browser.submit(detail, f"/account/passkeys/{stored.id}/rename", name="   ")
    assert blank.status_code == 400 and "Enter a name for the passkey." in blank.text

    removed = browser.submit(browser.get(f"/account/passkeys/{stored.id}"), f"/account/passkeys/{stored.id}/remove")
    assert removed.status_code == 303
    assert [p.name for p in db_passkeys(server, person.id)] == ["Passkey 2"]
    assert "Old laptop" not in browser.get("/account/2fa").text
    [removal] = events(server, "mfa:passkey:remove", person.id)
    assert removal.details["passkey"] == stored.id and removal.details["name"] == "Old laptop"
    assert [m.template for m in mails(server, address)] == ["mfa_added", "mfa_added", "mfa_removed"]
    assert "a passkey" in mails(server, address)[-1].body_text


def test_registration_options_exclude_the_accounts_passkeys_and_use_an_opaque_user_handle(server, make_user):
    person, browser, auth = signed_in_with_passkey(server, make_user)
    token = page_token(browser.get("/account/2fa"), "passkey-register")
    options = post_json(browser, "/account/passkeys/options", token).json()["publicKey"]
    assert options["rp"] == {"name": server.services.settings.school_name, "id": "127.0.0.1"}
    # The user handle is the random OIDC subject, never the login name (WebAuthn §14.6.1).
    assert options["user"]["id"] == b64url(person.subject.encode()) and auth.user_handle == person.subject.encode()
    assert options["user"]["name"] == person.login
    assert [c["id"] for c in options["excludeCredentials"]] == [b64url(auth.credential_id)]
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["authenticatorSelection"]["userVerification"] == "preferred"
    assert options["attestation"] == "none"


def test_the_same_authenticator_cannot_be_registered_twice(server, make_user):
    person, browser, auth = signed_in_with_passkey(server, make_user)
    again = register(browser, auth, "Again")
    assert again.status_code == 400 and again.json()["error"] == "already_registered"
    assert len(db_passkeys(server, person.id)) == 1
    # Nor to another account: a credential id belongs to one account.
    other, other_browser, _ = signed_in_with_passkey(server, make_user)
    stolen = register(other_browser, auth, "Theirs")
    assert stolen.status_code == 400 and db_passkeys(server, other.id)[0].credential_id != auth.credential_id


def test_a_registration_from_another_origin_or_a_replayed_one_is_refused(server, make_user):
    person = make_user()
    browser = english(server)
    browser.sign_in(person.login, person.password)
    phished = register(browser, authenticator(server), "Phished", origin="https://darbaza.evil.example")
    assert phished.status_code == 400 and phished.json()["error"] == "passkey_rejected"
    wrong_rp = register(browser, authenticator(server), "Wrong RP", rp_id="evil.example")
    assert wrong_rp.status_code == 400
    assert db_passkeys(server, person.id) == []
    failures = events(server, "mfa:passkey:add-failure", person.id)
    assert len(failures) == 2 and "origin" in failures[0].reason and "RP ID" in failures[1].reason

    # A good answer, sent twice: the challenge was used up by the first.
    auth = authenticator(server)
    token = page_token(browser.get("/account/2fa"), "passkey-register")
    credential = auth.create(post_json(browser, "/account/passkeys/options", token).json()["publicKey"])
    assert post_json(browser, "/account/passkeys", token, {"credential": credential}).status_code == 200
    replay = post_json(browser, "/account/passkeys", token, {"credential": credential})
    assert replay.status_code == 400 and replay.json()["error"] == "passkey_rejected"
    assert len(db_passkeys(server, person.id)) == 1


# --- passwordless sign-in ----------------------------------------------------------------

def test_passwordless_sign_in_through_oidc_gives_amr_hwk_and_acr_loa2(server, make_user, make_client):
    person, _browser, auth = signed_in_with_passkey(server, make_user)
    client = make_client(scopes=["openid", "profile"])
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    rp = OAuth2Session(client.client_id, client.client_secret, scope="openid profile",
                       redirect_uri=client.redirect_uri, code_challenge_method="S256")
    verifier = generate_token(48)
    url, state = rp.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier, nonce="n-pk")
    browser = english(server)
    login_page = browser.follow_until_external(browser.get(url))
    assert 'action="/login"' in login_page.text and 'id="passkey-signin"' in login_page.text
    flow = re.search(r'name="flow"[^>]*value="([^"]+)"|value="([^"]+)"[^>]*name="flow"', login_page.text)
    flow_id = next(g for g in flow.groups() if g)
    token = page_token(login_page, "passkey-signin")
    options = post_json(browser, "/login/passkey/options", token).json()["publicKey"]
    # Discoverable: no list of credentials (nothing about any account), and the device
    # must verify the person (PIN or biometric), since no password is typed.
    assert options["allowCredentials"] == [] and options["userVerification"] == "required"
    assert options["rpId"] == "127.0.0.1"
    answer = post_json(browser, "/login/passkey", token,
                       {"credential": auth.get(options), "flow": flow_id, "next": ""})
    assert answer.status_code == 200, answer.text
    target = answer.json()["redirect"]
    assert f"/authorize/continue/{flow_id}" in target or flow_id in target
    callback = browser.follow_until_external(browser.get(target)).headers["Location"]
    assert callback.startswith(client.redirect_uri) and "code=" in callback
    tokens = rp.fetch_token(meta["token_endpoint"], authorization_response=callback, code_verifier=verifier,
                            state=state)
    _header, claims = decode_verified(tokens["id_token"], requests.get(meta["jwks_uri"], timeout=10).json())
    assert claims["sub"] == person.subject and claims["nonce"] == "n-pk"
    assert set(claims["amr"]) == {"hwk", "user", "mfa"} and "pwd" not in claims["amr"]
    assert claims["acr"] == "urn:darbaza:loa:2"
    success = events(server, "account:login:success", person.id)[-1]
    assert success.details["amr"] == ["hwk", "user", "mfa"]
    [stored] = db_passkeys(server, person.id)
    assert stored.sign_count == 2 and stored.last_used_at is not None


def test_passwordless_sign_in_goes_to_next_and_the_list_shows_the_last_use(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    browser = english(server)
    answer, _options, _assertion = passwordless(browser, auth, next_url="/account/2fa")
    assert answer.status_code == 200 and answer.json()["redirect"].endswith("/account/2fa")
    listing = browser.get("/account/2fa")
    assert listing.status_code == 200
    assert 'class="muted">never<' not in listing.text
    # An outside next= is not followed (no open redirect through the script).
    other = english(server)
    outside, _o, _a = passwordless(other, auth, next_url="https://evil.example/")
    assert outside.status_code == 200 and outside.json()["redirect"].endswith("/")
    assert "evil" not in outside.json()["redirect"]


def test_passwordless_needs_user_verification_and_presence(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    browser = english(server)
    no_uv, _o, _a = passwordless(browser, auth, user_verified=False)
    assert no_uv.status_code == 401 and no_uv.json() == REJECTED
    no_up, _o, _a = passwordless(browser, auth, user_present=False)
    assert no_up.status_code == 401 and no_up.json() == REJECTED
    assert not signed_in(browser)
    failures = events(server, "account:login:failure", person.id)
    assert [f.details["factor"] for f in failures[-2:]] == ["hwk", "hwk"]
    assert "verification" in failures[-2].reason.lower()


def test_a_replayed_assertion_is_refused(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    first = english(server)
    answer, _options, assertion = passwordless(first, auth)
    assert answer.status_code == 200
    # The same answer again, from the same browser and from another one with its own
    # fresh challenge: the challenge it signed was used up (GETDEL) and is not theirs.
    again = post_json(first, "/login/passkey", page_token(first.get("/login"), "passkey-signin"),
                      {"credential": assertion})
    assert again.status_code == 401 and again.json() == REJECTED
    thief = english(server)
    token = page_token(thief.get("/login"), "passkey-signin")
    assert post_json(thief, "/login/passkey/options", token).status_code == 200
    stolen = post_json(thief, "/login/passkey", token, {"credential": assertion})
    assert stolen.status_code == 401 and stolen.json() == REJECTED
    assert not signed_in(thief)
    # No challenge was ever asked for: refused the same way.
    fresh = english(server)
    none = post_json(fresh, "/login/passkey", page_token(fresh.get("/login"), "passkey-signin"),
                     {"credential": assertion})
    assert none.status_code == 401 and none.json() == REJECTED


def test_wrong_origin_and_unknown_credential_get_the_same_answer(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    ip_failures = server.services.login_ip_throttle.failures("127.0.0.1")
    account_failures = server.services.login_account_throttle.failures(person.login)
    phished, _o, _a = passwordless(english(server), auth, origin="https://darbaza-login.example")
    unknown, _o, _a = passwordless(english(server), authenticator(server))
    stranger, _o, _a = passwordless(english(server), auth.stranger())
    wrong_rp, _o, _a = passwordless(english(server), auth, rp_id="darbaza-login.example")
    answers = [phished, unknown, stranger, wrong_rp]
    assert [a.status_code for a in answers] == [401] * 4
    assert all(a.json() == REJECTED for a in answers)
    assert len({a.text for a in answers}) == 1
    # Counted like failed passwords: per client IP, and per account when it is known.
    assert server.services.login_ip_throttle.failures("127.0.0.1") == ip_failures + 4
    assert server.services.login_account_throttle.failures(person.login) == account_failures + 2
    mine = events(server, "account:login:failure", person.id)[-2:]
    assert [e.details["factor"] for e in mine] == ["hwk", "hwk"] and "origin" in mine[0].reason
    anonymous = [e for e in events(server, "account:login:failure")
                 if e.subject is None and (e.details or {}).get("factor") == "hwk"]
    assert anonymous and anonymous[-1].reason == "unknown-credential"


def test_a_cloned_authenticator_is_refused_and_journalled(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    twin = auth.clone()
    assert passwordless(english(server), auth)[0].status_code == 200  # counter 2
    assert passwordless(english(server), auth)[0].status_code == 200  # counter 3
    # The copy still counts from where it was copied: its counter goes backwards.
    cloned, _o, _a = passwordless(english(server), twin)
    assert cloned.status_code == 401 and cloned.json() == REJECTED
    same, _o, _a = passwordless(english(server), auth, sign_count=3)
    assert same.status_code == 401
    [first, second] = events(server, "mfa:passkey:clone-suspected", person.id)
    assert first.details["passkey"] == db_passkeys(server, person.id)[0].id
    assert db_passkeys(server, person.id)[0].sign_count == 3
    # The real one, counting on, still works.
    assert passwordless(english(server), auth)[0].status_code == 200


def test_a_passkey_without_a_counter_signs_in_again_and_again(server, make_user):
    synced = SoftAuthenticator(origin=server.url, counts=False)
    person, browser, _ = signed_in_with_passkey(server, make_user, auth=synced)
    for _ in range(3):
        assert passwordless(english(server), synced)[0].status_code == 200
    assert db_passkeys(server, person.id)[0].sign_count == 0


def test_a_locked_account_cannot_sign_in_with_its_passkey(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    with server.services.db.transaction() as session:
        session.get(User, person.id).locked = True
    browser = english(server)
    answer, _o, _a = passwordless(browser, auth)
    assert answer.status_code == 403 and answer.json()["error"] == "account_locked"
    assert not signed_in(browser)
    refused = events(server, "account:login:refused", person.id)[-1]
    assert refused.reason == "locked" and refused.details["factor"] == "hwk"


# --- the second step after the password ------------------------------------------------

def test_a_passkey_as_the_second_step_gives_pwd_hwk_mfa(server, make_user):
    person, _b, auth = signed_in_with_passkey(server, make_user)
    browser = english(server)
    step = second_step_page(browser, person)
    # A passkey-only account is asked for the passkey (there is no app code to type).
    assert 'id="passkey-second-factor"' in step.text and 'name="code"' not in step.text
    assert not signed_in(browser)
    token = page_token(step, "passkey-second-factor")
    options = post_json(browser, "/login/second-factor/passkey/options", token).json()["publicKey"]
    assert [c["id"] for c in options["allowCredentials"]] == [b64url(auth.credential_id)]
    assert options["userVerification"] == "preferred"
    # Without user verification the passkey is the possession factor next to the password.
    done = post_json(browser, "/login/second-factor/passkey", token,
                     {"credential": auth.get(options, user_verified=False)})
    assert done.status_code == 200, done.text
    assert done.json()["redirect"] == "/" and signed_in(browser)
    success = events(server, "account:login:success", person.id)[-1]
    assert success.details["amr"] == ["pwd", "hwk", "mfa"]


def test_the_second_step_refuses_another_accounts_passkey_and_replays(server, make_user):
    person, _b, _auth = signed_in_with_passkey(server, make_user)
    _other, _ob, other_auth = signed_in_with_passkey(server, make_user)
    browser = english(server)
    step = second_step_page(browser, person)
    token = page_token(step, "passkey-second-factor")
    options = post_json(browser, "/login/second-factor/passkey/options", token).json()["publicKey"]
    wrong = post_json(browser, "/login/second-factor/passkey", token, {"credential": other_auth.get(options)})
    assert wrong.status_code == 401 and wrong.json()["error"] == "passkey_rejected"
    assert not signed_in(browser)
    failure = events(server, "account:login:failure", person.id)[-1]
    assert failure.reason == "not-this-account" and failure.details["factor"] == "hwk"
    # The challenge went with that attempt: a right answer to it is now a replay.
    late = post_json(browser, "/login/second-factor/passkey", token, {"credential": _auth.get(options)})
    assert late.status_code == 401 and not signed_in(browser)


def test_passkey_endpoints_need_the_form_token_and_a_sign_in(server, make_user):
    person, browser, auth = signed_in_with_passkey(server, make_user)
    # Without the X-CSRFToken header: refused before anything happens.
    assert post_json(browser, "/account/passkeys/options", None).status_code == 400
    assert post_json(browser, "/account/passkeys", None, {"credential": {}}).status_code == 400
    stranger = english(server)
    stranger.get("/login")
    assert post_json(stranger, "/login/passkey/options", None).status_code == 400
    assert post_json(stranger, "/login/passkey", None, {"credential": {}}).status_code == 400
    # Not signed in: no account to add a passkey to.
    token = page_token(stranger.get("/login"), "passkey-signin")
    anonymous = post_json(stranger, "/account/passkeys/options", token)
    assert anonymous.status_code in (302, 303, 401)
    assert "publicKey" not in anonymous.text
    # No pending sign-in: the second-step endpoints have nobody to check.
    no_step = post_json(stranger, "/login/second-factor/passkey/options", token)
    assert no_step.status_code == 401 and no_step.json()["error"] == "expired"
    # Another person's passkey cannot be seen, renamed or removed.
    [mine] = db_passkeys(server, person.id)
    intruder = make_user()
    other = english(server)
    other.sign_in(intruder.login, intruder.password)
    assert other.get(f"/account/passkeys/{mine.id}").status_code == 404
    token = page_token(other.get("/account/2fa"), "passkey-register")
    assert other.post(f"/account/passkeys/{mine.id}/remove", data={"csrf_token": token}).status_code == 404
    assert other.post(f"/account/passkeys/{mine.id}/rename",
                      data={"csrf_token": token, "name": "x"}).status_code == 404
    assert browser.post(f"/account/passkeys/{mine.id}/remove").status_code == 400  # no form token
    assert len(db_passkeys(server, person.id)) == 1
    # Garbage instead of a credential: the same refusal, never a 500.
    for junk in ({}, {"rawId": 5}, {"rawId": "!!"}, {"rawId": "AAAA", "response": "x"}):
        token = page_token(stranger.get("/login"), "passkey-signin")
        post_json(stranger, "/login/passkey/options", token)
        answer = post_json(stranger, "/login/passkey", token, {"credential": junk})
        assert answer.status_code == 401 and answer.json() == REJECTED


def test_the_last_second_factor_of_a_role_that_requires_2fa_cannot_be_removed(server, make_user):
    # A teacher (2FA required) with an app, who adds a passkey and then drops the app.
    person, browser, _auth = signed_in_with_passkey(server, make_user, roles=("teacher",))
    with server.services.db.transaction() as session:
        server.services.two_factor.disable(session, session.get(User, person.id))
    [only] = db_passkeys(server, person.id)
    page = browser.get(f"/account/passkeys/{only.id}")
    assert "this is your only one" in page.text
    refused = browser.submit(page, f"/account/passkeys/{only.id}/remove")
    assert refused.status_code == 400
    assert "Your role requires a second sign-in step. Add another passkey or an authenticator app" in refused.text
    assert len(db_passkeys(server, person.id)) == 1
    assert events(server, "mfa:passkey:remove-refused", person.id)[-1].reason == "last-required-factor"
    # With a second passkey, one of the two can go.
    assert register(browser, authenticator(server), "Spare").status_code == 200
    done = browser.submit(browser.get(f"/account/passkeys/{only.id}"), f"/account/passkeys/{only.id}/remove")
    assert done.status_code == 303
    assert [p.name for p in db_passkeys(server, person.id)] == ["Spare"]


def test_managing_passkeys_needs_a_recent_sign_in(server, make_user):
    person, browser, auth = signed_in_with_passkey(server, make_user)
    [mine] = db_passkeys(server, person.id)
    token = page_token(browser.get("/account/2fa"), "passkey-register")
    detail = browser.get(f"/account/passkeys/{mine.id}")
    # The sign-in grows old (ASVS 7.5.1: a fresh authentication before MFA changes).
    age_sign_in(server, browser, server.services.settings.reauth_max_age_seconds + 120)

    options = post_json(browser, "/account/passkeys/options", token)
    assert options.status_code == 401 and options.json()["error"] == "reauth_required"
    assert "/login/reauth" in options.json()["redirect"] and "publicKey" not in options.text
    added = post_json(browser, "/account/passkeys", token, {"credential": authenticator(server).create({
        "rp": {"id": "127.0.0.1"}, "user": {"id": "AA"}, "challenge": "AA"})})
    assert added.status_code == 401 and added.json()["error"] == "reauth_required"
    assert browser.get(f"/account/passkeys/{mine.id}").status_code == 303
    removed = browser.submit(detail, f"/account/passkeys/{mine.id}/remove")
    assert removed.status_code == 303 and "/login/reauth" in removed.headers["Location"]
    renamed = browser.submit(detail, f"/account/passkeys/{mine.id}/rename", name="x")
    assert renamed.status_code == 303 and "/login/reauth" in renamed.headers["Location"]
    assert [p.name for p in db_passkeys(server, person.id)] == ["Phone"]
    assert events(server, "mfa:passkey:remove", person.id) == []


def test_asking_for_new_options_drops_the_older_challenge(server, make_user):
    _person, _b, auth = signed_in_with_passkey(server, make_user)
    browser = english(server)
    token = page_token(browser.get("/login"), "passkey-signin")
    first = post_json(browser, "/login/passkey/options", token).json()["publicKey"]
    first_key = "webauthn-challenge:" + session_data(server, browser)["passkey_challenges"]["passwordless"]
    assert 0 < server.services.redis.ttl(first_key) <= 300
    second = post_json(browser, "/login/passkey/options", token).json()["publicKey"]
    assert first["challenge"] != second["challenge"]
    assert server.services.redis.exists(first_key) == 0
    stale = post_json(browser, "/login/passkey", token, {"credential": auth.get(first)})
    assert stale.status_code == 401 and stale.json() == REJECTED
