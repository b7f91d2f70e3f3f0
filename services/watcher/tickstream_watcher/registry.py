"""The exchanges the live source can watch: one line per exchange, its module's SPEC."""

from __future__ import annotations

from typing import Final

from tickstream_watcher import binance, coinbase, kraken, okx
from tickstream_watcher.exchange import ExchangeSpec

EXCHANGES: Final[dict[str, ExchangeSpec]] = {
    spec.name: spec
    for spec in (
        binance.SPEC,
        coinbase.SPEC,
        kraken.SPEC,
        okx.SPEC,
    )
}
