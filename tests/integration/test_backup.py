"""``darbaza backup`` and ``darbaza restore`` (issue 9): a round trip on a database of its
own (a temporary SQLite file, or a new database on the suite's PostgreSQL cluster), run as
an operator runs the commands, checked through a provider served from the restored
database: accounts, signing keys (a token signed before the backup verifies against the
restored JWKS), sealed TOTP seeds, the audit chain, and everyone signed out."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pyotp
import pytest
import redis as redis_lib
import requests
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, select

from idp.accounts import obligations
from idp.accounts.models import ObligationAcceptance, User
from idp.accounts.service import create_user
from idp.audit.models import AuditEvent
from idp.cli import main
from idp.migrate import upgrade
from idp.oidc.clients import create_client
from idp.oidc.models import SigningKey
from tests.conftest import TEST_SECRET_KEY, LiveServer, postgres_database
from tests.helpers import Browser, ClientInfo, UserInfo, decode_verified
from tests.integration.test_rfc9700 import exchange, get_code


@pytest.fixture
def own_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A migrated database apart from the shared test server's (a restore replaces it)."""
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'restore-target.sqlite3'}"
        upgrade(url)
        yield url
        return
    with postgres_database(database_url, "darbaza_backup") as url:
        yield url


@pytest.fixture
def own_redis(redis_url: str) -> Iterator[str]:
    """Another database of the suite's Redis: a restore empties Darbaza's Redis database."""
    url = redis_url.rsplit("/", 1)[0] + "/7"
    yield url
    redis_lib.Redis.from_url(url).flushdb()


def cli(database_url: str, redis_url: str, *args: str, secret_key: str = TEST_SECRET_KEY) -> Result:
    env = {
        "IDP_DATABASE_URL": database_url,
        "IDP_REDIS_URL": redis_url,
        "IDP_SECRET_KEY": secret_key,
        "IDP_ISSUER": "http://127.0.0.1:8000",
        "IDP_LOG_FORMAT": "text",
    }
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def add_people(live: LiveServer) -> tuple[UserInfo, UserInfo, ClientInfo]:
    """A student, a teacher with an authenticator app, and a portal app."""
    svc = live.services
    people = []
    with svc.db.transaction() as db:
        for role in ("student", "teacher"):
            password = "correct horse battery " + secrets.token_hex(4)
            user = create_user(db, svc.passwords, login=f"{role}-{secrets.token_hex(4)}", display_name="Асель Б.",
                               password=password, roles=[role])
            info = UserInfo(id=user.id, login=user.login, password=password, subject=user.subject)
            if role == "teacher":
                info.totp_secret = pyotp.random_base32()
                user.totp_secret_encrypted = svc.two_factor.box.seal(info.totp_secret.encode("ascii"))
                user.totp_enabled_at = datetime.now(UTC).replace(tzinfo=None)
            for obligation in obligations.pending_obligations(db, user):
                db.add(ObligationAcceptance(user_id=user.id, obligation_id=obligation.id, locale="en"))
            svc.journal.record(db, actor="test", action="account:create", subject=f"user:{user.id}")
            people.append(info)
        client, secret = create_client(db, name="Kundoluk", redirect_uris=["https://rp.example.test/cb"],
                                       client_id="app-" + secrets.token_hex(4))
        app = ClientInfo(client_id=client.client_id, client_secret=secret, redirect_uri=client.redirect_uris[0],
                         post_logout_redirect_uri="")
    return people[0], people[1], app


def sign_in_with_totp(browser: Browser, person: UserInfo) -> None:
    step = browser.sign_in(person.login, person.password)
    assert step.status_code == 303 and step.headers["Location"].endswith("/login/second-factor"), step.text[:300]
    page = browser.get(step.headers["Location"])
    done = browser.submit(page, "/login/second-factor", code=pyotp.TOTP(person.totp_secret or "").now())
    assert done.status_code == 303 and "/login" not in done.headers["Location"], done.text[:300]


def test_backup_and_restore_round_trip(own_database: str, own_redis: str, tmp_path: Path) -> None:
    before = LiveServer.serve(own_database, own_redis)
    try:
        with before.services.db.transaction() as db:
            before.services.keys.ensure_key(db)
        student, teacher, app = add_people(before)
        browser = Browser(before.url)
        code, verifier = get_code(browser, app, student, scope="openid profile")
        answer = exchange(before, app, code, verifier)
        assert answer.status_code == 200, answer.text
        id_token = answer.json()["id_token"]
        kid_before = decode_verified(id_token, requests.get(before.url + "/jwks.json", timeout=10).json())[0]["kid"]
    finally:
        before.close()

    # The backup, with its manifest.
    out = tmp_path / "backups" / "darbaza.backup"
    made = cli(own_database, own_redis, "backup", str(out))
    assert made.exit_code == 0, made.output
    manifest = json.loads((tmp_path / "backups" / "darbaza.backup.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["backend"] == ("sqlite" if own_database.startswith("sqlite") else "postgresql")
    assert manifest["schema_revision"] and manifest["format"] == 1
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert cli(own_database, own_redis, "backup", str(out)).exit_code == 2  # never overwritten

    # Things change after the backup: a new account, the student locked and renamed, a new key.
    engine = create_engine(own_database)
    with engine.begin() as conn:
        conn.execute(User.__table__.update().where(User.__table__.c.id == student.id)
                     .values(locked=True, display_name="changed"))
    assert cli(own_database, own_redis, "keys", "rotate").exit_code == 0
    after = LiveServer.serve(own_database, own_redis)
    try:
        late, _, _ = add_people(after)
        assert Browser(after.url).sign_in(late.login, late.password).status_code == 303
        signed_in = Browser(after.url)
        sign_in_with_totp(signed_in, teacher)
        assert signed_in.get("/").status_code == 200
        session_cookies = dict(signed_in.http.cookies)
    finally:
        after.close()

    # A damaged copy is refused before anything is touched.
    damaged = tmp_path / "damaged.backup"
    shutil.copy(out, damaged)
    shutil.copy(str(out) + ".manifest.json", str(damaged) + ".manifest.json")
    with damaged.open("r+b") as f:
        f.seek(damaged.stat().st_size // 2)
        f.write(b"\x00garbage\x00")
    refused = cli(own_database, own_redis, "restore", str(damaged), "--yes")
    assert refused.exit_code == 2 and "does not match its manifest" in refused.output
    # A database that is not empty needs --yes.
    refused = cli(own_database, own_redis, "restore", str(out))
    assert refused.exit_code == 2 and "not empty" in refused.output
    with engine.connect() as conn:
        assert conn.execute(select(User.id).where(User.login == late.login)).first() is not None

    restored = cli(own_database, own_redis, "restore", str(out), "--yes")
    assert restored.exit_code == 0, restored.output
    assert "audit journal: intact" in restored.output and "everyone is signed out" in restored.output
    assert "signing keys: 1 (1 open with the configured key)" in restored.output
    assert "TOTP seeds: 1 (1 open" in restored.output
    verified = cli(own_database, own_redis, "audit", "verify")
    assert verified.exit_code == 0 and "intact" in verified.output, verified.output

    with engine.connect() as conn:
        logins = set(conn.scalars(select(User.login)))
        assert {student.login, teacher.login} <= logins and late.login not in logins
        row = conn.execute(select(User.locked, User.display_name).where(User.id == student.id)).one()
        assert row == (False, "Асель Б.")
        assert conn.scalar(select(SigningKey.kid).where(SigningKey.retired_at.is_(None))) == kid_before
        actions = list(conn.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))
        assert actions[-1] == "data:backup:restore" and "key:rotate" not in actions
    engine.dispose()

    restored_server = LiveServer.serve(own_database, own_redis)
    try:
        # The token signed before the backup verifies against the restored JWKS.
        jwks = requests.get(restored_server.url + "/jwks.json", timeout=10).json()
        header, claims = decode_verified(id_token, jwks)
        assert header["kid"] == kid_before and claims["sub"] == student.subject
        # The accounts work: the student signs in with the old password, the teacher's
        # authenticator app (a sealed seed) still gives valid codes.
        assert Browser(restored_server.url).sign_in(student.login, student.password).status_code == 303
        sign_in_with_totp(Browser(restored_server.url), teacher)
        # A session from before the restore is over.
        stale = Browser(restored_server.url)
        stale.http.cookies.update(session_cookies)
        assert stale.get("/").status_code == 302
        assert Browser(restored_server.url).sign_in(late.login, late.password).status_code == 401
    finally:
        restored_server.close()


def test_restore_needs_the_same_secret_key(own_database: str, own_redis: str, tmp_path: Path) -> None:
    live = LiveServer.serve(own_database, own_redis)
    try:
        with live.services.db.transaction() as db:
            live.services.keys.ensure_key(db)
        add_people(live)
    finally:
        live.close()
    out = tmp_path / "keyed.backup"
    assert cli(own_database, own_redis, "backup", str(out)).exit_code == 0
    other_key = cli(own_database, own_redis, "restore", str(out), "--yes", secret_key="another-" + secrets.token_hex(8))
    assert other_key.exit_code == 1
    assert "signing keys: 1 (0 open" in other_key.output and "IDP_SECRET_KEY" in other_key.output
    # With the right key the same file restores cleanly.
    assert cli(own_database, own_redis, "restore", str(out), "--yes").exit_code == 0


def test_restore_into_an_empty_database_needs_no_yes(own_database: str, own_redis: str, tmp_path: Path,
                                                     database_url: str) -> None:
    live = LiveServer.serve(own_database, own_redis)
    try:
        with live.services.db.transaction() as db:
            live.services.keys.ensure_key(db)
        student, _, _ = add_people(live)
    finally:
        live.close()
    out = tmp_path / "fresh.backup"
    assert cli(own_database, own_redis, "backup", str(out)).exit_code == 0
    with ExitStack() as stack:
        if own_database.startswith("sqlite"):
            target = f"sqlite:///{tmp_path / 'brand-new.sqlite3'}"  # not even created yet
        else:
            target = stack.enter_context(postgres_database(database_url, "darbaza_empty", migrate=False))
        result = cli(target, own_redis, "restore", str(out))
        assert result.exit_code == 0, result.output
        engine = create_engine(target)
        with engine.connect() as conn:
            assert conn.scalar(select(User.login).where(User.id == student.id)) == student.login
        engine.dispose()


def test_pg_dump_missing_is_a_clear_error(database_url: str, own_redis: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL only: SQLite backups need no external tool")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("idp.backup.glob", lambda pattern: [])
    result = cli(database_url, own_redis, "backup", str(tmp_path / "x.backup"))
    assert result.exit_code == 2 and "pg_dump was not found" in result.output
    assert not (tmp_path / "x.backup").exists()
