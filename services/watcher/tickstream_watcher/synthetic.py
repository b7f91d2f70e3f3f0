"""Seedable random-walk market model: realistic starting prices, per-minute volume with spikes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Rough late-2024 price levels, so charts and ranks look like real markets.
STARTING_PRICES: dict[str, float] = {
    "btc": 65000.0,
    "eth": 3400.0,
    "sol": 150.0,
    "bnb": 580.0,
    "xrp": 0.55,
    "ada": 0.45,
    "doge": 0.12,
    "dot": 6.5,
    "link": 14.0,
    "ltc": 80.0,
    "avax": 30.0,
    "atom": 8.0,
    "matic": 0.7,
}
_DEFAULT_PRICE = 100.0
_LOG_RETURN_SIGMA = 0.0008
_SPIKE_PROBABILITY = 0.003
_SPIKE_RANGE = (5.0, 25.0)


@dataclass
class SyntheticMarket:
    """One market's random walk; the same seed gives the same series."""

    price: float
    base_volume: float
    rng: random.Random

    @classmethod
    def create(cls, base: str, seed: int, index: int) -> SyntheticMarket:
        rng = random.Random(f"{seed}:{index}:{base}")
        price = STARTING_PRICES.get(base, _DEFAULT_PRICE) * rng.uniform(0.97, 1.03)
        # Notional per minute roughly constant across markets: cheap coins trade more units.
        base_volume = 2_000_000.0 / price * rng.uniform(0.5, 1.5)
        return cls(price, base_volume, rng)

    def step(self) -> tuple[float, float]:
        """Advance one tick; returns (price, per-minute volume)."""
        self.price *= math.exp(self.rng.gauss(0.0, _LOG_RETURN_SIGMA))
        volume = self.base_volume * self.rng.lognormvariate(0.0, 0.35)
        if self.rng.random() < _SPIKE_PROBABILITY:
            volume *= self.rng.uniform(*_SPIKE_RANGE)
        return self.price, volume
