"""Feed reports as the HTTP API shows them: each market's feed state, each origin's summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from tickstream_shared.errors import BadIdentifier
from tickstream_shared.feed_status import (
    FeedStatus,
    OriginSummary,
    ReportedState,
    decode_feed_status,
    summarise,
)
from tickstream_shared.naming import Market

# The watcher reports at most WATCHER_MAX_MARKETS (≤ 5000) markets; a larger hash was not
# written by it, and the listing must stay bounded whatever Redis holds.
MAX_FEEDS: Final = 5000
# Longer than any market id worth showing: such a field is skipped before it is parsed.
_MAX_MARKET_ID_BYTES: Final = 100


def decode_feeds(raw: Mapping[bytes, bytes]) -> dict[str, FeedStatus]:
    """The reports of the feeds hash (fields and values as Redis returns them), by market id.

    Sorted by market id; a field that is not a market id as the watcher writes it (lower
    case, `<exchange>:<base>-<quote>`) or a value that is not a FeedStatus is skipped, and at
    most MAX_FEEDS reports are kept (the first by market id).
    """
    feeds: dict[str, FeedStatus] = {}
    for field in sorted(raw):
        if len(feeds) == MAX_FEEDS:
            break
        market_id = _market_id(field)
        status = None if market_id is None else decode_feed_status(raw[field])
        if market_id is not None and status is not None:
            feeds[market_id] = status
    return feeds


def _market_id(field: bytes) -> str | None:
    if len(field) > _MAX_MARKET_ID_BYTES:
        return None
    try:
        market_id = field.decode("ascii")
        canonical = Market.parse(market_id).id
    except (UnicodeDecodeError, BadIdentifier):
        return None
    return market_id if canonical == market_id else None


def feeds_json(feeds: Mapping[str, FeedStatus], now_ms: int) -> dict[str, dict[str, object]]:
    """The `feeds` object of `/api/metrics`: every report as shown at `now_ms`."""
    return {market_id: status.as_json(now_ms) for market_id, status in feeds.items()}


def origins_json(feeds: Mapping[str, FeedStatus], now_ms: int) -> dict[str, OriginSummary]:
    """The `origins` of `/api/metrics` and `/api/feeds`: each origin summed up at `now_ms`."""
    return summarise(feeds.values(), now_ms)


def shown_state(status: FeedStatus | None, now_ms: int) -> ReportedState | None:
    """A metric's `feed`: its market's state at `now_ms`, or None when it has no report."""
    return None if status is None else status.shown_state(now_ms)
