"""The authorization request: validation and decision, with Authlib's gaps closed
(checklist P1, P2, P3, P5, P7, P8, P11, P18). The rules are kept free of Flask so that
one function decides both the first GET/POST and every later step of the same flow."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.decision import may_use_app
from idp.accounts.models import User
from idp.oidc.claims import SCOPES_SUPPORTED
from idp.oidc.models import AuthorizationCode, Client, Consent, token_hash
from idp.oidc.tokens import InvalidAccessToken, TokenService, new_family_id

PKCE_CHALLENGE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
PROMPTS = {"none", "login", "consent", "select_account"}
RESPONSE_MODES = {"query", "fragment", "form_post"}
MAX_PARAM_LENGTH = 4096
FLOW_TTL = 900


class FatalAuthorizeError(Exception):
    """The client or redirect URI cannot be trusted: show an error page, never redirect (R3)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AccessRefused(Exception):
    """The access decision refuses this signed-in account this app now (``decision``
    is an idp.access.decision.Decision with the reasons)."""

    def __init__(self, request: AuthorizationRequest, decision: Any) -> None:
        super().__init__("access refused")
        self.request = request
        self.decision = decision


class RedirectAuthorizeError(Exception):
    """An OAuth error that goes back to the validated redirect URI (with state and iss)."""

    def __init__(self, request: AuthorizationRequest, error: str, description: str) -> None:
        super().__init__(error)
        self.request = request
        self.error = error
        self.description = description


@dataclass
class AuthorizationRequest:
    """A validated authorization request."""

    client: Client
    redirect_uri: str  # where responses go
    redirect_uri_param: str  # as sent (empty when omitted), bound into the code
    response_mode: str
    state: str | None
    params: dict[str, str] = field(default_factory=dict)
    scope: str = ""
    nonce: str | None = None
    code_challenge: str = ""
    code_challenge_method: str = "S256"
    prompt: set[str] = field(default_factory=set)
    max_age: int | None = None
    id_token_hint_sub: str | None = None
    login_hint: str | None = None
    ui_locales: str | None = None


def single_values(multi: Any) -> tuple[dict[str, str], set[str]]:
    """Collapse a MultiDict; report parameters sent more than once (RFC 6749 §3.1)."""
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for key in multi.keys():
        items = multi.getlist(key)
        if len(items) > 1:
            repeated.add(key)
        values[key] = items[0]
    return values, repeated


def repeated_description(repeated: set[str]) -> str:
    """The error_description naming repeated parameters. The names come from the request:
    only the characters RFC 6749 §5.2 allows in a description (%x20-21 / %x23-5B /
    %x5D-7E) are kept, others become "?" (Authlib refuses to build the error otherwise,
    and nothing hostile is echoed to the app)."""
    def clean(name: str) -> str:
        return "".join(c if " " <= c <= "~" and c not in "\"\\" else "?" for c in name[:40])

    return ("Parameters must not be repeated: " + ", ".join(sorted(clean(n) for n in repeated)))[:200]


def validate(
    params: dict[str, str],
    repeated: set[str],
    *,
    query_client: Any,
    tokens: TokenService,
    db: Session,
) -> AuthorizationRequest:
    """Validate an authorization request or raise one of the two error kinds."""
    client_id = params.get("client_id", "")
    if "client_id" in repeated or not client_id:
        raise FatalAuthorizeError("missing_client")
    client: Client | None = query_client(client_id)
    if client is None:
        raise FatalAuthorizeError("unknown_client")

    scope_param = params.get("scope", "")
    requested_scopes = scope_param.split()
    redirect_param = params.get("redirect_uri", "")
    if "redirect_uri" in repeated:
        raise FatalAuthorizeError("bad_redirect_uri")
    if redirect_param:
        if not client.check_redirect_uri(redirect_param):
            raise FatalAuthorizeError("bad_redirect_uri")
        redirect_uri = redirect_param
    else:
        # P5 / OIDC Core 3.1.2.1: an OpenID request must name its redirect URI; a plain
        # OAuth request may omit it only when exactly one URI is registered.
        default = client.get_default_redirect_uri()
        if "openid" in requested_scopes or default is None:
            raise FatalAuthorizeError("missing_redirect_uri")
        redirect_uri = default

    response_mode = params.get("response_mode") or "query"
    request = AuthorizationRequest(
        client=client,
        redirect_uri=redirect_uri,
        redirect_uri_param=redirect_param,
        response_mode=response_mode if response_mode in RESPONSE_MODES else "query",
        state=params.get("state"),
        params=params,
    )

    def fail(error: str, description: str) -> RedirectAuthorizeError:
        return RedirectAuthorizeError(request, error, description)

    if request.state is not None and len(request.state) > MAX_PARAM_LENGTH:
        request.state = None
        raise fail("invalid_request", "The state parameter is too long.")
    if response_mode not in RESPONSE_MODES:
        raise fail("invalid_request", "Unsupported response_mode.")
    if repeated:
        raise fail("invalid_request", repeated_description(repeated))
    # A NUL is never valid in any parameter (and PostgreSQL refuses one in the nonce query).
    if any("\x00" in v for v in params.values()):
        raise fail("invalid_request", "Parameters must not contain NUL characters.")
    too_long = sorted(k for k, v in params.items() if len(v) > MAX_PARAM_LENGTH and k != "id_token_hint")
    if too_long or len(params.get("id_token_hint", "")) > 8192:
        raise fail("invalid_request", "A parameter is too long.")
    # B34/B33: request objects are not supported, and are not silently ignored either.
    if "request" in params:
        raise fail("request_not_supported", "Request objects are not supported.")
    if "request_uri" in params:
        raise fail("request_uri_not_supported", "request_uri is not supported.")

    response_type = params.get("response_type")
    if not response_type:
        raise fail("invalid_request", "Missing response_type.")
    # R12 / ASVS 10.6.1: the code flow only; never tokens from the authorization endpoint.
    if response_type != "code":
        raise fail("unsupported_response_type", "Only response_type=code is supported.")
    if not client.check_response_type(response_type):
        raise fail("unauthorized_client", "This client may not use the authorization code flow.")

    unknown = [s for s in requested_scopes if s not in SCOPES_SUPPORTED]
    if unknown:
        raise fail("invalid_scope", "Unknown scope: " + " ".join(unknown)[:200])
    if "openid" in requested_scopes and "openid" not in client.scopes:
        raise fail("invalid_scope", "This client may not request openid.")
    # ASVS 10.4.11: scopes the client was not assigned are dropped (down-scoping).
    allowed = [s for s in dict.fromkeys(requested_scopes) if s in client.scopes]
    request.scope = " ".join(allowed)

    # P7 / ASVS 10.4.6: PKCE with S256 for every client; plain and a missing method refused.
    challenge = params.get("code_challenge", "")
    method = params.get("code_challenge_method", "")
    if not challenge:
        raise fail("invalid_request", "code_challenge is required (PKCE with S256).")
    if method != "S256":
        raise fail("invalid_request", "code_challenge_method must be S256.")
    if not PKCE_CHALLENGE.match(challenge):
        raise fail("invalid_request", "Invalid code_challenge.")
    request.code_challenge = challenge
    request.code_challenge_method = method

    prompt = set(params.get("prompt", "").split())
    if prompt - PROMPTS:
        raise fail("invalid_request", "Unsupported prompt value.")
    if "none" in prompt and len(prompt) > 1:
        raise fail("invalid_request", "prompt=none cannot be combined with other values.")
    request.prompt = prompt

    if "max_age" in params:
        raw = params["max_age"]
        # ASCII digits only: str.isdigit() also accepts '²' (int() then raises) and other scripts.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
            raise fail("invalid_request", "max_age must be a non-negative integer.")
        request.max_age = int(raw)

    nonce = params.get("nonce") or None
    if nonce is not None:
        # P8: a nonce still bound to a live code of this client is a replay.
        now = int(time.time())
        live = db.scalar(
            select(AuthorizationCode.id).where(
                AuthorizationCode.client_id == client.client_id,
                AuthorizationCode.nonce == nonce,
                AuthorizationCode.expires_at > now,
            )
        )
        if live is not None:
            raise fail("invalid_request", "This nonce was already used.")
    request.nonce = nonce

    hint = params.get("id_token_hint")
    if hint:
        try:
            # typ JWT: only our ID tokens; an access token (typ at+jwt, same key and sub)
            # is not a hint (ASVS 9.2.2; /end_session checks the same).
            claims = tokens.decode_signed(hint, typ="JWT")
        except InvalidAccessToken:
            raise fail("invalid_request", "id_token_hint is not a valid ID token from this provider.") from None
        if claims.get("iss") != tokens.settings.issuer or not isinstance(claims.get("sub"), str):
            raise fail("invalid_request", "id_token_hint was not issued by this provider.")
        request.id_token_hint_sub = claims["sub"]
    request.login_hint = params.get("login_hint") or None
    request.ui_locales = params.get("ui_locales") or None
    return request


@dataclass
class Decision:
    """What happens next: 'login', 'consent' or 'issue'."""

    action: str


def decide(
    request: AuthorizationRequest,
    *,
    user: User | None,
    auth_time: int | None,
    flow_started: float | None,
    db: Session,
    authenticated_at: float | None = None,
    now: float | None = None,
    access: Callable[[AuthorizationRequest, User], None] | None = None,
) -> Decision:
    """Decide login / consent / issue; raise the OIDC errors for prompt=none (P1, P2, P3).

    ``authenticated_at`` is the precise sign-in moment; a sign-in after the flow started
    satisfies that flow's prompt=login, max_age and id_token_hint."""
    now = time.time() if now is None else now
    signed_in_at = authenticated_at if authenticated_at is not None else auth_time
    fresh = signed_in_at is not None and flow_started is not None and signed_in_at >= flow_started
    need_login = user is None or auth_time is None
    if not need_login and "login" in request.prompt and not fresh:
        need_login = True
    if not need_login and request.max_age is not None and auth_time is not None:
        if now - auth_time > request.max_age and not fresh:
            need_login = True
    if not need_login and request.id_token_hint_sub and user is not None:
        if user.subject != request.id_token_hint_sub and not fresh:
            need_login = True
    if need_login:
        if "none" in request.prompt:
            raise RedirectAuthorizeError(request, "login_required", "The user is not signed in.")
        return Decision("login")
    assert user is not None
    if access is not None:
        # The access decision (policy 5.1, 4.2.5) raises AccessRefused, or narrows
        # request.scope to what may be granted here, before consent is looked at.
        access(request, user)
    elif not may_use_app(user, request.client):
        raise RedirectAuthorizeError(request, "access_denied", "This account may not use this app.")
    if "consent" in request.prompt:
        return Decision("consent")
    if request.client.trusted or has_consent(db, user, request.client, request.scope):
        return Decision("issue")
    if "none" in request.prompt:
        raise RedirectAuthorizeError(request, "consent_required", "The user has not approved this app.")
    return Decision("consent")


def has_consent(db: Session, user: User, client: Client, scope: str) -> bool:
    row = db.scalar(select(Consent).where(Consent.user_id == user.id, Consent.client_id == client.client_id))
    return row is not None and set(scope.split()) <= set(row.scopes)


def remember_consent(db: Session, user: User, client: Client, scope: str) -> None:
    row = db.scalar(select(Consent).where(Consent.user_id == user.id, Consent.client_id == client.client_id))
    if row is None:
        db.add(Consent(user_id=user.id, client_id=client.client_id, scopes=sorted(set(scope.split()))))
    else:
        row.scopes = sorted(set(row.scopes) | set(scope.split()))


def issue_code(
    db: Session,
    request: AuthorizationRequest,
    *,
    user: User,
    auth_time: int,
    amr: list[str],
    acr: str | None,
    sid: str | None,
    lifetime: int,
) -> str:
    code = secrets.token_urlsafe(32)
    now = int(time.time())
    db.add(
        AuthorizationCode(
            code_hash=token_hash(code),
            family_id=new_family_id(),
            client_id=request.client.client_id,
            user_id=user.id,
            redirect_uri=request.redirect_uri_param,
            scope=request.scope,
            nonce=request.nonce,
            code_challenge=request.code_challenge,
            code_challenge_method=request.code_challenge_method,
            auth_time=auth_time,
            amr=amr,
            acr=acr,
            sid=sid,
            issued_at=now,
            expires_at=now + lifetime,
        )
    )
    db.commit()
    return code


# --- flows waiting for sign-in or consent (Redis) -------------------------------------
class FlowStore:
    """Authorization requests parked while the user signs in or consents."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def park(self, params: dict[str, str], started: float | None = None) -> str:
        flow_id = secrets.token_urlsafe(24)
        body = {"params": params, "started": started if started is not None else time.time()}
        self.redis.set(f"authreq:{flow_id}", json.dumps(body), ex=FLOW_TTL)
        return flow_id

    def load(self, flow_id: str) -> dict[str, Any] | None:
        if not flow_id or len(flow_id) > 64:
            return None
        raw = self.redis.get(f"authreq:{flow_id}")
        return json.loads(raw) if raw else None

    def drop(self, flow_id: str) -> None:
        self.redis.delete(f"authreq:{flow_id}")
