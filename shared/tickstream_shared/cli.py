"""The `tickstream` command: run the whole system locally, or one service against given infra."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tickstream_shared.lifecycle import run_service
from tickstream_shared.settings import WHOLE_MARKET, WHOLE_MARKET_MAX

SERVICES = ("watcher", "stats", "alerts", "gateway")

COMMANDS: dict[str, str] = {
    "up": "start broker, Redis and PostgreSQL locally, then all four services, restarting any"
    " that exits; Ctrl-C stops all",
    "init": "create Kafka topics and the database schema, then exit",
    "watcher": "stream ticks from a source into per-pair Kafka topics",
    "stats": "keep rolling 24h stats and ranks in Redis; store ticks in PostgreSQL",
    "alerts": "raise an alert for a value above factor x its trailing mean",
    "gateway": "serve the HTTP API, the WebSocket stream and the dashboard",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickstream",
        description="Real-time crypto market data. Services read settings from the "
        "environment (see docs/configuration.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == "up":
            command.add_argument(
                "--data-dir",
                type=Path,
                default=None,
                help="where broker, Redis and PostgreSQL keep their files (default"
                " .tickstream/<source>, so data of different sources never mix)",
            )
            command.add_argument(
                "--source",
                choices=("synthetic", "replay", "live"),
                default=None,
                help="watcher source (default: WATCHER_SOURCE or synthetic)",
            )
            command.add_argument(
                "--replay-dir", default=None, help="candle folder for --source replay"
            )
            command.add_argument(
                "--replay-speed",
                type=float,
                default=None,
                help="event time per wall time for replay (0 = as fast as possible)",
            )
            command.add_argument(
                "--port", type=int, default=None, help="gateway port (default 8000)"
            )
    return parser


def live_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The whole market for `up --source live`: settings the environment leaves unset."""
    defaults = {
        "WATCHER_MARKETS": ",".join(WHOLE_MARKET),
        "WATCHER_MAX_MARKETS": str(WHOLE_MARKET_MAX),
    }
    return {name: value for name, value in defaults.items() if name not in environ}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        from tickstream_shared.up import run_up

        overrides = {
            "WATCHER_SOURCE": args.source,
            "WATCHER_REPLAY_DIR": args.replay_dir,
            "WATCHER_REPLAY_SPEED": None if args.replay_speed is None else str(args.replay_speed),
            "GATEWAY_PORT": None if args.port is None else str(args.port),
        }
        # One data directory per source: replayed 2023 candles next to today's synthetic bars
        # would share one event-time clock and one retention horizon, and hide each other.
        source = args.source or os.environ.get("WATCHER_SOURCE") or "synthetic"
        if source == "live":
            overrides |= live_defaults(os.environ)
        data_dir = args.data_dir or Path(".tickstream") / source
        return run_up(data_dir, {k: v for k, v in overrides.items() if v is not None})
    if args.command == "init":
        from tickstream_shared.bootstrap import init

        return run_service("init", lambda settings, _stop: init(settings))
    service = importlib.import_module(f"tickstream_{args.command}.service")
    return run_service(args.command, service.run)


if __name__ == "__main__":
    sys.exit(main())
