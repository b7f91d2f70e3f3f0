"""Service entry plumbing: settings, SIGTERM/SIGINT to a stop event, metrics and probes,
and the restart policy of supervised work (child processes, background tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tickstream_shared import observability
from tickstream_shared.consuming import is_transient
from tickstream_shared.errors import ConfigError
from tickstream_shared.logs import setup_logging
from tickstream_shared.probes import serve_probes
from tickstream_shared.settings import ServiceSettings


@dataclass(frozen=True)
class RestartBackoff:
    """Delays between restarts of one service: `first_s` doubling up to `max_s`.

    A run that lasted `reset_after_s` counts as healthy, so its exit starts again at `first_s`;
    a service that keeps crashing at start is retried at most every `max_s`.
    """

    first_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def next_delay(self, previous_s: float | None, ran_for_s: float) -> float:
        if previous_s is None or ran_for_s >= self.reset_after_s:
            return self.first_s
        return min(previous_s * 2, self.max_s)


async def supervise(
    name: str,
    work: Callable[[], Awaitable[None]],
    backoff: RestartBackoff | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> None:
    """Run `work()` again each time it ends or fails, after `backoff`'s delay; until cancelled.

    Every failure is logged (and given to `on_failure`); a background task supervised this way
    never stays down because of one bad moment (a broker restart, a bug hit by one record).
    """
    backoff = backoff or RestartBackoff()
    delay: float | None = None
    log = logging.getLogger("tickstream.supervise")
    while True:
        started = time.monotonic()
        try:
            await work()
            problem = "ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            problem = f"failed: {exc!r}"
            if on_failure is not None:
                on_failure(exc)
        delay = backoff.next_delay(delay, time.monotonic() - started)
        log.error("%s %s; restarting in %.0fs", name, problem, delay)
        await asyncio.sleep(delay)


# OSErrors a retry does not outlive: a missing replay folder waits for the operator, not time.
_LOCAL_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


async def run_until_stopped(
    name: str,
    body: Callable[[ServiceSettings, asyncio.Event], Awaitable[None]],
    settings: ServiceSettings,
    stop: asyncio.Event,
    backoff: RestartBackoff | None = None,
) -> None:
    """Run a service's `body` until it returns; if it fails on a transient error (a dependency
    away, say PostgreSQL shutting down while the service starts), run it again after
    `backoff`'s delay, until `stop`. The service waits out the outage by itself instead of
    leaving the process to whatever restarts it. Any other error is raised: a bug ends the
    process loudly, and the uncommitted offsets lose nothing.
    """
    backoff = backoff or RestartBackoff()
    delay: float | None = None
    log = logging.getLogger(name)
    while True:
        started = time.monotonic()
        try:
            await body(settings, stop)
            return
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, _LOCAL_FILE_ERRORS):
                raise
            if stop.is_set():
                # Stopped while waiting for a dependency: a requested stop, not a failure.
                log.info("%s stopped while %r", name, exc)
                return
            delay = backoff.next_delay(delay, time.monotonic() - started)
            log.warning("%s stopped on %r; starting it again in %.1f s", name, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`; a second signal is ignored while shutdown runs."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run_service(
    name: str, body: Callable[[ServiceSettings, asyncio.Event], Awaitable[None]]
) -> int:
    """Read settings once, run `body` until a stop signal, and return the exit code.

    While `body` runs, watcher, stats and alerts serve /metrics, /livez and /readyz on their
    `<SERVICE>_METRICS_PORT` when it is set (the gateway serves them on its own port).
    """
    try:
        settings = ServiceSettings.from_env(os.environ)
    except ConfigError as exc:
        print(f"tickstream {name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log, name)

    async def _main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        observability.describe_service(name)
        async with serve_probes(name, settings):
            await run_until_stopped(name, body, settings, stop)

    asyncio.run(_main())
    logging.getLogger(name).info("stopped cleanly")
    return 0
