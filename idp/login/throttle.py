"""Guessing protection for sign-in: growing delays per account and per client IP,
and the per-credential failure counter that disables a credential at its limit.

Two layers, as NIST SP 800-63B-4 §3.2.2 and ASVS 6.1.1 ask together (checklist §6
item 4): Redis counters give growing delays so that guessing is slow but a victim is
never locked out for long (``Throttle``), and a database counter of *consecutive*
failures per credential disables that credential after at most 100 (N12), until tech
support re-enables it. The delay schedule is a pure function with unit tests.

Nothing here imports Flask: the views pass in the login, the IP and the session."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from sqlalchemy import update
from sqlalchemy.orm import InstrumentedAttribute, Session

from idp.accounts.models import User

# The delays after the free failures are used up: 5 s, 15 s, 30 s, 1 min, 2 min, then
# doubling (4, 8 min) up to the cap.
DELAY_STEPS = (5, 15, 30, 60, 120)
DEFAULT_MAX_DELAY = 900


def delay_after(failures: int, *, free_failures: int = 5, max_delay: int = DEFAULT_MAX_DELAY) -> int:
    """Seconds to wait before the next attempt after ``failures`` failures in a row."""
    over = failures - free_failures
    if over <= 0:
        return 0
    if over <= len(DELAY_STEPS):
        delay = DELAY_STEPS[over - 1]
    else:
        # Bound the exponent: the cap is reached long before, and 2**huge is slow.
        delay = DELAY_STEPS[-1] * 2 ** min(over - len(DELAY_STEPS), 32)
    return max(0, min(delay, max_delay))


class Throttled(Exception):
    """Too many failures: the caller must wait ``retry_after`` seconds (answered 429)."""

    def __init__(self, retry_after: int, purpose: str) -> None:
        super().__init__(f"{purpose}: retry after {retry_after} s")
        self.retry_after = retry_after
        self.purpose = purpose


# One round trip, atomic: count the failure, start the window on the first failure
# (or repair a counter left without expiry), and extend the block when the schedule
# says so. The schedule comes from ``delay_after`` so the policy stays in Python; it is
# sent only for the failures past the free ones (ARGV[2]), so a large allowance (a school
# NAT's, or a test's million) costs nothing per call.
_FAIL_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local over = n - tonumber(ARGV[2])
if over > 0 then
  if over > #ARGV - 2 then over = #ARGV - 2 end
  local delay = tonumber(ARGV[over + 2])
  if delay > 0 and redis.call('TTL', KEYS[2]) < delay then
    redis.call('SET', KEYS[2], '1', 'EX', delay)
  end
end
return n
"""


class Throttle:
    """A named limiter (``purpose`` such as ``login:account`` or ``login:ip``) with
    failure counters in Redis that expire ``window`` seconds after the first failure."""

    def __init__(
        self, *, redis: Redis, purpose: str, free_failures: int, max_delay: int = DEFAULT_MAX_DELAY, window: int
    ) -> None:
        self.redis = redis
        self.purpose = purpose
        self.free_failures = free_failures
        self.max_delay = max_delay
        self.window = window
        self._fail = redis.register_script(_FAIL_SCRIPT)
        # The schedule for failure counts free+1..free+N; the last entry holds for every
        # count above, and no failure within the free ones waits.
        self._schedule = [delay_after(free_failures + over, free_failures=free_failures, max_delay=max_delay)
                          for over in range(1, len(DELAY_STEPS) + 40)]

    def _keys(self, key: str) -> tuple[str, str]:
        # Hashed: keys stay short whatever the login string, and hold no login in clear.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        base = f"throttle:{self.purpose}:{digest}"
        return f"{base}:n", f"{base}:block"

    def check(self, key: str) -> int | None:
        """Seconds until ``key`` may try again, or None when it may try now."""
        ttl_ms = int(self.redis.pttl(self._keys(key)[1]))
        return max(1, math.ceil(ttl_ms / 1000)) if ttl_ms > 0 else None

    def guard(self, key: str) -> None:
        """Raise ``Throttled`` when ``key`` must wait."""
        wait = self.check(key)
        if wait is not None:
            raise Throttled(wait, self.purpose)

    def fail(self, key: str) -> int:
        """Count one failure of ``key``; returns the failures counted in the window."""
        return int(self._fail(keys=list(self._keys(key)), args=[self.window, self.free_failures, *self._schedule]))

    def failures(self, key: str) -> int:
        return int(self.redis.get(self._keys(key)[0]) or 0)

    def reset(self, key: str) -> None:
        self.redis.delete(*self._keys(key))


@dataclass(frozen=True)
class Credential:
    """The columns that count one kind of credential's consecutive failures (N12 is
    per authenticator: the TOTP issue adds its own entry with its own columns)."""

    kind: str
    failures: InstrumentedAttribute[int]
    disabled_at: InstrumentedAttribute[datetime | None]


PASSWORD = Credential("password", User.password_failures, User.password_disabled_at)
TOTP = Credential("totp", User.totp_failures, User.totp_disabled_at)


def record_credential_failure(db: Session, user_id: int, credential: Credential, *, limit: int) -> bool:
    """Count one failure in the database (atomically, so parallel attempts cannot
    lose counts); True when this failure reached ``limit`` and disabled the credential.
    The caller commits and journals."""
    failures = db.execute(
        update(User)
        .where(User.id == user_id)
        .values({credential.failures.key: credential.failures + 1})
        .returning(credential.failures)
    ).scalar_one()
    if failures < limit:
        return False
    # Only the attempt that disables it reports it, so the journal gets one event.
    disabled = db.execute(
        update(User)
        .where(User.id == user_id, credential.disabled_at.is_(None))
        .values({credential.disabled_at.key: datetime.now(UTC).replace(tzinfo=None)})
    )
    return bool(disabled.rowcount)  # type: ignore[attr-defined]


def reset_credential_failures(db: Session, user_id: int, credential: Credential) -> None:
    """N13: a successful use of the credential ends the run of consecutive failures."""
    db.execute(update(User).where(User.id == user_id, credential.failures != 0).values({credential.failures.key: 0}))


def is_disabled(user: User, credential: Credential) -> bool:
    return getattr(user, credential.disabled_at.key) is not None
