"""SpikeDetector: one SpikeRule per metric, fed ticks in event time, yielding Alerts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tickstream_alerts.rule import SpikeRule
from tickstream_shared.naming import METRIC_KINDS, Market, MetricKind
from tickstream_shared.schemas import Alert, Tick, alert_id
from tickstream_shared.settings import AlertsSettings


@dataclass
class _MarketRules:
    rules: dict[MetricKind, SpikeRule]
    last: tuple[int, int] = (-1, -1)  # (exchange_ts, seq) of the last tick observed


@dataclass
class SpikeDetector:
    """Evaluates the spike rule for both metrics of every market it sees.

    Ticks at or before a market's last observed (exchange time, seq) are skipped, so a
    re-delivered tick can never raise a second alert and windows stay in event-time order.
    """

    settings: AlertsSettings
    skipped_stale: int = 0
    _markets: dict[Market, _MarketRules] = field(default_factory=dict)

    def __contains__(self, market: Market) -> bool:
        return market in self._markets

    def forget(self, market: Market) -> None:
        self._markets.pop(market, None)

    def warm(self, market: Market, history: Iterable[Tick]) -> None:
        """Start tracking `market`, feeding its history without raising alerts (restart)."""
        self._rules(market)
        for tick in history:
            self._observe(tick)

    def observe(self, ticks: Iterable[Tick]) -> list[Alert]:
        """Feed ticks in order; return the alerts they raise."""
        alerts = []
        for tick in ticks:
            alerts.extend(self._observe(tick))
        return alerts

    def _rules(self, market: Market) -> _MarketRules:
        rules = self._markets.get(market)
        if rules is None:
            s = self.settings
            rules = _MarketRules(
                {
                    kind: SpikeRule(s.factor, s.window_seconds * 1000, s.min_samples)
                    for kind in METRIC_KINDS
                }
            )
            self._markets[market] = rules
        return rules

    def _observe(self, tick: Tick) -> list[Alert]:
        market_rules = self._rules(tick.market)
        if (tick.exchange_ts, tick.seq) <= market_rules.last:
            self.skipped_stale += 1
            return []
        market_rules.last = (tick.exchange_ts, tick.seq)
        alerts = []
        for kind, rule in market_rules.rules.items():
            spike = rule.observe(tick.exchange_ts, tick.value(kind))
            if spike is None:
                continue
            metric = tick.market.metric_id(kind)
            alerts.append(
                Alert(
                    alert_id=alert_id(metric, tick.exchange_ts, tick.seq),
                    metric=metric,
                    kind=kind,
                    exchange_ts=tick.exchange_ts,
                    seq=tick.seq,
                    value=spike.value,
                    mean=spike.mean,
                    factor=self.settings.factor,
                    ratio=spike.ratio,
                    window_seconds=self.settings.window_seconds,
                    samples=spike.samples,
                )
            )
        return alerts
