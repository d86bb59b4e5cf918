"""Encryption of secrets at rest (signing keys now, TOTP seeds later)."""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class SecretBox:
    """Fernet (AES-128-CBC + HMAC-SHA256) with a key derived from a setting by HKDF."""

    def __init__(self, key_material: str, purpose: str) -> None:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"darbaza-at-rest", info=purpose.encode()
        )
        key = hkdf.derive(key_material.encode("utf-8"))
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, plaintext: bytes) -> str:
        return self._fernet.encrypt(plaintext).decode("ascii")

    def open(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.encode("ascii"))
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with the configured key") from exc
