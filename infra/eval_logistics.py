"""``borderflow eval logistics``: delivery-time predictor vs the route-median baseline.

Protocol (prequential, one process, nothing read from or written to the stack): a seeded shop
is simulated (``infra.generator``), its logistics scans are taken in event-time order and fed
to :class:`models.delivery_time.LogisticsEngine` with one
:class:`models.shipments.ShipmentBook` per user, exactly as the agent does. At every scan
that moves a shipment both the online predictor and the naive
:class:`~models.delivery_time.RouteMedianBaseline` predict the remaining time to delivery;
when the shipment is delivered every prediction is scored against the truth, *then* both
learn (neither ever sees the future). Holds in customs are also checked against the newest
event time every simulated hour (``overdue_customs``), as the agent does with its watermark.

Reported, from the same run: MAE in hours of both over all scored predictions, per status,
and per quarter of completed deliveries (learning curve); the alerts raised and how many of
their shipments were actually delivered late (precision), how many late deliveries had a
``predicted_late`` alert before delivery (recall); duplicates, invalid transitions, timing.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

import click

from infra.generator import GeneratorConfig, simulate
from models.delivery_time import HOUR_MS, LogisticsEngine
from models.shipments import STATUSES, ShipmentBook
from schemas.errors import BorderflowError
from schemas.events import LOGISTICS, LogisticsEvent

PROTOCOL = (
    "scans in event-time order; at each scan both models predict the remaining hours to "
    "delivery; when the shipment is delivered its predictions are scored, then both learn"
)


def _mae(total: float, n: int) -> float | None:
    return round(total / n, 2) if n else None


def _gain(model: float | None, baseline: float | None) -> float | None:
    if model is None or not baseline:
        return None
    return round(1.0 - model / baseline, 4)


def evaluate_logistics(
    *,
    users: int = 2000,
    days: float = 60.0,
    seed: int = 7,
    late_margin_h: float = 12.0,
    customs_min_samples: int = 20,
) -> dict[str, Any]:
    """Run the protocol (module docstring) and return a JSON-ready dict."""
    config = GeneratorConfig(users=users, days=days, seed=seed)
    began = time.perf_counter()
    scans = [
        LogisticsEvent.model_validate(event.value)
        for event in simulate(config)
        if event.topic == LOGISTICS
    ]
    scans.sort(key=lambda scan: scan.ts)  # stable: already in order, kept explicit
    generated_s = time.perf_counter() - began
    if not scans:
        raise BorderflowError("the simulated period has no shipment scans: raise --users/--days")

    engine = LogisticsEngine(
        late_margin_ms=int(late_margin_h * HOUR_MS), customs_min_samples=customs_min_samples
    )
    books: dict[str, ShipmentBook] = {}
    held: dict[str, str] = {}  # order_id -> user_id of shipments in a customs hold
    next_check = scans[0].ts + HOUR_MS
    rows: list[tuple[int, str, float, float, float]] = []  # delivery seq, status, y, model, base
    alerts: dict[str, list[tuple[str, int]]] = defaultdict(list)  # order -> [(kind, ts)]
    delivered: dict[str, tuple[int, int | None]] = {}  # order -> (delivered_ts, promised_ts)
    unscored = 0
    invalid: Counter[str] = Counter()
    engine_s = 0.0
    for scan in scans:
        if scan.ts >= next_check:  # the watermark moved on: holds with no news may be overdue
            t0 = time.perf_counter()
            for user_id in set(held.values()):
                for alert in engine.overdue_customs(books[user_id], scan.ts):
                    alerts[alert.order_id].append((alert.kind, alert.ts))
            engine_s += time.perf_counter() - t0
            next_check = scan.ts + HOUR_MS
        book = books.get(scan.user_id)
        if book is None:
            book = books[scan.user_id] = ShipmentBook(scan.user_id)
        t0 = time.perf_counter()
        report = engine.on_scan(book, scan)
        engine_s += time.perf_counter() - t0
        shipment = report.shipment
        if shipment.in_customs_hold and not shipment.completed:
            held[shipment.order_id] = shipment.user_id
        else:
            held.pop(shipment.order_id, None)
        for alert in report.alerts:
            alerts[alert.order_id].append((alert.kind, alert.ts))
        if report.invalid_transition:
            invalid[report.invalid_transition] += 1
        if report.delivered is not None:
            record = report.delivered
            delivered[record.order_id] = (record.delivered_ts, record.promised_ts)
            seq = len(delivered) - 1
            for outcome in report.outcomes:
                if outcome.predicted_h is None or outcome.baseline_h is None:
                    unscored += 1
                    continue
                rows.append(
                    (seq, outcome.status, outcome.actual_h, outcome.predicted_h, outcome.baseline_h)
                )

    n_delivered = len(delivered)
    overall = _scores(rows)
    per_status = {}
    for status in STATUSES:
        subset = [r for r in rows if r[1] == status]
        if subset:
            per_status[status] = _scores(subset)
    per_quarter = []
    for q in range(4):
        lo, hi = q * n_delivered / 4, (q + 1) * n_delivered / 4
        subset = [r for r in rows if lo <= r[0] < hi]
        per_quarter.append({"quarter": q + 1, "deliveries": int(hi) - int(lo), **_scores(subset)})

    alert_summary = {}
    late_orders = {
        o for o, (done, promised) in delivered.items() if promised is not None and done > promised
    }
    for kind in ("predicted_late", "customs_delay"):
        orders = {o for o, raised in alerts.items() if any(k == kind for k, _ in raised)}
        resolved = orders & delivered.keys()
        late = resolved & late_orders
        summary: dict[str, Any] = {
            "alerts": len(orders),
            "delivered": len(resolved),
            "delivered_late": len(late),
            "precision": round(len(late) / len(resolved), 4) if resolved else None,
        }
        if kind == "predicted_late":
            early = {
                o
                for o in late_orders
                if any(k == kind and ts < delivered[o][0] for k, ts in alerts.get(o, ()))
            }
            summary["late_deliveries"] = len(late_orders)
            summary["recall"] = round(len(early) / len(late_orders), 4) if late_orders else None
        alert_summary[kind] = summary
    # Each kind fires at most once per shipment: anything above that would be a bug.
    repeated = sum(
        n - 1 for raised in alerts.values() for n in Counter(k for k, _ in raised).values()
    )
    stats = engine.stats()
    return {
        "config": {
            "users": users,
            "days": days,
            "seed": seed,
            "late_margin_h": late_margin_h,
            "customs_min_samples": customs_min_samples,
        },
        "protocol": PROTOCOL,
        "scans": len(scans),
        "shipments": len({s.order_id for s in scans}),
        "deliveries": n_delivered,
        "predictions_scored": len(rows),
        "predictions_unscored": unscored,
        "mae_h": overall,
        "per_status": per_status,
        "per_quarter": per_quarter,
        "alerts": alert_summary,
        "alerts_repeated": repeated,
        "invalid_transitions": dict(invalid.most_common()),
        "duplicates": stats["duplicates"],
        "out_of_order": stats["out_of_order"],
        "model_version": stats["model_version"],
        "timing": {
            "generate_s": round(generated_s, 2),
            "engine_s": round(engine_s, 2),
            "us_per_scan": round(engine_s / len(scans) * 1e6, 1),
        },
    }


def _scores(rows: list[tuple[int, str, float, float, float]]) -> dict[str, Any]:
    model = sum(abs(y - m) for _, _, y, m, _ in rows)
    base = sum(abs(y - b) for _, _, y, _, b in rows)
    mae_model, mae_base = _mae(model, len(rows)), _mae(base, len(rows))
    return {
        "n": len(rows),
        "model": mae_model,
        "baseline": mae_base,
        "improvement": _gain(mae_model, mae_base),
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"logistics evaluation: {cfg['users']} users, {cfg['days']:g} days, seed {cfg['seed']}",
        f"{result['scans']:,} scans, {result['shipments']:,} shipments, "
        f"{result['deliveries']:,} delivered; {result['predictions_scored']:,} predictions "
        f"scored ({result['predictions_unscored']:,} before any delivery, not scored)",
        f"protocol: {result['protocol']}",
        "",
        f"{'MAE remaining hours':<22}{'n':>8}{'model':>9}{'baseline':>10}{'gain':>8}",
    ]

    def line(label: str, s: dict[str, Any]) -> str:
        return (
            f"{label:<22}{s['n']:>8,}{_fmt(s['model']):>9}{_fmt(s['baseline']):>10}"
            f"{_fmt(None if s['improvement'] is None else s['improvement'] * 100, '.0f'):>7}%"
        )

    lines.append(line("all predictions", result["mae_h"]))
    lines.append("per status:")
    for status, s in result["per_status"].items():
        lines.append(line(f"  {status}", s))
    lines.append("per quarter of completed deliveries:")
    for s in result["per_quarter"]:
        lines.append(line(f"  Q{s['quarter']} ({s['deliveries']:,} deliveries)", s))
    lines.append("")
    late = result["alerts"]["predicted_late"]
    customs = result["alerts"]["customs_delay"]
    lines.append(
        f"alerts predicted_late: {late['alerts']:,} raised, {late['delivered']:,} delivered "
        f"so far, of which late {late['delivered_late']:,} (precision "
        f"{_fmt(late['precision'], '.1%')}); recall: {_fmt(late['recall'], '.1%')} of "
        f"{late['late_deliveries']:,} late deliveries alerted before delivery"
    )
    lines.append(
        f"alerts customs_delay: {customs['alerts']:,} raised, {customs['delivered']:,} "
        f"delivered, of which late {customs['delivered_late']:,} (precision "
        f"{_fmt(customs['precision'], '.1%')})"
    )
    invalid = result["invalid_transitions"]
    lines.append(
        f"invalid transitions: {sum(invalid.values()):,}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in invalid.items())})" if invalid else "")
        + f"; duplicates: {result['duplicates']:,}; out of order: {result['out_of_order']:,}"
    )
    t = result["timing"]
    lines.append(
        f"timing: engine {t['engine_s']:.1f} s ({t['us_per_scan']:.0f} us per scan), "
        f"simulation {t['generate_s']:.1f} s; model {result['model_version']}"
    )
    return "\n".join(lines)


@click.command("logistics")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--days", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--late-margin-hours",
    type=click.FloatRange(min=0),
    default=12.0,
    show_default=True,
    help="predicted_late fires when the prediction passes the promise by more than this.",
)
@click.option(
    "--customs-min-samples",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Holds needed before a route's usual customs time is trusted.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_logistics_command(
    users: int,
    days: float,
    seed: int,
    late_margin_hours: float,
    customs_min_samples: int,
    as_json: bool,
) -> None:
    """Delivery-time predictor vs the route-median baseline on a simulated shop (prequential)."""
    result = evaluate_logistics(
        users=users,
        days=days,
        seed=seed,
        late_margin_h=late_margin_hours,
        customs_min_samples=customs_min_samples,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(result))
