""""My sessions" (/account/sessions): where this account is signed in, and ending those
sessions (ASVS 7.5.2, policy 5.2.1). Each session shows its device, place (named
network or outside), IP address, sign-in and last-seen times (Asia/Bishkek), how the
person signed in and the portal apps used from it; this browser's own is marked.

Listing needs a signed-in session; ending one or all others needs a recent
authentication (``fresh_auth_required``: ASVS 7.5.2 "after re-authenticating with at
least one factor"). Ending goes through ``SessionRegistry`` like every other end: the
session is signed out in every server process at once, its tokens are revoked and its
portal apps get back-channel logout tokens.

The display helpers here are shared with the console's account page."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_datetime
from flask import flash, g, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import HiddenField
from wtforms.validators import DataRequired, Length

from idp.access.networks import OUTSIDE
from idp.login.pending import session_limit_page
from idp.login.reauth import fresh_auth_required
from idp.login.views import bp
from idp.oidc.models import Client
from idp.services import services
from idp.sessions.registry import SessionInfo, SessionLimitReached

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")


class EndSessionForm(FlaskForm):
    sid = HiddenField(validators=[DataRequired(), Length(max=64)])


class EndOtherSessionsForm(FlaskForm):
    pass


# --- display, shared with the console ------------------------------------------------------
def session_time(moment: float | int | None) -> str:
    """An epoch moment in the school's time zone, in the page's language."""
    if moment is None:
        return "—"
    local = datetime.fromtimestamp(float(moment), UTC).astimezone(SCHOOL_TZ)
    return format_datetime(local, "medium", tzinfo=SCHOOL_TZ, locale=str(get_locale() or "ky"))


def place_label(network: str | None) -> str:
    if not network or network == OUTSIDE:
        return _("Outside the school network")
    if network == "school":
        return _("School network")
    return _("School network “%(name)s”", name=network)


_METHODS = {
    "pwd": _l("password"),
    "otp": _l("code from the authenticator app"),
    "hwk": _l("passkey"),
    "swk": _l("passkey"),
    "mfa": _l("two factors"),
}


def methods_label(amr: list[str]) -> str:
    labels = [str(_METHODS[m]) for m in amr if m in _METHODS and m != "mfa"]
    if "mfa" in amr and len(labels) == 1:
        labels.append(str(_METHODS["mfa"]))
    return ", ".join(dict.fromkeys(labels)) or "—"


def device_label(info: SessionInfo) -> str:
    return info.device or _("Unknown device")


def app_names(infos: list[SessionInfo]) -> dict[str, str]:
    """client_id -> the app's name, for the apps used from ``infos``."""
    wanted = {a for info in infos for a in info.apps}
    if not wanted:
        return {}
    rows = services().db.session.execute(select(Client.client_id, Client.name).where(Client.client_id.in_(wanted)))
    return {client_id: name for client_id, name in rows}


def display_context() -> dict[str, Any]:
    return {"session_time": session_time, "place_label": place_label, "methods_label": methods_label,
            "device_label": device_label}


# --- the page ---------------------------------------------------------------------------------
def _page(status: int = 200) -> Any:
    svc = services()
    infos = svc.sessions.list(current_user.id)
    current_sid = session.get("sid")
    infos.sort(key=lambda s: s.sid != current_sid)  # this device first, then newest first
    return render_template(
        "account_sessions.html", sessions=infos, current_sid=current_sid, apps=app_names(infos),
        end_form=EndSessionForm(formdata=None), others_form=EndOtherSessionsForm(formdata=None),
        **display_context(),
    ), status


@bp.get("/account/sessions")
def sessions_page() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.sessions_page")), code=302)
    return _page()


@bp.post("/account/sessions/end")
@fresh_auth_required(back="login.sessions_page")
def end_session() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.sessions_page")), code=303)
    form = EndSessionForm()
    if not form.validate_on_submit():
        flash(_("Choose a session to end."), "error")
        return _page(400)
    sid = form.sid.data
    if sid == session.get("sid"):
        flash(_("This is the session of this device: use “Sign out” to end it."), "error")
        return _page(400)
    svc = services()
    db = svc.db.session
    info = svc.sessions.get(current_user.id, sid)
    if info is None or not svc.sessions.end(db, current_user.id, sid, reason="ended-by-user",
                                            actor=f"user:{current_user.id}"):
        flash(_("That session has already ended."))
        return redirect(url_for("login.sessions_page"), code=303)
    svc.journal.record(
        db, actor=f"user:{current_user.id}", action="account:session:end", subject=f"user:{current_user.id}",
        reason="ended-by-user", ip=request.remote_addr, request_id=getattr(g, "request_id", None),
        details={"sid": sid, "device": info.device, "ip": info.ip},
    )
    db.commit()
    flash(_("The session on “%(device)s” was ended. That device is signed out.", device=device_label(info)))
    return redirect(url_for("login.sessions_page"), code=303)


@bp.post("/account/sessions/end-others")
@fresh_auth_required(back="login.sessions_page")
def end_other_sessions() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.sessions_page")), code=303)
    form = EndOtherSessionsForm()
    if not form.validate_on_submit():
        return _page(400)
    svc = services()
    db = svc.db.session
    keep = session.get("sid")
    ended = svc.sessions.end_all(db, current_user.id, except_sid=keep, reason="ended-by-user",
                                 actor=f"user:{current_user.id}")
    svc.journal.record(
        db, actor=f"user:{current_user.id}", action="account:sessions:end", subject=f"user:{current_user.id}",
        reason="ended-by-user", ip=request.remote_addr, request_id=getattr(g, "request_id", None),
        details={"sessions_ended": ended, "kept_sid": keep},
    )
    db.commit()
    flash(_("Sessions ended: %(count)d. Only this device is signed in now.", count=ended))
    return redirect(url_for("login.sessions_page"), code=303)


@bp.errorhandler(SessionLimitReached)
def _session_limit(exc: SessionLimitReached) -> Any:
    """A sign-in completed outside the pending chain met the limit (the chain handles its
    own): the same page."""
    return session_limit_page(exc, user_id=exc.user_id)
