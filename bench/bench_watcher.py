"""Watcher publish throughput: candles replayed unthrottled through the publisher into the broker.

Starts the local stack (LocalInfra), replays N markets x M minutes of the shared candles with
the real ReplaySource (CSV parsing included) and publishes every bar through the real
TickPublisher until the broker has acknowledged all of them (idempotent, acks=all). With
`--path send` (or `both`), the same replay also goes through the previous publisher, one
`await producer.send()` per tick, as a baseline. More than 10 markets reuse the 10 files under
other exchange names. `--shape live` instead hands over one synthetic update per market at a
time, as the synthetic source does every WATCHER_TICK_INTERVAL_MS (unpaced here): the
small-batch regime. Run:

    .venv/bin/python bench/bench_watcher.py [--markets 10] [--minutes 20160] [--path both]
    .venv/bin/python bench/bench_watcher.py --shape live --markets 1000 --minutes 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market, market_of
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import KafkaSettings, WatcherSettings
from tickstream_watcher.publisher import TickPublisher
from tickstream_watcher.sources import ReplaySource
from tickstream_watcher.synthetic import SyntheticMarket

ROOT = Path(__file__).resolve().parents[1]
CANDLES = ROOT.parent / "shared" / "data" / "candles"


class Publisher(Protocol):
    published: int

    async def publish(self, ticks: Sequence[Tick]) -> None: ...

    async def flush(self) -> None: ...


class PerSendPublisher:
    """The watcher's previous publish path: one `await producer.send()` per tick."""

    def __init__(self, producer: Any, max_in_flight: int) -> None:
        self._producer = producer
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: set[asyncio.Future[Any]] = set()
        self._failure: BaseException | None = None
        self.published = 0

    async def publish(self, ticks: Sequence[Tick]) -> None:
        for tick in ticks:
            if self._failure is not None:
                raise self._failure
            await self._slots.acquire()
            market = market_of(tick.market)
            delivery = await self._producer.send(
                market.topic,
                value=tick.encode(),
                key=market.id.encode(),
                timestamp_ms=tick.exchange_ts,
            )
            self._pending.add(delivery)
            delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Future[Any]) -> None:
        self._pending.discard(delivery)
        self._slots.release()
        error = delivery.exception()
        if error is not None:
            self._failure = self._failure or error
        else:
            self.published += 1

    async def flush(self) -> None:
        await self._producer.flush()
        if self._pending:
            await asyncio.wait(set(self._pending))
        if self._failure is not None:
            raise self._failure


class NullPublisher:
    """Publishes nothing: the rate of the source alone (CSV parsing, merge, Tick creation)."""

    published = 0

    async def publish(self, ticks: Sequence[Tick]) -> None:
        for tick in ticks:
            tick.encode()
        self.published += len(ticks)

    async def flush(self) -> None:
        return None


def candle_folder(markets: int, folder: Path, exchange: str) -> None:
    """`markets` candle files under `exchange`, linked to the shared ones (reused past 10)."""
    files = sorted(CANDLES.glob("binance_*_1m.csv*"))
    for i in range(markets):
        source = files[i % len(files)]
        pair = source.name.split("_")[1]
        suffix = "".join(source.suffixes)
        round_ = i // len(files)
        name = f"{exchange}{round_ if round_ else ''}_{pair}_1m{suffix}"
        (folder / name).symlink_to(source)


async def live_rounds(markets: list[Market], rounds: int) -> AsyncIterator[list[Tick]]:
    """`rounds` lists of one synthetic update per market, 50 ms of wall time apart."""
    models = [SyntheticMarket(m.id, m.base, 1, i) for i, m in enumerate(markets)]
    now = time.time_ns() // 1_000_000 - rounds * 50
    for _ in range(rounds):
        now += 50
        yield [tick for model in models for tick in model.update(now, now * 1000)]


async def run_path(
    path: str, args: argparse.Namespace, bootstrap: str, folder: Path
) -> tuple[int, float, float]:
    """Publish through one path; returns (ticks acknowledged, wall seconds, CPU seconds)."""
    settings = WatcherSettings(
        source="replay", replay_dir=str(folder), replay_limit_minutes=args.minutes, replay_speed=0
    )
    source = ReplaySource(settings)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    await ensure_topics(kafka, [m.topic for m in source.markets])
    producer = make_producer(kafka, client_id=f"bench-{path}")
    await producer.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            publisher: Publisher
            if path == "batch":
                publisher = await stack.enter_async_context(TickPublisher(producer, args.in_flight))
            elif path == "send":
                publisher = PerSendPublisher(producer, args.in_flight)
            else:
                publisher = NullPublisher()
            if args.shape == "live":
                chunks = live_rounds(source.markets, args.minutes)
            else:
                chunks = source.chunks()
            started, cpu = time.monotonic(), time.process_time()
            async for chunk in chunks:
                await publisher.publish(chunk)
            await publisher.flush()
            return publisher.published, time.monotonic() - started, time.process_time() - cpu
    finally:
        await producer.stop()


def bench(args: argparse.Namespace, work: Path) -> None:
    paths = {"both": ["send", "batch"], "all": ["source", "send", "batch"]}.get(
        args.path, [args.path]
    )
    what = "updates, one per market per publish" if args.shape == "live" else "minutes of candles"
    print(f"{args.markets} markets x {args.minutes} {what}, WATCHER_MAX_IN_FLIGHT={args.in_flight}")
    for round_ in range(args.rounds):
        for path in paths:
            # A fresh broker for every run: the broker slows down as it holds more topics, so
            # runs sharing one would favour whichever ran first.
            run_dir = work / f"{path}{round_}"
            (run_dir / "candles").mkdir(parents=True)
            run_dir.chmod(0o755)
            candle_folder(args.markets, run_dir / "candles", exchange="bench")
            with LocalInfra(run_dir / "infra") as infra:
                ticks, wall, cpu = asyncio.run(
                    run_path(path, args, infra.kafka_bootstrap_servers, run_dir / "candles")
                )
            print(
                f"{path:>6}: {ticks} ticks in {wall:6.2f} s -> {ticks / wall:8.0f} ticks/s"
                f" (watcher CPU {cpu:5.2f} s, {cpu / ticks * 1e6:5.1f} us/tick)",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=10, help="markets replayed")
    parser.add_argument("--minutes", type=int, default=20160, help="bars per market")
    parser.add_argument(
        "--shape",
        choices=["replay", "live"],
        default="replay",
        help="replay: candles in chunks of 2000; live: one update per market per publish",
    )
    parser.add_argument(
        "--path",
        choices=["batch", "send", "source", "both", "all"],
        default="both",
        help="batch: TickPublisher; send: one producer.send() per tick; source: no broker",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every path this often")
    parser.add_argument("--in-flight", type=int, default=WatcherSettings().max_in_flight)
    args = parser.parse_args()
    if not CANDLES.is_dir():
        print(f"candles not found at {CANDLES}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tickstream-bench-watcher-"))
    work.chmod(0o755)
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"pid {os.getpid()}; machine: {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
