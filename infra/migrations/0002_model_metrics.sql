-- Model quality over time, for dashboards: written by `borderflow eval fraud`.
-- One row per (run_id, model, day, metric). `model` is the model_version prefix (before '@')
-- or 'all'; `day` is the UTC payment day the value covers, or 1970-01-01 for a value over
-- the whole evaluated window; `n` is what the value was computed over (payments, or cards
-- for a day's CP@100). Undefined values (e.g. the AUC of a day without fraud) are not
-- written.
--
-- ReplacingMergeTree keyed by (run_id, model, day, metric): re-running an evaluation with the
-- same --run-id replaces its rows (the newest computed_at wins; read with FINAL for exact
-- values before the background merge) instead of doubling them. No PARTITION BY: a run
-- writes a few hundred rows, so the table stays small, and replacing only works within a
-- partition - a single one makes it exact for every key.
CREATE TABLE IF NOT EXISTS model_metrics
(
    computed_at DateTime('UTC'),
    run_id String,
    model String,
    day Date,
    metric String,
    value Float64,
    n UInt64
)
ENGINE = ReplacingMergeTree(computed_at)
ORDER BY (run_id, model, day, metric);
