"""Chaos: a replay through the four services while each is killed, and each dependency fails.

In turn, mid-replay: kill -9 stats, alerts, gateway and watcher (each brought back, as its
supervisor would); flush Redis; stop PostgreSQL for 30 s; restart the broker (memory-only:
every topic and committed offset is lost, so the replay is run again, as an operator would);
then poison records on a tick topic and on `alerts`. The end state must be what a calm run
gives: every bar stored once, stats and ranks equal to an independent computation, the alert
set equal to the brute-force reference, the poison in the dead-letter topic, and every
service up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from tests.conftest import deadline, make_data_dir, require_candles
from tests.e2e.harness import Services, healthy, wait_for
from tests.e2e.pipeline_checks import (
    MARKETS,
    MINUTES,
    check_alerts,
    check_bars_stored_once,
    check_ranks_and_metrics,
    reference_stats,
    write_replay_candles,
)
from tickstream_shared.kafka import Message, RenewableProducer, ensure_topics
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import ALERTS_TOPIC, DEADLETTER_TOPIC, Market
from tickstream_shared.settings import KafkaSettings

pytestmark = pytest.mark.e2e

REPLAY_SECONDS = 40.0
POSTGRES_OUTAGE_S = 30.0


def kill_and_restart(services: Services, name: str) -> None:
    """SIGKILL `name` and start it again, as docker compose or Kubernetes would."""
    process = services.processes[name]
    process.send_signal(signal.SIGKILL)
    process.wait()
    services.start(name)


async def poll(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    try:
        async with asyncio.timeout(deadline(within)):
            while not await check():  # noqa: ASYNC110 - polls other processes
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"not within {within:.0f}s: {what}") from None


async def test_nothing_lost_nothing_stops() -> None:
    """Kills, a Redis flush, a PostgreSQL outage, a broker restart and poison change nothing."""
    candles = require_candles()
    data_dir = make_data_dir("tickstream-chaos-")
    replay_dir = data_dir / "candles"
    replay_dir.mkdir()
    expected = write_replay_candles(candles, replay_dir)
    total = sum(len(rows) for rows in expected.values())
    port = free_port()
    base = f"127.0.0.1:{port}"
    infra = LocalInfra(data_dir / "infra")
    infra.start()
    services: Services | None = None
    try:
        env = {
            **os.environ,
            **infra.environment(),
            "GATEWAY_PORT": str(port),
            "GATEWAY_RANK_INTERVAL_MS": "300",
            "WATCHER_SOURCE": "replay",
            "WATCHER_REPLAY_DIR": str(replay_dir),
            "WATCHER_REPLAY_SPEED": str(MINUTES * 60 / REPLAY_SECONDS),
        }
        services = Services(env, data_dir)
        for name in ("stats", "alerts", "gateway"):
            services.start(name)
        await wait_for(lambda: healthy(base), within=60, what="gateway", services=services)
        services.start("watcher")
        conn = await asyncpg.connect(infra.database_url)
        client = redis.Redis.from_url(infra.redis_url)

        async def stored_at_least(share: float) -> None:
            async def enough() -> bool:
                services.assert_running()
                try:
                    count = await conn.fetchval("SELECT count(*) FROM bars")
                except asyncpg.UndefinedTableError:
                    return False
                return bool(count >= share * total)

            await poll(enough, within=120, what=f"{share:.0%} stored")

        try:
            await stored_at_least(0.15)
            kill_and_restart(services, "stats")
            await stored_at_least(0.35)
            kill_and_restart(services, "alerts")
            kill_and_restart(services, "gateway")
            await wait_for(lambda: healthy(base), within=60, what="gateway", services=services)
            await stored_at_least(0.5)
            kill_and_restart(services, "watcher")  # the replay starts again from its first row
            await client.flushall()
            await conn.close()
            infra.stop_server("postgres")
            await asyncio.sleep(POSTGRES_OUTAGE_S)
            services.assert_running()
            infra.start_server("postgres")
            conn = await asyncpg.connect(infra.database_url)
            await stored_at_least(1.0)

            # The memory-only broker loses every topic and offset: the replay is run again.
            infra.stop_server("broker")
            await asyncio.sleep(5)
            infra.start_server("broker")
            kill_and_restart(services, "watcher")
            await _inject_poison(infra.kafka_bootstrap_servers)

            # The poison is consumed (dead-lettered) before the end state is checked.
            letters = await _dead_letters(infra.kafka_bootstrap_servers, WANTED_LETTERS)
            await check_bars_stored_once(conn, expected, services)
            await check_ranks_and_metrics(base, reference_stats(expected), services)
            await check_alerts(conn, expected, services)
            services.assert_running()
        finally:
            await conn.close()
            await client.aclose()
    finally:
        codes = services.stop_all() if services is not None else {}
        infra.stop()
        for log in sorted(data_dir.glob("*.log")):  # shown by pytest if the test failed
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        shutil.rmtree(data_dir, ignore_errors=True)
    assert all(code == 0 for code in codes.values()), codes
    assert {(value, consumer) for value, consumer, _ in letters} == WANTED_LETTERS


TICK_FIELDS = {
    "market": MARKETS[0],
    "minute": 1_680_000_000_000,
    "seq": 10**9,
    "exchange_ts": 1_680_000_060_000,
    "received_ts": 1_680_000_060_000,
    "open": 1.0,
    "high": 1.0,
    "low": 1.0,
    "close": 1.0,
    "volume": 1.0,
}
POISON = {
    "nested": json.dumps(TICK_FIELDS)[:-1].encode() + b',"x":' + b"[" * 1900 + b"]" * 1900 + b"}",
    "huge_ts": json.dumps({**TICK_FIELDS, "exchange_ts": 1e16}).encode(),
    "year_2100": json.dumps(
        {**TICK_FIELDS, "minute": 4_102_444_800_000, "exchange_ts": 4_102_444_800_000}
        | {"received_ts": 4_102_444_800_000}
    ).encode(),
    "nan": json.dumps({**TICK_FIELDS, "close": float("nan")}).encode(),
    "wrong_type": json.dumps({**TICK_FIELDS, "volume": [1]}).encode(),
}
BAD_ALERTS = [b"{", json.dumps({"alert_id": 1, "value": float("nan")}).encode()]


WANTED_LETTERS = {
    (value, consumer) for value in POISON.values() for consumer in ("stats", "alerts")
} | {(value, "gateway") for value in BAD_ALERTS}


async def _send(producer: RenewableProducer, topic: str, value: bytes, key: bytes | None) -> None:
    """Send one record, again after a transient failure: the restarted broker may not know
    the producer yet, or take its records for another's (see NotAppended)."""
    for _ in range(10):
        try:
            return await producer.send_all([Message(topic, value, key)])
        except KafkaConnectionError:
            await asyncio.sleep(0.5)
    raise AssertionError(f"could not send to {topic}")


async def _inject_poison(bootstrap: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    producer = RenewableProducer(kafka, client_id="chaos")
    topic = Market.parse(MARKETS[0]).topic
    # The restarted broker has no `alerts` topic yet (see _resend_bad_alerts).
    async with asyncio.timeout(deadline(60)):
        await ensure_topics(kafka, [ALERTS_TOPIC])
        await producer.start()
    try:
        for value in POISON.values():
            await _send(producer, topic, value, MARKETS[0].encode())
        for value in BAD_ALERTS:
            await _send(producer, ALERTS_TOPIC, value, None)
    finally:
        await producer.stop()


async def _resend_bad_alerts(bootstrap: str) -> None:
    """Send the bad alerts again every second (until cancelled): after the broker restart the
    gateway may find the new `alerts` topic only after the first ones, and reads it from its
    end, so it would never see them."""
    producer = RenewableProducer(KafkaSettings(bootstrap_servers=bootstrap), "chaos-alerts")
    await producer.start()
    try:
        while True:
            await asyncio.sleep(1)
            for value in BAD_ALERTS:
                await _send(producer, ALERTS_TOPIC, value, None)
    finally:
        await producer.stop()


async def _dead_letters(
    bootstrap: str, want: set[tuple[bytes, str]]
) -> list[tuple[bytes, str, str]]:
    """(value, consumer, reason) of the dead letters, once every (value, consumer) of `want`
    is among them."""
    # Subscribed without a group: every partition (a topic the restarted broker created by
    # itself may have several, and letters without a key, the bad alerts, land on any).
    # The restarted broker creates the topic at the first letter, maybe after this consumer
    # starts: without a short metadata age it would look again only after 5 minutes.
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    await consumer.start()
    letters: list[tuple[bytes, str, str]] = []
    resend = asyncio.create_task(_resend_bad_alerts(bootstrap))
    try:
        try:
            async with asyncio.timeout(deadline(60)):
                while not want <= {(value, consumer) for value, consumer, _ in letters}:
                    batch = await consumer.getmany(timeout_ms=500)
                    for records in batch.values():
                        for record in records:
                            headers = {k: v.decode() for k, v in record.headers}
                            letters.append((record.value, headers["consumer"], headers["reason"]))
        except TimeoutError:
            missing = want - {(value, consumer) for value, consumer, _ in letters}
            raise AssertionError(
                f"{len(letters)} dead letters read; missing {sorted(missing)}"
                f" of partitions {sorted(consumer.assignment())}"
            ) from None
    finally:
        resend.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resend
        await consumer.stop()
    return letters
