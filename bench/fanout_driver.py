"""Tick driver for bench_fanout: a steady rate of bar updates straight into the tick topics.

Each market's bar is closed the way the synthetic source closes it: once its wall-clock minute
has ended, the driver sends a last update of that minute with `closed` true (the same values,
the next `seq`), within a slot (10 ms) of the minute's end, before any update of the next
minute. Closing ticks come on top of `rate`, a shared value read every slot (the bench may
change it while the driver runs). `newest[i]` holds the `received_ts` of the newest
update sent of market i (a shared array the load generators read: what a client could have at
most at a given moment)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import msgspec

from tickstream_shared.kafka import make_consumer, make_producer
from tickstream_shared.naming import TICK_TOPIC_PATTERN, Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import KafkaSettings

# The driver sends in slots of this length: rate x slot ticks per slot, on absolute deadlines
# (a longer slot, e.g. 1 s, sends a second's ticks of every market at once).
SLOT_S = 0.01
# An `multiprocessing.Array("q", n, lock=False)`: one int64 per market, written by the driver
# alone (an aligned 8-byte store: readers see the old or the new value, never a mix).
Shared = Any
_decode = msgspec.json.Decoder(Tick).decode


def bench_markets(count: int) -> list[Market]:
    """The markets ticks are driven into: `bench:m000-usd`, `bench:m001-usd`, ..."""
    return [Market("bench", f"m{i:03d}", "usd") for i in range(count)]


@dataclass
class _Bar:
    """The forming bar of one market: a random walk, restarted each wall-clock minute."""

    seq: int = 0
    minute: int = 0
    open: float = 100.0
    high: float = 100.0
    low: float = 100.0
    close: float = 100.0
    volume: float = 0.0
    closed: bool = True  # the minute's closing update is sent (or no update yet)

    def finish(self, market: str, now_ms: int) -> Tick:
        """The last update of the bar's minute: `closed` true, the next seq, the same values."""
        self.closed = True
        self.seq += 1
        return self._tick(market, self.minute, now_ms, closed=True)

    def update(self, market: str, now_ms: int, rng: random.Random) -> Tick:
        minute = now_ms - now_ms % MINUTE_MS
        if minute != self.minute:
            self.minute, self.volume = minute, 0.0
            self.open = self.high = self.low = self.close
        self.close *= 1 + rng.gauss(0, 1e-4)
        self.high, self.low = max(self.high, self.close), min(self.low, self.close)
        self.volume += rng.uniform(0.0, 2.0)
        self.seq += 1
        self.closed = False
        return self._tick(market, minute, now_ms)

    def _tick(self, market: str, minute: int, now_ms: int, *, closed: bool = False) -> Tick:
        # received_ts is the send time: clients measure latency from it (the watcher's
        # receive time in a real feed; here the driver is the watcher).
        return Tick(
            market=market,
            minute=minute,
            seq=self.seq,
            exchange_ts=now_ms,
            received_ts=now_ms,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            closed=closed,
        )


async def _drive(
    bootstrap: str,
    markets: list[str],
    rate: Synchronized[float],
    sent: Synchronized[int],
    newest: Shared,
    slot_s: float = SLOT_S,
) -> None:
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap), client_id="bench-driver")
    rng = random.Random(1)
    bars = {market: _Bar() for market in markets}
    topics = {market: Market.parse(market).topic for market in markets}
    keys = {market: market.encode() for market in markets}
    index = {market: i for i, market in enumerate(markets)}

    async def send(market: str, tick: Tick) -> None:
        await producer.send(topics[market], tick.encode(), key=keys[market])
        newest[index[market]] = tick.received_ts
        with sent.get_lock():
            sent.value += 1

    checked = 0  # every bar of a minute before this one is closed

    async def close_ended(now_ms: int) -> None:
        """Close every bar whose minute has ended (the watcher's closing update)."""
        nonlocal checked
        minute = now_ms - now_ms % MINUTE_MS
        if minute > checked:
            for market, bar in bars.items():
                if not bar.closed and bar.minute < minute:
                    await send(market, bar.finish(market, now_ms))
            checked = minute

    await producer.start()
    try:
        started = time.monotonic()
        due = 0.0  # ticks owed since the start
        turn = 0
        slot = 0
        while True:
            slot += 1
            await asyncio.sleep(max(0.0, started + slot * slot_s - time.monotonic()))
            await close_ended(time.time_ns() // 1_000_000)
            # Owed ticks follow the clock; a stall is caught up, but at most one second's worth.
            now_rate = rate.value
            due = min(due + now_rate * slot_s, max(now_rate, now_rate * slot_s))
            while due >= 1.0:
                market = markets[turn % len(markets)]
                turn += 1
                due -= 1.0
                now_ms = time.time_ns() // 1_000_000
                bar = bars[market]
                if not bar.closed and bar.minute < now_ms - now_ms % MINUTE_MS:
                    await send(market, bar.finish(market, now_ms))  # the slot crossed a minute
                await send(market, bar.update(market, now_ms, rng))
    finally:
        await producer.stop()


def run_driver(
    bootstrap: str,
    markets: list[str],
    rate: Synchronized[float],
    sent: Synchronized[int],
    newest: Shared,
    slot_s: float = SLOT_S,
) -> None:  # pragma: no cover - runs in its own process
    """Send `rate.value` ticks/s round robin over `markets` (and each minute's closing updates)
    until the process is terminated."""
    asyncio.run(_drive(bootstrap, markets, rate, sent, newest, slot_s))


async def feed_latency(bootstrap: str, start: float, end: float) -> Counter[int]:
    """Latency (ms buckets) from `received_ts` to a bare consumer, as the gateway's consumer is
    made, of the ticks sent between `start` and `end` (wall-clock seconds): the broker's part."""
    consumer = make_consumer(
        KafkaSettings(bootstrap_servers=bootstrap),
        group_id=None,
        client_id="bench-feed-probe",
        offset_reset="latest",
    )
    consumer.subscribe(pattern=TICK_TOPIC_PATTERN)
    await consumer.start()
    latency: Counter[int] = Counter()
    try:
        while time.time() < end:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            now_ms = time.time() * 1000
            for records in batch.values():
                for record in records:
                    sent_ms = _decode(record.value).received_ts
                    if sent_ms >= start * 1000 and now_ms < end * 1000:
                        latency[int(now_ms - sent_ms)] += 1
    finally:
        await consumer.stop()
    return latency
