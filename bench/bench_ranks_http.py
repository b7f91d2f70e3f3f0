"""`GET /api/ranks` latency at 50 connections with N markets ranked, driven by wrk.

Starts the real local stack (LocalInfra: broker, redis-server, PostgreSQL) and the gateway
process (`python -m tickstream_gateway`, its own uvicorn options); writes N markets' stats
hashes and rank sets (price, volume, turnover) into Redis the way stats writes them
(`MetricBook`, `write_stats`), waits until the gateway ranks them all, then runs the issue's
command for each path:

    wrk -t2 -c50 -d10s --latency -H 'Accept-Encoding: gzip' 'http://127.0.0.1:PORT/api/ranks?kind=price'

With `--moving` a writer rewrites every market's stats each second meanwhile (every ranking
changes each second, so every board and its gzipped bodies are rebuilt once a second, as in
a busy market); without it the rankings hold still. `--py-spy FILE` records the gateway
with py-spy (`--format raw`) during the counted wrk run of the first path. wrk takes about
one of the 2 cores; the gateway is one Python process on the other.

    .venv/bin/python bench/bench_ranks_http.py --markets 1000
    .venv/bin/python bench/bench_ranks_http.py --markets 1000 --moving --py-spy /tmp/ranks.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import redis.asyncio as redis

from fanout_http import parse_wrk
from fanout_stack import CpuMeter, Stack, http_get, machine_load, outside_note
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_stats.book import MetricBook
from tickstream_stats.store import write_stats

FIRST_MINUTE = 28_333_334 * MINUTE_MS  # a whole minute in 2023
PATHS = ("/api/ranks?kind=price", "/api/ranks?kind=turnover&quote=usdt&limit=20")


def _ticks(markets: int, minutes: int, rng: random.Random, first: int) -> list[Tick]:
    ticks = []
    for i in range(markets):
        market = Market("binance" if i % 2 else "okx", f"r{i:04d}", "usdt")
        price = rng.uniform(0.01, 50_000.0)
        for index in range(minutes):
            price *= 1 + rng.gauss(0, 1e-3)
            minute = first + index * MINUTE_MS
            end = minute + MINUTE_MS - 1
            volume = rng.uniform(1.0, 100.0)
            ticks.append(
                Tick(
                    market.id,
                    minute,
                    first // MINUTE_MS + index,
                    end,
                    end,
                    price,
                    price,
                    price,
                    price,
                    volume,
                    quote_volume=volume * price,
                )
            )
    return ticks


async def seed(client: redis.Redis, book: MetricBook, ticks: list[Tick]) -> int:
    """Apply `ticks` to `book` and write the updates as stats does; the price metrics written."""
    updates = book.apply(ticks)
    for start in range(0, len(updates), 2000):
        await write_stats(client, updates[start : start + 2000])
    return len({u.metric_id for u in updates if u.kind == "price"})


async def keep_moving(client: redis.Redis, book: MetricBook, markets: int, minutes: int) -> None:
    """Each second, one more minute for every market: every ranking changes each second."""
    rng = random.Random(5)
    minute = FIRST_MINUTE + minutes * MINUTE_MS
    while True:
        started = time.monotonic()
        await seed(client, book, _ticks(markets, 1, rng, minute))
        minute += MINUTE_MS
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def wrk(port: int, path: str, seconds: float) -> str:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t2",
        "-c50",
        f"-d{seconds:g}s",
        "--latency",
        "-H",
        "Accept-Encoding: gzip",
        f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return out.decode()


async def measure(args: argparse.Namespace) -> int:
    minutes = 30
    with Stack() as stack:
        assert stack.infra is not None
        server = stack.start_gateway()
        client = redis.Redis.from_url(stack.infra.redis_url, decode_responses=True)
        book = MetricBook(window_minutes=1440)
        seeded = await seed(
            client, book, _ticks(args.markets, minutes, random.Random(3), FIRST_MINUTE)
        )
        if not await server.healthy(90):
            print(f"the gateway is not healthy; see {server.log}", file=sys.stderr)
            return 1
        print(await machine_load(), flush=True)
        deadline = time.monotonic() + 20
        while True:
            status, body = await http_get("127.0.0.1", server.port, PATHS[0])
            total = json.loads(body).get("total") if status == 200 else None
            if total == seeded or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if total != seeded:
            print(f"the gateway ranks {total} of {seeded} markets", file=sys.stderr)
            return 1
        moving = None
        if args.moving:
            moving = asyncio.create_task(keep_moving(client, book, args.markets, minutes))
        try:
            for number, path in enumerate(PATHS):
                _, plain = await http_get("127.0.0.1", server.port, path)
                await wrk(server.port, path, 2)  # warm-up, not counted
                meter = CpuMeter({server.process.pid: server.name})
                meter.take()
                spy = None
                if args.py_spy and number == 0:
                    spy = await asyncio.create_subprocess_exec(
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(server.process.pid),
                        "--format",
                        "raw",
                        "-o",
                        args.py_spy,
                        "-d",
                        str(int(args.seconds)),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                output = await wrk(server.port, path, args.seconds)
                spent = meter.take()
                if spy is not None:
                    await spy.wait()
                note = outside_note(spent, args.seconds)
                if note:
                    print(note)
                result = parse_wrk(output)
                cpu = spent.get(server.name, 0.0)
                done = result.rate * args.seconds
                print(
                    f"{args.markets:,} markets{' (moving)' if moving else ''}: GET {path}"
                    f" ({len(plain):,} bytes uncompressed): {result.rate:,.0f} req/s;"
                    f" p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms,"
                    f" max {result.max_ms:.1f} ms; {result.errors} errors;"
                    f" gateway CPU {cpu / args.seconds:.0%} of a core"
                    f" ({cpu / max(1.0, done) * 1e3:.3f} ms/request)",
                    flush=True,
                )
        finally:
            if moving is not None:
                moving.cancel()
                await asyncio.gather(moving, return_exceptions=True)
            await client.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--moving", action="store_true", help="rewrite every market each second")
    parser.add_argument("--py-spy", metavar="FILE", help="py-spy raw profile of the first path")
    return asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
