"""Issuing, verifying and revoking tokens: JWT access tokens (RFC 9068), opaque refresh
tokens with rotation and family revocation, and ID tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import update
from sqlalchemy.orm import Session

from idp.accounts.models import User
from idp.config import Settings
from idp.oidc.claims import user_claims
from idp.oidc.keys import KeyService
from idp.oidc.models import AccessToken, Client, RefreshToken, token_hash

SIGNING_ALG = "RS256"
# Access tokens may be signed with ES256 (IDP_ACCESS_TOKEN_SIGNING_ALG); tokens of both
# stay valid across a change of the setting.
ACCESS_TOKEN_ALGS = ("RS256", "ES256")
# OIDC Back-Channel Logout 1.0 §2.4: the one event a logout token carries.
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# A logout token is delivered at once or re-minted for each retry, so it can be short.
LOGOUT_TOKEN_LIFETIME = 120


class InvalidAccessToken(Exception):
    """The bearer token is malformed, badly signed, expired, revoked or of the wrong type."""


@dataclass
class GrantContext:
    """What an issued token carries over from the sign-in that started its family."""

    family_id: str
    sid: str | None = None
    auth_time: int | None = None
    amr: list[str] = field(default_factory=list)
    acr: str | None = None
    nonce: str | None = None
    # Absolute end of the refresh-token family (ASVS 10.4.8).
    family_expires_at: int | None = None


def new_family_id() -> str:
    return secrets.token_urlsafe(24)


def half_hash(value: str) -> str:
    """at_hash / c_hash for RS256: left half of SHA-256, base64url."""
    digest = hashlib.sha256(value.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


class TokenService:
    """Mints and checks every token the provider issues."""

    def __init__(self, *, settings: Settings, keys: KeyService) -> None:
        self.settings = settings
        self.keys = keys

    # --- minting -----------------------------------------------------------------
    def _sign(self, header: dict[str, Any], claims: dict[str, Any], alg: str = SIGNING_ALG) -> str:
        key = self.keys.signing_key(alg)
        alg = key.alg or SIGNING_ALG  # RS256 while no key for ``alg`` exists yet
        header = {"alg": alg, "kid": key.kid, **header}
        return jwt.encode(header, claims, key, algorithms=[alg])

    def issue(
        self,
        session: Session,
        *,
        client: Client,
        user: User | None,
        scope: str,
        context: GrantContext,
        include_refresh_token: bool,
    ) -> dict[str, Any]:
        """Create an access token (and a refresh token when asked) and record both."""
        now = int(time.time())
        jti = str(uuid.uuid4())
        lifetime = self.settings.access_token_lifetime
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "sub": user.subject if user else client.client_id,
            "aud": client.client_id,
            "client_id": client.client_id,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti,
            "scope": scope,
        }
        if user is not None:
            claims["roles"] = user.role_names
            if context.sid:
                claims["sid"] = context.sid
            if context.auth_time is not None:
                claims["auth_time"] = context.auth_time
            if context.acr:
                claims["acr"] = context.acr
            if context.amr:
                claims["amr"] = context.amr
        access_token = self._sign({"typ": "at+jwt"}, claims, self.settings.access_token_signing_alg)
        session.add(
            AccessToken(
                jti=jti,
                family_id=context.family_id,
                client_id=client.client_id,
                user_id=user.id if user else None,
                sid=context.sid,
                scope=scope,
                issued_at=now,
                expires_at=now + lifetime,
            )
        )
        token: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        if include_refresh_token and user is not None:
            value = secrets.token_urlsafe(48)
            expires_at = context.family_expires_at or now + self.settings.refresh_token_lifetime
            session.add(
                RefreshToken(
                    token_hash=token_hash(value),
                    family_id=context.family_id,
                    client_id=client.client_id,
                    user_id=user.id,
                    scope=scope,
                    sid=context.sid,
                    auth_time=context.auth_time,
                    amr=list(context.amr),
                    acr=context.acr,
                    issued_at=now,
                    expires_at=expires_at,
                )
            )
            token["refresh_token"] = value
        return token

    def id_token(
        self,
        *,
        client: Client,
        user: User,
        scope: str,
        context: GrantContext,
        access_token: str | None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "aud": client.client_id,
            "azp": client.client_id,
            "iat": now,
            "exp": now + self.settings.id_token_lifetime,
        }
        if context.auth_time is not None:
            claims["auth_time"] = context.auth_time
        if context.nonce:
            claims["nonce"] = context.nonce
        if context.acr:
            claims["acr"] = context.acr
        if context.amr:
            claims["amr"] = context.amr
        if context.sid:
            claims["sid"] = context.sid
        if access_token:
            claims["at_hash"] = half_hash(access_token)
        claims.update(user_claims(user, scope, self.settings, client))
        return self._sign({"typ": "JWT"}, claims)

    def logout_token(self, *, client_id: str, subject: str | None, sid: str | None) -> str:
        """A logout token (OIDC Back-Channel Logout 1.0 §2.4) for one app: ``sub`` and/or
        ``sid``, the back-channel event, a unique ``jti``, never a ``nonce``. Typed
        ``logout+jwt`` (§4.1, ASVS 10.5.5) so that it cannot pass for an ID token."""
        if not subject and not sid:
            raise ValueError("a logout token needs sub or sid")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "aud": client_id,
            "iat": now,
            "exp": now + LOGOUT_TOKEN_LIFETIME,
            "jti": str(uuid.uuid4()),
            "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
        }
        if subject:
            claims["sub"] = subject
        if sid:
            claims["sid"] = sid
        return self._sign({"typ": "logout+jwt"}, claims)

    # --- verifying -----------------------------------------------------------------
    def decode_signed(self, value: str, *, typ: str | None, algs: tuple[str, ...] = (SIGNING_ALG,)) -> dict[str, Any]:
        """Verify a JWT we issued: an algorithm of ``algs`` that is the algorithm of the key
        its kid names (a key we publish), our issuer."""
        if not value or len(value) > 8192 or value.count(".") != 2:
            raise InvalidAccessToken("malformed")
        try:
            header_raw = value.split(".")[0]
            header = json.loads(base64.urlsafe_b64decode(header_raw + "=" * (-len(header_raw) % 4)))
            if not isinstance(header, dict):
                raise InvalidAccessToken("malformed header")
            header_kid = header.get("kid")
            header_typ = header.get("typ")
            alg = header.get("alg")
            if alg not in algs or "jwk" in header or "jku" in header or "x5u" in header:
                raise InvalidAccessToken("algorithm or key source not allowed")
            if typ is not None and header_typ != typ:
                raise InvalidAccessToken("wrong token type")
            key = self.keys.public_key(header_kid if isinstance(header_kid, str) else None)
            # The key decides the algorithm: an ES256 header naming an RSA key (or the
            # reverse) is refused before any verification.
            if key is None or key.alg != alg:
                raise InvalidAccessToken("unknown key or algorithm of another key")
            token = jwt.decode(value, key, algorithms=[alg])
        except InvalidAccessToken:
            raise
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise InvalidAccessToken("bad signature or encoding") from exc
        return dict(token.claims)

    def verify_access_token(self, session: Session, value: str) -> tuple[dict[str, Any], AccessToken]:
        claims = self.decode_signed(value, typ="at+jwt", algs=ACCESS_TOKEN_ALGS)
        try:
            JWTClaimsRegistry(
                iss={"essential": True, "value": self.settings.issuer},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(claims)
        except JoseError as exc:
            raise InvalidAccessToken("claims not valid") from exc
        record = session.get(AccessToken, claims["jti"])
        if record is None or record.is_revoked() or record.is_expired():
            raise InvalidAccessToken("revoked")
        return claims, record

    # --- revoking -----------------------------------------------------------------
    @staticmethod
    def _revoke_where(session: Session, field: str, value: object) -> None:
        """Revoke the refresh and access tokens whose ``field`` equals ``value``."""
        now = int(time.time())
        for model in (RefreshToken, AccessToken):
            column = getattr(model, field)
            session.execute(
                update(model).where(column == value, model.revoked_at.is_(None)).values(revoked_at=now)
            )

    def revoke_family(self, session: Session, family_id: str) -> None:
        """Revoke every refresh and access token descended from one grant."""
        self._revoke_where(session, "family_id", family_id)

    def revoke_session(self, session: Session, sid: str) -> None:
        """Revoke the tokens bound to one browser session (sign-out)."""
        self._revoke_where(session, "sid", sid)

    def revoke_user(self, session: Session, user_id: int) -> None:
        """Revoke every token of an account (lock, disable, end all sessions)."""
        self._revoke_where(session, "user_id", user_id)
