"""Redis memory per signed-in browser session (``python -m bench session_memory``).

Signs in BENCH_SESSIONS (default 1,000) distinct accounts through the real login form of
a throwaway stack (``bench/stack.py``), each with a browser User-Agent, and measures what
their sessions cost in Redis, in three steps:

1. signed in (login form, then the account page, as a browser does);
2. a portal app used from each session (authorize -> code -> tokens with
   ``offline_access``: a refresh token in the database and ``sid-apps`` in Redis);
3. each refresh token used once (rotation).

After each step: ``INFO memory`` ``used_memory`` delta divided by the sessions (the
honest figure: it includes the keyspace's own hash tables and expiry entries), and
``MEMORY USAGE`` of every key grouped by key pattern. For one session, the bytes of
each of its keys and of each field of its JSON.

Only for this benchmark the accounts' password hash uses a cheap argon2id cost
(``IDP_ARGON2_TIME_COST=1``, ``IDP_ARGON2_MEMORY_COST=8192``) so that thousands of
sign-ins take seconds; the cost changes nothing in Redis (a hash is never stored there).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis import Redis

from bench.load import _CSRF, Http, HttpError, _path, authorize_path, redeem
from bench.stack import Stack, process_rss_kib

SESSIONS = int(os.environ.get("BENCH_SESSIONS", "1000"))
THREADS = int(os.environ.get("BENCH_SESSION_THREADS", "8"))
# A current desktop Chrome: what most sessions store as ``ua`` (capped at 512 characters).
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/126.0.0.0 Safari/537.36")
CHEAP_ARGON2 = {"IDP_ARGON2_TIME_COST": "1", "IDP_ARGON2_MEMORY_COST": "8192"}
TARGET_BYTES = 1024
WARM_UP = 50


class Browser(Http):
    """``bench.load.Http`` sending a browser's User-Agent, as the sessions of real people do."""

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return super().request(method, path, body=body, headers={"User-Agent": USER_AGENT, **(headers or {})})


def sign_in_form(http_: Browser, ctx: dict[str, Any], login: str) -> None:
    """The login form without an app: /login, the password, then the account page."""
    status, _, page = http_.request("GET", "/login")
    found = _CSRF.search(page.decode())
    if status != 200 or not found:
        raise HttpError(f"login page {status}")
    status, headers, _ = http_.form("/login", {"csrf_token": found.group(1), "login": login,
                                               "password": ctx["password"], "flow": "", "next": ""})
    if status not in (302, 303):
        raise HttpError(f"sign-in {status}")
    status, _, _ = http_.request("GET", _path(headers["location"]))
    if status != 200:
        raise HttpError(f"account page {status}")


def use_app(http_: Browser, ctx: dict[str, Any]) -> dict[str, Any]:
    """The signed-in browser opens the portal app: authorize (no password asked), code,
    tokens with a refresh token."""
    path, verifier = authorize_path(ctx, "openid profile offline_access")
    status, headers, _ = http_.request("GET", path)
    return redeem(http_, ctx, status, headers, verifier, "authorize")


def refresh(http_: Browser, ctx: dict[str, Any], refresh_token: str) -> str:
    status, _, body = http_.form("/token", {"grant_type": "refresh_token", "refresh_token": refresh_token},
                                 auth=tuple(ctx["clients"]["web"]))  # type: ignore[arg-type]
    if status != 200:
        raise HttpError(f"refresh {status}")
    return str(json.loads(body)["refresh_token"])


def _parallel(count: int, work: Any) -> list[str]:
    """Run ``work(index)`` for every index on THREADS threads; the errors."""
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            try:
                work(index)
            except Exception as exc:  # noqa: BLE001 - reported
                with lock:
                    errors.append(str(exc)[:200])

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


# --- measuring -------------------------------------------------------------------------
def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pattern(key: str) -> str:
    """``sess:3f2a...`` -> ``sess:{id}``: ids (numbers, long hashes and tokens) replaced."""
    parts = key.split(":")
    return ":".join("{id}" if p.isdigit() or len(p) >= 16 else p for p in parts)


def used_memory(redis: Redis) -> int:
    return int(redis.info("memory")["used_memory"])  # type: ignore[index]


def key_table(redis: Redis) -> dict[str, dict[str, int]]:
    """Every key grouped by pattern: how many, and their MEMORY USAGE (all nested values)."""
    table: dict[str, dict[str, int]] = {}
    for raw in redis.scan_iter(count=1000):
        key = _text(raw)
        row = table.setdefault(pattern(key), {"keys": 0, "bytes": 0})
        row["keys"] += 1
        row["bytes"] += int(redis.memory_usage(key, samples=0) or 0)
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["bytes"]))


def one_session(redis: Redis, uid: int, sessions: int) -> dict[str, Any]:
    """The keys of one account's one session, with their bytes, encodings and TTLs; the
    shared deadlines set counted per member; the session JSON's bytes per field."""
    from idp.breach.new_device import seen_key
    from idp.sessions.records import DEADLINES, apps_key, index_key, sid_key
    from idp.sessions.signals import devices_key

    sids = [_text(m) for m in redis.zrange(index_key(uid), 0, -1)]  # type: ignore[arg-type,union-attr]
    found = redis.get(sid_key(sids[0])) if sids else None
    if not found:
        return {}
    session_key = _text(found)
    data = json.loads(redis.get(session_key) or b"{}")
    sid = str(data.get("sid", ""))
    keys = {
        "sess:{sha256(cookie)}": session_key,
        "usess:{uid}": index_key(uid),
        "sid:{sid}": sid_key(sid),
        "sid-apps:{sid}": apps_key(sid),
        "seen-devices:{uid}": seen_key(uid),
        "sharing:devices:{uid}": devices_key(uid),
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, key in keys.items():
        if not redis.exists(key):
            continue
        rows[name] = {"bytes": int(redis.memory_usage(key, samples=0) or 0),
                      "encoding": _text(redis.object("encoding", key) or b""),  # type: ignore[arg-type]
                      "key_chars": len(key), "ttl_s": int(redis.ttl(key))}  # type: ignore[arg-type]
    total_deadlines = int(redis.memory_usage(DEADLINES, samples=0) or 0)
    rows["sess-deadlines (per member)"] = {
        "bytes": round(total_deadlines / max(1, sessions)),
        "encoding": _text(redis.object("encoding", DEADLINES) or b""),  # type: ignore[arg-type]
        "key_chars": len(f"{uid}:{sid}"), "ttl_s": -1}
    fields = {k: len(json.dumps({k: v}, separators=(",", ":"))) - 2 for k, v in data.items()}
    return {"keys": rows, "json_chars": len(redis.get(session_key) or b""),
            "json_fields": dict(sorted(fields.items(), key=lambda kv: -kv[1])),
            "sum_bytes": sum(int(r["bytes"]) for r in rows.values())}


def _step(redis: Redis, label: str, before: int, sessions: int) -> dict[str, Any]:
    after = used_memory(redis)
    per = (after - before) / max(1, sessions)
    print(f"   {label}: used_memory +{after - before:,} B for {sessions:,} sessions = {per:,.0f} B per session",
          flush=True)
    return {"used_memory": after, "delta_bytes": after - before, "per_session_bytes": round(per)}


def _print_keys(table: dict[str, dict[str, int]], sessions: int) -> None:
    head = f"   {'key pattern':<34}{'keys':>8}{'bytes':>12}{'B/session':>11}"
    print(head + "\n   " + "-" * (len(head) - 3))
    for name, row in table.items():
        print(f"   {name:<34}{row['keys']:>8}{row['bytes']:>12,}{row['bytes'] / sessions:>11,.0f}")


def _print_one(one: dict[str, Any]) -> None:
    print(f"   {'one session: key':<34}{'bytes':>8}{'encoding':>12}{'key chars':>11}{'ttl s':>8}")
    for name, row in one["keys"].items():
        print(f"   {name:<34}{row['bytes']:>8}{row['encoding']:>12}{row['key_chars']:>11}{row['ttl_s']:>8}")
    print(f"   {'sum':<34}{one['sum_bytes']:>8}")
    print(f"   session JSON: {one['json_chars']} characters; by field: "
          + ", ".join(f"{k} {v}" for k, v in one["json_fields"].items()))


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run() -> dict[str, Any]:
    sessions = SESSIONS
    with _environment(CHEAP_ARGON2), Stack(users=sessions + WARM_UP) as stack:
        ctx = dict(stack.seeded)
        redis = Redis.from_url(stack.env["IDP_REDIS_URL"])

        browsers = [Browser(stack.url) for _ in range(sessions + WARM_UP)]
        # A few sign-ins first, on accounts of their own, so that what every sign-in
        # costs once (the server's Redis connections and their buffers, the Lua scripts)
        # is in the baseline and not counted per session. Their keys are left out too.
        warm_errors = _parallel(WARM_UP, lambda i: sign_in_form(browsers[sessions + i], ctx,
                                                                ctx["logins"][sessions + i]))
        if warm_errors:
            raise RuntimeError(f"warm-up sign-ins failed: {sorted(set(warm_errors))[:3]}")
        baseline = used_memory(redis)
        keys_before = key_table(redis)
        keys_before_uids = {_text(k) for k in redis.scan_iter(match="usess:*", count=1000)}
        began = time.perf_counter()
        errors = _parallel(sessions, lambda i: sign_in_form(browsers[i], ctx, ctx["logins"][i]))
        print(f"   {sessions - len(errors):,} sign-ins in {time.perf_counter() - began:.1f} s, "
              f"errors {len(errors)} {sorted(set(errors))[:3]}", flush=True)
        steps: dict[str, Any] = {"signed_in": _step(redis, "signed in", baseline, sessions)}
        # Keys that were there before the sign-ins (none of them per session) are left out.
        first_uid = _first_uid(redis, skip=keys_before_uids)
        table_signed_in = _minus(key_table(redis), keys_before)

        tokens: list[str] = [""] * sessions

        def app(i: int) -> None:
            tokens[i] = use_app(browsers[i], ctx)["refresh_token"]

        app_errors = _parallel(sessions, app)
        steps["app_used"] = _step(redis, "+ an app used (code, tokens, refresh token)", baseline, sessions)

        def rotate(i: int) -> None:
            if tokens[i]:
                tokens[i] = refresh(browsers[i], ctx, tokens[i])

        refresh_errors = _parallel(sessions, rotate)
        steps["refreshed"] = _step(redis, "+ the refresh token used once", baseline, sessions)
        table = _minus(key_table(redis), keys_before)
        one = one_session(redis, first_uid, sessions) if first_uid is not None else {}
        print("   after sign-in only:")
        _print_keys(table_signed_in, sessions)
        print("   after an app was used and its refresh token rotated:")
        _print_keys(table, sessions)
        _print_one(one)
        per = steps["refreshed"]["per_session_bytes"]
        print(f"   => {per} B per tracked session (target under {TARGET_BYTES} B): "
              f"{'met' if per < TARGET_BYTES else 'NOT met'}", flush=True)
        rss = process_rss_kib(stack.server_pid)
        info = redis.info("memory")
        redis.close()
        return {
            "sessions": sessions, "user_agent": USER_AGENT, "argon2_for_this_benchmark": CHEAP_ARGON2,
            "redis_version": _text(redis_version(stack)), "baseline_used_memory": baseline,
            "steps": steps, "keys_signed_in": table_signed_in, "keys_final": table, "one_session": one,
            "errors": {"sign_in": len(errors), "app": len(app_errors), "refresh": len(refresh_errors)},
            "mem_fragmentation_ratio": info.get("mem_fragmentation_ratio"),  # type: ignore[union-attr]
            "server_rss_kib": rss, "target_bytes": TARGET_BYTES, "per_session_bytes": per,
        }


def redis_version(stack: Stack) -> str:
    redis = Redis.from_url(stack.env["IDP_REDIS_URL"])
    try:
        return str(redis.info("server")["redis_version"])  # type: ignore[index]
    finally:
        redis.close()


def _first_uid(redis: Redis, *, skip: set[str]) -> int | None:
    for raw in redis.scan_iter(match="usess:*", count=1000):
        if _text(raw) not in skip:
            return int(_text(raw).split(":", 1)[1])
    return None


def _minus(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, row in after.items():
        old = before.get(name, {"keys": 0, "bytes": 0})
        if row["keys"] - old["keys"] or row["bytes"] - old["bytes"]:
            out[name] = {"keys": row["keys"] - old["keys"], "bytes": row["bytes"] - old["bytes"]}
    return out
