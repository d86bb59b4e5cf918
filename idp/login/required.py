"""Required actions at sign-in: "set a new password before you continue".

When ``login()`` has verified the password of an account marked
``must_change_password``, the sign-in is not completed: a short-lived pending state
in the (anonymous) session remembers who proved their password and where the sign-in
was going, and the person must choose a new password here first (STYLE 7, two-step
sign-in). Only then is the session created and the sign-in continued.

The new-password rules below are shared with ``/activate``; the fuller password
policy (breached and context words) replaces ``new_password_problems`` later."""

from __future__ import annotations

import time
import unicodedata
from datetime import UTC, datetime
from typing import Any

from flask import g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy.orm import Session
from wtforms import PasswordField
from wtforms.validators import InputRequired, Length

from idp.accounts.models import User
from idp.accounts.passwords import PasswordHashing
from idp.audit.journal import Journal
from idp.audit.web import audit_event
from idp.login.flow import complete_sign_in
from idp.login.views import _after_sign_in, bp, safe_next
from idp.services import services

# DESIGN "Credentials": 15 characters when the account signs in with a password
# alone, at most 128; counted in code points after NFC (NIST 800-63B-4 §3.1.1.2).
MIN_PASSWORD_LENGTH = 15
MAX_PASSWORD_LENGTH = 128
PENDING_KEY = "pending_password_change"
PENDING_SECONDS = 600


def new_password_problems(
    password: str,
    confirm: str,
    *,
    login: str,
    current_hash: str | None = None,
    passwords: PasswordHashing | None = None,
) -> list[str]:
    """The rules a new password breaks, as codes: ``too_short``, ``too_long``,
    ``is_login``, ``mismatch``, ``unchanged``. Empty when the password is acceptable."""
    problems: list[str] = []
    normalised = unicodedata.normalize("NFC", password)
    if len(normalised) < MIN_PASSWORD_LENGTH:
        problems.append("too_short")
    elif len(normalised) > MAX_PASSWORD_LENGTH:
        problems.append("too_long")
    # Logins are stored case-folded, so the comparison is too.
    if login and normalised.strip().casefold() == login.strip().casefold():
        problems.append("is_login")
    if normalised != unicodedata.normalize("NFC", confirm):
        problems.append("mismatch")
    if not problems and current_hash and passwords is not None and passwords.verify(current_hash, password):
        problems.append("unchanged")
    return problems


class NewPasswordForm(FlaskForm):
    """The new password, typed twice; ``check`` turns rule codes into field errors."""

    min_length = MIN_PASSWORD_LENGTH
    max_length = MAX_PASSWORD_LENGTH

    # The browser limit is a little above the rule so that a too-long password gets the
    # rule's message, not a silently cut value.
    password = PasswordField(
        validators=[InputRequired(message=_l("Enter a new password.")), Length(max=4 * MAX_PASSWORD_LENGTH)]
    )
    confirm = PasswordField(
        validators=[InputRequired(message=_l("Type the new password again.")), Length(max=4 * MAX_PASSWORD_LENGTH)]
    )

    def check(self, *, login: str, current_hash: str | None = None, passwords: PasswordHashing | None = None) -> bool:
        problems = new_password_problems(
            self.password.data or "", self.confirm.data or "", login=login, current_hash=current_hash,
            passwords=passwords,
        )
        messages = {
            "too_short": (self.password, _("The password must be at least %(min)d characters long.",
                                           min=MIN_PASSWORD_LENGTH)),
            "too_long": (self.password, _("The password must be at most %(max)d characters long.",
                                          max=MAX_PASSWORD_LENGTH)),
            "is_login": (self.password, _("The password must not be the same as your login.")),
            "mismatch": (self.confirm, _("The two passwords are not the same.")),
            "unchanged": (self.password, _("Choose a password different from your current one.")),
        }
        for code in problems:
            field, message = messages[code]
            field.errors = [*field.errors, message]
        return not problems


def save_new_password(
    db: Session, passwords: PasswordHashing, journal: Journal, user: User, new_password: str, *,
    ip: str | None, request_id: str | None,
) -> None:
    """Store the new password (argon2id), clear the required action and journal it, in
    the caller's transaction."""
    user.password_hash = passwords.hash(new_password)
    user.password_changed_at = datetime.now(UTC).replace(tzinfo=None)
    user.must_change_password = False
    journal.record(
        db,
        actor=f"user:{user.id}",
        action="account:password:change",
        subject=f"user:{user.id}",
        ip=ip,
        request_id=request_id,
        details={"required": True},
    )


def begin_required_password_change(user: User, flow: str | None, next_url: str | None) -> Any:
    """Called by ``login()`` after the password was verified: remember who and where to,
    then ask for the new password. The session is not signed in yet."""
    # A new session id, so that a session planted before the password was typed cannot
    # be used to choose the victim's new password (session fixation, ASVS 7.2.4).
    session.regenerate()  # type: ignore[attr-defined]
    session[PENDING_KEY] = {
        "uid": user.id,
        "flow": flow or None,
        "next": safe_next(next_url),
        "expires": time.time() + PENDING_SECONDS,
    }
    return redirect(url_for("login.password_change_required"), code=303)


def _pending_user() -> tuple[dict[str, Any], User] | None:
    pending = session.get(PENDING_KEY)
    if not isinstance(pending, dict) or pending.get("expires", 0) < time.time():
        session.pop(PENDING_KEY, None)
        return None
    user = services().db.session.get(User, pending.get("uid"))
    if user is None or not user.can_sign_in:
        session.pop(PENDING_KEY, None)
        return None
    return pending, user


@bp.route("/password/change-required", methods=["GET", "POST"])
def password_change_required() -> Any:
    found = _pending_user()
    if found is None:
        # Expired or never started: the person signs in again (no detail is given).
        return redirect(url_for("login.login"), code=303)
    pending, user = found
    form = NewPasswordForm()
    if request.method == "GET":
        return render_template("password_change_required.html", form=form)
    svc = services()
    if not form.validate_on_submit() or not form.check(
        login=user.login, current_hash=user.password_hash, passwords=svc.passwords
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
    complete_sign_in(user, ["pwd"])
    audit_event("account:login:success", actor=f"user:{user.id}", subject=f"user:{user.id}",
                details={"amr": ["pwd"], "password_changed": True})
    return _after_sign_in(pending.get("flow"), pending.get("next"))
