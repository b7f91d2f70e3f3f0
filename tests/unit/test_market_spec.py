"""WATCHER_MARKETS for live feeds: exact markets and patterns against exchange listings."""

from __future__ import annotations

import pytest

from tickstream_shared.naming import Market
from tickstream_watcher.market_spec import parse_specs, resolve

LISTINGS = {
    "binance": {
        Market("binance", "btc", "usdt"): "BTCUSDT",
        Market("binance", "eth", "usdt"): "ETHUSDT",
        Market("binance", "sol", "usdt"): "SOLUSDT",
        Market("binance", "eth", "btc"): "ETHBTC",
    },
    "kraken": {
        Market("kraken", "btc", "usd"): "BTC/USD",
        Market("kraken", "doge", "usd"): "DOGE/USD",
    },
}


def test_exact_markets_keep_their_order_and_unknown_ones_are_reported() -> None:
    """Exact entries resolve to the exchange's symbols; missing ones are listed, not fatal."""
    result = resolve(
        parse_specs(
            ["kraken:doge-usd", "binance:btc-usdt", "binance:xyz-usdt", "coinbase:btc-usd"]
        ),
        LISTINGS,
        max_markets=10,
    )
    assert result.symbols == {
        "kraken": {Market("kraken", "doge", "usd"): "DOGE/USD"},
        "binance": {Market("binance", "btc", "usdt"): "BTCUSDT"},
    }
    assert result.unknown == ["binance:xyz-usdt", "coinbase:btc-usd"]
    assert result.markets == [Market("kraken", "doge", "usd"), Market("binance", "btc", "usdt")]


def test_patterns_match_in_market_order_after_exact_entries_up_to_the_cap() -> None:
    """`binance:*-usdt` adds the listed USDT markets in order until WATCHER_MAX_MARKETS."""
    result = resolve(parse_specs(["binance:*-usdt", "kraken:btc-usd"]), LISTINGS, max_markets=3)
    assert result.markets == [
        Market("kraken", "btc", "usd"),
        Market("binance", "btc", "usdt"),
        Market("binance", "eth", "usdt"),
    ]
    assert result.capped == 1 and result.unknown == []


def test_a_market_named_twice_counts_once() -> None:
    """An exact market also matched by a pattern is watched once and uses one slot."""
    result = resolve(parse_specs(["binance:eth-btc", "binance:eth-*"]), LISTINGS, max_markets=2)
    assert result.markets == [Market("binance", "eth", "btc"), Market("binance", "eth", "usdt")]
    assert result.capped == 0


def test_a_pattern_matching_nothing_is_reported() -> None:
    """A pattern with no listed market, or for an exchange without a listing, is reported."""
    result = resolve(parse_specs(["binance:*-eur", "okx:*-usdt"]), LISTINGS, max_markets=5)
    assert result.markets == [] and result.unknown == ["binance:*-eur", "okx:*-usdt"]


@pytest.mark.parametrize(
    "entry", ["btc-usdt", "binance:btc", "binance:b*c-usdt", "binance:**-usdt", "x" * 500]
)
def test_malformed_entries_are_refused_with_the_entry_named(entry: str) -> None:
    """Entries that are not <exchange>:<base>-<quote> (with whole-name *) raise ValueError."""
    with pytest.raises(ValueError, match="is not <exchange>:<base>-<quote>"):
        parse_specs([entry])
