"""The pending sign-in: after the first factor, one step after another, then the session.

DESIGN "login/": password -> throttle -> restrictions -> 2FA -> required actions. Once
a first factor was verified (a password, or a passwordless passkey) the browser holds a
short-lived *pending* state in its still anonymous session: who, what was done so far
(``amr``), where the sign-in goes (``flow``/``next``) and which step is due. No session
is created and no authorization code issued until every step is done (issue 4:
"a user with a pending required action gets no session and no code"). The steps, in
order:

1. ``login.second_factor``: the account has TOTP or a passkey and none was given yet;
2. ``login.password_change_required``: support (or a breach report) asked for a new
   password;
3. ``login.enrol_second_factor``: a role requires 2FA and the account has none;
4. ``login.accept_obligation``: a confidentiality obligation (policy 2.5) of one of
   the account's roles is new or changed.

Each step's view finds the state with ``current(step)`` and, when done, calls
``advance(user, step=...)``; ``advance`` refuses a step that is not the due one, so no
page can be used to skip another."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flask import redirect, render_template, session, url_for

from idp.access.decision import requires_second_factor
from idp.accounts.models import User
from idp.audit.web import audit_event
from idp.login.flow import SessionLimitReached, complete_sign_in, end_current_session
from idp.login.refusal import sign_in_refusal
from idp.services import services

KEY = "pending_sign_in"
# The whole chain must be done within this time after the first factor.
PENDING_SECONDS = 600

SECOND_FACTOR = "login.second_factor"
CHANGE_PASSWORD = "login.password_change_required"
ENROL_SECOND_FACTOR = "login.enrol_second_factor"
ACCEPT_OBLIGATION = "login.accept_obligation"
STEPS = (SECOND_FACTOR, CHANGE_PASSWORD, ENROL_SECOND_FACTOR, ACCEPT_OBLIGATION)
# Completing one of these gives the sign-in its second factor.
_FACTOR_STEPS = {SECOND_FACTOR, ENROL_SECOND_FACTOR}


def due_step(user: User, amr: Iterable[str]) -> str | None:
    """The next step for ``user`` after ``amr`` was done, or None when none is left."""
    done = set(amr)
    if "mfa" not in done and user.has_second_factor:
        return SECOND_FACTOR
    if user.must_change_password and user.source != "directory":
        # A directory account's password is changed in the directory, never here
        # (idp/login/password_check.py): the required change never blocks it.
        return CHANGE_PASSWORD
    if "mfa" not in done and (user.requires_2fa or requires_second_factor(services().db.session, user)):
        # A role, or a restriction (policy 5.1), requires 2FA of this account.
        return ENROL_SECOND_FACTOR
    from idp.accounts.obligations import obligations_pending

    if obligations_pending(services().db.session, user):
        return ACCEPT_OBLIGATION
    return None


def begin(user: User, amr: list[str], flow: str | None, next_url: str | None) -> Any:
    """A first factor was verified: start the chain (or finish at once)."""
    from idp.login.views import safe_next

    # A session this browser was signed in with ends here the normal way (its tokens are
    # revoked and its apps told), not silently with the id below.
    end_current_session("new-sign-in")
    # A new session id, so that a session planted before the credential was given cannot
    # ride on this sign-in (session fixation, ASVS 7.2.4).
    session.regenerate()  # type: ignore[attr-defined]
    for stale in ("uid", "sid"):
        session.pop(stale, None)
    now = time.time()
    session[KEY] = {
        "uid": user.id,
        "amr": list(dict.fromkeys(amr)),
        "flow": flow or None,
        "next": safe_next(next_url),
        "started": now,
        "expires": now + PENDING_SECONDS,
        "step": None,
    }
    return _go_on(user, session[KEY], {})


def current(step: str | None = None) -> tuple[dict[str, Any], User] | None:
    """The pending state and its account; None when there is none, it expired, the
    account can no longer sign in, or ``step`` is given and is not the due step."""
    state = session.get(KEY)
    if not isinstance(state, dict) or state.get("expires", 0) < time.time():
        session.pop(KEY, None)
        return None
    user = services().db.session.get(User, state.get("uid"))
    if user is None or not user.can_sign_in:
        session.pop(KEY, None)
        return None
    if step is not None and state.get("step") != step:
        return None
    return state, user


def resume() -> Any:
    """Where a browser with a pending sign-in belongs now (the sign-in page if none)."""
    found = current()
    if found is None or not found[0].get("step"):
        return redirect(url_for("login.login"), code=303)
    return redirect(url_for(found[0]["step"]), code=303)


def cancel() -> None:
    session.pop(KEY, None)


def advance(user: User, *, step: str, add_amr: Iterable[str] = (), details: dict[str, Any] | None = None) -> Any:
    """``step`` is done for ``user``: record what it added and go on. A step that is
    not the due one changes nothing and the browser is sent to the due one."""
    found = current(step)
    if found is None or found[1].id != user.id:
        return resume()
    state = dict(found[0])
    amr = list(state["amr"])
    for method in add_amr:
        if method not in amr:
            amr.append(method)
    if step in _FACTOR_STEPS and "mfa" not in amr:
        amr.append("mfa")
    state["amr"] = amr
    state.setdefault("details", {}).update(details or {})
    session[KEY] = state
    return _go_on(user, state, state["details"])


def _go_on(user: User, state: dict[str, Any], details: dict[str, Any]) -> Any:
    from idp.login.views import _after_sign_in

    step = due_step(user, state["amr"])
    if step is not None:
        state["step"] = step
        session[KEY] = state
        return redirect(url_for(step), code=303)
    session.pop(KEY, None)
    amr = [str(m) for m in state["amr"]]
    # DESIGN "login/": restrictions decide (hours, networks, validity, ...) once every
    # factor is in, before any session exists; a refusal shows the person why.
    refusal = sign_in_refusal(user, amr, state.get("flow"))
    if refusal is not None:
        return refusal
    try:
        complete_sign_in(user, amr)
    except SessionLimitReached as exc:
        return session_limit_page(exc, user_id=user.id)
    audit_event("account:login:success", actor=f"user:{user.id}", subject=f"user:{user.id}",
                details={"amr": amr, **details})
    return _after_sign_in(state.get("flow"), state.get("next"))


def session_limit_page(exc: SessionLimitReached, *, user_id: int | None) -> Any:
    """The account already holds as many sessions as its restrictions allow and the
    policy refuses more: a 403 page that says so and what to do, naming nothing about
    other accounts (restriction ``at_session_limit = "refuse"``)."""
    audit_event("account:login:refused", actor=f"user:{user_id}" if user_id else None,
                subject=f"user:{user_id}" if user_id else None, reason="session-limit",
                details={"limit": exc.limit, "sessions": exc.sessions})
    return render_template("login_session_limit.html", limit=exc.limit), 403
