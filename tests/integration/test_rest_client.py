"""RestClient against a local HTTP server: Retry-After, retries, size bound, pacing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import deadline
from tickstream_watcher.exchange import MAX_REST_BYTES, BadFrame
from tickstream_watcher.rest import RestClient, RestUnavailable


@dataclass
class Server:
    """Answers request i with replies[i] (the last one repeats): (status, headers, body)."""

    replies: list[tuple[int, dict[str, str], bytes]]
    requests: list[tuple[float, str]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.requests.append((time.monotonic(), path))
                status, headers, body = self.replies[min(len(self.requests), len(self.replies)) - 1]
                lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()


@contextlib.asynccontextmanager
async def client(base: str, **options: float) -> AsyncIterator[RestClient]:
    rest = RestClient(base, **options)  # type: ignore[arg-type]
    try:
        yield rest
    finally:
        await rest.aclose()
        await rest.aclose()  # idempotent


async def test_throttled_answers_wait_retry_after_then_succeed() -> None:
    """429 and 418 are retried after the server's Retry-After; the 200 body is returned."""
    server = Server(
        [
            (429, {"Retry-After": "0.3"}, b""),
            (418, {"Retry-After": "0.2"}, b""),
            (200, {}, b"[1,2]"),
        ]
    )
    async with serving(server) as base, client(base, min_interval_s=0.0) as rest:
        async with asyncio.timeout(deadline(5)):
            assert await rest.get("/api/v3/klines?symbol=BTCUSDT") == b"[1,2]"
        assert rest.throttled == 2
    (t0, path), (t1, _), (t2, _) = server.requests
    assert path == "/api/v3/klines?symbol=BTCUSDT"
    assert t1 - t0 >= 0.3 and t2 - t1 >= 0.2


async def test_a_body_saying_slow_down_is_waited_out_like_a_429() -> None:
    """OKX's rate limit with HTTP 200 (code 50011) is retried after the default wait; the next
    answer, code "0", is returned; without the hook the first body would be returned."""
    from tickstream_watcher.okx import rest_throttled

    limited = b'{"code":"50011","msg":"Rate limit reached. Please refer to API document","data":[]}'
    good = b'{"code":"0","msg":"","data":[]}'
    server = Server([(200, {}, limited), (200, {}, good)])
    async with serving(server) as base:
        rest = RestClient(
            base, min_interval_s=0.0, default_retry_s=0.2, throttled_body=rest_throttled
        )
        try:
            async with asyncio.timeout(deadline(5)):
                assert await rest.get("/api/v5/market/candles?instId=BTC-USDT") == good
        finally:
            await rest.aclose()
        assert rest.throttled == 1
    (t0, _), (t1, _) = server.requests
    assert t1 - t0 >= 0.2


async def test_server_errors_retry_then_give_up() -> None:
    """5xx answers are retried with doubling waits; after the attempts RestUnavailable."""
    server = Server([(503, {}, b"down")])
    async with (
        serving(server) as base,
        client(base, min_interval_s=0.0, attempts=3, default_retry_s=0.05) as rest,
    ):
        with pytest.raises(RestUnavailable, match="HTTP 503"):
            await rest.get("/products")
    assert len(server.requests) == 3


async def test_client_errors_and_oversized_bodies_are_bad_frames() -> None:
    """A 400 (bad symbol) and a body over the bound raise BadFrame at once, without retries."""
    server = Server([(400, {}, b'{"code":-1121,"msg":"Invalid symbol."}')])
    async with serving(server) as base, client(base, min_interval_s=0.0) as rest:
        with pytest.raises(BadFrame, match=r"HTTP 400.*Invalid symbol"):
            await rest.get("/api/v3/klines?symbol=NOPE")
    assert len(server.requests) == 1
    huge = Server([(200, {}, b"x" * (MAX_REST_BYTES + 1))])
    async with serving(huge) as base, client(base) as rest:
        with pytest.raises(BadFrame, match="exceeds"):
            await rest.get("/products")


async def test_a_retry_after_beyond_the_cap_is_not_waited_in_place() -> None:
    """A ban of an hour (418, Retry-After 3600) raises RestUnavailable instead of sleeping."""
    server = Server([(418, {"Retry-After": "3600"}, b"")])
    async with serving(server) as base, client(base) as rest:
        with pytest.raises(RestUnavailable, match="retry after 3600s"):
            await rest.get("/api/v3/exchangeInfo")


async def test_requests_are_paced() -> None:
    """Requests of one client start at least min_interval_s apart, also when issued together."""
    server = Server([(200, {}, b"{}")])
    async with serving(server) as base, client(base, min_interval_s=0.1) as rest:
        started = time.monotonic()
        await asyncio.gather(*(rest.get(f"/p{i}") for i in range(4)))
        elapsed = time.monotonic() - started
    # The fourth request cannot start before three intervals have passed (arrival times at the
    # server can bunch up, so they are not what is checked).
    assert elapsed >= 0.3
    assert sorted(path for _, path in server.requests) == ["/p0", "/p1", "/p2", "/p3"]


async def test_unreachable_server_is_unavailable() -> None:
    """Connection refused on every attempt ends in RestUnavailable naming the error."""
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with client(
        f"http://127.0.0.1:{port}", min_interval_s=0.0, attempts=2, default_retry_s=0.01
    ) as rest:
        with pytest.raises(RestUnavailable, match="ConnectError"):
            await rest.get("/products")
