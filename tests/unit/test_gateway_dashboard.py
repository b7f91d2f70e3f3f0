"""The dashboard's static files: elements exist, scripts parse, feed wording, header and alert
states in node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tickstream_gateway import api
from tickstream_gateway.app import STATIC_DIR

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def run_module_js(name: str, expression: str) -> Any:
    """The JSON value of `expression`, evaluated in node with static/<name>.js imported as
    `<name>`."""
    assert NODE is not None
    # A data: URL is an ES module whatever node's default module type is.
    script = f"""
import {{ readFileSync }} from 'node:fs';
const source = readFileSync({json.dumps(str(STATIC_DIR / f"{name}.js"))}, 'utf8');
const {name} = await import('data:text/javascript,' + encodeURIComponent(source));
console.log(JSON.stringify({expression}));
"""
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


def run_feeds_js(expression: str) -> Any:
    """The JSON value of `expression`, evaluated in node with feeds.js imported as `feeds`."""
    return run_module_js("feeds", expression)


def test_every_element_the_script_looks_up_is_in_the_page() -> None:
    """Every fixed data-testid app.js looks up (feed ones included) is in index.html."""
    script = (STATIC_DIR / "app.js").read_text()
    page = (STATIC_DIR / "index.html").read_text()
    looked_up = set(re.findall(r"byTestId\('([^']+)'\)", script))
    assert {"feed-origins", "empty-state", "selected-feed", "stale-badge", "status"} <= looked_up
    in_page = set(re.findall(r'data-testid="([^"]+)"', page))
    assert looked_up - in_page == set()


@needs_node
@pytest.mark.parametrize("name", ["app.js", "feeds.js", "alerts.js"])
def test_scripts_parse_as_modules(name: str) -> None:
    """The dashboard's scripts are valid ES modules."""
    assert NODE is not None
    source = (STATIC_DIR / name).read_text()
    subprocess.run(
        [NODE, "--input-type=module", "--check"], input=source, text=True, timeout=30, check=True
    )


def report(source: str, state: str) -> dict[str, object]:
    return {"source": source, "origin": source, "state": state, "last_data_ms": 1}


@needs_node
def test_a_markets_badge_is_green_only_for_live_exchange_data() -> None:
    """Exchange feeds show their state; replay and synthetic are named by kind, never green."""
    feeds = {
        "b:btc-usdt": report("live", "live"),
        "b:eth-usdt": report("live", "unreachable"),
        "b:sol-usdt": report("live", "reconnecting"),
        "b:xrp-usdt": report("live", "stale"),
        "b:ada-usdt": report("live", "connecting"),
        "r:btc-usdt": report("replay", "live"),
        "r:eth-usdt": report("replay", "finished"),
        "r:sol-usdt": report("replay", "stale"),
        "s:btc-usd": report("synthetic", "live"),
        "s:eth-usd": report("synthetic", "connecting"),
        "x:odd-usd": report("live", "toString"),
        "x:ftp-usd": report("ftp", "live"),
    }
    markets = [*feeds, "k:nope-usd"]
    badges = run_feeds_js(
        f"[{json.dumps(markets)}.map((m) => feeds.feedBadgeOf({json.dumps(feeds)}, m))"
        ".map((b) => [b.state, b.text, b.tone]), feeds.feedBadgeOf(null, 'b:x-y')]"
    )
    assert badges == [
        [
            ["live", "live", "good"],
            ["unreachable", "unreachable", "bad"],
            ["reconnecting", "reconnecting", "warn"],
            ["stale", "stale", "warn"],
            ["connecting", "connecting", "warn"],
            ["live", "replay", "neutral"],
            ["finished", "replay finished", "neutral"],
            ["stale", "replay stale", "warn"],
            ["live", "synthetic", "neutral"],
            ["connecting", "synthetic connecting", "warn"],
            ["unknown", "unknown", "muted"],
            ["live", "unknown source", "neutral"],
            ["unknown", "unknown", "muted"],
        ],
        None,
    ]


def summary(source: str, state: str, **markets: int) -> dict[str, object]:
    return {"source": source, "state": state, "markets": markets, "last_data_ms": None}


@needs_node
def test_origin_badges_name_each_exchange_and_kind() -> None:
    """One badge per origin by name: the exchange and its state, or the kind of data."""
    origins = {
        "kraken": summary("live", "live", live=3),
        "binance": summary("live", "unreachable", unreachable=2, live=1),
        "synthetic": summary("synthetic", "live", live=4),
        "replay": summary("replay", "finished", finished=2),
        "junk": 7,
    }
    badges = run_feeds_js(
        f"feeds.originBadges({json.dumps(origins)}).map((b) => [b.origin, b.text, b.tone, b.title])"
    )
    assert [b[:3] for b in badges] == [
        ["binance", "binance unreachable", "bad"],
        ["kraken", "kraken live", "good"],
        ["replay", "replay finished", "neutral"],
        ["synthetic", "synthetic", "neutral"],
    ]
    assert badges[0][3].endswith("(markets: 2 unreachable, 1 live)")
    assert run_feeds_js("[feeds.originBadges(null), feeds.originBadges({})]") == [[], []]


@needs_node
@pytest.mark.parametrize(
    ("origins", "state", "text"),
    [
        (None, "waiting", "waiting for data"),
        ({}, "waiting", "no data"),
        ({"binance": summary("live", "unreachable", unreachable=5)}, "down", "unreachable"),
        (
            {
                "binance": summary("live", "unreachable", unreachable=5),
                "kraken": summary("live", "reconnecting", reconnecting=1),
            },
            "waiting",
            "no live data",
        ),
        ({"binance": summary("live", "stale", stale=2)}, "waiting", "no live data"),
        ({"binance": summary("live", "connecting", connecting=2)}, "waiting", "no live data"),
        ({"binance": summary("live", "stale", stale=1, live=9)}, "connected", "connected"),
        ({"synthetic": summary("synthetic", "live", live=2)}, "connected", "connected"),
        ({"replay": summary("replay", "finished", finished=2)}, "finished", "replay finished"),
    ],
)
def test_open_socket_is_green_only_while_a_feed_is_live(
    origins: dict[str, object] | None, state: str, text: str
) -> None:
    """An open WebSocket shows `connected` only with live data; else it says why not."""
    status = run_feeds_js(f"feeds.openStatus({json.dumps(origins)})")
    assert (status["state"], status["text"]) == (state, text)


@needs_node
def test_open_status_names_each_origins_state() -> None:
    """The indicator's title lists each origin with its state."""
    origins = {
        "kraken": summary("live", "reconnecting", reconnecting=1),
        "binance": summary("live", "unreachable", unreachable=5),
    }
    status = run_feeds_js(f"feeds.openStatus({json.dumps(origins)})")
    assert status["title"] == "binance: unreachable, kraken: reconnecting"


@needs_node
def test_empty_page_says_why() -> None:
    """Without metrics the page says which feeds it waits for; with some, or unloaded, nothing."""
    down = {"binance": summary("live", "unreachable", unreachable=5)}
    flowing = {**down, "kraken": summary("live", "live", live=1)}
    texts = run_feeds_js(
        f"[[{json.dumps(down)}, 0], [{{}}, 0], [{json.dumps(flowing)}, 0], "
        f"[{json.dumps(down)}, 4], [null, 0]].map(([o, n]) => feeds.emptyState(o, n))"
    )
    assert texts == [
        "Waiting for data from binance: unreachable.",
        "No data: no watcher reports any feed (is the watcher running?).",
        "Data is arriving from kraken: statistics appear once the stats service has processed it.",
        None,
        None,
    ]


def css_colours(selector: str) -> dict[str, str]:
    """`value -> colour variable` of the style.css rules `<selector>="value"...{ ...var(--x) }`."""
    css = (STATIC_DIR / "style.css").read_text()
    pattern = re.escape(selector) + r'="([a-z]+)"\]([^{,]*)\{[^}]*var\(--([a-z]+)\)'
    return {
        f"{value} {rest.strip()}".strip(): colour
        for value, rest, colour in re.findall(pattern, css)
    }


def test_only_live_data_and_a_live_connection_are_coloured_green() -> None:
    """style.css: tone good alone is green; only `connected` has a green status dot."""
    assert css_colours(".feed-badge[data-tone") == {
        "good": "good",
        "warn": "warn",
        "bad": "bad",
        "neutral": "accent",
    }
    dots = {k: v for k, v in css_colours(".status[data-state").items() if k.endswith("-dot")}
    assert dots == {
        "connected .status-dot": "good",
        "reconnecting .status-dot": "warn",
        "waiting .status-dot": "warn",
        "down .status-dot": "bad",
        "finished .status-dot": "accent",
    }


def run_dashboard(tmp_path: Path, scenario: dict[str, Any]) -> Any:
    """What app.js shows for `scenario`, run in node by dashboard_harness.mjs (see there)."""
    assert NODE is not None
    for name in ("app.js", "feeds.js", "alerts.js"):
        shutil.copy(STATIC_DIR / name, tmp_path / name)
    shutil.copy(Path(__file__).with_name("dashboard_harness.mjs"), tmp_path / "harness.mjs")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    done = subprocess.run(
        [NODE, "harness.mjs", json.dumps(scenario)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def metrics_body(
    reports: dict[str, dict[str, object]], origins: dict[str, object], with_metrics: bool
) -> dict[str, object]:
    """An /api/metrics body: a price metric per reported market when `with_metrics`."""
    metrics = [
        {"id": f"{m}:price", "market": m, "kind": "price", "stale": False, "ranks": {}}
        for m in reports
    ]
    return {"metrics": metrics if with_metrics else [], "feeds": reports, "origins": origins}


@needs_node
def test_dashboard_with_an_unreachable_exchange_is_red_and_says_why(tmp_path: Path) -> None:
    """Socket open, binance unreachable, no metrics: red status, red badge, an explanation."""
    reports = {"binance:btc-usdt": report("live", "unreachable")}
    origins = {"binance": summary("live", "unreachable", unreachable=1)}
    shown = run_dashboard(
        tmp_path, {"open": True, "metrics": metrics_body(reports, origins, with_metrics=False)}
    )
    assert shown["before_open"] == {"state": "connecting", "text": "connecting", "title": ""}
    assert shown["status"] == {
        "state": "down",
        "text": "unreachable",
        "title": "binance: unreachable",
    }
    assert shown["empty"] == "Waiting for data from binance: unreachable."
    assert shown["origins"] == [["binance unreachable", "bad"]]


@needs_node
def test_dashboard_without_feed_reports_is_not_green(tmp_path: Path) -> None:
    """Socket open but no watcher reports: amber `no data` and the reason, never `connected`."""
    shown = run_dashboard(tmp_path, {"open": True, "metrics": metrics_body({}, {}, False)})
    assert (shown["status"]["state"], shown["status"]["text"]) == ("waiting", "no data")
    assert shown["empty"] == "No data: no watcher reports any feed (is the watcher running?)."
    assert shown["origins"] == []


@needs_node
def test_dashboard_labels_a_replay_replay(tmp_path: Path) -> None:
    """A flowing replay: `connected`, its header and rank badges say `replay`, in blue."""
    reports = {"replay:btc-usdt": report("replay", "live")}
    origins = {"replay": summary("replay", "live", live=1)}
    rank = {
        "metric": "replay:btc-usdt:price",
        "position": 1,
        "total": 1,
        "label": "1/1",
        "value": 1.0,
        "std": 1.0,
        "cv": 1.0,
        "mean": 1.0,
        "count": 1,
    }
    shown = run_dashboard(
        tmp_path,
        {"open": True, "metrics": metrics_body(reports, origins, True), "ranks": [rank]},
    )
    assert (shown["status"]["state"], shown["status"]["text"]) == ("connected", "connected")
    assert shown["empty"] is None
    assert shown["origins"] == [["replay", "neutral"]]
    assert shown["rank_feeds"] == [[["replay", "neutral"]]]


@needs_node
def test_alert_states_replace_older_ones_of_the_same_alert() -> None:
    """A retraction or confirmation (larger status_seq) replaces the alert shown; a repeat or
    an older state does not; a message without a status shows as provisional."""
    raised = {"alert_id": "a", "seq": 5, "status": "provisional", "status_seq": 5}
    retracted = {**raised, "status": "retracted", "status_seq": 9}
    before_statuses = {"alert_id": "a", "seq": 5}
    got = run_module_js(
        "alerts",
        f"[[{json.dumps(retracted)}, {json.dumps(raised)}], [{json.dumps(raised)}, null],"
        f" [{json.dumps(raised)}, {json.dumps(retracted)}], [{json.dumps(raised)},"
        f" {json.dumps(raised)}], [{json.dumps(retracted)}, {json.dumps(before_statuses)}]]"
        ".map(([alert, held]) => alerts.supersedes(alert, held))"
        f".concat([{json.dumps(before_statuses)}, {json.dumps(retracted)}, {{status: 'x'}}]"
        ".map(alerts.alertStatus))",
    )
    assert got == [True, True, False, False, True, "provisional", "retracted", "provisional"]


def rank_entry(metric: str, position: int, total: int) -> dict[str, object]:
    """A ranks frame entry of a price metric."""
    return {
        "metric": metric,
        "position": position,
        "total": total,
        "label": f"{position}/{total}",
        "value": 1.0,
        "std": 1.0,
        "cv": 1.0,
        "logret": 1.0,
        "mean": 1.0,
        "count": 1,
    }


@needs_node
def test_dashboard_asks_only_for_what_it_shows(tmp_path: Path) -> None:
    """Kinds come from /api/kinds; ranks are one limited subscription per kind; the stats poll
    asks for the shown market alone; never the whole /api/metrics nor /api/ranks."""
    reports = {"binance:btc-usdt": report("live", "live")}
    origins = {"binance": summary("live", "live", live=1)}
    shown = run_dashboard(
        tmp_path, {"open": True, "metrics": metrics_body(reports, origins, with_metrics=True)}
    )
    assert shown["fetched"][:2] == ["/api/alerts?limit=50", "/api/kinds"]
    assert "/api/metrics?limit=1" in shown["fetched"]  # no market chosen yet: find one
    assert "/api/metrics?q=binance%3Abtc-usdt&limit=4" in shown["fetched"]
    assert {
        "/api/metrics/binance%3Abtc-usdt%3Aprice",
        "/api/metrics/binance%3Abtc-usdt%3Avolume",
    } <= set(shown["fetched"])
    assert not any(
        url == "/api/metrics" or url.startswith("/api/ranks") for url in shown["fetched"]
    )
    ranks = [f for f in shown["sent"] if f.get("channel") == "ranks"]
    assert ranks == [
        {"op": "subscribe", "channel": "ranks", "kind": "price", "by": "logret", "limit": 15},
        {"op": "subscribe", "channel": "ranks", "kind": "volume", "by": "cv", "limit": 15},
    ]
    assert {"op": "subscribe", "channel": "market", "market": "binance:btc-usdt"} in shown["sent"]


@needs_node
def test_dashboard_shows_the_selected_market_below_the_top_rows(tmp_path: Path) -> None:
    """The selected market ranked below the top rows comes in `own`: shown after a gap row."""
    reports = {"binance:btc-usdt": report("live", "live")}
    origins = {"binance": summary("live", "live", live=1)}
    shown = run_dashboard(
        tmp_path,
        {
            "open": True,
            "metrics": metrics_body(reports, origins, with_metrics=True),
            "ranks": [rank_entry("kraken:eth-usd:price", 1, 40)],
            "own": [rank_entry("binance:btc-usdt:price", 37, 40)],
        },
    )
    assert shown["rank_rows"] == ["kraken:eth-usd:price", "gap", "binance:btc-usdt:price"]
    # A row of a market without a loaded report shows its exchange's summary (none: unknown).
    assert shown["rank_feeds"] == [[["unknown", "muted"]], [["live", "good"]]]


@needs_node
def test_dashboard_searches_markets_on_the_server(tmp_path: Path) -> None:
    """Typed text goes to /api/metrics as `q` once typing pauses; the markets found are listed
    once each; text the gateway would refuse is answered on the page, never sent."""
    reports = {"binance:btc-usdt": report("live", "live"), "kraken:btc-usd": report("live", "live")}
    origins = {
        "binance": summary("live", "live", live=1),
        "kraken": summary("live", "live", live=1),
    }
    shown = run_dashboard(
        tmp_path,
        {
            "open": True,
            "metrics": metrics_body(reports, origins, with_metrics=True),
            "search": [" BTC", "btc/usd", ""],
        },
    )
    searches = [url for url in shown["fetched"] if "q=btc" in url and "limit=40" in url]
    assert searches == ["/api/metrics?q=btc&limit=40"]
    assert shown["searches"] == [
        {"hidden": False, "items": ["binance:btc-usdt", "kraken:btc-usd"]},
        {"hidden": False, "items": ["use a-z, 0-9, ':' and '-' (at most 64)"]},
        {"hidden": True, "items": ["use a-z, 0-9, ':' and '-' (at most 64)"]},
    ]


@needs_node
def test_dashboard_ranks_and_charts_turnover_like_the_other_kinds(tmp_path: Path) -> None:
    """With the gateway's own /api/kinds, turnover gets a ranks subscription, table and stats
    row; its chart draws a bar per minute whose quote volume is known and none where unknown."""
    kinds = json.loads(api.KINDS_BODY.body)
    assert [k["kind"] for k in kinds["kinds"]] == ["price", "volume", "turnover"]
    reports = {"binance:btc-usdt": report("live", "live")}
    origins = {"binance": summary("live", "live", live=1)}
    body = metrics_body(reports, origins, with_metrics=True)
    turnover = {
        "id": "binance:btc-usdt:turnover",
        "market": "binance:btc-usdt",
        "kind": "turnover",
        "stale": False,
        "ranks": {},
        "count": 1440,
        "mean": 2.5e6,
        "std": 1.0,
        "cv": 0.5,
    }
    body["metrics"] = [*body["metrics"], turnover]  # type: ignore[misc]
    minute = 1_700_000_040_000
    point = {"seq": 1, "exchange_ts": minute, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0}
    bars = [
        {**point, "minute": minute, "volume": 2.0, "quote_volume": 2.0, "closed": True},
        {**point, "minute": minute + 60_000, "volume": 3.0, "quote_volume": None, "closed": True},
        {**point, "minute": minute + 120_000, "volume": 4.0, "quote_volume": 4.0, "closed": False},
    ]
    turnover_entry = {**rank_entry("binance:btc-usdt:turnover", 1, 1), "logret": None}
    shown = run_dashboard(
        tmp_path,
        {
            "open": True,
            "kinds": kinds,
            "metrics": body,
            "frames": [
                {"type": "subscribed", "channel": "ranks", "kind": "turnover", "by": "cv"},
                {
                    "type": "ranks",
                    "kind": "turnover",
                    "by": "cv",
                    "total": 1,
                    "ranks": [turnover_entry],
                    "own": [],
                },
                {"type": "history", "market": "binance:btc-usdt", "since": None, "bars": bars},
            ],
        },
    )
    subscribed = [f for f in shown["sent"] if f.get("channel") == "ranks"]
    assert {"op": "subscribe", "channel": "ranks", "kind": "turnover", "by": "cv", "limit": 15} in (
        subscribed
    )
    assert shown["tables"]["turnover"] == ["binance:btc-usdt:turnover"]
    assert "/api/metrics/binance%3Abtc-usdt%3Aturnover" in shown["fetched"]  # its day of values
    # The selected market's turnover stats, updated from its ranks entry (count 1, mean 1).
    assert shown["stats"]["turnover"][:9] == [
        "turnover",
        "count",
        "1",
        "mean",
        "1",
        "std",
        "1",
        "cv",
        "1",
    ]
    assert "1/1" in shown["stats"]["turnover"]
    assert shown["bars_drawn"]["volume"] == 3
    assert shown["bars_drawn"]["turnover"] == 2
