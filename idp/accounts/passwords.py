"""Password hashing with argon2id; rehash when the parameters change."""

from __future__ import annotations

import unicodedata

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


def normalise(password: str) -> str:
    """NFC-normalise a password (NIST 800-63B-4 §3.1.1.2); never truncate or case-fold."""
    return unicodedata.normalize("NFC", password)


class PasswordHashing:
    """argon2id hashing with parameters from settings."""

    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        # A fixed hash verified when the login is unknown, so both paths cost the same.
        self._dummy = self._hasher.hash("darbaza-timing-equaliser")

    def hash(self, password: str) -> str:
        return self._hasher.hash(normalise(password))

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; a missing hash still spends the same time."""
        try:
            return self._hasher.verify(stored_hash or self._dummy, normalise(password)) and (
                stored_hash is not None
            )
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)
