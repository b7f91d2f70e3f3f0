"""PostgreSQL helpers: pool creation, schema, tick storage and the history query."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from importlib import resources
from typing import Any

import asyncpg

from tickstream_shared.schemas import Tick
from tickstream_shared.settings import DatabaseSettings

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SCHEMA_LOCK = 0x7469636B  # "tick": serialises concurrent schema creation by several services


def ms_to_datetime(ms: int) -> dt.datetime:
    """Exact conversion of epoch milliseconds (no float rounding)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def datetime_to_ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


async def create_pool(settings: DatabaseSettings, *, max_size: int = 4) -> Any:
    """An asyncpg pool; caller closes it. Raises OSError/asyncpg errors when unreachable."""
    return await asyncpg.create_pool(settings.url, min_size=1, max_size=max_size)


async def ensure_schema(pool: Any) -> None:
    """Create tables and indexes if missing. Idempotent; safe from several processes at once."""
    sql = resources.files("tickstream_shared").joinpath("schema.sql").read_text()
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _SCHEMA_LOCK)
        try:
            await conn.execute(sql)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _SCHEMA_LOCK)


_TICK_COLUMNS = ("market", "exchange_ts", "seq", "received_ts", "price", "volume")


async def store_ticks(pool: Any, ticks: Sequence[Tick]) -> int:
    """Store ticks with one COPY; duplicates (same market, time, seq) are ignored.

    Returns how many rows were new. Safe to call twice with the same ticks. On cancellation the
    transaction is rolled back and nothing is stored.
    """
    if not ticks:
        return 0
    records = [
        (
            t.market.id,
            ms_to_datetime(t.exchange_ts),
            t.seq,
            ms_to_datetime(t.received_ts),
            t.price,
            t.volume,
        )
        for t in ticks
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ticks_stage "
            "(LIKE ticks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("ticks_stage", records=records, columns=_TICK_COLUMNS)
        status: str = await conn.execute(
            "INSERT INTO ticks SELECT * FROM ticks_stage ON CONFLICT DO NOTHING"
        )
    return int(status.rsplit(" ", 1)[1])


async def recent_ticks(
    pool: Any, market_id: str, span_ms: int, *, until_ms: int | None = None
) -> list[Tick]:
    """Ticks of one market in the span_ms of event time ending at until_ms (default: latest)."""
    async with pool.acquire() as conn:
        if until_ms is None:
            latest = await conn.fetchval(
                "SELECT max(exchange_ts) FROM ticks WHERE market = $1", market_id
            )
            if latest is None:
                return []
            until_ms = datetime_to_ms(latest)
        rows = await conn.fetch(
            "SELECT exchange_ts, seq, received_ts, price, volume FROM ticks "
            "WHERE market = $1 AND exchange_ts > $2 AND exchange_ts <= $3 "
            "ORDER BY exchange_ts, seq",
            market_id,
            ms_to_datetime(until_ms - span_ms),
            ms_to_datetime(until_ms),
        )
    exchange, pair = market_id.split(":", 1)
    base, quote = pair.split("-", 1)
    return [
        Tick(
            exchange,
            base,
            quote,
            row["seq"],
            datetime_to_ms(row["exchange_ts"]),
            datetime_to_ms(row["received_ts"]),
            row["price"],
            row["volume"],
        )
        for row in rows
    ]


async def known_markets(pool: Any) -> list[str]:
    """Every market with at least one stored tick."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT DISTINCT market FROM ticks ORDER BY market")
    return [row["market"] for row in rows]
