"""Synchronising accounts with the school directory (README, "School directory").

A *full* sync reads every person under ``IDP_LDAP_USER_BASE`` (paged) and every group
under ``IDP_LDAP_GROUP_BASE``; at the end, directory accounts the directory no longer
lists are disabled. An *incremental* sync reads only the persons whose change marker
(``modifyTimestamp`` or ``uSNChanged``) is at or after the cursor of the last completed
run, plus the members (old and new) of groups changed since then. Nothing is ever
deleted.

Each page of entries is one transaction: a run that fails halfway leaves every account
either as it was or as the directory says, never half-changed. The run row
(``DirectorySyncRun``) is updated after every page; a failed (or interrupted) run is
resumed by the next one from the same cursor (entries already applied are then simply
unchanged). One run at a time: a Redis lock with a time-to-live, refreshed every page.

Accounts are written here directly rather than through ``AccountAdmin``: the same rules
(login pattern, e-mail, locale) with the existing accounts loaded once into
dictionaries, and the journal written once per page (``Journal.record_many``), so that
20,000 people sync in a reasonable time."""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ldap3 import BASE, Connection
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError, LDAPNoSuchObjectResult
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, lazyload, sessionmaker

from connectors.ldap.client import DirectoryUnavailable, service_connection
from connectors.ldap.config import DirectoryConfig
from connectors.ldap.models import DirectorySyncRun
from idp.accounts.models import Role, SchoolClass, User, class_members, user_roles
from idp.accounts.service import LOGIN_PATTERN, ensure_roles, normalise_login
from idp.audit.journal import Journal
from idp.sessions.registry import SessionRegistry

log = logging.getLogger("darbaza.directory")

SYNC_ACTOR = "directory-sync"
LOCK_KEY = "darbaza:directory-sync:lock"
LOCK_TTL = 900  # seconds; refreshed after every page
MAX_STORED_ERRORS = 500
UF_ACCOUNTDISABLE = 2  # userAccountControl bit: the account is disabled in AD
# Above this many people to re-read by DN (members of changed groups), one paged scan of
# the user base is cheaper than one base search each.
MAX_SINGLE_READS = 200
LOCALES = {"ky", "ru", "en"}


class SyncRefused(Exception):
    """The sync did not start (not configured, bad mapping, another run holds the lock);
    the message says why. No run row is written."""


class _SyncFailed(Exception):
    """The run cannot go on safely (e.g. the directory returned nobody)."""


class _EntryError(Exception):
    pass


@dataclass
class SyncDeps:
    """What a sync needs from the application (Flask services or a worker job)."""

    factory: sessionmaker[Session]
    redis: Redis
    journal: Journal
    sessions: SessionRegistry


@dataclass
class RunSummary:
    id: int
    mode: str
    trigger: str
    dry_run: bool
    status: str
    created: int = 0
    updated: int = 0
    disabled: int = 0
    unchanged: int = 0
    error_count: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    entries_seen: int = 0
    pages_done: int = 0
    resumed_from: int | None = None
    cursor_before: str | None = None
    cursor_after: str | None = None
    message: str | None = None

    @property
    def touched(self) -> int:
        return self.created + self.updated + self.disabled


@dataclass
class Person:
    dn: str
    key: str
    external_id: str
    login: str
    display_name: str
    email: str | None
    locale: str | None
    roles: set[str]
    classes: set[str]
    disabled: bool


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# --- DNs and values ------------------------------------------------------------------
_ESCAPED = re.compile(r"\\([0-9a-fA-F]{2}|.)")


def _unescape(value: str) -> str:
    def repl(match: re.Match[str]) -> str:
        text = match.group(1)
        return chr(int(text, 16)) if len(text) == 2 else text

    return _ESCAPED.sub(repl, value)


_DN_SPACES = re.compile(r"\s*([,=+])\s*")


def dn_key(dn: str) -> str:
    """A comparable form of a DN: casefolded, no spaces around separators (the directory
    returns a DN the same way each time; this only irons out how people type them)."""
    return _DN_SPACES.sub(r"\1", dn.strip()).casefold()


def _first_rdn_value(dn: str) -> str | None:
    try:
        parts = parse_dn(dn.strip())
    except (LDAPInvalidDnError, ValueError, IndexError):
        return None
    return _unescape(parts[0][1]) if parts else None


def _mapping(raw: dict[str, str]) -> dict[str, str]:
    """The configured group mapping keyed like ``_group_keys`` (DNs normalised)."""
    return {(dn_key(k) if "=" in k else k.casefold()): v for k, v in raw.items()}


def _values(attrs: Any, name: str) -> list[bytes]:
    if not name:
        return []
    found = attrs.get(name)
    if found is None:
        for key in attrs:
            if key.lower() == name.lower():
                found = attrs[key]
                break
    if found is None:
        return []
    if isinstance(found, bytes | str):
        found = [found]
    return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in found]


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace").replace("\x00", "").strip()


def _first_text(attrs: Any, name: str) -> str:
    values = _values(attrs, name)
    return _text(values[0]) if values else ""


def change_key(value: str) -> int:
    """Orders change markers: uSNChanged is an integer; modifyTimestamp a generalized
    time such as ``20261125231436Z`` (or with fractions), compared on its seconds."""
    digits = re.match(r"\d*", value.strip())
    text = digits.group(0) if digits else ""
    if not text:
        return -1
    if len(text) >= 14 or len(text) in (10, 12):  # generalized time: YYYYMMDDHH[MM[SS]]
        return int(text[:14].ljust(14, "0"))
    return int(text)


def _later(current: str | None, candidate: str) -> str | None:
    if not candidate:
        return current
    if current is None or change_key(candidate) > change_key(current):
        return candidate
    return current


# --- the lock ------------------------------------------------------------------------
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class _Lock:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self.redis.set(LOCK_KEY, self.token, nx=True, ex=LOCK_TTL))

    def refresh(self) -> None:
        try:
            if self.redis.get(LOCK_KEY) in (self.token, self.token.encode("ascii")):
                self.redis.expire(LOCK_KEY, LOCK_TTL)
        except RedisError as exc:  # pragma: no cover - the run goes on; the TTL is long
            log.warning("could not refresh the directory sync lock: %s", exc)

    def release(self) -> None:
        try:
            self.redis.eval(_RELEASE, 1, LOCK_KEY, self.token)
        except RedisError as exc:  # pragma: no cover - it expires by itself
            log.warning("could not release the directory sync lock: %s", exc)


def lock_held(redis: Redis) -> bool:
    try:
        return bool(redis.exists(LOCK_KEY))
    except RedisError:
        return False


# --- the run -------------------------------------------------------------------------
def check_mapping(config: DirectoryConfig, db: Session) -> None:
    """Refuse a mapping to roles that do not exist or to invalid class names."""
    known = set(db.scalars(select(Role.name)))
    unknown = sorted(set(config.group_roles.values()) - known)
    if unknown:
        raise SyncRefused("IDP_LDAP_GROUP_ROLES names unknown role(s): " + ", ".join(unknown))
    for name in config.group_classes.values():
        if not name or len(name) > 32 or not all(ch.isalnum() or ch in "-_ " for ch in name):
            raise SyncRefused(f"IDP_LDAP_GROUP_CLASSES: {name!r} is not a valid class name "
                              "(1-32 letters, digits, '-', '_' or spaces)")


def run_sync(
    config: DirectoryConfig,
    deps: SyncDeps,
    *,
    full: bool = False,
    trigger: str = "cli",
    dry_run: bool = False,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run one sync and return its summary. Raises ``SyncRefused`` when it cannot start;
    any failure after the start is recorded in the run (status "failed", message)."""
    if not config.configured:
        raise SyncRefused("no directory is configured (IDP_LDAP_URLS is empty)")
    with deps.factory() as db:
        ensure_roles(db)  # the seeded roles the mapping names
        check_mapping(config, db)
        db.commit()
    lock = _Lock(deps.redis)
    try:
        acquired = lock.acquire()
    except RedisError as exc:
        raise SyncRefused(f"Redis cannot be reached for the sync lock: {exc}") from exc
    if not acquired:
        raise SyncRefused("another directory sync is running; try again when it has finished")
    try:
        sync = _Sync(config, deps, lock, full=full, trigger=trigger, dry_run=dry_run,
                     on_total=on_total, on_progress=on_progress)
        return sync.run()
    finally:
        lock.release()


class _Sync:
    def __init__(self, config: DirectoryConfig, deps: SyncDeps, lock: _Lock, *, full: bool, trigger: str,
                 dry_run: bool, on_total: Callable[[int], None] | None,
                 on_progress: Callable[[int], None] | None) -> None:
        self.config = config
        self.deps = deps
        self.lock = lock
        self.full = full
        self.trigger = trigger
        self.dry_run = dry_run
        self.on_total = on_total
        self.on_progress = on_progress
        self.role_map = _mapping(config.group_roles)
        self.class_map = _mapping(config.group_classes)
        self.managed_roles = set(config.group_roles.values())
        self.managed_classes = set(config.group_classes.values())
        # Membership from the groups (OpenLDAP: member attribute): person DN key -> names.
        self.member_roles: dict[str, set[str]] = {}
        self.member_classes: dict[str, set[str]] = {}
        # Existing accounts, loaded once.
        self.by_external: dict[str, int] = {}
        # login -> (id, source, external id, disabled by its source)
        self.by_login: dict[str, tuple[int | None, str, str | None, bool]] = {}
        # This run.
        self.seen_external: set[str] = set()
        self.processed_keys: set[str] = set()
        self.claimed_logins: dict[str, str] = {}  # login -> external id of the entry that has it
        self.changed_group_members: set[str] = set()  # member DNs of groups changed since the cursor
        self.changed_roles: set[str] = set()
        self.changed_classes: set[str] = set()
        self.summary: RunSummary
        self.max_change: str | None = None
        self.cursor: str | None = None

    # --- bookkeeping ----------------------------------------------------------------
    def _error(self, dn: str, reason: str) -> None:
        self.summary.error_count += 1
        if len(self.summary.errors) < MAX_STORED_ERRORS:
            self.summary.errors.append({"dn": dn, "reason": reason})

    def _save(self, **extra: Any) -> None:
        s = self.summary
        with self.deps.factory() as db:
            db.execute(update(DirectorySyncRun).where(DirectorySyncRun.id == s.id).values(
                created=s.created, updated=s.updated, disabled=s.disabled, unchanged=s.unchanged,
                error_count=s.error_count, errors=list(s.errors), entries_seen=s.entries_seen,
                pages_done=s.pages_done, **extra))
            db.commit()
        self.lock.refresh()

    def _start(self) -> None:
        with self.deps.factory() as db:
            # A run still "running" while we hold the lock was interrupted (killed).
            for stale in db.scalars(select(DirectorySyncRun).where(DirectorySyncRun.status == "running")):
                stale.status = "failed"
                stale.finished_at = _now()
                stale.message = (stale.message or "") + "interrupted (the process ended before the run did)"
            db.flush()
            previous = db.scalar(select(DirectorySyncRun).where(DirectorySyncRun.dry_run.is_(False))
                                 .order_by(DirectorySyncRun.id.desc()).limit(1))
            resumed_from = None
            if previous is not None and previous.status == "failed":
                # Resume: the same starting point (and a full run stays a full run).
                cursor = previous.cursor_before
                full = self.full or previous.mode == "full" or cursor is None
                if not self.dry_run:
                    resumed_from = previous.id
            else:
                last = db.scalar(select(DirectorySyncRun).where(DirectorySyncRun.dry_run.is_(False),
                                                                DirectorySyncRun.status == "completed")
                                 .order_by(DirectorySyncRun.id.desc()).limit(1))
                cursor = last.cursor_after if last is not None else None
                # The first sync is always a full one.
                full = self.full or cursor is None
            run = DirectorySyncRun(mode="full" if full else "incremental", trigger=self.trigger,
                                   dry_run=self.dry_run, status="running", cursor_before=cursor,
                                   resumed_from=resumed_from, errors=[])
            db.add(run)
            db.commit()
            self.full = full
            self.cursor = cursor
            self.summary = RunSummary(id=run.id, mode=run.mode, trigger=self.trigger, dry_run=self.dry_run,
                                      status="running", resumed_from=resumed_from, cursor_before=cursor)
            for uid, login, source, ext, active, source_disabled in db.execute(
                    select(User.id, User.login, User.source, User.external_id, User.active, User.source_disabled_at)):
                self.by_login[login] = (uid, source, ext, not active and source_disabled is not None)
                if ext:
                    self.by_external[ext] = uid

    def run(self) -> RunSummary:
        self._start()
        conn: Connection | None = None
        try:
            conn = service_connection(self.config)
            self._load_groups(conn)
            if self.full:
                self._full(conn)
            else:
                self._incremental(conn)
            self.summary.status = "completed"
            self.summary.cursor_after = _later(self.cursor, self.max_change or "") if not self.full else (
                self.max_change or self.cursor)
        except DirectoryUnavailable as exc:
            self.summary.status = "failed"
            self.summary.message = f"the directory cannot be reached: {exc}"
        except _SyncFailed as exc:
            self.summary.status = "failed"
            self.summary.message = str(exc)
        except Exception as exc:  # noqa: BLE001 - recorded in the run; never a half-told failure
            log.exception("directory sync %s failed", self.summary.id)
            self.summary.status = "failed"
            self.summary.message = f"{type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                try:
                    conn.unbind()
                except (LDAPException, OSError):
                    pass
        extra: dict[str, Any] = {"status": self.summary.status, "finished_at": _now(),
                                 "message": self.summary.message}
        if self.summary.status == "completed":
            extra["cursor_after"] = self.summary.cursor_after
        else:
            self.summary.cursor_after = None
        self._save(**extra)
        log.info("directory sync %s %s: created %d, updated %d, disabled %d, unchanged %d, errors %d",
                 self.summary.id, self.summary.status, self.summary.created, self.summary.updated,
                 self.summary.disabled, self.summary.unchanged, self.summary.error_count)
        return self.summary

    # --- reading the directory -------------------------------------------------------
    def _search(self, conn: Connection, base: str, search_filter: str,
                attributes: list[str]) -> Iterator[tuple[str, Any]]:
        try:
            for item in conn.extend.standard.paged_search(base, search_filter, attributes=attributes,
                                                          paged_size=self.config.page_size, generator=True):
                if item.get("type") == "searchResEntry":
                    yield item["dn"], item.get("raw_attributes", {})
        except LDAPNoSuchObjectResult as exc:
            raise _SyncFailed(f"the base {base} does not exist in the directory") from exc
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _person_attributes(self) -> list[str]:
        names = [a for a in self.config.attributes.values() if a]
        names += [self.config.change_attribute, self.config.disabled_attribute, self.config.member_of_attribute]
        return sorted({n for n in names if n})

    def _group_keys(self, dn: str, cns: Iterable[str]) -> set[str]:
        keys = {dn_key(dn)} | {cn.casefold() for cn in cns if cn}
        first = _first_rdn_value(dn)
        if first:
            keys.add(first.casefold())
        return keys

    def _mapped(self, keys: set[str]) -> tuple[set[str], set[str]]:
        return ({self.role_map[k] for k in keys if k in self.role_map},
                {self.class_map[k] for k in keys if k in self.class_map})

    def _load_groups(self, conn: Connection) -> None:
        """Membership of the mapped groups, and (incremental) the groups changed since the
        cursor, whose members must be looked at again."""
        if not (self.role_map or self.class_map) or not self.config.group_base:
            return
        member_attr = self.config.group_member_attribute
        change_attr = self.config.change_attribute
        cursor_key = change_key(self.cursor) if self.cursor else None
        for dn, attrs in self._search(conn, self.config.group_base, self.config.group_filter,
                                      sorted({"cn", member_attr, change_attr})):
            roles, classes = self._mapped(self._group_keys(dn, [_text(v) for v in _values(attrs, "cn")]))
            if not (roles or classes):
                continue
            members = [_text(v) for v in _values(attrs, member_attr)]
            change = _first_text(attrs, change_attr)
            self.max_change = _later(self.max_change, change)
            if not self.config.member_of_attribute:
                for member in members:
                    key = dn_key(member)
                    self.member_roles.setdefault(key, set()).update(roles)
                    self.member_classes.setdefault(key, set()).update(classes)
            # Strictly after the cursor: a group at the cursor was read by the run that set it
            # (people, by contrast, are read again at the cursor: ">=" is always safe).
            if cursor_key is not None and change and change_key(change) > cursor_key:
                self.changed_group_members.update(members)
                self.changed_roles |= roles
                self.changed_classes |= classes

    def _person(self, dn: str, attrs: Any) -> Person:
        names = self.config.attributes
        ext_attr = names.get("external_id", "")
        ext_values = _values(attrs, ext_attr)
        if not ext_values or not ext_values[0]:
            raise _EntryError(f"the entry has no {ext_attr}")
        if ext_attr.lower() == "objectguid":
            if len(ext_values[0]) != 16:
                raise _EntryError("objectGUID is not 16 bytes")
            external_id = str(uuid.UUID(bytes_le=ext_values[0]))
        else:
            external_id = _text(ext_values[0]).lower()[:128]
        self.seen_external.add(external_id)
        raw_login = _first_text(attrs, names.get("login", ""))
        if not raw_login:
            raise _EntryError(f"the entry has no {names.get('login')}")
        login = normalise_login(raw_login)
        if not LOGIN_PATTERN.match(login):
            raise _EntryError(f"the login {raw_login!r} is not valid: 2-64 latin letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
        display_name = (_first_text(attrs, names.get("display_name", "")) or raw_login)[:255]
        email: str | None = _first_text(attrs, names.get("email", "")) or None
        if email is not None and (len(email) > 320 or "@" not in email or any(c in email for c in "\r\n")):
            self._error(dn, "the e-mail address is not valid; the account is kept without it")
            email = None
        locale = _first_text(attrs, names.get("locale", ""))[:2].lower() or None
        if locale not in LOCALES:
            locale = None
        disabled = False
        if self.config.disabled_attribute:
            flags = _first_text(attrs, self.config.disabled_attribute)
            try:
                disabled = bool(int(flags) & UF_ACCOUNTDISABLE) if flags else False
            except ValueError:
                raise _EntryError(f"{self.config.disabled_attribute} is not a number") from None
        key = dn_key(dn)
        if self.config.member_of_attribute:
            roles: set[str] = set()
            classes: set[str] = set()
            for group_dn in (_text(v) for v in _values(attrs, self.config.member_of_attribute)):
                r, c = self._mapped(self._group_keys(group_dn, []))
                roles |= r
                classes |= c
        else:
            roles = set(self.member_roles.get(key, ()))
            classes = set(self.member_classes.get(key, ()))
        self.max_change = _later(self.max_change, _first_text(attrs, self.config.change_attribute))
        return Person(dn=dn, key=key, external_id=external_id, login=login, display_name=display_name,
                      email=email, locale=locale, roles=roles, classes=classes, disabled=disabled)

    def _pages(self, entries: Iterable[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
        page: list[tuple[str, Any]] = []
        for entry in entries:
            page.append(entry)
            if len(page) >= self.config.page_size:
                yield page
                page = []
        if page:
            yield page

    def _count(self, conn: Connection, search_filter: str) -> int:
        return sum(1 for _ in self._search(conn, self.config.user_base, search_filter, ["1.1"]))

    def _full(self, conn: Connection) -> None:
        if self.on_total is not None:
            self.on_total(self._count(conn, self.config.person_filter))
        entries = self._search(conn, self.config.user_base, self.config.person_filter, self._person_attributes())
        for page in self._pages(entries):
            self._apply_page(page)
        self._disable_unseen()

    def _incremental(self, conn: Connection) -> None:
        assert self.cursor is not None
        changed_filter = (f"(&{self.config.person_filter}"
                          f"({self.config.change_attribute}>={escape_filter_chars(self.cursor)}))")
        if self.on_total is not None:
            self.on_total(self._count(conn, changed_filter))
        entries = self._search(conn, self.config.user_base, changed_filter, self._person_attributes())
        for page in self._pages(entries):
            self._apply_page(page)
        # People whose groups changed: the groups' members now, and the accounts holding
        # a role or class mapped from a changed group (maybe removed from it).
        wanted: dict[str, str] = {}
        for member in self.changed_group_members:
            wanted.setdefault(dn_key(member), member)
        if self.changed_roles or self.changed_classes:
            with self.deps.factory() as db:
                holders = (select(User.directory_dn).where(User.source == "directory", User.directory_dn.is_not(None))
                           .where(User.id.in_(select(user_roles.c.user_id).join(Role)
                                              .where(Role.name.in_(self.changed_roles)))
                                  | User.id.in_(select(class_members.c.user_id).join(SchoolClass)
                                                .where(SchoolClass.name.in_(self.changed_classes)))))
                for dn in db.scalars(holders):
                    if dn:
                        wanted.setdefault(dn_key(dn), dn)
        user_base = dn_key(self.config.user_base)
        missing = {k: dn for k, dn in wanted.items()
                   if k not in self.processed_keys and (k == user_base or k.endswith("," + user_base))}
        if not missing:
            return
        if len(missing) > MAX_SINGLE_READS:
            found: Iterable[tuple[str, Any]] = (
                (dn, attrs) for dn, attrs in self._search(conn, self.config.user_base, self.config.person_filter,
                                                          self._person_attributes())
                if dn_key(dn) in missing)
        else:
            found = self._read_each(conn, list(missing.values()))
        for page in self._pages(found):
            self._apply_page(page)

    def _read_each(self, conn: Connection, dns: list[str]) -> Iterator[tuple[str, Any]]:
        for dn in dns:
            try:
                conn.search(dn, self.config.person_filter, search_scope=BASE,
                            attributes=self._person_attributes())
            except LDAPNoSuchObjectResult:
                continue  # gone from the directory: the next full sync disables it
            except (LDAPException, OSError) as exc:
                raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from exc
            for item in conn.response or []:
                if item.get("type") == "searchResEntry":
                    yield item["dn"], item.get("raw_attributes", {})

    # --- writing accounts ------------------------------------------------------------
    def _finish_page(self, db: Session, changes: list[tuple[User, str, dict[str, Any]]]) -> None:
        db.flush()
        self.deps.journal.record_many(db, [
            {"actor": SYNC_ACTOR, "action": action, "subject": f"user:{user.id}", "details": details}
            for user, action, details in changes
        ])
        if self.dry_run:
            db.rollback()
        else:
            db.commit()
            for user, action, _details in changes:
                if action == "directory:account:create":
                    self.by_login[user.login] = (user.id, "directory", user.external_id, not user.active)
                    if user.external_id:
                        self.by_external[user.external_id] = user.id

    def _disable(self, db: Session, user: User, reason: str) -> int:
        user.active = False
        user.source_disabled_at = _now()
        if self.dry_run:
            return 0  # sessions live in Redis: a dry run must not touch them
        return self.deps.sessions.end_all(db, user.id, reason="directory-disabled", actor=SYNC_ACTOR)

    def _apply_page(self, page: list[tuple[str, Any]]) -> None:
        persons: list[Person] = []
        for dn, attrs in page:
            self.summary.entries_seen += 1
            key = dn_key(dn)
            if key in self.processed_keys:
                continue
            self.processed_keys.add(key)
            try:
                persons.append(self._person(dn, attrs))
            except _EntryError as exc:
                self._error(dn, str(exc))
        claimed = self.claimed_logins
        with self.deps.factory() as db:
            ids = {self.by_external.get(p.external_id) for p in persons}
            ids |= {(self.by_login.get(p.login) or (None,))[0] for p in persons}
            ids.discard(None)
            users: dict[int, User] = {}
            id_list = sorted(i for i in ids if i is not None)
            for start in range(0, len(id_list), 500):
                chunk = id_list[start:start + 500]
                for user in db.scalars(select(User).where(User.id.in_(chunk)).options(
                        lazyload(User.passkeys), lazyload(User.children), lazyload(User.guardians))):
                    users[user.id] = user
            roles = {r.name: r for r in db.scalars(select(Role))}
            classes = {c.name: c for c in db.scalars(select(SchoolClass))}
            changes: list[tuple[User, str, dict[str, Any]]] = []
            for person in persons:
                other = claimed.get(person.login)
                if other is not None and other != person.external_id:
                    self._error(person.dn, f"another directory entry has the login {person.login!r}")
                    continue
                if self._apply_person(db, person, users, roles, classes, changes):
                    claimed[person.login] = person.external_id
            self._finish_page(db, changes)
        self.summary.pages_done += 1
        self._save()
        if self.on_progress is not None:
            self.on_progress(len(page))

    def _class_objects(self, db: Session, names: set[str], classes: dict[str, SchoolClass],
                       changes: list[tuple[User, str, dict[str, Any]]]) -> list[SchoolClass]:
        out = []
        for name in sorted(names):
            school_class = classes.get(name)
            if school_class is None:
                school_class = SchoolClass(name=name)
                db.add(school_class)
                db.flush()
                classes[name] = school_class
                self.deps.journal.record(db, actor=SYNC_ACTOR, action="class:create", subject=f"class:{name}",
                                         details={"source": "directory"})
            out.append(school_class)
        return out

    def _apply_person(self, db: Session, p: Person, users: dict[int, User], roles: dict[str, Role],
                      classes: dict[str, SchoolClass], changes: list[tuple[User, str, dict[str, Any]]]) -> bool:
        """Make the account match the entry; False when the entry is an error."""
        uid = self.by_external.get(p.external_id)
        if uid is None:
            hit = self.by_login.get(p.login)
            if hit is not None:
                hid, source, ext, gone = hit
                if source != "directory":
                    self._error(p.dn, f"the login {p.login!r} belongs to an account that is not from the directory "
                                      f"({source}); it is not taken over")
                    return False
                if ext and ext != p.external_id and not gone:
                    self._error(p.dn, f"the login {p.login!r} belongs to another directory account "
                                      "(a different entry id); it is not taken over")
                    return False
                # A login whose entry is gone from the directory (its account disabled by the
                # sync) and that a new entry now has: the directory decides who holds a login,
                # so the account follows the new entry (journalled with both ids).
                uid = hid
                if uid is None:  # created earlier in this dry run
                    self.summary.unchanged += 1
                    return True
        if uid is None:
            user = User(login=p.login, display_name=p.display_name, email=p.email, locale=p.locale,
                        source="directory", external_id=p.external_id, directory_dn=p.dn, password_hash=None,
                        active=not p.disabled, source_disabled_at=_now() if p.disabled else None,
                        roles=[roles[r] for r in sorted(p.roles)],
                        classes=self._class_objects(db, p.classes, classes, changes))
            db.add(user)
            changes.append((user, "directory:account:create",
                            {"dn": p.dn, "login": p.login, "roles": sorted(p.roles), "classes": sorted(p.classes),
                             "disabled": p.disabled}))
            self.summary.created += 1
            if self.dry_run:
                self.by_login[p.login] = (None, "directory", p.external_id, False)
            return True
        user = users[uid]
        diff: dict[str, list[Any]] = {}
        if user.login != p.login:
            taken = self.by_login.get(p.login)
            if taken is not None and taken[0] != user.id:
                self._error(p.dn, f"the new login {p.login!r} is already used by another account")
                return False
            diff["login"] = [user.login, p.login]
            self.by_login.pop(user.login, None)
            self.by_login[p.login] = (user.id, "directory", p.external_id, False)
            user.login = p.login
        if user.external_id != p.external_id:
            diff["external_id"] = [user.external_id, p.external_id]
            user.external_id = p.external_id
            self.by_external[p.external_id] = user.id
        if user.display_name != p.display_name:
            diff["display_name"] = [user.display_name, p.display_name]
            user.display_name = p.display_name
        if (user.email or None) != p.email:
            diff["email"] = [user.email, p.email]
            if (user.email or "").casefold() != (p.email or "").casefold():
                # Only the person can verify an address (a link mailed to it).
                user.email_verified_at = None
            user.email = p.email
        if (user.locale or None) != p.locale:
            diff["locale"] = [user.locale, p.locale]
            user.locale = p.locale
        if user.directory_dn != p.dn:
            diff["dn"] = [user.directory_dn, p.dn]
            user.directory_dn = p.dn
        before_roles = set(user.role_names)
        after_roles = (before_roles - self.managed_roles) | p.roles
        if after_roles != before_roles:
            diff["roles"] = [sorted(before_roles), sorted(after_roles)]
            user.roles = [roles[r] for r in sorted(after_roles)]
        before_classes = set(user.class_names)
        after_classes = (before_classes - self.managed_classes) | p.classes
        if after_classes != before_classes:
            diff["classes"] = [sorted(before_classes), sorted(after_classes)]
            user.classes = self._class_objects(db, after_classes, classes, changes)
        if diff:
            changes.append((user, "directory:account:update", {"dn": p.dn, "changes": diff}))
        if p.disabled and user.active:
            ended = self._disable(db, user, "disabled in the directory")
            changes.append((user, "directory:account:disable",
                            {"dn": p.dn, "reason": "disabled in the directory", "sessions_ended": ended}))
            self.summary.disabled += 1
        elif not p.disabled and not user.active and user.source_disabled_at is not None:
            # Only an account its source disabled comes back; one an admin disabled stays.
            user.active = True
            user.source_disabled_at = None
            changes.append((user, "directory:account:enable", {"dn": p.dn}))
            self.summary.updated += 1
        elif diff:
            self.summary.updated += 1
        else:
            self.summary.unchanged += 1
        return True

    def _disable_unseen(self) -> None:
        """After a complete full sync: directory accounts the directory no longer lists."""
        with self.deps.factory() as db:
            rows = db.execute(select(User.id, User.external_id).where(User.source == "directory",
                                                                      User.active.is_(True))).all()
        unseen = sorted(uid for uid, ext in rows if not ext or ext not in self.seen_external)
        if not unseen:
            return
        if self.summary.entries_seen == 0:
            raise _SyncFailed("the directory listed nobody under IDP_LDAP_USER_BASE with the filter; "
                              f"{len(unseen)} directory account(s) were NOT disabled (check the settings)")
        for start in range(0, len(unseen), self.config.page_size):
            chunk = unseen[start:start + self.config.page_size]
            with self.deps.factory() as db:
                changes: list[tuple[User, str, dict[str, Any]]] = []
                for user in db.scalars(select(User).where(User.id.in_(chunk)).options(
                        lazyload(User.passkeys), lazyload(User.children), lazyload(User.guardians))):
                    ended = self._disable(db, user, "not in the directory")
                    changes.append((user, "directory:account:disable",
                                    {"dn": user.directory_dn, "reason": "not in the directory",
                                     "sessions_ended": ended}))
                    self.summary.disabled += 1
                self._finish_page(db, changes)
            self._save()


# --- the worker's schedule -----------------------------------------------------------
def due_mode(db: Session, *, interval: int, full_interval: int, now: datetime | None = None) -> str | None:
    """Which sync the worker should run now ("full", "incremental" or None), from the
    runs table: a full one every ``full_interval`` seconds (0: never), an incremental
    one every ``interval`` seconds after the last run of either kind (0: never)."""
    now = now or _now()

    def last(*modes: str) -> datetime | None:
        return db.scalar(select(DirectorySyncRun.started_at).where(
            DirectorySyncRun.dry_run.is_(False), DirectorySyncRun.mode.in_(modes))
            .order_by(DirectorySyncRun.started_at.desc()).limit(1))

    if full_interval > 0:
        last_full = last("full")
        if last_full is None or (now - last_full).total_seconds() >= full_interval:
            return "full"
    if interval > 0:
        last_any = last("full", "incremental")
        if last_any is None or (now - last_any).total_seconds() >= interval:
            return "incremental"
    return None


def scheduled_sync() -> str | None:
    """RQ job (queued by the worker every minute): run the sync that is due, if a
    directory is configured. Never raises: failures are in the run row and the log."""
    from connectors.ldap.config import directory_config
    from idp.config import Settings
    from idp.db import Database
    from idp.redis_client import connect_redis
    from idp.sessions.jobs import build_registry

    try:
        settings = Settings.from_env()
        config = directory_config(settings)
    except Exception as exc:  # noqa: BLE001 - a settings fault is logged, the worker lives on
        log.error("directory sync: bad settings: %s", exc)
        return None
    if not config.configured:
        return None
    database = Database(settings.database_url, pool_size=1)
    redis = connect_redis(settings, socket_timeout=10, socket_connect_timeout=2)
    try:
        with database.factory() as db:
            mode = due_mode(db, interval=settings.ldap_sync_interval_seconds,
                            full_interval=settings.ldap_full_sync_interval_seconds)
        if mode is None:
            return None
        deps = SyncDeps(factory=database.factory, redis=redis, journal=Journal(),
                        sessions=build_registry(settings, database, redis))
        summary = run_sync(config, deps, full=mode == "full", trigger="worker")
        if summary.status != "completed":
            log.warning("directory sync %s failed: %s", summary.id, summary.message)
        return f"{summary.mode} {summary.status}"
    except SyncRefused as exc:
        log.info("directory sync not started: %s", exc)
        return None
    except Exception:  # noqa: BLE001 - never crash the worker
        log.exception("directory sync job failed")
        return None
    finally:
        database.dispose()
        redis.close()
