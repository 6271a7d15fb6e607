"""Delivery-time prediction, delay risk and logistics alerts, learned online in event time.

Pieces (pure Python and River; no Faust), all picklable:

* :class:`RouteMedianBaseline` - the naive baseline: the median total transit time per
  (route, carrier) over its last deliveries, falling back to the route, then to all routes;
  it predicts ``remaining = median - elapsed`` (at least 0).
* :class:`CustomsStats` - the usual customs-hold duration (p90 over the last holds) per
  route, falling back to the destination, then to all routes; a hold is "longer than usual"
  beyond that.
* :class:`DeliveryTimeModel` - the online predictor of the *remaining* hours to delivery at
  a scan. Two stages, chosen by measurement (``docs/logistics.md``):

  1. a hierarchical target table: the mean of ``log1p(remaining hours)`` per
     (status), (status, lane class), (status, destination), (status, route),
     (status, route, carrier), each level shrunk towards its parent by its sample count
     (River ``stats.Mean`` per key) - cheap, and exact once a lane has data;
  2. a River ``LinearRegression`` (AdaGrad) on top, per status: the table's and the
     baseline's log predictions, the carrier, the destination, the promised and remaining
     promised time, day of week, customs holds so far and their duration,
     failed attempts. It learns how much to trust each source per status and the effects
     the table cannot key on.

  The target is ``log1p(hours)`` (skewed; its mean is near the median, which minimises the
  absolute error). Labels are delayed: a feature *snapshot* is taken at every scan that
  moves a shipment and is learned when the shipment is delivered.
* :class:`LogisticsEngine` - everything for one scan (:meth:`LogisticsEngine.on_scan`):
  shipment state (:class:`models.shipments.ShipmentBook`), prediction, delay risk, alerts
  (each kind at most once per shipment), learning on delivery.

Everything is driven by event time only (no wall clock): a replay gives the same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from river import linear_model, optim, stats

from models.checkpoint import Checkpointable
from models.shipments import MAX_SNAPSHOTS, ApplyOutcome, Shipment, ShipmentBook
from schemas.events import LogisticsAlert, LogisticsEvent

__all__ = [
    "CustomsStats",
    "DeliveredRecord",
    "DeliveryTimeModel",
    "LogisticsEngine",
    "RouteMedianBaseline",
    "ScanReport",
    "SnapshotOutcome",
]

HOUR_MS = 3_600_000
DAY_MS = 86_400_000

#: The EU customs union: no customs between two of these.
EU_CUSTOMS_UNION = frozenset(
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split()
)


def lane_class(origin: str, dest: str) -> str:
    """'domestic', 'customs_union' (both in the EU) or 'cross_border'.

    >>> lane_class("DE", "DE"), lane_class("DE", "FR"), lane_class("CN", "FR")
    ('domestic', 'customs_union', 'cross_border')
    """
    if origin == dest:
        return "domestic"
    if origin in EU_CUSTOMS_UNION and dest in EU_CUSTOMS_UNION:
        return "customs_union"
    return "cross_border"


def _quantile(q: float, window: int) -> stats.RollingQuantile:
    return stats.RollingQuantile(q, window_size=window)


def _value(quantile: stats.RollingQuantile) -> float:
    value = quantile.get()
    return 0.0 if value is None else float(value)


# --------------------------------------------------------------------------------------------
# The naive baseline and customs statistics
# --------------------------------------------------------------------------------------------


class RouteMedianBaseline:
    """Median total transit hours per (route, carrier) -> route -> all, over recent deliveries.

    >>> baseline = RouteMedianBaseline(min_samples=1)
    >>> for days in (2, 3, 4):
    ...     baseline.learn("DE", "FR", "dhl", days * DAY_MS)
    >>> baseline.total_hours("DE", "FR", "dhl"), baseline.total_hours("CN", "FR", "ems")
    (72.0, 72.0)
    >>> baseline.remaining_hours("DE", "FR", "dhl", elapsed_ms=80 * HOUR_MS)
    0.0
    """

    def __init__(self, *, window: int = 256, min_samples: int = 5) -> None:
        self.window = window
        self.min_samples = min_samples
        self.lanes: dict[tuple[str, str, str], stats.RollingQuantile] = {}
        self.counts: dict[tuple[str, str, str], int] = {}

    def learn(self, origin: str, dest: str, carrier: str, total_ms: int) -> None:
        hours = max(0.0, total_ms / HOUR_MS)
        for key in ((origin, dest, carrier), (origin, dest, "*"), ("*", "*", "*")):
            median = self.lanes.get(key)
            if median is None:
                median = self.lanes[key] = _quantile(0.5, self.window * (2 if key[0] == "*" else 1))
            median.update(hours)
            self.counts[key] = self.counts.get(key, 0) + 1

    def total_hours(self, origin: str, dest: str, carrier: str) -> float | None:
        for key in ((origin, dest, carrier), (origin, dest, "*")):
            if self.counts.get(key, 0) >= self.min_samples:
                return _value(self.lanes[key])
        if self.counts.get(("*", "*", "*"), 0):
            return _value(self.lanes[("*", "*", "*")])
        return None

    def remaining_hours(
        self, origin: str, dest: str, carrier: str, *, elapsed_ms: int
    ) -> float | None:
        total = self.total_hours(origin, dest, carrier)
        if total is None:
            return None
        return max(0.0, total - elapsed_ms / HOUR_MS)


class CustomsStats:
    """Usual customs-hold duration: a rolling quantile (p90) per route -> destination -> all.

    >>> customs = CustomsStats(min_samples=2)
    >>> for hours in (10, 20, 30):
    ...     customs.learn("CN", "BR", hours * HOUR_MS)
    >>> customs.threshold_ms("CN", "BR") / HOUR_MS, customs.threshold_ms("US", "JP") / HOUR_MS
    (28.0, 28.0)
    """

    def __init__(self, *, q: float = 0.9, min_samples: int = 20, window: int = 512) -> None:
        self.q = q
        self.min_samples = min_samples
        self.window = window
        self.quantiles: dict[tuple[str, str], stats.RollingQuantile] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def learn(self, origin: str, dest: str, hold_ms: int) -> None:
        hours = max(0.0, hold_ms / HOUR_MS)
        for key in ((origin, dest), ("*", dest), ("*", "*")):
            quantile = self.quantiles.get(key)
            if quantile is None:
                quantile = self.quantiles[key] = _quantile(self.q, self.window)
            quantile.update(hours)
            self.counts[key] = self.counts.get(key, 0) + 1

    def usual(self, origin: str, dest: str) -> tuple[float, int, str] | None:
        """(p90 hours, samples, scope) of the narrowest scope with enough holds, else None."""
        for key, scope in (
            ((origin, dest), f"route {origin}>{dest}"),
            (("*", dest), f"destination {dest}"),
            (("*", "*"), "all routes"),
        ):
            n = self.counts.get(key, 0)
            if n >= self.min_samples:
                return _value(self.quantiles[key]), n, scope
        return None

    def threshold_ms(self, origin: str, dest: str) -> int | None:
        usual = self.usual(origin, dest)
        return None if usual is None else int(usual[0] * HOUR_MS)


# --------------------------------------------------------------------------------------------
# Snapshots and features
# --------------------------------------------------------------------------------------------

#: A snapshot row (a plain list, stored in the shipment as JSON):
#: [ts, status, elapsed_ms, customs_holds, customs_ms, failed_attempts, promised_ts,
#:  baseline_h (-1 unknown), predicted_h (-1 unknown)].
SNAP_TS, SNAP_STATUS, SNAP_ELAPSED, SNAP_HOLDS, SNAP_CUSTOMS = 0, 1, 2, 3, 4
SNAP_FAILED, SNAP_PROMISED, SNAP_BASELINE, SNAP_PREDICTED = 5, 6, 7, 8


def take_snapshot(shipment: Shipment, ts: int) -> list[Any]:
    """The features known about ``shipment`` at ``ts`` (predictions are filled in later)."""
    return [
        ts,
        shipment.status,
        max(0, ts - shipment.created_ts),
        shipment.customs_holds,
        shipment.customs_ms_at(ts),
        shipment.failed_attempts,
        shipment.promised_ts,
        -1.0,
        -1.0,
    ]


def _table_keys(shipment: Shipment, status: str) -> tuple[tuple[str, ...], ...]:
    origin, dest = shipment.origin_country, shipment.dest_country
    return (
        (status,),
        (status, "lane", lane_class(origin, dest)),
        (status, "dest", dest),
        (status, "route", origin, dest),
        (status, "route", origin, dest, shipment.carrier),
    )


class RemainingTable:
    """Mean of log1p(remaining hours) per nested key, each level shrunk towards its parent."""

    def __init__(self, *, shrink: float = 5.0, max_keys: int = 200_000) -> None:
        self.shrink = shrink
        self.max_keys = max_keys
        self.means: dict[tuple[str, ...], stats.Mean] = {}

    def predict(self, keys: tuple[tuple[str, ...], ...]) -> tuple[float | None, float]:
        """(log prediction or None, sample count of the finest key)."""
        prediction: float | None = None
        finest = 0.0
        for key in keys:  # coarse to fine
            mean = self.means.get(key)
            if mean is None or mean.n == 0:
                finest = 0.0
                continue
            finest = mean.n
            if prediction is None:
                prediction = mean.get()
            else:
                weight = mean.n / (mean.n + self.shrink)
                prediction = weight * mean.get() + (1.0 - weight) * prediction
        return prediction, finest

    def learn(self, keys: tuple[tuple[str, ...], ...], y: float) -> None:
        for key in keys:
            mean = self.means.get(key)
            if mean is None:
                if len(self.means) >= self.max_keys:
                    continue
                mean = self.means[key] = stats.Mean()
            mean.update(y)


class DeliveryTimeModel:
    """Remaining hours to delivery from a snapshot (see the module docstring)."""

    VERSION = "stacked-table-lr-v1"
    #: Largest log1p(hours) predicted (about 4.6 years): guards exp() against a wild model.
    MAX_LOG = 10.6

    def __init__(self, *, learning_rate: float = 0.1, warmup: int = 200) -> None:
        self.learning_rate = learning_rate
        self.warmup = warmup
        self.table = RemainingTable()
        self.regressor = linear_model.LinearRegression(
            optimizer=optim.AdaGrad(learning_rate), intercept_lr=0.0, l2=0.0
        )
        self.rows_learned = 0

    @property
    def version(self) -> str:
        return f"{self.VERSION}@{self.rows_learned}"

    def features(
        self, shipment: Shipment, row: list[Any], table_log: float, finest: float
    ) -> dict[str, float]:
        status = str(row[SNAP_STATUS])
        ts = int(row[SNAP_TS])
        when = datetime.fromtimestamp(ts / 1000, UTC)
        baseline_h = float(row[SNAP_BASELINE])
        trust = finest / (finest + 10.0)
        s = f"s={status}"
        x = {
            s: 1.0,
            f"{s}|table": table_log,
            f"{s}|table_trusted": table_log * trust,
            f"{s}|carrier={shipment.carrier}": 1.0,
            f"{s}|dest={shipment.dest_country}": 1.0,
            f"{s}|dow={when.weekday()}": 1.0,
            f"{s}|elapsed_d": row[SNAP_ELAPSED] / DAY_MS / 10.0,
            "customs_holds": float(row[SNAP_HOLDS]),
            "customs_d": row[SNAP_CUSTOMS] / DAY_MS,
            "failed_attempts": float(row[SNAP_FAILED]),
        }
        if baseline_h >= 0:
            x[f"{s}|baseline"] = math.log1p(baseline_h)
        promised = int(row[SNAP_PROMISED])
        if promised:
            x[f"{s}|promise_left_d"] = (promised - ts) / DAY_MS / 10.0
            x[f"{s}|promise_d"] = (promised - shipment.created_ts) / DAY_MS / 10.0
        return x

    def predict_hours(self, shipment: Shipment, row: list[Any]) -> float | None:
        """Remaining hours predicted from ``row``, or None before any delivery was learned."""
        table_log, finest = self.table.predict(_table_keys(shipment, str(row[SNAP_STATUS])))
        if table_log is None:
            return None
        if self.rows_learned < self.warmup:
            log_hours = table_log
        else:
            log_hours = self.regressor.predict_one(self.features(shipment, row, table_log, finest))
        return math.expm1(min(max(log_hours, 0.0), self.MAX_LOG))

    def learn(self, shipment: Shipment, row: list[Any], remaining_h: float) -> None:
        y = math.log1p(max(0.0, remaining_h))
        keys = _table_keys(shipment, str(row[SNAP_STATUS]))
        table_log, finest = self.table.predict(keys)
        if table_log is not None:
            self.regressor.learn_one(self.features(shipment, row, table_log, finest), y)
        self.table.learn(keys, y)
        self.rows_learned += 1


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveredRecord:
    """A completed delivery (feeds route KPIs and ``models.delivery.DeliveryLanes``)."""

    order_id: str
    user_id: str
    origin_country: str
    dest_country: str
    carrier: str
    created_ts: int
    delivered_ts: int
    promised_ts: int | None
    transit_days: float
    on_time: bool | None
    customs_hours: float
    failed_attempts: int


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    """One snapshot of a delivered shipment, scored against the truth when it was learned."""

    status: str
    ts: int
    actual_h: float
    predicted_h: float | None
    baseline_h: float | None


@dataclass(slots=True)
class ScanReport:
    """What :meth:`LogisticsEngine.on_scan` did with one scan."""

    shipment: Shipment
    applied: bool
    out_of_order: bool = False
    invalid_transition: str | None = None
    predicted_delivery_ts: int | None = None
    delay_risk: float = 0.0
    alerts: list[LogisticsAlert] = field(default_factory=list)
    delivered: DeliveredRecord | None = None
    returned: bool = False
    #: The scan hit an order completed long ago (only its id is remembered): not applied.
    stale: bool = False
    #: Not applied because the book holds it: the (partition, offset) the held scan was
    #: applied at, None when unknown (see ``ShipmentBook.apply``).
    seen_at: tuple[int, int] | None = None
    #: On delivery: each snapshot's prediction against the truth (for evaluation/metrics).
    outcomes: list[SnapshotOutcome] = field(default_factory=list)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


class LogisticsEngine(Checkpointable):
    """One worker's logistics models; the agent keeps one and checkpoints it with pickle.

    ``late_margin_ms``: a shipment is alerted ``predicted_late`` when its predicted delivery
    passes the promised time by more than this. ``customs_min_samples``: holds a route (or
    destination, or all routes) needs before its usual hold time is trusted for
    ``customs_delay`` alerts. ``customs_quantile``: what "usual" means (p90).
    """

    #: Weight of the newest absolute log error in the per-status error average.
    ERROR_ALPHA = 0.02

    def __init__(
        self,
        *,
        late_margin_ms: int = 12 * HOUR_MS,
        customs_quantile: float = 0.9,
        customs_min_samples: int = 20,
        baseline_min_samples: int = 5,
        warmup_rows: int = 200,
    ) -> None:
        self.late_margin_ms = late_margin_ms
        self.model = DeliveryTimeModel(warmup=warmup_rows)
        self.baseline = RouteMedianBaseline(min_samples=baseline_min_samples)
        self.customs = CustomsStats(q=customs_quantile, min_samples=customs_min_samples)
        #: status -> running mean of |log1p(actual) - log1p(predicted)| (risk spread).
        self.log_errors: dict[str, float] = {}
        self.counters: dict[str, int] = {
            "scans": 0,
            "duplicates": 0,
            "stale": 0,
            "out_of_order": 0,
            "invalid_transitions": 0,
            "deliveries": 0,
            "returns": 0,
            "customs_holds_learned": 0,
            "alerts_predicted_late": 0,
            "alerts_customs_delay": 0,
        }
        self.abs_error_model_h = 0.0
        self.abs_error_baseline_h = 0.0
        self.scored = 0
        self.watermark_ms = 0

    # -- one scan -----------------------------------------------------------------------------
    def on_scan(
        self, book: ShipmentBook, scan: LogisticsEvent, position: tuple[int, int] | None = None
    ) -> ScanReport:
        """Apply ``scan`` to ``book`` and do everything that follows (module docstring);
        ``position`` is the scan's Kafka (partition, offset), kept in the book."""
        counters = self.counters
        counters["scans"] += 1
        self.watermark_ms = max(self.watermark_ms, scan.ts)
        before = book.get(scan.order_id)
        was_returned = before.returned if before is not None else False
        shipment, outcome = book.apply(scan, position)
        if not outcome.applied:
            counters["stale" if outcome.stale else "duplicates"] += 1
            return ScanReport(
                shipment=shipment,
                applied=False,
                predicted_delivery_ts=shipment.predicted_delivery_ts or None,
                delay_risk=shipment.delay_risk,
                stale=outcome.stale,
                seen_at=outcome.seen_at,
            )
        counters["out_of_order"] += int(outcome.out_of_order)
        counters["invalid_transitions"] += int(outcome.invalid_transition is not None)
        self._learn_customs(shipment)
        report = ScanReport(
            shipment=shipment,
            applied=True,
            out_of_order=outcome.out_of_order,
            invalid_transition=outcome.invalid_transition,
        )
        if shipment.returned and not was_returned:
            report.returned = True
            counters["returns"] += 1
        if shipment.completed:
            self._complete(shipment, outcome, report)
        else:
            self._predict(shipment, report)
            alert = self._customs_alert(shipment, max(scan.ts, shipment.status_ts))
            if alert is not None:
                report.alerts.append(alert)
        book.expire(self.watermark_ms)
        return report

    def _predict(self, shipment: Shipment, report: ScanReport) -> None:
        now = shipment.status_ts  # predictions are anchored at the newest scan
        row = take_snapshot(shipment, now)
        baseline_h = self.baseline.remaining_hours(
            shipment.origin_country,
            shipment.dest_country,
            shipment.carrier,
            elapsed_ms=row[SNAP_ELAPSED],
        )
        row[SNAP_BASELINE] = -1.0 if baseline_h is None else round(baseline_h, 3)
        predicted_h = self.model.predict_hours(shipment, row)
        if predicted_h is None:
            predicted_h = baseline_h
        row[SNAP_PREDICTED] = -1.0 if predicted_h is None else round(predicted_h, 3)
        snapshots = shipment.snapshots
        if snapshots and snapshots[-1][SNAP_TS] == now:
            snapshots[-1] = row  # same anchor, newer knowledge (an out-of-order scan)
        else:
            snapshots.append(row)
            if len(snapshots) > MAX_SNAPSHOTS:
                del snapshots[1]  # keep the first (the whole-journey view) and the newest
        if predicted_h is None:
            shipment.predicted_delivery_ts, shipment.delay_risk = 0, 0.0
            return
        predicted_ts = now + int(predicted_h * HOUR_MS)
        shipment.predicted_delivery_ts = predicted_ts
        shipment.delay_risk = self._risk(shipment, now, predicted_h)
        report.predicted_delivery_ts = predicted_ts
        report.delay_risk = shipment.delay_risk
        if (
            shipment.promised_ts
            and predicted_ts > shipment.promised_ts + self.late_margin_ms
            and "predicted_late" not in shipment.alerted
        ):
            late_h = (predicted_ts - shipment.promised_ts) / HOUR_MS
            reason = (
                f"predicted delivery {_iso(predicted_ts)} is {late_h:.0f} h after the promised "
                f"{_iso(shipment.promised_ts)} (margin {self.late_margin_ms / HOUR_MS:.0f} h); "
                f"now {shipment.status.replace('_', ' ')} after "
                f"{(now - shipment.created_ts) / DAY_MS:.1f} days, delay risk "
                f"{shipment.delay_risk:.0%}"
            )
            report.alerts.append(self._alert(shipment, "predicted_late", reason, now))

    def _risk(self, shipment: Shipment, now: int, predicted_h: float) -> float:
        """P(delivered after the promise): log-normal error with the status's recent spread."""
        if not shipment.promised_ts:
            return 0.0
        slack_h = (shipment.promised_ts - now) / HOUR_MS
        if slack_h <= 0:
            return 1.0
        spread = self.log_errors.get(shipment.status, 0.4) * math.sqrt(math.pi / 2)
        z = (math.log1p(predicted_h) - math.log1p(slack_h)) / max(spread, 0.05)
        return round(min(1.0, max(0.0, _normal_cdf(z))), 4)

    def _complete(self, shipment: Shipment, outcome: ApplyOutcome, report: ScanReport) -> None:
        if shipment.delivered_ts:
            report.predicted_delivery_ts = shipment.delivered_ts
            late = bool(shipment.promised_ts) and shipment.delivered_ts > shipment.promised_ts
            report.delay_risk = 1.0 if late else 0.0
            shipment.predicted_delivery_ts, shipment.delay_risk = shipment.delivered_ts, 0.0
        if not outcome.completed_now:
            return  # a return after delivery, or a late scan of a completed shipment
        if shipment.delivered_ts:
            report.delivered = self._record(shipment)
            report.outcomes = self._learn_delivery(shipment)
            self.counters["deliveries"] += 1
        shipment.snapshots = []  # learned (or censored by a return): not needed any more

    def _record(self, shipment: Shipment) -> DeliveredRecord:
        promised = shipment.promised_ts or None
        return DeliveredRecord(
            order_id=shipment.order_id,
            user_id=shipment.user_id,
            origin_country=shipment.origin_country,
            dest_country=shipment.dest_country,
            carrier=shipment.carrier,
            created_ts=shipment.created_ts,
            delivered_ts=shipment.delivered_ts,
            promised_ts=promised,
            transit_days=round((shipment.delivered_ts - shipment.created_ts) / DAY_MS, 4),
            on_time=None if promised is None else shipment.delivered_ts <= promised,
            customs_hours=round(shipment.customs_ms / HOUR_MS, 2),
            failed_attempts=shipment.failed_attempts,
        )

    def _learn_delivery(self, shipment: Shipment) -> list[SnapshotOutcome]:
        outcomes = []
        delivered = shipment.delivered_ts
        for row in shipment.snapshots:
            ts = int(row[SNAP_TS])
            if ts > delivered:
                continue
            actual_h = (delivered - ts) / HOUR_MS
            predicted = float(row[SNAP_PREDICTED])
            baseline = float(row[SNAP_BASELINE])
            status = str(row[SNAP_STATUS])
            if predicted >= 0:
                error = abs(math.log1p(actual_h) - math.log1p(predicted))
                old = self.log_errors.get(status)
                self.log_errors[status] = (
                    error if old is None else old + self.ERROR_ALPHA * (error - old)
                )
                if baseline >= 0:
                    self.abs_error_model_h += abs(actual_h - predicted)
                    self.abs_error_baseline_h += abs(actual_h - baseline)
                    self.scored += 1
            outcomes.append(
                SnapshotOutcome(
                    status,
                    ts,
                    actual_h,
                    predicted if predicted >= 0 else None,
                    baseline if baseline >= 0 else None,
                )
            )
            self.model.learn(shipment, row, actual_h)
        self.baseline.learn(
            shipment.origin_country,
            shipment.dest_country,
            shipment.carrier,
            delivered - shipment.created_ts,
        )
        return outcomes

    def _learn_customs(self, shipment: Shipment) -> None:
        durations = shipment.hold_durations()
        for hold_ms in durations[shipment.customs_learned :]:
            self.customs.learn(shipment.origin_country, shipment.dest_country, hold_ms)
            self.counters["customs_holds_learned"] += 1
        shipment.customs_learned = max(shipment.customs_learned, len(durations))

    # -- alerts -------------------------------------------------------------------------------
    def _alert(self, shipment: Shipment, kind: str, reason: str, ts: int) -> LogisticsAlert:
        shipment.alerted.append(kind)
        self.counters[f"alerts_{kind}"] += 1
        return LogisticsAlert(
            alert_id=f"{shipment.order_id}:{kind}",
            order_id=shipment.order_id,
            user_id=shipment.user_id,
            kind=kind,  # type: ignore[arg-type]
            reason=reason,
            ts=ts,
            predicted_delivery_ts=shipment.predicted_delivery_ts or None,
            promised_ts=shipment.promised_ts or None,
            carrier=shipment.carrier,
            origin_country=shipment.origin_country,
            dest_country=shipment.dest_country,
        )

    def _customs_alert(self, shipment: Shipment, now: int) -> LogisticsAlert | None:
        if not shipment.in_customs_hold or "customs_delay" in shipment.alerted:
            return None
        usual = self.customs.usual(shipment.origin_country, shipment.dest_country)
        if usual is None:
            return None
        p90_h, samples, scope = usual
        held_h = (now - shipment.hold_start_ts) / HOUR_MS
        if held_h <= p90_h:
            return None
        reason = (
            f"in customs hold in {shipment.dest_country} for {held_h:.0f} h since "
            f"{_iso(shipment.hold_start_ts)}, longer than usual for {scope} "
            f"(p{round(self.customs.q * 100)} {p90_h:.0f} h over {samples} holds)"
        )
        return self._alert(shipment, "customs_delay", reason, now)

    def customs_threshold_ms(self, origin: str, dest: str) -> int | None:
        """How long a hold on this route may last before ``customs_delay`` (None: unknown)."""
        return self.customs.threshold_ms(origin, dest)

    def overdue_customs(self, book: ShipmentBook, now_ts: int) -> list[LogisticsAlert]:
        """``customs_delay`` alerts for ``book``'s holds that outlasted the usual by ``now_ts``
        (the newest event time seen, e.g. the agent's watermark). Mutates ``book`` (the kinds
        alerted): store it back when the list is not empty."""
        alerts = []
        for shipment in book.open.values():
            alert = self._customs_alert(shipment, now_ts)
            if alert is not None:
                alerts.append(alert)
        return alerts

    # -- introspection and checkpoints --------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        scored = self.scored
        return {
            **self.counters,
            "model_version": self.model.version,
            "snapshots_learned": self.model.rows_learned,
            "mae_model_h": round(self.abs_error_model_h / scored, 3) if scored else None,
            "mae_baseline_h": round(self.abs_error_baseline_h / scored, 3) if scored else None,
            "predictions_scored": scored,
            "watermark_ms": self.watermark_ms,
        }
