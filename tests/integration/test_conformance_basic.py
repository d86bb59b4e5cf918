"""OpenID conformance "Basic OP" (B1-B38) and "Config OP" (K1) as integration tests.

One test per item of docs/conformance-basic.md (checklist §1.1/§1.2 in
/work/shared/standards/oidc-security-checklist.md). Every test runs against the live
provider over real HTTP. The shared checkers below implement the suite's common checks:

- C1 ``check_authorization_response``: state unchanged, ``iss`` == discovery issuer;
- C2 ``check_error_response``: only allowed parameters, no CR/LF/TAB, no code with an error;
- C3 ``check_token_response``: 200 JSON, ``Cache-Control: no-store``, Bearer, token syntax/entropy,
  ``expires_in``;
- C4 ``check_id_token``: iss, aud, exp, iat (<= 5 min old), auth_time, acr, sub, nonce,
  signature against ``jwks_uri``, kid present and distinct kids, updated_at;
- C5 ``redeem`` does client_secret_basic (and client_secret_post for B32).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.helpers import Browser, ClientInfo, UserInfo, callback_params, pkce_pair

DISCOVERY_PATH = "/.well-known/openid-configuration"
ALLOWED_ERROR_PARAMS = {"error", "error_description", "error_uri", "state", "iss"}
PROMPT_NONE_ERRORS = {
    "login_required",
    "interaction_required",
    "account_selection_required",
    "consent_required",
}
# RFC 6749 Appendix A: access-token = 1*VSCHAR; VSCHAR = %x20-7E.
VSCHAR = re.compile(r"^[\x20-\x7e]+$")
# RFC 6749 §3.3 scope-token.
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
# BCP 47 language tag (the syntax the suite checks for *_locales_supported).
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
FIFTY_YEARS = 50 * 365 * 86400
ONE_YEAR = 366 * 86400


# --- discovery, JWKS -----------------------------------------------------------------
def discover(server: Any) -> dict[str, Any]:
    response = requests.get(server.url + DISCOVERY_PATH, timeout=10)
    assert response.status_code == 200
    return dict(response.json())


def fetch_jwks(meta: dict[str, Any]) -> dict[str, Any]:
    response = requests.get(meta["jwks_uri"], timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    jwks = dict(response.json())
    kids = [k.get("kid") for k in jwks["keys"]]
    assert jwks["keys"], "JWKS has no keys"
    assert all(kids), "every key in the JWKS needs a kid"
    assert len(kids) == len(set(kids)), f"duplicate kids in JWKS: {kids}"
    return jwks


# --- the authorization request -------------------------------------------------------
@dataclass
class Flow:
    """One run of /authorize: what was sent and what came back."""

    params: dict[str, str]  # callback parameters
    verifier: str
    response: requests.Response
    state: str | None
    nonce: str | None

    @property
    def location(self) -> str:
        return self.response.headers.get("Location", "")


def authorize(
    browser: Browser,
    client: ClientInfo,
    user: UserInfo | None,
    *,
    scope: str = "openid",
    extra: dict[str, str | None] | None = None,
    consent: bool = True,
    method: str = "GET",
) -> Flow:
    """Browser.authorize with a known state and nonce (so C1/C4 can compare them)."""
    sent: dict[str, str | None] = {
        "state": secrets.token_urlsafe(12),
        "nonce": secrets.token_urlsafe(12),
    }
    sent.update(extra or {})
    params, verifier, response = browser.authorize(
        client, user, scope=scope, extra=cast(dict[str, str], sent), consent=consent, method=method
    )
    return Flow(params, verifier, response, state=sent["state"], nonce=sent["nonce"])


def request_params(
    client: ClientInfo, *, scope: str = "openid", **extra: str | None
) -> tuple[dict[str, str], str]:
    """Authorization request parameters (code flow, PKCE S256) and the PKCE verifier."""
    verifier, challenge = pkce_pair()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": scope,
        "state": secrets.token_urlsafe(12),
        "nonce": secrets.token_urlsafe(12),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v is not None}, verifier


def is_login_page(response: requests.Response) -> bool:
    return response.status_code == 200 and 'action="/login"' in response.text


def check_authorization_response(flow: Flow, client: ClientInfo, meta: dict[str, Any]) -> str:
    """C1: a successful redirect to the registered URI with the state unchanged and the
    RFC 9207 ``iss`` equal to the discovery issuer. Returns the code."""
    assert flow.response.status_code in (302, 303), flow.response.text[:500]
    assert flow.location.startswith(client.redirect_uri + "?"), flow.location
    assert "error" not in flow.params, flow.params
    assert flow.params.get("code"), flow.params
    assert flow.params.get("state") == flow.state
    if "iss" in flow.params:
        assert flow.params["iss"] == meta["issuer"]
    # The authorization endpoint supports only response_type=code: no tokens in the front channel.
    assert not {"access_token", "id_token", "token_type"} & set(flow.params)
    return flow.params["code"]


def check_error_response(
    location: str, client: ClientInfo, meta: dict[str, Any], state: str | None, errors: set[str]
) -> dict[str, str]:
    """C1 + C2 for an error redirected to the client."""
    assert location.startswith(client.redirect_uri + "?"), location
    params = callback_params(location)
    assert params.get("error") in errors, params
    assert "code" not in params, "an error response must not carry a code"
    assert set(params) <= ALLOWED_ERROR_PARAMS, (
        f"unexpected parameters: {set(params) - ALLOWED_ERROR_PARAMS}"
    )
    assert not re.search(r"[\r\n\t]", params.get("error_description", ""))
    assert params.get("state") == state
    if "iss" in params:
        assert params["iss"] == meta["issuer"]
    return params


# --- the token endpoint ---------------------------------------------------------------
def redeem(
    server: Any,
    client: ClientInfo,
    code: str,
    verifier: str,
    *,
    auth: str = "basic",
    redirect_uri: str | None = None,
) -> requests.Response:
    """POST /token for an authorization code, authenticating the client (C5)."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri or client.redirect_uri,
        "code_verifier": verifier,
    }
    if auth == "basic":
        return requests.post(
            server.url + "/token",
            data=data,
            auth=(client.client_id, client.client_secret),
            timeout=10,
        )
    assert auth == "post"
    data.update(client_id=client.client_id, client_secret=client.client_secret or "")
    return requests.post(server.url + "/token", data=data, timeout=10)


def refresh(
    server: Any, client: ClientInfo, refresh_token: str, scope: str | None = None
) -> requests.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scope is not None:
        data["scope"] = scope
    return requests.post(
        server.url + "/token", data=data, auth=(client.client_id, client.client_secret), timeout=10
    )


def check_token_response(response: requests.Response) -> dict[str, Any]:
    """C3: HTTP 200, JSON, no-store, Bearer, a well-formed high-entropy access token,
    a valid expires_in."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0].strip() == "application/json"
    assert "no-store" in response.headers.get("Cache-Control", "")
    body = dict(response.json())
    assert body["token_type"].lower() == "bearer"
    access_token = body["access_token"]
    assert isinstance(access_token, str) and VSCHAR.match(access_token)
    assert len(access_token) >= 22, "access token too short for 128 bits of entropy"
    expires_in = body.get("expires_in")
    if expires_in is not None:
        assert isinstance(expires_in, int) and not isinstance(expires_in, bool)
        assert 0 < expires_in <= 86400
    if "refresh_token" in body:
        assert isinstance(body["refresh_token"], str) and VSCHAR.match(body["refresh_token"])
        assert len(body["refresh_token"]) >= 22
    return body


def token_error(response: requests.Response, error: str = "invalid_grant") -> None:
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["Content-Type"].split(";")[0].strip() == "application/json"
    assert response.json()["error"] == error
    assert "no-store" in response.headers.get("Cache-Control", "")


def at_hash(access_token: str) -> str:
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")


def check_id_token(
    id_token: str,
    *,
    meta: dict[str, Any],
    jwks: dict[str, Any],
    client: ClientInfo,
    nonce: str | None,
    access_token: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """C4: the suite's standard ID token checks. Returns (header, claims)."""
    raw_header = id_token.split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(raw_header + "=" * (-len(raw_header) % 4)))
    kids = [k["kid"] for k in jwks["keys"]]
    assert len(kids) == len(set(kids)), "kids in the server JWKS must be distinct"
    assert header.get("kid") in kids, "the ID token kid must name a key in jwks_uri"
    assert header.get("alg") == "RS256"
    decoded = jwt.decode(id_token, KeySet.import_key_set(jwks), algorithms=["RS256"])  # signature
    claims = dict(decoded.claims)
    now = time.time()

    assert claims["iss"] == meta["issuer"]
    aud = claims["aud"]
    assert client.client_id in (aud if isinstance(aud, list) else [aud])
    if isinstance(aud, list) and len(aud) > 1:
        assert claims.get("azp") == client.client_id
    if "azp" in claims:
        assert claims["azp"] == client.client_id
    exp = claims["exp"]
    assert isinstance(exp, int) and exp > now, "exp missing or expired"
    assert exp < now + FIFTY_YEARS, "exp looks like milliseconds"
    iat = claims["iat"]
    assert isinstance(iat, int)
    assert iat <= now + 1, "iat in the future"
    assert iat >= now - 300, "iat more than 5 minutes in the past"
    if "auth_time" in claims:
        auth_time = claims["auth_time"]
        assert isinstance(auth_time, int)
        assert auth_time <= now + 1, "auth_time in the future"
        assert auth_time >= now - ONE_YEAR, "auth_time over a year old"
    if "acr" in claims:
        assert isinstance(claims["acr"], str) and claims["acr"]
    assert isinstance(claims.get("sub"), str) and claims["sub"] and len(claims["sub"]) <= 255
    if nonce is not None:
        assert claims.get("nonce") == nonce
    else:
        assert "nonce" not in claims
    if "updated_at" in claims:
        assert isinstance(claims["updated_at"], int) and 0 < claims["updated_at"] <= now + 1
    if access_token is not None and "at_hash" in claims:
        assert claims["at_hash"] == at_hash(access_token)
    return dict(header), claims


@dataclass
class Tokens:
    body: dict[str, Any]
    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def access_token(self) -> str:
        return str(self.body["access_token"])

    @property
    def id_token(self) -> str:
        return str(self.body["id_token"])


def complete(
    server: Any,
    client: ClientInfo,
    flow: Flow,
    meta: dict[str, Any],
    jwks: dict[str, Any],
    *,
    auth: str = "basic",
) -> Tokens:
    """C1 on the callback, redeem the code (C5), C3 on the response, C4 on the ID token."""
    code = check_authorization_response(flow, client, meta)
    body = check_token_response(redeem(server, client, code, flow.verifier, auth=auth))
    header, claims = check_id_token(
        body["id_token"],
        meta=meta,
        jwks=jwks,
        client=client,
        nonce=flow.nonce,
        access_token=body["access_token"],
    )
    return Tokens(body, header, claims)


def userinfo_get(server: Any, access_token: str) -> requests.Response:
    return requests.get(
        server.url + "/userinfo", headers={"Authorization": "Bearer " + access_token}, timeout=10
    )


def check_userinfo(response: requests.Response, sub: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0].strip() == "application/json"
    info = dict(response.json())
    assert info["sub"] == sub
    return info


@pytest.fixture
def meta(server: Any) -> dict[str, Any]:
    return discover(server)


@pytest.fixture
def jwks(meta: dict[str, Any]) -> dict[str, Any]:
    return fetch_jwks(meta)


@pytest.fixture
def user(make_user: Any) -> UserInfo:
    return make_user(email=f"pupil-{secrets.token_hex(3)}@school.example.test")


@pytest.fixture
def client(make_client: Any) -> ClientInfo:
    return make_client(scopes=["openid", "profile", "email", "address", "phone", "offline_access"])


def signed_in(
    server: Any, browser: Browser, client: ClientInfo, user: UserInfo, meta: dict, jwks: dict
) -> Tokens:
    """A first complete sign-in (login + consent) in ``browser``."""
    flow = authorize(browser, client, user, scope="openid profile")
    return complete(server, client, flow, meta, jwks)


# --- B1-B38 --------------------------------------------------------------------------
def test_b1_server_happy_flow(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user, scope="openid")
    tokens = complete(server, client, flow, meta, jwks, auth="basic")
    assert tokens.claims["sub"] == user.subject
    assert tokens.claims["auth_time"] <= tokens.claims["iat"]


def test_b2_response_type_missing(server, browser, client, meta):
    params, _ = request_params(client, response_type=None)
    response = browser.get("/authorize", params=params)
    if response.status_code == 400:  # an error page is also acceptable
        assert "Location" not in response.headers
        return
    assert response.status_code == 302
    check_error_response(
        response.headers["Location"],
        client,
        meta,
        params["state"],
        {"unsupported_response_type", "invalid_request"},
    )


def test_b3_idtoken_signature_rs256(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user)
    tokens = complete(server, client, flow, meta, jwks)
    assert tokens.header["alg"] == "RS256"
    assert "RS256" in meta["id_token_signing_alg_values_supported"]
    # The signature really is checked: a flipped signature byte does not verify.
    head, payload, signature = tokens.id_token.split(".")
    tampered = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BA")
    with pytest.raises(Exception):  # noqa: B017 - any joserfc verification error
        jwt.decode(
            f"{head}.{payload}.{tampered}", KeySet.import_key_set(jwks), algorithms=["RS256"]
        )


def test_b4_idtoken_unsigned_not_advertised(server, browser, user, client, meta, jwks):
    # N/A: the suite skips oidcc-idtoken-unsigned when 'none' is not advertised. Prove that.
    assert "none" not in meta["id_token_signing_alg_values_supported"]
    flow = authorize(browser, client, user)
    tokens = complete(server, client, flow, meta, jwks)
    assert tokens.header["alg"] != "none"


def test_b5_userinfo_get(server, browser, user, client, meta, jwks):
    tokens = complete(server, client, authorize(browser, client, user), meta, jwks)
    check_userinfo(userinfo_get(server, tokens.access_token), tokens.claims["sub"])


def test_b6_userinfo_post_header(server, browser, user, client, meta, jwks):
    tokens = complete(server, client, authorize(browser, client, user), meta, jwks)
    response = requests.post(
        meta["userinfo_endpoint"],
        headers={"Authorization": "Bearer " + tokens.access_token},
        timeout=10,
    )
    check_userinfo(response, tokens.claims["sub"])


def test_b7_userinfo_post_body(server, browser, user, client, meta, jwks):
    tokens = complete(server, client, authorize(browser, client, user), meta, jwks)
    response = requests.post(
        meta["userinfo_endpoint"], data={"access_token": tokens.access_token}, timeout=10
    )
    check_userinfo(response, tokens.claims["sub"])


def test_b8_request_without_nonce_succeeds(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user, extra={"nonce": None})
    assert flow.nonce is None
    tokens = complete(server, client, flow, meta, jwks)  # checks that no nonce is in the ID token
    assert "nonce" not in tokens.claims


def _scope_flow(
    server, browser, user, client, meta, jwks, scope: str
) -> tuple[Tokens, dict[str, Any]]:
    flow = authorize(browser, client, user, scope=scope)
    tokens = complete(server, client, flow, meta, jwks)
    assert set(tokens.body["scope"].split()) == set(scope.split())
    info = check_userinfo(userinfo_get(server, tokens.access_token), user.subject)
    return tokens, info


def test_b9_scope_profile(server, browser, user, client, meta, jwks):
    _, info = _scope_flow(server, browser, user, client, meta, jwks, "openid profile")
    assert info["name"] == "Test User"
    assert info["preferred_username"] == user.login
    assert "email" not in info


def test_b10_scope_email(server, browser, user, client, meta, jwks):
    _, info = _scope_flow(server, browser, user, client, meta, jwks, "openid email")
    assert info["email"].startswith("pupil-")
    assert "name" not in info


def test_b11_scope_address(server, browser, user, client, meta, jwks):
    # Success is required; the address claim itself is only a warning when missing (no
    # postal addresses are kept for pupils, see docs/conformance-basic.md).
    _, info = _scope_flow(server, browser, user, client, meta, jwks, "openid address")
    assert "email" not in info and "name" not in info


def test_b12_scope_phone(server, browser, user, client, meta, jwks):
    # As B11: phone numbers are not kept; a missing phone_number is a warning only.
    _, info = _scope_flow(server, browser, user, client, meta, jwks, "openid phone")
    assert "email" not in info and "name" not in info


def test_b13_scope_all(server, browser, user, client, meta, jwks):
    _, info = _scope_flow(
        server, browser, user, client, meta, jwks, "openid profile email address phone"
    )
    assert info["name"] == "Test User"
    assert info["email"].startswith("pupil-")


def test_b14_alternate_happy_flow(server, browser, user, client, meta, jwks):
    # Scope order reversed and the parameters sent in a different order (RFC 6749 §3.3).
    params, verifier = request_params(client, scope="email openid")
    reordered = dict(reversed(list(params.items())))
    query = urlencode(list(reordered.items()))
    assert query.startswith("code_challenge_method=")
    response = browser.follow_until_external(browser.get("/authorize?" + query))
    assert is_login_page(response)
    response = browser.follow_until_external(
        browser.submit(response, "/login", login=user.login, password=user.password)
    )
    flow = Flow(
        callback_params(response.headers.get("Location", "")),
        verifier,
        response,
        params["state"],
        params["nonce"],
    )
    tokens = complete(server, client, flow, meta, jwks)
    assert set(tokens.body["scope"].split()) == {"openid", "email"}
    info = check_userinfo(userinfo_get(server, tokens.access_token), user.subject)
    assert "email" in info


def test_b15_display_page(server, browser, user, client, meta, jwks):
    params, _ = request_params(client, display="page")
    first = browser.follow_until_external(browser.get("/authorize", params=params))
    assert is_login_page(first), "display=page shows the normal login page"
    flow = authorize(browser, client, user, extra={"display": "page"})
    complete(server, client, flow, meta, jwks)


def test_b16_display_popup(server, browser, user, client, meta, jwks):
    params, _ = request_params(client, display="popup")
    first = browser.follow_until_external(browser.get("/authorize", params=params))
    assert is_login_page(first), "display=popup is not an error"
    flow = authorize(browser, client, user, extra={"display": "popup"})
    complete(server, client, flow, meta, jwks)


def test_b17_prompt_login_reauthenticates(server, browser, user, client, meta, jwks):
    first = signed_in(server, browser, client, user, meta, jwks)
    # At once (usually within the same second as the first sign-in): prompt=login.
    params, verifier = request_params(client, scope="openid profile", prompt="login")
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    login_page = browser.follow_until_external(response)
    assert is_login_page(login_page), "prompt=login must show the login page again"
    # Resuming the parked request without signing in must not yield a code: the
    # existing session does not count as a new authentication.
    flow_id = re.search(r'name="flow"[^>]*value="([^"]+)"', login_page.text) or re.search(
        r'value="([^"]+)"[^>]*name="flow"', login_page.text
    )
    assert flow_id is not None
    resumed = browser.follow_until_external(browser.get(f"/authorize/continue/{flow_id.group(1)}"))
    assert is_login_page(resumed), "prompt=login was satisfied by the old session"
    time.sleep(1.1)  # auth_time has a 1 s resolution; the 2nd must be strictly later
    response = browser.follow_until_external(
        browser.submit(resumed, "/login", login=user.login, password=user.password)
    )
    flow = Flow(
        callback_params(response.headers.get("Location", "")),
        verifier,
        response,
        params["state"],
        params["nonce"],
    )
    second = complete(server, client, flow, meta, jwks)
    assert second.claims["sub"] == first.claims["sub"]
    assert second.claims["auth_time"] > first.claims["auth_time"]


def test_b18_prompt_none_not_logged_in(server, browser, client, meta):
    params, _ = request_params(client, prompt="none")
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302, "prompt=none must not show any page"
    check_error_response(
        response.headers["Location"], client, meta, params["state"], PROMPT_NONE_ERRORS
    )


def test_b19_prompt_none_logged_in(server, browser, user, client, meta, jwks):
    first = signed_in(server, browser, client, user, meta, jwks)
    params, verifier = request_params(client, scope="openid profile", prompt="none")
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302, "no UI with prompt=none"
    flow = Flow(
        callback_params(response.headers["Location"]),
        verifier,
        response,
        params["state"],
        params["nonce"],
    )
    second = complete(server, client, flow, meta, jwks)
    assert second.claims["sub"] == first.claims["sub"]
    assert second.claims["auth_time"] == first.claims["auth_time"]


def test_b20_max_age_1(server, browser, user, client, meta, jwks):
    first = signed_in(server, browser, client, user, meta, jwks)
    time.sleep(2)
    params, verifier = request_params(client, scope="openid profile", max_age="1")
    login_page = browser.follow_until_external(browser.get("/authorize", params=params))
    assert is_login_page(login_page), "max_age=1 after 2 s must ask for the login again"
    response = browser.follow_until_external(
        browser.submit(login_page, "/login", login=user.login, password=user.password)
    )
    flow = Flow(
        callback_params(response.headers.get("Location", "")),
        verifier,
        response,
        params["state"],
        params["nonce"],
    )
    second = complete(server, client, flow, meta, jwks)
    assert "auth_time" in second.claims, "auth_time is required when max_age was sent"
    assert second.claims["auth_time"] > first.claims["auth_time"]
    assert abs(second.claims["auth_time"] - time.time()) < 10
    assert second.claims["sub"] == first.claims["sub"]


def test_b21_max_age_10000(server, browser, user, client, meta, jwks):
    flow1 = authorize(browser, client, user, scope="openid profile", extra={"max_age": "15000"})
    first = complete(server, client, flow1, meta, jwks)
    # The second request must not show any page (no user to sign in with, no consent).
    flow2 = authorize(
        browser, client, None, scope="openid profile", extra={"max_age": "10000"}, consent=False
    )
    second = complete(server, client, flow2, meta, jwks)
    assert "auth_time" in first.claims and "auth_time" in second.claims
    assert second.claims["auth_time"] == first.claims["auth_time"], (
        "auth_time must be the real login time"
    )


def test_b22_unknown_parameter_ignored(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user, extra={"extra": "foobar"})
    complete(server, client, flow, meta, jwks)


def test_b23_id_token_hint(server, browser, user, client, meta, jwks):
    first = signed_in(server, browser, client, user, meta, jwks)
    params, verifier = request_params(
        client, scope="openid profile", prompt="none", id_token_hint=first.id_token
    )
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302, "no UI expected"
    flow = Flow(
        callback_params(response.headers["Location"]),
        verifier,
        response,
        params["state"],
        params["nonce"],
    )
    second = complete(server, client, flow, meta, jwks)
    assert second.claims["sub"] == first.claims["sub"]


def test_b24_login_hint(server, browser, user, client, meta, jwks):
    params, _ = request_params(client, login_hint=user.login)
    page = browser.follow_until_external(browser.get("/authorize", params=params))
    assert is_login_page(page)
    assert f'value="{user.login}"' in page.text, "the login field is prefilled from login_hint"
    flow = authorize(browser, client, user, extra={"login_hint": user.login})
    complete(server, client, flow, meta, jwks)


def test_b25_ui_locales(server, browser, user, client, meta, jwks):
    params, _ = request_params(client, ui_locales="ru")
    page = browser.follow_until_external(browser.get("/authorize", params=params))
    assert is_login_page(page)
    flow = authorize(browser, client, user, extra={"ui_locales": "ru"})
    complete(server, client, flow, meta, jwks)


def test_b26_claims_locales(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user, scope="openid profile", extra={"claims_locales": "se"})
    tokens = complete(server, client, flow, meta, jwks)
    check_userinfo(userinfo_get(server, tokens.access_token), user.subject)


def test_b27_acr_values(server, browser, user, client, meta, jwks):
    advertised = meta["acr_values_supported"]
    assert advertised
    flow = authorize(browser, client, user, extra={"acr_values": " ".join(advertised)})
    tokens = complete(server, client, flow, meta, jwks)
    assert tokens.claims.get("acr") in advertised  # a SHOULD in the suite (warning); we do it


def test_b28_code_reuse_at_once(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user)
    code = check_authorization_response(flow, client, meta)
    barrier = threading.Barrier(2)
    results: list[requests.Response] = []
    lock = threading.Lock()

    def exchange() -> None:
        barrier.wait(timeout=10)
        response = redeem(server, client, code, flow.verifier)
        with lock:
            results.append(response)

    threads = [threading.Thread(target=exchange) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2
    ok = [r for r in results if r.status_code == 200]
    failed = [r for r in results if r.status_code != 200]
    # R27: of parallel requests exactly one succeeds; the other gets invalid_grant.
    assert len(ok) == 1 and len(failed) == 1, [r.status_code for r in results]
    token_error(failed[0], "invalid_grant")
    # R27 / ASVS 10.4.2: the code was used twice, so the tokens issued from it are revoked,
    # even when the replay was detected before the winning request had minted them.
    winner = check_token_response(ok[0])
    assert userinfo_get(server, winner["access_token"]).status_code == 401
    token_error(refresh(server, client, winner["refresh_token"]), "invalid_grant")
    # Sequentially, once more: still invalid_grant.
    token_error(redeem(server, client, code, flow.verifier), "invalid_grant")


def test_b29_code_reuse_revokes_tokens(server, browser, user, client, meta, jwks):
    flow = authorize(browser, client, user)
    code = check_authorization_response(flow, client, meta)
    tokens = check_token_response(redeem(server, client, code, flow.verifier))
    check_userinfo(userinfo_get(server, tokens["access_token"]), user.subject)
    # The suite waits 30 s first; the provider's answer does not depend on the wait.
    token_error(redeem(server, client, code, flow.verifier), "invalid_grant")
    revoked = userinfo_get(server, tokens["access_token"])
    assert revoked.status_code == 401, "tokens from a replayed code must be revoked"
    assert "invalid_token" in revoked.headers.get("WWW-Authenticate", "")
    token_error(refresh(server, client, tokens["refresh_token"]), "invalid_grant")


def test_b30_unregistered_redirect_uri(server, browser, client, meta):
    for bad in (
        "https://attacker.example.test/cb",
        client.redirect_uri + "/x",
        client.redirect_uri + "?x=1",
    ):
        params, _ = request_params(client, redirect_uri=bad)
        response = browser.get("/authorize", params=params)
        assert response.status_code == 400, bad
        assert "Location" not in response.headers
        assert "text/html" in response.headers["Content-Type"]
        assert (
            'href="https://attacker' not in response.text
            and 'action="https://attacker' not in response.text
        )


def test_b31_post_authorization_request(server, browser, user, client, meta, jwks):
    started = time.time()
    flow = authorize(browser, client, user, method="POST")
    complete(server, client, flow, meta, jwks)
    assert time.time() - started < 30


def test_b32_client_secret_post(server, browser, user, make_client, meta, jwks):
    assert "client_secret_post" in meta["token_endpoint_auth_methods_supported"]
    client = make_client(scopes=["openid", "profile"], auth_method="client_secret_post")
    flow = authorize(browser, client, user)
    tokens = complete(server, client, flow, meta, jwks, auth="post")
    assert tokens.claims["sub"] == user.subject
    # The registered method is enforced: Basic is refused for this client.
    flow = authorize(browser, client, None, consent=False)
    code = check_authorization_response(flow, client, meta)
    token_error(redeem(server, client, code, flow.verifier, auth="basic"), "invalid_client")


def _unsigned_request_object(client: ClientInfo, **claims: Any) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    body = {"response_type": "code", "client_id": client.client_id, "scope": "openid", **claims}
    return b64({"alg": "none"}) + "." + b64(body) + "."


def test_b33_request_uri_rejected_as_unsupported(server, browser, user, client, meta):
    assert meta.get("request_uri_parameter_supported") is False
    browser.sign_in(user.login, user.password)  # rejected even with a session, before any UI
    params, _ = request_params(client, request_uri="https://rp.example.test/request.jwt")
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302
    check_error_response(
        response.headers["Location"], client, meta, params["state"], {"request_uri_not_supported"}
    )


def test_b34_request_object_rejected_as_unsupported(server, browser, user, client, meta):
    assert meta.get("request_parameter_supported") is False
    browser.sign_in(user.login, user.password)
    params, _ = request_params(
        client, request=_unsigned_request_object(client, state="from-object")
    )
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302, "the request object must not be ignored"
    check_error_response(
        response.headers["Location"], client, meta, params["state"], {"request_not_supported"}
    )


def test_b35_claims_essential(server, browser, user, client, meta, jwks):
    claims = json.dumps({"userinfo": {"name": {"essential": True}}})
    flow = authorize(browser, client, user, scope="openid", extra={"claims": claims})
    tokens = complete(server, client, flow, meta, jwks)
    check_userinfo(userinfo_get(server, tokens.access_token), user.subject)
    # The claims parameter is not supported and not advertised, so 'name' is released by
    # the profile scope only; the suite gives a warning (not a failure) when it is missing.
    assert meta.get("claims_parameter_supported") is False
    flow = authorize(browser, client, None, scope="openid profile", extra={"claims": claims})
    tokens = complete(server, client, flow, meta, jwks)
    assert (
        check_userinfo(userinfo_get(server, tokens.access_token), user.subject)["name"]
        == "Test User"
    )


def test_b36_request_object_redirect_uri_not_used(server, browser, user, make_client, meta):
    client = make_client(
        scopes=["openid"],
        redirect_uris=["https://rp.example.test/cb", "https://rp.example.test/other"],
    )
    browser.sign_in(user.login, user.password)
    request_object = _unsigned_request_object(client, redirect_uri="https://rp.example.test/other")
    params, _ = request_params(client, request=request_object)
    response = browser.get("/authorize", params=params)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert not location.startswith("https://rp.example.test/other")
    check_error_response(location, client, meta, params["state"], {"request_not_supported"})


def test_b37_refresh_token(server, browser, user, client, make_client, meta, jwks):
    assert "offline_access" in meta["scopes_supported"]
    scope = "openid profile offline_access"
    flow = authorize(browser, client, user, scope=scope, extra={"prompt": "consent"})
    first = complete(server, client, flow, meta, jwks)
    assert first.body.get("refresh_token"), "no refresh token issued"
    time.sleep(1.05)  # so that the refreshed ID token has a strictly newer iat
    response = refresh(server, client, first.body["refresh_token"], scope=first.body["scope"])
    body = check_token_response(response)
    assert body["refresh_token"] != first.body["refresh_token"]
    check_userinfo(userinfo_get(server, body["access_token"]), user.subject)
    if "id_token" in body:
        _, claims = check_id_token(
            body["id_token"],
            meta=meta,
            jwks=jwks,
            client=client,
            nonce=None,
            access_token=body["access_token"],
        )
        for name in ("iss", "sub", "aud", "auth_time", "azp"):
            assert claims.get(name) == first.claims.get(name), name
        assert claims["iat"] > first.claims["iat"]
    # A refresh token of client 2 presented by client 1: HTTP 400 JSON invalid_grant.
    other = make_client(scopes=["openid", "offline_access"])
    other_flow = authorize(
        browser, other, None, scope="openid offline_access", extra={"prompt": "consent"}
    )
    other_tokens = complete(server, other, other_flow, meta, jwks)
    stolen = refresh(server, client, other_tokens.body["refresh_token"])
    assert stolen.status_code == 400
    token_error(stolen, "invalid_grant")
    # ... and it did not burn the other client's token.
    check_token_response(refresh(server, other, other_tokens.body["refresh_token"]))


def test_b38_valid_pkce_succeeds(server, browser, user, client, meta, jwks):
    assert meta["code_challenge_methods_supported"] == ["S256"]
    flow = authorize(browser, client, user)
    complete(server, client, flow, meta, jwks)
    # The verifier is really checked: a wrong one fails.
    flow = authorize(browser, client, None, consent=False)
    code = check_authorization_response(flow, client, meta)
    token_error(redeem(server, client, code, pkce_pair()[0]), "invalid_grant")


# --- K1 ------------------------------------------------------------------------------
def _check_metadata(meta: dict[str, Any], issuer: str) -> None:
    assert meta["issuer"] == issuer
    for name in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
        assert isinstance(meta.get(name), str) and meta[name], name
    endpoints = {k: v for k, v in meta.items() if k.endswith("_endpoint") or k == "jwks_uri"}
    for name, value in endpoints.items():
        parts = urlsplit(value)
        assert parts.scheme == urlsplit(issuer).scheme and value.startswith(issuer + "/"), (
            name,
            value,
        )
        assert not parts.fragment, name
    assert "code" in meta["response_types_supported"]
    assert meta["subject_types_supported"] and set(meta["subject_types_supported"]) <= {
        "public",
        "pairwise",
    }
    assert "RS256" in meta["id_token_signing_alg_values_supported"]
    assert "none" not in meta["id_token_signing_alg_values_supported"]
    assert "openid" in meta["scopes_supported"]
    assert all(isinstance(s, str) and SCOPE_TOKEN.match(s) for s in meta["scopes_supported"])
    assert isinstance(meta["grant_types_supported"], list) and meta["grant_types_supported"]
    assert "authorization_code" in meta["grant_types_supported"]
    assert (
        "implicit" not in meta["grant_types_supported"]
        and "password" not in meta["grant_types_supported"]
    )
    assert isinstance(meta["code_challenge_methods_supported"], list)
    assert "plain" not in meta["code_challenge_methods_supported"]
    for name in ("ui_locales_supported", "claims_locales_supported"):
        if name in meta:
            assert all(LANGUAGE_TAG.match(tag) for tag in meta[name]), name
    # Schema: arrays of strings, booleans, strings.
    for name, value in meta.items():
        if name.endswith("_supported") and not isinstance(value, bool):
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), name
        if name in {
            "claims_parameter_supported",
            "request_parameter_supported",
            "request_uri_parameter_supported",
            "require_request_uri_registration",
            "authorization_response_iss_parameter_supported",
        }:
            assert isinstance(value, bool), name
    assert {"sub", "iss", "aud", "exp", "iat"} <= set(meta.get("claims_supported", []))


def test_k1_discovery(server, meta):
    response = requests.get(server.url + DISCOVERY_PATH, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0].strip() == "application/json"
    fetched_from = response.url[: -len(DISCOVERY_PATH)]
    _check_metadata(response.json(), fetched_from)

    # https: the test server is plain http on loopback, so here the issuer may only be https
    # or http on a loopback address. The suite's "valid https URL, all endpoints https" rule
    # is checked below on a second app built with a production-style https issuer (same
    # database, Redis and keys), served through Flask's test client.
    issuer_parts = urlsplit(meta["issuer"])
    if issuer_parts.scheme != "https":
        assert (
            issuer_parts.scheme == "http"
            and ipaddress.ip_address(issuer_parts.hostname or "").is_loopback
        )
    jwks = fetch_jwks(meta)
    KeySet.import_key_set(jwks)
    for key in jwks["keys"]:
        assert key["kty"] == "RSA" and key.get("use", "sig") == "sig" and "d" not in key

    from idp.app import create_app
    from idp.config import Settings

    live = server.services.settings
    https_issuer = "https://id.school.example.test"
    app = create_app(
        Settings.from_env(
            environ={},
            issuer=https_issuer,
            database_url=live.database_url,
            redis_url=live.redis_url,
            secret_key=live.secret_key,  # the same keys (they are stored encrypted)
            data_key=live.data_key,
            testing=True,
        )
    )
    try:
        with app.test_client() as http:
            doc = http.get(DISCOVERY_PATH, base_url=https_issuer)
            assert doc.status_code == 200 and doc.mimetype == "application/json"
            https_meta = doc.get_json()
            _check_metadata(https_meta, https_issuer)
            endpoints = [
                v for k, v in https_meta.items() if k.endswith("_endpoint") or k == "jwks_uri"
            ]
            assert all(v.startswith("https://") for v in endpoints), endpoints
            keys = http.get(
                urlsplit(https_meta["jwks_uri"]).path, base_url=https_issuer
            ).get_json()["keys"]
            kids = [k["kid"] for k in keys]
            assert kids and len(kids) == len(set(kids))
    finally:
        svc = app.extensions["darbaza"]
        svc.db.remove()
        svc.db.dispose()
        svc.redis.close()


def test_helpers_reject_bad_id_tokens(server, meta, jwks, client, user):
    """The C4 checker itself fails on a wrong nonce, a wrong audience and a foreign signature."""
    from joserfc.jwk import RSAKey

    from idp.accounts.models import User
    from idp.oidc.models import Client
    from idp.oidc.tokens import GrantContext

    svc = server.services
    with svc.db.transaction() as session:
        db_client = session.query(Client).filter_by(client_id=client.client_id).one()
        db_user = session.get(User, user.id)
        good = svc.tokens.id_token(
            client=db_client,
            user=db_user,
            scope="openid",
            context=GrantContext(family_id="x", nonce="n1"),
            access_token=None,
        )
    check_id_token(good, meta=meta, jwks=jwks, client=client, nonce="n1")
    with pytest.raises(AssertionError):
        check_id_token(good, meta=meta, jwks=jwks, client=client, nonce="other")
    with pytest.raises(AssertionError):
        check_id_token(
            good, meta=meta, jwks=jwks, client=ClientInfo("someone-else", None, "", ""), nonce="n1"
        )
    stranger = RSAKey.generate_key(2048, private=True)
    claims = jwt.decode(good, KeySet.import_key_set(jwks), algorithms=["RS256"]).claims
    forged = jwt.encode({"alg": "RS256", "kid": jwks["keys"][0]["kid"]}, dict(claims), stranger)
    with pytest.raises(Exception):  # noqa: B017 - joserfc's signature error
        check_id_token(forged, meta=meta, jwks=jwks, client=client, nonce="n1")
