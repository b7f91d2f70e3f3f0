"""InitProducerId v3 for aiokafka, so idempotent producers work on brokers that require it.

aiokafka only sends InitProducerId v0, whose request has no producer id/epoch fields. Apache
Kafka accepts that, but Tansu (the local broker) answers v0 with UNKNOWN_SERVER_ERROR because
it needs the v3 fields (producer_id=-1, producer_epoch=-1 for a new idempotent producer).
Teaching aiokafka v3 keeps acks=all + idempotence on every broker: the version is negotiated
from the broker's ApiVersions, so Kafka and Tansu both get a version they support.
"""

from __future__ import annotations

from typing import Any

import aiokafka.producer.sender as _sender
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import InitProducerIdRequest_v0
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields


class _InitProducerIdResponseV3(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class _InitProducerIdRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = _InitProducerIdResponseV3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest(Request[InitProducerIdRequest_v0 | _InitProducerIdRequestV3]):  # type: ignore[misc]
    """Drop-in for aiokafka's request builder that also knows version 3."""

    API_KEY = 22

    def __init__(self, transactional_id: str | None, transaction_timeout_ms: int) -> None:
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION >= 3:
            # -1/-1 asks for a fresh producer id, as the Java client does.
            return request_struct_class(
                self._transactional_id, self._transaction_timeout_ms, -1, -1, {}
            )
        return request_struct_class(self._transactional_id, self._transaction_timeout_ms)


_installed = False


def install() -> None:
    """Make aiokafka's sender build InitProducerId with v3 when the broker offers it.

    Idempotent: calling it twice changes nothing.
    """
    global _installed
    if not _installed:
        _sender.InitProducerIdRequest = InitProducerIdRequest
        _installed = True
