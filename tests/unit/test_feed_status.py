"""The feed status record: its JSON, its bounded decoder, the shown state and the summaries."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickstream_shared.feed_status import (
    SEVERITY,
    STALE_AFTER_MS,
    FeedStatus,
    OriginSummary,
    ReportedState,
    decode_feed_status,
    summarise,
    worst_state,
)

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


@pytest.mark.parametrize("state", get_args(ReportedState))
def test_every_state_round_trips_and_ages_to_stale(state: ReportedState) -> None:
    """Each state of the vocabulary decodes back and is shown as reported until it is too old."""
    report = FeedStatus("live", "binance", state, REPORTED, REPORTED - 1)
    assert decode_feed_status(report.encode()) == report
    assert report.shown_state(REPORTED + STALE_AFTER_MS) == state
    assert report.shown_state(REPORTED + STALE_AFTER_MS + 1) == "stale"


def test_live_without_any_data_is_shown_connecting() -> None:
    """A `live` report with no data yet is shown `connecting`; other states as reported."""
    assert FeedStatus("live", "kraken", "live", REPORTED).shown_state(REPORTED) == "connecting"
    assert FeedStatus("replay", "replay", "live", REPORTED).as_json(REPORTED)["state"] == (
        "connecting"
    )
    unreachable = FeedStatus("live", "kraken", "unreachable", REPORTED)
    assert unreachable.shown_state(REPORTED) == "unreachable"
    assert FeedStatus("live", "kraken", "live", REPORTED, 0).shown_state(REPORTED) == "live"


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
        b'{"source":"live","origin":"binance","state":"gone","reported_ms":1}',
        b'{"source":"live","origin":"binance","state":"LIVE","reported_ms":1}',
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


def test_severity_orders_every_state_worst_first() -> None:
    """SEVERITY names every state once, worst first, `finished` after `live`."""
    assert sorted(SEVERITY) == sorted(get_args(ReportedState))
    assert SEVERITY == ("unreachable", "reconnecting", "stale", "connecting", "live", "finished")


@pytest.mark.parametrize(
    ("states", "worst"),
    [
        (["live", "unreachable", "stale"], "unreachable"),
        (["stale", "reconnecting", "live"], "reconnecting"),
        (["live", "connecting", "stale"], "stale"),
        (["live", "connecting"], "connecting"),
        (["finished", "live", "finished"], "live"),
        (["finished"], "finished"),
        ([], None),
    ],
)
def test_worst_state(states: list[ReportedState], worst: ReportedState | None) -> None:
    """The worst state of several is the first of them in SEVERITY; none of nothing."""
    assert worst_state(states) == worst


def test_summarise_counts_each_origins_markets_at_one_time() -> None:
    """Per origin, by name: its source, worst shown state, markets per state, newest data."""
    now = REPORTED + 500
    old = REPORTED - STALE_AFTER_MS  # older than the bound at `now`
    feeds = [
        FeedStatus("live", "kraken", "live", REPORTED, REPORTED - 900),
        FeedStatus("live", "binance", "live", REPORTED, REPORTED - 100),
        FeedStatus("live", "binance", "unreachable", REPORTED, REPORTED - 60_000),
        FeedStatus("live", "binance", "live", REPORTED, REPORTED - 300),
        FeedStatus("live", "kraken", "live", old, old),
        FeedStatus("replay", "replay", "finished", REPORTED, REPORTED - 5),
        FeedStatus("synthetic", "synthetic", "live", REPORTED),
    ]
    summaries = summarise(feeds, now)
    assert summaries == {
        "binance": OriginSummary(
            "live", "unreachable", {"unreachable": 1, "live": 2}, REPORTED - 100
        ),
        "kraken": OriginSummary("live", "stale", {"stale": 1, "live": 1}, REPORTED - 900),
        "replay": OriginSummary("replay", "finished", {"finished": 1}, REPORTED - 5),
        "synthetic": OriginSummary("synthetic", "connecting", {"connecting": 1}, None),
    }
    assert list(summaries) == ["binance", "kraken", "replay", "synthetic"]
    assert list(summaries["binance"].markets) == ["unreachable", "live"]
    assert summarise([], now) == {}


def test_summary_json_shape() -> None:
    """A summary encodes as {source, state, markets, last_data_ms}, markets worst first."""
    summary = summarise([FeedStatus("live", "binance", "reconnecting", REPORTED)], REPORTED)
    assert msgspec.json.encode(summary) == (
        b'{"binance":{"source":"live","state":"reconnecting",'
        b'"markets":{"reconnecting":1},"last_data_ms":null}}'
    )
