"""`tickstream up`: local infrastructure plus the four services as child processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tickstream_shared.bootstrap import init
from tickstream_shared.errors import InfraError
from tickstream_shared.lifecycle import setup_logging
from tickstream_shared.local_infra import LocalInfra, die_with_parent, stop_process, wait_until
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.up")

# Consumers start before the producer, so the first ticks find their readers; on shutdown the
# producer stops first, then the consumers commit what they hold, then the gateway goes.
START_ORDER = ("stats", "alerts", "gateway", "watcher")
STOP_ORDER = ("watcher", "stats", "alerts", "gateway")
STOP_TIMEOUT_S = 20.0
GATEWAY_READY_TIMEOUT_S = 60.0


@dataclass
class _Service:
    name: str
    process: subprocess.Popen[bytes]

    def stop(self) -> int:
        return stop_process(self.name, self.process, signal.SIGTERM, STOP_TIMEOUT_S)


def spawn_service(name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Run one service as `python -m tickstream_<name>`, dying with this process."""
    return subprocess.Popen(
        [sys.executable, "-m", f"tickstream_{name}"],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
        # Own process group: Ctrl-C reaches only `up`, which stops services in order.
        start_new_session=True,
    )


def _gateway_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run_up(data_dir: Path, overrides: Mapping[str, str]) -> int:
    """Run everything until SIGINT/SIGTERM; returns 0 after a clean stop, 1 if a service died."""
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    base_env = {**os.environ, **overrides}
    settings = ServiceSettings.from_env(base_env)
    setup_logging(settings.log.level, "up")
    infra = LocalInfra(data_dir.resolve())
    services: list[_Service] = []
    exit_code = 0
    try:
        log.info("starting broker, Redis and PostgreSQL under %s", data_dir)
        infra.start()
        env = {**base_env, **infra.environment()}
        settings = ServiceSettings.from_env(env)
        asyncio.run(init(settings))
        for name in START_ORDER:
            services.append(_Service(name, spawn_service(name, env)))
        host = settings.gateway.host
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{settings.gateway.port}"

        def gateway_up() -> bool:
            if stop_requested:
                raise InfraError("stop requested during start")
            for s in services:
                if s.process.poll() is not None:
                    raise InfraError(f"{s.name} exited during start (code {s.process.returncode})")
            return _gateway_healthy(url)

        wait_until(gateway_up, timeout=GATEWAY_READY_TIMEOUT_S, what="gateway")
        print(f"\ntickstream is up: dashboard and API at {url}  (Ctrl-C stops)\n", flush=True)
        while not stop_requested:
            dead = [s for s in services if s.process.poll() is not None]
            if dead:
                for s in dead:
                    log.error("%s exited with code %s; stopping", s.name, s.process.returncode)
                exit_code = 1
                break
            time.sleep(0.2)
    except InfraError as exc:
        log.error("%s", exc)
        exit_code = 0 if stop_requested else 1
    finally:
        by_name = {s.name: s for s in services}
        for name in STOP_ORDER:
            if name in by_name:
                code = by_name[name].stop()
                if code != 0 and not stop_requested:
                    exit_code = 1
        with contextlib.suppress(InfraError):
            infra.stop()
        log.info("stopped")
    return exit_code
