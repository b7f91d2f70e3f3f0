"""What the replay tests share (end to end, chaos): the candles replayed, the references
computed independently from them, and the checks of stored bars, stats, ranks and alerts."""

from __future__ import annotations

import csv
import gzip
import itertools
import math
import statistics
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Services, http_json, wait_for
from tests.e2e.reference import Row, reference_alerts

MARKETS = ("binance:btc-usdt", "binance:eth-usdt", "binance:doge-usdt", "binance:ada-usdt")
GAPPY = "binance:ada-usdt"  # every 7th minute missing: log returns must bridge the gaps
SILENT = "binance:doge-usdt"  # stops 30 minutes early: ages with the clock and goes stale
SILENT_MINUTES = 30
# Replay files carry no quote volume unless they have the optional column: every market but
# this one gets it (the exact decimal close x volume), so this one must have no turnover.
UNQUOTED = GAPPY
MINUTES = 3 * 1440  # three days of event time per market
REPLAY_SECONDS = 25.0  # wall time the replay is paced to, so a client can join mid-stream
WINDOW_MINUTES = 1440
MINUTE_MS = 60_000
STALE_MS = 300_000
MEASURES = {
    "price": ("std", "cv", "logret"),
    "volume": ("std", "cv"),
    "turnover": ("std", "cv"),
}


def write_replay_candles(source: Path, target: Path) -> dict[str, list[Row]]:
    """Candle files for the replay (real candles, with gaps and an early stop), and their rows.

    The rows are read back from the written files independently of the watcher's code: they
    are what the replay must produce (seq = row index in the file).
    """
    expected = {}
    for market in MARKETS:
        pair = market.split(":")[1]
        with gzip.open(source / f"binance_{pair}_1m.csv.gz", "rt", newline="") as handle:
            rows = list(csv.DictReader(handle))[:MINUTES]
        if market == GAPPY:
            rows = [r for i, r in enumerate(rows) if i % 7 != 3]
        if market == SILENT:
            rows = rows[:-SILENT_MINUTES]
        fields = ["ts_ms", "open", "high", "low", "close", "volume"]
        if market != UNQUOTED:
            fields.append("quote_volume")
            for r in rows:
                r["quote_volume"] = str(Decimal(r["close"]) * Decimal(r["volume"]))
        path = target / f"binance_{pair}_1m.csv"
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        with path.open(newline="") as handle:
            expected[market] = [
                Row(
                    minute=int(r["ts_ms"]),
                    seq=i,
                    open=float(r["open"]),
                    high=float(r["high"]),
                    low=float(r["low"]),
                    close=float(r["close"]),
                    volume=float(r["volume"]),
                    quote_volume=float(r["quote_volume"]) if "quote_volume" in r else None,
                )
                for i, r in enumerate(csv.DictReader(handle))
            ]
    return expected


@dataclass(frozen=True)
class Reference:
    """Stats and ranks computed with `statistics` from the expected rows, nothing shared."""

    clock: int
    stats: dict[str, dict[str, float]]  # metric -> count, mean, std, cv, logret, min, max
    stale: set[str]  # market ids

    def order(self, kind: str, measure: str) -> list[str]:
        live = [
            m for m in self.stats if m.endswith(f":{kind}") and m[: m.rindex(":")] not in self.stale
        ]
        return sorted(live, key=lambda metric: (-self.stats[metric][measure], _desc(metric)))


def _desc(metric: str) -> list[int]:
    # Redis orders equal scores by member, descending, in ZREVRANGE.
    return [-ord(c) for c in metric]


def reference_stats(expected: dict[str, list[Row]]) -> Reference:
    clock = max(rows[-1].minute for rows in expected.values())
    stats: dict[str, dict[str, float]] = {}
    stale = set()
    for market, rows in expected.items():
        window = [r for r in rows if clock - WINDOW_MINUTES * MINUTE_MS < r.minute <= clock]
        if clock - rows[-1].minute > STALE_MS:
            stale.add(market)
        kinds = ["price", "volume"]
        if any(r.quote_volume is not None for r in window):
            kinds.append("turnover")
        for kind in kinds:
            values = [v for r in window if (v := _value(r, kind)) is not None]
            mean = statistics.fmean(values)
            std = statistics.pstdev(values)
            entry = {
                "count": float(len(values)),
                "mean": mean,
                "std": std,
                "cv": std / abs(mean) if mean else 0.0,
                "min": min(values),
                "max": max(values),
            }
            if kind == "price":
                returns = [math.log(b / a) for a, b in itertools.pairwise(values)]
                entry["logret"] = statistics.pstdev(returns) if len(returns) >= 1 else 0.0
            stats[f"{market}:{kind}"] = entry
    return Reference(clock, stats, stale)


def _value(row: Row, kind: str) -> float | None:
    if kind == "price":
        return row.close
    return row.volume if kind == "volume" else row.quote_volume


def bar_fields(point: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("minute", "seq", "open", "high", "low", "close", "volume")
    return tuple(point[k] for k in keys)


def row_fields(row: Row) -> tuple[Any, ...]:
    return (row.minute, row.seq, row.open, row.high, row.low, row.close, row.volume)


async def check_bars_stored_once(
    conn: Any, expected: dict[str, list[Row]], services: Services
) -> None:
    total = sum(len(rows) for rows in expected.values())

    async def all_stored() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM bars") == total)

    await wait_for(all_stored, within=120, what=f"{total} stored bars", services=services)
    rows = await conn.fetch(
        "SELECT market, minute, seq, open, high, low, close, volume, quote_volume, closed,"
        " exchange_ts FROM bars"
    )
    stored = {
        (
            r["market"],
            r["minute"],
            r["seq"],
            r["open"],
            r["high"],
            r["low"],
            r["close"],
            r["volume"],
            r["quote_volume"],
        )
        for r in rows
    }
    wanted = {(m, *row_fields(r), r.quote_volume) for m, rs in expected.items() for r in rs}
    assert len(rows) == len(stored) == total
    assert stored == wanted
    assert all(r["closed"] and r["exchange_ts"] == r["minute"] + MINUTE_MS for r in rows)


async def check_ranks_and_metrics(base: str, reference: Reference, services: Services) -> None:
    def settled() -> bool:
        status, body = http_json(base, "/api/metrics")
        if status != 200 or len(body["metrics"]) != len(reference.stats):
            return False
        return all(m["clock"] == reference.clock for m in body["metrics"])

    await wait_for(settled, within=90, what="every metric at the final clock", services=services)

    def ranked_as_reference() -> bool:
        # Rank snapshots are cached (at most two GATEWAY_RANK_INTERVAL_MS old): wait for one
        # read after stats' last write.
        for kind, measures in MEASURES.items():
            for measure in measures:
                ranks = http_json(base, f"/api/ranks?kind={kind}&by={measure}")[1]["ranks"]
                if [e["metric"] for e in ranks] != reference.order(kind, measure) or any(
                    e["value"]
                    != pytest.approx(reference.stats[e["metric"]][measure], rel=1e-12, abs=1e-300)
                    for e in ranks
                ):
                    return False
        return True

    await wait_for(
        ranked_as_reference, within=10, what="ranks in the reference order", services=services
    )
    for kind, measures in MEASURES.items():
        for measure in measures:
            status, body = http_json(base, f"/api/ranks?kind={kind}&by={measure}")
            assert status == 200
            order = reference.order(kind, measure)
            total = len(order)
            assert [e["metric"] for e in body["ranks"]] == order, (kind, measure)
            assert body["total"] == total and body["by"] == measure
            assert [e["label"] for e in body["ranks"]] == [
                f"{i}/{total}" for i in range(1, total + 1)
            ]
            for entry in body["ranks"]:
                assert entry["value"] == pytest.approx(
                    reference.stats[entry["metric"]][measure], rel=1e-12, abs=1e-300
                )
    status, listing = http_json(base, "/api/metrics")
    listed = {m["id"]: m for m in listing["metrics"]}
    for metric, ref in reference.stats.items():
        row = listed[metric]
        market = metric[: metric.rindex(":")]
        assert row["stale"] is (market in reference.stale), metric
        assert row["count"] == ref["count"], metric
        assert (row["min"], row["max"]) == (ref["min"], ref["max"])
        for field in ("mean", "std", "cv"):
            assert row[field] == pytest.approx(ref[field], rel=1e-12, abs=1e-300), (metric, field)
        status, detail = http_json(base, f"/api/metrics/{metric}")
        assert status == 200 and detail["stale"] is row["stale"]
        assert len(detail["values"]) <= WINDOW_MINUTES + 1
        kind = metric.rsplit(":", 1)[1]
        for measure in MEASURES[kind]:
            position = detail["ranks"][measure]["position"]
            if market in reference.stale:
                assert position is None
            else:
                assert position == reference.order(kind, measure).index(metric) + 1
        if kind == "price":
            assert detail["logret"] == pytest.approx(ref["logret"], rel=1e-12, abs=1e-300)


async def check_alerts(conn: Any, expected: dict[str, list[Row]], services: Services) -> set[str]:
    reference = reference_alerts(expected)
    assert reference, "the reference found no spike in real data"

    async def alerts_stored() -> set[str]:
        ids = {r["alert_id"] for r in await conn.fetch("SELECT alert_id FROM alerts")}
        return ids if reference <= ids else set()

    stored = await wait_for(
        alerts_stored, within=60, what="alerts in PostgreSQL", services=services
    )
    assert stored == reference
    assert await conn.fetchval("SELECT count(*) FROM alerts WHERE NOT published") == 0
    # A replay sends each minute as one closed bar: every alert stands on a final value, so it
    # is confirmed at once and the reference (over closed minutes) counts exactly these.
    statuses = await conn.fetch("SELECT status, count(*) AS n FROM alerts GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"confirmed": len(reference)}
    return set(stored)
