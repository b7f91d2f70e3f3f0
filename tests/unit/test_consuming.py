"""Retry decisions by error type, batch decoding with counted skips, rebalance bookkeeping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg.exceptions as pg_errors
import pytest
import redis.exceptions as redis_errors
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    RecordTooLargeError,
)

from tickstream_shared.consuming import (
    ConsumerRuntime,
    DecodeCounters,
    commit_batch,
    decode_batch,
    is_transient,
    retry_until_done,
)
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick


def test_transient_errors_are_told_apart_by_type() -> None:
    """Lost connections and timeouts are transient; bugs and bad data are not."""
    transient = [
        ConnectionRefusedError(),
        TimeoutError(),
        pg_errors.ConnectionDoesNotExistError(),
        pg_errors.TooManyConnectionsError(),
        redis_errors.ConnectionError(),
        KafkaConnectionError(),
    ]
    permanent = [
        TypeError(),
        KeyError("x"),
        pg_errors.UniqueViolationError(),
        redis_errors.ResponseError(),
        RecordTooLargeError(),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


async def test_retry_outlives_transient_errors_and_raises_others() -> None:
    """A transient failure is retried until success; any other error is raised at once."""
    stop = asyncio.Event()
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("server went away")
        return "stored"

    assert await retry_until_done("store", flaky, stop) == "stored"
    assert len(calls) == 3

    async def buggy() -> str:
        calls.append(1)
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        await retry_until_done("store", buggy, stop)
    assert len(calls) == 4


async def test_retry_gives_up_when_stopping() -> None:
    """A stop during back-off returns None instead of retrying forever."""
    stop = asyncio.Event()

    async def down() -> str:
        stop.set()
        raise ConnectionRefusedError()

    assert await retry_until_done("store", down, stop) is None


@dataclass
class _Record:
    topic: str
    value: bytes | None
    partition: int = 0
    offset: int = 0
    key: bytes | None = None


def test_decode_batch_counts_bad_and_misrouted_ticks() -> None:
    """Bad JSON, a missing value and a tick on another market's topic are counted and skipped."""
    minute = 1_680_000_000_000
    tick = Tick("binance:btc-usdt", minute, 1, minute, minute, 10.0, 10.0, 10.0, 10.0, 1.0)
    records = [
        _Record("ticks.binance.btc-usdt", tick.encode()),
        _Record("ticks.binance.btc-usdt", b"{oops"),
        _Record("ticks.binance.btc-usdt", None),
        _Record("ticks.binance.eth-usdt", tick.encode()),
    ]
    counters = DecodeCounters()
    assert decode_batch(records, counters) == [tick]
    assert (counters.decoded, counters.skipped_bad) == (1, 3)


class _Consumer:
    """Stands in for aiokafka's consumer.commit: records offsets or raises what it is given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.committed: list[dict[str, int] | None] = []

    async def commit(self, offsets: dict[str, int] | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.committed.append(offsets)


async def test_commit_batch_survives_a_rebalance_or_an_outage_and_raises_a_bug() -> None:
    """A commit refused by a rebalance or an absent broker returns False; a bug propagates."""
    ok = _Consumer()
    assert await commit_batch(ok, {"tp": 5}) is True and ok.committed == [{"tp": 5}]
    for refused in (
        CommitFailedError("rebalanced"),
        IllegalStateError("no assignment"),
        KafkaConnectionError("down"),
    ):
        assert await commit_batch(_Consumer(refused)) is False
    with pytest.raises(TypeError):
        await commit_batch(_Consumer(TypeError("a bug")))


@dataclass
class _Coordinator:
    generation: int = -1


@dataclass
class _GroupConsumer:
    """What the runtime uses of an aiokafka group consumer: a generation, pauses, no records."""

    stop: asyncio.Event
    _coordinator: _Coordinator = field(default_factory=_Coordinator)
    paused: set[Any] = field(default_factory=set)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.stop.set()  # one turn of the loop per run()
        return {}

    def pause(self, *partitions: Any) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self.paused.difference_update(partitions)

    def highwater(self, tp: Any) -> int | None:
        return None


@dataclass
class _RecordingHandler:
    warmed: list[set[str]] = field(default_factory=list)
    forgotten: list[set[str]] = field(default_factory=list)

    async def assigned(self, markets: set[Market]) -> None:
        self.warmed.append({m.id for m in markets})

    def revoked(self, markets: set[Market]) -> None:
        self.forgotten.append({m.id for m in markets})

    async def handle(self, batch: Any, stop: asyncio.Event) -> bool:
        return True

    async def idle(self, stop: asyncio.Event) -> bool:
        return True


class _NoDeadLetters:
    sent = 0


async def test_rebalance_keeps_partitions_that_stay_only_across_one_generation() -> None:
    """g -> g+1 keeps what stays and warms only arrivals; a jumped generation keeps nothing."""
    a, b, c = (Market("unit", base, "usdt") for base in ("aaa", "bbb", "ccc"))
    pa, pb, pc = (TopicPartition(m.topic, 0) for m in (a, b, c))
    stop = asyncio.Event()
    consumer = _GroupConsumer(stop)
    handler = _RecordingHandler()
    dead_letters: Any = _NoDeadLetters()
    runtime = ConsumerRuntime(
        consumer, handler, dead_letters, batch_max=10, batch_wait_ms=1, stop=stop
    )

    async def rebalance(generation: int, partitions: set[Any]) -> None:
        await runtime.listener.on_partitions_revoked(runtime.owned)
        consumer._coordinator.generation = generation
        await runtime.listener.on_partitions_assigned(partitions)
        assert consumer.paused == set(runtime.arriving) == partitions - runtime.owned
        stop.clear()
        await runtime.run()  # prepares the arrivals, then resumes them
        assert consumer.paused == set() and runtime.owned == partitions

    await rebalance(1, {pa, pb})
    assert handler.warmed == [{a.id, b.id}] and handler.forgotten == [set()]
    await rebalance(2, {pb, pc})  # b stays: kept; a leaves; c arrives
    assert handler.warmed[1:] == [{c.id}] and handler.forgotten[1:] == [{a.id}]
    await rebalance(5, {pb, pc})  # expelled and rejoined: others may have read b and c
    assert handler.warmed[2:] == [{b.id, c.id}] and handler.forgotten[2:] == [{b.id, c.id}]
    counters = runtime.counters
    assert (counters.markets_warmed, counters.markets_kept, counters.markets_forgotten) == (
        5,
        1,
        3,
    )
