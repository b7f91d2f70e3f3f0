"""Pure cores around the maths: candle reading, the stats book and the spike detector."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tickstream_alerts.detector import SpikeDetector
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import AlertsSettings
from tickstream_stats.book import MetricBook
from tickstream_watcher.candles import find_candle_files, merged_candles
from tickstream_watcher.synthetic import SyntheticMarket


def tick(seq: int, ts: int, price: float = 10.0, volume: float = 1.0) -> Tick:
    return Tick("binance", "btc", "usdt", seq, ts, ts, price, volume)


def test_book_skips_redelivered_and_out_of_order_ticks() -> None:
    """A tick at or before the last applied (time, seq) of its market is counted and skipped."""
    book = MetricBook(span_ms=10_000)
    updates = book.apply([tick(0, 1000, 10.0), tick(1, 2000, 14.0)])
    assert {u.metric_id for u in updates} == {"binance:btc-usdt:price", "binance:btc-usdt:volume"}
    assert book.apply([tick(1, 2000, 99.0), tick(0, 1500, 99.0)]) == []
    assert book.skipped_stale == 2
    price = book.apply([tick(2, 3000, 12.0)])[0]
    assert price.stats.count == 3 and price.stats.mean == 12.0
    assert price.last_value == 12.0 and price.last_ts == 3000


def test_book_window_is_event_time() -> None:
    """Values older than the span (by exchange time) leave the window."""
    book = MetricBook(span_ms=1000)
    book.apply([tick(0, 0, 5.0)])
    price = book.apply([tick(1, 1000, 7.0)])[0]
    assert price.stats.count == 1 and price.stats.std == 0.0 and price.stats.mean == 7.0


def test_detector_raises_once_per_tick() -> None:
    """A spike above 3x the trailing mean raises one alert with a stable id."""
    detector = SpikeDetector(AlertsSettings(factor=3.0, window_seconds=60, min_samples=3))
    history = [tick(i, i * 1000, volume=10.0) for i in range(5)]
    assert detector.observe(history) == []
    spike = tick(5, 5000, volume=31.0)
    (alert,) = detector.observe([spike])
    assert alert.alert_id == "binance:btc-usdt:volume@5000#5"
    assert (alert.value, alert.mean, alert.samples) == (31.0, 10.0, 5)
    assert detector.observe([spike]) == []  # re-delivered: never a second alert


def test_detector_warm_history_raises_nothing() -> None:
    """Warm-up feeds history without alerts, then evaluation continues from it."""
    detector = SpikeDetector(AlertsSettings(factor=3.0, window_seconds=60, min_samples=3))
    market = Market("binance", "btc", "usdt")
    detector.warm(market, [tick(i, i * 1000, volume=100.0 if i == 3 else 10.0) for i in range(4)])
    assert market in detector
    assert len(detector.observe([tick(4, 4000, volume=200.0)])) == 1


def test_candle_files_merge_by_event_time(tmp_path: Path) -> None:
    """Candle files are found by name and merged in close-time order, seq = row number."""
    header = "ts_ms,open,high,low,close,volume\n"
    with gzip.open(tmp_path / "binance_btc-usdt_1m.csv.gz", "wt") as f:
        f.write(header + "0,1,1,1,10.5,2\n60000,1,1,1,11.5,3\n")
    (tmp_path / "kraken_eth-usd_1m.csv").write_text(header + "30000,1,1,1,20.5,4\n")
    (tmp_path / "notes.txt").write_text("ignored")
    files = find_candle_files(tmp_path)
    assert [m.id for m in files] == ["binance:btc-usdt", "kraken:eth-usd"]
    merged = [(c.market.id, c.index, c.close_ts, c.close) for c in merged_candles(files)]
    assert merged == [
        ("binance:btc-usdt", 0, 60000, 10.5),
        ("kraken:eth-usd", 0, 90000, 20.5),
        ("binance:btc-usdt", 1, 120000, 11.5),
    ]
    assert [c.index for c in merged_candles(files, limit=1)] == [0, 0]
    assert list(find_candle_files(tmp_path, ["kraken:eth-usd"])) == [Market("kraken", "eth", "usd")]


def test_synthetic_market_is_seeded() -> None:
    """The same seed gives the same walk; prices start near the market's real level."""
    a = SyntheticMarket.create("btc", seed=1, index=0)
    b = SyntheticMarket.create("btc", seed=1, index=0)
    steps = [a.step() for _ in range(100)]
    assert steps == [b.step() for _ in range(100)]
    assert 50_000 < steps[0][0] < 80_000
    assert all(price > 0 and volume > 0 for price, volume in steps)
    assert SyntheticMarket.create("btc", seed=2, index=0).step() != steps[0]


@pytest.mark.parametrize("bad", ["nope", ""])
def test_unknown_source_is_rejected(bad: str) -> None:
    """WATCHER_SOURCE must name a real source."""
    from tickstream_shared.settings import WatcherSettings
    from tickstream_watcher.sources import make_source

    with pytest.raises(ValueError, match="WATCHER_SOURCE"):
        make_source(WatcherSettings(source=bad))
