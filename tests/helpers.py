"""Test helpers: a form-filling HTTP user agent and PKCE/ID-token utilities.

The portal-app side uses a real OIDC client library (Authlib's requests client); the
user side is a ``requests.Session`` that reads and submits the provider's HTML forms.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import pyotp
import requests
from joserfc import jwt
from joserfc.jwk import KeySet


@dataclass
class UserInfo:
    id: int
    login: str
    password: str
    subject: str
    # Set by ``make_user`` for accounts it gave an authenticator app (roles that require 2FA).
    totp_secret: str | None = None
    recovery_codes: list[str] = field(default_factory=list)


class SecondFactors:
    """What the test "phone" knows: the TOTP seed and recovery codes of accounts that
    ``make_user`` enrolled, so ``Browser`` can answer the second sign-in step the way a
    person would. Each time step is accepted once by the provider, so a step is never
    reused here; when the steps the provider still accepts (now and one ahead) are
    spent, a recovery code is used instead."""

    def __init__(self) -> None:
        self._known: dict[str, UserInfo] = {}
        self._last_step: dict[str, int] = {}

    def remember(self, user: UserInfo) -> None:
        self._known[user.login] = user

    def code_for(self, login: str) -> str | None:
        user = self._known.get(login)
        if user is None:
            return None
        if user.totp_secret:
            # Not in the last two seconds of a step: the provider checks the same step.
            if 30 - time.time() % 30 < 2:
                time.sleep(30 - time.time() % 30 + 0.05)
            now_step = int(time.time()) // 30
            step = max(now_step - 1, self._last_step.get(login, -1) + 1)
            if step <= now_step + 1:
                self._last_step[login] = step
                return pyotp.TOTP(user.totp_secret).at(step * 30)
        if user.recovery_codes:
            return user.recovery_codes.pop()
        return None


SECOND_FACTORS = SecondFactors()


@dataclass
class ClientInfo:
    client_id: str
    client_secret: str | None
    redirect_uri: str
    post_logout_redirect_uri: str


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def form_fields(page: str, action_contains: str | None = None) -> tuple[str, dict[str, str]]:
    """The action and hidden/prefilled inputs of the first form (optionally by action)."""
    for match in re.finditer(r"<form[^>]*>(.*?)</form>", page, re.S):
        tag = page[match.start() : page.index(">", match.start()) + 1]
        action_m = re.search(r'action="([^"]*)"', tag)
        action = html.unescape(action_m.group(1)) if action_m else ""
        if action_contains and action_contains not in action:
            continue
        fields: dict[str, str] = {}
        for inp in re.finditer(r"<input[^>]*>", match.group(1)):
            name = re.search(r'name="([^"]*)"', inp.group(0))
            value = re.search(r'value="([^"]*)"', inp.group(0))
            if name:
                fields[html.unescape(name.group(1))] = html.unescape(value.group(1)) if value else ""
        return action, fields
    raise AssertionError(f"no form with action containing {action_contains!r} in page:\n{page[:2000]}")


class Browser:
    """A user agent that keeps cookies and follows the provider's pages by hand."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = requests.Session()
        self.http.headers["Accept-Language"] = "ky"

    def get(self, url: str, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        return self.http.get(urljoin(self.base, url), timeout=30, **kw)

    def post(self, url: str, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        return self.http.post(urljoin(self.base, url), timeout=30, **kw)

    def submit(self, page: requests.Response, action_contains: str, **values: str) -> requests.Response:
        action, fields = form_fields(page.text, action_contains)
        fields.update(values)
        return self.post(urljoin(page.url, action), data=fields)

    def sign_in(self, login: str, password: str, next_url: str = "/") -> requests.Response:
        page = self.get("/login?next=" + next_url)
        return self.second_step(self.submit(page, "/login", login=login, password=password), login)

    def second_step(self, response: requests.Response, login: str) -> requests.Response:
        """When the provider asks for the second factor of an account the test "phone"
        knows (``SECOND_FACTORS``), give it; otherwise return ``response`` unchanged."""
        location = response.headers.get("Location", "")
        if response.status_code != 303 or not location.endswith("/login/second-factor"):
            return response
        code = SECOND_FACTORS.code_for(login)
        if code is None:
            return response
        page = self.get(location)
        return self.submit(page, "/login/second-factor", code=code)

    def follow_until_external(self, response: requests.Response, consent: bool = True) -> requests.Response:
        """Follow redirects on the provider; approve consent when asked. Returns the
        response whose Location leaves the provider (or a page that stays)."""
        for _ in range(10):
            if response.status_code in (301, 302, 303, 307, 308):
                location = urljoin(response.url, response.headers["Location"])
                if not location.startswith(self.base):
                    return response
                response = self.get(location)
                continue
            if response.status_code == 200 and 'action="/authorize/consent"' in response.text and consent:
                response = self.submit(response, "/authorize/consent", approve="1")
                continue
            return response
        raise AssertionError("too many redirects")

    def authorize(
        self,
        client: ClientInfo,
        user: UserInfo | None = None,
        *,
        scope: str = "openid profile",
        extra: dict[str, str] | None = None,
        consent: bool = True,
        method: str = "GET",
    ) -> tuple[dict[str, str], str, requests.Response]:
        """Run /authorize (signing in when the login page shows); returns the callback
        query parameters, the PKCE verifier and the last response."""
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "scope": scope,
            "state": secrets.token_urlsafe(8),
            "nonce": secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        params.update(extra or {})
        params = {k: v for k, v in params.items() if v is not None}
        if method == "POST":
            response = self.post("/authorize", data=params)
        else:
            response = self.get("/authorize", params=params)
        for _ in range(4):
            response = self.follow_until_external(response, consent=consent)
            if response.status_code == 200 and 'action="/login"' in response.text and user is not None:
                response = self.submit(response, "/login", login=user.login, password=user.password)
                response = self.second_step(response, user.login)
                continue
            break
        location = response.headers.get("Location", "")
        return callback_params(location), verifier, response


def callback_params(location: str) -> dict[str, str]:
    if not location:
        return {}
    parts = urlsplit(location)
    query = parse_qs(parts.query or parts.fragment)
    return {k: v[0] for k, v in query.items()}


def decode_verified(token: str, jwks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a JWT against the provider's published JWKS; returns (header, claims)."""
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])
    return dict(decoded.header), dict(decoded.claims)
