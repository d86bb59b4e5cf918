"""The audit journal: sign-in events land in it, the chain survives concurrent writers,
and `darbaza audit verify` names the first edited, deleted or reordered row."""

from __future__ import annotations

import threading

from sqlalchemy import select, text

from idp.audit.models import AuditEvent
from tests.integration.test_cli import run


def events(server, action: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_sign_in_success_and_failure_are_journaled(server, browser, make_user):
    user = make_user()
    page = browser.get("/login")
    browser.submit(page, "/login", login=user.login, password="wrong password here!")
    page = browser.get("/login")
    browser.submit(page, "/login", login=user.login, password=user.password)
    subject = f"user:{user.id}"
    failures = [e for e in events(server, "account:login:failure") if e.subject == subject]
    successes = [e for e in events(server, "account:login:success") if e.subject == subject]
    assert failures and successes
    assert failures[-1].ip == "127.0.0.1" and failures[-1].request_id
    assert "wrong password" not in str(failures[-1].details)  # never log a password


def test_concurrent_writers_keep_the_chain(server):
    journal = server.services.journal

    def write(n: int) -> None:
        for i in range(10):
            with server.services.db.transaction() as session:
                journal.record(session, actor=f"test:{n}", action="test:concurrent", details={"i": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = run(server, "audit", "verify")
    assert result.exit_code == 0, result.output
    assert "intact" in result.output


def _tamper(server, sql: str, **params: object) -> None:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        session.execute(text(sql), params)


def _with_restore(server, change, check):  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        rows = [dict(r._mapping) for r in session.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq))]
    try:
        change(rows)
        check()
    finally:
        with server.services.db.transaction() as session:
            session.execute(text("DELETE FROM audit_events"))
            for row in rows:
                session.execute(AuditEvent.__table__.insert().values(**row))


def test_verify_names_an_edited_row(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    target = events(server, "account:login:success")[-1].seq

    def change(rows):  # type: ignore[no-untyped-def]
        _tamper(server, "UPDATE audit_events SET reason = 'nothing happened' WHERE seq = :s", s=target)

    def check():  # type: ignore[no-untyped-def]
        result = run(server, "audit", "verify")
        assert result.exit_code == 1
        assert f"row {target} was edited" in result.output

    _with_restore(server, change, check)
    assert run(server, "audit", "verify").exit_code == 0


def test_verify_names_a_deleted_row(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    browser.sign_in(user.login, user.password)
    target = events(server, "account:login:success")[-2].seq

    def change(rows):  # type: ignore[no-untyped-def]
        _tamper(server, "DELETE FROM audit_events WHERE seq = :s", s=target)

    def check():  # type: ignore[no-untyped-def]
        result = run(server, "audit", "verify")
        assert result.exit_code == 1 and f"row {target} is missing" in result.output

    _with_restore(server, change, check)


def test_verify_names_reordered_rows(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    browser.sign_in(user.login, user.password)
    last = events(server, "account:login:success")[-1].seq
    before = last - 1

    def change(rows):  # type: ignore[no-untyped-def]
        # Swap the content of two consecutive rows, keeping their sequence numbers.
        _tamper(server, "UPDATE audit_events SET seq = -1 WHERE seq = :a", a=before)
        _tamper(server, "UPDATE audit_events SET seq = :a WHERE seq = :b", a=before, b=last)
        _tamper(server, "UPDATE audit_events SET seq = :b WHERE seq = -1", b=last)

    def check():  # type: ignore[no-untyped-def]
        result = run(server, "audit", "verify")
        assert result.exit_code == 1 and f"row {before}" in result.output

    _with_restore(server, change, check)


def test_verify_notices_rows_cut_from_the_end(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    last = events(server, "account:login:success")[-1].seq

    def change(rows):  # type: ignore[no-untyped-def]
        _tamper(server, "DELETE FROM audit_events WHERE seq >= :s", s=last)

    def check():  # type: ignore[no-untyped-def]
        result = run(server, "audit", "verify")
        assert result.exit_code == 1 and "missing" in result.output

    _with_restore(server, change, check)


def test_several_processes_writing_keep_the_chain(server):
    """Two OS processes (as two server processes would) append at the same time."""
    import subprocess
    import sys

    settings = server.services.settings
    script = (
        "import sys\n"
        "from idp.config import Settings\n"
        "from idp.services import Services\n"
        "svc = Services.build(Settings.from_env(environ={}, database_url=sys.argv[1], redis_url=sys.argv[2]))\n"
        "for i in range(25):\n"
        "    with svc.db.transaction() as session:\n"
        "        svc.journal.record(session, actor='test:process', action='test:multiprocess', details={'i': i})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, settings.database_url, settings.redis_url])  # noqa: S603
        for _ in range(2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len([e for e in events(server, "test:multiprocess")]) >= 50
    result = run(server, "audit", "verify")
    assert result.exit_code == 0, result.output


def test_a_fresh_database_has_the_head_row_so_first_writers_never_collide(tmp_path):
    """Two first events written at once on a fresh PostgreSQL database both inserted the
    head row (a duplicate key, a 500 at sign-in). The migrations create it."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from idp.audit.journal import GENESIS, Journal
    from idp.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, seq, hash FROM audit_head")).all() == [(1, 0, GENESIS)]
        with Session(engine) as session:
            first = Journal().record(session, actor="test", action="test:first")
            session.commit()
            assert first.seq == 1 and first.prev_hash == GENESIS
    finally:
        engine.dispose()
