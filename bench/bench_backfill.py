"""The live source's backfill of N Binance markets against a local fake: time and requests.

Runs LiveSource in process (no broker: the ticks are taken and counted as the publisher would
take them) against tests/e2e/many_markets.py's Binance listing N USDT markets, each with 24 h
of one-minute candles, and prints how long until every market's day was published, the REST
requests per market, and how often the connection was made. Optionally the connection is
dropped after `--drop-after` candle requests (a reconnect mid-backfill). Run:

    .venv/bin/python bench/bench_backfill.py [--markets 1000] [--drop-after 500]

At Binance's pace (10 requests/s, 2 per market) 1,000 markets take about 200 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Binance names up to 1,024 streams in one connection's URL (about 20 KB at 1,000 markets);
# the local server must read request lines that long (websockets reads this at import).
os.environ.setdefault("WEBSOCKETS_MAX_LINE_LENGTH", "65536")

from tests.e2e.many_markets import DAY_MINUTES, ManyBinance, symbols
from tests.integration.test_live_source import exchange_urls, source_of


async def bench(markets: int, drop_after: int | None) -> None:
    fake = ManyBinance(symbols(markets), drop_after=drop_after)
    async with exchange_urls(fake) as env:
        source = source_of(
            env,
            WATCHER_MARKETS="binance:*-usdt",
            WATCHER_MAX_MARKETS=str(markets),
            WATCHER_BACKFILL_MINUTES=str(DAY_MINUTES),
            WATCHER_RECONCILE_AFTER_MS="0",  # only the backfill's requests are counted
        )
        await source.start()
        queue = source.backfills["binance"]
        started = time.monotonic()
        ticks = closed = 0
        async with contextlib.aclosing(source.chunks()) as chunks:
            async for chunk in chunks:
                ticks += len(chunk)
                closed += sum(tick.closed for tick in chunk)
                if queue.done == markets and not queue.pending:
                    break
        elapsed = time.monotonic() - started
    requests = sum(fake.klines.values())
    print(f"markets                 {markets}")
    print(f"all days published in   {elapsed:.1f} s")
    print(f"candle requests         {requests} ({requests / markets:.2f} per market,")
    print(f"                        at most {max(fake.klines.values())} for one market)")
    print(f"connections made        {len(fake.connections)}")
    print(f"minutes backfilled      {queue.minutes} ({queue.minutes / markets:.0f} per market)")
    print(f"ticks taken             {ticks} ({closed} closed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=200)
    parser.add_argument("--drop-after", type=int, default=None)
    args = parser.parse_args()
    asyncio.run(bench(args.markets, args.drop_after))


if __name__ == "__main__":
    main()
