"""Soak (``python -m bench soak``): is memory flat under a steady load for minutes?

Drives a steady mix against a throwaway stack (``bench/stack.py``) for
BENCH_SOAK_SECONDS (default 300): clients that refresh with rotation, clients that call
userinfo, and sign-ins (the configured argon2id cost) at a low rate, one after another.
Every BENCH_SOAK_SAMPLE seconds (default 10) it samples the resident memory of the
provider's gunicorn processes (read every second; the window's lowest and highest), Redis ``used_memory`` and key count, the SQLite file
size (when SQLite) and the requests done; it prints the series and the growth from the
first minute to the last. Not part of ``python -m bench`` without names (it takes five
minutes): run it by name, or set BENCH_SOAK=1.

Redis and the database are expected to grow with the sessions the sign-ins create and
the token rows every refresh adds (nothing prunes them within five minutes); the
server's RSS is expected to be flat after the first minute.

Settings (environment): BENCH_SOAK_SECONDS, BENCH_SOAK_SAMPLE, BENCH_SOAK_REFRESH
(refresh clients, default 3), BENCH_SOAK_USERINFO (userinfo clients, default 3),
BENCH_SOAK_SIGNIN_RATE (sign-ins per second, default 1), BENCH_DATABASE_URL."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis

from bench.load import Http, refresh_setup, refresh_step, sign_in, token_setup, userinfo_step
from bench.stack import Stack, process_rss_kib

SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "300"))
SAMPLE = float(os.environ.get("BENCH_SOAK_SAMPLE", "10"))
REFRESH_CLIENTS = int(os.environ.get("BENCH_SOAK_REFRESH", "3"))
USERINFO_CLIENTS = int(os.environ.get("BENCH_SOAK_USERINFO", "3"))
SIGNIN_RATE = float(os.environ.get("BENCH_SOAK_SIGNIN_RATE", "1"))


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[str, int] = {"refresh": 0, "userinfo": 0, "sign_in": 0}
        self.errors: dict[str, int] = {"refresh": 0, "userinfo": 0, "sign_in": 0}
        self.samples: list[str] = []

    def add(self, kind: str, error: Exception | None = None) -> None:
        with self.lock:
            if error is None:
                self.done[kind] += 1
            else:
                self.errors[kind] += 1
                if len(self.samples) < 10:
                    self.samples.append(f"{kind}: {str(error)[:160]}")

    def total(self) -> int:
        with self.lock:
            return sum(self.done.values())


def _loop(kind: str, stop: threading.Event, counters: Counters, ctx: dict[str, Any], base: str, index: int) -> None:
    http_ = Http(base)
    state: dict[str, Any] | None = None
    while not stop.is_set():
        try:
            if state is None:
                # A client (re)starts: it signs in for its refresh token or access token.
                state = (refresh_setup if kind == "refresh" else token_setup)(http_, ctx, index)
            (refresh_step if kind == "refresh" else userinfo_step)(http_, ctx, state)
            counters.add(kind)
        except Exception as exc:  # noqa: BLE001 - counted; the client starts again
            counters.add(kind, exc)
            state = None
            stop.wait(0.5)


def _sign_ins(stop: threading.Event, counters: Counters, ctx: dict[str, Any], base: str) -> None:
    http_ = Http(base)
    logins = ctx["logins"]
    n = 0
    began = time.perf_counter()
    while not stop.is_set():
        # Paced: the n-th sign-in starts at n / rate seconds (none are made up if late).
        wait = began + n / SIGNIN_RATE - time.perf_counter()
        if wait > 0 and stop.wait(wait):
            return
        n += 1
        try:
            sign_in(http_, ctx, logins[(n * 7919) % len(logins)])
            counters.add("sign_in")
        except Exception as exc:  # noqa: BLE001
            counters.add("sign_in", exc)


def _db_bytes(database_url: str) -> int | None:
    if not database_url.startswith("sqlite:///"):
        return None
    path = Path(database_url.removeprefix("sqlite:///"))
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def _mean(rows: list[dict[str, Any]], field: str) -> float:
    values = [r[field] for r in rows if r.get(field) is not None]
    return round(statistics.fmean(values), 1) if values else 0.0


def run() -> dict[str, Any]:
    with Stack() as stack:
        ctx = dict(stack.seeded)
        redis = Redis.from_url(stack.env["IDP_REDIS_URL"])
        database_url = stack.env["IDP_DATABASE_URL"]
        counters = Counters()
        stop = threading.Event()
        threads = [threading.Thread(target=_loop, args=("refresh", stop, counters, ctx, stack.url, i), daemon=True)
                   for i in range(REFRESH_CLIENTS)]
        threads += [threading.Thread(target=_loop, args=("userinfo", stop, counters, ctx, stack.url,
                                                          REFRESH_CLIENTS + i), daemon=True)
                    for i in range(USERINFO_CLIENTS)]
        threads.append(threading.Thread(target=_sign_ins, args=(stop, counters, ctx, stack.url), daemon=True))
        series: list[dict[str, Any]] = []
        began = time.perf_counter()
        for t in threads:
            t.start()
        last_total = 0
        print(f"   {'t s':>5}{'RSS min KiB':>13}{'RSS max KiB':>13}{'redis used B':>14}{'keys':>8}{'db B':>12}{'req/s':>8}"
              f"{'load1':>7}", flush=True)
        try:
            tick = 1
            while True:
                moment = began + tick * SAMPLE
                # RSS once a second: an argon2id hash holds its memory cost (64 MiB by
                # default) only while it runs, so single readings jump; the window's
                # lowest reading is the one that shows a leak.
                rss: list[int] = []
                while True:
                    rss.append(process_rss_kib(stack.server_pid))
                    left = moment - time.perf_counter()
                    if left <= 0:
                        break
                    time.sleep(min(1.0, left))
                total = counters.total()
                row = {
                    "t": round(time.perf_counter() - began),
                    "server_rss_kib": min(rss),
                    "server_rss_max_kib": max(rss),
                    "redis_used_memory": int(redis.info("memory")["used_memory"]),  # type: ignore[index]
                    "redis_keys": int(redis.dbsize()),  # type: ignore[arg-type]
                    "db_bytes": _db_bytes(database_url),
                    "rps": round((total - last_total) / SAMPLE, 1),
                    "load1": round(os.getloadavg()[0], 2),
                }
                last_total = total
                series.append(row)
                print(f"   {row['t']:>5}{row['server_rss_kib']:>13,}{row['server_rss_max_kib']:>13,}"
                      f"{row['redis_used_memory']:>14,}"
                      f"{row['redis_keys']:>8}{row['db_bytes'] or '-':>12}{row['rps']:>8}{row['load1']:>7}",
                      flush=True)
                if tick * SAMPLE >= SECONDS:
                    break
                tick += 1
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            redis.close()
        per_minute = max(1, round(60 / SAMPLE))
        first, last = series[:per_minute], series[-per_minute:]
        growth = {
            field: {"first_minute": _mean(first, field), "last_minute": _mean(last, field),
                    "growth_pct": round((_mean(last, field) / _mean(first, field) - 1) * 100, 1)
                    if _mean(first, field) else None}
            for field in ("server_rss_kib", "server_rss_max_kib", "redis_used_memory", "redis_keys", "db_bytes", "rps")
        }
        for field, g in growth.items():
            print(f"   {field}: first minute {g['first_minute']:,}, last minute {g['last_minute']:,} "
                  f"({g['growth_pct']} %)")
        print(f"   done {counters.done}, errors {counters.errors} {counters.samples[:3]}", flush=True)
        return {"database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
                "seconds": SECONDS, "sample_s": SAMPLE, "workers": stack.workers, "threads": stack.threads,
                "refresh_clients": REFRESH_CLIENTS, "userinfo_clients": USERINFO_CLIENTS,
                "signin_rate": SIGNIN_RATE, "done": counters.done, "errors": counters.errors,
                "error_samples": counters.samples, "growth": growth, "series": series}
