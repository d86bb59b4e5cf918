"""The time as the access decision sees it: one injectable clock (DESIGN: services
receive their clock), so that tests can put the provider at 07:59 on a Saturday."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def fixed(moment: datetime) -> Clock:
    """A clock that always says ``moment`` (which must be timezone-aware)."""
    if moment.tzinfo is None:
        raise ValueError("a fixed clock needs a timezone-aware moment")
    return lambda: moment
