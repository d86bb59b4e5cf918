"""Console: account-sharing signals (policy 5.2.1) for the security officer.

Sign-ins raise the flags (idp/sessions/signals.py); here they are listed, awaiting
review first, each told in words, and marked reviewed with a note that goes to the
journal (``account:sharing:review``). Reading and reviewing them needs ``audit:read``,
the permission of the people who read the journal the flags are also written to."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel import ngettext
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from wtforms import TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.accounts import local_time
from admin_ui.audit import parse_page
from admin_ui.guard import record_console_event, requires
from admin_ui.nav import add_nav
from idp.access.models import SharingFlag
from idp.access.networks import OUTSIDE
from idp.accounts.models import User
from idp.services import services
from idp.sessions.signals import (
    DISTANT_NETWORKS,
    MANY_DEVICES,
    TOO_MANY_SESSIONS,
    release_claim,
)

PER_PAGE = 50
ACCOUNT_FLAGS = 20
MAX_NOTE = 1000


# --- in words ---------------------------------------------------------------------------------
def kind_label(kind: str) -> str:
    labels = {
        TOO_MANY_SESSIONS: _("Too many sessions at once"),
        DISTANT_NETWORKS: _("Sessions from places far apart"),
        MANY_DEVICES: _("Many devices in a short time"),
    }
    return labels.get(kind, kind)


def _place_text(place: dict[str, Any]) -> str:
    network = place.get("network") or OUTSIDE
    where = _("outside the school networks") if network == OUTSIDE else _("network “%(name)s”", name=network)
    return _("%(device)s, %(where)s, address %(ip)s", device=place.get("device") or _("unknown device"),
             where=where, ip=place.get("ip") or "—")


def _duration_text(seconds: int) -> str:
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return ngettext("%(num)d hour", "%(num)d hours", hours)
    if seconds < 60:
        return ngettext("%(num)d second", "%(num)d seconds", seconds)
    return ngettext("%(num)d minute", "%(num)d minutes", seconds // 60)


def flag_summary(flag: SharingFlag) -> str:
    """What the flag says, in one sentence the security officer reads."""
    d = flag.details or {}
    if flag.kind == TOO_MANY_SESSIONS:
        if d.get("limit_from") == "restriction":
            return _("%(count)s sessions were signed in at once; a restriction allows at most %(limit)s.",
                     count=d.get("sessions"), limit=d.get("limit"))
        return _("%(count)s sessions were signed in at once; more than %(limit)s is unusual for one person.",
                 count=d.get("sessions"), limit=d.get("limit"))
    if flag.kind == DISTANT_NETWORKS:
        window = _duration_text(int(d.get("window_seconds") or 0))
        reasons = {
            "different-networks": _("Two sessions were active within %(window)s in different school networks.",
                                    window=window),
            "inside-and-outside": _("Two sessions were active within %(window)s, one in a school network and "
                                    "one from outside.", window=window),
            "different-prefixes": _("Two sessions were active within %(window)s from outside addresses of "
                                    "different providers or regions.", window=window),
        }
        return reasons.get(str(d.get("reason")), _("Two sessions were active at once from places far apart."))
    if flag.kind == MANY_DEVICES:
        return _("%(count)s different devices signed in within %(window)s; more than %(limit)s is unusual for "
                 "one person.", count=d.get("count"), window=_duration_text(int(d.get("window_seconds") or 0)),
                 limit=d.get("limit"))
    return flag.kind


def flag_particulars(flag: SharingFlag) -> list[str]:
    """The sessions or devices behind the flag, one line each."""
    d = flag.details or {}
    if flag.kind == TOO_MANY_SESSIONS:
        return [_place_text(p) for p in d.get("places") or []]
    if flag.kind == DISTANT_NETWORKS:
        return [_place_text(p) for p in d.get("sessions") or []]
    if flag.kind == MANY_DEVICES:
        return [str(device) for device in d.get("devices") or []]
    return []


@dataclass
class FlagRow:
    flag: SharingFlag
    user: User | None
    kind: str
    summary: str
    particulars: list[str]
    reviewer: str


def _rows(db: Session, flags: list[SharingFlag]) -> list[FlagRow]:
    ids = {f.user_id for f in flags}
    ids |= {int(f.reviewed_by[5:]) for f in flags if f.reviewed_by and f.reviewed_by[5:].isdigit()}
    people = {u.id: u for u in db.scalars(select(User).where(User.id.in_(ids)))} if ids else {}

    def reviewer(ref: str | None) -> str:
        if not ref:
            return ""
        person = people.get(int(ref[5:])) if ref.startswith("user:") and ref[5:].isdigit() else None
        return person.login if person else ref

    return [
        FlagRow(flag=f, user=people.get(f.user_id), kind=kind_label(f.kind), summary=flag_summary(f),
                particulars=flag_particulars(f), reviewer=reviewer(f.reviewed_by))
        for f in flags
    ]


def _awaiting_first() -> tuple[Any, ...]:
    # Flags awaiting review first, then the newest.
    return (SharingFlag.reviewed_at.is_(None).desc(), SharingFlag.created_at.desc(), SharingFlag.id.desc())


def account_flags(db: Session, user_id: int) -> list[FlagRow]:
    """The account's flags for its console page, awaiting review first."""
    flags = list(db.scalars(select(SharingFlag).where(SharingFlag.user_id == user_id)
                            .order_by(*_awaiting_first()).limit(ACCOUNT_FLAGS)))
    return _rows(db, flags)


def awaiting_review(db: Session) -> int:
    return db.scalar(select(func.count(SharingFlag.id)).where(SharingFlag.reviewed_at.is_(None))) or 0


# --- forms ------------------------------------------------------------------------------------
def _usable_text(_form: FlaskForm, field: TextAreaField) -> None:
    # PostgreSQL text columns refuse NUL; say so instead of failing in the driver.
    if "\x00" in (field.data or ""):
        raise ValidationError(_("This value contains characters that are not allowed."))


class ReviewForm(FlaskForm):
    note = TextAreaField(
        validators=[DataRequired(message=_l("Write what you found or did: the note is kept in the audit journal.")),
                    Length(max=MAX_NOTE, message=_l("At most %(max)d characters.", max=MAX_NOTE)),
                    _usable_text]
    )


# --- views ------------------------------------------------------------------------------------
@bp.get("/sharing")
@requires("audit:read")
def sharing_signals() -> str:
    db = services().db.session
    total = db.scalar(select(func.count(SharingFlag.id))) or 0
    pages = max(1, -(-total // PER_PAGE))
    page = min(parse_page(request.args.get("page")), pages)
    flags = list(db.scalars(select(SharingFlag).order_by(*_awaiting_first())
                            .offset((page - 1) * PER_PAGE).limit(PER_PAGE)))
    return render_template("admin/sharing/list.html", rows=_rows(db, flags), page=page, pages=pages,
                           total=total, awaiting=awaiting_review(db), local_time=local_time)


def _flag_or_404(flag_id: int) -> SharingFlag:
    flag = services().db.session.get(SharingFlag, flag_id)
    if flag is None:
        abort(404)
    return flag


def _review_page(flag: SharingFlag, form: ReviewForm, status: int = 200) -> tuple[str, int]:
    row = _rows(services().db.session, [flag])[0]
    return render_template("admin/sharing/review.html", row=row, form=form, local_time=local_time), status


@bp.route("/sharing/<int:flag_id>", methods=["GET", "POST"])
@requires("audit:read")
def sharing_signal(flag_id: int) -> Any:
    flag = _flag_or_404(flag_id)
    form = ReviewForm()
    if request.method == "GET":
        return _review_page(flag, form)
    if not form.validate_on_submit():
        return _review_page(flag, form, 400)
    db = services().db.session
    note = form.note.data.strip()
    reviewer = f"user:{current_user.id}"
    # Only the first of two officers reviewing at once records a review.
    done = db.execute(
        update(SharingFlag)
        .where(SharingFlag.id == flag.id, SharingFlag.reviewed_at.is_(None))
        .values(reviewed_at=datetime.now(UTC).replace(tzinfo=None), reviewed_by=reviewer, review_note=note)
    ).rowcount  # type: ignore[attr-defined]
    if done != 1:
        db.rollback()
        db.refresh(flag)
        form.note.errors = [*form.note.errors, _("This signal was already reviewed.")]
        return _review_page(flag, form, 409)
    record_console_event("account:sharing:review", subject=f"user:{flag.user_id}", reason=note,
                         details={"flag": flag.id, "kind": flag.kind})
    db.commit()
    # The next signal of this kind for the account is raised again.
    release_claim(services().redis, flag.user_id, flag.kind)
    flash(_("The signal was marked reviewed."))
    return redirect(url_for("admin.sharing_signals"), code=303)


add_nav("admin.sharing_signals", "audit:read", _l("Sharing signals"))
