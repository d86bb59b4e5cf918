"""The ``darbaza worker`` process: an RQ worker, and a small scheduler thread that queues the
delivery jobs (mail outbox, back-channel logout) every few seconds."""

from __future__ import annotations

import logging
import secrets
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from idp.config import Settings
from idp.redis_client import connect_redis

log = logging.getLogger("darbaza.worker")

QUEUE_NAME = "darbaza"
DELIVER_OUTBOX_JOB = "idp.notify.jobs.deliver_outbox"
DELIVER_BACKCHANNEL_JOB = "idp.oidc.backchannel.deliver_backchannel_logouts"
# Each key is held for one interval by whichever worker queued that job in the interval.
DELIVERY_JOBS = {
    DELIVER_OUTBOX_JOB: "darbaza:worker:outbox-scheduled",
    DELIVER_BACKCHANNEL_JOB: "darbaza:worker:backchannel-scheduled",
}


def queue_once(redis: Redis, queue: Queue, job: str, lock_key: str, interval: float, *,
               job_timeout: int = 300) -> bool:
    """Queue ``job`` unless a worker already did within ``interval`` seconds: ``lock_key``
    is held for one interval by whichever worker queued it. A job that outlives
    ``job_timeout`` is killed (delivery passes: their claimed rows come back after the
    lease); failures are kept a week for ``rq``'s failed registry."""
    if not redis.set(lock_key, secrets.token_hex(8), nx=True, px=max(1, int(interval * 1000))):
        return False
    queue.enqueue(job, job_timeout=job_timeout, result_ttl=60, failure_ttl=7 * 86400)
    return True


def schedule_deliveries(redis: Redis, queue: Queue, interval: float) -> list[str]:
    """Queue each delivery job unless another worker already did in this interval; the
    jobs queued.

    Delivery is safe to run twice (each row is claimed atomically); the locks only keep
    N workers from queueing N jobs every interval.
    """
    return [job for job, lock_key in DELIVERY_JOBS.items() if queue_once(redis, queue, job, lock_key, interval)]


# Sessions that timed out are ended (tokens revoked, back-channel logout queued) by a
# sweep once a minute (idp/sessions/jobs.py); one worker queues it per minute.
SWEEP_SESSIONS_JOB = "idp.sessions.jobs.sweep_sessions"
SWEEP_SCHEDULE_KEY = "darbaza:worker:sessions-sweep-scheduled"
SWEEP_INTERVAL = 60


def schedule_session_sweep(redis: Redis, queue: Queue, interval: float = SWEEP_INTERVAL) -> bool:
    """Queue the timed-out-sessions sweep unless a worker already did this minute."""
    return queue_once(redis, queue, SWEEP_SESSIONS_JOB, SWEEP_SCHEDULE_KEY, interval)


# Breach cases at 75% of their support time or overdue are escalated to the security
# officer (idp/breach/jobs.py) by a pass once a minute; one worker queues it per minute.
ESCALATE_CASES_JOB = "idp.breach.jobs.escalate_breach_cases"
ESCALATE_SCHEDULE_KEY = "darbaza:worker:breach-escalation-scheduled"
ESCALATE_INTERVAL = 60


def schedule_case_escalation(redis: Redis, queue: Queue, interval: float = ESCALATE_INTERVAL) -> bool:
    """Queue the breach-case escalation pass unless a worker already did this minute."""
    return queue_once(redis, queue, ESCALATE_CASES_JOB, ESCALATE_SCHEDULE_KEY, interval)


# The school directory sync (connectors/ldap/sync.py): when a directory is configured, a
# job once a minute runs the sync that is due (incremental every
# IDP_LDAP_SYNC_INTERVAL_SECONDS, full every IDP_LDAP_FULL_SYNC_INTERVAL_SECONDS, from
# the runs table); a Redis lock keeps two runs from overlapping.
DIRECTORY_SYNC_JOB = "connectors.ldap.sync.scheduled_sync"
DIRECTORY_SCHEDULE_KEY = "darbaza:worker:directory-sync-scheduled"
DIRECTORY_INTERVAL = 60


def schedule_directory_sync(redis: Redis, queue: Queue, interval: float = DIRECTORY_INTERVAL) -> bool:
    """Queue the directory sync check unless a worker already did this minute."""
    # A full sync of a big directory takes minutes: a long timeout.
    return queue_once(redis, queue, DIRECTORY_SYNC_JOB, DIRECTORY_SCHEDULE_KEY, interval, job_timeout=4 * 3600)


# Expired tokens and codes, and old delivered mails and logout tokens, are deleted
# (idp/prune.py) every 10 minutes; one worker queues it per interval. A run stops after
# idp.prune.TIME_LIMIT (5 min), well inside the interval, and the next one goes on.
PRUNE_JOB = "idp.prune.prune_job"
PRUNE_SCHEDULE_KEY = "darbaza:worker:prune-scheduled"
PRUNE_INTERVAL = 600


def schedule_prune(redis: Redis, queue: Queue, interval: float = PRUNE_INTERVAL) -> bool:
    """Queue the pruning run unless a worker already did in this interval."""
    return queue_once(redis, queue, PRUNE_JOB, PRUNE_SCHEDULE_KEY, interval, job_timeout=900)


class DeliveryScheduler(threading.Thread):
    """Calls ``schedule_deliveries`` every ``interval`` seconds until ``stop``."""

    def __init__(self, redis: Redis, queue: Queue, interval: float, directory: bool = False) -> None:
        super().__init__(name="delivery-scheduler", daemon=True)
        self.redis = redis
        self.queue = queue
        self.interval = interval
        self.directory = directory
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                schedule_deliveries(self.redis, self.queue, self.interval)
                schedule_session_sweep(self.redis, self.queue)
                schedule_case_escalation(self.redis, self.queue)
                schedule_prune(self.redis, self.queue)
                if self.directory:
                    schedule_directory_sync(self.redis, self.queue)
            except RedisError as exc:
                # Redis will come back; the database keeps every message and logout token.
                log.warning("could not schedule deliveries: %s", exc)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Run until SIGINT/SIGTERM (RQ's warm shutdown finishes the job in hand), or, with
    ``burst``, until the queue is empty. Deliveries are queued every
    ``IDP_OUTBOX_POLL_SECONDS``; with a school directory configured its scheduled sync too."""
    from rq import Worker

    poll_seconds = settings.outbox_poll_seconds
    directory = bool(settings.ldap_urls)
    # No socket timeout here: RQ blocks on the queue for minutes at a time.
    redis = connect_redis(settings, socket_timeout=None)
    queue = Queue(QUEUE_NAME, connection=redis)
    scheduler = DeliveryScheduler(redis, queue, poll_seconds, directory=directory)
    if burst:
        schedule_deliveries(redis, queue, poll_seconds)
        schedule_session_sweep(redis, queue)
        schedule_case_escalation(redis, queue)
        schedule_prune(redis, queue)
        if directory:
            schedule_directory_sync(redis, queue)
    else:
        scheduler.start()
    try:
        # RQ logs three INFO lines per job, i.e. per poll; keep its warnings and errors
        # unless debugging.
        rq_level = "DEBUG" if log.isEnabledFor(logging.DEBUG) else "WARNING"
        Worker([queue], connection=redis).work(burst=burst, logging_level=rq_level)
    finally:
        scheduler.stop()
        if scheduler.is_alive():
            scheduler.join(timeout=poll_seconds + 1)
        redis.close()
