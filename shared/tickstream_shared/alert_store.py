"""Alert rows in PostgreSQL: written by alerts (insert, publish, mark), read by gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tickstream_shared.db import datetime_to_ms, ms_to_datetime
from tickstream_shared.schemas import Alert

_COLUMNS = (
    "alert_id, metric, kind, exchange_ts, seq, value, mean, factor, ratio, window_seconds, samples"
)


async def insert_alerts(pool: Any, alerts: Sequence[Alert]) -> None:
    """Insert alerts; an alert id already stored is left as it is. Idempotent."""
    if not alerts:
        return
    rows = [
        (
            a.alert_id,
            a.metric,
            a.kind,
            ms_to_datetime(a.exchange_ts),
            a.seq,
            a.value,
            a.mean,
            a.factor,
            a.ratio,
            a.window_seconds,
            a.samples,
        )
        for a in alerts
    ]
    async with pool.acquire() as conn:
        await conn.executemany(
            f"INSERT INTO alerts ({_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) "
            "ON CONFLICT (alert_id) DO NOTHING",
            rows,
        )


def _row_to_alert(row: Any) -> Alert:
    return Alert(
        alert_id=row["alert_id"],
        metric=row["metric"],
        kind=row["kind"],
        exchange_ts=datetime_to_ms(row["exchange_ts"]),
        seq=row["seq"],
        value=row["value"],
        mean=row["mean"],
        factor=row["factor"],
        ratio=row["ratio"],
        window_seconds=row["window_seconds"],
        samples=row["samples"],
    )


async def unpublished_alerts(pool: Any) -> list[Alert]:
    """Alerts stored but not yet confirmed on Kafka, oldest first (includes earlier crashes)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM alerts WHERE NOT published ORDER BY created_at, alert_id"
        )
    return [_row_to_alert(row) for row in rows]


async def mark_published(pool: Any, alert_ids: Sequence[str]) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE alerts SET published = true WHERE alert_id = ANY($1::text[])", list(alert_ids)
        )


async def recent_alerts(pool: Any, limit: int) -> list[Alert]:
    """Newest alerts first, for the gateway."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM alerts ORDER BY exchange_ts DESC, alert_id LIMIT $1", limit
        )
    return [_row_to_alert(row) for row in rows]
