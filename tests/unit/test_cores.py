"""Pure cores of the watcher: candle files to bars, and the seeded synthetic market."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_watcher.candles import find_candle_files, merged_candles
from tickstream_watcher.synthetic import SyntheticMarket

T0 = 1_700_000_040_000  # 2023-11-14T22:14:00Z, a whole minute
HEADER = "ts_ms,open,high,low,close,volume\n"


def test_candle_files_merge_by_event_time(tmp_path: Path) -> None:
    """Candle files are found by name and merged by bar time then market, index = row number."""
    with gzip.open(tmp_path / "binance_btc-usdt_1m.csv.gz", "wt") as f:
        f.write(HEADER + f"{T0},1,2,1,1.5,2\n{T0 + MINUTE_MS},1.5,2,1,1,3\n")
    (tmp_path / "kraken_eth-usd_1m.csv").write_text(HEADER + f"{T0},20,21,19,20.5,4\n")
    (tmp_path / "notes.txt").write_text("ignored")
    files = find_candle_files(tmp_path)
    assert [m.id for m in files] == ["binance:btc-usdt", "kraken:eth-usd"]
    merged = [(c.market, c.row_number, c.minute, c.close) for c in merged_candles(files)]
    assert merged == [
        ("binance:btc-usdt", 0, T0, 1.5),
        ("kraken:eth-usd", 0, T0, 20.5),
        ("binance:btc-usdt", 1, T0 + MINUTE_MS, 1.0),
    ]
    assert [c.row_number for c in merged_candles(files, limit=1)] == [0, 0]
    assert list(find_candle_files(tmp_path, ["kraken:eth-usd"])) == [Market("kraken", "eth", "usd")]
    assert [c.quote_volume for c in merged_candles(files)] == [None, None, None]


def test_an_optional_quote_volume_column_is_read_and_checked(tmp_path: Path) -> None:
    """A quote_volume column (any position) gives each bar its value; an empty cell is unknown;
    a bad one costs its row only."""
    rows = [f"3.25,{T0},1,2,1,1.5,2", f",{T0 + MINUTE_MS},1.5,2,1,1,3"]
    rows += [f"-1,{T0 + 2 * MINUTE_MS},1,1,1,1,1", f"x,{T0 + 3 * MINUTE_MS},1,1,1,1,1"]
    rows += [f"0,{T0 + 4 * MINUTE_MS},1,1,1,1,0"]
    (tmp_path / "binance_btc-usdt_1m.csv").write_text("quote_volume," + HEADER + "\n".join(rows))
    candles = list(merged_candles(find_candle_files(tmp_path)))
    assert [(c.row_number, c.volume, c.quote_volume) for c in candles] == [
        (0, 2.0, 3.25),
        (1, 3.0, None),
        (4, 0.0, 0.0),
    ]


def test_synthetic_market_is_seeded() -> None:
    """The same seed and times give the same bars; prices start near the market's real level."""

    def walk(seed: int) -> list[tuple[float, float, float, float, float]]:
        market = SyntheticMarket("binance:btc-usdt", "btc", seed, 0)
        times = range(T0, T0 + 3 * MINUTE_MS, 700)
        ticks = [t for now in times for t in market.update(now, now * 1000)]
        return [(t.open, t.high, t.low, t.close, t.volume) for t in ticks]

    first = walk(1)
    assert first == walk(1)
    assert first != walk(2)
    assert 50_000 < first[0][3] < 80_000
    assert all(low > 0 and volume >= 0 for _, _, low, _, volume in first)


def test_synthetic_quote_volume_is_the_value_of_its_trades() -> None:
    """Each step of a minute trades at the price it reaches: quote volume lies between low x
    volume and high x volume of the bar, grows with it, and is never absent."""
    market = SyntheticMarket("binance:btc-usdt", "btc", 3, 0)
    times = range(T0, T0 + 3 * MINUTE_MS, 700)
    ticks = [t for now in times for t in market.update(now, now * 1000)]
    grew = 0
    for before, after in itertools.pairwise(ticks):
        if before.minute == after.minute:
            assert before.quote_volume is not None and after.quote_volume is not None
            assert after.volume >= before.volume and after.quote_volume >= before.quote_volume
            assert after.high >= before.high and after.low <= before.low
            grew += after.volume > before.volume
    assert grew > 200
    ticks.append(SyntheticMarket("binance:eth-usdt", "eth", 3, 1).backfill_bar(T0, 1, T0))
    for t in ticks:
        assert t.quote_volume is not None
        # Rounding of the sum aside (1e-12), every step traded between the bar's low and high.
        assert t.low * t.volume * (1 - 1e-12) <= t.quote_volume <= t.high * t.volume * (1 + 1e-12)


def _bar(tick: Tick) -> tuple[object, ...]:
    return (tick.minute, tick.open, tick.high, tick.low, tick.close, tick.volume, tick.quote_volume)


def test_a_synthetic_minute_is_the_same_however_and_whenever_it_is_made() -> None:
    """A minute's closed bar is the same backfilled, closed live after any updates, or made by
    a model started later: a restarted watcher replaces no published minute with other values
    (whose alerts would be echoes)."""
    minutes = [T0 + i * MINUTE_MS for i in range(10)]

    def closed_live(step_ms: int, first_ms: int) -> dict[int, tuple[object, ...]]:
        market = SyntheticMarket("binance:btc-usdt", "btc", 3, 0)
        ticks = [
            t
            for now in range(first_ms, T0 + 13 * MINUTE_MS, step_ms)
            for t in market.update(now, now * 1000)
        ]
        return {t.minute: _bar(t) for t in ticks if t.closed}

    def backfilled(first: int) -> dict[int, tuple[object, ...]]:
        market = SyntheticMarket("binance:btc-usdt", "btc", 3, 0)
        return {m: _bar(market.backfill_bar(m, 1, T0)) for m in minutes[first:]}

    every_second = closed_live(1000, T0)
    reference = [every_second[m] for m in minutes]
    assert [closed_live(23_456, T0 + 1234)[m] for m in minutes] == reference
    # Minutes without any update in them are closed when the clock passes them: the same bars.
    assert [closed_live(170_000, T0 + 1)[m] for m in minutes] == reference
    assert list(backfilled(0).values()) == reference
    assert list(backfilled(6).values()) == reference[6:]
    # A different market of the same seed walks differently.
    other = SyntheticMarket("binance:btc-usdt", "btc", 3, 1).backfill_bar(T0, 1, T0)
    assert _bar(other) != reference[0]


@pytest.mark.parametrize("bad", ["nope", ""])
def test_unknown_source_is_rejected(bad: str) -> None:
    """WATCHER_SOURCE must name a real source."""
    from tickstream_shared.settings import ExchangeSettings, WatcherSettings
    from tickstream_watcher.sources import make_source

    with pytest.raises(ValueError, match="WATCHER_SOURCE"):
        make_source(WatcherSettings(source=bad), ExchangeSettings())
