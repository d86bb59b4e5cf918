"""Prometheus ``/metrics``: one endpoint for the whole deployment (issue 9, "Operations").

Every number below is the same whichever server process answers the scrape, and none
restarts from zero when a process restarts, because each is read at scrape time from a
store all processes share:

From the database (read at every scrape; indexed columns, a few small queries):

- ``darbaza_outbox_pending`` / ``darbaza_outbox_oldest_pending_seconds``: mails waiting
  in the outbox (idp/notify/outbox.py) and the age of the oldest one;
- ``darbaza_outbox_failed``: mails given up on (kept until IDP_DELIVERED_RETENTION_DAYS);
- ``darbaza_backchannel_pending`` / ``darbaza_backchannel_oldest_pending_seconds``:
  back-channel logout tokens waiting for delivery (pending or being sent);
- ``darbaza_directory_sync_last_run_timestamp_seconds{mode,status}``,
  ``darbaza_directory_sync_last_entries{mode,result}`` (created, updated, disabled,
  unchanged, errors) and ``darbaza_directory_sync_last_success_timestamp_seconds``:
  the latest LDAP sync runs (connectors/ldap, table ``directory_sync_runs``);
- the breach-case metrics of idp/breach/metrics.py (open cases, overdue, times).

From Redis counters (``darbaza:metrics:*`` hashes — shared by every process, kept across
process restarts; Redis persistence (AOF) keeps them across a Redis restart too, and when
Redis loses them Prometheus sees an ordinary counter reset). Each process adds its events
up in memory (``MetricsBuffer``) and moves them to Redis in one pipeline at most once a
second, after a response is sent (never in a request's way), and whenever it answers a
scrape; a Redis failure keeps them in memory and retries 30 s later. A scrape answered by
one gunicorn worker therefore shows the other workers' last second at their next flush:

- ``darbaza_signins_total{result}``: sign-in outcomes, counted by the journal's only
  writer (``Journal.record``, idp/audit/journal.py) for every ``account:login:<result>``
  event (success, failure, refused, ...) and only once its transaction commits. A count
  of the journal rows themselves would drop whenever the retention job deletes old
  sign-in events, which Prometheus would read as a counter reset and a false burst;
- ``darbaza_tokens_issued_total{grant_type,token}``: tokens minted at /token
  (idp/oidc/server.py), by grant and by kind (access_token, refresh_token, id_token),
  counted when the transaction that records them commits;
- ``darbaza_http_request_duration_seconds{endpoint,status}``: a histogram of request
  latency by Flask endpoint and status code. Counting in Redis rather than per process
  matters with gunicorn: a scrape is answered by any one worker, and per-process
  counters would jump between workers.

Also ``darbaza_up`` (1 when this process answers), ``darbaza_build_info{version,python}``,
and ``darbaza_metrics_source_up{source}`` (0 when the database or Redis could not be
read for this scrape; the metrics of that source are then left out, not reported as 0).

Who may read it: clients on loopback, and others with ``Authorization: Bearer
<IDP_METRICS_TOKEN>`` (no token set: loopback only)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("darbaza.metrics")

PREFIX = "darbaza:metrics:"
SIGNINS = PREFIX + "signins"
TOKENS = PREFIX + "tokens"
LATENCY = PREFIX + "latency"
LATENCY_SUM = PREFIX + "latency_sum"
# Seconds. Sign-in pages hash a password (argon2id, ~0.1-0.5 s); protocol calls are fast.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PENDING = "darbaza.metrics.pending"

bp = Blueprint("metrics", __name__)


# --- counters that count only what was committed -----------------------------------------------
def count_on_commit(session: Session, counter: str, field: str, amount: int = 1) -> None:
    """Add ``amount`` to ``field`` of the Redis hash ``counter`` once ``session`` commits
    (nothing when it rolls back). ``install_commit_counters`` must have been called on the
    session's factory; sessions of other factories (scripts) just drop the count."""
    session.info.setdefault(_PENDING, []).append((counter, field, amount))


class MetricsBuffer:
    """This process's metric increments, added up in memory and moved to Redis in one
    pipeline by ``flush``: integer increments of hash fields (counters, histogram buckets)
    and float ones (histogram sums). The fields are bounded (results, grants, endpoints x
    statuses), so a Redis outage only grows a few sums."""

    def __init__(self, redis: Redis, *, flush_every: float = 1.0, retry_after: float = 30.0) -> None:
        self.redis = redis
        self.flush_every = flush_every
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._sums: dict[tuple[str, str], float] = {}
        self._next_flush = 0.0

    def count(self, counter: str, field: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[counter, field] = self._counts.get((counter, field), 0) + amount

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """One request's latency in the ``darbaza_http_request_duration_seconds`` histogram."""
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        series = f"{endpoint}|{status}"
        with self._lock:
            key = (LATENCY, f"{series}|{index}")
            self._counts[key] = self._counts.get(key, 0) + 1
            self._sums[LATENCY_SUM, series] = self._sums.get((LATENCY_SUM, series), 0.0) + seconds

    def maybe_flush(self) -> None:
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = {}, {}
            self._next_flush = time.monotonic() + self.flush_every
        if not counts and not sums:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (name, field), count in counts.items():
                pipe.hincrby(name, field, count)
            for (name, field), total in sums.items():
                pipe.hincrbyfloat(name, field, total)
            pipe.execute()
        except RedisError as exc:
            # Keep them for the next try; a metric never fails a request.
            with self._lock:
                for key, count in counts.items():
                    self._counts[key] = self._counts.get(key, 0) + count
                for key, total in sums.items():
                    self._sums[key] = self._sums.get(key, 0.0) + total
                self._next_flush = time.monotonic() + self.retry_after
            log.warning("metrics not saved to redis: %s", exc.__class__.__name__)


def install_commit_counters(factory: sessionmaker[Session], buffer: MetricsBuffer) -> None:
    """Counts added with ``count_on_commit`` reach ``buffer`` when the session commits."""

    @event.listens_for(factory, "after_commit")
    def _committed(session: Session) -> None:
        for counter, field, amount in session.info.pop(_PENDING, None) or ():
            buffer.count(counter, field, amount)

    @event.listens_for(factory, "after_rollback")
    def _drop(session: Session) -> None:
        session.info.pop(_PENDING, None)


# --- request latency --------------------------------------------------------------------------
def init_app(app: Flask, recorder: MetricsBuffer) -> None:
    """Time every request; the observation is added, and the buffer moved to Redis when
    due, after the response is sent."""
    app.extensions["darbaza.latency"] = recorder

    @app.before_request
    def _start_clock() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = getattr(g, "request_started", None)
        if started is not None:
            endpoint = request.url_rule.endpoint if request.url_rule is not None else "unmatched"
            recorder.observe(endpoint, response.status_code, time.perf_counter() - started)
            response.call_on_close(recorder.maybe_flush)
        return response


# --- collectors ---------------------------------------------------------------------------------
def _naive_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


class OperationsCollector(Collector):
    """Reads the outbox, back-channel deliveries and directory sync runs at every collect,
    and the Redis counters."""

    def __init__(self, session_factory: Callable[[], Session], redis: Redis,
                 clock: Callable[[], datetime]) -> None:
        self.session_factory = session_factory
        self.redis = redis
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("darbaza_up", "1 when this Darbaza process answers.", value=1.0)
        info = GaugeMetricFamily("darbaza_build_info", "The Darbaza version and Python running it.",
                                 labels=["version", "python"])
        info.add_metric([_version(), platform.python_version()], 1.0)
        yield info
        source_up = GaugeMetricFamily("darbaza_metrics_source_up",
                                      "1 when the source could be read for this scrape.", labels=["source"])
        database_metrics: list[Metric] = []
        redis_metrics: list[Metric] = []
        try:
            database_metrics = list(self._database())
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", exc.__class__.__name__)
        try:
            redis_metrics = list(self._redis())
        except RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc.__class__.__name__)
        source_up.add_metric(["database"], 1.0 if database_metrics else 0.0)
        source_up.add_metric(["redis"], 1.0 if redis_metrics else 0.0)
        yield source_up
        yield from database_metrics
        yield from redis_metrics

    def _database(self) -> Iterator[Metric]:
        from connectors.ldap.models import DirectorySyncRun
        from idp.notify.models import OutboxMessage
        from idp.oidc.models import BackchannelLogoutDelivery

        now = _naive_utc(self.clock())
        with self.session_factory() as db:
            mail_pending, mail_oldest = db.execute(
                select(func.count(OutboxMessage.id), func.min(OutboxMessage.created_at))
                .where(OutboxMessage.status == "pending")).one()
            mail_failed = db.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.status == "failed"))
            waiting = BackchannelLogoutDelivery.status.in_(("pending", "sending"))
            logout_pending, logout_oldest = db.execute(
                select(func.count(BackchannelLogoutDelivery.id), func.min(BackchannelLogoutDelivery.created_at))
                .where(waiting)).one()
            runs = list(db.scalars(select(DirectorySyncRun).order_by(DirectorySyncRun.id.desc()).limit(20)))
            last_success = db.scalar(select(func.max(DirectorySyncRun.finished_at)).where(
                DirectorySyncRun.status == "completed", DirectorySyncRun.dry_run.is_(False)))
        yield GaugeMetricFamily("darbaza_outbox_pending", "Mails waiting in the outbox to be sent.",
                                value=float(mail_pending or 0))
        yield GaugeMetricFamily("darbaza_outbox_oldest_pending_seconds",
                                "Age of the oldest mail waiting in the outbox (0 when none waits).",
                                value=_age(now, mail_oldest))
        yield GaugeMetricFamily("darbaza_outbox_failed", "Mails given up on after every attempt (still kept).",
                                value=float(mail_failed or 0))
        yield GaugeMetricFamily("darbaza_backchannel_pending",
                                "Back-channel logout tokens waiting to be delivered to portal apps.",
                                value=float(logout_pending or 0))
        yield GaugeMetricFamily("darbaza_backchannel_oldest_pending_seconds",
                                "Age of the oldest back-channel logout token waiting (0 when none waits).",
                                value=_age(now, logout_oldest))
        last_run = GaugeMetricFamily(
            "darbaza_directory_sync_last_run_timestamp_seconds",
            "When the latest directory sync of each mode and status started (Unix time).",
            labels=["mode", "status"])
        entries = GaugeMetricFamily(
            "darbaza_directory_sync_last_entries",
            "Accounts of the latest finished (not dry-run) directory sync of each mode, by result.",
            labels=["mode", "result"])
        seen_run: set[tuple[str, str]] = set()
        seen_entries: set[str] = set()
        for run in runs:
            if (run.mode, run.status) not in seen_run:
                seen_run.add((run.mode, run.status))
                last_run.add_metric([run.mode, run.status], run.started_at.replace(tzinfo=UTC).timestamp())
            if run.status != "running" and not run.dry_run and run.mode not in seen_entries:
                seen_entries.add(run.mode)
                for result, value in (("created", run.created), ("updated", run.updated),
                                      ("disabled", run.disabled), ("unchanged", run.unchanged),
                                      ("errors", run.error_count)):
                    entries.add_metric([run.mode, result], float(value or 0))
        yield last_run
        yield entries
        yield GaugeMetricFamily(
            "darbaza_directory_sync_last_success_timestamp_seconds",
            "When the latest completed (not dry-run) directory sync finished (Unix time; 0: never).",
            value=last_success.replace(tzinfo=UTC).timestamp() if last_success else 0.0)

    def _redis(self) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(SIGNINS)
        pipe.hgetall(TOKENS)
        pipe.hgetall(LATENCY)
        pipe.hgetall(LATENCY_SUM)
        signins, tokens, latency, latency_sum = pipe.execute()
        signin_family = CounterMetricFamily("darbaza_signins", "Sign-in outcomes, by result (from the journal).",
                                            labels=["result"])
        results = {_text(k): int(v) for k, v in signins.items()}
        for result in ("success", "failure", "refused"):
            results.setdefault(result, 0)
        for result, value in sorted(results.items()):
            signin_family.add_metric([result], float(value))
        yield signin_family
        token_family = CounterMetricFamily("darbaza_tokens_issued", "Tokens minted at /token, by grant and kind.",
                                           labels=["grant_type", "token"])
        for key, value in sorted((_text(k), int(v)) for k, v in tokens.items()):
            grant, _, kind = key.partition("|")
            token_family.add_metric([grant, kind], float(value))
        yield token_family
        yield _latency_family(latency, latency_sum)


def _latency_family(latency: dict[Any, Any], sums: dict[Any, Any]) -> Metric:
    family = HistogramMetricFamily("darbaza_http_request_duration_seconds",
                                   "Time to answer a request, by Flask endpoint and status code.",
                                   labels=["endpoint", "status"])
    per_series: dict[str, list[int]] = {}
    for key, value in latency.items():
        series, _, index = _text(key).rpartition("|")
        if not index.isdigit() or int(index) > len(LATENCY_BUCKETS):
            continue
        per_series.setdefault(series, [0] * (len(LATENCY_BUCKETS) + 1))[int(index)] += int(value)
    for series, counts in sorted(per_series.items()):
        endpoint, _, status = series.rpartition("|")
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        total = float(sums.get(series.encode(), sums.get(series, 0.0)))
        family.add_metric([endpoint, status], buckets, total)
    return family


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _age(now: datetime, oldest: datetime | None) -> float:
    return max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0


def _version() -> str:
    try:
        return metadata.version("darbaza")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- the endpoint ---------------------------------------------------------------------------------
def _from_loopback(trusted_proxies: int) -> bool:
    # A proxy on this host that we were not told about (IDP_TRUSTED_PROXIES=0) makes every
    # client look like loopback: a forwarded request is not trusted as local then.
    if trusted_proxies == 0 and ("X-Forwarded-For" in request.headers or "Forwarded" in request.headers):
        return False
    try:
        return bool(request.remote_addr) and ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def _allowed() -> bool:
    settings = current_app.extensions["darbaza"].settings
    if _from_loopback(settings.trusted_proxies):
        return True
    token = settings.metrics_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _registry() -> CollectorRegistry:
    registry = current_app.extensions.get("darbaza.metrics")
    if registry is None:
        from idp.breach.metrics import BreachCaseCollector

        svc = current_app.extensions["darbaza"]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(OperationsCollector(svc.db.factory, svc.redis, lambda: svc.clock()))
        registry.register(BreachCaseCollector(svc.db.factory, lambda: svc.clock()))
        current_app.extensions["darbaza.metrics"] = registry
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    if not _allowed():
        response = jsonify({"error": "unauthorized",
                            "error_description": "metrics are served to loopback or with the metrics bearer token"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        response.headers["Cache-Control"] = "no-store"
        return response
    recorder = current_app.extensions.get("darbaza.latency")
    if recorder is not None:
        recorder.flush()  # this process's latest requests are in the answer
    body = generate_latest(_registry())
    return Response(body, mimetype=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

