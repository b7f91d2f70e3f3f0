"""Stats window bench: memory, single-update times, RSS for 1,000 markets x 24h, backfill order."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import msgspec

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_stats.book import MetricBook
from tickstream_stats.window import MinuteWindow

START_MINUTE = 28_333_334 * MINUTE_MS  # 2023-11-14, a whole minute
KIB = 1024
MIB = 1024 * 1024


def one_per_second(market: Market, seconds: int, seed: int, quoted: bool = False) -> Iterator[Tick]:
    """A random-walk market updated every second: 60 updates per minute, the last one closes
    the bar; 1% of minutes also get a late closing update of the previous bar. `quoted`: each
    update says its quote volume too (close x volume), so the book keeps a turnover window."""
    rng = random.Random(seed)
    price = 30_000.0
    volume = 0.0
    seq = 0
    previous: Tick | None = None
    for second in range(seconds):
        minute = START_MINUTE + (second // 60) * MINUTE_MS
        if second % 60 == 0:
            volume = 0.0
            if previous is not None and rng.random() < 0.01:
                seq += 1
                ts = minute + 1_000
                late = Tick(market.id, previous.minute, seq, ts, ts, *_ohlc(previous.close), 0.1)
                yield _quoted(late) if quoted else late
        price *= 1 + rng.gauss(0, 1e-4)
        volume += rng.expovariate(10.0)
        seq += 1
        ts = minute + (second % 60) * 1000
        tick = Tick(market.id, minute, seq, ts, ts, *_ohlc(price), volume, closed=second % 60 == 59)
        previous = tick
        yield _quoted(tick) if quoted else tick


def _quoted(tick: Tick) -> Tick:
    return msgspec.structs.replace(tick, quote_volume=tick.close * tick.volume)


def _ohlc(price: float) -> tuple[float, float, float, float]:
    return price, price, price, price


def memory(seed: int, quoted: bool) -> None:
    """(a) traced memory of one market's state after 24h and 48h of updates at 1/s."""
    market = Market("bench", "btc", "usdt")
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    book = MetricBook(window_minutes=1440)
    day = 86_400
    metrics = 3 if quoted else 2
    kinds = "price + volume + turnover" if quoted else "price + volume"
    print(f"(a) one market ({kinds} metrics), window 1440 minutes, 1 update/s")
    for n, tick in enumerate(one_per_second(market, 2 * day, seed, quoted), start=1):
        book.advance_clock(tick.minute)
        book.apply([tick])
        if n % day == 0:
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - baseline
            print(
                f"    after {n // 3600}h ({n:,} updates): {held / KIB:5.1f} KiB per market,"
                f" {held / metrics / KIB:5.1f} KiB per metric (bound: 40 KiB per metric)"
            )
    tracemalloc.stop()


def update_times(hours: int, seed: int, quoted: bool, repeats: int = 3) -> None:
    """(b) wall and CPU time of each single update over `hours` at 1/s, `repeats` times.

    The same updates are replayed into a fresh book each time. A cost of the algorithm shows
    in every repetition at the same update; the machine's (preemption, the hypervisor, cache)
    lands on different updates each time. So besides the raw worst, the bench reports the
    worst over updates of each update's fastest repetition.
    """
    market = Market("bench", "btc", "usdt")
    ticks = list(one_per_second(market, hours * 3600, seed, quoted))
    wall_runs: list[list[int]] = []
    cpu_runs: list[list[int]] = []
    wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(repeats):
        book = MetricBook(window_minutes=1440)
        wall: list[int] = []
        cpu: list[int] = []
        for tick in ticks:
            start_wall, start_cpu = wall_clock(), cpu_clock()
            # What the service does per batch: raise the book to the shared clock, then apply
            # (which computes the market's stats).
            book.advance_clock(tick.minute)
            book.apply([tick])
            cpu.append(cpu_clock() - start_cpu)
            wall.append(wall_clock() - start_wall)
        wall_runs.append(wall)
        cpu_runs.append(cpu)
    print(
        f"(b) single update (advance_clock + apply of one tick + stats), {len(ticks):,} updates"
        f" over {hours}h at 1/s, {repeats} identical runs (the window is full after 24h; minute"
        " rolls and late bars included)"
    )
    for name, runs in (("CPU time ", cpu_runs), ("wall time", wall_runs)):
        ordered = sorted(t for run in runs for t in run)
        p50, p99, p999 = (ordered[int(len(ordered) * q)] for q in (0.5, 0.99, 0.999))
        fastest = [min(times) for times in zip(*runs, strict=True)]
        slowest = max(range(len(fastest)), key=fastest.__getitem__)
        print(
            f"    {name}: median {p50 / 1000:.1f} us, p99 {p99 / 1000:.1f} us,"
            f" p99.9 {p999 / 1000:.1f} us, worst {ordered[-1] / 1000:.1f} us;"
            f" worst of each update's fastest run {fastest[slowest] / 1000:.1f} us"
            f" (update {slowest:,})"
        )
    print("    (target: worst < 1000 us; wall time includes preemption by other processes)")


def worst_cases() -> None:
    """(d) the costliest single operations the window allows, on a full day window."""

    def full() -> MinuteWindow:
        window = MinuteWindow(1440)
        for i in range(1440):
            window.set(START_MINUTE + i * MINUTE_MS, 100.0 + i % 7, 1.0)
        return window

    window = full()
    start = time.thread_time_ns()
    window.advance(START_MINUTE + 2878 * MINUTE_MS)  # evicts 1439 minutes one by one
    jump = time.thread_time_ns() - start
    window = MinuteWindow(1440)
    window.set(START_MINUTE, 100.0, 1.0)
    window.set(START_MINUTE + 1439 * MINUTE_MS, 101.0, 1.0)
    start = time.thread_time_ns()
    window.set(START_MINUTE + 1438 * MINUTE_MS, 102.0, 1.0)  # scans a 1437-minute gap
    late = time.thread_time_ns() - start
    window = full()
    start = time.thread_time_ns()
    window.stats()
    stats = time.thread_time_ns() - start
    print("(d) worst cases on a 1440-minute window (CPU time)")
    print(
        f"    clock jump evicting 1439 minutes: {jump / 1000:.0f} us;"
        f" late minute into a 1437-minute gap: {late / 1000:.0f} us;"
        f" stats() of a full window: {stats / 1000:.0f} us"
    )


class _ScanningWindow(MinuteWindow):
    """The window as it was before the occupancy tree: neighbours found by a slot scan."""

    __slots__ = ()

    def _prev_present(self, minute: int) -> int:
        if minute == self._newest:
            return self._before_newest
        minutes, size = self._minutes, self._size
        candidate = minute - MINUTE_MS
        while candidate >= self._oldest:
            if minutes[(candidate // MINUTE_MS) % size] == candidate:
                return candidate
            candidate -= MINUTE_MS
        return -1

    def _next_present(self, minute: int) -> int:
        minutes, size = self._minutes, self._size
        candidate = minute + MINUTE_MS
        while candidate <= self._newest:
            if minutes[(candidate // MINUTE_MS) % size] == candidate:
                return candidate
            candidate += MINUTE_MS
        return -1


def backfill_order(markets: int, seed: int) -> None:
    """(f) the order a starting watcher delivers: the live minute first, then 1,440 minutes of
    backfill oldest first; CPU time per market with the occupancy tree and with the old scan."""
    rng = random.Random(seed)
    live = START_MINUTE + 1440 * MINUTE_MS
    series = []
    for _ in range(markets):
        price = rng.uniform(0.01, 50_000.0)
        bars = []
        for back in range(1440, 0, -1):
            price *= 1 + rng.gauss(0, 1e-3)
            bars.append((live - back * MINUTE_MS, price, rng.random()))
        series.append(bars)
    print(
        f"(f) live minute first, then 1,440 minutes oldest first (a backfill), {markets} markets"
        " (CPU time per market, including stats() once at the end)"
    )
    results = {}
    for name, kind in (("old scan", _ScanningWindow), ("occupancy tree", MinuteWindow)):
        windows = []
        start = time.thread_time_ns()
        for bars in series:
            window = kind(1440)
            window.set(live, bars[-1][1], 1.0)
            for minute, close, volume in bars:
                window.set(minute, close, volume)
            window.stats()
            windows.append(window)
        elapsed = (time.thread_time_ns() - start) / markets
        results[name] = windows
        print(f"    {name:>14}: {elapsed / 1e6:7.2f} ms per market")
    same = all(
        old.stats() == new.stats()
        for old, new in zip(results["old scan"], results["occupancy tree"], strict=True)
    )
    print(f"    identical statistics: {same}")


def many_markets(markets: int, seed: int, quoted: bool) -> None:
    """(c) RSS of a book holding `markets` x 24h of minutes, (e) one clock minute for all."""
    rng = random.Random(seed)
    gc.collect()
    before = _rss()
    book = MetricBook(window_minutes=1440)
    last = START_MINUTE + 1439 * MINUTE_MS
    book.advance_clock(last)
    for m in range(markets):
        market = Market("bench", f"c{m}", "usdt")
        price = rng.uniform(0.01, 50_000.0)
        bars = []
        for i in range(1440):
            price *= 1 + rng.gauss(0, 1e-3)
            minute = START_MINUTE + i * MINUTE_MS
            bar = Tick(market.id, minute, i, minute, minute, *_ohlc(price), rng.random())
            bars.append(_quoted(bar) if quoted else bar)
        book.warm(market, bars)
    gc.collect()
    after = _rss()
    print(
        f"(c) {markets:,} markets x 1440 minutes in one MetricBook:"
        f" RSS {after / MIB:.1f} MiB (process before the book: {before / MIB:.1f} MiB,"
        f" book: {(after - before) / MIB:.1f} MiB)"
    )
    start = time.thread_time_ns()
    updates = book.advance_clock(last + MINUTE_MS)
    elapsed = time.thread_time_ns() - start
    print(
        f"(e) clock moves one minute: advance_clock over {markets:,} markets"
        f" ({len(updates):,} updates) takes {elapsed / 1e6:.1f} ms"
    )


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hours", type=int, default=48, help="hours fed at 1 update/s (>= 24)")
    parser.add_argument("--markets", type=int, default=1000, help="markets for the RSS part")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--part",
        choices=("all", "memory", "updates", "worst", "rss", "backfill"),
        default="all",
    )
    parser.add_argument(
        "--backfill-markets", type=int, default=100, help="markets for the backfill-order part"
    )
    parser.add_argument(
        "--quote-volume",
        action="store_true",
        help="ticks carry a quote volume: every market also has a turnover window",
    )
    args = parser.parse_args()
    if args.hours < 24:
        parser.error("--hours must be at least 24: the window is a day")
    quoted = args.quote_volume
    if args.part == "memory":
        memory(args.seed, quoted)
    elif args.part == "updates":
        update_times(args.hours, args.seed, quoted)
    elif args.part == "worst":
        worst_cases()
    elif args.part == "rss":
        many_markets(args.markets, args.seed, quoted)
    elif args.part == "backfill":
        backfill_order(args.backfill_markets, args.seed)
    else:
        print(
            f"python {platform.python_version()}, seed {args.seed}, {os.cpu_count()} CPUs,"
            f" quote volume {'on' if quoted else 'off'}"
        )
        # Each part in a fresh process: tracemalloc slows the timed part, and RSS must not
        # include what earlier parts allocated.
        for part in ("memory", "updates", "worst", "rss", "backfill"):
            command = [sys.executable, __file__, "--part", part, "--hours", str(args.hours)]
            command += ["--markets", str(args.markets), "--seed", str(args.seed)]
            command += ["--quote-volume"] if quoted else []
            command += ["--backfill-markets", str(args.backfill_markets)]
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
