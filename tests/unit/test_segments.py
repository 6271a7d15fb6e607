"""RFM segments: learned online, named by what the clusters mean, stable as they move."""

from __future__ import annotations

import random

from models.segments import SEGMENTS, RfmSegmenter


def _buyer(rng: random.Random, kind: str) -> tuple[float, int, float]:
    if kind == "high-value":
        return rng.uniform(1, 30), rng.randint(5, 15), rng.uniform(2000, 9000)
    if kind == "dynamic":
        return rng.uniform(0, 3), rng.randint(10, 40), rng.uniform(200, 800)
    return rng.uniform(20, 90), rng.randint(1, 3), rng.uniform(20, 150)


def test_segments_recover_the_three_kinds_of_buyers() -> None:
    segmenter = RfmSegmenter(seed=1)
    rng = random.Random(0)
    agree = total = 0
    for i in range(3000):
        kind = rng.choice(SEGMENTS)
        segment = segmenter.observe(*_buyer(rng, kind))
        if i >= 2000:
            total += 1
            agree += segment == kind
    assert agree / total > 0.9


def test_names_follow_the_centroids_not_the_cluster_ids() -> None:
    segmenter = RfmSegmenter(seed=3)
    rng = random.Random(1)
    for _ in range(1500):
        segmenter.observe(*_buyer(rng, rng.choice(SEGMENTS)))
    names = segmenter.names()
    assert sorted(names.values()) == sorted(SEGMENTS)
    centers = segmenter.kmeans.centers
    high = next(c for c, name in names.items() if name == "high-value")
    assert all(centers[high]["monetary"] >= centers[c]["monetary"] for c in centers)
    # A big spender is high-value whatever id its cluster has.
    assert segmenter.assign(recency_days=5, frequency=10, monetary_usd=8000) == "high-value"
    assert segmenter.assign(recency_days=60, frequency=1, monetary_usd=30) == "growth"


def test_same_purchases_in_the_same_order_give_the_same_segments() -> None:
    rng = random.Random(4)
    stream = [_buyer(rng, rng.choice(SEGMENTS)) for _ in range(500)]
    first, second = RfmSegmenter(seed=9), RfmSegmenter(seed=9)
    assert [first.observe(*b) for b in stream] == [second.observe(*b) for b in stream]
