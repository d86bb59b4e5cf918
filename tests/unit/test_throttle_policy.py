"""The sign-in delay schedule: free failures, then 5 s, 15 s, 30 s, 1 min, 2 min,
doubling, capped (checklist §6 item 4, N13)."""

from __future__ import annotations

import pytest

from idp.login.throttle import delay_after


@pytest.mark.parametrize("failures", [-1, 0, 1, 2, 3, 4, 5])
def test_the_first_five_failures_cost_nothing(failures: int) -> None:
    assert delay_after(failures) == 0


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(6, 5), (7, 15), (8, 30), (9, 60), (10, 120), (11, 240), (12, 480), (13, 900), (14, 900), (100, 900)],
)
def test_delays_grow_after_the_free_failures(failures: int, seconds: int) -> None:
    assert delay_after(failures) == seconds


def test_delays_never_shrink_and_stop_at_the_cap() -> None:
    delays = [delay_after(n) for n in range(0, 500)]
    assert delays == sorted(delays)
    assert max(delays) == 900


def test_the_free_allowance_and_the_cap_are_settings() -> None:
    assert [delay_after(n, free_failures=50) for n in (50, 51, 52)] == [0, 5, 15]
    assert delay_after(8, max_delay=20) == 20
    assert delay_after(10**9, free_failures=0, max_delay=3600) == 3600


def test_no_free_failures_means_a_delay_after_the_first() -> None:
    assert delay_after(1, free_failures=0) == 5
