"""``/teacher``: the teacher area (issue 7). Signed in, role ``teacher``, a session
signed in with two factors (``mfa`` in amr; the teacher role requires 2FA).

- ``GET /teacher``: the teacher's classes.
- ``GET /teacher/classes/<id>``: the students of one class, whether each has activated
  the account (has a password) and has a second factor.
- ``POST /teacher/students/<id>/activation-code``: a new one-time activation code for one
  student, shown once (``Cache-Control: no-store``); the student's sessions end.
- ``POST /teacher/classes/<id>/cards``: printable sign-in cards for the whole class, each
  with a fresh code and a QR code to ``{issuer}/activate?login=<login>``; shown once.
- ``POST /teacher/classes/<id>/cards.pdf``: the same cards as a PDF download (one print,
  one set of codes: the same issuing and journal as the printable page). A missing font
  file (settings ``card_font_file``) is a clear error page, and then no code is issued.
- ``POST /teacher/classes/<id>/guardian-codes``: printable guardian link slips for the
  class, a fresh code per student (the earlier ones stay valid: two parents), each with
  a QR code to ``{issuer}/guardian``; shown once.

Every route that names a class or a student answers 404 unless the teacher teaches it
(``teacher_may_act_on``); a signed-in account that is not a teacher gets 403."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    abort,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_login import current_user
from flask_wtf import FlaskForm

from idp.accounts.admin import DIRECTORY_SOURCE, AccountAdmin
from idp.accounts.models import SchoolClass, User
from idp.mfa.qr import qr_svg
from idp.services import services
from idp.teacher import pdf
from idp.teacher.service import (
    is_teacher,
    issue_activation_code_as_teacher,
    issue_guardian_code_as_teacher,
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


def _class_action(class_id: int) -> tuple[User, SchoolClass] | Any:
    """For a POST on one of the teacher's classes: the teacher and the class, or the
    answer to give instead (sign-in redirect or refusal); 404 for another class, 400
    without a valid CSRF token."""
    teacher = _teacher()
    if not isinstance(teacher, User):
        return teacher
    school_class = _class_or_404(teacher, class_id)
    if not ActionForm().validate_on_submit():
        abort(400)
    return teacher, school_class


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
    if student.source == DIRECTORY_SOURCE:
        # Bind-through sign-in: the school directory holds this student's password.
        page = render_template("error.html", title=_("No activation code for this account"),
                               message=_("This account's password is managed by the school directory: "
                                         "change it there."))
        return page, 409
    code, expires = issue_activation_code_as_teacher(
        _admin(), teacher, student, ip=request.remote_addr, request_id=getattr(g, "request_id", None)
    )
    db.commit()
    return _no_store(render_template(
        "teacher_code.html", student=student, code=code, expires=expires,
        qr=qr_svg(_activation_url(student.login), title=_("Activation page for %(login)s", login=student.login)),
        url=_activation_url(student.login),
    ))


def _issue_cards(teacher: User, school_class: SchoolClass, purpose: str) -> list[dict[str, Any]]:
    """A fresh activation code for every student of the class (earlier codes stop
    working, sessions end, journalled), for one print (page or PDF). The caller commits."""
    db = services().db.session
    admin = _admin()
    printed = []
    for student in students_of(db, teacher, school_class):
        if student.source == DIRECTORY_SOURCE or not student.can_sign_in:
            # No card: the student signs in with the school directory's password, or
            # the account is disabled or locked (a code could not be used).
            continue
        code, expires = issue_activation_code_as_teacher(
            admin, teacher, student, ip=request.remote_addr, request_id=getattr(g, "request_id", None),
            purpose=purpose,
        )
        printed.append({"name": student.display_name, "login": student.login, "code": code, "expires": expires,
                        "url": _activation_url(student.login)})
    return printed


@bp.post("/classes/<int:class_id>/cards")
def cards(class_id: int) -> Any:
    found = _class_action(class_id)
    if not isinstance(found, tuple):
        return found
    teacher, school_class = found
    printed = _issue_cards(teacher, school_class, f"cards:{school_class.name}")
    for card in printed:
        card["qr"] = qr_svg(card["url"], title=_("Activation page for %(login)s", login=card["login"]))
    services().db.session.commit()
    return _no_store(render_template("teacher_cards.html", school_class=school_class, cards=printed))


def _font_missing() -> Any:
    page = render_template(
        "error.html", title=_("The PDF cannot be made"),
        message=_("The font for the PDF sign-in cards is not installed on the server, so no codes were issued. "
                  "Use the printable page instead, and ask technical support to install the font "
                  "(fonts-dejavu-core) or set IDP_CARD_FONT_FILE."),
    )
    return page, 503


@bp.post("/classes/<int:class_id>/cards.pdf")
def cards_pdf(class_id: int) -> Any:
    found = _class_action(class_id)
    if not isinstance(found, tuple):
        return found
    teacher, school_class = found
    svc = services()
    font_file = svc.settings.card_font_file
    try:
        # Before any code is issued: a print that cannot be made must not void the
        # students' earlier codes.
        pdf.check_font(font_file)
    except pdf.FontMissing:
        return _font_missing()
    db = svc.db.session
    printed = _issue_cards(teacher, school_class, f"cards-pdf:{school_class.name}")
    title = _("Sign-in cards, class %(name)s", name=school_class.name)
    labels = pdf.Labels(title=title, login=_("Login"), code=_("Activation code"), valid_until=_("Valid until"))
    cards_ = [
        pdf.Card(name=c["name"], login=c["login"], code=c["code"], expires=c["expires"], url=c["url"],
                 instructions=_("Scan the code or open %(url)s, enter the activation code and choose your own "
                                "password.", url=c["url"]))
        for c in printed
    ]
    try:
        body = pdf.render_cards(cards_, labels, font_file=font_file)
    except pdf.FontMissing:
        db.rollback()
        return _font_missing()
    # Only now that the file exists are the new codes kept.
    db.commit()
    filename = f"sign-in-cards-{school_class.name}.pdf".replace(" ", "_")
    return Response(body, mimetype="application/pdf", headers={
        "Cache-Control": "no-store", "Pragma": "no-cache",
        "Content-Disposition": f'attachment; filename="{filename}"',
    })


def _guardian_url() -> str:
    return f"{services().settings.issuer}/guardian"


@bp.post("/classes/<int:class_id>/guardian-codes")
def guardian_codes(class_id: int) -> Any:
    found = _class_action(class_id)
    if not isinstance(found, tuple):
        return found
    teacher, school_class = found
    svc = services()
    db = svc.db.session
    url = _guardian_url()
    qr = qr_svg(url, title=_("Parent registration page"))
    slips = []
    for student in students_of(db, teacher, school_class):
        if not student.active:
            continue
        code, row = issue_guardian_code_as_teacher(
            db, svc.journal, teacher, student, ip=request.remote_addr, request_id=getattr(g, "request_id", None),
            purpose=f"slips:{school_class.name}",
        )
        slips.append({"name": student.display_name, "login": student.login, "code": code,
                      "expires": row.expires_at.strftime("%Y-%m-%d"), "url": url, "qr": qr})
    db.commit()
    return _no_store(render_template("teacher_guardian_slips.html", school_class=school_class, slips=slips,
                                     school=svc.settings.school_name))
