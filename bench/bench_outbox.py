"""CPU per frame of a client's outbox (queue and take), one process, no sockets.

For a loaded machine where bench_fanout.py cannot run cleanly: it measures only the code a
frame goes through between the hub and a client's writer, and reports the best of
`--repeat` runs (the least disturbed by other processes). `--compare FILE` runs another
outbox.py the same way, alternating with this one (e.g. the one before a change:
`git show <commit>:services/gateway/tickstream_gateway/outbox.py > /tmp/outbox_before.py`).
`--clients` outboxes, one market's forming bar:

- keeping up: each update is queued in every outbox and every writer takes it at once;
- behind: `--burst` updates are queued before each writer takes what it is given.

    .venv/bin/python bench/bench_outbox.py [--compare /tmp/outbox_before.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from types import ModuleType
from typing import Any

from tickstream_gateway import outbox as current
from tickstream_gateway.protocol import Frame, bar_frame
from tickstream_shared.schemas import Tick

MINUTE = 1_680_000_000_000


def update(seq: int) -> Frame:
    """An update of one market's forming bar."""
    return bar_frame(
        Tick(
            market="binance:btc-usdt",
            minute=MINUTE,
            seq=seq,
            exchange_ts=MINUTE + 1000,
            received_ts=MINUTE + 1500,
            open=1.0,
            high=2.0,
            low=1.0,
            close=1.5,
            volume=float(seq),
            closed=False,
        )
    )


def outboxes(module: ModuleType, clients: int, max_age: float) -> tuple[list[Any], bool]:
    """`clients` outboxes of `module`, and whether its `put` takes the caller's clock."""
    params = inspect.signature(module.Outbox).parameters
    age = {"max_age": max_age} if "max_age" in params else {"conflate_after": max_age}
    boxes = [module.Outbox(4 * 1024 * 1024, **age) for _ in range(clients)]
    return boxes, "now" in inspect.signature(module.Outbox.put).parameters


def keeping_up(module: ModuleType, clients: int, frames: list[Frame]) -> float:
    boxes, with_now = outboxes(module, clients, 0.05)
    start = time.perf_counter()
    for frame in frames:
        now = time.monotonic()
        for box in boxes:
            box.put(frame, now) if with_now else box.put(frame)
            box.get_nowait()
    return (time.perf_counter() - start) / (len(frames) * clients) * 1e9


def behind(module: ModuleType, clients: int, frames: list[Frame], burst: int) -> float:
    boxes, with_now = outboxes(module, clients, 0.0)
    start = time.perf_counter()
    for first in range(0, len(frames), burst):
        now = time.monotonic()
        for frame in frames[first : first + burst]:
            for box in boxes:
                box.put(frame, now) if with_now else box.put(frame)
        for box in boxes:
            while len(box):
                box.get_nowait()
    return (time.perf_counter() - start) / (len(frames) * clients) * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--compare", help="another outbox.py, run alternately with this one")
    args = parser.parse_args()
    modules = {"this": current}
    if args.compare:
        spec = importlib.util.spec_from_file_location("outbox_compared", args.compare)
        assert spec is not None and spec.loader is not None
        modules["compared"] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["compared"])
    frames = [update(seq) for seq in range(1, args.updates + 1)]
    cases = {
        "keeping up": lambda m: keeping_up(m, args.clients, frames),
        f"behind, {args.burst} per take": lambda m: behind(m, args.clients, frames, args.burst),
    }
    for case, run in cases.items():
        best = {name: float("inf") for name in modules}
        for _ in range(args.repeat):
            for name, module in modules.items():
                best[name] = min(best[name], run(module))
        shown = ", ".join(f"{name} {ns:.0f} ns" for name, ns in best.items())
        print(f"{case}: per frame and client (best of {args.repeat}): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
