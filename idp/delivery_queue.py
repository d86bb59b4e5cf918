"""The steps shared by the rows the worker delivers with retries: the mail outbox
(idp/notify/outbox.py) and back-channel logout deliveries (idp/oidc/backchannel.py).

A queued row has ``id``, ``status`` (pending -> sending -> a final state), ``attempts`` and
``next_attempt_at``. A worker claims a row with one conditional UPDATE, so two workers
never send the same row; the claim is a lease, and a row left in 'sending' after its lease
(its worker died) goes back to 'pending'. Only the worker holding the claim settles it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

FIRST_RETRY = timedelta(seconds=30)
MAX_RETRY_DELAY = timedelta(hours=1)
# A row left in 'sending' longer than this belongs to a worker that died mid-send.
CLAIM_LEASE = timedelta(minutes=10)

SessionFactory = Callable[[], Session]


def retry_delay(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed try: 30 s, 1 min, 2 min, ... at most 1 h."""
    if attempts < 1:
        raise ValueError("attempts starts at 1")
    # Cap the exponent first so a large count cannot build a huge number.
    factor = 2 ** min(attempts - 1, 16)
    return min(FIRST_RETRY * factor, MAX_RETRY_DELAY)


def naive_utc(moment: datetime | None = None) -> datetime:
    """``moment`` (default: now) as naive UTC, the way the database keeps times
    (see accounts.models.utcnow)."""
    if moment is None:
        return datetime.now(UTC).replace(tzinfo=None)
    if moment.tzinfo is not None:
        return moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def reclaim_stale(session_factory: SessionFactory, model: Any, now: datetime) -> int:
    """Return rows abandoned in 'sending' past their lease to 'pending'; how many."""
    # A claim sets next_attempt_at to the end of its lease.
    with session_factory() as session:
        result = session.execute(
            update(model).where(model.status == "sending", model.next_attempt_at <= now).values(status="pending")
        )
        session.commit()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def due_ids(session_factory: SessionFactory, model: Any, *, due_by: datetime | None, limit: int) -> list[int]:
    """Ids of pending rows due by ``due_by`` (None: every pending row), oldest first."""
    query = select(model.id).where(model.status == "pending")
    if due_by is not None:
        query = query.where(model.next_attempt_at <= due_by)
    with session_factory() as session:
        return list(session.scalars(query.order_by(model.next_attempt_at, model.id).limit(limit)))


def claim(
    session_factory: SessionFactory, model: Any, row_id: int, *, due_by: datetime | None, now: datetime
) -> Any | None:
    """Claim one row for sending (attempts + 1, leased until ``now + CLAIM_LEASE``); the
    row as claimed, or None when another worker took it first or it is no longer due."""
    with session_factory() as session:
        condition = [model.id == row_id, model.status == "pending"]
        if due_by is not None:
            condition.append(model.next_attempt_at <= due_by)
        # The conditional UPDATE is the claim: only one worker sees rowcount 1.
        result = session.execute(
            update(model)
            .where(*condition)
            .values(status="sending", attempts=model.attempts + 1, next_attempt_at=now + CLAIM_LEASE)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        session.commit()
        row = session.get(model, row_id)
        if row is not None:
            session.expunge(row)
        return row


def settle(
    session_factory: SessionFactory,
    model: Any,
    row: Any,
    values: dict[str, Any],
    then: Callable[[Session], None] | None = None,
) -> bool:
    """Record the outcome of our own claim; ``then`` runs in the same transaction (a
    journal entry). False when the lease ran out and another worker reclaimed the row:
    its outcome wins."""
    with session_factory() as session:
        result = session.execute(
            update(model)
            .where(model.id == row.id, model.status == "sending", model.attempts == row.attempts)
            .values(**values)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return False
        if then is not None:
            then(session)
        session.commit()
        return True
