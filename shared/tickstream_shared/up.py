"""`tickstream up`: local infrastructure plus the four services as supervised child processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
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
from tickstream_shared.errors import ConfigError, InfraError
from tickstream_shared.lifecycle import RestartBackoff
from tickstream_shared.local_infra import LocalInfra, die_with_parent, stop_process, wait_until
from tickstream_shared.logs import setup_logging
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.up")

# Consumers start before the producer, so the first ticks find their readers; on shutdown the
# producer stops first, then the consumers commit what they hold, then the gateway goes.
START_ORDER = ("stats", "alerts", "gateway", "watcher")
STOP_ORDER = ("watcher", "stats", "alerts", "gateway")
STOP_TIMEOUT_S = 20.0
GATEWAY_READY_TIMEOUT_S = 60.0
# How soon an exit is noticed and a due restart made, and how soon Ctrl-C takes effect.
SUPERVISE_INTERVAL_S = 0.2


RESTART_BACKOFF = RestartBackoff()


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


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} (killed by {signal.Signals(-code).name})"
    return f"code {code}"


@dataclass
class _Service:
    """One service process and its restart state; `supervise` is called every interval."""

    name: str
    env: Mapping[str, str]
    process: subprocess.Popen[bytes]
    started_at: float
    restarts: int = 0
    delay_s: float | None = None
    restart_at: float | None = None

    @classmethod
    def start(cls, name: str, env: Mapping[str, str]) -> _Service:
        service = cls(name, env, spawn_service(name, env), time.monotonic())
        log.info("started %s pid=%d", name, service.process.pid)
        return service

    def supervise(self, now: float, backoff: RestartBackoff) -> None:
        """Make a restart that is due, or schedule one if the process has exited."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.restart_at = None
                self.process = spawn_service(self.name, self.env)
                self.started_at = now
                log.info(
                    "started %s pid=%d (restart #%d)", self.name, self.process.pid, self.restarts
                )
            return
        code = self.process.poll()
        if code is None:
            return
        ran_for_s = now - self.started_at
        self.delay_s = backoff.next_delay(self.delay_s, ran_for_s)
        self.restart_at = now + self.delay_s
        log.error(
            "%s exited with %s after %.0fs; restart #%d in %.0fs",
            self.name,
            _describe_exit(code),
            ran_for_s,
            self.restarts + 1,
            self.delay_s,
        )

    def stop(self) -> int:
        """Stop for good (no restart follows) and return the exit code. Safe to call twice."""
        self.restart_at = None
        return stop_process(self.name, self.process, signal.SIGTERM, STOP_TIMEOUT_S)


def _gateway_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _port_problem(host: str, port: int) -> str | None:
    """Why the gateway could not listen on `host`:`port` now, or None if it could.

    Binds as uvicorn will (every address of `host`, SO_REUSEADDR, so a closed connection in
    TIME_WAIT is no obstacle) and closes again at once.
    """
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve gateway host {host!r}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return (
                    f"gateway port {port} on {address[0]} is not free ({exc.strerror});"
                    " choose another with --port"
                )
    return None


def listening_sockets_held_by(pid: int, port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` that process `pid` holds open.

    uvicorn listens without SO_REUSEPORT, so while our gateway holds such a socket no other
    process can accept connections on that port. Reads Linux /proc only: raises nothing (empty
    if `pid` is gone) and is safe to call at any time.
    """
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "0A" and local_port == port:  # 0A: TCP_LISTEN
                    listening.add(fields[9])
    held: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                held.add(os.readlink(fd))
    return {inode for inode in listening if f"socket:[{inode}]" in held}


def run_up(data_dir: Path, overrides: Mapping[str, str]) -> int:
    """Run and supervise everything until SIGINT/SIGTERM.

    Returns 0 after a requested stop, 1 if the stack did not come up, 2 for a bad setting or a
    gateway port that is not free (then nothing was started).
    """
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    base_env = {**os.environ, **overrides}
    try:
        settings = ServiceSettings.from_env(base_env)
    except ConfigError as exc:
        print(f"tickstream up: bad configuration: {exc}", file=sys.stderr)
        return 2
    problem = _port_problem(settings.gateway.host, settings.gateway.port)
    if problem is not None:
        print(f"tickstream up: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    setup_logging(settings.log, "up")
    infra = LocalInfra(
        data_dir.resolve(),
        broker_storage=settings.local.broker_storage,
        trim_interval_s=settings.local.trim_interval_ms / 1000,
    )
    services: list[_Service] = []
    exit_code = 0
    try:
        log.info(
            "starting broker (log in %s), Redis and PostgreSQL under %s",
            settings.local.broker_storage,
            data_dir,
        )
        infra.start()
        env = {**base_env, **infra.environment()}
        settings = ServiceSettings.from_env(env)
        asyncio.run(init(settings))
        for name in START_ORDER:
            services.append(_Service.start(name, env))
        gateway = next(s for s in services if s.name == "gateway")
        host = settings.gateway.host
        port = settings.gateway.port
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

        def gateway_up() -> bool:
            if stop_requested:
                raise InfraError("stop requested during start")
            for s in services:
                if s.process.poll() is not None:
                    raise InfraError(f"{s.name} exited during start (code {s.process.returncode})")
            # Only an answer given while our gateway holds the listening socket is its own;
            # any other process that answers on the port does not make the stack "up".
            held = listening_sockets_held_by(gateway.process.pid, port)
            return (
                bool(held)
                and _gateway_healthy(url)
                and listening_sockets_held_by(gateway.process.pid, port) == held
            )

        wait_until(gateway_up, timeout=GATEWAY_READY_TIMEOUT_S, what="gateway")
        print(f"\ntickstream is up: dashboard and API at {url}  (Ctrl-C stops)\n", flush=True)
        while not stop_requested:
            now = time.monotonic()
            for service in services:
                service.supervise(now, RESTART_BACKOFF)
            time.sleep(SUPERVISE_INTERVAL_S)
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
