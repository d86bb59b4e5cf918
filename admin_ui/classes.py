"""School classes: the list with member counts, creating a class, a class's members.

Classes are created through ``AccountAdmin`` so that the console, the CLI and the
roster import share one set of rules and one journal entry (``class:create``)."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, redirect, render_template, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.guard import current_actor, requires
from admin_ui.nav import add_nav
from idp.accounts.admin import AccountAdmin, PermissionDenied
from idp.accounts.models import SchoolClass, User, class_members
from idp.accounts.service import AccountError
from idp.services import services


class ClassForm(FlaskForm):
    name = StringField(
        validators=[
            DataRequired(message=_l("Enter the class name, for example 7A.")),
            Length(max=32, message=_l("At most 32 characters.")),
        ]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.problems: list[str] = []

    def validate_name(self, field: StringField) -> None:
        # The same rule as AccountAdmin.create_class, said in the console's language.
        name = (field.data or "").strip().upper()
        if not name or not all(ch.isalnum() or ch in "-_ " for ch in name):
            raise ValidationError(_("Use letters, digits, '-', '_' or spaces, for example 7A."))
        if services().db.session.scalar(select(SchoolClass.id).where(SchoolClass.name == name)) is not None:
            raise ValidationError(_("The class %(name)s already exists.", name=name))


def account_admin() -> AccountAdmin:
    svc = services()
    return AccountAdmin(db=svc.db.session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


@bp.get("/classes")
@requires("admin:users:read")
def classes() -> str:
    return render_template("admin/classes/list.html", classes=account_admin().list_classes(), form=ClassForm())


@bp.route("/classes/new", methods=["GET", "POST"])
@requires("admin:users:write")
def class_new() -> Any:
    form = ClassForm()
    if form.validate_on_submit():
        db = services().db.session
        try:
            school_class = account_admin().create_class(current_actor(), form.name.data)
        except (AccountError, PermissionDenied) as exc:
            db.rollback()
            form.problems.append(_("The class was not created: %(reason)s", reason=str(exc)))
        else:
            db.commit()
            flash(_("The class %(name)s is created.", name=school_class.name))
            return redirect(url_for("admin.class_page", class_id=school_class.id), code=303)
    return render_template("admin/classes/form.html", form=form)


@bp.get("/classes/<int:class_id>")
@requires("admin:users:read")
def class_page(class_id: int) -> str:
    db = services().db.session
    school_class = db.get(SchoolClass, class_id)
    if school_class is None:
        abort(404)
    members = list(
        db.scalars(
            select(User)
            .join(class_members, class_members.c.user_id == User.id)
            .where(class_members.c.class_id == class_id)
            .order_by(User.display_name, User.login)
        )
    )
    return render_template("admin/classes/show.html", school_class=school_class, members=members)


add_nav("admin.classes", "admin:users:read", _l("Classes"))
