"""Alert rows in PostgreSQL: written by alerts (insert, publish, mark), read by gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tickstream_shared.schemas import Alert

_FIELDS = (
    "alert_id",
    "metric",
    "kind",
    "minute",
    "exchange_ts",
    "seq",
    "value",
    "mean",
    "factor",
    "ratio",
    "window_minutes",
    "samples",
)
_COLUMNS = ", ".join(_FIELDS)
_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, len(_FIELDS) + 1))


async def insert_alerts(pool: Any, alerts: Sequence[Alert]) -> None:
    """Insert alerts; an alert id already stored is left as it is. Idempotent."""
    if not alerts:
        return
    rows = [tuple(getattr(a, name) for name in _FIELDS) for a in alerts]
    async with pool.acquire() as conn:
        await conn.executemany(
            f"INSERT INTO alerts ({_COLUMNS}) VALUES ({_PLACEHOLDERS}) "
            "ON CONFLICT (alert_id) DO NOTHING",
            rows,
        )


def _row_to_alert(row: Any) -> Alert:
    return Alert(**{name: row[name] for name in _FIELDS})


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
            f"SELECT {_COLUMNS} FROM alerts ORDER BY minute DESC, alert_id LIMIT $1", limit
        )
    return [_row_to_alert(row) for row in rows]


async def last_alert_minutes(
    pool: Any, metric_ids: Sequence[str], before_minute: int
) -> dict[str, int]:
    """Per metric, the newest minute before `before_minute` that raised an alert (cooldown)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT metric, max(minute) AS minute FROM alerts "
            "WHERE metric = ANY($1::text[]) AND minute < $2 GROUP BY metric",
            list(metric_ids),
            before_minute,
        )
    return {row["metric"]: row["minute"] for row in rows}
