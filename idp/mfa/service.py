"""The second-factor service: TOTP seeds (encrypted at rest), the replay guard for
used time steps (Redis, shared by every process) and the recovery codes.

No Flask here (DESIGN "Architecture"): views pass the db session and the account,
and journal and notify themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from redis import Redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from idp.accounts.models import RecoveryCode, User
from idp.accounts.passwords import PasswordHashing
from idp.crypto import SecretBox
from idp.mfa import recovery, totp

# Longer than any code stays valid (the current step plus one of drift), so a replay
# inside the window always finds the key; older codes fail the time check anyway.
STEP_KEY_TTL = 10 * totp.STEP_SECONDS

# Atomic "set if greater": two processes checking the same code at once cannot both
# win, whatever Redis client or server they run on (ASVS 6.5.1, NIST N17).
_CLAIM_STEP = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _now_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class TotpStepStore:
    """The last accepted time step per account, in Redis (``totp-step:{user_id}``)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._claim = redis.register_script(_CLAIM_STEP)

    @staticmethod
    def key(user_id: int) -> str:
        return f"totp-step:{user_id}"

    def last(self, user_id: int) -> int | None:
        raw = self.redis.get(self.key(user_id))
        return int(raw) if raw is not None else None

    def claim(self, user_id: int, step: int) -> bool:
        """Record ``step`` as used; False when it (or a later one) was used already."""
        return bool(self._claim(keys=[self.key(user_id)], args=[step, STEP_KEY_TTL]))

    def forget(self, user_id: int) -> None:
        self.redis.delete(self.key(user_id))


class TwoFactorService:
    """TOTP and recovery codes for one deployment (seeds sealed with ``box``)."""

    def __init__(
        self, *, redis: Redis, passwords: PasswordHashing, box: SecretBox, school_name: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.steps = TotpStepStore(redis)
        self.passwords = passwords
        self.box = box
        self.school_name = school_name
        self.clock = clock

    # --- enrolment ----------------------------------------------------------------
    def new_sealed_secret(self) -> str:
        """A fresh seed, already encrypted: the pending enrolment keeps only this."""
        return self.box.seal(totp.new_secret().encode("ascii"))

    def open_secret(self, sealed: str) -> str:
        return self.box.open(sealed).decode("ascii")

    def provisioning_uri(self, secret: str, account: str) -> str:
        return totp.provisioning_uri(secret, account=account, school_name=self.school_name)

    def check_code(self, user_id: int, secret: str, code: str) -> bool:
        """True when ``code`` is valid now and its step was not used before by this
        account; the step is then marked used (atomically, across processes)."""
        step = totp.verify(secret, code, self.clock(), self.steps.last(user_id))
        return step is not None and self.steps.claim(user_id, step)

    def enable(self, db: Session, user: User, sealed: str, code: str) -> list[str] | None:
        """Confirm an enrolment with its first code: store the seed, turn TOTP on and
        return ten new recovery codes (in the caller's transaction); None when the code
        is wrong."""
        if not self.check_code(user.id, self.open_secret(sealed), code):
            return None
        user.totp_secret_encrypted = sealed
        user.totp_enabled_at = _now_naive()
        user.totp_failures = 0
        user.totp_disabled_at = None
        return self.replace_recovery_codes(db, user)

    def disable(self, db: Session, user: User) -> None:
        """Remove TOTP and the recovery codes (in the caller's transaction)."""
        user.totp_secret_encrypted = None
        user.totp_enabled_at = None
        user.totp_failures = 0
        user.totp_disabled_at = None
        db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
        self.steps.forget(user.id)

    # --- sign-in ------------------------------------------------------------------
    def check_user_totp(self, user: User, code: str) -> bool:
        if not user.has_totp or user.totp_secret_encrypted is None:
            return False
        return self.check_code(user.id, self.open_secret(user.totp_secret_encrypted), code)

    # --- recovery codes -----------------------------------------------------------
    def replace_recovery_codes(self, db: Session, user: User) -> list[str]:
        """Ten new codes (shown once, returned in display form); the old ones stop working."""
        db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
        codes = recovery.new_codes()
        for code in codes:
            db.add(RecoveryCode(user_id=user.id, code_hash=self.passwords.hash(code)))
        db.flush()
        return [recovery.display(code) for code in codes]

    def use_recovery_code(self, db: Session, user_id: int, text: str) -> bool:
        """True when ``text`` is one of the account's unused codes; that code is then
        marked used, atomically, so two requests cannot both spend it. The caller commits."""
        code = recovery.normalise(text)
        if code is None:
            return False
        rows = db.execute(
            select(RecoveryCode.id, RecoveryCode.code_hash).where(
                RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None)
            )
        ).all()
        # Each is an argon2id check: at most ten, and only after the password was right.
        for row_id, code_hash in rows:
            if self.passwords.verify(code_hash, code):
                spent = db.execute(
                    update(RecoveryCode)
                    .where(RecoveryCode.id == row_id, RecoveryCode.used_at.is_(None))
                    .values(used_at=_now_naive())
                )
                return bool(spent.rowcount)  # type: ignore[attr-defined]
        return False

    def unused_recovery_codes(self, db: Session, user_id: int) -> int:
        return int(db.scalar(
            select(func.count()).select_from(RecoveryCode).where(
                RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None)
            )
        ) or 0)
