"""Guardian link codes (issue 7): a parent links a child to their account with a
one-time code the school prints or sends. No Flask here; the caller commits.

- A code is 12 characters from the unambiguous card alphabet (31 symbols, about 59.4
  bits), shown as ``XXXX-XXXX-XXXX``. Only the SHA-256 of the normalised code (upper
  case, no dashes or spaces) is stored: with that many random bits and a throttled
  entry page a fast hash is enough, and it lets redemption find the code by its hash.
- A child may have several active codes at once (two parents, a lost slip): issuing
  one does not revoke the others; the console lists them and an admin revokes one.
- Redemption is single use even under races: one ``UPDATE ... WHERE used_at IS NULL
  AND revoked_at IS NULL AND expires_at > now`` decides who gets it.
- Every change is journalled: ``account:guardian-code:issue|revoke|redeem|failure``
  and ``account:guardian:link``."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from idp.accounts.admin import CODE_ALPHABET
from idp.accounts.models import GuardianLinkCode, User
from idp.audit.journal import Journal

GUARDIAN_CODE_DAYS = 30
CODE_LENGTH = 12
PARENT = "parent"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def normalise_code(code: str) -> str:
    """What the person typed, as stored: dashes, spaces and case do not matter."""
    return "".join(ch for ch in (code or "").upper() if ch not in "- \t")


def code_hash(code: str) -> str:
    return hashlib.sha256(normalise_code(code).encode("utf-8", "surrogatepass")).hexdigest()


def format_code(raw: str) -> str:
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


@dataclass(frozen=True)
class Context:
    """Who acts, from where (for the journal)."""

    actor: str
    ip: str | None = None
    request_id: str | None = None


class GuardianCodeError(Exception):
    """The code is unknown, expired, revoked or already used (one answer for all)."""


class NotAParent(Exception):
    """Only accounts with the ``parent`` role may link children."""


class AlreadyLinked(Exception):
    """The child is already linked to this parent (the code was not spent)."""

    def __init__(self, child: User) -> None:
        super().__init__(child.login)
        self.child = child


def _record(journal: Journal, db: Session, ctx: Context, action: str, subject: str | None, **details: object) -> None:
    journal.record(db, actor=ctx.actor, action=action, subject=subject, ip=ctx.ip, request_id=ctx.request_id,
                   details=dict(details))


def issue_code(
    db: Session, journal: Journal, child: User, ctx: Context, *, purpose: str = "console",
) -> tuple[str, GuardianLinkCode]:
    """A new code for ``child``; returns the code as shown (``XXXX-XXXX-XXXX``) and its
    row. Earlier codes of the child stay valid (a child may have two parents)."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    now = _now()
    row = GuardianLinkCode(
        child_id=child.id, code_hash=code_hash(raw), created_at=now,
        expires_at=now + timedelta(days=GUARDIAN_CODE_DAYS), created_by=ctx.actor,
    )
    db.add(row)
    db.flush()
    _record(journal, db, ctx, "account:guardian-code:issue", f"user:{child.id}", code_id=row.id,
            expires_at=row.expires_at.isoformat(), purpose=purpose)
    return format_code(raw), row


def active_codes(db: Session, child: User) -> list[GuardianLinkCode]:
    """The child's codes that can still be redeemed, newest first."""
    return list(db.scalars(
        select(GuardianLinkCode)
        .where(GuardianLinkCode.child_id == child.id, GuardianLinkCode.used_at.is_(None),
               GuardianLinkCode.revoked_at.is_(None), GuardianLinkCode.expires_at > _now())
        .order_by(GuardianLinkCode.created_at.desc(), GuardianLinkCode.id.desc())
    ))


def revoke_code(db: Session, journal: Journal, child: User, code_id: int, ctx: Context) -> bool:
    """Revoke one active code of ``child``; False when there is no such active code."""
    now = _now()
    done = db.execute(
        update(GuardianLinkCode)
        .where(GuardianLinkCode.id == code_id, GuardianLinkCode.child_id == child.id,
               GuardianLinkCode.used_at.is_(None), GuardianLinkCode.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        return False
    _record(journal, db, ctx, "account:guardian-code:revoke", f"user:{child.id}", code_id=code_id)
    return True


def live_code(db: Session, code: str) -> GuardianLinkCode | None:
    """The live code row for what was typed, or None (reads only)."""
    raw = normalise_code(code)
    if len(raw) != CODE_LENGTH or any(ch not in CODE_ALPHABET for ch in raw):
        return None
    return db.scalar(
        select(GuardianLinkCode).where(
            GuardianLinkCode.code_hash == code_hash(raw), GuardianLinkCode.used_at.is_(None),
            GuardianLinkCode.revoked_at.is_(None), GuardianLinkCode.expires_at > _now(),
        )
    )


def record_failure(db: Session, journal: Journal, ctx: Context) -> None:
    """Journal a code that did not work (the caller also counts it against the IP)."""
    _record(journal, db, ctx, "account:guardian-code:failure", None)


def redeem(db: Session, journal: Journal, guardian: User, code: str, ctx: Context) -> User:
    """Spend ``code`` and link its child to ``guardian`` (an account with the parent
    role). Raises ``GuardianCodeError`` (the same for unknown, expired, revoked and used
    codes), ``NotAParent`` or ``AlreadyLinked`` (the code is then not spent). Returns the
    child. The caller commits (and rolls back on an exception)."""
    if PARENT not in guardian.role_names:
        raise NotAParent()
    peek = live_code(db, code)
    if peek is None:
        raise GuardianCodeError()
    child = db.get(User, peek.child_id)
    if child is None or child.id == guardian.id:
        raise GuardianCodeError()
    if child in guardian.children:
        raise AlreadyLinked(child)
    now = _now()
    # The one statement that decides: of two parallel redemptions only one matches.
    spent = db.execute(
        update(GuardianLinkCode)
        .where(GuardianLinkCode.id == peek.id, GuardianLinkCode.used_at.is_(None),
               GuardianLinkCode.revoked_at.is_(None), GuardianLinkCode.expires_at > now)
        .values(used_at=now, used_by=guardian.id)
        .execution_options(synchronize_session=False)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise GuardianCodeError()
    guardian.children.append(child)
    _record(journal, db, ctx, "account:guardian-code:redeem", f"user:{child.id}", code_id=peek.id,
            guardian=f"user:{guardian.id}")
    _record(journal, db, ctx, "account:guardian:link", f"user:{child.id}", guardian=f"user:{guardian.id}",
            via="guardian-code")
    return child
