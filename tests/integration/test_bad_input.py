"""Bad input at every endpoint: malformed, missing, repeated and oversized parameters,
invalid UTF-8 and NUL bytes, wrong content types, garbage client authentication, and
forged JWTs (``alg: none``, HS256 keyed with the public key, an embedded ``jwk`` header,
a foreign key).

Expected everywhere: the right OAuth JSON error (400/401 with an ``error`` code) from the
protocol endpoints, or an HTML page (400, or the logout confirmation/logged-out page for
RP-initiated logout); never a 5xx and never a stack trace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from joserfc import jws
from joserfc.jwk import RSAKey

from idp.accounts.service import create_user
from idp.oidc.clients import create_client
from tests.helpers import Browser, ClientInfo, UserInfo, callback_params, form_fields, pkce_pair

BIG = 100_000  # an oversized single parameter, still below the form-size limit
TWO_MB = 2 * 1024 * 1024


# --- assertions ------------------------------------------------------------------------
def assert_clean(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    body = response.text
    assert "Traceback" not in body
    assert 'File "/' not in body and "site-packages" not in body


def assert_json_error(response: requests.Response, statuses=(400, 401), errors: tuple[str, ...] | None = None) -> None:
    assert_clean(response)
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    if errors is not None:
        assert body["error"] in errors, body
    assert response.headers.get("Cache-Control") == "no-store"


def assert_html_page(response: requests.Response, statuses=(400,)) -> None:
    assert_clean(response)
    assert response.status_code in statuses, (response.status_code, response.headers.get("Location"))
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")


def assert_redirect_error(response: requests.Response, client: ClientInfo, errors: tuple[str, ...]) -> dict:
    assert_clean(response)
    assert response.status_code == 302, (response.status_code, response.text[:300])
    location = response.headers["Location"]
    assert location.startswith(client.redirect_uri + "?"), location
    got = callback_params(location)
    assert got.get("error") in errors, got
    assert "code" not in got
    return got


# --- JWT forgeries -----------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _parts(token: str) -> tuple[dict, dict]:
    head, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(payload)))


def forge(kind: str, token: str, jwks: dict) -> str:
    """A token with ``token``'s claims (so the jti/sub are real) that must be rejected."""
    header, claims = _parts(token)
    if kind == "alg_none":
        return f"{_b64json(dict(header, alg='none'))}.{_b64json(claims)}."
    if kind == "alg_none_signed":
        return f"{_b64json(dict(header, alg='none'))}.{_b64json(claims)}.{token.split('.')[2]}"
    if kind == "hs256_public_key":
        # Algorithm confusion: HMAC keyed with the provider's public key (PEM and JWK JSON).
        public = RSAKey.import_key(jwks["keys"][-1])
        pem = public.as_pem(private=False)
        signing_input = f"{_b64json(dict(header, alg='HS256'))}.{_b64json(claims)}"
        sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(sig)}"
    attacker = RSAKey.generate_key(2048, private=True)
    if kind == "jwk_header":
        # The attacker's public key embedded in the header, same kid as the provider's.
        new_header = dict(header, alg="RS256", jwk=attacker.as_dict(private=False))
    elif kind == "foreign_key":
        new_header = dict(header, alg="RS256")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return jws.serialize_compact(new_header, json.dumps(claims).encode(), attacker, algorithms=["RS256"])


FORGERIES = ["alg_none", "alg_none_signed", "hs256_public_key", "jwk_header", "foreign_key"]
GARBAGE_JWTS = {
    "three_dots": "a.b.c",
    "empty_parts": "..",
    "one_part": "eyJhbGciOiJSUzI1NiJ9",
    "non_json_header": _b64(b"not json") + "." + _b64(b"{}") + ".sig",
    "list_header": _b64json(["RS256"]) + "." + _b64json({}) + ".sig",
    "bad_utf8_header": _b64(b"\xff\xfe{") + "." + _b64json({}) + ".sig",
    "null_claims": _b64json({"alg": "RS256", "kid": "x"}) + "." + _b64(b"null") + ".c2ln",
    "nul_byte": "eyJ\x00.eyJ.sig",
    "huge": "a" * 10_000 + "." + "b" * 10_000 + ".c",
    "five_parts": "a.b.c.d.e",
}


# --- the world the tests run in ----------------------------------------------------------
@dataclass
class World:
    user: UserInfo
    client: ClientInfo  # confidential, client_secret_basic, trusted (no consent screen)
    public: ClientInfo
    machine: ClientInfo  # client credentials
    tokens: dict
    jwks: dict


def _client(server, **kwargs: Any) -> ClientInfo:
    kwargs.setdefault("name", "Bad-input app")
    kwargs.setdefault("redirect_uris", ["https://rp.example.test/cb"])
    kwargs.setdefault("post_logout_redirect_uris", ["https://rp.example.test/bye"])
    kwargs.setdefault("client_id", "bad-" + secrets.token_hex(6))
    with server.services.db.transaction() as session:
        client, secret = create_client(session, **kwargs)
        return ClientInfo(client.client_id, secret, (client.redirect_uris or [""])[0],
                          (client.post_logout_redirect_uris or [""])[0])


@pytest.fixture(scope="module")
def world(server) -> World:
    svc = server.services
    password = "bad input battery " + secrets.token_hex(4)
    with svc.db.transaction() as session:
        u = create_user(session, svc.passwords, login="bad-" + secrets.token_hex(4), display_name="Bad Input",
                        password=password, roles=["student"])
        user = UserInfo(u.id, u.login, password, u.subject)
    client = _client(server, trusted=True)
    public = _client(server, auth_method="none", trusted=True)
    machine = _client(server, grant_types=["client_credentials"], redirect_uris=[], scopes=["roles"])
    tokens = _tokens(server, Browser(server.url), client, user)
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    return World(user, client, public, machine, tokens, jwks)


def _tokens(server, browser: Browser, client: ClientInfo, user: UserInfo) -> dict:
    params, verifier, _ = browser.authorize(client, user)
    response = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret), timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def auth_params(client: ClientInfo, **extra: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code", "client_id": client.client_id, "redirect_uri": client.redirect_uri,
        "scope": "openid profile", "state": "s1", "nonce": secrets.token_hex(6),
        "code_challenge": pkce_pair()[1], "code_challenge_method": "S256",
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v is not None}


def raw_query(params: dict[str, str] | list[tuple[str, str]], raw: str = "") -> str:
    """A query string plus raw (already percent-encoded, possibly invalid) pairs."""
    query = urlencode(params)
    return query + ("&" + raw if raw else "")


# --- /authorize ----------------------------------------------------------------------------
# (name, params builder, raw extra query, expectation); expectation "page" = 400 HTML page,
# ("redirect", errors) = an error sent back to the validated redirect URI.
def _rep(c: ClientInfo, key: str) -> list[tuple[str, str]]:
    params = list(auth_params(c).items())
    value = dict(params)[key]
    return params + [(key, value)]


AUTHORIZE_CASES: list[tuple[str, Any, str, Any]] = [
    ("no_params", lambda c: {}, "", "page"),
    ("client_id_only", lambda c: {"client_id": c.client_id}, "", ("redirect", ("invalid_request",))),
    ("client_id_invalid_utf8", lambda c: auth_params(c, client_id=None), "client_id=%FF%FE%FD", "page"),
    ("client_id_nul", lambda c: auth_params(c, client_id=c.client_id + "\x00"), "", "page"),
    ("client_id_empty", lambda c: auth_params(c, client_id=""), "", "page"),
    ("client_id_huge", lambda c: auth_params(c, client_id="c" * 5000), "", "page"),
    ("client_id_repeated", lambda c: _rep(c, "client_id"), "", "page"),
    ("redirect_uri_nul", lambda c: auth_params(c, redirect_uri=c.redirect_uri + "\x00"), "", "page"),
    ("redirect_uri_invalid_utf8", lambda c: auth_params(c, redirect_uri=None), "redirect_uri=https%3A%2F%2Frp.example.test%2Fcb%FF", "page"),
    ("redirect_uri_huge", lambda c: auth_params(c, redirect_uri=c.redirect_uri + "?" + "x" * 5000), "", "page"),
    ("redirect_uri_repeated", lambda c: _rep(c, "redirect_uri"), "", "page"),
    ("response_type_missing", lambda c: auth_params(c, response_type=None), "", ("redirect", ("invalid_request",))),
    ("response_type_nul", lambda c: auth_params(c, response_type="code\x00"), "", ("redirect", ("invalid_request", "unsupported_response_type"))),
    ("response_type_repeated", lambda c: _rep(c, "response_type"), "", ("redirect", ("invalid_request",))),
    ("scope_nul", lambda c: auth_params(c, scope="openid\x00profile"), "", ("redirect", ("invalid_request", "invalid_scope"))),
    ("nonce_nul", lambda c: auth_params(c, nonce="n\x00"), "", ("redirect", ("invalid_request",))),
    ("redirect_uri_ok_other_nul", lambda c: auth_params(c, code_challenge_method="S256\x00"), "", ("redirect", ("invalid_request",))),
    ("scope_invalid_utf8", lambda c: auth_params(c, scope=None), "scope=openid%20%FF", ("redirect", ("invalid_scope",))),
    ("scope_huge", lambda c: auth_params(c, scope="openid " + "p" * 5000), "", ("redirect", ("invalid_request", "invalid_scope"))),
    ("scope_repeated", lambda c: _rep(c, "scope"), "", ("redirect", ("invalid_request",))),
    ("state_huge", lambda c: auth_params(c, state="s" * 5000), "", ("redirect", ("invalid_request",))),
    ("state_repeated", lambda c: _rep(c, "state"), "", ("redirect", ("invalid_request",))),
    ("nonce_huge", lambda c: auth_params(c, nonce="n" * 5000), "", ("redirect", ("invalid_request",))),
    ("code_challenge_nul", lambda c: auth_params(c, code_challenge="a" * 43 + "\x00"), "", ("redirect", ("invalid_request",))),
    ("code_challenge_invalid_utf8", lambda c: auth_params(c, code_challenge=None), "code_challenge=" + "a" * 43 + "%FF", ("redirect", ("invalid_request",))),
    ("code_challenge_huge", lambda c: auth_params(c, code_challenge="a" * 5000), "", ("redirect", ("invalid_request",))),
    ("code_challenge_repeated", lambda c: _rep(c, "code_challenge"), "", ("redirect", ("invalid_request",))),
    ("code_challenge_method_repeated", lambda c: _rep(c, "code_challenge_method"), "", ("redirect", ("invalid_request",))),
    ("max_age_negative", lambda c: auth_params(c, max_age="-1"), "", ("redirect", ("invalid_request",))),
    ("max_age_text", lambda c: auth_params(c, max_age="abc"), "", ("redirect", ("invalid_request",))),
    ("max_age_huge", lambda c: auth_params(c, max_age="9" * 40), "", ("redirect", ("invalid_request",))),
    ("max_age_unicode_digits", lambda c: auth_params(c, max_age="\u0663\u0663"), "", ("redirect", ("invalid_request",))),
    ("max_age_superscript", lambda c: auth_params(c, max_age="\u00b2"), "", ("redirect", ("invalid_request",))),
    ("prompt_unknown", lambda c: auth_params(c, prompt="bogus"), "", ("redirect", ("invalid_request",))),
    ("prompt_none_and_login", lambda c: auth_params(c, prompt="none login"), "", ("redirect", ("invalid_request",))),
    ("response_mode_unknown", lambda c: auth_params(c, response_mode="web_message"), "", ("redirect", ("invalid_request",))),
    ("request_object", lambda c: auth_params(c, request="eyJhbGciOiJub25lIn0.e30."), "", ("redirect", ("request_not_supported",))),
    ("request_uri", lambda c: auth_params(c, request_uri="https://evil.test/req"), "", ("redirect", ("request_uri_not_supported",))),
    ("login_hint_huge", lambda c: auth_params(c, login_hint="l" * 5000), "", ("redirect", ("invalid_request",))),
    ("id_token_hint_huge", lambda c: auth_params(c, id_token_hint="h" * 9000), "", ("redirect", ("invalid_request",))),
    ("ui_locales_blank", lambda c: auth_params(c, ui_locales="   "), "", "any"),
    ("ui_locales_junk", lambda c: auth_params(c, ui_locales="-\u00ff ru \ufffd"), "", "any"),
    ("ui_locales_nul", lambda c: auth_params(c, ui_locales="\x00-\u00ff ru"), "", ("redirect", ("invalid_request",))),
    ("login_hint_nul", lambda c: auth_params(c, login_hint="a\x00b"), "", ("redirect", ("invalid_request",))),
    ("state_nul", lambda c: auth_params(c, state="a\x00b"), "", ("redirect", ("invalid_request",))),
    ("everything_invalid_utf8", lambda c: {}, "client_id=%FF&redirect_uri=%FE&scope=%FD&state=%80", "page"),
]
for _name, _value in GARBAGE_JWTS.items():
    if _name != "huge":
        AUTHORIZE_CASES.append(
            (f"id_token_hint_{_name}", (lambda v: lambda c: auth_params(c, id_token_hint=v))(_value), "",
             ("redirect", ("invalid_request",)))
        )


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(("name", "build", "raw", "expect"), AUTHORIZE_CASES, ids=[c[0] for c in AUTHORIZE_CASES])
def test_authorize_bad_input(server, world, method, name, build, raw, expect):
    params = build(world.client)
    if method == "GET":
        response = requests.get(server.url + "/authorize?" + raw_query(params, raw), timeout=10, allow_redirects=False)
    else:
        response = requests.post(
            server.url + "/authorize", data=raw_query(params, raw), timeout=10, allow_redirects=False,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    if expect == "page":
        assert_html_page(response)
    elif expect == "any":
        assert_clean(response)
        assert response.status_code in (200, 302, 303, 400)
        if response.status_code == 302:
            location = response.headers["Location"]
            assert location.startswith(("/login", world.client.redirect_uri)), location
    else:
        got = assert_redirect_error(response, world.client, expect[1])
        assert got["iss"] == server.url


def test_authorize_bad_input_signed_in(server, world):
    """The same bad inputs once the user has a session (later code paths run)."""
    b = Browser(server.url)
    assert b.sign_in(world.user.login, world.user.password).status_code == 303
    for name, build, raw, expect in AUTHORIZE_CASES:
        response = b.get("/authorize?" + raw_query(build(world.client), raw))
        assert_clean(response)
        if expect == "page":
            assert_html_page(response)
        elif expect != "any":
            assert_redirect_error(response, world.client, expect[1])
        else:
            assert response.status_code in (200, 302, 303, 400), name


@pytest.mark.parametrize("flow_id", ["does-not-exist", "%00", "%FF%FE", "a" * 300, "..%2F..%2Fetc", "x%00y"])
def test_authorize_continue_bad_flow(server, flow_id):
    response = requests.get(server.url + "/authorize/continue/" + flow_id, timeout=10, allow_redirects=False)
    assert_clean(response)
    assert response.status_code in (400, 404)
    assert "Location" not in response.headers


# --- /token ------------------------------------------------------------------------------------
def _form(kwargs: dict) -> dict:
    """Raw byte bodies are sent as a form (requests sets no Content-Type for bytes)."""
    if isinstance(kwargs.get("data"), bytes):
        kwargs.setdefault("headers", {"Content-Type": "application/x-www-form-urlencoded"})
    return kwargs


def _basic(client: ClientInfo) -> tuple[str, str]:
    return (client.client_id, client.client_secret or "")


TOKEN_CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    # (name, request builder -> requests kwargs, allowed error codes)
    ("empty_body", lambda w: {"data": ""}, ("unsupported_grant_type", "invalid_request")),
    ("grant_type_unknown", lambda w: {"data": {"grant_type": "magic"}}, ("unsupported_grant_type",)),
    ("grant_type_nul", lambda w: {"data": {"grant_type": "authorization_code\x00"}}, ("unsupported_grant_type",)),
    ("grant_type_invalid_utf8", lambda w: {"data": b"grant_type=%FF%FE"}, ("unsupported_grant_type",)),
    ("grant_type_repeated", lambda w: {"data": [("grant_type", "refresh_token"), ("grant_type", "refresh_token"),
                                                ("refresh_token", "x" * 40)]}, ("invalid_request",)),
    ("json_body", lambda w: {"json": {"grant_type": "client_credentials"}}, ("unsupported_grant_type", "invalid_request")),
    ("text_plain_body", lambda w: {"data": "grant_type=client_credentials",
                                   "headers": {"Content-Type": "text/plain"}}, ("unsupported_grant_type", "invalid_request")),
    ("xml_body", lambda w: {"data": "<grant_type>client_credentials</grant_type>",
                            "headers": {"Content-Type": "application/xml"}}, ("unsupported_grant_type", "invalid_request")),
    ("raw_invalid_utf8_body", lambda w: {"data": b"grant_type=authorization_code&code=\xff\xfe\x00&code_verifier=\xc3",
                                         "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     # an undecodable form body is dropped whole by the form parser: no grant_type left
     ("unsupported_grant_type", "invalid_request")),
    ("code_missing", lambda w: {"data": {"grant_type": "authorization_code"}}, ("invalid_request",)),
    ("code_garbage", lambda w: {"data": {"grant_type": "authorization_code", "code": "nope",
                                         "code_verifier": pkce_pair()[0]}}, ("invalid_grant",)),
    ("code_nul", lambda w: {"data": {"grant_type": "authorization_code", "code": "a\x00b"}}, ("invalid_grant",)),
    ("code_invalid_utf8", lambda w: {"data": b"grant_type=authorization_code&code=%FF%FE"}, ("invalid_grant",)),
    ("code_huge", lambda w: {"data": {"grant_type": "authorization_code", "code": "c" * BIG}}, ("invalid_grant", "invalid_request")),
    ("code_repeated", lambda w: {"data": [("grant_type", "authorization_code"), ("code", "a"), ("code", "b")]},
     ("invalid_request",)),
    ("code_verifier_nul", lambda w: {"data": {"grant_type": "authorization_code", "code": "x", "code_verifier": "\x00" * 50}},
     ("invalid_grant", "invalid_request")),
    ("refresh_missing", lambda w: {"data": {"grant_type": "refresh_token"}}, ("invalid_request",)),
    ("refresh_nul", lambda w: {"data": {"grant_type": "refresh_token", "refresh_token": "r\x00"}}, ("invalid_grant",)),
    ("refresh_invalid_utf8", lambda w: {"data": b"grant_type=refresh_token&refresh_token=%FF%FE%FD"}, ("invalid_grant",)),
    ("refresh_huge", lambda w: {"data": {"grant_type": "refresh_token", "refresh_token": "r" * BIG}}, ("invalid_grant",)),
    ("refresh_repeated", lambda w: {"data": [("grant_type", "refresh_token"), ("refresh_token", "a" * 40),
                                             ("refresh_token", "b" * 40)]}, ("invalid_request",)),
    ("refresh_scope_nul", lambda w: {"data": {"grant_type": "refresh_token", "refresh_token": "r" * 40,
                                              "scope": "openid\x00"}}, ("invalid_grant", "invalid_scope")),
    ("refresh_scope_huge", lambda w: {"data": {"grant_type": "refresh_token", "refresh_token": "r" * 40,
                                               "scope": "s " * (BIG // 2)}}, ("invalid_grant", "invalid_scope")),
]
# Client-credentials cases run as the machine client.
CC_CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("cc_scope_nul", lambda w: {"data": {"grant_type": "client_credentials", "scope": "roles\x00"}}, ("invalid_scope",)),
    ("cc_scope_unknown", lambda w: {"data": {"grant_type": "client_credentials", "scope": "admin"}}, ("invalid_scope",)),
    ("cc_scope_openid", lambda w: {"data": {"grant_type": "client_credentials", "scope": "openid"}}, ("invalid_scope",)),
    ("cc_scope_invalid_utf8", lambda w: {"data": b"grant_type=client_credentials&scope=%FF"}, ("invalid_scope",)),
    ("cc_scope_huge", lambda w: {"data": {"grant_type": "client_credentials", "scope": "roles " + "x" * BIG}},
     ("invalid_scope", "invalid_request")),
    ("cc_scope_repeated", lambda w: {"data": [("grant_type", "client_credentials"), ("scope", "roles"),
                                              ("scope", "roles")]}, ("invalid_request",)),
    ("cc_by_code_client", None, ("unauthorized_client",)),
]


@pytest.mark.parametrize(("name", "build", "errors"), TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_bad_input(server, world, name, build, errors):
    response = requests.post(server.url + "/token", auth=_basic(world.client), timeout=10, **_form(build(world)))
    assert_json_error(response, (400,), errors)


@pytest.mark.parametrize(("name", "build", "errors"), CC_CASES, ids=[c[0] for c in CC_CASES])
def test_token_client_credentials_bad_input(server, world, name, build, errors):
    if build is None:  # a client without the grant type
        response = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                                 auth=_basic(world.client), timeout=10)
    else:
        response = requests.post(server.url + "/token", auth=_basic(world.machine), timeout=10, **_form(build(world)))
    assert_json_error(response, (400,), errors)


def test_token_public_client_bad_input(server, world):
    url = server.url + "/token"
    cases = [
        {"grant_type": "authorization_code", "client_id": world.public.client_id, "code": "x"},
        {"grant_type": "authorization_code", "client_id": world.public.client_id + "\x00", "code": "x"},
        {"grant_type": "authorization_code", "client_id": "c" * 5000, "code": "x"},
        {"grant_type": "refresh_token", "client_id": world.public.client_id, "refresh_token": "\x00"},
        {"grant_type": "client_credentials", "client_id": world.public.client_id},
    ]
    for data in cases:
        assert_json_error(requests.post(url, data=data, timeout=10), (400, 401))
    repeated = [("grant_type", "refresh_token"), ("client_id", world.public.client_id),
                ("client_id", world.client.client_id), ("refresh_token", "r" * 40)]
    assert_json_error(requests.post(url, data=repeated, timeout=10), (400, 401))


def _b64s(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


AUTH_HEADERS = {
    "basic_no_value": "Basic",
    "basic_blank": "Basic    ",
    "basic_not_base64": "Basic !!!###",
    "basic_bad_padding": "Basic YWJj=",
    "basic_invalid_utf8": "Basic " + _b64s(b"\xff\xfe:\xfd\xfc"),
    "basic_invalid_utf8_id": "Basic " + _b64s(b"\xc3\x28:secret"),
    "basic_no_colon": "Basic " + _b64s(b"justaname"),
    "basic_empty_pair": "Basic " + _b64s(b":"),
    "basic_nul": "Basic " + _b64s(b"a\x00:b\x00"),
    "basic_percent_garbage": "Basic " + _b64s(b"%ZZ%:%FF"),
    "basic_three_words": "Basic a b c",
    "basic_unknown_client": "Basic " + _b64s(b"nobody:secret"),
    "basic_huge_id": "Basic " + _b64s(b"i" * 6000 + b":s"),
    "bearer_at_token": "Bearer abc.def.ghi",
    "digest": 'Digest username="x", realm="y"',
    "latin1_junk": "Basic \xe9\xe8\xff",
    "long_16k": "Basic " + "A" * 16_000,
}


@pytest.mark.parametrize("header", list(AUTH_HEADERS.values()), ids=list(AUTH_HEADERS))
def test_token_client_auth_garbage(server, world, header):
    response = requests.post(
        server.url + "/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": header},
        timeout=10,
    )
    assert_json_error(response, (400, 401), ("invalid_client", "invalid_request"))
    if response.status_code == 401:
        assert "WWW-Authenticate" in response.headers or response.json()["error"] == "invalid_client"


@pytest.mark.parametrize("path", ["/token", "/revoke", "/introspect", "/userinfo"])
def test_very_long_authorization_header(server, world, path):
    for size in (16_000, 60_000):
        response = requests.post(
            server.url + path, data={"token": "x", "grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + "A" * size if path != "/userinfo" else "Bearer " + "A" * size},
            timeout=10,
        )
        assert_clean(response)
        if response.status_code in (400, 401):
            assert_json_error(response, (400, 401))
        else:  # the HTTP layer may refuse the header line itself
            assert response.status_code == 431, response.status_code


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_token_wrong_method(server, method):
    response = requests.request(method, server.url + "/token", timeout=10)
    assert_json_error(response, (405,), ("invalid_request",))


# --- /userinfo ------------------------------------------------------------------------------
USERINFO_HEADERS = {
    "bearer_empty": ("Bearer", 400),
    "bearer_blank": ("Bearer    ", 400),
    "basic_scheme": ("Basic " + _b64s(b"a:b"), 400),
    "bearer_garbage": ("Bearer garbage", 401),
    "bearer_latin1": ("Bearer \xe9\xff.\xfe.x", 401),
    "bearer_two_tokens": ("Bearer a.b.c d.e.f", 401),
}
for _name, _value in GARBAGE_JWTS.items():
    USERINFO_HEADERS[f"bearer_{_name}"] = ("Bearer " + _value, 401)


@pytest.mark.parametrize(("header", "status"), list(USERINFO_HEADERS.values()), ids=list(USERINFO_HEADERS))
def test_userinfo_bad_authorization(server, header, status):
    for method in ("GET", "POST"):
        try:
            response = requests.request(method, server.url + "/userinfo", headers={"Authorization": header}, timeout=10)
        except ValueError:  # the client library refuses to send it (e.g. NUL byte)
            return
        assert_json_error(response, (status,))
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_userinfo_bad_body(server, world):
    url = server.url + "/userinfo"
    at = world.tokens["access_token"]
    # No token at all: 401, the challenge names no error (RFC 6750 §3.1), the body a code.
    response = requests.get(url, timeout=10)
    assert_clean(response)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="darbaza"'
    assert response.json()["error"] == "invalid_token"
    # Repeated token in the body, token in header and body.
    assert_json_error(requests.post(url, data=[("access_token", at), ("access_token", at)], timeout=10), (400,))
    assert_json_error(requests.post(url, data={"access_token": at}, headers={"Authorization": "Bearer " + at},
                                    timeout=10), (400,))
    # Garbage tokens in the body.
    for bad in ("\x00", "a" * BIG, "a.b.c"):
        assert_json_error(requests.post(url, data={"access_token": bad}, timeout=10), (401,), ("invalid_token",))
    assert_json_error(requests.post(url, data=b"access_token=%FF%FE.%00.x", timeout=10,
                                    headers={"Content-Type": "application/x-www-form-urlencoded"}), (401,))
    # JSON body is not a token transport.
    response = requests.post(url, json={"access_token": at}, timeout=10)
    assert_clean(response)
    assert response.status_code == 401
    # The id_token is not an access token.
    assert_json_error(requests.get(url, headers={"Authorization": "Bearer " + world.tokens["id_token"]}, timeout=10),
                      (401,), ("invalid_token",))
    # The genuine token still works.
    assert requests.get(url, headers={"Authorization": "Bearer " + at}, timeout=10).status_code == 200


# --- /revoke and /introspect ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/revoke", "/introspect"])
def test_revoke_and_introspect_bad_input(server, world, path):
    url = server.url + path
    auth = _basic(world.client)
    # Missing client authentication.
    assert_json_error(requests.post(url, data={"token": "x"}, timeout=10), (401,), ("invalid_client",))
    # Missing token.
    assert_json_error(requests.post(url, data={}, auth=auth, timeout=10), (400,), ("invalid_request",))
    assert_json_error(requests.post(url, json={"token": "x"}, auth=auth, timeout=10), (400,), ("invalid_request",))
    # Unknown token_type_hint (Authlib answers it with status 401, still a clean OAuth error).
    assert_json_error(requests.post(url, data={"token": "x", "token_type_hint": "bogus"}, auth=auth, timeout=10),
                      (400, 401), ("unsupported_token_type",))
    # Repeated token.
    assert_json_error(requests.post(url, data=[("token", "a"), ("token", "b")], auth=auth, timeout=10),
                      (400,), ("invalid_request",))
    # Garbage tokens: RFC 7009 §2.2 / RFC 7662 §2.2 answer 200 (nothing revoked / inactive).
    garbage = ["\x00", "t" * BIG, *GARBAGE_JWTS.values(), *(forge(k, world.tokens["access_token"], world.jwks)
                                                            for k in FORGERIES)]
    for token in garbage:
        for hint in (None, "access_token", "refresh_token"):
            data = {"token": token, **({"token_type_hint": hint} if hint else {})}
            response = requests.post(url, data=data, auth=auth, timeout=10)
            assert_clean(response)
            assert response.status_code == 200, (token[:40], hint, response.text[:200])
            if path == "/introspect":
                assert response.json() == {"active": False}
    response = requests.post(url, data=b"token=%FF%FE%00", auth=auth, timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_clean(response)
    assert response.status_code == 200
    # Wrong method.
    assert_json_error(requests.get(url, timeout=10), (405,))
    # The genuine access token survived all of this.
    assert requests.get(server.url + "/userinfo",
                        headers={"Authorization": "Bearer " + world.tokens["access_token"]}, timeout=10).status_code == 200


# --- forged JWTs at /userinfo, /end_session and /authorize ------------------------------------------
@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_jwt_rejected_everywhere(server, world, kind):
    access = forge(kind, world.tokens["access_token"], world.jwks)
    id_token = forge(kind, world.tokens["id_token"], world.jwks)
    # As an access token.
    response = requests.get(server.url + "/userinfo", headers={"Authorization": "Bearer " + access}, timeout=10)
    assert_json_error(response, (401,), ("invalid_token",))
    assert world.user.subject not in response.text
    response = requests.post(server.url + "/userinfo", data={"access_token": access}, timeout=10)
    assert_json_error(response, (401,), ("invalid_token",))
    # As id_token_hint at /authorize: an error back to the client, no code.
    b = Browser(server.url)
    assert b.sign_in(world.user.login, world.user.password).status_code == 303
    response = b.get("/authorize", params=auth_params(world.client, id_token_hint=id_token, prompt="none"))
    assert_redirect_error(response, world.client, ("invalid_request",))
    # As id_token_hint at /end_session: no redirect and no sign-out without confirmation.
    response = b.get("/end_session", params={"id_token_hint": id_token,
                                             "post_logout_redirect_uri": world.client.post_logout_redirect_uri,
                                             "state": "x"})
    assert_html_page(response, (200,))
    assert 'action="/end_session/confirm"' in response.text
    still = b.get("/authorize", params=auth_params(world.client, prompt="none"))
    assert "code" in callback_params(still.headers["Location"])
    # And without a session: no redirect either.
    response = requests.get(server.url + "/end_session", params={
        "id_token_hint": id_token, "post_logout_redirect_uri": world.client.post_logout_redirect_uri}, timeout=10,
        allow_redirects=False)
    assert_html_page(response, (200, 400))


# --- /end_session -------------------------------------------------------------------------------
END_SESSION_CASES: dict[str, Any] = {
    **{f"hint_{k}": {"id_token_hint": v} for k, v in GARBAGE_JWTS.items()},
    "hint_and_redirect_garbage": {"id_token_hint": "a.b.c", "post_logout_redirect_uri": "https://evil.test/"},
    "redirect_nul": {"post_logout_redirect_uri": "https://rp.example.test/bye\x00"},
    "client_id_nul": {"client_id": "x\x00", "post_logout_redirect_uri": "https://rp.example.test/bye"},
    "client_id_huge": {"client_id": "c" * 5000},
    "state_huge": {"state": "s" * 20_000},  # BIG would overflow the dev server's request line
    "logout_hint_nul": {"logout_hint": "\x00"},
    "ui_locales_junk": {"ui_locales": "\x00 \u00ff"},
}


@pytest.mark.parametrize("params", list(END_SESSION_CASES.values()), ids=list(END_SESSION_CASES))
def test_end_session_bad_input(server, world, params):
    b = Browser(server.url)
    assert b.sign_in(world.user.login, world.user.password).status_code == 303
    for method in ("GET", "POST"):
        if method == "GET":
            response = b.get("/end_session", params=params)
        else:
            response = b.post("/end_session", data=params)
        # No redirect anywhere; a signed-in user is asked to confirm.
        assert_html_page(response, (200, 400))
        if response.status_code == 200:
            assert 'action="/end_session/confirm"' in response.text
    assert "code" in callback_params(b.get("/authorize", params=auth_params(world.client, prompt="none")).headers["Location"])


def test_end_session_raw_bad_encoding_and_repeats(server, world):
    url = server.url + "/end_session"
    for query in ("id_token_hint=%FF%FE.%00.x", "post_logout_redirect_uri=%FF&client_id=%00&state=%80",
                  "state=a&state=b", "id_token_hint=a&id_token_hint=b"):
        response = requests.get(url + "?" + query, timeout=10, allow_redirects=False)
        assert_html_page(response, (200, 400))
        response = requests.post(url, data=query, timeout=10, allow_redirects=False,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_html_page(response, (200, 400))
    # Repeated parameters are refused outright.
    assert_html_page(requests.get(url + "?state=a&state=b", timeout=10), (400,))
    # The confirmation POST needs its CSRF token.
    assert_html_page(requests.post(url + "/confirm", data={"confirm": "1"}, timeout=10), (400,))
    assert_html_page(requests.post(url + "/confirm", data=b"csrf_token=%FF%00", timeout=10,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"}), (400,))


# --- /login and /authorize/consent ----------------------------------------------------------------
def test_login_bad_input(server, world):
    url = server.url + "/login"
    # GET ignores junk.
    for query in ("next=%00", "next=%FF%FE", "flow=%FF", "flow=" + "f" * 500, "login_hint=" + "h" * 5000,
                  "next=a&next=b", "flow=a&flow=b"):
        response = requests.get(url + "?" + query, timeout=10)
        assert_clean(response)
        assert response.status_code == 200
    # POST without a CSRF token, with junk, repeated or invalid bytes: 400 page.
    for body in (b"", b"login=a&password=b", b"csrf_token=%FF%FE&login=%00&password=%80",
                 b"csrf_token=a&csrf_token=b&login=x&password=y", b"\xff\xfe\x00"):
        response = requests.post(url, data=body, timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_html_page(response)
    response = requests.post(url, json={"login": "a", "password": "b"}, timeout=10)
    assert_html_page(response)
    # With a valid CSRF token: oversized, NUL and invalid UTF-8 credentials are just wrong.
    b = Browser(server.url)
    page = b.get("/login")
    for login, password, statuses in (
        ("l" * 5000, "p", (400,)),
        (world.user.login, "p" * 5000, (400,)),
        (world.user.login + "\x00", world.user.password, (401,)),
        ("\x00", "\x00", (401,)),
        ("", "", (400,)),
        (world.user.login, world.user.password + "\x00", (401,)),
    ):
        response = b.submit(page, "/login", login=login, password=password)
        assert_html_page(response, statuses)
    response = b.submit(page, "/login", login=world.user.login, password=world.user.password,
                        flow="%00" * 3, next="\x00//evil.test")
    assert_clean(response)
    assert response.status_code == 303 and "evil" not in response.headers["Location"]


def test_consent_bad_input(server, world):
    url = server.url + "/authorize/consent"
    for body in (b"", b"approve=1&flow=x", b"csrf_token=%FF&flow=%00&approve=1", b"\xff\x00"):
        response = requests.post(url, data=body, timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_html_page(response)
    # A valid session and CSRF token, but the flow is junk.
    b = Browser(server.url)
    assert b.sign_in(world.user.login, world.user.password).status_code == 303
    page = b.get("/login")
    _, fields = form_fields(page.text, "/login")
    token = fields["csrf_token"]
    for flow in ("", "\x00", "f" * 500, "does-not-exist", "\u00ff"):
        response = b.post("/authorize/consent", data={"csrf_token": token, "flow": flow, "approve": "1"})
        assert_html_page(response)
    response = b.post("/authorize/consent", data=[("csrf_token", token), ("flow", "a"), ("flow", "b"),
                                                  ("approve", "1")])
    assert_html_page(response)
    assert_html_page(b.get("/authorize/consent"), (405,))


# --- discovery and JWKS ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server",
                                  "/jwks.json"])
def test_public_metadata_bad_input(server, path):
    url = server.url + path
    for query in ("", "?x=%00", "?x=%FF%FE", "?a=1&a=2", "?" + "q" * 5000):
        response = requests.get(url + query, timeout=10)
        assert_clean(response)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    for method in ("POST", "PUT", "DELETE"):
        response = requests.request(method, url, data=b"\xff\x00", timeout=10)
        assert_json_error(response, (405,))
    assert_json_error(requests.get(server.url + "/.well-known/nope", timeout=10), (404,))


# --- oversized bodies ------------------------------------------------------------------------
OVERSIZED_TARGETS = [
    ("/token", "json"),
    ("/revoke", "json"),
    ("/introspect", "json"),
    ("/userinfo", "json"),
    ("/authorize", "html"),
    ("/end_session", "html"),
    ("/login", "html"),
    ("/authorize/consent", "html"),
    ("/end_session/confirm", "html"),
]


def _auth_for(path: str, world: World) -> tuple[str, str] | None:
    # Client authentication where the endpoint wants it, so that the body is really read.
    return _basic(world.client) if path in ("/token", "/revoke", "/introspect") else None


@pytest.mark.parametrize(("path", "kind"), OVERSIZED_TARGETS, ids=[t[0] for t in OVERSIZED_TARGETS])
def test_two_megabyte_body(server, world, path, kind):
    body = b"grant_type=client_credentials&access_token=x&x=" + b"A" * TWO_MB
    try:
        response = requests.post(
            server.url + path, data=body, auth=_auth_for(path, world), timeout=30,
            headers={"Content-Type": "application/x-www-form-urlencoded"}, allow_redirects=False,
        )
    except requests.ConnectionError:  # pragma: no cover - the server may close after answering 413
        pytest.fail("the server dropped the connection instead of answering 413")
    assert_clean(response)
    assert response.status_code == 413, response.status_code
    if kind == "json":
        assert_json_error(response, (413,), ("invalid_request",))
    else:
        assert response.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(("path", "kind"), OVERSIZED_TARGETS, ids=[t[0] for t in OVERSIZED_TARGETS])
def test_too_many_form_parts(server, world, path, kind):
    """A multipart body under the size limit but with more parts than the parser allows."""
    boundary = "darbaza-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="k{i}"\r\n\r\nv\r\n' for i in range(400)]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    response = requests.post(
        server.url + path, data=body, auth=_auth_for(path, world), timeout=30, allow_redirects=False,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_clean(response)
    if path == "/userinfo":  # reads only url-encoded bodies: no token found
        assert response.status_code == 401
    else:
        assert response.status_code == 413, response.status_code
        if kind == "json":
            assert_json_error(response, (413,), ("invalid_request",))


def test_access_token_is_not_an_id_token_hint(server, world, make_client):
    """Token confusion: an access token (signed by the same key, same sub and aud, typ
    at+jwt) reaches resource servers; it must not log the user out without confirmation."""
    client = make_client(trusted=True)
    b = Browser(server.url)
    tokens = _tokens(server, b, client, world.user)
    response = b.get("/end_session", params={"id_token_hint": tokens["access_token"],
                                             "post_logout_redirect_uri": client.post_logout_redirect_uri,
                                             "state": "x"})
    assert_html_page(response, (200,))
    assert 'action="/end_session/confirm"' in response.text
    still = b.get("/authorize", params=auth_params(client, prompt="none"))
    assert "code" in callback_params(still.headers["Location"])
    # The real ID token does end the session and redirect.
    response = b.get("/end_session", params={"id_token_hint": tokens["id_token"],
                                             "post_logout_redirect_uri": client.post_logout_redirect_uri})
    assert response.status_code == 302 and response.headers["Location"] == client.post_logout_redirect_uri


def test_language_switcher_never_copies_an_id_token_hint_into_the_page(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    page = browser.get("/end_session", params={"id_token_hint": "eyJhbGciOiJub25lIn0.e30.", "state": "s"})
    assert page.status_code == 200
    assert "eyJhbGciOiJub25lIn0" not in page.text
