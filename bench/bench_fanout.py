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
`--warmup` s more. With `--connect-rate` the driver sends that many ticks/s until the clients
are connected, then `--rate` from the warmup on: the clients connect to a quiet feed, and a
server's backlog in the window does not depend on how long they took.

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

Freshness (bench/fanout_clients.py): the driver closes every market's bar at each minute's end
(a last update with `"closed":true`, as the synthetic source does) and publishes the
`received_ts` of its newest update per market in shared memory. At the window's end each
client's newest `received_ts` is compared with the newest sent of its market: "last frame"
staleness, p50/p99/max over clients (a client with nothing of its market counts apart, as
infinitely stale). Then each client's closed bars are checked: every minute that closed from
2 s after the client was ready to the window's end must arrive, once, in minute order; one
passed by a later frame is missing, and the clients wait up to 10 s for those not arrived yet
(then: late). Both servers send the closed bars the driver makes (the baseline forwards every
tick), so both are checked.

`--scenario` sets issue 16's presets (a flag given as well overrides its value) and prints the
issue 16 targets instead of issue 8's:

- `overload`: 1,000 clients on one market (m000, `--placement hot`, 1 market each) of 10, each
  market updated 100 times a second (1,000 ticks/s in all): 100,000 frames/s offered, which no
  server here carries, so what counts is what reaches the clients: the p99 age of delivered
  frames <= 250 ms, every client's last frame at most 250 ms older than the newest update, all
  closed bars delivered, `/healthz` p99 < 100 ms; the baseline's numbers beside. The window is
  75 s, so a minute closes inside it (the closed-bar check needs one), no idle connections;
  `--connect-rate 10` (1 update/s per market while the clients connect, 100/s from the warmup).
- `connections`: 10,000 clients over 10 markets (client i on market i % 10), 1 update/s per
  market, sent together each second (`--tick-slot 1`: 10,000 frames/s offered, all of a
  second's frames at once, as the issue measured it), 30 s; first 10,000 idle
  connections for the RSS per idle connection. Targets: p99 <= 1.5 x the baseline's, <= 16 KiB
  RSS per idle connection, server CPU per delivered frame <= 1.2 x the baseline's. Handshakes:
  64 in flight per load generator (`--connect-concurrency`); every process raises its open-file
  limit to the hard limit; the gateway gets `GATEWAY_MAX_CONNECTIONS=10500` and
  `GATEWAY_MAX_SOCKETS=11500`, room for idle connections it may still be closing when the
  reading clients connect (`--gateway-env` of the same name overrides).

Both scenarios run the baseline with `--baseline-gc tuned`: the garbage collector set as the
gateway sets its own (tickstream_gateway.service.tune_gc: with Python's defaults a full
collection pauses the loop longer the more connections it holds), so the two differ in their
I/O paths, not in that setting; the default run keeps Python's defaults in the baseline.

`--http` instead seeds `--metrics` price metrics (and as many volume ones) in Redis the way
stats writes them (MetricBook + tickstream_stats.store.write_stats) and compares
`GET /api/ranks?kind=price` with `--trivial-path` (default /healthz) of the same gateway:
`--connections` keep-alive connections from `--http-workers` processes, closed loop, req/s and
latency per path in the same run (bench/fanout_http.py); with `--wrk` the load comes from wrk
(`apt install wrk`; `--http-workers` threads), which takes far less CPU per request than the
Python clients, so less of the 2 cores is taken from the gateway. Run:

    .venv/bin/python bench/bench_fanout.py                  # 100 and 1,000 clients, both servers
    .venv/bin/python bench/bench_fanout.py --markets-per-client 1   # N clients on one market
    .venv/bin/python bench/bench_fanout.py --scenario overload      # issue 16: 1,000 on one
    .venv/bin/python bench/bench_fanout.py --scenario connections   # issue 16: 10,000 clients
    .venv/bin/python bench/bench_fanout.py --http           # ranks vs a trivial route
    .venv/bin/python bench/bench_fanout.py --http --wrk     # the same, load from wrk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fanout_clients import CLOSED_GRACE_S, ClientPlan, Tally, run_clients
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
        total.staleness_ms += tally.staleness_ms
        total.stale_nothing += tally.stale_nothing
        total.closed_expected += tally.closed_expected
        total.closed_missing += tally.closed_missing
        total.closed_late += tally.closed_late
        total.closed_disorder += tally.closed_disorder
        total.closed_bars += tally.closed_bars
        total.closed_delay_ms = max(total.closed_delay_ms, tally.closed_delay_ms)
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
    feed: Feed,
    *,
    warmup: float,
    duration: float,
) -> Phase:
    """Connect the clients from `--workers` processes, measure one window, close them."""
    window = _SPAWN.Array("d", 2)
    go = _SPAWN.Event()
    reports: Any = _SPAWN.Queue()
    plans = [
        ClientPlan(
            server.url,
            subscriptions[i :: args.workers],
            args.deflate,
            feed.markets,
            args.connect_concurrency,
        )
        for i in range(min(args.workers, len(subscriptions)))
    ]
    workers = [
        _SPAWN.Process(
            target=run_clients,
            args=(
                number,
                plan,
                window,
                go,
                reports,
                args.connect_timeout,
                feed.newest,
                args.loadgen_nice,
            ),
            daemon=True,
        )
        for number, plan in enumerate(plans)
    ]
    for worker in workers:
        worker.start()
    meter = CpuMeter({**roles, **{w.pid or 0: "load generators" for w in workers}})
    try:
        await _collect(reports, "ready", len(workers), args.connect_timeout + 60)
        if any(subscriptions):  # readers: the full rate from the warmup on (--connect-rate)
            feed.rate.value = args.rate
        start = time.time() + warmup
        window[0], window[1] = start, start + duration
        go.set()
        await asyncio.sleep(max(0.0, start - time.time()))
        meter.take()
        sent_before = feed.sent.value
        probes = asyncio.create_task(_probe_healthz(server, start + duration))
        rss_max = server.rss()
        while (left := start + duration - time.time()) > 0:
            await asyncio.sleep(min(0.25, left))
            rss_max = max(rss_max, server.rss())
        cpu = meter.take()
        ticks = feed.sent.value - sent_before
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


# Markets markets_known asks about per connection, and connections at once.
_KNOWN_PER_CONNECTION = 5
_KNOWN_CONNECTIONS = 10


async def _known(server: Server, markets: list[str]) -> list[bool]:
    """One connection subscribing to `markets`: whether each is answered with history."""
    async with connect(server.url, compression=None, max_size=2**23) as ws:
        for market in markets:
            await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        answers: list[bool] = []
        while len(answers) < len(markets):
            async with asyncio.timeout(60):
                frame = json.loads(await ws.recv())
            if frame["type"] in ("history", "error"):
                answers.append(frame["type"] == "history")
    return answers


async def markets_known(server: Server, markets: list[str], within: float) -> list[str]:
    """Subscribe to every market until each is answered with history; returns those that
    were not (the gateway knows a market once its feed has seen a tick of it).

    A few markets per connection: the gateway handles one connection's commands one after the
    other, and uvicorn stops reading a connection while a command waits to be handled, so a
    client's pong also waits; 100 subscribes to markets the feed has not read yet (each waiting
    for the feed) on one connection took over 40 s on a busy machine, and uvicorn closed the
    connection with 1011 "keepalive ping timeout" (its own ping unanswered as far as it could
    read)."""
    deadline = time.monotonic() + within
    missing = list(markets)
    gate = asyncio.Semaphore(_KNOWN_CONNECTIONS)

    async def ask(group: list[str]) -> list[bool]:
        async with gate:
            try:
                return await _known(server, group)
            except (OSError, TimeoutError, ConnectionClosed):
                return [False] * len(group)

    while missing and time.monotonic() < deadline:
        groups = [
            missing[i : i + _KNOWN_PER_CONNECTION]
            for i in range(0, len(missing), _KNOWN_PER_CONNECTION)
        ]
        answers = [ok for oks in await asyncio.gather(*map(ask, groups)) for ok in oks]
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


def _staleness(tally: Tally, q: float | None) -> float | None:
    """A quantile (None: the max) of the clients' last-frame staleness, ms; infinite when a
    client had nothing of one of its markets, None when no client was measured."""
    if tally.stale_nothing:
        return math.inf
    if q is None:
        return max(tally.staleness_ms, default=None)
    return _quantile([float(v) for v in tally.staleness_ms], q)


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def closed_bars_ok(tally: Tally) -> bool:
    """Every client had every closed bar it had to (and at least one was expected)."""
    expected = sum(n * clients for n, clients in tally.closed_expected.items())
    return (
        expected > 0
        and not tally.closed_missing
        and not tally.closed_late
        and not tally.closed_disorder
    )


def freshness(tally: Tally) -> str:
    """The last-frame staleness and closed-bar lines' text."""
    measured = len(tally.staleness_ms)
    per_client = sorted(tally.closed_expected)
    expected = (
        "-"
        if not per_client
        else f"{per_client[0]}"
        if len(per_client) == 1
        else f"{per_client[0]}-{per_client[-1]}"
    )
    return (
        f"last frame at the window's end, newest update sent - newest the client has:"
        f" p50 {_whole(_quantile([float(v) for v in tally.staleness_ms], 0.5))} ms,"
        f" p99 {_whole(_staleness(tally, 0.99))} ms, max {_whole(_staleness(tally, None))} ms"
        f" ({measured} clients, {tally.stale_nothing} with nothing of a market);"
        f" closed bars: expected {expected} per client, clients missing some (a later frame"
        f" came first): {tally.closed_missing}, with some not delivered {CLOSED_GRACE_S:g} s"
        f" after the window: {tally.closed_late}, out of order or twice: {tally.closed_disorder}"
        f" ({tally.closed_bars} received, max delay {tally.closed_delay_ms} ms)"
        + ("" if per_client != [0] else "; no minute closed inside the window: not checked")
    )


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
            f"{'':>17} {freshness(tally)}",
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
    newest: Any  # shared int64 per market: received_ts of the newest update sent
    rate: Any  # shared double: ticks/s the driver sends now


async def _fresh_feed(stack: Stack, args: argparse.Namespace) -> Feed:
    assert stack.infra is not None
    stack.fresh_broker()
    markets = bench_markets(args.markets)
    bootstrap = stack.infra.kafka_bootstrap_servers
    await ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), [m.topic for m in markets])
    sent = _SPAWN.Value("q", 0)
    newest = _SPAWN.Array("q", len(markets), lock=False)
    rate = _SPAWN.Value("d", args.rate if args.connect_rate is None else args.connect_rate)
    ids = [m.id for m in markets]
    driver = _SPAWN.Process(
        target=run_driver, args=(bootstrap, ids, rate, sent, newest, args.tick_slot), daemon=True
    )
    driver.start()
    return Feed(driver, sent, ids, newest, rate)


async def feed_floor(args: argparse.Namespace, stack: Stack) -> str:
    """Driver to a bare consumer, through a fresh broker alone: the latency no server can beat."""
    assert stack.infra is not None
    feed = await _fresh_feed(stack, args)
    feed.rate.value = args.rate
    try:
        meter = CpuMeter({feed.driver.pid: "driver"})
        start = time.time() + 8.0  # about when a server session's window opens
        seconds = min(args.duration, 30.0)
        meter.take()
        latency = await feed_latency(stack.infra.kafka_bootstrap_servers, start, start + seconds)
        cpu = meter.take()
    finally:
        feed.driver.terminate()
        feed.driver.join()
    return (
        f"feed alone (driver -> broker -> a bare aiokafka consumer made like the gateway's):"
        f" {sum(latency.values()) / seconds:,.0f} ticks/s; latency"
        f" p50 {percentile(latency, 0.5)} ms, p99 {percentile(latency, 0.99)} ms,"
        f" max {max(latency, default=None)} ms; CPU s: "
        + ", ".join(f"{role} {sec:.1f}" for role, sec in sorted(cpu.items()) if sec >= 0.05)
        + f" {outside_note(cpu, seconds)}"
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
        server = stack.start_baseline(args.baseline_max_buffer, args.baseline_gc)
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
                server, [[] for _ in range(args.idle)], args, roles, feed, warmup=3, duration=0
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
            feed,
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
        f" PostgreSQL; client compression {'deflate' if args.deflate else 'off'}; the driver"
        f" sends every {args.tick_slot:g} s; baseline garbage collector {args.baseline_gc}."
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
    if args.scenario == "overload":
        _overload_targets(results, args)
    elif args.scenario == "connections":
        _connections_targets(results, idle_rss, args)
    else:
        _issue8_targets(results, idle_rss, args)


def _print_targets(title: str, checks: list[tuple[str, bool, str]]) -> None:
    print(title)
    for what, met, value in checks:
        print(f"  {'met    ' if met else 'NOT met'}  {what}: {value}")


def _p99(phase: Phase) -> float:
    return _or_inf(percentile(phase.tally.latency_ms, 0.99))


def _or_inf(value: float | None) -> float:
    """Nothing measured counts as infinitely bad (a 0 is a 0)."""
    return math.inf if value is None else float(value)


def _overload_targets(
    results: dict[tuple[int, str], list[Phase]], args: argparse.Namespace
) -> None:
    """Issue 16, overload: the gateway's numbers (median over rounds), the baseline's beside."""
    top = max(args.clients)
    numbers: dict[str, dict[str, float]] = {}
    closed: dict[str, str] = {}
    all_closed: dict[str, bool] = {}
    for name in ("tickstream", "baseline"):
        phases = results[top, name]
        numbers[name] = {
            "p99": median([_p99(p) for p in phases]),
            "stale": median([_or_inf(_staleness(p.tally, None)) for p in phases]),
            "healthz": median([_or_inf(_quantile(p.healthz_s, 0.99)) * 1000 for p in phases]),
        }
        all_closed[name] = all(closed_bars_ok(p.tally) for p in phases)
        closed[name] = "; ".join(
            f"{sum(p.tally.closed_expected.values())} clients checked,"
            f" {p.tally.closed_missing} missing some, {p.tally.closed_late} late,"
            f" {p.tally.closed_disorder} out of order"
            for p in phases
        )
    tick, base = numbers["tickstream"], numbers["baseline"]
    _print_targets(
        f"issue 16 targets, overload ({top} clients on one market, tickstream; the baseline's"
        " numbers beside, median over rounds):",
        [
            (
                "p99 age of delivered frames <= 250 ms",
                tick["p99"] <= 250,
                f"{tick['p99']:.0f} ms (baseline {base['p99']:.0f} ms)",
            ),
            (
                "every client's last frame <= 250 ms older than the newest update",
                tick["stale"] <= 250,
                f"max {tick['stale']:.0f} ms (baseline {base['stale']:.0f} ms)",
            ),
            (
                "all closed bars delivered, in order",
                all_closed["tickstream"],
                f"{closed['tickstream']} (baseline: {closed['baseline']})",
            ),
            (
                "/healthz p99 < 100 ms",
                tick["healthz"] < 100,
                f"{tick['healthz']:.1f} ms (baseline {base['healthz']:.1f} ms)",
            ),
        ],
    )


def _connections_targets(
    results: dict[tuple[int, str], list[Phase]],
    idle_rss: dict[str, float],
    args: argparse.Namespace,
) -> None:
    """Issue 16, 10,000 connections: the gateway against the baseline of the same run."""
    top = max(args.clients)
    gateway, baseline = results[top, "tickstream"], results[top, "baseline"]
    p99 = median([_p99(p) for p in gateway])
    base_p99 = median([_p99(p) for p in baseline])
    cpu = median([p.cpu.get("tickstream", 0.0) / max(1, p.tally.frames) for p in gateway])
    base_cpu = median([p.cpu.get("baseline", 0.0) / max(1, p.tally.frames) for p in baseline])
    rss = idle_rss.get("tickstream")
    base_rss = idle_rss.get("baseline")
    ready = [p.tally.ready for p in gateway]
    _print_targets(
        f"issue 16 targets, connections ({top} clients, tickstream against the baseline of this"
        " run, median over rounds):",
        [
            (
                f"all {top} clients connected and subscribed",
                all(n == top for n in ready),
                ", ".join(str(n) for n in ready)
                + f" (baseline {', '.join(str(p.tally.ready) for p in baseline)})",
            ),
            (
                "p99 <= 1.5 x the baseline's",
                p99 <= 1.5 * base_p99,
                f"{p99:.0f} ms / {base_p99:.0f} ms"
                f" = {p99 / base_p99 if base_p99 else math.inf:.2f}x",
            ),
            (
                "<= 16 KiB RSS per idle connection",
                rss is not None and rss <= 16 * 1024,
                "not measured (--idle 0)"
                if rss is None
                else f"{rss / 1024:.1f} KiB (baseline {(base_rss or 0) / 1024:.1f} KiB)",
            ),
            (
                "server CPU per delivered frame <= 1.2 x the baseline's",
                cpu <= 1.2 * base_cpu,
                f"{cpu * 1e6:.1f} us / {base_cpu * 1e6:.1f} us"
                f" = {cpu / base_cpu if base_cpu else math.inf:.2f}x",
            ),
        ],
    )


def _issue8_targets(
    results: dict[tuple[int, str], list[Phase]],
    idle_rss: dict[str, float],
    args: argparse.Namespace,
) -> None:
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
    _print_targets("issue 8 targets (tickstream):", checks)


# Defaults, then what each `--scenario` changes; a flag given on the command line wins.
DEFAULTS: dict[str, Any] = {
    "clients": [100, 1000],
    "markets_per_client": 10,
    "placement": "hot",
    "rate": 1000.0,
    "markets": 100,
    "workers": 4,
    "duration": 20.0,
    "warmup": 5.0,
    "idle": 1000,
    "connect_timeout": 120.0,
    "connect_concurrency": 32,
    "connect_rate": None,
    "tick_slot": 0.01,
    "baseline_gc": "default",
}
SCENARIOS: dict[str, dict[str, Any]] = {
    # Issue 16: 1,000 clients on one market updating 100 times a second. 75 s: a minute closes
    # at least 5 s before the window's end, at least 2 s after every client was ready.
    "overload": {
        "clients": [1000],
        "markets_per_client": 1,
        "placement": "hot",
        "rate": 1000.0,
        "markets": 10,
        "idle": 0,
        "duration": 75.0,
        "connect_rate": 10.0,
        "baseline_gc": "tuned",
    },
    # Issue 16: 10,000 connections, 10 markets, each client on one, 1 update/s per market;
    # the RSS per idle connection from 10,000 idle connections first.
    "connections": {
        "clients": [10000],
        "markets_per_client": 1,
        "placement": "spread",
        "rate": 10.0,
        "markets": 10,
        "idle": 10000,
        "duration": 30.0,
        "connect_timeout": 300.0,
        "connect_concurrency": 64,
        "tick_slot": 1.0,
        "baseline_gc": "tuned",
    },
}
# The connections scenario's gateway: room above 10,000 WebSockets for the idle ones the gateway
# may still be closing when the reading clients connect (a --gateway-env of the same name wins).
SCENARIO_GATEWAY_ENV = {
    "connections": {"GATEWAY_MAX_CONNECTIONS": "10500", "GATEWAY_MAX_SOCKETS": "11500"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="issue 16's presets (see the module docstring); explicit flags override them",
    )
    parser.add_argument("--clients", type=int, nargs="+")
    parser.add_argument("--markets-per-client", type=int)
    parser.add_argument("--placement", choices=("hot", "spread"))
    parser.add_argument("--rate", type=float, help="ticks/s in all")
    parser.add_argument(
        "--tick-slot",
        type=float,
        help="the driver sends rate x this many ticks at once every this many seconds",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        help="ticks/s in all until the clients are connected (default: --rate)",
    )
    parser.add_argument("--markets", type=int)
    parser.add_argument("--workers", type=int, help="load-generator processes")
    parser.add_argument(
        "--loadgen-nice", type=int, default=0, help="niceness of the load generators (0-19)"
    )
    parser.add_argument("--duration", type=float, help="measured seconds")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--settle", type=float, default=3.0, help="pause after each run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle", type=int, help="idle connections for RSS")
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument(
        "--connect-concurrency", type=int, help="handshakes in flight per load generator"
    )
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    parser.add_argument(
        "--baseline-max-buffer",
        type=int,
        default=768 * 1024,
        help="baseline closes a client (1013) whose write buffer exceeds this many bytes",
    )
    parser.add_argument(
        "--baseline-gc",
        choices=("default", "tuned"),
        help="tuned: the baseline sets the garbage collector as the gateway does",
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
    preset = SCENARIOS.get(args.scenario or "", {})
    for name, value in {**DEFAULTS, **preset}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    raise_fd_limit()
    gateway_env = {
        **SCENARIO_GATEWAY_ENV.get(args.scenario or "", {}),
        **dict(item.split("=", 1) for item in args.gateway_env),
    }
    with Stack(gateway_env=gateway_env) as stack:
        return asyncio.run(run_http(args, stack) if args.http else fanout(args, stack))


if __name__ == "__main__":
    sys.exit(main())
