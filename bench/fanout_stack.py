"""The stack bench_fanout measures (LocalInfra, the gateway process, the baseline server), what
each process spent (CPU seconds, RSS), a one-shot HTTP GET and histogram quantiles."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil  # type: ignore[import-untyped]

from tickstream_shared.local_infra import LocalInfra, die_with_parent, free_port, stop_process

MIB = 1024 * 1024
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Server:
    """A WebSocket server under test, running as its own process."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    ws_path: str
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.ws_path}"

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def cpu(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def alive(self) -> bool:
        return self.process.poll() is None

    async def healthy(self, within: float) -> bool:
        """Wait until GET /healthz answers 200."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            status, _ = await http_get("127.0.0.1", self.port, "/healthz", within=5)
            if status == 200:
                return True
            await asyncio.sleep(0.2)
        return False


@dataclass
class Stack:
    """LocalInfra plus the servers started on it; stopping stops servers, then the infra."""

    gateway_env: dict[str, str] = field(default_factory=dict)
    data_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="tickstream-fanout-"))
    )
    infra: LocalInfra | None = None
    servers: list[Server] = field(default_factory=list)

    def __enter__(self) -> Stack:
        self.data_dir.chmod(0o755)
        self.infra = LocalInfra(self.data_dir / "infra")
        try:
            self.infra.start()
            subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", "init"], env=self.env(), check=True
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in self.servers:
            stop_process(server.name, server.process, signal.SIGTERM, 30)
        if self.infra is not None:
            self.infra.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def fresh_broker(self) -> None:
        """Restart the broker empty on the same port. Tansu's memory storage costs more CPU per
        fetch the longer its logs grow (one consumer of 1,000 ticks/s: about 0.3 of a core after
        10 s, a whole core after 60 s), so every measured run starts from an empty broker."""
        assert self.infra is not None
        self.infra.stop_server("broker")
        self.infra.start_server("broker")

    def stop(self, server: Server) -> None:
        """SIGTERM, 30 s, then SIGKILL; a server that did not exit cleanly shows its log."""
        code = stop_process(server.name, server.process, signal.SIGTERM, 30)
        self.servers.remove(server)
        if code != 0:
            tail = server.log.read_text(errors="replace").splitlines()[-15:]
            print(f"{server.name} exited with {code}; its log ends:", *tail, sep="\n  ")

    def env(self) -> dict[str, str]:
        assert self.infra is not None
        return {**os.environ, **self.infra.environment(), "LOG_LEVEL": "WARNING"}

    def start_gateway(self) -> Server:
        """`python -m tickstream_gateway` with settings from the environment (a free port)."""
        port = free_port()
        env = {**self.env(), "GATEWAY_PORT": str(port), **self.gateway_env}
        return self._spawn(
            "tickstream", [sys.executable, "-m", "tickstream_gateway"], env, port, "/ws"
        )

    def start_baseline(self, max_buffer: int, gc: str = "default") -> Server:
        port = free_port()
        argv = [
            sys.executable,
            str(BENCH_DIR / "fanout_baseline.py"),
            "--port",
            str(port),
            "--max-buffer",
            str(max_buffer),
            "--gc",
            gc,
        ]
        return self._spawn("baseline", argv, self.env(), port, "/")

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], port: int, ws_path: str
    ) -> Server:
        log = self.data_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=out, preexec_fn=die_with_parent
            )
        server = Server(name, process, port, ws_path, log)
        self.servers.append(server)
        return server


async def http_get(host: str, port: int, path: str, within: float = 30.0) -> tuple[int, bytes]:
    """One GET on a new connection (as a probe makes it): (status, body); status 0 on failure."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                return await read_response(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return 0, b""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


class CpuMeter:
    """CPU seconds of every process on the machine between two `take()`s, by role.

    Processes below this one are named by `roles` (pid -> name) or after their executable
    (broker, redis-server, postgres with its backends); kernel threads (softirq work of the
    loopback TCP traffic among them) are `KERNEL`; any other process is `OUTSIDE`: load that
    is not this bench's, which makes the numbers unclean; `IRQ` is busy time charged to no
    process still running.
    """

    KERNEL = "kernel threads"
    OUTSIDE = "OUTSIDE THIS BENCH"
    IRQ = "unattributed (irq, exited processes)"

    def __init__(self, roles: dict[int, str]) -> None:
        self.roles = roles
        self._before: dict[int, float] = {}
        self._busy_before = 0.0

    def take(self) -> dict[str, float]:
        """Seconds used since the previous call (the first call starts counting)."""
        now = self._sample()
        busy = _busy_seconds()
        spent: dict[str, float] = {}
        for pid, (role, seconds) in now.items():
            spent[role] = spent.get(role, 0.0) + seconds - self._before.get(pid, 0.0)
        spent[self.IRQ] = max(0.0, busy - self._busy_before - sum(spent.values()))
        self._before = {pid: seconds for pid, (_, seconds) in now.items()}
        self._busy_before = busy
        return spent

    def _sample(self) -> dict[int, tuple[str, float]]:
        me = psutil.Process()
        ours = {me.pid} | {child.pid for child in me.children(recursive=True)}
        found = {}
        for process in psutil.process_iter(["ppid", "name", "cpu_times"]):
            info = process.info
            if info["cpu_times"] is None:
                continue
            pid = process.pid
            if pid == me.pid:
                role = "bench main (probes)"
            elif pid in ours:
                role = self.roles.get(pid) or _infra_role(info["name"] or "")
            elif pid == 2 or info["ppid"] == 2:
                role = self.KERNEL
            else:
                role = self.OUTSIDE
            found[pid] = (role, info["cpu_times"].user + info["cpu_times"].system)
        return found


def outside_note(spent: dict[str, float], seconds: float) -> str:
    """A warning when processes outside this bench used CPU in the window, else ''."""
    outside = spent.get(CpuMeter.OUTSIDE, 0.0)
    if outside < 0.02 * seconds:
        return ""
    return (
        f"WARNING: other processes used {outside:.1f} CPU s ({outside / seconds:.0%} of a core)"
        " during this window: the machine was not quiet, these numbers are not clean"
    )


async def machine_load(seconds: float = 3.0) -> str:
    """How busy the machine is with nothing of this bench running (a line to print)."""
    meter = CpuMeter({})
    meter.take()
    await asyncio.sleep(seconds)
    spent = meter.take()
    busy = sum(spent.values()) / (seconds * (os.cpu_count() or 1))
    note = outside_note(spent, seconds)
    return f"before the start the machine was {busy:.0%} busy. {note}".strip()


def _busy_seconds() -> float:
    """CPU seconds the whole machine ran something, summed over cores, since boot (time
    stolen by the hypervisor is not ours, and guest time is already in user)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def _infra_role(name: str) -> str:
    if name.startswith("postgres"):
        return "postgres"
    if "redis" in name:
        return "redis"
    if "tansu" in name or "broker" in name:
        return "broker (tansu)"
    return name


def percentile(counts: Counter[int], q: float) -> int | None:
    """The bucket at quantile `q` of a histogram, or None when it is empty."""
    total = sum(counts.values())
    if not total:
        return None
    wanted = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= wanted:
            return bucket
    return max(counts)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def raise_fd_limit() -> None:
    """Every child inherits this: 1,000+ sockets per process need more than 1,024 fds."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
