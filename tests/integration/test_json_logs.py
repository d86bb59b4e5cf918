"""JSON logs with a request id, never a secret or token (issue 9, "Operations").

A real ``darbaza serve`` (gunicorn, two workers, IDP_LOG_FORMAT=json) on loopback: a
failed sign-in with a known password, a sign-in, the code flow, a refresh, userinfo with
the token in the header and in the query, introspection and revocation. Afterwards every
line it wrote is one JSON object, each request has an access line under the id of its
``X-Request-ID`` response header, and no password, code, token, client secret or session
cookie appears anywhere in its output."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from idp.app import create_app
from idp.audit.models import AuditEvent
from tests.conftest import LiveServer, free_port, make_settings, wait_healthy
from tests.helpers import Browser
from tests.integration.test_scale_out import DARBAZA, REPO, cluster_env, stop_groups

WRONG_PASSWORD = "hunter2-SECRET-xyz"  # noqa: S105 - the secret the logs must not show


@dataclass
class Served:
    url: str
    stdout: Path
    stderr: Path
    proc: subprocess.Popen[bytes]

    def lines(self) -> list[str]:
        return [line for path in (self.stdout, self.stderr) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def served(server: LiveServer, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Served]:
    """``darbaza serve`` with JSON logs; the ``server`` fixture only made sure the database
    has a signing key."""
    logs = tmp_path_factory.mktemp("json-logs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = cluster_env(url, database_url, redis_url)
    env["IDP_LOG_FORMAT"] = "json"
    stdout, stderr = logs / "stdout.log", logs / "stderr.log"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [str(DARBAZA), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"],
            cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True,
        )
    served = Served(url, stdout, stderr, proc)
    try:
        wait_healthy(url, [proc], lambda: "\n".join(served.lines()), "darbaza serve")
        yield served
    finally:
        stop_groups([proc])


def test_every_line_is_json_with_request_ids_and_no_secret(served: Served, make_user, make_client) -> None:  # type: ignore[no-untyped-def]
    user = make_user()
    client = make_client(scopes=["openid", "profile"], grant_types=["authorization_code", "refresh_token"])
    seen: list[requests.Response] = []

    def keep(response: requests.Response) -> requests.Response:
        seen.extend([*response.history, response])
        return response

    # A failed sign-in with a password we will look for.
    failing = Browser(served.url)
    page = keep(failing.get("/login"))
    assert keep(failing.submit(page, "/login", login=user.login, password=WRONG_PASSWORD)).status_code == 401

    # Sign-in, the code flow, a refresh.
    browser = Browser(served.url)
    params, verifier, last = browser.authorize(client, user, scope="openid profile")
    keep(last)
    code = params["code"]
    tokens = keep(requests.post(served.url + "/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
        "code_verifier": verifier}, auth=(client.client_id, client.client_secret), timeout=15))
    assert tokens.status_code == 200, tokens.text
    first = tokens.json()
    refreshed = keep(requests.post(served.url + "/token", data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        auth=(client.client_id, client.client_secret), timeout=15))
    assert refreshed.status_code == 200, refreshed.text
    second = refreshed.json()
    access = second["access_token"]
    assert keep(requests.get(served.url + "/userinfo", headers={"Authorization": f"Bearer {access}"},
                             timeout=15)).status_code == 200
    # Secrets in a query string (where some clients put them) must not reach the log either.
    keep(requests.get(served.url + "/userinfo", params={"access_token": access}, timeout=15))
    keep(requests.get(served.url + "/login", params={"next": "/", "code": code, "state": "s"}, timeout=15))
    keep(requests.post(served.url + "/introspect", data={"token": first["access_token"]},
                       auth=(client.client_id, client.client_secret), timeout=15))
    keep(requests.post(served.url + "/revoke", data={"token": second["refresh_token"]},
                       auth=(client.client_id, client.client_secret), timeout=15))
    # Mail links carry their token in the path: masked in the access line.
    link_tokens = [secrets.token_urlsafe(32) for _ in range(2)]
    keep(requests.get(served.url + "/password/reset/" + link_tokens[0], timeout=15))
    keep(requests.get(served.url + "/report/not-me/" + link_tokens[1], timeout=15))
    # A client's own X-Request-ID is not taken without a trusted proxy: kept apart.
    theirs = "client-chosen-" + secrets.token_hex(6)
    own = keep(requests.get(served.url + "/healthz", headers={"X-Request-ID": theirs}, timeout=15))
    assert own.headers["X-Request-ID"] != theirs

    cookies = [c.value for c in browser.http.cookies] + [c.value for c in failing.http.cookies]
    assert cookies
    secrets_to_hide = [WRONG_PASSWORD, user.password, code, verifier, client.client_secret,
                       first["access_token"], first["refresh_token"], first["id_token"],
                       second["access_token"], second["refresh_token"], *cookies, *link_tokens]

    # Every request has its access line (a worker may log just after answering).
    wanted = {r.headers["X-Request-ID"]: r for r in seen}
    deadline = time.time() + 10
    while True:
        records = [json.loads(line) for line in served.lines()]  # every line is JSON
        access_lines = {r.get("request_id"): r for r in records if r.get("logger") == "darbaza.access"}
        if set(wanted) <= set(access_lines) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert set(wanted) <= set(access_lines), set(wanted) - set(access_lines)
    for request_id, response in wanted.items():
        line = access_lines[request_id]
        assert line["status"] == response.status_code
        assert line["method"] == response.request.method
        assert "?" not in line["path"] and "?" not in line["message"]
        assert line["level"] == "INFO" and line["ts"].endswith("+00:00")
    assert access_lines[own.headers["X-Request-ID"]]["client_request_id"] == theirs
    assert {line["path"] for line in access_lines.values()} >= {"/password/reset/[redacted]",
                                                                 "/report/not-me/[redacted]"}
    assert any(r.get("logger", "").startswith("gunicorn") for r in records)  # gunicorn's own lines too

    text = "\n".join(served.lines())
    for value in secrets_to_hide:
        assert value and value not in text, f"a secret is in the log: {value[:6]}..."


def _last_event(server: LiveServer, action: str) -> AuditEvent:
    with server.services.db.factory() as db:
        event = db.scalar(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq.desc()))
    assert event is not None
    return event


def test_a_client_cannot_choose_the_journalled_request_id(server, make_user) -> None:  # type: ignore[no-untyped-def]
    """Without a trusted proxy the journal gets our own request id, whatever the client sent."""
    user = make_user()
    theirs = "forged-" + secrets.token_hex(8)
    browser = Browser(server.url)
    browser.http.headers["X-Request-ID"] = theirs
    response = browser.sign_in(user.login, "wrong password " + secrets.token_hex(4))
    assert response.status_code == 401
    ours = response.headers["X-Request-ID"]
    assert ours != theirs
    event = _last_event(server, "account:login:failure")
    assert event.subject == f"user:{user.id}" and event.request_id == ours


def test_a_trusted_proxy_sets_the_request_id(server, make_user, database_url, redis_url) -> None:  # type: ignore[no-untyped-def]
    user = make_user()
    port = free_port()
    live = LiveServer(create_app(make_settings(database_url, redis_url, f"http://127.0.0.1:{port}",
                                               trusted_proxies=1)), port)
    live.start()
    try:
        theirs = "proxy-" + secrets.token_hex(8)
        browser = Browser(live.url)
        browser.http.headers.update({"X-Request-ID": theirs, "X-Forwarded-For": "198.51.100.7"})
        response = browser.sign_in(user.login, "wrong password " + secrets.token_hex(4))
        assert response.status_code == 401 and response.headers["X-Request-ID"] == theirs
        event = _last_event(live, "account:login:failure")
        assert event.request_id == theirs and event.ip == "198.51.100.7"
        # Not plain: replaced by our own.
        odd = requests.get(live.url + "/healthz", headers={"X-Request-ID": "bad id\x7f; drop"}, timeout=10)
        assert odd.headers["X-Request-ID"] != "bad id\x7f; drop" and len(odd.headers["X-Request-ID"]) == 32
    finally:
        live.stop()
        live.services.db.remove()
        live.services.db.dispose()
        live.services.redis.close()
