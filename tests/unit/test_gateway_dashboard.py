"""The dashboard's static files: elements it looks up exist, scripts parse, feed wording and
alert states in node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

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


def test_every_element_the_script_looks_up_is_in_the_page() -> None:
    """Every fixed data-testid app.js looks up (feed ones included) is in index.html."""
    script = (STATIC_DIR / "app.js").read_text()
    page = (STATIC_DIR / "index.html").read_text()
    looked_up = set(re.findall(r"byTestId\('([^']+)'\)", script))
    assert {"data-source", "selected-feed", "stale-badge"} <= looked_up
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


@needs_node
def test_source_summary_names_sources_and_exchanges() -> None:
    """The header names each source once, live with its exchanges, and says when all are stale."""
    live = {
        "k:btc-usd": {"source": "live", "origin": "kraken", "state": "live"},
        "b:btc-usdt": {"source": "live", "origin": "binance", "state": "reconnecting"},
        "b:eth-usdt": {"source": "live", "origin": "binance", "state": "stale"},
    }
    gone = {"r:btc-usdt": {"source": "replay", "origin": "replay", "state": "stale"}}
    mixed = {**gone, "s:a-b": {"source": "synthetic", "origin": "synthetic", "state": "live"}}
    summaries = run_module_js(
        "feeds",
        f"[{json.dumps(live)}, {json.dumps(gone)}, {json.dumps(mixed)}, {{}}, null, "
        '{"x:a-b": 7}].map(feeds.sourceSummary)',
    )
    assert summaries == [
        {"text": "live: binance, kraken", "stale": False},
        {"text": "replay", "stale": True},
        {"text": "replay · synthetic", "stale": False},
        {"text": None, "stale": False},
        {"text": None, "stale": False},
        {"text": None, "stale": False},
    ]


@needs_node
def test_feed_state_of_a_market() -> None:
    """A market's badge is its report's state, `unknown` without a report, none before a load."""
    feeds = {
        "b:btc-usdt": {"source": "live", "origin": "binance", "state": "reconnecting"},
        "r:btc-usdt": {"source": "replay", "origin": "replay", "state": "finished"},
        "x:odd-usd": {"source": "live", "origin": "x", "state": "toString"},
    }
    states = run_module_js(
        "feeds",
        "[['b:btc-usdt', 'r:btc-usdt', 'x:odd-usd', 'k:nope-usd']"
        f".map((m) => feeds.feedStateOf({json.dumps(feeds)}, m)),"
        " feeds.feedStateOf(null, 'b:x-y')]",
    )
    assert states == [["reconnecting", "finished", "unknown", "unknown"], None]


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
