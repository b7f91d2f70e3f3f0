"""PostgreSQL helpers: pool creation, schema and retention, bar storage and the history query."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, Final

import asyncpg

from tickstream_shared.consuming import is_transient
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import DatabaseSettings

log = logging.getLogger(__name__)

_SCHEMA_LOCK = 0x7469636B  # "tick": serialises concurrent schema creation by several services
DAY_MS = 86_400_000


async def create_pool(settings: DatabaseSettings, *, max_size: int = 4) -> Any:
    """An asyncpg pool; caller closes it. Raises OSError/asyncpg errors when unreachable."""
    return await asyncpg.create_pool(settings.url, min_size=1, max_size=max_size)


# Waits between attempts to reach PostgreSQL at start: one log line each.
OPEN_RETRY_S: Final = (1.0, 2.0, 5.0)


async def open_pool(
    settings: DatabaseSettings, stop: asyncio.Event, *, max_size: int = 4
) -> Any | None:
    """A pool on a database whose schema is in place, once PostgreSQL answers; None if `stop`
    is set first. Transient failures (see `is_transient`) are retried with one warning each;
    any other error is raised. Safe to cancel (nothing is left open).
    """
    for attempt in itertools.count():
        pool = None
        try:
            pool = await create_pool(settings, max_size=max_size)
            await ensure_schema(pool)
            opened, pool = pool, None  # the caller's now: not terminated below
            return opened
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = OPEN_RETRY_S[min(attempt, len(OPEN_RETRY_S) - 1)]
            log.warning("waiting for PostgreSQL: %r; trying again in %.0f s", exc, delay)
        finally:
            if pool is not None:
                pool.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return None
    raise AssertionError("unreachable")


async def ensure_schema(pool: Any, settings: DatabaseSettings | None = None) -> None:
    """Create tables, indexes and functions if missing; with `settings`, apply retention.

    Idempotent; safe from several processes at once (an advisory lock serialises them).
    """
    sql = resources.files("tickstream_shared").joinpath("schema.sql").read_text()
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _SCHEMA_LOCK)
        try:
            await conn.execute(sql)
            if settings is not None:
                await conn.fetchval(
                    "SELECT tickstream_configure_retention($1)", settings.retention_days * DAY_MS
                )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _SCHEMA_LOCK)


async def drop_expired(pool: Any, settings: DatabaseSettings) -> int:
    """Delete bars (plain PostgreSQL) and published alerts older than the retention.

    Counts back from the newest stored minute. Returns the bars deleted. Idempotent.
    """
    async with pool.acquire() as conn:
        dropped: int = await conn.fetchval(
            "SELECT tickstream_drop_expired($1)", settings.retention_days * DAY_MS
        )
    return dropped


_BAR_COLUMNS = (
    "market",
    "minute",
    "seq",
    "exchange_ts",
    "received_ts",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trades",
    "closed",
    "quote_volume",
)
_UPDATED = ", ".join(f"{c} = EXCLUDED.{c}" for c in _BAR_COLUMNS[2:])
_UPSERT = (
    f"INSERT INTO bars SELECT * FROM bars_stage ON CONFLICT (market, minute) DO UPDATE SET "
    f"{_UPDATED} WHERE bars.seq < EXCLUDED.seq"
)


def newest_per_minute(ticks: Iterable[Tick]) -> list[Tick]:
    """The update with the highest seq for each (market, minute): what a batch stores.

    A batch of many updates of a forming bar collapses to one row per market and minute, so
    what reaches PostgreSQL is bounded by minutes, not by the update rate.
    """
    newest: dict[tuple[str, int], Tick] = {}
    for tick in ticks:
        key = (tick.market, tick.minute)
        held = newest.get(key)
        if held is None or tick.seq > held.seq:
            newest[key] = tick
    return list(newest.values())


async def store_bars(pool: Any, ticks: Sequence[Tick]) -> int:
    """Upsert the newest update of each (market, minute) with one COPY and one INSERT.

    A stored row is replaced only by an update with a larger seq, so a replayed older update
    never overwrites a newer one and storing the same ticks twice changes nothing (idempotent).
    Returns the rows inserted or replaced. On cancellation the transaction is rolled back.
    """
    rows = newest_per_minute(ticks)
    if not rows:
        return 0
    records = [
        (
            t.market,
            t.minute,
            t.seq,
            t.exchange_ts,
            t.received_ts,
            t.open,
            t.high,
            t.low,
            t.close,
            t.volume,
            t.trades,
            t.closed,
            t.quote_volume,
        )
        for t in rows
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS bars_stage "
            "(LIKE bars INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("bars_stage", records=records, columns=_BAR_COLUMNS)
        status: str = await conn.execute(_UPSERT)
    return int(status.rsplit(" ", 1)[1])


def _row_to_tick(row: Any) -> Tick:
    return Tick(
        market=row["market"],
        minute=row["minute"],
        seq=row["seq"],
        exchange_ts=row["exchange_ts"],
        received_ts=row["received_ts"],
        open=row["open"],
        high=row["high"],
        low=row["low"],
        close=row["close"],
        volume=row["volume"],
        trades=row["trades"],
        closed=row["closed"],
        quote_volume=row["quote_volume"],
    )


_SELECT_BARS = f"SELECT {', '.join(_BAR_COLUMNS)} FROM bars"


async def bars_between(
    pool: Any, market_id: str, first_minute: int, last_minute: int
) -> list[Tick]:
    """Bars of one market with first_minute <= minute <= last_minute, oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"{_SELECT_BARS} WHERE market = $1 AND minute >= $2 AND minute <= $3 ORDER BY minute",
            market_id,
            first_minute,
            last_minute,
        )
    return [_row_to_tick(row) for row in rows]


async def bars_of_markets(
    pool: Any, market_ids: Sequence[str], first_minute: int, last_minute: int
) -> dict[str, list[Tick]]:
    """Bars of several markets with first_minute <= minute <= last_minute, oldest first.

    One query for all of them (a warm-up of many markets is not one round trip each); the
    caller bounds the rows by the number of markets and minutes it asks for. Markets without
    bars are absent from the result.
    """
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"{_SELECT_BARS} WHERE market = ANY($1::text[]) AND minute >= $2 AND minute <= $3"
            " ORDER BY market, minute",
            list(market_ids),
            first_minute,
            last_minute,
        )
    bars: dict[str, list[Tick]] = {}
    for row in rows:
        tick = _row_to_tick(row)
        bars.setdefault(tick.market, []).append(tick)
    return bars


async def recent_bars(
    pool: Any, market_id: str, minutes: int, *, since_minute: int | None = None
) -> list[Tick]:
    """A market's history: bars of the `minutes` minutes before its newest bar, and that bar.

    At most `minutes + 1` bars whatever the update rate; `since_minute` keeps only bars with
    minute >= it (what a reconnecting client missed).
    """
    async with pool.acquire() as conn:
        newest = await conn.fetchval("SELECT max(minute) FROM bars WHERE market = $1", market_id)
        if newest is None:
            return []
        first = newest - minutes * MINUTE_MS
        if since_minute is not None:
            first = max(first, since_minute)
        rows = await conn.fetch(
            f"{_SELECT_BARS} WHERE market = $1 AND minute >= $2 AND minute <= $3 ORDER BY minute",
            market_id,
            first,
            newest,
        )
    return [_row_to_tick(row) for row in rows]


async def newest_minute(pool: Any) -> int | None:
    """The newest minute stored for any market (the event-time clock as storage knows it)."""
    async with pool.acquire() as conn:
        value: int | None = await conn.fetchval("SELECT max(minute) FROM bars")
    return value


async def known_markets(pool: Any) -> list[str]:
    """Every market with at least one stored bar."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT DISTINCT market FROM bars ORDER BY market")
    return [row["market"] for row in rows]
