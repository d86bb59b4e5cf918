"""The Authlib authorization server, wired once: the grants we allow, token endpoints,
revocation, introspection and RP-initiated logout. Authlib's gaps (checklist §5.3) are
closed here and in ``authorize.py``."""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import unquote

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oidc.rpinitiated import EndSessionEndpoint
from flask import request as http_request
from sqlalchemy import select, update

from idp.access.decision import (
    REFRESH,
    TOKEN,
    Decision,
    context_for,
    decide_for,
    protocol_description,
)
from idp.accounts.models import User, load_account
from idp.observability import TOKENS, count_on_commit
from idp.oidc.models import AccessToken, AuthorizationCode, Client, RefreshToken, token_hash
from idp.oidc.tokens import ACCESS_TOKEN_ALGS, GrantContext, InvalidAccessToken, new_family_id
from idp.services import Services

CONFIDENTIAL_METHODS = ["client_secret_basic", "client_secret_post"]
# How long a code replay stays marked (well beyond the time one token request takes).
CODE_REPLAY_MARK_TTL = 600


def _burnt_key(family_id: str) -> str:
    return f"family-revoked:{family_id}"


def authenticate_client_secret_basic(query_client: Any, request: Any) -> Client | None:
    """``client_secret_basic`` without Authlib's crashes on malformed headers ("Basic " with
    no value, non-ASCII text, or credentials that are not UTF-8 all raised a 500)."""
    scheme, _sep, value = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError and non-ASCII input
        return None
    client_id, sep, secret = decoded.partition(":")
    client_id, secret = unquote(client_id), unquote(secret)  # RFC 6749 §2.3.1 form-encoding
    if not sep or not client_id or not secret:
        return None
    client = query_client(client_id)
    if client is not None and client.check_client_secret(secret):
        return client  # type: ignore[no-any-return]
    return None


class S256Only(CodeChallenge):
    """PKCE with S256 only (checklist P7); the challenge itself is required in authorize.py."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def get_authorization_code_challenge(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge_method


class _DarbazaGrantMixin:
    """Shared plumbing: our services and one way to mint tokens with full context."""

    server: DarbazaAuthorizationServer
    request: Any

    @property
    def svc(self) -> Services:
        return self.server.svc

    def _issue(self, *, user: User | None, scope: str, context: GrantContext, refresh: bool) -> dict[str, Any]:
        token = self._mint(user=user, scope=scope, context=context, refresh=refresh)
        self._after_issue(token, user=user, context=context)
        return token

    def _mint(self, *, user: User | None, scope: str, context: GrantContext, refresh: bool) -> dict[str, Any]:
        """Build and sign the tokens; their rows are added to the session, not yet stored."""
        session = self.svc.db.session
        token = self.server.tokens.issue(
            session,
            client=self.request.client,
            user=user,
            scope=scope,
            context=context,
            include_refresh_token=refresh,
        )
        if user is not None and "openid" in scope.split():
            token["id_token"] = self.server.tokens.id_token(
                client=self.request.client,
                user=user,
                scope=scope,
                context=context,
                access_token=token["access_token"],
            )
        grant_type = str(getattr(self, "GRANT_TYPE", "unknown"))
        for kind in ("access_token", "refresh_token", "id_token"):
            if kind in token:  # darbaza_tokens_issued_total (idp/observability.py), once committed
                count_on_commit(session, TOKENS, f"{grant_type}|{kind}")
        return token

    def _after_issue(self, token: dict[str, Any], *, user: User | None, context: GrantContext) -> None:
        """Store the minted tokens (commit), then the bookkeeping that follows."""
        session = self.svc.db.session
        session.commit()
        if user is None:
            return
        # One round trip: back-channel logout learns that this app is used from the
        # browser session (refreshes the TTL), and the replay mark below is read.
        pipe = self.svc.redis.pipeline(transaction=False)
        self.svc.backchannel.remember_app(context.sid, self.request.client.client_id, pipe=pipe)
        pipe.exists(_burnt_key(context.family_id))
        burnt = pipe.execute()[-1]
        # R14 / R27 race: the code or refresh token behind this family was replayed while
        # these tokens were being minted; that revocation may have run before they
        # existed, so revoke them now. (A client-credentials family is new: nothing
        # behind it can be replayed.)
        if burnt:
            self.server.tokens.revoke_family(session, context.family_id)
            session.commit()

    def _person_ip(self) -> str | None:
        """The person's address when the person is seen at the token endpoint: a public
        app (SPA, mobile) calls it from the person's device; a confidential app from its
        own server, whose address says nothing about where the person is."""
        client: Client = self.request.client
        return (http_request.remote_addr or "") if client.is_public else None

    def _access(self, user: User, *, phase: str, scopes: list[str], amr: list[str]) -> Decision:
        """The access decision (policy 5.1, 4.2.5) at this token request."""
        context = context_for(
            self.svc.settings, phase=phase, now=self.svc.clock(), client=self.request.client,
            ip=self._person_ip(), scopes=scopes, amr=amr,
        )
        return decide_for(self.svc.db.session, user, context, self.svc.restrictions)

    def _journal_refusal(self, action: str, user: User, decision: Decision, **details: Any) -> None:
        self.svc.journal.record(
            self.svc.db.session,
            actor=f"client:{self.request.client.client_id}",
            action=action,
            subject=f"user:{user.id}",
            reason="access-denied",
            ip=http_request.remote_addr,
            details={"codes": decision.codes, "network": decision.network,
                     "restrictions": sorted({r.restriction_id for r in decision.denials if r.restriction_id}),
                     **details},
        )

    def _require_live_session(self, sid: str | None, *, what: str) -> None:
        """Tokens live and die with the browser session they were issued in (issue 5;
        ``idp/sessions/registry.py``): a session that was ended or timed out (idle or
        absolute, its own limits) refuses the code or refresh token with invalid_grant,
        and every token of that session is revoked now (the sweep tells its apps)."""
        self._session_seen: dict[str, Any] | None = None
        if not sid:
            return
        state, self._session_seen = self.svc.sessions.check(sid)
        if state == "live":
            return
        session = self.svc.db.session
        self.server.tokens.revoke_session(session, sid)
        session.commit()
        why = {
            "idle": "timed out after a period of inactivity",
            "absolute": "reached its maximum lifetime",
        }.get(state, "has ended (signed out, ended on another device or by support)")
        raise InvalidGrantError(f"The sign-in session of this {what} {why}. Sign in again.")

    def _burn_family(
        self, family_id: str, *, client_id: str, user_id: int | None, action: str, reason: str
    ) -> None:
        """A replayed credential: revoke every token of its family and journal it. The mark
        comes first, so a concurrent winner still minting sees it (see ``_issue``)."""
        session = self.svc.db.session
        self.svc.redis.set(_burnt_key(family_id), "1", ex=CODE_REPLAY_MARK_TTL)
        self.server.tokens.revoke_family(session, family_id)
        self.svc.journal.record(
            session,
            actor=f"client:{client_id}",
            action=action,
            subject=f"user:{user_id}" if user_id else None,
            reason=reason,
        )
        session.commit()


class CodeGrant(_DarbazaGrantMixin, grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [*CONFIDENTIAL_METHODS, "none"]

    def save_authorization_code(self, code: str, request: Any) -> None:  # pragma: no cover
        # Codes are created by our own authorize flow (authorize.py), never by Authlib.
        raise RuntimeError("authorization codes are issued by idp.oidc.authorize")

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        session = self.svc.db.session
        row = session.scalar(select(AuthorizationCode).where(AuthorizationCode.code_hash == token_hash(code)))
        if row is None or row.client_id != client.client_id:
            return None
        now = int(time.time())
        # P6 / R27: mark the code used atomically; whoever loses the race, or comes later,
        # gets invalid_grant and every token issued from the code is revoked.
        claimed = session.execute(
            update(AuthorizationCode)
            .where(AuthorizationCode.id == row.id, AuthorizationCode.used_at.is_(None))
            .values(used_at=now)
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
        if claimed != 1:
            self._burn_family(
                row.family_id,
                client_id=client.client_id,
                user_id=row.user_id,
                action="token:code:replay",
                reason="authorization code used twice; tokens issued from it revoked",
            )
            return None
        if row.expires_at <= now:
            return None
        return row

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        # Kept (marked used) so that a replay is recognised and revokes the family.
        return None

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        user = load_account(self.svc.db.session, authorization_code.user_id)
        return user if user is not None and user.can_sign_in else None

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        client = self.request.client
        code: AuthorizationCode = self.request.authorization_code
        user = self.authenticate_user(code)
        if user is None:
            raise InvalidGrantError("The account behind this code cannot sign in.")
        self._require_live_session(code.sid, what="code")
        self.request.user = user
        # Restrictions at token issue: the hours, the app, the validity may have changed
        # since the authorization (the scopes were decided there).
        access = self._access(user, phase=TOKEN, scopes=code.scope.split(), amr=code.get_amr())
        if not access.allowed:
            self._journal_refusal("access:token:refused", user, access)
            self.svc.db.session.commit()
            raise InvalidGrantError(protocol_description(access))
        context = GrantContext(
            family_id=code.family_id,
            sid=code.sid,
            auth_time=code.auth_time,
            amr=code.get_amr(),
            acr=code.acr,
            nonce=code.nonce,
        )
        token = self._issue(
            user=user, scope=code.scope, context=context, refresh=client.check_grant_type("refresh_token")
        )
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshGrant(_DarbazaGrantMixin, grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [*CONFIDENTIAL_METHODS, "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        session = self.svc.db.session
        if len(refresh_token) > 512:
            return None
        row = session.scalar(select(RefreshToken).where(RefreshToken.token_hash == token_hash(refresh_token)))
        client: Client = self.request.client
        # B37 / R15: a token of another client is simply invalid, and must not burn it.
        if row is None or row.client_id != client.client_id:
            return None
        if row.revoked_at is not None or row.is_expired():
            return None
        self._require_live_session(row.sid, what="refresh token")
        requested = self.request.payload.scope
        if requested and not set(requested.split()) <= set(row.scope.split()):
            raise InvalidScopeError()
        self._refresh_access(row, requested or row.scope)
        # Rotation with reuse detection (R14, ASVS 10.4.5): presenting an already-used
        # token revokes the whole family. The token is claimed in ``create_token_response``,
        # in the same short transaction that stores its successors (see ``_rotate``).
        if row.used_at is not None:
            self._reuse(row)
            return None
        return row

    def _reuse(self, row: RefreshToken) -> None:
        self._burn_family(
            row.family_id,
            client_id=self.request.client.client_id,
            user_id=row.user_id,
            action="token:refresh:reuse",
            reason="a used refresh token was presented again; its family is revoked",
        )

    def _rotate(self, *, user: User, scope: str, context: GrantContext) -> dict[str, Any]:
        """Claim the old token and store its successors in ONE transaction, so a process
        killed at any point leaves the family either as it was (the old token usable)
        or rotated (the new one usable), never half rotated (issue 9). The new tokens are
        built and signed first; the conditional UPDATE is the transaction's last
        statement before the INSERTs and the COMMIT, with no other query in between, so
        a parallel refresh of the same token waits on its row lock (PostgreSQL) or the
        write lock (SQLite) only for those few statements — holding the lock while
        minting queued 20 parallel refreshes on the pool (commit 3d53522)."""
        old: RefreshToken = self.request.refresh_token
        session = self.svc.db.session
        with session.no_autoflush:
            token = self._mint(user=user, scope=scope, context=context, refresh=True)
            claimed = session.execute(
                update(RefreshToken)
                .where(RefreshToken.id == old.id, RefreshToken.used_at.is_(None),
                       RefreshToken.revoked_at.is_(None))
                .values(used_at=int(time.time()))
            ).rowcount  # type: ignore[attr-defined]
        if claimed != 1:
            session.rollback()  # the successors are never stored
            self._reuse(old)
            raise InvalidGrantError()
        self._after_issue(token, user=user, context=context)
        return token

    def _refresh_access(self, row: RefreshToken, scope: str) -> None:
        """Every refresh asks the access decision, before the token is claimed. Refused
        for a time or place (outside the hours, from another network): invalid_grant and
        the refresh token stays as it was, usable again when allowed. Refused for a
        lasting reason (the app, the validity, 2FA): its family is revoked too. Allowed:
        the scopes to grant (school-only ones need the person seen inside)."""
        self._granted_scope = scope
        user = load_account(self.svc.db.session, row.user_id) if row.user_id is not None else None
        # Held for authenticate_user: the session's identity map holds objects weakly, and
        # loading the account again costs five queries.
        self._account = user
        if user is None or not user.can_sign_in:
            return  # authenticate_user refuses it and revokes the family
        access = self._access(user, phase=REFRESH, scopes=scope.split(), amr=list(row.amr or []))
        if access.allowed:
            self._granted_scope = " ".join(access.granted_scopes)
            return
        session = self.svc.db.session
        self._journal_refusal("access:refresh:refused", user, access, token_kept=not access.lasting)
        if access.lasting:
            self.server.tokens.revoke_family(session, row.family_id)
        session.commit()
        raise InvalidGrantError(protocol_description(access))

    def authenticate_user(self, refresh_token: RefreshToken) -> User | None:
        if refresh_token.user_id is None:
            return None
        held: User | None = getattr(self, "_account", None)
        user = held if held is not None and held.id == refresh_token.user_id else load_account(
            self.svc.db.session, refresh_token.user_id)
        if user is None or not user.can_sign_in:
            return None
        return user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        old: RefreshToken = self.request.refresh_token
        user = self.authenticate_user(old)
        if user is None:
            self.server.tokens.revoke_family(self.svc.db.session, old.family_id)
            self.svc.db.session.commit()
            raise InvalidGrantError("The account behind this token cannot sign in.")
        self.request.user = user
        scope = getattr(self, "_granted_scope", None) or self.request.payload.scope or old.scope
        context = GrantContext(
            family_id=old.family_id,
            sid=old.sid,
            auth_time=old.auth_time,
            amr=list(old.amr or []),
            acr=old.acr,
            family_expires_at=old.expires_at,
        )
        token = self._rotate(user=user, scope=scope, context=context)
        if old.sid:
            # A refresh is the person using the session through a portal app (as in
            # Keycloak): it restarts the session's idle clock, never its absolute one.
            self.svc.sessions.touch(old.sid, seen=getattr(self, "_session_seen", None))
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        # Already marked used when it was claimed.
        return None


class ClientCredentialsGrant(_DarbazaGrantMixin, grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_METHODS

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        client: Client = self.request.client
        requested = self.request.payload.scope
        allowed = set(client.scopes) - {"openid", "offline_access"}
        if requested:
            wanted = set(requested.split())
            if not wanted <= allowed:
                raise InvalidScopeError()
        else:
            wanted = allowed
        scope = " ".join(sorted(wanted))
        token = self._issue(user=None, scope=scope, context=GrantContext(family_id=new_family_id()), refresh=False)
        return 200, token, self.TOKEN_RESPONSE_HEADER


def _lookup_token(server: DarbazaAuthorizationServer, token_string: str, hint: str | None) -> Any:
    """Find a token by value: a JWT access token (by jti) or a refresh token (by hash)."""
    session = server.svc.db.session
    if not token_string or len(token_string) > 8192:
        return None
    if hint != "refresh_token" and token_string.count(".") == 2:
        try:
            claims = server.tokens.decode_signed(token_string, typ="at+jwt", algs=ACCESS_TOKEN_ALGS)
        except InvalidAccessToken:
            return None
        jti = claims.get("jti")
        return session.get(AccessToken, jti) if isinstance(jti, str) else None
    return session.scalar(select(RefreshToken).where(RefreshToken.token_hash == token_hash(token_string)))


class Revocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = [*CONFIDENTIAL_METHODS, "none"]

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return _lookup_token(self.server, token_string, token_type_hint)

    def revoke_token(self, token: Any, request: Any) -> None:
        session = self.server.svc.db.session
        # RFC 7009 §2.1: revoking a refresh token also ends the access tokens of its grant.
        self.server.tokens.revoke_family(session, token.family_id)
        self.server.svc.journal.record(
            session,
            actor=f"client:{token.client_id}",
            action="token:revoke",
            subject=f"user:{token.user_id}" if token.user_id else f"client:{token.client_id}",
            details={"kind": "access_token" if isinstance(token, AccessToken) else "refresh_token"},
        )
        session.commit()


class Introspection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = CONFIDENTIAL_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return _lookup_token(self.server, token_string, token_type_hint)

    def check_permission(self, token: Any, client: Client, request: Any) -> bool:
        # A portal app may introspect only the tokens issued to it.
        return bool(token.client_id == client.client_id)

    def introspect_token(self, token: Any) -> dict[str, Any]:
        session = self.server.svc.db.session
        user = load_account(session, token.user_id) if token.user_id else None
        if token.user_id and (user is None or not user.can_sign_in):
            return {"active": False}
        data: dict[str, Any] = {
            "active": True,
            "client_id": token.client_id,
            "scope": token.scope,
            "iss": self.server.svc.settings.issuer,
            "iat": token.issued_at,
            "exp": token.expires_at,
            "token_type": "Bearer" if isinstance(token, AccessToken) else "refresh_token",
            "sub": user.subject if user else token.client_id,
            "aud": token.client_id,
        }
        if user is not None:
            data["username"] = user.login
        if isinstance(token, AccessToken):
            data["jti"] = token.jti
        if token.sid:
            data["sid"] = token.sid
        return data

    def create_introspection_payload(self, token: Any) -> dict[str, Any]:
        if token is None or token.is_revoked() or token.is_expired():
            return {"active": False}
        return self.introspect_token(token)


class EndSession(EndSessionEndpoint):
    """RP-initiated logout (Authlib >= 1.7); the UI and the logout itself live in views."""

    def get_server_jwks(self) -> dict[str, Any]:
        return self.server.svc.keys.jwks()

    def get_algorithms(self) -> list[str]:
        return ["RS256"]

    def validate_request(self, request: Any) -> Any:
        # Only our ID tokens are hints: an access token (same key, sub and aud, but typ
        # at+jwt, and held by resource servers too) must not end a session unasked.
        hint = request.payload.data.get("id_token_hint")
        if hint:
            try:
                claims = self.server.tokens.decode_signed(hint, typ="JWT")
            except InvalidAccessToken as exc:
                raise InvalidRequestError("id_token_hint is not an ID token of this provider.") from exc
            if claims.get("iss") != self.server.svc.settings.issuer:
                raise InvalidRequestError("id_token_hint was not issued by this provider.")
        return super().validate_request(request)

    def end_session(self, end_session_request: Any) -> None:
        from idp.login.flow import sign_out

        sign_out()


class DarbazaAuthorizationServer(AuthorizationServer):
    """Authlib's server bound to our services. Only code, refresh and client-credentials
    grants are registered: no implicit, hybrid or password grant (R12, R20)."""

    def __init__(self, svc: Services) -> None:
        super().__init__()
        self.svc = svc
        self.tokens = svc.tokens

    def query_client(self, client_id: str) -> Client | None:
        # No client id holds a NUL, and PostgreSQL refuses one in a query (a 500 before).
        if not client_id or len(client_id) > 64 or "\x00" in client_id:
            return None
        session = self.svc.db.session
        clients = self.svc.clients
        client = (clients.lookup(session, client_id) if clients is not None
                  else session.scalar(select(Client).where(Client.client_id == client_id)))
        return client if client is not None and client.active else None

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        # Tokens are recorded while they are minted (TokenService.issue).
        return None

    def handle_response(self, status_code: int, payload: Any, headers: Any) -> Any:
        response = super().handle_response(status_code, payload, headers)
        if status_code >= 400 or "access_token" in str(payload)[:200]:
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        return response


def build_server(app: Any, svc: Services) -> DarbazaAuthorizationServer:
    server = DarbazaAuthorizationServer(svc)
    server.init_app(app)
    server.register_client_auth_method("client_secret_basic", authenticate_client_secret_basic)
    server.register_grant(CodeGrant, [S256Only(required=True)])
    server.register_grant(RefreshGrant)
    server.register_grant(ClientCredentialsGrant)
    server.register_endpoint(Revocation)
    server.register_endpoint(Introspection)
    server.register_endpoint(EndSession)
    return server
