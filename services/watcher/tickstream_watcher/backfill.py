"""BackfillQueue: which markets of one exchange wait for a REST backfill, one at a time each."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tickstream_shared.naming import Market


@dataclass
class BackfillQueue:
    """The backfills of one exchange's markets, owned by the source (not by a connection).

    `want` asks for a market's backfill (after every connect of its connection). A market is
    at most once waiting and at most once running: asking for one that waits changes
    nothing; asking for one that runs marks it to run once more when done (for the minutes
    since the reconnect, which the running one may not reach), never a second one at once.
    Workers `claim` the oldest waiting market and report `finished`. A market is `done` once
    a backfill of it reached the minute its connection streams from; it is not counted again
    (a later, short backfill repairs only the gap of a reconnect). Markets leave with
    `forget` (delisted). Everything here is bounded by the exchange's markets.
    """

    exchange: str
    requests: int = 0  # REST requests made by backfills
    minutes: int = 0  # closed minutes backfills published
    _waiting: dict[Market, None] = field(default_factory=dict)  # an ordered set
    _running: set[Market] = field(default_factory=set)
    _again: set[Market] = field(default_factory=set)
    _done: set[Market] = field(default_factory=set)
    _markets: set[Market] = field(default_factory=set)  # every market of the exchange now

    def want(self, markets: Iterable[Market]) -> None:
        """Backfill `markets` (from where each got to); see the class doc."""
        for market in markets:
            self._markets.add(market)
            if market in self._running:
                self._again.add(market)
            else:
                self._waiting.setdefault(market, None)

    def claim(self) -> Market | None:
        """The market a worker backfills next (now running), or None if none waits."""
        for market in self._waiting:
            del self._waiting[market]
            self._running.add(market)
            return market
        return None

    def finished(self, market: Market, *, complete: bool) -> None:
        """A backfill of `market` ended; `complete` if it reached its connection's minutes (a
        failed one is asked again at its connection's next connect, or now if a reconnect
        came meanwhile)."""
        self._running.discard(market)
        if market not in self._markets:
            return  # forgotten meanwhile
        if complete:
            self._done.add(market)
        if market in self._again:
            self._again.discard(market)
            self._waiting.setdefault(market, None)

    def forget(self, markets: Iterable[Market]) -> None:
        """`markets` left the exchange's listing: no backfill of them any more (one running
        ends on its own; its result is not counted)."""
        for market in markets:
            self._markets.discard(market)
            self._waiting.pop(market, None)
            self._again.discard(market)
            self._done.discard(market)

    @property
    def total(self) -> int:
        """The exchange's markets."""
        return len(self._markets)

    @property
    def done(self) -> int:
        """Markets whose backfill reached the minutes their connection streams."""
        return len(self._done)

    @property
    def pending(self) -> int:
        """Markets waiting for a backfill or being backfilled."""
        return len(self._waiting) + len(self._running)

    def progress(self, elapsed_s: float) -> str:
        """One log line: markets done of all, requests, minutes, and an ETA at the rate so far
        (`elapsed_s`: since the first backfill of this source started)."""
        line = (
            f"{self.exchange}: backfill {self.done}/{self.total} markets done, {self.pending}"
            f" pending, {self.requests} requests, {self.minutes} minutes"
        )
        if self.done and self.pending and elapsed_s > 0:
            eta = self.pending * elapsed_s / self.done
            line += f", ETA {eta:.0f}s"
        return line
