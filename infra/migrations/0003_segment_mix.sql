-- Segment mix: purchases and revenue per hour, country and RFM segment (models/segments.py),
-- pre-aggregated per micro-batch by the clicks agent. Sum with sum(); rows merge in the
-- background.
CREATE TABLE IF NOT EXISTS segment_mix_per_hour
(
    hour DateTime('UTC'),
    country String,
    segment String,
    purchases UInt64,
    revenue_usd Float64
)
ENGINE = SummingMergeTree((purchases, revenue_usd))
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, country, segment);
