"""Tick driver for bench_fanout: a steady rate of bar updates straight into the tick topics."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized

import msgspec

from tickstream_shared.kafka import make_consumer, make_producer
from tickstream_shared.naming import TICK_TOPIC_PATTERN, Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import KafkaSettings

# The driver sends in slots of this length: rate x SLOT_S ticks per slot, on absolute deadlines.
SLOT_S = 0.01
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

    def update(self, market: str, now_ms: int, rng: random.Random) -> Tick:
        minute = now_ms - now_ms % MINUTE_MS
        if minute != self.minute:
            self.minute, self.volume = minute, 0.0
            self.open = self.high = self.low = self.close
        self.close *= 1 + rng.gauss(0, 1e-4)
        self.high, self.low = max(self.high, self.close), min(self.low, self.close)
        self.volume += rng.uniform(0.0, 2.0)
        self.seq += 1
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
        )


async def _drive(bootstrap: str, markets: list[str], rate: float, sent: Synchronized[int]) -> None:
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap), client_id="bench-driver")
    rng = random.Random(1)
    bars = {market: _Bar() for market in markets}
    topics = {market: Market.parse(market).topic for market in markets}
    keys = {market: market.encode() for market in markets}
    await producer.start()
    try:
        started = time.monotonic()
        due = 0.0  # ticks owed since the start
        turn = 0
        slot = 0
        while True:
            slot += 1
            await asyncio.sleep(max(0.0, started + slot * SLOT_S - time.monotonic()))
            # Owed ticks follow the clock; a stall is caught up, but at most one second's worth.
            due = min(due + rate * SLOT_S, rate)
            while due >= 1.0:
                market = markets[turn % len(markets)]
                turn += 1
                due -= 1.0
                tick = bars[market].update(market, time.time_ns() // 1_000_000, rng)
                await producer.send(topics[market], tick.encode(), key=keys[market])
                with sent.get_lock():
                    sent.value += 1
    finally:
        await producer.stop()


def run_driver(
    bootstrap: str, markets: list[str], rate: float, sent: Synchronized[int]
) -> None:  # pragma: no cover - runs in its own process
    """Send `rate` ticks/s round robin over `markets` until the process is terminated."""
    asyncio.run(_drive(bootstrap, markets, rate, sent))


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
