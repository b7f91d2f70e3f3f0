"""A bad setting stops a service, or `tickstream up`, before anything starts: one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import deadline, make_data_dir

# (environment, the one line expected after "bad configuration: ").
CASES = [
    (
        {"WATCHER_MARKETS": "binance:btcusdt"},
        "WATCHER_MARKETS: 'binance:btcusdt' is not `<exchange>:<base>-<quote>` such as"
        " binance:btc-usdt",
    ),
    (
        {"WATCHER_MARKETS": "binance:*-usdt"},
        "WATCHER_MARKETS: 'binance:*-usdt': patterns are for the live source; the synthetic"
        " source needs exact markets such as binance:btc-usdt",
    ),
    (
        {"WATCHER_SOURCE": "live", "WATCHER_MARKETS": "binance:btc-usdt,bitfoo:*-usd"},
        "WATCHER_MARKETS: 'bitfoo:*-usd': unknown exchange 'bitfoo'; the live source knows"
        " binance, coinbase, kraken, okx",
    ),
    (
        {"WATCHER_MARKETS": ""},
        "WATCHER_MARKETS: empty; list markets, comma separated, as"
        " `<exchange>:<base>-<quote>` such as binance:btc-usdt",
    ),
    (
        {"WATCHER_SOURCE": "replay", "WATCHER_REPLAY_DIR": "{tmp}/missing"},
        "WATCHER_REPLAY_DIR: '{tmp}/missing' does not exist (cwd {tmp})",
    ),
    (
        {"WATCHER_SOURCE": "replay", "WATCHER_REPLAY_DIR": "{tmp}/empty"},
        "WATCHER_REPLAY_DIR: '{tmp}/empty' holds no `<exchange>_<base>-<quote>_1m.csv[.gz]`"
        " candle file",
    ),
    (
        {"WATCHER_SOURCE": "replay", "WATCHER_REPLAY_DIR": "{tmp}/file.txt"},
        "WATCHER_REPLAY_DIR: '{tmp}/file.txt' is not a folder",
    ),
    (
        {
            "WATCHER_SOURCE": "replay",
            "WATCHER_REPLAY_DIR": "{tmp}/candles",
            "WATCHER_REPLAY_MARKETS": "kraken:eth-usd",
        },
        "WATCHER_REPLAY_MARKETS: 'kraken:eth-usd' has no candle file in '{tmp}/candles'",
    ),
    (
        {"WATCHER_REPLAY_MARKETS": "binance_btc-usdt"},
        "WATCHER_REPLAY_MARKETS: 'binance_btc-usdt' is not a market id"
        " `<exchange>:<base>-<quote>` such as binance:btc-usdt",
    ),
    (
        {"KAFKA_BOOTSTRAP_SERVERS": "localhost"},
        "KAFKA_BOOTSTRAP_SERVERS: 'localhost' is not host:port",
    ),
    (
        {"REDIS_URL": "redis//127.0.0.1:6379"},
        "REDIS_URL: 'redis//127.0.0.1:6379' is not a redis:// or rediss:// or unix:// URL",
    ),
    ({"REDIS_URL": "redis://:6379/0"}, "REDIS_URL: 'redis://:6379/0' names no host"),
    (
        {"DATABASE_URL": "postgresql://127.0.0.1:54x2/tickstream"},
        "DATABASE_URL: 'postgresql://127.0.0.1:54x2/tickstream' has no valid port",
    ),
    ({"OKX_REST_URL": "https://"}, "OKX_REST_URL: 'https://' names no host"),
    (
        {"BINANCE_WS_URL": "https://stream.binance.com"},
        "BINANCE_WS_URL: 'https://stream.binance.com' is not a ws:// or wss:// URL",
    ),
]


@pytest.fixture
def workdir() -> Path:
    tmp = make_data_dir("tickstream-config-")
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("")
    (tmp / "candles").mkdir()
    (tmp / "candles" / "binance_btc-usdt_1m.csv").write_text("ts_ms,open,high,low,close,volume\n")
    return tmp


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *argv],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        timeout=deadline(30),
        check=False,
    )


def _filled(env: dict[str, str], line: str, tmp: Path) -> tuple[dict[str, str], str]:
    return {k: v.format(tmp=tmp) for k, v in env.items()}, line.format(tmp=tmp)


@pytest.mark.parametrize(("env", "line"), CASES, ids=[",".join(c[0]) for c in CASES])
def test_a_bad_setting_stops_the_watcher_with_one_line(
    env: dict[str, str], line: str, workdir: Path
) -> None:
    """`python -m tickstream_watcher` with the setting exits 2 with one line naming it."""
    env, line = _filled(env, line, workdir)
    result = _run(["-m", "tickstream_watcher"], env, workdir)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == f"tickstream watcher: bad configuration: {line}\n"


@pytest.mark.parametrize("service", ["stats", "alerts", "gateway"])
def test_a_bad_url_stops_every_service_with_one_line(service: str, workdir: Path) -> None:
    """Each service alone refuses a hostless database URL: one line, exit 2."""
    result = _run(["-m", f"tickstream_{service}"], {"DATABASE_URL": "postgresql://"}, workdir)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == (
        f"tickstream {service}: bad configuration: DATABASE_URL: 'postgresql://' names no host\n"
    )


@pytest.mark.parametrize(
    ("env", "line"), [CASES[0], CASES[4], CASES[10]], ids=["markets", "replay_dir", "redis_url"]
)
def test_up_refuses_a_bad_setting_before_starting_anything(
    env: dict[str, str], line: str, workdir: Path
) -> None:
    """`tickstream up` exits 2 with one line and starts no server (its data folder stays empty)."""
    env, line = _filled(env, line, workdir)
    data_dir = workdir / "up-data"
    argv = ["-m", "tickstream_shared.cli", "up", "--data-dir", str(data_dir)]
    result = _run(argv, env, workdir)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == f"tickstream up: bad configuration: {line}\n"
    assert not data_dir.exists()
