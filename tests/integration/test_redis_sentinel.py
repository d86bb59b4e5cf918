"""Redis Sentinel (issue 8, "Production settings ... Redis (URL, optional Sentinel)"):
with ``IDP_REDIS_SENTINELS`` every process talks to the master the sentinels name —
the server (a browser sign-in's session is in the master, in the database number and
with the password of ``IDP_REDIS_URL``, whose host and port nobody listens on), the
worker (``darbaza worker`` queues its jobs there) — and after a failover the server
follows the new master without a restart. A real redis-server master and replica and
a real sentinel (``redis-server <conf> --sentinel``) run on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib

from idp.app import create_app
from idp.config import Settings, SettingsError
from idp.services import Services
from idp.worker import DELIVERY_JOBS, SWEEP_SCHEDULE_KEY
from tests.conftest import LiveServer, free_port, make_settings
from tests.integration.test_sessions_registry import (
    REPO,
    is_signed_in,
    provider_env,
    session_key_of,
    signed_in_browser,
)

SERVICE = "darbaza-test"
REDIS_PASSWORD = "redis-pw-for-tests"
SENTINEL_PASSWORD = "sentinel-pw-for-tests"
DB = 3


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except redis_lib.RedisError:
            pass  # not up yet
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class SentinelGroup:
    workdir: Path
    master_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_port: int = field(default_factory=free_port)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _redis_server(self, port: int, *args: str) -> None:
        data = self.workdir / str(port)
        data.mkdir()
        self.procs[port] = subprocess.Popen(  # noqa: S603 - fixed argv
            [shutil.which("redis-server") or "redis-server", *args, "--bind", "127.0.0.1", "--port", str(port),
             "--save", "", "--appendonly", "no", "--dir", str(data),
             "--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD,
             # The replica syncs at once (not after the default 5 s wait for more replicas).
             "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self._redis_server(self.master_port)
        wait_for(lambda: bool(self.server(self.master_port).ping()), "the master")
        self._redis_server(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        wait_for(lambda: self.server(self.replica_port).info("replication")["master_link_status"] == "up",
                 "the replica to sync")
        conf = self.workdir / "sentinel.conf"  # the sentinel rewrites it: its own file
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel auth-pass {SERVICE} {REDIS_PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self.procs[self.sentinel_port] = subprocess.Popen(  # noqa: S603 - fixed argv
            [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.master_address()[1] == self.master_port, "the sentinel")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def server(self, port: int, db: int = DB) -> redis_lib.Redis:
        return redis_lib.Redis(port=port, db=db, password=REDIS_PASSWORD, socket_timeout=2)

    def sentinel(self) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.sentinel_port, password=SENTINEL_PASSWORD, socket_timeout=2,
                               decode_responses=True)

    def master_address(self) -> tuple[str, int]:
        host, port = self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return str(host), int(port)


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def sentinel_settings(group: SentinelGroup, nobody_port: int) -> dict[str, object]:
    """The settings of a provider behind Sentinel. IDP_REDIS_URL points at a port nobody
    listens on: only its password and database number may be used."""
    return {
        "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{nobody_port}/{DB}",
        "redis_sentinels": [f"127.0.0.1:{group.sentinel_port}"],
        "redis_sentinel_service": SERVICE,
        "redis_sentinel_password": SENTINEL_PASSWORD,
    }


@pytest.fixture
def sentinel_server(sentinel_group: SentinelGroup, database_url: str, server: LiveServer) -> Iterator[LiveServer]:
    """A provider (same database as the test server) whose Redis is found by Sentinel."""
    port = free_port()
    values = sentinel_settings(sentinel_group, free_port())
    settings = make_settings(database_url, str(values.pop("redis_url")), f"http://127.0.0.1:{port}", **values)
    app = create_app(settings)
    live = LiveServer(app, port)
    live.start()
    yield live
    live.stop()
    svc: Services = app.extensions["darbaza"]
    svc.db.remove()
    svc.db.dispose()
    svc.redis.close()


def test_the_server_keeps_its_sessions_in_the_master_the_sentinels_name(sentinel_group, sentinel_server, make_user):
    person = make_user()
    browser = signed_in_browser(sentinel_server, person)
    key = session_key_of(browser)
    master = sentinel_group.server(sentinel_group.master_port)
    # In the master, in IDP_REDIS_URL's database (not 0), and it is what signs the browser in.
    assert master.exists(key) and not sentinel_group.server(sentinel_group.master_port, db=0).exists(key)
    assert is_signed_in(browser)
    master.delete(key)
    assert not is_signed_in(browser)


def test_the_server_follows_a_failover_without_a_restart(sentinel_group, sentinel_server, make_user):
    person = make_user()
    before = signed_in_browser(sentinel_server, person)
    sentinel = sentinel_group.sentinel()
    wait_for(lambda: any(r["port"] == str(sentinel_group.replica_port) and "s_down" not in r["flags"]
                         for r in _replicas(sentinel)), "the sentinel to know the replica")
    # Replication is asynchronous (README: the last writes before a failover can be lost):
    # this test is about following the failover, so the replica first acknowledges every
    # write so far (WAIT), as an orderly switch-over would.
    old_master = sentinel_group.server(sentinel_group.master_port)
    wait_for(lambda: old_master.execute_command("WAIT", 1, 1000) >= 1, "the replica to catch up")
    wait_for(lambda: sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE) in (True, "OK"),
             "the sentinel to accept the failover")
    wait_for(lambda: sentinel_group.master_address()[1] == sentinel_group.replica_port, "the failover")
    # The old master dies for good: nothing can be served from it any more.
    old = sentinel_group.procs[sentinel_group.master_port]
    old.terminate()
    old.wait(timeout=10)
    new_master = sentinel_group.server(sentinel_group.replica_port)
    wait_for(lambda: new_master.info("replication")["role"] == "master", "the promotion")

    # The session written before the failover was replicated. The first requests after the
    # switch may meet a pooled connection to the dead master: a clear 503, never a 500;
    # then the client finds the new master without a restart.
    statuses: list[int] = []

    def reachable() -> bool:
        response = before.get("/")
        statuses.append(response.status_code)
        return response.status_code != 503

    wait_for(reachable, "the server to use the new master")
    assert 500 not in statuses
    assert is_signed_in(before)
    after = signed_in_browser(sentinel_server, person)
    assert new_master.exists(session_key_of(after)) and is_signed_in(after)


def _replicas(sentinel: redis_lib.Redis) -> list[dict[str, str]]:
    rows = sentinel.execute_command("SENTINEL", "REPLICAS", SERVICE)
    return [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2], strict=True)) for r in rows]


def test_the_worker_queues_its_jobs_in_the_master(sentinel_group, server, database_url, redis_url, tmp_path):
    env = provider_env(server, database_url, redis_url)
    env.update({f"IDP_{name.upper()}": ",".join(value) if isinstance(value, list) else str(value)
                for name, value in sentinel_settings(sentinel_group, free_port()).items()})
    env["IDP_OUTBOX_POLL_SECONDS"] = "60"  # the schedule locks live a minute
    master = sentinel_group.server(sentinel_group.master_port)
    darbaza = Path(sys.executable).with_name("darbaza")
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(  # noqa: S603 - fixed argv
            [str(darbaza), "worker"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            keys = [*DELIVERY_JOBS.values(), SWEEP_SCHEDULE_KEY]
            # Its scheduler queues every job in the master, and RQ registers the worker there.
            wait_for(lambda: all(master.exists(key) for key in keys) and bool(master.scard("rq:workers")),
                     "the worker's keys in the master:\n" + log_path.read_text(), timeout=30)
            assert worker.poll() is None, log_path.read_text()
        finally:
            # The worker and the job it may be running (RQ's forked work horse).
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


@pytest.mark.parametrize(("sentinels", "service", "message"), [
    ("127.0.0.1", "mymaster", "'127.0.0.1' is not host:port"),
    ("127.0.0.1:26379,sentinel-b:x", "mymaster", "'sentinel-b:x' is not host:port"),
    ("127.0.0.1:26379", "", "IDP_REDIS_SENTINEL_SERVICE"),
])
def test_sentinel_settings_that_cannot_work_stop_the_start(sentinels, service, message):
    environ = {"IDP_REDIS_SENTINELS": sentinels, "IDP_REDIS_SENTINEL_SERVICE": service}
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ=environ)


def test_sentinel_addresses_accept_names_and_ipv6():
    settings = Settings.from_env(environ={"IDP_REDIS_SENTINELS": "s1.school.example:26379, [::1]:26380",
                                          "IDP_REDIS_SENTINEL_SERVICE": "darbaza"})
    from idp.redis_client import sentinel_addresses

    assert sentinel_addresses(settings.redis_sentinels) == [("s1.school.example", 26379), ("::1", 26380)]
