"""Alert rows in PostgreSQL: written by alerts (store, publish, mark), read by gateway."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tickstream_shared.schemas import Alert

_FIELDS: Final = (
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
    "status",
    "status_seq",
    "status_ts",
    "final_value",
)
_TYPES: Final = (
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "bigint",
    "float8",
    "float8",
    "float8",
    "float8",
    "integer",
    "integer",
    "text",
    "bigint",
    "bigint",
    "float8",
)
_COLUMNS: Final = ", ".join(_FIELDS)
# Rows a service from before statuses stored have no status_seq/status_ts until schema.sql's
# next run fills them in: read as the crossing update's (what Alert's defaults mean too).
_READ_AS: Final = {
    "status_seq": "coalesce(status_seq, seq) AS status_seq",
    "status_ts": "coalesce(status_ts, exchange_ts) AS status_ts",
}
_SELECT: Final = ", ".join(_READ_AS.get(name, name) for name in _FIELDS)
# The alerts of one call as columns, one array per field: a single statement for any number.
_INCOMING: Final = (
    "unnest("
    + ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(_TYPES, start=1))
    + f") AS n({_COLUMNS})"
)
_INSERT: Final = (
    f"INSERT INTO alerts ({_COLUMNS}) SELECT {_COLUMNS} FROM {_INCOMING} "
    "ON CONFLICT (alert_id) DO NOTHING RETURNING status"
)
_CHANGED: Final = ("exchange_ts", "seq", "value", "mean", "ratio", "samples", *_FIELDS[12:])
# A newer state (larger status_seq) of a stored alert replaces it and is to be published again;
# `old` is the row as it was before this statement, for the counts.
_UPDATE: Final = (
    "UPDATE alerts AS a SET "
    + ", ".join(f"{name} = n.{name}" for name in _CHANGED)
    + ", published = false, status_changed_at = now() "
    f"FROM {_INCOMING} JOIN alerts AS old ON old.alert_id = n.alert_id "
    "WHERE a.alert_id = n.alert_id AND coalesce(a.status_seq, a.seq) < n.status_seq "
    "RETURNING a.status, old.status AS was"
)


@dataclass(frozen=True, slots=True)
class Stored:
    """What one `store_alerts` call changed: alerts new to the table, and alerts that became
    confirmed or retracted (new ones included) rather than being so already."""

    raised: int = 0
    confirmed: int = 0
    retracted: int = 0


async def store_alerts(pool: Any, alerts: Sequence[Alert]) -> Stored:
    """Insert new alerts and apply newer states of stored ones, in one transaction.

    A stored alert is replaced only by a state with a larger `status_seq` (its `version`), and
    is then to be published again (`published` false): storing the same alerts twice, or an
    older state after a newer one, changes nothing (idempotent). At most one state per alert
    id per call. On cancellation the transaction is rolled back.
    """
    if not alerts:
        return Stored()
    columns = [[getattr(a, name) for a in alerts] for name in _FIELDS]
    columns[_FIELDS.index("status_seq")] = [a.version for a in alerts]
    columns[_FIELDS.index("status_ts")] = [
        a.exchange_ts if a.status_ts is None else a.status_ts for a in alerts
    ]
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetch(_INSERT, *columns)
        updated = await conn.fetch(_UPDATE, *columns)
    became = [row["status"] for row in inserted] + [
        row["status"] for row in updated if row["status"] != row["was"]
    ]
    return Stored(
        raised=len(inserted),
        confirmed=became.count("confirmed"),
        retracted=became.count("retracted"),
    )


def _row_to_alert(row: Any) -> Alert:
    return Alert(**{name: row[name] for name in _FIELDS})


async def unpublished_alerts(pool: Any) -> list[Alert]:
    """Alerts stored but not yet confirmed on Kafka in their current state, oldest first
    (includes earlier crashes: an outbox)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_SELECT} FROM alerts WHERE NOT published ORDER BY created_at, alert_id"
        )
    return [_row_to_alert(row) for row in rows]


async def mark_published(pool: Any, alerts: Sequence[Alert]) -> None:
    """Mark these states of the alerts published; a row that changed since stays unpublished.

    Idempotent.
    """
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE alerts SET published = true "
            "FROM unnest($1::text[], $2::bigint[]) AS p(alert_id, version) "
            "WHERE alerts.alert_id = p.alert_id "
            "AND coalesce(alerts.status_seq, alerts.seq) = p.version",
            [a.alert_id for a in alerts],
            [a.version for a in alerts],
        )


async def recent_alerts(
    pool: Any, limit: int, statuses: Collection[str] | None = None
) -> list[Alert]:
    """Newest alerts first (by minute), for the gateway; only those in `statuses` if given."""
    async with pool.acquire() as conn:
        if statuses is None:
            rows = await conn.fetch(
                f"SELECT {_SELECT} FROM alerts ORDER BY minute DESC, alert_id LIMIT $1", limit
            )
        else:
            rows = await conn.fetch(
                f"SELECT {_SELECT} FROM alerts WHERE status = ANY($2::text[]) "
                "ORDER BY minute DESC, alert_id LIMIT $1",
                limit,
                list(statuses),
            )
    return [_row_to_alert(row) for row in rows]


async def last_alert_minutes(
    pool: Any, metric_ids: Sequence[str], before_minute: int
) -> dict[str, int]:
    """Per metric, the newest minute before `before_minute` of an alert that is not retracted
    (the cooldown runs from it)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT metric, max(minute) AS minute FROM alerts "
            "WHERE metric = ANY($1::text[]) AND minute < $2 AND status <> 'retracted' "
            "GROUP BY metric",
            list(metric_ids),
            before_minute,
        )
    return {row["metric"]: row["minute"] for row in rows}


async def alerts_since(pool: Any, metric_ids: Sequence[str], first_minute: int) -> list[Alert]:
    """The alerts of these metrics from `first_minute` on, in any status, oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_SELECT} FROM alerts WHERE metric = ANY($1::text[]) AND minute >= $2 "
            "ORDER BY minute, alert_id",
            list(metric_ids),
            first_minute,
        )
    return [_row_to_alert(row) for row in rows]
