"""A software WebAuthn authenticator for tests: what a phone's passkey or a security key
does, in a few dozen lines of ``cryptography`` and ``cbor2``.

It answers the provider's options the way the browser's ``navigator.credentials`` would
(the JSON that idp/static/passkeys.js sends): ES256 (P-256) keys, clientDataJSON with
type/challenge/origin, authenticator data with the RP id hash, flags (UP, UV, AT, BE,
BS) and the signature counter, attested credential data with AAGUID and COSE key,
"none" attestation; assertions are signed over authenticatorData || SHA-256(clientDataJSON).
Every field can be bent by a test (another origin, a counter that goes backwards, no
user verification) to check that the provider refuses it."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_BE = 0x08
FLAG_BS = 0x10
FLAG_AT = 0x40

# An AAGUID of our own (none of a real vendor), so the stored value is recognisable.
TEST_AAGUID = bytes.fromhex("d0a1b2c3d4e5f60718293a4b5c6d7e8f")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftAuthenticator:
    """One credential on one authenticator. ``create`` makes it, ``get`` signs with it."""

    origin: str
    rp_id: str | None = None  # from the options when None
    user_verified: bool = True
    backup_eligible: bool = True
    backed_up: bool = True
    # Many platform passkeys keep no counter (always 0); a security key counts up.
    counts: bool = True
    sign_count: int = 0
    aaguid: bytes = TEST_AAGUID
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    user_handle: bytes | None = None
    registered_rp_id: str | None = None

    # --- pieces -------------------------------------------------------------------------
    def cose_public_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({
            1: 2,  # kty: EC2
            3: -7,  # alg: ES256
            -1: 1,  # crv: P-256
            -2: numbers.x.to_bytes(32, "big"),
            -3: numbers.y.to_bytes(32, "big"),
        })

    def _flags(self, *, attested: bool, user_present: bool = True, user_verified: bool | None = None) -> int:
        flags = 0
        if user_present:
            flags |= FLAG_UP
        if self.user_verified if user_verified is None else user_verified:
            flags |= FLAG_UV
        if self.backup_eligible:
            flags |= FLAG_BE
            if self.backed_up:
                flags |= FLAG_BS
        if attested:
            flags |= FLAG_AT
        return flags

    def authenticator_data(self, rp_id: str, flags: int, sign_count: int, attested: bool) -> bytes:
        data = hashlib.sha256(rp_id.encode("utf-8")).digest() + bytes([flags]) + struct.pack(">I", sign_count)
        if attested:
            data += self.aaguid + struct.pack(">H", len(self.credential_id)) + self.credential_id
            data += self.cose_public_key()
        return data

    @staticmethod
    def client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False},
            separators=(",", ":"),
        ).encode("utf-8")

    def _next_count(self) -> int:
        if self.counts:
            self.sign_count += 1
        return self.sign_count

    # --- ceremonies ---------------------------------------------------------------------
    def create(self, options: dict[str, Any], *, origin: str | None = None, rp_id: str | None = None) -> dict[str, Any]:
        """Answer ``navigator.credentials.create({publicKey: options})`` (options as JSON)."""
        rp = rp_id or self.rp_id or options["rp"]["id"]
        self.registered_rp_id = rp
        self.user_handle = from_b64url(options["user"]["id"])
        client_data = self.client_data("webauthn.create", options["challenge"], origin or self.origin)
        auth_data = self.authenticator_data(rp, self._flags(attested=True), self._next_count(), attested=True)
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["internal", "hybrid"],
            },
        }

    def get(
        self, options: dict[str, Any], *, origin: str | None = None, rp_id: str | None = None,
        sign_count: int | None = None, user_verified: bool | None = None, user_present: bool = True,
        with_user_handle: bool = True,
    ) -> dict[str, Any]:
        """Answer ``navigator.credentials.get({publicKey: options})``. The keyword
        arguments bend the answer for negative tests."""
        rp = rp_id or options.get("rpId") or self.rp_id or self.registered_rp_id or ""
        client_data = self.client_data("webauthn.get", options["challenge"], origin or self.origin)
        count = self._next_count() if sign_count is None else sign_count
        flags = self._flags(attested=False, user_present=user_present, user_verified=user_verified)
        auth_data = self.authenticator_data(rp, flags, count, attested=False)
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(self.user_handle) if with_user_handle and self.user_handle else None,
            },
        }

    def clone(self) -> SoftAuthenticator:
        """A copy with the same key and counter: what an attacker who extracted the key has."""
        twin = copy.copy(self)
        twin.key = self.key
        return twin

    def stranger(self) -> SoftAuthenticator:
        """Another authenticator (new key and credential id) claiming the same account."""
        other = SoftAuthenticator(origin=self.origin, rp_id=self.rp_id)
        other.user_handle = self.user_handle
        other.registered_rp_id = self.registered_rp_id
        return other
