"""Customer segments from RFM, learned online (River k-means) with names that stay put.

The seed study describes three kinds of cross-border shoppers: **high-value** (spend the most),
**dynamic** (buy often, recently) and **growth** (the rest, with room to grow). borderflow
clusters each buyer's standardised log-RFM vector with ``river.cluster.KMeans`` (3 clusters)
and names clusters by their centroids, not by their ids: the centroid with the highest
monetary value is "high-value", of the other two the one that buys more often is "dynamic",
the last is "growth". As centroids drift, the names follow what the clusters mean, so a
storefront's "high-value" stays high-value.

The segmenter learns at purchases only (RFM changes only then), in the order the partition's
log gives them, so results do not depend on micro-batch boundaries.

>>> segmenter = RfmSegmenter(seed=1)
>>> for i in range(200):
...     big = i % 4 == 0
...     _ = segmenter.observe(recency_days=1.0, frequency=20 if big else 2,
...                           monetary_usd=5000.0 if big else 40.0)
>>> segmenter.observe(recency_days=1.0, frequency=25, monetary_usd=8000.0)
'high-value'
"""

from __future__ import annotations

import math

from river import cluster, preprocessing

SEGMENTS = ("high-value", "dynamic", "growth")


class RfmSegmenter:
    def __init__(self, seed: int = 42, halflife: float = 0.3) -> None:
        self.scaler = preprocessing.StandardScaler()
        self.kmeans = cluster.KMeans(n_clusters=len(SEGMENTS), halflife=halflife, seed=seed)
        self.observed = 0

    @staticmethod
    def features(recency_days: float, frequency: int, monetary_usd: float) -> dict[str, float]:
        """log-RFM: heavy-tailed counts and amounts compress to comparable ranges."""
        return {
            "recency": math.log1p(max(0.0, recency_days)),
            "frequency": math.log1p(max(0, frequency)),
            "monetary": math.log1p(max(0.0, monetary_usd)),
        }

    def names(self) -> dict[int, str]:
        """Cluster id -> segment name, from the current centroids."""
        centers = self.kmeans.centers
        by_monetary = sorted(centers, key=lambda c: (-centers[c].get("monetary", 0.0), c))
        high_value, rest = by_monetary[0], by_monetary[1:]
        rest.sort(key=lambda c: (-centers[c].get("frequency", 0.0), c))
        return {high_value: SEGMENTS[0], rest[0]: SEGMENTS[1], rest[1]: SEGMENTS[2]}

    def assign(self, recency_days: float, frequency: int, monetary_usd: float) -> str:
        x = self.scaler.transform_one(self.features(recency_days, frequency, monetary_usd))
        return self.names()[self.kmeans.predict_one(x)]

    def observe(self, recency_days: float, frequency: int, monetary_usd: float) -> str:
        """Learn one buyer's RFM and return its segment."""
        raw = self.features(recency_days, frequency, monetary_usd)
        self.scaler.learn_one(raw)
        x = self.scaler.transform_one(raw)
        self.kmeans.learn_one(x)
        self.observed += 1
        return self.names()[self.kmeans.predict_one(x)]
