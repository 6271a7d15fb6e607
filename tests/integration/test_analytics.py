"""The analytics cookbook (docs/analytics.md) answers its questions correctly.

A seeded data set (clicks, payments, fraud labels, tracking scans, recommendation outcomes,
logistics alerts) is written into an isolated, migrated database through the production
writer (``ClickHouseWriter``: pseudonyms, materialized-view rollups), the ``shipments`` rows
by the production state machine (``ShipmentBook`` + ``completion_row``). Every question's
answer is computed independently in Python from the source events (the oracles below), then
each ```sql block of the cookbook runs, unchanged, through the real ``clickhouse-client`` and
must give exactly those rows in that order (floats to the precision the query rounds to).

The data set holds the cases that make plausible wrong queries fail: a payment relabelled
with the later label ingested first, a label in the next month, a country whose carts never
become purchases, a session that buys without viewing, a shipment never held in customs on a
route where others are, a return after delivery (two ``shipments`` rows), a route whose only
order was returned, a delivery exactly at its promise, tied top items, an item bought in two
currencies, a repeated recommendation outcome and logistics alert, and rows just outside the
documented window (2025-12-31 23:59:59 and 2026-02-01 00:00:00).
"""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated
from models.fx import to_usd
from models.shipments import ShipmentBook
from schemas.config import Settings
from schemas.events import LogisticsEvent
from sinks.clickhouse import ClickHouseWriter
from streams.agents.logistics import completion_row

pytestmark = pytest.mark.integration

ANALYTICS = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
QUERY = re.compile(r"<!-- test: ([a-z0-9_]+) -->\n```sql\n(.*?)```", re.S)

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the cookbook's window is [T0, T_END)
T_END = T0 + 31 * DAY  # 2026-02-01T00:00:00Z
SEED = 6003

CURRENCY = {"DE": "EUR", "FR": "EUR", "US": "USD", "JP": "JPY", "GB": "GBP", "BR": "BRL"}
BUYER_COUNTRIES = ("DE", "FR", "US", "JP", "GB")
#: item -> (category, origin country ('' = unknown), price in USD)
ITEMS: dict[str, tuple[str, str, float]] = {
    "i01": ("shoes", "CN", 40.0),
    "i02": ("shoes", "CN", 55.0),
    "i03": ("books", "DE", 20.0),
    "i04": ("books", "DE", 20.0),
    "i05": ("toys", "US", 35.0),
    "i06": ("toys", "US", 12.5),
    "i07": ("tech", "JP", 120.0),
    "i08": ("tech", "JP", 50.0),
    "i09": ("home", "GB", 18.0),
    "i10": ("home", "CN", 27.0),
    "i11": ("beauty", "FR", 33.0),
    "i12": ("misc", "", 15.0),
}
SEGMENTS = ("high-value", "dynamic", "growth")
MERCHANTS = {"m-cn": "CN", "m-de": "DE", "m-us": "US", "m-gb": "GB", "m-unknown": ""}
ROUTES = (
    ("CN", "DE"), ("CN", "US"), ("US", "DE"), ("DE", "FR"), ("GB", "US"), ("JP", "US"),
    ("US", "JP"), ("DE", "GB"),
)  # fmt: skip
NO_CUSTOMS = {("DE", "FR")}
CARRIERS = ("cainiao", "dhl_express", "ups")
ALERT_THRESHOLD = 0.8


# -- the source events ----------------------------------------------------------------------


@dataclass
class Click:
    event_id: str
    ts: int
    user_id: str
    session_id: str
    type: str
    item_id: str
    country: str
    price: float = 0.0
    currency: str = ""
    segment: str = ""
    #: The clicked item's rank in the list served just before (0: not in it); None: unscored.
    hit_rank: int | None = None
    personalised: int = 1

    @property
    def category(self) -> str:
        return ITEMS[self.item_id][0]

    @property
    def origin_country(self) -> str:
        return ITEMS[self.item_id][1]

    @property
    def amount_usd(self) -> float:
        """What the clicks agent stores: purchases in USD at the reference rates."""
        if self.type != "purchase":
            return 0.0
        return to_usd(self.price, self.currency) or 0.0


@dataclass
class Payment:
    txn_id: str
    ts: int
    user_id: str
    merchant_id: str
    amount: float
    currency: str
    score: float
    shipping_country: str
    billing_country: str
    ip_country: str

    @property
    def amount_usd(self) -> float:
        return to_usd(self.amount, self.currency) or 0.0

    @property
    def is_alert(self) -> bool:
        return self.score >= ALERT_THRESHOLD

    @property
    def origin_country(self) -> str:
        return MERCHANTS[self.merchant_id]


@dataclass
class Label:
    txn_id: str
    user_id: str
    label: str
    ts: int
    ingested_at_s: int
    source: str = "chargeback"
    event_id: str = ""


@dataclass
class Journey:
    """One order's tracking scans, in event time, as the carrier sent them."""

    order_id: str
    user_id: str
    carrier: str
    origin_country: str
    dest_country: str
    promised_ts: int
    scans: list[tuple[int, str]] = field(default_factory=list)

    def first(self, status: str) -> int:
        return next((ts for ts, s in self.scans if s == status), 0)

    @property
    def created_ts(self) -> int:
        return self.scans[0][0]

    @property
    def delivered_ts(self) -> int:
        return self.first("delivered")

    @property
    def returned(self) -> bool:
        return self.first("returned") > 0

    @property
    def completed(self) -> bool:
        return self.delivered_ts > 0 or self.returned

    @property
    def completed_ts(self) -> int:
        return self.delivered_ts or self.first("returned")

    @property
    def transit_days(self) -> float:
        return (self.delivered_ts - self.created_ts) / DAY

    @property
    def customs_hours(self) -> float:
        held = 0
        for (ts, status), (next_ts, _) in zip(self.scans, self.scans[1:], strict=False):
            if status == "customs_hold":
                held += next_ts - ts
        return held / HOUR

    @property
    def on_time(self) -> bool:
        return bool(self.promised_ts) and 0 < self.delivered_ts <= self.promised_ts

    def event_id(self, index: int) -> str:
        return f"{self.order_id}-{index}-{self.scans[index][1]}"


@dataclass
class Prediction:
    event_id: str
    order_id: str
    ts: int
    status: str
    predicted_ms: int


@dataclass
class LogisticsAlert:
    kind: str
    journey: Journey
    ts: int

    @property
    def alert_id(self) -> str:
        return f"{self.journey.order_id}:{self.kind}"


@dataclass
class DataSet:
    clicks: list[Click] = field(default_factory=list)
    payments: list[Payment] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    journeys: list[Journey] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    alerts: list[LogisticsAlert] = field(default_factory=list)

    def purchases(self) -> list[Click]:
        return [c for c in self.clicks if c.type == "purchase"]


def in_window(ts: int) -> bool:
    return T0 <= ts < T_END


def local_price(usd: float, currency: str) -> float:
    """A shop price in ``currency`` worth about ``usd`` (whole yen)."""
    rate = to_usd(1.0, currency) or 1.0
    return float(round(usd / rate)) if currency == "JPY" else round(usd / rate, 2)


def generate() -> DataSet:
    rng = random.Random(SEED)
    data = DataSet()
    _clicks(rng, data)
    _payments(rng, data)
    _journeys(rng, data)
    return data


def _clicks(rng: random.Random, data: DataSet) -> None:
    scored_users: set[str] = set()

    def add(click: Click) -> None:
        # The worker scores a click against the list it had served that user just before:
        # every click after the user's first one.
        if click.user_id in scored_users:
            click.hit_rank = 0 if rng.random() < 0.55 else rng.randint(1, 20)
        scored_users.add(click.user_id)
        data.clicks.append(click)

    def buy(user: str, session: str, ts: int, item: str, country: str, currency: str) -> None:
        add(
            Click(
                f"{session}-{ts}-p", ts, user, session, "purchase", item, country,
                local_price(ITEMS[item][2], currency), currency, rng.choice(SEGMENTS),
            )
        )  # fmt: skip

    item_ids = sorted(ITEMS)
    for u in range(36):
        user, country = f"u{u:02d}", BUYER_COUNTRIES[u % len(BUYER_COUNTRIES)]
        for s in range(rng.randint(1, 3)):
            session = f"{user}-s{s}"
            t = (
                T0
                + rng.randint(0, 13) * DAY
                + rng.randint(0, 23) * HOUR
                + rng.randint(0, 59) * MINUTE
            )
            viewed = rng.sample(item_ids, rng.randint(1, 3))
            for item in viewed:
                add(Click(f"{session}-{t}-v", t, user, session, "view", item, country))
                t += rng.randint(1, 4) * MINUTE
            if rng.random() < 0.6:
                add(Click(f"{session}-{t}-c", t, user, session, "add_to_cart", viewed[0], country))
                t += rng.randint(1, 9) * MINUTE
                if rng.random() < 0.7:
                    buy(user, session, t, viewed[0], country, CURRENCY[country])
                    if len(viewed) > 1 and rng.random() < 0.3:
                        buy(user, session, t + MINUTE, viewed[1], country, CURRENCY[country])
    # A market whose carts never become purchases (and which has not consented to
    # personalisation: its lists are not personalised).
    for u in range(3):
        user, session = f"br{u}", f"br{u}-s0"
        t = T0 + (2 + u) * DAY + 10 * HOUR
        for k, item in enumerate(("i01", "i05", "i07")):
            add(Click(f"{session}-v{k}", t + k * MINUTE, user, session, "view", item, "BR"))
        add(Click(f"{session}-c", t + 5 * MINUTE, user, session, "add_to_cart", "i05", "BR"))
    for click in data.clicks:
        if click.country == "BR":
            click.personalised = 0
    # One item bought in two currencies in the same country.
    buy("u00", "u00-x1", T0 + 3 * DAY + 7 * HOUR, "i01", "DE", "EUR")
    buy("u05", "u05-x1", T0 + 4 * DAY + 7 * HOUR, "i01", "DE", "USD")
    # A session that buys without viewing (a re-order): not in the strict funnel.
    buy("u02", "u02-x1", T0 + 5 * DAY, "i06", "US", "USD")
    # Canada: i07 twice, i08 once (more revenue than i03/i04), i03 and i04 once each at the
    # same price (a tie on purchases and revenue: the item id decides), i09 once (cheaper).
    for k, item in enumerate(("i07", "i07", "i08", "i04", "i03", "i09")):
        user = f"ca{k}"
        t = T0 + (6 + k) * DAY
        add(Click(f"ca{k}-v", t, user, f"ca{k}-s", "view", item, "CA"))
        add(Click(f"ca{k}-c", t + MINUTE, user, f"ca{k}-s", "add_to_cart", item, "CA"))
        buy(user, f"ca{k}-s", t + 2 * MINUTE, item, "CA", "CAD")
    # Sessions just outside the window on both sides, and one exactly at its start.
    for user, session, ts, item in (
        ("u00", "u00-x0", T0 - 1000, "i02"),
        ("u00", "u00-x2", T_END, "i02"),
        ("u10", "u10-x0", T0, "i03"),
    ):
        add(Click(f"{session}-v", ts, user, session, "view", item, "DE"))
        add(Click(f"{session}-c", ts, user, session, "add_to_cart", item, "DE"))
        buy(user, session, ts, item, "DE", "EUR")


def _payments(rng: random.Random, data: DataSet) -> None:
    def pay(txn: str, ts: int, user: str, country: str, **fields: Any) -> Payment:
        merchant = fields.pop("merchant", rng.choice(sorted(MERCHANTS)))
        currency = fields.pop("currency", CURRENCY[country] if rng.random() < 0.8 else "USD")
        shipping = fields.pop(
            "shipping", country if rng.random() < 0.85 else rng.choice(BUYER_COUNTRIES)
        )
        payment = Payment(
            txn, ts, user, merchant, local_price(rng.uniform(5, 400), currency), currency,
            fields.pop("score", round(rng.random(), 4)), shipping, country,
            "" if rng.random() < 0.2 else country,
        )  # fmt: skip
        data.payments.append(payment)
        return payment

    def label(payment: Payment, value: str, after_days: int, ingested_s: int | None = None) -> None:
        ts = payment.ts + after_days * DAY
        ingested = ingested_s if ingested_s is not None else ts // 1000 + 60
        source = "chargeback" if value == "fraud" else "settlement"
        data.labels.append(Label(
            payment.txn_id, payment.user_id, value, ts, ingested, source,
            event_id=f"lbl-{len(data.labels):04d}",
        ))  # fmt: skip

    for k in range(110):
        u = rng.randint(0, 35)
        country = BUYER_COUNTRIES[u % len(BUYER_COUNTRIES)]
        payment = pay(f"tx{k:03d}", T0 + rng.randint(0, 14 * DAY - 1), f"u{u:02d}", country)
        if rng.random() < 0.75:
            fraud = rng.random() < 0.1 + 0.6 * payment.score
            label(payment, "fraud" if fraud else "legit", rng.randint(1, 12))
    # Relabelled: settled as legit, then charged back; the chargeback was ingested *first*
    # (a backfill), so the newest ingestion is not the newest label.
    first = pay("tx-relabel-1", T0 + 2 * DAY, "u03", "US", merchant="m-cn", score=0.95)
    stamp = (T0 + 20 * DAY) // 1000
    label(first, "legit", 2, ingested_s=stamp + 3600)
    label(first, "fraud", 10, ingested_s=stamp)
    # Charged back, then cleared by a manual review.
    second = pay("tx-relabel-2", T0 + 3 * DAY, "u08", "US", merchant="m-cn", score=0.9)
    label(second, "fraud", 3)
    label(second, "legit", 6)
    data.labels[-1].source = "manual_review"
    # Settled in January, charged back in February (another month, another partition).
    third = pay("tx-relabel-3", T0 + 12 * DAY, "u04", "GB", merchant="m-us", score=0.85)
    label(third, "legit", 4)
    label(third, "fraud", 25)
    # A label for a payment ClickHouse never scored; a payment before the window.
    data.labels.append(Label(
        "tx-unknown", "u01", "fraud", T0 + DAY, T0 // 1000 + DAY // 1000, event_id="lbl-unknown"
    ))  # fmt: skip
    early = pay("tx-early", T0 - 1000, "u01", "FR", score=0.99)
    label(early, "fraud", 5)


def _journeys(rng: random.Random, data: DataSet) -> None:
    def journey(order: str, user: str, route: tuple[str, str], carrier: str, start: int,
                *, held_h: int | None, fate: str, promise_days: int | None,
                failed: bool = False) -> Journey:  # fmt: skip
        t = start
        scans = [(t, "created")]
        for status, hours in (("picked", rng.randint(2, 10)), ("departed", rng.randint(4, 20))):
            t += hours * HOUR
            scans.append((t, status))
        t += rng.randint(24, 96) * HOUR
        scans.append((t, "arrived_hub"))
        if held_h:
            t += 2 * HOUR
            scans.append((t, "customs_hold"))
            t += held_h * HOUR
            scans.append((t, "customs_cleared"))
        t += rng.randint(4, 24) * HOUR
        scans.append((t, "out_for_delivery"))
        if fate == "returned":  # never delivered: failed, then sent back
            scans += [(t + 5 * HOUR, "failed_attempt"), (t + 77 * HOUR, "returned")]
        elif fate != "in_flight":
            if failed:
                t += 5 * HOUR
                scans.append((t, "failed_attempt"))
                t += 20 * HOUR
                scans.append((t, "out_for_delivery"))
            t += 3 * HOUR
            scans.append((t, "delivered"))
            if fate == "delivered_returned":
                scans.append((t + 5 * DAY, "returned"))
        promised = start + promise_days * DAY if promise_days else 0
        result = Journey(order, user, carrier, route[0], route[1], promised, scans)
        data.journeys.append(result)
        return result

    def random_journey(order: str, route: tuple[str, str], carrier: str, start: int) -> None:
        held = route not in NO_CUSTOMS and rng.random() < 0.5
        fate = rng.random()
        journey(
            order, f"u{rng.randint(0, 35):02d}", route, carrier, start,
            held_h=rng.randint(4, 72) if held else None,
            fate="in_flight" if fate < 0.08 else "returned" if fate < 0.16
            else "delivered_returned" if fate < 0.24 else "delivered",
            promise_days=rng.randint(3, 9) if rng.random() < 0.85 else None,
            failed=rng.random() < 0.2,
        )  # fmt: skip

    for k in range(60):
        start = T0 + rng.randint(0, 14) * DAY + rng.randint(0, 23) * HOUR
        random_journey(f"o{k:03d}", rng.choice(ROUTES), rng.choice(CARRIERS), start)
    # Every route x carrier completes something, so route_kpis has more groups than its LIMIT.
    for k, (route, carrier) in enumerate((r, c) for r in ROUTES for c in CARRIERS):
        start = T0 + (k % 10) * DAY + 3 * HOUR
        journey(f"o-rc{k:02d}", f"u{k:02d}", route, carrier, start,
                held_h=None if route in NO_CUSTOMS else 6 + k, fate="delivered",
                promise_days=8)  # fmt: skip
    # Never held on a route where most orders are; delivered exactly at its promise.
    plain = journey("o-plain", "u07", ("CN", "DE"), "ups", T0 + 4 * DAY, held_h=None,
                    fate="delivered", promise_days=None)  # fmt: skip
    plain.promised_ts = plain.delivered_ts
    # Delivered on time, then returned: two shipments rows, the later one wins.
    journey("o-return-after", "u09", ("GB", "US"), "dhl_express", T0 + 5 * DAY, held_h=30,
            fate="delivered_returned", promise_days=9)  # fmt: skip
    # The only order of its route, returned without ever being delivered.
    journey("o-lonely-return", "u11", ("CN", "FR"), "ups", T0 + 6 * DAY, held_h=12,
            fate="returned", promise_days=7)  # fmt: skip
    # Completed before the window (in every all-time answer, in no windowed one).
    journey("o-december", "u12", ("CN", "DE"), "cainiao", T0 - 12 * DAY, held_h=50,
            fate="delivered", promise_days=9)  # fmt: skip

    for j in data.journeys:
        # What the delivery-time model said at each scan before completion.
        truth = j.delivered_ts or j.created_ts + 7 * DAY
        for index, (ts, status) in enumerate(j.scans):
            if status in ("delivered", "returned"):
                break
            error = rng.randint(-48, 48) * HOUR
            data.predictions.append(
                Prediction(j.event_id(index), j.order_id, ts, status, truth + error)
            )
        # Logistics alerts: predicted late (first prediction beyond promise + 12 h) and
        # held in customs longer than 36 h.
        mine = [p for p in data.predictions if p.order_id == j.order_id]
        late = [p for p in mine if j.promised_ts and p.predicted_ms > j.promised_ts + 12 * HOUR]
        if late:
            data.alerts.append(LogisticsAlert("predicted_late", j, late[0].ts))
        hold = j.first("customs_hold")
        if hold and j.customs_hours > 36:
            data.alerts.append(LogisticsAlert("customs_delay", j, hold + 36 * HOUR))


# -- writing it the production way ------------------------------------------------------------


def write(settings: Settings, data: DataSet) -> None:
    ingested = T_END // 1000 + 3600
    offsets: dict[str, int] = defaultdict(int)

    def rows(table: str, values: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        out = []
        for value in values:
            offsets[table] += 1
            out.append((*value, 0, offsets[table]))
        return out

    writer = ClickHouseWriter(settings)
    try:
        writer.add("click_events", rows("click_events", (
            (c.event_id, c.ts // 1000, c.ts, c.user_id, c.session_id, c.type, c.item_id,
             c.category, c.country, c.amount_usd, c.segment, ingested, c.origin_country)
            for c in data.clicks
        )))  # fmt: skip
        scored = [c for c in data.clicks if c.hit_rank is not None]
        rec_rows = rows("rec_predictions", (
            (c.event_id, c.ts // 1000, c.ts, c.user_id, c.country, c.type, c.hit_rank, 20,
             c.personalised, 1000, ingested)
            for c in scored
        ))  # fmt: skip
        writer.add("rec_predictions", rec_rows)
        # A click redelivered after a crash: its outcome is written again (and replaced).
        again = rec_rows[len(rec_rows) // 2]
        writer.add("rec_predictions", [(*again[:10], ingested + 60, *again[11:])])
        writer.add("fraud_scores", rows("fraud_scores", (
            (p.txn_id, p.user_id, f"card-{p.user_id}", p.merchant_id, p.ts // 1000, p.ts,
             p.amount, p.currency, p.amount_usd, p.score, int(p.is_alert), ALERT_THRESHOLD,
             ["test reason"] if p.is_alert else [], "ensemble-v3@100", p.billing_country,
             p.shipping_country, p.ip_country, ingested, p.origin_country)
            for p in data.payments
        )))  # fmt: skip
        writer.add("fraud_label_events", rows("fraud_label_events", (
            (lb.event_id, lb.txn_id, lb.user_id, lb.label, lb.ts // 1000, lb.ts, lb.source,
             lb.ingested_at_s)
            for lb in data.labels
        )))  # fmt: skip
        scans, completions = _scan_rows(data.journeys, ingested)
        writer.add("shipment_events", rows("shipment_events", scans))
        writer.add("shipments", rows("shipments", completions))
        by_order = {j.order_id: j for j in data.journeys}
        writer.add("shipment_predictions", rows("shipment_predictions", (
            (p.event_id, p.order_id, p.ts // 1000, p.ts, p.status, j.carrier, j.origin_country,
             j.dest_country, p.predicted_ms, j.promised_ts, 0.5, ingested)
            for p in data.predictions
            for j in [by_order[p.order_id]]
        )))  # fmt: skip
        alert_rows = [
            (a.alert_id, a.kind, a.journey.order_id, a.journey.user_id, a.ts // 1000, a.ts,
             a.journey.carrier, a.journey.origin_country, a.journey.dest_country, 0,
             a.journey.promised_ts, f"{a.kind} reason", ingested)
            for a in data.alerts
        ]  # fmt: skip
        writer.add("logistics_alerts", alert_rows)
        # Re-raised after a crash: replaces its row (same alert_id).
        writer.add("logistics_alerts", [(*alert_rows[0][:12], ingested + 60)])
        assert writer.flush(60), "ClickHouse writer did not flush"
    finally:
        writer.close()
    assert writer.rows_written > 0 and writer.failures == 0, writer.last_error


def _scan_rows(
    journeys: list[Journey], ingested: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """shipment_events rows of every scan; shipments rows as the logistics agent writes them
    (a completion row at every applied scan of a completed order)."""
    scans: list[tuple[Any, ...]] = []
    completions: list[tuple[Any, ...]] = []
    books: dict[str, ShipmentBook] = {}
    for j in journeys:
        for index, (ts, status) in enumerate(j.scans):
            event_id = j.event_id(index)
            scans.append((
                event_id, j.order_id, j.user_id, j.carrier, j.origin_country, j.dest_country,
                status, ts // 1000, ts, j.promised_ts, "", ingested,
            ))  # fmt: skip
            scan = LogisticsEvent(
                event_id=event_id, ts=ts, user_id=j.user_id, order_id=j.order_id,
                carrier=j.carrier, origin_country=j.origin_country,
                dest_country=j.dest_country, status=status,  # type: ignore[arg-type]
                promised_ts=j.promised_ts or None,
            )  # fmt: skip
            book = books.setdefault(j.user_id, ShipmentBook(j.user_id))
            shipment, outcome = book.apply(scan)
            if outcome.applied and shipment.completed:
                completions.append(completion_row(shipment, ts, ingested))
    return scans, completions


# -- the oracles: each question's answer from the source events --------------------------------


@dataclass(frozen=True)
class Approx:
    """A float the query rounds to ``digits`` decimals (None: not rounded)."""

    value: float
    digits: int | None = None


Cell = str | int | Approx | None
Row = tuple[Cell, ...]
ORACLES: dict[str, Callable[[DataSet], list[Row]]] = {}


def oracle(name: str) -> Callable[[Callable[[DataSet], list[Row]]], Callable[[DataSet], list[Row]]]:
    def register(function: Callable[[DataSet], list[Row]]) -> Callable[[DataSet], list[Row]]:
        ORACLES[name] = function
        return function

    return register


def ratio(numerator: float, denominator: float, digits: int) -> Approx | None:
    """``round(n / nullIf(d, 0), digits)``."""
    return Approx(numerator / denominator, digits) if denominator else None


def day_of(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d")


def hour_of(ts: int) -> str:
    return datetime.fromtimestamp(ts // HOUR * HOUR / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def quantile_exact(values: list[float], level: float) -> float:
    """ClickHouse's quantileExact: the element at index floor(level * n) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(level * len(ordered)))]


def window_purchases(data: DataSet) -> list[Click]:
    return [c for c in data.purchases() if in_window(c.ts)]


@oracle("funnel")
def _funnel(data: DataSet) -> list[Row]:
    sessions: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for c in data.clicks:
        if in_window(c.ts):
            sessions[(c.country, c.user_id, c.session_id)].add(c.type)
    steps: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for (country, _, _), types in sessions.items():
        counts = steps[country]
        viewed = "view" in types
        carted = viewed and "add_to_cart" in types
        counts[0] += viewed
        counts[1] += carted
        counts[2] += carted and "purchase" in types
    return [
        (country, v, c, p, ratio(c, v, 4), ratio(p, c, 4), ratio(p, v, 4))
        for country, (v, c, p) in sorted(steps.items(), key=lambda kv: (-kv[1][0], kv[0]))
    ]


@oracle("top_items")
def _top_items(data: DataSet) -> list[Row]:
    sales: dict[tuple[str, str], list[float]] = defaultdict(list)
    for c in window_purchases(data):
        sales[(c.country, c.item_id)].append(c.amount_usd)
    ranked = sorted(sales.items(), key=lambda kv: (kv[0][0], -len(kv[1]), -sum(kv[1]), kv[0][1]))
    taken: dict[str, int] = defaultdict(int)
    result: list[Row] = []
    for (country, item), amounts in ranked:
        taken[country] += 1
        if taken[country] <= 3:
            result.append((country, item, len(amounts), Approx(sum(amounts), 2)))
    return result


@oracle("revenue_by_corridor")
def _revenue_by_corridor(data: DataSet) -> list[Row]:
    sales: dict[tuple[str, str], list[float]] = defaultdict(list)
    for c in window_purchases(data):
        sales[(c.country, c.origin_country)].append(c.amount_usd)
    ranked = sorted(sales.items(), key=lambda kv: (kv[0][0], -sum(kv[1]), kv[0][1]))
    return [
        (buyer, origin, len(a), Approx(sum(a), 2), Approx(sum(a) / len(a), 2))
        for (buyer, origin), a in ranked
    ]


@oracle("repeat_buyers")
def _repeat_buyers(data: DataSet) -> list[Row]:
    spent: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in window_purchases(data):
        spent[c.country][c.user_id].append(c.amount_usd)
    rows = []
    for country, buyers in spent.items():
        repeat = sum(len(a) >= 2 for a in buyers.values())
        total = sum(sum(a) for a in buyers.values())
        n = len(buyers)
        rows.append((country, n, repeat, Approx(repeat / n, 4), Approx(total / n, 2)))
    return sorted(rows, key=lambda r: (-r[1], r[0]))  # type: ignore[operator]


@oracle("segment_mix")
def _segment_mix(data: DataSet) -> list[Row]:
    purchases = window_purchases(data)
    total_n, total_usd = len(purchases), sum(c.amount_usd for c in purchases)
    by_segment: dict[str, list[float]] = defaultdict(list)
    for c in purchases:
        by_segment[c.segment].append(c.amount_usd)
    ranked = sorted(by_segment.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        (segment, len(a), Approx(sum(a), 2), Approx(len(a) / total_n, 4),
         Approx(sum(a) / total_usd, 4), Approx(sum(a) / len(a), 2))
        for segment, a in ranked
    ]  # fmt: skip


@oracle("segment_revenue_daily")
def _segment_revenue_daily(data: DataSet) -> list[Row]:
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for c in data.purchases():
        cells[(day_of(c.ts), c.country, c.segment)].append(c.amount_usd)
    ranked = sorted(cells.items(), key=lambda kv: (_desc(kv[0][0]), -sum(kv[1]), *kv[0][1:]))
    rows: list[Row] = [(*key, len(a), Approx(sum(a), 2)) for key, a in ranked]
    return rows[:50]


def _desc(text: str) -> tuple[int, ...]:
    """Sort key putting ``text`` in descending order."""
    return tuple(-ord(ch) for ch in text)


@oracle("payment_corridors")
def _payment_corridors(data: DataSet) -> list[Row]:
    corridors: dict[tuple[str, str], list[Payment]] = defaultdict(list)
    for p in data.payments:
        if in_window(p.ts):
            corridors[(p.origin_country, p.shipping_country)].append(p)
    rows: list[Row] = []
    for key, payments in sorted(
        corridors.items(), key=lambda kv: (-sum(p.amount_usd for p in kv[1]), kv[0])
    ):
        alerts = [p for p in payments if p.is_alert]
        rows.append((
            *key, len(payments), Approx(sum(p.amount_usd for p in payments), 2), len(alerts),
            Approx(len(alerts) / len(payments), 4), Approx(sum(p.amount_usd for p in alerts), 2),
        ))  # fmt: skip
    return rows


def latest_labels(data: DataSet) -> dict[str, str]:
    """The label with the latest label time wins (then the greater event id), whenever it was
    ingested."""
    latest: dict[str, Label] = {}
    for lb in data.labels:
        known = latest.get(lb.txn_id)
        if known is None or (lb.ts, lb.event_id) > (known.ts, known.event_id):
            latest[lb.txn_id] = lb
    return {txn: lb.label for txn, lb in latest.items()}


@oracle("fraud_by_corridor_day")
def _fraud_by_corridor_day(data: DataSet) -> list[Row]:
    labels = latest_labels(data)
    groups: dict[tuple[str, str, str], list[Payment]] = defaultdict(list)
    for p in data.payments:
        if in_window(p.ts):
            groups[(day_of(p.ts), p.origin_country, p.shipping_country)].append(p)
    rows: list[Row] = []
    for key in sorted(groups):
        payments = groups[key]
        labelled = [p for p in payments if p.txn_id in labels]
        frauds = [p for p in labelled if labels[p.txn_id] == "fraud"]
        alerts = [p for p in payments if p.is_alert]
        labelled_alerts = [p for p in alerts if p.txn_id in labels]
        true_alerts = [p for p in labelled_alerts if labels[p.txn_id] == "fraud"]
        rows.append((
            *key, len(payments), len(labelled), len(frauds), ratio(len(frauds), len(labelled), 4),
            len(alerts), len(true_alerts), ratio(len(true_alerts), len(labelled_alerts), 4),
        ))  # fmt: skip
    return rows


@oracle("alerts_by_day")
def _alerts_by_day(data: DataSet) -> list[Row]:
    alerts: dict[tuple[str, str], set[str]] = defaultdict(set)
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in data.payments:
        if p.is_alert and in_window(p.ts):
            alerts[(day_of(p.ts), "fraud")].add(p.txn_id)
            users[(day_of(p.ts), "fraud")].add(p.user_id)
    for a in data.alerts:
        if in_window(a.ts):
            alerts[(day_of(a.ts), a.kind)].add(a.alert_id)
            users[(day_of(a.ts), a.kind)].add(a.journey.user_id)
    return [(*key, len(alerts[key]), len(users[key])) for key in sorted(alerts)]


def completed(data: DataSet, *, window: bool) -> list[Journey]:
    return [j for j in data.journeys if j.completed and (not window or in_window(j.completed_ts))]


@oracle("route_kpis")
def _route_kpis(data: DataSet) -> list[Row]:
    groups: dict[tuple[str, str, str], list[Journey]] = defaultdict(list)
    for j in completed(data, window=True):
        groups[(j.origin_country, j.dest_country, j.carrier)].append(j)
    rows: list[Row] = []
    for key, journeys in groups.items():
        delivered = [j for j in journeys if j.delivered_ts]
        promised = [j for j in delivered if j.promised_ts]
        by_day: dict[str, list[float]] = defaultdict(list)
        for j in delivered:
            by_day[day_of(j.completed_ts)].append(j.transit_days)
        # No delivery on the route: the view's p90s are all NULL, so is their maximum.
        worst_p90 = max((quantile_exact(v, 0.9) for v in by_day.values()), default=None)
        rows.append((
            *key, len(journeys), ratio(sum(j.on_time for j in promised), len(promised), 3),
            ratio(sum(j.transit_days for j in delivered), len(delivered), 2),
            None if worst_p90 is None else Approx(worst_p90, 2),
            sum(s == "failed_attempt" for j in journeys for _, s in j.scans),
            sum(j.returned for j in journeys),
        ))  # fmt: skip
    rows.sort(key=lambda r: (-r[3], r[0], r[1], r[2]))  # type: ignore[operator]
    return rows[:20]


@oracle("on_time_by_carrier")
def _on_time_by_carrier(data: DataSet) -> list[Row]:
    groups: dict[str, list[Journey]] = defaultdict(list)
    for j in completed(data, window=True):
        groups[j.carrier].append(j)
    rows: list[Row] = []
    for carrier in sorted(groups):
        delivered = [j for j in groups[carrier] if j.delivered_ts]
        promised = [j for j in delivered if j.promised_ts]
        on_time = sum(j.on_time for j in promised)
        rows.append((
            carrier, len(delivered), len(promised), on_time, ratio(on_time, len(promised), 4),
            Approx(sum(j.transit_days for j in delivered) / len(delivered), 2),
        ))  # fmt: skip
    return rows


@oracle("customs_by_route")
def _customs_by_route(data: DataSet) -> list[Row]:
    groups: dict[tuple[str, str], list[Journey]] = defaultdict(list)
    for j in completed(data, window=True):
        groups[(j.origin_country, j.dest_country)].append(j)
    rows: list[Row] = []
    for key, journeys in groups.items():
        hours = [j.customs_hours for j in journeys if j.customs_hours > 0]
        if hours:
            rows.append((
                *key, len(journeys), len(hours), Approx(len(hours) / len(journeys), 4),
                Approx(sum(hours) / len(hours), 1), Approx(quantile_exact(hours, 0.9), 1),
            ))  # fmt: skip
    rows.sort(key=lambda r: (-r[3], r[0], r[1]))  # type: ignore[operator]
    return rows


@oracle("p90_transit")
def _p90_transit(data: DataSet) -> list[Row]:
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for j in completed(data, window=False):
        if j.delivered_ts:
            groups[(j.origin_country, j.dest_country)].append(j.transit_days)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    rows: list[Row] = [(*key, len(d), Approx(quantile_exact(d, 0.9), 2)) for key, d in ranked]
    return rows[:20]


@oracle("customs_by_destination")
def _customs_by_destination(data: DataSet) -> list[Row]:
    groups: dict[str, list[float]] = defaultdict(list)
    for j in completed(data, window=False):
        if j.customs_hours > 0:
            groups[j.dest_country].append(j.customs_hours)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        (dest, len(h), Approx(sum(h) / len(h), 1), Approx(quantile_exact(h, 0.9), 1))
        for dest, h in ranked
    ]


@oracle("prediction_error")
def _prediction_error(data: DataSet) -> list[Row]:
    delivered = {j.order_id: j.delivered_ts for j in data.journeys if j.delivered_ts}
    errors: dict[str, list[float]] = defaultdict(list)
    for p in data.predictions:
        if p.order_id in delivered:
            # completed_ts is stored in whole seconds.
            actual_s = delivered[p.order_id] // 1000
            errors[p.status].append(abs(p.predicted_ms / 1000 - actual_s) / 3600)
    ranked = sorted(errors.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [(status, len(e), Approx(sum(e) / len(e), 1)) for status, e in ranked]


def scored_clicks(data: DataSet) -> list[Click]:
    return [c for c in data.clicks if c.hit_rank is not None]


def rec_metrics(clicks: list[Click], k: int) -> tuple[int, float]:
    """(hits in the top k, sum of reciprocal ranks in the top k)."""
    ranks = [c.hit_rank for c in clicks if c.hit_rank and c.hit_rank <= k]
    return len(ranks), sum(1 / r for r in ranks)


@oracle("rec_quality_daily")
def _rec_quality_daily(data: DataSet) -> list[Row]:
    days: dict[str, list[Click]] = defaultdict(list)
    for c in scored_clicks(data):
        if in_window(c.ts):
            days[day_of(c.ts)].append(c)
    rows: list[Row] = []
    for day in sorted(days):
        clicks = days[day]
        n = len(clicks)
        (hits_10, rr_10), (hits_20, rr_20) = rec_metrics(clicks, 10), rec_metrics(clicks, 20)
        rows.append((
            day, n, Approx(hits_10 / n, 4), Approx(hits_20 / n, 4), Approx(rr_10 / n, 4),
            Approx(rr_20 / n, 4),
        ))  # fmt: skip
    return rows


@oracle("rec_quality_hourly")
def _rec_quality_hourly(data: DataSet) -> list[Row]:
    hours: dict[str, list[Click]] = defaultdict(list)
    for c in scored_clicks(data):
        hours[hour_of(c.ts)].append(c)
    rows: list[Row] = []
    for hour in sorted(hours, reverse=True)[:24]:
        clicks = hours[hour]
        n = len(clicks)
        (hits_5, _), (hits_20, rr_20) = rec_metrics(clicks, 5), rec_metrics(clicks, 20)
        rows.append((
            hour, n, Approx(hits_5 / n, 4), Approx(hits_20 / n, 4), Approx(hits_20 / n / 20, 4),
            Approx(rr_20 / n, 4),
        ))  # fmt: skip
    return rows


@oracle("personalised")
def _personalised(data: DataSet) -> list[Row]:
    groups: dict[int, list[Click]] = defaultdict(list)
    for c in scored_clicks(data):
        groups[c.personalised].append(c)
    return [
        (flag, len(clicks), Approx(rec_metrics(clicks, 20)[0] / len(clicks), 4))
        for flag, clicks in sorted(groups.items())
    ]


@oracle("events_per_topic_hour")
def _events_per_topic_hour(data: DataSet) -> list[Row]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    times = {
        "clicks": [c.ts for c in data.clicks],
        "payments": [p.ts for p in data.payments],
        "fraud-labels": [lb.ts for lb in data.labels],
        "logistics": [ts for j in data.journeys for ts, _ in j.scans],
    }
    for topic, stamps in times.items():
        for ts in stamps:
            counts[(hour_of(ts), topic)] += 1
    ranked = sorted(counts.items(), key=lambda kv: (_desc(kv[0][0]), kv[0][1]))
    rows: list[Row] = [(*key, n) for key, n in ranked]
    return rows[:48]


# -- running the cookbook ----------------------------------------------------------------------


def cookbook() -> dict[str, str]:
    text = ANALYTICS.read_text()
    found = QUERY.findall(text)
    queries = dict(found)
    assert len(queries) == len(found), "two queries share a test id in docs/analytics.md"
    return queries


@pytest.fixture(scope="module")
def data() -> DataSet:
    return generate()


@pytest.fixture(scope="module")
def analytics_db(stack: Settings, data: DataSet) -> Iterator[Settings]:
    assert shutil.which("clickhouse-client"), "clickhouse-client is not installed (make setup)"
    settings = isolated(
        stack,
        "analytics",
        clickhouse_database=f"bf_analytics_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
    )
    migrate(settings)
    try:
        write(settings, data)
        yield settings
    finally:
        client = clickhouse_client(settings)
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.disconnect()


def run_query(settings: Settings, sql: str) -> list[list[str]]:
    """``sql`` through the real clickhouse-client, as an analyst would run it."""
    command = [
        "clickhouse-client",
        "--host", settings.clickhouse_host,
        "--port", str(settings.clickhouse_port),
        "--user", settings.clickhouse_user,
        "--database", settings.clickhouse_database,
        "--format", "TabSeparated",
        "--query", sql,
    ]  # fmt: skip
    password = settings.clickhouse_password.get_secret_value()
    if password:
        command[1:1] = ["--password", password]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"query failed: {done.stderr.strip()}\n{sql}"
    return [line.split("\t") for line in done.stdout.splitlines()]


def matches(cell: str, expected: Cell) -> bool:
    if expected is None:
        return cell == "\\N"
    if isinstance(expected, Approx):
        if cell in ("\\N", "nan", "inf", "-inf"):
            return False
        want = expected.value
        if expected.digits is None:
            return math.isclose(float(cell), want, rel_tol=1e-9, abs_tol=1e-9)
        # The query rounds; its sum may differ from Python's in the last bits.
        return abs(float(cell) - want) <= 0.5 * 10**-expected.digits + 1e-9 * max(1, abs(want))
    if isinstance(expected, int):
        return cell == str(expected)
    return cell == expected


def show(rows: Iterable[Iterable[Any]]) -> str:
    return "\n".join("\t".join(str(c) for c in row) for row in rows)


def assert_answer(question: str, actual: list[list[str]], expected: list[Row]) -> None:
    assert expected, f"{question}: the data set gives this question no answer to check"
    ok = len(actual) == len(expected) and all(
        len(a) == len(e) and all(matches(c, x) for c, x in zip(a, e, strict=True))
        for a, e in zip(actual, expected, strict=True)
    )
    assert ok, f"{question}: ClickHouse said\n{show(actual)}\nexpected\n{show(expected)}"


def test_every_query_has_a_test() -> None:
    text = ANALYTICS.read_text()
    blocks = re.findall(r"```sql\n", text)
    queries = cookbook()
    assert len(blocks) == len(queries), "every ```sql block needs a <!-- test: id --> line"
    assert len(queries) >= 12
    assert set(queries) == set(ORACLES), "docs/analytics.md and the oracles disagree"
    # One question (a heading), one query.
    for section in re.split(r"\n### ", text)[1:]:
        assert section.count("```sql") == 1, section.splitlines()[0]


@pytest.mark.parametrize("question", sorted(ORACLES))
def test_query_answers_its_question(analytics_db: Settings, data: DataSet, question: str) -> None:
    queries = cookbook()
    assert question in queries, f"docs/analytics.md has no query for {question}"
    assert_answer(question, run_query(analytics_db, queries[question]), ORACLES[question](data))


#: Plausible mistakes, applied to the documented queries: the data set must catch each.
MISTAKES = {
    # The history with the newest *ingested* label: what the old table's merges kept.
    "fraud_by_corridor_day": ("SELECT txn_id, label FROM fraud_labels\n",
                              "SELECT txn_id, argMax(label, ingested_at) AS label "
                              "FROM fraud_label_events GROUP BY txn_id\n"),
    "on_time_by_carrier": ("FROM shipments FINAL", "FROM shipments"),
    "payment_corridors": ("round(sum(amount_usd), 2)", "round(sum(amount), 2)"),
    "top_items": ("sum(amount_usd) DESC, item_id", "item_id"),
    "customs_by_route": ("avgIf(customs_hours, customs_hours > 0)", "avg(customs_hours)"),
    "funnel": ("ts < toDateTime('2026-02-01", "ts <= toDateTime('2026-02-01"),
    "repeat_buyers": ("WHERE click_type = 'purchase'\n      AND", "WHERE"),
    # Averaging the daily means instead of re-aggregating the sums.
    "route_kpis": ("sum(transit_days_sum) / nullIf(sum(delivered), 0)", "avg(mean_transit_days)"),
}  # fmt: skip


@pytest.mark.parametrize("question", sorted(MISTAKES))
def test_the_data_set_catches_a_wrong_query(
    analytics_db: Settings, data: DataSet, question: str
) -> None:
    before, after = MISTAKES[question]
    sql = cookbook()[question]
    assert before in sql, f"{question}: the mistake no longer applies to the documented query"
    actual = run_query(analytics_db, sql.replace(before, after))
    with pytest.raises(AssertionError):
        assert_answer(question, actual, ORACLES[question](data))


def test_the_latest_label_survives_background_merges(stack: Settings, data: DataSet) -> None:
    """Every label event is kept (fraud_label_events is a plain MergeTree), so the latest label
    by label time survives merges, and the label rollups still match the table."""
    settings = isolated(stack, "labels", clickhouse_database=f"bf_labels_{uuid.uuid4().hex[:8]}")
    migrate(settings)
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        write(settings, data)
        client.execute("OPTIMIZE TABLE fraud_label_events FINAL")  # what merges do eventually
        sql = cookbook()["fraud_by_corridor_day"]
        assert_answer(
            "fraud_by_corridor_day", run_query(settings, sql), _fraud_by_corridor_day(data)
        )
        ((stored,),) = client.execute("SELECT count() FROM fraud_label_events")
        ((rolled_up,),) = client.execute(
            "SELECT sum(events) FROM events_per_hour WHERE topic = 'fraud-labels'"
        )
        assert stored == rolled_up == len(data.labels)
        relabelled = client.execute(
            "SELECT txn_id, label, label_events FROM fraud_labels "
            "WHERE txn_id LIKE 'tx-relabel-%' ORDER BY txn_id"
        )
        assert relabelled == [
            ("tx-relabel-1", "fraud", 2),
            ("tx-relabel-2", "legit", 2),
            ("tx-relabel-3", "fraud", 2),
        ]
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.disconnect()


def test_the_data_set_has_its_edge_cases(data: DataSet) -> None:
    funnel = {row[0]: row for row in _funnel(data)}
    assert funnel["BR"][2:4] == (3, 0)  # carts, never a purchase
    currencies = {c.currency for c in window_purchases(data) if c.item_id == "i01"}
    assert {"EUR", "USD"} <= currencies
    assert [r[1] for r in _top_items(data) if r[0] == "CA"] == ["i07", "i08", "i03"]
    labels = {(lb.txn_id, lb.label): lb for lb in data.labels}
    legit, fraud = labels[("tx-relabel-1", "legit")], labels[("tx-relabel-1", "fraud")]
    assert legit.ts < fraud.ts and legit.ingested_at_s > fraud.ingested_at_s
    assert latest_labels(data)["tx-relabel-1"] == "fraud"
    held_routes = {(j.origin_country, j.dest_country) for j in data.journeys if j.customs_hours}
    assert any(
        (j.origin_country, j.dest_country) in held_routes and not j.customs_hours
        for j in completed(data, window=True)
    )
    assert any(j.delivered_ts and j.returned for j in completed(data, window=True))
    assert any(j.returned and not j.delivered_ts for j in completed(data, window=True))
    assert not all(in_window(c.ts) for c in data.clicks)
    assert len({(j.origin_country, j.dest_country, j.carrier) for j in data.journeys}) > 20
    assert any(c.hit_rank is not None and c.hit_rank > 10 for c in data.clicks)
