"""The local broker's CPU for one producer writing N topics: idempotent or not, side by side.

    .venv/bin/python bench/bench_producer.py [--topics 1000] [--rate 0.5] [--seconds 15]

One producer as the watcher's (acks=all, linger 5 ms) sends `rate` records a second to each of
`topics` topics, spread evenly, so nearly every batch holds one record, as with ticks of many
markets. Runs alternate idempotent and plain producers on one broker and print the broker's CPU
(% of one core) for each.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench_consumers import broker_pid, cpu_seconds
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.settings import KafkaSettings

RECORD = b"x" * 200  # about one encoded tick


async def one_run(
    kafka: KafkaSettings, topics: list[str], rate: float, seconds: float, idempotent: bool, pid: int
) -> float:
    producer = make_producer(kafka, client_id="bench", idempotent=idempotent)
    await producer.start()
    try:
        interval = 1.0 / (rate * len(topics))
        began_cpu, began = cpu_seconds(pid), time.monotonic()
        due, index = began, 0
        while time.monotonic() - began < seconds:
            due += interval
            await producer.send(topics[index % len(topics)], RECORD)
            index += 1
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await producer.flush()
        return 100 * (cpu_seconds(pid) - began_cpu) / (time.monotonic() - began)
    finally:
        await producer.stop()


async def main(data_dir: Path, count: int, rate: float, seconds: float, rounds: int) -> None:
    with LocalInfra(data_dir) as infra:
        kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
        topics = [f"bench.t{i}" for i in range(count)]
        await ensure_topics(kafka, topics)
        pid = broker_pid(infra.broker_port)
        print(f"{count} topics x {rate} records/s, {seconds:.0f} s per run; broker CPU % of a core")
        for _ in range(rounds):
            for idempotent in (True, False):
                cpu = await one_run(kafka, topics, rate, seconds, idempotent, pid)
                name = "idempotent" if idempotent else "plain (acks=all)"
                print(f"    {name:>17}: {cpu:5.1f} %", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.5, help="records/s per topic")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tickstream-bench-producer-"))
    folder.chmod(0o755)
    asyncio.run(main(folder, args.topics, args.rate, args.seconds, args.rounds))
