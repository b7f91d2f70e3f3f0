"""The whole stack against a local exchange with N markets: how long until every market's 24 h is
stored and ranked, what the stack costs in steady state, how fast rank snapshots are served and
what a dashboard loads. Run:

    .venv/bin/python bench/bench_markets.py --markets 100,1000,2000

Per N, one run: the local infrastructure (broker, Redis, PostgreSQL), bench/market_exchange.py
in its own process (Binance's formats, N markets, one update every 2 s each), then the watcher
(live source, `binance:*-*`), stats, alerts and the gateway as in `make run`. It prints

- backfill: seconds from the watcher's start until every market has its last 1,440 closed
  minutes in PostgreSQL and a price and volume window of 1,440 minutes in Redis, with both
  rankings holding every market (and how many REST requests the exchange answered);
- steady state (`--steady-s`, after the backfill): CPU % of one core per process and in total,
  and RSS per process;
- `/api/ranks` at 50 connections (wrk, `--wrk-s` seconds): requests/s, p50 and p99;
- the dashboard (Playwright with Debian's chromium when installed): bytes loaded until the page
  is idle, then bytes per second received over `--dashboard-s` seconds (HTTP and WebSocket).

Numbers are for this machine with nothing else running; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from tickstream_shared.local_infra import LocalInfra, die_with_parent, free_port, stop_process

BENCH_DIR = Path(__file__).resolve().parent
M = 60_000
WINDOW = 1440
SERVICES = ("watcher", "stats", "alerts", "gateway")


@dataclass
class Result:
    markets: int
    backfill_s: float | None = None
    rest_requests: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core
    rss_mib: dict[str, float] = field(default_factory=dict)
    wrk: str = ""
    dashboard: str = ""


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # die_with_parent: a bench stopped by a signal leaves no service spinning behind it.
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )


def process_name(process: psutil.Process) -> str:
    """The stack part a process belongs to: a service, broker, redis or postgres."""
    cmdline = " ".join(process.cmdline())
    for service in SERVICES:
        if f"tickstream_{service}" in cmdline:
            return service
    name = process.name()
    if "postgres" in name or "postgres" in cmdline:
        return "postgres"
    if "redis" in name:
        return "redis"
    if "tansu" in name or "tansu" in cmdline:
        return "broker"
    if "market_exchange" in cmdline:
        return "exchange"
    return name


def usage() -> dict[str, tuple[float, int]]:
    """(CPU seconds, RSS bytes) per stack part, summed over its processes."""
    totals: dict[str, tuple[float, int]] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name = process_name(child)
            times = child.cpu_times()
            rss = child.memory_info().rss
        except psutil.Error:
            continue
        cpu, mem = totals.get(name, (0.0, 0))
        totals[name] = (cpu + times.user + times.system, mem + rss)
    return totals


async def backfilled(pg: asyncpg.Connection, redis: aioredis.Redis, ids: list[str]) -> str | None:
    """None once every market's 24 h is stored and ranked, else what is still missing."""
    current = time.time_ns() // 1_000_000 // M * M
    rows = await pg.fetch(
        "SELECT market, count(*) AS n FROM bars WHERE minute >= $1 AND minute < $2"
        " AND closed GROUP BY market",
        current - WINDOW * M,
        current - M,
    )
    # The minute before the current one may not be closed yet: 1,439 of 1,440 counts as stored.
    stored = sum(1 for row in rows if row["n"] >= WINDOW - 2)
    pipe = redis.pipeline(transaction=False)
    for market in ids:
        pipe.hget(f"tickstream:stats:{market}:price", "count")
        pipe.hget(f"tickstream:stats:{market}:volume", "count")
    counts = await pipe.execute()
    windows = sum(1 for count in counts if count is not None and int(count) >= WINDOW - 2)
    ranked = [await redis.zcard(key) for key in await redis.keys("tickstream:rank:*")]
    complete = len(ids) * 2
    if stored == len(ids) and windows == complete and ranked and min(ranked) == len(ids):
        return None
    return f"stored {stored}/{len(ids)}, windows {windows}/{complete}, ranked {ranked}"


async def wait_backfill(
    env: dict[str, str], ids: list[str], within: float, alive: object
) -> float | None:
    started = time.monotonic()
    pg = await asyncpg.connect(env["DATABASE_URL"])
    redis = aioredis.from_url(env["REDIS_URL"], decode_responses=True)
    try:
        last_print = 0.0
        while time.monotonic() - started < within:
            assert callable(alive)
            if not alive():
                print("   a service exited")
                return None
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                missing = await backfilled(pg, redis, ids)
                if missing is None:
                    return time.monotonic() - started
                if time.monotonic() - last_print > 30:
                    print(f"   {time.monotonic() - started:5.0f} s: {missing}", flush=True)
                    last_print = time.monotonic()
            await asyncio.sleep(5)
        print(f"   not complete within {within:.0f} s: {missing}")
        return None
    finally:
        await pg.close()
        await redis.aclose()


def steady(seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    before, began = usage(), time.monotonic()
    time.sleep(seconds)
    after, spent = usage(), time.monotonic() - began
    cpu = {
        name: 100 * (after[name][0] - before.get(name, (after[name][0], 0))[0]) / spent
        for name in after
    }
    rss = {name: after[name][1] / 2**20 for name in after}
    return cpu, rss


def profile(
    services: list[subprocess.Popen[bytes]], args: argparse.Namespace
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each service for the steady window: collapsed stacks in `--profile`."""
    target = Path(args.profile)
    target.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    names = ("stats", "alerts", "gateway", "watcher")
    return [
        subprocess.Popen(
            [
                *(str(py_spy), "record", "--pid", str(process.pid), "--rate", "100"),
                *("--duration", str(int(args.steady_s)), "--format", "raw", "--nonblocking"),
                *("--output", str(target / f"{name}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, process in zip(names, services, strict=True)
    ]


def run_wrk(url: str, seconds: int) -> str:
    if shutil.which("wrk") is None:
        return "wrk not installed (apt-get install wrk)"
    out = subprocess.run(
        ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "-H", "Accept-Encoding: gzip", url],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not (rate and p50 and p99):
        return "wrk failed: " + out[-300:]
    bad = f", {errors.group(1)} non-2xx" if errors else ""
    return f"{float(rate.group(1)):.0f} req/s, p50 {p50.group(1)}, p99 {p99.group(1)}{bad}"


def dashboard_bytes(url: str, seconds: float) -> str:
    """Bytes the dashboard loads until idle, then receives per second (HTTP bodies as sent, i.e.
    compressed when the server compresses, plus WebSocket frames)."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright  # type: ignore[import-not-found]
    except ImportError:
        return "playwright not installed (pip install playwright; apt-get install chromium)"
    if chromium is None:
        return "chromium not installed (apt-get install chromium)"
    received = [0]

    def on_response(response: object) -> None:
        with contextlib.suppress(Exception):
            sizes = response.request.sizes()  # type: ignore[attr-defined]
            received[0] += sizes["responseBodySize"] + sizes["responseHeadersSize"]

    def on_ws(ws: object) -> None:
        def frame(payload: str | bytes) -> None:
            received[0] += len(payload.encode() if isinstance(payload, str) else payload)

        ws.on("framereceived", frame)  # type: ignore[attr-defined]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("response", on_response)
        page.on("websocket", on_ws)
        page.goto(url, wait_until="networkidle")
        page.wait_for_timeout(3000)
        at_load = received[0]
        page.wait_for_timeout(seconds * 1000)
        after = received[0] - at_load
        browser.close()
    return f"{at_load / 1024:.0f} KB at load, {after / seconds / 1024:.1f} KB/s after"


def run(count: int, args: argparse.Namespace) -> Result:
    result = Result(count)
    data_dir = Path(tempfile.mkdtemp(prefix="tickstream-markets-"))
    data_dir.chmod(0o755)
    processes: list[subprocess.Popen[bytes]] = []
    rest_port, ws_port, gateway_port = free_port(), free_port(), free_port()
    try:
        with LocalInfra(data_dir / "infra") as infra:
            env = {
                **os.environ,
                **infra.environment(),
                "LOG_LEVEL": "INFO",
                "WATCHER_SOURCE": "live",
                "WATCHER_MARKETS": "binance:*-*",
                "WATCHER_MAX_MARKETS": str(max(5000, count)),
                "BINANCE_WS_URL": f"ws://127.0.0.1:{ws_port}",
                "BINANCE_REST_URL": f"http://127.0.0.1:{rest_port}",
                "GATEWAY_PORT": str(gateway_port),
                **dict(item.split("=", 1) for item in args.env),
            }
            subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", "init"], env=env, check=True
            )
            exchange = spawn(
                [
                    *(sys.executable, str(BENCH_DIR / "market_exchange.py")),
                    *("--markets", str(count), "--rest-port", str(rest_port)),
                    *("--ws-port", str(ws_port)),
                ],
                env,
                data_dir / "exchange.log",
            )
            processes.append(exchange)
            time.sleep(2)
            for service in ("stats", "alerts", "gateway"):
                processes.append(
                    spawn(
                        [sys.executable, "-m", f"tickstream_{service}"],
                        env,
                        data_dir / f"{service}.log",
                    )
                )
            time.sleep(3)
            started = time.monotonic()
            processes.append(
                spawn([sys.executable, "-m", "tickstream_watcher"], env, data_dir / "watcher.log")
            )
            from market_exchange import market_names  # the same names the exchange lists

            ids = [f"binance:{base}-{quote}" for _, base, quote in market_names(count)]
            result.backfill_s = asyncio.run(
                wait_backfill(
                    env, ids, args.timeout_s, lambda: all(p.poll() is None for p in processes)
                )
            )
            if result.backfill_s is not None:
                print(f"   backfill complete after {result.backfill_s:.0f} s", flush=True)
            _ = started
            time.sleep(args.settle_s)  # what the backfill left in flight is not steady state
            profilers = profile(processes[-4:], args) if args.profile else []
            result.cpu, result.rss_mib = steady(args.steady_s)
            for profiler in profilers:
                profiler.wait(60)
            ranks = f"http://127.0.0.1:{gateway_port}/api/ranks?kind=price"
            result.wrk = run_wrk(ranks, args.wrk_s)
            result.dashboard = dashboard_bytes(
                f"http://127.0.0.1:{gateway_port}/", args.dashboard_s
            )
            for log in sorted(data_dir.glob("*.log")):
                text = log.read_text(errors="replace")
                errors = sum(1 for line in text.splitlines() if " ERROR " in line)
                if errors:
                    print(f"   {log.name}: {errors} ERROR lines")
            if args.keep_logs:
                target = Path(args.keep_logs) / f"n{count}"
                target.mkdir(parents=True, exist_ok=True)
                for log in data_dir.glob("*.log"):
                    shutil.copy(log, target / log.name)
            for process in reversed(processes):
                stop_process("process", process, signal.SIGTERM, 30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def report(result: Result) -> None:
    backfill = "not complete" if result.backfill_s is None else f"{result.backfill_s:.0f} s"
    parts = [p for p in ("broker", "redis", "postgres", *SERVICES) if p in result.cpu]
    total = sum(result.cpu[p] for p in parts)
    print(f"== {result.markets} markets")
    print(f"   backfill (24 h stored and ranked): {backfill}")
    print(
        "   steady CPU % of one core: "
        + ", ".join(f"{p} {result.cpu[p]:.1f}" for p in parts)
        + f"; stack total {total:.1f}"
    )
    if "exchange" in result.cpu:
        print(f"   (the local exchange itself: {result.cpu['exchange']:.1f} %, not counted)")
    print("   RSS MiB: " + ", ".join(f"{p} {result.rss_mib[p]:.0f}" for p in parts))
    print(f"   /api/ranks?kind=price at 50 connections: {result.wrk}")
    print(f"   dashboard: {result.dashboard}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markets", default="100,1000,2000", help="comma-separated counts")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--settle-s", type=float, default=30, help="wait after the backfill")
    parser.add_argument("--steady-s", type=float, default=60)
    parser.add_argument("--profile", default="", help="py-spy each service into this folder")
    parser.add_argument("--wrk-s", type=int, default=10)
    parser.add_argument("--dashboard-s", type=float, default=30)
    parser.add_argument("--env", action="append", default=[], help="NAME=value for every service")
    parser.add_argument("--keep-logs", default="", help="copy the services' logs to this folder")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH_DIR))
    for count in (int(n) for n in args.markets.split(",")):
        report(run(count, args))


if __name__ == "__main__":
    main()
