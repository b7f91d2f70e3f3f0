"""The gateway's limits and access checks through the real app, uvicorn and real storage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as redis
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import deadline, unique_exchange
from tickstream_gateway import service
from tickstream_gateway import ws as ws_module
from tickstream_gateway.app import create_app
from tickstream_gateway.hub import Hub
from tickstream_gateway.tokens import sign_token
from tickstream_shared.errors import MAX_ECHO_CHARS
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.settings import (
    DatabaseSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
)

REDIS_DB = 13  # flushed at the start: rank snapshots stay empty and never change
SECRET = "test-secret-of-at-least-32-bytes!"
# The locked-down gateway: token required, default origins, small limits.
MAX_CONNECTIONS = 4
MAX_SUBSCRIPTIONS = 3
COMMAND_BURST = 10


@dataclass
class Gateway:
    base: str
    hub: Hub


@contextlib.asynccontextmanager
async def serving(infra: LocalInfra, gateway: GatewaySettings) -> AsyncIterator[Gateway]:
    """Run the gateway service (uvicorn and the real app) until the block ends.

    The app is wrapped only to see its lifespan state, so tests can look into the hub.
    """
    redis_url = f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}"
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        redis=RedisSettings(url=redis_url),
        database=DatabaseSettings(url=infra.database_url),
        gateway=gateway,
    )
    lifespan_states: list[dict[str, Any]] = []

    def create_app_in_view(settings: ServiceSettings, pool: Any = None) -> Callable[..., Any]:
        app = create_app(settings, pool=pool)

        async def in_view(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                lifespan_states.append(scope["state"])
            await app(scope, receive, send)

        return in_view

    stop = asyncio.Event()
    base = f"127.0.0.1:{gateway.port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "create_app", create_app_in_view)
        serving = asyncio.create_task(service.run(settings, stop))
        try:
            async with asyncio.timeout(deadline(60)):
                while (await http(base, "/healthz"))[0] != 200:
                    assert not serving.done(), "gateway stopped"
                    await asyncio.sleep(0.1)
        except BaseException:
            stop.set()
            await serving
            raise
    try:
        yield Gateway(base, lifespan_states[0]["gateway"].hub)
    finally:
        stop.set()
        await serving


@pytest.fixture(scope="module")
async def locked(infra: LocalInfra) -> AsyncIterator[Gateway]:
    """A gateway with a JWT secret, the default origins and small limits."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}")
    await client.flushdb()
    await client.aclose()
    settings = GatewaySettings(
        port=free_port(),
        jwt_secret=SECRET,
        max_connections=MAX_CONNECTIONS,
        max_subscriptions=MAX_SUBSCRIPTIONS,
        max_commands_per_s=1.0,
        command_burst=COMMAND_BURST,
    )
    async with serving(infra, settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
async def open_gateway(infra: LocalInfra) -> AsyncIterator[Gateway]:
    """A gateway without authentication, only its own origin and a dashboard's allowed."""
    settings = GatewaySettings(
        port=free_port(),
        allowed_origins=("self", "https://dash.example.com"),
        max_commands_per_s=100_000,
        command_burst=100_000,
    )
    async with serving(infra, settings) as gateway:
        yield gateway


REFUSED = "tickstream_gateway_websocket_refused"
CLOSED = "tickstream_gateway_websocket_closed"


def token(expires_in: float = 600.0, secret: str = SECRET) -> str:
    return sign_token({"sub": "test", "exp": time.time() + expires_in}, secret.encode())


async def http(
    base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """Status, headers (names in lower case) and body (JSON when it is); status 0 if refused."""

    def fetch() -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(
            f"http://{base}{path}", method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, answer, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, answer, raw = exc.code, exc.headers, exc.read()
        except OSError:
            return 0, {}, None
        lowered = {name.lower(): value for name, value in answer.items()}
        try:
            return status, lowered, json.loads(raw)
        except ValueError:
            return status, lowered, raw

    return await asyncio.to_thread(fetch)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(deadline(10)):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def refused(url: str, **options: Any) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a WebSocket upgrade the gateway refuses."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **options):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body or b"null")


async def wait_until(condition: Callable[[], bool]) -> None:
    """Return once `condition()` holds (it reads state the gateway changes), within a deadline."""
    async with asyncio.timeout(deadline(10)):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def counted(base: str, counter: str, reason: str) -> float:
    """The value of `counter{reason="..."}` as the gateway's /metrics shows it (0 if absent)."""
    status, _, body = await http(base, "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else json.dumps(body)
    prefix = f'{counter}_total{{reason="{reason}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else 0.0


async def ping_pong(ws: ClientConnection) -> None:
    await ws.send('{"op":"ping"}')
    assert await recv_json(ws) == {"type": "pong"}


# ---------------------------------------------------------------- origin


async def test_origin_from_another_site_is_refused_with_403(locked: Gateway) -> None:
    """An upgrade from another site's page gets 403 `forbidden_origin`, even with a token."""
    before = await counted(locked.base, REFUSED, "forbidden_origin")
    status, body = await refused(
        f"ws://{locked.base}/ws?token={token()}", origin="https://evil.example"
    )
    assert (status, body["error"]) == (403, "forbidden_origin")
    assert body["message"] == "origin 'https://evil.example' may not open the WebSocket"
    # Origin is checked first: without a token the answer is still about the origin.
    status, body = await refused(f"ws://{locked.base}/ws", origin="https://evil.example")
    assert (status, body["error"]) == (403, "forbidden_origin")
    assert await counted(locked.base, REFUSED, "forbidden_origin") == before + 2


async def test_default_origins_and_programs_are_allowed(locked: Gateway) -> None:
    """Localhost pages on any port, the gateway's own page and clients without Origin connect."""
    url = f"ws://{locked.base}/ws?token={token()}"
    for origin in (None, "http://localhost:5173", f"http://{locked.base}", "https://127.0.0.1"):
        async with connect(url, origin=origin) as ws:
            await ping_pong(ws)


async def test_listed_origins_replace_the_defaults(open_gateway: Gateway) -> None:
    """With `self` and one dashboard listed, localhost pages on other ports are refused."""
    url = f"ws://{open_gateway.base}/ws"
    for origin in ("https://dash.example.com", f"http://{open_gateway.base}"):
        async with connect(url, origin=origin) as ws:
            await ping_pong(ws)
    status, body = await refused(url, origin="http://localhost:5173")
    assert (status, body["error"]) == (403, "forbidden_origin")


# ---------------------------------------------------------------- token


async def test_websocket_requires_a_valid_token(locked: Gateway) -> None:
    """No token, an expired one or another key's gets 401; a valid one in query or header works."""
    url = f"ws://{locked.base}/ws"
    before = await counted(locked.base, REFUSED, "unauthorized")
    status, body = await refused(url)
    assert (status, body["error"]) == (401, "unauthorized")
    assert body["message"].startswith("a token is required")
    status, body = await refused(f"{url}?token={token(expires_in=-1)}")
    assert (status, body) == (401, {"error": "unauthorized", "message": "token has expired"})
    status, body = await refused(f"{url}?token={token(secret='another-secret-of-32-bytes-or-so')}")
    assert (status, body["message"]) == (401, "token signature does not match")
    assert await counted(locked.base, REFUSED, "unauthorized") == before + 3

    async with connect(f"{url}?token={token()}") as ws:
        await ping_pong(ws)
    async with connect(url, additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
        await ping_pong(ws)


async def test_websocket_closes_when_its_token_expires(locked: Gateway) -> None:
    """A connection lives until its token's `exp`, then is closed with 4001; a longer token's
    connection opened beside it stays open."""
    url = f"ws://{locked.base}/ws"
    before = await counted(locked.base, CLOSED, "token_expired")
    async with (
        connect(f"{url}?token={token(expires_in=3)}") as short,
        connect(f"{url}?token={token()}") as long,
    ):
        await ping_pong(short)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(15):
                while True:
                    await short.recv()
        assert short.close_code == 4001
        assert short.close_reason == "token expired"
        await ping_pong(long)
    assert await counted(locked.base, CLOSED, "token_expired") == before + 1


async def test_api_requires_a_valid_token(locked: Gateway) -> None:
    """Every /api/ path answers 401 JSON without a valid token; with one, the route answers."""
    for path in ("/api/ranks?kind=price", "/api/metrics", "/api/no-such-route"):
        status, headers, body = await http(locked.base, path)
        assert (status, body["error"]) == (401, "unauthorized"), path
        assert headers["www-authenticate"] == 'Bearer realm="tickstream"'
    status, _, body = await http(
        locked.base, "/api/ranks?kind=price", headers={"Authorization": f"Bearer {token(-5)}"}
    )
    assert (status, body) == (401, {"error": "unauthorized", "message": "token has expired"})

    status, _, body = await http(
        locked.base, "/api/ranks?kind=price", headers={"Authorization": f"Bearer {token()}"}
    )
    assert (status, body["kind"], body["total"]) == (200, "price", 0)
    status, _, body = await http(locked.base, f"/api/ranks?kind=volume&token={token()}")
    assert (status, body["kind"]) == (200, "volume")


async def test_health_metrics_and_the_page_stay_open(locked: Gateway) -> None:
    """Probes, Prometheus, the dashboard and its files need no token."""
    for path in ("/healthz", "/livez", "/readyz", "/metrics", "/", "/static/app.js"):
        status, _, _ = await http(locked.base, path)
        assert status == 200, path


# ---------------------------------------------------------------- connections and commands


async def test_connections_beyond_the_limit_are_refused_with_503(locked: Gateway) -> None:
    """The connection past GATEWAY_MAX_CONNECTIONS gets 503; one closing makes room again."""
    await wait_until(lambda: not locked.hub.sessions)  # earlier tests' connections are gone
    url = f"ws://{locked.base}/ws?token={token()}"
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(url)) for _ in range(MAX_CONNECTIONS)]
        before = await counted(locked.base, REFUSED, "too_many_connections")
        status, body = await refused(url)
        assert (status, body["error"]) == (503, "too_many_connections")
        assert await counted(locked.base, REFUSED, "too_many_connections") == before + 1
        assert len(locked.hub.sessions) == MAX_CONNECTIONS
        await clients[0].close()
        await wait_until(lambda: len(locked.hub.sessions) < MAX_CONNECTIONS)
        async with connect(url) as ws:
            await ping_pong(ws)


async def test_subscriptions_beyond_the_limit_get_an_error(locked: Gateway) -> None:
    """A subscribe past GATEWAY_MAX_SUBSCRIPTIONS is refused; re-subscribing a held one is not."""
    async with connect(f"ws://{locked.base}/ws?token={token()}") as ws:
        for frame in (
            {"op": "subscribe", "channel": "alerts"},
            {"op": "subscribe", "channel": "ranks", "kind": "price"},
            {"op": "subscribe", "channel": "ranks", "kind": "volume"},
        ):
            await ws.send(json.dumps(frame))
            assert (await recv_json(ws))["type"] == "subscribed"
            if frame["channel"] == "ranks":
                assert (await recv_json(ws))["type"] == "ranks"
        market = f"{unique_exchange()}:btc-usd"
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        assert await recv_json(ws) == {
            "type": "error",
            "code": "too_many_subscriptions",
            "message": f"a connection holds at most {MAX_SUBSCRIPTIONS}; unsubscribe first",
        }
        # Switching a held kind's measure replaces a subscription: allowed.
        await ws.send(
            json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price", "by": "cv"})
        )
        assert (await recv_json(ws))["by"] == "cv"
        assert (await recv_json(ws))["type"] == "ranks"
        await ws.send(json.dumps({"op": "unsubscribe", "channel": "alerts"}))
        assert (await recv_json(ws))["type"] == "unsubscribed"
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert (await recv_json(ws))["code"] == "unknown_market"


async def test_commands_past_the_rate_get_rate_limited_then_1008(locked: Gateway) -> None:
    """A burst passes, as many more get `rate_limited`, then the gateway closes with 1008."""
    limited = {
        "type": "error",
        "code": "rate_limited",
        "message": f"more than 1 commands/s (bursts of {COMMAND_BURST});"
        " this one was ignored, slow down",
    }
    before = await counted(locked.base, CLOSED, "too_many_commands")
    async with connect(f"ws://{locked.base}/ws?token={token()}") as ws:
        for _ in range(COMMAND_BURST):
            await ws.send('{"op":"ping"}')
        assert [await recv_json(ws) for _ in range(COMMAND_BURST)] == [
            {"type": "pong"}
        ] * COMMAND_BURST
        # One at a time, so every answer is out before the close (the close does not wait
        # for frames still queued to a client that ignores its limit).
        for _ in range(COMMAND_BURST):
            await ws.send('{"op":"subscribe","channel":"alerts"}')
            assert await recv_json(ws) == limited
        assert locked.hub.sessions and not any(s.alerts for s in locked.hub.sessions)
        await ws.send('{"op":"ping"}')
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "too many commands")
    assert await counted(locked.base, CLOSED, "too_many_commands") == before + 1


# ---------------------------------------------------------------- frames


async def test_an_unexpected_error_closes_with_1011(
    open_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while handling a command closes that connection with 1011, not a dropped socket;
    the gateway goes on serving the others."""

    def broken(text: str | bytes) -> Any:
        raise RuntimeError("a bug")

    async with connect(f"ws://{open_gateway.base}/ws") as other:
        with monkeypatch.context() as patch:
            patch.setattr(ws_module, "parse_command", broken)
            async with connect(f"ws://{open_gateway.base}/ws") as ws:
                await ws.send('{"op":"ping"}')
                with pytest.raises(ConnectionClosed) as info:
                    await recv_json(ws)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "internal error")
        await ping_pong(other)


async def test_deep_nesting_is_bad_json_and_the_connection_stays(open_gateway: Gateway) -> None:
    """4 KB of nested brackets gets `bad_json` (it once dropped the connection silently)."""
    async with connect(f"ws://{open_gateway.base}/ws") as ws:
        await ws.send("[" * 2048 + "]" * 2048)
        assert await recv_json(ws) == {
            "type": "error",
            "code": "bad_json",
            "message": "frame nests deeper than 16 levels",
        }
        await ping_pong(ws)


async def test_binary_frames_get_bad_request_and_the_connection_stays(
    open_gateway: Gateway,
) -> None:
    """A binary frame, even of valid JSON, is answered `bad_request`; the connection stays."""
    async with connect(f"ws://{open_gateway.base}/ws") as ws:
        await ws.send(b'{"op":"ping"}')
        assert await recv_json(ws) == {
            "type": "error",
            "code": "bad_request",
            "message": "frames must be text (JSON), not binary",
        }
        await ping_pong(ws)


async def test_frame_limit_is_in_bytes(open_gateway: Gateway) -> None:
    """4096 bytes of multibyte text pass; 4097 bytes in fewer characters are too large."""
    prefix, suffix = '{"op":"ping","pad":"', '"}'
    pad_bytes = 4096 - len(prefix) - len(suffix)
    async with connect(f"ws://{open_gateway.base}/ws") as ws:
        fits = prefix + "é" * (pad_bytes // 2) + suffix
        assert len(fits.encode()) == 4096
        await ws.send(fits)
        assert await recv_json(ws) == {"type": "pong"}
        too_large = prefix + "é" * (pad_bytes // 2) + "x" + suffix
        assert (len(too_large), len(too_large.encode())) == (2060, 4097)
        await ws.send(too_large)
        assert await recv_json(ws) == {
            "type": "error",
            "code": "frame_too_large",
            "message": "frames are limited to 4096 bytes",
        }
        # Beyond 16 KiB the WebSocket layer itself closes the connection with 1009.
        await ws.send("é" * 8193)
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_error_messages_echo_only_a_prefix(open_gateway: Gateway) -> None:
    """A 3 KB measure name comes back as its first 64 characters and a mark, nothing more."""
    async with connect(f"ws://{open_gateway.base}/ws") as ws:
        by = "q" * 3000
        await ws.send(
            json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price", "by": by})
        )
        assert await recv_json(ws) == {
            "type": "error",
            "code": "bad_measure",
            "message": f"measure '{'q' * MAX_ECHO_CHARS}'… is not one of std, cv, logret"
            " for kind price",
        }
        market = f"{unique_exchange()}:{'z' * 90}-usd"
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert await recv_json(ws) == {
            "type": "error",
            "code": "unknown_market",
            "message": f"no bars for market '{market[:MAX_ECHO_CHARS]}'…; see /api/metrics",
        }


async def test_made_up_markets_leave_no_state(open_gateway: Gateway) -> None:
    """60,000 unsubscribes and 300 subscribes of made-up markets leave the hub's maps empty."""
    hub = open_gateway.hub
    exchange = unique_exchange()
    await wait_until(lambda: not hub.sessions)  # earlier tests' connections are gone
    async with connect(f"ws://{open_gateway.base}/ws") as ws:
        for batch in range(60):
            for i in range(1000):
                market = f"{exchange}:made{batch * 1000 + i}-usd"
                await ws.send(f'{{"op":"unsubscribe","channel":"market","market":"{market}"}}')
            for _ in range(1000):
                assert (await recv_json(ws))["type"] == "unsubscribed"
        for i in range(300):
            market = f"{exchange}:never{i}-usd"
            await ws.send(f'{{"op":"subscribe","channel":"market","market":"{market}"}}')
        for _ in range(300):
            assert (await recv_json(ws))["type"] == "subscribed"
            assert (await recv_json(ws))["code"] == "unknown_market"
        (session,) = hub.sessions
        assert session.markets == {}
        assert hub._by_market == {}
        assert not [m for m in hub.recent.markets if m.startswith(exchange)]
    await wait_until(lambda: not hub.sessions)


async def test_405_names_the_allowed_methods(open_gateway: Gateway) -> None:
    """A method a route does not serve gets 405 JSON with an `Allow` header."""
    for path in ("/api/ranks", "/healthz", "/static/app.js"):
        status, headers, body = await http(open_gateway.base, path, method="POST")
        assert (status, headers["allow"], body["error"]) == (405, "GET, HEAD", "method_not_allowed")
    status, _, body = await http(open_gateway.base, "/api/ranks", method="DELETE")
    assert body["message"] == "Method Not Allowed: DELETE /api/ranks"
