"""The three doors of a breach report (policy 5.2.3; issue 6), all translated, all CSRF
protected:

1. ``/account/report-problem``: a signed-in person reports a problem with their account
   (what happened, when they noticed it, a description). Containment signs them out
   everywhere, this browser included; the confirmation page with the case number is the
   answer to the same request.
2. ``/report-problem``: someone who cannot sign in gives the login, a contact (e-mail
   address or phone number) and the same details. The answer is the same page whether
   or not the login names an account (a case is stored either way, see
   idp/breach/service.py; the case number goes by mail), requests are limited per client
   IP (429 with Retry-After), and an existing account is contained at once.
3. ``/report/not-me/<token>``: the link in a new-device notice. A GET only shows what the
   notice was about and a button (mail scanners open links); the POST uses the link up
   and contains the account, locked ("someone else signed in").
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask import Blueprint, g, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import DateTimeLocalField, RadioField, StringField, TextAreaField
from wtforms.validators import InputRequired, Length, Optional, ValidationError

from idp.accounts import email_address
from idp.accounts.models import User
from idp.breach.models import BreachCase
from idp.breach.new_device import not_me_links
from idp.breach.service import FORM_CATEGORIES, MAX_DESCRIPTION, open_case
from idp.login.throttle import Throttle, Throttled
from idp.services import services

bp = Blueprint("breach", __name__)

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")
# Reports from the sign-in page per client IP within the window, then growing delays
# (5 s, 15 s, ...). A school behind one NAT address files far fewer than this.
PUBLIC_FREE_REPORTS = 10
PUBLIC_WINDOW = 3600
# A clock a few minutes ahead in the person's device is not "the future".
FUTURE_GRACE = timedelta(minutes=5)
_PHONE = re.compile(r"\+?[0-9][0-9 ()-]{5,23}")

CATEGORY_LABELS = {
    "shared-password": _l("I gave my password to someone"),
    "unknown-activity": _l("I see activity I don't recognise"),
    "lost-device": _l("I lost my phone or device"),
    "other": _l("Something else"),
}


def _category_choices() -> list[tuple[str, Any]]:
    return [(c, CATEGORY_LABELS[c]) for c in FORM_CATEGORIES]


def _not_in_future(_form: FlaskForm, field: DateTimeLocalField) -> None:
    if field.data is not None and field.data.replace(tzinfo=SCHOOL_TZ) > datetime.now(UTC) + FUTURE_GRACE:
        raise ValidationError(_l("This moment is in the future."))


class ReportForm(FlaskForm):
    category = RadioField(
        choices=_category_choices(),
        validators=[InputRequired(message=_l("Choose what happened."))],
    )
    # The browser's datetime-local, read as Asia/Bishkek time.
    noticed = DateTimeLocalField(
        format=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"],
        validators=[InputRequired(message=_l("Say when you noticed it.")), _not_in_future],
    )
    description = TextAreaField(
        validators=[Optional(), Length(max=MAX_DESCRIPTION, message=_l("At most 2000 characters."))],
    )


def _contact_check(_form: FlaskForm, field: StringField) -> None:
    value = (field.data or "").strip()
    if "@" in value:
        if email_address.normalise_email(value) is None:
            raise ValidationError(_l("Enter an e-mail address or a phone number."))
    elif not _PHONE.fullmatch(value):
        raise ValidationError(_l("Enter an e-mail address or a phone number."))


class PublicReportForm(ReportForm):
    login = StringField(validators=[
        InputRequired(message=_l("Enter your login.")), Length(max=128, message=_l("At most 128 characters.")),
    ])
    contact = StringField(validators=[
        InputRequired(message=_l("Enter an e-mail address or a phone number.")),
        Length(max=email_address.MAX_LENGTH, message=_l("At most 320 characters.")),
        _contact_check,
    ])


class NotMeForm(FlaskForm):
    pass


def _now_local() -> str:
    return datetime.now(SCHOOL_TZ).strftime("%Y-%m-%dT%H:%M")


def _noticed(form: ReportForm) -> datetime:
    value: datetime = form.noticed.data
    return value.replace(tzinfo=SCHOOL_TZ)


def _local(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    from flask_babel import format_datetime

    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return format_datetime(aware.astimezone(SCHOOL_TZ), "medium", rebase=False) + " (Asia/Bishkek)"


def _public_throttle() -> Throttle:
    return Throttle(redis=services().redis, purpose="breach-report:ip", free_failures=PUBLIC_FREE_REPORTS,
                    max_delay=services().settings.login_max_delay, window=PUBLIC_WINDOW)


def _sign_out_here() -> None:
    """Containment ended this browser's session in Redis already; forget it here too,
    keeping the language, so the answer page is shown to a signed-out visitor."""
    lang = session.get("lang")
    logout_user()
    session.clear()
    session.regenerate()  # type: ignore[attr-defined]
    if lang:
        session["lang"] = lang


def _done(case: BreachCase) -> Any:
    return render_template("breach_report_done.html", case=case, deadline=_local(case.deadline_at),
                           locked=bool(case.containment.get("locked")))


# --- 1. signed in: "Report a problem with my account" -------------------------------------------
@bp.route("/account/report-problem", methods=["GET", "POST"])
def report() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("breach.report")), code=302)
    form = ReportForm()
    if request.method == "GET":
        form.noticed.data = None
        return render_template("breach_report.html", form=form, now_local=_now_local())
    if not form.validate_on_submit():
        return render_template("breach_report.html", form=form, now_local=_now_local()), 400
    svc = services()
    db = svc.db.session
    user = db.get(User, current_user.id)
    assert user is not None
    case = open_case(
        db, user=user, door="account", category=form.category.data, description=form.description.data or "",
        noticed_at=_noticed(form), contact=None, login_given=user.login, ip=request.remote_addr,
        actor=f"user:{user.id}", svc=svc, request_id=getattr(g, "request_id", None),
        reporter_locale=str(get_locale() or "") or None,
    )
    db.commit()
    _sign_out_here()
    return _done(case)


# --- 2. cannot sign in: the form on the sign-in page ----------------------------------------------
@bp.route("/report-problem", methods=["GET", "POST"])
def report_public() -> Any:
    form = PublicReportForm()
    if request.method == "GET":
        return render_template("breach_report_public.html", form=form, now_local=_now_local())
    throttle = _public_throttle()
    client_ip = request.remote_addr or "unknown"
    # Every request counts, before anything is checked or looked up: a 429 says nothing
    # about the login. PUBLIC_FREE_REPORTS go through in the window, then growing delays.
    throttle.guard(client_ip)
    if throttle.fail(client_ip) > throttle.free_failures:
        raise Throttled(throttle.check(client_ip) or 1, throttle.purpose)
    if not form.validate_on_submit():
        return render_template("breach_report_public.html", form=form, now_local=_now_local()), 400
    svc = services()
    db = svc.db.session
    login_name = (form.login.data or "").strip().casefold()
    user = None if "\x00" in login_name else db.scalar(select(User).where(User.login == login_name))
    open_case(
        db, user=user, door="sign-in-page", category=form.category.data,
        description=form.description.data or "", noticed_at=_noticed(form), contact=form.contact.data,
        login_given=login_name, ip=request.remote_addr, actor="anonymous", svc=svc,
        request_id=getattr(g, "request_id", None), reporter_locale=str(get_locale() or "") or None,
    )
    db.commit()
    if current_user.is_authenticated and user is not None and current_user.id == user.id:
        _sign_out_here()
    return render_template("breach_report_public_done.html")


# --- 3. "This wasn't me" ----------------------------------------------------------------------------
def _invalid_link() -> Any:
    page = render_template(
        "error.html", title=_("This link does not work"),
        message=_("The link is not valid, has expired or was already used. If someone else is using your "
                  "account, use “Report a problem with my account” on the sign-in page."),
    )
    return page, 400


def _link_account(data: dict[str, Any] | None) -> User | None:
    if data is None:
        return None
    return services().db.session.get(User, data.get("uid"))


@bp.route("/report/not-me/<token>", methods=["GET", "POST"])
def not_me(token: str) -> Any:
    links = not_me_links(services().redis)
    form = NotMeForm()
    if request.method == "GET":
        from idp.login.sessions import place_label  # (imported here: it imports the login views)

        data = links.peek(token)
        user = _link_account(data)
        if data is None or user is None:
            return _invalid_link()
        signed_in = datetime.fromtimestamp(float(data.get("at") or 0), UTC)
        return render_template("breach_not_me.html", form=form, token=token, device=data.get("device") or "—",
                               ip=data.get("ip") or "—",
                               place=place_label(data.get("network")) if data.get("network") else "",
                               signed_in_at=_local(signed_in))
    if not form.validate_on_submit():
        return _invalid_link()
    data = links.consume(token)
    user = _link_account(data)
    if data is None or user is None:
        return _invalid_link()
    svc = services()
    db = svc.db.session
    signed_in = datetime.fromtimestamp(float(data.get("at") or 0), UTC)
    case = open_case(
        db, user=user, door="not-me", category="not-me",
        description="", noticed_at=None, contact=None, login_given=user.login, ip=request.remote_addr,
        actor=f"user:{user.id}", svc=svc, request_id=getattr(g, "request_id", None),
        reporter_locale=str(get_locale() or "") or None,
        details={"reported_sign_in": {"sid": data.get("sid"), "device": data.get("device"), "ip": data.get("ip"),
                                      "network": data.get("network"), "at": signed_in.isoformat()}},
    )
    db.commit()
    if current_user.is_authenticated and current_user.id == user.id:
        _sign_out_here()
    return _done(case)
