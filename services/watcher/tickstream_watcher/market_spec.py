"""WATCHER_MARKETS for live feeds: exact markets and patterns resolved against exchange listings."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tickstream_shared.naming import MARKET_SPEC_RE, Market


@dataclass(frozen=True, slots=True)
class MarketSpec:
    """One entry of WATCHER_MARKETS: `binance:btc-usdt`, or a pattern such as `binance:*-usdt`."""

    exchange: str
    base: str  # a name or "*"
    quote: str  # a name or "*"

    @property
    def is_pattern(self) -> bool:
        return "*" in (self.base, self.quote)

    def matches(self, market: Market) -> bool:
        return (
            market.exchange == self.exchange
            and fnmatch.fnmatchcase(market.base, self.base)
            and fnmatch.fnmatchcase(market.quote, self.quote)
        )

    def __str__(self) -> str:
        return f"{self.exchange}:{self.base}-{self.quote}"


def parse_specs(entries: Sequence[str]) -> list[MarketSpec]:
    """Parse WATCHER_MARKETS entries (case-insensitive); ValueError naming the first bad one."""
    specs = []
    for entry in entries:
        match = MARKET_SPEC_RE.match(entry.strip().lower())
        if match is None:
            raise ValueError(
                f"market {entry[:60]!r} is not <exchange>:<base>-<quote> (base or quote may be *)"
            )
        specs.append(MarketSpec(match[1], match[2], match[3]))
    return specs


@dataclass
class Resolution:
    """What WATCHER_MARKETS means today: the markets to watch, per exchange, with symbols."""

    symbols: dict[str, dict[Market, str]] = field(default_factory=dict)  # exchange -> market
    unknown: list[str] = field(default_factory=list)  # entries no listing offers (logged)
    capped: int = 0  # pattern matches left out by the cap

    @property
    def markets(self) -> list[Market]:
        return [m for by_market in self.symbols.values() for m in by_market]


def resolve(
    specs: Sequence[MarketSpec], listings: Mapping[str, Mapping[Market, str]], max_markets: int
) -> Resolution:
    """Markets of `specs` found in the exchanges' `listings`, at most `max_markets` in all.

    Exact markets come first, in the order given; then each pattern's matches, in market
    order, until the cap. An exact market missing from its exchange's listing (unknown or
    delisted), or of an exchange without a listing, is reported in `unknown`, never fatal.
    """
    resolution = Resolution()
    chosen: dict[Market, str] = {}

    def take(market: Market, symbol: str) -> bool:
        if market in chosen:
            return True
        if len(chosen) >= max_markets:
            return False
        chosen[market] = symbol
        return True

    for spec in specs:
        if spec.is_pattern:
            continue
        market = Market(spec.exchange, spec.base, spec.quote)
        symbol = listings.get(spec.exchange, {}).get(market)
        if symbol is None:
            resolution.unknown.append(str(spec))
        elif not take(market, symbol):
            resolution.capped += 1
    for spec in specs:
        if not spec.is_pattern:
            continue
        listing = listings.get(spec.exchange)
        if listing is None:
            resolution.unknown.append(str(spec))
            continue
        matches = sorted(m for m in listing if spec.matches(m))
        if not matches:
            resolution.unknown.append(str(spec))
        for market in matches:
            if not take(market, listing[market]):
                resolution.capped += 1
    for market, symbol in chosen.items():
        resolution.symbols.setdefault(market.exchange, {})[market] = symbol
    return resolution
