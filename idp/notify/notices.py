"""Notices to an account holder about a change to their account (issue 4: "Sent:
password changed, 2FA added/removed, new recovery codes, reset link").

``notify`` queues one message in the caller's transaction, so the notice exists exactly
when the change is committed. No Flask here: views pass in the outbox."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from idp.accounts.models import User
from idp.notify.outbox import Outbox, OutboxError, _check_address

log = logging.getLogger("darbaza.notify")

BISHKEK = ZoneInfo("Asia/Bishkek")


def local_time(moment: datetime | None = None) -> str:
    """A moment as the school reads it, e.g. ``2026-11-25 14:03 (Asia/Bishkek)``."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(BISHKEK).strftime("%Y-%m-%d %H:%M (Asia/Bishkek)")


def notify(db: Session, outbox: Outbox, user: User, template: str, *, to: str | None = None,
           **context: Any) -> bool:
    """Queue ``template`` to ``to`` (by default the account's address) in the account's
    language, with ``display_name`` and ``changed_at`` filled in. False when there is no
    address to write to; a stored address the outbox cannot send to is logged and skipped
    rather than failing the change it reports (support fixes the address)."""
    address = to if to is not None else user.email
    if not address:
        return False
    try:
        _check_address(address)
    except OutboxError:
        log.warning("notice %s for user %s not queued: the e-mail address is not usable", template, user.id)
        return False
    outbox.enqueue(
        db, template=template, to=address.strip(), locale=user.locale,
        context={"display_name": user.display_name, "changed_at": local_time(), **context},
    )
    return True
