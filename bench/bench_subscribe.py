"""How long 1,000 WebSocket clients subscribing to a market at once wait for its history.

Stores a day of minute bars for a few markets in PostgreSQL (the local stack from wheels),
starts the real gateway process and publishes one more update per market through the broker
(stored first, as stats would, so the gateway may keep each market's history in memory). Load
generators in separate processes open the connections, then all subscribe to one market at the
same moment; each connection's time from that moment to its `history` frame is recorded.
Rounds: `cold` (the market's first subscribers: one shared PostgreSQL read), `warm` (the same
market again: from memory), each on a fresh market. Run:

    .venv/bin/python bench/bench_subscribe.py [--clients 1000] [--rounds 3]
    .venv/bin/python bench/bench_subscribe.py --baseline-rev 47a5b41   # and that commit beside it
    .venv/bin/python bench/bench_subscribe.py --deflate   # permessage-deflate on both sides

With `--baseline-rev` the gateway of that commit (extracted with `git archive`, put first on
PYTHONPATH) is measured the same way after the current one. Without `--deflate` the clients
do not offer permessage-deflate (so neither version compresses); with it they do and the
gateway is started with GATEWAY_WS_COMPRESSION=true.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect

from bench_rss import day_of_bars, publish, store
from tickstream_shared.kafka import ensure_topics
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import Market
from tickstream_shared.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (
    "shared",
    "services/watcher",
    "services/stats",
    "services/alerts",
    "services/gateway",
)


# ---------------------------------------------------------------- load generator process


async def _client(url: str, count: int, compression: str | None) -> None:
    """Open `count` connections, say `ready`, then per `go <market> <t0>` line subscribe all."""
    connections: list[ClientConnection] = []
    for _ in range(count):
        connections.append(await connect(url, compression=compression, max_size=None))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def history(ws: ClientConnection, market: str, t0: float) -> tuple[float, int]:
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        while True:
            frame = await ws.recv()
            if frame.startswith('{"type":"history"'):
                return time.monotonic() - t0, len(frame)

    while line := (await reader.readline()).decode().split():
        if line[0] != "go":
            break
        market, t0 = line[1], float(line[2])
        results = await asyncio.gather(*(history(ws, market, t0) for ws in connections))
        print(json.dumps([r[0] for r in results] + [results[0][1]]), flush=True)
    for ws in connections:
        await ws.close()


# ---------------------------------------------------------------- the bench


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def _metric(base: str, name: str) -> float | None:
    for line in _get(f"{base}/metrics")[1].splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def _wait(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def _measure(
    name: str, env: dict[str, str], args: argparse.Namespace, markets: list[Market]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**env, "GATEWAY_PORT": str(port), "GATEWAY_HISTORY_MINUTES": str(args.minutes)}
    env["GATEWAY_WS_COMPRESSION"] = "true" if args.deflate else "false"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "tickstream_gateway"], env=env, stdout=subprocess.DEVNULL
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        _wait(lambda: _get(f"{base}/readyz")[0] == 200, 60, "the gateway")
        decoded = _metric(base, "tickstream_records_decoded_total") or 0.0
        live = [day_of_bars(m, args.minutes, args.rng)[-1] for m in markets]
        asyncio.run(store(env["DATABASE_URL"], live))  # as stats would, before the feed has it
        asyncio.run(publish(env["KAFKA_BOOTSTRAP_SERVERS"], live))
        _wait(
            lambda: (
                (_metric(base, "tickstream_records_decoded_total") or 0.0) >= decoded + len(markets)
            ),
            60,
            "the gateway's feed to deliver one update per market",
        )
        per_process = -(-args.clients // args.processes)
        for i in range(args.processes):
            count = min(per_process, args.clients - i * per_process)
            command = [sys.executable, __file__, "--client", f"ws://127.0.0.1:{port}/ws"]
            command += ["--count", str(count)] + (["--deflate"] if args.deflate else [])
            clients.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for client in clients:
            assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        cpu_before = sum(psutil.Process(gateway.pid).cpu_times()[:2])
        for round_index in range(args.rounds):
            market = markets[round_index % len(markets)].id
            for label in ("cold", "warm"):
                reads = _metric(base, "tickstream_gateway_history_reads_total")
                t0 = time.monotonic()
                for client in clients:
                    assert client.stdin is not None
                    client.stdin.write(f"go {market} {t0}\n")
                    client.stdin.flush()
                times: list[float] = []
                size = 0
                for client in clients:
                    assert client.stdout is not None
                    *got, size = json.loads(client.stdout.readline())
                    times += got
                times.sort()
                after = _metric(base, "tickstream_gateway_history_reads_total")
                reads_note = (
                    "" if reads is None or after is None else f", {after - reads:.0f} reads"
                )
                print(
                    f"{name:>18} {label}: {len(times)} clients, history of {size:,} bytes: all"
                    f" within {times[-1]:.2f} s, p50 {statistics.median(times):.2f} s, p99"
                    f" {times[int(0.99 * (len(times) - 1))]:.2f} s{reads_note}",
                    flush=True,
                )
        cpu = sum(psutil.Process(gateway.pid).cpu_times()[:2]) - cpu_before
        rss = psutil.Process(gateway.pid).memory_info().rss / 2**20
        print(f"{name:>18}: gateway CPU {cpu:.1f} s over the rounds, RSS {rss:.0f} MiB")
    finally:
        for client in clients:
            if client.stdin is not None:
                client.stdin.close()
        for client in clients:
            client.wait(30)
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="load generator processes")
    parser.add_argument("--rounds", type=int, default=3, help="markets subscribed in turn")
    parser.add_argument("--minutes", type=int, default=1440, help="history minutes (and stored)")
    parser.add_argument("--deflate", action="store_true", help="compress (permessage-deflate)")
    parser.add_argument("--baseline-rev", help="git revision to measure after the current code")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.count, "deflate" if args.deflate else None))
        return 0
    args.rng = random.Random(1)
    versions: dict[str, Path | None] = {"current": None}
    data_dir = Path(tempfile.mkdtemp(prefix="tickstream-subscribe-"))
    data_dir.chmod(0o755)
    try:
        if args.baseline_rev:
            tree = data_dir / "baseline"
            tree.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline_rev],
                check=True,
                capture_output=True,
            )
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            versions[f"baseline {args.baseline_rev}"] = tree
        with LocalInfra(data_dir / "infra") as infra:
            env = {**os.environ, **infra.environment(), "LOG_LEVEL": "WARNING"}
            subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", "init"], env=env, check=True
            )
            for name, tree in versions.items():
                # Fresh markets for each version: every cold round is a market's first subscribe.
                prefix = "cur" if tree is None else "base"
                markets = [Market(f"{prefix}{i}", "btc", "usdt") for i in range(args.rounds)]
                stored = [
                    bar
                    for market in markets
                    for bar in day_of_bars(market, args.minutes, args.rng)[:-1]
                ]
                asyncio.run(store(infra.database_url, stored))
                asyncio.run(
                    ensure_topics(
                        KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
                        [m.topic for m in markets],
                    )
                )
                version_env = dict(env)
                if tree is not None:
                    version_env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in SOURCE_DIRS)
                _measure(name, version_env, args, markets)
        return 0
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
