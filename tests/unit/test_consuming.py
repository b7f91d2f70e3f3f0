"""Retry decisions by error type, and batch decoding with counted skips."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg.exceptions as pg_errors
import pytest
import redis.exceptions as redis_errors
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    RecordTooLargeError,
)

from tickstream_shared.consuming import (
    DecodeCounters,
    commit_batch,
    decode_batch,
    is_transient,
    retry_until_done,
)
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
