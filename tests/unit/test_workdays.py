"""The working calendar and the one-working-day deadline (policy 5.2.3), as a pure function:
table tests against Kyrgyz holidays as the ``holidays`` package gives them, and
property tests over arbitrary report times and calendars."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idp.config import Settings, SettingsError
from idp.workdays.calendar import (
    SCHOOL_TZ,
    CalendarError,
    KyrgyzHolidays,
    KyrgyzTransferredWorkingDays,
    WorkingCalendar,
    is_late,
)


def kg(days_off: set[date] | None = None, working: set[date] | None = None,
       opens: time = time(9), closes: time = time(18)) -> WorkingCalendar:
    return WorkingCalendar(holidays=KyrgyzHolidays(), days_off=frozenset(days_off or ()),
                           working_days=frozenset(working or ()), opens=opens, closes=closes,
                           transferred_working_days=KyrgyzTransferredWorkingDays())


def at(text: str) -> datetime:
    """A time; without an offset it is Asia/Bishkek."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=SCHOOL_TZ)


CASES = [
    # (why, reported at, deadline in Asia/Bishkek)
    ("Friday evening counts on into Monday", "2026-11-20T17:30", "2026-11-23T17:30"),
    ("Saturday starts at Monday's opening, ends at its closing", "2026-11-21T11:00", "2026-11-23T18:00"),
    ("Sunday night", "2026-11-22T23:59", "2026-11-23T18:00"),
    ("inside hours: the same time next working day", "2026-11-24T10:15", "2026-11-25T10:15"),
    ("before opening: the same day's closing", "2026-11-24T07:00", "2026-11-24T18:00"),
    ("exactly at opening: ends at that day's closing, not the next opening", "2026-11-24T09:00",
     "2026-11-24T18:00"),
    ("exactly at closing: the next working day's closing", "2026-11-24T18:00", "2026-11-25T18:00"),
    ("one second before closing", "2026-11-24T17:59:59", "2026-11-25T17:59:59"),
    ("after closing on a Friday", "2026-11-27T20:00", "2026-11-30T18:00"),
    # May 2026: Labour Day Fri 1, May holidays 2-4 and 6-8, Constitution Day Tue 5, Victory
    # Day Sat 9: the first working day after Thursday 30 April is Monday 11 May.
    ("the 1-9 May block (2026)", "2026-04-30T17:00", "2026-05-11T17:00"),
    ("inside the May block (2026)", "2026-05-05T12:00", "2026-05-11T18:00"),
    # May 2027: Labour Day Sat 1 ... Victory Day Sun 9; Mon 3 to Fri 7 are days off.
    ("the 1-9 May block (2027)", "2027-04-30T12:00", "2027-05-10T12:00"),
    # New Year: 1-6 January are New Year holidays from 2026 on, 7 January is Christmas.
    ("New Year's Eve 2026", "2026-12-31T17:00", "2027-01-08T17:00"),
    ("New Year's Eve 2025", "2025-12-31T17:00", "2026-01-08T17:00"),
    ("New Year's Eve after closing", "2026-12-31T18:30", "2027-01-08T18:00"),
    # 2025: 2 January was a day off transferred from Saturday 11 January (a working day);
    # 3 and 6 January additional days off, 7 January Christmas.
    ("New Year 2025 with its transferred day off", "2025-01-01T10:00", "2025-01-08T18:00"),
    ("the Saturday made working by the transfer (2025)", "2025-01-10T17:00", "2025-01-11T17:00"),
    ("Nooruz 2026 on a Saturday, Orozo Ait on Friday 20 March", "2026-03-19T12:00", "2026-03-23T12:00"),
    ("Independence Day 2026 on a Monday", "2026-08-28T15:00", "2026-09-01T15:00"),
    # Days made working by the 2025 Labour Code are working days.
    ("23 February 2026 is a working day", "2026-02-20T17:00", "2026-02-23T17:00"),
    ("7 November 2025 is a working day", "2025-11-06T12:00", "2025-11-07T12:00"),
    # Input in other offsets: converted to Asia/Bishkek (UTC+6, no daylight saving).
    ("UTC input: 11:30Z is Friday 17:30 in Bishkek", "2026-11-20T11:30+00:00", "2026-11-23T17:30"),
    ("UTC 'Z' input on Sunday evening is Monday 01:00", "2026-11-22T19:00Z", "2026-11-23T18:00"),
    ("New York input: Friday 20:00 -05:00 is Saturday 07:00", "2026-11-20T20:00-05:00", "2026-11-23T18:00"),
    ("Tokyo input: Monday 12:00 +09:00 is 09:00 in Bishkek", "2026-11-23T12:00+09:00", "2026-11-23T18:00"),
    ("India input, a half-hour offset", "2026-11-23T10:00+05:30", "2026-11-24T10:30"),
]


@pytest.mark.parametrize(("why", "reported", "expected"), CASES, ids=[c[0] for c in CASES])
def test_deadline_table(why: str, reported: str, expected: str) -> None:
    deadline = kg().deadline(at(reported))
    assert deadline == at(expected), why
    assert deadline.utcoffset() == timedelta(hours=6)
    assert deadline.tzinfo == SCHOOL_TZ


def test_the_package_knows_the_kyrgyz_days_this_table_relies_on() -> None:
    holidays = KyrgyzHolidays()
    for day in ("2026-05-01", "2026-05-04", "2026-05-05", "2026-05-08", "2027-05-03", "2027-05-07",
                "2026-01-02", "2026-01-06", "2026-01-07", "2027-01-01", "2025-01-02", "2026-03-20"):
        assert date.fromisoformat(day) in holidays, day
    assert date(2025, 1, 11) in KyrgyzTransferredWorkingDays()
    assert date(2026, 11, 23) not in holidays
    assert holidays.name(date(2026, 5, 9), "en") == "Victory Day"
    assert holidays.name(date(2026, 5, 9), "ru")


def test_a_school_day_off_and_a_declared_working_saturday() -> None:
    # The school moves Monday 23 November off and works Saturday 21 November instead.
    calendar = kg(days_off={date(2026, 11, 23)}, working={date(2026, 11, 21)})
    assert not calendar.is_working_day(date(2026, 11, 23))
    assert calendar.is_working_day(date(2026, 11, 21))
    assert calendar.deadline(at("2026-11-20T17:30")) == at("2026-11-21T17:30")
    assert calendar.deadline(at("2026-11-21T19:00")) == at("2026-11-24T18:00")
    # A declared working day wins over a public holiday; a day off over the weekday.
    on_victory_day = kg(working={date(2026, 5, 8)})
    assert on_victory_day.deadline(at("2026-04-30T17:00")) == at("2026-05-08T17:00")


def test_other_support_hours() -> None:
    calendar = kg(opens=time(8, 30), closes=time(13, 0))
    assert calendar.deadline(at("2026-11-24T12:00")) == at("2026-11-25T12:00")
    assert calendar.deadline(at("2026-11-24T13:30")) == at("2026-11-25T13:00")
    assert calendar.deadline(at("2026-11-20T12:30")) == at("2026-11-23T12:30")


def test_naive_input_is_utc() -> None:
    assert kg().deadline(datetime(2026, 11, 20, 11, 30)) == at("2026-11-23T17:30")


def test_working_seconds_between() -> None:
    calendar = kg()
    hour = 3600.0
    assert calendar.working_seconds_between(at("2026-11-20T17:30"), at("2026-11-23T17:30")) == 9 * hour
    assert calendar.working_seconds_between(at("2026-11-21T11:00"), at("2026-11-23T10:00")) == hour
    assert calendar.working_seconds_between(at("2026-11-23T10:00"), at("2026-11-21T11:00")) == -hour
    assert calendar.working_seconds_between(at("2026-04-30T17:00"), at("2026-05-10T23:00")) == hour
    assert calendar.working_seconds_between(at("2026-11-24T19:00"), at("2026-11-24T20:00")) == 0


def test_late_reports() -> None:
    calendar = kg()
    assert not is_late(calendar, at("2026-11-20T17:30"), at("2026-11-23T17:30"))
    assert is_late(calendar, at("2026-11-20T17:30"), at("2026-11-23T17:31"))
    assert not is_late(calendar, None, at("2026-11-23T17:31"))
    assert not is_late(calendar, at("2026-11-24T10:00"), at("2026-11-23T10:00"))
    # Noticed during the May holidays: not late until Monday 11 May 18:00.
    assert not is_late(calendar, at("2026-05-02T10:00"), at("2026-05-11T17:59"))
    assert is_late(calendar, at("2026-05-02T10:00"), at("2026-05-11T18:01"))


def test_bad_calendars_are_refused() -> None:
    with pytest.raises(CalendarError):
        WorkingCalendar(holidays=set(), opens=time(18), closes=time(9))
    nothing = WorkingCalendar(holidays=set(), days_off={date(2026, 1, 1) + timedelta(days=n) for n in range(20000)})
    with pytest.raises(CalendarError):
        nothing.deadline(at("2026-01-01T10:00"))


def test_support_hours_settings_are_checked() -> None:
    assert Settings.from_env({}).support_opens == "09:00"
    assert Settings.from_env({"IDP_SUPPORT_OPENS": "08:30", "IDP_SUPPORT_CLOSES": "17:00"}).support_closes == "17:00"
    with pytest.raises(SettingsError, match="IDP_SUPPORT_OPENS"):
        Settings.from_env({"IDP_SUPPORT_OPENS": "nine"})
    with pytest.raises(SettingsError, match="before"):
        Settings.from_env({"IDP_SUPPORT_OPENS": "18:00", "IDP_SUPPORT_CLOSES": "09:00"})


# --- properties ---------------------------------------------------------------------------------
OFFSETS = st.sampled_from([UTC, SCHOOL_TZ, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30)),
                           timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])
MOMENTS = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31)), OFFSETS,
)
DAYS = st.dates(min_value=date(2024, 1, 1), max_value=date(2029, 1, 31))
HOURS = st.tuples(st.integers(0, 22), st.integers(0, 59)).flatmap(
    lambda start: st.tuples(st.just(time(*start)),
                            st.builds(lambda m: (datetime(2000, 1, 1, *start) + timedelta(minutes=m)).time(),
                                      st.integers(1, (23 - start[0]) * 60 + 59 - start[1])))
)
CALENDARS = st.builds(
    lambda off, working, hours: kg(days_off=off, working=working, opens=hours[0], closes=hours[1]),
    st.sets(DAYS, max_size=40), st.sets(DAYS, max_size=10), HOURS,
)


@settings(max_examples=300, deadline=None)
@given(calendar=CALENDARS, reported=MOMENTS)
def test_deadline_is_within_support_hours_of_a_working_day(calendar: WorkingCalendar, reported: datetime) -> None:
    deadline = calendar.deadline(reported)
    assert deadline.tzinfo == SCHOOL_TZ
    assert calendar.is_working_day(deadline.date())
    assert calendar.opens < deadline.timetz().replace(tzinfo=None) <= calendar.closes


@settings(max_examples=300, deadline=None)
@given(calendar=CALENDARS, reported=MOMENTS)
def test_deadline_is_never_earlier_than_the_report_and_is_one_working_day_away(
    calendar: WorkingCalendar, reported: datetime
) -> None:
    deadline = calendar.deadline(reported)
    assert deadline >= reported + calendar.day_length
    assert calendar.working_seconds_between(reported, deadline) == calendar.day_length.total_seconds()


@settings(max_examples=300, deadline=None)
@given(calendar=CALENDARS, first=MOMENTS, later_by=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20)))
def test_deadline_is_monotonic_in_the_report_time(calendar: WorkingCalendar, first: datetime,
                                                  later_by: timedelta) -> None:
    assert calendar.deadline(first) <= calendar.deadline(first + later_by)
