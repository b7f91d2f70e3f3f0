"""Dead letters: records a consumer skips are kept, with their origin and the reason.

A record that cannot be used (not a valid tick or alert) is sent as it was to DEADLETTER_TOPIC,
keyed as it was, with headers saying which consumer skipped it, from where (topic,
partition, offset) and why. Consumers send a batch's dead letters and wait for the broker's
acknowledgement before they commit past them, so a skipped record is never lost: it is in
its topic until retention, and in the dead-letter topic for an operator to inspect or replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from tickstream_shared.kafka import Message, RenewableProducer
from tickstream_shared.naming import DEADLETTER_TOPIC

# A reason is a short text; longer ones are cut (it is a header, not a log).
_MAX_REASON: Final = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One skipped record: where it was and why it was skipped."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str

    @classmethod
    def of(cls, record: Any, reason: str) -> DeadLetter:
        return cls(record.topic, record.partition, record.offset, record.key, record.value, reason)

    def headers(self, consumer: str) -> list[tuple[str, bytes]]:
        return [
            ("consumer", consumer.encode()),
            ("topic", self.topic.encode()),
            ("partition", str(self.partition).encode()),
            ("offset", str(self.offset).encode()),
            ("reason", self.reason[:_MAX_REASON].encode(errors="replace")),
        ]


class DeadLetterSender:
    """Sends dead letters with `producer`, which the caller owns (started and stopped)."""

    def __init__(self, producer: RenewableProducer, consumer: str) -> None:
        self._producer = producer
        self._consumer = consumer
        self.sent = 0

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Send every letter and wait for the broker's acknowledgements; raises a failure."""
        if not letters:
            return
        await self._producer.send_all(
            Message(DEADLETTER_TOPIC, letter.value, letter.key, letter.headers(self._consumer))
            for letter in letters
        )
        self.sent += len(letters)
