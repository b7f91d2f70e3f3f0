"""`tickstream up`: everything from one command, ranks served, Ctrl-C stops all cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import deadline, make_data_dir
from tickstream_shared.local_infra import free_port
from tickstream_shared.settings import WatcherSettings


def _ranks(port: int) -> dict[str, object] | None:
    try:
        url = f"http://127.0.0.1:{port}/api/ranks?kind=price"
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, object] = json.loads(response.read())
            return body
    except OSError:
        return None


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


def test_up_serves_ranks_and_stops_on_ctrl_c() -> None:
    """`tickstream up` serves /api/ranks within 60 s and exits 0 on SIGINT, leaving nothing."""
    data_dir = make_data_dir("tickstream-up-")
    port = free_port()
    env = {**os.environ, "WATCHER_TICK_INTERVAL_MS": "200"}
    argv = ["up", "--data-dir", str(data_dir), "--source", "synthetic", "--port", str(port)]
    up = subprocess.Popen(
        [sys.executable, "-m", "tickstream_shared.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
        up.send_signal(signal.SIGINT)
        assert up.wait(deadline(60)) == 0
        assert _processes_mentioning(str(data_dir)) == []
        assert _processes_mentioning(f"--port {port}") == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
