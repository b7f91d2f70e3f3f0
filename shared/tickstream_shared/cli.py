"""The `tickstream` command: run the whole system locally, or one service against given infra."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tickstream_shared.errors import ConfigError
from tickstream_shared.lifecycle import run_service
from tickstream_shared.settings import WHOLE_MARKET, WHOLE_MARKET_MAX, ServiceSettings

SERVICES = ("watcher", "stats", "alerts", "gateway")

COMMANDS: dict[str, str] = {
    "up": "start broker, Redis and PostgreSQL locally, then all four services, restarting any"
    " that exits; Ctrl-C stops all",
    "init": "create Kafka topics and the database schema, then exit",
    "watcher": "stream ticks from a source into per-pair Kafka topics",
    "stats": "keep rolling 24h stats and ranks in Redis; store ticks in PostgreSQL",
    "alerts": "raise an alert for a value above factor x its trailing mean",
    "gateway": "serve the HTTP API, the WebSocket stream and the dashboard",
    "tail": "print a topic's records as JSON lines (a market's ticks, alerts, deadletter),"
    " new ones by default; Ctrl-C stops",
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
        if name == "tail":
            _tail_arguments(command)
    return parser


def _tail_arguments(command: argparse.ArgumentParser) -> None:
    command.epilog = (
        "examples: tickstream tail ticks binance:btc-usdt | tickstream tail alerts -n 5"
        " --from-beginning | tickstream tail deadletter --from-beginning"
    )
    command.add_argument(
        "target",
        metavar="TOPIC",
        help="`ticks` followed by a market (binance:btc-usdt), `alerts`, `deadletter`, or a"
        " tick topic's name (ticks.binance.btc-usdt)",
    )
    command.add_argument("market", metavar="MARKET", nargs="?", help="the market of `ticks`")
    command.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest record the broker keeps (default: print only new records)",
    )
    command.add_argument(
        "-n",
        "--count",
        type=_positive,
        default=None,
        help="exit after printing this many records (default: until Ctrl-C)",
    )
    command.add_argument(
        "-b",
        "--bootstrap-servers",
        default=None,
        help="broker address (default: KAFKA_BOOTSTRAP_SERVERS, else 127.0.0.1:9092)",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


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
    if args.command == "tail":
        return _tail(args)
    if args.command == "init":
        from tickstream_shared.bootstrap import init

        return run_service("init", lambda settings, _stop: init(settings))
    service = importlib.import_module(f"tickstream_{args.command}.service")
    return run_service(args.command, service.run)


def _tail(args: argparse.Namespace) -> int:
    from tickstream_shared.errors import BadIdentifier
    from tickstream_shared.tail import TailRequest, resolve_topic, run_tail

    try:
        topic = resolve_topic(args.target, args.market)
        settings = ServiceSettings.from_env(os.environ)
    except (BadIdentifier, ConfigError) as exc:
        print(f"tickstream tail: {exc}", file=sys.stderr)
        return 2
    kafka = settings.kafka
    if args.bootstrap_servers is not None:
        kafka = dataclasses.replace(kafka, bootstrap_servers=args.bootstrap_servers)
    request = TailRequest(topic, from_beginning=args.from_beginning, count=args.count)
    return run_tail(request, kafka, settings.log)


if __name__ == "__main__":
    sys.exit(main())
