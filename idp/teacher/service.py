"""What a teacher may do for the students of their classes. No Flask here.

A teacher is linked to the classes they teach through the ordinary class membership:
an account with the ``teacher`` role that is a member of class 7A teaches 7A.

Every teacher route decides with the one check ``teacher_may_act_on``: the acting
account has the ``teacher`` role and can sign in, the other account has the
``student`` role, and both are members of one class."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.accounts import guardian_codes
from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import GuardianLinkCode, SchoolClass, User
from idp.audit.journal import Journal

TEACHER = "teacher"
STUDENT = "student"
# The one permission the teacher's scoped actor carries, for AccountAdmin.issue_activation_code.
_CODE_PERMISSION = "support:credentials:reset"


def is_teacher(user: User) -> bool:
    return TEACHER in user.role_names and user.can_sign_in


def teacher_classes(teacher: User) -> list[SchoolClass]:
    """The classes the teacher teaches, by name."""
    if not is_teacher(teacher):
        return []
    return sorted(teacher.classes, key=lambda c: c.name)


def teacher_class(teacher: User, class_id: int) -> SchoolClass | None:
    """The class ``class_id`` when the teacher teaches it, else None."""
    for school_class in teacher_classes(teacher):
        if school_class.id == class_id:
            return school_class
    return None


def teacher_may_act_on(teacher: User, student: User) -> bool:
    """The single rule of the teacher area: ``student`` is a student of one of
    ``teacher``'s classes, and holds no console permission (a pupil who also helps tech
    support outranks the teacher: AccountAdmin's rule against taking over such accounts)."""
    if teacher.id == student.id or not is_teacher(teacher) or STUDENT not in student.role_names:
        return False
    if student.permissions:
        return False
    taught = {c.id for c in teacher.classes}
    return any(c.id in taught for c in student.classes)


def students_of(db: Session, teacher: User, school_class: SchoolClass) -> list[User]:
    """The students of a class the teacher teaches (empty for any other class), by name."""
    if teacher_class(teacher, school_class.id) is None:
        return []
    members = db.scalars(select(User).where(User.classes.any(SchoolClass.id == school_class.id)))
    return sorted(
        (u for u in members if teacher_may_act_on(teacher, u)),
        key=lambda u: (u.display_name.casefold(), u.login),
    )


class NotYourStudent(Exception):
    """The teacher may not act on this account."""


def issue_activation_code_as_teacher(
    admin: AccountAdmin, teacher: User, student: User, *, ip: str | None, request_id: str | None,
    purpose: str = "single",
) -> tuple[str, datetime]:
    """A new one-time activation code for a student of the teacher's class: earlier
    codes stop working, the student's sessions end (tokens revoked), and the journal
    gets ``teacher:activation-code:issue`` with the teacher as actor (besides
    AccountAdmin's own ``account:activation-code:issue``). The caller commits."""
    if not teacher_may_act_on(teacher, student):
        raise NotYourStudent()
    actor = Actor(ref=f"user:{teacher.id}", permissions={_CODE_PERMISSION}, ip=ip, request_id=request_id)
    reason = "activation code issued by the class teacher"
    code, expires = admin.issue_activation_code(actor, student, reason)
    ended = admin.sessions.end_all(admin.db, student.id, reason="teacher-activation-code", actor=actor.ref)
    admin.journal.record(
        admin.db,
        actor=actor.ref,
        action="teacher:activation-code:issue",
        subject=f"user:{student.id}",
        reason=reason,
        ip=ip,
        request_id=request_id,
        details={"sessions_ended": ended, "expires_at": expires.isoformat(), "purpose": purpose,
                 "classes": sorted({c.name for c in student.classes} & {c.name for c in teacher.classes})},
    )
    return code, expires


def issue_guardian_code_as_teacher(
    db: Session, journal: Journal, teacher: User, student: User, *, ip: str | None, request_id: str | None,
    purpose: str,
) -> tuple[str, GuardianLinkCode]:
    """A new guardian link code for a student of the teacher's class (the student's other
    codes stay valid: a child may have two parents). Journalled as
    ``account:guardian-code:issue`` and ``teacher:guardian-code:issue`` with the teacher
    as actor. The caller commits."""
    if not teacher_may_act_on(teacher, student):
        raise NotYourStudent()
    ctx = guardian_codes.Context(actor=f"user:{teacher.id}", ip=ip, request_id=request_id)
    code, row = guardian_codes.issue_code(db, journal, student, ctx, purpose=purpose)
    journal.record(
        db, actor=ctx.actor, action="teacher:guardian-code:issue", subject=f"user:{student.id}",
        reason="guardian link code issued by the class teacher", ip=ip, request_id=request_id,
        details={"code_id": row.id, "expires_at": row.expires_at.isoformat(), "purpose": purpose,
                 "classes": sorted({c.name for c in student.classes} & {c.name for c in teacher.classes})},
    )
    return code, row
