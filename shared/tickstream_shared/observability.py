"""Prometheus metrics: counters read at scrape time from the objects that already keep them."""

from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final, Literal, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, help text, type and label names."""

    name: str
    doc: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...] = ()

    def new(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labels)
        return GaugeMetricFamily(self.name, self.doc, labels=self.labels)


# One value of a family, for one tuple of label values (in the family's label order).
Reading = tuple[Family, tuple[str, ...], float]
_Key = tuple[Family, tuple[str, ...]]
_Entry = tuple[
    "weakref.ref[Any]", Callable[[], Iterable[Reading]], Callable[[Any], Iterable[Reading]]
]


def _nothing(*_: object) -> Iterable[Reading]:
    return ()


class Readings(Collector):
    """Counters and gauges read, at each scrape, from the objects that keep them.

    `track(owner, totals=..., current=...)` registers an object. `totals()` returns counter
    values and must not refer to `owner`: when `owner` is garbage collected its last totals are
    kept, so a counter never goes down when its object is replaced (a watcher makes a new
    publisher at each lease it takes). `current(owner)` is read from the living owner only:
    gauges, and counters of objects that live as long as the process. Readings of the same
    family and labels from several objects are added up. Collected in the event loop's
    thread, like every scrape here.
    """

    def __init__(self) -> None:
        self._live: dict[int, _Entry] = {}
        self._retired: dict[_Key, float] = defaultdict(float)
        self._gone: list[int] = []
        self._collecting = False
        self._tokens = itertools.count()

    def track(
        self,
        owner: T,
        *,
        totals: Callable[[], Iterable[Reading]] = _nothing,
        current: Callable[[T], Iterable[Reading]] = _nothing,
    ) -> None:
        """Read `owner`'s metrics at every scrape from now on, until it is collected."""
        token = next(self._tokens)
        self._live[token] = (weakref.ref(owner), totals, current)
        weakref.finalize(owner, self._owner_gone, token)

    def values(self) -> dict[_Key, float]:
        """Every family's values now: retired totals plus what the living owners report."""
        self._collecting = True
        try:
            self._retire_gone()
            values: dict[_Key, float] = defaultdict(float, self._retired)
            for ref, totals, current in list(self._live.values()):
                readings = list(totals())
                owner = ref()
                if owner is not None:
                    readings += current(owner)
                del owner  # the owner may die here; it is then retired after the scrape
                for family, labels, value in readings:
                    values[family, labels] += value
            return values
        finally:
            self._collecting = False
            self._retire_gone()

    def collect(self) -> Iterator[Metric]:
        metrics: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for (family, labels), value in sorted(
            self.values().items(), key=lambda item: (item[0][0].name, item[0][1])
        ):
            metric = metrics.get(family.name)
            if metric is None:
                metric = metrics[family.name] = family.new()
            metric.add_metric(list(labels), value)
        yield from metrics.values()

    def describe(self) -> Iterable[Metric]:
        return ()  # names vary with what is tracked; no collect() at registration

    def _owner_gone(self, token: int) -> None:
        # Runs when an owner is collected, which can happen in the middle of a scrape (any
        # allocation may run the garbage collector): the scrape then retires it when done.
        self._gone.append(token)
        if not self._collecting:
            self._retire_gone()

    def _retire_gone(self) -> None:
        while self._gone:
            _, totals, _ = self._live.pop(self._gone.pop())
            for family, labels, value in totals():
                self._retired[family, labels] += value


# Families read from the consumers of stats and alerts (ConsumerRuntime) and the gateway feed.
RECORDS_DECODED: Final = Family(
    "tickstream_records_decoded_total", "Records decoded into valid ticks (or alerts).", "counter"
)
RECORDS_SKIPPED_BAD: Final = Family(
    "tickstream_records_skipped_bad_total",
    "Records that failed validation and were skipped (stats and alerts dead-letter them).",
    "counter",
)
RECORDS_DEAD_LETTERED: Final = Family(
    "tickstream_records_dead_lettered_total",
    "Skipped records sent to the dead-letter topic and acknowledged by the broker.",
    "counter",
)
RECORDS_SKIPPED_UNOWNED: Final = Family(
    "tickstream_records_skipped_unowned_total",
    "Records of partitions not owned when their batch was handled (mid-rebalance): their"
    " owner reads them again.",
    "counter",
)
BATCHES: Final = Family(
    "tickstream_batches_total", "Batches made durable (before their commit).", "counter"
)
COMMITS_REFUSED: Final = Family(
    "tickstream_commits_refused_total",
    "Batch commits refused because the group rebalanced under the batch (read again).",
    "counter",
)
MARKETS_WARMED: Final = Family(
    "tickstream_markets_warmed_total",
    "Markets prepared as their partition arrived (stats: loaded from stored bars).",
    "counter",
)
MARKETS_KEPT: Final = Family(
    "tickstream_markets_kept_total",
    "Markets that stayed with this instance across a rebalance and kept their state (no"
    " warm-up), counted once per rebalance.",
    "counter",
)
MARKETS_FORGOTTEN: Final = Family(
    "tickstream_markets_forgotten_total",
    "Markets whose state was dropped because their partition left this instance.",
    "counter",
)
MARKETS_ARRIVING: Final = Family(
    "tickstream_markets_arriving",
    "Partitions assigned and paused until their market is prepared (warm-up in progress).",
    "gauge",
)
CONSUMER_LAG: Final = Family(
    "tickstream_consumer_lag_records",
    "Records of a partition after the last one this instance handled, by the highwater offset"
    " of its latest fetch; reported once the instance has handled a batch of the partition.",
    "gauge",
    ("topic", "partition"),
)
ALERTS_RAISED: Final = Family(
    "tickstream_alerts_raised_total",
    "Alerts newly stored (each alert once, whatever its status; then published).",
    "counter",
)
ALERTS_CONFIRMED: Final = Family(
    "tickstream_alerts_confirmed_total",
    "Alerts stored as confirmed: raised on a closed bar, or a closed bar of their minute"
    " still crossed (a provisional or retracted one).",
    "counter",
)
ALERTS_RETRACTED: Final = Family(
    "tickstream_alerts_retracted_total",
    "Alerts stored as retracted: a closed bar (or correction) of their minute no longer"
    " crossed the threshold.",
    "counter",
)
ALERTS_LEFT_PROVISIONAL: Final = Family(
    "tickstream_alerts_left_provisional_total",
    "Provisional alerts whose minute got no closed bar within ALERTS_CORRECTION_MINUTES:"
    " they stay provisional.",
    "counter",
)

# Batches of stats and alerts: from decoding to the commit, retries of outages included.
BATCH_SECONDS: Final = Histogram(
    "tickstream_batch_duration_seconds",
    "Time to decode a batch, make its effects durable and commit it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
SERVICE_INFO: Final = Gauge(
    "tickstream_service_info", "The service this process runs (always 1).", ["service", "version"]
)

# One registry per process (prometheus_client's default, with its process and runtime metrics):
# a process runs one service, which tickstream_service_info names, so no metric carries a
# service label; Prometheus' job and instance labels tell the processes apart.
READINGS: Final = Readings()
REGISTRY.register(READINGS)


def describe_service(service: str) -> None:
    """Label this process's metrics with the service it runs; call once at start."""
    try:
        version = metadata.version("tickstream")
    except metadata.PackageNotFoundError:
        version = "unknown"
    SERVICE_INFO.labels(service=service, version=version).set(1)


def exposition() -> tuple[bytes, str]:
    """The process's metrics in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
