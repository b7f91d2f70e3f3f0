"""`tickstream tail`'s pure parts: which topic a target names, how a record is printed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tickstream_shared.cli import _parser
from tickstream_shared.errors import BadIdentifier
from tickstream_shared.tail import record_line, resolve_topic


@dataclass
class FakeRecord:
    """The fields of aiokafka's ConsumerRecord that tail reads."""

    value: bytes | None
    key: bytes | None = b"binance:btc-usdt"
    headers: tuple[tuple[str, bytes], ...] = ()
    topic: str = "deadletter"
    partition: int = 0
    offset: int = 41
    timestamp: int = 1_700_000_000_000


@pytest.mark.parametrize(
    ("target", "market", "topic"),
    [
        ("ticks", "binance:btc-usdt", "ticks.binance.btc-usdt"),
        ("ticks", "Kraken:ETH-USD", "ticks.kraken.eth-usd"),
        ("ticks.okx.sol-usdt", None, "ticks.okx.sol-usdt"),
        ("alerts", None, "alerts"),
        ("deadletter", None, "deadletter"),
    ],
)
def test_targets_name_their_topic(target: str, market: str | None, topic: str) -> None:
    """A market's ticks, a tick topic, alerts and deadletter resolve to their topic."""
    assert resolve_topic(target, market) == topic


@pytest.mark.parametrize(
    ("target", "market", "says"),
    [
        ("ticks", None, "`ticks` needs a market"),
        ("ticks", "binance-btc-usdt", "is not <exchange>:<base>-<quote>"),
        ("alerts", "binance:btc-usdt", "only `ticks` takes a market"),
        ("trades", None, "is not `ticks <market>`, `alerts`, `deadletter` or a tick topic"),
        ("ticks.binance", None, "is not `ticks <market>`"),
    ],
)
def test_bad_targets_say_what_is_expected(target: str, market: str | None, says: str) -> None:
    """Anything else raises BadIdentifier saying what a target may be."""
    with pytest.raises(BadIdentifier, match=says.replace("(", r"\(")):
        resolve_topic(target, market)


def test_a_json_value_is_printed_as_json_on_one_line() -> None:
    """Topic, partition, offset, time, key, headers and the value itself, on one line."""
    record = FakeRecord(
        b'{"seq": 3,\n "close": 1.5}', headers=(("consumer", b"stats"), ("reason", b"bad \xff"))
    )
    line = record_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "topic": "deadletter",
        "partition": 0,
        "offset": 41,
        "timestamp_ms": 1_700_000_000_000,
        "key": "binance:btc-usdt",
        "headers": {"consumer": "stats", "reason": "bad \\xff"},
        "value": {"seq": 3, "close": 1.5},
    }


def test_other_values_and_keys_keep_their_bytes() -> None:
    """Non-JSON text, binary values and keys, and null values each keep what they carry."""
    assert json.loads(record_line(FakeRecord(b"oops")))["value_text"] == "oops"
    binary = json.loads(record_line(FakeRecord(b"\x00\xff", key=b"\xfe")))
    assert (binary["value_base64"], binary["key_base64"]) == ("AP8=", "/g==")
    tombstone = json.loads(record_line(FakeRecord(None, key=None)))
    assert tombstone["value"] is None and "key" not in tombstone and "headers" not in tombstone


def test_cli_parses_tail_options() -> None:
    """`tail` takes a target, an optional market, --from-beginning, -n and -b."""
    args = _parser().parse_args(
        ["tail", "ticks", "binance:btc-usdt", "--from-beginning", "-n", "5", "-b", "h:1"]
    )
    assert (args.target, args.market, args.from_beginning, args.count, args.bootstrap_servers) == (
        "ticks",
        "binance:btc-usdt",
        True,
        5,
        "h:1",
    )
    defaults = _parser().parse_args(["tail", "alerts"])
    assert (defaults.market, defaults.from_beginning, defaults.count) == (None, False, None)
    with pytest.raises(SystemExit):
        _parser().parse_args(["tail", "alerts", "-n", "0"])
