"""The ``darbaza worker`` process: an RQ worker, and a small scheduler thread that queues an
outbox-delivery job every few seconds."""

from __future__ import annotations

import logging
import secrets
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

log = logging.getLogger("darbaza.worker")

QUEUE_NAME = "darbaza"
DELIVER_OUTBOX_JOB = "idp.notify.jobs.deliver_outbox"
# Held for one interval by whichever worker queued the delivery job of that interval.
OUTBOX_SCHEDULE_KEY = "darbaza:worker:outbox-scheduled"


def schedule_outbox_delivery(redis: Redis, queue: Queue, interval: float) -> bool:
    """Queue one delivery job unless another worker already did in this interval.

    Delivery is safe to run twice (each message is claimed atomically); the lock only
    keeps N workers from queueing N jobs every interval.
    """
    if not redis.set(OUTBOX_SCHEDULE_KEY, secrets.token_hex(8), nx=True, px=max(1, int(interval * 1000))):
        return False
    # A pass that outlives its timeout is killed; its claimed rows come back after the lease.
    queue.enqueue(DELIVER_OUTBOX_JOB, job_timeout=300, result_ttl=60, failure_ttl=7 * 86400)
    return True


class OutboxScheduler(threading.Thread):
    """Calls ``schedule_outbox_delivery`` every ``interval`` seconds until ``stop``."""

    def __init__(self, redis: Redis, queue: Queue, interval: float) -> None:
        super().__init__(name="outbox-scheduler", daemon=True)
        self.redis = redis
        self.queue = queue
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                schedule_outbox_delivery(self.redis, self.queue, self.interval)
            except RedisError as exc:
                # Redis will come back; the outbox in the database keeps every message.
                log.warning("could not schedule outbox delivery: %s", exc)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()


def run_worker(redis_url: str, poll_seconds: float, burst: bool = False) -> None:
    """Run until SIGINT/SIGTERM (RQ's warm shutdown finishes the job in hand), or, with
    ``burst``, until the queue is empty."""
    from rq import Worker

    # No socket timeout here: RQ blocks on the queue for minutes at a time.
    redis = Redis.from_url(redis_url)
    queue = Queue(QUEUE_NAME, connection=redis)
    scheduler = OutboxScheduler(redis, queue, poll_seconds)
    if burst:
        schedule_outbox_delivery(redis, queue, poll_seconds)
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
