"""Console: restrictions (policy 5.1, 4.2.5) and "why can't this person sign in?".

The security officer (``admin:restrictions:write``) creates, edits and deletes a
restriction for a role or for one account; whoever may see accounts
(``admin:users:read``) reads them and asks the access decision for an account, an app,
a time and an address, getting the same reasons the person and the app get. Every
change is journaled (``restriction:create|update|delete``) with what changed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import (
    BooleanField,
    DateField,
    IntegerField,
    RadioField,
    SelectField,
    SelectMultipleField,
    StringField,
    TextAreaField,
)
from wtforms.validators import DataRequired, Length, NumberRange, Optional, ValidationError
from wtforms.widgets import CheckboxInput, ListWidget

from admin_ui import bp
from admin_ui.accounts import local_time
from admin_ui.guard import current_actor, record_console_event, requires
from admin_ui.nav import add_nav
from idp.access import decision as d
from idp.access.messages import reason_message, weekday_names
from idp.access.models import Restriction
from idp.access.networks import NetworkError, check_entries, parse_ip, split_entries
from idp.access.restrictions import diff, explain, find_account, snapshot, target_of
from idp.accounts.models import Role, User
from idp.oidc.claims import SCOPES_SUPPORTED
from idp.oidc.models import Client
from idp.services import services

MAX_REASON = 1000
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
MAX_SESSIONS = 100
# "openid" only from the school would be a network rule in disguise: use allowed networks.
SCHOOL_ONLY_CHOICES = [s for s in SCOPES_SUPPORTED if s != "openid"]


class MultiCheckboxField(SelectMultipleField):
    widget = ListWidget(prefix_label=False)
    option_widget = CheckboxInput()


def _weekday_choices() -> list[tuple[int, str]]:
    return [(day, weekday_names([day])) for day in range(7)]


class RestrictionForm(FlaskForm):
    target = RadioField(choices=[("role", _l("A role")), ("account", _l("One account"))], default="role",
                        validators=[DataRequired(message=_l("Choose what the restriction applies to."))])
    role = SelectField(choices=[], validate_choice=False)
    login = StringField(validators=[Length(max=128, message=_l("At most 128 characters."))])
    description = StringField(validators=[Length(max=255, message=_l("At most 255 characters."))])
    allowed_clients = StringField(validators=[Length(max=2000, message=_l("At most 2000 characters."))])
    allowed_weekdays = MultiCheckboxField(coerce=int, choices=[(day, str(day)) for day in range(7)])
    hours_start = StringField(validators=[Length(max=5, message=_l("Use HH:MM, for example 08:00."))])
    hours_end = StringField(validators=[Length(max=5, message=_l("Use HH:MM, for example 08:00."))])
    allowed_networks = TextAreaField(validators=[Length(max=4000, message=_l("At most 4000 characters."))])
    max_sessions = IntegerField(
        validators=[Optional(), NumberRange(min=1, max=MAX_SESSIONS, message=_l("A whole number from 1 to 100."))]
    )
    at_session_limit = SelectField(
        choices=[(d.REFUSE, _l("Refuse the new sign-in")), (d.END_OLDEST, _l("End the oldest session"))],
        default=d.REFUSE,
    )
    require_2fa = BooleanField()
    valid_from = DateField(validators=[Optional()], format="%Y-%m-%d")
    valid_until = DateField(validators=[Optional()], format="%Y-%m-%d")
    school_only_scopes = MultiCheckboxField(choices=[(s, s) for s in SCHOOL_ONLY_CHOICES])
    idle_minutes = IntegerField(
        validators=[Optional(), NumberRange(min=1, max=MAX_TIMEOUT_MINUTES,
                                            message=_l("A whole number of minutes from 1 to 10080."))]
    )
    absolute_minutes = IntegerField(
        validators=[Optional(), NumberRange(min=1, max=MAX_TIMEOUT_MINUTES,
                                            message=_l("A whole number of minutes from 1 to 10080."))]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role.choices = [("", "—")] + [(r.name, r.name) for r in _roles()]
        self.allowed_weekdays.choices = _weekday_choices()
        self.problems: list[str] = []
        # Filled by validation: the checked values ready to store.
        self.target_user: User | None = None
        self.target_role: Role | None = None
        self.client_ids: list[str] | None = None
        self.network_entries: list[str] | None = None

    # WTForms calls validate_<field> after the field's own validators.
    def validate_role(self, field: SelectField) -> None:
        if self.target.data != "role":
            return
        role = services().db.session.scalar(select(Role).where(Role.name == (field.data or "")))
        if role is None:
            raise ValidationError(_("Choose a role."))
        self.target_role = role

    def validate_login(self, field: StringField) -> None:
        if self.target.data != "account":
            return
        user = find_account(services().db.session, field.data or "")
        if user is None:
            raise ValidationError(_("No account has this login."))
        self.target_user = user

    def validate_allowed_clients(self, field: StringField) -> None:
        wanted = split_entries(field.data or "")
        if not wanted:
            self.client_ids = None
            return
        known = set(services().db.session.scalars(select(Client.client_id).where(Client.client_id.in_(wanted))))
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValidationError(_("No portal app has this client id: %(ids)s", ids=", ".join(unknown[:10])))
        self.client_ids = list(dict.fromkeys(wanted))

    def _hhmm(self, field: StringField) -> None:
        text = (field.data or "").strip()
        field.data = text
        if text:
            try:
                d.parse_hhmm(text)
            except ValueError:
                raise ValidationError(_("Use HH:MM, for example 08:00.")) from None

    def validate_hours_start(self, field: StringField) -> None:
        self._hhmm(field)

    def validate_hours_end(self, field: StringField) -> None:
        self._hhmm(field)

    def validate_allowed_networks(self, field: TextAreaField) -> None:
        entries = split_entries(field.data or "")
        if not entries:
            self.network_entries = None
            return
        try:
            self.network_entries = check_entries(entries, services().settings.networks)
        except NetworkError:
            known = ", ".join(sorted(services().settings.networks)) or "—"
            raise ValidationError(
                _("Each entry must be an address block such as 10.0.0.0/8 or 2001:db8::/32, or a named network "
                  "(%(names)s).", names=known)
            ) from None

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        start, end = (self.hours_start.data or "").strip(), (self.hours_end.data or "").strip()
        if bool(start) != bool(end):
            (self.hours_end if start else self.hours_start).errors.append(_("Give both the start and the end."))
            ok = False
        elif start and start == end:
            self.hours_end.errors.append(_("The end must differ from the start."))
            ok = False
        if self.valid_from.data and self.valid_until.data and self.valid_until.data < self.valid_from.data:
            self.valid_until.errors.append(_("The last day cannot be before the first day."))
            ok = False
        return ok


class DeleteRestrictionForm(FlaskForm):
    reason = TextAreaField(
        validators=[
            DataRequired(message=_l("Give a reason; it is kept in the audit journal.")),
            Length(max=MAX_REASON, message=_l("At most 1000 characters.")),
        ]
    )


class ExplainForm(FlaskForm):
    class Meta:
        csrf = False  # a question, asked with GET; it changes nothing

    login = StringField(validators=[DataRequired(message=_l("Enter the person's login.")),
                                    Length(max=128, message=_l("At most 128 characters."))])
    app = SelectField(choices=[], validate_choice=False)
    at = StringField(validators=[Length(max=40, message=_l("Use the form 2025-09-01T08:30."))])
    ip = StringField(validators=[Length(max=64, message=_l("Not an IP address."))])
    scopes = MultiCheckboxField(choices=[(s, s) for s in SCOPES_SUPPORTED])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        clients = services().db.session.scalars(select(Client).order_by(Client.name))
        self.app.choices = [("", _("No app: only the sign-in"))] + [(c.client_id, f"{c.name} ({c.client_id})")
                                                                   for c in clients]
        self.user: User | None = None
        self.client: Client | None = None
        self.moment: datetime | None = None

    def validate_login(self, field: StringField) -> None:
        self.user = find_account(services().db.session, field.data or "")
        if self.user is None:
            raise ValidationError(_("No account has this login."))

    def validate_app(self, field: SelectField) -> None:
        if field.data:
            self.client = services().db.session.scalar(select(Client).where(Client.client_id == field.data))
            if self.client is None:
                raise ValidationError(_("No portal app has this client id: %(ids)s", ids=field.data[:64]))

    def validate_at(self, field: StringField) -> None:
        from idp.access.restrictions import parse_moment

        try:
            self.moment = parse_moment(field.data, services().clock())
        except ValueError:
            raise ValidationError(_("Use the form 2025-09-01T08:30.")) from None

    def validate_ip(self, field: StringField) -> None:
        text = (field.data or "").strip()
        field.data = text
        if text and parse_ip(text) is None:
            raise ValidationError(_("Not an IP address."))


# --- helpers --------------------------------------------------------------------------
def _roles() -> list[Role]:
    return list(services().db.session.scalars(select(Role).order_by(Role.name)))


def _restriction_or_404(restriction_id: int) -> Restriction:
    restriction = services().db.session.get(Restriction, restriction_id)
    if restriction is None:
        abort(404)
    return restriction


def _day_start(day: date) -> datetime:
    """Midnight at the start of ``day`` in Asia/Bishkek, as naive UTC (how it is stored)."""
    return datetime(day.year, day.month, day.day, tzinfo=d.SCHOOL_TZ).astimezone(UTC).replace(tzinfo=None)


def _stored_day(value: datetime | None, *, last: bool = False) -> date | None:
    """A stored bound as the day shown in the form (``valid_until`` is the exclusive
    start of the day after the last day)."""
    if value is None:
        return None
    local = value.replace(tzinfo=UTC).astimezone(d.SCHOOL_TZ)
    if last:
        local -= timedelta(microseconds=1)
    return local.date()


def _form_data(restriction: Restriction) -> dict[str, Any]:
    db = services().db.session
    role = db.get(Role, restriction.role_id) if restriction.role_id is not None else None
    user = db.get(User, restriction.user_id) if restriction.user_id is not None else None
    return {
        "target": "role" if role is not None else "account",
        "role": role.name if role else "",
        "login": user.login if user else "",
        "description": restriction.description or "",
        "allowed_clients": " ".join(restriction.allowed_clients or []),
        "allowed_weekdays": list(restriction.allowed_weekdays or []),
        "hours_start": restriction.hours_start or "",
        "hours_end": restriction.hours_end or "",
        "allowed_networks": "\n".join(restriction.allowed_networks or []),
        "max_sessions": restriction.max_sessions,
        "at_session_limit": restriction.at_session_limit or d.REFUSE,
        "require_2fa": bool(restriction.require_2fa),
        "valid_from": _stored_day(restriction.valid_from),
        "valid_until": _stored_day(restriction.valid_until, last=True),
        "school_only_scopes": list(restriction.school_only_scopes or []),
        "idle_minutes": restriction.idle_timeout_seconds // 60 if restriction.idle_timeout_seconds else None,
        "absolute_minutes": (restriction.absolute_timeout_seconds // 60
                             if restriction.absolute_timeout_seconds else None),
    }


def _apply(form: RestrictionForm, restriction: Restriction) -> None:
    """Copy the validated form onto ``restriction``."""
    restriction.role_id = form.target_role.id if form.target.data == "role" and form.target_role else None
    restriction.user_id = form.target_user.id if form.target.data == "account" and form.target_user else None
    restriction.description = (form.description.data or "").strip()
    restriction.allowed_clients = form.client_ids
    days = sorted(set(form.allowed_weekdays.data or []))
    restriction.allowed_weekdays = days or None
    restriction.hours_start = form.hours_start.data or None
    restriction.hours_end = form.hours_end.data or None
    restriction.allowed_networks = form.network_entries
    restriction.max_sessions = form.max_sessions.data
    restriction.at_session_limit = form.at_session_limit.data if form.at_session_limit.data in d.AT_SESSION_LIMIT \
        else d.REFUSE
    restriction.require_2fa = bool(form.require_2fa.data)
    restriction.valid_from = _day_start(form.valid_from.data) if form.valid_from.data else None
    restriction.valid_until = (_day_start(form.valid_until.data + timedelta(days=1))
                               if form.valid_until.data else None)
    scopes = sorted(set(form.school_only_scopes.data or []))
    restriction.school_only_scopes = scopes or None
    restriction.idle_timeout_seconds = form.idle_minutes.data * 60 if form.idle_minutes.data else None
    restriction.absolute_timeout_seconds = form.absolute_minutes.data * 60 if form.absolute_minutes.data else None


def _targets(restrictions: list[Restriction]) -> dict[int, tuple[str, str, str]]:
    """Per restriction: kind ("role"/"account"), label, console link."""
    db = services().db.session
    role_names = {r.id: r.name for r in _roles()}
    user_ids = {r.user_id for r in restrictions if r.user_id is not None}
    users = {u.id: u for u in db.scalars(select(User).where(User.id.in_(user_ids)))} if user_ids else {}
    found: dict[int, tuple[str, str, str]] = {}
    for r in restrictions:
        if r.role_id is not None:
            name = role_names.get(r.role_id, str(r.role_id))
            found[r.id] = ("role", name, url_for("admin.roles") + f"#role-{name}")
        else:
            user = users.get(r.user_id or 0)
            label = f"{user.display_name} ({user.login})" if user else str(r.user_id)
            found[r.id] = ("account", label, url_for("admin.account", user_id=r.user_id))
    return found


def _render_form(form: RestrictionForm, restriction: Restriction | None, status: int = 200) -> Any:
    page = render_template(
        "admin/restrictions/form.html", form=form, restriction=restriction,
        networks=services().settings.networks, local_time=local_time,
    )
    return page, status


# --- views ---------------------------------------------------------------------------
@bp.get("/restrictions")
@requires("admin:users:read")
def restrictions() -> str:
    rows = list(services().db.session.scalars(select(Restriction).order_by(Restriction.id)))
    return render_template(
        "admin/restrictions/list.html", restrictions=rows, targets=_targets(rows), weekday_names=weekday_names,
        stored_day=_stored_day, networks=services().settings.networks,
        shared=services().settings.shared_networks,
    )


@bp.route("/restrictions/new", methods=["GET", "POST"])
@requires("admin:restrictions:write")
def restriction_new() -> Any:
    form = RestrictionForm()
    if request.method == "GET":
        if request.args.get("role"):
            form.role.data = request.args["role"][:64]
        if request.args.get("login"):
            form.target.data = "account"
            form.login.data = request.args["login"][:128]
        return _render_form(form, None)
    if not form.validate_on_submit():
        return _render_form(form, None, 400)
    db = services().db.session
    restriction = Restriction(created_by=current_actor().ref)
    _apply(form, restriction)
    db.add(restriction)
    db.flush()
    record_console_event("restriction:create", subject=target_of(db, restriction),
                         details={"restriction": restriction.id, "values": snapshot(restriction)})
    db.commit()
    flash(_("The restriction is saved. It applies from the next request."))
    return redirect(url_for("admin.restrictions") + f"#restriction-{restriction.id}", code=303)


@bp.route("/restrictions/<int:restriction_id>/edit", methods=["GET", "POST"])
@requires("admin:restrictions:write")
def restriction_edit(restriction_id: int) -> Any:
    restriction = _restriction_or_404(restriction_id)
    form = RestrictionForm(data=_form_data(restriction)) if request.method == "GET" else RestrictionForm()
    if request.method == "GET":
        return _render_form(form, restriction)
    if not form.validate_on_submit():
        return _render_form(form, restriction, 400)
    db = services().db.session
    before = snapshot(restriction)
    old_target = target_of(db, restriction)
    _apply(form, restriction)
    changes = diff(before, snapshot(restriction))
    if not changes:
        flash(_("Nothing was changed."))
        return redirect(url_for("admin.restrictions") + f"#restriction-{restriction.id}", code=303)
    details: dict[str, Any] = {"restriction": restriction.id, "changed": changes}
    new_target = target_of(db, restriction)
    if new_target != old_target:
        details["previous_target"] = old_target
    record_console_event("restriction:update", subject=new_target, details=details)
    db.commit()
    flash(_("The restriction is saved. It applies from the next request."))
    return redirect(url_for("admin.restrictions") + f"#restriction-{restriction.id}", code=303)


@bp.route("/restrictions/<int:restriction_id>/delete", methods=["GET", "POST"])
@requires("admin:restrictions:write")
def restriction_delete(restriction_id: int) -> Any:
    restriction = _restriction_or_404(restriction_id)
    form = DeleteRestrictionForm()
    targets = _targets([restriction])
    if request.method == "POST":
        if form.validate_on_submit():
            db = services().db.session
            subject = target_of(db, restriction)
            values = snapshot(restriction)
            db.delete(restriction)
            record_console_event("restriction:delete", subject=subject, reason=form.reason.data.strip(),
                                 details={"restriction": restriction_id, "values": values})
            db.commit()
            flash(_("The restriction is deleted."))
            return redirect(url_for("admin.restrictions"), code=303)
        status = 400
    else:
        status = 200
    page = render_template("admin/restrictions/delete.html", form=form, restriction=restriction,
                           target=targets[restriction.id])
    return page, status


@bp.get("/access/explain")
@requires("admin:users:read")
def access_explain() -> Any:
    """Why can't this person sign in (to this app, at this time, from this address)?"""
    form = ExplainForm(request.args)
    asked = "login" in request.args
    result = None
    status = 200
    if asked:
        if form.validate():
            assert form.user is not None and form.moment is not None
            svc = services()
            result = explain(svc.db.session, svc.settings, form.user, client=form.client, at=form.moment,
                             ip=form.ip.data or None, scopes=list(form.scopes.data or []))
        else:
            status = 400
    return render_template(
        "admin/restrictions/explain.html", form=form, result=result, reason_message=reason_message,
        local_time=local_time, school_tz=d.SCHOOL_TZ,
    ), status


add_nav("admin.restrictions", "admin:users:read", _l("Restrictions"))
