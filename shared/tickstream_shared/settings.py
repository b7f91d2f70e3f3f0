"""Typed settings read once from the environment at start and passed down; one class per concern."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, get_type_hints

from tickstream_shared.errors import ConfigError, echo
from tickstream_shared.naming import MARKET_SPEC_RE, Market, TopicFamily, candle_file_market

T = TypeVar("T")

_MIB: Final = 1024 * 1024
_TIB: Final = 1024 * 1024 * _MIB
_HOUR_MS: Final = 3_600_000
_DAY_MS: Final = 24 * _HOUR_MS
_YEAR_MS: Final = 365 * _DAY_MS


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """Declare one setting: its environment variable, default, documentation line and bounds.

    `ge`/`le` bound numbers (inclusive) and `choices` lists the allowed strings; `load`
    refuses anything else with a ConfigError naming the variable. A `secret` is left out of
    the settings' repr, so logging the settings never prints it.
    """
    metadata = {"env": env, "doc": doc, "ge": ge, "le": le, "choices": choices}
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = setting(
        "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka bootstrap servers, comma separated."
    )
    topic_partitions: int = setting(
        "KAFKA_TOPIC_PARTITIONS",
        1,
        "Partitions per tick topic when tickstream creates it (one keeps per-market order).",
        ge=1,
        le=1000,
    )
    replication_factor: int = setting(
        "KAFKA_REPLICATION_FACTOR",
        1,
        "Replication factor of topics tickstream creates.",
        ge=1,
        le=10,
    )
    metadata_max_age_ms: int = setting(
        "KAFKA_METADATA_MAX_AGE_MS",
        1000,
        "How often consumers refresh topic metadata: a new market's topic is picked up by"
        " stats, alerts and the gateway within this time.",
        ge=100,
        le=300_000,
    )
    fetch_max_wait_ms: int = setting(
        "KAFKA_FETCH_MAX_WAIT_MS",
        50,
        "Longest a live consumer's fetch (the gateway's feed) waits at the broker for new"
        " records. Kafka answers as soon as records arrive; some brokers (Tansu) poll and answer"
        " up to half of it late, so it bounds tick-to-client latency there.",
        ge=1,
        le=10_000,
    )
    batch_fetch_max_wait_ms: int = setting(
        "KAFKA_BATCH_FETCH_MAX_WAIT_MS",
        250,
        "Longest a batching consumer's fetch (stats, alerts) waits at the broker until"
        " KAFKA_BATCH_FETCH_MIN_BYTES have arrived: fewer fetches of every partition, at most"
        " this much later.",
        ge=1,
        le=10_000,
    )
    batch_fetch_min_bytes: int = setting(
        "KAFKA_BATCH_FETCH_MIN_BYTES",
        65_536,
        "Bytes a batching consumer's fetch (stats, alerts) waits for at the broker (up to"
        " KAFKA_BATCH_FETCH_MAX_WAIT_MS) before it is answered; live consumers take 1 byte.",
        ge=1,
        le=16 * 1024 * 1024,
    )
    max_partition_fetch_bytes: int = setting(
        "KAFKA_MAX_PARTITION_FETCH_BYTES",
        1024 * 1024,
        "Most bytes one fetch returns per partition (at least one record batch is returned"
        " whatever its size); with KAFKA_FETCH_MAX_BYTES it bounds what a consumer buffers.",
        ge=1024,
        le=64 * 1024 * 1024,
    )
    fetch_max_bytes: int = setting(
        "KAFKA_FETCH_MAX_BYTES",
        16 * 1024 * 1024,
        "Most bytes one fetch response carries over all its partitions: a consumer of a"
        " thousand partitions catching up buffers this much per broker, not a thousand times"
        " KAFKA_MAX_PARTITION_FETCH_BYTES.",
        ge=1024,
        le=256 * 1024 * 1024,
    )
    # Retention of the topics tickstream creates, by family. Ticks are read within seconds and
    # their minutes are stored in PostgreSQL, so their log only has to outlast a consumer's
    # outage; alerts and dead letters are few and kept for people to read. The defaults fit
    # one machine (about 3 GB of ticks an hour at 4,000 ticks/s); deploy/ sets production's.
    ticks_retention_ms: int = setting(
        "KAFKA_TICKS_RETENTION_MS",
        _HOUR_MS,
        "Tick topics (`ticks.*`) keep records at least this long, then drop them (Kafka"
        " `retention.ms`): a stats or alerts consumer stopped for longer loses ticks.",
        ge=1000,
        le=_YEAR_MS,
    )
    ticks_retention_bytes: int = setting(
        "KAFKA_TICKS_RETENTION_BYTES",
        32 * _MIB,
        "Most bytes a tick topic keeps per partition (Kafka `retention.bytes`), whatever their"
        " age: a burst on one market cannot fill the disk.",
        ge=64 * 1024,
        le=_TIB,
    )
    alerts_retention_ms: int = setting(
        "KAFKA_ALERTS_RETENTION_MS",
        7 * _DAY_MS,
        "How long the `alerts` topic keeps records (they are also stored in PostgreSQL).",
        ge=1000,
        le=_YEAR_MS,
    )
    alerts_retention_bytes: int = setting(
        "KAFKA_ALERTS_RETENTION_BYTES",
        256 * _MIB,
        "Most bytes the `alerts` topic keeps per partition.",
        ge=64 * 1024,
        le=_TIB,
    )
    deadletter_retention_ms: int = setting(
        "KAFKA_DEADLETTER_RETENTION_MS",
        7 * _DAY_MS,
        "How long the `deadletter` topic keeps records: the time someone has to look at them.",
        ge=1000,
        le=_YEAR_MS,
    )
    deadletter_retention_bytes: int = setting(
        "KAFKA_DEADLETTER_RETENTION_BYTES",
        256 * _MIB,
        "Most bytes the `deadletter` topic keeps per partition.",
        ge=64 * 1024,
        le=_TIB,
    )

    def retention(self, family: TopicFamily) -> tuple[int, int]:
        """(retention.ms, retention.bytes) of the topics of `family`."""
        if family == "alerts":
            return self.alerts_retention_ms, self.alerts_retention_bytes
        if family == "deadletter":
            return self.deadletter_retention_ms, self.deadletter_retention_bytes
        return self.ticks_retention_ms, self.ticks_retention_bytes


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis URL: latest stats and ranks; the watchers' lease, checkpoints and feed status.",
    )


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = setting(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/tickstream",
        "PostgreSQL/TimescaleDB URL for bars, alerts and history.",
    )
    retention_days: int = setting(
        "STORAGE_RETENTION_DAYS",
        30,
        "Days of bars and alerts kept, counted back from the newest stored minute (event time);"
        " older rows are dropped by a TimescaleDB policy or the stats retention job.",
        ge=2,
        le=36500,
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = setting(
        "LOG_LEVEL",
        "INFO",
        "Log level: DEBUG, INFO, WARNING or ERROR.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"),
    )
    format: str = setting(
        "LOG_FORMAT",
        "text",
        "Log lines as `text` (`<time> <LEVEL> <service> <logger>: <message>`) or `json` (one"
        " object per line); uvicorn's lines too. Token query parameters are always redacted.",
        choices=("text", "json"),
    )


# What `tickstream up --source live` (`make run SOURCE=live`) watches when WATCHER_MARKETS is
# not set: every USD and USDT spot market of the four exchanges (about 1,500 in late 2026), up
# to WHOLE_MARKET_MAX markets. A one-service deployment keeps WATCHER_MARKETS' own default.
WHOLE_MARKET: Final = tuple(
    f"{exchange}:*-{quote}"
    for exchange in ("binance", "coinbase", "kraken", "okx")
    for quote in ("usd", "usdt")
)
WHOLE_MARKET_MAX: Final = 3000


@dataclass(frozen=True, slots=True)
class WatcherSettings:
    source: str = setting(
        "WATCHER_SOURCE",
        "synthetic",
        "Where ticks come from: `synthetic`, `replay` or `live` (the exchanges' public feeds).",
        choices=("synthetic", "replay", "live"),
    )
    markets: tuple[str, ...] = setting(
        "WATCHER_MARKETS",
        (
            "binance:btc-usdt",
            "binance:eth-usdt",
            "binance:sol-usdt",
            "coinbase:btc-usd",
            "coinbase:eth-usd",
            "kraken:btc-usd",
        ),
        "Markets of the synthetic and live sources, comma separated `<exchange>:<base>-<quote>`;"
        " the live source also takes patterns such as `binance:*-usdt`.",
    )
    max_markets: int = setting(
        "WATCHER_MAX_MARKETS",
        100,
        "Live source: most markets watched in all; patterns fill up to it after exact markets.",
        ge=1,
        le=5000,
    )
    backfill_minutes: int = setting(
        "WATCHER_BACKFILL_MINUTES",
        1440,
        "Live source: closed minutes fetched from the exchange's REST candles at start (after a"
        " reconnect: the minutes missed, up to this many).",
        ge=0,
        le=1440,
    )
    backfill_workers: int = setting(
        "WATCHER_BACKFILL_WORKERS",
        4,
        "Live source: backfill requests in flight at once per exchange (one market each); all"
        " of an exchange's REST shares its one paced client, so this only hides latency.",
        ge=1,
        le=32,
    )
    listing_refresh_s: int = setting(
        "WATCHER_LISTING_REFRESH_S",
        300,
        "Live source: how often each exchange's listing is read again while running, so that"
        " new markets matching WATCHER_MARKETS join and delisted ones leave; 0 = only at start.",
        ge=0,
        le=86_400,
    )
    feed_silence_ms: int = setting(
        "WATCHER_FEED_SILENCE_MS",
        0,
        "Live source: a connection with no frame (data or heartbeat) for this long is dropped"
        " and reconnected; 0 = each exchange's own bound (Binance and OKX 30 s, Coinbase and"
        " Kraken 15 s).",
        ge=0,
        le=600_000,
    )
    max_ahead_ms: int = setting(
        "WATCHER_MAX_AHEAD_MS",
        5_000,
        "Live source: an update stamped (or of a minute starting) more than this after the"
        " watcher received it is refused and counted; stamps within it are clamped to the"
        " receive time, so event time never runs ahead of wall time.",
        ge=0,
        le=60_000,
    )
    plausible_price_factor: float = setting(
        "WATCHER_PLAUSIBLE_PRICE_FACTOR",
        3.0,
        "Live source: a bar whose high is above this times the median close of the market's"
        " last hour of closed bars (or whose low is below the median divided by it) is not"
        " published until the exchange's REST candle confirms its minute; 0 = no check.",
        ge=0,
        le=1e6,
    )
    plausible_volume_factor: float = setting(
        "WATCHER_PLAUSIBLE_VOLUME_FACTOR",
        100.0,
        "Live source: the same for a volume above this times the largest minute volume of the"
        " market's last hour; 0 = no check.",
        ge=0,
        le=1e12,
    )
    reconcile_after_ms: int = setting(
        "WATCHER_RECONCILE_AFTER_MS",
        300_000,
        "Live source: every closed minute is compared with the exchange's REST candle once it"
        " ended this long ago (or as soon after as the exchange's request limits allow) and"
        " corrected if it differs; 0 = no reconciliation.",
        ge=0,
        le=3_000_000,
    )
    reconcile_settle_ms: int = setting(
        "WATCHER_RECONCILE_SETTLE_MS",
        60_000,
        "Live source: how long after a minute's end its REST candle is taken as final.",
        ge=0,
        le=600_000,
    )
    market_silence_ms: int = setting(
        "WATCHER_MARKET_SILENCE_MS",
        60_000,
        "Live source: a market silent this long (or ten times its usual gap, up to 30 minutes)"
        " while its connection's other markets update is shown stale, resubscribed and repaired"
        " from REST; 0 = no per-market watchdog.",
        ge=0,
        le=1_800_000,
    )
    group: str = setting(
        "WATCHER_GROUP",
        "main",
        "Watchers with the same group and the same Redis share one lease: one publishes, the"
        " others stand by and take over when it stops renewing.",
    )
    lease_ms: int = setting(
        "WATCHER_LEASE_MS",
        5000,
        "How long the publishing watcher's lease lasts without renewal (renewed every fifth of"
        " it): a standby takes over at most this long, plus its start, after the active one dies.",
        ge=1000,
        le=60_000,
    )
    seed: int = setting(
        "WATCHER_SEED", 7, "Random seed of the synthetic source.", ge=0, le=2**32 - 1
    )
    tick_interval_ms: int = setting(
        "WATCHER_TICK_INTERVAL_MS",
        1000,
        "Synthetic source: wall-clock milliseconds between updates of one market's bar.",
        ge=1,
        le=60_000,
    )
    synthetic_backfill_minutes: int = setting(
        "WATCHER_SYNTHETIC_BACKFILL_MINUTES",
        1440,
        "Synthetic source: closed bars generated for the minutes before the start, so charts and"
        " ranks are full from the first second (0 = none).",
        ge=0,
        le=10_080,
    )
    replay_dir: str = setting(
        "WATCHER_REPLAY_DIR",
        "../shared/data/candles",
        "Replay source: folder of `<exchange>_<base>-<quote>_1m.csv[.gz]` candle files.",
    )
    replay_markets: tuple[str, ...] = setting(
        "WATCHER_REPLAY_MARKETS",
        (),
        "Replay source: only these markets (comma separated ids); empty = every file found.",
    )
    replay_speed: float = setting(
        "WATCHER_REPLAY_SPEED",
        0.0,
        "Replay source: event time per wall time (600 = ten minutes a second); 0 = unthrottled.",
        ge=0,
        le=1e9,
    )
    replay_limit_minutes: int = setting(
        "WATCHER_REPLAY_LIMIT_MINUTES",
        0,
        "Replay source: stop after this many minutes of candles per market; 0 = all.",
        ge=0,
        le=100_000_000,
    )
    max_in_flight: int = setting(
        "WATCHER_MAX_IN_FLIGHT",
        10000,
        "Ticks handed to the producer but not yet acknowledged; the source waits beyond it.",
        ge=1,
        le=1_000_000,
    )


@dataclass(frozen=True, slots=True)
class ExchangeSettings:
    """Every exchange endpoint, so tests, proxies and mirrors can point elsewhere."""

    binance_ws_url: str = setting(
        "BINANCE_WS_URL", "wss://stream.binance.com:9443", "Binance spot WebSocket base URL."
    )
    binance_rest_url: str = setting(
        "BINANCE_REST_URL", "https://api.binance.com", "Binance spot REST base URL."
    )
    coinbase_ws_url: str = setting(
        "COINBASE_WS_URL", "wss://ws-feed.exchange.coinbase.com", "Coinbase Exchange feed URL."
    )
    coinbase_rest_url: str = setting(
        "COINBASE_REST_URL",
        "https://api.exchange.coinbase.com",
        "Coinbase Exchange REST base URL.",
    )
    kraken_ws_url: str = setting(
        "KRAKEN_WS_URL", "wss://ws.kraken.com/v2", "Kraken WebSocket v2 URL."
    )
    kraken_rest_url: str = setting(
        "KRAKEN_REST_URL", "https://api.kraken.com", "Kraken REST base URL."
    )
    okx_ws_url: str = setting(
        "OKX_WS_URL",
        "wss://ws.okx.com:8443/ws/v5/business",
        "OKX v5 business WebSocket URL (the one serving `candle1m`).",
    )
    okx_rest_url: str = setting("OKX_REST_URL", "https://www.okx.com", "OKX v5 REST base URL.")

    def endpoints(self, exchange: str) -> tuple[str, str]:
        """(WebSocket URL, REST base URL) of `exchange`, from its `<exchange>_ws_url` and
        `<exchange>_rest_url` settings; KeyError for an exchange without them."""
        try:
            return getattr(self, f"{exchange}_ws_url"), getattr(self, f"{exchange}_rest_url")
        except AttributeError:
            raise KeyError(exchange) from None


@dataclass(frozen=True, slots=True)
class StatsSettings:
    window_minutes: int = setting(
        "STATS_WINDOW_MINUTES",
        1440,
        "Rolling window length in minutes, ending at the event-time clock (1440 = 24h).",
        ge=2,
        le=10_080,
    )
    stale_seconds: int = setting(
        "STATS_STALE_SECONDS",
        300,
        "A market with no update for this long (event time, against the clock) is stale: it"
        " is marked `stale` and leaves the ranks until it trades again.",
        ge=60,
        le=604_800,
    )
    batch_max: int = setting(
        "STATS_BATCH_MAX",
        5000,
        "Most ticks processed, stored and committed as one batch.",
        ge=1,
        le=100_000,
    )
    batch_wait_ms: int = setting(
        "STATS_BATCH_WAIT_MS",
        200,
        "Longest wait for ticks when none are buffered; buffered ticks are taken at once.",
        ge=1,
        le=60_000,
    )


@dataclass(frozen=True, slots=True)
class AlertsSettings:
    factor: float = setting(
        "ALERTS_FACTOR",
        3.0,
        "A minute's value above factor x the mean of the minutes before it raises an alert.",
        ge=1.0,
        le=1e6,
    )
    window_minutes: int = setting(
        "ALERTS_WINDOW_MINUTES",
        60,
        "Minutes before the judged minute whose values make the trailing mean.",
        ge=1,
        le=1440,
    )
    min_samples: int = setting(
        "ALERTS_MIN_SAMPLES",
        30,
        "Minutes present in the trailing window needed before it can raise alerts.",
        ge=1,
        le=1440,
    )
    min_active_minutes: int = setting(
        "ALERTS_MIN_ACTIVE_MINUTES",
        45,
        "Illiquid guard: minutes with non-zero volume (the market's) the trailing window must"
        " hold, for both kinds (0 = off).",
        ge=0,
        le=1440,
    )
    min_zscore: float = setting(
        "ALERTS_MIN_ZSCORE",
        6.0,
        "Noise guard: the value must also exceed the trailing mean by more than this many"
        " population standard deviations of the trailing window (0 = off).",
        ge=0.0,
        le=1000.0,
    )
    cooldown_seconds: int = setting(
        "ALERTS_COOLDOWN_SECONDS",
        3600,
        "No new alert for a metric while the minute is less than this much event time after"
        " the minute of its last alert that is not retracted (0 = every qualifying minute).",
        ge=0,
        le=604_800,
    )
    correction_minutes: int = setting(
        "ALERTS_CORRECTION_MINUTES",
        60,
        "How far behind its market's newest minute a minute's closing or corrected bar still"
        " confirms or retracts the minute's alerts; after that they are final (a provisional"
        " one stays provisional).",
        ge=0,
        le=1440,
    )
    batch_max: int = setting(
        "ALERTS_BATCH_MAX", 5000, "Most ticks evaluated per batch.", ge=1, le=100_000
    )


# The gateway's own pages, and pages served from this machine on any port.
DEFAULT_ALLOWED_ORIGINS: Final = (
    "self",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
)
# One allowed-origin entry: what a browser sends as Origin (a scheme, a host, maybe a port;
# no path, no trailing slash), a port `*`, or the words `self` and `*`.
_ORIGIN_RE: Final = re.compile(
    r"\*|self|https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:([0-9]{1,5}|\*))?", re.IGNORECASE
)
# RFC 7518 3.2: an HS256 key has at least as many bits as the hash (256).
MIN_JWT_SECRET_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = setting("GATEWAY_HOST", "127.0.0.1", "Address the gateway listens on.")
    port: int = setting("GATEWAY_PORT", 8000, "Port the gateway listens on.", ge=1, le=65535)
    client_queue_bytes: int = setting(
        "GATEWAY_CLIENT_QUEUE_BYTES",
        4 * 1024 * 1024,
        "Bytes of frames queued per WebSocket client once conflated (each frame counts its"
        " size + 64); a client with more to receive is closed (1013).",
        ge=1024 * 1024,
        le=1024 * 1024 * 1024,
    )
    max_frame_age_ms: int = setting(
        "GATEWAY_MAX_FRAME_AGE_MS",
        50,
        "A WebSocket client is written at most once per this interval (at once after a quiet"
        " one); each write carries every closed bar, alert and reply, and of each forming bar"
        " and ranking only its newest state (0: every event-loop turn).",
        ge=0,
        le=60_000,
    )
    ws_compression: bool = setting(
        "GATEWAY_WS_COMPRESSION",
        False,
        "Offer permessage-deflate on WebSockets: less bandwidth, but every frame is compressed"
        " again per client (a full history frame: about 3 ms of CPU each).",
    )
    rank_interval_ms: int = setting(
        "GATEWAY_RANK_INTERVAL_MS",
        1000,
        "How often rank snapshots are checked and pushed.",
        ge=50,
        le=60_000,
    )
    feed_grace_ms: int = setting(
        "GATEWAY_FEED_GRACE_MS",
        10_000,
        "How long the gateway goes on reading a market's tick topic after its last WebSocket"
        " subscriber left (a page reload does not make it stop and start again).",
        ge=0,
        le=3_600_000,
    )
    history_minutes: int = setting(
        "GATEWAY_HISTORY_MINUTES",
        1440,
        "Minutes of bars sent as history before live updates (at most this + 1 bars).",
        ge=1,
        le=1440,
    )
    allowed_origins: tuple[str, ...] = setting(
        "GATEWAY_ALLOWED_ORIGINS",
        DEFAULT_ALLOWED_ORIGINS,
        "Origins whose pages may open the WebSocket, comma separated: `self` (the Origin names"
        " the Host the request was sent to), `scheme://host[:port]`, `scheme://host:*` (any"
        " port) or `*` (any origin). An upgrade with another Origin header is refused with"
        " 403; clients that send no Origin (programs) are not affected.",
    )
    jwt_secret: str = setting(
        "GATEWAY_JWT_SECRET",
        "",
        "HS256 key of the tokens the WebSocket and every `/api/` route then require (query"
        " parameter `token` or `Authorization: Bearer`); empty = no authentication. At least"
        " 32 bytes.",
        secret=True,
    )
    max_connections: int = setting(
        "GATEWAY_MAX_CONNECTIONS",
        10_000,
        "WebSocket connections open at once; an upgrade beyond it is refused with 503.",
        ge=1,
        le=1_000_000,
    )
    max_subscriptions: int = setting(
        "GATEWAY_MAX_SUBSCRIPTIONS",
        100,
        "Subscriptions (markets, rank kinds, alerts) one connection may hold; a subscribe"
        " beyond it gets the error `too_many_subscriptions`.",
        ge=1,
        le=100_000,
    )
    max_commands_per_s: float = setting(
        "GATEWAY_MAX_COMMANDS_PER_S",
        20.0,
        "Commands per second one connection may send on average (token bucket refill); a"
        " command beyond it gets the error `rate_limited`.",
        ge=0.1,
        le=100_000,
    )
    command_burst: int = setting(
        "GATEWAY_COMMAND_BURST",
        100,
        "Commands one connection may send at once (token bucket size); after this many more"
        " refused with `rate_limited` without a pause, the connection is closed with 1008.",
        ge=1,
        le=100_000,
    )
    token_max_lifetime_s: int = setting(
        "GATEWAY_TOKEN_MAX_LIFETIME_S",
        7 * 86_400,
        "Longest a token may live: one whose `exp` is further than this from now, or from its"
        " `iat` when it has one, is refused with 401.",
        ge=60,
        le=366 * 86_400,
    )
    request_read_timeout_s: float = setting(
        "GATEWAY_REQUEST_READ_TIMEOUT_S",
        10.0,
        "A client must send a whole HTTP request (line, headers, any body) within this long of"
        " its first byte, and a new connection within this long of opening; else it is closed.",
        ge=0.1,
        le=600,
    )
    keep_alive_timeout_s: float = setting(
        "GATEWAY_KEEP_ALIVE_TIMEOUT_S",
        5.0,
        "An HTTP connection idle this long after an answer is closed (WebSockets are not).",
        ge=0.1,
        le=600,
    )
    max_sockets: int = setting(
        "GATEWAY_MAX_SOCKETS",
        11_000,
        "Client connections (HTTP and WebSocket) open at once; one beyond it is answered 503"
        " and closed before its request is read. Above GATEWAY_MAX_CONNECTIONS.",
        ge=2,
        le=1_000_000,
    )
    access_log: str = setting(
        "GATEWAY_ACCESS_LOG",
        "errors",
        "Which HTTP requests and WebSocket upgrades get a log line: `off`, `errors` (5xx"
        " answers and those slower than GATEWAY_ACCESS_LOG_SLOW_MS) or `all`.",
        choices=("off", "errors", "all"),
    )
    access_log_slow_ms: int = setting(
        "GATEWAY_ACCESS_LOG_SLOW_MS",
        1000,
        "With GATEWAY_ACCESS_LOG=errors, requests answered slower than this are logged too;"
        " 0 = none for slowness.",
        ge=0,
        le=3_600_000,
    )


@dataclass(frozen=True, slots=True)
class ObservabilitySettings:
    """Where watcher, stats and alerts serve /metrics, /livez and /readyz."""

    host: str = setting(
        "METRICS_HOST",
        "127.0.0.1",
        "Address the metrics and health server of watcher, stats and alerts listens on.",
    )
    watcher_port: int = setting(
        "WATCHER_METRICS_PORT",
        0,
        "Port of the watcher's /metrics, /livez and /readyz; 0 = no such server.",
        ge=0,
        le=65535,
    )
    stats_port: int = setting(
        "STATS_METRICS_PORT",
        0,
        "Port of the stats service's /metrics, /livez and /readyz; 0 = no such server.",
        ge=0,
        le=65535,
    )
    alerts_port: int = setting(
        "ALERTS_METRICS_PORT",
        0,
        "Port of the alerts service's /metrics, /livez and /readyz; 0 = no such server.",
        ge=0,
        le=65535,
    )
    readiness_timeout_ms: int = setting(
        "READINESS_TIMEOUT_MS",
        2000,
        "How long /readyz (and the gateway's /healthz) waits for each dependency to answer.",
        ge=100,
        le=60_000,
    )

    def port_of(self, service: str) -> int:
        """The metrics port of `service`; 0 for none (the gateway serves them on its own port)."""
        ports = {"watcher": self.watcher_port, "stats": self.stats_port, "alerts": self.alerts_port}
        return ports.get(service, 0)


@dataclass(frozen=True, slots=True)
class LocalStackSettings:
    """How `tickstream up` runs its local broker (not read by the services)."""

    broker_storage: str = setting(
        "TICKSTREAM_BROKER_STORAGE",
        "memory",
        "Where the local broker (Tansu 0.6) keeps its log: `memory` (fast, but lost at every"
        " restart and never trimmed: Tansu ignores retention, so its memory grows with every"
        " record) or `s3` in a SeaweedFS under the data folder (kept across restarts, trimmed to"
        " each topic's retention, but only about 100 record batches a second; see"
        " docs/operations.md).",
        choices=("memory", "s3"),
    )
    trim_interval_ms: int = setting(
        "TICKSTREAM_BROKER_TRIM_INTERVAL_MS",
        5000,
        "With TICKSTREAM_BROKER_STORAGE=s3: how often the record batches that are past their"
        " topic's retention.ms or beyond its retention.bytes are deleted (Tansu 0.6 applies"
        " neither itself); a log holds at most this much more than its retention.",
        ge=100,
        le=600_000,
    )


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Everything any service may need; each service reads the parts it uses."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    log: LogSettings = field(default_factory=LogSettings)
    watcher: WatcherSettings = field(default_factory=WatcherSettings)
    exchanges: ExchangeSettings = field(default_factory=ExchangeSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    alerts: AlertsSettings = field(default_factory=AlertsSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    local: LocalStackSettings = field(default_factory=LocalStackSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServiceSettings:
        """Read every setting from environ; raises ConfigError naming the bad variable."""
        parts = {f.name: load(_section_type(f), environ) for f in dataclasses.fields(cls)}
        settings = cls(**parts)
        # A warm-up rebuilds the stats window from stored bars: retention must keep all of it.
        if settings.database.retention_days * 1440 < settings.stats.window_minutes:
            raise ConfigError(
                "STORAGE_RETENTION_DAYS",
                f"{settings.database.retention_days} days keep less than STATS_WINDOW_MINUTES"
                f" ({settings.stats.window_minutes} minutes)",
            )
        for env, value, schemes in _url_settings(settings):
            problem = _url_problem(value, schemes)
            if problem is not None:
                raise ConfigError(env, problem)
        for server in settings.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", f"{server!r} is not host:port")
        if not _GROUP_RE.fullmatch(settings.watcher.group):
            raise ConfigError("WATCHER_GROUP", "use 1-32 characters of a-z, 0-9 and -")
        if 0 < settings.watcher.feed_silence_ms < 1000:
            raise ConfigError("WATCHER_FEED_SILENCE_MS", "use 0 (the exchange's bound) or >= 1000")
        for env, factor in (
            ("WATCHER_PLAUSIBLE_PRICE_FACTOR", settings.watcher.plausible_price_factor),
            ("WATCHER_PLAUSIBLE_VOLUME_FACTOR", settings.watcher.plausible_volume_factor),
        ):
            if 0 < factor <= 1:
                raise ConfigError(env, f"{factor!r}: use 0 (no check) or a factor above 1")
        _check_markets(settings.watcher, settings.exchanges)
        if settings.watcher.source == "replay":
            _check_replay(settings.watcher)
        _check_gateway_access(settings.gateway)
        return settings


_GROUP_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _check_gateway_access(gateway: GatewaySettings) -> None:
    if gateway.max_sockets <= gateway.max_connections:
        raise ConfigError(
            "GATEWAY_MAX_SOCKETS",
            f"{gateway.max_sockets} leaves no room for HTTP beside GATEWAY_MAX_CONNECTIONS"
            f" ({gateway.max_connections}) WebSockets",
        )
    for origin in gateway.allowed_origins:
        if not _ORIGIN_RE.fullmatch(origin):
            raise ConfigError(
                "GATEWAY_ALLOWED_ORIGINS",
                f"{origin[:64]!r} is not `*`, `self`, `scheme://host[:port]` or `scheme://host:*`",
            )
    secret_bytes = len(gateway.jwt_secret.encode())
    if 0 < secret_bytes < MIN_JWT_SECRET_BYTES:
        raise ConfigError(
            "GATEWAY_JWT_SECRET",
            f"{secret_bytes} bytes; an HS256 key needs at least {MIN_JWT_SECRET_BYTES}",
        )


def _check_markets(watcher: WatcherSettings, exchanges: ExchangeSettings) -> None:
    """WATCHER_MARKETS is well formed for its source: a typo stops the start with one line,
    not a traceback from deep inside the source once the service runs."""
    live = watcher.source == "live"
    expected = "`<exchange>:<base>-<quote>` such as binance:btc-usdt" + (
        ", or a pattern such as binance:*-usdt" if live else ""
    )
    if not watcher.markets and watcher.source != "replay":
        raise ConfigError("WATCHER_MARKETS", f"empty; list markets, comma separated, as {expected}")
    for entry in watcher.markets:
        match = MARKET_SPEC_RE.match(entry.lower())
        if match is None:
            raise ConfigError("WATCHER_MARKETS", f"{echo(entry)} is not {expected}")
        if "*" in entry and watcher.source == "synthetic":
            raise ConfigError(
                "WATCHER_MARKETS",
                f"{echo(entry)}: patterns are for the live source; the synthetic source needs"
                " exact markets such as binance:btc-usdt",
            )
        if live and not hasattr(exchanges, f"{match[1]}_ws_url"):
            known = [f.name.removesuffix("_ws_url") for f in dataclasses.fields(exchanges)]
            known = [name for name in known if not name.endswith("_url")]
            raise ConfigError(
                "WATCHER_MARKETS",
                f"{echo(entry)}: unknown exchange {match[1]!r}; the live source knows"
                f" {', '.join(known)}",
            )
    for entry in watcher.replay_markets:
        if MARKET_SPEC_RE.match(entry.lower()) is None or "*" in entry:
            raise ConfigError(
                "WATCHER_REPLAY_MARKETS",
                f"{echo(entry)} is not a market id `<exchange>:<base>-<quote>` such as"
                " binance:btc-usdt",
            )


def _check_replay(watcher: WatcherSettings) -> None:
    """The replay folder exists, can be read and holds a candle file of every market asked for:
    a source that cannot start is a configuration error, not an outage to retry."""
    folder = watcher.replay_dir
    env = "WATCHER_REPLAY_DIR"
    if not os.path.exists(folder):
        raise ConfigError(env, f"{echo(folder)} does not exist (cwd {os.getcwd()})")
    if not os.path.isdir(folder):
        raise ConfigError(env, f"{echo(folder)} is not a folder")
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise ConfigError(env, f"cannot read {echo(folder)}: {exc.strerror}") from None
    found = {m for m in map(candle_file_market, names) if m is not None}
    if not found:
        raise ConfigError(
            env, f"{echo(folder)} holds no `<exchange>_<base>-<quote>_1m.csv[.gz]` candle file"
        )
    for entry in watcher.replay_markets:
        if Market.parse(entry) not in found:
            raise ConfigError(
                "WATCHER_REPLAY_MARKETS", f"{echo(entry)} has no candle file in {echo(folder)}"
            )
    unreadable = sorted(
        name
        for name in names
        if candle_file_market(name) is not None
        and not os.access(os.path.join(folder, name), os.R_OK)
    )
    if unreadable:
        raise ConfigError(env, f"cannot read {echo(unreadable[0])} in {echo(folder)}")


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """Why `value` is not a URL of one of `schemes` with a host (and a valid port), or None."""
    if not value.startswith(schemes) or any(c.isspace() for c in value):
        return f"{echo(value)} is not a {' or '.join(schemes)} URL"
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"{echo(value)} has no valid port"
    if parts.scheme == "unix":
        return None if parts.path else f"{echo(value)} names no socket path"
    if not parts.hostname and not (parts.scheme.startswith("postgres") and "host=" in parts.query):
        return f"{echo(value)} names no host"
    return None


def _url_settings(settings: ServiceSettings) -> list[tuple[str, str, tuple[str, ...]]]:
    """(variable, value, allowed schemes) of every URL setting."""
    ws, http = ("ws://", "wss://"), ("http://", "https://")
    ex = settings.exchanges
    return [
        ("REDIS_URL", settings.redis.url, ("redis://", "rediss://", "unix://")),
        ("DATABASE_URL", settings.database.url, ("postgresql://", "postgres://")),
        ("BINANCE_WS_URL", ex.binance_ws_url, ws),
        ("BINANCE_REST_URL", ex.binance_rest_url, http),
        ("COINBASE_WS_URL", ex.coinbase_ws_url, ws),
        ("COINBASE_REST_URL", ex.coinbase_rest_url, http),
        ("KRAKEN_WS_URL", ex.kraken_ws_url, ws),
        ("KRAKEN_REST_URL", ex.kraken_rest_url, http),
        ("OKX_WS_URL", ex.okx_ws_url, ws),
        ("OKX_REST_URL", ex.okx_rest_url, http),
    ]


def _section_type(f: dataclasses.Field[Any]) -> type[Any]:
    section: type[Any] = get_type_hints(ServiceSettings)[f.name]
    return section


def load(cls: type[T], environ: Mapping[str, str]) -> T:
    """Build one settings class from environ, converting each value to its field type."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        env = f.metadata["env"]
        if env in environ:
            value = _convert(env, environ[env], hints[f.name])
            _check_bounds(env, value, f.metadata)
            values[f.name] = value
    return cls(**values)


def _check_bounds(env: str, value: Any, metadata: Mapping[str, Any]) -> None:
    ge, le, choices = metadata.get("ge"), metadata.get("le"), metadata.get("choices", ())
    if ge is not None and value < ge:
        raise ConfigError(env, f"{value!r} is below the minimum {ge}")
    if le is not None and value > le:
        raise ConfigError(env, f"{value!r} is above the maximum {le}")
    if choices and value not in choices:
        raise ConfigError(env, f"{value!r} is not one of {', '.join(choices)}")


def _convert(env: str, raw: str, target: Any) -> Any:
    try:
        if target is int:
            return int(raw)
        if target is float:
            number = float(raw)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            return number
        if target is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"{raw!r} is not a boolean")
        if typing.get_origin(target) is tuple:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ConfigError(env, f"cannot read {raw!r}: {exc}") from exc
    return raw


def documented_settings() -> Iterator[tuple[str, str, Any, str]]:
    """Yield (section, env var, default, doc) for every setting, for docs and checks."""
    for section in dataclasses.fields(ServiceSettings):
        section_cls = _section_type(section)
        for f in dataclasses.fields(section_cls):
            yield section.name, f.metadata["env"], f.default, f.metadata["doc"]
