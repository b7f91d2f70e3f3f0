"""HTTP bodies encoded (and gzipped) once, with a strong ETag, refreshed by one caller at a time."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# How old `/api/metrics`, `/api/feeds` and the readiness answer may be when handed out
# (docs/protocol.md).
LISTING_MAX_AGE_S: Final = 1.0
READINESS_MAX_AGE_S: Final = 1.0
# For this much longer a probe gets the held readiness answer at once while a new check runs:
# under heavy WebSocket load a check's round trips take several busy loop turns, and a
# probe must not wait for them (docs/protocol.md "GET /readyz").
READINESS_SERVE_STALE_S: Final = 4.0


# Bodies below this are sent as they are: gzip's header and a JSON error or a one-metric page
# would gain a few bytes at most, and cost a compression.
GZIP_MIN_BYTES: Final = 1024
# zlib's default: within 10% of level 9's size on these JSON bodies at a third of its time.
GZIP_LEVEL: Final = 6


class EncodedBody:
    """A response body as sent, its strong ETag (the same bytes give the same tag), and its
    gzip form, compressed at most once (at the first request that accepts it)."""

    __slots__ = ("_gzipped", "body", "etag")

    def __init__(self, body: bytes, etag: str) -> None:
        self.body = body
        self.etag = etag
        self._gzipped: bytes | None = None

    @classmethod
    def of(cls, body: bytes) -> EncodedBody:
        return cls(body, f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"')

    @property
    def compressible(self) -> bool:
        return len(self.body) >= GZIP_MIN_BYTES

    def gzipped(self) -> bytes:
        """The body gzip-compressed; computed at the first call, then held with the body.

        `mtime=0`: the same body gives the same bytes on every gateway (and so the same tag).
        """
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.body, GZIP_LEVEL, mtime=0)
        return self._gzipped

    @property
    def gzip_etag(self) -> str:
        """The gzip form's own strong tag (a representation of its own, RFC 9110 8.8.3)."""
        return f'{self.etag[:-1]}-gzip"'


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header accepts gzip (`gzip` or `*`, with a q above 0)."""
    if not accept_encoding:
        return False
    for coding in accept_encoding.split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        quality = params.strip().lower()
        if not quality.startswith("q="):
            return True
        try:
            return float(quality[2:]) > 0
        except ValueError:
            return False
    return False


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (RFC 9110: weak comparison, or `*`)."""
    if if_none_match is None:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class SharedRefresh(Generic[T]):
    """The newest value of something costly to read, handed out while at most `max_age_s` old.

    A caller that finds the value older (or none) starts one load; callers meanwhile wait for
    that same load (single flight) and all get its value or its exception, so N concurrent
    requests cost one read. A waiter that is cancelled does not cancel the load: the others
    still wait for it. Age is counted from when a load started, so it bounds how old the
    data is, not how long ago it arrived.

    With `serve_stale_s`, a value older than `max_age_s` by at most that much is still handed
    out at once, and a load is started in the background (stale while revalidate): callers
    never wait while a value that recent is held.
    """

    def __init__(
        self,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        serve_stale_s: float = 0.0,
    ) -> None:
        self.max_age_s = max_age_s
        self.serve_stale_s = serve_stale_s
        self._clock = clock
        self._held: tuple[T, float] | None = None  # (value, read at)
        self._loading: asyncio.Task[T] | None = None

    def store(self, value: T, at: float | None = None) -> None:
        """Hold `value`, read at `at` (the clock's time, default now), unless newer is held."""
        at = self._clock() if at is None else at
        if self._held is None or at >= self._held[1]:
            self._held = (value, at)

    async def get(self, load: Callable[[], Awaitable[T]]) -> T:
        """The held value if young enough, else the result of the one load in flight.

        Raises what `load` raised (to every caller waiting for that load; the next call
        loads again). Safe to cancel.
        """
        held = self._held
        age = float("inf") if held is None else self._clock() - held[1]
        if held is not None and age <= self.max_age_s:
            return held[0]
        if self._loading is None:
            self._loading = asyncio.create_task(self._load(load), name="shared refresh")
            # Retrieved here so that a load whose waiters were all cancelled logs nothing.
            self._loading.add_done_callback(_retrieve)
        if held is not None and age <= self.max_age_s + self.serve_stale_s:
            return held[0]
        return await asyncio.shield(self._loading)

    async def _load(self, load: Callable[[], Awaitable[T]]) -> T:
        started = self._clock()
        try:
            value = await load()
        finally:
            if self._loading is asyncio.current_task():  # not one started after aclose()
                self._loading = None
        self.store(value, started)
        return value

    async def aclose(self) -> None:
        """Cancel a load in flight and wait for it to end. Idempotent."""
        loading, self._loading = self._loading, None
        if loading is not None:
            loading.cancel()
            with contextlib.suppress(BaseException):
                await loading


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()
