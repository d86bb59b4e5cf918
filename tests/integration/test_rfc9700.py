"""RFC 9700 (OAuth 2.0 Security BCP) authorization-server requirements R1-R33
(checklist §2) that apply to Darbaza: code flow with PKCE S256 for every client, refresh
rotation with family revocation, client credentials; no implicit/hybrid/password grant,
no dynamic registration, no back-channel logout yet.

Not tested here (see docs/conformance-logout-rfc9700.md): R11 (optional), R13 (sender-
constrained tokens: not available in Authlib 1.9.10, a recorded deviation), R23 (no DCR),
R32 (no web_message response mode).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
import time
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests
from flask import request as flask_request

from idp.accounts.models import User
from idp.app import create_app
from idp.oidc.clients import ClientError, create_client
from idp.oidc.models import AuthorizationCode, RefreshToken, token_hash
from tests.helpers import Browser, UserInfo, callback_params, decode_verified, pkce_pair

REGISTERED = "https://app.school.example/cb"


# --- helpers ---------------------------------------------------------------------------
def auth_query(client, challenge: str | None = None, **extra: str | None) -> dict[str, str]:
    if challenge is None:
        _, challenge = pkce_pair()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": "openid profile",
        "state": "st-" + secrets.token_hex(4),
        "nonce": secrets.token_hex(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v is not None}


def is_redirect(response: requests.Response) -> bool:
    return response.status_code in (301, 302, 303, 307, 308) or "Location" in response.headers


def assert_error_page(response: requests.Response) -> None:
    """R3: an HTML error page, status 400, and no redirect of any kind."""
    assert response.status_code == 400, (response.status_code, response.headers.get("Location"))
    assert not is_redirect(response)
    assert "text/html" in response.headers["Content-Type"]
    assert "Traceback" not in response.text
    # No auto-submitting form or meta refresh that would bounce the user to the client.
    assert "form-post" not in response.text and "http-equiv" not in response.text.lower()


def token_request(server, client, data: dict, *, auth: bool = True) -> requests.Response:
    data = dict(data)
    kwargs: dict = {}
    if client.client_secret and auth:
        kwargs["auth"] = (client.client_id, client.client_secret)
    elif not client.client_secret:
        data.setdefault("client_id", client.client_id)
    return requests.post(server.url + "/token", data=data, timeout=15, **kwargs)


def exchange(server, client, code: str, verifier: str | None, **extra) -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    data.update(extra)
    return token_request(server, client, data)


def get_code(browser: Browser, client, user, **kw) -> tuple[str, str]:
    params, verifier, response = browser.authorize(client, user, **kw)
    assert "code" in params, (params, response.status_code, response.text[:300])
    return params["code"], verifier


def get_tokens(server, browser: Browser, client, user, scope: str = "openid profile") -> dict:
    code, verifier = get_code(browser, client, user, scope=scope)
    response = exchange(server, client, code, verifier)
    assert response.status_code == 200, response.text
    return response.json()


def refresh(server, client, refresh_token: str, **extra) -> requests.Response:
    return token_request(server, client, {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra})


def userinfo_status(server, access_token: str) -> int:
    return requests.get(
        server.url + "/userinfo", headers={"Authorization": "Bearer " + access_token}, timeout=10
    ).status_code


def assert_oauth_error(response: requests.Response, status: int, error: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == error, response.text


def parallel(call, n: int) -> list[requests.Response]:
    """Run ``call`` in ``n`` threads released at the same instant."""
    barrier = threading.Barrier(n)
    results: list[requests.Response] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        response = call()
        with lock:
            results.append(response)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    return results


def signed_in_browser(server, user) -> Browser:
    b = Browser(server.url)
    response = b.sign_in(user.login, user.password)
    assert response.status_code == 303, response.status_code
    return b


@pytest.fixture(scope="module")
def https_app(server):
    """The same provider configured for production: an https issuer, Secure cookies."""
    settings = dataclasses.replace(
        server.services.settings, issuer="https://idp.school.example", cookie_secure=True
    )
    app = create_app(settings)
    yield app
    app.extensions["darbaza"].db.dispose()


# --- R1 ---------------------------------------------------------------------------------
R1_VARIANTS = [
    "https://app.school.example/cb/",
    "https://app.school.example/CB",
    "https://app.school.example/cb?x=1",
    "https://app.school.example/cb#f",
    "https://app.school.example/cb/../cb",
    "https://app.school.example:443/cb",
    "https://app.school.example.evil.test/cb",
    "https://x@app.school.example/cb",
    "http://app.school.example/cb",
    # a few more normalisation tricks
    "HTTPS://app.school.example/cb",
    "https://APP.school.example/cb",
    "https://app.school.example/%63b",
    "https://app.school.example//cb",
    "https://app.school.example/cb ",
    "https://app.school.example./cb",
    "https://app.school.example/cb?",
    "https://app.school.example/cb#",
]


def test_r1_redirect_uri_exact_string_match(server, make_user, make_client):
    user = make_user()
    client = make_client(redirect_uris=[REGISTERED], trusted=True)
    anonymous = Browser(server.url)
    signed_in = signed_in_browser(server, user)
    for b in (anonymous, signed_in):
        for variant in R1_VARIANTS:
            for method in ("GET", "POST"):
                params = auth_query(client, redirect_uri=variant)
                if method == "GET":
                    response = b.get("/authorize", params=params)
                else:
                    response = b.post("/authorize", data=params)
                assert response.status_code == 400, (variant, method, response.headers.get("Location"))
                assert_error_page(response)
    # Control: the exact registered string works (login for the anonymous browser, a code
    # straight back to the registered URI for the signed-in one).
    response = anonymous.get("/authorize", params=auth_query(client, redirect_uri=REGISTERED))
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    response = signed_in.get("/authorize", params=auth_query(client, redirect_uri=REGISTERED))
    assert response.status_code == 302 and response.headers["Location"].startswith(REGISTERED + "?code=")


# --- R2 ---------------------------------------------------------------------------------
OFFSITE = [
    "https://evil.test/",
    "//evil.test/",
    "/\\evil.test/",
    "\\\\evil.test",
    "https:evil.test",
    "http://127.0.0.1.evil.test/",
    "/%2F%2Fevil.test",
    "\t//evil.test",
    "javascript:alert(1)",
]


def _is_local(location: str, base: str) -> bool:
    absolute = urljoin(base + "/", location)
    parts = urlsplit(absolute)
    return absolute.startswith(base + "/") and parts.netloc == urlsplit(base).netloc


def test_r2_no_open_redirectors(server, make_user, make_client):
    user = make_user()
    for target in OFFSITE:
        b = Browser(server.url)
        page = b.get("/login", params={"next": target})
        assert page.status_code == 200
        response = b.submit(page, "/login", login=user.login, password=user.password)
        assert response.status_code == 303
        assert _is_local(response.headers["Location"], server.url), (target, response.headers["Location"])
        # Even with next= set on the POST itself.
        b2 = Browser(server.url)
        page = b2.get("/login")
        response = b2.submit(page, "/login", login=user.login, password=user.password, next=target)
        assert _is_local(response.headers["Location"], server.url), (target, response.headers["Location"])
        # The language switcher takes a next= too.
        lang_page = b2.get("/login")
        response = b2.submit(lang_page, "/lang", lang="en", next=target)
        assert response.status_code == 303
        assert _is_local(response.headers["Location"], server.url), (target, response.headers["Location"])
    # Logout with an unregistered post_logout_redirect_uri: no redirect.
    client = make_client(trusted=True)
    b = Browser(server.url)
    code, verifier = get_code(b, client, user)
    id_token = exchange(server, client, code, verifier).json()["id_token"]
    response = b.get(
        "/end_session", params={"id_token_hint": id_token, "post_logout_redirect_uri": "https://evil.test/"}
    )
    assert not is_redirect(response)
    # Error pages never redirect: an unknown client with an attacker URI.
    response = b.get("/authorize", params={"client_id": "nope", "redirect_uri": "https://evil.test/"})
    assert_error_page(response)


# --- R3 ---------------------------------------------------------------------------------
def test_r3_invalid_client_or_redirect_uri_shows_error_page(server, make_client):
    client = make_client()
    b = Browser(server.url)
    cases = [
        auth_query(client, client_id="unknown-" + secrets.token_hex(4)),
        auth_query(client, client_id=None),
        auth_query(client, redirect_uri="https://evil.test/cb"),
        # Errors that would normally be redirected still are not, for a bad URI.
        auth_query(client, redirect_uri="https://evil.test/cb", response_type="token"),
        auth_query(client, redirect_uri="https://evil.test/cb", prompt="none"),
        auth_query(client, redirect_uri="https://evil.test/cb", scope="openid nonsense"),
        # An OpenID request must name its redirect URI (P5).
        auth_query(client, redirect_uri=None),
    ]
    for params in cases:
        assert_error_page(b.get("/authorize", params=params))
        assert_error_page(b.post("/authorize", data=params))
    # A deactivated client is an unknown client.
    with server.services.db.transaction() as session:
        from idp.oidc.models import Client

        row = session.query(Client).filter_by(client_id=client.client_id).one()
        row.active = False
    assert_error_page(b.get("/authorize", params=auth_query(client)))


# --- R4 ---------------------------------------------------------------------------------
def test_r4_redirect_only_after_client_and_uri_validation(server, make_client):
    client = make_client()
    b = Browser(server.url)
    params = auth_query(client, scope="openid not-a-scope")
    response = b.get("/authorize", params=params)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(client.redirect_uri + "?")
    got = callback_params(location)
    assert got["error"] == "invalid_scope" and got["state"] == params["state"] and "code" not in got
    # Same error with an unvalidated URI: error page, no redirect.
    assert_error_page(b.get("/authorize", params=dict(params, redirect_uri="https://evil.test/cb")))
    # Redirect URIs are trusted because registration is closed (admin-only): no DCR.
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert "registration_endpoint" not in meta
    for path in ("/register", "/connect/register", "/oauth/register"):
        response = requests.post(server.url + path, json={"redirect_uris": ["https://evil.test/cb"]}, timeout=10)
        assert response.status_code in (404, 405)


# --- R5 ---------------------------------------------------------------------------------
def test_r5_login_post_answers_303(server, make_user, make_client):
    user = make_user()
    client = make_client()
    # Plain sign-in.
    b = Browser(server.url)
    response = b.sign_in(user.login, user.password)
    assert response.status_code == 303
    # Sign-in inside an authorization flow, then the consent POST.
    b = Browser(server.url)
    response = b.get("/authorize", params=auth_query(client))
    login_page = b.get(response.headers["Location"])
    response = b.submit(login_page, "/login", login=user.login, password=user.password)
    assert response.status_code == 303
    consent_page = b.get(response.headers["Location"])
    assert 'action="/authorize/consent"' in consent_page.text
    response = b.submit(consent_page, "/authorize/consent", approve="1")
    assert response.status_code == 303
    assert response.headers["Location"].startswith(client.redirect_uri + "?code=")
    # A failed sign-in re-renders the page; it never bounces the credentials anywhere.
    b = Browser(server.url)
    page = b.get("/login")
    response = b.submit(page, "/login", login=user.login, password="wrong password")
    assert response.status_code == 401 and "Location" not in response.headers


# --- R6 ---------------------------------------------------------------------------------
def test_r6_pkce_s256_supported(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    code, verifier = get_code(browser, client, user)
    response = exchange(server, client, code, verifier)
    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"


# --- R7 ---------------------------------------------------------------------------------
def test_r7_code_verifier_enforced(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    code, _ = get_code(browser, client, user)
    assert_oauth_error(exchange(server, client, code, None), 400, "invalid_request")
    code, verifier = get_code(browser, client, user)
    assert_oauth_error(exchange(server, client, code, pkce_pair()[0]), 400, "invalid_grant")
    code, _ = get_code(browser, client, user)
    assert_oauth_error(exchange(server, client, code, "short"), 400, "invalid_request")
    # A public client is held to the same rule.
    public = make_client(auth_method="none", trusted=True)
    code, _ = get_code(browser, public, user)
    assert_oauth_error(exchange(server, public, code, None), 400, "invalid_request")


# --- R8 ---------------------------------------------------------------------------------
def test_r8_pkce_downgrade_rejected(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    # The authorization endpoint never issues a code without a challenge...
    browser.sign_in(user.login, user.password)
    response = browser.get("/authorize", params=auth_query(client, code_challenge=None, code_challenge_method=None))
    got = callback_params(response.headers["Location"])
    assert got["error"] == "invalid_request" and "code" not in got
    # ...and a code that had none (planted directly) is refused when a verifier is sent.
    code = secrets.token_urlsafe(32)
    now = int(time.time())
    with server.services.db.transaction() as session:
        session.add(
            AuthorizationCode(
                code_hash=token_hash(code), family_id=secrets.token_urlsafe(16), client_id=client.client_id,
                user_id=user.id, redirect_uri=client.redirect_uri, scope="openid", nonce=None,
                code_challenge="", code_challenge_method="S256", auth_time=now, amr=["pwd"], acr=None,
                sid=None, issued_at=now, expires_at=now + 60,
            )
        )
    assert_oauth_error(exchange(server, client, code, pkce_pair()[0]), 400, "invalid_request")


# --- R9 ---------------------------------------------------------------------------------
def test_r9_code_challenge_methods_published(server):
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["code_challenge_methods_supported"] == ["S256"]
    meta2 = requests.get(server.url + "/.well-known/oauth-authorization-server", timeout=10).json()
    assert meta2["code_challenge_methods_supported"] == ["S256"]


# --- R10 --------------------------------------------------------------------------------
def test_r10_pkce_required_and_plain_refused(server, make_client):
    public = make_client(auth_method="none")
    confidential = make_client()
    b = Browser(server.url)
    verifier, challenge = pkce_pair()
    for client in (public, confidential):
        for extra in (
            {"code_challenge": None, "code_challenge_method": None},
            {"code_challenge": None},
            {"code_challenge_method": None},
            {"code_challenge_method": "plain"},
            {"code_challenge": verifier, "code_challenge_method": "plain"},
            {"code_challenge_method": "s256"},
            {"code_challenge": "too-short"},
        ):
            params = auth_query(client, challenge=challenge, **extra)
            response = b.get("/authorize", params=params)
            assert response.status_code == 302, extra
            got = callback_params(response.headers["Location"])
            assert got.get("error") == "invalid_request", (extra, got)
            assert "code" not in got


# --- R12 --------------------------------------------------------------------------------
def test_r12_no_implicit_or_hybrid(server, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    b = signed_in_browser(server, user)
    for response_type in ("token", "id_token token", "id_token", "code token", "code id_token",
                          "code id_token token", "none", "code code"):
        response = b.get("/authorize", params=auth_query(client, response_type=response_type))
        assert response.status_code == 302, response_type
        location = response.headers["Location"]
        assert location.startswith(client.redirect_uri + "?")
        got = callback_params(location)
        assert got["error"] == "unsupported_response_type", (response_type, got)
        assert "access_token" not in location and "id_token=" not in location and "code" not in got
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["response_types_supported"] == ["code"]
    assert "implicit" not in meta["grant_types_supported"]


# --- R14 --------------------------------------------------------------------------------
def test_r14_refresh_rotation_with_reuse_detection_for_public_clients(server, browser, make_user, make_client):
    user = make_user()
    public = make_client(auth_method="none", trusted=True)
    first = get_tokens(server, browser, public, user)
    rt1 = first["refresh_token"]
    second = refresh(server, public, rt1)
    assert second.status_code == 200, second.text
    rt2 = second.json()["refresh_token"]
    assert rt2 != rt1
    third = refresh(server, public, rt2)
    assert third.status_code == 200
    rt3, at3 = third.json()["refresh_token"], third.json()["access_token"]
    assert userinfo_status(server, at3) == 200
    # Reuse of an old token: invalid_grant, and the whole family dies (current RT and AT).
    assert_oauth_error(refresh(server, public, rt1), 400, "invalid_grant")
    assert_oauth_error(refresh(server, public, rt3), 400, "invalid_grant")
    assert userinfo_status(server, at3) == 401

    # The same refresh token presented in parallel (a thief racing the app): one wins, the
    # others fail, and the tokens the winner got are revoked as well.
    rt = get_tokens(server, browser, public, user)["refresh_token"]
    results = parallel(lambda: refresh(server, public, rt), 10)
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1, statuses
    for r in results:
        if r.status_code != 200:
            assert_oauth_error(r, 400, "invalid_grant")
    winner = next(r for r in results if r.status_code == 200).json()
    assert userinfo_status(server, winner["access_token"]) == 401
    assert_oauth_error(refresh(server, public, winner["refresh_token"]), 400, "invalid_grant")


# --- R15 --------------------------------------------------------------------------------
def test_r15_refresh_token_bound_to_scope_and_client(server, browser, make_user, make_client):
    user = make_user()
    client_a = make_client(trusted=True)
    client_b = make_client(trusted=True)
    tokens = get_tokens(server, browser, client_a, user, scope="openid profile")
    rt = tokens["refresh_token"]
    assert_oauth_error(refresh(server, client_a, rt, scope="openid profile email"), 400, "invalid_scope")
    # Another confidential client cannot use it, and the attempt does not burn it.
    assert_oauth_error(refresh(server, client_b, rt), 400, "invalid_grant")
    public = make_client(auth_method="none", trusted=True)
    assert_oauth_error(refresh(server, public, rt), 400, "invalid_grant")
    # Narrowing is allowed and keeps working for the owner.
    narrowed = refresh(server, client_a, rt, scope="openid")
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == "openid"


# --- R16 --------------------------------------------------------------------------------
def test_r16_refresh_tokens_issued_per_client_decision(server, browser, make_user, make_client):
    user = make_user()
    no_rt = make_client(grant_types=["authorization_code"], trusted=True)
    tokens = get_tokens(server, browser, no_rt, user)
    assert "refresh_token" not in tokens
    # Such a client cannot use the refresh grant at all.
    response = token_request(server, no_rt, {"grant_type": "refresh_token", "refresh_token": "x" * 40})
    assert_oauth_error(response, 400, "unauthorized_client")
    # A public client that is allowed refresh tokens gets rotating ones (R14).
    public = make_client(auth_method="none", trusted=True)
    tokens = get_tokens(server, browser, public, user)
    rotated = refresh(server, public, tokens["refresh_token"]).json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    # Machine clients (client credentials) never get one.
    machine = make_client(grant_types=["client_credentials"], redirect_uris=[], scopes=["roles"])
    cc = token_request(server, machine, {"grant_type": "client_credentials"})
    assert cc.status_code == 200 and "refresh_token" not in cc.json()


# --- R17 --------------------------------------------------------------------------------
def test_r17_refresh_tokens_revoked_on_security_events(server, make_user, make_client):
    client = make_client(trusted=True)
    # Logout (RP-initiated) revokes the refresh tokens of that browser session.
    user = make_user()
    b = Browser(server.url)
    tokens = get_tokens(server, b, client, user)
    b.get("/end_session", params={"id_token_hint": tokens["id_token"]})
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")
    # Logout from the account page does too.
    b = Browser(server.url)
    tokens = get_tokens(server, b, client, user)
    account = b.get("/")
    b.submit(account, "/logout")
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")
    # A locked account: the refresh fails and the family is revoked.
    locked = make_user()
    b = Browser(server.url)
    tokens = get_tokens(server, b, client, locked)
    with server.services.db.transaction() as session:
        session.get(User, locked.id).locked = True
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")
    assert userinfo_status(server, tokens["access_token"]) == 401
    # A password change (here the one the school requires at sign-in) revokes everything
    # that was signed in with the old password.
    changer = make_user()
    tokens = get_tokens(server, Browser(server.url), client, changer)
    with server.services.db.transaction() as session:
        session.get(User, changer.id).must_change_password = True
    b = Browser(server.url)
    response = b.sign_in(changer.login, changer.password)
    assert response.status_code == 303 and "/password/change-required" in response.headers["Location"]
    page = b.get(response.headers["Location"])
    new_password = "violet lantern harbour " + secrets.token_hex(6)
    response = b.submit(page, "/password/change-required", password=new_password, confirm=new_password)
    assert response.status_code == 303, response.text[:500]
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")
    assert userinfo_status(server, tokens["access_token"]) == 401
    # Technical support ending all of an account's sessions revokes its tokens too.
    changed = UserInfo(changer.id, changer.login, new_password, changer.subject)
    tokens = get_tokens(server, Browser(server.url), client, changed)
    with server.services.db.transaction() as session:
        server.services.sessions.end_all(session, changer.id)
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")
    # The family's absolute lifetime is enforced (rotation never extends it).
    user = make_user()
    b = Browser(server.url)
    tokens = get_tokens(server, b, client, user)
    with server.services.db.transaction() as session:
        row = session.query(RefreshToken).filter_by(token_hash=token_hash(tokens["refresh_token"])).one()
        row.expires_at = int(time.time()) - 1
    assert_oauth_error(refresh(server, client, tokens["refresh_token"]), 400, "invalid_grant")


# --- R18 --------------------------------------------------------------------------------
def test_r18_tampered_refresh_token_rejected(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    rt = get_tokens(server, browser, client, user)["refresh_token"]
    flipped = rt[:-1] + ("A" if rt[-1] != "A" else "B")
    for tampered in (flipped, rt + "x", rt[:-1], rt.upper(), " " + rt):
        assert_oauth_error(refresh(server, client, tampered), 400, "invalid_grant")
    # The genuine token is untouched by the attempts.
    assert refresh(server, client, rt).status_code == 200


# --- R19 --------------------------------------------------------------------------------
def test_r19_access_tokens_audience_restricted(server, browser, make_user, make_client):
    user = make_user()
    client_a, client_b = make_client(trusted=True), make_client(trusted=True)
    tokens = get_tokens(server, browser, client_a, user, scope="openid")
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    header, claims = decode_verified(tokens["access_token"], jwks)
    assert header["typ"] == "at+jwt"
    assert claims["aud"] == client_a.client_id and claims["client_id"] == client_a.client_id
    assert claims["iss"] == server.url and claims["scope"] == "openid"
    assert claims["exp"] - claims["iat"] <= 3600
    # Another portal app learns nothing about it through introspection.
    intro = requests.post(
        server.url + "/introspect", data={"token": tokens["access_token"]},
        auth=(client_b.client_id, client_b.client_secret), timeout=10,
    )
    assert intro.status_code in (200, 400, 401)
    assert intro.json().get("active") is not True
    assert user.subject not in intro.text


# --- R20 --------------------------------------------------------------------------------
def test_r20_no_password_grant(server, make_user, make_client):
    user, client = make_user(), make_client()
    response = token_request(
        server, client, {"grant_type": "password", "username": user.login, "password": user.password}
    )
    assert_oauth_error(response, 400, "unsupported_grant_type")
    assert "access_token" not in response.text
    for grant in ("implicit", "urn:ietf:params:oauth:grant-type:jwt-bearer",
                  "urn:ietf:params:oauth:grant-type:device_code",
                  "urn:ietf:params:oauth:grant-type:token-exchange"):
        assert_oauth_error(token_request(server, client, {"grant_type": grant}), 400, "unsupported_grant_type")
    with pytest.raises(ClientError), server.services.db.transaction() as session:
        create_client(session, name="x", redirect_uris=[REGISTERED], grant_types=["password"])
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert "password" not in meta["grant_types_supported"]


# --- R21 --------------------------------------------------------------------------------
def test_r21_client_authentication_enforced(server, browser, make_user, make_client):
    user = make_user()
    client = make_client(trusted=True)
    post_client = make_client(auth_method="client_secret_post", trusted=True)
    code, verifier = get_code(browser, client, user)
    base = {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
            "code_verifier": verifier}
    url = server.url + "/token"
    # No credentials, only the client_id (a confidential client may not act as public).
    assert_oauth_error(requests.post(url, data=dict(base, client_id=client.client_id), timeout=10), 401,
                       "invalid_client")
    assert_oauth_error(requests.post(url, data=base, timeout=10), 401, "invalid_client")
    # Wrong secret.
    assert_oauth_error(requests.post(url, data=base, auth=(client.client_id, "wrong"), timeout=10), 401,
                       "invalid_client")
    # The registered method only: a client_secret_post client cannot use Basic, and back.
    assert_oauth_error(
        requests.post(url, data=base, auth=(post_client.client_id, post_client.client_secret), timeout=10),
        401, "invalid_client",
    )
    assert_oauth_error(
        requests.post(url, data=dict(base, client_id=client.client_id, client_secret=client.client_secret),
                      timeout=10),
        401, "invalid_client",
    )
    # The code survived the failed attempts (no client was authenticated) and still works.
    assert requests.post(url, data=base, auth=(client.client_id, client.client_secret), timeout=10).status_code == 200
    # Client credentials without a secret.
    machine = make_client(grant_types=["client_credentials"], redirect_uris=[], scopes=["roles"])
    assert_oauth_error(
        requests.post(url, data={"grant_type": "client_credentials", "client_id": machine.client_id}, timeout=10),
        401, "invalid_client",
    )
    # Revocation and introspection authenticate the client too.
    assert_oauth_error(requests.post(server.url + "/introspect", data={"token": "x"}, timeout=10), 401,
                       "invalid_client")
    assert_oauth_error(
        requests.post(server.url + "/revoke", data={"token": "x", "client_id": client.client_id}, timeout=10),
        401, "invalid_client",
    )


# --- R22 --------------------------------------------------------------------------------
def test_r22_authorization_server_metadata_published(server):
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        meta = response.json()
        assert meta["issuer"] == server.url
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "revocation_endpoint",
                    "introspection_endpoint", "response_types_supported", "grant_types_supported",
                    "token_endpoint_auth_methods_supported"):
            assert key in meta, key


# --- R24 --------------------------------------------------------------------------------
def test_r24_no_http_redirect_uris_except_loopback(server, make_client):
    for bad in ("http://rp.example/cb", "http://app.school.example/cb", "http://127.0.0.1.nip.io/cb",
                "ftp://rp.example/cb", "rp.example/cb", "https:///cb", "https://rp.example/cb#frag"):
        with pytest.raises(ClientError), server.services.db.transaction() as session:
            create_client(session, name="x", redirect_uris=[bad])
        with pytest.raises(ClientError), server.services.db.transaction() as session:
            create_client(session, name="x", redirect_uris=[REGISTERED], post_logout_redirect_uris=[bad])
    # Loopback http is allowed for native apps and development.
    native = make_client(redirect_uris=["http://127.0.0.1:8765/cb", "http://localhost:8765/cb", "http://[::1]:8765/cb"])
    assert native.redirect_uri.startswith("http://127.0.0.1")
    # An http variant of a registered https URI is refused at /authorize.
    client = make_client(redirect_uris=[REGISTERED])
    assert_error_page(Browser(server.url).get("/authorize", params=auth_query(client, redirect_uri="http://app.school.example/cb")))


# --- R25 --------------------------------------------------------------------------------
def test_r25_https_everywhere_and_hsts(https_app):
    http = https_app.test_client()
    base = "https://idp.school.example"
    meta = http.get("/.well-known/openid-configuration", base_url=base).get_json()
    urls = {k: v for k, v in meta.items() if isinstance(v, str) and (k.endswith("_endpoint") or k.endswith("_uri"))}
    assert urls and all(v.startswith("https://idp.school.example/") for v in urls.values()), urls
    assert meta["issuer"] == base
    for path in ("/login", "/.well-known/openid-configuration", "/jwks.json", "/authorize?client_id=x", "/"):
        response = http.get(path, base_url=base)
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        assert int(re.search(r"max-age=(\d+)", response.headers["Strict-Transport-Security"]).group(1)) >= 31536000
    # Session cookies are Secure, host-only (__Host-) and HttpOnly.
    response = https_app.test_client().get("/login", base_url=base)
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("__Host-")
    assert "Secure" in cookie and "HttpOnly" in cookie and "Domain" not in cookie and "Path=/" in cookie


# --- R26 --------------------------------------------------------------------------------
def test_r26_no_cors_on_authorization_endpoint(server, make_client):
    client = make_client()
    origin = {"Origin": "https://evil.test"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    checks = [
        requests.options(server.url + "/authorize", headers=preflight, timeout=10),
        requests.get(server.url + "/authorize", params=auth_query(client), headers=origin, timeout=10,
                     allow_redirects=False),
        requests.post(server.url + "/authorize", data=auth_query(client), headers=origin, timeout=10,
                      allow_redirects=False),
        requests.get(server.url + "/authorize", params={"client_id": "x"}, headers=origin, timeout=10),
        requests.options(server.url + "/login", headers=preflight, timeout=10),
        requests.options(server.url + "/authorize/consent", headers=preflight, timeout=10),
    ]
    for response in checks:
        assert response.status_code < 500
        for header in response.headers:
            assert not header.lower().startswith("access-control-"), (response.url, header)


# --- R27 --------------------------------------------------------------------------------
def test_r27_code_single_use_even_in_parallel(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    code, verifier = get_code(browser, client, user)
    results = parallel(lambda: exchange(server, client, code, verifier), 12)
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1, statuses
    for r in results:
        if r.status_code != 200:
            assert_oauth_error(r, 400, "invalid_grant")
    # The code was used more than once: every token issued from it is revoked.
    winner = next(r for r in results if r.status_code == 200).json()
    assert userinfo_status(server, winner["access_token"]) == 401
    assert_oauth_error(refresh(server, client, winner["refresh_token"]), 400, "invalid_grant")

    # Sequential replay (B28/B29): the second use fails and revokes the first tokens.
    code, verifier = get_code(browser, client, user)
    first = exchange(server, client, code, verifier)
    assert first.status_code == 200
    assert userinfo_status(server, first.json()["access_token"]) == 200
    assert_oauth_error(exchange(server, client, code, verifier), 400, "invalid_grant")
    assert userinfo_status(server, first.json()["access_token"]) == 401
    assert_oauth_error(refresh(server, client, first.json()["refresh_token"]), 400, "invalid_grant")


# --- R28 --------------------------------------------------------------------------------
def _third_party_refs(page: str, base: str) -> list[str]:
    refs = re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", page, re.I)
    refs += re.findall(r"""url\(\s*["']?([^"')]+)""", page, re.I)
    return [r for r in refs if urlsplit(urljoin(base + "/", r)).netloc not in ("", urlsplit(base).netloc)]


def test_r28_no_third_party_resources_and_no_referrer(server, make_user, make_client):
    user, client = make_user(), make_client()
    b = Browser(server.url)
    pages = []
    start = b.get("/authorize", params=auth_query(client))
    pages.append(start)
    login = b.get(start.headers["Location"])
    pages.append(login)
    after = b.submit(login, "/login", login=user.login, password=user.password)
    consent = b.get(after.headers["Location"])
    assert 'action="/authorize/consent"' in consent.text
    pages.append(consent)
    pages.append(b.get("/authorize", params={"client_id": "unknown"}))  # error page
    pages.append(b.get("/end_session"))  # logout confirmation
    pages.append(b.get("/static/darbaza.css"))
    for response in pages:
        assert response.headers["Referrer-Policy"] == "no-referrer", response.url
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        if response.headers.get("Content-Type", "").startswith(("text/html", "text/css")):
            assert _third_party_refs(response.text, server.url) == [], response.url


# --- R29 --------------------------------------------------------------------------------
def test_r29_iss_in_every_authorization_response(server, make_user, make_client):
    issuer = server.url
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["authorization_response_iss_parameter_supported"] is True
    user = make_user()
    trusted = make_client(trusted=True)
    untrusted = make_client()

    def check(location: str, **expect: str) -> dict:
        got = callback_params(location)
        assert got.get("iss") == issuer, (location, got)
        for k, v in expect.items():
            assert got.get(k) == v, (k, got)
        return got

    anon = Browser(server.url)
    # Errors before sign-in.
    check(anon.get("/authorize", params=auth_query(trusted, scope="openid bogus")).headers["Location"],
          error="invalid_scope")
    check(anon.get("/authorize", params=auth_query(trusted, response_type="token")).headers["Location"],
          error="unsupported_response_type")
    check(anon.get("/authorize", params=auth_query(trusted, prompt="none")).headers["Location"],
          error="login_required")
    check(anon.get("/authorize", params=auth_query(trusted, code_challenge=None)).headers["Location"],
          error="invalid_request")
    # Success, consent_required, access_denied.
    b = signed_in_browser(server, user)
    got = check(b.get("/authorize", params=auth_query(trusted)).headers["Location"])
    assert "code" in got
    check(b.get("/authorize", params=auth_query(untrusted, prompt="none")).headers["Location"],
          error="consent_required")
    consent = b.get("/authorize", params=auth_query(untrusted))
    denied = b.submit(consent, "/authorize/consent", deny="1")
    check(denied.headers["Location"], error="access_denied")
    # Fragment and form_post response modes carry it too.
    frag = b.get("/authorize", params=auth_query(trusted, response_mode="fragment")).headers["Location"]
    assert "#" in frag and parse_qs(urlsplit(frag).fragment)["iss"] == [issuer]
    form = b.get("/authorize", params=auth_query(trusted, response_mode="form_post"))
    assert form.status_code == 200
    assert f'name="iss" value="{issuer}"' in form.text and 'name="code"' in form.text


# --- R30 --------------------------------------------------------------------------------
SPOOF = {
    "X-Forwarded-For": "203.0.113.66",
    "X-Forwarded-Host": "evil.test",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Prefix": "/evil",
    "X-Real-IP": "203.0.113.66",
    "Forwarded": "for=203.0.113.66;host=evil.test;proto=https",
}


def test_r30_forwarded_headers_not_trusted_by_default(server, make_user, make_client):
    assert server.services.settings.trusted_proxies == 0
    client = make_client()
    # Issuer and endpoints do not follow spoofed X-Forwarded-Host/Proto.
    plain = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    spoofed = requests.get(server.url + "/.well-known/openid-configuration", headers=SPOOF, timeout=10).json()
    assert spoofed == plain and spoofed["issuer"] == server.url
    # Redirects stay on the provider.
    response = requests.get(server.url + "/authorize", params=auth_query(client), headers=SPOOF, timeout=10,
                            allow_redirects=False)
    location = response.headers["Location"]
    assert "evil" not in location and urljoin(server.url + "/", location).startswith(server.url + "/login")
    page = requests.get(server.url + "/login", headers=SPOOF, timeout=10)
    assert "evil.test" not in page.text
    # A spoofed sign-in still works the normal way (the request is simply not trusted).
    user = make_user()
    b = Browser(server.url)
    b.http.headers.update(SPOOF)
    response = b.sign_in(user.login, user.password)
    assert response.status_code == 303 and _is_local(response.headers["Location"], server.url)


def test_r30_proxy_fix_trusts_exactly_the_configured_hops(server):
    """With trusted_proxies=N only the last N hops are believed; with 0 nothing is: the
    address behind request.remote_addr (rate limits, audit log) cannot be spoofed."""

    def probe_app(trusted: int):
        settings = dataclasses.replace(server.services.settings, trusted_proxies=trusted)
        app = create_app(settings)

        @app.get("/__probe")
        def _probe():  # type: ignore[no-untyped-def]
            return {"addr": flask_request.remote_addr, "host": flask_request.host, "scheme": flask_request.scheme}

        return app

    headers = {"X-Forwarded-For": "203.0.113.66, 198.51.100.7", "X-Forwarded-Host": "evil.test",
               "X-Forwarded-Proto": "https"}
    for trusted, expect in (
        (0, {"addr": "10.0.0.1", "host": "idp.local", "scheme": "http"}),
        (1, {"addr": "198.51.100.7", "host": "evil.test", "scheme": "https"}),
    ):
        app = probe_app(trusted)
        try:
            got = app.test_client().get(
                "/__probe", headers=headers, base_url="http://idp.local",
                environ_base={"REMOTE_ADDR": "10.0.0.1"},
            ).get_json()
        finally:
            app.extensions["darbaza"].db.dispose()
        assert got == expect, (trusted, got)


# --- R31 --------------------------------------------------------------------------------
def test_r31_clickjacking_protection(server, make_user, make_client):
    user, client = make_user(), make_client()
    b = Browser(server.url)
    start = b.get("/authorize", params=auth_query(client))
    login = b.get(start.headers["Location"])
    after = b.submit(login, "/login", login=user.login, password=user.password)
    consent = b.get(after.headers["Location"])
    pages = {
        "authorize-redirect": start,
        "login": login,
        "consent": consent,
        "error": b.get("/authorize", params={"client_id": "nope"}),
        "expired-flow": b.get("/authorize/continue/does-not-exist"),
        "logout-confirm": b.get("/end_session"),
        "account": b.get("/"),
        "form_post": b.get("/authorize", params=auth_query(client, response_mode="form_post")),
        "not-found": b.get("/no-such-page"),
    }
    assert 'action="/authorize/consent"' in consent.text
    for name, response in pages.items():
        csp = response.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp, name
        assert response.headers.get("X-Frame-Options") == "DENY", name


# --- R33 --------------------------------------------------------------------------------
def test_r33_access_token_not_accepted_in_url_query(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    tokens = get_tokens(server, browser, client, user)
    at = tokens["access_token"]
    assert userinfo_status(server, at) == 200
    for method in ("GET", "POST"):
        response = requests.request(method, server.url + "/userinfo", params={"access_token": at}, timeout=10)
        # RFC 6750 §2.3 query transport is not supported: rejected (400 invalid_request).
        assert response.status_code in (400, 401), response.status_code
        assert "WWW-Authenticate" in response.headers
        assert user.subject not in response.text
        assert response.json()["error"] in ("invalid_request", "invalid_token", "")
    # No authorization response ever carries a token in the URL.
    b = signed_in_browser(server, user)
    location = b.get("/authorize", params=auth_query(client)).headers["Location"]
    assert "access_token" not in location and "id_token" not in location
