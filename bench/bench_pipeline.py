"""Sustained end-to-end ticks per second through the local stack (broker, Redis, PostgreSQL).

Replays real candles unthrottled through the watcher and times how long the `stats` and
`alerts` consumer groups take to have *committed* every tick, i.e. until every tick is stored in
PostgreSQL, reflected in Redis (stats) and evaluated (alerts). Run:

    .venv/bin/python bench/bench_pipeline.py [--minutes 20160] [--markets 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from tickstream_shared.bootstrap import init
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
CANDLES = ROOT.parent / "shared" / "data" / "candles"
PAIRS = ["btc", "eth", "ada", "atom", "avax", "doge", "dot", "link", "ltc", "matic"]


async def committed_total(bootstrap: str, group: str, topics: list[str]) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        total = 0
        for topic in topics:
            offset = await consumer.committed(TopicPartition(topic, 0))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


def spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    with (log_dir / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"tickstream_{name}"], env=env, stdout=log, stderr=log
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=20160, help="candles per market")
    parser.add_argument("--markets", type=int, default=10, help="how many pairs (max 10)")
    args = parser.parse_args()
    if not CANDLES.is_dir():
        print(f"candles not found at {CANDLES}", file=sys.stderr)
        return 2
    markets = [f"binance:{p}-usdt" for p in PAIRS[: args.markets]]
    topics = [f"ticks.binance.{p}-usdt" for p in PAIRS[: args.markets]]
    total = len(markets) * args.minutes
    data_dir = Path(tempfile.mkdtemp(prefix="tickstream-bench-"))
    data_dir.chmod(0o755)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with LocalInfra(data_dir) as infra:
            env = {
                **os.environ,
                **infra.environment(),
                "WATCHER_SOURCE": "replay",
                "WATCHER_REPLAY_DIR": str(CANDLES),
                "WATCHER_REPLAY_MARKETS": ",".join(markets),
                "WATCHER_REPLAY_LIMIT_MINUTES": str(args.minutes),
                "WATCHER_REPLAY_SPEED": "0",
                "LOG_LEVEL": "WARNING",
            }
            asyncio.run(init(ServiceSettings.from_env(env)))
            processes += [spawn("stats", env, data_dir), spawn("alerts", env, data_dir)]
            # The groups can only join once the watcher has created the tick topics, so the
            # measured time includes joining: a conservative, whole-pipeline figure.
            started = time.monotonic()
            processes.append(spawn("watcher", env, data_dir))
            done: dict[str, float] = {}
            while len(done) < 2:
                for group in ("stats", "alerts"):
                    if group in done:
                        continue
                    count = asyncio.run(
                        committed_total(infra.kafka_bootstrap_servers, group, topics)
                    )
                    if count >= total:
                        done[group] = time.monotonic() - started
                if any(p.poll() is not None for p in processes):
                    print("a service exited; see logs in", data_dir, file=sys.stderr)
                    return 1
                if time.monotonic() - started > 900:
                    print("timed out after 900 s", file=sys.stderr)
                    return 1
                time.sleep(0.25)
            print(f"ticks: {total} ({len(markets)} markets x {args.minutes} minutes of candles)")
            for group, seconds in done.items():
                print(
                    f"{group:>6}: all ticks committed after {seconds:6.1f} s "
                    f"-> {total / seconds:8.0f} ticks/s end to end"
                )
            print(f"event time replayed: {args.minutes / 1440:.1f} days per market")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
