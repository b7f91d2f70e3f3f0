"""Which partitions the gateway's feed holds, given subscriptions and the grace: no network."""

from __future__ import annotations

import asyncio

from tests.unit import gateway_ticks as ticks
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.hub import Hub
from tickstream_gateway.interest import MarketInterest, plan
from tickstream_shared.naming import ALERTS_TOPIC
from tickstream_shared.schemas import Tick

BTC, ETH = "binance:btc-usdt", "kraken:eth-usd"
BTC_TOPIC, ETH_TOPIC = "ticks.binance.btc-usdt", "ticks.kraken.eth-usd"


def test_a_market_is_wanted_while_held_and_for_the_grace_after() -> None:
    """Two holders: wanted until both left, then for grace_s more, then forgotten."""
    interest = MarketInterest(grace_s=10.0)
    interest.acquire(BTC)
    interest.acquire(BTC)
    interest.release(BTC, now=100.0)
    assert interest.wanted(100.0) == {BTC}
    assert interest.next_expiry() is None
    interest.release(BTC, now=101.0)
    assert interest.holders(BTC) == 0
    assert interest.next_expiry() == 111.0
    assert interest.wanted(110.9) == {BTC}
    assert interest.wanted(111.0) == set()
    assert interest.next_expiry() is None


def test_coming_back_within_the_grace_is_no_change() -> None:
    """A reload (release then acquire) within the grace leaves the wanted set as it was."""
    interest = MarketInterest(grace_s=10.0)
    interest.acquire(BTC)
    before = interest.changes
    interest.release(BTC, now=5.0)
    left = interest.changes
    interest.acquire(BTC)
    assert interest.changes == left == before + 1
    assert interest.next_expiry() is None
    assert interest.wanted(100.0) == {BTC}


def test_releasing_a_market_never_held_changes_nothing() -> None:
    """An unsubscribe of a market nobody holds leaves no state behind."""
    interest = MarketInterest(grace_s=10.0)
    interest.release(BTC, now=1.0)
    assert (interest.changes, interest.wanted(1.0), interest.next_expiry()) == (0, set(), None)


def test_plan_holds_alerts_and_every_partition_of_wanted_topics() -> None:
    """Partitions of alerts and of wanted markets' topics; a market without a topic is missing."""
    listed = {ALERTS_TOPIC: [0], BTC_TOPIC: [0, 1], ETH_TOPIC: [0], "ticks.okx.sol-usdt": [0]}
    held = plan({BTC, "okx:xrp-usdt"}, listed)
    assert held.partitions == {(ALERTS_TOPIC, 0), (BTC_TOPIC, 0), (BTC_TOPIC, 1)}
    assert held.missing == {"okx:xrp-usdt"}
    assert plan(set(), {}).partitions == frozenset()


async def test_a_subscriber_waits_for_the_feed_to_settle_its_market() -> None:
    """wait_settled returns once the feed settles the market; without a feed, at once."""
    interest = MarketInterest()
    assert await interest.wait_settled(BTC, timeout_s=10.0) is False  # no feed: no wait
    interest.feed_running = True
    interest.listed_topics = frozenset({BTC_TOPIC, ETH_TOPIC})
    waiting = asyncio.create_task(interest.wait_settled(BTC, timeout_s=10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    interest.settle([BTC])
    assert await waiting is True
    assert await interest.wait_settled(BTC, timeout_s=0.0) is True
    interest.unsettle([BTC])
    assert await interest.wait_settled(BTC, timeout_s=0.01) is False


async def test_a_dropped_market_wakes_its_waiters_unsettled() -> None:
    """The feed dropping a market (or restarting) ends the waits: they are not settled."""
    interest = MarketInterest()
    interest.feed_running = True
    interest.listed_topics = frozenset({ETH_TOPIC})
    waiting = asyncio.create_task(interest.wait_settled(ETH, timeout_s=10.0))
    await asyncio.sleep(0)
    interest.unsettle_all()
    assert await waiting is False


async def test_a_market_without_a_listed_topic_is_not_waited_for_and_read_from_start() -> None:
    """No topic in the feed's listing: the subscriber goes on at once, and the feed will read
    the topic from its beginning (asked once); a market no longer wanted is forgotten."""
    interest = MarketInterest()
    interest.feed_running = True
    interest.listed_topics = frozenset({ETH_TOPIC})
    assert await interest.wait_settled(BTC, timeout_s=10.0) is False
    assert interest.read_from_start(BTC) is True
    assert interest.read_from_start(BTC) is False
    assert interest.read_from_start(ETH) is False
    await interest.wait_settled(BTC, timeout_s=10.0)
    interest.forget_unwanted(set())
    assert interest.read_from_start(BTC) is False


def test_an_unknown_market_released_without_linger_is_not_wanted() -> None:
    """A market found unknown is dropped at once, without the grace."""
    interest = MarketInterest(grace_s=10.0)
    interest.acquire(BTC)
    interest.release(BTC, now=1.0, linger=False)
    assert interest.wanted(1.0) == set() and interest.next_expiry() is None


def test_the_hub_holds_a_market_from_subscribing_until_dropped_or_disconnected() -> None:
    """want_market and watch_market hold once per client; drop and disconnect release."""
    hub = Hub(client_queue_bytes=1024 * 1024, interest=MarketInterest(grace_s=5.0))
    first, second = hub.connect(), hub.connect()
    hub.want_market(first, BTC)
    hub.watch_market(first, BTC, after_seq=3)  # the same hold, not a second one
    hub.watch_market(second, BTC, after_seq=3)
    hub.watch_market(second, ETH, after_seq=0)
    assert (hub.interest.holders(BTC), hub.interest.holders(ETH)) == (2, 1)
    hub.drop_market(first, BTC)
    hub.drop_market(first, BTC)  # idempotent
    assert hub.interest.holders(BTC) == 1
    hub.disconnect(second)
    assert (hub.interest.holders(BTC), hub.interest.holders(ETH)) == (0, 0)
    assert hub.interest.next_expiry() is not None


def update(seq: int, minute_index: int) -> Tick:
    return ticks.update(seq, minute_index, closed=True)


async def test_storage_behind_the_feed_is_read_again_until_it_caught_up() -> None:
    """With catch_up_s, a first read missing the feed's first update is repeated until it has it."""
    stored = [update(i, i) for i in range(5)]
    reads = 0

    async def fetch(market_id: str) -> list[Tick]:
        nonlocal reads
        reads += 1
        if reads == 3:
            stored.append(update(5, 5))  # stats stored the feed's first update meanwhile
        return list(stored)

    recent = RecentBars(max_bars=31)
    recent.add(update(5, 5), now=0.0)  # the feed's first update of the market
    history = MarketHistory(recent, fetch, catch_up_s=5.0)
    await history.load(ticks.BTC)
    assert reads == 3
    assert recent.is_loaded(ticks.BTC)
    await history.load(ticks.BTC)
    assert reads == 3
