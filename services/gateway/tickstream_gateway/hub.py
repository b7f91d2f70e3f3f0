"""Hub: routes bar updates, ranks and alerts to WebSocket clients, each with one bounded queue."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tickstream_gateway.bars import RecentBars
from tickstream_gateway.protocol import alert_frame, bar_frame
from tickstream_shared.naming import MetricKind, RankMeasure
from tickstream_shared.schemas import Alert, Tick

# Frames are encoded JSON text: encoded once, the same string goes to every client.
Frame = str


@dataclass
class MarketFeed:
    """One client's subscription to one market."""

    # While history is read: the newest held update per minute (None once live). Updates of a
    # forming bar replace each other, so holding is bounded by minutes, not by the update rate.
    held: dict[int, Tick] | None = field(default_factory=dict)
    # Largest seq sent on this subscription (after history: the newest seq in it). The
    # gateway's own feed can lag behind what stats stored, so older updates are never resent.
    sent_seq: int = -1


@dataclass(eq=False)
class ClientSession:
    """One WebSocket client: its subscriptions and its bounded outgoing queue.

    Policy when the queue is full: the client is too slow to follow the stream; it is marked
    `overflowed` and its connection is closed (code 1013, try again later) rather than
    buffering without bound or silently dropping updates it would believe it had.
    """

    queue_size: int
    queue: asyncio.Queue[Frame] = field(init=False)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    markets: dict[str, MarketFeed] = field(default_factory=dict)  # by market id
    rank_measures: dict[MetricKind, RankMeasure] = field(default_factory=dict)
    alerts: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)

    def offer(self, frame: Frame) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overflowed.set()


@dataclass
class Hub:
    """All connected clients, the recent live bars and the latest rank frames."""

    client_queue: int
    sessions: set[ClientSession] = field(default_factory=set)
    dropped_slow_clients: int = 0
    recent: RecentBars = field(default_factory=RecentBars)
    latest_ranks: dict[tuple[MetricKind, RankMeasure], Frame] = field(default_factory=dict)
    _by_market: dict[str, set[ClientSession]] = field(default_factory=lambda: defaultdict(set))

    def connect(self) -> ClientSession:
        session = ClientSession(self.client_queue)
        self.sessions.add(session)
        return session

    def disconnect(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        for market_id in session.markets:
            self._unroute(session, market_id)
        if session.overflowed.is_set():
            self.dropped_slow_clients += 1

    def hold_market(self, session: ClientSession, market_id: str) -> None:
        """Start (or restart) a market subscription: live updates are held until released."""
        session.markets[market_id] = MarketFeed()
        self._by_market[market_id].add(session)

    def release_market(self, session: ClientSession, market_id: str, after_seq: int) -> None:
        """History up to seq `after_seq` was sent: send held updates past it, then go live."""
        feed = session.markets.get(market_id)
        if feed is None or feed.held is None:
            return
        held, feed.held, feed.sent_seq = feed.held, None, after_seq
        for tick in sorted(held.values(), key=lambda t: t.seq):
            if tick.seq > feed.sent_seq:
                feed.sent_seq = tick.seq
                session.offer(bar_frame(tick))

    def drop_market(self, session: ClientSession, market_id: str) -> None:
        session.markets.pop(market_id, None)
        self._unroute(session, market_id)

    def _unroute(self, session: ClientSession, market_id: str) -> None:
        # No entry is made for a market nobody watches (an unsubscribe of a made-up market),
        # and the last subscriber's leaving removes the market's entry: bounded by subscriptions.
        sessions = self._by_market.get(market_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_market[market_id]

    def publish_tick(self, tick: Tick, now: float | None = None) -> None:
        """Remember the update and send it, encoded once, to every live subscriber behind it.

        `now` is `time.monotonic()` (read once per batch by the feed).
        """
        self.recent.add(tick, time.monotonic() if now is None else now)
        sessions = self._by_market.get(tick.market)
        if not sessions:
            return
        frame: Frame | None = None
        for session in sessions:
            feed = session.markets[tick.market]
            if feed.held is not None:
                held = feed.held.get(tick.minute)
                if held is None or tick.seq > held.seq:
                    feed.held[tick.minute] = tick
                    if len(feed.held) > session.queue_size:
                        session.overflowed.set()  # a history query that never ends
            elif tick.seq > feed.sent_seq:
                feed.sent_seq = tick.seq
                if frame is None:
                    frame = bar_frame(tick)
                session.offer(frame)

    def publish_alert(self, alert: Alert) -> None:
        frame = alert_frame(alert)
        for session in self.sessions:
            if session.alerts:
                session.offer(frame)

    def publish_ranks(self, kind: MetricKind, measure: RankMeasure, frame: Frame) -> None:
        self.latest_ranks[kind, measure] = frame
        for session in self.sessions:
            if session.rank_measures.get(kind) == measure:
                session.offer(frame)
