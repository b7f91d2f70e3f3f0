"""Hub: routes ticks, ranks and alerts to WebSocket clients, each with one bounded queue."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tickstream_gateway.protocol import alert_frame, tick_frame
from tickstream_shared.naming import Market, MetricKind
from tickstream_shared.schemas import Alert, Tick

Frame = dict[str, Any]

# Ticks kept per market in memory: they bridge the gap between what PostgreSQL holds (stats
# stores ticks a moment after they are published) and what this gateway has already seen live.
RECENT_TICKS_PER_MARKET = 4096


@dataclass
class MarketFeed:
    """One client's subscription to one market."""

    held: list[Tick] | None = field(default_factory=list)  # None once live
    # Newest (exchange_ts, seq) sent: the gateway's own Kafka feed can lag behind what stats
    # already stored (and so what history contained); older ticks are never sent twice.
    sent_up_to: tuple[int, int] = (-1, -1)


@dataclass(eq=False)
class ClientSession:
    """One WebSocket client: its subscriptions and its bounded outgoing queue.

    Policy when the queue is full: the client is too slow to follow the stream; it is marked
    `overflowed` and its connection is closed (code 1013, try again later) rather than
    buffering without bound or silently dropping ticks it would believe it had.
    """

    queue_size: int
    queue: asyncio.Queue[Frame] = field(init=False)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    markets: dict[Market, MarketFeed] = field(default_factory=dict)
    rank_kinds: set[MetricKind] = field(default_factory=set)
    alerts: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)

    def offer(self, frame: Frame) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overflowed.set()

    def deliver_tick(self, tick: Tick) -> None:
        feed = self.markets.get(tick.market)
        if feed is None:
            return
        if feed.held is not None:
            if len(feed.held) < self.queue_size:
                feed.held.append(tick)
            else:
                self.overflowed.set()
            return
        key = (tick.exchange_ts, tick.seq)
        if key > feed.sent_up_to:
            feed.sent_up_to = key
            self.offer(tick_frame(tick))


@dataclass
class Hub:
    """All connected clients and the latest state they are sent on subscribe."""

    client_queue: int
    sessions: set[ClientSession] = field(default_factory=set)
    dropped_slow_clients: int = 0
    _by_market: dict[Market, set[ClientSession]] = field(default_factory=lambda: defaultdict(set))
    _recent: dict[Market, deque[Tick]] = field(default_factory=dict)
    latest_ranks: dict[MetricKind, Frame] = field(default_factory=dict)

    def connect(self) -> ClientSession:
        session = ClientSession(self.client_queue)
        self.sessions.add(session)
        return session

    def disconnect(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        for market in session.markets:
            self._by_market[market].discard(session)
        if session.overflowed.is_set():
            self.dropped_slow_clients += 1

    @property
    def live_markets(self) -> Iterable[Market]:
        return self._recent.keys()

    def recent_ticks(self, market: Market) -> list[Tick]:
        return list(self._recent.get(market, ()))

    def hold_market(self, session: ClientSession, market: Market) -> None:
        """Start a market subscription: live ticks are held until `release_market`."""
        session.markets[market] = MarketFeed()
        self._by_market[market].add(session)

    def release_market(
        self, session: ClientSession, market: Market, after: tuple[int, int]
    ) -> None:
        """History up to `after` (exchange_ts, seq) was sent: send held ticks past it, go live."""
        feed = session.markets.get(market)
        if feed is None or feed.held is None:
            return
        held, feed.held, feed.sent_up_to = feed.held, None, after
        for tick in held:
            session.deliver_tick(tick)

    def drop_market(self, session: ClientSession, market: Market) -> None:
        session.markets.pop(market, None)
        self._by_market[market].discard(session)

    def publish_tick(self, tick: Tick) -> None:
        market = tick.market
        recent = self._recent.get(market)
        if recent is None:
            recent = self._recent[market] = deque(maxlen=RECENT_TICKS_PER_MARKET)
        recent.append(tick)
        for session in self._by_market.get(market, ()):
            session.deliver_tick(tick)

    def publish_alert(self, alert: Alert) -> None:
        frame = alert_frame(alert)
        for session in self.sessions:
            if session.alerts:
                session.offer(frame)

    def publish_ranks(self, kind: MetricKind, frame: Frame) -> None:
        self.latest_ranks[kind] = frame
        for session in self.sessions:
            if kind in session.rank_kinds:
                session.offer(frame)
