-- Label history. fraud_labels was ReplacingMergeTree(ingested_at) ORDER BY txn_id: a background
-- merge kept each transaction's last *ingested* label and dropped the others, so a relabelled
-- transaction (a settlement, later a chargeback; labels backfilled out of order) lost its
-- history, the latest label by label time could vanish for good, and the label rollups (which
-- count label events) no longer matched the table. Fact rows are written exactly once since
-- 0006 (src_partition / src_next_offset), so no replacing engine is needed to de-duplicate.
--
-- From here on the pipeline writes every label event to fraud_label_events (plain MergeTree,
-- nothing is ever merged away), and fraud_labels becomes a view: one row per transaction with
-- its latest label by label time (ts_ms, then event_id), plus how many label events it has.
--
-- Every statement is safe to re-run after a partial failure: the copy runs only while
-- fraud_label_events is empty, and reads columns the old table and the new view both have.

CREATE TABLE IF NOT EXISTS fraud_label_events
(
    event_id String,
    txn_id String,
    user_id String,
    label String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    source String,
    ingested_at DateTime('UTC'),
    src_partition UInt32,
    src_next_offset UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (txn_id, ts_ms, event_id);

-- Only for a re-run after a failure between the DROP of the old table and the CREATE of the
-- view below: the copy then reads this empty stand-in instead of failing. (When fraud_labels
-- exists, as a table or as the view, this does nothing.)
CREATE TABLE IF NOT EXISTS fraud_labels
(
    txn_id String,
    user_id String,
    label String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    source String,
    ingested_at DateTime('UTC'),
    src_partition UInt32,
    src_next_offset UInt64
)
ENGINE = Memory;

-- The old rows, once, before the rollup views below read fraud_label_events (their events
-- are already counted in the rollups). The old table kept no event id: they get ''. Whatever
-- its merges had already dropped is gone; everything still stored is kept, positions too.
INSERT INTO fraud_label_events
    (event_id, txn_id, user_id, label, ts, ts_ms, source, ingested_at, src_partition,
     src_next_offset)
SELECT '' AS event_id, txn_id, user_id, label, ts, ts_ms, source, ingested_at, src_partition,
       src_next_offset
FROM fraud_labels
WHERE (SELECT count() FROM fraud_label_events) = 0;

-- The label rollups count every label event: same names and outputs, now over the history.
DROP TABLE IF EXISTS events_per_minute_labels_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_per_minute_labels_mv TO events_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, count() AS events, toFloat64(0) AS amount_usd
FROM fraud_label_events
GROUP BY minute, event_type;

DROP TABLE IF EXISTS events_per_hour_labels_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_per_hour_labels_mv TO events_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, count() AS events, toFloat64(0) AS amount_usd
FROM fraud_label_events
GROUP BY hour, event_type;

DROP TABLE IF EXISTS activity_per_minute_labels_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_minute_labels_mv TO activity_per_minute AS
SELECT toStartOfMinute(ts) AS minute, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, '' AS origin_country, '' AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM fraud_label_events
GROUP BY minute, event_type;

DROP TABLE IF EXISTS activity_per_hour_labels_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS activity_per_hour_labels_mv TO activity_per_hour AS
SELECT toStartOfHour(ts) AS hour, 'fraud-labels' AS topic, label AS event_type,
       '' AS country, '' AS origin_country, '' AS dest_country, '' AS carrier, '' AS segment,
       count() AS events, toFloat64(0) AS amount_usd, toUInt64(0) AS alerts
FROM fraud_label_events
GROUP BY hour, event_type;

DROP TABLE IF EXISTS fraud_labels;

-- The current truth per transaction: the latest label by label time (ties: the greater
-- event_id). One argMax over a tuple picks every column from the same label event; the inner
-- query names nothing like the outputs (18.16 would otherwise see an aggregate inside an
-- aggregate). src_partition / src_next_offset are the latest label's own Kafka position.
CREATE VIEW IF NOT EXISTS fraud_labels AS
SELECT
    txn_id,
    latest.1 AS user_id,
    latest.2 AS label,
    latest.3 AS ts,
    latest.4 AS ts_ms,
    latest.5 AS source,
    latest.6 AS ingested_at,
    latest.7 AS src_partition,
    latest.8 AS src_next_offset,
    label_events
FROM
(
    SELECT
        txn_id,
        argMax(
            (user_id, label, ts, ts_ms, source, ingested_at, src_partition, src_next_offset),
            (ts_ms, event_id)
        ) AS latest,
        count() AS label_events
    FROM fraud_label_events
    GROUP BY txn_id
);

-- Route KPIs per completion day, route and carrier, now re-aggregatable: the sums and counts
-- behind every mean and rate are columns, and a mean, rate or p90 without a denominator (no
-- delivery, no promise, no customs hold that day) is NULL instead of NaN. For any coarser
-- grouping: sum(transit_days_sum) / sum(delivered), sum(customs_hours_sum) / sum(held),
-- sum(on_time) / sum(delivered_with_promise).
DROP TABLE IF EXISTS route_kpis_daily;

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
    on_time / nullIf(delivered_with_promise, 0) AS on_time_rate,
    sumIf(transit_days, outcome = 'delivered') AS transit_days_sum,
    transit_days_sum / nullIf(delivered, 0) AS mean_transit_days,
    if(delivered > 0, quantileExactIf(0.9)(transit_days, outcome = 'delivered'), NULL)
        AS p90_transit_days,
    countIf(customs_hours > 0) AS held,
    sumIf(customs_hours, customs_hours > 0) AS customs_hours_sum,
    customs_hours_sum / nullIf(held, 0) AS mean_customs_hours,
    sum(failed_attempts) AS failed_attempts,
    sum(returned) AS returns
FROM shipments FINAL
GROUP BY day, origin_country, dest_country, carrier;
