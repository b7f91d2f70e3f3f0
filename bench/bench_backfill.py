"""The live source's backfill of N Binance or OKX markets against a local fake: time, requests.

Runs LiveSource in process (no broker: the ticks are taken and counted as the publisher would
take them) against tests/e2e/many_markets.py's Binance (or OKX) listing N USDT markets, each
with 24 h of one-minute candles, and prints how long until every market's day was published,
the REST requests per market (per endpoint for OKX), and how often a connection was made.
Optionally Binance's connection is dropped after `--drop-after` candle requests (a reconnect
mid-backfill). Run:

    .venv/bin/python bench/bench_backfill.py [--markets 1000] [--drop-after 500]
    .venv/bin/python bench/bench_backfill.py --exchange okx --markets 1000

At Binance's pace (10 requests/s, 2 per market) 1,000 markets take about 200 s; at OKX's
(candles 20/s, 5 per market, beside one history-candles request at 10/s) about 250 s.
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

from tests.e2e.many_markets import DAY_MINUTES, ManyBinance, ManyOkx, okx_symbols, symbols
from tests.integration.test_live_source import exchange_urls, source_of


async def bench(exchange: str, markets: int, drop_after: int | None) -> None:
    fake: ManyBinance | ManyOkx
    if exchange == "okx":
        fake = ManyOkx(okx_symbols(markets))
    else:
        fake = ManyBinance(symbols(markets), drop_after=drop_after)
    async with exchange_urls(fake) as env:
        source = source_of(
            env,
            WATCHER_MARKETS=f"{exchange}:*-usdt",
            WATCHER_MAX_MARKETS=str(markets),
            WATCHER_BACKFILL_MINUTES=str(DAY_MINUTES),
            WATCHER_RECONCILE_AFTER_MS="0",  # only the backfill's requests are counted
        )
        await source.start()
        queue = source.backfills[exchange]
        started = time.monotonic()
        ticks = closed = 0
        async with contextlib.aclosing(source.chunks()) as chunks:
            async for chunk in chunks:
                ticks += len(chunk)
                closed += sum(tick.closed for tick in chunk)
                if queue.done == markets and not queue.pending:
                    break
        elapsed = time.monotonic() - started
    print(f"exchange                {exchange}")
    print(f"markets                 {markets}")
    print(f"all days published in   {elapsed:.1f} s")
    if isinstance(fake, ManyOkx):
        for endpoint, label in (("candles", "candles"), ("history-candles", "history")):
            counts = [n for (path, _), n in fake.asked.items() if path == endpoint]
            total = sum(counts)
            print(
                f"{label + ' requests':<24}{total} ({total / markets:.2f} per market,"
                f" at most {max(counts, default=0)} for one market)"
            )
    else:
        requests = sum(fake.klines.values())
        print(f"candle requests         {requests} ({requests / markets:.2f} per market,")
        print(f"                        at most {max(fake.klines.values())} for one market)")
    print(f"connections made        {len(fake.connections)}")
    print(f"minutes backfilled      {queue.minutes} ({queue.minutes / markets:.0f} per market)")
    print(f"ticks taken             {ticks} ({closed} closed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchange", choices=("binance", "okx"), default="binance")
    parser.add_argument("--markets", type=int, default=200)
    parser.add_argument("--drop-after", type=int, default=None, help="Binance only")
    args = parser.parse_args()
    if args.drop_after is not None and args.exchange != "binance":
        parser.error("--drop-after is for Binance only")
    asyncio.run(bench(args.exchange, args.markets, args.drop_after))


if __name__ == "__main__":
    main()
