"""Alert rows on real PostgreSQL: statuses stored once and in order, the outbox, the upgrade."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.conftest import unique_exchange
from tickstream_shared import alert_store, db
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import MINUTE_MS, Alert
from tickstream_shared.settings import DatabaseSettings

MINUTE = 1_680_000_000_000


def alert(metric: str, index: int, seq: int, **changes: Any) -> Alert:
    """A provisional volume alert of minute `index`, raised by update `seq`."""
    raised = Alert(
        alert_id=f"{metric}@{MINUTE + index * MINUTE_MS}",
        metric=metric,
        kind="volume",
        minute=MINUTE + index * MINUTE_MS,
        exchange_ts=MINUTE + index * MINUTE_MS + 1000,
        seq=seq,
        value=1e17,
        mean=10.0,
        factor=3.0,
        ratio=1e16,
        window_minutes=60,
        samples=60,
        status="provisional",
        status_seq=seq,
        status_ts=MINUTE + index * MINUTE_MS + 1000,
    )
    return msgspec.structs.replace(raised, **changes)


@pytest.fixture
async def pool(infra: LocalInfra) -> AsyncIterator[Any]:
    settings = DatabaseSettings(url=infra.database_url)
    pool = await db.create_pool(settings)
    try:
        await db.ensure_schema(pool)
        yield pool
    finally:
        await pool.close()


async def published(pool: Any, alert_id: str) -> bool:
    value: bool = await pool.fetchval("SELECT published FROM alerts WHERE alert_id = $1", alert_id)
    return value


async def test_states_are_stored_once_in_order_and_counted(pool: Any) -> None:
    """New alerts count as raised once; a newer state replaces the row and is to be published
    again; a repeated or older state changes nothing and counts nothing."""
    metric = f"{unique_exchange()}:btc-usdt:volume"
    raised = alert(metric, 0, 100)
    confirmed_at_once = alert(metric, 5, 200, status="confirmed", final_value=1e17)
    stored = await alert_store.store_alerts(pool, [raised, confirmed_at_once])
    assert stored == alert_store.Stored(raised=2, confirmed=1, retracted=0)
    assert await alert_store.store_alerts(pool, [raised, confirmed_at_once]) == (
        alert_store.Stored()
    )
    await alert_store.mark_published(pool, [raised, confirmed_at_once])

    retracted = alert(metric, 0, 100, status="retracted", status_seq=101, final_value=25.0)
    assert await alert_store.store_alerts(pool, [retracted]) == alert_store.Stored(retracted=1)
    assert not await published(pool, raised.alert_id)
    assert await alert_store.store_alerts(pool, [raised]) == alert_store.Stored()  # older
    pending = [a for a in await alert_store.unpublished_alerts(pool) if a.metric == metric]
    assert pending == [retracted]
    # Marking the state that was sent before this one leaves the row to publish.
    await alert_store.mark_published(pool, [raised])
    assert not await published(pool, raised.alert_id)
    await alert_store.mark_published(pool, pending)
    assert await published(pool, raised.alert_id)

    # A correction that confirms again: counted as confirmed, not raised.
    again = alert(metric, 0, 102, status="confirmed", value=45.0, final_value=45.0)
    assert await alert_store.store_alerts(pool, [again]) == alert_store.Stored(confirmed=1)
    assert await alert_store.alerts_since(pool, [metric], MINUTE) == [again, confirmed_at_once]
    assert await alert_store.alerts_since(pool, [metric], MINUTE + MINUTE_MS) == [confirmed_at_once]


async def test_reads_for_cooldown_and_the_gateway_follow_statuses(pool: Any) -> None:
    """The cooldown's last alert skips retracted ones; the gateway lists every status or the
    ones asked for."""
    metric = f"{unique_exchange()}:eth-usdt:volume"
    standing = alert(metric, 0, 100, status="confirmed", final_value=1e17)
    retracted = alert(metric, 3, 300, status="retracted", final_value=1.0)
    forming = alert(metric, 4, 400)
    await alert_store.store_alerts(pool, [standing, retracted, forming])
    assert await alert_store.last_alert_minutes(pool, [metric], MINUTE + 4 * MINUTE_MS) == {
        metric: MINUTE
    }
    newest = await alert_store.recent_alerts(pool, 1000)
    assert [a for a in newest if a.metric == metric] == [forming, retracted, standing]
    only = await alert_store.recent_alerts(pool, 1000, ["confirmed", "provisional"])
    assert [a.alert_id for a in only if a.metric == metric] == [
        forming.alert_id,
        standing.alert_id,
    ]


# The tables as schema.sql made them before alert statuses existed.
_BEFORE_STATUSES = """
CREATE TABLE bars (
    market text NOT NULL, minute bigint NOT NULL, seq bigint NOT NULL,
    exchange_ts bigint NOT NULL, received_ts bigint NOT NULL,
    open double precision NOT NULL, high double precision NOT NULL,
    low double precision NOT NULL, close double precision NOT NULL,
    volume double precision NOT NULL, trades bigint, closed boolean NOT NULL,
    PRIMARY KEY (market, minute)
);
CREATE TABLE alerts (
    alert_id text PRIMARY KEY, metric text NOT NULL, kind text NOT NULL,
    minute bigint NOT NULL, exchange_ts bigint NOT NULL, seq bigint NOT NULL,
    value double precision NOT NULL, mean double precision NOT NULL,
    factor double precision NOT NULL, ratio double precision NOT NULL,
    window_minutes integer NOT NULL, samples integer NOT NULL,
    published boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
_OLD_INSERT = (
    "INSERT INTO alerts (alert_id, metric, kind, minute, exchange_ts, seq, value, mean, factor,"
    " ratio, window_minutes, samples, published)"
    " VALUES ($1, $2, 'volume', $3::bigint, $3 + 1000, $4, 1e17, 10, 3, 1e16, 60, 60, true)"
)


async def test_schema_upgrades_a_table_from_before_statuses(infra: LocalInfra) -> None:
    """An existing alerts table gets the status columns; an old row raised on its minute's
    closed bar becomes confirmed, one raised on a forming update provisional; applying the
    schema again changes nothing, and a row an older service writes later is judged the same."""
    name = f"upgrade_{uuid.uuid4().hex[:10]}"
    server = infra.database_url.rsplit("/", 1)[0]
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        conn = await asyncpg.connect(f"{server}/{name}")
        try:
            await conn.execute(_BEFORE_STATUSES)
            market = "binance:btc-usdt"
            metric = f"{market}:volume"
            # Minute 0 closed on the update that raised; minute 1 closed after it (seq 11 > 10).
            for index, seq in ((0, 5), (1, 11)):
                at = MINUTE + index * MINUTE_MS
                await conn.execute(
                    "INSERT INTO bars VALUES ($1, $2::bigint, $3, $2 + 59000, $2 + 59000,"
                    " 1, 1, 1, 1, 1e17, NULL, true)",
                    market,
                    at,
                    seq,
                )
            await conn.execute(_OLD_INSERT, f"{metric}@{MINUTE}", metric, MINUTE, 5)
            await conn.execute(
                _OLD_INSERT, f"{metric}@{MINUTE + MINUTE_MS}", metric, MINUTE + MINUTE_MS, 10
            )
            pool = await db.create_pool(DatabaseSettings(url=f"{server}/{name}"))
            try:
                await db.ensure_schema(pool)
                await db.ensure_schema(pool)
                rows = await alert_store.alerts_since(pool, [metric], 0)
                assert [(a.status, a.status_seq, a.status_ts, a.final_value) for a in rows] == [
                    ("confirmed", 5, MINUTE + 1000, 1e17),
                    ("provisional", 10, MINUTE + MINUTE_MS + 1000, None),
                ]
                assert await alert_store.unpublished_alerts(pool) == []
                # An alerts service from before statuses, still running, stores a row: it
                # reads as never judged until the schema is applied again.
                late = MINUTE + 2 * MINUTE_MS
                await conn.execute(_OLD_INSERT, f"{metric}@{late}", metric, late, 20)
                (row,) = await alert_store.alerts_since(pool, [metric], late)
                assert (row.status, row.version, row.status_ts) == ("provisional", 20, late + 1000)
                await db.ensure_schema(pool)
                assert (
                    await conn.fetchval("SELECT count(*) FROM alerts WHERE status_seq IS NULL") == 0
                )
            finally:
                await pool.close()
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.close()
