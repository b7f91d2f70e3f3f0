"""Ticks and alerts the gateway's unit tests share."""

from __future__ import annotations

from tickstream_shared.schemas import MINUTE_MS, Alert, Tick

MINUTE = 1_680_000_000_000
BTC = "binance:btc-usdt"


def update(seq: int, minute_index: int = 0, *, market: str = BTC, closed: bool = False) -> Tick:
    """An update of `market`'s bar of minute `minute_index` (from MINUTE); volume = seq."""
    minute = MINUTE + minute_index * MINUTE_MS
    return Tick(
        market=market,
        minute=minute,
        seq=seq,
        exchange_ts=minute + 1000,
        received_ts=minute + 1500,
        open=1.0,
        high=2.0,
        low=1.0,
        close=1.5,
        volume=float(seq),
        closed=closed,
    )


def alert(n: int) -> Alert:
    """A provisional volume alert of BTC in minute n (from MINUTE), raised by seq n."""
    return Alert(
        alert_id=f"{BTC}:volume@{MINUTE + n * MINUTE_MS}",
        metric=f"{BTC}:volume",
        kind="volume",
        minute=MINUTE + n * MINUTE_MS,
        exchange_ts=MINUTE + n * MINUTE_MS + 1000,
        seq=n,
        value=10.0,
        mean=1.0,
        factor=3.0,
        ratio=10.0,
        window_minutes=60,
        samples=59,
        status="provisional",
        status_seq=n,
        status_ts=MINUTE + n * MINUTE_MS + 1000,
    )
