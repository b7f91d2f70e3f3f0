"""Five minutes of the live source against local Binance, Kraken and Coinbase that lie at random
times and markets: at the end every stored minute equals the exchanges' ground truth, and the
watcher's counters match what was injected."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import serve

from tests.conftest import make_data_dir
from tests.e2e.exchange_fakes import (
    final_bars,
    free_port,
    read_all,
    read_topic,
    rest_server,
    topic_of,
)
from tests.e2e.harness import Services
from tests.e2e.soak_fakes import (
    Injections,
    M,
    SoakBinance,
    SoakCoinbase,
    SoakExchange,
    SoakKraken,
    bar_values,
    now_ms,
)
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

SOAK_S = float(os.environ.get("TICKSTREAM_SOAK_S", "300"))
HISTORY = 15  # minutes before the start whose stored bars are checked too (backfilled)
MARKETS = {
    "binance": {"BTCUSDT": 30_000.0, "ETHUSDT": 2_000.0, "SOLUSDT": 150.0},
    "kraken": {"BTC/USD": 30_100.0, "ETH/USD": 2_010.0},
    "coinbase": {"BTC-USD": 30_050.0, "ETH-USD": 2_005.0},
}
MARKET_IDS = {
    "binance": {
        "BTCUSDT": "binance:btc-usdt",
        "ETHUSDT": "binance:eth-usdt",
        "SOLUSDT": "binance:sol-usdt",
    },
    "kraken": {"BTC/USD": "kraken:btc-usd", "ETH/USD": "kraken:eth-usd"},
    "coinbase": {"BTC-USD": "coinbase:btc-usd", "ETH-USD": "coinbase:eth-usd"},
}


@contextlib.asynccontextmanager
async def _watcher(
    infra: LocalInfra, fakes: list[SoakExchange], **settings: str
) -> AsyncIterator[Services]:
    """The real watcher process (live source) against every fake, each on its own ports."""
    data_dir = make_data_dir("tickstream-soak-")
    async with contextlib.AsyncExitStack() as stack:
        env = {**os.environ, **infra.environment(), "WATCHER_SOURCE": "live", **settings}
        for fake in fakes:
            rest = await stack.enter_async_context(rest_server(fake.route))
            ws = await stack.enter_async_context(serve(fake.ws, "127.0.0.1", 0))
            prefix = fake.name.upper()
            env[f"{prefix}_WS_URL"] = f"ws://127.0.0.1:{ws.sockets[0].getsockname()[1]}"
            env[f"{prefix}_REST_URL"] = rest
        services = Services(env, data_dir)
        services.start("watcher")
        try:
            yield services
            services.assert_running()
        finally:
            codes = await asyncio.to_thread(services.stop_all)
            log = (data_dir / "watcher.log").read_text(errors="replace")
            if sys.exc_info()[0] is not None:
                print("watcher log, end:\n" + "\n".join(log.splitlines()[-80:]))
            shutil.rmtree(data_dir, ignore_errors=True)
    assert codes == {"watcher": 0}, codes


def _scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(("tickstream_live_", "tickstream_feed_")) and "exchange=" in line:
            name, value = line.rsplit(" ", 1)
            exchange = name.split('exchange="')[1].split('"')[0]
            values[(name.split("{")[0], exchange)] = float(value)
    return values


async def test_five_minutes_of_lies_leave_every_stored_minute_equal_to_the_truth(
    infra: LocalInfra,
) -> None:
    """Late final candles, frames dated ahead, implausible values, bad REST rows, a silent market
    per candle exchange, trade gaps (a whole minute among them) and malformed frames, at random:
    every stored minute equals the exchange's, and every lie is counted where it belongs."""
    seed = int(os.environ.get("TICKSTREAM_SOAK_SEED", random.randrange(1 << 30)))
    print(f"soak seed {seed} (TICKSTREAM_SOAK_SEED to repeat)")
    start = now_ms()
    lies = {
        name: Injections(seed + i, start, SOAK_S)
        for i, name in enumerate(("binance", "kraken", "coinbase"))
    }
    fakes: list[SoakExchange] = [
        SoakBinance(MARKETS["binance"], lies["binance"]),
        SoakKraken(MARKETS["kraken"], lies["kraken"]),
        SoakCoinbase(MARKETS["coinbase"], lies["coinbase"]),
    ]
    port = free_port()
    markets = [mid for ids in MARKET_IDS.values() for mid in ids.values()]
    async with _watcher(
        infra,
        fakes,
        WATCHER_MARKETS=",".join(markets),
        WATCHER_BACKFILL_MINUTES=str(HISTORY + 5),
        WATCHER_RECONCILE_AFTER_MS="5000",
        WATCHER_RECONCILE_SETTLE_MS="2000",
        WATCHER_MARKET_SILENCE_MS="10000",
        WATCHER_METRICS_PORT=str(port),
    ) as services:
        await asyncio.sleep(SOAK_S)  # the fakes lie on their schedules meanwhile
        services.assert_running()
        end = now_ms()
        last = end - end % M - M  # the newest minute closed when the lies stopped
        first = start - start % M - HISTORY * M

        def truth_of(fake: SoakExchange, symbol: str) -> dict[int, tuple[float, ...]]:
            return {m: bar_values(fake.truth(symbol, m)) for m in range(first, last + 1, M)}

        async def converged(fake: SoakExchange, symbol: str) -> list[Tick]:
            truth = truth_of(fake, symbol)

            def equal(ticks: list[Tick]) -> bool:
                stored = final_bars(ticks)
                got = {m: _values(stored[m]) for m in truth if m in stored}
                return got == truth

            market_id = MARKET_IDS[fake.name][symbol]
            return await read_topic(
                infra.kafka_bootstrap_servers, topic_of(market_id), equal, within=150
            )

        for fake in fakes:
            for symbol in fake.symbols:
                await converged(fake, symbol)
        for fake in fakes:
            fake.freeze()
        await asyncio.sleep(3)  # what was sent before is counted by now
        counters = await asyncio.to_thread(_scrape, port)
        injected = {name: Counter(lie.done) for name, lie in lies.items()}
    for fake in fakes:
        for symbol in fake.symbols:
            ticks = await read_all(
                infra.kafka_bootstrap_servers, topic_of(MARKET_IDS[fake.name][symbol])
            )
            stored = final_bars(ticks)
            truth = truth_of(fake, symbol)
            assert {m: _values(stored[m]) for m in truth} == truth, (fake.name, symbol, seed)
            level = fake.levels[symbol]
            assert max(t.high for t in ticks) < 2 * level, f"implausible value published {seed}"
            # Event time never runs ahead of the watcher's clock: the shared clock cannot jump.
            assert all(t.exchange_ts <= t.received_ts for t in ticks)
            seqs = [t.seq for t in ticks]
            assert seqs == sorted(set(seqs))
    _assert_counted(counters, injected, seed)


def _values(tick: Tick) -> tuple[float, ...]:
    return (tick.open, tick.high, tick.low, tick.close, tick.volume)


def _assert_counted(
    counters: dict[tuple[str, str], float], lies: dict[str, Counter[str]], seed: int
) -> None:
    def count(name: str, exchange: str) -> float:
        return counters.get((f"tickstream_{name}", exchange), 0.0)

    for exchange, done in lies.items():
        why = f"{exchange}: injected {dict(done)}, seed {seed}"
        assert done["ahead"] == 2 and done["implausible"] == 2 and done["malformed"] == 3, why
        assert count("live_ahead_total", exchange) == done["ahead"], why
        assert count("live_implausible_total", exchange) == done["implausible"], why
        # A bad row is served when its minute is first asked for, which for the last minutes
        # may come after the counters are read: at least one, and counted as served.
        assert count("live_bad_rest_rows_total", exchange) == done["bad_rest_row"] >= 1, why
        assert count("feed_bad_frames_total", exchange) == done["malformed"], why
        assert count("live_stale_detected_total", exchange) == 1, why
        # Each late final word and each mispriced minute is corrected; a silent market's
        # partial minutes may add corrections by reconciliation: at least as many as those.
        corrections = done["late_final"] + done["mispriced"]
        assert count("live_corrected_total", exchange) >= corrections, why
        assert count("live_reconciled_total", exchange) > 0, why
        if exchange == "coinbase":
            # Trades skipped: 2 within a minute, a whole minute's 5, and the silent market's
            # (which may overlap the whole minute).
            assert count("live_trade_gaps_total", exchange) == done["skipped_trade"] >= 7, why
            # The implausible trade took the id of the next real trade, which came after it.
            assert count("live_duplicate_trades_total", exchange) == done["implausible"], why
        else:
            assert done["late_final"] == 2, why
        assert count("live_implausible_dropped_total", exchange) == 0, why
