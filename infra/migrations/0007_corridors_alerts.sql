-- Cross-border analytics: corridors, carriers and segments in the rollups; alerts as facts.
--
-- A corridor is origin country -> destination country: for a purchase click, the item's
-- origin -> the buyer's country; for a payment, the merchant's country -> the shipping
-- country; for a logistics scan, the shipment's origin -> destination. Columns a fact does not
-- have stay '' (labels have no corridor, only clicks have a segment, only scans a carrier).
--
-- User and card ids in every table are keyed pseudonyms (sinks/pseudonym.py), written by the
-- pipeline; nothing here changes that.

ALTER TABLE click_events ADD COLUMN origin_country String DEFAULT '';
ALTER TABLE fraud_scores ADD COLUMN origin_country String DEFAULT '';

-- Logistics alerts (predicted late, customs delay). Each kind fires at most once per order,
-- and alert_id = '{order_id}:{kind}' is stable, so a redelivered alert replaces its row:
-- count with uniqExact(alert_id) or read with FINAL. (Fraud alerts are the fraud_scores rows
-- with is_alert = 1; the `alerts` view below shows both kinds together.)
CREATE TABLE IF NOT EXISTS logistics_alerts
(
    alert_id String,
    kind String,
    order_id String,
    user_id String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    carrier String,
    origin_country String,
    dest_country String,
    predicted_delivery_ts_ms UInt64,
    promised_ts_ms UInt64,
    reason String,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY alert_id;

-- Every alert, fraud and logistics, one row each.
CREATE VIEW IF NOT EXISTS alerts AS
SELECT
    concat('alert-', txn_id) AS alert_id,
    'fraud' AS kind,
    txn_id AS ref_id,
    user_id,
    ts,
    ts_ms,
    '' AS carrier,
    origin_country,
    shipping_country AS dest_country,
    score,
    amount_usd,
    arrayStringConcat(reasons, ', ') AS reason
FROM fraud_scores
WHERE is_alert = 1
UNION ALL
SELECT
    alert_id,
    kind,
    order_id AS ref_id,
    user_id,
    ts,
    ts_ms,
    carrier,
    origin_country,
    dest_country,
    toFloat64(0) AS score,
    toFloat64(0) AS amount_usd,
    reason
FROM logistics_alerts FINAL;

-- Activity rollups by every dimension analysts slice on. `country` is the user's country
-- (clicks), the IP (else billing) country (payments) or the destination (scans), as in
-- events_per_minute, which stays as the slim throughput rollup.
CREATE TABLE IF NOT EXISTS activity_per_minute
(
    minute DateTime('UTC'),
    topic String,
    event_type String,
    country String,
    origin_country String,
    dest_country String,
    carrier String,
    segment String,
    events UInt64,
    amount_usd Float64,
    alerts UInt64
)
ENGINE = SummingMergeTree((events, amount_usd, alerts))
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, topic, event_type, country, origin_country, dest_country, carrier, segment);

CREATE TABLE IF NOT EXISTS activity_per_hour
(
    hour DateTime('UTC'),
    topic String,
    event_type String,
    country String,
    origin_country String,
    dest_country String,
    carrier String,
    segment String,
    events UInt64,
    amount_usd Float64,
    alerts UInt64
)
ENGINE = SummingMergeTree((events, amount_usd, alerts))
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, topic, event_type, country, origin_country, dest_country, carrier, segment);

-- Fed from the facts (never from another rollup: 18.16 does not cascade views, 24+ does).
CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_minute_clicks_mv TO activity_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'clicks' AS topic, click_type AS event_type, country,
       origin_country, country AS dest_country, '' AS carrier, segment,
       count() AS events, sum(amount_usd) AS amount_usd, toUInt64(0) AS alerts
FROM click_events
GROUP BY minute, event_type, country, origin_country, segment;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_hour_clicks_mv TO activity_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'clicks' AS topic, click_type AS event_type, country,
       origin_country, country AS dest_country, '' AS carrier, segment,
       count() AS events, sum(amount_usd) AS amount_usd, toUInt64(0) AS alerts
FROM click_events
GROUP BY hour, event_type, country, origin_country, segment;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_minute_payments_mv TO activity_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'payments' AS topic, 'payment' AS event_type,
       if(ip_country != '', ip_country, billing_country) AS country, origin_country,
       shipping_country AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, sum(amount_usd) AS amount_usd, toUInt64(sum(is_alert)) AS alerts
FROM fraud_scores
GROUP BY minute, country, origin_country, dest_country;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_hour_payments_mv TO activity_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'payments' AS topic, 'payment' AS event_type,
       if(ip_country != '', ip_country, billing_country) AS country, origin_country,
       shipping_country AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, sum(amount_usd) AS amount_usd, toUInt64(sum(is_alert)) AS alerts
FROM fraud_scores
GROUP BY hour, country, origin_country, dest_country;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_minute_labels_mv TO activity_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, '' AS origin_country, '' AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM fraud_labels
GROUP BY minute, event_type;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_hour_labels_mv TO activity_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, '' AS origin_country, '' AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM fraud_labels
GROUP BY hour, event_type;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_minute_logistics_mv TO activity_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'logistics' AS topic, status AS event_type,
       dest_country AS country, origin_country, dest_country, carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM shipment_events
GROUP BY minute, event_type, origin_country, dest_country, carrier;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_hour_logistics_mv TO activity_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'logistics' AS topic, status AS event_type,
       dest_country AS country, origin_country, dest_country, carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM shipment_events
GROUP BY hour, event_type, origin_country, dest_country, carrier;
