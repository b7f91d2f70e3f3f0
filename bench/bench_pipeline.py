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
import contextlib
import gzip
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from tickstream_shared.kafka import ensure_topics
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]
CANDLES = ROOT.parent / "shared" / "data" / "candles"
PAIRS = ["btc", "eth", "ada", "atom", "avax", "doge", "dot", "link", "ltc", "matic"]


async def committed_total(reader: AIOKafkaConsumer, partitions: list[TopicPartition]) -> int:
    """The group's committed offsets summed over `partitions`, in one OffsetFetch request.

    `committed()` asks once per partition (a thousand requests for a thousand markets, which
    would load the broker more than the services do), and the admin client's OffsetFetch
    version is one Tansu answers in a form aiokafka cannot decode; so this uses the consumer's
    own coordinator call, which takes every partition at once (a private aiokafka API).
    """
    offsets = await reader._coordinator.fetch_committed_offsets(partitions)
    return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


@dataclass
class Progress:
    """When a consumer group first committed anything, and when it had committed everything."""

    first_at: float | None = None  # seconds after the watcher started
    first_count: int = 0
    done_at: float | None = None

    def sustained(self, total: int) -> float:
        """Ticks per second between the first commit and the last (group joins excluded)."""
        assert self.first_at is not None and self.done_at is not None
        span = self.done_at - self.first_at
        return (total - self.first_count) / span if span > 0 else float("inf")


async def watch_groups(
    bootstrap: str, topics: list[str], total: int, started: float, alive: Callable[[], bool]
) -> dict[str, Progress] | None:
    """Poll both groups' committed offsets every 50 ms until each has committed `total`."""
    readers = {
        group: AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        for group in ("stats", "alerts")
    }
    progress = {group: Progress() for group in readers}
    wanted = [TopicPartition(topic, 0) for topic in topics]
    for reader in readers.values():
        await reader.start()
    try:
        while any(p.done_at is None for p in progress.values()):
            for group, entry in progress.items():
                if entry.done_at is not None:
                    continue
                count = await committed_total(readers[group], wanted)
                now = time.monotonic() - started
                if count and entry.first_at is None:
                    entry.first_at, entry.first_count = now, count
                if count >= total:
                    entry.done_at = now
            if not alive():
                return None
            if time.monotonic() - started > 900:
                print("timed out after 900 s", file=sys.stderr)
                return None
            await asyncio.sleep(0.05)
        return progress
    finally:
        for reader in readers.values():
            await reader.stop()


SOURCE_DIRS = (
    "shared",
    "services/watcher",
    "services/stats",
    "services/gateway",
    "services/alerts",
)


def _candles_for(markets: list[str], minutes: int, data_dir: Path) -> Path:
    """The shared candles folder, or for more than its 10 pairs a folder of copies (the first
    `minutes` rows of the 10 files under exchange names x1, x2, ...)."""
    if all(m.startswith("binance:") for m in markets):
        return CANDLES
    target = data_dir / "candles"
    target.mkdir()
    for market in markets:
        exchange, pair = market.split(":")
        source = CANDLES / f"binance_{pair}_1m.csv.gz"
        with gzip.open(source, "rt") as handle:
            rows = handle.read().splitlines()[: minutes + 1]
        (target / f"{exchange}_{pair}_1m.csv").write_text("\n".join(rows) + "\n")
    return target


def spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    with (log_dir / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"tickstream_{name}"], env=env, stdout=log, stderr=log
        )


async def groups_joined(bootstrap: str, groups: tuple[str, ...], within: float) -> bool:
    """Wait until each group is Stable with a member; False on timeout."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + within
        waiting = set(groups)
        while waiting and time.monotonic() < deadline:
            for group in sorted(waiting):
                # Tansu's answer for a group still forming cannot always be decoded: ask again.
                with contextlib.suppress(KafkaError, ValueError):
                    response = (await admin.describe_consumer_groups([group]))[0]
                    # (error, group, state, protocol type, protocol, members). Tansu reports
                    # no assignment bytes, so a Stable group with a member is taken as joined.
                    _, _, state, _, _, members, *_ = response.groups[0]
                    if state == "Stable" and members:
                        waiting.discard(group)
            if not waiting:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await admin.close()


def run_once(
    markets: list[str],
    minutes: int,
    code_dir: Path | None,
    *,
    warm: bool,
    profile_dir: Path | None = None,
) -> dict[str, Progress] | None:
    """One benchmark run: each group's progress, None on failure.

    Cold: the consumers start with no tick topic; the watcher creates them, so the time
    includes topic discovery and the group joins (Tansu holds each JoinGroup about 5 s).
    Warm: the topics exist and both groups have joined before the watcher starts, as in a
    running system that receives a burst.

    With `profile_dir`, py-spy samples stats, alerts and the watcher while they run and writes
    collapsed stacks (`<service>.txt`, one line per stack with its sample count) there.
    """
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
                "WATCHER_REPLAY_DIR": str(_candles_for(markets, minutes, data_dir)),
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
            bootstrap = infra.kafka_bootstrap_servers
            if warm:
                asyncio.run(ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), topics))
            try:
                processes += [spawn("stats", env, data_dir), spawn("alerts", env, data_dir)]
                if warm and not asyncio.run(groups_joined(bootstrap, ("stats", "alerts"), 60)):
                    print("the consumer groups did not join within 60 s", file=sys.stderr)
                    return None
                # The watcher's own start (imports, reading the CSVs) is inside the time.
                started = time.monotonic()
                processes.append(spawn("watcher", env, data_dir))
                profilers = _profile(processes, profile_dir) if profile_dir is not None else []
                progress = asyncio.run(
                    watch_groups(
                        bootstrap,
                        topics,
                        total,
                        started,
                        lambda: all(p.poll() is None for p in processes),
                    )
                )
                if progress is None:
                    print("a service exited or the run timed out; logs:", file=sys.stderr)
                    for log in sorted(data_dir.glob("*.log")):
                        print(log.name, log.read_text()[-2000:], file=sys.stderr)
                    return None
                print("   CPU seconds: " + _cpu_seconds(processes))
                for profiler in profilers:
                    profiler.wait(60)
                return progress
            finally:
                # Services stop before the infrastructure they use.
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                for process in processes:
                    process.wait(30)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _cpu_seconds(services: list[subprocess.Popen[bytes]]) -> str:
    """CPU time used so far by each service and by the infrastructure (every other child)."""
    names = dict(zip((p.pid for p in services), ("stats", "alerts", "watcher"), strict=True))
    used: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            name = names.get(child.pid) or child.name()
        except psutil.Error:
            continue
        name = "postgres" if name.startswith("postgres") else name
        used[name] = used.get(name, 0.0) + times.user + times.system
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(used.items()))


def _profile(
    processes: list[subprocess.Popen[bytes]], profile_dir: Path
) -> list[subprocess.Popen[bytes]]:
    profile_dir.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(process.pid),
                "--rate",
                "250",
                "--duration",
                "20",
                "--format",
                "raw",
                "--output",
                str(profile_dir / f"{name}.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, process in zip(("stats", "alerts", "watcher"), processes, strict=True)
    ]


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
    parser.add_argument(
        "--markets",
        type=int,
        default=10,
        help="how many markets; beyond the 10 shared pairs, copies under other exchange names",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per code version")
    parser.add_argument("--baseline-rev", help="git revision to measure side by side")
    parser.add_argument(
        "--start",
        choices=("warm", "cold", "both"),
        default="both",
        help="warm: topics exist and groups joined before the watcher starts; cold: not",
    )
    parser.add_argument(
        "--profile", type=Path, help="folder for py-spy profiles of the services (py-spy needed)"
    )
    args = parser.parse_args()
    if not CANDLES.is_dir():
        print(f"candles not found at {CANDLES}", file=sys.stderr)
        return 2
    markets = [
        f"{'binance' if i < len(PAIRS) else f'x{i // len(PAIRS)}'}:{PAIRS[i % len(PAIRS)]}-usdt"
        for i in range(args.markets)
    ]
    total = len(markets) * args.minutes
    versions: dict[str, Path | None] = {"current": None}
    baseline_tree = None
    if args.baseline_rev:
        baseline_tree = _worktree(args.baseline_rev)
        versions[f"baseline {args.baseline_rev}"] = baseline_tree
    print(f"ticks: {total} ({len(markets)} markets x {args.minutes} minutes of candles)")
    modes = ("warm", "cold") if args.start == "both" else (args.start,)
    runs = [(mode, name) for mode in modes for name in versions]
    whole: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    sustained: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    try:
        for run in range(args.runs):
            for mode, name in runs:
                profile = args.profile / f"{mode}-{name.split()[0]}" if args.profile else None
                progress = run_once(
                    markets,
                    args.minutes,
                    versions[name],
                    warm=mode == "warm",
                    profile_dir=profile,
                )
                if progress is None:
                    return 1
                slowest = max(p.done_at or 0.0 for p in progress.values())
                rate = min(p.sustained(total) for p in progress.values())
                whole[mode, name].append(total / slowest)
                sustained[mode, name].append(rate)
                groups = ", ".join(
                    f"{g} first commit {p.first_at:4.1f} s, all {p.done_at:5.1f} s"
                    for g, p in sorted(progress.items())
                )
                print(
                    f"run {run + 1} {mode} {name:>16}: {groups} -> {total / slowest:6.0f} ticks/s"
                    f" end to end, {rate:6.0f} ticks/s sustained"
                )
    finally:
        if baseline_tree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_tree)],
                check=False,
            )
    print("end to end = ticks / time from the watcher's start until both groups committed all;")
    print("sustained = from a group's first commit to its last, the slower group")
    for mode, name in runs:
        print(
            f"{mode} {name:>16}: median {statistics.median(whole[mode, name]):6.0f} ticks/s end"
            f" to end, {statistics.median(sustained[mode, name]):6.0f} ticks/s sustained"
            f" over {len(whole[mode, name])} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
