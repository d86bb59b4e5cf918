"""Console: breach reports (issue 6, policy 5.2.3).

- ``/admin/cases``: tech support's queue, ordered by deadline, with the working time
  left (support hours, from the working calendar), overdue cases marked, filters (state,
  late, overdue, the reporter's class and role) and a CSV export (journalled).
- ``/admin/cases/<id>``: one case: the report, its steps, the account's recent sign-ins
  (journal ``account:login:*``), its sessions and devices; actions, each a POST form with
  a reason, each journalled: contact note, identity verified, one-time activation code,
  reset 2FA, unlock, move to review, resolve with an outcome. State changes and notes go
  through ``idp.breach.service.step``; account changes through ``AccountAdmin`` (which
  checks its own permission too).
- ``/admin/cases/overview``: the security officer's view: overdue cases, late reports,
  the sharing signals awaiting review and a monthly summary.

The queue and the case page need ``support:cases:handle``; the overview ``audit:read``."""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, abort, flash, redirect, render_template, request, url_for
from flask_babel import force_locale, ngettext
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from markupsafe import Markup
from sqlalchemy import Select, func, or_, select
from wtforms import SelectField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.accounts import SCHOOL_TZ, account_admin, account_error_text, local_time
from admin_ui.csv_export import BOM, safe_cell
from admin_ui.guard import current_actor, record_console_event, requires
from admin_ui.nav import add_nav
from idp.accounts.admin import MAX_REASON, PermissionDenied
from idp.accounts.models import Role, SchoolClass, User, class_members, user_roles
from idp.accounts.service import AccountError
from idp.audit.models import AuditEvent
from idp.breach import service as cases
from idp.breach.models import BreachCase, BreachCaseStep
from idp.login.sessions import app_names
from idp.login.sessions import display_context as session_display
from idp.services import services
from idp.workdays.calendar import WorkingCalendar, load_calendar

PER_PAGE = 50
RECENT_SIGN_INS = 20
OPEN_STATES = ("reported", "contained", "in_review")
STATE_FILTERS = ("open", "all", *cases.STATES)
SUMMARY_MONTHS = 12
LATE_LIST = 50


# --- in words ---------------------------------------------------------------------------------
def state_labels() -> dict[str, str]:
    return {"reported": _("Reported"), "contained": _("Contained"), "in_review": _("In review"),
            "resolved": _("Resolved")}


def outcome_labels() -> dict[str, str]:
    return {"confirmed": _("Confirmed breach"), "false_alarm": _("False alarm"), "duplicate": _("Duplicate")}


def category_labels() -> dict[str, str]:
    return {
        "shared-password": _("Gave the password to someone"),
        "unknown-activity": _("Activity they do not recognise"),
        "lost-device": _("Lost a phone or device"),
        "other": _("Other"),
        "not-me": _("“This wasn't me” (new-device notice)"),
    }


def door_labels() -> dict[str, str]:
    return {"account": _("Account page"), "sign-in-page": _("Sign-in page"), "not-me": _("New-device notice")}


def duration_text(seconds: float) -> str:
    """A span of working time in hours and minutes."""
    minutes = int(abs(seconds) // 60)
    hours, minutes = divmod(minutes, 60)
    if hours and minutes:
        return _("%(hours)d h %(minutes)d min", hours=hours, minutes=minutes)
    if hours:
        return _("%(hours)d h", hours=hours)
    return _("%(minutes)d min", minutes=minutes)


def _now() -> datetime:
    return services().clock().astimezone(UTC).replace(tzinfo=None)


# --- the queue --------------------------------------------------------------------------------
@dataclass
class CaseRow:
    case: BreachCase
    overdue: bool
    seconds_left: float | None  # working seconds to the deadline (negative: overdue by); None when resolved

    @property
    def time_left(self) -> str:
        if self.seconds_left is None:
            return "—"
        if self.seconds_left < 0 or self.overdue:
            return _("overdue by %(time)s", time=duration_text(self.seconds_left))
        return _("%(time)s left", time=duration_text(self.seconds_left))


def is_overdue(case: BreachCase, now: datetime) -> bool:
    """Open past its deadline, or resolved after it."""
    return (case.resolved_at or now) > case.deadline_at


def _row(case: BreachCase, now: datetime, calendar: WorkingCalendar) -> CaseRow:
    left = None if case.state == "resolved" else calendar.working_seconds_between(now, case.deadline_at)
    return CaseRow(case=case, overdue=is_overdue(case, now), seconds_left=left)


def _filters() -> dict[str, str]:
    """The queue's filters from the query string; unknown values are ignored."""
    state = request.args.get("state", "open")
    return {
        "state": state if state in STATE_FILTERS else "open",
        "late": "1" if request.args.get("late") == "1" else "",
        "overdue": "1" if request.args.get("overdue") == "1" else "",
        "class": request.args.get("class", "").strip().upper()[:32],
        "role": request.args.get("role", "").strip()[:64],
    }


def _query_args(filters: dict[str, str]) -> dict[str, Any]:
    return {k: v for k, v in filters.items() if v and not (k == "state" and v == "open")}


def _queue_query(filters: dict[str, str], now: datetime) -> Select[Any]:
    query = select(BreachCase)
    if filters["state"] == "open":
        query = query.where(BreachCase.state.in_(OPEN_STATES))
    elif filters["state"] != "all":
        query = query.where(BreachCase.state == filters["state"])
    if filters["late"]:
        query = query.where(BreachCase.late.is_(True))
    if filters["overdue"]:
        query = query.where(or_(
            (BreachCase.resolved_at.is_(None)) & (BreachCase.deadline_at < now),
            BreachCase.resolved_at > BreachCase.deadline_at,
        ))
    if filters["role"]:
        query = query.where(BreachCase.user_id.in_(
            select(user_roles.c.user_id).join(Role, Role.id == user_roles.c.role_id)
            .where(Role.name == filters["role"])))
    if filters["class"]:
        query = query.where(BreachCase.user_id.in_(
            select(class_members.c.user_id).join(SchoolClass, SchoolClass.id == class_members.c.class_id)
            .where(SchoolClass.name == filters["class"])))
    return query.order_by(BreachCase.deadline_at, BreachCase.id)


def _render(template: str, **context: Any) -> str:
    return render_template(template, local_time=local_time, states=state_labels(), outcomes=outcome_labels(),
                           categories=category_labels(), doors=door_labels(), **context)


@bp.get("/cases")
@requires("support:cases:handle")
def cases_queue() -> str:
    db = services().db.session
    filters = _filters()
    now = _now()
    query = _queue_query(filters, now)
    total = db.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    pages = max(1, -(-total // PER_PAGE))
    page = min(max(1, request.args.get("page", 1, type=int) or 1), pages)
    calendar = load_calendar(db, services().settings)
    rows = [_row(c, now, calendar) for c in db.scalars(query.offset((page - 1) * PER_PAGE).limit(PER_PAGE))]
    args = _query_args(filters)
    return _render(
        "admin/breach/queue.html", rows=rows, filters=filters, total=total, page=page, pages=pages,
        roles=list(db.scalars(select(Role.name).order_by(Role.name))),
        classes=list(db.scalars(select(SchoolClass.name).order_by(SchoolClass.name))),
        state_filters=STATE_FILTERS,
        prev_url=url_for("admin.cases_queue", page=page - 1, **args) if page > 1 else None,
        next_url=url_for("admin.cases_queue", page=page + 1, **args) if page < pages else None,
        export_url=url_for("admin.cases_export", **args),
    )


@bp.get("/cases/export.csv")
@requires("support:cases:handle")
def cases_export() -> Response:
    db = services().db.session
    filters = _filters()
    now = _now()
    calendar = load_calendar(db, services().settings)
    rows = [_row(c, now, calendar) for c in db.scalars(_queue_query(filters, now))]
    labels, outcomes, categories = state_labels(), outcome_labels(), category_labels()

    def when(value: datetime | None) -> str:
        return value.replace(tzinfo=UTC).astimezone(SCHOOL_TZ).strftime("%Y-%m-%d %H:%M") if value else ""

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([_("Case"), _("Login"), _("Name"), _("Category"), _("State"), _("Outcome"), _("Late report"),
                     _("Overdue"), _("Reported"), _("Deadline"), _("Working hours left"), _("Resolved")])
    for row in rows:
        c = row.case
        writer.writerow(safe_cell(v) for v in (
            c.number,
            c.user.login if c.user else (c.login_given or ""),
            c.user.display_name if c.user else "",
            categories.get(c.category, c.category),
            labels.get(c.state, c.state),
            outcomes.get(c.outcome or "", ""),
            _("yes") if c.late else _("no"),
            _("yes") if row.overdue else _("no"),
            when(c.reported_at),
            when(c.deadline_at),
            "" if row.seconds_left is None else f"{row.seconds_left / 3600:.2f}",
            when(c.resolved_at),
        ))
    # An export of personal data is itself an event (policy 3: who holds what).
    record_console_event("breach:case:export", subject=None,  # type: ignore[arg-type]
                         details={"filters": _query_args(filters), "rows": len(rows)})
    db.commit()
    stamp = datetime.now(SCHOOL_TZ).strftime("%Y%m%d-%H%M")
    return Response((BOM + out.getvalue()).encode("utf-8"), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="breach-cases-{stamp}.csv"', "Cache-Control": "no-store"})


# --- forms ------------------------------------------------------------------------------------
def _usable_text(_form: FlaskForm, field: TextAreaField) -> None:
    # PostgreSQL text columns refuse NUL; say so instead of failing in the driver.
    if "\x00" in (field.data or ""):
        raise ValidationError(_("This value contains characters that are not allowed."))


class CaseActionForm(FlaskForm):
    reason = TextAreaField(validators=[
        DataRequired(message=_l("Enter a reason: it is kept with the case and in the audit journal.")),
        Length(max=MAX_REASON, message=_l("At most %(max)d characters.", max=MAX_REASON)),
        _usable_text,
    ])


class ResolveForm(CaseActionForm):
    outcome = SelectField(choices=[("", "")] + [(o, o) for o in cases.OUTCOMES],
                          validators=[DataRequired(message=_l("Choose the outcome."))])


@dataclass(frozen=True)
class CaseAction:
    name: str
    title: Any
    button: Any
    explanation: Any
    form: type[CaseActionForm] = CaseActionForm
    needs_account: bool = False


ACTIONS: dict[str, CaseAction] = {a.name: a for a in (
    CaseAction("note", _l("Contact note"), _l("Add the note"),
               _l("What you told the person or heard from them, and how you reached them.")),
    CaseAction("identity-verified", _l("Identity verified"), _l("Record that the identity was verified"),
               _l("You made sure who the reporter is (in person, with a document, or by a known phone number). "
                  "Say how.")),
    CaseAction("activation-code", _l("One-time activation code"), _l("Issue an activation code"),
               _l("The person sets a new password with it. Earlier codes stop working. The account must not be "
                  "locked."), needs_account=True),
    CaseAction("reset-2fa", _l("Reset two-factor sign-in"), _l("Reset two-factor sign-in"),
               _l("The authenticator app, the recovery codes and every passkey are removed; the person sets up a "
                  "second factor again at the next sign-in. Only after the identity was verified."),
               needs_account=True),
    CaseAction("unlock", _l("Unlock the account"), _l("Unlock the account"),
               _l("The person can sign in again (a new password is still required)."), needs_account=True),
    CaseAction("review", _l("Move to review"), _l("Move the case to review"),
               _l("You are looking into the case.")),
    CaseAction("resolve", _l("Resolve the case"), _l("Resolve the case"),
               _l("The reporter is told that the case is resolved."), form=ResolveForm),
)}


def _forms(submitted: tuple[str, CaseActionForm] | None = None) -> dict[str, CaseActionForm]:
    forms: dict[str, CaseActionForm] = {}
    for name, action in ACTIONS.items():
        if submitted is not None and submitted[0] == name:
            forms[name] = submitted[1]
            continue
        forms[name] = action.form(formdata=None)
    resolve = forms["resolve"]
    assert isinstance(resolve, ResolveForm)
    resolve.outcome.choices = [("", _("— choose —"))] + list(outcome_labels().items())
    return forms


# --- the case page ----------------------------------------------------------------------------
def _case_or_404(case_id: int) -> BreachCase:
    case = services().db.session.get(BreachCase, case_id)
    if case is None:
        abort(404)
    return case


def _actor_names(refs: set[str]) -> dict[str, str]:
    ids = {int(r[5:]) for r in refs if r.startswith("user:") and r[5:].isdigit()}
    if not ids:
        return {}
    rows = services().db.session.execute(select(User.id, User.login).where(User.id.in_(ids)))
    return {f"user:{uid}": login for uid, login in rows}


def recent_sign_ins(user_id: int) -> list[AuditEvent]:
    return list(services().db.session.scalars(
        select(AuditEvent).where(AuditEvent.subject == f"user:{user_id}", AuditEvent.action.like("account:login:%"))
        .order_by(AuditEvent.seq.desc()).limit(RECENT_SIGN_INS)))


def _case_page(case: BreachCase, forms: dict[str, CaseActionForm], status: int = 200,
               card: Markup | None = None) -> tuple[str, int]:
    db = services().db.session
    now = _now()
    calendar = load_calendar(db, services().settings)
    steps = list(db.scalars(select(BreachCaseStep).where(BreachCaseStep.case_id == case.id)
                            .order_by(BreachCaseStep.at, BreachCaseStep.id)))
    user = case.user
    session_rows = services().sessions.list(user.id) if user is not None else []
    sign_ins = recent_sign_ins(user.id) if user is not None else []
    names = _actor_names({s.actor for s in steps})
    return _render(
        "admin/breach/case.html", row=_row(case, now, calendar), case=case, user=user, steps=steps,
        actor_names=names, sign_ins=sign_ins, sessions=session_rows, session_apps=app_names(session_rows),
        **session_display(), forms=forms, actions=ACTIONS, card=card,
    ), status


@bp.get("/cases/<int:case_id>")
@requires("support:cases:handle")
def case_page(case_id: int) -> Any:
    return _case_page(_case_or_404(case_id), _forms())


def _refuse(case: BreachCase, name: str, form: CaseActionForm, message: str, status: int = 400) -> Any:
    services().db.session.rollback()
    form.reason.errors = [*form.reason.errors, message]
    case = _case_or_404(case.id)
    return _case_page(case, _forms((name, form)), status)


@bp.post("/cases/<int:case_id>/<action>")
@requires("support:cases:handle")
def case_action(case_id: int, action: str) -> Any:
    spec = ACTIONS.get(action)
    if spec is None:
        abort(404)
    case = _case_or_404(case_id)
    form = spec.form()
    if isinstance(form, ResolveForm):
        form.outcome.choices = [("", "")] + list(outcome_labels().items())
    if not form.validate_on_submit():
        return _case_page(case, _forms((action, form)), 400)
    reason = form.reason.data.strip()
    db = services().db.session
    actor = current_actor()
    user = case.user
    if spec.needs_account and user is None:
        return _refuse(case, action, form, _("No account was found for this report: there is nothing to change."))
    if case.state == "resolved" and action != "note":
        return _refuse(case, action, form, _("This case is resolved: only contact notes can be added."), 409)
    changes: dict[str, Any] = {}
    result: Any = None
    try:
        if action == "identity-verified":
            changes["identity_verified_at"] = _now()
        elif action == "review":
            if case.state == "in_review":
                return _refuse(case, action, form, _("This case is already in review."), 409)
            changes["state"] = "in_review"
        elif action == "resolve":
            changes.update(state="resolved", outcome=form.outcome.data)  # type: ignore[attr-defined]
        elif action == "activation-code":
            assert user is not None
            if not user.can_sign_in:
                return _refuse(case, action, form,
                               _("This account is locked or disabled: unlock it first, then issue a code."))
            result = account_admin().issue_activation_code(actor, user, reason)
        elif action == "reset-2fa":
            assert user is not None
            result = account_admin().reset_two_factor(actor, user, reason)
        elif action == "unlock":
            assert user is not None
            if not user.locked:
                return _refuse(case, action, form, _("This account is not locked."))
            account_admin().unlock(actor, user, reason)
        cases.step(db, case, actor=actor.ref, action=action, note=reason, ip=actor.ip,
                   request_id=actor.request_id, **changes)
    except PermissionDenied:
        return _refuse(case, action, form, _("You do not have the permission this action needs."), 403)
    except AccountError as exc:
        return _refuse(case, action, form, account_error_text(exc))
    except cases.BreachError as exc:
        return _refuse(case, action, form, _("The case was not changed: %(detail)s", detail=str(exc)), 409)
    db.commit()
    if action == "activation-code":
        assert user is not None
        code, expires = result
        settings = services().settings
        # The card is for the person, in their language; shown once, never cached.
        with force_locale(user.locale or settings.default_locale):
            card = render_template("admin/accounts/_card.html", user=user, code=code, expires=local_time(expires),
                                   school=settings.school_name, activate_url=f"{settings.issuer}/activate")
        page, status = _case_page(case, _forms(), 200, card=Markup(card))  # noqa: S704 - our own template
        return page, status, {"Cache-Control": "no-store", "Pragma": "no-cache"}
    messages = {
        "note": _("The note was added."),
        "identity-verified": _("The identity check was recorded."),
        "reset-2fa": ngettext("Two-factor sign-in was reset. %(num)d session ended.",
                              "Two-factor sign-in was reset. %(num)d sessions ended.", int(result or 0)),
        "unlock": _("The account was unlocked."),
        "review": _("The case is in review."),
        "resolve": _("The case was resolved; the reporter is told."),
    }
    flash(messages[action])
    return redirect(url_for("admin.case_page", case_id=case.id), code=303)


# --- the security officer's view --------------------------------------------------------------
@dataclass
class MonthSummary:
    month: str  # "2026-11"
    cases: int
    resolved: int
    median_hours: float | None
    within_deadline: float | None  # share of the resolved ones resolved by their deadline


def monthly_summary(all_cases: list[BreachCase]) -> list[MonthSummary]:
    months: dict[str, list[BreachCase]] = {}
    for case in all_cases:
        key = case.reported_at.replace(tzinfo=UTC).astimezone(SCHOOL_TZ).strftime("%Y-%m")
        months.setdefault(key, []).append(case)
    summary = []
    for key in sorted(months, reverse=True):
        group = months[key]
        resolved = [c for c in group if c.resolved_at is not None]
        durations = [(c.resolved_at - c.reported_at).total_seconds() / 3600 for c in resolved if c.resolved_at]
        within = [c for c in resolved if c.resolved_at is not None and c.resolved_at <= c.deadline_at]
        summary.append(MonthSummary(
            month=key, cases=len(group), resolved=len(resolved),
            median_hours=statistics.median(durations) if durations else None,
            within_deadline=len(within) / len(resolved) if resolved else None,
        ))
    return summary


@bp.get("/cases/overview")
@requires("audit:read")
def cases_overview() -> str:
    from admin_ui.sharing import awaiting_review

    db = services().db.session
    now = _now()
    calendar = load_calendar(db, services().settings)
    overdue = [_row(c, now, calendar) for c in db.scalars(
        select(BreachCase).where(BreachCase.state.in_(OPEN_STATES), BreachCase.deadline_at < now)
        .order_by(BreachCase.deadline_at, BreachCase.id))]
    late = [_row(c, now, calendar) for c in db.scalars(
        select(BreachCase).where(BreachCase.late.is_(True)).order_by(BreachCase.reported_at.desc(), BreachCase.id)
        .limit(LATE_LIST))]
    since = now - timedelta(days=31 * SUMMARY_MONTHS)
    recent = list(db.scalars(select(BreachCase).where(BreachCase.reported_at >= since)))
    return _render("admin/breach/overview.html", overdue=overdue, late=late, summary=monthly_summary(recent),
                   sharing_awaiting=awaiting_review(db))


add_nav("admin.cases_queue", "support:cases:handle", _l("Breach cases"))
add_nav("admin.cases_overview", "audit:read", _l("Breach overview"))
