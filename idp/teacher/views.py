"""``/teacher``: the teacher area (issue 7). Signed in, role ``teacher``, a session
signed in with two factors (``mfa`` in amr; the teacher role requires 2FA).

- ``GET /teacher``: the teacher's classes.
- ``GET /teacher/classes/<id>``: the students of one class, whether each has activated
  the account (has a password) and has a second factor.
- ``POST /teacher/students/<id>/activation-code``: a new one-time activation code for one
  student, shown once (``Cache-Control: no-store``); the student's sessions end.
- ``POST /teacher/classes/<id>/cards``: printable sign-in cards for the whole class, each
  with a fresh code and a QR code to ``{issuer}/activate?login=<login>``; shown once.

Every route that names a class or a student answers 404 unless the teacher teaches it
(``teacher_may_act_on``); a signed-in account that is not a teacher gets 403."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, abort, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import current_user
from flask_wtf import FlaskForm

from idp.accounts.admin import AccountAdmin
from idp.accounts.models import SchoolClass, User
from idp.mfa.qr import qr_svg
from idp.services import services
from idp.teacher.service import (
    is_teacher,
    issue_activation_code_as_teacher,
    students_of,
    teacher_class,
    teacher_classes,
    teacher_may_act_on,
)

bp = Blueprint("teacher", __name__, url_prefix="/teacher")


class ActionForm(FlaskForm):
    """A button: the CSRF token only."""


def _no_store(body: str) -> tuple[str, int, dict[str, str]]:
    return body, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _teacher() -> User | Any:
    """The signed-in teacher, or a redirect to sign in; aborts 403 for anyone else."""
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=request.path), code=302)
    user = services().db.session.get(User, current_user.id)
    if user is None or not is_teacher(user) or "mfa" not in (session.get("amr") or []):
        abort(403)
    return user


def _admin() -> AccountAdmin:
    svc = services()
    return AccountAdmin(db=svc.db.session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def _class_or_404(teacher: User, class_id: int) -> SchoolClass:
    school_class = teacher_class(teacher, class_id)
    if school_class is None:
        abort(404)
    return school_class


def _activation_url(login: str) -> str:
    return f"{services().settings.issuer}/activate?" + urlencode({"login": login})


@bp.get("")
def home() -> Any:
    teacher = _teacher()
    if not isinstance(teacher, User):
        return teacher
    db = services().db.session
    classes = [(c, len(students_of(db, teacher, c))) for c in teacher_classes(teacher)]
    return render_template("teacher.html", classes=classes)


@bp.get("/classes/<int:class_id>")
def class_page(class_id: int) -> Any:
    teacher = _teacher()
    if not isinstance(teacher, User):
        return teacher
    school_class = _class_or_404(teacher, class_id)
    students = students_of(services().db.session, teacher, school_class)
    return render_template("teacher_class.html", school_class=school_class, students=students, form=ActionForm())


@bp.post("/students/<int:user_id>/activation-code")
def issue_code(user_id: int) -> Any:
    teacher = _teacher()
    if not isinstance(teacher, User):
        return teacher
    svc = services()
    db = svc.db.session
    student = db.get(User, user_id)
    if student is None or not teacher_may_act_on(teacher, student):
        abort(404)
    if not ActionForm().validate_on_submit():
        abort(400)
    code, expires = issue_activation_code_as_teacher(
        _admin(), teacher, student, ip=request.remote_addr, request_id=getattr(g, "request_id", None)
    )
    db.commit()
    return _no_store(render_template(
        "teacher_code.html", student=student, code=code, expires=expires,
        qr=qr_svg(_activation_url(student.login), title=_("Activation page for %(login)s", login=student.login)),
        url=_activation_url(student.login),
    ))


@bp.post("/classes/<int:class_id>/cards")
def cards(class_id: int) -> Any:
    teacher = _teacher()
    if not isinstance(teacher, User):
        return teacher
    school_class = _class_or_404(teacher, class_id)
    if not ActionForm().validate_on_submit():
        abort(400)
    svc = services()
    db = svc.db.session
    admin = _admin()
    printed = []
    for student in students_of(db, teacher, school_class):
        code, expires = issue_activation_code_as_teacher(
            admin, teacher, student, ip=request.remote_addr, request_id=getattr(g, "request_id", None),
            purpose=f"cards:{school_class.name}",
        )
        url = _activation_url(student.login)
        printed.append({
            "name": student.display_name, "login": student.login, "code": code, "expires": expires, "url": url,
            "qr": qr_svg(url, title=_("Activation page for %(login)s", login=student.login)),
        })
    db.commit()
    return _no_store(render_template("teacher_cards.html", school_class=school_class, cards=printed))
