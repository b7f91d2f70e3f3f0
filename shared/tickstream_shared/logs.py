"""Logging of every service: one root handler, text or JSON lines, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Final

from tickstream_shared.redaction import redact
from tickstream_shared.settings import LogSettings

# The attributes every LogRecord has; anything else on a record came from `extra=` and is
# written as a field of its JSON line (the gateway's access lines: method, target, status...),
# except uvicorn's copy of the message with terminal colours.
_STANDARD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <service> <logger>: <message>`, then any traceback; secrets redacted."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # The whole line, traceback included: an exception's message may quote a URL.
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts`, `level`, `service`, `logger`, `message`, then any
    `extra=` fields and `exc` (the traceback); every string value is redacted."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRIBUTES and name not in line:
                line[name] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(
            {k: redact(v) if isinstance(v, str) else v for k, v in line.items()},
            ensure_ascii=False,
        )


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def log_handler(
    settings: LogSettings, service: str, stream: IO[str] | None = None
) -> logging.Handler:
    """A handler writing `settings.format` lines for `service` to `stream` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter(service))
    return handler


def setup_logging(settings: LogSettings, service: str) -> None:
    """Send every logger's lines, uvicorn's included, through one handler on the root logger.

    Call once at the start of a process; calling it again replaces the handler.
    """
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(log_handler(settings, service))
    root.setLevel(settings.level.upper())
    # aiokafka logs every coordinator hiccup at INFO/WARNING; keep our own lines readable.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # asyncpg's pool logs each failed reconnection with a traceback: an outage we wait out
    # (PostgreSQL down) is one line per attempt, like ours.
    logging.getLogger("asyncpg.pool").addFilter(_one_line)


def _one_line(record: logging.LogRecord) -> bool:
    """Fold a record's exception into its message, without the traceback."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True
