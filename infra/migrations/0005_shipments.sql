-- Completed shipments, one row per order: written by the logistics agent when an order is
-- delivered or returned (a return after delivery rewrites the order's row with returned = 1).
-- ReplacingMergeTree(version): the row with the newest version (event time of the scan that
-- completed or updated it) wins, so a redelivered scan is harmless; read with FINAL.
CREATE TABLE IF NOT EXISTS shipments
(
    order_id String,
    user_id String,
    carrier String,
    origin_country String,
    dest_country String,
    created_ts DateTime('UTC'),
    completed_ts DateTime('UTC'),
    outcome String,
    transit_days Float64,
    has_promise UInt8,
    on_time UInt8,
    customs_hours Float64,
    failed_attempts UInt8,
    returned UInt8,
    invalid_transitions UInt16,
    version UInt64,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY order_id;

-- Every delivery-time prediction, one row per applied scan: what the model said at that
-- moment (monitor its error by joining with shipments on order_id).
CREATE TABLE IF NOT EXISTS shipment_predictions
(
    event_id String,
    order_id String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    status String,
    carrier String,
    origin_country String,
    dest_country String,
    predicted_delivery_ts_ms UInt64,
    promised_ts_ms UInt64,
    delay_risk Float64,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

-- Route KPIs per completion day (UTC), route and carrier. On-time rate counts delivered
-- orders that had a promise; customs clearance time averages orders that went through
-- customs.
CREATE VIEW IF NOT EXISTS route_kpis_daily AS
SELECT
    toDate(completed_ts) AS day,
    origin_country,
    dest_country,
    carrier,
    count() AS shipments,
    countIf(outcome = 'delivered') AS delivered,
    countIf(outcome = 'delivered' AND has_promise = 1) AS delivered_with_promise,
    sumIf(on_time, outcome = 'delivered' AND has_promise = 1) AS on_time,
    on_time / delivered_with_promise AS on_time_rate,
    avgIf(transit_days, outcome = 'delivered') AS mean_transit_days,
    quantileExactIf(0.9)(transit_days, outcome = 'delivered') AS p90_transit_days,
    avgIf(customs_hours, customs_hours > 0) AS mean_customs_hours,
    sum(failed_attempts) AS failed_attempts,
    sum(returned) AS returns
FROM shipments FINAL
GROUP BY day, origin_country, dest_country, carrier;
