"""Pruning (idp/prune.py): ``darbaza prune`` and the worker's job delete expired tokens and
codes and old delivered mail and logout tokens, and nothing that can still be used — in
particular never a used refresh token of a live family, whose replay must still revoke it."""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime, timedelta

from redis import Redis
from rq import Queue
from sqlalchemy import select

from idp.audit.models import AuditEvent
from idp.delivery_queue import naive_utc
from idp.notify.models import OutboxMessage
from idp.oidc.models import (
    AccessToken,
    AuthorizationCode,
    BackchannelLogoutDelivery,
    RefreshToken,
    token_hash,
)
from idp.prune import TABLES, prune
from tests.integration.test_cli import run
from tests.integration.test_rfc9700 import assert_oauth_error, get_tokens, refresh

HOUR = 3600
DAY = 86400


def ago(**delta: float) -> datetime:
    return naive_utc() - timedelta(**delta)


def _family() -> str:
    return "fam-" + secrets.token_hex(8)


def _access(session, user_id: int, expires_at: int, family: str | None = None) -> str:
    jti = "jti-" + secrets.token_hex(8)
    session.add(AccessToken(jti=jti, family_id=family or _family(), client_id="prune-app", user_id=user_id,
                            scope="openid", issued_at=expires_at - 600, expires_at=expires_at))
    return jti


def _refresh(session, user_id: int, family: str, expires_at: int, *, used: bool = False,
             revoked: bool = False) -> int:
    now = int(time.time())
    row = RefreshToken(token_hash=token_hash(secrets.token_urlsafe(32)), family_id=family, client_id="prune-app",
                       user_id=user_id, scope="openid", issued_at=expires_at - 30 * DAY, expires_at=expires_at,
                       used_at=now - DAY if used else None, revoked_at=now - DAY if revoked else None)
    session.add(row)
    session.flush()
    return row.id


def _code(session, user_id: int, expires_at: int) -> int:
    row = AuthorizationCode(code_hash=token_hash(secrets.token_urlsafe(32)), family_id=_family(),
                            client_id="prune-app", user_id=user_id, redirect_uri="https://rp.example.test/cb",
                            scope="openid", code_challenge="x" * 43, auth_time=expires_at - 120,
                            issued_at=expires_at - 60, expires_at=expires_at, used_at=expires_at - 30)
    session.add(row)
    session.flush()
    return row.id


def _mail(session, status: str, *, sent_at: datetime | None = None, last_try: datetime | None = None,
          created_at: datetime | None = None) -> int:
    row = OutboxMessage(template="prune_test", to_address="someone@school.example", subject="s", body_text="b",
                        status=status, sent_at=sent_at, next_attempt_at=last_try or naive_utc(),
                        created_at=created_at or naive_utc(), message_id=f"<{secrets.token_hex(12)}@prune.test>")
    session.add(row)
    session.flush()
    return row.id


def _logout(session, status: str, *, delivered_at: datetime | None = None, last_try: datetime | None = None,
            created_at: datetime | None = None) -> int:
    row = BackchannelLogoutDelivery(client_id="prune-app", uri="https://rp.example.test/logout", sid=None,
                                    subject="sub", logout_token="a.b.c", status=status, delivered_at=delivered_at,
                                    next_attempt_at=last_try or naive_utc(), created_at=created_at or naive_utc())
    session.add(row)
    session.flush()
    return row.id


def seed(server, user_id: int) -> tuple[dict[str, list], dict[str, list]]:
    """Rows of every kind: (those pruning must delete, those it must keep), per model."""
    now = int(time.time())
    gone: dict[str, list] = {name: [] for name in ("access", "refresh", "code", "mail", "logout")}
    kept: dict[str, list] = {name: [] for name in gone}
    with server.services.db.transaction() as s:
        gone["access"].append(_access(s, user_id, now - 2 * HOUR))
        kept["access"] += [_access(s, user_id, now - 10 * 60), _access(s, user_id, now + 300)]

        expired, live, mixed = _family(), _family(), _family()
        # A family past its absolute lifetime goes entirely: used, revoked and current token.
        gone["refresh"] += [_refresh(s, user_id, expired, now - 2 * HOUR, used=True),
                            _refresh(s, user_id, expired, now - 2 * HOUR, revoked=True),
                            _refresh(s, user_id, expired, now - 2 * HOUR)]
        # A live family keeps its used tokens (reuse detection) and its revoked ones.
        kept["refresh"] += [_refresh(s, user_id, live, now + DAY, used=True),
                            _refresh(s, user_id, live, now + DAY, used=True),
                            _refresh(s, user_id, live, now + DAY, revoked=True),
                            _refresh(s, user_id, live, now + DAY)]
        # Expired within the last hour: kept for now.
        kept["refresh"].append(_refresh(s, user_id, _family(), now - 30 * 60, used=True))
        # Should a family's rows disagree on its expiry, none of it goes while one lives.
        kept["refresh"] += [_refresh(s, user_id, mixed, now - 2 * HOUR, used=True),
                            _refresh(s, user_id, mixed, now + DAY)]

        gone["code"].append(_code(s, user_id, now - 2 * DAY))
        kept["code"] += [_code(s, user_id, now - HOUR), _code(s, user_id, now + 60)]

        gone["mail"] += [_mail(s, "sent", sent_at=ago(days=31), created_at=ago(days=31)),
                         _mail(s, "failed", last_try=ago(days=40), created_at=ago(days=41))]
        kept["mail"] += [_mail(s, "sent", sent_at=ago(days=29), created_at=ago(days=31)),
                         _mail(s, "failed", last_try=ago(days=1), created_at=ago(days=60)),
                         _mail(s, "pending", last_try=ago(days=60), created_at=ago(days=60)),
                         _mail(s, "sending", last_try=ago(days=60), created_at=ago(days=60))]

        gone["logout"] += [_logout(s, "delivered", delivered_at=ago(days=31), created_at=ago(days=31)),
                           _logout(s, "failed", last_try=ago(days=40), created_at=ago(days=41))]
        kept["logout"] += [_logout(s, "delivered", delivered_at=ago(days=29), created_at=ago(days=31)),
                           _logout(s, "failed", last_try=ago(days=1), created_at=ago(days=60)),
                           _logout(s, "pending", last_try=ago(days=60), created_at=ago(days=60)),
                           _logout(s, "sending", last_try=ago(days=60), created_at=ago(days=60))]
    return gone, kept


KEYS = {"access": AccessToken.jti, "refresh": RefreshToken.id, "code": AuthorizationCode.id,
        "mail": OutboxMessage.id, "logout": BackchannelLogoutDelivery.id}


def present(server, kind: str, ids: list) -> set:
    key = KEYS[kind]
    with server.services.db.transaction() as s:
        return set(s.scalars(select(key).where(key.in_(ids))))


def counts(output: str, verb: str) -> dict[str, int]:
    found = {table: int(n) for n, table in re.findall(rf"^{verb} (\d+) (\w+)$", output, re.MULTILINE)}
    assert set(found) == set(TABLES), output
    return found


def minimum(gone: dict[str, list]) -> dict[str, int]:
    return {"access_tokens": len(gone["access"]), "refresh_tokens": len(gone["refresh"]),
            "authorization_codes": len(gone["code"]), "outbox_messages": len(gone["mail"]),
            "backchannel_logout_deliveries": len(gone["logout"])}


def test_prune_deletes_exactly_what_can_no_longer_be_used(server, make_user):
    user = make_user()
    gone, kept = seed(server, user.id)
    everything = {kind: gone[kind] + kept[kind] for kind in gone}

    dry = run(server, "prune", "--dry-run")
    assert dry.exit_code == 0, dry.output
    would = counts(dry.output, "would delete")
    for table, at_least in minimum(gone).items():
        assert would[table] >= at_least, (table, dry.output)
    for kind, ids in everything.items():
        assert present(server, kind, ids) == set(ids), kind  # the dry run deleted nothing

    result = run(server, "prune")
    assert result.exit_code == 0, result.output
    deleted = counts(result.output, "deleted")
    for table, at_least in minimum(gone).items():
        assert deleted[table] >= at_least, (table, result.output)
    for kind in gone:
        assert present(server, kind, everything[kind]) == set(kept[kind]), kind

    # Nothing left to prune; the run that deleted something is journalled with its counts.
    again = run(server, "prune", "--dry-run")
    assert counts(again.output, "would delete") == dict.fromkeys(TABLES, 0), again.output
    with server.services.db.transaction() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "data:retention:prune")
                          .order_by(AuditEvent.id.desc())).first()
    assert event is not None and event.actor.startswith("cli")
    assert event.details["counts"] == deleted


def test_a_used_refresh_token_of_a_live_family_survives_and_its_replay_still_revokes(
        server, browser, make_user, make_client):
    user = make_user()
    app = make_client(auth_method="none", trusted=True)
    rt1 = get_tokens(server, browser, app, user)["refresh_token"]
    second = refresh(server, app, rt1)
    assert second.status_code == 200, second.text
    rt2 = second.json()["refresh_token"]

    assert run(server, "prune").exit_code == 0
    with server.services.db.transaction() as s:
        old = s.scalar(select(RefreshToken).where(RefreshToken.token_hash == token_hash(rt1)))
        assert old is not None and old.used_at is not None
        family = old.family_id

    # The replay of the used token is recognised: the whole family is revoked.
    assert_oauth_error(refresh(server, app, rt1), 400, "invalid_grant")
    assert_oauth_error(refresh(server, app, rt2), 400, "invalid_grant")

    # Once the family's absolute lifetime is over (and the grace), all of it goes.
    with server.services.db.transaction() as s:
        for row in s.scalars(select(RefreshToken).where(RefreshToken.family_id == family)):
            row.expires_at = int(time.time()) - 2 * HOUR
    assert run(server, "prune").exit_code == 0
    with server.services.db.transaction() as s:
        assert s.scalars(select(RefreshToken.id).where(RefreshToken.family_id == family)).all() == []


def test_the_worker_job_prunes_with_the_settings_of_the_environment(server, make_user, database_url, redis_url,
                                                                     monkeypatch):
    from idp.prune import prune_job
    from tests.conftest import TEST_SECRET_KEY

    for name, value in (("DATABASE_URL", database_url), ("REDIS_URL", redis_url), ("SECRET_KEY", TEST_SECRET_KEY),
                        ("DELIVERED_RETENTION_DAYS", "7")):
        monkeypatch.setenv(f"IDP_{name}", value)
    user = make_user()
    gone, kept = seed(server, user.id)
    # With 7 days' retention the mail and logout token delivered 29 days ago go as well
    # (seed puts them first in kept); one delivered 5 days ago stays.
    for kind in ("mail", "logout"):
        gone[kind].append(kept[kind].pop(0))
    with server.services.db.transaction() as s:
        kept["mail"].append(_mail(s, "sent", sent_at=ago(days=5)))
        kept["logout"].append(_logout(s, "delivered", delivered_at=ago(days=5)))

    result = prune_job()
    for table, at_least in minimum(gone).items():
        assert result[table] >= at_least, (table, result)
    for kind in gone:
        assert present(server, kind, gone[kind] + kept[kind]) == set(kept[kind]), kind


def test_the_worker_queues_pruning_once_per_interval(redis_url):
    from idp.worker import PRUNE_JOB, PRUNE_SCHEDULE_KEY, schedule_prune

    redis = Redis.from_url(redis_url)
    queue = Queue("prune-test-" + secrets.token_hex(4), connection=redis)
    redis.delete(PRUNE_SCHEDULE_KEY)
    try:
        assert schedule_prune(redis, queue) is True
        assert schedule_prune(redis, queue) is False  # another worker, the same interval
        assert [job.func_name for job in queue.jobs] == [PRUNE_JOB]
        assert 0 < redis.pttl(PRUNE_SCHEDULE_KEY) <= 600_000
    finally:
        queue.empty()
        redis.delete(PRUNE_SCHEDULE_KEY)
        redis.close()


def test_batches_and_the_time_bound(server, make_user):
    user = make_user()
    now = int(time.time())
    with server.services.db.transaction() as s:
        jtis = [_access(s, user.id, now - 2 * HOUR) for _ in range(5)]
    factory = server.services.db.factory
    # No time at all: nothing deleted, and the run says it is not complete.
    stopped = prune(factory, retention_days=30, time_limit=0)
    assert stopped.complete is False and stopped.total == 0
    assert present(server, "access", jtis) == set(jtis)
    # Batches of two rows: every batch its own statement, until nothing is left.
    done = prune(factory, retention_days=30, batch_size=2)
    assert done.complete is True and done.counts["access_tokens"] >= 5
    assert present(server, "access", jtis) == set()
