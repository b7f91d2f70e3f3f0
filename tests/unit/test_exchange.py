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
