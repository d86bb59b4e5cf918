"""Changing the school's calendar overrides: each change is journalled
(``calendar:day:add`` / ``calendar:day:remove``) and the deadlines of open breach cases
are recomputed, in the caller's transaction (the caller commits)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from idp.workdays.calendar import KINDS, load_calendar, recompute_open_deadlines
from idp.workdays.models import CalendarDay

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from idp.audit.journal import Journal
    from idp.config import Settings

MAX_NOTE = 255


class OverrideError(ValueError):
    """An override that cannot be stored; ``code`` names why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Who:
    actor: str
    ip: str | None = None
    request_id: str | None = None


def set_override(
    db: Session, journal: Journal, settings: Settings, *, day: date, kind: str, note: str, who: Who
) -> tuple[CalendarDay, int]:
    """Make ``day`` a school day off ("off") or a declared working day ("working"),
    replacing an override of that day. Returns the row and how many open cases got a
    new deadline."""
    if kind not in KINDS:
        raise OverrideError("bad_kind", f"kind must be one of {', '.join(KINDS)}")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise OverrideError("note_too_long", f"the note may have at most {MAX_NOTE} characters")
    if "\x00" in note:
        raise OverrideError("bad_note", "the note contains characters that are not allowed")
    row = db.get(CalendarDay, day)
    previous = row.kind if row is not None else None
    if row is None:
        row = CalendarDay(day=day, kind=kind, note=note, created_by=who.actor[:128])
        db.add(row)
    else:
        row.kind, row.note, row.created_by = kind, note, who.actor[:128]
    db.flush()
    changed = recompute_open_deadlines(db, load_calendar(db, settings), actor=who.actor)
    journal.record(db, actor=who.actor, action="calendar:day:add", subject=f"day:{day.isoformat()}",
                   reason=note or None, ip=who.ip, request_id=who.request_id,
                   details={"day": day.isoformat(), "kind": kind, "replaced": previous,
                            "deadlines_changed": changed})
    return row, changed


def remove_override(
    db: Session, journal: Journal, settings: Settings, *, day: date, note: str, who: Who
) -> tuple[bool, int]:
    """Remove the override of ``day`` (it is again what Monday–Friday minus public holidays
    says). Returns whether there was one and how many open cases got a new deadline."""
    row = db.get(CalendarDay, day)
    if row is None:
        return False, 0
    kind = row.kind
    db.delete(row)
    db.flush()
    changed = recompute_open_deadlines(db, load_calendar(db, settings), actor=who.actor)
    journal.record(db, actor=who.actor, action="calendar:day:remove", subject=f"day:{day.isoformat()}",
                   reason=(note or "").strip() or None, ip=who.ip, request_id=who.request_id,
                   details={"day": day.isoformat(), "kind": kind, "deadlines_changed": changed})
    return True, changed
