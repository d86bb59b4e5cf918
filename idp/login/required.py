"""Required actions at sign-in: "set a new password before you continue".

When ``login()`` has verified the password of an account marked
``must_change_password``, the sign-in is not completed: a short-lived pending state
in the (anonymous) session remembers who proved their password and where the sign-in
was going, and the person must choose a new password here first (STYLE 7, two-step
sign-in). Only then is the session created and the sign-in continued.

The new-password form below is shared with ``/activate`` and ``/account/password``;
the rules themselves are the password policy (idp/accounts/password_policy.py)."""

from __future__ import annotations

import unicodedata
from collections.abc import Container, Iterable
from datetime import UTC, datetime
from typing import Any

from flask import g, render_template, request
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy.orm import Session
from wtforms import PasswordField
from wtforms.validators import InputRequired, Length

from idp.accounts import password_policy
from idp.accounts.admin import DIRECTORY_SOURCE, PasswordManagedByDirectory
from idp.accounts.models import User
from idp.accounts.password_policy import PasswordProblem
from idp.accounts.passwords import PasswordHashing
from idp.audit.journal import Journal
from idp.login import pending
from idp.login.views import bp
from idp.notify.notices import notify
from idp.services import services

# Kept for callers that show the limits; the policy module owns them.
MAX_PASSWORD_LENGTH = password_policy.MAX_LENGTH

MISMATCH = "mismatch"
UNCHANGED = "unchanged"


def new_password_problems(
    password: str,
    confirm: str,
    *,
    login: str,
    names: Iterable[str] = (),
    context_words: Iterable[str] = (),
    blocklist: Container[str] = frozenset(),
    min_length: int = password_policy.MIN_LENGTH_PASSWORD_ONLY,
    current_hash: str | None = None,
    passwords: PasswordHashing | None = None,
) -> list[PasswordProblem]:
    """The policy's problems with ``password``, plus the form's own rules: the two
    entries differ (``mismatch``) or the password is the current one (``unchanged``)."""
    problems = password_policy.check_password(
        password, min_length=min_length, login=login, names=names, context_words=context_words,
        blocklist=blocklist,
    )
    if unicodedata.normalize("NFC", password) != unicodedata.normalize("NFC", confirm):
        problems.append(PasswordProblem(MISMATCH))
    # Only when everything else passed: verifying costs an argon2id computation.
    if not problems and current_hash and passwords is not None and passwords.verify(current_hash, password):
        problems.append(PasswordProblem(UNCHANGED))
    return problems


def problem_message(problem: PasswordProblem) -> str:
    """The translated reason for one problem (ASVS 6.2.12: say why it was refused)."""
    code = problem.code
    if code == password_policy.TOO_SHORT:
        return _("The password must be at least %(min)d characters long.", min=problem.limit or 0)
    if code == password_policy.TOO_LONG:
        return _("The password must be at most %(max)d characters long.", max=problem.limit or 0)
    if code == password_policy.CONTAINS_LOGIN:
        return _("The password must not contain your login.")
    if code == password_policy.CONTAINS_NAME:
        return _("The password must not contain your name.")
    if code == password_policy.CONTEXT_WORD:
        return _("The password must not contain the word “%(word)s”: it is among the first guesses "
                 "of anyone who knows this school.", word=problem.word or "")
    if code == password_policy.COMMON_PASSWORD:
        return _("This password is on a list of common or leaked passwords that attackers try first. "
                 "Choose another one.")
    if code == MISMATCH:
        return _("The two passwords are not the same.")
    if code == UNCHANGED:
        return _("Choose a password different from your current one.")
    raise ValueError(f"unknown password problem {code!r}")


class NewPasswordForm(FlaskForm):
    """The new password, typed twice; ``check`` turns the policy's problems into field errors."""

    # The longer minimum unless the view knows the account always gives a second
    # factor (``for_account``), DESIGN "Credentials".
    min_length = password_policy.minimum_length(has_second_factor=False)
    max_length = MAX_PASSWORD_LENGTH

    # The browser limit is a little above the rule so that a too-long password gets the
    # rule's message, not a silently cut value.
    password = PasswordField(
        validators=[InputRequired(message=_l("Enter a new password.")), Length(max=4 * MAX_PASSWORD_LENGTH)]
    )
    confirm = PasswordField(
        validators=[InputRequired(message=_l("Type the new password again.")), Length(max=4 * MAX_PASSWORD_LENGTH)]
    )

    def check(
        self, *, login: str, names: Iterable[str] = (), current_hash: str | None = None,
        passwords: PasswordHashing | None = None, min_length: int | None = None,
    ) -> bool:
        """Add the policy's problems as field errors; ``min_length`` overrides the
        form's own minimum (the account's, once it is known)."""
        svc = services()
        problems = new_password_problems(
            self.password.data or "", self.confirm.data or "", login=login, names=names,
            context_words=password_policy.context_words_from(
                svc.settings.password_context_words, svc.settings.school_name
            ),
            blocklist=svc.blocklist, min_length=self.min_length if min_length is None else min_length,
            current_hash=current_hash, passwords=passwords,
        )
        self.add_problems(problems)
        return not problems

    def for_account(self, user: User) -> NewPasswordForm:
        """Use ``user``'s minimum: 8 when every sign-in asks for a second factor (one is
        enrolled, or a role requires one, so it is enrolled right after), else 15."""
        self.min_length = password_policy.minimum_length(
            has_second_factor=user.has_second_factor or user.requires_2fa
        )
        return self

    def add_problems(self, problems: list[PasswordProblem]) -> None:
        for problem in problems:
            field = self.confirm if problem.code == MISMATCH else self.password
            field.errors = [*field.errors, problem_message(problem)]


def save_new_password(
    db: Session, passwords: PasswordHashing, journal: Journal, user: User, new_password: str, *,
    ip: str | None, request_id: str | None, required: bool = True, ended_other_sessions: bool | None = None,
    action: str = "account:password:change", details: dict[str, Any] | None = None,
) -> None:
    """Store the new password (argon2id), clear the required action, journal it and queue
    the "password changed" mail, in the caller's transaction. ``required`` says whether
    support asked for the change; ``action`` is the journal tag (a reset has its own).
    Refuses a directory account (its password is the directory's, never stored here)."""
    if user.source == DIRECTORY_SOURCE:
        raise PasswordManagedByDirectory()
    user.password_hash = passwords.hash(new_password)
    user.password_changed_at = datetime.now(UTC).replace(tzinfo=None)
    user.must_change_password = False
    journal.record(
        db,
        actor=f"user:{user.id}",
        action=action,
        subject=f"user:{user.id}",
        ip=ip,
        request_id=request_id,
        details={"required": required}
        | ({} if ended_other_sessions is None else {"ended_other_sessions": ended_other_sessions})
        | (details or {}),
    )
    # Issue 4: every way a password is set tells the account's address (one place, so no
    # path forgets it); /activate, which sets it through the card, calls ``notify`` too.
    notify(db, services().outbox, user, "password_changed")


@bp.route("/password/change-required", methods=["GET", "POST"])
def password_change_required() -> Any:
    found = pending.current(pending.CHANGE_PASSWORD)
    if found is None:
        # Expired, never started or another step is due (no detail is given).
        return pending.resume()
    _state, user = found
    form = NewPasswordForm().for_account(user)
    if request.method == "GET":
        return render_template("password_change_required.html", form=form)
    svc = services()
    if not form.validate_on_submit() or not form.check(
        login=user.login, names=[user.display_name], current_hash=user.password_hash, passwords=svc.passwords
    ):
        return render_template("password_change_required.html", form=form), 400
    db = svc.db.session
    save_new_password(
        db, svc.passwords, svc.journal, user, form.password.data,
        ip=request.remote_addr, request_id=getattr(g, "request_id", None),
    )
    # Whatever was signed in with the old password ends now: browser sessions and the
    # tokens portal apps hold (the password was required to change for a reason).
    svc.sessions.end_all(db, user.id)
    db.commit()
    return pending.advance(user, step=pending.CHANGE_PASSWORD, details={"password_changed": True})
