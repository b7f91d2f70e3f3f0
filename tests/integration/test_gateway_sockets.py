"""The gateway's sockets and logs through real uvicorn: deadlines, the cap, no token logged."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from websockets.asyncio.client import connect

from tests.conftest import deadline
from tests.integration.test_gateway_limits import (
    SECRET,
    Gateway,
    http,
    ping_pong,
    refused,
    serving,
    token,
)
from tickstream_gateway import api
from tickstream_gateway.tokens import sign_token
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.logs import log_handler
from tickstream_shared.settings import GatewaySettings, LogSettings

READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.5
MAX_LIFETIME_S = 3600
SOCKETS = 100  # of each kind: silent, trickling


@pytest.fixture(scope="module")
async def guarded(infra: LocalInfra) -> AsyncIterator[Gateway]:
    """A gateway with a token, every request in the access log and short socket deadlines."""
    settings = GatewaySettings(
        port=free_port(),
        jwt_secret=SECRET,
        access_log="all",
        request_read_timeout_s=READ_TIMEOUT_S,
        keep_alive_timeout_s=KEEP_ALIVE_S,
        token_max_lifetime_s=MAX_LIFETIME_S,
    )
    async with serving(infra, settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
async def capped(infra: LocalInfra) -> AsyncIterator[Gateway]:
    """A gateway holding at most 10 sockets, 4 of them WebSockets."""
    settings = GatewaySettings(
        port=free_port(), max_connections=4, max_sockets=10, request_read_timeout_s=60.0
    )
    async with serving(infra, settings) as gateway:
        yield gateway


@contextlib.contextmanager
def captured_log(log_format: str) -> Iterator[io.StringIO]:
    """Every log line written while the block runs, through the service's own handler."""
    stream = io.StringIO()
    root = logging.getLogger()
    handler = log_handler(LogSettings(format=log_format), "gateway", stream)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def exercise_every_route(base: str, secret: str) -> None:
    """Send `secret` as the token, in every spelling, on every kind of route."""
    encoded = quote(secret, safe="")
    for path in (
        f"/?token={secret}",
        f"/metrics?token={secret}",
        f"/static/app.js?token={encoded}",
        f"/api/ranks?kind=price&%74oken={secret}",
        f"/api/ranks?t%6Fken={encoded}&kind=volume",
        f"/api/ranks?token={secret}x",  # refused: 401
        f"/api/no-such-route?token={secret}",
        f"/nothing-here?%74%6F%6B%65%6E={secret}",  # 404
    ):
        status, _, _ = await http(base, path)
        assert status in (200, 401, 404), path
    for query in (f"token={secret}", f"kind=1&%74oken={encoded}"):
        async with connect(f"ws://{base}/ws?{query}") as ws:
            await ping_pong(ws)
    status, _ = await refused(f"ws://{base}/ws?token={secret}", origin="https://evil.example")
    assert status == 403
    status, _ = await refused(f"ws://{base}/ws?token={secret}x")
    assert status == 401


# ---------------------------------------------------------------- logs


async def test_no_token_reaches_the_log_in_text_lines(guarded: Gateway) -> None:
    """A token on any route, in any spelling, plain or percent-encoded, is never written."""
    secret = token()
    with captured_log("text") as log:
        await exercise_every_route(guarded.base, secret)
        lines = log.getvalue()
    assert secret not in lines and quote(secret, safe="") not in lines
    assert "GET /?token=[redacted] 200" in lines
    assert "GET /metrics?token=[redacted] 200" in lines
    assert "GET /static/app.js?token=[redacted] 200" in lines
    assert "GET /api/ranks?kind=price&%74oken=[redacted] 200" in lines
    assert "GET /api/ranks?t%6Fken=[redacted]&kind=volume 200" in lines
    assert "GET /api/ranks?token=[redacted] 401" in lines
    assert "GET /nothing-here?%74%6F%6B%65%6E=[redacted] 404" in lines
    assert "WebSocket /ws?token=[redacted] 101" in lines
    assert "WebSocket /ws?kind=1&%74oken=[redacted] 101" in lines
    assert "WebSocket /ws?token=[redacted] 403" in lines
    assert "WebSocket /ws?token=[redacted] 401" in lines
    # One format: time, level, then the service; uvicorn's own handshake lines are dropped,
    # the access log has them.
    for line in lines.splitlines():
        assert line.split(" ")[2:4] == ["INFO", "gateway"], line
    assert '"WebSocket /ws' not in lines


async def test_a_traceback_quoting_a_url_is_redacted(
    guarded: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error whose message quotes a URL with a token is logged, token redacted."""
    secret = token()
    url = f"http://{guarded.base}/metrics?x=1&token={secret}"

    def broken() -> Any:
        raise RuntimeError(f"a bug while answering {url}")

    monkeypatch.setattr(api.observability, "exposition", broken)
    with captured_log("text") as log:
        status, _, _ = await http(guarded.base, f"/metrics?x=1&token={secret}")
        lines = log.getvalue()
    assert status == 500
    assert "Traceback (most recent call last)" in lines
    assert (
        f"RuntimeError: a bug while answering http://{guarded.base}/metrics?x=1&token=[redacted]"
        in lines
    )
    assert "GET /metrics?x=1&token=[redacted] 500" in lines
    assert secret not in lines


async def test_json_lines_parse_and_carry_the_access_fields(guarded: Gateway) -> None:
    """With LOG_FORMAT=json every line is one JSON object; access lines have their fields."""
    secret = token()
    with captured_log("json") as log:
        await exercise_every_route(guarded.base, secret)
        lines = log.getvalue()
    assert secret not in lines
    parsed = [json.loads(line) for line in lines.splitlines()]
    access = [p for p in parsed if p["logger"] == "tickstream.gateway.access"]
    metrics = next(p for p in access if p["target"].startswith("/metrics"))
    assert metrics["target"] == "/metrics?token=[redacted]"
    assert metrics["message"].startswith("GET /metrics?token=[redacted] 200 ")
    assert (metrics["method"], metrics["status"], metrics["level"]) == ("GET", 200, "INFO")
    assert (metrics["service"], metrics["client"].split(":")[0]) == ("gateway", "127.0.0.1")
    assert isinstance(metrics["duration_ms"], float)
    assert metrics["ts"].endswith("Z")
    assert {p["status"] for p in access if p["method"] == "WebSocket"} == {101, 401, 403}


# ---------------------------------------------------------------- tokens


async def test_absurd_claims_are_401_with_a_json_body(guarded: Gateway) -> None:
    """exp 10**400, strings, floats out of range, NaN, huge nbf/iat: 401 JSON, never 500."""
    now = time.time()
    for claims in (
        {"exp": 10**400},
        {"exp": -1},
        {"exp": "soon"},
        {"exp": 1e300},
        {"sub": "no exp"},
        {"exp": now + 60, "nbf": 10**400},
        {"exp": now + 60, "iat": 10**400},
        {"exp": now + 60, "iat": "yesterday"},
        {"exp": now + MAX_LIFETIME_S + 60},
        {"exp": now + 60, "iat": now - MAX_LIFETIME_S},
    ):
        signed = sign_token(claims, SECRET.encode())
        status, headers, body = await http(
            guarded.base, "/api/kinds", headers={"Authorization": f"Bearer {signed}"}
        )
        assert (status, body["error"]) == (401, "unauthorized"), claims
        assert headers["content-type"] == "application/json", claims
        status, body = await refused(f"ws://{guarded.base}/ws?token={signed}")
        assert (status, body["error"]) == (401, "unauthorized"), claims
    status, _, body = await http(guarded.base, f"/api/kinds?token={token(MAX_LIFETIME_S + 60)}")
    assert (status, body) == (
        401,
        {"error": "unauthorized", "message": f"token lives longer than {MAX_LIFETIME_S} s"},
    )


# ---------------------------------------------------------------- sockets


async def closed_after(reader: asyncio.StreamReader, opened: float | None = None) -> float:
    """Seconds from `opened` (default: now) until the gateway closes this connection (read
    until EOF)."""
    started = time.monotonic() if opened is None else opened
    # A close with the client's bytes unread reaches the client as a reset, not an EOF.
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(deadline(30)):
            while await reader.read(65536):
                pass
    return time.monotonic() - started


async def open_timed(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """A connection and the moment it was open."""
    reader, writer = await asyncio.open_connection(host, port)
    return reader, writer, time.monotonic()


async def trickle(writer: asyncio.StreamWriter) -> None:
    """Start a request and send one more header byte every 100 ms, never finishing it."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            await asyncio.sleep(0.1)
            writer.write(b"a")
            await writer.drain()


async def test_silent_and_slow_sockets_are_closed_while_healthz_answers(guarded: Gateway) -> None:
    """Sockets that send nothing or a header byte at a time are closed at the request deadline;
    /healthz answers meanwhile, and a WebSocket idle all along stays open."""
    host, port = guarded.base.split(":")
    async with connect(f"ws://{guarded.base}/ws?token={token()}") as ws:
        # Each socket's clock starts when it is open: opening 200 takes a while on a loaded
        # machine, and the deadline runs from each one's own start.
        silent = [await open_timed(host, int(port)) for _ in range(SOCKETS)]
        slow = [await open_timed(host, int(port)) for _ in range(SOCKETS)]
        trickling = [asyncio.create_task(trickle(writer)) for _, writer, _ in slow]
        closing = [
            asyncio.create_task(closed_after(reader, opened))
            for reader, _, opened in (*silent, *slow)
        ]
        answered = []
        while not all(task.done() for task in closing):
            started = time.monotonic()
            status, _, _ = await http(guarded.base, "/healthz")
            answered.append((status, time.monotonic() - started))
            await asyncio.sleep(0.1)
        durations = [await task for task in closing]
        for task in trickling:
            task.cancel()
        await asyncio.gather(*trickling, return_exceptions=True)
        for _, writer, _ in (*silent, *slow):
            writer.close()
        # Timed from just after each connect returned, so the server's clock started a little
        # earlier: allow that much.
        assert min(durations) > READ_TIMEOUT_S - 0.2
        assert max(durations) < READ_TIMEOUT_S + deadline(1.0)
        assert len(answered) >= 3 and all(status == 200 for status, _ in answered)
        assert max(seconds for _, seconds in answered) < deadline(1.0)
        await asyncio.sleep(KEEP_ALIVE_S + READ_TIMEOUT_S)
        await ping_pong(ws)  # idle past both timeouts: WebSockets are not HTTP-idle


async def test_an_idle_keep_alive_connection_is_closed(guarded: Gateway) -> None:
    """After an answer, a connection that sends nothing more is closed at the keep-alive
    timeout; one sending bytes that start no request is closed at the request deadline."""
    host, port = guarded.base.split(":")
    for tail, expected in ((b"", KEEP_ALIVE_S), (b"\r\n", READ_TIMEOUT_S)):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /livez HTTP/1.1\r\nHost: gateway\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if b"content-length" in line
        )
        await reader.readexactly(length)
        writer.write(tail)
        seconds = await closed_after(reader)
        writer.close()
        assert expected - 0.2 < seconds < expected + deadline(1.0), tail


async def test_the_socket_cap_holds_and_counts_websockets(capped: Gateway) -> None:
    """With 10 sockets held (4 of them WebSockets), the next connection gets 503 and is closed;
    when one closes, a new connection is served."""
    host, port = capped.base.split(":")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(4):
            await stack.enter_async_context(connect(f"ws://{capped.base}/ws"))
        held = [await asyncio.open_connection(host, int(port)) for _ in range(6)]
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        async with asyncio.timeout(deadline(10)):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
        assert json.loads(body) == {
            "error": "too_many_sockets",
            "message": "the gateway holds all the connections it may",
        }
        status, _, _ = await http(capped.base, "/healthz")
        assert status == 503
        held[0][1].close()
        async with asyncio.timeout(deadline(10)):
            while True:  # the gateway notices the close within a loop turn or two
                if (await http(capped.base, "/healthz"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
        for _, other in held[1:]:
            other.close()
