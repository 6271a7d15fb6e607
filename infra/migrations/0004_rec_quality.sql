-- Online recommendation quality. The clicks agent scores every view, add-to-cart and
-- purchase against the recommendations it had served that user just before (the ones a
-- storefront could read from bf:recs:{user_id} when the click happened): hit_rank is the
-- clicked item's 1-based rank in them, 0 when it was not there. Clicks of users who had no
-- recommendations yet are not scored.
--
-- ReplacingMergeTree keyed by event_id: a click redelivered after a crash replaces its row
-- instead of counting twice (read with FINAL for exact numbers before background merges).
CREATE TABLE IF NOT EXISTS rec_predictions
(
    event_id String,
    ts DateTime('UTC'),
    ts_ms UInt64,
    user_id String,
    country String,
    click_type String,
    hit_rank UInt16,
    recs_size UInt16,
    personalised UInt8,
    recs_age_ms UInt64,
    ingested_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

-- The seed study's metrics per event-time minute and country, at 5/10/15/20 (one relevant
-- item per click, so recall@k = hit rate@k and precision@k = hit rate@k / k).
-- Rates do not add up across rows: aggregate the hits_* and rr_* sums and divide by
-- predictions instead (docs/cookbook in docs/contracts.md).
CREATE VIEW IF NOT EXISTS rec_quality AS
SELECT
    toStartOfMinute(ts) AS minute,
    country,
    count() AS predictions,
    countIf(hit_rank BETWEEN 1 AND 5) AS hits_5,
    countIf(hit_rank BETWEEN 1 AND 10) AS hits_10,
    countIf(hit_rank BETWEEN 1 AND 15) AS hits_15,
    countIf(hit_rank BETWEEN 1 AND 20) AS hits_20,
    sumIf(1 / hit_rank, hit_rank BETWEEN 1 AND 5) AS rr_5,
    sumIf(1 / hit_rank, hit_rank BETWEEN 1 AND 10) AS rr_10,
    sumIf(1 / hit_rank, hit_rank BETWEEN 1 AND 15) AS rr_15,
    sumIf(1 / hit_rank, hit_rank BETWEEN 1 AND 20) AS rr_20,
    hits_5 / predictions AS hit_rate_5,
    hits_10 / predictions AS hit_rate_10,
    hits_15 / predictions AS hit_rate_15,
    hits_20 / predictions AS hit_rate_20,
    hits_5 / predictions AS recall_5,
    hits_10 / predictions AS recall_10,
    hits_15 / predictions AS recall_15,
    hits_20 / predictions AS recall_20,
    hits_5 / (predictions * 5) AS precision_5,
    hits_10 / (predictions * 10) AS precision_10,
    hits_15 / (predictions * 15) AS precision_15,
    hits_20 / (predictions * 20) AS precision_20,
    rr_5 / predictions AS mrr_5,
    rr_10 / predictions AS mrr_10,
    rr_15 / predictions AS mrr_15,
    rr_20 / predictions AS mrr_20
FROM rec_predictions FINAL
GROUP BY minute, country;
