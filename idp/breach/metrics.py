"""Prometheus metrics of breach cases (issue 6), served at ``/metrics`` with the others
by idp/observability.py.

The numbers are read from the database at each scrape (a custom collector), so every
server process gives the same answer and nothing is lost on a restart:

- ``darbaza_breach_cases_open{state}``: cases not resolved yet, by state;
- ``darbaza_breach_cases_overdue``: open cases past their support deadline;
- ``darbaza_breach_cases_total{state}``: every case ever filed, by state now;
- ``darbaza_breach_time_to_contain_seconds``: histogram of report -> containment;
- ``darbaza_breach_time_to_resolve_seconds``: histogram of report -> resolution."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idp.breach.models import BreachCase

STATES = ("reported", "contained", "in_review", "resolved")
OPEN_STATES = STATES[:-1]
# Containment happens in the request of the report: seconds, not hours.
CONTAIN_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)
# One working day is the target; a weekend stretches it to three calendar days or more.
RESOLVE_BUCKETS = (3600.0, 4 * 3600.0, 8 * 3600.0, 86400.0, 2 * 86400.0, 3 * 86400.0, 4 * 86400.0, 7 * 86400.0,
                   14 * 86400.0)

def _histogram(name: str, documentation: str, values: Iterable[float], bounds: tuple[float, ...]) -> Metric:
    data = sorted(max(0.0, v) for v in values)
    buckets: list[tuple[str, float]] = []
    index = 0
    for bound in bounds:
        while index < len(data) and data[index] <= bound:
            index += 1
        buckets.append((repr(bound), float(index)))
    buckets.append(("+Inf", float(len(data))))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(data))


class BreachCaseCollector(Collector):
    """Reads the case table at every collect."""

    def __init__(self, session_factory: Callable[[], Session], clock: Callable[[], datetime]) -> None:
        self.session_factory = session_factory
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        now = now if now.tzinfo is None else now.astimezone(UTC).replace(tzinfo=None)
        with self.session_factory() as db:
            counts = db.execute(select(BreachCase.state, func.count(BreachCase.id)).group_by(BreachCase.state))
            by_state: dict[str, int] = {state: count for state, count in counts.all()}
            overdue = db.scalar(select(func.count(BreachCase.id)).where(
                BreachCase.state.in_(OPEN_STATES), BreachCase.deadline_at < now)) or 0
            contained = db.execute(select(BreachCase.reported_at, BreachCase.contained_at)
                                   .where(BreachCase.contained_at.is_not(None))).all()
            resolved = db.execute(select(BreachCase.reported_at, BreachCase.resolved_at)
                                  .where(BreachCase.resolved_at.is_not(None))).all()
        open_cases = GaugeMetricFamily("darbaza_breach_cases_open", "Breach cases not resolved yet, by state.",
                                       labels=["state"])
        for state in OPEN_STATES:
            open_cases.add_metric([state], float(by_state.get(state, 0)))
        yield open_cases
        yield GaugeMetricFamily("darbaza_breach_cases_overdue",
                                "Open breach cases past their support deadline (one working day).",
                                value=float(overdue))
        total = GaugeMetricFamily("darbaza_breach_cases_total", "Every breach case filed, by its state now.",
                                  labels=["state"])
        for state in STATES:
            total.add_metric([state], float(by_state.get(state, 0)))
        yield total
        yield _histogram("darbaza_breach_time_to_contain_seconds",
                         "Seconds from a breach report to the containment of the account.",
                         ((c - r).total_seconds() for r, c in contained if r and c), CONTAIN_BUCKETS)
        yield _histogram("darbaza_breach_time_to_resolve_seconds",
                         "Seconds from a breach report to the resolution of its case.",
                         ((d - r).total_seconds() for r, d in resolved if r and d), RESOLVE_BUCKETS)
