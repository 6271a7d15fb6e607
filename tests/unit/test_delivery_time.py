"""Delivery-time model, baseline, customs statistics, alerts and the engine's life cycle."""

from __future__ import annotations

import pickle
import random
import time
from typing import Any

import pytest
from pydantic import ValidationError

from models.delivery_time import (
    DAY_MS,
    HOUR_MS,
    CustomsStats,
    LogisticsEngine,
    RouteMedianBaseline,
    ScanReport,
)
from models.shipments import ShipmentBook
from schemas.events import LogisticsAlert, LogisticsEvent

T0 = 1_767_225_600_000
#: (origin, dest, carrier) -> days from departure to the hub: route and carrier effects.
LANES = {
    ("CN", "US", "cainiao"): 9.0,
    ("CN", "US", "dhl_express"): 4.0,
    ("DE", "FR", "dhl"): 2.0,
    ("US", "US", "usps"): 1.5,
}


class Journeys:
    """A tiny deterministic simulator of whole journeys, with known effects."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def journey(self, start: int, lane: tuple[str, str, str] | None = None) -> list[LogisticsEvent]:
        rng = self.rng
        self.n += 1
        origin, dest, carrier = lane or rng.choice(sorted(LANES))
        order = f"o{self.n}"
        t = start
        scans = []

        def emit(status: str) -> None:
            scans.append(
                LogisticsEvent(
                    event_id=f"{order}-{len(scans)}",
                    ts=t,
                    user_id=f"u{self.n % 50}",
                    order_id=order,
                    carrier=carrier,
                    origin_country=origin,
                    dest_country=dest,
                    status=status,
                    promised_ts=start + int((LANES[(origin, dest, carrier)] + 3) * DAY_MS),
                )
            )

        emit("created")
        t += int(rng.uniform(4, 12) * HOUR_MS)
        emit("picked")
        t += int(rng.uniform(2, 10) * HOUR_MS)
        emit("departed")
        t += int(LANES[(origin, dest, carrier)] * rng.uniform(0.9, 1.1) * DAY_MS)
        emit("arrived_hub")
        if origin != dest and not {origin, dest} <= {"DE", "FR"}:
            if rng.random() < 0.2:
                emit("customs_hold")
                t += int(rng.uniform(2, 3) * DAY_MS)
            else:
                t += int(rng.uniform(4, 12) * HOUR_MS)
            emit("customs_cleared")
        t += int(rng.uniform(8, 20) * HOUR_MS)
        emit("out_for_delivery")
        t += int(rng.uniform(1, 6) * HOUR_MS)
        emit("delivered")
        return scans

    def stream(self, n: int) -> list[LogisticsEvent]:
        scans = [s for k in range(n) for s in self.journey(T0 + k * 2 * HOUR_MS)]
        return sorted(scans, key=lambda s: s.ts)


def run(engine: LogisticsEngine, scans: list[LogisticsEvent]) -> list[ScanReport]:
    books: dict[str, ShipmentBook] = {}
    reports = []
    for scan in scans:
        book = books.setdefault(scan.user_id, ShipmentBook(scan.user_id))
        reports.append(engine.on_scan(book, scan))
    return reports


def mae(reports: list[ScanReport], which: str) -> float:
    errors = [
        abs(o.actual_h - getattr(o, which))
        for r in reports
        for o in r.outcomes
        if o.predicted_h is not None and o.baseline_h is not None
    ]
    return sum(errors) / len(errors)


# -- baseline and customs statistics -----------------------------------------------------------


def test_baseline_median_per_route_and_carrier_with_fallbacks() -> None:
    baseline = RouteMedianBaseline(min_samples=3)
    assert baseline.total_hours("CN", "US", "ems") is None
    for days in (5, 6, 100):  # a median, not a mean: the outlier does not move it
        baseline.learn("CN", "US", "cainiao", days * DAY_MS)
    for days in (2, 2):
        baseline.learn("CN", "US", "dhl_express", days * DAY_MS)
    assert baseline.total_hours("CN", "US", "cainiao") == 6 * 24
    # Too few dhl_express deliveries: the route's median over both carriers.
    assert baseline.total_hours("CN", "US", "dhl_express") == 5 * 24
    assert baseline.total_hours("JP", "KR", "ems") == 5 * 24  # all routes
    assert baseline.remaining_hours("CN", "US", "cainiao", elapsed_ms=2 * DAY_MS) == 4 * 24
    assert baseline.remaining_hours("CN", "US", "cainiao", elapsed_ms=9 * DAY_MS) == 0.0


def test_customs_stats_p90_per_route_then_destination() -> None:
    customs = CustomsStats(min_samples=10)
    for hours in range(1, 11):
        customs.learn("CN", "BR", hours * 10 * HOUR_MS)
    usual = customs.usual("CN", "BR")
    assert usual is not None and 90 <= usual[0] <= 100 and usual[1] == 10
    assert usual[2] == "route CN>BR"
    assert (
        customs.usual("US", "BR") is not None and "destination BR" in customs.usual("US", "BR")[2]
    )  # type: ignore[index]
    assert customs.threshold_ms("CN", "IN") is not None  # all routes
    assert CustomsStats(min_samples=11).threshold_ms("CN", "BR") is None


# -- the predictor -----------------------------------------------------------------------------


def test_predictor_learns_and_beats_the_baseline() -> None:
    engine = LogisticsEngine(warmup_rows=100)
    reports = run(engine, Journeys().stream(1500))
    delivered = [r for r in reports if r.delivered is not None]
    assert len(delivered) == 1500
    first, last = delivered[:300], delivered[-300:]
    assert mae(last, "predicted_h") < 0.6 * mae(first, "predicted_h")  # MAE falls
    assert mae(last, "predicted_h") < 0.9 * mae(last, "baseline_h")
    # Late in the run the status matters: out for delivery means hours, not days.
    ofd = [
        o.predicted_h
        for r in delivered[-100:]
        for o in r.outcomes
        if o.status == "out_for_delivery" and o.predicted_h is not None
    ]
    assert ofd and max(ofd) < 24
    stats = engine.stats()
    assert stats["deliveries"] == 1500 and stats["mae_model_h"] < stats["mae_baseline_h"]


def test_prediction_and_delivered_record() -> None:
    engine = LogisticsEngine(warmup_rows=50)
    journeys = Journeys(seed=2)
    run(engine, journeys.stream(400))
    scans = journeys.journey(T0 + 1000 * HOUR_MS, lane=("CN", "US", "cainiao"))
    reports = run(engine, scans)
    created = reports[0]
    assert created.applied and created.predicted_delivery_ts is not None
    promised = scans[0].promised_ts
    assert promised is not None
    # About ten days ahead for a slow lane, and a risk between 0 and 1.
    assert 7 * DAY_MS < created.predicted_delivery_ts - scans[0].ts < 14 * DAY_MS
    assert 0.0 <= created.delay_risk <= 1.0
    done = reports[-1]
    record = done.delivered
    assert record is not None and done.predicted_delivery_ts == scans[-1].ts
    assert record.order_id == scans[0].order_id and record.carrier == "cainiao"
    assert record.created_ts == scans[0].ts and record.delivered_ts == scans[-1].ts
    assert record.transit_days == pytest.approx((scans[-1].ts - scans[0].ts) / DAY_MS, abs=1e-3)
    assert record.on_time == (scans[-1].ts <= promised)
    assert done.outcomes and done.shipment.snapshots == []  # learned, then dropped


def test_duplicate_and_return_reports() -> None:
    engine = LogisticsEngine()
    scans = Journeys(seed=3).journey(T0)
    book = ShipmentBook(scans[0].user_id)
    for scan in scans:
        engine.on_scan(book, scan)
    again = engine.on_scan(book, scans[-1])
    assert not again.applied and again.delivered is None and again.alerts == []
    back = scans[-1].model_copy(
        update={"event_id": "ret", "status": "returned", "ts": scans[-1].ts + DAY_MS}
    )
    report = engine.on_scan(book, back)
    assert report.applied and report.returned and report.delivered is None
    assert engine.stats()["duplicates"] == 1 and engine.stats()["returns"] == 1


def test_predict_and_snapshot_are_cheap() -> None:
    engine = LogisticsEngine(warmup_rows=10)
    journeys = Journeys(seed=4)
    run(engine, journeys.stream(300))
    scans = journeys.stream(200)
    books: dict[str, ShipmentBook] = {}
    began = time.perf_counter()
    for scan in scans:
        engine.on_scan(books.setdefault(scan.user_id, ShipmentBook(scan.user_id)), scan)
    per_scan_ms = (time.perf_counter() - began) / len(scans) * 1000
    assert per_scan_ms < 2.0  # ~0.05 ms on the reference machine; generous for CI


# -- alerts ------------------------------------------------------------------------------------


def late_journey(engine: LogisticsEngine) -> list[ScanReport]:
    """A slow-lane shipment promised in two days: the model knows better."""
    scans = Journeys(seed=5).journey(T0 + 2000 * HOUR_MS, lane=("CN", "US", "cainiao"))
    promise = scans[0].ts + 2 * DAY_MS
    scans = [s.model_copy(update={"promised_ts": promise}) for s in scans]
    return run(engine, scans)


def test_predicted_late_alert_fires_once_per_shipment() -> None:
    engine = LogisticsEngine(warmup_rows=50, late_margin_ms=12 * HOUR_MS)
    run(engine, Journeys(seed=6).stream(300))
    reports = late_journey(engine)
    alerts = [a for r in reports for a in r.alerts if a.kind == "predicted_late"]
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.alert_id == f"{alert.order_id}:predicted_late"
    assert alert.ts == reports[0].shipment.created_ts  # raised at the first scan
    assert alert.predicted_delivery_ts and alert.promised_ts
    assert alert.predicted_delivery_ts > alert.promised_ts + 12 * HOUR_MS
    assert "after the promised" in alert.reason and "h" in alert.reason
    assert (alert.carrier, alert.origin_country, alert.dest_country) == ("cainiao", "CN", "US")
    assert reports[0].delay_risk > 0.9


def test_a_generous_margin_raises_nothing() -> None:
    engine = LogisticsEngine(warmup_rows=50, late_margin_ms=60 * DAY_MS)
    run(engine, Journeys(seed=6).stream(300))
    assert all(not r.alerts for r in late_journey(engine))


def trained_customs_engine() -> LogisticsEngine:
    engine = LogisticsEngine(customs_min_samples=5)
    for hours in (8, 9, 10, 11, 12, 10):
        engine.customs.learn("CN", "BR", hours * HOUR_MS)
    return engine


def hold(book: ShipmentBook, engine: LogisticsEngine, order: str = "h1") -> list[Any]:
    scans = [
        LogisticsEvent(
            event_id=f"{order}-{k}",
            ts=T0 + k * HOUR_MS,
            user_id="u1",
            order_id=order,
            carrier="cainiao",
            origin_country="CN",
            dest_country="BR",
            status=status,
        )
        for k, status in enumerate(("created", "arrived_hub", "customs_hold"))
    ]
    return [engine.on_scan(book, s) for s in scans]


def test_overdue_customs_alerts_once_from_the_watermark() -> None:
    engine = trained_customs_engine()
    book = ShipmentBook("u1")
    hold(book, engine)
    start = T0 + 2 * HOUR_MS
    assert engine.customs_threshold_ms("CN", "BR") == pytest.approx(12 * HOUR_MS, rel=0.1)
    assert engine.overdue_customs(book, start + 5 * HOUR_MS) == []
    alerts = engine.overdue_customs(book, start + 30 * HOUR_MS)
    assert [a.kind for a in alerts] == ["customs_delay"]
    assert alerts[0].alert_id == "h1:customs_delay" and alerts[0].ts == start + 30 * HOUR_MS
    assert "30 h" in alerts[0].reason and "route CN>BR" in alerts[0].reason
    assert engine.overdue_customs(book, start + 60 * HOUR_MS) == []  # once per shipment
    # The state survives the table round trip: still once.
    assert (
        engine.overdue_customs(ShipmentBook.from_bytes(book.to_bytes()), start + 90 * HOUR_MS) == []
    )


def test_customs_delay_alert_at_a_scan_and_learning_from_clearance() -> None:
    engine = trained_customs_engine()
    book = ShipmentBook("u1")
    hold(book, engine)
    late_scan = LogisticsEvent(
        event_id="h1-again",
        ts=T0 + 40 * HOUR_MS,
        user_id="u1",
        order_id="h1",
        carrier="cainiao",
        origin_country="CN",
        dest_country="BR",
        status="customs_hold",
    )
    report = engine.on_scan(book, late_scan)
    assert [a.kind for a in report.alerts] == ["customs_delay"]
    cleared = late_scan.model_copy(
        update={"event_id": "h1-clear", "status": "customs_cleared", "ts": T0 + 50 * HOUR_MS}
    )
    report = engine.on_scan(book, cleared)
    assert report.alerts == [] and engine.stats()["customs_holds_learned"] == 1
    assert engine.customs.counts[("CN", "BR")] == 7  # the 48 h hold was learned


def test_logistics_alert_is_frozen_and_strict() -> None:
    engine = trained_customs_engine()
    book = ShipmentBook("u1")
    hold(book, engine)
    alert = engine.overdue_customs(book, T0 + 100 * HOUR_MS)[0]
    with pytest.raises(ValidationError):
        LogisticsAlert.model_validate(alert.model_dump() | {"extra": 1})
    with pytest.raises(ValidationError):
        alert.reason = "changed"  # type: ignore[misc]
    assert LogisticsAlert.model_validate_json(alert.model_dump_json()) == alert


# -- checkpoints -------------------------------------------------------------------------------


def test_engine_checkpoint_round_trip_predicts_the_same() -> None:
    engine = LogisticsEngine(warmup_rows=50)
    journeys = Journeys(seed=7)
    run(engine, journeys.stream(300))
    restored = LogisticsEngine.from_checkpoint(engine.to_checkpoint())
    assert isinstance(pickle.loads(pickle.dumps(engine)), LogisticsEngine)
    probe = journeys.journey(T0 + 5000 * HOUR_MS)
    a = run(engine, probe)
    b = run(restored, probe)
    assert [r.predicted_delivery_ts for r in a] == [r.predicted_delivery_ts for r in b]
    assert [r.delay_risk for r in a] == [r.delay_risk for r in b]
    assert restored.stats() == engine.stats()
    with pytest.raises(ValueError):
        LogisticsEngine.from_checkpoint(b"\x00\x09" + engine.to_checkpoint()[2:])
