"""Log lines: one format (text or JSON) for every logger, secrets redacted, access policy."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tickstream_gateway.telemetry import AccessLog
from tickstream_shared.errors import ConfigError
from tickstream_shared.logs import log_handler
from tickstream_shared.settings import LogSettings, ServiceSettings

SECRET = "abc.def.ghi"


def emit(log_format: str, record: logging.LogRecord) -> str:
    stream = io.StringIO()
    log_handler(LogSettings(format=log_format), "gateway", stream).handle(record)
    return stream.getvalue()


def failing_record() -> logging.LogRecord:
    try:
        raise RuntimeError(f"bad GET /x?token={SECRET}&a=1")
    except RuntimeError as exc:
        return logging.LogRecord(
            "uvicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Exception in %s",
            ("/ws?token=" + SECRET,),
            (type(exc), exc, exc.__traceback__),
        )


def test_text_lines_have_one_format_and_no_token() -> None:
    """Text: `<time> <LEVEL> <service> <logger>: <message>` and a traceback, token redacted."""
    text = emit("text", failing_record())
    first = text.splitlines()[0]
    assert (
        first.split(" ", 2)[2] == "ERROR gateway uvicorn.error: Exception in /ws?token=[redacted]"
    )
    assert "RuntimeError: bad GET /x?token=[redacted]&a=1" in text
    assert SECRET not in text


def test_json_lines_parse_and_keep_extra_fields() -> None:
    """JSON: one object per line, with `extra` fields and the traceback, token redacted."""
    record = failing_record()
    record.status = 500
    record.target = f"/x?token={SECRET}"
    line = emit("json", record)
    assert line.count("\n") == 1
    parsed = json.loads(line)
    assert {
        k: parsed[k] for k in ("level", "service", "logger", "message", "status", "target")
    } == {
        "level": "ERROR",
        "service": "gateway",
        "logger": "uvicorn.error",
        "message": "Exception in /ws?token=[redacted]",
        "status": 500,
        "target": "/x?token=[redacted]",
    }
    assert parsed["exc"].endswith("RuntimeError: bad GET /x?token=[redacted]&a=1")
    assert SECRET not in line


def test_log_format_is_validated() -> None:
    """LOG_FORMAT takes `text` or `json`; anything else stops the service at start."""
    assert ServiceSettings.from_env({"LOG_FORMAT": "json"}).log.format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        ServiceSettings.from_env({"LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="GATEWAY_MAX_SOCKETS"):
        ServiceSettings.from_env({"GATEWAY_MAX_SOCKETS": "100", "GATEWAY_MAX_CONNECTIONS": "100"})


def test_access_log_policy() -> None:
    """`errors` logs 5xx and slow answers, `all` everything, `off` nothing."""
    errors = AccessLog("errors", slow_s=1.0)
    assert [errors.wants(s, t) for s, t in ((200, 0.1), (404, 0.1), (503, 0.0), (200, 1.5))] == [
        False,
        False,
        True,
        True,
    ]
    assert not AccessLog("errors", slow_s=0).wants(200, 99.0)
    assert AccessLog("all", 1.0).wants(200, 0.0) and not AccessLog("off", 1.0).wants(500, 9.0)
