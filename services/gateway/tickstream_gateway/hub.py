"""Hub: routes bar updates, ranks and alerts, each encoded once, to every client's outbox."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from tickstream_gateway.bars import RecentBars
from tickstream_gateway.interest import MarketInterest
from tickstream_gateway.outbox import FanoutCounters, Outbox
from tickstream_gateway.protocol import Frame, Subscription, alert_frame, bar_frame
from tickstream_gateway.rankboard import RankBoard
from tickstream_gateway.ranks import Ranking
from tickstream_gateway.selection import EVERYTHING
from tickstream_shared.naming import MetricKind
from tickstream_shared.schemas import Alert, Tick


@dataclass(eq=False, slots=True)
class ClientSession:
    """One WebSocket client: its subscriptions and its outbox.

    Policy when the outbox is full (see Outbox: only with what must be delivered, and each
    stream's newest state, over the byte bound): the outbox is `overflowed` and the
    connection is closed (1013, try again later) rather than buffering without bound or
    silently dropping frames.
    """

    outbox: Outbox
    # Live market subscriptions: market id -> the largest seq queued. The gateway's own feed
    # can lag behind what stats stored, so updates at or below it are never sent.
    markets: dict[str, int] = field(default_factory=dict)
    # Markets this client subscribes to or is subscribing to: its holds on MarketInterest.
    wanted: set[str] = field(default_factory=set)
    # Ranks subscriptions, at most one per kind (its measure and selection).
    ranks: dict[MetricKind, Subscription] = field(default_factory=dict)
    alerts: bool = False

    def offer(self, frame: Frame, now: float | None = None) -> None:
        # A refused frame leaves the outbox overflowed, which its wakeup reports to the
        # connection (websocket.py): it closes the client.
        self.outbox.put(frame, now)


@dataclass
class Hub:
    """All connected clients, the bars of the markets the feed reads (`recent`), which
    markets those are (`interest`: the ones clients hold) and the latest rank frames."""

    client_queue_bytes: int
    sessions: set[ClientSession] = field(default_factory=set)
    counters: FanoutCounters = field(default_factory=FanoutCounters)
    recent: RecentBars = field(default_factory=RecentBars)
    latest_ranks: dict[Ranking, RankBoard] = field(default_factory=dict)
    # Which markets the feed reads: those some client watches (see want_market).
    interest: MarketInterest = field(default_factory=MarketInterest)
    _by_market: dict[str, set[ClientSession]] = field(default_factory=lambda: defaultdict(set))

    def connect(self) -> ClientSession:
        # max_age 0: each write to a client carries only the newest state of each stream;
        # how often a client is written is the connection's (ws.ClientConnection, paced by
        # GATEWAY_MAX_FRAME_AGE_MS).
        session = ClientSession(Outbox(self.client_queue_bytes, self.counters, max_age=0.0))
        self.sessions.add(session)
        return session

    def disconnect(self, session: ClientSession) -> None:
        """Forget the client. Idempotent."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        for market_id in session.markets:
            self._unroute(session, market_id)
        session.markets.clear()
        now = time.monotonic()
        for market_id in session.wanted:
            self.interest.release(market_id, now)
        session.wanted.clear()
        if session.outbox.overflowed:
            self.counters.slow_clients_closed += 1

    def want_market(self, session: ClientSession, market_id: str) -> None:
        """The client is subscribing to the market: the feed reads its topic until the client
        drops it (drop_market, disconnect). Idempotent."""
        if market_id not in session.wanted:
            session.wanted.add(market_id)
            self.interest.acquire(market_id)

    def watch_market(self, session: ClientSession, market_id: str, after_seq: int) -> None:
        """History up to seq `after_seq` was queued: from now on send newer updates live."""
        self.want_market(session, market_id)
        session.markets[market_id] = after_seq
        self._by_market[market_id].add(session)

    def drop_market(self, session: ClientSession, market_id: str, *, linger: bool = True) -> None:
        """Stop the client's live updates of the market and its hold on the feed (the feed
        reads on for the grace unless not `linger`: an unknown market). Idempotent."""
        session.markets.pop(market_id, None)
        self._unroute(session, market_id)
        if market_id in session.wanted:
            session.wanted.discard(market_id)
            self.interest.release(market_id, time.monotonic(), linger=linger)

    def _unroute(self, session: ClientSession, market_id: str) -> None:
        # No entry is made for a market nobody watches (an unsubscribe of a made-up market),
        # and the last subscriber's leaving removes the market's entry: bounded by subscriptions.
        sessions = self._by_market.get(market_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_market[market_id]

    def feed_started(self) -> None:
        """The feed (re)started: markets' history is read from storage again at next use."""
        self.recent.feed_started()
        self.interest.unsettle_all()

    def publish_tick(self, tick: Tick, now: float | None = None) -> None:
        """Remember the update and send it, encoded once, to every subscriber behind it.

        `now` is `time.monotonic()` (read once per batch by the feed).
        """
        if now is None:
            now = time.monotonic()
        self.recent.add(tick, now)
        sessions = self._by_market.get(tick.market)
        if not sessions:
            return
        frame: Frame | None = None
        market, seq = tick.market, tick.seq
        for session in sessions:
            if seq > session.markets[market]:
                session.markets[market] = seq
                if frame is None:
                    frame = bar_frame(tick)
                session.outbox.put(frame, now)  # an overflow is the connection's to act on

    def publish_alert(self, alert: Alert) -> None:
        frame = alert_frame(alert)
        for session in self.sessions:
            if session.alerts:
                session.offer(frame)

    def publish_ranks(self, board: RankBoard) -> None:
        """Hold a ranking that changed and send each client subscribed to it its frame.

        Clients asking the same page, whose own markets are ranked on it (or not at all),
        share one frame, encoded once (RankBoard.frame).
        """
        self.latest_ranks[board.kind, board.measure] = board
        now = time.monotonic()
        for session in self.sessions:
            sub = session.ranks.get(board.kind)
            if sub is not None and sub.measure == board.measure:
                session.offer(rank_frame(session, sub, board), now)

    def resend_ranks(self, session: ClientSession) -> None:
        """Send the client its current ranks frames again (its own markets changed)."""
        for kind, sub in session.ranks.items():
            board = None if sub.measure is None else self.latest_ranks.get((kind, sub.measure))
            if board is not None:
                session.offer(rank_frame(session, sub, board))


def newest_per_bar(ticks: list[Tick]) -> list[Tick]:
    """`ticks` (one consumer batch, in order) without the forming updates that another tick
    of the same market and minute in the batch supersedes (a higher seq); closed bars are
    all kept.

    What a client is sent of a forming bar is its newest state at each write (Outbox), so an
    update superseded within the batch would be queued for every subscriber only to be
    replaced before any write: a batch read late (the feed behind a fast market) costs one
    fan-out per bar instead of one per update, and the feed catches up.
    """
    if len(ticks) < 2:
        return ticks
    newest: dict[tuple[str, int], int] = {}  # (market, minute) -> the highest seq
    for tick in ticks:
        key = (tick.market, tick.minute)
        if tick.seq > newest.get(key, -1):
            newest[key] = tick.seq
    if len(newest) == len(ticks):
        return ticks
    return [t for t in ticks if t.closed or newest[t.market, t.minute] == t.seq]


def rank_frame(session: ClientSession, sub: Subscription, board: RankBoard) -> Frame:
    """The `ranks` frame of `board` for a client: its page plus its own markets' entries."""
    own = [f"{market_id}:{board.kind}" for market_id in session.markets]
    return board.frame(sub.selection or EVERYTHING, own)
