"""The confidentiality obligation at sign-in (policy 2.5) and the page listing what a
person accepted.

``/login/obligation`` is a step of the pending sign-in (idp/login/pending.py): when
one of the person's roles has an obligation version they have not accepted (a first
sign-in, or a new version was published since), the text is shown in the page's
language and the sign-in continues only once they tick "I have read and accept" and
press the button. The acceptance (version, time, IP, language) is stored and
journalled (``account:obligation:accept``) before the session exists. Declining ends
the pending sign-in: no session, back to the sign-in page.

``/account/obligations`` lists, for a signed-in person, the obligations they accepted
(role, version, when) with the text."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_time
from flask import g, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy.exc import IntegrityError
from wtforms import BooleanField, HiddenField
from wtforms.validators import DataRequired

from idp.accounts import obligations
from idp.accounts.models import Obligation, User
from idp.audit.web import audit_event
from idp.login import pending
from idp.login.views import bp
from idp.services import services

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")


class AcceptObligationForm(FlaskForm):
    # The versions the page showed: a text published while the person was reading is
    # not accepted unseen.
    shown = HiddenField()
    accept = BooleanField(
        validators=[DataRequired(message=_l("Tick the box to confirm that you have read the obligation and "
                                            "accept it."))]
    )


class DeclineObligationForm(FlaskForm):
    pass


def _ids(items: list[Obligation]) -> str:
    return ",".join(str(o.id) for o in sorted(items, key=lambda o: o.id))


def _locale() -> str:
    return str(get_locale() or "ky")


def local_time(value: datetime | None) -> str:
    """A stored (naive UTC) time in the school's time zone, in the page's language."""
    if value is None:
        return ""
    local = value.replace(tzinfo=UTC).astimezone(SCHOOL_TZ)
    return f"{format_date(local.date(), 'medium', locale=_locale())} {format_time(local, 'short', tzinfo=SCHOOL_TZ, locale=_locale())}"


def _page(items: list[Obligation], form: AcceptObligationForm, status: int = 200) -> Any:
    form.shown.data = _ids(items)
    page = render_template(
        "login_obligation.html", obligations=items, form=form, decline_form=DeclineObligationForm(),
        locale=_locale(),
    )
    # The page belongs to one pending sign-in; no cache keeps it.
    return page, status, {"Cache-Control": "no-store"}


@bp.route("/login/obligation", methods=["GET", "POST"])
def accept_obligation() -> Any:
    found = pending.current(pending.ACCEPT_OBLIGATION)
    if found is None:
        # Expired, never started, or another step is due: that step (or the sign-in
        # page) comes first, so this page cannot be used to skip one.
        return pending.resume()
    _state, user = found
    svc = services()
    db = svc.db.session
    items = obligations.pending_obligations(db, user)
    if not items:
        # Accepted in the meantime (another tab): nothing left to do at this step.
        return pending.advance(user, step=pending.ACCEPT_OBLIGATION)
    form = AcceptObligationForm()
    if request.method == "GET":
        return _page(items, form)
    if not form.validate_on_submit():
        return _page(items, form, 400)
    if (form.shown.data or "") != _ids(items):
        form.accept.errors = [*form.accept.errors, _("The text of the obligation has changed while you were "
                                                     "reading it. Read the current text below and accept it "
                                                     "again.")]
        # The new text was not read yet: its box starts unticked.
        form.accept.data = False
        return _page(items, form, 409)
    try:
        made = obligations.accept(
            db, svc.journal, user, items, ip=request.remote_addr, locale=_locale(),
            request_id=getattr(g, "request_id", None),
        )
        db.commit()
    except IntegrityError:
        # The same acceptance posted twice at once: the other request stored it.
        db.rollback()
        made = []
        left = obligations.pending_obligations(db, user)
        if left:
            return _page(left, AcceptObligationForm(formdata=None), 409)
    accepted = [{"role": a.obligation.role.name, "version": a.obligation.version} for a in made]
    return pending.advance(user, step=pending.ACCEPT_OBLIGATION, details={"obligations_accepted": accepted})


@bp.post("/login/obligation/cancel")
def decline_obligation() -> Any:
    """The "Cancel sign-in" button: no session; the pending sign-in ends and the person
    is back at the sign-in page (with the portal app's request, if one was waiting)."""
    form = DeclineObligationForm()
    found = pending.current(pending.ACCEPT_OBLIGATION)
    if found is None or not form.validate_on_submit():
        return pending.resume()
    state, user = found
    items = obligations.pending_obligations(services().db.session, user)
    audit_event(
        "account:obligation:decline", actor=f"user:{user.id}", subject=f"user:{user.id}",
        details={"obligations": [{"role": o.role.name, "version": o.version} for o in items]},
    )
    flow = state.get("flow")
    pending.cancel()
    return redirect(url_for("login.login", flow=flow) if flow else url_for("login.login"), code=303)


# --- the account page ------------------------------------------------------------------

@bp.get("/account/obligations")
def account_obligations() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.account_obligations")), code=302)
    db = services().db.session
    user = db.get(User, current_user.id)
    if user is None:
        return redirect(url_for("login.login"), code=302)
    return render_template(
        "account_obligations.html", statuses=obligations.status_for(db, user),
        accepted=obligations.acceptances(db, user), locale=_locale(),
        local_time=local_time,
    )


@bp.app_template_global()
def has_obligations(user: Any) -> bool:
    """For the account page: whether any of the person's roles has an obligation."""
    if not getattr(user, "is_authenticated", False):
        return False
    db = services().db.session
    account = db.get(User, user.id)
    return bool(account is not None and obligations.current_obligations(db, account))
