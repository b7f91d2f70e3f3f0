"""The local broker's memory, CPU and throughput over a long high-rate run, per log storage.

Starts the local broker alone (Tansu 0.6, as `tickstream up` does) with its log in memory or
in SeaweedFS (`s3`, trimmed by tickstream's LogTrimmer), creates T tick topics with a short
retention, and publishes R ticks a second spread over them for S seconds, as the watcher does
(acks=all, not idempotent, linger 5 ms) while one consumer group reads every topic, as stats
does. Every few seconds it prints the broker's RSS (and the object store's), their CPU, the
object store's bytes on disk, records produced and consumed a second, and the earliest offset
of the first topic (ListOffsets earliest: it moves only where retention is applied). Run:

    .venv/bin/python bench/bench_broker_storage.py --storage memory --seconds 300
    .venv/bin/python bench/bench_broker_storage.py --storage s3 --seconds 300
    .venv/bin/python bench/bench_broker_storage.py --storage s3 --rate 8000   # find its limit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from tickstream_shared.kafka import ensure_topics, make_consumer, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import TICK_TOPIC_PATTERN, Market
from tickstream_shared.settings import KafkaSettings

MIB = 1024 * 1024
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of `pid` and its threads so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def disk_mib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # deleted while we walk
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total / MIB


@dataclass
class Counts:
    produced: int = 0
    consumed: int = 0
    behind: bool = False


async def produce(
    kafka: KafkaSettings, topics: list[str], rate: int, size: int, end: float, counts: Counts
) -> None:
    """`rate` records a second round-robin over `topics`, in 100 slices a second, with at most
    10,000 unacknowledged (the watcher's WATCHER_MAX_IN_FLIGHT); a slice that cannot be sent
    in time delays the next (counted as `behind`)."""
    producer = make_producer(kafka, client_id="bench-producer", idempotent=False)
    await producer.start()
    payload = b"x" * size
    per_slice = max(1, rate // 100)
    in_flight = asyncio.Semaphore(10_000)

    def acknowledged(delivery: asyncio.Future[object]) -> None:
        in_flight.release()
        if not delivery.cancelled() and delivery.exception() is None:
            counts.produced += 1

    index = 0
    try:
        next_slice = time.monotonic()
        while time.monotonic() < end:
            for _ in range(per_slice):
                await in_flight.acquire()
                delivery = await producer.send(topics[index % len(topics)], payload)
                delivery.add_done_callback(acknowledged)
                index += 1
            next_slice += 0.01
            delay = next_slice - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                # More than a second behind: the broker cannot take the rate. Go on from now
                # rather than in a burst, and say so.
                counts.behind = True
                next_slice = time.monotonic()
        await producer.flush()
    finally:
        await producer.stop()


async def consume(kafka: KafkaSettings, end: float, counts: Counts) -> None:
    consumer = make_consumer(kafka, group_id="bench", client_id="bench-consumer", role="batch")
    await consumer.start()
    consumer.subscribe(pattern=TICK_TOPIC_PATTERN)
    try:
        while time.monotonic() < end:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            counts.consumed += sum(len(records) for records in batches.values())
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()


async def earliest(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        offsets: dict[TopicPartition, int] = await consumer.beginning_offsets([partition])
        return offsets[partition]
    finally:
        await consumer.stop()


async def run(args: argparse.Namespace, infra: LocalInfra) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        ticks_retention_ms=args.retention_s * 1000,
        ticks_retention_bytes=1024 * MIB,
    )
    topics = [Market("bench", f"c{i:04d}", "usdt").topic for i in range(args.topics)]
    await ensure_topics(kafka, topics)
    counts = Counts()
    started = time.monotonic()
    end = started + args.seconds
    tasks = [asyncio.create_task(produce(kafka, topics, args.rate, args.record_bytes, end, counts))]
    if args.consumer:
        tasks.append(asyncio.create_task(consume(kafka, end + 5, counts)))
    broker, store = infra.pid_of("broker"), infra.pid_of("objectstore")
    store_dir = infra.data_dir / "seaweedfs"
    print(
        f"storage={args.storage} topics={args.topics} rate={args.rate}/s"
        f" record={args.record_bytes} B retention={args.retention_s} s"
    )
    print(
        "   t_s  broker_MiB  broker_cpu%  store_MiB  store_cpu%  disk_MiB  prod/s  cons/s  earliest"
    )
    last = (started, cpu_seconds(broker), cpu_seconds(store), 0, 0)
    rows = []
    while time.monotonic() < end:
        await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        now = time.monotonic()
        cpu_b, cpu_s = cpu_seconds(broker), cpu_seconds(store)
        span = now - last[0]
        row = (
            now - started,
            rss_mib(broker),
            100 * (cpu_b - last[1]) / span,
            rss_mib(store),
            100 * (cpu_s - last[2]) / span,
            disk_mib(store_dir) if store_dir.exists() else 0.0,
            (counts.produced - last[3]) / span,
            (counts.consumed - last[4]) / span,
            await earliest(kafka.bootstrap_servers, topics[0]),
        )
        rows.append(row)
        print(
            f"{row[0]:6.0f} {row[1]:11.0f} {row[2]:12.0f} {row[3]:10.0f} {row[4]:11.0f}"
            f" {row[5]:9.0f} {row[6]:7.0f} {row[7]:7.0f} {row[8]:9d}",
            flush=True,
        )
        last = (now, cpu_b, cpu_s, counts.produced, counts.consumed)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    half = rows[len(rows) // 2 :]
    behind = " (the producer fell behind)" if counts.behind else ""
    slope = (rows[-1][1] - half[0][1]) / max(1e-9, rows[-1][0] - half[0][0]) * 60
    print(
        f"summary storage={args.storage}: produced {counts.produced / args.seconds:.0f}/s,"
        f" consumed {counts.consumed / elapsed:.0f}/s{behind};"
        f" broker RSS {rows[0][1]:.0f} -> {rows[-1][1]:.0f} MiB ({slope:+.1f} MiB/min over the"
        f" second half), broker CPU {sum(r[2] for r in rows) / len(rows):.0f}%, object store RSS"
        f" {rows[-1][3]:.0f} MiB CPU {sum(r[4] for r in rows) / len(rows):.0f}%, disk"
        f" {rows[-1][5]:.0f} MiB; earliest offset of {topics[0]}: {rows[-1][8]}"
    )
    if infra.trimmer is not None:
        stats = infra.trimmer.stats
        print(
            f"trimmer: {stats.passes} passes, {stats.deleted_batches} batches"
            f" ({stats.deleted_bytes / MIB:.0f} MiB) deleted, {stats.failures} failed passes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", choices=("memory", "s3"), default="memory")
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=4000, help="records a second, all topics")
    parser.add_argument("--record-bytes", type=int, default=150)
    parser.add_argument("--retention-s", type=int, default=60)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--trim-interval-s", type=float, default=5.0)
    parser.add_argument("--no-consumer", dest="consumer", action="store_false", help="produce only")
    parser.add_argument("--keep", action="store_true", help="keep the data folder, print it")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    infra = LocalInfra(data_dir, broker_storage=args.storage, trim_interval_s=args.trim_interval_s)
    try:
        if args.storage == "s3":
            infra.start_server("objectstore")
        infra.start_server("broker")
        asyncio.run(run(args, infra))
    finally:
        infra.stop()
        if args.keep:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
