"""Console dashboard: accounts by role and state, today's sign-ins, locked accounts."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask import render_template
from flask_babel import lazy_gettext as _l
from sqlalchemy import func, select

from admin_ui import bp
from admin_ui.guard import requires
from admin_ui.nav import add_nav
from idp.access.models import SharingFlag
from idp.accounts.models import Role, User, user_roles
from idp.audit.models import AuditEvent
from idp.services import services

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")


def start_of_school_day_utc(now: datetime | None = None) -> datetime:
    """Midnight in Bishkek today, as naive UTC (how timestamps are stored)."""
    local = (now or datetime.now(SCHOOL_TZ)).astimezone(SCHOOL_TZ)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.astimezone(ZoneInfo("UTC")).replace(tzinfo=None)


def dashboard_figures() -> dict[str, Any]:
    db = services().db.session
    by_role = dict(
        db.execute(
            select(Role.name, func.count(user_roles.c.user_id))
            .select_from(Role)
            .outerjoin(user_roles, user_roles.c.role_id == Role.id)
            .group_by(Role.name)
            .order_by(Role.name)
        ).all()
    )
    total = db.scalar(select(func.count(User.id))) or 0
    locked = db.scalar(select(func.count(User.id)).where(User.locked.is_(True))) or 0
    disabled = db.scalar(select(func.count(User.id)).where(User.active.is_(False))) or 0
    since = start_of_school_day_utc()
    signins = dict(
        db.execute(
            select(AuditEvent.action, func.count())
            .where(
                AuditEvent.occurred_at >= since,
                AuditEvent.action.in_(["account:login:success", "account:login:failure"]),
            )
            .group_by(AuditEvent.action)
        ).all()
    )
    locked_accounts = list(db.scalars(select(User).where(User.locked.is_(True)).order_by(User.login).limit(20)))
    # Sign-ins per hour today, for the chart.
    hours = [0] * 24
    for (occurred_at,) in db.execute(
        select(AuditEvent.occurred_at).where(
            AuditEvent.occurred_at >= since, AuditEvent.action == "account:login:success"
        )
    ):
        local = occurred_at.replace(tzinfo=ZoneInfo("UTC")).astimezone(SCHOOL_TZ)
        hours[local.hour] += 1
    return {
        "by_role": by_role,
        "total": total,
        "locked": locked,
        "disabled": disabled,
        "active": total - locked - disabled,
        "signins_ok": signins.get("account:login:success", 0),
        "signins_failed": signins.get("account:login:failure", 0),
        "locked_accounts": locked_accounts,
        "hours": hours,
        "max_hour": max(hours) or 1,
        "day_end": since + timedelta(days=1),
        # Policy 5.2.1: account-sharing signals awaiting the security officer's review.
        "sharing_awaiting": db.scalar(
            select(func.count(SharingFlag.id)).where(SharingFlag.reviewed_at.is_(None))
        ) or 0,
    }


@bp.get("/")
@requires("reports:read")
def dashboard() -> str:
    return render_template("admin/dashboard.html", f=dashboard_figures())


add_nav("admin.dashboard", "reports:read", _l("Dashboard"))
