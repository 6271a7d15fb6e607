-- borderflow initial schema. Written to the SQL subset shared by ClickHouse 18.16 (local
-- stack) and 24+ (docker-compose): no DateTime64, TTL, CODEC, Map, Bool or window functions.
-- Times are DateTime('UTC') for partitioning plus exact epoch milliseconds in *_ms columns.

-- One row per scored payment. Re-scoring after a redelivery writes the same txn_id again;
-- ReplacingMergeTree keeps one row per txn_id (read with FINAL for exact counts).
CREATE TABLE IF NOT EXISTS fraud_scores
(
    txn_id String,
    user_id String,
    card_id String,
    merchant_id String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    amount Float64,
    currency String,
    amount_usd Float64,
    score Float64,
    is_alert UInt8,
    threshold Float64,
    reasons Array(String),
    model_version String,
    billing_country String,
    shipping_country String,
    ip_country String,
    scored_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(scored_at)
PARTITION BY toYYYYMM(ts)
ORDER BY txn_id;

-- Labels as they arrive (chargebacks, settlements): the ground truth for evaluation.
CREATE TABLE IF NOT EXISTS fraud_labels
(
    txn_id String,
    user_id String,
    label String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    source String,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY txn_id;

-- Every logistics scan; one row per scan event_id.
CREATE TABLE IF NOT EXISTS shipment_events
(
    event_id String,
    order_id String,
    user_id String,
    carrier String,
    origin_country String,
    dest_country String,
    status String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    promised_ts_ms UInt64,
    location String,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (order_id, event_id);

-- Per-minute event counts by topic, event type and country, pre-aggregated per micro-batch.
CREATE TABLE IF NOT EXISTS events_per_minute
(
    minute DateTime('UTC'),
    topic String,
    event_type String,
    country String,
    events UInt64,
    amount_usd Float64
)
ENGINE = SummingMergeTree((events, amount_usd))
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, topic, event_type, country);

-- Hourly rollup of the same, kept by a materialized view.
CREATE TABLE IF NOT EXISTS events_per_hour
(
    hour DateTime('UTC'),
    topic String,
    event_type String,
    country String,
    events UInt64,
    amount_usd Float64
)
ENGINE = SummingMergeTree((events, amount_usd))
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, topic, event_type, country);

CREATE MATERIALIZED VIEW IF NOT EXISTS events_per_hour_mv TO events_per_hour AS
SELECT
    toStartOfHour(minute) AS hour,
    topic,
    event_type,
    country,
    events,
    amount_usd
FROM events_per_minute;
