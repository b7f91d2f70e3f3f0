"""Sustained end-to-end ticks per second through the local stack (broker, Redis, PostgreSQL).

Replays real candles unthrottled through the watcher and times how long the `stats` and
`alerts` consumer groups take to have *committed* every tick, i.e. until every tick is stored in
PostgreSQL, reflected in Redis (stats) and evaluated (alerts). Run:

    .venv/bin/python bench/bench_pipeline.py [--minutes 20160] [--markets 10] [--runs 3]
    .venv/bin/python bench/bench_pipeline.py --baseline-rev 92687a0   # and that commit beside it

With `--baseline-rev`, the same benchmark also runs the services of an earlier commit (checked
out with `git worktree` into a temporary folder and put first on PYTHONPATH), alternating runs,
so both are measured on the same machine in the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from tickstream_shared.local_infra import LocalInfra

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


SOURCE_DIRS = (
    "shared",
    "services/watcher",
    "services/stats",
    "services/gateway",
    "services/alerts",
)


def spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    with (log_dir / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"tickstream_{name}"], env=env, stdout=log, stderr=log
        )


def run_once(markets: list[str], minutes: int, code_dir: Path | None) -> dict[str, float] | None:
    """One benchmark run; seconds until each group committed everything, None on failure."""
    topics = [f"ticks.{m.replace(':', '.')}" for m in markets]
    total = len(markets) * minutes
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
                "WATCHER_REPLAY_LIMIT_MINUTES": str(minutes),
                "WATCHER_REPLAY_SPEED": "0",
                "LOG_LEVEL": "WARNING",
            }
            if code_dir is not None:
                env["PYTHONPATH"] = os.pathsep.join(str(code_dir / d) for d in SOURCE_DIRS)
            init_run = subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", "init"], env=env, check=False
            )
            if init_run.returncode != 0:
                print("init failed", file=sys.stderr)
                return None
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
                    print("a service exited; logs:", file=sys.stderr)
                    for log in sorted(data_dir.glob("*.log")):
                        print(log.name, log.read_text()[-2000:], file=sys.stderr)
                    return None
                if time.monotonic() - started > 900:
                    print("timed out after 900 s", file=sys.stderr)
                    return None
                time.sleep(0.25)
            return done
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)


def _worktree(rev: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="tickstream-baseline-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target), rev],
        check=True,
        capture_output=True,
    )
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=20160, help="candles per market")
    parser.add_argument("--markets", type=int, default=10, help="how many pairs (max 10)")
    parser.add_argument("--runs", type=int, default=1, help="runs per code version")
    parser.add_argument("--baseline-rev", help="git revision to measure side by side")
    args = parser.parse_args()
    if not CANDLES.is_dir():
        print(f"candles not found at {CANDLES}", file=sys.stderr)
        return 2
    markets = [f"binance:{p}-usdt" for p in PAIRS[: args.markets]]
    total = len(markets) * args.minutes
    versions: dict[str, Path | None] = {"current": None}
    baseline_tree = None
    if args.baseline_rev:
        baseline_tree = _worktree(args.baseline_rev)
        versions[f"baseline {args.baseline_rev}"] = baseline_tree
    print(f"ticks: {total} ({len(markets)} markets x {args.minutes} minutes of candles)")
    results: dict[str, list[float]] = {name: [] for name in versions}
    try:
        for run in range(args.runs):
            for name, code_dir in versions.items():
                done = run_once(markets, args.minutes, code_dir)
                if done is None:
                    return 1
                slowest = max(done.values())
                results[name].append(total / slowest)
                print(
                    f"run {run + 1} {name:>18}: "
                    + ", ".join(f"{g} {s:5.1f} s" for g, s in sorted(done.items()))
                    + f" -> {total / slowest:8.0f} ticks/s end to end (both groups committed)"
                )
    finally:
        if baseline_tree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_tree)],
                check=False,
            )
    for name, rates in results.items():
        print(f"{name:>18}: median {statistics.median(rates):8.0f} ticks/s over {len(rates)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
