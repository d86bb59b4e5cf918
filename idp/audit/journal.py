"""Writing and verifying the journal. ``Journal.record`` is the only writer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from idp.audit.models import AuditEvent, AuditHead

GENESIS = "0" * 64


def _canonical(event: AuditEvent) -> bytes:
    body = {
        "seq": event.seq,
        "occurred_at": event.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "actor": event.actor,
        "subject": event.subject,
        "action": event.action,
        "reason": event.reason,
        "ip": event.ip,
        "request_id": event.request_id,
        "details": event.details or {},
        "prev_hash": event.prev_hash,
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def row_hash(event: AuditEvent) -> str:
    return hashlib.sha256(_canonical(event)).hexdigest()


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
    ) -> AuditEvent:
        # Take the write lock first (UPDATE), then read the head: no two writers can
        # read the same head, on SQLite or PostgreSQL. Migration 0012 creates the head
        # row, so the insert below only serves databases made without the migrations.
        locked = session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1)).rowcount  # type: ignore[attr-defined]
        if locked != 1:
            session.add(AuditHead(id=1, seq=1, hash=GENESIS))
            session.flush()
        head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
        event = AuditEvent(
            seq=head.seq,
            occurred_at=datetime.now(UTC).replace(tzinfo=None),
            actor=actor[:128],
            subject=subject[:128] if subject else None,
            action=action[:64],
            reason=reason,
            ip=ip[:64] if ip else None,
            request_id=request_id,
            details=details or {},
            prev_hash=head.hash,
        )
        event.hash = row_hash(event)
        session.add(event)
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=event.hash))
        return event

    def record_many(self, session: Session, events: list[dict[str, Any]]) -> list[AuditEvent]:
        """Append several events at once (bulk jobs such as the directory sync): the head
        is locked and moved once, the events are chained in the given order. Each dict
        holds ``record``'s keyword arguments (``actor`` and ``action`` at least)."""
        if not events:
            return []
        count = len(events)
        locked = session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + count)).rowcount  # type: ignore[attr-defined]
        if locked != 1:
            session.add(AuditHead(id=1, seq=count, hash=GENESIS))
            session.flush()
        head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
        seq, prev = head.seq - count + 1, head.hash
        now = datetime.now(UTC).replace(tzinfo=None)
        written: list[AuditEvent] = []
        for item in events:
            subject, ip = item.get("subject"), item.get("ip")
            event = AuditEvent(
                seq=seq,
                occurred_at=now,
                actor=str(item["actor"])[:128],
                subject=subject[:128] if subject else None,
                action=str(item["action"])[:64],
                reason=item.get("reason"),
                ip=ip[:64] if ip else None,
                request_id=item.get("request_id"),
                details=item.get("details") or {},
                prev_hash=prev,
            )
            event.hash = row_hash(event)
            prev, seq = event.hash, seq + 1
            written.append(event)
        session.add_all(written)
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=prev))
        return written

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
            expected_prev = event.hash
            expected_seq += 1
            checked += 1
        head = session.scalar(select(AuditHead).where(AuditHead.id == 1))
        if head is not None and (head.seq != expected_seq - 1 or head.hash != expected_prev):
            return VerifyResult(False, checked, expected_seq, f"rows after {expected_seq - 1} are missing")
        return VerifyResult(True, checked)
