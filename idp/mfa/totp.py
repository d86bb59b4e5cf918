"""TOTP maths (RFC 6238), pure: no I/O, no clock, no Flask (STYLE 4).

The caller passes the time and the last time step already used by this account; the
check answers with the step the code matched, so the caller can record it atomically
(idp/mfa/service.py keeps it in Redis) and a code is accepted only once (ASVS 6.5.1,
NIST N17). Codes are 6 digits over 30-second steps (ASVS 6.5.5, N16) and one step of
clock drift is allowed each way (RFC 6238 §5.2); a code two steps old is refused."""

from __future__ import annotations

import hmac

import pyotp

STEP_SECONDS = 30
DIGITS = 6
# RFC 6238 §5.2: at most one step of drift backwards and forwards.
DRIFT_STEPS = 1
# 32 base32 characters = 160 bits (RFC 4226 §4 recommends 160; N15 asks for at least 112).
SECRET_LENGTH = 32
ISSUER_PREFIX = "Darbaza"


def new_secret() -> str:
    """A fresh 160-bit seed from the operating system's CSPRNG (ASVS 6.5.3), in base32."""
    return pyotp.random_base32(SECRET_LENGTH)


def issuer_name(school_name: str) -> str:
    # The otpauth label is "issuer:account", so a colon in the school's name would split it.
    school = " ".join(school_name.replace(":", " ").split())
    return f"{ISSUER_PREFIX} — {school}" if school else ISSUER_PREFIX


def provisioning_uri(secret: str, *, account: str, school_name: str) -> str:
    """The ``otpauth://totp/...`` URI that authenticator apps read from the QR code."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account.replace(":", " "), issuer_name=issuer_name(school_name)
    )


def grouped_secret(secret: str) -> str:
    """The secret in groups of four characters, for typing it into an app by hand."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def step_at(now: float) -> int:
    """The time step (counter) that contains the moment ``now`` (Unix seconds)."""
    return int(now // STEP_SECONDS)


def normalise_code(code: str) -> str | None:
    """The code as six ASCII digits, spaces removed; None when it cannot be a TOTP code."""
    compact = "".join(code.split())
    if len(compact) != DIGITS or not compact.isascii() or not compact.isdigit():
        return None
    return compact


def code_at(secret: str, step: int) -> str:
    """The code an authenticator shows during ``step`` (used by tests and enrolment)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(step)


def verify(secret: str, code: str, now: float, last_used_step: int | None) -> int | None:
    """The step ``code`` belongs to when it is valid at ``now`` (±1 step) and newer than
    ``last_used_step``; otherwise None. Every candidate is compared in constant time."""
    wanted = normalise_code(code)
    if wanted is None:
        return None
    current = step_at(now)
    matches = [
        step
        for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1)
        if hmac.compare_digest(code_at(secret, step), wanted)
    ]
    # N17: a step at or before the last accepted one is a replay (or an older code).
    fresh = [step for step in matches if last_used_step is None or step > last_used_step]
    return fresh[0] if fresh else None
