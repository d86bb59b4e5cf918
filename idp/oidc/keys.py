"""Signing keys: generated, stored encrypted, rotated without breaking live tokens."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from joserfc.jwk import KeySet, RSAKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.config import Settings
from idp.crypto import SecretBox
from idp.oidc.models import SigningKey


class KeyService:
    """Loads and rotates the provider's RS256 keys. A short in-process cache keeps
    signing cheap; a kid it does not know forces a reload, so rotations made by
    another process are picked up."""

    def __init__(self, *, session_factory: Any, box: SecretBox, retire_after: int, cache_seconds: int = 30) -> None:
        self._session_factory = session_factory
        self._box = box
        self._retire_after = retire_after
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._signing: RSAKey | None = None
        self._signing_kid: str | None = None
        self._public: KeySet = KeySet([])
        self._jwks: dict[str, Any] = {"keys": []}

    # --- writing ---------------------------------------------------------------
    def create_key(self, session: Session) -> SigningKey:
        key = RSAKey.generate_key(2048, private=True)
        kid = secrets.token_urlsafe(12)
        public = key.as_dict(private=False)
        public.update({"kid": kid, "use": "sig", "alg": "RS256"})
        row = SigningKey(
            kid=kid,
            alg="RS256",
            private_key_encrypted=self._box.seal(key.as_pem(private=True)),
            public_jwk=public,
            created_at=int(time.time()),
        )
        session.add(row)
        return row

    def rotate(self, session: Session) -> SigningKey:
        """Make a new key the signing key; older keys stay published for ``retire_after``."""
        now = int(time.time())
        for old in session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))):
            old.retired_at = now
            old.publish_until = now + self._retire_after
        row = self.create_key(session)
        session.flush()
        self._loaded_at = 0
        return row

    def ensure_key(self, session: Session) -> None:
        if session.scalar(select(SigningKey.id).where(SigningKey.retired_at.is_(None))) is None:
            self.create_key(session)

    # --- reading ---------------------------------------------------------------
    def _fresh(self) -> bool:
        return self._signing is not None and time.monotonic() - self._loaded_at < self._cache_seconds

    def _load(self, force: bool = False) -> None:
        """Read the keys again when the cache is older than ``cache_seconds`` or when
        ``force`` (a kid nobody knows: perhaps another process just rotated; a made-up kid
        costs one small query, the key objects are kept)."""
        if not force and self._fresh():
            return
        with self._lock:
            # The threads that found the cache stale queue here: the first reloads, the
            # others find it fresh again.
            if not force and self._fresh():
                return
            now = int(time.time())
            session: Session = self._session_factory()
            try:
                rows = list(session.scalars(select(SigningKey).order_by(SigningKey.created_at)))
            finally:
                session.close()
            published = [r for r in rows if r.publish_until is None or r.publish_until > now]
            active = [r for r in rows if r.retired_at is None]
            if not active:
                raise RuntimeError("no signing key: run `darbaza db upgrade` or `darbaza keys rotate`")
            current = active[-1]
            # Opening and importing a private key costs tens of milliseconds (RSA
            # validation); a reload that finds the same keys keeps the imported objects.
            if self._signing is None or self._signing_kid != current.kid:
                self._signing = RSAKey.import_key(
                    self._box.open(current.private_key_encrypted).decode(),
                    {"kid": current.kid, "alg": "RS256", "use": "sig"},
                )
                self._signing_kid = current.kid
            jwks = {"keys": [dict(r.public_jwk) for r in published]}
            if jwks != self._jwks:
                self._jwks = jwks
                self._public = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            self._loaded_at = time.monotonic()

    def signing_key(self) -> RSAKey:
        self._load()
        assert self._signing is not None
        return self._signing

    def jwks(self) -> dict[str, Any]:
        self._load()
        return self._jwks

    def public_keyset(self, kid: str | None = None) -> KeySet:
        self._load()
        if kid is not None and not any(k.kid == kid for k in self._public.keys):
            self._load(force=True)
        return self._public


def build_key_service(settings: Settings, session_factory: Any) -> KeyService:
    """The key service of the web app and of worker jobs, from the settings."""
    return KeyService(
        session_factory=session_factory,
        box=SecretBox(settings.data_key or settings.secret_key, "signing-keys"),
        # A rotated-out key stays published as long as any token it signed can live.
        retire_after=max(settings.key_retire_after, settings.id_token_lifetime, settings.access_token_lifetime),
        cache_seconds=settings.key_cache_seconds,
    )
