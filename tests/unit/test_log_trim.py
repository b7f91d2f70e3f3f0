"""Which of a partition's stored batches the local log trimmer deletes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tickstream_shared.log_trim import Retention, StoredBatch, expired_count

NOW = 1_800_000_000_000


def batches(*ages_and_sizes: tuple[int, int]) -> list[StoredBatch]:
    return [
        StoredBatch(offset * 10, NOW - age_ms, size)
        for offset, (age_ms, size) in enumerate(ages_and_sizes)
    ]


def test_batches_older_than_retention_ms_go_oldest_first() -> None:
    """Only the leading batches written more than retention.ms ago are expired."""
    log = batches((9000, 10), (5001, 10), (5000, 10), (100, 10))
    assert expired_count(log, 40, Retention(ms=5000, bytes=None), NOW) == 2


def test_batches_go_while_the_log_is_above_retention_bytes() -> None:
    """The oldest go until what is left is within retention.bytes."""
    log = batches((3, 100), (2, 100), (1, 100), (0, 100))
    assert expired_count(log, 400, Retention(ms=None, bytes=250), NOW) == 2
    assert expired_count(log, 400, Retention(ms=None, bytes=200), NOW) == 2
    assert expired_count(log, 400, Retention(ms=None, bytes=199), NOW) == 3


def test_the_newest_batch_always_stays() -> None:
    """Even past both limits the newest batch is kept: it holds the log end."""
    log = batches((9000, 100), (8000, 100))
    assert expired_count(log, 200, Retention(ms=1, bytes=1), NOW) == 1
    assert expired_count([], 0, Retention(ms=1, bytes=1), NOW) == 0


def test_retention_from_topic_configs() -> None:
    """Missing, unreadable or negative (Kafka's unlimited) values set no limit."""
    assert Retention.from_configs({"retention.ms": "60000", "retention.bytes": "-1"}) == (
        Retention(ms=60000, bytes=None)
    )
    assert Retention.from_configs({"retention.bytes": "x"}) == Retention(ms=None, bytes=None)


@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 10**4)), max_size=50),
    st.integers(0, 10**6),
    st.integers(0, 10**5),
)
def test_what_is_left_keeps_the_retention(
    raw: list[tuple[int, int]], retention_ms: int, retention_bytes: int
) -> None:
    """After trimming, the log is within retention.bytes and retention.ms, or is one batch."""
    ages = sorted((age for age, _ in raw), reverse=True)
    log = batches(*((age, size) for age, (_, size) in zip(ages, raw, strict=True)))
    total = sum(b.size for b in log)
    count = expired_count(log, total, Retention(retention_ms, retention_bytes), NOW)
    left = log[count:]
    assert len(left) >= min(1, len(log))
    if len(left) > 1:
        assert sum(b.size for b in left) <= retention_bytes
        assert NOW - left[0].written_ms <= retention_ms
    # Nothing is deleted that both limits would keep.
    if count:
        gone = log[count - 1]
        assert NOW - gone.written_ms > retention_ms or sum(b.size for b in log[count - 1 :]) > (
            retention_bytes
        )
