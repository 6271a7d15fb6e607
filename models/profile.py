"""Online user profiles, updated click by click in event time.

A profile holds what storefronts personalise with: RFM (recency, frequency, monetary value in
USD), category affinity with exponential time decay, preferred device/language/currency, the
current session, and the last items bought. ``apply_click`` is idempotent: each profile keeps
the ids of its most recent events, so a redelivered event (at-least-once processing) is
ignored instead of counted twice.

>>> from schemas.events import ClickEvent
>>> p = UserProfile.new("u1")
>>> e = ClickEvent(event_id="e1", ts=1767225600000, user_id="u1", session_id="s1", type="purchase",
...                item_id="i1", category="shoes", price=50.0, currency="EUR")
>>> apply_click(p, e), apply_click(p, e), p.purchases, p.monetary_usd
(True, False, 1, 54.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from models.fx import to_usd
from schemas.events import ClickEvent

#: Category affinity halves every 7 days of event time.
AFFINITY_HALF_LIFE_MS = 7 * 24 * 3600 * 1000
#: A gap of more than 30 minutes (event time) starts a new session.
SESSION_GAP_MS = 30 * 60 * 1000
RECENT_EVENT_IDS = 64
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
    personalisation: bool = True
    last_purchase_ts: int = 0
    #: RFM segment (models.segments): "high-value", "dynamic", "growth"; "" before a purchase.
    segment: str = ""

    @classmethod
    def new(cls, user_id: str) -> UserProfile:
        return cls(user_id=user_id)

    # -- persistence (Faust table values are these bytes) -----------------------------------
    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

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

    def preferred_device(self) -> str:
        if not self.devices:
            return ""
        return max(sorted(self.devices), key=lambda d: self.devices[d])

    def peak_hours(self, n: int = 3) -> list[int]:
        ranked = sorted(range(24), key=lambda h: (-self.hours[h], h))
        return [h for h in ranked[:n] if self.hours[h] > 0]

    def to_redis_hash(self) -> dict[str, Any]:
        """The ``bf:profile:{user_id}`` hash (flat strings/numbers; lists as JSON)."""
        return {
            "user_id": self.user_id,
            "last_event_ts": self.last_ts,
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
            "personalisation": int(self.personalisation),
            "segment": self.segment,
        }


def apply_click(profile: UserProfile, event: ClickEvent) -> bool:
    """Fold one click into ``profile``; False when the event was already applied."""
    if event.event_id in profile.recent_event_ids:
        return False
    profile.recent_event_ids.append(event.event_id)
    if len(profile.recent_event_ids) > RECENT_EVENT_IDS:
        del profile.recent_event_ids[0]

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
    if event.device:
        profile.devices[event.device] = profile.devices.get(event.device, 0) + 1
    profile.hours[(ts // 3_600_000) % 24] += 1
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
    if event.session_id == profile.session_id:
        profile.session_events += 1

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


def _bump_affinity(profile: UserProfile, category: str, weight: float, ts: int) -> None:
    from models.decay import DecayedSum

    score, at = profile.affinity.get(category, (0.0, ts))
    updated = DecayedSum(score, int(at)).add(weight, ts, AFFINITY_HALF_LIFE_MS)
    profile.affinity[category] = [updated.value, updated.ts_ms]
    if len(profile.affinity) > MAX_CATEGORIES:
        # Bounded memory: forget the weakest category.
        current = profile.affinity_at(ts)
        del profile.affinity[min(current, key=lambda c: (current[c], c))]
