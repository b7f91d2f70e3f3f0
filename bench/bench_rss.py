"""Resident memory of the real stats and alerts processes holding 1,000 markets x 24h of minutes.

Stores a full day of minute bars for N markets in PostgreSQL (random walks, COPY), creates
their N tick topics, starts the real `stats` and `alerts` services and publishes one more
closed minute for every market through the broker. Stats warms every market's 1,440-minute
window from PostgreSQL when it is assigned the topics; alerts warms each market's hour at its
first update. When both groups have committed the new minute of every market, the bench reads
each process's RSS and peak RSS from /proc, and how long each step took. Run:

    .venv/bin/python bench/bench_rss.py [--markets 1000] [--minutes 1440]
    .venv/bin/python bench/bench_rss.py --markets 10     # the same processes with few markets
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as redis

from bench_pipeline import spawn, watch_groups
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import METRICS_KEY, Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import DatabaseSettings, KafkaSettings

MIB = 1024 * 1024
FIRST_MINUTE = 28_333_334 * MINUTE_MS  # 2023-11-14, a whole minute


def day_of_bars(market: Market, minutes: int, rng: random.Random) -> list[Tick]:
    """`minutes + 1` closed bars of a random walk: the stored day and the live minute after it."""
    price = rng.uniform(0.01, 50_000.0)
    bars = []
    for index in range(minutes + 1):
        price *= 1 + rng.gauss(0, 1e-3)
        minute = FIRST_MINUTE + index * MINUTE_MS
        end = minute + MINUTE_MS
        volume = rng.uniform(0.0, 100.0)
        bars.append(Tick(market.id, minute, index, end, end, price, price, price, price, volume))
    return bars


async def store(database_url: str, bars: list[Tick]) -> None:
    pool = await db.create_pool(DatabaseSettings(url=database_url))
    try:
        for start in range(0, len(bars), 50_000):
            await db.store_bars(pool, bars[start : start + 50_000])
    finally:
        await pool.close()


async def publish(bootstrap: str, bars: list[Tick]) -> None:
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap), client_id="bench")
    await producer.start()
    try:
        for bar in bars:
            market = Market.parse(bar.market)
            await producer.send(market.topic, bar.encode(), key=bar.market.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_for_metrics(redis_url: str, count: int, within: float) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await client.scard(METRICS_KEY) >= count:
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await client.aclose()


def memory(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if "kB" in line}
    return fields["VmRSS"] / MIB, fields["VmHWM"] / MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=1440)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    markets = [Market(f"x{i // 100}", f"c{i % 100}", "usdt") for i in range(args.markets)]
    stored: list[Tick] = []
    live: list[Tick] = []
    for market in markets:
        bars = day_of_bars(market, args.minutes, rng)
        stored += bars[:-1]
        live.append(bars[-1])
    data_dir = Path(tempfile.mkdtemp(prefix="tickstream-rss-"))
    data_dir.chmod(0o755)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with LocalInfra(data_dir / "infra") as infra:
            env = {**os.environ, **infra.environment(), "LOG_LEVEL": "WARNING"}
            bootstrap = infra.kafka_bootstrap_servers
            subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", "init"], env=env, check=True
            )
            started = time.monotonic()
            asyncio.run(store(infra.database_url, stored))
            asyncio.run(
                ensure_topics(
                    KafkaSettings(bootstrap_servers=bootstrap), [m.topic for m in markets]
                )
            )
            print(
                f"{len(stored):,} bars of {len(markets):,} markets stored and their topics created"
                f" in {time.monotonic() - started:.1f} s"
            )
            try:
                processes += [spawn("stats", env, data_dir), spawn("alerts", env, data_dir)]
                started = time.monotonic()
                if not asyncio.run(wait_for_metrics(infra.redis_url, 2 * len(markets), 600)):
                    print("stats did not warm every market within 600 s", file=sys.stderr)
                    return 1
                print(
                    f"stats warmed {len(markets):,} markets in {time.monotonic() - started:.1f} s"
                )
                started = time.monotonic()
                asyncio.run(publish(bootstrap, live))
                progress = asyncio.run(
                    watch_groups(
                        bootstrap,
                        [m.topic for m in markets],
                        len(markets),
                        started,
                        lambda: all(p.poll() is None for p in processes),
                    )
                )
                if progress is None:
                    print("a service exited or the run timed out; logs:", file=sys.stderr)
                    for log in sorted(data_dir.glob("*.log")):
                        print(log.name, log.read_text()[-2000:], file=sys.stderr)
                    return 1
                slowest = max(p.done_at or 0.0 for p in progress.values())
                print(
                    f"one more minute of every market published and committed by stats and"
                    f" alerts (alerts warming each market's hour) in {slowest:.1f} s"
                )
                for name, process in zip(("stats", "alerts"), processes, strict=True):
                    rss, peak = memory(process.pid)
                    print(f"{name:>7}: RSS {rss:6.1f} MiB (peak {peak:6.1f} MiB)")
                return 0
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                for process in processes:
                    try:
                        process.wait(60)
                    except subprocess.TimeoutExpired:
                        process.kill()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
