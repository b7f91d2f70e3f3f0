"""Service entry plumbing: logging, settings, SIGTERM/SIGINT to a stop event, metrics and probes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from tickstream_shared import observability
from tickstream_shared.errors import ConfigError
from tickstream_shared.probes import serve_probes
from tickstream_shared.settings import ServiceSettings


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiokafka logs every coordinator hiccup at INFO/WARNING; keep our own lines readable.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


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
    setup_logging(settings.log.level, name)

    async def _main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        observability.describe_service(name)
        async with serve_probes(name, settings):
            await body(settings, stop)

    asyncio.run(_main())
    logging.getLogger(name).info("stopped cleanly")
    return 0
