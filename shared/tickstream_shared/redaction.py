"""Secrets out of logs: one query-string parser, used to read a credential and to redact it."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

# The query parameter that carries the gateway's access token. Reading it (access.py) and
# redacting it (every log line, logs.py) both go through `query_pairs`, so any spelling the
# gateway accepts as `token` (`%74oken`, `t%6Fken`, ...) is also one the logs hide.
TOKEN_PARAMETER: Final = "token"
SECRET_PARAMETERS: Final = frozenset({TOKEN_PARAMETER})
REDACTED: Final = "[redacted]"

# A query string inside free text (a request line, a WebSocket path, an exception message):
# from a `?` up to whitespace or a double quote. A request target holds neither (uvicorn
# writes `"` as %22), so a query is never cut short; at worst a few characters after it are
# hidden too.
_QUERY_IN_TEXT: Final = re.compile(r"\?([^\s\"]*)")


def query_pairs(query: str) -> list[tuple[str, str, str]]:
    """(name, value, raw field) of each `&`-separated field of a query string, in order.

    Names and values are decoded as Starlette's QueryParams decodes them (`+` is a space,
    then percent-decoding as UTF-8); a field without `=` has an empty value; empty fields are
    skipped. Pure; never raises.
    """
    pairs = []
    for field in query.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        pairs.append((_decode(name), _decode(value), field))
    return pairs


def query_value(query: str, name: str) -> str | None:
    """The value of the last field called `name` (once decoded), None if there is none."""
    found = None
    for field_name, value, _ in query_pairs(query):
        if field_name == name:
            found = value
    return found


def without_parameters(query: str, names: frozenset[str] = SECRET_PARAMETERS) -> str:
    """`query` without the fields whose decoded name is in `names`; the others byte for byte."""
    return "&".join(raw for name, _, raw in query_pairs(query) if name not in names)


def redact_query(query: str, names: frozenset[str] = SECRET_PARAMETERS) -> str:
    """`query` with the value of every field named in `names` replaced by `[redacted]`."""
    if not query:
        return query
    return "&".join(
        f"{raw.partition('=')[0]}={REDACTED}" if name in names else raw
        for name, _, raw in query_pairs(query)
    )


def redact(text: str) -> str:
    """`text` with the secret parameters of every query string in it redacted.

    What every log line goes through before it is written (logs.py): request lines, the
    WebSocket paths uvicorn prints, exception messages and tracebacks. Pure; never raises.
    """
    if "?" not in text:
        return text
    return _QUERY_IN_TEXT.sub(lambda match: "?" + redact_query(match.group(1)), text)


def _decode(part: str) -> str:
    return unquote(part.replace("+", " ")) if ("%" in part or "+" in part) else part
