"""Watcher sources and publisher: replayed bars, synthetic bars and backfill, batching, failures."""

from __future__ import annotations

import asyncio
import csv
import gzip
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import CANDLES
from tickstream_shared.kafka import NotAppended
from tickstream_shared.naming import market_of
from tickstream_shared.schemas import MINUTE_MS, Tick, decode_tick
from tickstream_shared.settings import WatcherSettings
from tickstream_watcher.checkpoints import ResumePlan, ResumePoint, plan_resume
from tickstream_watcher.publisher import TickPublisher
from tickstream_watcher.sources import CHUNK_TICKS, ReplayProgress, ReplaySource, SyntheticSource
from tickstream_watcher.synthetic import SPIKE_PROBABILITY, SyntheticMarket, next_seq

T0 = 1_700_000_040_000  # 2023-11-14T22:14:00Z, a whole minute
HEADER = "ts_ms,open,high,low,close,volume\n"


async def replayed(folder: Path, **options: Any) -> list[Tick]:
    source = ReplaySource(WatcherSettings(source="replay", replay_dir=str(folder), **options))
    return [tick async for chunk in source.chunks() for tick in chunk]


def csv_rows(path: Path, limit: int) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))[:limit]


async def test_replay_bars_equal_the_csv_rows() -> None:
    """Every row of the shared candles becomes one closed bar with exactly the row's values."""
    if not CANDLES.is_dir():
        pytest.skip(f"candle data not found at {CANDLES}")
    markets = ("binance:btc-usdt", "binance:doge-usdt", "binance:eth-usdt")
    limit = 600
    before = time.time_ns() // 1_000_000
    ticks = await replayed(CANDLES, replay_markets=markets, replay_limit_minutes=limit)
    after = time.time_ns() // 1_000_000
    expected = []
    for market in markets:
        pair = market_of(market)
        rows = csv_rows(CANDLES / f"{pair.exchange}_{pair.base}-{pair.quote}_1m.csv.gz", limit)
        for row_number, row in enumerate(rows):
            minute = int(row["ts_ms"])
            bar = [float(row[c]) for c in ("open", "high", "low", "close", "volume")]
            expected.append(
                Tick(market, minute, row_number, minute + MINUTE_MS, 0, *bar, None, True)
            )
    expected.sort(key=lambda t: (t.minute, t.market))
    assert [msgspec.structs.replace(t, received_ts=0) for t in ticks] == expected
    assert all(before <= t.received_ts <= after for t in ticks)
    assert [decode_tick(t.encode(), now_ms=after) for t in ticks] == ticks
    again = await replayed(CANDLES, replay_markets=markets, replay_limit_minutes=limit)
    assert [(t.market, t.minute, t.seq) for t in again] == [
        (t.market, t.minute, t.seq) for t in ticks
    ]


async def test_replay_skips_malformed_rows_by_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed row is logged with its line number and skipped; the others keep their seq."""
    rows = [
        f"{T0},10,11,9,10.5,2",  # line 2: good
        f"{T0 + MINUTE_MS},ten,11,9,10,1",  # line 3: not a number
        f"{T0 + 2 * MINUTE_MS},10,11,9",  # line 4: short
        f"{T0 + 3 * MINUTE_MS},10,11,9,12,1",  # line 5: close above high
        f"{T0 + 4 * MINUTE_MS + 1},10,11,9,10,1",  # line 6: not a minute start
        f"{T0},10,11,9,10,1",  # line 7: not after the previous row
        f"{T0 + 5 * MINUTE_MS},10,11,9,10,-1",  # line 8: negative volume
        f"{T0 + 6 * MINUTE_MS},10,11,0,10,1",  # line 9: zero low
        f"{T0 + 7 * MINUTE_MS},10,11,9,10,\x00",  # line 10: a NUL byte (csv.Error)
        f"{T0 + 8 * MINUTE_MS},10,11,9,10,\udcff",  # line 11: not UTF-8
        f"{T0 + 9 * MINUTE_MS},10,11,9,nan,1",  # line 12: not a finite price
        f"{T0 + 10 * MINUTE_MS},10,11,9,9.5,0",  # line 13: good
    ]
    text = HEADER + "\n".join(rows) + "\n"
    (tmp_path / "kraken_eth-usd_1m.csv").write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="tickstream_watcher.candles"):
        ticks = await replayed(tmp_path)
    assert [(t.seq, t.minute, t.close, t.volume) for t in ticks] == [
        (0, T0, 10.5, 2.0),
        (11, T0 + 10 * MINUTE_MS, 9.5, 0.0),
    ]
    skipped = [r.getMessage() for r in caplog.records]
    assert [m.split(" skipped")[0].rsplit(" ", 1)[1] for m in skipped] == [
        str(n) for n in range(3, 13)
    ]
    assert all("kraken_eth-usd_1m.csv line" in m for m in skipped)


async def test_replay_truncated_gzip_ends_that_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated gzip file gives the rows before the damage, logs it, and the replay goes on."""
    rows = "".join(f"{T0 + i * MINUTE_MS},10,11,9,10,{i}\n" for i in range(20_000))
    whole = gzip.compress((HEADER + rows).encode())
    (tmp_path / "kraken_eth-usd_1m.csv.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "kraken_btc-usd_1m.csv").write_text(HEADER + f"{T0},10,11,9,10,1\n")
    ticks = await replayed(tmp_path)
    eth = [t.seq for t in ticks if t.market == "kraken:eth-usd"]
    assert 0 < len(eth) < 20_000 and eth == list(range(len(eth)))
    assert [t.market for t in ticks].count("kraken:btc-usd") == 1
    assert "unreadable, rest of the file skipped" in caplog.text


async def test_replay_file_without_the_columns_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file whose header lacks a column is logged and contributes no bars."""
    (tmp_path / "kraken_eth-usd_1m.csv").write_text("ts_ms,close\n1,2\n")
    (tmp_path / "kraken_btc-usd_1m.csv").write_text(HEADER + f"{T0},10,11,9,10,1\n")
    ticks = await replayed(tmp_path)
    assert [t.market for t in ticks] == ["kraken:btc-usd"]
    assert "header must name the columns" in caplog.text


async def test_replay_reports_connecting_then_live_then_finished(tmp_path: Path) -> None:
    """A replay is `connecting` until its first chunk is sent, then `live`, then `finished`."""
    rows = "".join(f"{T0 + i * MINUTE_MS},10,11,9,10,1\n" for i in range(CHUNK_TICKS + 1))
    (tmp_path / "kraken_eth-usd_1m.csv").write_text(HEADER + rows)
    (tmp_path / "kraken_btc-usd_1m.csv").write_text(HEADER + f"{T0},10,11,9,10,1\n")
    source = ReplaySource(WatcherSettings(source="replay", replay_dir=str(tmp_path)))

    def reported() -> list[tuple[str, str, str, str, int]]:
        return [
            (m, r.source, r.origin, r.state, r.reported_ms)
            for m, r in sorted(source.feed_reports(T0).items())
        ]

    def every(state: str) -> list[tuple[str, str, str, str, int]]:
        return [(m, "replay", "replay", state, T0) for m in ("kraken:btc-usd", "kraken:eth-usd")]

    assert reported() == every("connecting")
    chunks = source.chunks()
    before = time.time_ns() // 1_000_000
    assert len(await anext(chunks)) == CHUNK_TICKS  # handed over, not yet sent
    assert reported() == every("connecting")
    assert len(await anext(chunks)) == 2  # the publisher came back for more: the first was sent
    assert reported() == every("live")
    assert all(
        r.last_data_ms and r.last_data_ms >= before for r in source.feed_reports(T0).values()
    )
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)
    assert reported() == every("finished")


async def test_synthetic_reports_connecting_until_its_first_bars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The walk's markets are `connecting` until its first bars are handed over, then `live`."""
    monkeypatch.setattr(time, "time_ns", FixedClock(T0 * 1_000_000))
    settings = WatcherSettings(markets=("binance:btc-usdt",), synthetic_backfill_minutes=0)
    source = SyntheticSource(settings)
    chunks = source.chunks()
    assert source.feed_reports(T0)["binance:btc-usdt"].state == "connecting"
    await anext(chunks)
    report = source.feed_reports(T0 + 5)["binance:btc-usdt"]
    assert (report.source, report.origin, report.state) == ("synthetic", "synthetic", "live")
    assert (report.reported_ms, report.last_data_ms) == (T0 + 5, T0)
    await chunks.aclose()


def test_replay_progress_logs_event_time_and_rate(caplog: pytest.LogCaptureFixture) -> None:
    """Progress is logged once per five seconds of wall time, with event time and ticks/s."""
    now = [100.0]
    progress = ReplayProgress(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tickstream_watcher.sources"):
        now[0] = 103.0
        progress.emitted(3000, T0)
        now[0] = 105.0
        progress.emitted(7000, T0 + MINUTE_MS)
        now[0] = 106.0
        progress.emitted(5000, T0 + 2 * MINUTE_MS)
    assert [r.getMessage() for r in caplog.records] == [
        "replay at 2023-11-14T22:15:00Z, 2000 ticks/s"
    ]


def drive(market: SyntheticMarket, steps: list[int]) -> Iterator[tuple[int, Tick]]:
    """(latest wall time so far, update) of `market` driven at T0 + cumulative `steps`.

    Steps may be negative: a wall clock that steps back.
    """
    now = latest = T0 + 12_345
    for step in steps:
        now += step
        latest = max(latest, now)
        for tick in market.update(now, now * 1000):
            yield latest, tick


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(
        st.one_of(st.integers(1, 3000), st.integers(-5000, 0), st.integers(60_000, 250_000)),
        min_size=1,
        max_size=300,
    ),
)
def test_synthetic_bars_are_consistent(seed: int, steps: list[int]) -> None:
    """Forming updates stay a valid bar, volume only grows in a minute, one close per minute."""
    market = SyntheticMarket("binance:sol-usdt", "sol", seed, 3)
    updates = list(drive(market, steps))
    by_minute: dict[int, list[Tick]] = defaultdict(list)
    previous: Tick | None = None
    for now, tick in updates:
        assert decode_tick(tick.encode(), now_ms=now) == tick
        assert tick.low <= min(tick.open, tick.close) <= max(tick.open, tick.close) <= tick.high
        if previous is not None:
            assert tick.seq > previous.seq
            assert tick.minute >= previous.minute
            if tick.minute > previous.minute:
                assert previous.closed and tick.open == previous.close
        if tick.closed:
            assert tick.exchange_ts == tick.minute + MINUTE_MS
            assert tick.received_ts == now
        else:
            assert tick.exchange_ts == tick.received_ts
            assert tick.minute <= tick.exchange_ts < tick.minute + MINUTE_MS
        by_minute[tick.minute].append(tick)
        previous = tick
    minutes = sorted(by_minute)
    for minute in minutes:
        bar = by_minute[minute]
        volumes = [t.volume for t in bar]
        assert volumes == sorted(volumes)
        closes = [t.closed for t in bar]
        # Every minute but the forming last one ends with exactly one closed update.
        assert closes == [False] * (len(bar) - 1) + [minute != minutes[-1]]


def test_synthetic_spike_minutes_happen() -> None:
    """About SPIKE_PROBABILITY of minutes trade several times the usual volume, few others do."""
    market = SyntheticMarket("binance:btc-usdt", "btc", 7, 0)
    volumes = [market.backfill_bar(T0 + i * MINUTE_MS, i, T0).volume for i in range(3000)]
    usual = sorted(volumes)[len(volumes) // 2]
    expected = 3000 * SPIKE_PROBABILITY
    assert expected / 2 <= sum(v > 4 * usual for v in volumes) <= expected * 2
    assert sum(usual / 3 < v < 3 * usual for v in volumes) >= 0.98 * 3000


def test_seq_is_the_clock_and_always_grows() -> None:
    """A seq is the wall clock in microseconds, or one more than the last when that is later."""
    assert next_seq(0, 1_700_000_000_000_000) == 1_700_000_000_000_000
    assert next_seq(1_700_000_000_000_005, 1_700_000_000_000_000) == 1_700_000_000_000_006


class FixedClock:
    """Stands in for time.time_ns: a settable wall clock."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


async def synthetic_run(
    monkeypatch: pytest.MonkeyPatch,
    start_ms: int,
    backfill: int,
    markets: tuple[str, ...],
    plan: ResumePlan | None = None,
) -> tuple[list[list[Tick]], list[Tick]]:
    """(backfill chunks, first live chunk) of a synthetic source started at `start_ms`."""
    monkeypatch.setattr(time, "time_ns", FixedClock(start_ms * 1_000_000))
    settings = WatcherSettings(markets=markets, synthetic_backfill_minutes=backfill, seed=5)
    source = SyntheticSource(settings)
    if plan is not None:
        source.resume(plan)
    chunks = source.chunks()
    backfill_chunks = []
    async for chunk in chunks:
        if not all(t.closed for t in chunk):
            await chunks.aclose()
            return backfill_chunks, chunk
        backfill_chunks.append(chunk)
    raise AssertionError("the synthetic source ended")


async def test_synthetic_backfill_comes_first_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backfill: closed bars for the minutes before the start, by minute, seqs below live ones."""
    markets = ("binance:btc-usdt", "binance:eth-usdt", "kraken:btc-usd")
    start_ms = T0 + 25_500
    backfill_chunks, live = await synthetic_run(monkeypatch, start_ms, 1000, markets)
    # Chunks of whole minutes: the first minute that reaches CHUNK_TICKS ends a chunk.
    first_chunk = -(-CHUNK_TICKS // 3) * 3
    assert [len(c) for c in backfill_chunks] == [first_chunk, 3000 - first_chunk]
    backfill = [t for chunk in backfill_chunks for t in chunk]
    first = T0 - 1000 * MINUTE_MS
    assert [(t.minute, t.market) for t in backfill] == [
        (first + i * MINUTE_MS, m) for i in range(1000) for m in markets
    ]
    start_us = start_ms * 1000
    assert [t.seq for t in backfill] == [start_us - 1000 + i for i in range(1000) for _ in markets]
    assert all(t.closed and t.exchange_ts == t.minute + MINUTE_MS for t in backfill)
    assert all(decode_tick(t.encode(), now_ms=start_ms) == t for t in backfill)
    last_close = {t.market: t.close for t in backfill[-3:]}
    assert [(t.market, t.minute, t.seq, t.closed) for t in live] == [
        (m, T0, start_us, False) for m in markets
    ]
    assert [t.open for t in live] == [last_close[m] for m in markets]
    assert all(t.exchange_ts == t.received_ts == start_ms for t in live)


async def test_synthetic_seqs_grow_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted source's backfill and live seqs are all above the previous run's."""
    markets = ("binance:btc-usdt",)
    first_backfill, first_live = await synthetic_run(monkeypatch, T0, 1440, markets)
    again_backfill, again_live = await synthetic_run(monkeypatch, T0 + 1000, 1440, markets)
    earlier = [t.seq for chunk in [*first_backfill, first_live] for t in chunk]
    later = [t.seq for chunk in [*again_backfill, again_live] for t in chunk]
    assert min(later) > max(earlier)
    assert later == sorted(later) and len(set(later)) == len(later)


async def test_a_resumed_synthetic_source_continues_after_the_last_closed_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resumed 10 minutes later, it backfills only the minutes after each market's last closed
    bar, from that bar's close and above its seq; a market without checkpoints starts afresh."""
    markets = ("binance:btc-usdt", "kraken:btc-usd")
    first_backfill, _ = await synthetic_run(monkeypatch, T0, 60, markets[:1])
    last = first_backfill[-1][-1]
    assert last.closed and last.minute == T0 - MINUTE_MS
    plan = plan_resume({last.market: ResumePoint(last.minute, last.seq)}, {last.market: last})
    later = T0 + 10 * MINUTE_MS
    backfill_chunks, live = await synthetic_run(monkeypatch, later, 60, markets, plan)
    backfill = [t for chunk in backfill_chunks for t in chunk]
    resumed = [t for t in backfill if t.market == last.market]
    assert [t.minute for t in resumed] == [T0 + i * MINUTE_MS for i in range(10)]
    assert resumed[0].open == last.close
    assert all(t.seq > last.seq for t in resumed)
    fresh = [t.minute for t in backfill if t.market == markets[1]]
    assert fresh == [later - (60 - i) * MINUTE_MS for i in range(60)]
    assert [t.minute for t in live] == [later, later]


async def test_synthetic_without_backfill_starts_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHER_SYNTHETIC_BACKFILL_MINUTES=0 emits live updates only."""
    backfill, live = await synthetic_run(monkeypatch, T0 + 1, 0, ("binance:btc-usdt",))
    assert backfill == []
    assert [(t.minute, t.seq) for t in live] == [(T0, (T0 + 1) * 1000)]


class FakeBatch:
    """Stands in for aiokafka's BatchBuilder: holds up to `capacity` records."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[int, bytes, bytes]] = []

    def append(self, *, timestamp: int, key: bytes, value: bytes) -> object | None:
        if len(self.records) == self.capacity:
            return None
        self.records.append((timestamp, key, value))
        return object()


class FakeProducer:
    """The part of AIOKafkaProducer the publisher uses; deliveries are settled by the test."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sent: list[tuple[str, int, FakeBatch, asyncio.Future[RecordMetadata]]] = []
        self.refuse: Exception | None = None  # raised by the next send_batch
        self.partition_lookups: list[str] = []

    async def partitions_for(self, topic: str) -> set[int]:
        self.partition_lookups.append(topic)
        return {0, 1, 2}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        if self.refuse is not None:
            raise self.refuse
        delivery: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, batch, delivery))
        return delivery

    def settle(self, offset: int = 0) -> None:
        """Acknowledge every batch on its way, appended at `offset` (-1: not appended)."""
        for topic, partition, _, delivery in self.sent:
            if not delivery.done():
                where = TopicPartition(topic, partition)
                delivery.set_result(RecordMetadata(topic, partition, where, offset, 0, 0, 0))

    def batches(self) -> list[tuple[str, int]]:
        return [(topic[6:], len(batch.records)) for topic, _, batch, _ in self.sent]

    def records(self, topic: str) -> list[tuple[int, bytes, bytes]]:
        return [r for t, _, batch, _ in self.sent if t == topic for r in batch.records]


def bars(market: str, first: int, count: int) -> list[Tick]:
    return [
        Tick(market, T0 + i * MINUTE_MS, i, T0 + (i + 1) * MINUTE_MS, T0, 1.0, 2.0, 0.5, 1.5, 3.0)
        for i in range(first, first + count)
    ]


def as_records(ticks: list[Tick]) -> list[tuple[int, bytes, bytes]]:
    return [(t.exchange_ts, t.market.encode(), t.encode()) for t in ticks]


async def yield_until(condition: Any) -> None:
    """Let other tasks run until `condition()` holds (scheduling steps, not wall time)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def flush_acknowledging(producer: FakeProducer, publisher: TickPublisher) -> None:
    """Flush while the fake broker acknowledges every batch as it arrives."""
    flushing = asyncio.create_task(publisher.flush())
    for _ in range(100):
        if flushing.done():
            return await flushing
        producer.settle()
        await asyncio.sleep(0)
    raise AssertionError("flush never finished")


async def test_publisher_waits_when_max_in_flight_are_unacknowledged() -> None:
    """Per-market batches, in order, keyed and stamped; past max_in_flight, publish waits."""
    producer = FakeProducer(capacity=4)
    btc, eth = bars("binance:btc-usdt", 0, 7), bars("kraken:eth-usd", 0, 2)
    async with TickPublisher(producer, max_in_flight=5) as publisher:
        publishing = asyncio.create_task(publisher.publish([btc[0], eth[0], *btc[1:], eth[1]]))
        # Five ticks handed over: both open batches go out and publish waits for them.
        await yield_until(lambda: len(producer.sent) == 2)
        assert not publishing.done()
        producer.settle()
        await publishing
        await flush_acknowledging(producer, publisher)
    assert publisher.published == 9
    assert producer.batches() == [
        ("binance.btc-usdt", 4),
        ("kraken.eth-usd", 1),
        ("binance.btc-usdt", 3),
        ("kraken.eth-usd", 1),
    ]
    assert producer.records("ticks.binance.btc-usdt") == as_records(btc)
    eth_values = [value for _, _, value in producer.records("ticks.kraken.eth-usd")]
    assert [decode_tick(value, now_ms=T0) for value in eth_values] == eth


async def test_publisher_collects_while_a_batch_is_on_its_way() -> None:
    """A market's new ticks wait in one batch until its previous batch is acknowledged."""
    producer = FakeProducer(capacity=100)
    btc = bars("binance:btc-usdt", 0, 6)
    async with TickPublisher(producer, max_in_flight=100) as publisher:
        await publisher.publish(btc[:1])
        await publisher.publish(btc[1:3])
        await publisher.publish(btc[3:5])
        assert producer.batches() == [("binance.btc-usdt", 1)]
        producer.settle()
        # Sent by the publisher's own task: no further publish call is needed.
        await yield_until(lambda: len(producer.sent) == 2)
        await publisher.publish(btc[5:])
        await flush_acknowledging(producer, publisher)
    sizes = [size for _, size in producer.batches()]
    assert sizes == [1, 4, 1]
    assert producer.records("ticks.binance.btc-usdt") == as_records(btc)
    assert publisher.published == 6


async def test_publisher_partition_is_computed_once_like_send() -> None:
    """The partition is murmur2 of the key, as producer.send() picks it, looked up once."""
    producer = FakeProducer(capacity=100)
    async with TickPublisher(producer, max_in_flight=100) as publisher:
        await publisher.publish(bars("binance:btc-usdt", 0, 3))
        producer.settle()
        await publisher.publish(bars("binance:btc-usdt", 3, 3))
        await flush_acknowledging(producer, publisher)
    expected = (murmur2(b"binance:btc-usdt") & 0x7FFFFFFF) % 3
    assert producer.partition_lookups == ["ticks.binance.btc-usdt"]
    assert [partition for _, partition, _, _ in producer.sent] == [expected, expected]


async def test_publisher_failed_delivery_stops_publishing() -> None:
    """A failed delivery is raised by the next publish and by every flush: nothing lost silently."""
    producer = FakeProducer(capacity=100)
    async with TickPublisher(producer, max_in_flight=100) as publisher:
        await publisher.publish(bars("binance:btc-usdt", 0, 2))
        producer.sent[0][3].set_exception(ConnectionError("broker gone"))
        with pytest.raises(ConnectionError, match="broker gone"):
            await publisher.flush()
        with pytest.raises(ConnectionError, match="broker gone"):
            await publisher.publish(bars("binance:btc-usdt", 2, 1))
        with pytest.raises(ConnectionError, match="broker gone"):
            await publisher.flush()
    assert publisher.published == 0
    assert len(producer.sent) == 1


async def test_publisher_batch_acknowledged_but_not_appended_stops_publishing() -> None:
    """An acknowledgement without an offset (a broker that took the batch for a duplicate)
    fails the publisher like a failed delivery: those ticks are not counted as published."""
    producer = FakeProducer(capacity=100)
    async with TickPublisher(producer, max_in_flight=100) as publisher:
        await publisher.publish(bars("binance:btc-usdt", 0, 2))
        producer.settle(offset=-1)
        with pytest.raises(NotAppended, match="without an offset"):
            await publisher.flush()
    assert publisher.published == 0


async def test_publisher_refused_batch_stops_publishing() -> None:
    """A batch the producer refuses (closed, timed out) fails the publisher, even from its task."""
    producer = FakeProducer(capacity=100)
    async with TickPublisher(producer, max_in_flight=100) as publisher:
        await publisher.publish(bars("binance:btc-usdt", 0, 1))
        await publisher.publish(bars("binance:btc-usdt", 1, 1))
        producer.refuse = RuntimeError("producer closed")
        producer.settle()  # frees the market: its own task sends the open batch, refused
        with pytest.raises(RuntimeError, match="producer closed"):
            await publisher.flush()
        with pytest.raises(RuntimeError, match="producer closed"):
            await publisher.publish(bars("binance:btc-usdt", 2, 1))
    assert publisher.published == 1


def test_random_is_not_global() -> None:
    """The synthetic model draws from its own generator, never from the shared `random` state."""
    random.seed(1)
    expected = random.random()
    random.seed(1)
    list(drive(SyntheticMarket("binance:btc-usdt", "btc", 1, 0), [500] * 200))
    assert random.random() == expected
