"""Audit journal console (policy 2.5, 3, 4.1): read the journal newest first with
filters, export the filtered rows as CSV or JSON, and verify the hash chain.

The filter parsing, the query and the row serialisation are plain functions over a
database session, so the admin API (``admin_ui.api``) answers with the very same rows."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask import Response, redirect, render_template, request, stream_with_context, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from admin_ui import bp
from admin_ui.csv_export import BOM, safe_cell
from admin_ui.guard import requires
from admin_ui.nav import add_nav
from idp.accounts.models import User
from idp.accounts.service import normalise_login
from idp.audit.journal import VerifyResult
from idp.audit.models import AuditEvent
from idp.audit.web import audit_event
from idp.services import services

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")
PER_PAGE = 50
# The column sizes of AuditEvent: a longer filter value cannot match anything, and a
# huge one must not reach the database at all.
FILTER_LIMITS = {"actor": 128, "subject": 128, "action": 64}
# Dates far outside this range overflow when converted between time zones.
FIRST_DATE = date(1970, 1, 1)
LAST_DATE = date(9998, 12, 31)
MAX_PAGE = 1_000_000
USER_REF = re.compile(r"^user:(\d{1,12})$")
EXPORT_FIELDS = [
    "seq", "occurred_at", "occurred_at_local", "actor", "subject", "action", "reason",
    "ip", "request_id", "details", "prev_hash", "hash", "content_hash", "redacted_at",
]


# --- filters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditFilters:
    """What the journal is narrowed to; empty values do not filter."""

    actor: str = ""
    subject: str = ""
    action: str = ""  # a tag prefix: "account:" matches "account:lock"
    date_from: date | None = None  # a day in Asia/Bishkek, inclusive
    date_to: date | None = None  # a day in Asia/Bishkek, inclusive

    def as_args(self) -> dict[str, str]:
        """The filters as query-string arguments (for pager and export links)."""
        args = {"actor": self.actor, "subject": self.subject, "action": self.action,
                "from": self.date_from.isoformat() if self.date_from else "",
                "to": self.date_to.isoformat() if self.date_to else ""}
        return {k: v for k, v in args.items() if v}


def _usable_text(value: str) -> bool:
    # NUL is refused by PostgreSQL text columns; say so instead of failing in the driver.
    return "\x00" not in value


def _parse_date(raw: str, errors: dict[str, str], key: str) -> date | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        if len(raw) != 10:
            raise ValueError(raw)
        day = date.fromisoformat(raw)
    except ValueError:
        errors[key] = _("Enter the date as YYYY-MM-DD.")
        return None
    if not FIRST_DATE <= day <= LAST_DATE:
        errors[key] = _("Enter a date between %(first)s and %(last)s.", first=FIRST_DATE.isoformat(),
                        last=LAST_DATE.isoformat())
        return None
    return day


def parse_filters(args: Mapping[str, str]) -> tuple[AuditFilters, dict[str, str]]:
    """Read the filters from query arguments; returns them and the errors by field name."""
    errors: dict[str, str] = {}
    texts: dict[str, str] = {}
    for key, limit in FILTER_LIMITS.items():
        value = (args.get(key) or "").strip()
        if len(value) > limit:
            errors[key] = _("At most %(limit)s characters.", limit=limit)
            value = ""
        elif not _usable_text(value):
            errors[key] = _("This value contains characters that are not allowed.")
            value = ""
        texts[key] = value
    date_from = _parse_date(args.get("from") or "", errors, "from")
    date_to = _parse_date(args.get("to") or "", errors, "to")
    if date_from and date_to and date_to < date_from:
        errors["to"] = _("The end date is before the start date.")
    filters = AuditFilters(
        actor=texts["actor"], subject=texts["subject"], action=texts["action"],
        date_from=date_from, date_to=date_to,
    )
    return filters, errors


def parse_page(raw: str | None) -> int:
    """The page number from the query string; anything unusable is the first page."""
    try:
        page = int(raw or "1")
    except ValueError:
        return 1
    return min(max(page, 1), MAX_PAGE)


def school_midnight_utc(day: date) -> datetime:
    """Midnight at the start of ``day`` in Bishkek, as naive UTC (how rows are stored)."""
    local = datetime.combine(day, time.min, tzinfo=SCHOOL_TZ)
    return local.astimezone(UTC).replace(tzinfo=None)


def _refs(db: Session, value: str) -> set[str]:
    """The journal references a filter value stands for: the value itself ("user:12",
    "client:abc", "anonymous") and, when it is someone's login, that person's reference."""
    refs = {value}
    if ":" not in value:
        user_id = db.scalar(select(User.id).where(User.login == normalise_login(value)))
        if user_id is not None:
            refs.add(f"user:{user_id}")
    return refs


def filtered_query(db: Session, filters: AuditFilters) -> Select[AuditEvent]:
    """The journal rows matching the filters, unordered."""
    query = select(AuditEvent)
    if filters.actor:
        query = query.where(AuditEvent.actor.in_(_refs(db, filters.actor)))
    if filters.subject:
        query = query.where(AuditEvent.subject.in_(_refs(db, filters.subject)))
    if filters.action:
        # autoescape: "%" and "_" in a tag are matched literally, not as wildcards.
        query = query.where(AuditEvent.action.startswith(filters.action, autoescape=True))
    if filters.date_from:
        query = query.where(AuditEvent.occurred_at >= school_midnight_utc(filters.date_from))
    if filters.date_to:
        query = query.where(AuditEvent.occurred_at < school_midnight_utc(filters.date_to + timedelta(days=1)))
    return query


@dataclass
class EventPage:
    items: list[AuditEvent]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def search_events(db: Session, filters: AuditFilters, *, page: int = 1, per_page: int = PER_PAGE) -> EventPage:
    """One page of matching rows, newest first."""
    query = filtered_query(db, filters)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = list(db.scalars(query.order_by(AuditEvent.seq.desc()).offset((page - 1) * per_page).limit(per_page)))
    return EventPage(items=items, total=total, page=page, per_page=per_page)


def iter_events(db: Session, filters: AuditFilters) -> Iterator[AuditEvent]:
    """Every matching row in chain order (oldest first), read in batches."""
    yield from db.scalars(filtered_query(db, filters).order_by(AuditEvent.seq).execution_options(yield_per=500))


# --- presenting -------------------------------------------------------------------------
def utc_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def school_time(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC).astimezone(SCHOOL_TZ)


def event_record(event: AuditEvent) -> dict[str, Any]:
    """Every field of a row, as exported and as the admin API returns it. ``occurred_at``
    is UTC with the microseconds that the row hash covers."""
    return {
        "seq": event.seq,
        "occurred_at": utc_text(event.occurred_at),
        "occurred_at_local": school_time(event.occurred_at).isoformat(),
        "actor": event.actor,
        "subject": event.subject,
        "action": event.action,
        "reason": event.reason,
        "ip": event.ip,
        "request_id": event.request_id,
        "details": event.details or {},
        "prev_hash": event.prev_hash,
        "hash": event.hash,
        # NULL on rows written before migration 0013 (idp/audit/journal.py: v1 and v2 rows).
        "content_hash": event.content_hash,
        "redacted_at": utc_text(event.redacted_at) if event.redacted_at else None,
    }


@dataclass
class RefLabel:
    """How a journal reference is shown: a person's name and login for "user:12"."""

    ref: str | None
    text: str
    login: str | None = None


@dataclass
class PeopleIndex:
    by_id: dict[int, User] = field(default_factory=dict)

    def label(self, ref: str | None) -> RefLabel:
        if not ref:
            return RefLabel(ref=None, text="")
        match = USER_REF.match(ref)
        user = self.by_id.get(int(match.group(1))) if match else None
        if user is None:
            return RefLabel(ref=ref, text=ref)
        return RefLabel(ref=ref, text=user.display_name, login=user.login)


def people_for(db: Session, refs: Iterable[str | None]) -> PeopleIndex:
    """The accounts behind "user:N" references, fetched in one query."""
    ids = {int(m.group(1)) for ref in refs if ref and (m := USER_REF.match(ref))}
    if not ids:
        return PeopleIndex()
    return PeopleIndex(by_id={u.id: u for u in db.scalars(select(User).where(User.id.in_(ids)))})




def csv_rows(events: Iterable[AuditEvent]) -> Iterator[str]:
    """The export as CSV text chunks: UTF-8 BOM (so Excel reads Cyrillic), header, rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    buffer.write(BOM)
    writer.writerow(EXPORT_FIELDS)
    for count, event in enumerate(events, start=1):
        record = event_record(event)
        record["details"] = json.dumps(record["details"], ensure_ascii=False, sort_keys=True)
        writer.writerow([safe_cell(record[name]) for name in EXPORT_FIELDS])
        if count % 200 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def json_rows(events: Iterable[AuditEvent]) -> Iterator[str]:
    """The export as one JSON array, produced row by row."""
    yield "["
    for count, event in enumerate(events):
        yield ("," if count else "") + "\n" + json.dumps(event_record(event), ensure_ascii=False)
    yield "\n]\n"


def verify_problem(result: VerifyResult) -> str:
    """The journal's verdict on a broken chain, in words a security officer reads."""
    seq = result.first_bad_seq
    problem = result.problem or ""
    if problem.endswith("was edited"):
        return _("Row %(seq)s was changed after it was written.", seq=seq)
    if problem.startswith("rows after"):
        return _("The newest rows after row %(seq)s are missing.", seq=(seq or 1) - 1)
    if problem.endswith("is missing"):
        return _("Row %(seq)s is missing.", seq=seq)
    if "does not follow" in problem:
        return _("Row %(seq)s does not follow the row before it.", seq=seq)
    return problem


# --- views ------------------------------------------------------------------------------
@bp.get("/audit")
@requires("audit:read")
def audit() -> str:
    db = services().db.session
    filters, errors = parse_filters(request.args)
    result = None
    people = PeopleIndex()
    if not errors:
        result = search_events(db, filters, page=parse_page(request.args.get("page")))
        if result.page > result.pages:
            result = search_events(db, filters, page=result.pages)
        people = people_for(db, [ref for e in result.items for ref in (e.actor, e.subject)])
    rows = [
        {"event": e, "time": school_time(e.occurred_at), "actor": people.label(e.actor),
         "subject": people.label(e.subject),
         "details": json.dumps(e.details, ensure_ascii=False, sort_keys=True) if e.details else ""}
        for e in (result.items if result else [])
    ]
    return render_template(
        "admin/audit/list.html",
        args=request.args,
        errors=errors,
        filters=filters,
        result=result,
        rows=rows,
    )


def _export(kind: str) -> Response:
    filters, errors = parse_filters(request.args)
    if errors:
        # The list page shows the same arguments with the form's messages.
        target = url_for("admin.audit") + "?" + request.query_string.decode("latin-1")
        return redirect(target, code=303)  # type: ignore[return-value]
    # Reading the journal in bulk is itself an event (policy 2.5).
    audit_event("audit:export", details={"format": kind, "filters": filters.as_args()})
    events = iter_events(services().db.session, filters)
    stamp = datetime.now(SCHOOL_TZ).strftime("%Y%m%d-%H%M")
    if kind == "csv":
        body, mimetype = csv_rows(events), "text/csv; charset=utf-8"
    else:
        body, mimetype = json_rows(events), "application/json; charset=utf-8"
    response = Response(stream_with_context(body), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="audit-{stamp}.{kind}"'
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/audit/export.csv")
@requires("audit:read")
def audit_export_csv() -> Response:
    return _export("csv")


@bp.get("/audit/export.json")
@requires("audit:read")
def audit_export_json() -> Response:
    return _export("json")


@bp.post("/audit/verify")
@requires("audit:read")
def audit_verify() -> str:
    db = services().db.session
    result = services().journal.verify(db)
    bad_row = None
    if not result.ok and result.first_bad_seq is not None:
        bad_row = db.scalar(select(AuditEvent).where(AuditEvent.seq == result.first_bad_seq))
    # Read the verdict before journaling the check: the new row must not be counted.
    audit_event(
        "audit:verify",
        details={"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq},
    )
    return render_template(
        "admin/audit/verify.html",
        result=result,
        problem=verify_problem(result) if not result.ok else "",
        bad_row=event_record(bad_row) if bad_row is not None else None,
    )


add_nav("admin.audit", "audit:read", _l("Audit journal"))
