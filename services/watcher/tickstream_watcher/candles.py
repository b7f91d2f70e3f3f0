"""Reads 1-minute candle CSVs (`<exchange>_<base>-<quote>_1m.csv[.gz]`) into time-ordered ticks."""

from __future__ import annotations

import csv
import gzip
import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tickstream_shared.naming import Market

CANDLE_MS = 60_000
_FILE_RE = re.compile(
    r"^(?P<exchange>[a-z0-9]+)_(?P<base>[a-z0-9]+)-(?P<quote>[a-z0-9]+)_1m\.csv(\.gz)?$"
)


@dataclass(frozen=True, slots=True)
class Candle:
    """One closed candle as a tick: event time is the candle's close time."""

    market: Market
    index: int  # row number in its file: a stable per-market sequence number
    close_ts: int
    close: float
    volume: float


def find_candle_files(folder: Path, markets: Iterable[str] = ()) -> dict[Market, Path]:
    """Candle files in `folder`, optionally only the given market ids; sorted by market."""
    wanted = {Market.parse(m) for m in markets}
    found: dict[Market, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE_RE.match(path.name)
        if match is None:
            continue
        market = Market(match["exchange"], match["base"], match["quote"])
        if not wanted or market in wanted:
            found[market] = path
    return found


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open(newline="")


def read_candles(market: Market, path: Path, limit: int = 0) -> Iterator[Candle]:
    """Candles of one file in file order; `limit` > 0 stops after that many rows."""
    with _open(path) as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            if limit and index >= limit:
                return
            yield Candle(
                market,
                index,
                int(row["ts_ms"]) + CANDLE_MS,
                float(row["close"]),
                float(row["volume"]),
            )


def merged_candles(files: dict[Market, Path], limit: int = 0) -> Iterator[Candle]:
    """All markets' candles merged by event time, so every market advances together."""
    streams = [read_candles(market, path, limit) for market, path in files.items()]
    return heapq.merge(*streams, key=lambda c: (c.close_ts, c.market))
