"""The working calendar and the support deadline (policy 5.2.3: one working day).

Working days are Monday–Friday, minus the public holidays of Kyrgyzstan (the
``holidays`` package, country KG, with the day-off transfers it knows), minus the
school's own days off, plus declared working days (both stored as
:class:`idp.workdays.models.CalendarDay` and edited in the console). Support works
``support_opens``–``support_closes`` on working days, in Asia/Bishkek time.

The deadline rule: "one working day" is one full working day of support hours
counted from the report. A report outside support hours starts counting at the next
opening; a count that ends exactly at an opening ends instead at the previous
closing. So a report on Friday at 17:30 is due on Monday at 17:30, and one on Saturday
at 11:00 at 18:00 of the next working day.

:class:`WorkingCalendar` is pure (no database, no clock); :func:`load_calendar`
builds it from the database and the settings."""

from __future__ import annotations

import functools
import logging
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from idp.workdays.models import CalendarDay

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from idp.config import Settings

log = logging.getLogger(__name__)

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")
OFF = "off"
WORKING = "working"
KINDS = (OFF, WORKING)
# No count runs further than this many days ahead (a calendar with no working day at
# all would otherwise never end).
MAX_DAYS = 3700


class CalendarError(ValueError):
    """A calendar that cannot give a deadline (e.g. no working day for years)."""


# --- public holidays of Kyrgyzstan ------------------------------------------------------------
_LANGUAGES = {"ky": "ky", "ru": "ru_KG", "en": "en_US"}


@functools.lru_cache(maxsize=64)
def _kg_year(year: int, language: str = "en_US") -> dict[date, str]:
    import holidays

    try:
        return dict(holidays.country_holidays("KG", years=year, language=language).items())
    except (NotImplementedError, KeyError, ValueError):  # a year or language the package lacks
        return {}


@functools.lru_cache(maxsize=64)
def _kg_transferred_working_days(year: int) -> frozenset[date]:
    """Weekend days made working because a day off was moved from them (e.g. Saturday
    11 January 2025 worked for Thursday 2 January). The package keeps these as the
    "from" date of its substituted holidays; read defensively, as that is its own data."""
    try:
        from holidays.countries.kyrgyzstan import KyrgyzstanStaticHolidays
    except ImportError:  # pragma: no cover - a package layout we do not know
        return frozenset()
    entries: Any = getattr(KyrgyzstanStaticHolidays, "special_public_holidays", {})
    found: set[date] = set()
    for entry_year in (year, year + 1):  # a transfer into January may come from December
        spec = entries.get(entry_year)
        if not spec:
            continue
        items = spec if isinstance(spec[0], tuple) else (spec,)
        for item in items:
            if len(item) in (4, 5) and all(isinstance(x, int) for x in item):
                from_year = item[4] if len(item) == 5 else entry_year
                try:
                    day = date(from_year, item[2], item[3])
                except ValueError:
                    continue
                if day.year == year:
                    found.add(day)
    return frozenset(found)


class KyrgyzHolidays:
    """Kyrgyzstan's public holidays, filled in year by year as they are asked for
    (so any year works), from the ``holidays`` package."""

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and day in _kg_year(day.year)

    def name(self, day: date, locale: str = "en") -> str | None:
        return _kg_year(day.year, _LANGUAGES.get(locale, "en_US")).get(day)

    def between(self, start: date, end: date, locale: str = "en") -> list[tuple[date, str]]:
        """Holidays from ``start`` to ``end`` (both included), in date order."""
        language = _LANGUAGES.get(locale, "en_US")
        found: list[tuple[date, str]] = []
        for year in range(start.year, end.year + 1):
            found.extend((d, n) for d, n in _kg_year(year, language).items() if start <= d <= end)
        return sorted(found)


class KyrgyzTransferredWorkingDays:
    """Weekend days the package knows were made working by a day-off transfer."""

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and day in _kg_transferred_working_days(day.year)


# --- the calendar ------------------------------------------------------------------------------
def as_aware(moment: datetime) -> datetime:
    """An aware time; a naive one is taken as UTC (how the database stores times)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def to_naive_utc(moment: datetime) -> datetime:
    return as_aware(moment).astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class WorkingCalendar:
    """Working days and support hours; every time it returns is aware, in ``tz``.

    ``holidays`` and ``transferred_working_days`` may be sets or lazy containers (see
    :class:`KyrgyzHolidays`). Precedence for a date: the school's override (``days_off``
    / ``working_days``), then a transfer that made a weekend day working, then a public
    holiday, then Monday–Friday."""

    holidays: Container[date]
    days_off: Container[date] = field(default_factory=frozenset)
    working_days: Container[date] = field(default_factory=frozenset)
    opens: time = time(9, 0)
    closes: time = time(18, 0)
    tz: ZoneInfo = SCHOOL_TZ
    transferred_working_days: Container[date] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.opens.tzinfo is not None or self.closes.tzinfo is not None:
            raise CalendarError("support hours are local times without an offset")
        if self.opens >= self.closes:
            raise CalendarError("support must open before it closes on the same day")

    # -- days
    def is_working_day(self, day: date) -> bool:
        if day in self.days_off:
            return False
        if day in self.working_days:
            return True
        if day in self.transferred_working_days:
            return True
        if day in self.holidays:
            return False
        return day.weekday() < 5

    def working_days_from(self, day: date) -> Iterator[date]:
        """Working days from ``day`` on (``day`` included when it is one)."""
        for offset in range(MAX_DAYS):
            candidate = day + timedelta(days=offset)
            if self.is_working_day(candidate):
                yield candidate
        raise CalendarError(f"no working day within {MAX_DAYS} days of {day.isoformat()}")

    # -- hours
    @property
    def day_length(self) -> timedelta:
        """One working day of support hours."""
        return datetime.combine(date.min, self.closes) - datetime.combine(date.min, self.opens)

    def opening(self, day: date) -> datetime:
        return datetime.combine(day, self.opens, tzinfo=self.tz)

    def closing(self, day: date) -> datetime:
        return datetime.combine(day, self.closes, tzinfo=self.tz)

    def local(self, moment: datetime) -> datetime:
        return as_aware(moment).astimezone(self.tz)

    def is_support_time(self, moment: datetime) -> bool:
        """Within support hours of a working day (opening included, closing not)."""
        local = self.local(moment)
        return self.is_working_day(local.date()) and self.opening(local.date()) <= local < self.closing(local.date())

    def _periods_from(self, moment: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The support periods (start, end) from ``moment`` on; the first starts at
        ``moment`` when it falls inside one."""
        local = self.local(moment)
        for day in self.working_days_from(local.date()):
            start, end = self.opening(day), self.closing(day)
            if end <= local:
                continue
            yield max(start, local), end

    def add_working_time(self, start: datetime, amount: timedelta) -> datetime:
        """The moment when ``amount`` of support time has passed since ``start``.
        Counting starts at the next opening when ``start`` is outside support hours,
        and a count ending exactly at an opening ends at the previous closing."""
        if amount < timedelta(0):
            raise ValueError("amount must not be negative")
        remaining = amount
        for begin, end in self._periods_from(start):
            if remaining <= end - begin:
                return begin + remaining
            remaining -= end - begin
        raise CalendarError("unreachable")  # pragma: no cover - _periods_from raises first

    def add_working_day(self, start: datetime, days: int = 1) -> datetime:
        """``days`` full working days of support hours after ``start``."""
        if days < 1:
            raise ValueError("days must be at least 1")
        return self.add_working_time(start, self.day_length * days)

    def deadline(self, reported_at: datetime) -> datetime:
        """Support's deadline for a report made at ``reported_at`` (any offset; naive
        means UTC): one working day later, in the calendar's time zone."""
        return self.add_working_day(reported_at)

    def working_seconds_between(self, a: datetime, b: datetime) -> float:
        """Support-hours seconds from ``a`` to ``b``; negative when ``b`` is before ``a``
        (e.g. the working time by which a deadline has passed)."""
        a, b = self.local(a), self.local(b)
        if b < a:
            return -self.working_seconds_between(b, a)
        total = timedelta(0)
        for begin, end in self._periods_from(a):
            if begin >= b:
                break
            total += min(end, b) - begin
        return total.total_seconds()

    def upcoming_holidays(self, start: date, end: date, locale: str = "en") -> list[tuple[date, str]]:
        """Public holidays from ``start`` to ``end`` with their names (when ``holidays`` is
        the package's calendar; an empty list for a plain set)."""
        if isinstance(self.holidays, KyrgyzHolidays):
            return self.holidays.between(start, end, locale)
        return []


def is_late(calendar: WorkingCalendar, noticed_at: datetime | None, reported_at: datetime) -> bool:
    """The reporter's side of the rule: a report filed more than one working day after the
    person noticed the problem is late. Unknown or future ``noticed_at``: not late."""
    if noticed_at is None:
        return False
    return as_aware(reported_at) > calendar.deadline(noticed_at)


# --- settings and the database -----------------------------------------------------------------
def support_hours(settings: Settings) -> tuple[time, time]:
    """``support_opens`` / ``support_closes`` ("HH:MM") as times."""
    return time.fromisoformat(settings.support_opens), time.fromisoformat(settings.support_closes)


def load_calendar(db: Session, settings: Settings) -> WorkingCalendar:
    """The calendar in force: KG public holidays, the overrides stored in the database,
    the support hours from the settings."""
    days_off: set[date] = set()
    working: set[date] = set()
    for row in db.scalars(select(CalendarDay)):
        (working if row.kind == WORKING else days_off).add(row.day)
    opens, closes = support_hours(settings)
    return WorkingCalendar(
        holidays=KyrgyzHolidays(),
        days_off=frozenset(days_off),
        working_days=frozenset(working),
        opens=opens,
        closes=closes,
        tz=SCHOOL_TZ,
        transferred_working_days=KyrgyzTransferredWorkingDays(),
    )


def recompute_open_deadlines(db: Session, calendar: WorkingCalendar, *, actor: str = "system") -> int:
    """After a calendar change: set the deadline of every case not yet resolved from its
    report time again (each change is a case step). Returns how many changed. The caller
    commits."""
    from idp.breach.models import BreachCase, BreachCaseStep

    changed = 0
    for case in db.scalars(select(BreachCase).where(BreachCase.state != "resolved")):
        new = to_naive_utc(calendar.deadline(case.reported_at))
        old = case.deadline_at
        if old == new:
            continue
        case.deadline_at = new
        db.add(BreachCaseStep(
            case_id=case.id, actor=actor, action="deadline:recompute", note="",
            details={"from": old.isoformat() + "Z" if old else None, "to": new.isoformat() + "Z"},
        ))
        changed += 1
    if changed:
        db.flush()
    return changed
