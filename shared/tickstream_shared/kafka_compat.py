"""Kafka requests aiokafka lacks: InitProducerId v3 and IncrementalAlterConfigs v0.

aiokafka only sends InitProducerId v0, whose request has no producer id/epoch fields. Apache
Kafka accepts that, but Tansu (the local broker) answers v0 with UNKNOWN_SERVER_ERROR because
it needs the v3 fields (producer_id=-1, producer_epoch=-1 for a new idempotent producer).
Teaching aiokafka v3 keeps acks=all + idempotence on every broker: the version is negotiated
from the broker's ApiVersions, so Kafka and Tansu both get a version they support.

aiokafka alters configs only with AlterConfigs, which replaces a resource's whole config and
which Tansu does not implement; IncrementalAlterConfigs (Kafka 2.3+, Tansu) sets single keys.
"""

from __future__ import annotations

from typing import Any

import aiokafka.producer.sender as _sender
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import InitProducerIdRequest_v0
from aiokafka.protocol.types import (
    Array,
    Boolean,
    CompactString,
    Int8,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)


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


class _IncrementalAlterConfigsResponseV0(Response):  # type: ignore[misc]
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "responses",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
            ),
        ),
    )


class _IncrementalAlterConfigsRequestV0(RequestStruct):  # type: ignore[misc]
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = _IncrementalAlterConfigsResponseV0
    SCHEMA = Schema(
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                (
                    "configs",
                    Array(
                        ("name", String("utf-8")),
                        ("config_operation", Int8),
                        ("value", String("utf-8")),
                    ),
                ),
            ),
        ),
        ("validate_only", Boolean),
    )


_TOPIC_RESOURCE = 2
_OPERATION_SET = 0


class IncrementalAlterConfigsRequest(Request[_IncrementalAlterConfigsRequestV0]):  # type: ignore[misc]
    """Set the given config keys of topics, leaving their other keys as they are."""

    API_KEY = 44

    def __init__(self, topic_configs: dict[str, dict[str, str]]) -> None:
        self._topic_configs = topic_configs

    def build(self, request_struct_class: Any) -> Any:
        resources = [
            (_TOPIC_RESOURCE, topic, [(k, _OPERATION_SET, v) for k, v in configs.items()])
            for topic, configs in self._topic_configs.items()
        ]
        return request_struct_class(resources, False)


_installed = False


def install() -> None:
    """Make aiokafka's sender build InitProducerId with v3 when the broker offers it.

    Idempotent: calling it twice changes nothing.
    """
    global _installed
    if not _installed:
        _sender.InitProducerIdRequest = InitProducerIdRequest
        _installed = True
