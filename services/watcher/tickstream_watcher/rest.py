"""RestClient: an exchange's public REST API, paced, size-bounded, honouring Retry-After."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import httpx

from tickstream_watcher.exchange import MAX_REST_BYTES, BadFrame

log = logging.getLogger(__name__)

# Answers that mean "slow down": 429 (rate limit) and Binance's 418 (banned for ignoring 429s).
_THROTTLED: Final = frozenset({429, 418})
# A Retry-After longer than this is not waited out in place: the caller tries again later.
MAX_RETRY_AFTER_S: Final = 600.0


@dataclass
class Pacer:
    """When each REST request may start, per endpoint class, without I/O.

    A path (without its query) named in `paces` is paced apart from every other path at its
    own interval (OKX: `candles` 20/s beside `history-candles` and `instruments` at 10/s each,
    as its limits are per endpoint); every other path shares `interval_s`. `reserve` books the
    next slot of the path's class at once: callers sleep the delay it returns, so concurrent
    callers are spaced without a lock, and a caller cancelled while sleeping only leaves its
    slot unused (slower, never faster than the limit)."""

    interval_s: float
    paces: Mapping[str, float] = field(default_factory=dict)
    _next_at: dict[str, float] = field(default_factory=dict, init=False)

    def reserve(self, path: str, now: float) -> float:
        """Seconds from `now` (monotonic) until a request of `path` may start; books it."""
        endpoint = path.split("?", 1)[0]
        key = endpoint if endpoint in self.paces else ""
        interval = self.paces.get(key, self.interval_s)
        at = max(now, self._next_at.get(key, now))
        self._next_at[key] = at + interval
        return at - now


class RestUnavailable(Exception):
    """The exchange did not answer usefully after the retries; try again later."""


@dataclass
class RestClient:
    """GETs on one exchange's REST API, at most one every `min_interval_s` (a path named in
    `paces`: at most one every `paces[path]`, paced apart from the others; see Pacer).

    429/418 wait the server's Retry-After (seconds; `default_retry_s` when absent) and retry,
    as does a 200 whose body `throttled_body` says means "slow down" (OKX's code 50011);
    connection errors, timeouts and 5xx retry with doubling waits; after `attempts` tries
    RestUnavailable is raised. Other 4xx raise BadFrame (our request or the symbol is wrong).
    A body over MAX_REST_BYTES is refused unread. Safe to cancel. Call `aclose` when done.
    """

    base_url: str
    min_interval_s: float = 0.2
    attempts: int = 5
    default_retry_s: float = 1.0
    timeout_s: float = 10.0
    throttled_body: Callable[[bytes], bool] | None = None
    paces: Mapping[str, float] = field(default_factory=dict)
    _client: httpx.AsyncClient = field(init=False)
    _pacer: Pacer = field(init=False)
    throttled: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._pacer = Pacer(self.min_interval_s, self.paces)
        self._client = httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"), timeout=self.timeout_s, follow_redirects=False
        )

    async def aclose(self) -> None:
        """Close the connection pool; idempotent."""
        await self._client.aclose()

    async def get(self, path: str) -> bytes:
        """The body of a 200 answer to GET `path`; raises RestUnavailable or BadFrame."""
        wait = self.default_retry_s
        problem = "no attempt"
        for _ in range(self.attempts):
            slot_in = self._pacer.reserve(path, time.monotonic())
            if slot_in > 0:
                await asyncio.sleep(slot_in)
            try:
                status, retry_after, body = await self._fetch(path)
            except (httpx.TransportError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                throttled = self.throttled_body is not None and self.throttled_body(body)
                if status == 200 and not throttled:
                    return body
                if status in _THROTTLED or throttled:
                    self.throttled += 1
                    delay = retry_after if retry_after is not None else self.default_retry_s
                    if delay > MAX_RETRY_AFTER_S:
                        raise RestUnavailable(f"{path}: {status}, retry after {delay:.0f}s")
                    what = f"HTTP {status}" + (", rate limit in the body" if throttled else "")
                    log.warning("%s%s: %s, waiting %.1fs", self.base_url, path, what, delay)
                    await asyncio.sleep(delay)
                    continue
                if status < 500:
                    raise BadFrame(f"{path}: HTTP {status}: {body[:200]!r}")
                problem = f"HTTP {status}"
            log.warning("%s%s: %s, retrying in %.1fs", self.base_url, path, problem, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 60.0)
        raise RestUnavailable(f"{path}: {problem}")

    async def _fetch(self, path: str) -> tuple[int, float | None, bytes]:
        async with self._client.stream("GET", path) as response:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_REST_BYTES:
                raise BadFrame(f"{path}: body of {declared} bytes exceeds {MAX_REST_BYTES}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_REST_BYTES:
                    raise BadFrame(f"{path}: body exceeds {MAX_REST_BYTES} bytes")
                chunks.append(chunk)
            return response.status_code, _retry_after(response.headers), b"".join(chunks)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds (the form exchanges send); None if absent or not a number."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0.0 <= seconds < float("inf") else None
