"""When a session times out (idp/sessions/records.py) and how a person recognises its
device (idp/sessions/devices.py): the rules behind "My sessions", the store, the refresh
grant and the sweep (N24, ASVS 7.3.1/7.3.2)."""

from __future__ import annotations

import pytest

from idp.sessions.devices import describe_device
from idp.sessions.records import (
    ABSOLUTE,
    IDLE,
    deadline,
    parse_deadline_member,
    timeouts,
    ttl_until,
)

DEFAULTS = {"idle_default": 3600, "absolute_default": 43200}
NOW = 1_800_000_000.0


def test_the_idle_limit_ends_an_unused_session_first():
    data = {"auth_time": int(NOW - 100), "authenticated_at": NOW - 100, "last_seen": NOW - 50}
    assert deadline(data, now=NOW, **DEFAULTS) == (NOW - 50 + 3600, IDLE)


def test_the_absolute_limit_ends_a_busy_session():
    data = {"auth_time": int(NOW - 43000), "authenticated_at": NOW - 43000, "last_seen": NOW}
    assert deadline(data, now=NOW, **DEFAULTS) == (NOW - 43000 + 43200, ABSOLUTE)


def test_the_sessions_own_timeouts_win_over_the_defaults():
    data = {"authenticated_at": NOW - 10, "last_seen": NOW - 10, "idle_timeout": 60, "absolute_timeout": 600}
    assert timeouts(data, **DEFAULTS) == (60, 600)
    assert deadline(data, now=NOW, **DEFAULTS) == (NOW + 50, IDLE)


@pytest.mark.parametrize("bad", [None, 0, -5, "60", True])
def test_a_missing_or_odd_timeout_falls_back_to_the_default(bad):
    assert timeouts({"idle_timeout": bad, "absolute_timeout": bad}, **DEFAULTS) == (3600, 43200)


def test_a_re_authentication_restarts_the_absolute_clock():
    """N24: a successful re-authentication (``authenticated_at``) resets both timeouts,
    even when the weaker re-authentication left ``auth_time`` as it was."""
    data = {"auth_time": int(NOW - 43000), "authenticated_at": NOW - 5, "last_seen": NOW - 5}
    ends, kind = deadline(data, now=NOW, **DEFAULTS)
    assert kind == IDLE and ends == NOW - 5 + 3600


def test_ttls_are_whole_seconds_and_never_zero():
    assert ttl_until(NOW + 0.2, NOW) == 1
    assert ttl_until(NOW - 10, NOW) == 1
    assert ttl_until(NOW + 59.1, NOW) == 60


def test_deadline_members_name_account_and_session():
    assert parse_deadline_member(b"12:abc-DEF_9") == (12, "abc-DEF_9")
    assert parse_deadline_member("x:abc") is None
    assert parse_deadline_member("12:") is None


@pytest.mark.parametrize(
    ("user_agent", "label"),
    [
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
         "Safari/537.36", "Chrome 126, Windows 10"),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/17.5 Mobile/15E148 Safari/604.1", "Mobile Safari 17, iOS 17.5, iPhone"),
        ("Mozilla/5.0 (Linux; Android 13; SM-A515F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile "
         "Safari/537.36", "Chrome 120, Android 13, Samsung SM-A515F"),
        ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", "Firefox 128, Ubuntu"),
        ("", ""),
        (None, ""),
        ("\x00\x01 nonsense", ""),
    ],
)
def test_devices_are_named_the_way_people_know_them(user_agent, label):
    assert describe_device(user_agent) == label


def test_a_huge_user_agent_gives_a_short_label():
    assert len(describe_device("Mozilla/5.0 " + "x" * 100_000)) <= 128
