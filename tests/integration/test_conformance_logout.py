"""OpenID Foundation `oidcc-rp-initiated-logout-certification-test-plan` (checklist §1.3,
L1-L11), run against the live provider over real HTTP.

Rules the provider follows (OIDC RP-Initiated Logout 1.0 §2-§4, Authlib P13):
- a valid ``id_token_hint`` of the signed-in user ends the session at once and, when the
  ``post_logout_redirect_uri`` is registered *exactly*, redirects there with ``state``;
- anything doubtful (no hint, a forged or foreign hint, an unregistered URI) never redirects;
  a signed-in user is asked to confirm, and nobody is signed out without that.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from urllib.parse import urlsplit

import requests
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.helpers import Browser, ClientInfo, UserInfo


# --- helpers ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: dict) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _header(token: str) -> dict:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))


def sign_in_and_get_tokens(server, browser: Browser, client: ClientInfo, user: UserInfo) -> dict:
    """Authorization code flow with PKCE through the browser; returns the token response."""
    params, verifier, _ = browser.authorize(client, user, scope="openid profile")
    assert "code" in params, params
    response = requests.post(
        server.url + "/token",
        data={
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": client.redirect_uri,
            "code_verifier": verifier,
        },
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def is_signed_in(browser: Browser, client: ClientInfo) -> bool:
    """prompt=none answers a code only while the OP session is alive."""
    params, _, _ = browser.authorize(client, None, extra={"prompt": "none"})
    if "code" in params:
        return True
    assert params.get("error") in {"login_required", "interaction_required"}, params
    return False


def assert_no_redirect(response: requests.Response) -> None:
    assert response.status_code not in (301, 302, 303, 307, 308), response.headers.get("Location")
    assert "Location" not in response.headers
    assert response.status_code in (200, 400), response.status_code
    assert "text/html" in response.headers["Content-Type"]
    assert "Traceback" not in response.text


def is_confirmation_page(response: requests.Response) -> bool:
    return response.status_code == 200 and 'action="/end_session/confirm"' in response.text


def is_logged_out_page(response: requests.Response) -> bool:
    # logged_out.html: a sign-in link, and no form asking to confirm anything.
    return (
        response.status_code == 200
        and 'href="/login"' in response.text
        and "/end_session/confirm" not in response.text
    )


def confirm_logout(browser: Browser, page: requests.Response) -> requests.Response:
    response = browser.submit(page, "/end_session/confirm")
    assert_no_redirect(response)
    assert is_logged_out_page(response), response.text[:500]
    return response


def alg_none(token: str) -> str:
    """The same claims with ``alg: none`` and no signature (L4)."""
    header = dict(_header(token), alg="none")
    head, payload = _b64json(header), token.split(".")[1]
    return f"{head}.{payload}."


def foreign_signed(token: str) -> str:
    """The same claims and kid, signed with a key that is not the provider's (L11)."""
    key = RSAKey.generate_key(2048, private=True)
    header = {"alg": "RS256", "typ": "JWT", "kid": _header(token)["kid"]}
    return jwt.encode(header, _claims(token), key, algorithms=["RS256"])


# --- L1 ---------------------------------------------------------------------------------
def test_l1_discovery_has_end_session_endpoint(server):
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    endpoint = meta["end_session_endpoint"]
    assert endpoint == meta["issuer"] + "/end_session"
    # The test issuer is plain-http loopback; the endpoint shares the issuer's scheme and
    # host, so with the production https issuer it is https (also checked in R25).
    assert urlsplit(endpoint).scheme == urlsplit(meta["issuer"]).scheme
    assert urlsplit(endpoint).netloc == urlsplit(meta["issuer"]).netloc
    # The endpoint answers (a logged-out page for a browser without a session).
    page = requests.get(endpoint, timeout=10, allow_redirects=False)
    assert page.status_code == 200


# --- L2 ---------------------------------------------------------------------------------
def test_l2_logout_with_hint_redirects_with_state_and_ends_session(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    assert is_signed_in(browser, client)
    state = secrets.token_urlsafe(12)
    response = browser.get(
        "/end_session",
        params={
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": client.post_logout_redirect_uri,
            "state": state,
        },
    )
    assert response.status_code in (302, 303)
    location = response.headers["Location"]
    assert location == f"{client.post_logout_redirect_uri}?state={state}"
    # The session really ended: prompt=none now fails, the session's tokens are revoked.
    assert not is_signed_in(browser, client)
    userinfo = requests.get(
        server.url + "/userinfo", headers={"Authorization": "Bearer " + tokens["access_token"]}, timeout=10
    )
    assert userinfo.status_code == 401


# --- L3 ---------------------------------------------------------------------------------
def test_l3_unregistered_post_logout_redirect_uri_is_not_followed(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    for bad in ("https://evil.test/bye", "https://rp.example.test/other", "https://rp.example.test/bye/"):
        response = browser.get(
            "/end_session",
            params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": bad, "state": "s"},
        )
        assert_no_redirect(response)
        # Nothing on the page leads to the unregistered address.
        assert f'href="{bad}' not in response.text and f'action="{bad}' not in response.text
        assert is_logged_out_page(response) or is_confirmation_page(response)


# --- L4 ---------------------------------------------------------------------------------
def test_l4_modified_id_token_hint_alg_none_is_rejected(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    forged = alg_none(tokens["id_token"])
    response = browser.get(
        "/end_session",
        params={"id_token_hint": forged, "post_logout_redirect_uri": client.post_logout_redirect_uri, "state": "s"},
    )
    assert_no_redirect(response)
    # A forged hint is no proof: the user is asked, and stays signed in until they confirm.
    assert is_confirmation_page(response)
    assert is_signed_in(browser, client)


# --- L5 ---------------------------------------------------------------------------------
def test_l5_no_id_token_hint_means_no_redirect(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    sign_in_and_get_tokens(server, browser, client, user)
    response = browser.get(
        "/end_session",
        params={"post_logout_redirect_uri": client.post_logout_redirect_uri, "state": "s", "client_id": client.client_id},
    )
    assert_no_redirect(response)
    assert is_confirmation_page(response)
    assert is_signed_in(browser, client)
    # Confirming signs out, still without sending the user anywhere.
    page = browser.get(
        "/end_session", params={"post_logout_redirect_uri": client.post_logout_redirect_uri, "state": "s"}
    )
    confirm_logout(browser, page)
    assert not is_signed_in(browser, client)


# --- L6 ---------------------------------------------------------------------------------
def test_l6_no_params_logs_out_after_confirmation(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    sign_in_and_get_tokens(server, browser, client, user)
    page = browser.get("/end_session")
    assert_no_redirect(page)
    assert is_confirmation_page(page)
    confirm_logout(browser, page)
    assert not is_signed_in(browser, client)
    # Without a session the same request shows the logged-out page directly.
    again = browser.get("/end_session")
    assert_no_redirect(again)
    assert is_logged_out_page(again)


# --- L7 ---------------------------------------------------------------------------------
def test_l7_no_post_logout_redirect_uri_shows_logged_out_page(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    response = browser.get("/end_session", params={"id_token_hint": tokens["id_token"], "state": "s"})
    assert_no_redirect(response)
    assert is_logged_out_page(response)
    assert not is_signed_in(browser, client)


# --- L8 ---------------------------------------------------------------------------------
def test_l8_no_state_redirects_without_state(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    response = browser.get(
        "/end_session",
        params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": client.post_logout_redirect_uri},
    )
    assert response.status_code in (302, 303)
    assert response.headers["Location"] == client.post_logout_redirect_uri
    assert "state" not in response.headers["Location"]
    assert not is_signed_in(browser, client)


# --- L9 ---------------------------------------------------------------------------------
def test_l9_only_state_logs_out_with_logged_out_page(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    sign_in_and_get_tokens(server, browser, client, user)
    page = browser.get("/end_session", params={"state": "only-state"})
    assert_no_redirect(page)
    assert is_confirmation_page(page)
    done = confirm_logout(browser, page)
    assert "only-state" not in done.text
    assert not is_signed_in(browser, client)


# --- L10 --------------------------------------------------------------------------------
def test_l10_query_added_to_post_logout_redirect_uri_is_not_followed(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    response = browser.get(
        "/end_session",
        params={
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": client.post_logout_redirect_uri + "?foo=bar",
            "state": "s",
        },
    )
    assert_no_redirect(response)
    assert is_logged_out_page(response) or is_confirmation_page(response)


# --- L11 --------------------------------------------------------------------------------
def test_l11_id_token_hint_signed_by_foreign_key_is_rejected(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    tokens = sign_in_and_get_tokens(server, browser, client, user)
    forged = foreign_signed(tokens["id_token"])
    # Same claims, same kid, fresh timestamps: only the signature differs.
    assert _claims(forged)["sub"] == user.subject and _claims(forged)["exp"] > time.time()
    response = browser.get(
        "/end_session",
        params={"id_token_hint": forged, "post_logout_redirect_uri": client.post_logout_redirect_uri, "state": "s"},
    )
    assert_no_redirect(response)
    assert is_confirmation_page(response)
    assert is_signed_in(browser, client)
    # Without any session a foreign hint still does not redirect.
    fresh = Browser(server.url)
    response = fresh.get(
        "/end_session",
        params={"id_token_hint": forged, "post_logout_redirect_uri": client.post_logout_redirect_uri, "state": "s"},
    )
    assert_no_redirect(response)
