"""Passkeys (WebAuthn): the phishing-resistant sign-in option (issue 4; NIST 800-63B-4
§2.2.2 asks that one is offered at AAL2, checklist N23).

The ceremonies are checked by py_webauthn (Duo Labs); this module adds what the
library leaves to the relying party: single-use challenges in Redis bound to one
purpose and one account, the credential store, the owner checks and the signature
counter. No Flask here (DESIGN "Architecture"): views keep the challenge handle in
the session, journal and notify."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from redis import Redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url, options_to_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from idp.accounts.models import Passkey, User

# Long enough to find the passkey and touch it, short enough that a challenge
# does not linger (the browser's own timeout is the same).
CHALLENGE_TTL = 300
NAME_MAX = 64

Purpose = Literal["register", "second-factor", "passwordless"]


def _now_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class PasskeyRejected(Exception):
    """A ceremony failed. ``reason`` is for the journal only; every caller answers the
    person with one message, so a failure says nothing about which check failed or
    whether an account or credential exists."""

    def __init__(self, reason: str, *, passkey_id: int | None = None, user_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.passkey_id = passkey_id
        self.user_id = user_id


class PasskeyCloned(PasskeyRejected):
    """The signature was right but the authenticator's counter did not move forward:
    WebAuthn §6.1.1 says this hints at a cloned authenticator. Refused and journalled."""


class PasskeyAlreadyRegistered(PasskeyRejected):
    """The authenticator already holds a passkey registered here."""


@dataclass(frozen=True)
class Challenge:
    """What a challenge was issued for: checked again when the answer comes back."""

    purpose: str
    challenge: bytes
    user_id: int | None
    user_verification: bool


class ChallengeStore:
    """Single-use WebAuthn challenges in Redis (``webauthn-challenge:{handle}``).

    The random handle is kept in the browser's server-side session; the answer takes
    the challenge with GETDEL, so a replayed answer finds nothing (and two parallel
    answers cannot both find it)."""

    def __init__(self, redis: Redis, ttl: int = CHALLENGE_TTL) -> None:
        self.redis = redis
        self.ttl = ttl

    @staticmethod
    def key(handle: str) -> str:
        return f"webauthn-challenge:{handle}"

    def put(self, challenge: Challenge) -> str:
        handle = secrets.token_urlsafe(24)
        record = {
            "purpose": challenge.purpose,
            "challenge": bytes_to_base64url(challenge.challenge),
            "user_id": challenge.user_id,
            "uv": challenge.user_verification,
        }
        self.redis.set(self.key(handle), json.dumps(record), ex=self.ttl)
        return handle

    def discard(self, handle: str | None) -> None:
        """Forget a challenge that will not be answered (the browser asked for a new one)."""
        if isinstance(handle, str) and handle and len(handle) <= 64:
            self.redis.delete(self.key(handle))

    def take(self, handle: str | None, purpose: Purpose) -> Challenge | None:
        """The challenge for ``handle`` (now gone from the store), or None when it
        expired, was used already or was issued for another purpose."""
        if not isinstance(handle, str) or not handle or len(handle) > 64:
            return None
        raw = self.redis.getdel(self.key(handle))
        if raw is None:
            return None
        record = json.loads(raw)
        if record.get("purpose") != purpose:
            return None
        return Challenge(
            purpose=purpose,
            challenge=base64url_to_bytes(record["challenge"]),
            user_id=record.get("user_id"),
            user_verification=bool(record.get("uv")),
        )


def _descriptor(passkey: Passkey) -> PublicKeyCredentialDescriptor:
    transports: list[AuthenticatorTransport] = []
    for name in filter(None, passkey.transports.split(",")):
        try:
            transports.append(AuthenticatorTransport(name))
        except ValueError:
            continue  # a transport this library does not know yet: the browser finds it anyway
    return PublicKeyCredentialDescriptor(id=passkey.credential_id, transports=transports or None)


def _credential_id(credential: Any) -> bytes:
    """The raw credential id of a browser answer (before the library checks the rest)."""
    if not isinstance(credential, dict) or not isinstance(credential.get("rawId"), str):
        raise PasskeyRejected("malformed")
    try:
        raw = base64url_to_bytes(credential["rawId"])
    except ValueError as exc:
        raise PasskeyRejected("malformed") from exc
    if not raw or len(raw) > 1023:
        raise PasskeyRejected("malformed")
    return raw


def _user_handle(credential: dict[str, Any]) -> bytes | None:
    response = credential.get("response")
    value = response.get("userHandle") if isinstance(response, dict) else None
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64url_to_bytes(value)
    except ValueError as exc:
        raise PasskeyRejected("malformed") from exc


def serialized_origin(url: str) -> str:
    """The origin of ``url`` as a browser writes it in clientDataJSON (HTML "ASCII
    serialization of an origin"): lower-case scheme and host, no default port, no path."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("https", 443), ("http", 80)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def user_handle(user: User) -> bytes:
    """The WebAuthn user id: the account's random, stable OIDC subject, never the login
    name (WebAuthn §14.6.1: no personal information in the user handle)."""
    return user.subject.encode("ascii")


class PasskeyService:
    """Registration and sign-in with passkeys for one relying party (the issuer's host)."""

    def __init__(
        self, *, redis: Redis, issuer: str, rp_name: str, challenge_ttl: int = CHALLENGE_TTL,
        clock: Callable[[], datetime] = _now_naive,
    ) -> None:
        parts = urlsplit(issuer)
        if not parts.hostname:
            raise ValueError("the issuer has no host name")
        # WebAuthn §5.1.3: the RP id is the host; the origin the browser reports is the
        # issuer's scheme, host and port (no path), compared as an exact string. Browsers
        # refuse an IP address as RP id ("This is an invalid domain"): a deployment (or
        # a demo) must use a host name, http://localhost at least.
        self.rp_id = parts.hostname
        self.origin = serialized_origin(issuer)
        self.rp_name = rp_name
        self.challenges = ChallengeStore(redis, challenge_ttl)
        self.timeout_ms = challenge_ttl * 1000
        self.clock = clock

    # --- registration ---------------------------------------------------------------
    def registration_options(self, user: User) -> tuple[dict[str, Any], str]:
        """Options for ``navigator.credentials.create()`` and the challenge handle."""
        options = generate_registration_options(
            rp_id=self.rp_id,
            rp_name=self.rp_name,
            user_id=user_handle(user),
            user_name=user.login,
            user_display_name=user.display_name or user.login,
            timeout=self.timeout_ms,
            # One authenticator holds one passkey of this account (WebAuthn §5.4 excludeCredentials).
            exclude_credentials=[_descriptor(p) for p in user.passkeys],
            authenticator_selection=AuthenticatorSelectionCriteria(
                # Discoverable when the authenticator can, so the passkey also signs in
                # without a login name; verification preferred, required only where it
                # stands for a factor on its own (passwordless sign-in).
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=UserVerificationRequirement.PREFERRED,
            ),
        )
        handle = self.challenges.put(Challenge("register", options.challenge, user.id, False))
        return json.loads(options_to_json(options)), handle

    def register(self, db: Session, user: User, handle: str | None, credential: Any, name: str) -> Passkey:
        """Check the browser's answer to the registration options and store the new
        passkey (in the caller's transaction). Raises ``PasskeyRejected``."""
        challenge = self.challenges.take(handle, "register")
        if challenge is None or challenge.user_id != user.id:
            raise PasskeyRejected("challenge", user_id=user.id)
        if not isinstance(credential, dict):
            raise PasskeyRejected("malformed", user_id=user.id)
        try:
            verified = verify_registration_response(
                credential=credential,
                expected_challenge=challenge.challenge,
                expected_rp_id=self.rp_id,
                expected_origin=self.origin,
                require_user_presence=True,
                require_user_verification=False,
            )
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            raise PasskeyRejected(_reason(exc), user_id=user.id) from exc
        if len(verified.credential_id) > 1023:
            raise PasskeyRejected("credential-id-too-long", user_id=user.id)
        if db.scalar(select(Passkey.id).where(Passkey.credential_id == verified.credential_id)) is not None:
            raise PasskeyAlreadyRegistered("already-registered", user_id=user.id)
        response = credential.get("response")
        transports = response.get("transports") if isinstance(response, dict) else None
        known = {t.value for t in AuthenticatorTransport}
        passkey = Passkey(
            user_id=user.id,
            credential_id=verified.credential_id,
            public_key=verified.credential_public_key,
            sign_count=verified.sign_count,
            transports=",".join(t for t in transports if t in known)[:255] if isinstance(transports, list) else "",
            aaguid=verified.aaguid,
            backed_up=verified.credential_backed_up,
            name=clean_name(name) or "Passkey",
            created_at=self.clock(),
        )
        db.add(passkey)
        try:
            db.flush()
        except IntegrityError as exc:
            # The same authenticator answered two registrations at once: the unique
            # credential id keeps one; this transaction is rolled back.
            db.rollback()
            raise PasskeyAlreadyRegistered("already-registered", user_id=user.id) from exc
        return passkey

    # --- sign-in --------------------------------------------------------------------
    def authentication_options(self, user: User | None) -> tuple[dict[str, Any], str]:
        """Options for ``navigator.credentials.get()`` and the challenge handle.

        With ``user`` (the second step after the password) the account's passkeys are
        listed and user verification is preferred; without it (passwordless) the list is
        empty, the authenticator offers its discoverable passkeys, and it must verify
        the person (PIN or biometrics), since the passkey then stands for two factors."""
        passwordless = user is None
        options = generate_authentication_options(
            rp_id=self.rp_id,
            timeout=self.timeout_ms,
            allow_credentials=[] if user is None else [_descriptor(p) for p in user.passkeys],
            user_verification=(
                UserVerificationRequirement.REQUIRED if passwordless else UserVerificationRequirement.PREFERRED
            ),
        )
        purpose: Purpose = "passwordless" if passwordless else "second-factor"
        handle = self.challenges.put(
            Challenge(purpose, options.challenge, None if user is None else user.id, passwordless)
        )
        return json.loads(options_to_json(options)), handle

    def authenticate(
        self, db: Session, handle: str | None, credential: Any, *, user: User | None
    ) -> Passkey:
        """Check an assertion. With ``user`` (second step) the passkey must be one of
        that account's; without it (passwordless) the passkey names its account. On
        success the counter and last use are updated (in the caller's transaction) and
        the passkey is returned. Raises ``PasskeyRejected`` (``PasskeyCloned``)."""
        purpose: Purpose = "passwordless" if user is None else "second-factor"
        challenge = self.challenges.take(handle, purpose)
        if challenge is None or (user is not None and challenge.user_id != user.id):
            raise PasskeyRejected("challenge")
        raw_id = _credential_id(credential)
        passkey = db.scalar(select(Passkey).where(Passkey.credential_id == raw_id))
        if passkey is None:
            raise PasskeyRejected("unknown-credential")
        if user is not None and passkey.user_id != user.id:
            raise PasskeyRejected("not-this-account", passkey_id=passkey.id, user_id=user.id)
        owner = user or db.get(User, passkey.user_id)
        if owner is None:
            raise PasskeyRejected("unknown-credential")
        # WebAuthn §7.2 step 6: a user handle in the answer must be the passkey's owner.
        handle_in_answer = _user_handle(credential)
        if handle_in_answer is not None and handle_in_answer != user_handle(owner):
            raise PasskeyRejected("user-handle-mismatch", passkey_id=passkey.id, user_id=owner.id)
        try:
            verified = verify_authentication_response(
                credential=credential,
                expected_challenge=challenge.challenge,
                expected_rp_id=self.rp_id,
                expected_origin=self.origin,
                credential_public_key=passkey.public_key,
                # The counter is checked below, after the signature, so that a refused
                # counter is known to come from the real key (a clone), not from noise.
                credential_current_sign_count=0,
                require_user_verification=challenge.user_verification,
            )
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            raise PasskeyRejected(_reason(exc), passkey_id=passkey.id, user_id=owner.id) from exc
        new_count = verified.new_sign_count
        values: dict[str, Any] = {"last_used_at": self.clock(), "backed_up": verified.credential_backed_up}
        query = update(Passkey).where(Passkey.id == passkey.id)
        if new_count > 0 or passkey.sign_count > 0:
            # WebAuthn §6.1.1: the counter must grow. Atomic, so two answers with the
            # same count (a clone racing the original) cannot both pass.
            query = query.where(Passkey.sign_count < new_count)
            values["sign_count"] = new_count
        done = db.execute(query.values(values).execution_options(synchronize_session=False))
        if not done.rowcount:  # type: ignore[attr-defined]
            raise PasskeyCloned("sign-count-not-increased", passkey_id=passkey.id, user_id=owner.id)
        db.refresh(passkey)
        return passkey

    # --- management -----------------------------------------------------------------
    def rename(self, passkey: Passkey, name: str) -> None:
        passkey.name = clean_name(name) or passkey.name

    def remove(self, db: Session, user: User, passkey: Passkey) -> None:
        """Delete one of ``user``'s passkeys (in the caller's transaction)."""
        user.passkeys.remove(passkey)
        db.flush()


def clean_name(name: str | None) -> str:
    """A passkey's label as the person typed it: control characters become spaces, runs
    of spaces one, trimmed, at most 64 characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in (name or ""))
    return " ".join(text.split())[:NAME_MAX]


def _reason(exc: Exception) -> str:
    """A short, journal-safe reason from a library error (its message names the check)."""
    message = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {message}"[:200]
