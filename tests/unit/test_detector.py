"""Tests of the SpikeDetector: seq order, one alert per minute, cooldown, provisional alerts,
warm-up."""

from __future__ import annotations

import dataclasses
import itertools
import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.spike_reference import (
    ReferenceAlert,
    RuleParams,
    Update,
    detector_alerts,
    detector_states,
)
from tickstream_alerts.detector import SpikeDetector
from tickstream_shared.naming import MetricKind
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick
from tickstream_shared.settings import AlertsSettings

MARKET = "binance:btc-usdt"
VOLUME = "binance:btc-usdt:volume"
PRICE = "binance:btc-usdt:price"
T0 = 1_700_000_040_000


def minute(index: int) -> int:
    return T0 + index * MINUTE_MS


def bar(
    seq: int,
    index: int,
    close: float = 10.0,
    volume: float = 1.0,
    market: str = MARKET,
    *,
    closed: bool = False,
) -> Tick:
    """An update of minute `index`, stamped `seq` ms into it (forming unless `closed`)."""
    at = minute(index)
    return Tick(
        market=market,
        minute=at,
        seq=seq,
        exchange_ts=at + seq % MINUTE_MS,
        received_ts=at + seq % MINUTE_MS,
        open=close,
        high=close,
        low=close,
        close=close,
        volume=volume,
        closed=closed,
    )


def alert_settings(**overrides: float) -> AlertsSettings:
    """Guards off unless asked for, so each test states the ones it exercises."""
    base = {
        "factor": 3.0,
        "window_minutes": 60,
        "min_samples": 3,
        "min_active_minutes": 0,
        "min_zscore": 0.0,
        "cooldown_seconds": 0,
        "correction_minutes": 60,
    }
    return AlertsSettings(**{**base, **overrides})  # type: ignore[arg-type]


def steady(detector: SpikeDetector, minutes: int, seq: int = 0) -> int:
    """Feed minutes 0..minutes-1 of volume 10; returns the next seq."""
    for index in range(minutes):
        assert detector.observe([bar(seq, index, volume=10.0)]) == []
        seq += 1
    return seq


def test_alert_carries_the_crossing_update() -> None:
    """The first crossing update of a minute raises one alert with every field set."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    assert detector.observe([bar(seq, 5, volume=29.0)]) == []
    (alert,) = detector.observe([bar(seq + 1, 5, volume=31.0)])
    assert alert == Alert(
        alert_id=f"{VOLUME}@{minute(5)}",
        metric=VOLUME,
        kind="volume",
        minute=minute(5),
        exchange_ts=minute(5) + seq + 1,
        seq=seq + 1,
        value=31.0,
        mean=10.0,
        factor=3.0,
        ratio=3.1,
        window_minutes=60,
        samples=5,
        status="provisional",
        status_seq=seq + 1,
        status_ts=minute(5) + seq + 1,
        final_value=None,
    )


def test_a_turnover_spike_alone_raises_nothing() -> None:
    """Alerts watch price and volume only: a quote volume 100x its usual level alerts nothing,
    while a volume spike of the same ticks alerts on volume alone."""
    detector = SpikeDetector(alert_settings())
    seq = 0
    for index in range(5):
        quoted = msgspec.structs.replace(bar(seq, index, volume=10.0), quote_volume=100.0)
        assert detector.observe([quoted]) == []
        seq += 1
    spike = msgspec.structs.replace(bar(seq, 5, volume=10.0), quote_volume=10_000.0)
    assert detector.observe([spike]) == []
    both = msgspec.structs.replace(bar(seq + 1, 6, volume=40.0), quote_volume=40_000.0)
    assert [(a.metric, a.kind) for a in detector.observe([both])] == [(VOLUME, "volume")]


def test_one_alert_per_metric_and_minute() -> None:
    """Later, larger updates of a minute that already alerted raise nothing; price still can."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    assert len(detector.observe([bar(seq, 5, volume=31.0)])) == 1
    assert detector.observe([bar(seq + 1, 5, volume=100.0)]) == []
    (price,) = detector.observe([bar(seq + 2, 5, close=31.0, volume=250.0)])
    assert price.alert_id == f"{PRICE}@{minute(5)}"
    # The next minute judges again: its mean now includes minute 5's latest 250.
    assert detector.observe([bar(seq + 3, 6, volume=150.0)]) == []
    (alert,) = detector.observe([bar(seq + 4, 6, volume=150.5)])
    assert (alert.minute, alert.mean, alert.samples) == (minute(6), 50.0, 6)


def test_redelivered_and_older_ticks_are_skipped_and_counted() -> None:
    """A tick with seq at or below the market's last applied seq changes nothing."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    crossing = bar(seq, 5, volume=31.0)
    assert len(detector.observe([crossing])) == 1
    assert detector.observe([crossing, bar(seq - 1, 5, volume=900.0)]) == []
    assert detector.skipped_stale == 2
    # The skipped 900 did not join minute 5: minute 6 is judged against (5 x 10 + 31) / 6.
    assert detector.observe([bar(seq + 1, 6, volume=40.5)]) == []
    (alert,) = detector.observe([bar(seq + 2, 6, volume=41.0)])
    assert alert.mean == 13.5


def test_markets_are_independent() -> None:
    """Seq order and windows are per market."""
    detector = SpikeDetector(alert_settings())
    other = "binance:eth-usdt"
    for index in range(3):
        detector.observe([bar(100 + index, index, volume=1.0), bar(index, index, market=other)])
    alerts = detector.observe([bar(103, 3, volume=5.0), bar(3, 3, volume=5.0, market=other)])
    assert sorted(a.metric for a in alerts) == [VOLUME, f"{other}:volume"]
    assert detector.skipped_stale == 0


def test_cooldown_boundary_is_exact() -> None:
    """With a 600 s cooldown a minute 9 after the last alert is quiet and 10 after alerts."""
    detector = SpikeDetector(alert_settings(cooldown_seconds=600))
    seq = steady(detector, 5)
    volumes = {5: 100.0, 14: 1000.0, 15: 10_000.0}
    alerted = []
    for index in range(5, 16):
        for alert in detector.observe([bar(seq, index, volume=volumes.get(index, 10.0))]):
            alerted.append(alert.minute)
        seq += 1
    assert alerted == [minute(5), minute(15)]


def test_suppressed_minutes_do_not_extend_the_cooldown() -> None:
    """The cooldown runs from the last raised alert, not from the last qualifying minute."""
    detector = SpikeDetector(alert_settings(cooldown_seconds=180, min_samples=1))
    alerted = []
    for index in range(12):
        volume = 4.0**index  # each minute is over 3 times the mean of those before it
        alerted += [a.minute for a in detector.observe([bar(index, index, volume=volume)])]
    assert alerted == [minute(i) for i in (1, 4, 7, 10)]


def test_zero_cooldown_alerts_every_qualifying_minute() -> None:
    """Cooldown 0 raises an alert in every minute that crosses."""
    detector = SpikeDetector(alert_settings(min_samples=1))
    alerted = []
    for index in range(6):
        alerted += [a.minute for a in detector.observe([bar(index, index, volume=4.0**index)])]
    assert alerted == [minute(i) for i in range(1, 6)]


def test_guards_come_from_the_settings() -> None:
    """min_active_minutes and min_zscore from AlertsSettings reach the rule."""
    illiquid = SpikeDetector(alert_settings(min_active_minutes=4))
    noisy = SpikeDetector(alert_settings(min_zscore=6.0))
    for index, volume in enumerate([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]):
        assert illiquid.observe([bar(index, index, volume=volume)]) == []
    for index, volume in enumerate([1.0, 19.0, 1.0, 19.0]):
        assert noisy.observe([bar(index, index, volume=volume)]) == []
    assert illiquid.observe([bar(6, 6, volume=100.0)]) == []
    # Mean 10 and std 9: 31 clears 3x the mean but not mean + 6 std (64); 64.5 does.
    assert noisy.observe([bar(4, 4, volume=31.0)]) == []
    assert [a.value for a in noisy.observe([bar(5, 4, volume=64.5)])] == [64.5]


def test_warm_raises_nothing_and_seeds_the_window_and_seq() -> None:
    """Warm-up bars raise nothing, form the baseline, and older seqs are then skipped."""
    detector = SpikeDetector(alert_settings())
    detector.warm(MARKET, [bar(i, i, volume=100.0 if i == 3 else 10.0) for i in range(4)], {})
    assert MARKET in detector
    assert detector.observe([bar(3, 4, volume=1000.0)]) == []
    assert detector.skipped_stale == 1
    (alert,) = detector.observe([bar(4, 4, volume=97.6)])
    assert (alert.mean, alert.samples) == (32.5, 4)


def test_warm_restores_the_cooldown_and_the_alerted_minute() -> None:
    """Last alert minutes from storage: the same minute never alerts again, the cooldown runs on."""
    detector = SpikeDetector(alert_settings(cooldown_seconds=300, min_samples=1))
    history = [bar(i, i, volume=10.0) for i in range(5)]
    detector.warm(MARKET, history, {VOLUME: minute(5), "binance:eth-usdt:volume": minute(9)})
    assert detector.observe([bar(5, 5, volume=100.0)]) == []  # already alerted before the restart
    assert detector.observe([bar(6, 9, volume=1000.0)]) == []  # 4 minutes after it
    (alert,) = detector.observe([bar(7, 10, volume=10_000.0)])
    assert alert.minute == minute(10)


def test_forget_drops_the_market() -> None:
    """A forgotten market starts afresh (its partition moved away and back)."""
    detector = SpikeDetector(alert_settings())
    steady(detector, 5)
    detector.forget(MARKET)
    detector.forget(MARKET)
    assert MARKET not in detector
    assert detector.observe([bar(0, 5, volume=1000.0)]) == []
    assert detector.skipped_stale == 0


@st.composite
def tick_streams(draw: st.DrawFn) -> list[Update]:
    """Forming updates, new minutes, gaps, late minutes and re-delivered or older seqs."""
    updates = []
    index = 0
    seq = 0
    for _ in range(draw(st.integers(1, 200))):
        index = max(index + draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, -1, -3, 7])), 0)
        seq = max(seq + draw(st.sampled_from([1, 1, 1, 1, 0, -1, -3])), 0)
        close = float(draw(st.integers(1, 6)))
        volume = float(draw(st.sampled_from([0, 1, 1, 2, 3, 4, 8, 13, 40])))
        updates.append(Update(minute(index), seq, close, volume))
    return updates


@settings(max_examples=300, deadline=None)
@given(
    updates=tick_streams(),
    window=st.sampled_from([2, 5, 60]),
    min_samples=st.integers(1, 3),
    min_active=st.integers(0, 2),
    zscore=st.sampled_from([0.0, 1.0]),
    cooldown_minutes=st.sampled_from([0, 1, 2, 5]),
    last_alert=st.sampled_from([None, -2, 0]),
)
def test_alerts_match_the_reference(
    updates: list[Update],
    window: int,
    min_samples: int,
    min_active: int,
    zscore: float,
    cooldown_minutes: int,
    last_alert: int | None,
) -> None:
    """Alert for alert (kind, minute, seq, mean, samples) the detector equals the reference."""
    params = RuleParams(
        factor=2.0,
        window_minutes=window,
        min_samples=min_samples,
        min_active_minutes=min_active,
        min_zscore=zscore,
        cooldown_ms=cooldown_minutes * MINUTE_MS,
    )
    detector = SpikeDetector(
        alert_settings(
            factor=2.0,
            window_minutes=window,
            min_samples=min_samples,
            min_active_minutes=min_active,
            min_zscore=zscore,
            cooldown_seconds=cooldown_minutes * 60,
        )
    )
    restored: dict[MetricKind, int] = {}
    if last_alert is not None:
        restored = {"volume": minute(last_alert)}
        detector.warm(MARKET, [], {VOLUME: minute(last_alert)})
    ticks = [bar(u.seq, (u.minute - T0) // MINUTE_MS, u.close, u.volume) for u in updates]
    alerts = detector.observe(ticks)
    expected = detector_alerts(updates, params, last_alert=restored)
    assert [(a.kind, a.minute, a.seq, a.samples) for a in alerts] == [
        (kind, at, seq, spike.samples) for kind, at, seq, spike in expected
    ]
    for alert, (_, _, _, spike) in zip(alerts, expected, strict=True):
        assert alert.mean == math.fsum(spike.window) / spike.samples
    newest_seq = -1
    stale = 0
    for update in updates:
        stale += update.seq <= newest_seq
        newest_seq = max(newest_seq, update.seq)
    assert detector.skipped_stale == stale


# ---------------------------------------------------------------- provisional alerts


def test_forming_spike_closed_below_the_threshold_is_retracted() -> None:
    """A forming 1e17 raises a provisional alert; its closed bar of 25 (< 3 x 10) retracts it."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    (raised,) = detector.observe([bar(seq, 5, volume=1e17)])
    assert (raised.status, raised.value, raised.ratio, raised.final_value) == (
        "provisional",
        1e17,
        1e16,
        None,
    )
    (retracted,) = detector.observe([bar(seq + 1, 5, volume=25.0, closed=True)])
    # It keeps what it was raised on, says what closed, and when its status changed.
    assert retracted == msgspec.structs.replace(
        raised,
        status="retracted",
        status_seq=seq + 1,
        status_ts=minute(5) + seq + 1,
        final_value=25.0,
    )
    assert detector.observe([bar(seq + 2, 6, volume=10.0)]) == []


def test_forming_spike_closed_above_the_threshold_is_confirmed_with_the_closed_numbers() -> None:
    """A provisional alert whose minute closes above the threshold becomes confirmed and carries
    the closed bar's value, ratio, seq and time."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    (raised,) = detector.observe([bar(seq, 5, volume=1e17)])
    assert detector.observe([bar(seq + 1, 5, volume=2e17)]) == []  # still forming
    (confirmed,) = detector.observe([bar(seq + 2, 5, volume=45.0, closed=True)])
    assert confirmed == Alert(
        alert_id=raised.alert_id,
        metric=VOLUME,
        kind="volume",
        minute=minute(5),
        exchange_ts=minute(5) + seq + 2,
        seq=seq + 2,
        value=45.0,
        mean=10.0,
        factor=3.0,
        ratio=4.5,
        window_minutes=60,
        samples=5,
        status="confirmed",
        status_seq=seq + 2,
        status_ts=minute(5) + seq + 2,
        final_value=45.0,
    )


def test_alert_on_a_closed_bar_is_confirmed_at_once() -> None:
    """A closed bar that crosses raises a confirmed alert; a re-delivery of it changes nothing."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    closing = bar(seq, 5, volume=45.0, closed=True)
    (alert,) = detector.observe([closing])
    assert (alert.status, alert.status_seq, alert.final_value) == ("confirmed", seq, 45.0)
    assert detector.observe([closing]) == []


def test_confirmed_alert_corrected_below_is_retracted_and_back_above_confirmed() -> None:
    """Corrections of a closed minute, arriving after the next minute started, judge it again
    against its own trailing minutes: below retracts, above confirms again."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    (confirmed,) = detector.observe([bar(seq, 5, volume=45.0, closed=True)])
    assert detector.observe([bar(seq + 1, 6, volume=10.0)]) == []
    (retracted,) = detector.observe([bar(seq + 2, 5, volume=29.0, closed=True)])
    assert retracted == msgspec.structs.replace(
        confirmed,
        status="retracted",
        status_seq=seq + 2,
        status_ts=minute(5) + seq + 2,
        final_value=29.0,
    )
    # Minute 5's window is minutes 0..4 (mean 10), not minute 6's, which now holds 5's 31.
    (again,) = detector.observe([bar(seq + 3, 5, volume=31.0, closed=True)])
    assert (again.status, again.value, again.mean, again.samples, again.seq) == (
        "confirmed",
        31.0,
        10.0,
        5,
        seq + 3,
    )
    # A correction of the price alone leaves the volume verdict as it is: nothing to publish.
    assert detector.observe([bar(seq + 4, 5, close=11.0, volume=31.0, closed=True)]) == []


def test_batch_returns_each_alert_once_in_its_last_state() -> None:
    """Raised and closed in one batch, an alert comes once, already judged."""
    detector = SpikeDetector(alert_settings())
    seq = steady(detector, 5)
    (alert,) = detector.observe(
        [bar(seq, 5, volume=1e17), bar(seq + 1, 5, volume=25.0, closed=True)]
    )
    assert (alert.status, alert.value, alert.final_value) == ("retracted", 1e17, 25.0)


def test_retracted_alert_holds_back_no_later_alert() -> None:
    """The cooldown runs from the last alert that is not retracted."""
    detector = SpikeDetector(alert_settings(cooldown_seconds=3600))
    seq = steady(detector, 5)
    detector.observe([bar(seq, 5, volume=1000.0)])
    (retracted,) = detector.observe([bar(seq + 1, 5, volume=10.0, closed=True)])
    assert retracted.status == "retracted"
    (alert,) = detector.observe([bar(seq + 2, 6, volume=1000.0, closed=True)])
    assert (alert.minute, alert.status) == (minute(6), "confirmed")
    assert detector.observe([bar(seq + 3, 7, volume=1e6, closed=True)]) == []


def test_minute_that_never_closes_in_time_stays_provisional() -> None:
    """correction_minutes behind the newest minute a close still judges; further, the alert is
    final, stays provisional and is counted."""
    detector = SpikeDetector(alert_settings(correction_minutes=2))
    seq = steady(detector, 5)
    detector.observe([bar(seq, 5, volume=1000.0), bar(seq + 1, 6, volume=1000.0)])
    assert detector.observe([bar(seq + 2, 8, volume=10.0)]) == []  # minute 6 is 2 behind
    assert detector.left_provisional == 1  # minute 5, 3 behind
    (judged,) = detector.observe([bar(seq + 3, 6, volume=10.0, closed=True)])
    assert (judged.minute, judged.status) == (minute(6), "retracted")
    assert detector.observe([bar(seq + 4, 5, volume=10.0, closed=True)]) == []
    assert detector.left_provisional == 1


def test_rule_ring_reaches_back_for_late_closes() -> None:
    """A close correction_minutes behind is judged against its own window, with no slot short."""
    detector = SpikeDetector(alert_settings(window_minutes=3, correction_minutes=2))
    seq = steady(detector, 3)  # minutes 0..2 at 10
    detector.observe([bar(seq, 3, volume=100.0)])  # provisional, mean 10
    for index in (4, 5):  # minute 3's window 0..2 has left the rule's running window
        detector.observe([bar(seq + index, index, volume=10.0)])
    (alert,) = detector.observe([bar(seq + 6, 3, volume=30.5, closed=True)])
    assert (alert.status, alert.mean, alert.samples) == ("confirmed", 10.0, 3)


def test_warm_restart_judges_an_open_provisional_alert() -> None:
    """After a restart, a provisional alert loaded with the bars is retracted by its closed bar,
    and the re-delivered update that raised it raises nothing."""
    settings_ = alert_settings(cooldown_seconds=3600)
    first = SpikeDetector(settings_)
    seq = steady(first, 5)
    (raised,) = first.observe([bar(seq, 5, volume=1e17)])
    # What PostgreSQL holds: the closed bars of minutes 0..4 and the provisional alert.
    restarted = SpikeDetector(settings_)
    stored_bars = [bar(i, i, volume=10.0, closed=True) for i in range(5)]
    restarted.warm(MARKET, stored_bars, {}, [raised])
    assert restarted.observe([bar(seq, 5, volume=1e17)]) == []
    (retracted,) = restarted.observe([bar(seq + 1, 5, volume=25.0, closed=True)])
    assert retracted == msgspec.structs.replace(
        raised,
        status="retracted",
        status_seq=seq + 1,
        status_ts=minute(5) + seq + 1,
        final_value=25.0,
    )
    # Retracted, it holds back nothing; before it, no alert within the cooldown.
    (later,) = restarted.observe([bar(seq + 2, 6, volume=1000.0, closed=True)])
    assert later.minute == minute(6)


def test_warm_with_a_confirmed_alert_keeps_the_cooldown_and_retracts_on_correction() -> None:
    """A stored confirmed alert holds the cooldown after a restart and a correction of its
    minute still retracts it."""
    settings_ = alert_settings(cooldown_seconds=3600)
    first = SpikeDetector(settings_)
    seq = steady(first, 5)
    (confirmed,) = first.observe([bar(seq, 5, volume=45.0, closed=True)])
    restarted = SpikeDetector(settings_)
    stored_bars = [bar(i, i, volume=10.0, closed=True) for i in range(5)]
    stored_bars.append(bar(seq, 5, volume=45.0, closed=True))
    restarted.warm(MARKET, stored_bars, {}, [confirmed])
    assert restarted.observe([bar(seq + 1, 6, volume=1000.0)]) == []  # cooldown
    (retracted,) = restarted.observe([bar(seq + 2, 5, volume=20.0, closed=True)])
    assert (retracted.status, retracted.final_value) == ("retracted", 20.0)


def test_judge_refuses_a_minute_it_does_not_hold() -> None:
    """The rule judges again only minutes it holds, at most correction_minutes back."""
    detector = SpikeDetector(alert_settings(correction_minutes=1))
    steady(detector, 5)
    rule = detector._markets[MARKET].rule
    assert [rule.holds(minute(i)) for i in (2, 3, 4, 5)] == [False, True, True, False]
    with pytest.raises(ValueError, match="not held"):
        rule.judge(minute(2))


@st.composite
def closing_streams(draw: st.DrawFn) -> list[Update]:
    """Forming and closed updates: new minutes, late closes, corrections, re-deliveries."""
    updates = []
    index = 0
    seq = 0
    for _ in range(draw(st.integers(1, 150))):
        index = max(index + draw(st.sampled_from([0, 0, 0, 1, 1, 2, -1, -2, -4, 7])), 0)
        seq = max(seq + draw(st.sampled_from([1, 1, 1, 1, 0, -1])), 0)
        close = float(draw(st.integers(1, 6)))
        volume = float(draw(st.sampled_from([0, 1, 1, 2, 3, 4, 8, 13, 40])))
        updates.append(Update(minute(index), seq, close, volume, draw(st.booleans())))
    return updates


def as_ticks(updates: list[Update]) -> list[Tick]:
    return [
        bar(u.seq, (u.minute - T0) // MINUTE_MS, u.close, u.volume, closed=u.closed)
        for u in updates
    ]


def final_states(versions: list[Alert]) -> dict[tuple[str, int], ReferenceAlert]:
    """The last state of each alert, as the reference states it."""
    states: dict[tuple[str, int], ReferenceAlert] = {}
    for alert in versions:
        assert alert.status_seq is not None
        states[alert.kind, alert.minute] = ReferenceAlert(
            alert.status, alert.seq, alert.samples, alert.mean, alert.status_seq, alert.final_value
        )
    return states


_STATUS_PARAMS = st.builds(
    RuleParams,
    factor=st.just(2.0),
    window_minutes=st.sampled_from([2, 5, 60]),
    min_samples=st.integers(1, 3),
    min_active_minutes=st.integers(0, 2),
    min_zscore=st.sampled_from([0.0, 1.0]),
    cooldown_ms=st.sampled_from([0, 1, 2, 5]).map(lambda m: m * MINUTE_MS),
)


def settings_of(params: RuleParams, correction: int) -> AlertsSettings:
    return alert_settings(
        factor=params.factor,
        window_minutes=params.window_minutes,
        min_samples=params.min_samples,
        min_active_minutes=params.min_active_minutes,
        min_zscore=params.min_zscore,
        cooldown_seconds=params.cooldown_ms // 1000,
        correction_minutes=correction,
    )


@settings(max_examples=200, deadline=None)
@given(
    updates=closing_streams(),
    params=_STATUS_PARAMS,
    correction=st.sampled_from([0, 1, 3]),
    cuts=st.lists(st.integers(0, 150), max_size=6),
)
def test_statuses_match_the_reference_in_any_batches(
    updates: list[Update], params: RuleParams, correction: int, cuts: list[int]
) -> None:
    """Every alert's final state (status, numbers, status seq) and the count left provisional
    equal the brute-force reference, however the ticks are split into batches."""
    detector = SpikeDetector(settings_of(params, correction))
    ticks = as_ticks(updates)
    versions: list[Alert] = []
    bounds = [0, *sorted(cuts), len(ticks)]
    for start, end in itertools.pairwise(bounds):
        batch = detector.observe(ticks[start:end])
        assert len({a.alert_id for a in batch}) == len(batch)
        versions += batch
    expected, left = detector_states(updates, params, correction)
    assert final_states(versions) == expected
    assert detector.left_provisional == left


@settings(max_examples=200, deadline=None)
@given(
    updates=closing_streams(),
    params=_STATUS_PARAMS,
    correction=st.sampled_from([0, 1, 3]),
    split=st.integers(1, 149),
)
def test_restart_from_storage_gives_the_same_states(
    updates: list[Update], params: RuleParams, correction: int, split: int
) -> None:
    """Stopped before an update of a minute at least as new as all before it and warmed from
    what storage holds (newest bar per minute, stored alerts) as the service warms, the
    detector ends in the states of an uninterrupted run."""
    # A market's updates reach the reader in seq order (re-deliveries: the batch test).
    updates = [dataclasses.replace(u, seq=index) for index, u in enumerate(updates)]
    before, after = updates[:split], updates[split:]
    if not after or any(u.minute > after[0].minute for u in before):
        return  # a restart at a late update: the warm-up reads only bars before its minute
    settings_ = settings_of(params, correction)
    first = SpikeDetector(settings_)
    stored: dict[str, Alert] = {a.alert_id: a for a in first.observe(as_ticks(before))}
    bars: dict[int, Tick] = {}
    for tick in as_ticks(before):
        if tick.minute not in bars or tick.seq > bars[tick.minute].seq:
            bars[tick.minute] = tick
    # As _warm_new_markets reads them, from the first tick's minute m.
    m = after[0].minute
    reach = (params.window_minutes + correction) * MINUTE_MS
    first_open = m - correction * MINUTE_MS
    restarted = SpikeDetector(settings_)
    last: dict[str, int] = {}
    for alert in stored.values():
        if alert.minute < first_open and alert.status != "retracted":
            last[alert.metric] = max(last.get(alert.metric, alert.minute), alert.minute)
    restarted.warm(
        MARKET,
        [b for b in bars.values() if m - reach <= b.minute < m],
        last,
        [a for a in stored.values() if a.minute >= first_open],
    )
    for alert in restarted.observe(as_ticks(after)):
        stored[alert.alert_id] = alert
    expected, left = detector_states(updates, params, correction)
    assert final_states(list(stored.values())) == expected
    # The counter is per process: an alert whose minute passes out of reach exactly while
    # the service is down (before the restarted one's first minute, after the first one's
    # horizon) is counted by neither. Never more than an uninterrupted run counts.
    assert first.left_provisional + restarted.left_provisional <= left
