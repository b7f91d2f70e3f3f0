"""Every service stops within 10 s of SIGTERM whatever is down, and waits out what is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import deadline, make_data_dir
from tickstream_shared.local_infra import LocalInfra, free_port

STOP_WITHIN_S = 10.0


def start_service(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"tickstream_{name}"],
            env={**os.environ, "LOG_LEVEL": "INFO", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_log(process: subprocess.Popen[bytes], log: Path, text: str, within: float) -> str:
    """The log once it holds `text` (the process still running); AssertionError if not."""
    end = time.monotonic() + deadline(within)
    while time.monotonic() < end:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        assert process.poll() is None, f"exited {process.returncode}:\n{content[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {within}s:\n{log.read_text()[-3000:]}")


def stop_within(process: subprocess.Popen[bytes], seconds: float) -> int:
    """SIGTERM, then the exit code; AssertionError (and SIGKILL) if it takes longer."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(deadline(seconds))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running {seconds}s after SIGTERM") from None


@pytest.mark.parametrize(
    ("down", "waiting"),
    [
        ("broker", "publishing stopped by the broker"),
        ("redis", "standing by: cannot reach Redis for the lease"),
    ],
)
def test_the_watcher_stops_within_10s_of_sigterm_with_a_dependency_down(
    infra: LocalInfra, down: str, waiting: str
) -> None:
    """With the broker (or Redis) unreachable the watcher retries, and exits 0 on SIGTERM."""
    data_dir = make_data_dir("tickstream-stop-")
    log = data_dir / "watcher.log"
    env = {
        **infra.environment(),
        "WATCHER_GROUP": f"g{uuid.uuid4().hex[:8]}",
        "WATCHER_MARKETS": f"t{uuid.uuid4().hex[:8]}:btc-usd",
        "WATCHER_SYNTHETIC_BACKFILL_MINUTES": "10",
    }
    if down == "broker":
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    else:
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    watcher = start_service("watcher", env, log)
    try:
        wait_for_log(watcher, log, waiting, within=30)
        time.sleep(1)  # into the retry loop, not only its first attempt
        assert stop_within(watcher, STOP_WITHIN_S) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


@pytest.mark.parametrize("down", ["broker", "redis", "postgres"])
@pytest.mark.parametrize("service", ["stats", "alerts", "gateway"])
def test_every_consumer_stops_within_10s_of_sigterm_with_a_dependency_down(
    infra: LocalInfra, service: str, down: str
) -> None:
    """Stats, alerts and the gateway, waiting on an unreachable dependency, exit 0 on SIGTERM."""
    data_dir = make_data_dir("tickstream-stop-")
    log = data_dir / f"{service}.log"
    unreachable = f"127.0.0.1:{free_port()}"
    env = {**infra.environment(), "GATEWAY_PORT": str(free_port())}
    env |= {
        "broker": {"KAFKA_BOOTSTRAP_SERVERS": unreachable},
        "redis": {"REDIS_URL": f"redis://{unreachable}/0"},
        "postgres": {"DATABASE_URL": f"postgresql://postgres@{unreachable}/tickstream"},
    }[down]
    process = start_service(service, env, log)
    try:
        # The first complaint about the dependency: the service is in its waiting state.
        end = time.monotonic() + deadline(60)
        while time.monotonic() < end and not any(
            level in log.read_text() for level in (" WARNING ", " ERROR ")
        ):
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # into the retry loop, not only its first attempt
        assert process.poll() is None, log.read_text()[-3000:]
        assert stop_within(process, STOP_WITHIN_S) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
