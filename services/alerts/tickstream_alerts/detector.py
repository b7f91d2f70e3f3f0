"""SpikeDetector: one MinuteSpikeRule per market, fed ticks in seq order, yielding Alerts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tickstream_alerts.rule import MinuteSpikeRule
from tickstream_shared.naming import METRIC_KINDS, MetricKind, market_of
from tickstream_shared.schemas import Alert, Tick, alert_id
from tickstream_shared.settings import AlertsSettings


@dataclass(slots=True)
class _MarketState:
    rule: MinuteSpikeRule
    metric_ids: dict[MetricKind, str]
    last_seq: int = -1
    last_alert: dict[MetricKind, int] = field(default_factory=dict)  # kind -> minute


@dataclass
class SpikeDetector:
    """Evaluates the minute spike rule for both metrics of every market it sees.

    A tick whose seq is at or below its market's last applied seq is counted and skipped, so a
    re-delivered tick never changes a window or raises a second alert. A metric raises at most
    one alert per minute (on the first update of the minute that crosses), and none while the
    minute is less than `cooldown_seconds` after the minute of its last alert.
    """

    settings: AlertsSettings
    skipped_stale: int = 0
    _markets: dict[str, _MarketState] = field(default_factory=dict)

    def __contains__(self, market_id: str) -> bool:
        return market_id in self._markets

    def forget(self, market_id: str) -> None:
        """Drop a market's state (its partition moved to another instance). Idempotent."""
        self._markets.pop(market_id, None)

    def warm(
        self, market_id: str, bars: Iterable[Tick], last_alert_minutes: Mapping[str, int]
    ) -> None:
        """(Re)start tracking a market from stored bars, raising nothing.

        `bars` are the market's minutes before the first tick to evaluate, in any order;
        `last_alert_minutes` maps metric ids to the minute of their last alert (as
        `alert_store.last_alert_minutes` returns it), so the cooldown survives a restart.
        """
        state = self._start(market_id)
        for bar in bars:
            state.rule.remember(bar.minute, bar.close, bar.volume)
            state.last_seq = max(state.last_seq, bar.seq)
        for kind, metric in state.metric_ids.items():
            if metric in last_alert_minutes:
                state.last_alert[kind] = last_alert_minutes[metric]

    def observe(self, ticks: Iterable[Tick]) -> list[Alert]:
        """Feed ticks in each market's seq order; return the alerts they raise."""
        alerts: list[Alert] = []
        cooldown_ms = self.settings.cooldown_seconds * 1000
        markets = self._markets
        for tick in ticks:
            state = markets.get(tick.market)
            if state is None:
                state = self._start(tick.market)
            if tick.seq <= state.last_seq:
                self.skipped_stale += 1
                continue
            state.last_seq = tick.seq
            minute = tick.minute
            for spike in state.rule.observe(minute, tick.close, tick.volume):
                last = state.last_alert.get(spike.kind)
                # `minute <= last`: this minute already alerted (cooldown 0 included).
                if last is not None and (minute <= last or minute - last < cooldown_ms):
                    continue
                state.last_alert[spike.kind] = minute
                metric = state.metric_ids[spike.kind]
                alerts.append(
                    Alert(
                        alert_id=alert_id(metric, minute),
                        metric=metric,
                        kind=spike.kind,
                        minute=minute,
                        exchange_ts=tick.exchange_ts,
                        seq=tick.seq,
                        value=spike.value,
                        mean=spike.mean,
                        factor=self.settings.factor,
                        ratio=spike.ratio,
                        window_minutes=self.settings.window_minutes,
                        samples=spike.samples,
                    )
                )
        return alerts

    def _start(self, market_id: str) -> _MarketState:
        s = self.settings
        market = market_of(market_id)
        state = _MarketState(
            rule=MinuteSpikeRule(
                s.factor, s.window_minutes, s.min_samples, s.min_active_minutes, s.min_zscore
            ),
            metric_ids={kind: market.metric_id(kind) for kind in METRIC_KINDS},
        )
        self._markets[market_id] = state
        return state
