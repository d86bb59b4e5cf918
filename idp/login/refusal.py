"""A refused sign-in or authorization, as the person sees it: the translated reasons of
the access decision (idp/access/decision.py) on one page, and the way back to the app.

The reasons speak only of this account and this app (idp/access/messages.py). A refused
sign-in redirects to ``/login/refused`` (idp/login/refused.py), so that every way of
signing in, the password form and the passkey script alike, ends in a redirect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import redirect, render_template, request, session, url_for
from flask_babel import gettext as _

from idp.access.decision import SIGN_IN, Decision, Reason, context_for, decide_for
from idp.access.messages import reason_message
from idp.accounts.models import User
from idp.audit.web import audit_event
from idp.services import services

# The refusal waits in the (anonymous) session for the page that shows it.
KEY = "access_refused"


def refusal_page(reasons: Iterable[Reason], *, title: str, back: dict[str, Any] | None = None) -> tuple[str, int]:
    """The 403 page listing each refusal once."""
    seen: set[str] = set()
    shown: list[tuple[str, str]] = []
    for reason in reasons:
        if not reason.blocking:
            continue
        message = reason_message(reason)
        if message not in seen:
            seen.add(message)
            shown.append((reason.code, message))
    return render_template("access_refused.html", title=title, reasons=shown, back=back), 403


def sign_in_decision(user: User, amr: list[str]) -> Decision:
    """The access decision at the end of a sign-in, with every factor given."""
    svc = services()
    context = context_for(svc.settings, phase=SIGN_IN, now=svc.clock(), ip=request.remote_addr or "", amr=amr)
    return decide_for(svc.db.session, user, context, svc.restrictions)


def sign_in_refusal(user: User, amr: list[str], flow: str | None) -> Any | None:
    """None when restrictions let ``user`` sign in now; otherwise a redirect to the page
    saying why (journaled ``account:login:refused``, reason ``access-denied``). A sign-in
    that an app started offers the way back to that app with ``access_denied``."""
    decision = sign_in_decision(user, amr)
    if decision.allowed:
        return None
    audit_event(
        "account:login:refused",
        subject=f"user:{user.id}",
        reason="access-denied",
        details={"codes": decision.codes, "amr": list(amr), "network": decision.network,
                 "restrictions": sorted({r.restriction_id for r in decision.denials if r.restriction_id})},
    )
    back = None
    if flow:
        from idp.oidc.views import back_to_app_for_flow

        back = back_to_app_for_flow(flow)
    session[KEY] = {
        "reasons": [{"code": r.code, "params": dict(r.params)} for r in decision.denials],
        "back": back,
    }
    return redirect(url_for("login.refused"), code=303)


def show_sign_in_refusal() -> Any:
    """The page a refused sign-in leads to (once; then the sign-in page again)."""
    stored = session.pop(KEY, None)
    if not isinstance(stored, dict):
        return redirect(url_for("login.login"), code=303)
    reasons = [Reason(str(r.get("code", "")), dict(r.get("params") or {})) for r in stored.get("reasons") or []]
    return refusal_page(reasons, title=_("You cannot sign in now"), back=stored.get("back"))
