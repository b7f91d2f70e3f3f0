"""Feed reports as `/api/metrics` and `/api/feeds` show them: decoded, bounded, aged, summed up."""

from __future__ import annotations

import msgspec

from tickstream_gateway.feeds import (
    MAX_FEEDS,
    decode_feeds,
    feeds_json,
    origins_json,
    shown_state,
)
from tickstream_gateway.metrics import metric_json
from tickstream_gateway.ranks import MetricStats
from tickstream_shared.feed_status import STALE_AFTER_MS, FeedStatus
from tickstream_shared.naming import MetricId

NOW = 1_700_000_000_000
BTC = FeedStatus("live", "binance", "live", NOW - 1_000, NOW - 1_200)
ETH = FeedStatus("live", "coinbase", "reconnecting", NOW - 2_000, NOW - 30_000)
GONE = FeedStatus("replay", "replay", "finished", NOW - STALE_AFTER_MS - 1)


def test_reports_are_decoded_by_market_id_in_order() -> None:
    """Good reports come back keyed by market id, sorted, whatever the hash order."""
    raw = {
        b"coinbase:eth-usd": ETH.encode(),
        b"binance:btc-usdt": BTC.encode(),
        b"replay:sol-usdt": GONE.encode(),
    }
    feeds = decode_feeds(raw)
    assert feeds == {"binance:btc-usdt": BTC, "coinbase:eth-usd": ETH, "replay:sol-usdt": GONE}
    assert list(feeds) == ["binance:btc-usdt", "coinbase:eth-usd", "replay:sol-usdt"]


def test_bad_fields_and_values_are_skipped() -> None:
    """Fields that are not canonical market ids and values that are not reports are skipped."""
    raw = {
        b"binance:btc-usdt": BTC.encode(),
        b"BINANCE:ETH-USDT": ETH.encode(),
        b" binance:eth-usdt": ETH.encode(),
        b"binance:eth-usdt:price": ETH.encode(),
        b"nonsense": ETH.encode(),
        b"binance:\xff-usdt": ETH.encode(),
        b"binance:" + b"a" * 100 + b"-usdt": ETH.encode(),
        b"kraken:btc-usd": b"{not json",
        b"kraken:eth-usd": b"\xff\xfe",
        b"kraken:sol-usd": b'{"source":"live","origin":"kraken","state":"gone","reported_ms":1}',
    }
    assert decode_feeds(raw) == {"binance:btc-usdt": BTC}


def test_at_most_max_feeds_are_kept() -> None:
    """A hash larger than any watcher writes is cut to the first MAX_FEEDS market ids."""
    raw = {f"x:m{i:05d}-usd".encode(): BTC.encode() for i in range(MAX_FEEDS + 10)}
    raw[b"a:bad-usd"] = b"garbage"  # skipped, so it takes no place in the bound
    feeds = decode_feeds(raw)
    assert list(feeds) == [f"x:m{i:05d}-usd" for i in range(MAX_FEEDS)]


def test_feeds_json_ages_every_report_at_one_time() -> None:
    """Each report is shown at `now_ms`: fresh ones as reported, old ones as stale."""
    feeds = {"binance:btc-usdt": BTC, "coinbase:eth-usd": ETH, "replay:sol-usdt": GONE}
    assert feeds_json(feeds, NOW) == {
        "binance:btc-usdt": {
            "source": "live",
            "origin": "binance",
            "state": "live",
            "reported_ms": NOW - 1_000,
            "last_data_ms": NOW - 1_200,
        },
        "coinbase:eth-usd": {
            "source": "live",
            "origin": "coinbase",
            "state": "reconnecting",
            "reported_ms": NOW - 2_000,
            "last_data_ms": NOW - 30_000,
        },
        "replay:sol-usdt": {
            "source": "replay",
            "origin": "replay",
            "state": "stale",
            "reported_ms": NOW - STALE_AFTER_MS - 1,
            "last_data_ms": None,
        },
    }
    assert feeds_json({}, NOW) == {}


def test_each_state_and_source_is_served_as_reported_until_too_old() -> None:
    """A replay keeps source `replay`, unreachable stays unreachable, an old report is stale."""
    replay = FeedStatus("replay", "replay", "live", NOW - 1_000, NOW - 1_100)
    down = FeedStatus("live", "binance", "unreachable", NOW - 1_000, NOW - 600_000)
    silent = FeedStatus("live", "binance", "stale", NOW - 1_000, NOW - 300_000)
    old = FeedStatus("synthetic", "synthetic", "live", NOW - STALE_AFTER_MS - 1, NOW - 20_000)
    raw = {
        b"binance:btc-usdt": down.encode(),
        b"binance:eth-usdt": silent.encode(),
        b"binance:sol-usdt": replay.encode(),
        b"synthetic:btc-usd": old.encode(),
    }
    shown = {
        market: (body["source"], body["origin"], body["state"])
        for market, body in feeds_json(decode_feeds(raw), NOW).items()
    }
    assert shown == {
        "binance:btc-usdt": ("live", "binance", "unreachable"),
        "binance:eth-usdt": ("live", "binance", "stale"),
        "binance:sol-usdt": ("replay", "replay", "live"),
        "synthetic:btc-usd": ("synthetic", "synthetic", "stale"),
    }


def test_origins_sum_up_each_origin_as_json() -> None:
    """`origins`: per origin its source, worst shown state, markets per state, newest data."""
    feeds = {
        "binance:btc-usdt": BTC,
        "binance:eth-usdt": FeedStatus("live", "binance", "unreachable", NOW - 1_000),
        "coinbase:eth-usd": ETH,
        "replay:sol-usdt": GONE,
    }
    assert msgspec.to_builtins(origins_json(feeds, NOW)) == {
        "binance": {
            "source": "live",
            "state": "unreachable",
            "markets": {"unreachable": 1, "live": 1},
            "last_data_ms": NOW - 1_200,
        },
        "coinbase": {
            "source": "live",
            "state": "reconnecting",
            "markets": {"reconnecting": 1},
            "last_data_ms": NOW - 30_000,
        },
        "replay": {
            "source": "replay",
            "state": "stale",
            "markets": {"stale": 1},
            "last_data_ms": None,
        },
    }
    assert origins_json({}, NOW) == {}


def test_metric_entry_carries_its_markets_feed_state() -> None:
    """A metric entry's `feed` is its market's shown state, or None without a report."""
    assert shown_state(ETH, NOW) == "reconnecting"
    assert shown_state(ETH, NOW + STALE_AFTER_MS) == "stale"
    assert shown_state(None, NOW) is None
    stats = MetricStats(
        count=3,
        mean=2.0,
        std=0.5,
        min=1.5,
        max=2.5,
        cv=0.25,
        logret=None,
        last=2.5,
        minute=NOW - 60_000,
        last_ts=NOW - 1_200,
        stale=False,
        clock=NOW - 60_000,
    )
    metric = MetricId.parse("binance:btc-usdt:volume")
    body = metric_json(metric, stats, {"std": (1, 2), "cv": (None, 2)}, shown_state(BTC, NOW))
    assert body == {
        "id": "binance:btc-usdt:volume",
        "market": "binance:btc-usdt",
        "kind": "volume",
        "count": 3,
        "mean": 2.0,
        "std": 0.5,
        "min": 1.5,
        "max": 2.5,
        "cv": 0.25,
        "last": 2.5,
        "minute": NOW - 60_000,
        "last_ts": NOW - 1_200,
        "stale": False,
        "clock": NOW - 60_000,
        "ranks": {
            "std": {"position": 1, "total": 2, "rank": "1/2"},
            "cv": {"position": None, "total": 2, "rank": None},
        },
        "position": 1,
        "total": 2,
        "rank": "1/2",
        "feed": "live",
    }
    assert metric_json(metric, stats, {"std": (None, 0)}, None)["feed"] is None
