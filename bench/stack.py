"""A throwaway Darbaza for benchmarks: its own Redis, a migrated database (a temporary
SQLite file, or ``BENCH_DATABASE_URL`` for PostgreSQL), seeded clients and accounts, and
the provider served by gunicorn exactly as ``darbaza serve`` does (same worker class,
workers and threads), all on 127.0.0.1. Everything is stopped and removed at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback URL we built
                return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not answer within {seconds} s") from None
            time.sleep(0.1)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry.name))
        own[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += own.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


def process_rss_kib(pid: int) -> int:
    """Resident memory (KiB) of ``pid`` and its descendants."""
    total = 0
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text()
                ppid = int(fields[fields.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == pid:
                pids.append(int(entry.name))
    for current in pids:
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class Stack:
    workers: int = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 2)))
    threads: int = int(os.environ.get("BENCH_THREADS", "4"))
    users: int = 200
    database_url: str = os.environ.get("BENCH_DATABASE_URL", "")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="darbaza-bench-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    hello_url: str = ""
    server_pid: int = 0
    hello_pid: int = 0
    # The provider again with ES256 access tokens (IDP_ACCESS_TOKEN_SIGNING_ALG), same
    # database and Redis: the token scenarios are measured on both (BENCH_ES256=0: not).
    es256_url: str = ""
    es256_pid: int = 0
    seeded: dict[str, Any] = field(default_factory=dict)

    # --- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, args: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=subprocess.DEVNULL,  # noqa: S603
                                stderr=open(self.workdir / f"{Path(args[0]).name}-{len(self.procs)}.log", "wb"),
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def _start(self) -> None:
        redis_port = free_port()
        self.env = {**os.environ}
        self._spawn([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port",
                     str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(self.workdir)])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        database_url = self.database_url or f"sqlite:///{self.workdir / 'bench.sqlite3'}"
        self.env.update({
            "IDP_ISSUER": self.url,
            "IDP_DATABASE_URL": database_url,
            "IDP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "IDP_SECRET_KEY": "bench-" + os.urandom(16).hex(),
            "IDP_MAIL_TRANSPORT": "null",
            "IDP_LOG_LEVEL": "WARNING",
            # One address signs in thousands of times: the per-IP failure limit is not
            # what is measured (no sign-in here fails).
            "IDP_LOGIN_IP_FREE_FAILURES": "1000000",
        })
        self._wait_redis(redis_port)
        from bench import seed

        es256 = os.environ.get("BENCH_ES256", "1") != "0"
        # Seeded with both keys (RSA and EC) when the ES256 server runs.
        self.seeded = seed.seed({**self.env, "IDP_ACCESS_TOKEN_SIGNING_ALG": "ES256"} if es256 else self.env,
                                users=self.users)
        common = ["--bind", f"127.0.0.1:{port}", "--workers", str(self.workers), "--threads", str(self.threads),
                  "--worker-class", "gthread", "--no-control-socket", "--graceful-timeout", "5"]
        server = self._spawn([str(BIN / "gunicorn"), "idp.wsgi:app", *common])
        self.server_pid = server.pid
        hello_port = free_port()
        self.hello_url = f"http://127.0.0.1:{hello_port}"
        hello = self._spawn([str(BIN / "gunicorn"), "bench.hello:app",
                             *[a if a != f"127.0.0.1:{port}" else f"127.0.0.1:{hello_port}" for a in common]])
        self.hello_pid = hello.pid
        wait_http(self.url + "/.well-known/openid-configuration")
        wait_http(self.hello_url + "/")
        if es256:
            es_port = free_port()
            self.es256_url = f"http://127.0.0.1:{es_port}"
            es_server = self._spawn([str(BIN / "gunicorn"), "idp.wsgi:app",
                                     *[a if a != f"127.0.0.1:{port}" else f"127.0.0.1:{es_port}" for a in common]],
                                    env={**self.env, "IDP_ACCESS_TOKEN_SIGNING_ALG": "ES256"})
            self.es256_pid = es_server.pid
            wait_http(self.es256_url + "/.well-known/openid-configuration")

    def _wait_redis(self, port: int) -> None:
        deadline = time.time() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"   logs kept in {self.workdir}", flush=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
