"""Online user profiles, updated click by click in event time.

A profile holds what storefronts personalise with: RFM (recency, frequency, monetary value in
USD), category affinity with exponential time decay, price band, preferred
device/language/currency, peak hours, the current session (depth, dwell), the last items
bought, and the user's delivery experience (``record_scan`` / ``record_delivery``, fed by the
logistics agent: average delivery days, late share), plus the recommendations last served
(for online evaluation).

Consent: while the newest click says ``personalisation=false``, the behavioural fields
(:data:`BEHAVIOURAL_FIELDS`: taste, price band, devices, hours, dwell, session trail, purchase
history, RFM) are neither collected nor kept; see ``docs/privacy.md``.

``apply_click`` is idempotent: each profile keeps the ids of its most recent events, so a
redelivered event (at-least-once processing) is ignored instead of counted twice. With each id
it keeps the Kafka position (partition, offset) the event was applied at, so the clicks agent
can tell a *replay* (the same message read again after a crash: its rows are rebuilt) from a
*duplicate* (the same event id sent again, at a new offset: nothing is written again).

>>> from schemas.events import ClickEvent
>>> p = UserProfile.new("u1")
>>> e = ClickEvent(event_id="e1", ts=1767225600000, user_id="u1", session_id="s1", type="purchase",
...                item_id="i1", category="shoes", price=50.0, currency="EUR")
>>> apply_click(p, e), apply_click(p, e), p.purchases, p.monetary_usd
(True, False, 1, 54.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from models.fx import to_usd
from schemas.events import ClickEvent

#: Category affinity halves every 7 days of event time.
AFFINITY_HALF_LIFE_MS = 7 * 24 * 3600 * 1000
#: A gap of more than 30 minutes (event time) starts a new session.
SESSION_GAP_MS = 30 * 60 * 1000
RECENT_EVENT_IDS = 64
#: Placeholder in ``recent_event_positions`` for an event applied without a known position.
UNKNOWN_POSITION = (-1, -1)
#: Price bands in USD: (name, lower bound). A band holds prices from its bound to the next.
PRICE_BANDS: tuple[tuple[str, float], ...] = (
    ("budget", 0.0),
    ("mid", 25.0),
    ("premium", 100.0),
    ("luxury", 400.0),
)
#: How much a click says about the prices a user is willing to pay, by click type.
PRICE_SIGNAL = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
SESSION_ITEMS = 20
RECENT_PURCHASES = 20
TOP_CATEGORIES = 5
MAX_CATEGORIES = 30


@dataclass(slots=True)
class UserProfile:
    user_id: str
    first_ts: int = 0
    last_ts: int = 0
    last_event_id: str = ""
    events: int = 0
    views: int = 0
    searches: int = 0
    carts: int = 0
    purchases: int = 0
    monetary_usd: float = 0.0
    country: str = ""
    currency: str = ""
    lang: str = ""
    devices: dict[str, int] = field(default_factory=dict)
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    #: category -> [decayed score, ts_ms of last update]
    affinity: dict[str, list[float]] = field(default_factory=dict)
    sessions: int = 0
    session_id: str = ""
    session_start: int = 0
    session_events: int = 0
    session_items: list[str] = field(default_factory=list)
    recent_purchases: list[str] = field(default_factory=list)
    recent_event_ids: list[str] = field(default_factory=list)
    #: [partition, offset] at which each of the *last* ``len(recent_event_positions)`` ids of
    #: ``recent_event_ids`` was applied (aligned at the end: profiles stored before positions
    #: were kept have fewer positions than ids, and their older ids have no known position).
    recent_event_positions: list[list[int]] = field(default_factory=list)
    #: [partition, offset] of the furthest click applied (empty before the first one with a
    #: known position). A user's clicks come from one partition in offset order, so a click at
    #: or before it was applied already: a replay after a crash is recognised even when more
    #: of the user's clicks were replayed than ``recent_event_ids`` remembers.
    applied_through: list[int] = field(default_factory=list)
    personalisation: bool = True
    last_purchase_ts: int = 0
    #: RFM segment (models.segments): "high-value", "dynamic", "growth"; "" before a purchase.
    segment: str = ""
    #: price band name -> weight of the clicks on items in that band (PRICE_SIGNAL).
    price_bands: dict[str, float] = field(default_factory=dict)
    price_usd_sum: float = 0.0
    price_samples: int = 0
    #: Time between consecutive clicks of a session (the dwell on the earlier page).
    dwell_ms_total: int = 0
    dwell_samples: int = 0
    #: Items bought in the current session ("frequently bought together").
    session_purchases: list[str] = field(default_factory=list)
    # -- delivery experience (from the logistics agent's shipment books) ---------------------
    #: Orders of this user in flight.
    open_shipments: int = 0
    deliveries: int = 0
    delivery_days_total: float = 0.0
    late_deliveries: int = 0
    returned_shipments: int = 0
    last_scan_ts: int = 0
    last_scan_id: str = ""
    # -- what was served (online evaluation in rec_predictions) ------------------------------
    #: The recommendations last written to Redis for this user, best first, and the event
    #: time of the state they were computed for.
    served_recs: list[str] = field(default_factory=list)
    served_at_ts: int = 0
    #: event_id -> [hit rank, recs size, personalised, served at ts] of recently scored
    #: clicks, so a click replayed after a crash gets the same rec_predictions row.
    scored: dict[str, list[int]] = field(default_factory=dict)

    def remember_score(
        self, event_id: str, rank: int, recs_size: int, personalised: int, served_at_ts: int
    ) -> None:
        self.scored[event_id] = [rank, recs_size, personalised, served_at_ts]
        if len(self.scored) > RECENT_EVENT_IDS:
            del self.scored[next(iter(self.scored))]

    def covers(self, position: tuple[int, int] | None) -> bool:
        """Whether the click at ``position`` (partition, offset) was applied already (it is
        at or before :attr:`applied_through` on the same partition)."""
        if position is None or not self.applied_through:
            return False
        partition, offset = self.applied_through
        return position[0] == partition and position[1] <= offset

    def position_of(self, event_id: str) -> tuple[int, int] | None:
        """The Kafka (partition, offset) at which a remembered event was applied; None when
        it is not known (applied by an older version, or without a position)."""
        try:
            index = self.recent_event_ids.index(event_id)
        except ValueError:
            return None
        index -= len(self.recent_event_ids) - len(self.recent_event_positions)
        if index < 0:
            return None
        partition, offset = self.recent_event_positions[index]
        position = (int(partition), int(offset))
        return None if position == UNKNOWN_POSITION else position

    @classmethod
    def new(cls, user_id: str) -> UserProfile:
        return cls(user_id=user_id)

    # -- persistence (Faust table values are these bytes) -----------------------------------
    def to_bytes(self) -> bytes:
        # orjson serialises dataclasses natively (field order, nested lists and dicts):
        # 25x faster than ``dataclasses.asdict``, which deep-copies every list first.
        return orjson.dumps(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserProfile:
        return cls(**orjson.loads(raw))

    # -- derived views ------------------------------------------------------------------------
    def affinity_at(self, ts_ms: int) -> dict[str, float]:
        from models.decay import DecayedSum

        return {
            category: DecayedSum(score, int(at)).value_at(ts_ms, AFFINITY_HALF_LIFE_MS)
            for category, (score, at) in self.affinity.items()
        }

    def top_categories(self, ts_ms: int, n: int = TOP_CATEGORIES) -> list[tuple[str, float]]:
        scores = self.affinity_at(ts_ms)
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def freshness(self) -> tuple[int, str]:
        """(event time, event id) of the newest event folded in: click or shipment scan."""
        if self.last_scan_ts > self.last_ts:
            return self.last_scan_ts, self.last_scan_id
        return self.last_ts, self.last_event_id

    def price_band(self) -> str:
        """The band of the prices this user engages with most ("" before any priced click)."""
        if not self.price_bands:
            return ""
        return max(sorted(self.price_bands), key=lambda band: self.price_bands[band])

    def avg_delivery_days(self) -> float | None:
        return self.delivery_days_total / self.deliveries if self.deliveries else None

    def late_share(self) -> float | None:
        return self.late_deliveries / self.deliveries if self.deliveries else None

    def preferred_device(self) -> str:
        if not self.devices:
            return ""
        return max(sorted(self.devices), key=lambda d: self.devices[d])

    def peak_hours(self, n: int = 3) -> list[int]:
        ranked = sorted(range(24), key=lambda h: (-self.hours[h], h))
        return [h for h in ranked[:n] if self.hours[h] > 0]

    def to_redis_hash(self) -> dict[str, Any]:
        """The ``bf:profile:{user_id}`` hash (flat strings/numbers; lists as JSON).

        Unknown values (no delivery yet, no priced click) are empty strings.
        """
        fresh_ts, _ = self.freshness()
        avg_days = self.avg_delivery_days()
        late = self.late_share()
        return {
            "user_id": self.user_id,
            "last_event_ts": fresh_ts,
            "last_click_ts": self.last_ts,
            "first_event_ts": self.first_ts,
            "recency_ts": self.last_ts,
            "frequency_purchases": self.purchases,
            "monetary_usd": round(self.monetary_usd, 2),
            "events": self.events,
            "views": self.views,
            "carts": self.carts,
            "sessions": self.sessions,
            "country": self.country,
            "currency": self.currency,
            "lang": self.lang,
            "device": self.preferred_device(),
            "peak_hours": orjson.dumps(self.peak_hours()).decode(),
            "top_categories": orjson.dumps(
                [[c, round(s, 4)] for c, s in self.top_categories(self.last_ts)]
            ).decode(),
            "session_depth": self.session_events,
            "avg_session_depth": round(self.events / self.sessions, 2) if self.sessions else 0,
            "avg_dwell_s": round(self.dwell_ms_total / self.dwell_samples / 1000, 1)
            if self.dwell_samples
            else "",
            "price_band": self.price_band(),
            "avg_price_usd": round(self.price_usd_sum / self.price_samples, 2)
            if self.price_samples
            else "",
            "personalisation": int(self.personalisation),
            "segment": self.segment,
            "deliveries": self.deliveries,
            "avg_delivery_days": round(avg_days, 2) if avg_days is not None else "",
            "late_delivery_share": round(late, 4) if late is not None else "",
            "open_shipments": self.open_shipments,
        }


def apply_click(
    profile: UserProfile, event: ClickEvent, position: tuple[int, int] | None = None
) -> bool:
    """Fold one click into ``profile``; False when the event was already applied.

    ``position`` is the click's Kafka (partition, offset), remembered with its id (see
    :meth:`UserProfile.position_of`); a click at or before the furthest position applied
    (:meth:`UserProfile.covers`) is a replay whatever its id.
    """
    ids = profile.recent_event_ids
    if event.event_id in ids or profile.covers(position):
        return False
    positions = profile.recent_event_positions
    ids.append(event.event_id)
    positions.append(list(position or UNKNOWN_POSITION))
    if position is not None:
        # The partition changes only when the topic's partitions were changed: then the new
        # partition's offsets are the ones to compare with.
        profile.applied_through = [position[0], position[1]]
    if len(ids) > RECENT_EVENT_IDS:
        del ids[0]
    if len(positions) > len(ids):
        del positions[0]

    ts = event.ts
    previous_ts = profile.last_ts
    # A late click (older than what the profile has seen) still counts, but must not undo
    # newer state: consent, country, currency, language and the current session follow the
    # newest event only.
    is_newest = profile.events == 0 or ts >= previous_ts
    if profile.events == 0:
        profile.first_ts = ts
    profile.first_ts = min(profile.first_ts, ts)
    profile.events += 1
    if is_newest:
        profile.last_ts = ts
        profile.last_event_id = event.event_id
        profile.personalisation = event.personalisation
        if event.country:
            profile.country = event.country
        if event.currency:
            profile.currency = event.currency
        if event.lang:
            profile.lang = event.lang
        # A new session id, or a long silence under the same id, starts a new session.
        if event.session_id != profile.session_id or ts - previous_ts > SESSION_GAP_MS:
            profile.sessions += 1
            profile.session_id = event.session_id
            profile.session_start = ts
            profile.session_events = 0
            profile.session_items = []
            profile.session_purchases = []
        elif profile.events > 1:
            # The time to this click is the dwell on the previous page of the session.
            profile.dwell_ms_total += ts - previous_ts
            profile.dwell_samples += 1
    if event.session_id == profile.session_id:
        profile.session_events += 1
    if not profile.personalisation:
        # No consent to personalisation (the newest click says so): nothing behavioural is
        # kept, and what was kept before the withdrawal goes now.
        clear_behaviour(profile)
        return True

    if event.device:
        profile.devices[event.device] = profile.devices.get(event.device, 0) + 1
    profile.hours[(ts // 3_600_000) % 24] += 1
    kind = event.type
    if kind == "view":
        profile.views += 1
    elif kind == "search":
        profile.searches += 1
    elif kind == "add_to_cart":
        profile.carts += 1
    elif kind == "purchase":
        profile.purchases += 1
        profile.last_purchase_ts = max(profile.last_purchase_ts, ts)
        if event.price is not None and event.currency:
            profile.monetary_usd += to_usd(event.price, event.currency) or 0.0
        if event.item_id:
            profile.recent_purchases.append(event.item_id)
            if len(profile.recent_purchases) > RECENT_PURCHASES:
                del profile.recent_purchases[0]
            if event.session_id == profile.session_id:
                profile.session_purchases.append(event.item_id)
                if len(profile.session_purchases) > RECENT_PURCHASES:
                    del profile.session_purchases[0]
    if event.price and event.currency and kind in PRICE_SIGNAL:
        usd = to_usd(event.price, event.currency)
        if usd is not None:
            band = price_band_of(usd)
            profile.price_bands[band] = profile.price_bands.get(band, 0.0) + PRICE_SIGNAL[kind]
            profile.price_usd_sum += usd
            profile.price_samples += 1

    if is_newest and event.item_id and kind != "remove_from_cart":
        items = profile.session_items
        if not items or items[-1] != event.item_id:
            items.append(event.item_id)
            if len(items) > SESSION_ITEMS:
                del items[0]
    if event.category:
        weight = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}.get(kind, 0.5)
        _bump_affinity(profile, event.category, weight, ts)
    return True


def clear_behaviour(profile: UserProfile) -> None:
    """Forget the behavioural fields (:data:`BEHAVIOURAL_FIELDS`): what a user without consent
    to personalisation must not be profiled by. Kept: identity, freshness and event counts,
    country/currency/language (which trending list and which language to serve), the
    session's id and depth, the delivery experience (service data from the user's own
    shipments), the consent flag itself, and the technical fields of exactly-once
    processing (recent event ids and positions, the recs last served)."""
    fresh = UserProfile.new(profile.user_id)
    for name in BEHAVIOURAL_FIELDS:
        setattr(profile, name, getattr(fresh, name))


#: Profile fields that describe a user's behaviour and taste: collected only with consent to
#: personalisation (``personalisation`` of the newest click), cleared when it is withdrawn.
BEHAVIOURAL_FIELDS = (
    "devices", "hours", "affinity", "views", "searches", "carts", "purchases", "monetary_usd",
    "last_purchase_ts", "segment", "price_bands", "price_usd_sum", "price_samples",
    "dwell_ms_total", "dwell_samples", "session_items", "session_purchases",
    "recent_purchases",
)  # fmt: skip


def price_band_of(price_usd: float) -> str:
    """The :data:`PRICE_BANDS` name of a price in USD.

    >>> price_band_of(9.99), price_band_of(25.0), price_band_of(1500.0)
    ('budget', 'mid', 'luxury')
    """
    name = PRICE_BANDS[0][0]
    for band, lower in PRICE_BANDS:
        if price_usd >= lower:
            name = band
    return name


#: The profile's delivery-experience fields. The logistics agent keeps their truth in the
#: user's shipment book (:class:`DeliveryExperience`, one table record with the scans it
#: counts) and copies it into the profile: a crash between the two tables' changelog writes
#: then heals when the scan is read again, whichever of the two records got out.
EXPERIENCE_FIELDS = (
    "open_shipments", "deliveries", "delivery_days_total", "late_deliveries",
    "returned_shipments", "last_scan_ts", "last_scan_id",
)  # fmt: skip


@dataclass(slots=True)
class DeliveryExperience:
    """A user's delivery experience, as counted from the scans of their shipment book."""

    open_shipments: int = 0
    deliveries: int = 0
    delivery_days_total: float = 0.0
    late_deliveries: int = 0
    returned_shipments: int = 0
    last_scan_ts: int = 0
    last_scan_id: str = ""

    @classmethod
    def of(cls, profile: UserProfile) -> DeliveryExperience:
        """The experience a profile holds (what a book written before books kept it starts
        from)."""
        return cls(**{name: getattr(profile, name) for name in EXPERIENCE_FIELDS})

    def copy_to(self, profile: UserProfile) -> bool:
        """Set ``profile``'s experience fields to this; True when any of them changed."""
        changed = False
        for name in EXPERIENCE_FIELDS:
            value = getattr(self, name)
            if getattr(profile, name) != value:
                setattr(profile, name, value)
                changed = True
        return changed


def record_scan(
    profile: UserProfile | DeliveryExperience, ts: int, event_id: str, open_shipments: int
) -> None:
    """A shipment scan of this user was applied: freshness and orders in flight."""
    if ts >= profile.last_scan_ts:
        profile.last_scan_ts = ts
        profile.last_scan_id = event_id
    profile.open_shipments = open_shipments


def record_delivery(
    profile: UserProfile | DeliveryExperience, transit_days: float, on_time: bool | None
) -> None:
    """One of this user's shipments was delivered (``on_time`` None: it had no promise)."""
    profile.deliveries += 1
    profile.delivery_days_total += transit_days
    profile.late_deliveries += int(on_time is False)


def _bump_affinity(profile: UserProfile, category: str, weight: float, ts: int) -> None:
    from models.decay import DecayedSum

    score, at = profile.affinity.get(category, (0.0, ts))
    updated = DecayedSum(score, int(at)).add(weight, ts, AFFINITY_HALF_LIFE_MS)
    profile.affinity[category] = [updated.value, updated.ts_ms]
    if len(profile.affinity) > MAX_CATEGORIES:
        # Bounded memory: forget the weakest category.
        current = profile.affinity_at(ts)
        del profile.affinity[min(current, key=lambda c: (current[c], c))]
