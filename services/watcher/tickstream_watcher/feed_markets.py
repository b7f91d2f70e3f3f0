"""The watcher's gauge of its markets by origin and feed state, from its latest feed reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from tickstream_shared.feed_status import SEVERITY, FeedStatus, summarise
from tickstream_shared.observability import READINGS, Family, Reading

FEED_MARKETS: Final = Family(
    "tickstream_feed_markets",
    "Markets in the publishing watcher's latest feed reports, by origin and feed state"
    " (nothing while standing by).",
    "gauge",
    ("origin", "state"),
)


class FeedMarkets:
    """The feed reports a publishing watcher made last, exported as FEED_MARKETS.

    Every state of a reported origin is exported, 0 included, so that a query for one state
    finds a series. Counted with the same rule as the gateway's `origins` (`summarise` at the
    report's time, so never `stale` by age here: a watcher that stops reporting shows as a
    failed scrape or as a standby exporting nothing).
    """

    def __init__(self) -> None:
        self._reports: Mapping[str, FeedStatus] = {}
        self._reported_ms = 0
        READINGS.track(self, current=FeedMarkets._readings)

    def reported(self, reports: Mapping[str, FeedStatus], now_ms: int) -> None:
        """Replace the reports, made at `now_ms`. Idempotent."""
        self._reports, self._reported_ms = reports, now_ms

    def clear(self) -> None:
        """Export nothing (the lease is lost or handed on). Idempotent."""
        self._reports = {}

    def _readings(self) -> list[Reading]:
        summaries = summarise(self._reports.values(), self._reported_ms)
        return [
            (FEED_MARKETS, (origin, state), summary.markets.get(state, 0))
            for origin, summary in summaries.items()
            for state in SEVERITY
        ]
