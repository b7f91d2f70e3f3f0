"""A restarted synthetic watcher continues its walk: no published minute gets other values."""

from __future__ import annotations

import asyncio
import uuid

from tests.conftest import deadline, unique_exchange
from tests.e2e.exchange_fakes import read_all
from tickstream_shared.lifecycle import run_until_stopped
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.redis_client import connect
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import ServiceSettings
from tickstream_watcher import service

BACKFILL_MINUTES = 30


def _bar(tick: Tick) -> tuple[object, ...]:
    return (tick.open, tick.high, tick.low, tick.close, tick.volume, tick.quote_volume)


def _values(tick: Tick) -> tuple[object, ...]:
    return (tick.minute, tick.seq, tick.open, tick.high, tick.low, tick.close, tick.volume)


async def test_a_restarted_synthetic_source_replaces_no_published_minute(
    infra: LocalInfra,
) -> None:
    """The second run publishes no closed minute of the first again (but the last closed bar,
    identical), backfills nothing already published, and opens at the first run's last close
    with larger seqs; a third run without the checkpoints backfills the same bars again. No
    minute changes, so its alerts can have no echo."""
    exchange = unique_exchange()
    markets = [Market(exchange, "btc", "usd"), Market(exchange, "eth", "usd")]
    group = f"g{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings.from_env(
        {
            **infra.environment(),
            "WATCHER_MARKETS": ",".join(m.id for m in markets),
            "WATCHER_GROUP": group,
            "WATCHER_SYNTHETIC_BACKFILL_MINUTES": str(BACKFILL_MINUTES),
            "WATCHER_TICK_INTERVAL_MS": "100",
        }
    )
    client = connect(settings.redis)

    async def one_run() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(run_until_stopped("watcher", service.run, settings, stop))
        try:
            # Until the closes the broker acknowledged are checkpointed for both markets.
            async with asyncio.timeout(deadline(30)):
                while await client.hlen(f"tickstream:watcher:{group}:closed") < len(markets):
                    assert not running.done()
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await running
        await client.delete(f"tickstream:watcher:{group}:lease")

    try:
        await one_run()
        first = {m: await read_all(infra.kafka_bootstrap_servers, m.topic) for m in markets}
        await one_run()
        for market in markets:
            both = await read_all(infra.kafka_bootstrap_servers, market.topic)
            assert both[: len(first[market])] == first[market]
            second = both[len(first[market]) :]
            closed_first = {t.minute: t for t in first[market] if t.closed}
            assert len(closed_first) >= BACKFILL_MINUTES
            last = closed_first[max(closed_first)]
            again = [t for t in second if t.minute <= last.minute]
            # At most the last closed bar, republished exactly as it was (maybe unacknowledged).
            assert [_values(t) for t in again] in ([], [_values(last)]), again
            new = [t for t in second if t.minute > last.minute]
            assert new, "the second run published nothing new"
            assert new[0].open == last.close
            assert all(t.seq > last.seq for t in new)

        # Without its checkpoints (Redis emptied) it backfills every minute again: the same bars.
        await client.delete(
            *(f"tickstream:watcher:{group}:{part}" for part in ("closed", "closing"))
        )
        published = {m: await read_all(infra.kafka_bootstrap_servers, m.topic) for m in markets}
        await one_run()
        for market in markets:
            before = {t.minute: _bar(t) for t in published[market] if t.closed}
            third = (await read_all(infra.kafka_bootstrap_servers, market.topic))[
                len(published[market]) :
            ]
            again = {t.minute: _bar(t) for t in third if t.closed and t.minute in before}
            assert len(again) >= BACKFILL_MINUTES - 1
            assert again == {minute: before[minute] for minute in again}
    finally:
        await client.aclose()
