"""SpikeDetector: one MinuteSpikeRule per market, fed ticks in seq order, yielding Alerts."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from tickstream_alerts.rule import MinuteSpikeRule, Spike
from tickstream_shared.naming import ALERT_KINDS, AlertKind, market_of
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick, alert_id
from tickstream_shared.settings import AlertsSettings

log = logging.getLogger("tickstream.alerts")


@dataclass(slots=True)
class _MarketState:
    rule: MinuteSpikeRule
    metric_ids: dict[AlertKind, str]
    last_seq: int = -1
    # Every alert whose minute the rule can still judge again, by minute and kind: minutes at
    # most `correction_minutes` before the market's newest minute, one alert per metric and
    # minute, so at most 2 x (correction_minutes + 1) per market whatever the update rate.
    open: dict[int, dict[AlertKind, Alert]] = field(default_factory=dict)
    # Per kind, the newest minute of an alert that left `open` not retracted; the cooldown runs
    # from it or from a newer open alert that is not retracted.
    settled: dict[AlertKind, int] = field(default_factory=dict)
    # The rule's newest minute when `open` was last settled: a tick of a later minute moved it.
    settled_at: int = -1


@dataclass
class SpikeDetector:
    """Evaluates the minute spike rule for both metrics of every market it sees.

    A tick whose seq is at or below its market's last applied seq is counted and skipped, so a
    re-delivered tick never changes a window or raises a second alert. A metric raises at most
    one alert per minute (on the first update of the minute that crosses), and none while the
    minute is less than `cooldown_seconds` after the minute of its last alert that is not
    retracted (a retracted alert stood on a value that was never true: it holds back nothing).

    An alert raised on a forming (not closed) update is `provisional`; one raised on a closed
    bar is `confirmed` at once. Each closed bar of an alerted minute (its close, or a
    correction: a closed bar with a larger seq) judges the alert again with the rule, against
    the same trailing minutes at their latest values: `confirmed` if it still crosses (the
    alert then carries the closed bar's numbers), `retracted` if not; a later correction can
    turn either into the other. That holds while the minute is at most `correction_minutes`
    before its market's newest minute; then the alert is final, and one still provisional
    (its minute never closed in time) stays so and is counted in `left_provisional`.
    """

    settings: AlertsSettings
    skipped_stale: int = 0
    left_provisional: int = 0
    _markets: dict[str, _MarketState] = field(default_factory=dict)

    def __contains__(self, market_id: str) -> bool:
        return market_id in self._markets

    def forget(self, market_id: str) -> None:
        """Drop a market's state (its partition moved to another instance). Idempotent."""
        self._markets.pop(market_id, None)

    def warm(
        self,
        market_id: str,
        bars: Iterable[Tick],
        last_alert_minutes: Mapping[str, int],
        open_alerts: Iterable[Alert] = (),
    ) -> None:
        """(Re)start tracking a market from stored bars and alerts, raising nothing.

        `bars` are the market's minutes before the first tick to evaluate, in any order (those
        `correction_minutes` before it too, so that their windows are whole); `open_alerts`
        are the stored alerts of its metrics whose minutes may still be judged again (from
        `correction_minutes` before that tick's minute on), in any status, so that a closing
        bar after a restart still confirms or retracts them and a minute that alerted never
        alerts twice; `last_alert_minutes` maps metric ids to the minute of their last alert
        before those that is not retracted (as `alert_store.last_alert_minutes` returns it),
        so the cooldown survives a restart.
        """
        state = self._start(market_id)
        for bar in bars:
            state.rule.remember(bar.minute, bar.close, bar.volume)
            state.last_seq = max(state.last_seq, bar.seq)
        kinds = {metric: kind for kind, metric in state.metric_ids.items()}
        for kind, metric in state.metric_ids.items():
            if metric in last_alert_minutes:
                state.settled[kind] = last_alert_minutes[metric]
        for alert in open_alerts:
            if kinds.get(alert.metric) == alert.kind:
                state.open.setdefault(alert.minute, {})[alert.kind] = alert
        if state.open:
            self._settle(state)  # any the bars already put out of reach are final

    def observe(self, ticks: Iterable[Tick]) -> list[Alert]:
        """Feed ticks in each market's seq order; return the alerts they raised or changed.

        Each alert comes once, in its state after the last of these ticks, in the order of
        that last change: what to store and publish.
        """
        changed: dict[str, Alert] = {}
        markets = self._markets
        for tick in ticks:
            state = markets.get(tick.market)
            if state is None:
                state = self._start(tick.market)
            if tick.seq <= state.last_seq:
                self.skipped_stale += 1
                continue
            state.last_seq = tick.seq
            spikes = state.rule.observe(tick.minute, tick.close, tick.volume)
            if state.open:  # most ticks have none: an alert keeps it for correction_minutes
                if tick.minute > state.settled_at:
                    self._settle(state)
                if tick.closed and tick.minute in state.open:
                    for judged in self._judge_again(state, tick, spikes):
                        changed.pop(judged.alert_id, None)  # keeps the order of last changes
                        changed[judged.alert_id] = judged
            for spike in spikes:
                raised = self._raise(state, tick, spike)
                if raised is not None:
                    changed[raised.alert_id] = raised
        return list(changed.values())

    def _raise(self, state: _MarketState, tick: Tick, spike: Spike) -> Alert | None:
        """A new alert for the spike, unless its minute has one or the cooldown holds it."""
        kind, minute = spike.kind, tick.minute
        if kind in state.open.get(minute, ()):
            return None
        last = state.settled.get(kind)
        for open_minute, by_kind in state.open.items():
            held = by_kind.get(kind)
            if held is not None and held.status != "retracted":
                last = open_minute if last is None else max(last, open_minute)
        # `minute <= last`: this minute already alerted (cooldown 0 included).
        cooldown_ms = self.settings.cooldown_seconds * 1000
        if last is not None and (minute <= last or minute - last < cooldown_ms):
            return None
        metric = state.metric_ids[kind]
        alert = Alert(
            alert_id=alert_id(metric, minute),
            metric=metric,
            kind=kind,
            minute=minute,
            exchange_ts=tick.exchange_ts,
            seq=tick.seq,
            value=spike.value,
            mean=spike.mean,
            factor=self.settings.factor,
            ratio=spike.ratio,
            window_minutes=self.settings.window_minutes,
            samples=spike.samples,
            status="confirmed" if tick.closed else "provisional",
            status_seq=tick.seq,
            status_ts=tick.exchange_ts,
            final_value=spike.value if tick.closed else None,
        )
        state.open.setdefault(minute, {})[kind] = alert
        return alert

    def _judge_again(
        self, state: _MarketState, tick: Tick, spikes: tuple[Spike, ...]
    ) -> list[Alert]:
        """Confirm or retract the open alerts of a closed bar's minute; the ones that changed."""
        minute = tick.minute
        by_kind = state.open[minute]
        rule = state.rule
        if minute != rule.newest_minute:
            # A late close or correction: `observe` judged nothing, so judge that minute itself.
            # `_settle` has already let go of alerts the rule no longer holds.
            spikes = rule.judge(minute)
        crossing = {spike.kind: spike for spike in spikes}
        changed = []
        for kind, held in by_kind.items():
            spike = crossing.get(kind)
            if spike is not None:
                judged = msgspec.structs.replace(
                    held,
                    exchange_ts=tick.exchange_ts,
                    seq=tick.seq,
                    value=spike.value,
                    mean=spike.mean,
                    ratio=spike.ratio,
                    samples=spike.samples,
                    status="confirmed",
                    status_seq=tick.seq,
                    status_ts=tick.exchange_ts,
                    final_value=spike.value,
                )
            else:
                judged = msgspec.structs.replace(
                    held,
                    status="retracted",
                    status_seq=tick.seq,
                    status_ts=tick.exchange_ts,
                    final_value=tick.value(kind),
                )
            # A bar that changes nothing of the verdict (a re-delivery, a correction of the
            # other metric) is not a change to store and publish.
            if _verdict(judged) != _verdict(held):
                by_kind[kind] = judged
                changed.append(judged)
        return changed

    def _settle(self, state: _MarketState) -> None:
        """Let go of the alerts of minutes the rule can no longer judge: they are final."""
        newest = state.rule.newest_minute
        if newest is None:
            return
        state.settled_at = newest
        horizon = newest - self.settings.correction_minutes * MINUTE_MS
        if not state.open or min(state.open) >= horizon:
            return
        for minute in [minute for minute in state.open if minute < horizon]:
            for kind, alert in state.open.pop(minute).items():
                if alert.status != "retracted":
                    state.settled[kind] = max(state.settled.get(kind, minute), minute)
                if alert.status == "provisional":
                    self.left_provisional += 1
                    log.warning(
                        "alert %s stays provisional: no closed bar of its minute within %d minutes",
                        alert.alert_id,
                        self.settings.correction_minutes,
                    )

    def _start(self, market_id: str) -> _MarketState:
        s = self.settings
        market = market_of(market_id)
        state = _MarketState(
            rule=MinuteSpikeRule(
                s.factor,
                s.window_minutes,
                s.min_samples,
                s.min_active_minutes,
                s.min_zscore,
                s.correction_minutes,
            ),
            metric_ids={kind: market.metric_id(kind) for kind in ALERT_KINDS},
        )
        self._markets[market_id] = state
        return state


def _verdict(alert: Alert) -> tuple[object, ...]:
    return (alert.status, alert.final_value, alert.mean, alert.samples)
