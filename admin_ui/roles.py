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
from wtforms import SelectMultipleField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.guard import current_actor, record_console_event, requires
from admin_ui.nav import add_nav
from idp.access.permissions import PERMISSIONS
from idp.access.roles import ROLE_NAME, RoleError, create_role, delete_role, set_permissions
from idp.accounts.models import Role, user_roles
from idp.oidc.models import Client
from idp.services import services

MAX_REASON = 1000


class RoleForm(FlaskForm):
    name = StringField(
        validators=[DataRequired(message=_l("Enter the role's name.")), Length(max=64, message=_l("At most 64 characters."))]
    )
    description = StringField(validators=[Length(max=255, message=_l("At most 255 characters."))])
    permissions = SelectMultipleField(choices=[(p, p) for p in PERMISSIONS], validate_choice=True)

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
        "admin/roles/list.html", roles=all_roles, counts=_member_counts(), descriptions=PERMISSIONS
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
                _record("role:create", role.name, description=role.description, permissions=sorted(role.permissions))
                db.commit()
                flash(_("The role %(name)s is created.", name=role.name))
                return redirect(url_for("admin.roles"), code=303)
    return render_template("admin/roles/form.html", form=form, descriptions=PERMISSIONS)


@bp.route("/roles/<name>/edit", methods=["GET", "POST"])
@requires("admin:roles:write")
def role_edit(name: str) -> Any:
    role = _role_or_404(name)
    form = RolePermissionsForm(data={"permissions": sorted(role.permissions)})
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
                    db.commit()
                    flash(_("The permissions of %(name)s are saved.", name=role.name))
                else:
                    flash(_("Nothing was changed."))
                return redirect(url_for("admin.roles"), code=303)
    return render_template(
        "admin/roles/edit.html", form=form, role=role, descriptions=PERMISSIONS, members=_member_counts().get(role.id, 0)
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


add_nav("admin.roles", "admin:users:read", _l("Roles"))
