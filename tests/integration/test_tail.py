"""`tickstream tail` against the real local broker: in process and as the console script."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import deadline, unique_exchange
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.settings import KafkaSettings
from tickstream_shared.tail import TailRequest, TopicNotFound, tail

TICKSTREAM = Path(sys.executable).parent / "tickstream"


def kafka_of(infra: LocalInfra) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)


async def new_market(infra: LocalInfra) -> Market:
    """A market of an exchange no other test uses, its tick topic created."""
    market = Market(unique_exchange(), "btc", "usdt")
    await ensure_topics(kafka_of(infra), [market.topic])
    return market


async def produce(infra: LocalInfra, topic: str, values: list[bytes], key: bytes) -> None:
    producer = make_producer(kafka_of(infra), client_id="test-tail")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value, key=key, headers=[("h", b"1")])
    finally:
        await producer.stop()


def tick(seq: int) -> bytes:
    return json.dumps({"seq": seq, "close": 100.5 + seq}).encode()


async def tail_lines(infra: LocalInfra, request: TailRequest) -> list[dict[str, Any]]:
    """What `tail` writes for `request`, as parsed lines; it must end within a deadline."""
    chunks: list[bytes] = []
    async with asyncio.timeout(deadline(30)):
        written = await tail(kafka_of(infra), request, chunks.append, asyncio.Event())
    lines = b"".join(chunks).splitlines()
    assert len(lines) == written
    return [json.loads(line) for line in lines]


async def test_from_beginning_prints_count_records_as_json_lines_and_ends(
    infra: LocalInfra,
) -> None:
    """--from-beginning -n 3 prints the first three records, key, headers and value, and ends."""
    market = await new_market(infra)
    await produce(infra, market.topic, [tick(1), tick(2), tick(3), tick(4)], market.id.encode())
    lines = await tail_lines(infra, TailRequest(market.topic, from_beginning=True, count=3))
    assert [{k: v for k, v in line.items() if k != "timestamp_ms"} for line in lines] == [
        {
            "topic": market.topic,
            "partition": 0,
            "offset": offset,
            "key": market.id,
            "headers": {"h": "1"},
            "value": {"seq": offset + 1, "close": 101.5 + offset},
        }
        for offset in range(3)
    ]
    assert all(isinstance(line["timestamp_ms"], int) for line in lines)


async def test_from_the_end_prints_only_records_produced_after_it_is_ready(
    infra: LocalInfra,
) -> None:
    """By default tail starts at the end: older records are not printed, newer ones are."""
    market = await new_market(infra)
    await produce(infra, market.topic, [tick(1), tick(2)], market.id.encode())
    ready = asyncio.Event()
    offsets: dict[int, int] = {}

    def on_ready(at: dict[int, int]) -> None:
        offsets.update(at)
        ready.set()

    chunks: list[bytes] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        tail(kafka_of(infra), TailRequest(market.topic, count=2), chunks.append, stop, on_ready)
    )
    try:
        async with asyncio.timeout(deadline(30)):
            await ready.wait()
        assert offsets == {0: 2}
        await produce(infra, market.topic, [tick(3), tick(4)], market.id.encode())
        async with asyncio.timeout(deadline(30)):
            assert await task == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, deadline(10))
    values = [json.loads(line)["value"]["seq"] for line in b"".join(chunks).splitlines()]
    assert values == [3, 4]


async def test_values_that_are_not_json_come_as_text_or_base64(infra: LocalInfra) -> None:
    """A dead letter's broken value is kept: as text when UTF-8, else as base64."""
    market = await new_market(infra)
    await produce(infra, market.topic, [b"not json {", b"\xff\x00"], b"k")
    lines = await tail_lines(infra, TailRequest(market.topic, from_beginning=True, count=2))
    assert [(line.get("value_text"), line.get("value_base64")) for line in lines] == [
        ("not json {", None),
        (None, "/wA="),
    ]
    assert all("value" not in line for line in lines)


async def test_a_stop_ends_a_tail_that_waits_for_records(infra: LocalInfra) -> None:
    """Setting stop (what Ctrl-C does) ends a tail that has nothing to print, promptly."""
    market = await new_market(infra)
    stop = asyncio.Event()
    started = asyncio.Event()
    task = asyncio.create_task(
        tail(kafka_of(infra), TailRequest(market.topic), [].append, stop, lambda _: started.set())
    )
    async with asyncio.timeout(deadline(30)):
        await started.wait()
    stop.set()
    async with asyncio.timeout(deadline(5)):
        assert await task == 0


async def test_an_unknown_topic_is_an_error(infra: LocalInfra) -> None:
    """A topic the broker does not have raises TopicNotFound, naming it."""
    topic = Market(unique_exchange(), "eth", "usdt").topic
    with pytest.raises(TopicNotFound) as caught:
        await tail(kafka_of(infra), TailRequest(topic), [].append, asyncio.Event())
    assert caught.value.topic == topic


@pytest.fixture
def cli_env(infra: LocalInfra) -> Iterator[dict[str, str]]:
    yield {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers}


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(TICKSTREAM), "tail", *args],
        env=env,
        capture_output=True,
        timeout=deadline(60),
        check=False,
    )


async def test_cli_prints_a_markets_ticks_and_exits_after_count(
    infra: LocalInfra, cli_env: dict[str, str]
) -> None:
    """`tickstream tail ticks <market> --from-beginning -n 2` prints two lines, exits 0."""
    market = await new_market(infra)
    await produce(infra, market.topic, [tick(1), tick(2), tick(3)], market.id.encode())
    result = await asyncio.to_thread(
        run_cli, ["ticks", market.id, "--from-beginning", "-n", "2"], cli_env
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["key"], line["value"]["seq"]) for line in lines] == [
        (market.id, 1),
        (market.id, 2),
    ]
    assert f"tailing {market.topic} from the beginning" in result.stderr.decode()


async def test_cli_stops_cleanly_on_ctrl_c(infra: LocalInfra, cli_env: dict[str, str]) -> None:
    """SIGINT ends a following tail with exit 0, what it printed intact and no traceback."""
    market = await new_market(infra)
    process = await asyncio.create_subprocess_exec(
        str(TICKSTREAM),
        "tail",
        market.topic,
        env=cli_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        first = await asyncio.wait_for(process.stderr.readline(), deadline(30))
        assert first.startswith(f"tailing {market.topic} from the end".encode()), first
        await produce(infra, market.topic, [tick(7)], market.id.encode())
        line = await asyncio.wait_for(process.stdout.readline(), deadline(30))
        assert json.loads(line)["value"] == {"seq": 7, "close": 107.5}
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), deadline(10))
        assert process.returncode == 0
        assert time.monotonic() - started < deadline(5)
        assert out == b""
        assert b"Traceback" not in err and b"1 records" in err, err
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def test_cli_refuses_bad_targets_and_missing_topics(
    infra: LocalInfra, cli_env: dict[str, str]
) -> None:
    """A bad market or target exits 2, a topic the broker lacks exits 1, each saying why."""
    missing = Market(unique_exchange(), "eth", "usdt")
    results = await asyncio.gather(
        asyncio.to_thread(run_cli, ["ticks", "binance/btc"], cli_env),
        asyncio.to_thread(run_cli, ["trades"], cli_env),
        asyncio.to_thread(run_cli, ["ticks", missing.id], cli_env),
    )
    assert [r.returncode for r in results] == [2, 2, 1]
    assert b"is not <exchange>:<base>-<quote>" in results[0].stderr
    assert b"`alerts`, `deadletter`" in results[1].stderr
    assert f"the broker has no topic {missing.topic}".encode() in results[2].stderr
    assert all(r.stdout == b"" for r in results)
