"""Brute-force reference of the minute spike rule and the detector, in exact fractions."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from tickstream_shared.naming import MetricKind
from tickstream_shared.schemas import MINUTE_MS


@dataclass(frozen=True)
class RuleParams:
    factor: float = 3.0
    window_minutes: int = 60
    min_samples: int = 1
    min_active_minutes: int = 0
    min_zscore: float = 0.0
    cooldown_ms: int = 0


@dataclass(frozen=True)
class Update:
    minute: int
    seq: int
    close: float
    volume: float
    closed: bool = False


@dataclass(frozen=True)
class ReferenceSpike:
    kind: MetricKind
    exact_mean: Fraction
    samples: int
    window: tuple[float, ...]


def judge(
    minutes: dict[int, tuple[float, float]], update: Update, params: RuleParams
) -> list[ReferenceSpike]:
    """The spikes of `update` against every value recorded for earlier minutes, exactly."""
    first = update.minute - params.window_minutes * MINUTE_MS
    window = [minutes[m] for m in sorted(minutes) if first <= m < update.minute]
    samples = len(window)
    active = sum(1 for _, volume in window if volume != 0.0)
    if samples < params.min_samples or active < params.min_active_minutes:
        return []
    spikes = []
    judged: tuple[tuple[MetricKind, int, float], ...] = (
        ("price", 0, update.close),
        ("volume", 1, update.volume),
    )
    for kind, index, value in judged:
        values = tuple(pair[index] for pair in window)
        exact = [Fraction(v) for v in values]
        mean = sum(exact, Fraction(0)) / samples
        if mean <= 0 or Fraction(value) <= Fraction(params.factor) * mean:
            continue
        if params.min_zscore:
            variance = sum(((v - mean) ** 2 for v in exact), Fraction(0)) / samples
            excess = Fraction(value) - mean
            if excess <= 0 or excess**2 <= Fraction(params.min_zscore) ** 2 * variance:
                continue
        spikes.append(ReferenceSpike(kind, mean, samples, values))
    return spikes


def rule_spikes(updates: list[Update], params: RuleParams) -> list[list[ReferenceSpike]]:
    """Per update, what the rule returns: judged only if its minute is the newest so far."""
    minutes: dict[int, tuple[float, float]] = {}
    newest: int | None = None
    verdicts = []
    for update in updates:
        judged = newest is None or update.minute >= newest
        verdicts.append(judge(minutes, update, params) if judged else [])
        minutes[update.minute] = (update.close, update.volume)
        if judged:
            newest = update.minute
    return verdicts


def detector_alerts(
    updates: list[Update],
    params: RuleParams,
    *,
    last_alert: dict[MetricKind, int] | None = None,
) -> list[tuple[MetricKind, int, int, ReferenceSpike]]:
    """(kind, minute, seq, spike) of every alert: seq filter, one per minute, cooldown."""
    last_seq = -1
    applied = []
    for update in updates:
        if update.seq > last_seq:
            applied.append(update)
            last_seq = update.seq
    last = dict(last_alert or {})
    alerts = []
    for update, spikes in zip(applied, rule_spikes(applied, params), strict=True):
        for spike in spikes:
            previous = last.get(spike.kind)
            if previous is not None and (
                update.minute <= previous or update.minute - previous < params.cooldown_ms
            ):
                continue
            last[spike.kind] = update.minute
            alerts.append((spike.kind, update.minute, update.seq, spike))
    return alerts


@dataclass(frozen=True)
class ReferenceAlert:
    """An alert's state: its status and the update (seq) and window (samples, mean) it
    stands on, the update that set the status, and the closed value that judged it."""

    status: str
    seq: int
    samples: int
    mean: float
    status_seq: int
    final_value: float | None


def detector_states(
    updates: list[Update],
    params: RuleParams,
    correction_minutes: int,
    *,
    last_alert: dict[MetricKind, int] | None = None,
) -> tuple[dict[tuple[MetricKind, int], ReferenceAlert], int]:
    """Every alert's final state by (kind, minute), and how many were left provisional.

    Provisional alerts, by brute force: raised as `detector_alerts` raises them (the cooldown
    runs from the newest alert that is not retracted), provisional unless raised on a closed
    update; each closed update of an alerted minute at most `correction_minutes` behind the
    newest minute judges its latest value again against all values recorded for its window.
    """
    last_seq = -1
    minutes: dict[int, tuple[float, float]] = {}
    newest: int | None = None
    alerts: dict[tuple[MetricKind, int], ReferenceAlert] = {}
    restored = dict(last_alert or {})
    for update in updates:
        if update.seq <= last_seq:
            continue
        last_seq = update.seq
        judged = newest is None or update.minute >= newest
        spikes = judge(minutes, update, params) if judged else []
        minutes[update.minute] = (update.close, update.volume)
        if judged:
            newest = update.minute
        assert newest is not None
        if update.closed and update.minute >= newest - correction_minutes * MINUTE_MS:
            verdict = {spike.kind: spike for spike in judge(minutes, update, params)}
            for kind, value in (("price", update.close), ("volume", update.volume)):
                held = alerts.get((kind, update.minute))
                if held is None:
                    continue
                spike = verdict.get(kind)
                if spike is not None:
                    mean = float(spike.exact_mean)
                    new = ReferenceAlert(
                        "confirmed", update.seq, spike.samples, mean, update.seq, value
                    )
                else:
                    new = ReferenceAlert(
                        "retracted", held.seq, held.samples, held.mean, update.seq, value
                    )
                if (new.status, new.final_value, new.mean, new.samples) != (
                    held.status,
                    held.final_value,
                    held.mean,
                    held.samples,
                ):
                    alerts[kind, update.minute] = new
        for spike in spikes:
            if (spike.kind, update.minute) in alerts:
                continue
            standing = [m for (k, m), a in alerts.items() if k == spike.kind]
            standing = [m for m in standing if alerts[spike.kind, m].status != "retracted"]
            if spike.kind in restored:
                standing.append(restored[spike.kind])
            last = max(standing, default=None)
            if last is not None and (
                update.minute <= last or update.minute - last < params.cooldown_ms
            ):
                continue
            value = update.close if spike.kind == "price" else update.volume
            alerts[spike.kind, update.minute] = ReferenceAlert(
                "confirmed" if update.closed else "provisional",
                update.seq,
                spike.samples,
                float(spike.exact_mean),
                update.seq,
                value if update.closed else None,
            )
    horizon = -1 if newest is None else newest - correction_minutes * MINUTE_MS
    left = sum(1 for (_, m), a in alerts.items() if a.status == "provisional" and m < horizon)
    return alerts, left
