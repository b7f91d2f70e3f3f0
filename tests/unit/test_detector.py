"""Tests of the SpikeDetector: seq order, one alert per minute, cooldown, warm-up."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.spike_reference import RuleParams, Update, detector_alerts
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
    seq: int, index: int, close: float = 10.0, volume: float = 1.0, market: str = MARKET
) -> Tick:
    """An update of minute `index`, stamped `seq` ms into it."""
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
    )


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
