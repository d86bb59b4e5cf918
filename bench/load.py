"""Load benchmark (``python -m bench load``): Darbaza on loopback under bounded load.

For each scenario: requests/s, p50/p95/p99 latency, the server's CPU seconds per 1,000
requests and errors, plus its ratio to this machine's ceiling measured in the same run:
token scenarios against a bare Flask "hello world" on the same gunicorn settings,
sign-in against argon2id hashes per second on all cores with the configured cost.

Settings (environment): BENCH_SECONDS (per scenario, default 10), BENCH_CONCURRENCY
(default 32), BENCH_PROCESSES (driver processes, default 2), BENCH_DATABASE_URL (default a
temporary SQLite file), BENCH_WORKERS / BENCH_THREADS (gunicorn), BENCH_SCENARIOS
(comma-separated subset), BENCH_ES256=0 (skip the client-credentials and refresh runs
against a second provider process that signs access tokens with ES256)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import secrets
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from bench.stack import Stack, process_cpu_seconds, process_rss_kib

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "2"))

_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


class HttpError(Exception):
    pass


class Http:
    """One keep-alive HTTP/1.1 connection with a small cookie jar (no redirects followed)."""

    def __init__(self, base: str) -> None:
        parsed = urllib.parse.urlsplit(base)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.conn: http.client.HTTPConnection | None = None
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                pair = value.split(";", 1)[0]
                key, _, val = pair.partition("=")
                self.cookies[key.strip()] = val.strip()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def form(self, path: str, fields: dict[str, str], auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if auth:
            raw = f"{urllib.parse.quote(auth[0])}:{urllib.parse.quote(auth[1])}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        return self.request("POST", path, body=urllib.parse.urlencode(fields).encode(), headers=headers)


def _path(location: str) -> str:
    parts = urllib.parse.urlsplit(location)
    return parts.path + ("?" + parts.query if parts.query else "")


def authorize_path(ctx: dict[str, Any], scope: str) -> tuple[str, str]:
    """An /authorize URL of the benchmark's web app (PKCE S256) and its code verifier."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": ctx["clients"]["web"][0], "redirect_uri": ctx["redirect_uri"],
        "scope": scope, "state": secrets.token_hex(8), "nonce": secrets.token_hex(8),
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    return "/authorize?" + query, verifier


def redeem(http_: Http, ctx: dict[str, Any], status: int, headers: dict[str, str], verifier: str,
           what: str) -> dict[str, Any]:
    """Follow the provider's redirects to the app's redirect URI and exchange its code."""
    hops = 0
    while status in (302, 303) and not headers["location"].startswith(ctx["redirect_uri"]):
        hops += 1
        if hops > 5:
            raise HttpError("too many redirects")
        status, headers, _ = http_.request("GET", _path(headers["location"]))
    if status not in (302, 303):
        raise HttpError(f"{what} {status}")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["location"]).query)["code"][0]
    status, _, body = http_.form("/token", {"grant_type": "authorization_code", "code": code,
                                            "redirect_uri": ctx["redirect_uri"], "code_verifier": verifier},
                                 auth=tuple(ctx["clients"]["web"]))  # type: ignore[arg-type]
    if status != 200:
        raise HttpError(f"token {status}")
    tokens: dict[str, Any] = json.loads(body)
    return tokens


def sign_in(http_: Http, ctx: dict[str, Any], login: str, scope: str = "openid profile") -> dict[str, Any]:
    """authorize -> login page -> password -> code -> token, as a browser and its app do."""
    http_.cookies.clear()
    path, verifier = authorize_path(ctx, scope)
    status, headers, _ = http_.request("GET", path)
    if status not in (302, 303):
        raise HttpError(f"authorize {status}")
    login_path = _path(headers["location"])
    status, _, page = http_.request("GET", login_path)
    found = _CSRF.search(page.decode())
    if status != 200 or not found:
        raise HttpError(f"login page {status}")
    flow = urllib.parse.parse_qs(urllib.parse.urlsplit(login_path).query).get("flow", [""])[0]
    status, headers, _ = http_.form("/login", {"csrf_token": found.group(1), "login": login,
                                               "password": ctx["password"], "flow": flow, "next": ""})
    return redeem(http_, ctx, status, headers, verifier, "sign-in")


# --- scenarios: setup(http, ctx, index) -> state; step(http, ctx, state) -------------------
def _expect(status: int, what: str) -> None:
    if status != 200:
        raise HttpError(f"{what} {status}")


def cc_step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
    status, _, _ = http_.form("/token", {"grant_type": "client_credentials"},
                              auth=tuple(ctx["clients"]["machine"]))  # type: ignore[arg-type]
    _expect(status, "client_credentials")


def refresh_setup(http_: Http, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    tokens = sign_in(http_, ctx, ctx["logins"][index % len(ctx["logins"])], scope="openid offline_access")
    return {"rt": tokens["refresh_token"]}


def refresh_step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
    status, _, body = http_.form("/token", {"grant_type": "refresh_token", "refresh_token": state["rt"]},
                                 auth=tuple(ctx["clients"]["web"]))  # type: ignore[arg-type]
    _expect(status, "refresh")
    state["rt"] = json.loads(body)["refresh_token"]


def signin_setup(http_: Http, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    return {"index": index, "n": 0}


def signin_step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
    logins = ctx["logins"]
    state["n"] += 1
    sign_in(http_, ctx, logins[(state["index"] * 7919 + state["n"]) % len(logins)])


def token_setup(http_: Http, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    tokens = sign_in(http_, ctx, ctx["logins"][index % len(ctx["logins"])])
    http_.cookies.clear()
    return {"at": tokens["access_token"]}


def userinfo_step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
    status, _, _ = http_.request("GET", "/userinfo", headers={"Authorization": "Bearer " + state["at"]})
    _expect(status, "userinfo")


def introspect_step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
    status, _, body = http_.form("/introspect", {"token": state["at"]},
                                 auth=tuple(ctx["clients"]["web"]))  # type: ignore[arg-type]
    _expect(status, "introspect")
    if not json.loads(body).get("active"):
        raise HttpError("introspect: token not active")


def get_step(path: str) -> Callable[[Http, dict[str, Any], dict[str, Any]], None]:
    def step(http_: Http, ctx: dict[str, Any], state: dict[str, Any]) -> None:
        status, _, _ = http_.request("GET", path)
        _expect(status, path)

    return step


def _none_setup(http_: Http, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    return {}


SCENARIOS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., None], str]] = {
    # name: (setup, step, ceiling)
    "hello": (_none_setup, get_step("/"), "hello"),
    "discovery": (_none_setup, get_step("/.well-known/openid-configuration"), "hello"),
    "jwks": (_none_setup, get_step("/jwks.json"), "hello"),
    "client_credentials": (_none_setup, cc_step, "hello"),
    "refresh": (refresh_setup, refresh_step, "hello"),
    "userinfo": (token_setup, userinfo_step, "hello"),
    "introspection": (token_setup, introspect_step, "hello"),
    "sign_in": (signin_setup, signin_step, "argon2"),
}


def _driver(base: str, ctx: dict[str, Any], scenario: str, first: int, threads: int, seconds: float,
            out: Any, go: Any) -> None:
    setup, step, _ = SCENARIOS[scenario]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)
    started = threading.Event()
    start_at: list[float] = [0.0]

    def worker(index: int) -> None:
        http_ = Http(base)
        try:
            state = setup(http_, ctx, index)
        except Exception as exc:  # noqa: BLE001 - reported as an error of the run
            with lock:
                errors.append(f"setup: {exc}")
            state = None
        ready.wait()
        started.wait()
        own: list[float] = []
        own_errors: list[str] = []
        while state is not None and time.perf_counter() < start_at[0] + seconds:
            began = time.perf_counter()
            try:
                step(http_, ctx, state)
                own.append(time.perf_counter() - began)
            except Exception as exc:  # noqa: BLE001
                own_errors.append(str(exc)[:200])
                if len(own_errors) > 1000:
                    break
        with lock:
            latencies.extend(own)
            errors.extend(own_errors)

    pool = [threading.Thread(target=worker, args=(first + i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait()
    # Every driver process has its clients set up (sign-ins for the token scenarios):
    # the parent samples the server's CPU time, then the measured window starts.
    go.wait()
    start_at[0] = time.perf_counter()
    started.set()
    for t in pool:
        t.join(seconds + 60)
    out.put({"latencies": latencies, "errors": errors})


def drive(base: str, ctx: dict[str, Any], scenario: str, *, concurrency: int = CONCURRENCY,
          seconds: float = SECONDS, server_pid: int = 0) -> dict[str, Any]:
    """Run ``scenario`` with ``concurrency`` clients spread over driver processes for
    ``seconds`` (after each client's setup) and summarise it."""
    processes = max(1, min(PROCESSES, concurrency))
    share = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    mp = multiprocessing.get_context("fork")
    queue = mp.Queue()
    go = mp.Barrier(len(share) + 1)
    procs, first = [], 0
    for count in share:
        procs.append(mp.Process(target=_driver, args=(base, ctx, scenario, first, count, seconds, queue, go)))
        first += count
    began = time.perf_counter()
    for p in procs:
        p.start()
    go.wait(timeout=600)
    cpu_before = process_cpu_seconds(server_pid) if server_pid else 0.0
    results = [queue.get(timeout=seconds + 600) for _ in procs]
    cpu = (process_cpu_seconds(server_pid) - cpu_before) if server_pid else 0.0
    for p in procs:
        p.join(30)
    wall = time.perf_counter() - began
    latencies = sorted(x for r in results for x in r["latencies"])
    errors = [e for r in results for e in r["errors"]]
    n = len(latencies)

    def pct(p: float) -> float:
        return round(latencies[min(n - 1, int(p * n))] * 1000, 2) if n else 0.0

    # Setup (sign-ins for the token scenarios) is inside ``wall`` but not inside
    # ``seconds``: the rate is over the measured window only.
    return {
        "scenario": scenario, "concurrency": concurrency, "seconds": seconds, "requests": n,
        "rps": round(n / seconds, 1), "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if n else 0.0,
        "server_cpu_s_per_1000": round(cpu / n * 1000, 3) if n and server_pid else None,
        "errors": len(errors), "error_samples": sorted(set(errors))[:5], "wall_s": round(wall, 1),
    }


def argon2_ceiling(params: dict[str, int]) -> dict[str, float]:
    """Seconds per argon2id hash with the configured cost, and hashes/s on all cores."""
    from argon2 import PasswordHasher

    hasher = PasswordHasher(time_cost=params["time_cost"], memory_cost=params["memory_cost"],
                            parallelism=params["parallelism"])
    hasher.hash("warm-up")
    rounds, began = 0, time.perf_counter()
    while rounds < 5 or time.perf_counter() - began < 2:
        hasher.hash("bench password")
        rounds += 1
    per_hash = (time.perf_counter() - began) / rounds
    cores = os.cpu_count() or 1
    return {"seconds_per_hash": round(per_hash, 4), "cores": cores, "hashes_per_s": round(cores / per_hash, 1)}


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'scenario':<30}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'cpu s/1k':>10}{'errors':>8}{'ratio':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cpu = r["server_cpu_s_per_1000"]
        lines.append(f"{r['scenario']:<30}{r['rps']:>9}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['p99_ms']:>9}"
                     f"{cpu if cpu is not None else '-':>10}{r['errors']:>8}{r.get('ratio') if r.get('ratio') is not None else '-':>8}")
    return "\n".join(lines)


def run_one(database_url: str = "", workers: int | None = None, threads: int | None = None,
            scenarios: list[str] | None = None, seconds: float = SECONDS) -> dict[str, Any]:
    """Every scenario against one stack (one database, one gunicorn model)."""
    wanted = scenarios or [s for s in os.environ.get("BENCH_SCENARIOS", "").split(",") if s] or [
        s for s in SCENARIOS if s != "hello"]
    extra: dict[str, Any] = {}
    if workers:
        extra["workers"] = workers
    if threads:
        extra["threads"] = threads
    with Stack(database_url=database_url, **extra) as stack:
        ctx = dict(stack.seeded)
        argon2 = argon2_ceiling(ctx["argon2"])
        hello = drive(stack.hello_url, ctx, "hello", server_pid=stack.hello_pid, seconds=seconds)
        rows = [dict(hello, ratio=1.0)]
        kind = "postgresql" if database_url.startswith("postgresql") else "sqlite"
        print(f"   [{kind}, {stack.workers} workers x {stack.threads} threads] ceiling: hello world "
              f"{hello['rps']} req/s; argon2id {argon2['seconds_per_hash'] * 1000:.0f} ms per hash, "
              f"{argon2['hashes_per_s']} hashes/s on {argon2['cores']} cores", flush=True)
        for name in wanted:
            result = drive(stack.url, ctx, name, server_pid=stack.server_pid, seconds=seconds)
            ceiling = argon2["hashes_per_s"] if SCENARIOS[name][2] == "argon2" else hello["rps"]
            result["ratio"] = round(result["rps"] / ceiling, 2) if ceiling else None
            rows.append(result)
            print(f"   {name}: {result['rps']} req/s, p99 {result['p99_ms']} ms, errors {result['errors']}, "
                  f"ratio {result['ratio']}", flush=True)
        for name in [n for n in ("client_credentials", "refresh") if n in wanted and stack.es256_url]:
            # The same scenario against the provider that signs access tokens with ES256
            # (its issuer is the RS256 server's: tokens name one issuer).
            result = drive(stack.es256_url, ctx, name, server_pid=stack.es256_pid, seconds=seconds)
            result["scenario"] = f"{name} (ES256 AT)"
            result["ratio"] = round(result["rps"] / hello["rps"], 2) if hello["rps"] else None
            rows.append(result)
            print(f"   {result['scenario']}: {result['rps']} req/s, p99 {result['p99_ms']} ms, "
                  f"errors {result['errors']}, ratio {result['ratio']}", flush=True)
        rss = process_rss_kib(stack.server_pid)
        print(_table(rows), flush=True)
        return {"database": kind, "workers": stack.workers, "threads": stack.threads, "concurrency": CONCURRENCY,
                "argon2": argon2, "server_rss_kib": rss, "scenarios": rows}


class _Postgres:
    """A throwaway PostgreSQL cluster with its default durability (scripts/pg-test.sh)."""

    def __enter__(self) -> str:
        import subprocess
        import tempfile
        from pathlib import Path

        from bench.stack import ROOT, free_port

        self.dir = Path(tempfile.mkdtemp(prefix="darbaza-bench-pg-"))
        os.chmod(self.dir, 0o755)  # noqa: S103 - the postgres user must reach its data directory
        self.script = str(ROOT / "scripts/pg-test.sh")
        return subprocess.run([self.script, "start", str(self.dir / "pg"), str(free_port())],  # noqa: S603
                              check=True, capture_output=True, text=True,
                              env={**os.environ, "PG_DURABLE": "1"}).stdout.strip()

    def __exit__(self, *exc: object) -> None:
        import shutil
        import subprocess

        subprocess.run([self.script, "stop", str(self.dir / "pg")], check=False)  # noqa: S603
        shutil.rmtree(self.dir, ignore_errors=True)


def run() -> dict[str, Any]:
    """SQLite, then PostgreSQL (BENCH_DATABASES=sqlite or postgresql for one; a given
    BENCH_DATABASE_URL is used alone)."""
    given = os.environ.get("BENCH_DATABASE_URL", "")
    if given:
        return {"runs": [run_one(given)]}
    kinds = [k for k in os.environ.get("BENCH_DATABASES", "sqlite,postgresql").split(",") if k]
    runs = []
    for kind in kinds:
        if kind == "postgresql":
            with _Postgres() as url:
                runs.append(run_one(url))
        else:
            runs.append(run_one(""))
    return {"runs": runs}
