"""`tickstream up`: everything from one command, supervised, and Ctrl-C stops all cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import deadline, make_data_dir
from tickstream_shared.lifecycle import RestartBackoff
from tickstream_shared.local_infra import free_port
from tickstream_shared.settings import WatcherSettings
from tickstream_shared.up import listening_sockets_held_by


def _ranks(port: int) -> dict[str, object] | None:
    try:
        url = f"http://127.0.0.1:{port}/api/ranks?kind=price"
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, object] = json.loads(response.read())
            return body
    except OSError:
        return None


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _started_pids(log_text: str, service: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started {service} pid=(\d+)", log_text)]


def _serves_all_ranks(port: int, markets: int) -> bool:
    ranks = _ranks(port)
    return ranks is not None and ranks["total"] == markets


def test_up_serves_ranks_restarts_a_killed_service_and_stops_on_ctrl_c() -> None:
    """`up` serves ranks, restarts stats after kill -9 and keeps serving, exits 0 on SIGINT."""
    data_dir = make_data_dir("tickstream-up-")
    up_log = data_dir / "up-test.log"
    port = free_port()
    env = {**os.environ, "WATCHER_TICK_INTERVAL_MS": "200", "LOG_LEVEL": "INFO"}
    argv = ["up", "--data-dir", str(data_dir), "--source", "synthetic", "--port", str(port)]
    with up_log.open("wb") as log_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "tickstream_shared.cli", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    markets = len(WatcherSettings().markets)  # the default WATCHER_MARKETS
    try:
        end = time.monotonic() + deadline(60)
        ranks = None
        while time.monotonic() < end and up.poll() is None:
            ranks = _ranks(port)
            if ranks and ranks["total"] == markets:
                break
            time.sleep(0.5)
        assert ranks is not None and ranks["total"] == markets, ranks
        labels = [entry["label"] for entry in ranks["ranks"]]  # type: ignore[attr-defined]
        assert labels == [f"{i}/{markets}" for i in range(1, markets + 1)]
        assert _processes_mentioning(str(data_dir)), "infrastructure should be running"

        [stats_pid] = _started_pids(up_log.read_text(), "stats")
        os.kill(stats_pid, signal.SIGKILL)
        end = time.monotonic() + deadline(45)
        restarted = ""
        while time.monotonic() < end and up.poll() is None:
            text = up_log.read_text()
            found = re.search(r"started stats pid=(\d+) \(restart #1\)\n", text)
            # The new stats owns the tick partitions once it has warmed their markets.
            if found and " tickstream.stats: warmed " in text[found.end() :]:
                restarted = text
                break
            time.sleep(0.5)
        assert restarted, up_log.read_text()[-3000:]
        assert re.search(
            r"stats exited with code -9 \(killed by SIGKILL\) after \d+s; restart #1 in 1s\n",
            restarted,
        )
        new_pid = _started_pids(restarted, "stats")[-1]
        assert new_pid != stats_pid
        assert Path(f"/proc/{new_pid}").exists()
        assert up.poll() is None, "up must keep running after a service exits"
        end = time.monotonic() + deadline(15)
        while time.monotonic() < end and not (_healthy(port) and _serves_all_ranks(port, markets)):
            time.sleep(0.5)
        assert _healthy(port)
        assert _serves_all_ranks(port, markets)

        up.send_signal(signal.SIGINT)
        assert up.wait(deadline(60)) == 0
        assert _processes_mentioning(str(data_dir)) == []
        assert _processes_mentioning(f"--port {port}") == []
        assert not Path(f"/proc/{new_pid}").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_up_refuses_a_busy_gateway_port_before_starting_anything() -> None:
    """`up --port P` with P taken exits 2 at once with one line naming P, and starts nothing."""
    data_dir = make_data_dir("tickstream-up-busy-")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        argv = ["up", "--data-dir", str(data_dir), "--source", "synthetic", "--port", str(port)]
        try:
            result = subprocess.run(
                [sys.executable, "-m", "tickstream_shared.cli", *argv],
                capture_output=True,
                timeout=deadline(15),
                check=False,
            )
            assert result.returncode == 2
            assert result.stdout == b""
            assert result.stderr.decode() == (
                f"tickstream up: gateway port {port} on 127.0.0.1 is not free"
                " (Address already in use); choose another with --port\n"
            )
            assert list(data_dir.iterdir()) == [], "no server may have been started"
            assert _processes_mentioning(str(data_dir)) == []
        finally:
            subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_listening_sockets_held_by_names_only_the_holder() -> None:
    """A listening socket counts for the process holding it, not for another live process."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert listening_sockets_held_by(os.getpid(), port) == set()  # bound, not listening
        listener.listen()
        inode = str(os.fstat(listener.fileno()).st_ino)
        assert listening_sockets_held_by(os.getpid(), port) == {inode}
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert listening_sockets_held_by(other.pid, port) == set()
        finally:
            other.kill()
            other.wait()
    assert listening_sockets_held_by(os.getpid(), port) == set()


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_long_run() -> None:
    """Restart delays go 1, 2, 4 ... 30 s while runs are short, and back to 1 s after 60 s."""
    backoff = RestartBackoff(first_s=1.0, max_s=30.0, reset_after_s=60.0)
    delays: list[float] = []
    previous: float | None = None
    for _ in range(7):
        previous = backoff.next_delay(previous, ran_for_s=5.0)
        delays.append(previous)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next_delay(30.0, ran_for_s=59.9) == 30.0
    assert backoff.next_delay(30.0, ran_for_s=60.0) == 1.0
