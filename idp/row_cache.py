"""Rows that every protocol request reads and that rarely change, kept in memory per
process: portal apps (OAuth clients) and access restrictions.

Loading a client through the ORM cost about 0.45 ms of CPU per token, introspection,
revocation or authorization request; the restrictions of an account about as much per
token, refresh and authorization decision. A process keeps the loaded, detached rows for
``max_age`` seconds and only while a *generation* number in Redis is unchanged: every
committed insert, update or delete of such a row (console, admin API, CLI, seed, in any
process) increments it. The process that made the change forgets its rows at once; the
others read the generation at most once per ``POLL_EVERY`` second (a Redis round trip
costs about as much CPU as the query it saves, so not at every lookup) and load the rows
again when it moved. While Redis cannot be read nothing is cached (the rows come from the
database as before); a change committed while Redis cannot be written is seen by the other
processes after ``max_age`` seconds at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from idp.access.models import Restriction
from idp.accounts.models import User
from idp.oidc.models import Client

log = logging.getLogger(__name__)

POLL_EVERY = 1.0
# Clients are few (the school's apps); made-up ids are never cached (unknown ids are not
# kept), and this bounds the dictionary all the same.
MAX_ENTRIES = 1024


class Generation:
    """A number in Redis that each committed change to ``models`` increments."""

    def __init__(self, redis: Redis, key: str, models: tuple[type, ...], *, max_age: float) -> None:
        self.redis = redis
        self.key = key
        self.models = models
        self.max_age = max_age
        self._flag = f"darbaza.changed:{key}"
        self._polled_until = 0.0
        self._seen: bytes | None = None
        self._listeners: list[Callable[[], Any]] = []

    def current(self) -> tuple[bool, bytes | None]:
        """(readable, generation): Redis's value, read again once ``POLL_EVERY`` passed."""
        now = time.monotonic()
        if now < self._polled_until:
            return True, self._seen
        try:
            value: bytes | None = self.redis.get(self.key)  # type: ignore[assignment]
        except RedisError:
            self._polled_until = 0.0
            return False, None
        self._seen, self._polled_until = value, now + POLL_EVERY
        return True, value

    def on_change(self, listener: Callable[[], Any]) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        """A change committed here: forget at once, and tell every other process."""
        self._polled_until = 0.0
        for listener in self._listeners:
            listener()
        try:
            self.redis.incr(self.key)
        except RedisError as exc:
            log.warning("change of %s not announced in redis (other processes see it within %ss): %s",
                        self.key, self.max_age, exc.__class__.__name__)

    def install(self, factory: sessionmaker[Session]) -> None:
        """Announce every committed insert, update or delete of one of ``models``."""
        models = self.models

        @event.listens_for(factory, "after_flush")
        def _seen(session: Session, _context: Any) -> None:
            if any(isinstance(obj, models) for obj in (*session.new, *session.dirty, *session.deleted)):
                session.info[self._flag] = True

        @event.listens_for(factory, "after_commit")
        def _committed(session: Session) -> None:
            if session.info.pop(self._flag, False):
                self.changed()

        @event.listens_for(factory, "after_rollback")
        def _dropped(session: Session) -> None:
            session.info.pop(self._flag, None)


class ClientCache:
    """Portal apps by client id."""

    def __init__(self, redis: Redis, *, max_age: float) -> None:
        self.max_age = max_age
        self.generation = Generation(redis, "clients:generation", (Client,), max_age=max_age)
        self.generation.on_change(self.forget)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Client, bytes | None, float]] = {}

    def lookup(self, session: Session, client_id: str) -> Client | None:
        """The client with this id (active or not), from memory when still current."""
        if self.max_age <= 0:
            return session.scalar(select(Client).where(Client.client_id == client_id))
        readable, generation = self.generation.current()
        now = time.monotonic()
        entry = self._entries.get(client_id)
        if readable and entry is not None and entry[1] == generation and now - entry[2] < self.max_age:
            return entry[0]
        client = session.scalar(select(Client).where(Client.client_id == client_id))
        if client is None or not readable or client in session.dirty:
            return client
        # Detached, every column loaded: read-only for the requests of this process.
        session.expunge(client)
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[client_id] = (client, generation, now)
        return client

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()

    def install(self, factory: sessionmaker[Session]) -> None:
        self.generation.install(factory)


@dataclass(frozen=True)
class _Restrictions:
    generation: bytes | None
    loaded_at: float
    by_role: dict[int, tuple[Restriction, ...]]
    # Accounts with restrictions of their own (loaded when such an account asks).
    user_ids: frozenset[int]


class RestrictionCache:
    """Every role's restrictions and the ids of accounts with restrictions of their own:
    an account's restrictions cost no query unless it has some of its own."""

    def __init__(self, redis: Redis, *, max_age: float) -> None:
        self.max_age = max_age
        self.generation = Generation(redis, "restrictions:generation", (Restriction,), max_age=max_age)
        self.generation.on_change(self.forget)
        self._lock = threading.Lock()
        self._loaded: _Restrictions | None = None

    def forget(self) -> None:
        with self._lock:
            self._loaded = None

    def install(self, factory: sessionmaker[Session]) -> None:
        self.generation.install(factory)

    def _current(self, db: Session) -> _Restrictions | None:
        if self.max_age <= 0:
            return None
        readable, generation = self.generation.current()
        if not readable:
            return None
        now = time.monotonic()
        loaded = self._loaded
        if loaded is not None and loaded.generation == generation and now - loaded.loaded_at < self.max_age:
            return loaded
        rows = list(db.scalars(select(Restriction).where(Restriction.role_id.is_not(None)).order_by(Restriction.id)))
        user_ids = frozenset(uid for uid in db.scalars(select(Restriction.user_id).where(Restriction.user_id.is_not(None)))
                             if uid is not None)
        by_role: dict[int, list[Restriction]] = {}
        for row in rows:
            db.expunge(row)
            by_role.setdefault(row.role_id, []).append(row)  # type: ignore[arg-type]
        fresh = _Restrictions(generation, now, {k: tuple(v) for k, v in by_role.items()}, user_ids)
        with self._lock:
            self._loaded = fresh
        return fresh

    def for_user(self, db: Session, user: User) -> list[Restriction] | None:
        """The restrictions of ``user`` (its own and its roles'), ordered by id; None when
        nothing is cached (the caller queries the database)."""
        loaded = self._current(db)
        if loaded is None:
            return None
        found = {r.id: r for role in user.roles for r in loaded.by_role.get(role.id, ())}
        if user.id in loaded.user_ids:
            for row in db.scalars(select(Restriction).where(Restriction.user_id == user.id)):
                found[row.id] = row
        return [found[k] for k in sorted(found)]
