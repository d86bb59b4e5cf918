"""JWT attacks on every token input the provider accepts (ASVS 9.1.1-9.1.3, 9.2.1-9.2.3;
checklist L4, L11; issue 9 "JWT alg: none / HS256-with-public-key / foreign kid / jwk
header on every token input").

Token inputs (found in idp/oidc): ``id_token_hint`` at /authorize (GET and POST) and at
/end_session (GET and POST); access tokens (RS256 JWTs) as Bearer at /userinfo and at the
admin API, and as ``access_token`` in the /userinfo body; any token at /introspect and
/revoke; ``client_assertion`` at /token (private_key_jwt and client_secret_jwt are not
supported: ``token_endpoint_auth_methods_supported`` lists neither, so any assertion is
``invalid_client``); request objects (``request=``; ``request_parameter_supported`` is
false: ``request_not_supported``). The logout token is outgoing only (the provider never
reads one).

Each input gets: ``alg: none`` (four spellings, with and without a signature), HS256 /
HS512 keyed with the provider's public key (PEM and JWK JSON bytes), an attacker's key
under a foreign ``kid`` and under the provider's own ``kid``, an embedded ``jwk`` header,
``jku`` / ``x5u`` headers pointing at a loopback server (which must never be fetched),
an unknown ``crit`` header, ES256 by an attacker; and with the provider's real key:
expired, wrong ``iss``, wrong ``typ`` (an access token where an ID token is expected).
Never accepted, never a 5xx, the error the spec names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from idp.access.permissions import PERMISSIONS
from tests.helpers import Browser, ClientInfo, UserInfo, callback_params, pkce_pair

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# --- a loopback server that counts fetches (jku / x5u must never be followed) --------------------
class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Counter.hits.append(self.path)
        body = b'{"keys": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def key_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Counter.hits = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# --- crafting -------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(payload)))


def _hmac(header: dict[str, Any], claims: dict[str, Any], secret: bytes, alg: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_b64json(dict(header, alg=alg))}.{_b64json(claims)}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


ATTACKER = RSAKey.generate_key(2048, private=True, parameters={"kid": "attacker-" + secrets.token_hex(4)})


def _rs256_by_attacker(header: dict[str, Any], payload: bytes) -> str:
    """Signed by hand: a JOSE library refuses to write some of these headers (crit)."""
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    signing_input = f"{_b64json(header)}.{_b64(payload)}"
    signature = ATTACKER.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"
ATTACKER_EC = ECKey.generate_key("P-256", private=True)

FORGERIES = [
    "alg_none", "alg_None", "alg_NONE", "alg_nOnE", "alg_none_with_signature", "alg_empty",
    "hs256_public_pem", "hs256_public_jwk_json", "hs512_public_pem", "hs256_public_der_b64",
    "foreign_kid", "attacker_key_provider_kid", "no_kid_attacker_key", "jwk_header", "jwk_header_provider_kid",
    "jku_header", "x5u_header", "crit_header_attacker", "es256_attacker", "signature_stripped",
    "claims_swapped_signature_kept",
]
# Signed with the provider's real key, but not valid for the input.
REAL_KEY_INVALID = ["expired", "wrong_iss"]


def forge(kind: str, token: str, provider_jwk: dict[str, Any], key_host: str) -> str:
    """A token with ``token``'s header and claims (real sub, jti, aud) that must be refused."""
    header, claims = parts(token)
    if kind.startswith("alg_") and kind != "alg_none_with_signature":
        alg = {"alg_none": "none", "alg_None": "None", "alg_NONE": "NONE", "alg_nOnE": "nOnE", "alg_empty": ""}[kind]
        return f"{_b64json(dict(header, alg=alg))}.{_b64json(claims)}."
    if kind == "alg_none_with_signature":
        return f"{_b64json(dict(header, alg='none'))}.{_b64json(claims)}.{token.split('.')[2]}"
    public = RSAKey.import_key(provider_jwk)
    if kind == "hs256_public_pem":
        return _hmac(header, claims, public.as_pem(private=False), "HS256")
    if kind == "hs512_public_pem":
        return _hmac(header, claims, public.as_pem(private=False), "HS512")
    if kind == "hs256_public_jwk_json":
        return _hmac(header, claims, json.dumps(provider_jwk).encode(), "HS256")
    if kind == "hs256_public_der_b64":
        return _hmac(header, claims, public.as_der(private=False), "HS256")
    if kind == "signature_stripped":
        return token.rsplit(".", 1)[0] + "."
    if kind == "claims_swapped_signature_kept":
        changed = dict(claims, sub="someone-else", exp=int(time.time()) + 86400 * 365)
        head, _payload, sig = token.split(".")
        return f"{head}.{_b64json(changed)}.{sig}"
    payload = json.dumps(claims).encode()
    if kind == "es256_attacker":
        new = dict(header, alg="ES256", kid=header.get("kid"))
        return jws.serialize_compact(new, payload, ATTACKER_EC, algorithms=["ES256"])
    new = dict(header, alg="RS256")
    if kind == "foreign_kid":
        new["kid"] = ATTACKER.kid
    elif kind == "no_kid_attacker_key":
        new.pop("kid", None)
    elif kind == "jwk_header":
        new.update(kid=ATTACKER.kid, jwk=ATTACKER.as_dict(private=False))
    elif kind == "jwk_header_provider_kid":
        new["jwk"] = ATTACKER.as_dict(private=False)
    elif kind == "jku_header":
        new.update(kid=ATTACKER.kid, jku=key_host + "/jwks.json")
    elif kind == "x5u_header":
        new.update(kid=ATTACKER.kid, x5u=key_host + "/cert.pem")
    elif kind == "crit_header_attacker":
        new.update(crit=["x-trust-me"], **{"x-trust-me": True})
    elif kind != "attacker_key_provider_kid":  # pragma: no cover
        raise AssertionError(kind)
    return _rs256_by_attacker(new, payload)


def real_key_variant(kind: str, token: str, server: Any) -> str:
    header, claims = parts(token)
    if kind == "expired":
        claims = dict(claims, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    elif kind == "wrong_iss":
        claims = dict(claims, iss="https://evil.test")
    else:  # pragma: no cover
        raise AssertionError(kind)
    key = server.services.keys.signing_key()
    return jws.serialize_compact(dict(header, kid=key.kid), json.dumps(claims).encode(), key, algorithms=["RS256"])


# --- the world ---------------------------------------------------------------------------------------
@dataclass
class World:
    user: UserInfo
    other: UserInfo
    client: ClientInfo
    browser: Browser  # signed in as ``user``
    tokens: dict[str, str]
    other_id_token: str  # a real ID token of ``other``
    admin_token: str
    provider_jwk: dict[str, Any]


def _code_tokens(server: Any, b: Browser, client: ClientInfo, user: UserInfo) -> dict[str, str]:
    params, verifier, _ = b.authorize(client, user)
    response = requests.post(server.url + "/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
        "code_verifier": verifier}, auth=(client.client_id, client.client_secret), timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture(scope="module")
def world(server, key_host) -> World:
    from tests.integration.test_fuzz import _client  # noqa: PLC0415  (one client factory)

    svc = server.services
    users = []
    for _ in range(2):
        from idp.accounts.service import create_user  # noqa: PLC0415

        password = "jwt battery staple " + secrets.token_hex(4)
        with svc.db.transaction() as session:
            u = create_user(session, svc.passwords, login="jwt-" + secrets.token_hex(4), display_name="JWT",
                            password=password, roles=["student"])
            users.append(UserInfo(u.id, u.login, password, u.subject))
    user, other = users
    client = _client(server, trusted=True, grant_types=["authorization_code", "refresh_token"])
    machine = _client(server, grant_types=["client_credentials"], redirect_uris=[], scopes=sorted(PERMISSIONS))
    b = Browser(server.url)
    b.http.headers["Accept-Language"] = "en"
    tokens = _code_tokens(server, b, client, user)
    other_tokens = _code_tokens(server, Browser(server.url), client, other)
    response = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                             auth=(machine.client_id, machine.client_secret), timeout=10)
    assert response.status_code == 200
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    kid = parts(tokens["id_token"])[0]["kid"]
    provider_jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    return World(user, other, client, b, tokens, other_tokens["id_token"], response.json()["access_token"],
                 provider_jwk)


def bad_tokens(world: World, server: Any, key_host: str, token: str) -> dict[str, str]:
    out = {kind: forge(kind, token, world.provider_jwk, key_host) for kind in FORGERIES}
    out.update({kind: real_key_variant(kind, token, server) for kind in REAL_KEY_INVALID})
    return out


def assert_json_error(response: requests.Response, status: int, error: str, what: str) -> None:
    assert response.status_code == status, (what, response.status_code, response.text[:200])
    assert response.headers["Content-Type"].startswith("application/json"), what
    assert response.json()["error"] == error, (what, response.json())


def auth_params(world: World, **extra: str) -> dict[str, str]:
    return {"response_type": "code", "client_id": world.client.client_id, "redirect_uri": world.client.redirect_uri,
            "scope": "openid", "state": "st", "nonce": secrets.token_hex(4), "code_challenge": pkce_pair()[1],
            "code_challenge_method": "S256", **extra}


# --- access tokens: /userinfo and the admin API ------------------------------------------------------
def test_forged_access_tokens_are_refused_at_userinfo_and_the_admin_api(server, world, key_host):
    for kind, token in bad_tokens(world, server, key_host, world.tokens["access_token"]).items():
        for method in ("GET", "POST"):
            response = requests.request(method, server.url + "/userinfo", timeout=10,
                                        headers={"Authorization": f"Bearer {token}"})
            assert_json_error(response, 401, "invalid_token", f"userinfo {method} {kind}")
            assert world.user.subject not in response.text
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        response = requests.post(server.url + "/userinfo", data={"access_token": token}, timeout=10)
        assert_json_error(response, 401, "invalid_token", f"userinfo body {kind}")
    for kind, token in bad_tokens(world, server, key_host, world.admin_token).items():
        response = requests.get(server.url + "/admin/api/v1/users", timeout=10,
                                headers={"Authorization": f"Bearer {token}"})
        assert_json_error(response, 401, "invalid_token", f"admin api {kind}")
    # An ID token is not an access token (typ JWT, not at+jwt).
    response = requests.get(server.url + "/userinfo", headers={"Authorization": "Bearer " + world.tokens["id_token"]},
                            timeout=10)
    assert_json_error(response, 401, "invalid_token", "id token at userinfo")
    # The real ones still work.
    response = requests.get(server.url + "/userinfo", timeout=10,
                            headers={"Authorization": "Bearer " + world.tokens["access_token"]})
    assert response.status_code == 200 and response.json()["sub"] == world.user.subject
    assert requests.get(server.url + "/admin/api/v1/roles", timeout=10,
                        headers={"Authorization": "Bearer " + world.admin_token}).status_code == 200
    assert _Counter.hits == []


# --- /introspect and /revoke -----------------------------------------------------------------------
def test_forged_tokens_are_inactive_at_introspection_and_revoke_nothing(server, world, key_host):
    auth = (world.client.client_id, world.client.client_secret)
    forged = bad_tokens(world, server, key_host, world.tokens["access_token"])
    # Introspection answers from the token's record (found by jti after the signature is
    # verified), so claims changed and re-signed with the provider's own key (which no
    # attacker holds: "expired", "wrong_iss") prove nothing here; /userinfo checks them.
    for kind in REAL_KEY_INVALID:
        del forged[kind]
    for kind, token in forged.items():
        for hint in (None, "access_token"):
            data = {"token": token, **({"token_type_hint": hint} if hint else {})}
            response = requests.post(server.url + "/introspect", data=data, auth=auth, timeout=10)
            assert response.status_code == 200, (kind, response.text[:200])
            assert response.json() == {"active": False}, kind
            response = requests.post(server.url + "/revoke", data=data, auth=auth, timeout=10)
            assert response.status_code == 200, (kind, response.text[:200])  # RFC 7009 2.2
    # Revoking the forgeries revoked nothing real.
    response = requests.post(server.url + "/introspect", data={"token": world.tokens["access_token"]}, auth=auth,
                             timeout=10)
    assert response.json()["active"] is True
    assert _Counter.hits == []


# --- client_assertion at /token --------------------------------------------------------------------
def _assertion_claims(server: Any, client_id: str) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": client_id, "sub": client_id, "aud": server.url + "/token", "iat": now, "exp": now + 60,
            "jti": secrets.token_hex(8)}


def test_client_assertions_are_never_accepted_at_the_token_endpoint(server, world, key_host):
    discovery = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    methods = set(discovery["token_endpoint_auth_methods_supported"])
    assert not methods & {"private_key_jwt", "client_secret_jwt"}
    client = world.client
    claims = _assertion_claims(server, client.client_id)
    template = jws.serialize_compact({"alg": "RS256", "kid": ATTACKER.kid}, json.dumps(claims).encode(), ATTACKER,
                                     algorithms=["RS256"])
    assertions = {kind: forge(kind, template, world.provider_jwk, key_host) for kind in FORGERIES}
    # client_secret_jwt with the client's real secret, and an assertion signed by the
    # provider's own key (an ID token replayed as an assertion).
    assertions["hs256_client_secret"] = _hmac({"typ": "JWT"}, claims, (client.client_secret or "").encode(), "HS256")
    assertions["provider_id_token"] = world.tokens["id_token"]
    for kind, assertion in assertions.items():
        for grant in ({"grant_type": "client_credentials"},
                      {"grant_type": "refresh_token", "refresh_token": world.tokens.get("refresh_token", "x")}):
            data = {**grant, "client_id": client.client_id, "client_assertion_type": JWT_BEARER,
                    "client_assertion": assertion}
            response = requests.post(server.url + "/token", data=data, timeout=10)
            assert_json_error(response, 401, "invalid_client", f"client_assertion {kind} {grant['grant_type']}")
            assert "access_token" not in response.text
    # The JWT-bearer grant itself is not offered.
    response = requests.post(server.url + "/token", timeout=10, auth=(client.client_id, client.client_secret), data={
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertions["alg_none"]})
    assert_json_error(response, 400, "unsupported_grant_type", "jwt-bearer grant")
    assert _Counter.hits == []


# --- request objects ---------------------------------------------------------------------------------
def test_request_objects_are_refused_whatever_their_signature(server, world, key_host):
    claims = {"iss": world.client.client_id, "aud": server.url, "response_type": "code",
              "client_id": world.client.client_id, "redirect_uri": "https://evil.test/cb", "scope": "openid",
              "state": "from-request-object"}
    template = jws.serialize_compact({"alg": "RS256", "kid": ATTACKER.kid}, json.dumps(claims).encode(), ATTACKER,
                                     algorithms=["RS256"])
    objects = {kind: forge(kind, template, world.provider_jwk, key_host) for kind in FORGERIES}
    objects["unsigned"] = f"{_b64json({'alg': 'none'})}.{_b64json(claims)}."
    for kind, obj in objects.items():
        for method in ("GET", "POST"):
            params = auth_params(world, request=obj)
            if method == "GET":
                response = world.browser.get("/authorize", params=params)
            else:
                response = world.browser.post("/authorize", data=params)
            assert response.status_code in (302, 303), (kind, response.status_code)
            location = response.headers["Location"]
            assert location.startswith(world.client.redirect_uri + "?"), (kind, location)  # never evil.test
            got = callback_params(location)
            assert got.get("error") == "request_not_supported" and "code" not in got, (kind, got)
            assert got.get("state") == "st"
    assert _Counter.hits == []


# --- id_token_hint at /authorize ---------------------------------------------------------------------
def test_forged_id_token_hints_are_refused_at_authorize(server, world, key_host):
    b = world.browser
    hints = bad_tokens(world, server, key_host, world.tokens["id_token"])
    del hints["expired"]  # an expired hint still names the person (OIDC Core 3.1.2.1): see below
    hints["access_token_as_hint"] = world.tokens["access_token"]  # wrong typ (ASVS 9.2.2)
    for kind, hint in hints.items():
        for method in ("GET", "POST"):
            params = auth_params(world, id_token_hint=hint, prompt="none")
            response = b.get("/authorize", params=params) if method == "GET" else b.post("/authorize", data=params)
            assert response.status_code in (302, 303), (kind, method, response.status_code, response.text[:200])
            got = callback_params(response.headers["Location"])
            assert got.get("error") == "invalid_request" and "code" not in got, (kind, method, got)
            assert got.get("iss") == server.url and got.get("state") == "st"
    # Real hints: the signed-in person's (even expired) gives a code; another person's
    # with prompt=none gives login_required, never a code for the wrong person.
    expired = real_key_variant("expired", world.tokens["id_token"], server)
    for hint in (world.tokens["id_token"], expired):
        got = callback_params(b.get("/authorize", params=auth_params(world, id_token_hint=hint,
                                                                     prompt="none")).headers["Location"])
        assert "code" in got, got
    got = callback_params(b.get("/authorize", params=auth_params(world, id_token_hint=world.other_id_token,
                                                                 prompt="none")).headers["Location"])
    assert got.get("error") in ("login_required", "interaction_required", "account_selection_required"), got
    assert "code" not in got
    assert _Counter.hits == []


# --- id_token_hint at /end_session -------------------------------------------------------------------
def test_forged_id_token_hints_never_end_a_session_or_redirect(server, world, key_host):
    b = world.browser
    hints = bad_tokens(world, server, key_host, world.tokens["id_token"])
    del hints["expired"]  # RP-Initiated Logout 1.0 section 2: expired hints are accepted
    hints["access_token_as_hint"] = world.tokens["access_token"]
    for kind, hint in hints.items():
        for method in ("GET", "POST"):
            params = {"id_token_hint": hint, "post_logout_redirect_uri": world.client.post_logout_redirect_uri,
                      "state": "x", "client_id": world.client.client_id}
            response = b.get("/end_session", params=params) if method == "GET" else b.post("/end_session",
                                                                                             data=params)
            assert response.status_code == 200, (kind, method, response.status_code, response.headers.get("Location"))
            assert "Location" not in response.headers
            assert 'action="/end_session/confirm"' in response.text, kind  # asks; did not sign out
        # Not signed in: still no redirect with a forged hint.
        response = requests.get(server.url + "/end_session", params={
            "id_token_hint": hint, "post_logout_redirect_uri": world.client.post_logout_redirect_uri},
            timeout=10, allow_redirects=False)
        assert response.status_code in (200, 400) and "Location" not in response.headers, kind
    assert b.get("/").status_code == 200  # still signed in
    # Another person's real hint does not sign this person out either.
    response = b.get("/end_session", params={"id_token_hint": world.other_id_token,
                                             "post_logout_redirect_uri": world.client.post_logout_redirect_uri})
    assert response.status_code == 200 and 'action="/end_session/confirm"' in response.text
    assert b.get("/").status_code == 200
    # The person's own expired hint is accepted (signed by the provider): the redirect goes
    # to the registered URI only.
    expired = real_key_variant("expired", world.tokens["id_token"], server)
    response = b.get("/end_session", params={"id_token_hint": expired, "state": "bye",
                                             "post_logout_redirect_uri": world.client.post_logout_redirect_uri})
    assert response.status_code in (302, 303), response.status_code
    assert response.headers["Location"].startswith(world.client.post_logout_redirect_uri + "?")
    assert b.get("/").status_code == 302  # signed out now
    assert _Counter.hits == []
