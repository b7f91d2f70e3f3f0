"""What the end-to-end tests share: services as processes, HTTP and WebSocket helpers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.conftest import deadline


class Services:
    """The four services as child processes, with logs kept for failure reports."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        # Tests share one Redis: a watcher group of their own keeps leases and checkpoints apart.
        self.env = {"WATCHER_GROUP": f"t{uuid.uuid4().hex[:12]}", **env}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *, instance: str | None = None, **extra_env: str) -> None:
        """Start service `name` as process `instance` (default: the name; logs by instance)."""
        instance = instance or name
        with (self.log_dir / f"{instance}.log").open("wb") as log:  # the child keeps its fd
            self.processes[instance] = subprocess.Popen(
                [sys.executable, "-m", f"tickstream_{name}"],
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def assert_running(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited early:\n{self.tail(name)}"

    def tail(self, name: str) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-40:])

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name, process in self.processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                codes[name] = process.wait(deadline(30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = -9
        return codes


def http_json(base: str, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{base}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def wait_for(check: Any, *, within: float, what: str, services: Services) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after the deadline."""
    end = time.monotonic() + deadline(within)
    while time.monotonic() < end:
        services.assert_running()
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def frames(ws: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    async for raw in ws:
        yield json.loads(raw)


async def collect(ws: ClientConnection, sink: list[dict[str, Any]]) -> None:
    async for frame in frames(ws):
        sink.append(frame)


def healthy(base: str) -> bool:
    try:
        return http_json(base, "/healthz")[0] == 200
    except OSError:
        return False
