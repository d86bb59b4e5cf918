"""Roles and their permissions (policy 5.1: one permission vocabulary, one role table).

Seeded roles may have their permissions changed but are never deleted; custom roles
are deleted only when nobody holds them and no portal app refers to them."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, redirect, render_template, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import BooleanField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.accounts import local_time
from admin_ui.guard import current_actor, record_console_event, requires
from admin_ui.nav import add_nav
from idp.access.permissions import PERMISSIONS
from idp.access.roles import ROLE_NAME, RoleError, create_role, delete_role, set_permissions
from idp.accounts import obligations
from idp.accounts.models import SEEDED_ROLES_REQUIRING_2FA, Role, User, user_roles
from idp.oidc.models import Client
from idp.services import services

MAX_REASON = 1000


class RoleForm(FlaskForm):
    name = StringField(
        validators=[DataRequired(message=_l("Enter the role's name.")), Length(max=64, message=_l("At most 64 characters."))]
    )
    description = StringField(validators=[Length(max=255, message=_l("At most 255 characters."))])
    permissions = SelectMultipleField(choices=[(p, p) for p in PERMISSIONS], validate_choice=True)
    requires_2fa = BooleanField()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.problems: list[str] = []

    def validate_name(self, field: StringField) -> None:
        name = (field.data or "").strip().lower()
        if not ROLE_NAME.match(name):
            raise ValidationError(
                _("Use 2-64 latin letters, digits and _, starting with a letter (for example: class_teacher).")
            )
        if services().db.session.scalar(select(Role.id).where(Role.name == name)) is not None:
            raise ValidationError(_("A role named %(name)s already exists.", name=name))


class RolePermissionsForm(FlaskForm):
    permissions = SelectMultipleField(choices=[(p, p) for p in PERMISSIONS], validate_choice=True)
    requires_2fa = BooleanField()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.problems: list[str] = []


class DeleteRoleForm(FlaskForm):
    confirm = StringField()
    reason = TextAreaField(
        validators=[
            DataRequired(message=_l("Give a reason; it is kept in the audit journal.")),
            Length(max=MAX_REASON, message=_l("At most 1000 characters.")),
        ]
    )

    def __init__(self, *args: Any, expected: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.problems: list[str] = []

    def validate_confirm(self, field: StringField) -> None:
        if (field.data or "").strip() != self.expected:
            raise ValidationError(_("Type %(expected)s exactly to confirm.", expected=self.expected))


class PublishObligationForm(FlaskForm):
    """The next version of a role's obligation, in the three languages."""

    text_ky = TextAreaField(validators=[
        DataRequired(message=_l("Enter the text in Kyrgyz.")),
        Length(max=obligations.MAX_TEXT, message=_l("At most %(max)d characters.", max=obligations.MAX_TEXT)),
    ])
    text_ru = TextAreaField(validators=[
        DataRequired(message=_l("Enter the text in Russian.")),
        Length(max=obligations.MAX_TEXT, message=_l("At most %(max)d characters.", max=obligations.MAX_TEXT)),
    ])
    text_en = TextAreaField(validators=[
        DataRequired(message=_l("Enter the text in English.")),
        Length(max=obligations.MAX_TEXT, message=_l("At most %(max)d characters.", max=obligations.MAX_TEXT)),
    ])
    reason = TextAreaField(
        validators=[
            DataRequired(message=_l("Give a reason; it is kept in the audit journal.")),
            Length(max=MAX_REASON, message=_l("At most 1000 characters.")),
        ]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.problems: list[str] = []


def _role_or_404(name: str) -> Role:
    role = services().db.session.scalar(select(Role).where(Role.name == name))
    if role is None:
        abort(404)
    return role


def _member_counts() -> dict[int, int]:
    db = services().db.session
    return dict(db.execute(select(user_roles.c.role_id, func.count()).group_by(user_roles.c.role_id)).all())


def _record(action: str, role_name: str, *, reason: str | None = None, **details: object) -> None:
    record_console_event(action, subject=f"role:{role_name}", reason=reason, details=dict(details))


def _beyond_actor(permissions: set[str]) -> list[str]:
    """Permissions the acting account does not hold itself. Granting them would let a
    role editor raise their own (or an accomplice's) access: the same no-escalation
    rule AccountAdmin applies when roles are assigned."""
    return sorted(permissions - current_actor().permissions)


def apps_referring_to(role_name: str) -> list[Client]:
    """Apps that limit access to the role or map it to an app role."""
    clients = services().db.session.scalars(select(Client).order_by(Client.name))
    return [c for c in clients if role_name in (c.allowed_roles or []) or role_name in (c.role_map or {})]


@bp.get("/roles")
@requires("admin:users:read")
def roles() -> str:
    all_roles = list(services().db.session.scalars(select(Role).order_by(Role.builtin.desc(), Role.name)))
    return render_template(
        "admin/roles/list.html", roles=all_roles, counts=_member_counts(), descriptions=PERMISSIONS,
        obligation_versions=obligations.latest_versions(services().db.session),
    )


@bp.route("/roles/new", methods=["GET", "POST"])
@requires("admin:roles:write")
def role_new() -> Any:
    form = RoleForm()
    if form.validate_on_submit():
        wanted = set(form.permissions.data)
        beyond = _beyond_actor(wanted)
        if beyond:
            form.permissions.errors.append(
                _("You can only grant permissions you hold yourself: %(list)s", list=", ".join(beyond))
            )
        else:
            db = services().db.session
            try:
                role = create_role(db, name=form.name.data, description=form.description.data or "", permissions=wanted)
            except RoleError as exc:
                db.rollback()
                form.problems.append(_("The role was not created: %(reason)s", reason=str(exc)))
            else:
                role.requires_2fa = bool(form.requires_2fa.data)
                _record("role:create", role.name, description=role.description, permissions=sorted(role.permissions),
                        requires_2fa=role.requires_2fa)
                db.commit()
                flash(_("The role %(name)s is created.", name=role.name))
                return redirect(url_for("admin.roles"), code=303)
    return render_template("admin/roles/form.html", form=form, descriptions=PERMISSIONS)


@bp.route("/roles/<name>/edit", methods=["GET", "POST"])
@requires("admin:roles:write")
def role_edit(name: str) -> Any:
    role = _role_or_404(name)
    form = RolePermissionsForm(data={"permissions": sorted(role.permissions), "requires_2fa": role.requires_2fa})
    if form.validate_on_submit():
        wanted = set(form.permissions.data)
        beyond = _beyond_actor(wanted - role.permissions)
        if beyond:
            form.permissions.errors.append(
                _("You can only grant permissions you hold yourself: %(list)s", list=", ".join(beyond))
            )
        else:
            db = services().db.session
            try:
                added, removed = set_permissions(role, wanted)
            except RoleError as exc:
                db.rollback()
                form.problems.append(_("The permissions were not changed: %(reason)s", reason=str(exc)))
            else:
                if added or removed:
                    _record("role:permissions", role.name, added=added, removed=removed)
                # The school's employee roles always require it (DESIGN "Credentials"); the
                # box is shown ticked and disabled for them, so browsers do not send it.
                wanted_2fa = role.name in SEEDED_ROLES_REQUIRING_2FA or bool(form.requires_2fa.data)
                changed_2fa = wanted_2fa != bool(role.requires_2fa)
                if changed_2fa:
                    role.requires_2fa = wanted_2fa
                    _record("role:2fa:change", role.name, requires_2fa=wanted_2fa)
                if added or removed or changed_2fa:
                    db.commit()
                    flash(_("The permissions of %(name)s are saved.", name=role.name))
                else:
                    flash(_("Nothing was changed."))
                return redirect(url_for("admin.roles"), code=303)
    return render_template(
        "admin/roles/edit.html", form=form, role=role, descriptions=PERMISSIONS, members=_member_counts().get(role.id, 0),
        always_2fa=role.name in SEEDED_ROLES_REQUIRING_2FA,
    )


@bp.route("/roles/<name>/delete", methods=["GET", "POST"])
@requires("admin:roles:write")
def role_delete(name: str) -> Any:
    role = _role_or_404(name)
    members = _member_counts().get(role.id, 0)
    referring = apps_referring_to(role.name)
    form = DeleteRoleForm(expected=role.name)
    if form.validate_on_submit():
        db = services().db.session
        if role.builtin:
            form.problems.append(_("%(name)s is a seeded role: its permissions can change, but it cannot be deleted.", name=role.name))
        elif members:
            form.problems.append(_("%(count)d accounts still hold this role; take it from them first.", count=members))
        elif referring:
            # Otherwise a role created later under the same name would silently inherit
            # those apps' access rules.
            form.problems.append(
                _("These portal apps still refer to the role: %(apps)s. Remove it from them first.",
                  apps=", ".join(c.name for c in referring))
            )
        else:
            permissions = sorted(role.permissions)
            try:
                delete_role(db, role)
            except RoleError as exc:
                db.rollback()
                form.problems.append(_("The role was not deleted: %(reason)s", reason=str(exc)))
            else:
                _record("role:delete", name, reason=form.reason.data.strip(), permissions=permissions)
                db.commit()
                flash(_("The role %(name)s is deleted.", name=name))
                return redirect(url_for("admin.roles"), code=303)
    return render_template("admin/roles/delete.html", form=form, role=role, members=members, referring=referring)


# --- the confidentiality obligation of a role (policy 2.5) -------------------------------
def _obligation_page(role: Role, form: PublishObligationForm, status: int = 200) -> Any:
    db = services().db.session
    versions = obligations.versions_for_role(db, role)
    current = versions[0] if versions else None
    accepted, members = obligations.acceptance_count(db, current) if current else (0, _member_counts().get(role.id, 0))
    # Show who published a version by login rather than by internal id.
    ids = {int(v.created_by[5:]) for v in versions if v.created_by.startswith("user:") and v.created_by[5:].isdigit()}
    authors = {f"user:{uid}": login for uid, login in db.execute(select(User.id, User.login).where(User.id.in_(ids)))}
    page = render_template(
        "admin/roles/obligation.html", role=role, form=form, current=current, versions=versions,
        accepted=accepted, members=members, local_time=local_time, authors=authors,
    )
    return page, status


@bp.get("/roles/<name>/obligation")
@requires("admin:users:read")
def role_obligation(name: str) -> Any:
    role = _role_or_404(name)
    current = obligations.latest_for_role(services().db.session, role)
    form = PublishObligationForm(
        data={"text_ky": current.text_ky, "text_ru": current.text_ru, "text_en": current.text_en} if current else {}
    )
    return _obligation_page(role, form)


@bp.post("/roles/<name>/obligation")
@requires("admin:roles:write")
def role_obligation_publish(name: str) -> Any:
    """Publish the next version: every member accepts it at their next sign-in."""
    role = _role_or_404(name)
    form = PublishObligationForm()
    if not form.validate_on_submit():
        return _obligation_page(role, form, 400)
    svc = services()
    db = svc.db.session
    texts = {"ky": form.text_ky.data, "ru": form.text_ru.data, "en": form.text_en.data}
    try:
        published = obligations.publish(db, svc.journal, role, texts, current_actor(), reason=form.reason.data)
    except obligations.ObligationError as exc:
        db.rollback()
        if exc.code == obligations.UNCHANGED:
            form.problems.append(_("The text is the same as the current version: there is nothing to publish."))
        else:
            field = {"ky": form.text_ky, "ru": form.text_ru, "en": form.text_en}.get(exc.language or "", form.text_en)
            field.errors = [*field.errors, _("Enter the text.") if exc.code == obligations.EMPTY
                            else _("At most %(max)d characters.", max=obligations.MAX_TEXT)]
        return _obligation_page(role, form, 400)
    db.commit()
    flash(_("Version %(version)d of the obligation for %(name)s is published. Members accept it at their next "
            "sign-in.", version=published.version, name=role.name))
    return redirect(url_for("admin.role_obligation", name=role.name), code=303)


add_nav("admin.roles", "admin:users:read", _l("Roles"))
