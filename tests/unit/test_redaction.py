"""Token redaction: the parser that reads the token is the one that hides it from log lines."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from tickstream_shared.redaction import (
    REDACTED,
    query_value,
    redact,
    redact_query,
    without_parameters,
)

SECRET = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJl"
# Query-string characters, the percent sign and `+` included, so encodings are exercised.
QUERY_TEXT = st.text(alphabet="tokenTOKabc=&%+;?#7465Bb-_.", max_size=40)


@given(QUERY_TEXT)
def test_token_is_read_as_starlette_reads_query_parameters(query: str) -> None:
    """For any query string, the token found is the one Starlette's QueryParams would give."""
    assert query_value(query, "token") == QueryParams(query).get("token")


@given(QUERY_TEXT, st.sampled_from(["/", "/metrics", "/api/ranks", "/ws", "/x%3F"]))
def test_an_accepted_token_never_survives_redaction(query: str, path: str) -> None:
    """Whatever spelling makes a value the token, that value is gone from the redacted line."""
    line = f'127.0.0.1:5 - "GET {path}?{query}&token={SECRET} HTTP/1.1" 200'
    assert SECRET not in redact(line)
    value = query_value(query, "token")
    if value:
        redacted = redact(f"GET {path}?{query} HTTP/1.1")
        assert query_value(redacted.split("?", 1)[1].split(" ")[0], "token") == REDACTED


@pytest.mark.parametrize(
    "name",
    ["token", "%74oken", "%74%6F%6B%65%6E", "t%6Fken", "%74%6f%6b%65%6e", "toke%6E"],
)
def test_every_spelling_of_the_token_is_redacted(name: str) -> None:
    """Percent-encoded names the gateway accepts as `token` are redacted like the plain one."""
    query = f"kind=price&{name}={quote(SECRET)}&limit=5"
    assert query_value(query, "token") == SECRET
    assert redact_query(query) == f"kind=price&{name}={REDACTED}&limit=5"
    assert without_parameters(query) == "kind=price&limit=5"


def test_redaction_in_free_text() -> None:
    """Every query in a line is redacted; text without queries and other parameters are kept."""
    text = f'WebSocket /ws?token={SECRET}" [accepted]; then GET /?a=1&token={SECRET}&b=2 x'
    assert redact(text) == (
        f'WebSocket /ws?token={REDACTED}" [accepted]; then GET /?a=1&token={REDACTED}&b=2 x'
    )
    assert redact("no query here, token=abc") == "no query here, token=abc"
    assert redact("/api/ranks?kind=price&tokens=1") == "/api/ranks?kind=price&tokens=1"
