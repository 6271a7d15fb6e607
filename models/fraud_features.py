"""Event-time payment features with bounded memory.

For every payment, :meth:`PaymentFeatures.extract` reads only state built from *earlier*
payments and labels already applied (no leakage), then :meth:`PaymentFeatures.update` folds
the payment in. Feature families:

* **velocity** per card, user, device, merchant and IP country over 1 h / 1 d / 7 d / 30 d:
  counts (``card_tx_1d``) and USD amounts (``card_amount_1d``, log1p). Windows are
  exponentially decayed counters whose half-life is the window length, in event time;
* **amount against history**: log ratio to the user's and the card's mean, z-scores;
* **cross-border**: billing vs shipping vs IP country mismatches;
* **first time seen** for this user: device, IP country, merchant, card;
* **merchant risk** from labels already applied: fraud rate over 1 / 7 / 30 days;
* **time**: hour of day (sin/cos, UTC), night (00-06), weekend;
* **amount** in USD via the versioned FX table (:mod:`models.fx`).

Memory is bounded: each entity table keeps the ``max_entities`` most recently active keys
(LRU eviction of idle keys), and the per-user "seen" sets are capped.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from typing import Any

from models.decay import DecayedSum
from models.fx import to_usd
from schemas.events import PaymentEvent

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
#: Velocity windows: name -> half-life of the decayed counter (ms).
WINDOWS: tuple[tuple[str, float], ...] = (
    ("1h", HOUR_MS),
    ("1d", DAY_MS),
    ("7d", 7 * DAY_MS),
    ("30d", 30 * DAY_MS),
)
_HALF_LIVES = tuple(half_life for _, half_life in WINDOWS)
ENTITIES = ("card", "user", "device", "merchant", "ipc")
#: A charge at or below this (USD) counts as a "tiny" authorisation (card testing).
SMALL_USD = 2.0
SEEN_CAP = 256


class EntityState:
    """Decayed counts and amounts per window, plus running amount statistics."""

    __slots__ = ("counts", "amounts", "ts", "n", "mean", "m2", "small_10m", "last_amount",
                 "seen")  # fmt: skip

    def __init__(self) -> None:
        self.counts = [0.0] * len(WINDOWS)
        self.amounts = [0.0] * len(WINDOWS)
        self.ts = 0
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.small_10m = DecayedSum(0.0, 0)
        self.last_amount = 0.0
        self.seen: set[str] = set()

    # Kept as properties for readable tests and debugging.
    @property
    def count(self) -> int:
        return self.n

    @property
    def tx_1h(self) -> float:
        return self.counts[0]

    @property
    def amount_1d(self) -> float:
        return self.amounts[1]

    def decayed(self, ts: int) -> tuple[list[float], list[float]]:
        """Counts and amounts as seen at ``ts`` (older timestamps see no decay)."""
        age = ts - self.ts
        if age <= 0 or self.n == 0:
            return self.counts, self.amounts
        factors = [math.exp2(-age / half_life) for half_life in _HALF_LIVES]
        return (
            [c * f for c, f in zip(self.counts, factors, strict=True)],
            [a * f for a, f in zip(self.amounts, factors, strict=True)],
        )

    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def add(self, ts: int, amount_usd: float) -> None:
        if ts >= self.ts:
            self.counts, self.amounts = self.decayed(ts)
            self.counts = [c + 1.0 for c in self.counts]
            self.amounts = [a + amount_usd for a in self.amounts]
            self.ts = ts
        else:  # a late payment: add it decayed to the stored time
            factors = [math.exp2(-(self.ts - ts) / hl) for hl in _HALF_LIVES]
            self.counts = [c + f for c, f in zip(self.counts, factors, strict=True)]
            self.amounts = [a + amount_usd * f for a, f in zip(self.amounts, factors, strict=True)]
        self.n += 1
        delta = amount_usd - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (amount_usd - self.mean)
        self.small_10m = self.small_10m.add(
            1.0 if amount_usd <= SMALL_USD else 0.0, ts, 10 * 60_000
        )
        self.last_amount = amount_usd


class BoundedStates(OrderedDict[str, EntityState]):
    """Per-entity state with LRU eviction, so memory stays bounded with millions of keys."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        # OrderedDict's default pickling calls the class without arguments.
        return (type(self), (self.limit,), None, None, iter(self.items()))

    def get_state(self, key: str) -> EntityState:
        state = self.get(key)
        if state is None:
            state = self[key] = EntityState()
            if len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return state


class PaymentFeatures:
    """Event-time feature extraction; ``extract`` reads state, ``update`` folds the payment in."""

    def __init__(self, max_entities: int = 500_000) -> None:
        self.cards = BoundedStates(max_entities)
        self.users = BoundedStates(max_entities)
        self.devices = BoundedStates(max_entities)
        self.merchants = BoundedStates(max_entities)
        self.ip_countries = BoundedStates(1_000)
        #: merchant -> [fraud 1d, fraud 7d, fraud 30d, labels 1d, labels 7d, labels 30d]
        self.merchant_labels: OrderedDict[str, list[DecayedSum]] = OrderedDict()
        self.max_entities = max_entities

    def _states(self, payment: PaymentEvent) -> tuple[EntityState, ...]:
        return (
            self.cards.get_state(payment.card_id),
            self.users.get_state(payment.user_id),
            self.devices.get_state(payment.device_id or "-"),
            self.merchants.get_state(payment.merchant_id),
            self.ip_countries.get_state(payment.ip_country or "-"),
        )

    def extract(self, payment: PaymentEvent) -> dict[str, float]:
        ts = payment.ts
        amount_usd = usd_amount(payment)
        states = self._states(payment)
        x: dict[str, float] = {
            "log_amount_usd": math.log1p(amount_usd),
            "amount_usd_100": amount_usd / 100.0,
        }
        for entity, state in zip(ENTITIES, states, strict=True):
            if entity == "device" and not payment.device_id:
                continue
            if entity == "ipc" and not payment.ip_country:
                continue
            counts, amounts = state.decayed(ts)
            for (window, _), count, amount in zip(WINDOWS, counts, amounts, strict=True):
                x[f"{entity}_tx_{window}"] = count
                x[f"{entity}_amount_{window}"] = math.log1p(amount)
        card, user = states[0], states[1]
        for name, state in (("user", user), ("card", card)):
            if state.n:
                x[f"amount_vs_{name}_mean"] = math.log((amount_usd + 1) / (state.mean + 1))
                std = state.std()
                x[f"amount_z_{name}"] = (
                    max(-10.0, min(10.0, (amount_usd - state.mean) / std)) if std > 0 else 0.0
                )
            else:
                x[f"amount_vs_{name}_mean"] = 0.0
                x[f"amount_z_{name}"] = 0.0
        x["card_small_10m"] = card.small_10m.value_at(ts, 10 * 60_000)
        x["card_tiny_then_large_1m"] = float(
            card.n > 0
            and card.last_amount <= SMALL_USD
            and 0 <= ts - card.ts <= 60_000
            and amount_usd > 50.0
        )
        known_user = user.n > 0
        x["new_device"] = float(
            known_user and bool(payment.device_id) and payment.device_id not in user.seen
        )
        x["new_ip_country"] = float(
            known_user and bool(payment.ip_country) and f"ip:{payment.ip_country}" not in user.seen
        )
        x["new_merchant"] = float(known_user and f"m:{payment.merchant_id}" not in user.seen)
        x["new_card_for_user"] = float(known_user and f"c:{payment.card_id}" not in user.seen)
        billing, shipping = payment.billing_country, payment.shipping_country
        ip = payment.ip_country
        x["billing_ne_shipping"] = float(bool(billing and shipping) and billing != shipping)
        x["ip_ne_billing"] = float(bool(ip and billing) and ip != billing)
        x["cross_border"] = float(bool(ip and shipping) and ip != shipping)
        labels = self.merchant_labels.get(payment.merchant_id)
        for i, window in enumerate(("1d", "7d", "30d")):
            if labels is None:
                x[f"merchant_fraud_rate_{window}"] = 0.0
            else:
                half_life = _HALF_LIVES[i + 1]
                frauds = labels[i].value_at(ts, half_life)
                total = labels[i + 3].value_at(ts, half_life)
                # Shrunk towards 0 for merchants with few labels.
                x[f"merchant_fraud_rate_{window}"] = frauds / (total + 1.0)
        hour = (ts // HOUR_MS) % 24
        weekday = (ts // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; 5, 6 = Sat, Sun
        x["hour_sin"] = math.sin(2 * math.pi * hour / 24)
        x["hour_cos"] = math.cos(2 * math.pi * hour / 24)
        x["night"] = float(hour < 6)
        x["weekend"] = float(weekday >= 5)
        return x

    def update(self, payment: PaymentEvent) -> None:
        amount_usd = usd_amount(payment)
        states = self._states(payment)
        for state in states:
            state.add(payment.ts, amount_usd)
        seen = states[1].seen
        for token in (
            payment.device_id,
            f"ip:{payment.ip_country}" if payment.ip_country else None,
            f"m:{payment.merchant_id}",
            f"c:{payment.card_id}",
        ):
            if token and len(seen) < SEEN_CAP:
                seen.add(token)

    def forget_user(self, user_id: str) -> dict[str, int]:
        """Erase a user's state: their own velocity, and that of the cards and devices they
        used (the user's ``seen`` set names them). Merchants and IP countries are shared by
        many users and stay. Returns how many entries were removed, per kind."""
        user = self.users.pop(user_id, None)
        removed = {"users": int(user is not None), "cards": 0, "devices": 0}
        if user is None:
            return removed
        for token in user.seen:
            if token.startswith("c:"):
                removed["cards"] += int(self.cards.pop(token[2:], None) is not None)
            elif not token.startswith(("ip:", "m:")):  # a device id (stored without prefix)
                removed["devices"] += int(self.devices.pop(token, None) is not None)
        return removed

    def learn_label(self, merchant_id: str, is_fraud: bool, ts: int) -> None:
        labels = self.merchant_labels.get(merchant_id)
        if labels is None:
            labels = self.merchant_labels[merchant_id] = [DecayedSum.empty()] * 6
            if len(self.merchant_labels) > self.max_entities:
                self.merchant_labels.popitem(last=False)
        else:
            self.merchant_labels.move_to_end(merchant_id)
        for i in range(3):
            half_life = _HALF_LIVES[i + 1]
            labels[i] = labels[i].add(1.0 if is_fraud else 0.0, ts, half_life)
            labels[i + 3] = labels[i + 3].add(1.0, ts, half_life)


def usd_amount(payment: PaymentEvent) -> float:
    """The payment in USD; an unknown currency is taken at face value (and flagged upstream)."""
    converted = to_usd(payment.amount, payment.currency)
    return payment.amount if converted is None else converted


def _feature_names() -> tuple[str, ...]:
    names = ["log_amount_usd", "amount_usd_100"]
    for entity in ENTITIES:
        for window, _ in WINDOWS:
            names += [f"{entity}_tx_{window}", f"{entity}_amount_{window}"]
    names += ["amount_vs_user_mean", "amount_z_user", "amount_vs_card_mean", "amount_z_card",
              "card_small_10m", "card_tiny_then_large_1m", "new_device", "new_ip_country",
              "new_merchant", "new_card_for_user", "billing_ne_shipping", "ip_ne_billing",
              "cross_border", "merchant_fraud_rate_1d", "merchant_fraud_rate_7d",
              "merchant_fraud_rate_30d", "hour_sin", "hour_cos", "night", "weekend"]  # fmt: skip
    return tuple(names)


#: Every feature ``extract`` can produce, in a fixed order (the layout of packed vectors).
FEATURE_NAMES = _feature_names()
_NAN = float("nan")


def pack(x: dict[str, float]) -> bytes:
    """A feature vector as 4-byte floats in FEATURE_NAMES order (absent features are NaN).

    Snapshots wait days for their labels; packed they take ~250 bytes instead of ~3 KB.
    """
    return array("f", [x.get(name, _NAN) for name in FEATURE_NAMES]).tobytes()


def unpack(raw: bytes) -> dict[str, float]:
    values = array("f")
    values.frombytes(raw)
    return {name: v for name, v in zip(FEATURE_NAMES, values, strict=True) if v == v}
