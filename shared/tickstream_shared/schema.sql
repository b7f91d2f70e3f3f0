-- tickstream schema; every statement is idempotent so any service may apply it at start.
-- Times are epoch milliseconds (bigint): exact, cheap to COPY, and the unit of every message.

-- Tables of the tick-per-row model (before minute bars) are kept under another name rather
-- than dropped: nothing reads them any more, and an operator may still want their data.
DO $$
BEGIN
    IF to_regclass('ticks') IS NOT NULL AND to_regclass('ticks_v1') IS NULL THEN
        ALTER TABLE ticks RENAME TO ticks_v1;
    END IF;
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'alerts' AND column_name = 'window_seconds')
       AND to_regclass('alerts_v1') IS NULL THEN
        ALTER TABLE alerts RENAME TO alerts_v1;
        ALTER INDEX IF EXISTS alerts_by_time RENAME TO alerts_v1_by_time;
        ALTER INDEX IF EXISTS alerts_unpublished RENAME TO alerts_v1_unpublished;
    END IF;
END
$$;

-- One row per market and minute: the newest update of that bar (highest seq) wins.
CREATE TABLE IF NOT EXISTS bars (
    market      text             NOT NULL, -- <exchange>:<base>-<quote>
    minute      bigint           NOT NULL, -- bar open time, ms since the epoch
    seq         bigint           NOT NULL, -- watcher's per-market sequence of the update
    exchange_ts bigint           NOT NULL, -- event time of the update, from the exchange
    received_ts bigint           NOT NULL, -- when the watcher received it
    open        double precision NOT NULL,
    high        double precision NOT NULL,
    low         double precision NOT NULL,
    close       double precision NOT NULL,
    volume      double precision NOT NULL, -- base units traded in the minute so far
    trades      bigint,                    -- trade count so far, when the source knows it
    closed      boolean          NOT NULL,
    PRIMARY KEY (market, minute)
);
CREATE INDEX IF NOT EXISTS bars_by_minute ON bars (minute DESC);
-- Quote units traded in the minute so far (the turnover), where the source says it; NULL is
-- unknown (a source that does not give it, a REST candle without it, a row stored before it).
-- Added to tables made before it too; last, so `INSERT ... SELECT *` from a stage made
-- `LIKE bars` keeps the column order.
ALTER TABLE bars ADD COLUMN IF NOT EXISTS quote_volume double precision;

CREATE TABLE IF NOT EXISTS alerts (
    alert_id       text             PRIMARY KEY, -- <metric>@<minute>: one per metric and minute
    metric         text             NOT NULL,
    kind           text             NOT NULL,
    minute         bigint           NOT NULL,
    exchange_ts    bigint           NOT NULL,
    seq            bigint           NOT NULL,
    value          double precision NOT NULL,
    mean           double precision NOT NULL,
    factor         double precision NOT NULL,
    ratio          double precision NOT NULL,
    window_minutes integer          NOT NULL,
    samples        integer          NOT NULL,
    published      boolean          NOT NULL DEFAULT false, -- this state is on Kafka (outbox)
    created_at     timestamptz      NOT NULL DEFAULT now()
);
-- Statuses (provisional / confirmed / retracted), added to tables made before them too. A row
-- stored without them (by a service from before statuses) is provisional: it was raised on
-- whatever update crossed, forming or not; the block below judges what it can of it.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'provisional'
    CHECK (status IN ('provisional', 'confirmed', 'retracted'));
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS status_seq bigint;  -- seq of the update that set it
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS status_ts bigint;   -- its event time
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS final_value double precision; -- closed bar's value
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS status_changed_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS alerts_by_minute ON alerts (minute DESC);
CREATE INDEX IF NOT EXISTS alerts_by_metric ON alerts (metric, minute DESC);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (created_at) WHERE NOT published;

-- Rows without a status_seq were stored before statuses: one raised on the update that is its
-- minute's stored closed bar stands on a final value and is confirmed; any other was raised
-- on a forming value and stays provisional (never judged: no closed bar will come again).
-- Then status_seq and status_ts are those of the raising update, so this runs once per row.
UPDATE alerts AS a
   SET status = 'confirmed', final_value = a.value
 WHERE a.status_seq IS NULL
   AND EXISTS (SELECT 1 FROM bars AS b
                WHERE b.market = left(a.metric, length(a.metric) - length(a.kind) - 1)
                  AND b.minute = a.minute AND b.seq = a.seq AND b.closed);
UPDATE alerts SET status_seq = seq, status_ts = exchange_ts WHERE status_seq IS NULL;

-- The newest stored minute: "now" for retention, which counts in event time so that a replay
-- of old candles is not deleted as soon as it is stored.
CREATE OR REPLACE FUNCTION tickstream_bars_now() RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT coalesce(max(minute), 0) FROM bars $$;

-- TimescaleDB when the extension is installed (docker compose), plain PostgreSQL otherwise.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('bars', 'minute', chunk_time_interval => 86400000,
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM set_integer_now_func('bars', 'tickstream_bars_now', replace_if_exists => TRUE);
        ALTER TABLE bars SET (timescaledb.compress, timescaledb.compress_segmentby = 'market',
                              timescaledb.compress_orderby = 'minute DESC');
    END IF;
END
$$;

-- Retention: with TimescaleDB a retention policy (drop whole chunks) and a compression policy
-- for chunks older than two days; on plain PostgreSQL the stats service's retention job deletes
-- old bars with tickstream_drop_expired() hourly (alerts: always by that job). Both count from
-- tickstream_bars_now().
CREATE OR REPLACE FUNCTION tickstream_configure_retention(retention_ms bigint) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN 'job';
    END IF;
    EXECUTE 'SELECT remove_retention_policy(''bars'', if_exists => TRUE)';
    EXECUTE format('SELECT add_retention_policy(''bars'', drop_after => %s::bigint)',
                   retention_ms);
    EXECUTE 'SELECT remove_compression_policy(''bars'', if_exists => TRUE)';
    EXECUTE 'SELECT add_compression_policy(''bars'', compress_after => 172800000::bigint)';
    RETURN 'timescaledb';
END
$$;

CREATE OR REPLACE FUNCTION tickstream_drop_expired(retention_ms bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    horizon bigint := tickstream_bars_now() - retention_ms;
    dropped bigint;
BEGIN
    dropped := 0;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        DELETE FROM bars WHERE minute < horizon;
        GET DIAGNOSTICS dropped = ROW_COUNT;
    END IF;
    DELETE FROM alerts WHERE minute < horizon AND published;
    RETURN dropped;
END
$$;
