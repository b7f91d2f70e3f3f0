-- tickstream schema; every statement is idempotent so any service may apply it at start.
CREATE TABLE IF NOT EXISTS ticks (
    market      text             NOT NULL, -- <exchange>:<base>-<quote>
    exchange_ts timestamptz      NOT NULL, -- event time from the exchange
    seq         bigint           NOT NULL, -- watcher's per-market sequence number
    received_ts timestamptz      NOT NULL,
    price       double precision NOT NULL,
    volume      double precision NOT NULL,
    -- A tick re-delivered after a restart hits this key and is not stored twice.
    PRIMARY KEY (market, exchange_ts, seq)
);

CREATE TABLE IF NOT EXISTS alerts (
    alert_id       text             PRIMARY KEY, -- <metric>@<exchange_ts>#<seq>: one per tick
    metric         text             NOT NULL,
    kind           text             NOT NULL,
    exchange_ts    timestamptz      NOT NULL,
    seq            bigint           NOT NULL,
    value          double precision NOT NULL,
    mean           double precision NOT NULL,
    factor         double precision NOT NULL,
    ratio          double precision NOT NULL,
    window_seconds integer          NOT NULL,
    samples        integer          NOT NULL,
    published      boolean          NOT NULL DEFAULT false,
    created_at     timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (exchange_ts DESC);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (created_at) WHERE NOT published;

-- TimescaleDB when the extension is installed (docker-compose), plain PostgreSQL otherwise.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('ticks', 'exchange_ts', if_not_exists => TRUE,
                                  migrate_data => TRUE);
    END IF;
END
$$;
