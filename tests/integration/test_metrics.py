"""Prometheus ``/metrics`` for operations (issue 9): sign-ins by result, tokens issued by
grant and kind, request latency, outbox and back-channel backlog, directory sync results,
``darbaza_up`` and build info. Each test scrapes before and after driving the provider
over HTTP and asserts the exact change: the test server of this process serves nobody
else while a test runs (xdist workers each have their own server, database and Redis)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select, update

from connectors.ldap.models import DirectorySyncRun
from idp.accounts.models import User
from idp.app import create_app
from idp.notify.models import OutboxMessage
from idp.oidc.models import BackchannelLogoutDelivery
from tests.conftest import free_port, make_settings
from tests.helpers import Browser
from tests.integration.test_rfc9700 import exchange, get_code, refresh

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    response = requests.get(base + "/metrics", timeout=15)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_up_and_build_info(server) -> None:  # type: ignore[no-untyped-def]
    samples = scrape(server.url)
    assert value(samples, "darbaza_up") == 1
    info = [labels for (name, labels) in samples if name == "darbaza_build_info"]
    assert len(info) == 1 and dict(info[0])["version"] == "0.1.0"
    assert value(samples, "darbaza_metrics_source_up", source="database") == 1
    assert value(samples, "darbaza_metrics_source_up", source="redis") == 1
    # The breach-case metrics are still served by the same endpoint.
    assert ("darbaza_breach_cases_overdue", frozenset()) in samples


def test_sign_ins_are_counted_by_result(server, make_user) -> None:  # type: ignore[no-untyped-def]
    ok = make_user()
    locked = make_user()
    with server.services.db.transaction() as db:
        db.execute(update(User).where(User.id == locked.id).values(locked=True))
    before = scrape(server.url)
    for _ in range(2):
        signed_in = Browser(server.url).sign_in(ok.login, ok.password)
        assert signed_in.status_code in (302, 303), signed_in.text[:300]
    wrong = Browser(server.url).sign_in(ok.login, "not the password " + secrets.token_hex(4))
    assert wrong.status_code == 401
    refused = Browser(server.url).sign_in(locked.login, locked.password)
    assert refused.status_code == 403
    after = scrape(server.url)
    assert delta(before, after, "darbaza_signins_total", result="success") == 2
    assert delta(before, after, "darbaza_signins_total", result="failure") == 1
    assert delta(before, after, "darbaza_signins_total", result="refused") == 1
    # Every request was timed: the login page and its POSTs, by status.
    assert delta(before, after, "darbaza_http_request_duration_seconds_count", endpoint="login.login",
                 status="401") == 1
    assert delta(before, after, "darbaza_http_request_duration_seconds_count", endpoint="login.login",
                 status="403") == 1


def test_tokens_are_counted_by_grant_and_kind(server, browser, make_user, make_client) -> None:  # type: ignore[no-untyped-def]
    user = make_user()
    client = make_client(scopes=["openid", "profile"], grant_types=["authorization_code", "refresh_token"])
    machine = make_client(grant_types=["client_credentials"], scopes=["roles"], redirect_uris=[],
                          post_logout_redirect_uris=[])
    before = scrape(server.url)
    code, verifier = get_code(browser, client, user, scope="openid profile")
    first = exchange(server, client, code, verifier)
    assert first.status_code == 200, first.text
    second = refresh(server, client, first.json()["refresh_token"])
    assert second.status_code == 200, second.text
    replay = exchange(server, client, code, verifier)  # a used code: no token
    assert replay.status_code == 400
    credentials = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                                auth=(machine.client_id, machine.client_secret), timeout=15)
    assert credentials.status_code == 200, credentials.text
    after = scrape(server.url)
    for grant, answer in (("authorization_code", first), ("refresh_token", second),
                          ("client_credentials", credentials)):
        for kind in ("access_token", "refresh_token", "id_token"):
            expected = 1 if kind in answer.json() else 0
            assert delta(before, after, "darbaza_tokens_issued_total", grant_type=grant, token=kind) == expected, \
                (grant, kind)
    assert "id_token" in first.json() and "refresh_token" in second.json()
    assert "refresh_token" not in credentials.json()
    # Latency: the four /token calls, by status; the buckets add up to the count.
    assert delta(before, after, "darbaza_http_request_duration_seconds_count", endpoint="oidc.token",
                 status="200") == 3
    assert delta(before, after, "darbaza_http_request_duration_seconds_count", endpoint="oidc.token",
                 status="400") == 1
    series = {"endpoint": "oidc.token", "status": "200"}
    count = value(after, "darbaza_http_request_duration_seconds_count", **series)
    assert value(after, "darbaza_http_request_duration_seconds_bucket", le="+Inf", **series) == count
    assert value(after, "darbaza_http_request_duration_seconds_bucket", le="10.0", **series) <= count
    assert delta(before, after, "darbaza_http_request_duration_seconds_sum", **series) > 0


@pytest.fixture
def backlog(server, make_user, make_client) -> Iterator[dict[str, list[int]]]:  # type: ignore[no-untyped-def]
    """Rows this test adds to the outbox and the back-channel queue, removed afterwards
    (the shared server has no worker; other tests must not find them)."""
    made: dict[str, list[int]] = {"mail": [], "logout": []}
    yield made
    with server.services.db.transaction() as db:
        db.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(made["mail"])))
        db.execute(delete(BackchannelLogoutDelivery).where(BackchannelLogoutDelivery.id.in_(made["logout"])))


def test_outbox_and_backchannel_backlog(server, make_user, make_client, backlog) -> None:  # type: ignore[no-untyped-def]
    svc = server.services
    user = make_user()
    app = make_client(backchannel_logout_uri="http://127.0.0.1:9/backchannel-logout")
    before = scrape(server.url)
    month_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=30)
    with svc.db.transaction() as db:
        for _ in range(2):
            message = svc.outbox.enqueue(db, template="password_changed", to="metrics@school.example",
                                         locale="en", context={"display_name": "Test", "changed_at": "now"})
            db.flush()
            backlog["mail"].append(message.id)
        message.created_at = month_ago  # the oldest waiting mail is a month old
        assert svc.backchannel.queue_for_session(db, user_id=user.id, sid="sid-" + secrets.token_hex(8),
                                                 client_ids=[app.client_id]) == 1
        db.flush()
        backlog["logout"] += list(db.scalars(select(BackchannelLogoutDelivery.id)
                                             .where(BackchannelLogoutDelivery.client_id == app.client_id)))
        db.execute(update(BackchannelLogoutDelivery).where(BackchannelLogoutDelivery.id.in_(backlog["logout"]))
                   .values(created_at=month_ago))
    after = scrape(server.url)
    assert delta(before, after, "darbaza_outbox_pending") == 2
    assert delta(before, after, "darbaza_backchannel_pending") == 1
    month = 30 * 86400
    for name in ("darbaza_outbox_oldest_pending_seconds", "darbaza_backchannel_oldest_pending_seconds"):
        assert value(before, name) < month - 3600, name  # nothing else waits that long
        assert month <= value(after, name) < month + 600, name
    # Sent: no longer waiting.
    with svc.db.transaction() as db:
        db.execute(update(OutboxMessage).where(OutboxMessage.id.in_(backlog["mail"]))
                   .values(status="sent", sent_at=datetime.now(UTC).replace(tzinfo=None)))
    sent = scrape(server.url)
    assert delta(after, sent, "darbaza_outbox_pending") == -2
    assert value(sent, "darbaza_outbox_oldest_pending_seconds") < month - 3600


def test_directory_sync_results(server) -> None:  # type: ignore[no-untyped-def]
    svc = server.services
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    with svc.db.transaction() as db:
        runs = [
            DirectorySyncRun(mode="incremental", trigger="worker", status="completed", started_at=now,
                             finished_at=now + timedelta(seconds=3), created=4, updated=2, disabled=1,
                             unchanged=90, error_count=0),
            # A dry run changes nothing: it is not "the last result".
            DirectorySyncRun(mode="incremental", trigger="cli", dry_run=True, status="completed",
                             started_at=now + timedelta(seconds=5), finished_at=now + timedelta(seconds=6),
                             created=99),
            DirectorySyncRun(mode="full", trigger="worker", status="failed", started_at=now + timedelta(seconds=7),
                             finished_at=now + timedelta(seconds=8), error_count=3, message="directory down"),
        ]
        db.add_all(runs)
    try:
        samples = scrape(server.url)
        assert value(samples, "darbaza_directory_sync_last_entries", mode="incremental", result="created") == 4
        assert value(samples, "darbaza_directory_sync_last_entries", mode="incremental", result="disabled") == 1
        assert value(samples, "darbaza_directory_sync_last_entries", mode="incremental", result="unchanged") == 90
        assert value(samples, "darbaza_directory_sync_last_entries", mode="full", result="errors") == 3
        assert value(samples, "darbaza_directory_sync_last_run_timestamp_seconds", mode="full",
                     status="failed") == (now + timedelta(seconds=7)).replace(tzinfo=UTC).timestamp()
        assert value(samples, "darbaza_directory_sync_last_success_timestamp_seconds") == \
            (now + timedelta(seconds=3)).replace(tzinfo=UTC).timestamp()
    finally:
        with svc.db.transaction() as db:
            db.execute(delete(DirectorySyncRun).where(DirectorySyncRun.id.in_([r.id for r in runs])))


def test_redis_down_leaves_out_its_metrics_and_keeps_the_rest(database_url) -> None:  # type: ignore[no-untyped-def]
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client = create_app(make_settings(database_url, dead_redis, "http://127.0.0.1:9")).test_client()
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert value(samples, "darbaza_metrics_source_up", source="redis") == 0
    assert value(samples, "darbaza_metrics_source_up", source="database") == 1
    assert ("darbaza_outbox_pending", frozenset()) in samples
    assert not any(name.startswith("darbaza_signins") for name, _ in samples)  # unknown, not 0
