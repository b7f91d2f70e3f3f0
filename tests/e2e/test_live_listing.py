"""The real watcher against a local Binance whose listing changes while it runs: a new market
gets its topic, its backfill and its live bars without a restart; a delisted one stops."""

from __future__ import annotations

import pytest

from tests.e2e.exchange_fakes import closed_once, live_watcher, read_all, read_topic, topic_of
from tests.e2e.many_markets import ManyBinance, symbols
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

BACKFILL = 20  # minutes


async def test_a_market_listed_while_the_watcher_runs_is_published_without_a_restart(
    infra: LocalInfra,
) -> None:
    """C9002 is listed after the start: its topic is created and its backfilled and live bars
    are published, each minute closed once; C9001, delisted meanwhile, publishes nothing
    more; the watcher never starts its source again."""
    staying, leaving, joining = symbols(3, first=9000)
    fake = ManyBinance([staying, leaving])
    async with live_watcher(
        infra,
        "binance",
        fake.route,
        fake.ws,
        WATCHER_MARKETS="binance:*-usdt",
        WATCHER_BACKFILL_MINUTES=str(BACKFILL),
        WATCHER_LISTING_REFRESH_S="1",
    ) as watcher:
        bootstrap = infra.kafka_bootstrap_servers

        def live(ticks: list[Tick]) -> bool:
            return any(not t.closed for t in ticks)

        await read_topic(bootstrap, topic_of("binance:c9001-usdt"), live, within=60)
        fake.listed = [staying, joining]

        def backfilled_and_live(ticks: list[Tick]) -> bool:
            return sum(t.closed for t in ticks) >= BACKFILL and live(ticks)

        joined = await read_topic(
            bootstrap, topic_of("binance:c9002-usdt"), backfilled_and_live, within=60
        )
        left_at = len(await read_all(bootstrap, topic_of("binance:c9001-usdt")))
        # One more refresh and a few seconds of the stream: nothing more of the delisted one.
        await read_topic(bootstrap, topic_of("binance:c9000-usdt"), lambda t: len(t) > 40, 60)
        left = await read_all(bootstrap, topic_of("binance:c9001-usdt"))
    closed_once(joined)
    assert len(left) <= left_at + 1  # at most its forming minute, closed by the clock
    log = watcher.log_text
    assert "binance: 1 markets join: ['binance:c9002-usdt']" in log
    assert "binance: 1 markets left the listing: ['binance:c9001-usdt']" in log
    assert log.count("took the lease") == 1
    assert fake.connections == [[staying, leaving], [joining]]
