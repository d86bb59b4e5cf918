"""Signing keys (RS256, and ES256 for access tokens when configured): generated, stored
encrypted, rotated without breaking live tokens."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

from joserfc.jwk import ECKey, KeySet, RSAKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.config import Settings
from idp.crypto import SecretBox
from idp.oidc.models import SigningKey

log = logging.getLogger(__name__)


# The algorithms keys exist for: RS256 always (ID tokens, logout tokens, and access tokens by
# default), ES256 when access tokens are signed with it (IDP_ACCESS_TOKEN_SIGNING_ALG).
RS256 = "RS256"
ES256 = "ES256"
SigningJWK = RSAKey | ECKey


def _generate(alg: str) -> SigningJWK:
    if alg == ES256:
        return ECKey.generate_key("P-256", private=True)
    return RSAKey.generate_key(2048, private=True)


def _import(alg: str, pem: str, kid: str) -> SigningJWK:
    if alg == ES256:
        return ECKey.import_key(pem, {"kid": kid, "alg": alg, "use": "sig"})
    return RSAKey.import_key(pem, {"kid": kid, "alg": alg, "use": "sig"})


class KeyService:
    """Loads and rotates the provider's signing keys: one current RS256 key, and one ES256
    key when access tokens are signed with ES256. A short in-process cache keeps signing
    cheap; a kid it does not know forces a reload, so rotations made by another process
    are picked up."""

    def __init__(self, *, session_factory: Any, box: SecretBox, retire_after: int, cache_seconds: int = 30,
                 algs: tuple[str, ...] = (RS256,)) -> None:
        self._session_factory = session_factory
        self._box = box
        self._retire_after = retire_after
        self._cache_seconds = cache_seconds
        self._algs = tuple(dict.fromkeys((RS256, *algs)))
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._signing: dict[str, SigningJWK] = {}
        self._public: KeySet = KeySet([])
        self._jwks: dict[str, Any] = {"keys": []}
        self._missing_warned: set[str] = set()

    # --- writing ---------------------------------------------------------------
    def create_key(self, session: Session, alg: str = RS256) -> SigningKey:
        key = _generate(alg)
        kid = secrets.token_urlsafe(12)
        public = key.as_dict(private=False)
        public.update({"kid": kid, "use": "sig", "alg": alg})
        row = SigningKey(
            kid=kid,
            alg=alg,
            private_key_encrypted=self._box.seal(key.as_pem(private=True)),
            public_jwk=public,
            created_at=int(time.time()),
        )
        session.add(row)
        return row

    def rotate(self, session: Session) -> list[SigningKey]:
        """New keys (one per algorithm in use, RS256 first) become the signing keys; older
        keys stay published for ``retire_after``."""
        now = int(time.time())
        for old in session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))):
            old.retired_at = now
            old.publish_until = now + self._retire_after
        rows = [self.create_key(session, alg) for alg in self._algs]
        session.flush()
        self._loaded_at = 0
        return rows

    def ensure_key(self, session: Session) -> None:
        """A current key for every algorithm in use (``darbaza db upgrade``, demo seed)."""
        have = set(session.scalars(select(SigningKey.alg).where(SigningKey.retired_at.is_(None))))
        for alg in self._algs:
            if alg not in have:
                self.create_key(session, alg)

    # --- reading ---------------------------------------------------------------
    def _fresh(self) -> bool:
        return RS256 in self._signing and time.monotonic() - self._loaded_at < self._cache_seconds

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
            # The cache's age counts from the read, not from the end of the (slower) key
            # import: what was read is never used longer than cache_seconds.
            read_at = time.monotonic()
            session: Session = self._session_factory()
            try:
                rows = list(session.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.id)))
            finally:
                session.close()
            published = [r for r in rows if r.publish_until is None or r.publish_until > now]
            current = {r.alg: r for r in rows if r.retired_at is None}  # the newest per algorithm
            if RS256 not in current:
                raise RuntimeError("no signing key: run `darbaza db upgrade` or `darbaza keys rotate`")
            # Opening and importing a private key costs tens of milliseconds (RSA
            # validation); a reload that finds the same keys keeps the imported objects.
            signing = {}
            for alg, row in current.items():
                held = self._signing.get(alg)
                signing[alg] = held if held is not None and held.kid == row.kid else _import(
                    alg, self._box.open(row.private_key_encrypted).decode(), row.kid)
            self._signing = signing
            jwks = {"keys": [dict(r.public_jwk) for r in published]}
            if jwks != self._jwks:
                self._jwks = jwks
                self._public = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            self._loaded_at = read_at

    def signing_key(self, alg: str = RS256) -> SigningJWK:
        """The current key for ``alg``; the RS256 one while there is no current ``alg`` key
        yet (ES256 configured after the last ``darbaza db upgrade`` / ``keys rotate``)."""
        self._load()
        key = self._signing.get(alg)
        if key is None:
            if alg not in self._missing_warned:
                self._missing_warned.add(alg)
                log.warning("no %s signing key yet (run `darbaza db upgrade` or `darbaza keys rotate`): "
                            "signing with RS256", alg)
            key = self._signing[RS256]
        return key

    def jwks(self) -> dict[str, Any]:
        self._load()
        return self._jwks

    def public_key(self, kid: str | None) -> SigningJWK | None:
        """The published key ``kid`` (a reload when unknown), or None."""
        self._load()
        found = self._find(kid)
        if found is None and kid is not None:
            self._load(force=True)
            found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> SigningJWK | None:
        found = next((k for k in self._public.keys if kid is not None and k.kid == kid), None)
        return found if isinstance(found, RSAKey | ECKey) else None


def build_key_service(settings: Settings, session_factory: Any) -> KeyService:
    """The key service of the web app and of worker jobs, from the settings."""
    return KeyService(
        session_factory=session_factory,
        box=SecretBox(settings.data_key or settings.secret_key, "signing-keys"),
        # A rotated-out key stays published as long as any token it signed can live.
        retire_after=max(settings.key_retire_after, settings.id_token_lifetime, settings.access_token_lifetime),
        cache_seconds=settings.key_cache_seconds,
        algs=(RS256, settings.access_token_signing_alg),
    )
