"""Stats across rebalances on real broker, Redis and PostgreSQL: only arrivals are warmed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from tests.conftest import deadline, running_infra, unique_exchange
from tests.integration.test_observability import Samples, get, scrape, value
from tests.integration.test_stats_restart import (
    bar,
    expected_hash,
    first_minute,
    poll_until,
    price,
    produce,
)
from tickstream_shared.kafka import ensure_topics
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import Market, MetricKind, stats_key
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import KafkaSettings

BEFORE = 60  # minutes of each market produced before the rebalance
AFTER = 20  # minutes produced after it, applied to kept or freshly warmed state


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker, Redis and PostgreSQL of its own: the stats group and the clock are shared."""
    with running_infra("tickstream-rebalance-") as running:
        yield running


class Instance:
    """One stats process with its own log and /metrics port."""

    def __init__(self, infra: LocalInfra, log: Path) -> None:
        self.log = log
        self.port = free_port()
        env = {
            **os.environ,
            **infra.environment(),
            "STATS_METRICS_PORT": str(self.port),
            "STATS_BATCH_MAX": "50",
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tickstream_stats"], env=env, stdout=out, stderr=out
            )

    def alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text()

    def warmed(self) -> dict[str, int]:
        """How many times this process warmed each market, from its log."""
        counts: dict[str, int] = {}
        for market_id in re.findall(r"warmed (\S+) with \d+ stored bars", self.log.read_text()):
            counts[market_id] = counts.get(market_id, 0) + 1
        return counts

    async def metrics(self) -> Samples:
        """Its /metrics; empty while its server is not listening yet."""
        self.alive()
        base = f"127.0.0.1:{self.port}"
        status, _ = await get(base, "/livez")
        return await scrape(base) if status else {}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(deadline(30))
        return self.process.returncode


def bars(market: Market, start: int, first: int, last: int) -> list[Tick]:
    """Closed bars of minutes first..last (seq = minute index), prices distinct per market."""
    shift = sum(map(ord, market.base)) % 97
    return [
        bar(market, i, start + i * MINUTE_MS, price(i) + shift, 1.0 + (i + shift) % 5, True)
        for i in range(first, last + 1)
    ]


async def wait_counted(
    client: redis.Redis, markets: list[Market], start: int, last: int, *instances: Instance
) -> None:
    """Until every market's price hash says minute `last` was applied."""
    last_ts = str(bars(markets[0], start, last, last)[0].exchange_ts)

    async def counted() -> bool:
        for instance in instances:
            instance.alive()
        for market in markets:
            if await client.hget(stats_key(market.metric_id("price")), "last_ts") != last_ts:
                return False
        return True

    await poll_until(counted, within=120)


async def assert_exact(client: redis.Redis, markets: list[Market], start: int, last: int) -> None:
    """Every market's price and volume statistics equal the exact ones of minutes 0..last."""
    for market in markets:
        window = bars(market, start, 0, last)
        columns: list[tuple[MetricKind, list[float]]] = [
            ("price", [t.close for t in window]),
            ("volume", [t.volume for t in window]),
        ]
        for kind, values in columns:
            expected = expected_hash(values, kind)
            held = await client.hgetall(stats_key(market.metric_id(kind)))
            assert {k: held.get(k) for k in expected} == expected, (market, kind)


async def test_a_new_topic_warms_only_the_new_market(own_infra: LocalInfra, tmp_path: Path) -> None:
    """A topic created while stats runs: only its market is warmed, the others keep exact state."""
    infra = own_infra
    exchange = unique_exchange()
    old = [Market(exchange, base, "usdt") for base in ("btc", "eth", "sol")]
    new = Market(exchange, "doge", "usdt")
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [m.topic for m in old])
    start = first_minute(BEFORE + AFTER)
    await produce(kafka, [t for m in old for t in bars(m, start, 0, BEFORE - 1)])
    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    stats = Instance(infra, tmp_path / "stats.log")
    try:
        await wait_counted(client, old, start, BEFORE - 1, stats)
        await ensure_topics(kafka, [new.topic])
        await produce(kafka, bars(new, start, 0, BEFORE - 1))
        await wait_counted(client, [new], start, BEFORE - 1, stats)
        # After the rebalance the kept markets go on from the state they held.
        await produce(kafka, [t for m in old for t in bars(m, start, BEFORE, BEFORE + AFTER - 1)])
        await wait_counted(client, old, start, BEFORE + AFTER - 1, stats)
        await assert_exact(client, old, start, BEFORE + AFTER - 1)
        await assert_exact(client, [new], start, BEFORE - 1)
        assert stats.warmed() == {m.id: 1 for m in [*old, new]}
        samples = await stats.metrics()
        assert value(samples, "tickstream_markets_warmed_total") == 4
        kept = value(samples, "tickstream_markets_kept_total")
        assert kept is not None and kept >= len(old), "no rebalance kept the old markets"
        assert value(samples, "tickstream_markets_forgotten_total") == 0
        assert value(samples, "tickstream_markets_arriving") == 0
    finally:
        code = stats.stop()
        await client.aclose()
    assert code == 0, "stats did not stop cleanly"


async def test_a_second_instance_warms_only_the_markets_it_takes(
    own_infra: LocalInfra, tmp_path: Path
) -> None:
    """A second stats joins: the first re-warms nothing, the second warms what moved; exact."""
    infra = own_infra
    exchange = unique_exchange()
    markets = [Market(exchange, base, "usdt") for base in ("a", "b", "c", "d", "e", "f")]
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [m.topic for m in markets])
    start = first_minute(BEFORE + AFTER)
    await produce(kafka, [t for m in markets for t in bars(m, start, 0, BEFORE - 1)])
    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    first = Instance(infra, tmp_path / "first.log")
    second: Instance | None = None
    try:
        await wait_counted(client, markets, start, BEFORE - 1, first)
        second = Instance(infra, tmp_path / "second.log")
        joined = second

        async def settled() -> bool:
            # Round robin over six partitions and two members: three move, three stay.
            first_samples, second_samples = await first.metrics(), await joined.metrics()
            return (
                value(first_samples, "tickstream_markets_forgotten_total") == 3
                and value(second_samples, "tickstream_markets_warmed_total") == 3
                and value(second_samples, "tickstream_markets_arriving") == 0
            )

        await poll_until(settled, within=120)
        later = [t for m in markets for t in bars(m, start, BEFORE, BEFORE + AFTER - 1)]
        await produce(kafka, later)
        await wait_counted(client, markets, start, BEFORE + AFTER - 1, first, second)
        await assert_exact(client, markets, start, BEFORE + AFTER - 1)
        moved = second.warmed()
        assert set(moved.values()) == {1} and len(moved) == 3
        assert first.warmed() == {m.id: 1 for m in markets}, "the first re-warmed a market"
        first_samples = await first.metrics()
        assert value(first_samples, "tickstream_markets_warmed_total") == len(markets)
        kept = value(first_samples, "tickstream_markets_kept_total")
        assert kept is not None and kept >= 3
    finally:
        codes = [first.stop(), second.stop() if second is not None else 0]
        await client.aclose()
    assert codes == [0, 0], "stats did not stop cleanly"
