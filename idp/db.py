"""Database engine and sessions (SQLAlchemy 2). SQLite by default, PostgreSQL too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base of every Darbaza model."""


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so several processes can share it."""
    if url.startswith("sqlite"):
        # A threaded server takes one connection per request in flight; SQLite connections
        # are cheap, so the pool is as wide as for a server database.
        # How long a writer waits for SQLite's write lock before "database is locked" (a
        # 503): 30 s, or ``?timeout=<seconds>`` in the URL (the driver's own parameter).
        connect_args: dict[str, object] = {"check_same_thread": False}
        if "timeout" not in make_url(url).query:
            connect_args["timeout"] = 30
        engine = create_engine(
            url, connect_args=connect_args,
            pool_size=pool_size, max_overflow=2 * pool_size,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
    _ping_when_idle(engine)
    return engine


# A pooled server connection unused for this long is checked (``SELECT 1``) before use.
PING_AFTER_IDLE = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling for connections that sat idle only: SQLAlchemy's
    ``pool_pre_ping`` checks at every checkout, one more round trip per request (0.3-0.45
    ms of CPU on this machine, ~10% of a client-credentials request on PostgreSQL). A
    connection in steady use has just worked; one idle for ``PING_AFTER_IDLE`` seconds (the
    server restarted, a firewall dropped it) is checked and, when dead, replaced before
    the request sees it. A connection that dies in the middle of steady use fails that
    request (a 503), and the pool replaces every connection older than the failure."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE:
            return
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SELECT 1")
        except Exception as error:  # any failure: the pool connects again and retries
            raise exc.DisconnectionError() from error
        finally:
            try:
                cursor.close()
            except Exception:  # noqa: S110 - a dead connection may not close its cursor
                pass


class Database:
    """Holds the engine and a scoped session factory for one application."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size)
        self.factory = sessionmaker(bind=self.engine, expire_on_commit=False)
        self.scoped = scoped_session(self.factory)
        # Reads made in the middle of a request on a connection of their own (the signing
        # keys' cache refresh) use a separate small pool: taken from the request pool, a
        # request holding a connection (and perhaps a row lock) could wait for a second
        # one while every other request waits for it — the whole pool stuck for its
        # 30-second timeout. Engines connect lazily: processes that never need it pay nothing.
        self.side_engine = make_engine(url, 1)
        self.side_factory = sessionmaker(bind=self.side_engine, expire_on_commit=False)

    def dispose(self) -> None:
        """Close every pooled connection (both pools)."""
        self.engine.dispose()
        self.side_engine.dispose()

    @property
    def session(self) -> Session:
        return self.scoped()

    def remove(self) -> None:
        self.scoped.remove()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A fresh session committed on success and rolled back on error."""
        session = self.factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
