"""Reads 1-minute candle CSVs (`<exchange>_<base>-<quote>_1m.csv[.gz]`) into time-ordered bars."""

from __future__ import annotations

import csv
import gzip
import heapq
import logging
import operator
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from tickstream_shared.naming import Market, candle_file_market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, MINUTE_MS

log = logging.getLogger(__name__)

COLUMNS = ("ts_ms", "open", "high", "low", "close", "volume")
# Optional: the minute's traded value in the quote currency. Without the column (or with the
# cell empty) a bar's quote volume is unknown: a replay never derives it from close x volume.
QUOTE_COLUMN = "quote_volume"
# The bounds `decode_tick` enforces on prices and volumes: a row outside them is refused here,
# where its file and line are known, rather than by every consumer.
_MAX_PRICE = 1e12
_MAX_VOLUME = 1e18


class Candle(msgspec.Struct, frozen=True, order=True, gc=False):
    """One CSV row: a closed one-minute bar. Compares by its fields in order: (minute, market)."""

    minute: int  # bar open time, ms (the row's ts_ms)
    market: str  # market id
    row_number: int  # 0-based data row in its file: a stable per-market sequence number
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float | None = None  # the file's quote_volume cell; None: unknown


class BadRow(ValueError):
    """A CSV row that is not a valid one-minute bar; says what is wrong."""


def find_candle_files(folder: Path, markets: Iterable[str] = ()) -> dict[Market, Path]:
    """Candle files in `folder`, optionally only the given market ids; sorted by market."""
    wanted = {Market.parse(m) for m in markets}
    found: dict[Market, Path] = {}
    for path in sorted(folder.iterdir()):
        market = candle_file_market(path.name)
        if market is None:
            continue
        if not wanted or market in wanted:
            found[market] = path
    return found


def _open(path: Path) -> IO[str]:
    # Undecodable bytes become U+FFFD, so such a row fails as a number and is skipped alone.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", errors="replace")
    return path.open(newline="", errors="replace")


def parse_row(
    market_id: str, row_number: int, row: list[str], columns: Callable[[list[str]], tuple[str, ...]]
) -> Candle:
    """The row's bar; raises BadRow if a field is missing, not a number or not a plausible bar.

    `columns` picks ts_ms, open, high, low, close, volume from the row, in that order, and
    then quote_volume if the file has that column (an empty cell: unknown).
    """
    try:
        ts, open_text, high_text, low_text, close_text, volume_text, *quote = columns(row)
        minute = int(ts)
        open_, high, low = float(open_text), float(high_text), float(low_text)
        close, volume = float(close_text), float(volume_text)
        quote_volume = float(quote[0]) if quote and quote[0].strip() else None
    except (IndexError, ValueError) as exc:
        raise BadRow(f"unreadable ({exc})") from None
    if not MIN_TS_MS <= minute <= MAX_TS_MS - MINUTE_MS or minute % MINUTE_MS:
        raise BadRow(f"ts_ms {minute} is not a plausible minute start")
    if not (low > 0 and high <= _MAX_PRICE and 0 <= volume <= _MAX_VOLUME):
        raise BadRow("prices must be in (0, 1e12] and volume in [0, 1e18]")
    if not (low <= open_ <= high and low <= close <= high):
        raise BadRow("open and close must lie within low..high")
    if quote_volume is not None and not 0 <= quote_volume <= _MAX_VOLUME:
        raise BadRow("quote_volume must be in [0, 1e18]")
    return Candle(minute, market_id, row_number, open_, high, low, close, volume, quote_volume)


def read_candles(market: Market, path: Path, limit: int = 0) -> Iterator[Candle]:
    """Bars of one file in file order; `limit` > 0 stops after that many data rows.

    A row that is not a valid bar, or not later than the row before it, is logged with its
    line number and skipped; its row number is still used up, so the other rows keep their seq.
    A file that cannot be read on (truncated or corrupt gzip) is logged and ends there.
    """
    try:
        with _open(path) as handle:
            yield from _read_rows(market.id, path, handle, limit)
    except (OSError, EOFError, zlib.error) as exc:
        log.error("%s: unreadable, rest of the file skipped: %s", path, exc)


def _read_rows(market_id: str, path: Path, handle: IO[str], limit: int) -> Iterator[Candle]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None or any(name not in header for name in COLUMNS):
        log.error("%s: header must name the columns %s; file skipped", path, ",".join(COLUMNS))
        return
    names = (*COLUMNS, QUOTE_COLUMN) if QUOTE_COLUMN in header else COLUMNS
    columns = operator.itemgetter(*(header.index(name) for name in names))
    previous = -1
    row_number = -1
    while not limit or row_number + 1 < limit:
        row_number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            log.warning("%s line %d skipped: %s", path, reader.line_num, exc)
            continue
        try:
            candle = parse_row(market_id, row_number, row, columns)
            if candle.minute <= previous:
                raise BadRow(f"ts_ms {candle.minute} is not after the previous row's")
        except BadRow as exc:
            log.warning("%s line %d skipped: %s", path, reader.line_num, exc)
            continue
        previous = candle.minute
        yield candle


def merged_candles(files: dict[Market, Path], limit: int = 0) -> Iterator[Candle]:
    """All markets' bars merged by minute (then market id), so every market advances together."""
    return heapq.merge(*(read_candles(market, path, limit) for market, path in files.items()))
