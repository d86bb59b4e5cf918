"""Scale-out (issue 8): two provider processes (``darbaza serve``, gunicorn, two workers
each) on different loopback ports and one ``darbaza worker`` share the database (SQLite
or PostgreSQL, whichever the suite runs on) and Redis, as several hosts behind one load
balancer do: one public issuer (process A's URL), one secret key, no sticky sessions.
Sign-ins, codes, refreshes, replays, session ends and a key rotation are driven across
both, and every token and session decision agrees on both processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
from sqlalchemy import select

from idp.access.models import Restriction
from idp.accounts.models import Role
from idp.oidc.clients import rotate_secret
from idp.oidc.models import Client
from idp.row_cache import POLL_EVERY
from tests.conftest import TEST_SECRET_KEY, LiveServer, free_port, wait_healthy
from tests.helpers import Browser, ClientInfo, UserInfo, decode_verified
from tests.integration.test_sessions_registry import (
    CHROME_WINDOWS,
    REPO,
    SAFARI_IPHONE,
    browser_as,
    end_session_form,
    introspect,
    listed_sids,
    refresh,
    userinfo_status,
)

DARBAZA = Path(sys.executable).with_name("darbaza")


# --- the cluster ----------------------------------------------------------------------------
class LogoutReceiver:
    """A portal app's back-channel logout endpoint on loopback: keeps the logout tokens."""

    def __init__(self) -> None:
        tokens: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                tokens.extend(parse_qs(body).get("logout_token", []))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.tokens = tokens
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/backchannel-logout"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Cluster:
    a: str  # process A: its URL is the public issuer
    b: str  # process B: the same provider on another "host"
    env: dict[str, str]
    logouts: LogoutReceiver
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def both(self) -> tuple[str, str]:
        return self.a, self.b


def cluster_env(issuer: str, database_url: str, redis_url: str) -> dict[str, str]:
    """What every process of the deployment shares (README "Running in production")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDP_")}
    env.update({
        "IDP_ISSUER": issuer,
        "IDP_DATABASE_URL": database_url,
        "IDP_REDIS_URL": redis_url,
        "IDP_SECRET_KEY": TEST_SECRET_KEY,
        "IDP_KEY_CACHE_SECONDS": "1",
        # Apps stay in memory far longer than any wait below: only the change announced
        # in Redis can make a process read an app again in time.
        "IDP_CACHE_SECONDS": "300",
        "IDP_DATABASE_POOL_SIZE": "4",
        "IDP_OUTBOX_POLL_SECONDS": "1",
        "IDP_ARGON2_TIME_COST": "1",
        "IDP_ARGON2_MEMORY_COST": "8192",
        "IDP_ARGON2_PARALLELISM": "1",
        "IDP_TESTING": "1",
        "IDP_LOGIN_IP_FREE_FAILURES": "1000000",
        "IDP_MAIL_TRANSPORT": "null",
    })
    return env


def stop_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGINT to each process group at once (gunicorn's quick shutdown of its master and
    workers; RQ's warm shutdown of the worker and its work horse), then SIGKILL to the
    groups still there after five seconds."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone before its children (a work horse): the whole group goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster(server: LiveServer, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[Cluster]:
    """Processes A and B (``darbaza serve --workers 2``) and one ``darbaza worker``. The
    ``server`` fixture only made sure the database has a signing key."""
    logs = tmp_path_factory.mktemp("scale-out")
    port_a, port_b = free_port(), free_port()
    a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    env = cluster_env(a, database_url, redis_url)
    commands = {
        "a": ["serve", "--bind", f"127.0.0.1:{port_a}", "--workers", "2", "--threads", "4"],
        "b": ["serve", "--bind", f"127.0.0.1:{port_b}", "--workers", "2", "--threads", "4"],
        "worker": ["worker"],
    }
    cluster = Cluster(a=a, b=b, env=env, logouts=LogoutReceiver())
    handles = []
    try:
        for name, args in commands.items():
            log = (logs / f"{name}.log").open("w")
            handles.append(log)
            cluster.procs.append(subprocess.Popen(  # noqa: S603 - fixed argv
                [str(DARBAZA), *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
        for name, url in (("a", a), ("b", b)):
            wait_healthy(url, cluster.procs, (logs / f"{name}.log").read_text, f"process {name}")
        yield cluster
        for proc, name in zip(cluster.procs, commands, strict=True):
            assert proc.poll() is None, f"{name} died:\n" + (logs / f"{name}.log").read_text()
    finally:
        stop_groups(cluster.procs)
        for log in handles:
            log.close()
        cluster.logouts.stop()


# --- helpers --------------------------------------------------------------------------------
def on(base: str, browser: Browser) -> Browser:
    """The same user agent (same cookie jar) talking to another process: the load
    balancer sent its next request elsewhere."""
    other = Browser(base)
    other.http = browser.http
    return other


def signed_in_on(base: str, person: UserInfo, user_agent: str = CHROME_WINDOWS) -> Browser:
    browser = browser_as(base, user_agent)
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303 and response.headers["Location"] == "/", response.text[:300]
    return browser


def signed_in(browser: Browser) -> bool:
    response = browser.get("/")
    assert response.status_code in (200, 302), response.status_code
    return response.status_code == 200


def code_via(browser: Browser, client: ClientInfo, person: UserInfo) -> tuple[str, str]:
    params, verifier, response = browser.authorize(client, person, scope="openid profile offline_access")
    assert "code" in params, (response.status_code, response.text[:500])
    return params["code"], verifier


def redeem(base: str, client: ClientInfo, code: str, verifier: str) -> requests.Response:
    return requests.post(
        base + "/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret or ""), timeout=30,
    )


def tokens_of(browser: Browser, client: ClientInfo, person: UserInfo, token_base: str) -> dict[str, Any]:
    code, verifier = code_via(browser, client, person)
    answer = redeem(token_base, client, code, verifier)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def jwks(base: str) -> dict[str, Any]:
    answer = requests.get(base + "/jwks.json", timeout=10)
    assert answer.status_code == 200
    return dict(answer.json())


def kids(base: str) -> set[str]:
    return {key["kid"] for key in jwks(base)["keys"]}


def userinfo(base: str, access_token: str) -> requests.Response:
    return requests.get(base + "/userinfo", headers={"Authorization": f"Bearer {access_token}"}, timeout=30)


def refused(answer: requests.Response) -> bool:
    return answer.status_code == 400 and answer.json().get("error") == "invalid_grant"


def portal_app(make_client: Any, cluster: Cluster) -> ClientInfo:
    return make_client(trusted=True, grant_types=["authorization_code", "refresh_token"],
                       scopes=["openid", "profile", "offline_access"],
                       backchannel_logout_uri=cluster.logouts.url)


def wait_until(check: Any, what: str, timeout: float) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def past_cache_time(since: float, cache_seconds: float) -> None:
    """Sleep until one per-process cache time (and half a second) after ``since``: from
    then on no worker acts on what it read before that moment."""
    time.sleep(max(0.0, since + cache_seconds + 0.5 - time.monotonic()))


# --- the tests ------------------------------------------------------------------------------
def test_a_sign_in_on_one_process_is_a_session_on_the_other_and_codes_cross_over(cluster, make_user, make_client):
    person = make_user()
    client = portal_app(make_client, cluster)
    on_a = signed_in_on(cluster.a, person)
    on_b = on(cluster.b, on_a)
    # The cookie from A signs the browser in on B: the account page and an authorization
    # that needs no sign-in.
    account = on_b.get("/")
    assert account.status_code == 200 and person.login in account.text
    code, verifier = code_via(on_b, client, person)
    # A code from B is redeemed at A, once; a second try at B is refused.
    answer = redeem(cluster.a, client, code, verifier)
    assert answer.status_code == 200, answer.text
    assert refused(redeem(cluster.b, client, code, verifier))
    # ... and one from A at B.
    code, verifier = code_via(on_a, client, person)
    tokens = redeem(cluster.b, client, code, verifier).json()
    for base in cluster.both:
        _, claims = decode_verified(tokens["id_token"], jwks(base))
        assert claims["iss"] == cluster.a and claims["sub"] == person.subject
        assert userinfo(base, tokens["access_token"]).json()["sub"] == person.subject
        assert introspect(base, client, tokens["access_token"])["active"] is True
        assert introspect(base, client, tokens["refresh_token"])["active"] is True
    for base in cluster.both:
        metadata = requests.get(base + "/.well-known/openid-configuration", timeout=10).json()
        assert metadata["issuer"] == cluster.a and metadata["token_endpoint"] == cluster.a + "/token"


def test_refresh_rotation_agrees_on_both_processes(cluster, make_user, make_client):
    person = make_user()
    client = portal_app(make_client, cluster)
    tokens = tokens_of(signed_in_on(cluster.a, person), client, person, cluster.a)
    used = []
    for base in (cluster.a, cluster.b, cluster.a, cluster.b):
        answer = refresh(base, client, tokens["refresh_token"])
        assert answer.status_code == 200, (base, answer.text)
        used.append(tokens["refresh_token"])
        tokens = answer.json()
        assert tokens["refresh_token"] not in used
        for other in cluster.both:
            assert userinfo(other, tokens["access_token"]).status_code == 200
            assert introspect(other, client, tokens["refresh_token"])["active"] is True
            # Every rotated-out token is inactive on both (not yet a replay: introspection).
            assert all(introspect(other, client, rt) == {"active": False} for rt in used)
    # The newest one still works, on either process.
    assert refresh(cluster.b, client, tokens["refresh_token"]).status_code == 200


def test_a_replay_on_one_process_revokes_the_family_on_the_other(cluster, make_user, make_client):
    person = make_user()
    client = portal_app(make_client, cluster)
    first = tokens_of(signed_in_on(cluster.b, person), client, person, cluster.b)
    answer = refresh(cluster.a, client, first["refresh_token"])
    assert answer.status_code == 200, answer.text
    second = answer.json()
    assert userinfo_status(cluster.a, second["access_token"]) == 200
    # The stolen first refresh token is replayed at B: refused, and the family ends.
    assert refused(refresh(cluster.b, client, first["refresh_token"]))
    for base in cluster.both:
        assert userinfo_status(base, second["access_token"]) == 401
        assert introspect(base, client, second["access_token"]) == {"active": False}
        assert introspect(base, client, second["refresh_token"]) == {"active": False}
    assert refused(refresh(cluster.a, client, second["refresh_token"]))
    assert refused(refresh(cluster.b, client, second["refresh_token"]))


def test_a_session_ended_on_one_process_is_gone_on_the_other(cluster, make_user, make_client):
    person = make_user()
    client = portal_app(make_client, cluster)
    # The phone signs in on A and its app gets tokens there.
    phone = signed_in_on(cluster.a, person, SAFARI_IPHONE)
    tokens = tokens_of(phone, client, person, cluster.a)
    sid = decode_verified(tokens["id_token"], jwks(cluster.a))[1]["sid"]
    # The laptop, served by B, ends the phone's session on "My sessions".
    laptop = signed_in_on(cluster.b, person, CHROME_WINDOWS)
    page = laptop.get("/account/sessions")
    assert sid in listed_sids(page)
    assert laptop.post("/account/sessions/end", data=end_session_form(page, sid)).status_code == 303
    # At once, on both: the phone's cookie signs nothing in, its tokens are dead.
    assert not signed_in(phone) and not signed_in(on(cluster.b, phone))
    for base in cluster.both:
        assert refused(refresh(base, client, tokens["refresh_token"]))
        assert userinfo_status(base, tokens["access_token"]) == 401
        assert introspect(base, client, tokens["access_token"]) == {"active": False}
        assert sid not in listed_sids(on(base, laptop).get("/account/sessions"))
    # The laptop's own session lives on, on both.
    assert signed_in(laptop) and signed_in(on(cluster.a, laptop))
    # The worker delivers the back-channel logout token for the phone's session.
    wait_until(lambda: any(decode_verified(t, jwks(cluster.b))[1].get("sid") == sid
                           for t in list(cluster.logouts.tokens)), "the back-channel logout", timeout=20)


def test_a_key_rotation_is_published_and_used_by_both_processes(cluster, make_user, make_client):
    person = make_user()
    client = portal_app(make_client, cluster)
    browser = signed_in_on(cluster.a, person)
    old_tokens = tokens_of(browser, client, person, cluster.b)
    old_kid = decode_verified(old_tokens["access_token"], jwks(cluster.a))[0]["kid"]

    done = subprocess.run(  # noqa: S603 - fixed argv
        [str(DARBAZA), "keys", "rotate"], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    new_kid = done.stdout.strip().rsplit(" ", 1)[-1]
    assert new_kid and new_kid != old_kid
    rotated = time.monotonic()
    # Each process (and each of its gunicorn workers) publishes it within the key cache
    # time (IDP_KEY_CACHE_SECONDS=1): the generous timeout is for a loaded machine; once
    # one cache time has passed since the rotation, no worker signs or publishes from
    # what it read before (a reload's age counts from its database read).
    for base in cluster.both:
        wait_until(lambda base=base: all(new_kid in kids(base) for _ in range(4)), f"{base} publishes {new_kid}",
                   timeout=30)
    past_cache_time(rotated, 1.0)  # IDP_KEY_CACHE_SECONDS of the cluster
    for base in cluster.both:
        for _ in range(6):
            assert {old_kid, new_kid} <= kids(base)

    # New tokens are signed with the new key by either process (a code redeemed at B, a
    # refresh at A) and verify on both.
    fresh = tokens_of(browser, client, person, cluster.b)
    answer = refresh(cluster.a, client, fresh["refresh_token"])
    assert answer.status_code == 200, answer.text
    for tokens in (fresh, answer.json()):
        for base in cluster.both:
            assert decode_verified(tokens["access_token"], jwks(base))[0]["kid"] == new_kid
            assert decode_verified(tokens["id_token"], jwks(base))[0]["kid"] == new_kid
    for base in cluster.both:
        assert userinfo(base, answer.json()["access_token"]).json()["sub"] == person.subject
    # Tokens signed with the old key still verify on both.
    for base in cluster.both:
        assert userinfo(base, old_tokens["access_token"]).json()["sub"] == person.subject
        assert introspect(base, client, old_tokens["access_token"])["active"] is True
        assert decode_verified(old_tokens["id_token"], jwks(base))[0]["kid"] == old_kid


def client_credentials(base: str, client_id: str, secret: str) -> requests.Response:
    return requests.post(base + "/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret),
                         timeout=10)


def test_an_app_changed_anywhere_is_seen_by_both_processes(cluster, server, make_client):
    """Each process keeps portal apps in memory (IDP_CACHE_SECONDS, 300 s in this
    cluster); a change committed by another process (here the test's own, as the CLI or a
    console on a third host would) is announced in Redis and seen by every process and
    worker within the one-second poll, not after the cache time: an old secret stops
    working and a disabled app gets no more tokens."""
    client = make_client(grant_types=["client_credentials"], scopes=["openid"], redirect_uris=[],
                         post_logout_redirect_uris=[])
    for base in cluster.both:  # every worker of both processes has the app in memory
        for _ in range(6):
            assert client_credentials(base, client.client_id, client.client_secret).status_code == 200

    with server.services.db.transaction() as session:
        row = session.scalar(select(Client).where(Client.client_id == client.client_id))
        new_secret = rotate_secret(row)
    changed = time.monotonic()

    def replaced(base: str) -> bool:
        return (all(client_credentials(base, client.client_id, client.client_secret).status_code == 401
                    for _ in range(6))
                and all(client_credentials(base, client.client_id, new_secret).status_code == 200
                        for _ in range(6)))

    for base in cluster.both:
        wait_until(lambda base=base: replaced(base), f"{base} takes the new secret only", timeout=15)
    print(f"replaced secret refused everywhere after {time.monotonic() - changed:.2f} s")
    # A worker the requests above did not reach may keep the old row until its next poll;
    # one poll interval after the commit every worker reads the generation again.
    past_cache_time(changed, POLL_EVERY)
    for base in cluster.both:
        for _ in range(8):
            assert client_credentials(base, client.client_id, client.client_secret).status_code == 401
            assert client_credentials(base, client.client_id, new_secret).status_code == 200

    with server.services.db.transaction() as session:
        session.scalar(select(Client).where(Client.client_id == client.client_id)).active = False
    changed = time.monotonic()
    for base in cluster.both:
        wait_until(lambda base=base: all(
            client_credentials(base, client.client_id, new_secret).status_code == 401 for _ in range(6)),
            f"{base} refuses the disabled app", timeout=15)
    print(f"disabled app refused everywhere after {time.monotonic() - changed:.2f} s")
    past_cache_time(changed, POLL_EVERY)
    for base in cluster.both:
        for _ in range(8):
            assert client_credentials(base, client.client_id, new_secret).status_code == 401


def test_a_restriction_added_anywhere_applies_on_both_processes(cluster, server, make_user, make_client):
    """Access restrictions are kept per process like apps (IDP_CACHE_SECONDS, 300 s
    here): one added by another process is enforced by every worker of both processes
    within the one-second poll of the generation in Redis."""
    person = make_user(roles=("student", "parent"))
    client = portal_app(make_client, cluster)
    browser = signed_in_on(cluster.a, person)
    families = {base: {"rt": tokens_of(browser, client, person, base)["refresh_token"]} for base in cluster.both}

    def refused_now(base: str) -> bool:
        answer = refresh(base, client, families[base]["rt"])
        if answer.status_code == 200:
            families[base]["rt"] = answer.json()["refresh_token"]
            return False
        assert refused(answer), answer.text
        return True

    for base in cluster.both:  # every worker has the (empty) restrictions in memory
        assert not any(refused_now(base) for _ in range(6))
    with server.services.db.transaction() as session:
        role_id = session.scalar(select(Role.id).where(Role.name == "parent"))
        row = Restriction(role_id=role_id, valid_until=datetime(2020, 1, 1), description="left the school")
        session.add(row)
        session.flush()
        restriction_id = row.id
    try:
        added = time.monotonic()
        for base in cluster.both:
            wait_until(lambda base=base: refused_now(base), f"{base} enforces the new restriction", timeout=15)
        print(f"restriction enforced everywhere after {time.monotonic() - added:.2f} s")
        past_cache_time(added, POLL_EVERY)
        for base in cluster.both:  # one poll interval later no worker has the old snapshot
            assert all(refused_now(base) for _ in range(6))
    finally:
        with server.services.db.transaction() as session:
            session.delete(session.get(Restriction, restriction_id))
