"""Feed status: what the publishing watcher reports of each market's feed, and how it ages.

The watcher that holds the lease writes, about once a second, one Redis hash (FEEDS_KEY):
market id -> FeedStatus JSON. The gateway reads it for `/api/metrics`, `/api/feeds` and the
dashboard. A report older than STALE_AFTER_MS means nobody is publishing that market (the
watcher died and no standby has taken over yet, or it lost its lease): the gateway shows it
as `stale`. What is shown is never greener than what was reported (docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Final, Literal

import msgspec

from tickstream_shared.naming import REDIS_PREFIX

FEEDS_KEY: Final = f"{REDIS_PREFIX}:feeds"
REPORT_INTERVAL_S: Final = 1.0
# Several missed reports, and longer than a standby takes to take over (lease TTL + start).
STALE_AFTER_MS: Final = 10_000
# The hash outlives its writer by this much, so that a dead watcher's markets are shown stale
# for a while and then disappear rather than stay forever.
FEEDS_TTL_S: Final = 3600

# The kind of data, whatever its state: an exchange's public feed, recorded candles, or the
# random walk. Only `live` data is ever shown as live market data (green).
FeedSource = Literal["live", "replay", "synthetic"]
# connecting: no connection has been made yet since start (no data yet);
# live: connected and data flowing;
# reconnecting: the connection was lost and is being re-established;
# unreachable: connecting has failed repeatedly for longer than the watcher's threshold;
# stale: the market is silent while its exchange's other markets update (the watcher), or
#   the report itself is older than STALE_AFTER_MS (the gateway, `shown_state`);
# finished: a replay has sent everything it had.
ReportedState = Literal["connecting", "live", "reconnecting", "unreachable", "stale", "finished"]

# Worst first: how many markets' states are summed up in one (`worst_state`). `finished` is
# last: a replay with one market still sending is still sending.
SEVERITY: Final[tuple[ReportedState, ...]] = (
    "unreachable",
    "reconnecting",
    "stale",
    "connecting",
    "live",
    "finished",
)
_RANK: Final[Mapping[ReportedState, int]] = {state: i for i, state in enumerate(SEVERITY)}

_Ms = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
_Text = Annotated[str, msgspec.Meta(max_length=64)]


class FeedStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One market's feed as its watcher last reported it.

    `origin` says where the data comes from: the exchange for `live`, `replay` or
    `synthetic` otherwise. `reported_ms` is the watcher's wall clock at the report;
    `last_data_ms` the receive time of the market's newest update (None before the first).
    Fields a newer watcher adds are ignored; a state this version does not know makes the
    whole report unreadable (decode_feed_status returns None).
    """

    source: FeedSource
    origin: _Text
    state: ReportedState
    reported_ms: _Ms
    last_data_ms: _Ms | None = None

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    def shown_state(self, now_ms: int) -> ReportedState:
        """The state to show at `now_ms`: never greener than the report.

        `stale` once the report is older than STALE_AFTER_MS; `connecting` for a `live`
        report without any data yet (live means data is flowing); the reported state otherwise.
        """
        if now_ms - self.reported_ms > STALE_AFTER_MS:
            return "stale"
        if self.state == "live" and self.last_data_ms is None:
            return "connecting"
        return self.state

    def as_json(self, now_ms: int) -> dict[str, object]:
        return {
            "source": self.source,
            "origin": self.origin,
            "state": self.shown_state(now_ms),
            "reported_ms": self.reported_ms,
            "last_data_ms": self.last_data_ms,
        }


def worst_state(states: Iterable[ReportedState]) -> ReportedState | None:
    """The first of `states` in SEVERITY order (unreachable first), None when there are none."""
    return min(states, key=_RANK.__getitem__, default=None)


class OriginSummary(msgspec.Struct, frozen=True):
    """The markets of one origin (an exchange, or replay/synthetic) summed up at one time.

    `state` is the worst of their shown states; `markets` counts them by shown state (states
    without markets left out); `last_data_ms` is the newest update of any of them.
    """

    source: FeedSource
    state: ReportedState
    markets: dict[ReportedState, int]
    last_data_ms: int | None


def summarise(feeds: Iterable[FeedStatus], now_ms: int) -> dict[str, OriginSummary]:
    """Each origin's summary at `now_ms`, by origin name in order.

    An origin's `source` is that of its first report (one origin has one source as the
    watcher reports them).
    """
    by_origin: dict[str, list[FeedStatus]] = {}
    for status in feeds:
        by_origin.setdefault(status.origin, []).append(status)
    summaries = {}
    for origin in sorted(by_origin):
        reports = by_origin[origin]
        markets: dict[ReportedState, int] = {}
        for status in reports:
            shown = status.shown_state(now_ms)
            markets[shown] = markets.get(shown, 0) + 1
        worst = worst_state(markets)
        assert worst is not None  # every origin listed has a report
        times = [s.last_data_ms for s in reports if s.last_data_ms is not None]
        summaries[origin] = OriginSummary(
            reports[0].source,
            worst,
            {state: markets[state] for state in SEVERITY if state in markets},
            max(times, default=None),
        )
    return summaries


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(FeedStatus)
_MAX_REPORT_BYTES: Final = 512


def decode_feed_status(raw: bytes | str) -> FeedStatus | None:
    """A report read back from Redis, or None if it is not one (too long, malformed)."""
    if len(raw) > _MAX_REPORT_BYTES:
        return None
    try:
        return _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
