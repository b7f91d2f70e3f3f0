"""`bench_fanout --http`: rank metrics seeded as stats writes them, and a closed-loop load
generator comparing GET /api/ranks with a trivial route of the same gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any

import redis.asyncio as redis

from fanout_stack import (
    CpuMeter,
    Server,
    Stack,
    http_get,
    machine_load,
    median,
    outside_note,
    percentile,
    read_response,
)
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_stats.book import MetricBook
from tickstream_stats.store import write_stats

FIRST_MINUTE = 28_333_334 * MINUTE_MS  # a whole minute in 2023
RANKS_PATH = "/api/ranks?kind=price"
_SPAWN = multiprocessing.get_context("spawn")


async def seed_ranks(redis_url: str, markets: int, minutes: int = 60) -> int:
    """Store `markets` markets' stats and rank sets the way stats does (MetricBook, then
    write_stats), each with `minutes` closed minutes of a random walk ending at one clock, so
    none is stale; returns the number of price metrics written."""
    rng = random.Random(3)
    book = MetricBook(window_minutes=1440)
    ticks = []
    for market in (Market("bench", f"r{i:04d}", "usd") for i in range(markets)):
        price = rng.uniform(0.01, 50_000.0)
        for index in range(minutes):
            price *= 1 + rng.gauss(0, 1e-3)
            minute = FIRST_MINUTE + index * MINUTE_MS
            end = minute + MINUTE_MS - 1
            ticks.append(
                Tick(market.id, minute, index, end, end, price, price, price, price, 1.0 + index)
            )
    updates = book.apply(ticks)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for start in range(0, len(updates), 2000):
            await write_stats(client, updates[start : start + 2000])
    finally:
        await client.aclose()
    return sum(1 for update in updates if update.kind == "price")


@dataclass
class HttpTally:
    """Requests completed inside the window; latency bucketed by 0.1 ms."""

    done: int = 0
    errors: int = 0  # a status other than 200, or a dropped connection
    latency_tenth_ms: Counter[int] = field(default_factory=Counter)


async def _connection(
    host: str, port: int, path: str, window: tuple[float, float], tally: HttpTally
) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    start, end = window
    while time.time() < end:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.errors += 1
            await asyncio.sleep(0.1)
            continue
        try:
            while True:
                sent = time.perf_counter()
                writer.write(request)
                status, _ = await read_response(reader)
                now = time.time()
                if now >= end:
                    return
                if now >= start:
                    tally.done += 1
                    tally.errors += status != 200
                    tally.latency_tenth_ms[int((time.perf_counter() - sent) * 10_000)] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            tally.errors += time.time() >= start
        finally:
            writer.close()


async def _load(
    host: str, port: int, path: str, connections: int, window: tuple[float, float]
) -> HttpTally:
    tally = HttpTally()
    await asyncio.gather(
        *(_connection(host, port, path, window, tally) for _ in range(connections))
    )
    return tally


def run_http_load(
    host: str,
    port: int,
    path: str,
    connections: int,
    window: tuple[float, float],
    reports: Queue[HttpTally],
) -> None:  # pragma: no cover - runs in its own process
    """Keep `connections` keep-alive connections each sending GET `path` back to back until the
    window ends; report the requests completed inside the window (wall-clock times)."""
    reports.put(asyncio.run(_load(host, port, path, connections, window)))


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    """A wrk duration ("812.00us", "1.23ms", "2.01s") in ms."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


@dataclass
class WrkResult:
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


def parse_wrk(output: str) -> WrkResult:
    """Requests/s, latency p50/p99/max, errors (socket errors, non-2xx/3xx) of `wrk --latency`."""

    def field(pattern: str) -> str:
        match = re.search(pattern, output)
        if match is None:
            raise ValueError(f"wrk printed no {pattern!r}:\n{output}")
        return match[1]

    rate = float(field(r"Requests/sec:\s+([0-9.]+)"))
    p50 = _wrk_ms(field(r"\s50%\s+(\S+)"))
    p99 = _wrk_ms(field(r"\s99%\s+(\S+)"))
    latency = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", output)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        rate,
        p50,
        p99,
        _wrk_ms(latency[1]) if latency else 0.0,
        errors + (int(non_2xx[1]) if non_2xx else 0),
    )


async def wrk_phase(
    server: Server, path: str, args: argparse.Namespace, roles: dict[int, str]
) -> tuple[WrkResult, float]:
    """wrk with `--connections` connections and `--http-workers` threads on `path` for
    `--http-duration` s (after a `--http-warmup` s run that is not counted); (result, server
    CPU seconds during the counted run)."""
    url = f"http://127.0.0.1:{server.port}{path}"

    async def wrk(seconds: float) -> str:
        process = await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{args.http_workers}",
            f"-c{args.connections}",
            f"-d{seconds:g}s",
            "--latency",
            url,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        return out.decode()

    if args.http_warmup > 0:
        await wrk(args.http_warmup)
    meter = CpuMeter(roles)
    meter.take()
    output = await wrk(args.http_duration)
    spent = meter.take()
    warning = outside_note(spent, args.http_duration)
    if warning:
        print(warning)
    return parse_wrk(output), spent.get(server.name, 0.0)


async def http_phase(
    server: Server, path: str, args: argparse.Namespace, roles: dict[int, str]
) -> tuple[HttpTally, float]:
    """`--connections` closed-loop connections on `path`; (tally, server CPU seconds)."""
    start = time.time() + 2.0 + args.http_warmup  # 2 s for the processes to start
    window = (start, start + args.http_duration)
    reports: Any = _SPAWN.Queue()
    shares = [len(range(i, args.connections, args.http_workers)) for i in range(args.http_workers)]
    workers = [
        _SPAWN.Process(
            target=run_http_load,
            args=("127.0.0.1", server.port, path, share, window, reports),
            daemon=True,
        )
        for share in shares
        if share
    ]
    for worker in workers:
        worker.start()
    meter = CpuMeter(roles)
    await asyncio.sleep(max(0.0, start - time.time()))
    meter.take()
    await asyncio.sleep(max(0.0, window[1] - time.time()))
    spent = meter.take()
    cpu = spent.get(server.name, 0.0)
    warning = outside_note(spent, args.http_duration)
    if warning:
        print(warning)
    loop = asyncio.get_running_loop()
    total = HttpTally()
    for _ in workers:
        tally: HttpTally = await loop.run_in_executor(None, reports.get, True, 120)
        total.done += tally.done
        total.errors += tally.errors
        total.latency_tenth_ms += tally.latency_tenth_ms
    for worker in workers:
        worker.join(20)
    return total, cpu


async def run_http(args: argparse.Namespace, stack: Stack) -> int:
    assert stack.infra is not None
    server = stack.start_gateway()
    if not await server.healthy(90):
        print(f"the gateway is not healthy; see {server.log}", file=sys.stderr)
        return 1
    print(await machine_load(), flush=True)
    seeded = await seed_ranks(stack.infra.redis_url, args.metrics)
    # Answered from the snapshot the rank poller stores each GATEWAY_RANK_INTERVAL_MS: wait
    # until it holds the seeded metrics.
    deadline = time.monotonic() + 15
    while True:
        status, body = await http_get("127.0.0.1", server.port, RANKS_PATH)
        ranked = json.loads(body).get("total") if status == 200 else None
        if ranked == seeded or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    print(
        f"{seeded} price metrics (and {seeded} volume) written as stats writes them;"
        f" GET {RANKS_PATH}: {status}, total {ranked}, {len(body):,} bytes."
        f" {args.connections} keep-alive connections from {args.http_workers} processes, closed"
        f" loop, {args.http_duration:g} s per path after {args.http_warmup:g} s warm-up;"
        f" {os.cpu_count()} cores shared with the load generators; the gateway's rank poller"
        f" reads every ranking each second meanwhile"
    )
    if ranked != seeded:
        print("the gateway does not rank every seeded metric", file=sys.stderr)
        return 1
    roles = {server.process.pid: server.name}
    paths = (args.trivial_path, RANKS_PATH)
    rates: dict[str, list[float]] = {path: [] for path in paths}
    p99s: dict[str, list[float]] = {path: [] for path in paths}
    for run in range(args.rounds):
        for path in paths if run % 2 == 0 else paths[::-1]:
            if args.wrk:
                result, cpu = await wrk_phase(server, path, args, roles)
            else:
                tally, cpu = await http_phase(server, path, args, roles)
                lat = tally.latency_tenth_ms
                result = WrkResult(
                    tally.done / args.http_duration,
                    (percentile(lat, 0.5) or 0) / 10,
                    (percentile(lat, 0.99) or 0) / 10,
                    max(lat, default=0) / 10,
                    tally.errors,
                )
            rates[path].append(result.rate)
            p99s[path].append(result.p99_ms)
            done = result.rate * args.http_duration
            print(
                f"GET {path:<24} {result.rate:9,.1f} req/s; latency p50 {result.p50_ms:.1f} ms,"
                f" p99 {result.p99_ms:.1f} ms, max {result.max_ms:.1f} ms;"
                f" {result.errors} errors; gateway CPU {cpu:.1f} s"
                f" ({cpu / max(1.0, done) * 1e3:.2f} ms/request)",
                flush=True,
            )
    trivial, ranks = median(rates[args.trivial_path]), median(rates[RANKS_PATH])
    ratio = ranks / trivial if trivial else 0.0
    ranks_p99 = median(p99s[RANKS_PATH])
    print(f"ranks / {args.trivial_path} req/s: {ratio:.4f} (median over {args.rounds} rounds)")
    print("issue 8 targets (tickstream):")
    print(
        f"  {'met    ' if ratio >= 0.5 else 'NOT met'}  ranks >= 0.5 x trivial route: {ratio:.4f}x"
    )
    met = "met    " if ranks_p99 <= 50 else "NOT met"
    print(f"  {met}  ranks p99 <= 50 ms: {ranks_p99:.1f} ms")
    return 0
