"""The whole journey a portal app makes, with a real OIDC client library over real HTTP:
discovery -> authorize -> sign in -> code -> token -> ID token checked against JWKS ->
userinfo -> refresh (rotation; reuse revokes the family) -> revoke -> introspect ->
end_session."""

from __future__ import annotations

import time

import requests
from authlib.integrations.requests_client import OAuth2Session

from tests.helpers import decode_verified


def test_full_journey(server, browser, make_user, make_client):
    user = make_user(roles=("student",), email="aibek@example.test")
    client = make_client(name="E-journal", scopes=["openid", "profile", "email", "roles", "school"])
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["issuer"] == server.url
    jwks = requests.get(meta["jwks_uri"], timeout=10).json()

    rp = OAuth2Session(
        client.client_id,
        client.client_secret,
        scope="openid profile email roles",
        redirect_uri=client.redirect_uri,
        code_challenge_method="S256",
    )
    verifier = rp.create_code_verifier if False else None  # Authlib makes one per request below
    from authlib.common.security import generate_token

    verifier = generate_token(48)
    url, state = rp.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier, nonce="n-0S6")
    response = browser.get(url)
    response = browser.follow_until_external(response)
    assert 'action="/login"' in response.text
    response = browser.submit(response, "/login", login=user.login, password=user.password)
    response = browser.follow_until_external(response)
    callback = response.headers["Location"]
    assert callback.startswith(client.redirect_uri)
    assert "iss=" in callback

    token = rp.fetch_token(meta["token_endpoint"], authorization_response=callback, code_verifier=verifier, state=state)
    assert token["token_type"].lower() == "bearer"
    header, claims = decode_verified(token["id_token"], jwks)
    assert header["alg"] == "RS256" and header["kid"]
    assert claims["iss"] == server.url
    assert claims["aud"] == client.client_id
    assert claims["sub"] == user.subject
    assert claims["nonce"] == "n-0S6"
    assert claims["amr"] == ["pwd"]
    assert claims["acr"]
    assert claims["sid"]
    assert abs(claims["auth_time"] - time.time()) < 60
    at_header, at_claims = decode_verified(token["access_token"], jwks)
    assert at_header["typ"] == "at+jwt"
    assert at_claims["sid"] == claims["sid"] and at_claims["jti"] and at_claims["roles"] == ["student"]

    info = rp.get(meta["userinfo_endpoint"]).json()
    assert info["sub"] == user.subject
    assert info["email"] == "aibek@example.test"
    assert info["roles"] == ["student"]
    assert info["school"]

    # Refresh rotates the refresh token.
    first_refresh = token["refresh_token"]
    new = rp.refresh_token(meta["token_endpoint"], refresh_token=first_refresh)
    assert new["refresh_token"] != first_refresh
    # Reusing the old one fails and revokes the family, including the new one.
    reuse = requests.post(
        meta["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": first_refresh},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    again = requests.post(
        meta["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": new["refresh_token"]},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert again.json()["error"] == "invalid_grant"
    assert requests.get(
        meta["userinfo_endpoint"], headers={"Authorization": "Bearer " + new["access_token"]}, timeout=10
    ).status_code == 401

    # A new sign-in flow for revoke + introspect.
    params, verifier2, _ = browser.authorize(client, user, scope="openid profile")
    tok2 = requests.post(
        meta["token_endpoint"],
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier2},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    ).json()
    intro = requests.post(
        meta["introspection_endpoint"], data={"token": tok2["access_token"]},
        auth=(client.client_id, client.client_secret), timeout=10,
    ).json()
    assert intro["active"] is True and intro["sub"] == user.subject
    revoked = requests.post(
        meta["revocation_endpoint"], data={"token": tok2["refresh_token"], "token_type_hint": "refresh_token"},
        auth=(client.client_id, client.client_secret), timeout=10,
    )
    assert revoked.status_code == 200
    intro = requests.post(
        meta["introspection_endpoint"], data={"token": tok2["access_token"]},
        auth=(client.client_id, client.client_secret), timeout=10,
    ).json()
    assert intro == {"active": False}

    # RP-initiated logout with a valid id_token_hint redirects with the state.
    logout = browser.get(
        meta["end_session_endpoint"],
        params={"id_token_hint": tok2["id_token"], "post_logout_redirect_uri": client.post_logout_redirect_uri,
                "state": "bye"},
    )
    assert logout.status_code in (302, 303)
    assert logout.headers["Location"] == client.post_logout_redirect_uri + "?state=bye"
    # The session is really gone: prompt=none now answers login_required.
    params, _, _ = browser.authorize(client, None, extra={"prompt": "none"})
    assert params["error"] == "login_required"
