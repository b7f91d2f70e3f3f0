"""Consumer bench: the local broker's CPU and consumer latency with N topics, old and new fetch,
and the gateway's feed reading every topic (by pattern) or only the watched ones (assigned)."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from tickstream_shared.kafka import consumer_options, ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.settings import KafkaSettings

RECORD_BYTES = 200  # about one encoded tick
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# What every consumer used before issue 14: one fetch wait for all, 4 MiB per partition,
# aiokafka's defaults otherwise (answer at 1 byte, 50 MiB per response).
OLD_OPTIONS: dict[str, int] = {
    "metadata_max_age_ms": 1000,
    "fetch_max_wait_ms": 50,
    "fetch_min_bytes": 1,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    "fetch_max_bytes": 52_428_800,
}


@dataclass(frozen=True)
class Run:
    name: str
    group: str | None  # stats and alerts consume in a group; the gateway's feed has none
    options: dict[str, int] | None  # None: no consumer at all (the producer alone)
    # Assigned (no group) the first `watched` topics only, as the gateway's feed now is;
    # None: subscribed by pattern to every topic.
    watched: int | None = None


def runs(kafka: KafkaSettings, watched: list[int]) -> list[Run]:
    live = consumer_options(kafka, "live")
    return [
        Run("producer only (no consumer)", None, None),
        Run("old: stats/alerts as before", "bench-old", OLD_OPTIONS),
        Run("new: stats/alerts (batch)", "bench-new", consumer_options(kafka, "batch")),
        Run("gateway feed, every topic", None, live),
        *(Run(f"gateway feed, {n} watched", None, live, n) for n in watched),
    ]


def broker_pid(port: int) -> int:
    """The local broker's process: the one whose command line listens on `port`."""
    wanted = f"127.0.0.1:{port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in cmdline and b"broker" in cmdline:
            return int(entry.name)
    raise RuntimeError(f"no broker process listening on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


async def produce(
    kafka: KafkaSettings, topics: list[str], rate: float, stop: asyncio.Event, sent: list[int]
) -> None:
    """`rate` records per second per topic, spread evenly; each carries its send time."""
    producer = make_producer(kafka, client_id="bench-producer")
    await producer.start()
    try:
        interval = 1.0 / (rate * len(topics))
        padding = b"x" * (RECORD_BYTES - 20)
        due = time.monotonic()
        index = 0
        while not stop.is_set():
            due += interval
            stamp = str(time.time_ns()).encode().ljust(20)
            await producer.send(topics[index % len(topics)], stamp + padding)
            index += 1
            sent[0] += 1
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await producer.stop()


async def consume(
    kafka: KafkaSettings,
    run: Run,
    topics: list[str],
    latencies: list[float],
    stop: asyncio.Event,
) -> None:
    """Consume the bench topics from the newest offsets, recording each record's latency."""
    assert run.options is not None
    pattern = rf"^{topics[0].rsplit('.', 1)[0]}\..*"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=run.group,
        client_id="bench-consumer",
        enable_auto_commit=False,
        auto_offset_reset="latest",
        **run.options,
    )
    if run.watched is None:
        consumer.subscribe(pattern=pattern)
    else:
        consumer.assign([TopicPartition(topic, 0) for topic in topics[: run.watched]])
    await consumer.start()
    try:
        while not stop.is_set():
            batch: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.time_ns()
            for records in batch.values():
                for record in records:
                    latencies.append((now - int(record.value[:20])) / 1e6)
            if batch and run.group is not None:
                await consumer.commit()  # stats and alerts commit every batch
    finally:
        await consumer.stop()


async def measure(
    kafka: KafkaSettings,
    pid: int,
    topics: list[str],
    run: Run,
    rate: float,
    seconds: float,
    warmup: float,
) -> str:
    stop = asyncio.Event()
    latencies: list[float] = []
    sent = [0]
    tasks = []
    if rate > 0:  # 0: idle topics, what consuming costs the broker without records
        tasks.append(asyncio.create_task(produce(kafka, topics, rate, stop, sent)))
    if run.options is not None:
        tasks.append(asyncio.create_task(consume(kafka, run, topics, latencies, stop)))
    await asyncio.sleep(warmup)  # joined, assigned and fetching
    latencies.clear()
    sent_before = sent[0]
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    own_before = time.process_time()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - wall_before
    cpu = (cpu_seconds(pid) - cpu_before) / elapsed * 100
    own = (time.process_time() - own_before) / elapsed * 100
    measured = list(latencies)
    produced = sent[0] - sent_before
    stop.set()
    await asyncio.gather(*tasks)
    if not measured:
        return (
            f"    {run.name:<32} broker {cpu:5.1f}% of a core, bench process {own:5.1f}%"
            f" ({produced:,} records sent)"
        )
    measured.sort()
    p50 = statistics.median(measured)
    p99 = measured[min(len(measured) - 1, int(len(measured) * 0.99))]
    return (
        f"    {run.name:<32} broker {cpu:5.1f}% of a core, bench process {own:5.1f}%;"
        f" latency p50 {p50:6.1f} ms, p99 {p99:6.1f} ms"
        f" ({len(measured):,} of {produced:,} records sent)"
    )


async def bench(
    topic_counts: list[int],
    rate: float,
    seconds: float,
    warmup: float,
    batch: dict[str, int],
    only: str,
    watched: list[int],
    repeat: int,
) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-consumers-") as data_dir,
        LocalInfra(Path(data_dir)) as infra,
    ):
        kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers, **batch)
        pid = broker_pid(infra.broker_port)
        print(
            f"batch fetch: wait {kafka.batch_fetch_max_wait_ms} ms for"
            f" {kafka.batch_fetch_min_bytes:,} bytes; live fetch: wait"
            f" {kafka.fetch_max_wait_ms} ms for 1 byte; metadata every"
            f" {kafka.metadata_max_age_ms} ms"
        )
        for count in topic_counts:
            topics = [f"bench{count}.t{i:05d}" for i in range(count)]
            await ensure_topics(kafka, topics)
            print(
                f"{count:,} topics, {rate} records/s each ({count * rate:,.0f}/s in all),"
                f" {seconds:.0f} s measured per run:",
                flush=True,
            )
            for run in [run for _ in range(repeat) for run in runs(kafka, watched)]:
                if only == "batch" and run.group != "bench-new":
                    continue
                if only == "gateway" and run.options is not None and "gateway" not in run.name:
                    continue
                line = await measure(kafka, pid, topics, run, rate, seconds, warmup)
                print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topics", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--rate", type=float, default=0.5, help="records/s per topic")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured per run")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="seconds before measuring (join, catch up)"
    )
    parser.add_argument("--batch-wait-ms", type=int, help="KAFKA_BATCH_FETCH_MAX_WAIT_MS to try")
    parser.add_argument("--batch-min-bytes", type=int, help="KAFKA_BATCH_FETCH_MIN_BYTES to try")
    parser.add_argument(
        "--metadata-max-age-ms", type=int, help="KAFKA_METADATA_MAX_AGE_MS to try (new runs)"
    )
    parser.add_argument(
        "--only",
        choices=("all", "batch", "gateway"),
        default="all",
        help="batch: the new batch run only; gateway: the producer alone and the gateway runs",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="the runs this many times, interleaved"
    )
    parser.add_argument(
        "--watched",
        type=int,
        nargs="*",
        default=[10],
        help="gateway runs assigned only this many topics (markets watched)",
    )
    args = parser.parse_args()
    batch = {}
    if args.batch_wait_ms is not None:
        batch["batch_fetch_max_wait_ms"] = args.batch_wait_ms
    if args.batch_min_bytes is not None:
        batch["batch_fetch_min_bytes"] = args.batch_min_bytes
    if args.metadata_max_age_ms is not None:
        batch["metadata_max_age_ms"] = args.metadata_max_age_ms
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; one consumer per run")
    asyncio.run(
        bench(
            args.topics,
            args.rate,
            args.seconds,
            args.warmup,
            batch,
            args.only,
            args.watched,
            args.repeat,
        )
    )


if __name__ == "__main__":
    main()
