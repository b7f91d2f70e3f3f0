"""The feed status record: its JSON, its bounded decoder and the staleness rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickstream_shared.feed_status import STALE_AFTER_MS, FeedStatus, decode_feed_status

REPORTED = 1_700_000_000_000
LIVE = FeedStatus("live", "binance", "live", REPORTED, REPORTED - 250)


def test_report_round_trips_through_its_json() -> None:
    """What the watcher encodes decodes back to the same report."""
    assert decode_feed_status(LIVE.encode()) == LIVE
    assert decode_feed_status(LIVE.encode().decode()) == LIVE
    assert LIVE.encode() == (
        b'{"source":"live","origin":"binance","state":"live",'
        b'"reported_ms":1700000000000,"last_data_ms":1699999999750}'
    )


def test_report_turns_stale_after_the_bound() -> None:
    """A report is shown as reported up to STALE_AFTER_MS old, then as stale."""
    finished = FeedStatus("replay", "replay", "finished", REPORTED)
    assert LIVE.shown_state(REPORTED) == "live"
    assert LIVE.shown_state(REPORTED + STALE_AFTER_MS) == "live"
    assert LIVE.shown_state(REPORTED + STALE_AFTER_MS + 1) == "stale"
    assert finished.shown_state(REPORTED + STALE_AFTER_MS) == "finished"
    assert finished.shown_state(REPORTED + STALE_AFTER_MS + 1) == "stale"


def test_as_json_shows_the_state_at_the_given_time() -> None:
    """as_json carries every field, with the state as shown at `now_ms`."""
    reconnecting = FeedStatus("live", "kraken", "reconnecting", REPORTED)
    assert reconnecting.as_json(REPORTED + 1_000) == {
        "source": "live",
        "origin": "kraken",
        "state": "reconnecting",
        "reported_ms": REPORTED,
        "last_data_ms": None,
    }
    assert reconnecting.as_json(REPORTED + STALE_AFTER_MS + 1)["state"] == "stale"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"source":"live","origin":"binance","state":"live"}',
        b'{"source":"ftp","origin":"binance","state":"live","reported_ms":1}',
        b'{"source":"live","origin":"binance","state":"dead","reported_ms":1}',
        b'{"source":"live","origin":"binance","state":"live","reported_ms":-1}',
        b'{"source":"live","origin":"binance","state":"live","reported_ms":"1"}',
        b'{"source":"live","origin":"' + b"x" * 65 + b'","state":"live","reported_ms":1}',
        b'{"source":"live","origin":"binance","state":"live","reported_ms":1,"pad":"'
        + b"x" * 512
        + b'"}',
        b"\xff\xfe",
    ],
)
def test_bad_reports_decode_to_none(raw: bytes) -> None:
    """Malformed, out-of-range, unknown-state and oversized reports decode to None."""
    assert decode_feed_status(raw) is None


def test_unknown_fields_are_ignored() -> None:
    """A field added by a newer watcher does not make the report unreadable."""
    raw = b'{"source":"synthetic","origin":"synthetic","state":"live","reported_ms":5,"x":1}'
    assert decode_feed_status(raw) == FeedStatus("synthetic", "synthetic", "live", 5)


@given(st.binary(max_size=600))
def test_decoder_never_raises(raw: bytes) -> None:
    """Any bytes decode to a report or to None, never to an exception."""
    decoded = decode_feed_status(raw)
    assert decoded is None or isinstance(decoded, FeedStatus)
