"""What the reasons of an access decision say to people, in their language.

A message speaks only of the account that asked and the app it asked for: never of
another account, and never of the school's address blocks (only the names of its
networks)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from babel.dates import format_date, get_day_names
from flask_babel import get_locale
from flask_babel import gettext as _

from idp.access import decision as d

DAY_ORDER = range(7)


def _locale() -> str:
    return str(get_locale() or "ky")


def _date(value: Any) -> str:
    """A stored moment as a date in Asia/Bishkek, in the page's language."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return format_date(moment.astimezone(d.SCHOOL_TZ).date(), "long", locale=_locale())


def _last_day(value: Any) -> str:
    """The last day an exclusive end still allows (an end at midnight allows the day before)."""
    try:
        moment = datetime.fromisoformat(str(value)).astimezone(d.SCHOOL_TZ)
    except ValueError:
        return str(value)
    return format_date((moment - timedelta(microseconds=1)).date(), "long", locale=_locale())


def weekday_names(days: Any) -> str:
    names = get_day_names("wide", locale=_locale())
    return ", ".join(str(names[day]) for day in DAY_ORDER if day in set(days or ()))


def reason_message(reason: d.Reason) -> str:
    """The translated sentence for one reason of a decision."""
    p = reason.params
    code = reason.code
    if code == d.ACCOUNT_DISABLED:
        return _("This account is switched off. Contact the school's technical support.")
    if code == d.ACCOUNT_LOCKED:
        return _("This account is locked. Contact the school's technical support.")
    if code in (d.APP_ROLES, d.APP_NOT_ALLOWED):
        return _("Your account may not use this portal app.")
    if code == d.OUTSIDE_HOURS:
        return _("Your account can be used only from %(start)s to %(end)s (Bishkek time).",
                 start=p.get("start", ""), end=p.get("end", ""))
    if code == d.OUTSIDE_WEEKDAYS:
        return _("Your account can be used only on these days: %(days)s.", days=weekday_names(p.get("weekdays")))
    if code == d.NETWORK_NOT_ALLOWED:
        names = ", ".join(p.get("networks") or ())
        if names:
            return _("Your account can be used only from these networks of the school: %(networks)s.",
                     networks=names)
        return _("Your account can be used only from networks the school has allowed.")
    if code == d.NOT_YET_VALID:
        return _("Your account can be used from %(date)s.", date=_date(p.get("valid_from")))
    if code == d.EXPIRED:
        return _("Your account could be used until %(date)s.", date=_last_day(p.get("valid_until")))
    if code == d.SECOND_FACTOR_REQUIRED:
        return _("This needs a sign-in with a second factor (an authenticator app or a passkey). "
                 "Sign out, then sign in again with it.")
    if code == d.SCOPES_SCHOOL_ONLY:
        return _("Some permissions are given only on the school's network, so the app did not get them: "
                 "%(scopes)s.", scopes=", ".join(p.get("scopes") or ()))
    if code == d.NETWORK_NOT_CHECKED:
        return _("No address was given, so the network rules were not checked.")
    return _("Access is not allowed now.")


def reason_messages(reasons: Any) -> list[str]:
    """Each distinct message once, in order (two restrictions may say the same)."""
    return list(dict.fromkeys(reason_message(r) for r in reasons))
