"""Console: accounts. List, search and export; create; the account page; profile,
roles, classes and guardians; lock, unlock, end sessions, require a new password and
issue activation codes.

Views are thin: ``AccountAdmin`` decides and journals; its ``AccountError`` and
``PermissionDenied`` become form errors here. Destructive actions are POST + CSRF +
the account's login typed to confirm + a mandatory reason (stored in the journal)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_time
from flask import Response, abort, flash, redirect, render_template, request, url_for
from flask_babel import force_locale, get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from markupsafe import Markup
from sqlalchemy import select
from wtforms import HiddenField, SelectField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp, ValidationError
from wtforms.widgets import CheckboxInput, ListWidget

from admin_ui import bp
from admin_ui.csv_export import BOM, safe_cell
from admin_ui.guard import can, current_actor, requires
from admin_ui.nav import add_nav
from idp.access.permissions import PERMISSIONS
from idp.accounts import guardian_codes, obligations
from idp.accounts.admin import (
    DIRECTORY_SOURCE,
    MAX_REASON,
    AccountAdmin,
    Actor,
    OutranksActor,
    PermissionDenied,
)
from idp.accounts.models import Role, User
from idp.accounts.service import LOGIN_PATTERN, AccountError, normalise_login
from idp.audit.models import AuditEvent
from idp.audit.web import audit_event
from idp.i18n import LANGUAGES
from idp.login.sessions import app_names, device_label, session_time
from idp.login.sessions import display_context as session_display
from idp.mfa.qr import qr_svg
from idp.services import services

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")
PER_PAGE = 25
RECENT_EVENTS = 20
STATES = ("active", "locked", "disabled")


# --- helpers -------------------------------------------------------------------------
def account_admin() -> AccountAdmin:
    svc = services()
    return AccountAdmin(db=svc.db.session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions,
                        login_throttle=svc.login_account_throttle, two_factor=svc.two_factor)


def _account_or_404(user_id: int) -> User:
    user = account_admin().get(user_id)
    if user is None:
        abort(404)
    return user


def local_time(value: datetime | None) -> str:
    """A stored (naive UTC) time in the school's time zone, in the page's language."""
    if value is None:
        return ""
    local = value.replace(tzinfo=ZoneInfo("UTC")).astimezone(SCHOOL_TZ)
    locale = str(get_locale() or "ky")
    return f"{format_date(local.date(), 'medium', locale=locale)} {format_time(local, 'short', tzinfo=SCHOOL_TZ, locale=locale)}"


def state_of(user: User) -> str:
    if not user.active:
        return "disabled"
    return "locked" if user.locked else "active"


def state_labels() -> dict[str, str]:
    return {"active": _("Active"), "locked": _("Locked"), "disabled": _("Disabled")}


def _render(template: str, **context: Any) -> str:
    return render_template(template, local_time=local_time, state_of=state_of, states=state_labels(), **context)


def account_error_text(exc: AccountError) -> str:
    """The service speaks English to logs and the CLI; people get a translated message."""
    text = str(exc)
    known = [
        ("login must be", _("The login must be 2–64 characters: latin letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit.")),
        ("login ", _("This login is already taken.")),
        ("display name", _("Enter a name of at most 255 characters.")),
        ("e-mail", _("The e-mail address is not valid.")),
        ("locale", _("Choose one of the offered languages.")),
        ("unknown role", _("One of the chosen roles no longer exists. Reload the page.")),
        ("unknown class", _("One of the chosen classes no longer exists. Reload the page.")),
        ("a reason is required", _("Enter a reason.")),
        ("the reason must be at most", _("The reason must be at most %(max)d characters.", max=MAX_REASON)),
        ("an account cannot be its own guardian", _("An account cannot be its own guardian.")),
        ("the session has already ended", _("This session has already ended.")),
        ("the password is managed by the school directory",
         _("This account's password is managed by the school directory: change it there.")),
    ]
    for prefix, message in known:
        if text.startswith(prefix):
            return message
    return _("The change was not saved: %(detail)s", detail=text)


def outranked_text(exc: OutranksActor) -> str:
    return _(
        "This account holds permissions you do not have (%(permissions)s): whoever resets its credentials "
        "could become that person. Ask someone who holds all of them, or the server's operator "
        "(darbaza users reset-2fa).",
        permissions=", ".join(str(PERMISSIONS.get(p, p)) for p in exc.missing),
    )


def denied_text(exc: PermissionDenied) -> str:
    if isinstance(exc, OutranksActor):
        return outranked_text(exc)
    if exc.permission == "admin:roles:assign":
        return _("You may not give or take away roles.")
    return _(
        "You may only give or take away roles whose every permission you hold. "
        "This needs the permission “%(permission)s”, which you do not have.",
        permission=str(PERMISSIONS.get(exc.permission, exc.permission)),
    )


def assignable_roles(actor: Actor, roles: list[Role]) -> set[str]:
    """The roles the actor may give or take away (AccountAdmin's escalation rule)."""
    if "admin:roles:assign" not in actor.permissions:
        return set()
    return {r.name for r in roles if r.permissions <= actor.permissions}


def all_roles() -> list[Role]:
    return list(services().db.session.scalars(select(Role).order_by(Role.name)))


def class_names() -> list[str]:
    return [c.name for c, _count in account_admin().list_classes()]


def _fail(template: str, **context: Any) -> tuple[str, int]:
    # Nothing half-done survives a refused change.
    services().db.session.rollback()
    return _render(template, **context), 400


def _forbidden(template: str, **context: Any) -> tuple[str, int]:
    """As ``_fail``, for a change the actor may not make (403)."""
    return _fail(template, **context)[0], 403


# --- forms ---------------------------------------------------------------------------
class MultiCheckboxField(SelectMultipleField):
    widget = ListWidget(prefix_label=False)
    option_widget = CheckboxInput()


def _login_format(_form: FlaskForm, field: StringField) -> None:
    if not LOGIN_PATTERN.match(normalise_login(field.data or "")):
        raise ValidationError(
            _("The login must be 2–64 characters: latin letters, digits, '.', '_' or '-', "
              "starting with a letter or digit.")
        )


def _locale_choices() -> list[tuple[str, str]]:
    return [("", str(_l("School default"))), *LANGUAGES.items()]


EMAIL = Regexp(r"^[^@\s]+@[^@\s]+$", message=_l("The e-mail address is not valid."))


class ProfileForm(FlaskForm):
    display_name = StringField(
        validators=[DataRequired(message=_l("Enter the person's name.")),
                    Length(max=255, message=_l("At most 255 characters."))]
    )
    email = StringField(validators=[Optional(), Length(max=320, message=_l("At most 320 characters.")), EMAIL])
    locale = SelectField(choices=[], validate_choice=True)


class CreateAccountForm(ProfileForm):
    login = StringField(
        validators=[DataRequired(message=_l("Enter a login.")), Length(max=64, message=_l("At most 64 characters.")),
                    _login_format]
    )
    roles = MultiCheckboxField(choices=[])
    classes = MultiCheckboxField(choices=[])


class RolesForm(FlaskForm):
    roles = MultiCheckboxField(choices=[])


class ClassesForm(FlaskForm):
    classes = MultiCheckboxField(choices=[])


class LinkChildForm(FlaskForm):
    child_login = StringField(
        validators=[DataRequired(message=_l("Enter the child's login.")),
                    Length(max=128, message=_l("At most 128 characters."))]
    )


class UnlinkForm(FlaskForm):
    guardian_id = HiddenField(validators=[DataRequired()])
    child_id = HiddenField(validators=[DataRequired()])


class ConfirmedActionForm(FlaskForm):
    """Typed confirmation plus a reason, for actions that take something away."""

    confirm_login = StringField(validators=[DataRequired(message=_l("Type the account's login to confirm."))])
    reason = TextAreaField(
        validators=[DataRequired(message=_l("Enter a reason.")),
                    Length(max=MAX_REASON, message=_l("At most %(max)d characters.", max=MAX_REASON))]
    )

    def confirms(self, user: User) -> bool:
        if self.confirm_login.data and normalise_login(self.confirm_login.data) != user.login:
            self.confirm_login.errors = [
                *self.confirm_login.errors,
                _("This is not the login of this account. Type “%(login)s” to confirm.", login=user.login),
            ]
            return False
        return True


class GuardianCodeForm(FlaskForm):
    """A button: the CSRF token only."""


class ActivationCodeForm(FlaskForm):
    reason = TextAreaField(validators=[Optional(), Length(max=MAX_REASON)])


# --- list and export -------------------------------------------------------------------
def _filters() -> dict[str, str]:
    """The list's filters from the query string; unknown values are ignored."""
    state = request.args.get("state", "")
    return {
        "text": request.args.get("q", "").strip()[:100],
        "role": request.args.get("role", "").strip()[:64],
        "class_name": request.args.get("class", "").strip()[:32],
        "state": state if state in STATES else "",
    }


def _query_args(filters: dict[str, str]) -> dict[str, Any]:
    args = {"q": filters["text"], "role": filters["role"], "class": filters["class_name"], "state": filters["state"]}
    return {k: v for k, v in args.items() if v}


@bp.get("/accounts")
@requires("admin:users:read")
def accounts() -> str:
    filters = _filters()
    page_no = max(1, request.args.get("page", 1, type=int) or 1)
    result = account_admin().search(page=page_no, per_page=PER_PAGE, **filters)
    args = _query_args(filters)
    return _render(
        "admin/accounts/list.html",
        result=result,
        filters=filters,
        roles=[r.name for r in all_roles()],
        classes=class_names(),
        prev_url=url_for("admin.accounts", page=result.page - 1, **args) if result.page > 1 else None,
        next_url=url_for("admin.accounts", page=result.page + 1, **args) if result.page < result.pages else None,
        export_url=url_for("admin.accounts_export", **args),
    )




@bp.get("/accounts/export.csv")
@requires("admin:users:read")
def accounts_export() -> Response:
    filters = _filters()
    users = account_admin().iter_all(**filters)
    labels = state_labels()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([_("Login"), _("Name"), _("E-mail"), _("Roles"), _("Classes"), _("State"), _("Created")])
    for user in users:
        created = user.created_at.replace(tzinfo=ZoneInfo("UTC")).astimezone(SCHOOL_TZ) if user.created_at else None
        writer.writerow(
            safe_cell(v)
            for v in (
                user.login,
                user.display_name,
                user.email or "",
                ", ".join(user.role_names),
                ", ".join(user.class_names),
                labels[state_of(user)],
                created.strftime("%Y-%m-%d %H:%M") if created else "",
            )
        )
    # An export of personal data is itself an event (policy 3: who holds what).
    audit_event("account:export", details={"filters": {k: v for k, v in filters.items() if v}, "rows": len(users)})
    stamp = datetime.now(SCHOOL_TZ).strftime("%Y%m%d-%H%M")
    # The BOM makes spreadsheets of the region read the file as UTF-8 (Cyrillic names).
    body = (BOM + out.getvalue()).encode("utf-8")
    return Response(
        body,
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="accounts-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


# --- create ------------------------------------------------------------------------------
def _prepare_create_form(form: CreateAccountForm, roles: list[Role]) -> None:
    form.locale.choices = _locale_choices()
    # Every role is a valid choice, so that a role the actor may not give reaches the
    # service and its refusal is shown; the page only offers the assignable ones.
    form.roles.choices = [(r.name, r.name) for r in roles]
    form.classes.choices = [(n, n) for n in class_names()]


@bp.route("/accounts/new", methods=["GET", "POST"])
@requires("admin:users:write")
def account_create() -> Any:
    actor = current_actor()
    roles = all_roles()
    form = CreateAccountForm()
    _prepare_create_form(form, roles)
    context = {"form": form, "roles": roles, "assignable": assignable_roles(actor, roles)}
    if request.method == "GET":
        return _render("admin/accounts/create.html", **context)
    if not form.validate_on_submit():
        return _fail("admin/accounts/create.html", **context)
    try:
        user = account_admin().create(
            actor,
            login=form.login.data,
            display_name=form.display_name.data,
            email=(form.email.data or "").strip() or None,
            locale=form.locale.data or None,
            roles=list(form.roles.data or []),
            classes=list(form.classes.data or []),
        )
    except PermissionDenied as exc:
        form.roles.errors = [*form.roles.errors, denied_text(exc)]
        return _fail("admin/accounts/create.html", **context)
    except AccountError as exc:
        target = form.login if str(exc).startswith("login") else form.display_name
        target.errors = [*target.errors, account_error_text(exc)]
        return _fail("admin/accounts/create.html", **context)
    services().db.session.commit()
    # No admin ever sets or sees a password: the person sets it with a one-time code.
    flash(_("The account %(login)s was created. Issue an activation code so the person can set a password.",
            login=user.login))
    return redirect(url_for("admin.account", user_id=user.id), code=303)


# --- the account page -------------------------------------------------------------------
def recent_events(user: User) -> tuple[list[AuditEvent], dict[str, str]]:
    db = services().db.session
    events = list(
        db.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject == f"user:{user.id}")
            .order_by(AuditEvent.seq.desc())
            .limit(RECENT_EVENTS)
        )
    )
    # Show actors by login rather than by internal id.
    ids = {int(e.actor[5:]) for e in events if e.actor.startswith("user:") and e.actor[5:].isdigit()}
    names = {f"user:{uid}": login for uid, login in db.execute(select(User.id, User.login).where(User.id.in_(ids)))}
    return events, names


@bp.get("/accounts/<int:user_id>")
@requires("admin:users:read")
def account(user_id: int) -> str:
    user = _account_or_404(user_id)
    events, actor_names = recent_events(user)
    session_rows = services().sessions.list(user.id)
    return _render(
        "admin/accounts/account.html",
        user=user,
        events=events,
        actor_names=actor_names,
        sessions=session_rows,
        session_apps=app_names(session_rows),
        **session_display(),
        languages=LANGUAGES,
        # Policy 2.5: what the person accepted, and whether a current version awaits them.
        obligation_status=obligations.status_for(services().db.session, user),
        acceptances=obligations.acceptances(services().db.session, user),
        # Policy 5.2.1: the account's sharing signals, for those who review them.
        sharing_flags=_sharing_flags(user) if can("audit:read") else [],
    )


def _sharing_flags(user: User) -> list[Any]:
    from admin_ui.sharing import account_flags  # the sharing area imports this module

    return account_flags(services().db.session, user.id)


@bp.route("/accounts/<int:user_id>/profile", methods=["GET", "POST"])
@requires("admin:users:write")
def account_profile(user_id: int) -> Any:
    user = _account_or_404(user_id)
    form = ProfileForm(obj=user if request.method == "GET" else None)
    form.locale.choices = _locale_choices()
    if request.method == "GET":
        form.locale.data = user.locale or ""
        return _render("admin/accounts/profile.html", form=form, user=user)
    if not form.validate_on_submit():
        return _fail("admin/accounts/profile.html", form=form, user=user)
    try:
        account_admin().update_profile(
            current_actor(), user, display_name=form.display_name.data, email=form.email.data,
            locale=form.locale.data or None,
        )
    except AccountError as exc:
        field = form.email if "e-mail" in str(exc) else form.display_name
        field.errors = [*field.errors, account_error_text(exc)]
        return _fail("admin/accounts/profile.html", form=form, user=user)
    services().db.session.commit()
    flash(_("The profile was saved."))
    return redirect(url_for("admin.account", user_id=user.id), code=303)


@bp.route("/accounts/<int:user_id>/roles", methods=["GET", "POST"])
@requires("admin:roles:assign")
def account_roles(user_id: int) -> Any:
    user = _account_or_404(user_id)
    actor = current_actor()
    roles = all_roles()
    assignable = assignable_roles(actor, roles)
    form = RolesForm()
    form.roles.choices = [(r.name, r.name) for r in roles]
    context = {"form": form, "user": user, "roles": roles, "assignable": assignable}
    if request.method == "GET":
        form.roles.data = user.role_names
        return _render("admin/accounts/roles.html", **context)
    if not form.validate_on_submit():
        return _fail("admin/accounts/roles.html", **context)
    # Roles the actor may not change are shown disabled (browsers do not send them);
    # they stay as they are.
    kept = set(user.role_names) - assignable
    try:
        account_admin().set_roles(actor, user, sorted(set(form.roles.data or []) | kept))
    except PermissionDenied as exc:
        form.roles.errors = [*form.roles.errors, denied_text(exc)]
        return _fail("admin/accounts/roles.html", **context)
    except AccountError as exc:
        form.roles.errors = [*form.roles.errors, account_error_text(exc)]
        return _fail("admin/accounts/roles.html", **context)
    services().db.session.commit()
    flash(_("The roles were saved."))
    return redirect(url_for("admin.account", user_id=user.id), code=303)


@bp.route("/accounts/<int:user_id>/classes", methods=["GET", "POST"])
@requires("admin:users:write")
def account_classes(user_id: int) -> Any:
    user = _account_or_404(user_id)
    form = ClassesForm()
    form.classes.choices = [(n, n) for n in class_names()]
    if request.method == "GET":
        form.classes.data = user.class_names
        return _render("admin/accounts/classes.html", form=form, user=user)
    if not form.validate_on_submit():
        return _fail("admin/accounts/classes.html", form=form, user=user)
    try:
        account_admin().set_classes(current_actor(), user, list(form.classes.data or []))
    except AccountError as exc:
        form.classes.errors = [*form.classes.errors, account_error_text(exc)]
        return _fail("admin/accounts/classes.html", form=form, user=user)
    services().db.session.commit()
    flash(_("The classes were saved."))
    return redirect(url_for("admin.account", user_id=user.id), code=303)


# --- guardians ----------------------------------------------------------------------------
def _issuer_login(ref: str) -> str:
    """A journal actor reference ("user:12") as the account's login, for people."""
    kind, _sep, rest = ref.partition(":")
    if kind == "user" and rest.isdigit():
        issuer = services().db.session.get(User, int(rest))
        if issuer is not None:
            return issuer.login
    return ref


def _guardians_page(user: User, link_form: LinkChildForm) -> str:
    active = guardian_codes.active_codes(services().db.session, user)
    return _render("admin/accounts/guardians.html", user=user, link_form=link_form, unlink_form=UnlinkForm(),
                   codes=[(c, _issuer_login(c.created_by)) for c in active], code_form=GuardianCodeForm(),
                   can_write=can("admin:users:write"))


def _guardian_ctx() -> guardian_codes.Context:
    actor = current_actor()
    return guardian_codes.Context(actor=actor.ref, ip=actor.ip, request_id=actor.request_id)


@bp.route("/accounts/<int:user_id>/guardians", methods=["GET", "POST"])
@requires("admin:users:read")
def account_guardians(user_id: int) -> Any:
    """This account's children and guardians (and its active guardian link codes);
    link a child by the child's login (admin:users:write)."""
    user = _account_or_404(user_id)
    form = LinkChildForm()
    if request.method == "GET":
        return _guardians_page(user, form)
    if not can("admin:users:write"):
        abort(403)
    if not form.validate_on_submit():
        services().db.session.rollback()
        return _guardians_page(user, form), 400
    admin = account_admin()
    child = admin.find_by_login(form.child_login.data)
    if child is None:
        form.child_login.errors = [*form.child_login.errors, _("There is no account with this login.")]
        return _guardians_page(user, form), 400
    try:
        admin.link_guardian(current_actor(), user, child)
    except AccountError as exc:
        form.child_login.errors = [*form.child_login.errors, account_error_text(exc)]
        services().db.session.rollback()
        return _guardians_page(user, form), 400
    services().db.session.commit()
    flash(_("%(guardian)s is now a guardian of %(child)s.", guardian=user.login, child=child.login))
    return redirect(url_for("admin.account_guardians", user_id=user.id), code=303)


@bp.post("/accounts/<int:user_id>/guardians/unlink")
@requires("admin:users:write")
def account_guardian_unlink(user_id: int) -> Any:
    user = _account_or_404(user_id)
    form = UnlinkForm()
    back = redirect(url_for("admin.account_guardians", user_id=user.id), code=303)
    if not form.validate_on_submit() or not (form.guardian_id.data.isdigit() and form.child_id.data.isdigit()):
        flash(_("The link was not removed: the form was incomplete. Try again."), "error")
        return back
    admin = account_admin()
    guardian = admin.get(int(form.guardian_id.data))
    child = admin.get(int(form.child_id.data))
    # Only links of the account whose page this is.
    if guardian is None or child is None or user.id not in (guardian.id, child.id):
        abort(404)
    admin.unlink_guardian(current_actor(), guardian, child)
    services().db.session.commit()
    flash(_("%(guardian)s is no longer a guardian of %(child)s.", guardian=guardian.login, child=child.login))
    return back


@bp.post("/accounts/<int:user_id>/guardian-codes")
@requires("admin:users:write")
def account_guardian_code_issue(user_id: int) -> Any:
    """A new guardian link code for this (child's) account, shown once on a printable slip."""
    user = _account_or_404(user_id)
    if not GuardianCodeForm().validate_on_submit():
        flash(_("No code was issued: the form was incomplete. Try again."), "error")
        return redirect(url_for("admin.account_guardians", user_id=user.id), code=303)
    svc = services()
    code, row = guardian_codes.issue_code(svc.db.session, svc.journal, user, _guardian_ctx(), purpose="console")
    svc.db.session.commit()
    settings = svc.settings
    url = f"{settings.issuer}/guardian"
    # The slip is for the child's family: it speaks the child's language.
    with force_locale(user.locale or settings.default_locale):
        slip = render_template(
            "guardian_slip.html", name=user.display_name, code=code, expires=local_time(row.expires_at), url=url,
            school=settings.school_name, qr=qr_svg(url, title=_("Parent registration page")),
        )
    page = _render("admin/accounts/guardian_code.html", user=user, slip=Markup(slip))  # noqa: S704 - our own template
    # Shown once: no copy in any cache or history (only the code's hash is stored).
    return page, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}


@bp.post("/accounts/<int:user_id>/guardian-codes/<int:code_id>/revoke")
@requires("admin:users:write")
def account_guardian_code_revoke(user_id: int, code_id: int) -> Any:
    user = _account_or_404(user_id)
    back = redirect(url_for("admin.account_guardians", user_id=user.id), code=303)
    if not GuardianCodeForm().validate_on_submit():
        flash(_("The code was not revoked: the form was incomplete. Try again."), "error")
        return back
    svc = services()
    if not guardian_codes.revoke_code(svc.db.session, svc.journal, user, code_id, _guardian_ctx()):
        svc.db.session.rollback()
        flash(_("This code was already used or revoked."), "error")
        return back
    svc.db.session.commit()
    flash(_("The guardian link code was revoked."))
    return back


# --- support actions ------------------------------------------------------------------------
def _confirmed_action(
    user: User,
    *,
    title: str,
    explanation: str,
    button: str,
    endpoint: str,
    perform: Callable[[Actor, User, str], Any],
    done: Callable[[Any], str],
    endpoint_args: dict[str, Any] | None = None,
) -> Any:
    """GET shows the confirmation form; POST checks the typed login and the reason,
    then runs ``perform(actor, user, reason)`` and flashes ``done(result)``."""
    form = ConfirmedActionForm()
    context = {"form": form, "user": user, "title": title, "explanation": explanation, "button": button,
               "action": url_for(endpoint, user_id=user.id, **(endpoint_args or {}))}
    if request.method == "GET":
        return _render("admin/accounts/confirm.html", **context)
    # Both checks run so that every mistake is shown at once.
    valid = form.validate_on_submit()
    confirmed = form.confirms(user)
    if not (valid and confirmed):
        return _fail("admin/accounts/confirm.html", **context)
    try:
        result = perform(current_actor(), user, form.reason.data)
    except AccountError as exc:
        form.reason.errors = [*form.reason.errors, account_error_text(exc)]
        return _fail("admin/accounts/confirm.html", **context)
    except OutranksActor as exc:
        form.reason.errors = [*form.reason.errors, outranked_text(exc)]
        return _forbidden("admin/accounts/confirm.html", **context)
    services().db.session.commit()
    flash(done(result))
    return redirect(url_for("admin.account", user_id=user.id), code=303)


def _back_with(user: User, message: str) -> Any:
    flash(message, "error")
    return redirect(url_for("admin.account", user_id=user.id), code=303)


@bp.route("/accounts/<int:user_id>/lock", methods=["GET", "POST"])
@requires("support:accounts:lock")
def account_lock(user_id: int) -> Any:
    user = _account_or_404(user_id)
    if user.locked:
        return _back_with(user, _("This account is already locked."))
    return _confirmed_action(
        user,
        title=_("Lock the account %(login)s", login=user.login),
        explanation=_("The person cannot sign in until the account is unlocked. All of their sessions end now "
                      "and the portal apps' tokens stop working."),
        button=_("Lock the account"),
        endpoint="admin.account_lock",
        perform=account_admin().lock,
        done=lambda ended: _("The account was locked. Sessions ended: %(count)d.", count=ended),
    )


@bp.route("/accounts/<int:user_id>/unlock", methods=["GET", "POST"])
@requires("support:accounts:lock")
def account_unlock(user_id: int) -> Any:
    user = _account_or_404(user_id)
    if not user.locked:
        return _back_with(user, _("This account is not locked."))
    return _confirmed_action(
        user,
        title=_("Unlock the account %(login)s", login=user.login),
        explanation=_("The person can sign in again with their password."),
        button=_("Unlock the account"),
        endpoint="admin.account_unlock",
        perform=account_admin().unlock,
        done=lambda _result: _("The account was unlocked."),
    )


@bp.route("/accounts/<int:user_id>/password/reenable", methods=["GET", "POST"])
@requires("support:accounts:lock")
def account_reenable_password(user_id: int) -> Any:
    user = _account_or_404(user_id)
    if user.password_disabled_at is None:
        return _back_with(user, _("This account's password is not disabled."))
    return _confirmed_action(
        user,
        title=_("Re-enable the password of %(login)s", login=user.login),
        explanation=_("The password was disabled after %(count)d failed sign-in attempts in a row: someone may be "
                      "guessing it. Re-enable it only after you have made sure who is asking (in person or by a "
                      "known phone number). If the person has forgotten the password, issue an activation code "
                      "instead.", count=user.password_failures),
        button=_("Re-enable the password"),
        endpoint="admin.account_reenable_password",
        perform=account_admin().reenable_password,
        done=lambda _result: _("The password was re-enabled. The person can sign in with it again."),
    )


@bp.route("/accounts/<int:user_id>/two-factor/reset", methods=["GET", "POST"])
@requires("support:credentials:reset")
def account_reset_two_factor(user_id: int) -> Any:
    user = _account_or_404(user_id)
    if not user.has_second_factor:
        return _back_with(user, _("Two-factor sign-in is not on for this account."))
    return _confirmed_action(
        user,
        title=_("Reset two-factor sign-in of %(login)s", login=user.login),
        explanation=_("The authenticator app, the recovery codes and every passkey are removed and every session "
                      "ends. Do this only after you have made sure who is asking (in person, with a document). At "
                      "the next sign-in the person sets up a second factor again (required for staff roles)."),
        button=_("Reset two-factor sign-in"),
        endpoint="admin.account_reset_two_factor",
        perform=account_admin().reset_two_factor,
        done=lambda ended: _("Two-factor sign-in was reset. Sessions ended: %(count)d.", count=ended),
    )


@bp.route("/accounts/<int:user_id>/sessions/end", methods=["GET", "POST"])
@requires("support:sessions:end")
def account_end_sessions(user_id: int) -> Any:
    user = _account_or_404(user_id)
    return _confirmed_action(
        user,
        title=_("End all sessions of %(login)s", login=user.login),
        explanation=_("The person is signed out everywhere and the portal apps' tokens stop working. "
                      "They can sign in again."),
        button=_("End all sessions"),
        endpoint="admin.account_end_sessions",
        perform=account_admin().end_sessions,
        done=lambda ended: _("Sessions ended: %(count)d.", count=ended),
    )


@bp.route("/accounts/<int:user_id>/sessions/<sid>/end", methods=["GET", "POST"])
@requires("support:sessions:end")
def account_end_session(user_id: int, sid: str) -> Any:
    """End one session of the account, with a reason (journalled account:session:end)."""
    user = _account_or_404(user_id)
    info = services().sessions.get(user.id, sid) if len(sid) <= 64 else None
    if info is None:
        return _back_with(user, _("This session has already ended."))
    return _confirmed_action(
        user,
        title=_("End a session of %(login)s", login=user.login),
        explanation=_("The session on “%(device)s” (%(ip)s, signed in %(when)s) ends now: that device is signed "
                      "out and the portal apps opened there stop working. The person's other sessions go on.",
                      device=device_label(info), ip=info.ip or "—", when=session_time(info.auth_time)),
        button=_("End this session"),
        endpoint="admin.account_end_session",
        endpoint_args={"sid": sid},
        perform=lambda actor, account, reason: account_admin().end_session(actor, account, sid, reason),
        done=lambda _result: _("The session was ended."),
    )


@bp.route("/accounts/<int:user_id>/password/require-change", methods=["GET", "POST"])
@requires("support:credentials:reset")
def account_require_password_change(user_id: int) -> Any:
    user = _account_or_404(user_id)
    return _confirmed_action(
        user,
        title=_("Require a new password from %(login)s", login=user.login),
        explanation=_("At the next sign-in the person must choose a new password before they continue."),
        button=_("Require a new password"),
        endpoint="admin.account_require_password_change",
        perform=account_admin().require_password_change,
        done=lambda _result: _("At the next sign-in the person must choose a new password."),
    )


@bp.route("/accounts/<int:user_id>/activation-code", methods=["GET", "POST"])
@requires("support:credentials:reset")
def account_activation_code(user_id: int) -> Any:
    """Issue a one-time code and show it once, on a printable card."""
    user = _account_or_404(user_id)
    form = ActivationCodeForm()
    if request.method == "GET":
        return _render("admin/accounts/activation_code.html", form=form, user=user)
    if not form.validate_on_submit():
        return _fail("admin/accounts/activation_code.html", form=form, user=user)
    if not user.can_sign_in:
        # A code cannot be redeemed by a locked or disabled account; say so now rather
        # than on the person's card.
        form.reason.errors = [*form.reason.errors,
                              _("This account is locked or disabled: unlock it first, then issue a code.")]
        return _fail("admin/accounts/activation_code.html", form=form, user=user)
    if user.source == DIRECTORY_SOURCE:
        # Bind-through sign-in: the directory holds the password; no code can set one here.
        form.reason.errors = [*form.reason.errors,
                              _("This account's password is managed by the school directory: change it there.")]
        return _fail("admin/accounts/activation_code.html", form=form, user=user)
    try:
        code, expires = account_admin().issue_activation_code(
            current_actor(), user, (form.reason.data or "").strip() or None)
    except OutranksActor as exc:
        form.reason.errors = [*form.reason.errors, outranked_text(exc)]
        return _forbidden("admin/accounts/activation_code.html", form=form, user=user)
    services().db.session.commit()
    settings = services().settings
    # The card is for the person, so it speaks their language; the page around it
    # speaks the admin's.
    with force_locale(user.locale or settings.default_locale):
        card = render_template(
            "admin/accounts/_card.html",
            user=user,
            code=code,
            expires=local_time(expires),
            school=settings.school_name,
            activate_url=f"{settings.issuer}/activate",
        )
    page = _render("admin/accounts/activation_card.html", user=user, card=Markup(card))  # noqa: S704 - our own template
    # Shown once: no copy in any cache or history (the code is stored only hashed).
    return page, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}


add_nav("admin.accounts", "admin:users:read", _l("Accounts"))
