"""The WebSocket protocol parser and the hub's delivery rules, without sockets."""

from __future__ import annotations

import pytest

from tickstream_gateway.hub import Hub
from tickstream_gateway.protocol import (
    MAX_FRAME_BYTES,
    Ping,
    ProtocolError,
    Subscribe,
    Subscription,
    Unsubscribe,
    parse_command,
)
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick

BTC = Market("binance", "btc", "usdt")


def tick(seq: int, ts: int | None = None) -> Tick:
    return Tick("binance", "btc", "usdt", seq, ts if ts is not None else seq * 1000, 0, 1.0, 2.0)


def test_parse_valid_commands() -> None:
    """Subscribe, unsubscribe and ping frames parse into commands."""
    assert parse_command('{"op":"ping"}') == Ping()
    assert parse_command(
        '{"op":"subscribe","channel":"market","market":"binance:btc-usdt"}'
    ) == Subscribe(Subscription("market", market=BTC))
    assert parse_command('{"op":"unsubscribe","channel":"ranks","kind":"volume"}') == Unsubscribe(
        Subscription("ranks", kind="volume")
    )
    assert parse_command('{"op":"subscribe","channel":"alerts"}') == Subscribe(
        Subscription("alerts")
    )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", "bad_json"),
        ("[]", "bad_request"),
        ('{"op":"dance"}', "bad_request"),
        ('{"op":"subscribe","channel":"weather"}', "bad_request"),
        ('{"op":"subscribe","channel":"market"}', "bad_request"),
        ('{"op":"subscribe","channel":"market","market":"btc"}', "bad_market"),
        ('{"op":"subscribe","channel":"ranks","kind":"spread"}', "bad_kind"),
        ('{"op":"subscribe","channel":"ranks"}', "bad_kind"),
        ("x" * (MAX_FRAME_BYTES + 1), "frame_too_large"),
    ],
)
def test_bad_frames_get_a_code(frame: str, code: str) -> None:
    """Every malformed frame raises ProtocolError with a specific code."""
    with pytest.raises(ProtocolError) as info:
        parse_command(frame)
    assert info.value.code == code


async def test_history_then_live_without_gap_or_overlap() -> None:
    """Ticks held during the history query are sent only if newer than the history."""
    hub = Hub(client_queue=10)
    session = hub.connect()
    hub.hold_market(session, BTC)
    for seq in (1, 2, 3):
        hub.publish_tick(tick(seq))
    hub.release_market(session, BTC, after=(2000, 2))
    hub.publish_tick(tick(2))  # the feed lagging behind stored history: not resent
    hub.publish_tick(tick(4))
    sent = [session.queue.get_nowait()["seq"] for _ in range(session.queue.qsize())]
    assert sent == [3, 4]


async def test_slow_client_overflows_instead_of_buffering() -> None:
    """A client whose queue is full is flagged for closing; nothing grows without bound."""
    hub = Hub(client_queue=2)
    session = hub.connect()
    hub.hold_market(session, BTC)
    hub.release_market(session, BTC, after=(-1, -1))
    for seq in range(3):
        hub.publish_tick(tick(seq))
    assert session.queue.qsize() == 2
    assert session.overflowed.is_set()
    hub.disconnect(session)
    assert hub.dropped_slow_clients == 1


async def test_unsubscribed_markets_receive_nothing() -> None:
    """After drop_market a client gets no more ticks of that market."""
    hub = Hub(client_queue=5)
    session = hub.connect()
    hub.hold_market(session, BTC)
    hub.release_market(session, BTC, after=(-1, -1))
    hub.drop_market(session, BTC)
    hub.publish_tick(tick(1))
    assert session.queue.empty()
    assert hub.recent_ticks(BTC) == [tick(1)]
