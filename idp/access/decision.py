"""The access decision (policy 5.1, 4.2.5; DESIGN "Restrictions"): one pure function
that says whether an account may go on, why not, which scopes it gets and how long its
session may live.

``decide(facts, rules, context)`` reads no database, no request and no clock: the
account's facts, the restrictions that apply to it (its own and its roles') and the
context (which door, which app, when, from which address, which scopes, which
sign-in methods) are all passed in, so the same call answers a sign-in, an
authorization, a token request, a refresh, the console's "why can't this person sign
in?" page and ``darbaza access explain``. ``decide_for`` loads the restrictions and
builds the facts for a stored account.

Restrictions combine strictly: every one that applies must allow, the smallest
timeouts and session limits win, and a scope withheld by any of them is withheld."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from idp.access.models import Restriction
from idp.access.networks import OUTSIDE, in_any, network_of
from idp.accounts.models import User
from idp.config import Settings
from idp.oidc.models import Client

if TYPE_CHECKING:
    from idp.row_cache import RestrictionCache

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")

SIGN_IN = "sign-in"
AUTHORIZE = "authorize"
TOKEN = "token"
REFRESH = "refresh"
PHASES = (SIGN_IN, AUTHORIZE, TOKEN, REFRESH)

REFUSE = "refuse"
END_OLDEST = "end_oldest"
AT_SESSION_LIMIT = (REFUSE, END_OLDEST)

# Stable reason codes: the journal, the console, the CLI and the tests use them.
ACCOUNT_DISABLED = "account-disabled"
ACCOUNT_LOCKED = "account-locked"
APP_ROLES = "app-roles"  # the app admits members of certain roles only (Client.allowed_roles)
APP_NOT_ALLOWED = "app-not-allowed"  # a restriction lists the apps the account may use
OUTSIDE_HOURS = "outside-hours"
OUTSIDE_WEEKDAYS = "outside-weekdays"
NETWORK_NOT_ALLOWED = "network-not-allowed"
NOT_YET_VALID = "not-yet-valid"
EXPIRED = "expired"
SECOND_FACTOR_REQUIRED = "second-factor-required"
# Not refusals: the rest of the request goes on.
SCOPES_SCHOOL_ONLY = "scopes-school-only"
NETWORK_NOT_CHECKED = "network-not-checked"

# Refusals that time or place can lift (the same grant may be used again later) as
# opposed to lasting ones (the grant can never be used again as it is).
PASSING = frozenset({OUTSIDE_HOURS, OUTSIDE_WEEKDAYS, NETWORK_NOT_ALLOWED, NOT_YET_VALID})


def may_use_app(user: User, client: Client) -> bool:
    """An app with allowed roles admits only members of those roles (policy 2.4)."""
    return _roles_admit(frozenset(user.role_names), frozenset(client.allowed_roles or ()))


def _roles_admit(roles: frozenset[str], allowed_roles: frozenset[str]) -> bool:
    return not allowed_roles or bool(roles & allowed_roles)


# --- what goes in -----------------------------------------------------------------------
@dataclass(frozen=True)
class AccountFacts:
    """What the decision needs to know about the account."""

    id: int
    active: bool = True
    locked: bool = False
    roles: frozenset[str] = frozenset()

    @classmethod
    def of(cls, user: User) -> AccountFacts:
        return cls(
            id=user.id,
            active=bool(user.active),
            locked=bool(user.locked),
            roles=frozenset(user.role_names),
        )


@dataclass(frozen=True)
class Rule:
    """One restriction as plain data. ``None`` (or an empty set of school-only scopes)
    does not restrict. Times are timezone-aware; ``valid_until`` is exclusive."""

    id: int | None = None
    role: str | None = None  # the role it is attached to; None: the account itself
    allowed_clients: frozenset[str] | None = None
    allowed_weekdays: frozenset[int] | None = None  # 0 = Monday .. 6 = Sunday
    hours: tuple[time, time] | None = None  # [start, end) in Asia/Bishkek; may cross midnight
    allowed_networks: tuple[str, ...] | None = None  # CIDR blocks or named networks
    max_sessions: int | None = None
    at_session_limit: str = REFUSE
    require_2fa: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    school_only_scopes: frozenset[str] = frozenset()
    idle_timeout: int | None = None
    absolute_timeout: int | None = None

    @classmethod
    def of(cls, restriction: Restriction, role_names: Mapping[int, str] | None = None) -> Rule:
        hours = None
        if restriction.hours_start and restriction.hours_end:
            hours = (parse_hhmm(restriction.hours_start), parse_hhmm(restriction.hours_end))
        role = None
        if restriction.role_id is not None:
            role = (role_names or {}).get(restriction.role_id, f"#{restriction.role_id}")
        return cls(
            id=restriction.id,
            role=role,
            allowed_clients=None if restriction.allowed_clients is None else frozenset(restriction.allowed_clients),
            allowed_weekdays=None if restriction.allowed_weekdays is None else frozenset(restriction.allowed_weekdays),
            hours=hours,
            allowed_networks=None if restriction.allowed_networks is None else tuple(restriction.allowed_networks),
            max_sessions=restriction.max_sessions,
            at_session_limit=restriction.at_session_limit or REFUSE,
            require_2fa=bool(restriction.require_2fa),
            valid_from=_aware(restriction.valid_from),
            valid_until=_aware(restriction.valid_until),
            school_only_scopes=frozenset(restriction.school_only_scopes or ()),
            idle_timeout=restriction.idle_timeout_seconds,
            absolute_timeout=restriction.absolute_timeout_seconds,
        )


@dataclass(frozen=True)
class AccessSettings:
    """The settings the decision reads: named networks and session lifetimes."""

    networks: Mapping[str, Sequence[str]] = field(default_factory=dict)
    shared_networks: frozenset[str] = frozenset()
    idle_timeout: int = 3600
    absolute_timeout: int = 43200
    shared_idle_timeout: int = 900
    shared_absolute_timeout: int = 3600

    @classmethod
    def of(cls, settings: Settings) -> AccessSettings:
        return cls(
            networks={name: tuple(blocks) for name, blocks in settings.networks.items()},
            shared_networks=frozenset(settings.shared_networks),
            idle_timeout=settings.session_idle_timeout,
            absolute_timeout=settings.session_absolute_timeout,
            shared_idle_timeout=settings.shared_network_idle_seconds,
            shared_absolute_timeout=settings.shared_network_absolute_seconds,
        )


@dataclass(frozen=True)
class AccessContext:
    """Where and when the account knocks.

    ``ip`` is the person's address, or None when the person is not seen at this door
    (a confidential app's server calling the token endpoint). Network rules are then
    not evaluated (they were at sign-in and authorization), and school-only scopes are
    not granted, except at the ``token`` door, where the code carries only the scopes
    granted at its authorization a minute earlier."""

    phase: str
    now: datetime
    settings: AccessSettings = field(default_factory=AccessSettings)
    client_id: str | None = None
    client_allowed_roles: frozenset[str] = frozenset()
    ip: str | None = None
    scopes: tuple[str, ...] = ()
    amr: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")
        if self.now.tzinfo is None:
            raise ValueError("the decision needs a timezone-aware time")

    @property
    def network(self) -> str | None:
        """The named network of the person's address, ``outside``, or None when unseen."""
        return None if self.ip is None else network_of(self.ip, self.settings.networks)


# --- what comes out ---------------------------------------------------------------------
@dataclass(frozen=True)
class SessionPolicy:
    """How long a new browser session may live and how many an account may hold."""

    idle_timeout: int
    absolute_timeout: int
    max_sessions: int | None = None
    at_session_limit: str = REFUSE


@dataclass(frozen=True)
class Reason:
    """Why: a stable ``code``, the values its message needs, and the restriction it
    comes from (None for the account's state or the app's own role list). A reason
    that is not ``blocking`` is reported but lets the request go on."""

    code: str
    params: Mapping[str, Any] = field(default_factory=dict)
    restriction_id: int | None = None
    blocking: bool = True


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[Reason, ...]
    granted_scopes: tuple[str, ...]
    session: SessionPolicy
    phase: str
    network: str | None = None

    @property
    def denials(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if r.blocking)

    @property
    def codes(self) -> list[str]:
        """The codes of the refusals, each once, in order."""
        return list(dict.fromkeys(r.code for r in self.denials))

    @property
    def lasting(self) -> bool:
        """Refused for a reason that waiting or moving will not lift."""
        return any(r.code not in PASSING for r in self.denials)

    @property
    def withheld_scopes(self) -> tuple[str, ...]:
        found: list[str] = []
        for reason in self.reasons:
            if reason.code == SCOPES_SCHOOL_ONLY:
                found.extend(reason.params.get("scopes", ()))
        return tuple(dict.fromkeys(found))


# --- the decision -----------------------------------------------------------------------
def parse_hhmm(value: str) -> time:
    """``"HH:MM"`` (00:00 .. 23:59) as a time, or ValueError."""
    hours, sep, minutes = value.strip().partition(":")
    if not sep or len(hours) != 2 or len(minutes) != 2 or not (hours + minutes).isdigit():
        raise ValueError(f"{value!r} is not HH:MM")
    return time(int(hours), int(minutes))


def _aware(value: datetime | None) -> datetime | None:
    # The database keeps naive UTC.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def window_day(local: datetime, hours: tuple[time, time] | None) -> int:
    """The weekday a daily window belongs to: the day it started. For 22:00-06:00, at
    02:00 on Saturday the window is Friday's (a night shift that starts on a weekday)."""
    day = local.weekday()
    if hours is not None:
        start, end = hours
        if start > end and local.time() < end:
            return (day - 1) % 7
    return day


def in_hours(local: datetime, hours: tuple[time, time]) -> bool:
    """Whether ``local`` is in the daily window [start, end); a window whose end is not
    after its start crosses midnight (equal ends: the whole day)."""
    start, end = hours
    moment = local.time()
    if start < end:
        return start <= moment < end
    if start > end:
        return moment >= start or moment < end
    return True


def _check_rule(rule: Rule, facts: AccountFacts, context: AccessContext, local: datetime) -> list[Reason]:
    """The refusals one restriction gives in this context."""
    found: list[Reason] = []

    def refuse(code: str, **params: Any) -> None:
        found.append(Reason(code, params, rule.id))

    if rule.allowed_clients is not None and context.client_id is not None:
        if context.client_id not in rule.allowed_clients:
            refuse(APP_NOT_ALLOWED, app=context.client_id)
    if rule.hours is not None and not in_hours(local, rule.hours):
        refuse(OUTSIDE_HOURS, start=rule.hours[0].strftime("%H:%M"), end=rule.hours[1].strftime("%H:%M"))
    if rule.allowed_weekdays is not None and window_day(local, rule.hours) not in rule.allowed_weekdays:
        refuse(OUTSIDE_WEEKDAYS, weekdays=sorted(rule.allowed_weekdays))
    if rule.allowed_networks is not None and context.ip is not None:
        if not in_any(context.ip, rule.allowed_networks, context.settings.networks):
            names = [n for n in rule.allowed_networks if n in context.settings.networks]
            refuse(NETWORK_NOT_ALLOWED, networks=names)
    if rule.valid_from is not None and context.now < rule.valid_from:
        refuse(NOT_YET_VALID, valid_from=rule.valid_from.isoformat())
    if rule.valid_until is not None and context.now >= rule.valid_until:
        refuse(EXPIRED, valid_until=rule.valid_until.isoformat())
    if rule.require_2fa and "mfa" not in context.amr:
        refuse(SECOND_FACTOR_REQUIRED)
    return found


def _session_policy(rules: Sequence[Rule], context: AccessContext) -> SessionPolicy:
    settings = context.settings
    idle, absolute = settings.idle_timeout, settings.absolute_timeout
    # DESIGN "Sessions": shorter on shared computers (labs, the library).
    if context.ip is not None and in_any(context.ip, settings.shared_networks, settings.networks):
        idle = min(idle, settings.shared_idle_timeout)
        absolute = min(absolute, settings.shared_absolute_timeout)
    for rule in rules:
        if rule.idle_timeout:
            idle = min(idle, rule.idle_timeout)
        if rule.absolute_timeout:
            absolute = min(absolute, rule.absolute_timeout)
    limits = [rule.max_sessions for rule in rules if rule.max_sessions]
    if not limits:
        return SessionPolicy(idle_timeout=idle, absolute_timeout=absolute)
    limit = min(limits)
    # Among the restrictions with the smallest limit, refusing is the stricter answer.
    actions = {rule.at_session_limit for rule in rules if rule.max_sessions == limit}
    action = REFUSE if REFUSE in actions or not actions <= set(AT_SESSION_LIMIT) else END_OLDEST
    return SessionPolicy(idle_timeout=idle, absolute_timeout=absolute, max_sessions=limit, at_session_limit=action)


def decide(facts: AccountFacts, rules: Iterable[Rule], context: AccessContext) -> Decision:
    """Allow or refuse, with every reason (pure: see the module's docstring)."""
    rules = list(rules)
    reasons: list[Reason] = []
    if not facts.active:
        reasons.append(Reason(ACCOUNT_DISABLED))
    elif facts.locked:
        reasons.append(Reason(ACCOUNT_LOCKED))
    if context.client_id is not None and not _roles_admit(facts.roles, context.client_allowed_roles):
        reasons.append(Reason(APP_ROLES, {"app": context.client_id}))
    local = context.now.astimezone(SCHOOL_TZ)
    for rule in rules:
        reasons.extend(_check_rule(rule, facts, context, local))
    if context.ip is None and context.phase != TOKEN and any(r.allowed_networks is not None for r in rules):
        reasons.append(Reason(NETWORK_NOT_CHECKED, blocking=False))

    # Policy 4.2.5: "For official use" material stays inside the school. The scopes a
    # restriction keeps to the school network are granted only to a person seen on one
    # of the school's networks; the rest of the grant goes on.
    requested = tuple(dict.fromkeys(context.scopes))
    inside = context.ip is not None and network_of(context.ip, context.settings.networks) != OUTSIDE
    withheld: set[str] = set()
    if context.phase != TOKEN and not inside:
        for rule in rules:
            kept_in = [s for s in requested if s in rule.school_only_scopes]
            if kept_in:
                withheld.update(kept_in)
                reasons.append(Reason(SCOPES_SCHOOL_ONLY, {"scopes": kept_in}, rule.id, blocking=False))
    allowed = not any(r.blocking for r in reasons)
    granted = tuple(s for s in requested if s not in withheld) if allowed else ()
    return Decision(
        allowed=allowed,
        reasons=tuple(reasons),
        granted_scopes=granted,
        session=_session_policy(rules, context),
        phase=context.phase,
        network=context.network,
    )


# --- for stored accounts ----------------------------------------------------------------
def restrictions_for(db: Session, user: User, cache: RestrictionCache | None = None) -> list[Restriction]:
    """The restrictions that apply to ``user``: its own and those of its roles (from the
    process's ``cache`` when given and current, idp/row_cache.py)."""
    cached = cache.for_user(db, user) if cache is not None else None
    if cached is not None:
        return cached
    role_ids = [role.id for role in user.roles]
    condition = Restriction.user_id == user.id
    if role_ids:
        condition = or_(condition, Restriction.role_id.in_(role_ids))
    return list(db.scalars(select(Restriction).where(condition).order_by(Restriction.id)))


def rules_for(db: Session, user: User, cache: RestrictionCache | None = None) -> list[Rule]:
    names = {role.id: role.name for role in user.roles}
    return [Rule.of(r, names) for r in restrictions_for(db, user, cache)]


def context_for(
    settings: Settings,
    *,
    phase: str,
    now: datetime,
    client: Client | None = None,
    ip: str | None = None,
    scopes: Iterable[str] = (),
    amr: Iterable[str] = (),
) -> AccessContext:
    """An access context for a door of the running provider."""
    return AccessContext(
        phase=phase,
        now=now,
        settings=AccessSettings.of(settings),
        client_id=client.client_id if client is not None else None,
        client_allowed_roles=frozenset(client.allowed_roles or ()) if client is not None else frozenset(),
        ip=ip,
        scopes=tuple(scopes),
        amr=frozenset(amr),
    )


def decide_for(db: Session, user: User, context: AccessContext,
               cache: RestrictionCache | None = None) -> Decision:
    """The decision for a stored account: its facts and restrictions are loaded here."""
    return decide(AccountFacts.of(user), rules_for(db, user, cache), context)


def requires_second_factor(db: Session, user: User) -> bool:
    """Whether a restriction that applies to ``user`` requires 2FA (the sign-in then asks
    an account without a second factor to set one up, like a role that requires it)."""
    return any(r.require_2fa for r in restrictions_for(db, user))


def session_policy(db: Session, user: User, *, ip: str | None, now: datetime, settings: Settings) -> SessionPolicy:
    """The session policy for a sign-in of ``user`` from ``ip`` at ``now``: the
    settings' defaults (shorter on shared networks), narrowed by the restrictions."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return decide_for(db, user, context_for(settings, phase=SIGN_IN, now=now, ip=ip)).session


# What an app is told (OAuth error_description: ASCII, English, RFC 6749 §5.2). Only
# the kind of refusal, in words that fit any account: never which restriction, role or
# network, and nothing about another account.
_PROTOCOL_TEXT = {
    ACCOUNT_DISABLED: "The account cannot sign in.",
    ACCOUNT_LOCKED: "The account cannot sign in.",
    APP_ROLES: "This account may not use this app.",
    APP_NOT_ALLOWED: "This account may not use this app.",
    OUTSIDE_HOURS: "This account may not use this app at this time (outside the allowed hours).",
    OUTSIDE_WEEKDAYS: "This account may not use this app on this day.",
    NETWORK_NOT_ALLOWED: "This account may not use this app from this network.",
    NOT_YET_VALID: "This account may not use this app now.",
    EXPIRED: "This account may not use this app now.",
    SECOND_FACTOR_REQUIRED: "This app needs a sign-in with a second factor.",
}


def protocol_description(decision: Decision) -> str:
    """The error_description for an app when ``decision`` refuses."""
    for code in decision.codes:
        if code in _PROTOCOL_TEXT:
            return _PROTOCOL_TEXT[code]
    return "Access is not allowed now."
