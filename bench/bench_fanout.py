"""Fan-out of live bar frames to many WebSocket clients: the gateway beside a minimal baseline.

Starts the real stack on this machine (LocalInfra: Tansu broker, redis-server, embedded
PostgreSQL; `tickstream init`). No watcher, stats or alerts: a driver process
(bench/fanout_driver.py) sends `--rate` ticks/s round robin over `--markets` markets straight
into their tick topics (`ticks.bench.m000-usd`, ...) with the services' aiokafka producer, each
tick's `received_ts` set to the wall time it is sent (the driver plays the watcher). Each
measured run ("session") has a fresh, empty broker (Tansu's memory storage costs more CPU per
fetch the longer it runs), a fresh driver and one server process: the gateway
(`python -m tickstream_gateway`, settings from the environment, `--gateway-env` to add some)
or the baseline, a minimal broadcast server written with the `websockets` library
(bench/fanout_baseline.py) that consumes the same topics with the same consumer settings and
sends the same frame bytes (the gateway's own `bar_frame`). Both run the same configurations
in the same run, one after the other, the order alternating with `--rounds`. First, the feed
alone: driver -> broker -> a bare consumer, the latency floor no server can go below.

Latency: the gateway's `bar` frame carries the tick's `received_ts` (docs/protocol.md), so a
client's latency for a frame is its wall-clock receive time minus that field: watcher (here:
driver) receive to client receive, through the broker and the server; no lookup by seq is
needed, and the baseline sends the same bytes. Everything runs on one machine and one clock.
`received_ts` is in whole ms, so latencies are counted in 1 ms buckets and read up to 1 ms high.

Clients: `--clients` reading clients per configuration (default 100, then 1,000), spread round
robin over `--workers` load-generator processes (asyncio, the `websockets` sans-I/O client,
which reads as fast as it gets CPU). Each subscribes to `--markets-per-client` markets (default
10) with `{"op":"subscribe","channel":"market","market":...}`. `--placement hot` (default) puts
every client on the same markets (m000, m001, ...), so every frame of those markets goes to every
client, the issue's "N clients on one market" widened to K markets (`--markets-per-client 1`
is that case literally); `spread` gives client i the K markets from i x K on. Offered load =
clients x markets-per-client x rate / markets frames/s: with the defaults 10,000 frames/s for
100 clients and 100,000 frames/s for 1,000 clients, which saturates this 2-core machine (the
throughput comparison needs a load some server cannot carry). Frames are counted for
`--duration` s, after every client has its history (the baseline sends an empty one) and
`--warmup` s more.

Printed per server and configuration: delivered bar frames/s; p50/p99/max latency; clients
closed by the server (close codes; 1006 = dropped without a close frame); server CPU seconds in
the window and per delivered frame (all of the server's CPU, so at light load it is mostly the
fixed cost of consuming every market's ticks); server RSS (end and max); `/healthz` latency
(a probe on a new connection every 0.1 s during the window; the gateway's pings Redis and
PostgreSQL, the baseline's does no I/O); CPU seconds of every other process (load
generators, also per frame, driver, broker, kernel threads, and any process outside this bench,
which is flagged with a WARNING): on 2 cores they all compete with the server, so a server whose
writes cost its clients more CPU per frame also leaves itself less. In the first
configuration's sessions, `--idle` clients connect first without subscribing: RSS growth /
clients = RSS per idle connection. Then the medians over rounds, the tickstream/baseline
frames/s ratio, and the issue 8 targets.

`--http` instead seeds `--metrics` price metrics (and as many volume ones) in Redis the way
stats writes them (MetricBook + tickstream_stats.store.write_stats) and compares
`GET /api/ranks?kind=price` with `--trivial-path` (default /healthz) of the same gateway:
`--connections` keep-alive connections from `--http-workers` processes, closed loop, req/s and
latency per path in the same run (bench/fanout_http.py); with `--wrk` the load comes from wrk
(`apt install wrk`; `--http-workers` threads), which takes far less CPU per request than the
Python clients, so less of the 2 cores is taken from the gateway. Run:

    .venv/bin/python bench/bench_fanout.py                  # 100 and 1,000 clients, both servers
    .venv/bin/python bench/bench_fanout.py --markets-per-client 1   # N clients on one market
    .venv/bin/python bench/bench_fanout.py --http           # ranks vs a trivial route
    .venv/bin/python bench/bench_fanout.py --http --wrk     # the same, load from wrk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect

from fanout_clients import ClientPlan, Tally, run_clients
from fanout_driver import bench_markets, feed_latency, run_driver
from fanout_http import run_http
from fanout_stack import (
    MIB,
    CpuMeter,
    Server,
    Stack,
    http_get,
    machine_load,
    median,
    outside_note,
    percentile,
    raise_fd_limit,
)
from tickstream_shared.kafka import ensure_topics
from tickstream_shared.settings import KafkaSettings

_SPAWN = multiprocessing.get_context("spawn")


@dataclass
class Phase:
    """One server under one client configuration, measured over one window."""

    server: str
    clients: int
    seconds: float
    tally: Tally
    cpu: dict[str, float]
    rss_end: int
    rss_max: int
    healthz_s: list[float] = field(default_factory=list)
    healthz_failed: int = 0
    ticks_sent: int = 0

    @property
    def frames_per_s(self) -> float:
        return self.tally.frames / self.seconds if self.seconds else 0.0


def _merge(tallies: list[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total.ready += tally.ready
        total.failed += tally.failed
        total.sub_errors += tally.sub_errors
        total.connect_s = max(total.connect_s, tally.connect_s)
        total.frames += tally.frames
        total.latency_ms += tally.latency_ms
        total.closed += tally.closed
    return total


async def _collect(reports: Any, kind: str, count: int, within: float) -> list[Any]:
    loop = asyncio.get_running_loop()
    found: list[Any] = []
    deadline = time.monotonic() + within
    while len(found) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"load generators: {len(found)} of {count} reported {kind!r}")
        try:
            got, _, report = await loop.run_in_executor(None, reports.get, True, min(left, 1.0))
        except queue.Empty:
            continue
        if got == kind:
            found.append(report)
    return found


async def _probe_healthz(server: Server, until: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    failed = 0
    while time.time() < until:
        started = time.perf_counter()
        status, _ = await http_get("127.0.0.1", server.port, "/healthz", within=30)
        if status == 200:
            latencies.append(time.perf_counter() - started)
        else:
            failed += 1
        await asyncio.sleep(0.1)
    return latencies, failed


async def run_phase(
    server: Server,
    subscriptions: list[list[str]],
    args: argparse.Namespace,
    roles: dict[int, str],
    sent: Any,
    *,
    warmup: float,
    duration: float,
) -> Phase:
    """Connect the clients from `--workers` processes, measure one window, close them."""
    window = _SPAWN.Array("d", 2)
    go = _SPAWN.Event()
    reports: Any = _SPAWN.Queue()
    plans = [
        ClientPlan(server.url, subscriptions[i :: args.workers], args.deflate)
        for i in range(min(args.workers, len(subscriptions)))
    ]
    workers = [
        _SPAWN.Process(
            target=run_clients,
            args=(number, plan, window, go, reports, args.connect_timeout, args.loadgen_nice),
            daemon=True,
        )
        for number, plan in enumerate(plans)
    ]
    for worker in workers:
        worker.start()
    meter = CpuMeter({**roles, **{w.pid or 0: "load generators" for w in workers}})
    try:
        await _collect(reports, "ready", len(workers), args.connect_timeout + 60)
        start = time.time() + warmup
        window[0], window[1] = start, start + duration
        go.set()
        await asyncio.sleep(max(0.0, start - time.time()))
        meter.take()
        sent_before = sent.value
        probes = asyncio.create_task(_probe_healthz(server, start + duration))
        rss_max = server.rss()
        while (left := start + duration - time.time()) > 0:
            await asyncio.sleep(min(0.25, left))
            rss_max = max(rss_max, server.rss())
        cpu = meter.take()
        ticks = sent.value - sent_before
        rss_end = server.rss()
        healthz, failed = await probes
        tally = _merge(await _collect(reports, "done", len(workers), 60))
    finally:
        for worker in workers:
            worker.join(20)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    if not server.alive():
        raise RuntimeError(f"{server.name} exited; see {server.log}")
    await asyncio.sleep(args.settle)  # the server drops the closed connections
    return Phase(
        server=server.name,
        clients=len(subscriptions),
        seconds=duration,
        tally=tally,
        cpu=cpu,
        rss_end=rss_end,
        rss_max=rss_max,
        healthz_s=healthz,
        healthz_failed=failed,
        ticks_sent=ticks,
    )


async def markets_known(server: Server, markets: list[str], within: float) -> list[str]:
    """Subscribe to every market until each is answered with history; returns those that
    were not (the gateway knows a market once its feed has seen a tick of it)."""
    deadline = time.monotonic() + within
    missing = list(markets)
    while missing and time.monotonic() < deadline:
        async with connect(server.url, compression=None, max_size=2**23) as ws:
            for market in missing:
                await ws.send(
                    json.dumps({"op": "subscribe", "channel": "market", "market": market})
                )
            answers: list[bool] = []
            while len(answers) < len(missing):
                async with asyncio.timeout(60):
                    frame = json.loads(await ws.recv())
                if frame["type"] in ("history", "error"):
                    answers.append(frame["type"] == "history")
        missing = [m for m, ok in zip(missing, answers, strict=True) if not ok]
        if missing:
            await asyncio.sleep(1.0)
    return missing


def subscriptions_for(
    clients: int, markets: list[str], per_client: int, placement: str
) -> list[list[str]]:
    if placement == "hot":
        return [markets[:per_client] for _ in range(clients)]
    return [
        [markets[(i * per_client + j) % len(markets)] for j in range(per_client)]
        for i in range(clients)
    ]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def describe(phase: Phase, offered: float) -> str:
    tally = phase.tally
    lat = tally.latency_ms
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    closed = sum(tally.closed.values())
    codes = ", ".join(f"{n} x {code}" for code, n in sorted(tally.closed.items()))
    server_cpu = phase.cpu.get(phase.server, 0.0)
    per_frame = server_cpu / tally.frames * 1e6 if tally.frames else float("nan")
    loadgen = phase.cpu.get("load generators", 0.0) / tally.frames * 1e6 if tally.frames else 0.0
    busy = sum(phase.cpu.values()) / (phase.seconds * (os.cpu_count() or 1))
    warning = outside_note(phase.cpu, phase.seconds)
    other_cpu = ", ".join(
        f"{role} {seconds:.1f}"
        for role, seconds in sorted(phase.cpu.items(), key=lambda item: -item[1])
        if role != phase.server and seconds >= 0.05
    )
    return "\n".join(
        [
            f"{phase.server:>10} {phase.clients:5d} clients: ready {tally.ready}"
            f" (failed {tally.failed}, subscribe errors {tally.sub_errors}) in"
            f" {tally.connect_s:.1f} s; ticks sent {phase.ticks_sent / phase.seconds:,.0f}/s",
            f"{'':>17} bar frames {phase.frames_per_s:,.0f}/s of {offered:,.0f}/s offered;"
            f" latency p50 {p50} ms, p99 {p99} ms, max {max(lat, default=None)} ms;"
            f" clients closed {closed}{f' ({codes})' if codes else ''}",
            f"{'':>17} server CPU {server_cpu:.1f} s in {phase.seconds:.0f} s"
            f" ({server_cpu / phase.seconds:.0%} of a core, {per_frame:.1f} us/frame);"
            f" RSS {phase.rss_end / MIB:.1f} MiB (max {phase.rss_max / MIB:.1f});"
            f" /healthz p50 {_ms(_quantile(phase.healthz_s, 0.5))} ms,"
            f" p99 {_ms(_quantile(phase.healthz_s, 0.99))} ms,"
            f" max {_ms(max(phase.healthz_s, default=None))} ms"
            f" ({len(phase.healthz_s)} probes, {phase.healthz_failed} failed)",
            f"{'':>17} machine busy {busy:.0%}; CPU s of the rest: {other_cpu}"
            f" (load generators {loadgen:.1f} us/frame)",
            *([f"{'':>17} {warning}"] if warning else []),
        ]
    )


@dataclass
class Feed:
    """The driver and the empty broker it sends into, for one measured session."""

    driver: Any  # multiprocessing Process
    sent: Any  # shared count of ticks sent
    markets: list[str]


async def _fresh_feed(stack: Stack, args: argparse.Namespace) -> Feed:
    assert stack.infra is not None
    stack.fresh_broker()
    markets = bench_markets(args.markets)
    bootstrap = stack.infra.kafka_bootstrap_servers
    await ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), [m.topic for m in markets])
    sent = _SPAWN.Value("q", 0)
    ids = [m.id for m in markets]
    driver = _SPAWN.Process(target=run_driver, args=(bootstrap, ids, args.rate, sent), daemon=True)
    driver.start()
    return Feed(driver, sent, ids)


async def feed_floor(args: argparse.Namespace, stack: Stack) -> str:
    """Driver to a bare consumer, through a fresh broker alone: the latency no server can beat."""
    assert stack.infra is not None
    feed = await _fresh_feed(stack, args)
    try:
        meter = CpuMeter({feed.driver.pid: "driver"})
        start = time.time() + 8.0  # about when a server session's window opens
        meter.take()
        latency = await feed_latency(
            stack.infra.kafka_bootstrap_servers, start, start + args.duration
        )
        cpu = meter.take()
    finally:
        feed.driver.terminate()
        feed.driver.join()
    return (
        f"feed alone (driver -> broker -> a bare aiokafka consumer made like the gateway's):"
        f" {sum(latency.values()) / args.duration:,.0f} ticks/s; latency"
        f" p50 {percentile(latency, 0.5)} ms, p99 {percentile(latency, 0.99)} ms,"
        f" max {max(latency, default=None)} ms; CPU s: "
        + ", ".join(f"{role} {sec:.1f}" for role, sec in sorted(cpu.items()) if sec >= 0.05)
        + f" {outside_note(cpu, args.duration)}"
    ).rstrip()


async def session(
    stack: Stack, name: str, clients: int, args: argparse.Namespace, *, idle: bool
) -> tuple[Phase, float | None]:
    """A fresh broker and driver, one server started for the session: optionally the idle
    connections (RSS per connection), then `clients` reading clients; the server is stopped."""
    feed = await _fresh_feed(stack, args)
    if name == "tickstream":
        server = stack.start_gateway()
    else:
        server = stack.start_baseline(args.baseline_max_buffer)
    roles = {server.process.pid: server.name, feed.driver.pid: "driver"}
    try:
        if not await server.healthy(90):
            raise RuntimeError(f"{server.name} is not healthy; see {server.log}")
        missing = await markets_known(server, feed.markets, 90)
        if missing:
            raise RuntimeError(f"{server.name} does not know {len(missing)} markets")
        per_connection = None
        if idle:
            before = server.rss()
            phase = await run_phase(
                server, [[] for _ in range(args.idle)], args, roles, feed.sent, warmup=3, duration=0
            )
            per_connection = (phase.rss_end - before) / max(1, phase.tally.ready)
            print(
                f"{server.name:>10} idle: {phase.tally.ready} connections without subscriptions:"
                f" RSS {before / MIB:.1f} -> {phase.rss_end / MIB:.1f} MiB,"
                f" {per_connection / 1024:.1f} KiB per connection"
            )
        subscriptions = subscriptions_for(
            clients, feed.markets, args.markets_per_client, args.placement
        )
        phase = await run_phase(
            server,
            subscriptions,
            args,
            roles,
            feed.sent,
            warmup=args.warmup,
            duration=args.duration,
        )
        return phase, per_connection
    finally:
        stack.stop(server)
        feed.driver.terminate()
        feed.driver.join()


async def fanout(args: argparse.Namespace, stack: Stack) -> int:
    print(
        f"feed: {args.rate:,.0f} ticks/s over {args.markets} markets"
        f" ({args.rate / args.markets:g}/s each), sent straight into the tick topics by an"
        f" aiokafka producer (no watcher; received_ts = send time). Each run below has a fresh"
        f" broker, a fresh driver and one server process. {os.cpu_count()} cores shared by the"
        f" server, {args.workers} load-generator processes, the driver, the broker, Redis and"
        f" PostgreSQL; client compression {'deflate' if args.deflate else 'off'}."
    )
    print(await machine_load(), flush=True)
    print(await feed_floor(args, stack), flush=True)
    results: dict[tuple[int, str], list[Phase]] = {}
    idle_rss: dict[str, list[float]] = {}
    names = ("tickstream", "baseline")
    for clients in args.clients:
        offered = clients * args.markets_per_client * args.rate / args.markets
        print(
            f"-- {clients} clients, {args.markets_per_client} market(s) each,"
            f" placement {args.placement}: {offered:,.0f} frames/s offered"
        )
        for run in range(args.rounds):
            for name in names if run % 2 == 0 else names[::-1]:
                idle = clients == args.clients[0] and args.idle > 0
                phase, per_connection = await session(stack, name, clients, args, idle=idle)
                if per_connection is not None:
                    idle_rss.setdefault(name, []).append(per_connection)
                results.setdefault((clients, name), []).append(phase)
                print(describe(phase, offered), flush=True)
    _summary(results, {name: median(v) for name, v in idle_rss.items()}, args)
    return 0


def _summary(
    results: dict[tuple[int, str], list[Phase]],
    idle_rss: dict[str, float],
    args: argparse.Namespace,
) -> None:
    print("summary (median over rounds; latency from the tick's received_ts to client receive)")
    print(
        f"{'clients':>7} {'server':>10} {'frames/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'closed':>6} {'CPU s':>6} {'us/frame':>8} {'RSS MiB':>8} {'healthz p99':>11}"
    )
    for clients in args.clients:
        base = median([p.frames_per_s for p in results[clients, "baseline"]])
        for name in ("tickstream", "baseline"):
            phases = results[clients, name]
            rate = median([p.frames_per_s for p in phases])
            p50 = median([float(percentile(p.tally.latency_ms, 0.5) or -1) for p in phases])
            p99 = median([float(percentile(p.tally.latency_ms, 0.99) or -1) for p in phases])
            closed = max(sum(p.tally.closed.values()) for p in phases)
            cpu = median([p.cpu.get(name, 0.0) for p in phases])
            per_frame = median([p.cpu.get(name, 0.0) / max(1, p.tally.frames) for p in phases])
            rss = max(p.rss_max for p in phases) / MIB
            healthz = median([_quantile(p.healthz_s, 0.99) or float("nan") for p in phases])
            print(
                f"{clients:7d} {name:>10} {rate:9,.0f} {rate / base if base else 0:6.2f}"
                f" {p50:7.0f} {p99:7.0f} {closed:6d} {cpu:6.1f} {per_frame * 1e6:8.1f}"
                f" {rss:8.1f} {_ms(healthz):>8} ms"
            )
    for name, per_connection in idle_rss.items():
        print(f"{name:>10}: {per_connection / 1024:.1f} KiB RSS per idle connection")
    top = max(args.clients)
    gateway = results[top, "tickstream"]
    ratio = median([p.frames_per_s for p in gateway]) / max(
        1e-9, median([p.frames_per_s for p in results[top, "baseline"]])
    )
    checks = [
        (f"frames/s >= 0.8 x baseline at {top} clients", ratio >= 0.8, f"{ratio:.2f}x"),
        (
            f"p99 <= 100 ms at {top} clients",
            all((percentile(p.tally.latency_ms, 0.99) or 10**9) <= 100 for p in gateway),
            ", ".join(f"{percentile(p.tally.latency_ms, 0.99)} ms" for p in gateway),
        ),
        (
            "no reading client closed",
            all(
                not p.tally.closed for ps in results.values() for p in ps if p.server != "baseline"
            ),
            f"{sum(sum(p.tally.closed.values()) for p in gateway)} at {top} clients",
        ),
        (
            "<= 40 KiB RSS per idle connection",
            idle_rss.get("tickstream", 1e9) <= 40 * 1024,
            f"{idle_rss['tickstream'] / 1024:.1f} KiB" if idle_rss else "not measured (--idle 0)",
        ),
        (
            "/healthz p99 < 100 ms during fan-out",
            all((_quantile(p.healthz_s, 0.99) or 1e9) < 0.1 for p in gateway),
            ", ".join(f"{_ms(_quantile(p.healthz_s, 0.99))} ms" for p in gateway),
        ),
    ]
    print("issue 8 targets (tickstream):")
    for what, met, value in checks:
        print(f"  {'met    ' if met else 'NOT met'}  {what}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--markets-per-client", type=int, default=10)
    parser.add_argument("--placement", choices=("hot", "spread"), default="hot")
    parser.add_argument("--rate", type=float, default=1000.0, help="ticks/s in all")
    parser.add_argument("--markets", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="load-generator processes")
    parser.add_argument(
        "--loadgen-nice", type=int, default=0, help="niceness of the load generators (0-19)"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=3.0, help="pause after each run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for RSS")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    parser.add_argument(
        "--baseline-max-buffer",
        type=int,
        default=768 * 1024,
        help="baseline closes a client (1013) whose write buffer exceeds this many bytes",
    )
    parser.add_argument(
        "--gateway-env", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )
    parser.add_argument("--http", action="store_true", help="ranks vs trivial route instead")
    parser.add_argument("--metrics", type=int, default=1000, help="--http: price metrics")
    parser.add_argument("--trivial-path", default="/healthz")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--http-workers", type=int, default=2, help="load processes (with --wrk: wrk threads)"
    )
    parser.add_argument(
        "--wrk", action="store_true", help="--http: load from wrk (apt install wrk) instead"
    )
    parser.add_argument("--http-duration", type=float, default=15.0)
    parser.add_argument("--http-warmup", type=float, default=2.0)
    args = parser.parse_args()
    raise_fd_limit()
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    with Stack(gateway_env=gateway_env) as stack:
        return asyncio.run(run_http(args, stack) if args.http else fanout(args, stack))


if __name__ == "__main__":
    sys.exit(main())
