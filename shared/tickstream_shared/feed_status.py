"""Feed status: what the publishing watcher reports of each market's feed, and how it ages.

The watcher that holds the lease writes, about once a second, one Redis hash (FEEDS_KEY):
market id -> FeedStatus JSON. The gateway reads it for `/api/metrics` and the dashboard. A
report older than STALE_AFTER_MS means nobody is publishing that market (the watcher died
and no standby has taken over yet, or it lost its lease): the gateway shows it as `stale`.
"""

from __future__ import annotations

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

FeedSource = Literal["live", "replay", "synthetic"]
# connecting: no connection made yet; live: data is flowing (or the connection is up and
# waiting for trades); reconnecting: the market's connection is down and being re-established;
# unreachable: the exchange cannot be reached (its listing, or connections failing in a row);
# stale: the market is silent while its connection's other markets update;
# finished: a replay has sent everything it had.
ReportedState = Literal["connecting", "live", "reconnecting", "unreachable", "stale", "finished"]
ShownState = ReportedState

_Ms = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
_Text = Annotated[str, msgspec.Meta(max_length=64)]


class FeedStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One market's feed as its watcher last reported it.

    `origin` says where the data comes from: the exchange for `live`, `replay` or
    `synthetic` otherwise. `reported_ms` is the watcher's wall clock at the report;
    `last_data_ms` the receive time of the market's newest update (None before the first).
    """

    source: FeedSource
    origin: _Text
    state: ReportedState
    reported_ms: _Ms
    last_data_ms: _Ms | None = None

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    def shown_state(self, now_ms: int) -> ShownState:
        """The state to show at `now_ms`: `stale` once the report is too old."""
        if now_ms - self.reported_ms > STALE_AFTER_MS:
            return "stale"
        return self.state

    def as_json(self, now_ms: int) -> dict[str, object]:
        return {
            "source": self.source,
            "origin": self.origin,
            "state": self.shown_state(now_ms),
            "reported_ms": self.reported_ms,
            "last_data_ms": self.last_data_ms,
        }


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
