"""The frame bound every exchange protocol shares: bytes, UTF-8, refused before decoding."""

from __future__ import annotations

import pytest

from tickstream_shared.naming import Market
from tickstream_watcher.binance import BinanceProtocol
from tickstream_watcher.coinbase import CoinbaseProtocol
from tickstream_watcher.exchange import MAX_FRAME_BYTES, BadFrame, ExchangeProtocol, frame_bytes
from tickstream_watcher.kraken import KrakenProtocol

PROTOCOLS: list[ExchangeProtocol] = [
    BinanceProtocol({"BTCUSDT": Market("binance", "btc", "usdt")}),
    CoinbaseProtocol({"BTC-USD": Market("coinbase", "btc", "usd")}),
    KrakenProtocol({"BTC/USD": Market("kraken", "btc", "usd")}),
]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        ("\ud800", "not UTF-8"),
        ('{"type":"match\udfff"}', "not UTF-8"),
        ("é" * (MAX_FRAME_BYTES // 2 + 1), "exceeds"),  # few enough characters, too many bytes
        (b" " * (MAX_FRAME_BYTES + 1), "exceeds"),
    ],
    ids=["lone-surrogate", "surrogate-inside", "multibyte-over-bound", "bytes-over-bound"],
)
def test_every_protocol_refuses_frames_over_the_byte_bound_or_not_utf8(
    protocol: ExchangeProtocol, frame: str | bytes, problem: str
) -> None:
    """Text that is not UTF-8 or over MAX_FRAME_BYTES once encoded is a BadFrame everywhere."""
    with pytest.raises(BadFrame, match=problem):
        protocol.parse(frame)


def test_frame_bytes_passes_frames_within_the_bound_unchanged() -> None:
    """A frame at exactly the bound is accepted and returned as its UTF-8 bytes."""
    assert frame_bytes("é" * (MAX_FRAME_BYTES // 2)) == "é".encode() * (MAX_FRAME_BYTES // 2)
    assert frame_bytes(b"x" * MAX_FRAME_BYTES) == b"x" * MAX_FRAME_BYTES


def test_every_registered_exchange_is_described_in_one_spec() -> None:
    """Each registry entry names its module's protocol, limits, paging, pacing and endpoints."""
    from tickstream_shared.settings import ExchangeSettings
    from tickstream_watcher.registry import EXCHANGES

    assert sorted(EXCHANGES) == ["binance", "coinbase", "kraken", "okx"]
    settings = ExchangeSettings()
    for name, spec in EXCHANGES.items():
        protocol = spec.from_listing({})
        assert protocol.name == spec.name == name
        assert spec.page_minutes > 0 and 0 < spec.rest_interval_s <= 1.0
        assert spec.limits.min_reconnect_s <= spec.limits.max_reconnect_s
        ws, rest = settings.endpoints(name)
        assert ws.startswith("wss://") and rest.startswith("https://")
    assert EXCHANGES["binance"].markets_per_connection == 1024
    with pytest.raises(KeyError):
        settings.endpoints("bitfinex")


def test_candle_page_keeps_good_rows_in_order_and_names_the_bad_ones() -> None:
    """Rows that raise, fail the shared check or go back in time are skipped, each named."""
    from tickstream_watcher.exchange import CandleUpdate, candle_page

    market = Market("binance", "btc", "usdt")
    minute = 28_333_334 * 60_000

    def row(m: int, low: float = 1.0) -> CandleUpdate:
        return CandleUpdate(market, m, 1.0, 2.0, low, 1.5, 3.0, 4, True, m + 60_000)

    def broken() -> CandleUpdate:
        raise ValueError("not a number")

    rows = [
        lambda: row(minute),
        broken,
        lambda: row(minute + 60_000, low=3.0),  # low above high
        lambda: row(minute),  # not after the row kept before it
        lambda: row(minute + 120_000),
    ]
    page = candle_page(rows)
    assert [c.minute for c in page.candles] == [minute, minute + 120_000]
    assert [bad.split(":")[0] for bad in page.bad_rows] == ["row 1", "row 2", "row 3"]
