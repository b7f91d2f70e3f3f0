"""`tickstream tail`: a topic's records as JSON lines, for those who would reach for kcat."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from tickstream_shared.errors import BadIdentifier, echo
from tickstream_shared.kafka import make_consumer
from tickstream_shared.lifecycle import install_stop_signals
from tickstream_shared.logs import setup_logging
from tickstream_shared.naming import ALERTS_TOPIC, DEADLETTER_TOPIC, Market
from tickstream_shared.settings import KafkaSettings, LogSettings

# Records one poll hands over at most; with the consumer's fetch bounds
# (KAFKA_MAX_PARTITION_FETCH_BYTES, KAFKA_FETCH_MAX_BYTES) this bounds what tail holds.
_POLL_RECORDS: Final = 500
# How long a poll waits for records: also how soon Ctrl-C is noticed.
_POLL_MS: Final = 200
TICKS: Final = "ticks"


class TopicNotFound(Exception):
    """The broker does not know the topic: nothing has created it yet."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"the broker has no topic {topic}")
        self.topic = topic


def resolve_topic(target: str, market: str | None = None) -> str:
    """The topic that `tickstream tail TARGET [MARKET]` names.

    `ticks <exchange>:<base>-<quote>` is that market's tick topic; `alerts` and `deadletter`
    are themselves; a tick topic's name (`ticks.binance.btc-usdt`) is itself. Raises
    BadIdentifier for anything else.
    """
    if target == TICKS:
        if market is None:
            raise BadIdentifier("`ticks` needs a market: tickstream tail ticks binance:btc-usdt")
        return Market.parse(market).topic
    if market is not None:
        raise BadIdentifier(f"only `ticks` takes a market, not {echo(target)}")
    if target in (ALERTS_TOPIC, DEADLETTER_TOPIC):
        return target
    try:
        return Market.from_topic(target).topic
    except BadIdentifier:
        raise BadIdentifier(
            f"{echo(target)} is not `ticks <market>`, `{ALERTS_TOPIC}`, `{DEADLETTER_TOPIC}`"
            " or a tick topic (ticks.<exchange>.<base>-<quote>)"
        ) from None


def _text_or_base64(raw: bytes, text: str, binary: str) -> dict[str, str]:
    try:
        return {text: raw.decode()}
    except UnicodeDecodeError:
        return {binary: base64.b64encode(raw).decode()}


def record_line(record: Any) -> bytes:
    """One consumer record as a JSON line.

    `value` is the record's JSON value as JSON; a value that is not JSON (a dead letter's
    broken record) comes as `value_text`, or `value_base64` when not UTF-8 either; a null value
    (a tombstone) as `"value": null`. Keys alike (`key`, `key_base64`); headers as text.
    """
    line: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
    }
    if record.key is not None:
        line |= _text_or_base64(record.key, "key", "key_base64")
    if record.headers:
        line["headers"] = {k: v.decode(errors="backslashreplace") for k, v in record.headers}
    if record.value is None:
        line["value"] = None
    else:
        try:
            line["value"] = msgspec.json.decode(record.value)
        except msgspec.DecodeError:
            line |= _text_or_base64(record.value, "value_text", "value_base64")
    return msgspec.json.encode(line) + b"\n"


@dataclass(frozen=True, slots=True)
class TailRequest:
    """What to print: `topic`, from its end (new records only) or its beginning, and at most
    `count` records (None: until stopped)."""

    topic: str
    from_beginning: bool = False
    count: int | None = None


async def tail(
    settings: KafkaSettings,
    request: TailRequest,
    write: Callable[[bytes], None],
    stop: asyncio.Event,
    on_ready: Callable[[dict[int, int]], None] = lambda _: None,
) -> int:
    """Write `request.topic`'s records with `write` (one call per poll, one JSON line per
    record); return how many.

    Reads every partition without a consumer group (nothing is committed, no group sees
    it). `on_ready` gets each partition's starting offset once positioned: records produced
    after it are printed. Ends when `request.count` records are written or when `stop` is
    set (within _POLL_MS). Raises TopicNotFound, or aiokafka's errors when the broker cannot
    be reached. Safe to cancel: the consumer is closed either way.
    """
    consumer = make_consumer(
        settings,
        group_id=None,
        client_id="tickstream-tail",
        offset_reset="earliest" if request.from_beginning else "latest",
    )
    await consumer.start()
    try:
        await consumer.topics()  # refreshes metadata for every topic
        partitions = consumer.partitions_for_topic(request.topic)
        if not partitions:
            raise TopicNotFound(request.topic)
        assigned = [TopicPartition(request.topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        if request.from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            await consumer.seek_to_end(*assigned)
        on_ready({tp.partition: await consumer.position(tp) for tp in assigned})
        written = 0
        while not stop.is_set() and (request.count is None or written < request.count):
            room = _POLL_RECORDS if request.count is None else request.count - written
            batches = await consumer.getmany(
                timeout_ms=_POLL_MS, max_records=min(room, _POLL_RECORDS)
            )
            lines = [record_line(r) for records in batches.values() for r in records]
            if lines:
                write(b"".join(lines))
                written += len(lines)
        return written
    finally:
        await consumer.stop()


def run_tail(request: TailRequest, settings: KafkaSettings, log: LogSettings) -> int:
    """`tickstream tail`: print to stdout until `request.count` records, Ctrl-C or SIGTERM.

    Exit code 0 when stopped or done (also when stdout is closed, as by `| head`), 1 when the
    topic does not exist or the broker cannot be reached.
    """
    setup_logging(log, "tail")  # LOG_LEVEL, LOG_FORMAT; aiokafka held at WARNING
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    def ready(offsets: dict[int, int]) -> None:
        where = "the beginning" if request.from_beginning else "the end"
        at = ", ".join(f"partition {p} at offset {o}" for p, o in offsets.items())
        print(f"tailing {request.topic} from {where} ({at}); Ctrl-C stops", file=sys.stderr)

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        return await tail(settings, request, write, stop, ready)

    try:
        written = asyncio.run(main())
    except TopicNotFound as exc:
        print(
            f"tickstream tail: {exc} (`alerts` is created by init and the alerts service,"
            " `deadletter` by stats and the gateway when they start, a market's tick topic by"
            " the watcher that watches it)",
            file=sys.stderr,
        )
        return 1
    except KafkaError as exc:
        print(f"tickstream tail: broker {settings.bootstrap_servers}: {exc!r}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining
        # about stdout again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"{written} records", file=sys.stderr)
    return 0
