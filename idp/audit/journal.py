"""Writing and verifying the journal. ``Journal.record`` is the only writer.

Two row formats share one chain:

- **v1** (rows written before migration 0013; ``content_hash`` is NULL): ``hash`` is the
  SHA-256 of the canonical JSON of every field and the previous row's hash
  (:func:`_canonical_v1`). These rows are never changed and never redacted.
- **v2** (every row written since): ``content_hash`` is the SHA-256 of the canonical JSON
  of the row's *personal content* ``{actor, subject, reason, ip, request_id, details}``,
  and ``hash`` is the SHA-256 of ``{v: 2, seq, occurred_at, action, prev_hash,
  content_hash}`` (:func:`_canonical_v2`).

Retention (idp/prune.py, personal-data law: sign-in events and closed breach cases are
not kept for ever) *redacts* a v2 row instead of deleting it: actor becomes
``"redacted"``, subject, reason, IP and request id NULL, details ``{}``, and
``redacted_at`` is set; ``content_hash`` stays. The chain still verifies, and the row
still proves that an event of that action happened at that time, in that place of the
chain; nothing says any more who it was about.

``verify`` checks every row's hash and link; on an unredacted v2 row also that the
content matches ``content_hash`` (an edited actor, IP or reason is found); on a redacted
row that its content is the blank form, that its action is one retention may redact
(:data:`REDACTABLE_PREFIXES`) and that it is a v2 row. What stays possible for someone
with write access to the database: blanking a redactable v2 row early (it then shows as
redacted, never as something else; each retention run journals its counts as
``data:retention:redact``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from idp.audit.models import AuditEvent, AuditHead
from idp.observability import SIGNINS, count_on_commit

GENESIS = "0" * 64
REDACTED_ACTOR = "redacted"
# Actions whose rows retention may redact: sign-in events (and sign-outs and
# re-authentications) and the events of breach cases.
SIGN_IN_PREFIXES = ("account:login:", "account:reauth:", "account:session:")
REDACTABLE_PREFIXES = (*SIGN_IN_PREFIXES, "breach:case:")


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _canonical_v1(event: AuditEvent) -> bytes:
    return _json({
        "seq": event.seq,
        "occurred_at": _time(event.occurred_at),
        "actor": event.actor,
        "subject": event.subject,
        "action": event.action,
        "reason": event.reason,
        "ip": event.ip,
        "request_id": event.request_id,
        "details": event.details or {},
        "prev_hash": event.prev_hash,
    })


# The old name, for callers that hashed v1 rows themselves.
_canonical = _canonical_v1


def content_hash(event: AuditEvent) -> str:
    """SHA-256 of the row's personal content (what redaction blanks)."""
    return hashlib.sha256(_json({
        "actor": event.actor,
        "subject": event.subject,
        "reason": event.reason,
        "ip": event.ip,
        "request_id": event.request_id,
        "details": event.details or {},
    })).hexdigest()


def _canonical_v2(event: AuditEvent) -> bytes:
    return _json({
        "v": 2,
        "seq": event.seq,
        "occurred_at": _time(event.occurred_at),
        "action": event.action,
        "prev_hash": event.prev_hash,
        "content_hash": event.content_hash,
    })


def row_hash(event: AuditEvent) -> str:
    """The row's chain hash: v1 over every field, v2 over the kept fields and the content hash."""
    body = _canonical_v1(event) if event.content_hash is None else _canonical_v2(event)
    return hashlib.sha256(body).hexdigest()


def is_redactable(action: str) -> bool:
    return action.startswith(REDACTABLE_PREFIXES)


def redactable_condition(prefixes: tuple[str, ...] = REDACTABLE_PREFIXES) -> ColumnElement[bool]:
    """SQL: a v2 row, not redacted yet, whose action starts with one of ``prefixes``."""
    return and_(
        AuditEvent.content_hash.is_not(None),
        AuditEvent.redacted_at.is_(None),
        or_(*[AuditEvent.action.startswith(prefix, autoescape=True) for prefix in prefixes]),
    )


def _is_blank(event: AuditEvent) -> bool:
    return (event.actor == REDACTED_ACTOR and event.subject is None and event.reason is None
            and event.ip is None and event.request_id is None and not event.details)


def _build(seq: int, prev: str, occurred_at: datetime, item: dict[str, Any]) -> AuditEvent:
    """One v2 row from ``record``'s keyword arguments: the only place rows are made."""
    subject, ip = item.get("subject"), item.get("ip")
    event = AuditEvent(
        seq=seq,
        occurred_at=occurred_at,
        actor=str(item["actor"])[:128],
        subject=subject[:128] if subject else None,
        action=str(item["action"])[:64],
        reason=item.get("reason"),
        ip=ip[:64] if ip else None,
        request_id=item.get("request_id"),
        details=item.get("details") or {},
        prev_hash=prev,
    )
    event.content_hash = content_hash(event)
    event.hash = row_hash(event)
    return event


def _naive_utc(moment: datetime | None) -> datetime:
    if moment is None:
        return datetime.now(UTC).replace(tzinfo=None)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    problem: str | None = None


class Journal:
    """Appends events to the chain inside the caller's transaction."""

    def record(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str | None = None,
        reason: str | None = None,
        ip: str | None = None,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
        occurred_at: datetime | None = None,
    ) -> AuditEvent:
        """Append one event. ``occurred_at`` (UTC; default now) is for imports and tests
        that need an event at a known time."""
        return self.record_many(session, [{
            "actor": actor, "action": action, "subject": subject, "reason": reason, "ip": ip,
            "request_id": request_id, "details": details, "occurred_at": occurred_at,
        }])[0]

    def record_many(self, session: Session, events: list[dict[str, Any]]) -> list[AuditEvent]:
        """Append several events at once (bulk jobs such as the directory sync): the head
        is locked and moved once, the events are chained in the given order. Each dict
        holds ``record``'s keyword arguments (``actor`` and ``action`` at least)."""
        if not events:
            return []
        count = len(events)
        # Take the write lock first (UPDATE), then read the head: no two writers can
        # read the same head, on SQLite or PostgreSQL. Migration 0012 creates the head
        # row, so the insert below only serves databases made without the migrations.
        locked = session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + count)).rowcount  # type: ignore[attr-defined]
        if locked != 1:
            session.add(AuditHead(id=1, seq=count, hash=GENESIS))
            session.flush()
        head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
        seq, prev = head.seq - count + 1, head.hash
        now = _naive_utc(None)
        written: list[AuditEvent] = []
        for item in events:
            at = item.get("occurred_at")
            event = _build(seq, prev, _naive_utc(at) if at is not None else now, item)
            prev, seq = event.hash, seq + 1
            written.append(event)
            if event.action.startswith("account:login:"):
                # darbaza_signins_total{result} (idp/observability.py), once this commits.
                count_on_commit(session, SIGNINS, event.action.removeprefix("account:login:"))
        session.add_all(written)
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=prev))
        return written

    def redact(self, session: Session, ids: Iterable[int], *, now: datetime | None = None) -> int:
        """Blank the personal content of these rows (retention), in the caller's
        transaction, with one UPDATE. Only v2 rows of actions retention may redact that
        are not redacted yet are touched. Returns how many rows were redacted."""
        wanted = list(ids)
        if not wanted:
            return 0
        statement = (
            update(AuditEvent)
            .where(AuditEvent.id.in_(wanted), redactable_condition())
            .values(actor=REDACTED_ACTOR, subject=None, reason=None, ip=None, request_id=None, details={},
                    redacted_at=_naive_utc(now))
            .execution_options(synchronize_session=False)
        )
        return int(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def verify(self, session: Session) -> VerifyResult:
        """Walk the chain; name the first row that was edited, removed or reordered."""
        expected_prev = GENESIS
        expected_seq = 1
        checked = 0
        for event in session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000):
            if event.seq != expected_seq:
                return VerifyResult(False, checked, expected_seq, f"row {expected_seq} is missing")
            if event.prev_hash != expected_prev:
                return VerifyResult(False, checked, event.seq, f"row {event.seq} does not follow row {event.seq - 1}")
            if row_hash(event) != event.hash:
                return VerifyResult(False, checked, event.seq, f"row {event.seq} was edited")
            if event.redacted_at is None:
                if event.content_hash is not None and content_hash(event) != event.content_hash:
                    return VerifyResult(False, checked, event.seq, f"row {event.seq} was edited")
            elif event.content_hash is None or not _is_blank(event) or not is_redactable(event.action):
                return VerifyResult(False, checked, event.seq, f"row {event.seq} was edited")
            expected_prev = event.hash
            expected_seq += 1
            checked += 1
        head = session.scalar(select(AuditHead).where(AuditHead.id == 1))
        if head is not None and (head.seq != expected_seq - 1 or head.hash != expected_prev):
            return VerifyResult(False, checked, expected_seq, f"rows after {expected_seq - 1} are missing")
        return VerifyResult(True, checked)
