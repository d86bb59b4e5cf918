"""The access decision (policy 5.1, 4.2.5; DESIGN "Restrictions"): one pure function,
table tests for each rule and their combinations, and property tests over many
restrictions, times, addresses and scopes."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idp.access import decision as d
from idp.access.decision import AccessContext, AccessSettings, AccountFacts, Rule, decide
from idp.access.networks import NetworkError, check_entries, network_of, validate_networks
from idp.config import Settings, SettingsError

BISHKEK = ZoneInfo("Asia/Bishkek")
NETWORKS = {"school": ["10.0.0.0/8", "fd00:5c::/32"], "lab": ["10.20.0.0/16"], "library": ["192.168.7.0/24"]}
SETTINGS = AccessSettings(networks=NETWORKS, shared_networks=frozenset({"lab"}), idle_timeout=3600,
                          absolute_timeout=43200, shared_idle_timeout=900, shared_absolute_timeout=3600)
STUDENT = AccountFacts(id=7, roles=frozenset({"student"}))
INSIDE = "10.1.2.3"
OUTSIDE = "203.0.113.9"


def bishkek(day: int, hour: int, minute: int = 0) -> datetime:
    """A moment in March 2025 given in Bishkek time (2025-03-03 is a Monday), as UTC."""
    return datetime(2025, 3, day, hour, minute, tzinfo=BISHKEK).astimezone(UTC)


MONDAY, TUESDAY, FRIDAY, SATURDAY, SUNDAY = 3, 4, 7, 8, 9


def ctx(*, phase: str = d.AUTHORIZE, now: datetime | None = None, client: str | None = "library",
        ip: str | None = INSIDE, scopes: tuple[str, ...] = ("openid",), amr: tuple[str, ...] = ("pwd",),
        client_roles: frozenset[str] = frozenset()) -> AccessContext:
    return AccessContext(phase=phase, now=now or bishkek(TUESDAY, 10), settings=SETTINGS, client_id=client,
                         client_allowed_roles=client_roles, ip=ip, scopes=scopes, amr=frozenset(amr))


def hours(start: str, end: str) -> tuple[time, time]:
    return d.parse_hhmm(start), d.parse_hhmm(end)


def codes(decision: d.Decision) -> list[str]:
    return decision.codes


# --- no restriction ----------------------------------------------------------------------
def test_without_restrictions_everything_is_allowed_with_the_default_session() -> None:
    decision = decide(STUDENT, [], ctx(scopes=("openid", "school")))
    assert decision.allowed and decision.reasons == ()
    assert decision.granted_scopes == ("openid", "school")
    assert decision.session == d.SessionPolicy(idle_timeout=3600, absolute_timeout=43200)
    assert decision.network == "school"


# --- hours and weekdays in Asia/Bishkek --------------------------------------------------
@pytest.mark.parametrize(
    ("window", "day", "hour", "minute", "allowed"),
    [
        (("08:00", "18:00"), TUESDAY, 7, 59, False),
        (("08:00", "18:00"), TUESDAY, 8, 0, True),
        (("08:00", "18:00"), TUESDAY, 17, 59, True),
        (("08:00", "18:00"), TUESDAY, 18, 0, False),
        (("08:00", "18:00"), TUESDAY, 23, 30, False),
        # A window crossing midnight.
        (("22:00", "06:00"), TUESDAY, 21, 59, False),
        (("22:00", "06:00"), TUESDAY, 22, 0, True),
        (("22:00", "06:00"), TUESDAY, 2, 0, True),
        (("22:00", "06:00"), TUESDAY, 5, 59, True),
        (("22:00", "06:00"), TUESDAY, 6, 0, False),
        (("22:00", "06:00"), TUESDAY, 12, 0, False),
    ],
)
def test_hours(window: tuple[str, str], day: int, hour: int, minute: int, allowed: bool) -> None:
    decision = decide(STUDENT, [Rule(id=1, hours=hours(*window))], ctx(now=bishkek(day, hour, minute)))
    assert decision.allowed is allowed
    if not allowed:
        assert codes(decision) == [d.OUTSIDE_HOURS]
        assert decision.denials[0].params == {"start": window[0], "end": window[1]}
        assert decision.denials[0].restriction_id == 1


def test_hours_are_school_time_not_utc() -> None:
    rule = Rule(id=1, hours=hours("08:00", "18:00"))
    # 03:00 UTC is 09:00 in Bishkek (UTC+6): inside the window, though 03:00 is not.
    morning = datetime(2025, 3, 4, 3, 0, tzinfo=UTC)
    assert decide(STUDENT, [rule], ctx(now=morning)).allowed
    # 13:00 UTC is 19:00 in Bishkek: outside.
    assert not decide(STUDENT, [rule], ctx(now=datetime(2025, 3, 4, 13, 0, tzinfo=UTC))).allowed


@pytest.mark.parametrize(
    ("now", "allowed"),
    [
        (bishkek(MONDAY, 10), True),
        (bishkek(FRIDAY, 23), True),
        (bishkek(SATURDAY, 10), False),
        (bishkek(SUNDAY, 23, 59), False),
        # Sunday 23:30 UTC is Monday 05:30 in Bishkek.
        (datetime(2025, 3, 9, 23, 30, tzinfo=UTC), True),
        # Friday 20:00 UTC is Saturday 02:00 in Bishkek.
        (datetime(2025, 3, 7, 20, 0, tzinfo=UTC), False),
    ],
)
def test_weekdays_in_bishkek(now: datetime, allowed: bool) -> None:
    decision = decide(STUDENT, [Rule(id=2, allowed_weekdays=frozenset({0, 1, 2, 3, 4}))], ctx(now=now))
    assert decision.allowed is allowed
    if not allowed:
        assert codes(decision) == [d.OUTSIDE_WEEKDAYS]
        assert decision.denials[0].params == {"weekdays": [0, 1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # A night window on weekdays belongs to the day it starts: Friday night runs into Saturday ...
        (bishkek(FRIDAY, 23), []),
        (bishkek(SATURDAY, 2), []),
        # ... but no window starts on Saturday or Sunday.
        (bishkek(SATURDAY, 23), [d.OUTSIDE_WEEKDAYS]),
        (bishkek(MONDAY, 2), [d.OUTSIDE_WEEKDAYS]),
        (bishkek(MONDAY, 22, 30), []),
        (bishkek(SATURDAY, 12), [d.OUTSIDE_HOURS, d.OUTSIDE_WEEKDAYS]),
    ],
)
def test_a_night_window_on_weekdays(now: datetime, expected: list[str]) -> None:
    rule = Rule(id=3, hours=hours("22:00", "06:00"), allowed_weekdays=frozenset({0, 1, 2, 3, 4}))
    assert codes(decide(STUDENT, [rule], ctx(now=now))) == expected


def test_equal_start_and_end_is_the_whole_day() -> None:
    rule = Rule(id=1, hours=hours("07:00", "07:00"))
    assert all(decide(STUDENT, [rule], ctx(now=bishkek(TUESDAY, h))).allowed for h in range(24))


@pytest.mark.parametrize("text", ["7:00", "24:00", "12:60", "ab:cd", "1200", "", "12:5"])
def test_bad_hh_mm_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        d.parse_hhmm(text)


# --- networks ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", "school"),
        ("10.20.5.6", "lab"),  # the most specific network wins
        ("192.168.7.20", "library"),
        ("fd00:5c::1", "school"),
        ("::ffff:10.20.0.1", "lab"),  # IPv4-mapped IPv6 counts as IPv4
        ("203.0.113.9", "outside"),
        ("2001:db8::1", "outside"),
        ("not an ip", "outside"),
        ("", "outside"),
        (None, "outside"),
    ],
)
def test_network_of(ip: str | None, expected: str) -> None:
    assert network_of(ip, NETWORKS) == expected


@pytest.mark.parametrize(
    ("allowed_networks", "ip", "allowed"),
    [
        (("school",), "10.1.2.3", True),
        (("school",), "10.20.0.9", True),  # a lab nested in the school network is the school too
        (("lab",), "10.1.2.3", False),
        (("school",), "203.0.113.9", False),
        (("school",), "fd00:5c:1::7", True),
        (("school",), "2001:db8::1", False),
        (("203.0.113.0/24",), "203.0.113.9", True),
        (("203.0.113.0/24",), "203.0.114.9", False),
        (("2001:db8::/32",), "2001:db8:0:1::5", True),
        (("2001:db8::/32",), "10.1.2.3", False),
        (("library", "203.0.113.9/32"), "203.0.113.9", True),
        (("no-such-network",), "10.1.2.3", False),
        ((), "10.1.2.3", False),
        (("school",), "", False),  # a door that sees the person but no address: outside
    ],
)
def test_allowed_networks(allowed_networks: tuple[str, ...], ip: str, allowed: bool) -> None:
    decision = decide(STUDENT, [Rule(id=4, allowed_networks=allowed_networks)], ctx(ip=ip))
    assert decision.allowed is allowed
    if not allowed:
        assert codes(decision) == [d.NETWORK_NOT_ALLOWED]
        # The person is told network names, never address blocks.
        assert decision.denials[0].params == {"networks": [n for n in allowed_networks if n in NETWORKS]}


def test_network_rules_wait_for_a_door_that_sees_the_person() -> None:
    rule = Rule(id=4, allowed_networks=("school",))
    at_token = decide(STUDENT, [rule], ctx(phase=d.TOKEN, ip=None))
    assert at_token.allowed and at_token.reasons == ()
    unseen_refresh = decide(STUDENT, [rule], ctx(phase=d.REFRESH, ip=None))
    assert unseen_refresh.allowed
    assert [r.code for r in unseen_refresh.reasons] == [d.NETWORK_NOT_CHECKED]
    assert not unseen_refresh.reasons[0].blocking
    assert not decide(STUDENT, [rule], ctx(phase=d.REFRESH, ip=OUTSIDE)).allowed


def test_named_networks_setting_is_validated() -> None:
    assert validate_networks({"school": ["10.0.0.0/8", "2001:db8::/32"]}) == {
        "school": ["10.0.0.0/8", "2001:db8::/32"]
    }
    for bad in ({"school": ["10.0.0.1/8"]}, {"school": []}, {"School": ["10.0.0.0/8"]},
                {"outside": ["10.0.0.0/8"]}, {"school": "10.0.0.0/8"}, ["10.0.0.0/8"], {"x": ["nope"]}):
        with pytest.raises(NetworkError):
            validate_networks(bad)
    with pytest.raises(SettingsError, match="IDP_NETWORKS"):
        Settings.from_env(environ={"IDP_NETWORKS": '{"school": ["10.0.0.1/8"]}'})
    with pytest.raises(SettingsError, match="IDP_NETWORKS is not valid JSON"):
        Settings.from_env(environ={"IDP_NETWORKS": "school=10.0.0.0/8"})
    with pytest.raises(SettingsError, match="IDP_SHARED_NETWORKS"):
        Settings.from_env(environ={"IDP_NETWORKS": '{"school": ["10.0.0.0/8"]}', "IDP_SHARED_NETWORKS": "lab"})
    parsed = Settings.from_env(environ={"IDP_NETWORKS": '{"school": ["10.0.0.0/8"], "lab": ["10.20.0.0/16"]}',
                                        "IDP_SHARED_NETWORKS": "lab"})
    assert parsed.networks == {"school": ["10.0.0.0/8"], "lab": ["10.20.0.0/16"]}
    assert parsed.shared_networks == ["lab"]
    assert Settings.from_env(environ={}).networks == {"school": ["127.0.0.0/8", "::1/128"]}


def test_restriction_network_entries_are_checked() -> None:
    assert check_entries(["school", "203.0.113.7", "2001:db8::/32", "school"], NETWORKS) == [
        "school", "203.0.113.7/32", "2001:db8::/32"
    ]
    with pytest.raises(NetworkError, match="neither"):
        check_entries(["gym"], NETWORKS)
    with pytest.raises(NetworkError, match="host bits"):
        check_entries(["10.1.0.0/8"], NETWORKS)


# --- validity window --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("valid_from", "valid_until", "now", "expected"),
    [
        (bishkek(MONDAY, 0), bishkek(SATURDAY, 0), bishkek(TUESDAY, 10), []),
        (bishkek(FRIDAY, 0), None, bishkek(TUESDAY, 10), [d.NOT_YET_VALID]),
        (None, bishkek(MONDAY, 0), bishkek(TUESDAY, 10), [d.EXPIRED]),
        # valid_until is exclusive, valid_from inclusive.
        (None, bishkek(TUESDAY, 10), bishkek(TUESDAY, 10), [d.EXPIRED]),
        (bishkek(TUESDAY, 10), None, bishkek(TUESDAY, 10), []),
    ],
)
def test_validity_window(valid_from: datetime | None, valid_until: datetime | None, now: datetime,
                         expected: list[str]) -> None:
    rule = Rule(id=5, valid_from=valid_from, valid_until=valid_until)
    assert codes(decide(STUDENT, [rule], ctx(now=now))) == expected


# --- second factor ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("amr", "allowed"),
    [(("pwd",), False), (("pwd", "otp"), False), (("pwd", "otp", "mfa"), True), (("hwk", "user", "mfa"), True)],
)
def test_second_factor_required(amr: tuple[str, ...], allowed: bool) -> None:
    decision = decide(STUDENT, [Rule(id=6, require_2fa=True)], ctx(amr=amr))
    assert decision.allowed is allowed
    assert codes(decision) == ([] if allowed else [d.SECOND_FACTOR_REQUIRED])


# --- apps -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "expected"),
    [("library", []), ("journal", [d.APP_NOT_ALLOWED]), (None, [])],
)
def test_allowed_apps(client: str | None, expected: list[str]) -> None:
    rule = Rule(id=7, allowed_clients=frozenset({"library"}))
    assert codes(decide(STUDENT, [rule], ctx(client=client))) == expected


def test_an_empty_app_list_allows_no_app_but_still_the_sign_in() -> None:
    rule = Rule(id=7, allowed_clients=frozenset())
    assert codes(decide(STUDENT, [rule], ctx(client="library"))) == [d.APP_NOT_ALLOWED]
    assert decide(STUDENT, [rule], ctx(phase=d.SIGN_IN, client=None, scopes=())).allowed


def test_the_apps_own_role_list_is_part_of_the_decision() -> None:
    teachers_only = frozenset({"teacher"})
    assert codes(decide(STUDENT, [], ctx(client_roles=teachers_only))) == [d.APP_ROLES]
    teacher = AccountFacts(id=8, roles=frozenset({"teacher"}))
    assert decide(teacher, [], ctx(client_roles=teachers_only)).allowed


# --- school-only scopes (policy 4.2.5) ---------------------------------------------------
@pytest.mark.parametrize(
    ("phase", "ip", "granted"),
    [
        (d.AUTHORIZE, INSIDE, ("openid", "school", "email")),
        (d.AUTHORIZE, "10.20.1.1", ("openid", "school", "email")),  # the lab is inside the school
        (d.AUTHORIZE, OUTSIDE, ("openid", "email")),
        (d.REFRESH, INSIDE, ("openid", "school", "email")),
        (d.REFRESH, OUTSIDE, ("openid", "email")),
        (d.REFRESH, None, ("openid", "email")),  # a confidential app's server: the person is not seen
        (d.TOKEN, None, ("openid", "school", "email")),  # the code carries what authorization granted
    ],
)
def test_school_only_scopes(phase: str, ip: str | None, granted: tuple[str, ...]) -> None:
    rule = Rule(id=9, school_only_scopes=frozenset({"school", "roles"}))
    decision = decide(STUDENT, [rule], ctx(phase=phase, ip=ip, scopes=("openid", "school", "email")))
    assert decision.allowed, "the rest of the grant goes on"
    assert decision.granted_scopes == granted
    if "school" not in granted:
        assert decision.withheld_scopes == ("school",)
        (note,) = [r for r in decision.reasons if r.code == d.SCOPES_SCHOOL_ONLY]
        assert not note.blocking and note.params == {"scopes": ["school"]} and note.restriction_id == 9
    else:
        assert decision.withheld_scopes == ()


# --- the account ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (AccountFacts(id=1, locked=True), [d.ACCOUNT_LOCKED]),
        (AccountFacts(id=1, active=False), [d.ACCOUNT_DISABLED]),
        (AccountFacts(id=1, active=False, locked=True), [d.ACCOUNT_DISABLED]),
        (AccountFacts(id=1), []),
    ],
)
def test_account_state(facts: AccountFacts, expected: list[str]) -> None:
    decision = decide(facts, [], ctx())
    assert codes(decision) == expected
    if expected:
        assert decision.granted_scopes == () and decision.lasting


# --- combinations: every restriction must allow; the smallest limits win ------------------
def test_every_restriction_must_allow() -> None:
    wide = Rule(id=10, role="student", hours=hours("07:00", "20:00"))
    narrow = Rule(id=11, hours=hours("09:00", "17:00"))
    at_8_30 = ctx(now=bishkek(TUESDAY, 8, 30))
    assert decide(STUDENT, [wide], at_8_30).allowed
    refused = decide(STUDENT, [wide, narrow], at_8_30)
    assert not refused.allowed
    assert [(r.code, r.restriction_id) for r in refused.denials] == [(d.OUTSIDE_HOURS, 11)]


def test_all_reasons_are_reported() -> None:
    rules = [Rule(id=12, hours=hours("08:00", "18:00"), allowed_networks=("school",)),
             Rule(id=13, allowed_clients=frozenset({"journal"}), require_2fa=True)]
    decision = decide(AccountFacts(id=1, locked=True), rules, ctx(now=bishkek(SATURDAY, 20), ip=OUTSIDE))
    assert decision.codes == [d.ACCOUNT_LOCKED, d.OUTSIDE_HOURS, d.NETWORK_NOT_ALLOWED, d.APP_NOT_ALLOWED,
                              d.SECOND_FACTOR_REQUIRED]


def test_time_and_place_refusals_pass_but_others_last() -> None:
    passing = decide(STUDENT, [Rule(id=1, hours=hours("08:00", "09:00"))], ctx(now=bishkek(TUESDAY, 12)))
    assert not passing.allowed and not passing.lasting
    lasting = decide(STUDENT, [Rule(id=1, hours=hours("08:00", "09:00"), allowed_clients=frozenset())],
                     ctx(now=bishkek(TUESDAY, 12)))
    assert lasting.lasting


@pytest.mark.parametrize(
    ("rules", "ip", "expected"),
    [
        ([], INSIDE, d.SessionPolicy(3600, 43200)),
        ([], "10.20.0.4", d.SessionPolicy(900, 3600)),  # a shared computer lab
        ([Rule(idle_timeout=600)], INSIDE, d.SessionPolicy(600, 43200)),
        ([Rule(idle_timeout=600), Rule(idle_timeout=1800, absolute_timeout=7200)], INSIDE,
         d.SessionPolicy(600, 7200)),
        ([Rule(idle_timeout=7200, absolute_timeout=86400)], INSIDE, d.SessionPolicy(3600, 43200)),
        ([Rule(idle_timeout=300)], "10.20.0.4", d.SessionPolicy(300, 3600)),
        ([Rule(max_sessions=3), Rule(max_sessions=2, at_session_limit=d.END_OLDEST)], INSIDE,
         d.SessionPolicy(3600, 43200, 2, d.END_OLDEST)),
        ([Rule(max_sessions=2, at_session_limit=d.END_OLDEST), Rule(max_sessions=2)], INSIDE,
         d.SessionPolicy(3600, 43200, 2, d.REFUSE)),
        ([Rule(max_sessions=1, at_session_limit=d.END_OLDEST)], None, d.SessionPolicy(3600, 43200, 1, d.END_OLDEST)),
    ],
)
def test_session_policy_smallest_wins(rules: list[Rule], ip: str | None, expected: d.SessionPolicy) -> None:
    assert decide(STUDENT, rules, ctx(phase=d.SIGN_IN, ip=ip, client=None, scopes=())).session == expected


def test_a_refusal_tells_the_app_only_the_kind() -> None:
    rule = Rule(id=99, role="student", hours=hours("08:00", "09:00"), allowed_networks=("lab",))
    decision = decide(STUDENT, [rule], ctx(now=bishkek(TUESDAY, 12), ip=OUTSIDE))
    text = d.protocol_description(decision)
    assert "hours" in text
    assert text.isascii() and "99" not in text and "lab" not in text and "student" not in text


def test_context_needs_an_aware_time_and_a_known_door() -> None:
    with pytest.raises(ValueError):
        AccessContext(phase=d.AUTHORIZE, now=datetime(2025, 3, 4, 10, 0))
    with pytest.raises(ValueError):
        AccessContext(phase="logout", now=bishkek(TUESDAY, 10))


# --- properties -------------------------------------------------------------------------
IPS = ["10.1.2.3", "10.20.0.4", "192.168.7.1", "203.0.113.9", "fd00:5c::9", "2001:db8::1", "::ffff:10.1.1.1", ""]
CLIENTS = ["library", "journal", "timetable"]
SCOPES = ["openid", "profile", "email", "school", "roles"]
NETWORK_ENTRIES = ["school", "lab", "library", "203.0.113.0/24", "2001:db8::/32", "10.1.0.0/16"]
START = datetime(2025, 1, 1, tzinfo=UTC)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.one_of(st.none(), strategy)


times = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))
moments = st.integers(0, 60 * 24 * 60).map(lambda minutes: START + timedelta(minutes=minutes))

rules = st.builds(
    Rule,
    id=st.integers(1, 1000),
    allowed_clients=maybe(st.frozensets(st.sampled_from(CLIENTS))),
    allowed_weekdays=maybe(st.frozensets(st.integers(0, 6))),
    hours=maybe(st.tuples(times, times)),
    allowed_networks=maybe(st.lists(st.sampled_from(NETWORK_ENTRIES), max_size=3).map(tuple)),
    max_sessions=maybe(st.integers(1, 5)),
    at_session_limit=st.sampled_from([d.REFUSE, d.END_OLDEST]),
    require_2fa=st.booleans(),
    valid_from=maybe(moments),
    valid_until=maybe(moments),
    school_only_scopes=st.frozensets(st.sampled_from(SCOPES)),
    idle_timeout=maybe(st.integers(60, 7200)),
    absolute_timeout=maybe(st.integers(600, 86400)),
)
facts = st.builds(AccountFacts, id=st.just(1), active=st.booleans(), locked=st.booleans(),
                  roles=st.frozensets(st.sampled_from(["student", "teacher", "staff"])))
contexts = st.builds(
    AccessContext,
    phase=st.sampled_from(d.PHASES),
    now=moments,
    settings=st.just(SETTINGS),
    client_id=maybe(st.sampled_from(CLIENTS)),
    client_allowed_roles=st.frozensets(st.sampled_from(["student", "teacher"]), max_size=1),
    ip=maybe(st.sampled_from(IPS)),
    scopes=st.lists(st.sampled_from(SCOPES), unique=True).map(tuple),
    amr=st.frozensets(st.sampled_from(["pwd", "otp", "hwk", "mfa"])),
)


def holds(rule: Rule, context: AccessContext) -> bool:
    """Whether ``rule`` allows ``context``, computed apart from the implementation."""
    local = context.now.astimezone(BISHKEK)
    minute = local.hour * 60 + local.minute
    day = local.weekday()
    if rule.hours is not None:
        start = rule.hours[0].hour * 60 + rule.hours[0].minute
        end = rule.hours[1].hour * 60 + rule.hours[1].minute
        if start < end and not start <= minute < end:
            return False
        if start > end:
            if end <= minute < start:
                return False
            if minute < end:
                day = (day + 6) % 7
    if rule.allowed_weekdays is not None and day not in rule.allowed_weekdays:
        return False
    if rule.allowed_clients is not None and context.client_id is not None:
        if context.client_id not in rule.allowed_clients:
            return False
    if rule.allowed_networks is not None and context.ip is not None:
        try:
            address = ipaddress.ip_address(context.ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        blocks = [b for entry in rule.allowed_networks for b in NETWORKS.get(entry, [entry] if "/" in entry else [])]
        if not any(address in ipaddress.ip_network(b) for b in blocks if ipaddress.ip_network(b).version == address.version):
            return False
    if rule.valid_from is not None and context.now < rule.valid_from:
        return False
    if rule.valid_until is not None and context.now >= rule.valid_until:
        return False
    return not (rule.require_2fa and "mfa" not in context.amr)


@settings(max_examples=400, deadline=None, database=None)
@given(facts, st.lists(rules, max_size=3), rules, contexts)
def test_adding_a_restriction_never_allows_more(account: AccountFacts, some: list[Rule], extra: Rule,
                                                context: AccessContext) -> None:
    before = decide(account, some, context)
    after = decide(account, [*some, extra], context)
    if not before.allowed:
        assert not after.allowed
    assert set(after.granted_scopes) <= set(before.granted_scopes)
    assert set(before.codes) <= set(after.codes)
    assert after.session.idle_timeout <= before.session.idle_timeout
    assert after.session.absolute_timeout <= before.session.absolute_timeout
    if before.session.max_sessions is not None:
        assert after.session.max_sessions is not None and after.session.max_sessions <= before.session.max_sessions


@settings(max_examples=400, deadline=None, database=None)
@given(facts, st.lists(rules, max_size=4), contexts)
def test_allowed_means_every_rule_holds(account: AccountFacts, some: list[Rule], context: AccessContext) -> None:
    decision = decide(account, some, context)
    every_rule_holds = (account.active and not account.locked and all(holds(rule, context) for rule in some)
                        and (context.client_id is None or not context.client_allowed_roles
                             or bool(account.roles & context.client_allowed_roles)))
    assert decision.allowed is every_rule_holds
    if decision.allowed:
        assert set(decision.granted_scopes) <= set(context.scopes)
        inside = context.ip is not None and network_of(context.ip, NETWORKS) != "outside"
        if context.phase != d.TOKEN and not inside:
            kept_in = set().union(*(r.school_only_scopes for r in some)) if some else set()
            assert not set(decision.granted_scopes) & kept_in
        else:
            assert decision.granted_scopes == tuple(dict.fromkeys(context.scopes))
    else:
        assert decision.granted_scopes == () and decision.denials


@settings(max_examples=200, deadline=None, database=None)
@given(facts, st.lists(rules, max_size=4), contexts)
def test_the_order_of_restrictions_does_not_matter(account: AccountFacts, some: list[Rule],
                                                   context: AccessContext) -> None:
    forward = decide(account, some, context)
    backward = decide(account, list(reversed(some)), context)
    assert forward.allowed == backward.allowed
    assert set(forward.codes) == set(backward.codes)
    assert set(forward.granted_scopes) == set(backward.granted_scopes)
    assert forward.session == backward.session
