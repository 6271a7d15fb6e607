"""Agent ``track_shipments``.

Input: topic ``logistics`` (key user_id, co-partitioned with ``clicks``), micro-batches.
State: table ``user_shipments`` (each user's :class:`models.shipments.ShipmentBook`: shipments
in flight and recently completed, scans ordered by event time), table ``user_profiles``
(delivery experience: deliveries, average days, late share, orders in flight; counted in the
book and copied to the profile, so a replay heals a profile the crash left behind), and the
worker's :class:`models.delivery_time.LogisticsEngine` (delivery-time model, customs
statistics) and delivery lanes inside :class:`models.serving.ServingModels`.
Outputs: Redis ``bf:shipment:{order_id}`` (status in the user's language, predicted and
promised delivery, delay risk; guarded by event time), ``bf:profile:{u}`` / ``bf:recs:{u}``
of users with a delivery or return in the batch; topic ``logistics-alerts`` (delay alerts, at
most one per shipment and kind); ClickHouse ``shipment_events`` (every scan but duplicates),
``shipment_predictions`` (every applied scan's prediction), ``shipments`` (completed orders)
and ``events_per_minute``; invalid scans to ``deadletter``.
Guarantee: at-least-once processing, exactly-once rows. Books ignore scans they already hold
and remember the position each scan was applied at: a held scan read again at that position
(a replay after a crash) gets its ``shipment_events`` row, its order's ``shipments`` row and
its Redis view rebuilt; at a new position (a duplicate) it writes nothing and is counted
(``streams/agents/repeats.py``). Alerts are remembered in the book before they are sent.
One read and one write per user and table per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import faust
import orjson

from models.delivery_time import ScanReport
from models.profile import DeliveryExperience, UserProfile, record_delivery, record_scan
from models.shipments import Shipment, ShipmentBook, status_text
from schemas.events import LOGISTICS, LogisticsAlert, LogisticsEvent
from streams.agents.repeats import Repeat, Repeats
from streams.runtime import Runtime, micro_batches, wall_ms

HOUR_MS = 3_600_000
#: Statuses that complete a shipment.
COMPLETING = frozenset({"delivered", "returned"})


def shipment_view(shipment: Shipment, lang: str, updated_at_ms: int) -> dict[str, Any]:
    """The ``bf:shipment:{order_id}`` hash a storefront order page reads."""
    return {
        "order_id": shipment.order_id,
        "user_id": shipment.user_id,
        "status": shipment.status,
        "status_text": status_text(shipment.status, lang, shipment.location),
        "lang": lang or "en",
        "last_scan_ts": shipment.status_ts,
        "location": shipment.location or "",
        "carrier": shipment.carrier,
        "origin_country": shipment.origin_country,
        "dest_country": shipment.dest_country,
        "created_ts": shipment.created_ts,
        "promised_ts": shipment.promised_ts or "",
        "predicted_delivery_ts": shipment.predicted_delivery_ts or "",
        "delay_risk": shipment.delay_risk,
        "delivered_ts": shipment.delivered_ts or "",
        "returned": int(shipment.returned),
        "customs_holds": shipment.customs_holds,
        "failed_attempts": shipment.failed_attempts,
        "invalid_transitions": shipment.invalid_transitions,
        "updated_at": updated_at_ms,
    }


def alert_row(alert: LogisticsAlert, ingested_at: int) -> tuple[Any, ...]:
    """The ``logistics_alerts`` row of an alert."""
    return (
        alert.alert_id, alert.kind, alert.order_id, alert.user_id, alert.ts // 1000, alert.ts,
        alert.carrier, alert.origin_country, alert.dest_country,
        alert.predicted_delivery_ts or 0, alert.promised_ts or 0, alert.reason, ingested_at,
    )  # fmt: skip


def completion_row(shipment: Shipment, version_ts: int, ingested_at: int) -> tuple[Any, ...]:
    """The ``shipments`` row of a completed (delivered or returned) order."""
    delivered = shipment.delivered_ts > 0
    completed_ts = shipment.delivered_ts if delivered else version_ts
    has_promise = shipment.promised_ts > 0
    on_time = delivered and has_promise and shipment.delivered_ts <= shipment.promised_ts
    return (
        shipment.order_id, shipment.user_id, shipment.carrier, shipment.origin_country,
        shipment.dest_country, shipment.created_ts // 1000, completed_ts // 1000,
        "delivered" if delivered else "returned",
        round((shipment.delivered_ts - shipment.created_ts) / 86_400_000, 4) if delivered else 0.0,
        int(has_promise), int(on_time),
        round(shipment.customs_ms / HOUR_MS, 2), shipment.failed_attempts, int(shipment.returned),
        shipment.invalid_transitions, version_ts, ingested_at,
    )  # fmt: skip


class _Batch:
    """What one batch reads and changes, so each user's state is read and written once."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.books: dict[str, ShipmentBook] = {}
        self.changed_books: set[str] = set()
        self.profiles: dict[str, UserProfile] = {}
        self.changed_profiles: set[str] = set()
        #: Users whose delivery experience changed: their storefront keys are rewritten.
        self.experience_changed: set[str] = set()

    def book(self, user_id: str) -> ShipmentBook:
        book = self.books.get(user_id)
        if book is None:
            stored = self.runtime.topology.user_shipments.get(user_id.encode())
            book = ShipmentBook.from_bytes(stored) if stored else ShipmentBook(user_id)
            self.books[user_id] = book
        return book

    def profile(self, user_id: str) -> UserProfile:
        profile = self.profiles.get(user_id)
        if profile is None:
            stored = self.runtime.topology.user_profiles.get(user_id.encode())
            profile = UserProfile.from_bytes(stored) if stored else UserProfile.new(user_id)
            self.profiles[user_id] = profile
        return profile


async def process_scans(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    scans = await runtime.decode(events, LogisticsEvent)
    serving = await runtime.serving_models()
    engine = serving.logistics
    batch = _Batch(runtime)
    facts = await runtime.positions.rows_for(LOGISTICS, [event for event, _ in scans])
    ingested_at = wall_ms() // 1000
    views: dict[str, Shipment] = {}
    alerts: list[LogisticsAlert] = []
    #: order_id -> (the batch's last scan that completed or updated it, its row).
    completions: dict[str, tuple[faust.EventT, tuple[Any, ...]]] = {}
    repeats = Repeats(runtime, LOGISTICS)
    for event, scan in scans:
        book = batch.book(scan.user_id)
        position = (event.message.partition, event.message.offset)
        report = engine.on_scan(book, scan, position)
        shipment = report.shipment
        # A stale scan (its order is remembered by id only) is not known as a repeat: written.
        held = not report.applied and not report.stale
        repeat = repeats.classify(scan.event_id, position, seen=held, first=report.seen_at)
        if repeat is Repeat.DUPLICATE:
            continue  # its rows were written with the first copy
        facts.add("shipment_events", event, (
            scan.event_id, scan.order_id, scan.user_id, scan.carrier, scan.origin_country,
            scan.dest_country, scan.status, scan.ts // 1000, scan.ts, scan.promised_ts or 0,
            scan.location or "", ingested_at,
        ))  # fmt: skip
        if not report.applied:
            if held:
                # A replay of a scan applied just before a crash: its order's completion row
                # and Redis view may not have got out (the written positions drop the row if
                # ClickHouse has it; the view is guarded by event time).
                if shipment.completed and scan.status in COMPLETING:
                    row = completion_row(shipment, scan.ts, ingested_at)
                    completions[shipment.order_id] = (event, row)
                views[shipment.order_id] = shipment
                # The profile's changelog record may not have got out with the book's, nor
                # its state to Redis: both are rebuilt (Redis keeps a newer state).
                _sync_profile(batch, book)
                batch.experience_changed.add(scan.user_id)
            continue
        batch.changed_books.add(scan.user_id)
        views[shipment.order_id] = shipment
        alerts.extend(report.alerts)
        _watch_customs(serving.customs_watch, shipment)
        if report.predicted_delivery_ts and not shipment.completed:
            facts.add("shipment_predictions", event, (
                scan.event_id, scan.order_id, scan.ts // 1000, scan.ts, shipment.status,
                shipment.carrier, shipment.origin_country, shipment.dest_country,
                report.predicted_delivery_ts, shipment.promised_ts, report.delay_risk,
                ingested_at,
            ))  # fmt: skip
        if shipment.completed:
            completions[shipment.order_id] = (event, completion_row(shipment, scan.ts, ingested_at))
        _update_profile(batch, scan, book, report)
        if report.delivered is not None:
            serving.learn_delivery(report.delivered)

    for event, row in completions.values():  # one row per completed order and batch
        facts.add("shipments", event, row)
    alerts.extend(_overdue_customs(batch, engine.watermark_ms))
    await _publish(runtime, batch, views, alerts)
    # Alerts are not position-tagged facts (a customs alert is raised by the event-time
    # watermark, not by one scan); their stable ids make a repeat replace its row instead.
    alert_rows = [alert_row(alert, ingested_at) for alert in alerts]
    await runtime.finish_batch(
        events,
        {**facts.rows, "logistics_alerts": alert_rows},  # rollups are views over the facts
        {LOGISTICS: len(scans)},
    )
    return len(scans)


def _update_profile(
    batch: _Batch, scan: LogisticsEvent, book: ShipmentBook, report: ScanReport
) -> None:
    """Count an applied scan in the book's delivery experience, and copy that to the profile.

    The count lives in the book (one table record with the scans it counts), not in the
    profile: a crash can leave either table's changelog record behind the other, and the
    scan read again then heals the profile (:func:`_sync_profile`) instead of being counted
    in it twice or not at all."""
    experience = _experience(batch, book)
    record_scan(experience, scan.ts, scan.event_id, len(book.open))
    if report.delivered is not None:
        record_delivery(experience, report.delivered.transit_days, report.delivered.on_time)
    if report.returned:
        experience.returned_shipments += 1
    _sync_profile(batch, book)
    if report.delivered is not None or report.returned:
        batch.experience_changed.add(scan.user_id)


def _experience(batch: _Batch, book: ShipmentBook) -> DeliveryExperience:
    if book.experience is None:
        # A book stored before books kept the experience: the profile has counted it so far.
        book.experience = DeliveryExperience.of(batch.profile(book.user_id))
        batch.changed_books.add(book.user_id)
    return book.experience


def _sync_profile(batch: _Batch, book: ShipmentBook) -> None:
    """Copy the book's delivery experience into the user's profile, if it differs."""
    profile = batch.profile(book.user_id)
    before = (profile.deliveries, profile.returned_shipments)
    if _experience(batch, book).copy_to(profile):
        batch.changed_profiles.add(book.user_id)
        if (profile.deliveries, profile.returned_shipments) != before:
            batch.experience_changed.add(book.user_id)


def _watch_customs(watch: dict[str, list[Any]], shipment: Shipment) -> None:
    if shipment.in_customs_hold and "customs_delay" not in shipment.alerted:
        watch[shipment.order_id] = [
            shipment.user_id, shipment.hold_start_ts, shipment.origin_country,
            shipment.dest_country,
        ]  # fmt: skip
    else:
        watch.pop(shipment.order_id, None)


def _overdue_customs(batch: _Batch, watermark_ms: int) -> list[LogisticsAlert]:
    """Customs holds that outlasted the usual for their route by the event-time watermark,
    including holds whose shipments got no scan in this batch (their books are read only
    once overdue)."""
    serving = batch.runtime.serving
    engine = serving.logistics
    table = batch.runtime.topology.user_shipments
    alerts: list[LogisticsAlert] = []
    for order_id, (user_id, hold_start_ts, origin, dest) in list(serving.customs_watch.items()):
        threshold = engine.customs_threshold_ms(origin, dest)
        if threshold is None or watermark_ms - hold_start_ts <= threshold:
            continue
        del serving.customs_watch[order_id]
        if user_id not in batch.books and table.get(user_id.encode()) is None:
            continue  # the user's partition moved to another worker
        book = batch.book(user_id)
        raised = engine.overdue_customs(book, watermark_ms)
        if raised:
            alerts.extend(raised)
            batch.changed_books.add(user_id)
    return alerts


async def _publish(
    runtime: Runtime,
    batch: _Batch,
    views: Mapping[str, Shipment],
    alerts: list[LogisticsAlert],
) -> None:
    # Tables first, before any await: the clicks agent writes the same profiles between our
    # awaits, so a profile read at the start of this batch must be stored before it can go
    # stale. Faust sends the changelog records after the alerts below are handed to the
    # producer; alert ids are stable ({order_id}:{kind}) for consumers to deduplicate.
    topology = runtime.topology
    for user_id in batch.changed_books:
        topology.user_shipments[user_id.encode()] = batch.books[user_id].to_bytes()
    # Recs and the profile hash are recomputed when the delivery experience changed; other
    # scans only move the profile's freshness and orders in flight, stored in the table and
    # served with the user's next click or delivery (a recommendation costs far more than
    # a scan).
    table = topology.user_profiles
    for user_id in batch.changed_profiles - batch.experience_changed:
        table[user_id.encode()] = batch.profiles[user_id].to_bytes()
    states = runtime.serve(
        {user_id: batch.profiles[user_id] for user_id in batch.experience_changed}
    )
    langs = {
        user_id: batch.profile(user_id).lang for user_id in {s.user_id for s in views.values()}
    }

    for alert in alerts:
        await topology.logistics_alerts.send(
            key=alert.user_id.encode(), value=orjson.dumps(alert.model_dump())
        )
    updated_at = wall_ms()
    ttl_s = int(runtime.settings.shipment_ttl_days * 86_400)
    writes = runtime.redis_writes
    writes.add_shipments(
        [shipment_view(s, langs[s.user_id], updated_at) for s in views.values()], ttl_s=ttl_s
    )
    # The delivery experience is part of the profile the storefront reads.
    writes.add_user_states(states)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.logistics, name="track_shipments")
    async def track_shipments(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            async with runtime.batches.track():
                await process_scans(runtime, events)

    return track_shipments
