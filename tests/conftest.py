"""Shared fixtures: a real Redis, a real database (SQLite or PostgreSQL from
DARBAZA_TEST_DB), and the provider served over real HTTP on loopback."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pyotp
import pytest
import redis as redis_lib
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from idp.accounts import obligations
from idp.accounts.models import ObligationAcceptance
from idp.accounts.service import create_user
from idp.app import create_app
from idp.config import Settings
from idp.migrate import upgrade
from idp.oidc.clients import create_client
from idp.services import Services
from tests.helpers import SECOND_FACTORS, Browser, ClientInfo, UserInfo
from tests.ldap_server import Slapd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, procs: Sequence[subprocess.Popen[bytes]], log: Callable[[], str], what: str, *,
                 seconds: float = 60) -> None:
    """Until ``url``/healthz answers 200 (a ``darbaza serve`` just started); fails with
    ``log()`` when one of ``procs`` exits first or after ``seconds``."""
    deadline = time.time() + seconds
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet, or gunicorn's worker still loading the app
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            raise AssertionError(f"{what} did not start:\n" + log())
        time.sleep(0.1)


def start_redis(port: int, workdir: Path, *, appendonly: bool = False) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:``port`` keeping its files in ``workdir``, answering
    PING when this returns. ``appendonly``: every write on disk at once (AOF, fsync
    always), so that a restart on the same port and directory keeps the data."""
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", *persistence, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_lib.Redis(port=port)
    deadline = time.time() + 10
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis_lib.ConnectionError:
                if time.time() > deadline:
                    proc.kill()
                    raise
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def slapd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A real OpenLDAP slapd on a free loopback port (tests/ldap_server.py), one per test
    process. Tests that change its entries call ``wipe_people_and_groups()`` first."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for this test process (one per xdist worker)."""
    kind = os.environ.get("DARBAZA_TEST_DB", "sqlite")
    if kind == "sqlite":
        path = tmp_path_factory.mktemp("db") / "darbaza.sqlite3"
        url = f"sqlite:///{path}"
        upgrade(url)
        yield url
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with postgres_database(kind, f"darbaza_{worker}") as url:
        yield url


@contextmanager
def postgres_database(server_url: str, prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """A new database ``<prefix>_<random>`` on the PostgreSQL cluster of ``server_url``,
    migrated (or left empty: ``migrate=False``), dropped afterwards."""
    base = make_url(server_url)
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class LiveServer:
    def __init__(self, app, port: int) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()

    @classmethod
    def serve(cls, database_url: str, redis_url: str, **overrides: object) -> LiveServer:
        """A provider of its own on a free loopback port (``make_settings`` + overrides)."""
        port = free_port()
        live = cls(create_app(make_settings(database_url, redis_url, f"http://127.0.0.1:{port}", **overrides)), port)
        live.start()
        return live

    def close(self) -> None:
        """Stop serving and give back the app's database and Redis connections."""
        self.stop()
        self.services.db.remove()
        self.services.db.dispose()
        self.services.redis.close()

    @property
    def services(self) -> Services:
        return self.app.extensions["darbaza"]


TEST_SECRET_KEY = "test-secret-" + secrets.token_hex(8)


def make_settings(database_url: str, redis_url: str, issuer: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "issuer": issuer,
        "database_url": database_url,
        "redis_url": redis_url,
        # One key for every server of the test run: they share the database, whose
        # sealed secrets (TOTP seeds, signing keys) every process must open.
        "secret_key": TEST_SECRET_KEY,
        # Cheap argon2id in tests; the production cost is measured in bench/.
        "argon2_time_cost": 1,
        "argon2_memory_cost": 8192,
        "argon2_parallelism": 1,
        "testing": True,
        # Key rotation by another process (the CLI) is seen within a second.
        "key_cache_seconds": 1,
        # The test server is werkzeug's threaded one (a thread per request, parallel tests
        # fire 20 sign-ins at once): a wider pool than a gunicorn worker needs.
        "database_pool_size": 20,
        # Every test signs in from 127.0.0.1: the shared server must not throttle by IP
        # (tests/integration/test_login_throttle.py checks the limits on its own server).
        "login_ip_free_failures": 1_000_000,
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


@pytest.fixture(scope="session")
def server(database_url: str, redis_url: str) -> Iterator[LiveServer]:
    """The provider on a real HTTP server on loopback."""
    port = free_port()
    settings = make_settings(database_url, redis_url, f"http://127.0.0.1:{port}")
    app = create_app(settings)
    svc: Services = app.extensions["darbaza"]
    with svc.db.transaction() as session:
        svc.keys.ensure_key(session)
    live = LiveServer(app, port)
    live.start()
    yield live
    live.close()


def new_account(
    server: LiveServer, roles: tuple[str, ...] = ("student",), password: str | None = None, *,
    two_factor: bool | None = None, accept_obligations: bool = True, **fields: object,
) -> UserInfo:
    """A new account with a random login and a known password. ``two_factor``: give the
    account an authenticator app (and recovery codes) the test "phone" knows; by default
    when one of ``roles`` requires 2FA, so that the account is an established one.
    ``accept_obligations``: its confidentiality obligations are already accepted."""
    svc = server.services
    login = fields.pop("login", None) or f"user-{secrets.token_hex(5)}"
    password = password or "correct horse battery " + secrets.token_hex(4)
    with svc.db.transaction() as session:
        user = create_user(
            session,
            svc.passwords,
            login=str(login),
            display_name=str(fields.pop("display_name", "Test User")),
            password=password,
            roles=list(roles),
            **fields,  # type: ignore[arg-type]
        )
        info = UserInfo(id=user.id, login=user.login, password=password, subject=user.subject)
        if two_factor if two_factor is not None else user.requires_2fa:
            secret = pyotp.random_base32()
            user.totp_secret_encrypted = svc.two_factor.box.seal(secret.encode("ascii"))
            user.totp_enabled_at = datetime.now(UTC).replace(tzinfo=None)
            info.totp_secret = secret
            info.recovery_codes = svc.two_factor.replace_recovery_codes(session, user)
            SECOND_FACTORS.remember(info)
        if accept_obligations:
            for obligation in obligations.pending_obligations(session, user):
                session.add(ObligationAcceptance(user_id=user.id, obligation_id=obligation.id, locale="en"))
    return info


@pytest.fixture
def make_user(server: LiveServer):  # type: ignore[no-untyped-def]
    """Factory: ``new_account`` on the test server."""
    return functools.partial(new_account, server)


@pytest.fixture
def make_client(server: LiveServer):  # type: ignore[no-untyped-def]
    """Factory: a new portal app registered with the provider."""

    def factory(**kwargs: object) -> ClientInfo:
        svc = server.services
        kwargs.setdefault("name", "Test app")
        kwargs.setdefault("redirect_uris", ["https://rp.example.test/cb"])
        kwargs.setdefault("post_logout_redirect_uris", ["https://rp.example.test/bye"])
        kwargs.setdefault("client_id", "app-" + secrets.token_hex(6))
        with svc.db.transaction() as session:
            client, secret = create_client(session, **kwargs)  # type: ignore[arg-type]
            info = ClientInfo(
                client_id=client.client_id,
                client_secret=secret,
                redirect_uri=client.redirect_uris[0] if client.redirect_uris else "",
                post_logout_redirect_uri=(client.post_logout_redirect_uris or [""])[0],
            )
        return info

    return factory


@pytest.fixture
def browser(server: LiveServer) -> Browser:
    """A cookie-keeping HTTP user agent that can fill in the provider's forms."""
    return Browser(server.url)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="darbaza-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
