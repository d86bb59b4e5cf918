"""Console: the working calendar (policy 5.2.3) behind breach-case deadlines.

Lists the school's overrides (days off, declared working days) and the coming Kyrgyz
public holidays; adding or removing an override (with a note) is journalled
(``calendar:day:add`` / ``calendar:day:remove``) and recomputes the deadline of every
open breach case in the same transaction. Seeing the calendar needs ``reports:read``
(tech support and the security officer see it next to the queue); changing it needs
``admin:users:write`` (the school administration decides the school's days off)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from flask import flash, redirect, render_template, url_for
from flask_babel import format_date, get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import HiddenField, RadioField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.guard import current_actor, requires
from admin_ui.nav import add_nav
from idp.services import services
from idp.workdays.calendar import OFF, SCHOOL_TZ, WORKING, load_calendar
from idp.workdays.models import CalendarDay
from idp.workdays.service import MAX_NOTE, OverrideError, Who, remove_override, set_override

HOLIDAYS_AHEAD_DAYS = 365
PAST_OVERRIDES_DAYS = 90
EARLIEST = date(2000, 1, 1)
LATEST = date(2100, 12, 31)


def _parse_day(text: str | None) -> date | None:
    try:
        day = date.fromisoformat((text or "").strip())
    except ValueError:
        return None
    return day if EARLIEST <= day <= LATEST else None


def _day_field(_form: FlaskForm, field: StringField) -> None:
    if _parse_day(field.data) is None:
        raise ValidationError(_("Enter a date such as 2026-05-11."))


def _usable_text(_form: FlaskForm, field: TextAreaField) -> None:
    if "\x00" in (field.data or ""):
        raise ValidationError(_("This value contains characters that are not allowed."))


class OverrideForm(FlaskForm):
    day = StringField(validators=[DataRequired(message=_l("Enter a date such as 2026-05-11.")), _day_field])
    kind = RadioField(
        choices=[(OFF, _l("A school day off")), (WORKING, _l("A working day"))],
        default=OFF,
        validators=[DataRequired(message=_l("Choose a day off or a working day."))],
    )
    note = TextAreaField(validators=[
        DataRequired(message=_l("Write why: the note is kept with the day and in the audit journal.")),
        Length(max=MAX_NOTE, message=_l("At most %(max)d characters.", max=MAX_NOTE)),
        _usable_text,
    ])


class RemoveForm(FlaskForm):
    day = HiddenField(validators=[DataRequired(message=_l("Enter a date such as 2026-05-11.")), _day_field])
    note = StringField(validators=[Length(max=MAX_NOTE, message=_l("At most %(max)d characters.", max=MAX_NOTE)),
                                   _usable_text])


def _kind_label(kind: str) -> str:
    return _("Day off") if kind == OFF else _("Working day")


def _page(form: OverrideForm, status: int = 200) -> tuple[str, int]:
    svc = services()
    db = svc.db.session
    calendar = load_calendar(db, svc.settings)
    today = datetime.now(SCHOOL_TZ).date()
    locale = str(get_locale() or "ky")
    overrides = list(db.scalars(select(CalendarDay).where(CalendarDay.day >= today - timedelta(days=PAST_OVERRIDES_DAYS))
                                .order_by(CalendarDay.day)))
    holidays = calendar.upcoming_holidays(today, today + timedelta(days=HOLIDAYS_AHEAD_DAYS), locale)
    now = datetime.now(SCHOOL_TZ)
    return render_template(
        "admin/workdays/calendar.html",
        form=form,
        overrides=overrides,
        holidays=[(d, name, d in calendar.working_days) for d, name in holidays],
        calendar=calendar,
        kind_label=_kind_label,
        day_text=lambda d: format_date(d, "full"),
        example_deadline=calendar.deadline(now),
        remove_form=RemoveForm(formdata=None),
        today=today,
    ), status


@bp.get("/calendar")
@requires("reports:read")
def working_calendar() -> Any:
    return _page(OverrideForm(formdata=None))


def _who() -> Who:
    actor = current_actor()
    return Who(actor=actor.ref, ip=actor.ip, request_id=actor.request_id)


@bp.post("/calendar/days")
@requires("admin:users:write")
def calendar_day_add() -> Any:
    form = OverrideForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    svc = services()
    db = svc.db.session
    day = _parse_day(form.day.data)
    assert day is not None  # validated above
    try:
        _row, changed = set_override(db, svc.journal, svc.settings, day=day, kind=form.kind.data,
                                  note=form.note.data, who=_who())
    except OverrideError as exc:
        db.rollback()
        form.note.errors = [*form.note.errors, str(exc)]
        return _page(form, 400)
    db.commit()
    flash(_("%(day)s is now: %(kind)s. Deadlines of open breach cases recomputed: %(count)d.",
            day=day.isoformat(), kind=_kind_label(form.kind.data), count=changed))
    return redirect(url_for("admin.working_calendar"), code=303)


@bp.post("/calendar/days/remove")
@requires("admin:users:write")
def calendar_day_remove() -> Any:
    form = RemoveForm()
    if not form.validate_on_submit():
        page_form = OverrideForm(formdata=None)
        page_form.day.errors = list(form.day.errors) + list(form.note.errors) or [_("The form expired; try again.")]
        return _page(page_form, 400)
    svc = services()
    db = svc.db.session
    day = _parse_day(form.day.data)
    assert day is not None
    found, changed = remove_override(db, svc.journal, svc.settings, day=day, note=form.note.data or "",
                                     who=_who())
    if not found:
        db.rollback()
        page_form = OverrideForm(formdata=None)
        page_form.day.errors = [_("%(day)s has no override.", day=day.isoformat())]
        return _page(page_form, 404)
    db.commit()
    flash(_("The override of %(day)s was removed. Deadlines of open breach cases recomputed: %(count)d.",
            day=day.isoformat(), count=changed))
    return redirect(url_for("admin.working_calendar"), code=303)


add_nav("admin.working_calendar", "reports:read", _l("Working calendar"))
