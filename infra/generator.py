"""``borderflow generate``: a seeded simulator of a cross-border shop's event streams.

Why a simulator: the real streams (clicks, card payments, chargebacks, carrier scans) are not
available, yet every part of borderflow needs inputs with *learnable structure* to be tested
and measured - sessions whose items are related, users with habits, fraud that looks like the
published fraud patterns, shipments whose delays depend on route and carrier. Everything is
drawn from two explicitly seeded generators (``numpy`` for the vectorised world building,
``random.Random`` for the per-event draws, which is much cheaper per call), so a seed always
yields the same events.

The world:

* users in 14 countries (currency, language, UTC offset, device mix, personalisation opt-out
  share) and three segments (high-value / dynamic / growth) with their own browsing hours,
  session frequency, session length, cart and purchase propensity and price band;
* a catalog of items in 12 categories (USD price, origin country, merchant), with Zipf-like
  popularity inside a category, small co-viewed groups of related items and per-user
  category affinities: a session keeps to a group or category most of the time;
* sessions: search -> view -> add_to_cart (-> remove_from_cart) -> purchase, prices in the
  user's currency (``FX_USD_PER_UNIT``); a purchase makes a payment and a shipment journey;
* shipments: scans created -> picked -> departed -> arrived_hub (-> customs) ->
  out_for_delivery -> delivered (failed attempts, returns), with known effects to learn: each
  lane (origin -> destination) has its own typical transit (``route_transit_days``: a stable
  hash within domestic 1-2.5, same-region 2-4, other 5-10 days) times the carrier's speed,
  +-10% and log-normal (sigma 0.15) per parcel; express carriers pick up sooner; customs holds
  by destination (``CUSTOMS_HOLD``, ``CUSTOMS_HOLD_DAYS``); no delivery rounds on Sundays
  (destination local time); the promise comes from the lane's typical time, never from the
  parcel's own draws. These effects reuse the same random draws in the same order as before,
  so every other stream is unchanged by them;
* fraud scenarios on payments (see ``SCENARIOS``), kept near ``fraud_rate`` of all payments;
* labels: ``fraud`` (chargeback) 1-14 days after a fraud payment, ``legit`` (settlement) after
  ``settlement_delay_days``; labels due after the simulated period are not emitted.

Events are yielded in non-decreasing ``ts`` order: each simulated day's events are sorted
together with the future events (shipment scans, labels, multi-day fraud) that fall due that
day and were waiting in a heap. The ground truth of a payment (its fraud scenario) travels
beside the event in :attr:`GeneratedEvent.scenario`, never inside the value, so a model can
not learn from a leaked label.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
import time
import zlib
from bisect import bisect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import click
import numpy as np
import orjson

from models.fx import USD_PER_UNIT
from models.shipments import SHIPMENT_TRANSITIONS as SHIPMENT_TRANSITIONS  # re-export
from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS, to_epoch_ms

if TYPE_CHECKING:  # infra.handbook imports this module: import it lazily at run time
    from infra.handbook import HandbookConfig

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
DEFAULT_START = "2026-01-01T00:00:00Z"
DEFAULT_START_MS = 1_767_225_600_000
INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)

# --------------------------------------------------------------------------------------------
# Static world tables
# --------------------------------------------------------------------------------------------

#: USD per one unit of each currency: the pipeline's own versioned rates (models/fx_rates), so
#: converting back and forth gives the generator's USD prices exactly.
FX_USD_PER_UNIT: dict[str, float] = USD_PER_UNIT
#: Currencies without minor units are rounded to whole units.
ZERO_DECIMAL_CURRENCIES = frozenset({"JPY", "KRW"})

DEVICES = ("ios", "android", "web-desktop", "web-mobile")


@dataclass(frozen=True, slots=True)
class Country:
    code: str
    currency: str
    lang: str
    utc_offset_h: float
    weight: float  # share of the user base
    devices: tuple[float, float, float, float]  # weights over DEVICES
    no_personalisation: float  # share of users who refuse profile-based personalisation
    city: str


COUNTRIES: tuple[Country, ...] = (
    Country("US", "USD", "en", -5, 0.16, (0.45, 0.20, 0.25, 0.10), 0.03, "Los Angeles"),
    Country("GB", "GBP", "en", 0, 0.08, (0.45, 0.20, 0.25, 0.10), 0.10, "London"),
    Country("DE", "EUR", "de", 1, 0.08, (0.30, 0.35, 0.28, 0.07), 0.25, "Frankfurt"),
    Country("FR", "EUR", "fr", 1, 0.06, (0.30, 0.35, 0.28, 0.07), 0.15, "Paris"),
    Country("ES", "EUR", "es", 1, 0.05, (0.20, 0.50, 0.22, 0.08), 0.12, "Madrid"),
    Country("BR", "BRL", "pt", -3, 0.08, (0.12, 0.63, 0.15, 0.10), 0.03, "Sao Paulo"),
    Country("MX", "MXN", "es", -6, 0.05, (0.15, 0.60, 0.15, 0.10), 0.03, "Mexico City"),
    Country("CN", "CNY", "zh", 8, 0.10, (0.25, 0.60, 0.10, 0.05), 0.02, "Shenzhen"),
    Country("JP", "JPY", "ja", 9, 0.06, (0.60, 0.15, 0.20, 0.05), 0.05, "Tokyo"),
    Country("RU", "RUB", "ru", 3, 0.04, (0.25, 0.50, 0.20, 0.05), 0.03, "Moscow"),
    Country("SA", "SAR", "ar", 3, 0.04, (0.50, 0.30, 0.12, 0.08), 0.03, "Riyadh"),
    Country("IN", "INR", "en", 5.5, 0.08, (0.05, 0.75, 0.12, 0.08), 0.03, "Mumbai"),
    Country("KR", "KRW", "ko", 9, 0.05, (0.30, 0.55, 0.12, 0.03), 0.05, "Seoul"),
    Country("AU", "AUD", "en", 10, 0.03, (0.50, 0.25, 0.20, 0.05), 0.05, "Sydney"),
)
COUNTRY_BY_CODE = {c.code: c for c in COUNTRIES}
#: Origin-only countries (sellers, no users here).
ORIGIN_CITIES = {"IT": "Milan"}
#: Intra-EU shipments need no customs (GB is outside).
EU = frozenset({"DE", "FR", "ES", "IT"})
REGION = {
    "US": "am", "MX": "am", "BR": "am",
    "GB": "eu", "DE": "eu", "FR": "eu", "ES": "eu", "IT": "eu", "RU": "eu",
    "CN": "as", "JP": "as", "KR": "as", "IN": "as", "SA": "as", "AU": "oc",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    median_usd: float
    origins: dict[str, float]
    #: Search query per language (en, de, fr, es, pt, zh, ja, ru, ar, ko).
    queries: tuple[str, ...]
    popularity: float  # base share of interest across all users


QUERY_LANGS = ("en", "de", "fr", "es", "pt", "zh", "ja", "ru", "ar", "ko")
CATEGORIES: tuple[Category, ...] = (
    Category("electronics", 120, {"CN": .45, "KR": .15, "JP": .15, "US": .15, "DE": .10},
             ("headphones", "Kopfhörer", "écouteurs", "auriculares", "fones de ouvido", "耳机",
              "イヤホン", "наушники", "سماعات", "헤드폰"), 1.3),
    Category("phones", 350, {"CN": .40, "KR": .30, "US": .20, "JP": .10},
             ("smartphone", "Handy", "téléphone", "móvil", "celular", "手机", "スマホ",
              "смартфон", "هاتف", "휴대폰"), 1.0),
    Category("fashion", 45, {"IT": .25, "FR": .20, "CN": .35, "GB": .10, "US": .10},
             ("dress", "Kleid", "robe", "vestido", "vestido", "连衣裙", "ワンピース", "платье",
              "فستان", "원피스"), 1.5),
    Category("shoes", 80, {"IT": .30, "CN": .30, "US": .20, "DE": .20},
             ("sneakers", "Schuhe", "chaussures", "zapatillas", "tênis", "运动鞋", "スニーカー",
              "кроссовки", "حذاء", "운동화"), 1.0),
    Category("beauty", 30, {"KR": .35, "FR": .30, "JP": .15, "US": .20},
             ("skincare", "Hautpflege", "soin visage", "cuidado facial", "cuidados com a pele",
              "护肤", "スキンケア", "уход за кожей", "العناية بالبشرة", "스킨케어"), 1.2),
    Category("home", 60, {"CN": .40, "DE": .20, "IT": .10, "US": .20, "GB": .10},
             ("kitchen", "Küche", "cuisine", "cocina", "cozinha", "厨房", "キッチン", "кухня",
              "مطبخ", "주방"), 1.0),
    Category("toys", 25, {"CN": .60, "JP": .20, "US": .10, "DE": .10},
             ("toys", "Spielzeug", "jouets", "juguetes", "brinquedos", "玩具", "おもちゃ",
              "игрушки", "ألعاب", "장난감"), 0.8),
    Category("sports", 55, {"US": .30, "DE": .30, "CN": .30, "JP": .10},
             ("fitness", "Fitness", "sport", "deportes", "esportes", "运动", "スポーツ", "спорт",
              "رياضة", "스포츠"), 0.8),
    Category("books", 15, {"US": .40, "GB": .40, "DE": .10, "FR": .10},
             ("books", "Bücher", "livres", "libros", "livros", "图书", "本", "книги", "كتب",
              "책"), 0.6),
    Category("jewelry", 200, {"IT": .40, "FR": .20, "US": .20, "CN": .20},
             ("necklace", "Halskette", "collier", "collar", "colar", "项链", "ネックレス",
              "ожерелье", "قلادة", "목걸이"), 0.5),
    Category("health", 25, {"US": .40, "DE": .30, "JP": .20, "KR": .10},
             ("vitamins", "Vitamine", "vitamines", "vitaminas", "vitaminas", "维生素", "ビタミン",
              "витамины", "فيتامينات", "비타민"), 0.7),
    Category("pet", 30, {"US": .40, "CN": .30, "DE": .20, "GB": .10},
             ("dog food", "Hundefutter", "croquettes", "comida para perro", "ração", "狗粮",
              "ドッグフード", "корм для собак", "طعام الكلاب", "강아지 사료"), 0.6),
)  # fmt: skip
#: Categories fraudsters buy from: high value, easy to resell.
FRAUD_CATEGORIES = ("phones", "electronics", "jewelry")


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    share: float
    sessions_per_day: float
    #: Relative weight of each local hour 0-23 for a session start.
    hours: tuple[float, ...]
    views_mean: float
    p_search: float
    p_cart: float  # per view
    p_purchase: float  # per session with a non-empty cart
    #: Item choice weight ~ (price / category median) ** price_pref.
    price_pref: float
    gap_s: float  # mean seconds between clicks
    typical_order_usd: float


def _hours(*peaks: tuple[int, int, float]) -> tuple[float, ...]:
    """A 24-hour weight profile: a low base plus ``(from_hour, to_hour, weight)`` peaks."""
    weights = [0.15] * 6 + [0.5] * 18  # night is quiet
    for start, end, weight in peaks:
        for hour in range(start, end):
            weights[hour % 24] += weight
    return tuple(weights)


SEGMENTS: tuple[Segment, ...] = (
    Segment("high-value", 0.12, 0.9, _hours((19, 24, 3.0), (12, 14, 1.0)), 6.0, 0.45,
            0.13, 0.65, 0.8, 40.0, 260.0),
    Segment("dynamic", 0.33, 1.6, _hours((9, 24, 1.2), (22, 26, 1.5)), 8.0, 0.30,
            0.07, 0.50, 0.0, 22.0, 90.0),
    Segment("growth", 0.55, 0.5, _hours((12, 14, 2.0), (20, 23, 2.0)), 4.0, 0.20,
            0.10, 0.45, -0.8, 35.0, 40.0),
)  # fmt: skip
SEGMENT_BY_NAME = {s.name: s for s in SEGMENTS}


@dataclass(frozen=True, slots=True)
class Carrier:
    name: str
    speed: float  # transit-time multiplier (lower is faster)
    p_failed_attempt: float
    quoted: float  # promised-days multiplier: cheap carriers promise optimistically


CARRIERS = {
    c.name: c
    for c in (
        Carrier("usps", 1.0, 0.05, 1.0),
        Carrier("royal_mail", 1.0, 0.05, 1.0),
        Carrier("dhl", 0.9, 0.04, 1.0),
        Carrier("colissimo", 1.0, 0.06, 1.0),
        Carrier("correos", 1.1, 0.07, 1.0),
        Carrier("correios", 1.4, 0.12, 1.0),
        Carrier("estafeta", 1.2, 0.09, 1.0),
        Carrier("sf_express", 0.8, 0.03, 1.0),
        Carrier("yamato", 0.7, 0.02, 1.0),
        Carrier("cj_logistics", 0.8, 0.03, 1.0),
        Carrier("russian_post", 1.5, 0.10, 1.0),
        Carrier("aramex", 1.1, 0.08, 1.0),
        Carrier("delhivery", 1.2, 0.10, 1.0),
        Carrier("australia_post", 1.0, 0.05, 1.0),
        Carrier("dhl_express", 0.6, 0.03, 1.1),
        Carrier("fedex", 0.7, 0.04, 1.1),
        Carrier("ups", 0.75, 0.04, 1.1),
        Carrier("ems", 1.2, 0.07, 1.0),
        Carrier("cainiao", 1.4, 0.06, 0.8),
    )
}
DOMESTIC_CARRIER = {
    "US": "usps", "GB": "royal_mail", "DE": "dhl", "FR": "colissimo", "ES": "correos",
    "BR": "correios", "MX": "estafeta", "CN": "sf_express", "JP": "yamato", "KR": "cj_logistics",
    "RU": "russian_post", "SA": "aramex", "IN": "delhivery", "AU": "australia_post",
    "IT": "dhl",
}  # fmt: skip
CROSS_BORDER_CARRIERS_FROM_CN = (
    ("cainiao", 0.5),
    ("sf_express", 0.2),
    ("ems", 0.15),
    ("dhl_express", 0.15),
)
CROSS_BORDER_CARRIERS = (("dhl_express", 0.35), ("fedex", 0.25), ("ups", 0.25), ("ems", 0.15))
#: Probability that a customs check holds a parcel, by destination.
CUSTOMS_HOLD = {"BR": 0.30, "RU": 0.25, "IN": 0.20, "MX": 0.15, "CN": 0.12, "SA": 0.12}
CUSTOMS_HOLD_DEFAULT = 0.06
#: Median days a held parcel stays in customs, by destination (log-normal, sigma 0.5).
CUSTOMS_HOLD_DAYS = {"BR": 4.0, "RU": 3.5, "IN": 3.0, "MX": 2.5, "CN": 2.0, "SA": 2.0}
CUSTOMS_HOLD_DAYS_DEFAULT = 1.5


def route_transit_days(origin: str, dest: str, lo: float, hi: float) -> float:
    """The typical door-to-hub transit of a lane (before the carrier's speed), in [lo, hi).

    Fixed per route (a stable hash, not the run's seed): real lanes have their own typical
    times, so per-route statistics and models have something to learn.
    """
    fraction = zlib.crc32(f"{origin}>{dest}".encode()) / 2**32
    return lo + (hi - lo) * fraction


#: Fraud scenarios and their weights once each has occurred once.
#: Small incidents are more frequent so that each scenario makes a similar share of the fraud
#: payments (a card-testing burst is ~10 payments, a geo mismatch 1-2).
SCENARIOS: dict[str, float] = {
    "compromised_card": 0.18,
    "compromised_merchant": 0.14,
    "amount_spike": 0.28,
    "card_testing": 0.07,
    "geo_mismatch": 0.33,
}

# --------------------------------------------------------------------------------------------
# Config and output
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """What to simulate. ``days`` may be fractional; ``start_ms`` is epoch ms (UTC)."""

    users: int = 1000
    days: float = 7.0
    start_ms: int = DEFAULT_START_MS
    seed: int = 42
    #: Target share of payments that are fraud.
    fraud_rate: float = 0.02
    settlement_delay_days: float = 7.0
    #: Catalog size; default grows with the user base (300..10,000).
    items: int | None = None
    #: Stop after this many events (None: the whole period).
    max_events: int | None = None

    def __post_init__(self) -> None:
        if self.users < 1:
            raise BorderflowError("--users must be at least 1")
        if not 0 < self.days <= 3650:
            raise BorderflowError("--days must be in (0, 3650]")
        if not 0 <= self.fraud_rate < 0.5:
            raise BorderflowError("--fraud-rate must be in [0, 0.5)")
        if self.settlement_delay_days < 0:
            raise BorderflowError("settlement delay must not be negative")
        if self.items is not None and self.items < len(CATEGORIES):
            raise BorderflowError(f"--items must be at least {len(CATEGORIES)}")
        if self.max_events is not None and self.max_events < 0:
            raise BorderflowError("--max-events must not be negative")

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.days * DAY_MS)

    @property
    def n_items(self) -> int:
        return self.items if self.items is not None else max(300, min(10_000, self.users))


class GeneratedEvent(NamedTuple):
    """One simulated event: contract topic, partition key (user id), value dict, event time."""

    topic: str
    key: str
    value: dict[str, Any]
    ts: int
    #: Ground truth for payments: the fraud scenario, or None for a legitimate payment.
    #: Never part of ``value`` (it would leak the label into the stream).
    scenario: str | None = None


def parse_start(text: str) -> int:
    """``--start``: an ISO date or datetime; without a timezone it is taken as UTC."""
    text = text.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BorderflowError(f"--start {text!r} is not an ISO-8601 date or datetime") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return to_epoch_ms(parsed.isoformat())
    except ValueError as exc:
        raise BorderflowError(f"--start: {exc}") from None


# --------------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _User:
    user_id: str
    country: Country
    segment: Segment
    devices: list[tuple[str, str]]  # (device type, device id)
    cards: list[str]
    personalisation: bool
    affinity_cum: list[float]  # cumulative category weights
    normal_usd: float  # running mean of legit order amounts (for amount spikes)
    base: dict[str, Any] = field(default_factory=dict)  # fields shared by the user's clicks


def _round_money(amount: float, currency: str) -> float:
    if currency in ZERO_DECIMAL_CURRENCIES:
        return float(max(1, round(amount)))
    return max(0.01, round(amount, 2))


def to_local(amount_usd: float, currency: str) -> float:
    """Convert USD to ``currency`` with the generator's FX table, rounded to minor units."""
    return _round_money(amount_usd / FX_USD_PER_UNIT[currency], currency)


def _weighted(rng: random.Random, pairs: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([p[0] for p in pairs], [p[1] for p in pairs])[0]


class _Simulation:
    """Builds the world from the seed, then emits events day by day (see module docstring)."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.np = np.random.default_rng(config.seed)
        self.end = config.end_ms
        self.seed_tag = str(config.seed)
        self.counters: Counter[str] = Counter()
        self.pending: list[tuple[int, int, GeneratedEvent]] = []
        self.pending_seq = 0
        self.today: list[GeneratedEvent] = []
        self.day_end = config.start_ms
        self.legit_payments = 0
        self.fraud_payments = 0
        #: merchant -> list of (start, end) windows in which its payments are fraud.
        self.merchant_windows: dict[str, list[tuple[int, int]]] = {}
        self.scenario_queue: list[str] = list(SCENARIOS)
        self.rng.shuffle(self.scenario_queue)  # every scenario occurs once before repeats
        self.settlement_ms = int(config.settlement_delay_days * DAY_MS)
        self._build_catalog()
        self._build_users()

    # -- world building --------------------------------------------------------------------
    def _build_catalog(self) -> None:
        n = self.cfg.n_items
        n_cat = len(CATEGORIES)
        rng, nrng = self.rng, self.np
        pop = np.array([c.popularity for c in CATEGORIES])
        # Every category gets at least one item; the rest follow category popularity.
        cats = np.concatenate([np.arange(n_cat), nrng.choice(n_cat, n - n_cat, p=pop / pop.sum())])
        cats.sort(kind="stable")
        medians = np.array([c.median_usd for c in CATEGORIES])[cats]
        prices = np.round(medians * nrng.lognormal(0.0, 0.6, n), 2).clip(0.99, None)
        self.item_ids = [f"i{i + 1}" for i in range(n)]
        self.item_cat = [int(c) for c in cats]
        self.item_usd = [float(p) for p in prices]
        self.item_origin: list[str] = []
        self.item_merchant: list[str] = []
        # Merchants are sellers in one origin country; a few big ones per origin (Zipf).
        origins = sorted({o for c in CATEGORIES for o in c.origins})
        per_origin = max(3, n // (15 * len(origins)))
        merchants = {
            o: [f"m{k * len(origins) + j + 1}" for k in range(per_origin)]
            for j, o in enumerate(origins)
        }
        merchant_w = [1.0 / (k + 1) for k in range(per_origin)]
        self.merchant_items: dict[str, list[int]] = {}
        self.merchant_origin: dict[str, str] = {}
        for i, c in enumerate(self.item_cat):
            cat = CATEGORIES[c]
            origin = rng.choices(list(cat.origins), list(cat.origins.values()))[0]
            merchant = rng.choices(merchants[origin], merchant_w)[0]
            self.item_origin.append(origin)
            self.item_merchant.append(merchant)
            self.merchant_origin[merchant] = origin
            self.merchant_items.setdefault(merchant, []).append(i)
        self.merchants = sorted(self.merchant_items, key=lambda m: int(m[1:]))
        # Popularity: a random rank inside the category, weight 1/rank (Zipf, s=1).
        self.cat_items: list[list[int]] = [[] for _ in CATEGORIES]
        for i, c in enumerate(self.item_cat):
            self.cat_items[c].append(i)
        zipf = [0.0] * n
        self.item_group = [0] * n
        self.group_items: list[list[int]] = []
        for items in self.cat_items:
            rng.shuffle(items)
            for rank, i in enumerate(items):
                zipf[i] = 1.0 / (rank + 1)
            # Co-viewed groups: ~6 items of the category that sessions move between.
            shuffled = items[:]
            rng.shuffle(shuffled)
            for g in range(0, len(shuffled), 6):
                members = shuffled[g : g + 6]
                for i in members:
                    self.item_group[i] = len(self.group_items)
                self.group_items.append(members)
        # Cumulative choice weights per (segment, category): popularity x price preference.
        self.cat_cum: dict[tuple[str, int], list[float]] = {}
        for seg in SEGMENTS:
            for c, items in enumerate(self.cat_items):
                median = CATEGORIES[c].median_usd
                total, cum = 0.0, []
                for i in items:
                    total += zipf[i] * (self.item_usd[i] / median) ** seg.price_pref
                    cum.append(total)
                self.cat_cum[(seg.name, c)] = cum
        # Items by price for fraudsters (who pick expensive goods) and amount targets.
        self.fraud_items = sorted(
            (i for i in range(n) if CATEGORIES[self.item_cat[i]].name in FRAUD_CATEGORIES),
            key=lambda i: self.item_usd[i],
        )
        if not self.fraud_items:
            self.fraud_items = sorted(range(n), key=lambda i: self.item_usd[i])
        self.fraud_item_usd = [self.item_usd[i] for i in self.fraud_items]
        self._local_prices: dict[str, list[float]] = {}

    def local_prices(self, currency: str) -> list[float]:
        prices = self._local_prices.get(currency)
        if prices is None:
            rate = FX_USD_PER_UNIT[currency]
            prices = [_round_money(p / rate, currency) for p in self.item_usd]
            self._local_prices[currency] = prices
        return prices

    def _build_users(self) -> None:
        n, rng, nrng = self.cfg.users, self.rng, self.np
        cw = np.array([c.weight for c in COUNTRIES])
        country_idx = nrng.choice(len(COUNTRIES), n, p=cw / cw.sum())
        sw = np.array([s.share for s in SEGMENTS])
        segment_idx = nrng.choice(len(SEGMENTS), n, p=sw / sw.sum())
        # Peaky affinities (Dirichlet, small concentration): each user has 2-3 favourite
        # categories, around the categories' global popularity.
        pop = np.array([c.popularity for c in CATEGORIES])
        affinity = nrng.dirichlet(pop / pop.sum() * len(CATEGORIES) * 0.35, n)
        self.users: list[_User] = []
        for u in range(n):
            country = COUNTRIES[int(country_idx[u])]
            segment = SEGMENTS[int(segment_idx[u])]
            n_dev = 1 if rng.random() < 0.6 else 2
            devices = [
                (rng.choices(DEVICES, country.devices)[0], self._new_id("dev_", "device"))
                for _ in range(n_dev)
            ]
            cards = [self._new_id("card_", "card") for _ in range(1 if rng.random() < 0.8 else 2)]
            user = _User(
                user_id=f"u{u + 1}",
                country=country,
                segment=segment,
                devices=devices,
                cards=cards,
                personalisation=rng.random() >= country.no_personalisation,
                affinity_cum=[float(x) for x in np.cumsum(affinity[u])],
                normal_usd=segment.typical_order_usd,
            )
            user.base = {
                "user_id": user.user_id,
                "currency": country.currency,
                "country": country.code,
                "lang": country.lang,
                "personalisation": user.personalisation,
            }
            self.users.append(user)
        self.session_rate = np.array([u.segment.sessions_per_day for u in self.users])
        self.hour_cum = {
            s.name: [float(x) for x in np.cumsum(s.hours) / sum(s.hours)] for s in SEGMENTS
        }

    def _new_id(self, prefix: str, kind: str) -> str:
        self.counters[kind] += 1
        return f"{prefix}{self.counters[kind]}"

    def _event_id(self, kind: str) -> str:
        # The seed is part of every event id: runs with other seeds on the same topics must
        # not collide in idempotent (event_id-keyed) sinks.
        self.counters[kind] += 1
        return f"{kind}-{self.seed_tag}-{self.counters[kind]}"

    # -- emission --------------------------------------------------------------------------
    def emit(
        self, topic: str, key: str, value: dict[str, Any], ts: int, scenario: str | None = None
    ) -> bool:
        """Queue an event for today or a later day; events after the period are dropped."""
        if ts >= self.end:
            return False
        event = GeneratedEvent(topic, key, value, ts, scenario)
        if ts < self.day_end:
            self.today.append(event)
        else:
            heapq.heappush(self.pending, (ts, self.pending_seq, event))
            self.pending_seq += 1
        return True

    def run(self) -> Iterator[GeneratedEvent]:
        cfg = self.cfg
        remaining = cfg.max_events if cfg.max_events is not None else -1
        if remaining == 0:
            return
        n_days = math.ceil(cfg.days)
        for day in range(n_days):
            day_start = cfg.start_ms + day * DAY_MS
            self.day_end = min(day_start + DAY_MS, self.end)
            self.today = []
            self._organic_day(day_start)
            self._fraud_day(day_start)
            while self.pending and self.pending[0][0] < self.day_end:
                self.today.append(heapq.heappop(self.pending)[2])
            # Stable sort: events with equal ts keep generation order (funnel order).
            self.today.sort(key=_by_ts)
            for event in self.today:
                yield event
                remaining -= 1
                if remaining == 0:
                    return
        self.today = []

    # -- organic behaviour -----------------------------------------------------------------
    def _organic_day(self, day_start: int) -> None:
        weekday = datetime.fromtimestamp(day_start / 1000, UTC).weekday()
        factor = 1.2 if weekday >= 5 else 1.0  # weekends are busier
        counts = self.np.poisson(self.session_rate * factor)
        rng = self.rng
        for u in np.flatnonzero(counts):
            user = self.users[int(u)]
            hour_cum = self.hour_cum[user.segment.name]
            offset_ms = int(user.country.utc_offset_h * HOUR_MS)
            for _ in range(int(counts[u])):
                local_hour = bisect(hour_cum, rng.random())
                # Local hour -> UTC time of this UTC day (wrapping around midnight).
                t = day_start + (local_hour * HOUR_MS - offset_ms) % DAY_MS
                self._session(user, t + rng.randrange(HOUR_MS))

    def _pick_category(self, user: _User) -> int:
        cum = user.affinity_cum
        return min(bisect(cum, self.rng.random() * cum[-1]), len(cum) - 1)

    def _pick_in_category(self, segment: Segment, c: int) -> int:
        cum = self.cat_cum[(segment.name, c)]
        return self.cat_items[c][min(bisect(cum, self.rng.random() * cum[-1]), len(cum) - 1)]

    def _next_item(self, user: _User, category: int | None, last_item: int | None) -> int:
        """Session structure: stay in the co-viewed group, else the category, else jump."""
        r = self.rng.random()
        if last_item is not None and r < 0.45:
            group = self.group_items[self.item_group[last_item]]
            if len(group) > 1:
                # Another item of the group: re-viewing the same item teaches nothing.
                k = self.rng.randrange(len(group) - 1)
                return group[k] if group[k] != last_item else group[-1]
        if category is None or r >= 0.8:
            category = self._pick_category(user)
        return self._pick_in_category(user.segment, category)

    def _session(self, user: _User, t: int) -> None:
        rng, seg = self.rng, user.segment
        device, device_id = rng.choice(user.devices)
        base = {
            **user.base,
            "session_id": self._event_id("s"),
            "device": device,
        }
        prices = self.local_prices(user.country.currency)
        emit, clk = self.emit, self._event_id
        gap = 1.0 / seg.gap_s  # expovariate takes a rate: clicks per second
        cart: list[int] = []
        category: int | None = None
        last: int | None = None
        n_views = 1 + int(rng.expovariate(1.0 / (seg.views_mean - 1.0)))
        lang_idx = QUERY_LANGS.index(user.country.lang)
        for step in range(n_views):
            if rng.random() < (seg.p_search if step == 0 else 0.06):
                category = self._pick_category(user)
                query = CATEGORIES[category].queries[lang_idx]
                emit(
                    CLICKS,
                    user.user_id,
                    {"event_id": clk("clk"), "ts": t, **base, "type": "search", "query": query},
                    t,
                )
                t += 1000 + int(rng.expovariate(gap) * 1000.0)
                last = None
            item = self._next_item(user, category, last)
            category, last = self.item_cat[item], item
            click = {
                **base,
                "item_id": self.item_ids[item],
                "category": CATEGORIES[category].name,
                "origin_country": self.item_origin[item],
                "price": prices[item],
            }
            emit(
                CLICKS, user.user_id, {"event_id": clk("clk"), "ts": t, **click, "type": "view"}, t
            )
            t += 1000 + int(rng.expovariate(gap) * 1000.0)
            r = rng.random()
            if r < seg.p_cart and item not in cart:
                cart.append(item)
                emit(
                    CLICKS,
                    user.user_id,
                    {"event_id": clk("clk"), "ts": t, **click, "type": "add_to_cart"},
                    t,
                )
                t += 1000 + int(rng.expovariate(gap) * 1000.0)
            elif cart and r > 0.97:
                removed = cart.pop(rng.randrange(len(cart)))
                emit(
                    CLICKS,
                    user.user_id,
                    {
                        "event_id": clk("clk"),
                        "ts": t,
                        **base,
                        "type": "remove_from_cart",
                        "item_id": self.item_ids[removed],
                        "category": CATEGORIES[self.item_cat[removed]].name,
                        "origin_country": self.item_origin[removed],
                        "price": prices[removed],
                    },
                    t,
                )
                t += 1000 + int(rng.expovariate(gap) * 1000.0)
        if cart and rng.random() < seg.p_purchase:
            self._purchase(user, base, cart, t, device_id)

    def _purchase(
        self, user: _User, base: dict[str, Any], cart: list[int], t: int, device_id: str
    ) -> None:
        rng = self.rng
        prices = self.local_prices(user.country.currency)
        for k, item in enumerate(cart):
            self.emit(
                CLICKS,
                user.user_id,
                {
                    "event_id": self._event_id("clk"),
                    "ts": t + k,
                    **base,
                    "type": "purchase",
                    "item_id": self.item_ids[item],
                    "category": CATEGORIES[self.item_cat[item]].name,
                    "origin_country": self.item_origin[item],
                    "price": prices[item],
                },
                t + k,
            )
        home = user.country.code
        # Legit noise: some orders are gifts shipped abroad, some buyers are travelling.
        shipping = home if rng.random() >= 0.02 else rng.choice(COUNTRIES).code
        ip = home if rng.random() >= 0.03 else rng.choice(COUNTRIES).code
        main = max(cart, key=self.item_usd.__getitem__)
        merchant = self.item_merchant[main]
        pay_ts = t + len(cart) + rng.randrange(1000, 5000)
        scenario = None
        for start, end in self.merchant_windows.get(merchant, ()):
            if start <= pay_ts < end:
                scenario = "compromised_merchant"
        amount = _round_money(sum(prices[i] for i in cart), user.country.currency)
        order_id = self._event_id("ord")
        emitted = self._payment(
            user.user_id,
            user.country.currency,
            pay_ts,
            card=rng.choice(user.cards),
            merchant=merchant,
            amount=amount,
            billing=home,
            shipping=shipping,
            ip=ip,
            device_id=device_id,
            order_id=order_id,
            scenario=scenario,
        )
        if emitted and scenario is None:
            usd = sum(self.item_usd[i] for i in cart)
            user.normal_usd = 0.8 * user.normal_usd + 0.2 * usd
        self._shipment(user.user_id, order_id, self.item_origin[main], shipping, pay_ts)

    def _payment(
        self,
        user_id: str,
        currency: str,
        ts: int,
        *,
        card: str,
        merchant: str,
        amount: float,
        billing: str,
        shipping: str | None,
        ip: str,
        device_id: str,
        order_id: str | None,
        scenario: str | None,
    ) -> bool:
        txn_id = self._event_id("txn")
        value: dict[str, Any] = {
            "event_id": txn_id,
            "ts": ts,
            "user_id": user_id,
            "card_id": card,
            "merchant_id": merchant,
            "amount": amount,
            "currency": currency,
            "billing_country": billing,
            "ip_country": ip,
            "device_id": device_id,
            "origin_country": self.merchant_origin[merchant],
        }
        # Optional fields are left out rather than sent as null (smaller, and what a real
        # producer omits): card-testing authorisations have no order and nothing to ship.
        if shipping is not None:
            value["shipping_country"] = shipping
        if order_id is not None:
            value["order_id"] = order_id
        if not self.emit(PAYMENTS, user_id, value, ts, scenario):
            return False
        if scenario is None:
            self.legit_payments += 1
            label_ts = ts + self.settlement_ms + self.rng.randrange(30 * MINUTE_MS)
            label, source = "legit", "settlement"
        else:
            self.fraud_payments += 1
            label_ts = ts + int(self.rng.uniform(1.0, 14.0) * DAY_MS)
            label, source = "fraud", "chargeback"
        self.emit(
            FRAUD_LABELS,
            user_id,
            {
                "event_id": self._event_id("lbl"),
                "ts": label_ts,
                "user_id": user_id,
                "txn_id": txn_id,
                "label": label,
                "source": source,
            },
            label_ts,
        )
        return True

    # -- logistics -------------------------------------------------------------------------
    def _shipment(self, user_id: str, order_id: str, origin: str, dest: str, t: int) -> None:
        """One parcel's scans (see "Shipments" in the module docstring).

        Every random draw below is made in the same order and number whatever the route, so
        the logistics model of the journey can change without moving any other stream.
        """
        rng = self.rng
        if origin == dest:
            carrier = CARRIERS[DOMESTIC_CARRIER[origin]]
            lo, hi = 1.0, 2.5
        else:
            pairs = CROSS_BORDER_CARRIERS_FROM_CN if origin == "CN" else CROSS_BORDER_CARRIERS
            carrier = CARRIERS[_weighted(rng, pairs)]
            same_region = REGION.get(origin) == REGION.get(dest)
            lo, hi = (2.0, 4.0) if same_region else (5.0, 10.0)
        # The lane's typical transit (fixed per route), then +-10% for this parcel.
        lane_days = route_transit_days(origin, dest, lo, hi)
        transit_days = lane_days * (0.9 + 0.2 * (rng.uniform(lo, hi) - lo) / (hi - lo))
        customs = origin != dest and not (origin in EU and dest in EU)
        # The shop promises from the lane's typical time, not from this parcel's fate.
        expected_days = 1.0 + lane_days * carrier.speed + (2.0 if customs else 0.0) + 1.0
        promised = t + int(math.ceil(expected_days * carrier.quoted + 1.0) * DAY_MS)
        origin_city = (
            COUNTRY_BY_CODE[origin].city if origin in COUNTRY_BY_CODE else ORIGIN_CITIES[origin]
        )
        origin_loc = f"{origin_city}, {origin}"
        dest_loc = f"{COUNTRY_BY_CODE[dest].city}, {dest}"
        dest_offset_ms = int(COUNTRY_BY_CODE[dest].utc_offset_h * HOUR_MS)
        base = {
            "user_id": user_id,
            "order_id": order_id,
            "carrier": carrier.name,
            "origin_country": origin,
            "dest_country": dest,
            "promised_ts": promised,
        }

        def scan(status: str, ts: int, location: str) -> None:
            self.emit(
                LOGISTICS,
                user_id,
                {
                    "event_id": self._event_id("trk"),
                    "ts": ts,
                    **base,
                    "status": status,
                    "location": location,
                },
                ts,
            )

        def hours(lo: float, hi: float) -> int:
            return int(rng.uniform(lo, hi) * HOUR_MS)

        def not_on_sunday(ts: int) -> int:
            """No delivery rounds on Sundays (destination local time): Monday instead."""
            weekday = ((ts + dest_offset_ms) // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday
            return ts + DAY_MS if weekday == 6 else ts

        t += rng.randrange(MINUTE_MS, 30 * MINUTE_MS)
        scan("created", t, origin_loc)
        # Express carriers collect sooner (pick-up time scales with the carrier's speed).
        t += int(rng.lognormvariate(math.log(10.0), 0.5) * carrier.speed * HOUR_MS)
        scan("picked", t, origin_loc)
        t += hours(2, 18)
        scan("departed", t, origin_loc)
        noise = rng.lognormvariate(0.0, 0.25) ** 0.6  # sigma 0.15
        t += int(transit_days * carrier.speed * noise * DAY_MS)
        scan("arrived_hub", t, dest_loc)
        if customs:
            if rng.random() < CUSTOMS_HOLD.get(dest, CUSTOMS_HOLD_DEFAULT):
                t += hours(2, 12)
                scan("customs_hold", t, dest_loc)
                if rng.random() < 0.03:  # refused at customs, sent back
                    scan("returned", t + int(rng.uniform(2, 6) * DAY_MS), origin_loc)
                    return
                hold_days = CUSTOMS_HOLD_DAYS.get(dest, CUSTOMS_HOLD_DAYS_DEFAULT)
                t += int(rng.lognormvariate(math.log(hold_days), 0.5) * DAY_MS)
            else:
                t += hours(4, 30)
            scan("customs_cleared", t, dest_loc)
        for attempt in range(2):
            t = not_on_sunday(t + hours(8, 30))
            scan("out_for_delivery", t, dest_loc)
            t += hours(1, 8)
            if rng.random() >= carrier.p_failed_attempt:
                scan("delivered", t, dest_loc)
                if rng.random() < 0.03:  # the customer sends it back
                    scan("returned", t + int(rng.uniform(3, 14) * DAY_MS), dest_loc)
                return
            scan("failed_attempt", t, dest_loc)
            if attempt == 1:
                scan("returned", t + int(rng.uniform(3, 7) * DAY_MS), dest_loc)

    # -- fraud -----------------------------------------------------------------------------
    def _fraud_day(self, day_start: int) -> None:
        """Spawn incidents until fraud is ``fraud_rate`` of the payments emitted so far."""
        rate = self.cfg.fraud_rate
        if rate <= 0:
            return
        for _ in range(200):  # bound: incidents near the end of the period may emit nothing
            target = rate / (1.0 - rate) * self.legit_payments
            if self.fraud_payments >= target:
                return
            if self.scenario_queue:
                scenario = self.scenario_queue.pop()
            else:
                scenario = self.rng.choices(list(SCENARIOS), list(SCENARIOS.values()))[0]
            before = self.fraud_payments
            t0 = day_start + self.rng.randrange(DAY_MS)
            getattr(self, f"_fraud_{scenario}")(t0)
            if self.fraud_payments == before and t0 + DAY_MS >= self.end:
                return

    def _fraudster(self) -> tuple[str, Country, str, str]:
        """A fresh fraudster account: user id, country, device type, device id."""
        n = self.counters["fraudster"] = self.counters["fraudster"] + 1
        country = self.rng.choice(COUNTRIES)
        device = self.rng.choice(DEVICES)
        return f"u{self.cfg.users + n}", country, device, self._new_id("dev_", "device")

    def _victim(self) -> _User:
        return self.users[self.rng.randrange(len(self.users))]

    def _item_near(self, usd: float) -> int:
        """The fraud-category item whose USD price is closest to ``usd``."""
        k = min(bisect(self.fraud_item_usd, usd), len(self.fraud_items) - 1)
        return self.fraud_items[k]

    def _fraud_purchase(
        self,
        t: int,
        *,
        user_id: str,
        country: Country,
        device: str,
        device_id: str,
        items: list[int],
        card: str,
        billing: str,
        shipping: str,
        ip: str,
        scenario: str,
        merchant: str | None = None,
    ) -> None:
        """A short, direct session (view, cart, buy) ending in a fraud payment and a shipment."""
        currency = country.currency
        prices = self.local_prices(currency)
        base = {
            "user_id": user_id,
            "session_id": self._event_id("s"),
            "currency": currency,
            "country": country.code,
            "device": device,
            "lang": country.lang,
        }
        for item in items:
            click = {
                **base,
                "item_id": self.item_ids[item],
                "category": CATEGORIES[self.item_cat[item]].name,
                "origin_country": self.item_origin[item],
                "price": prices[item],
            }
            for kind in ("view", "add_to_cart"):
                self.emit(
                    CLICKS,
                    user_id,
                    {"event_id": self._event_id("clk"), "ts": t, **click, "type": kind},
                    t,
                )
                t += self.rng.randrange(3000, 20000)
        for item in items:
            self.emit(
                CLICKS,
                user_id,
                {
                    "event_id": self._event_id("clk"),
                    "ts": t,
                    **base,
                    "type": "purchase",
                    "item_id": self.item_ids[item],
                    "category": CATEGORIES[self.item_cat[item]].name,
                    "origin_country": self.item_origin[item],
                    "price": prices[item],
                },
                t,
            )
        main = max(items, key=self.item_usd.__getitem__)
        order_id = self._event_id("ord")
        pay_ts = t + self.rng.randrange(1000, 5000)
        self._payment(
            user_id,
            currency,
            pay_ts,
            card=card,
            merchant=merchant or self.item_merchant[main],
            amount=_round_money(sum(prices[i] for i in items), currency),
            billing=billing,
            shipping=shipping,
            ip=ip,
            device_id=device_id,
            order_id=order_id,
            scenario=scenario,
        )
        self._shipment(user_id, order_id, self.item_origin[main], shipping, pay_ts)

    def _fraud_compromised_card(self, t0: int) -> None:
        """A stolen card used by another account, device and country for a few days."""
        rng = self.rng
        victim = self._victim()
        card = victim.cards[0]
        user_id, country, device, device_id = self._fraudster()
        while country is victim.country:
            country = rng.choice(COUNTRIES)
        span = rng.uniform(1.0, 4.0) * DAY_MS
        for k in range(rng.randint(2, 6)):
            t = t0 if k == 0 else t0 + int(rng.uniform(0.0, span))
            items = [self._item_near(rng.uniform(150, 900)) for _ in range(rng.randint(1, 2))]
            self._fraud_purchase(
                t,
                user_id=user_id,
                country=country,
                device=device,
                device_id=device_id,
                items=items,
                card=card,
                billing=victim.country.code,
                shipping=country.code,
                ip=country.code,
                scenario="compromised_card",
            )

    def _fraud_compromised_merchant(self, t0: int) -> None:
        """A merchant whose payments are all fraud for 1-3 days (from tomorrow: today's
        organic payments are already drawn), plus a few direct fraudulent orders."""
        rng = self.rng
        merchant = rng.choice(self.merchants)
        start = t0 + DAY_MS
        end = start + int(rng.uniform(1.0, 3.0) * DAY_MS)
        self.merchant_windows.setdefault(merchant, []).append((start, end))
        for _ in range(rng.randint(2, 4)):
            victim = self._victim()
            user_id, country, device, device_id = self._fraudster()
            item = rng.choice(self.merchant_items[merchant])
            self._fraud_purchase(
                start + rng.randrange(end - start),
                user_id=user_id,
                country=country,
                device=device,
                device_id=device_id,
                items=[item],
                card=rng.choice(victim.cards),
                billing=victim.country.code,
                shipping=country.code,
                ip=country.code,
                scenario="compromised_merchant",
                merchant=merchant,
            )

    def _fraud_amount_spike(self, t0: int) -> None:
        """A taken-over account buying at 5-10x the user's normal order value."""
        rng = self.rng
        victim = self._victim()
        home = victim.country
        device, device_id = rng.choice(victim.devices)
        if rng.random() < 0.5:
            device, device_id = rng.choice(DEVICES), self._new_id("dev_", "device")
        for k in range(rng.randint(1, 3)):
            t = t0 + (0 if k == 0 else int(rng.uniform(0.0, 2.0) * DAY_MS))
            item = self._item_near(victim.normal_usd * rng.uniform(5.0, 10.0))
            shipping = home.code if rng.random() < 0.6 else rng.choice(COUNTRIES).code
            ip = home.code if rng.random() < 0.7 else rng.choice(COUNTRIES).code
            self._fraud_purchase(
                t,
                user_id=victim.user_id,
                country=home,
                device=device,
                device_id=device_id,
                items=[item],
                card=victim.cards[0],
                billing=home.code,
                shipping=shipping,
                ip=ip,
                scenario="amount_spike",
            )

    def _fraud_card_testing(self, t0: int) -> None:
        """Many tiny authorisations on one stolen card within minutes, then a large order."""
        rng = self.rng
        victim = self._victim()
        card = rng.choice(victim.cards)
        user_id, country, _device, device_id = self._fraudster()
        merchant = rng.choice(self.merchants)
        t = t0
        for _ in range(rng.randint(4, 10)):
            t += rng.randrange(5_000, 60_000)
            self._payment(
                user_id,
                country.currency,
                t,
                card=card,
                merchant=merchant,
                amount=to_local(rng.uniform(0.5, 3.0), country.currency),
                billing=victim.country.code,
                shipping=None,
                ip=country.code,
                device_id=device_id,
                order_id=None,
                scenario="card_testing",
            )
        item = self._item_near(rng.uniform(300, 1500))
        self._fraud_purchase(
            t + rng.randrange(60_000, 600_000),
            user_id=user_id,
            country=country,
            device="web-desktop",
            device_id=device_id,
            items=[item],
            card=card,
            billing=victim.country.code,
            shipping=country.code,
            ip=country.code,
            scenario="card_testing",
        )

    def _fraud_geo_mismatch(self, t0: int) -> None:
        """The user's own account and card, but a new device and billing != shipping != IP."""
        rng = self.rng
        victim = self._victim()
        home = victim.country
        others = [c for c in COUNTRIES if c is not home]
        shipping, ip = rng.choice(others).code, rng.choice(others).code
        device, device_id = rng.choice(DEVICES), self._new_id("dev_", "device")
        for k in range(rng.randint(1, 2)):
            t = t0 + k * rng.randrange(HOUR_MS, 12 * HOUR_MS)
            item = self._item_near(victim.normal_usd * rng.uniform(1.0, 3.0))
            self._fraud_purchase(
                t,
                user_id=victim.user_id,
                country=home,
                device=device,
                device_id=device_id,
                items=[item],
                card=rng.choice(victim.cards),
                billing=home.code,
                shipping=shipping,
                ip=ip,
                scenario="geo_mismatch",
            )


def _by_ts(event: GeneratedEvent) -> int:
    return event.ts


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def simulate(config: GeneratorConfig) -> Iterator[GeneratedEvent]:
    """The simulated events in non-decreasing ``ts`` order (lazy; deterministic per seed)."""
    return _Simulation(config).run()


def generate_to_list(config: GeneratorConfig) -> list[GeneratedEvent]:
    """All events of ``config`` in a list (for benchmarks and tests)."""
    return list(simulate(config))


def envelope_bytes(event: GeneratedEvent) -> bytes:
    """The JSONL line (without newline) ``borderflow replay`` reads back."""
    return orjson.dumps({"topic": event.topic, "key": event.key, "value": event.value})


@dataclass
class GenerationStats:
    """What a run produced, for the summary line."""

    per_topic: Counter[str] = field(default_factory=Counter)
    fraud_payments: int = 0
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.per_topic.values())

    def count(self, event: GeneratedEvent) -> None:
        self.per_topic[event.topic] += 1
        if event.scenario is not None:
            self.fraud_payments += 1

    def summary(self, target: str) -> str:
        topics = " ".join(f"{t}={self.per_topic.get(t, 0)}" for t in INPUT_TOPICS)
        payments = self.per_topic.get(PAYMENTS, 0)
        share = self.fraud_payments / payments if payments else 0.0
        rate = self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"generated {self.total} events ({topics}); fraud payments={self.fraud_payments} "
            f"({share:.2%}); {self.elapsed_s:.1f}s, {rate:,.0f} events/s -> {target}"
        )


def write_jsonl(events: Iterator[GeneratedEvent], out: IO[bytes], stats: GenerationStats) -> None:
    """Write envelopes, one per line, counting as we go."""
    write, count = out.write, stats.count
    for event in events:
        count(event)
        write(orjson.dumps({"topic": event.topic, "key": event.key, "value": event.value}))
        write(b"\n")


#: ``generate`` options that only one scenario understands (the other rejects them).
SHOP_ONLY_OPTIONS = ("users", "fraud_rate", "items")
HANDBOOK_ONLY_OPTIONS = ("customers", "terminals")


def _reject_foreign_options(ctx: click.Context, scenario: str) -> None:
    """Fail on an option given for the other scenario instead of silently ignoring it."""
    foreign = HANDBOOK_ONLY_OPTIONS if scenario == "shop" else SHOP_ONLY_OPTIONS
    for name in foreign:
        source = ctx.get_parameter_source(name)
        if source is not None and source != click.core.ParameterSource.DEFAULT:
            flag = "--" + name.replace("_", "-")
            raise BorderflowError(f"{flag} does not apply to --scenario {scenario}")


@click.command("generate")
@click.option(
    "--scenario",
    type=click.Choice(["shop", "handbook"]),
    default="shop",
    show_default=True,
    help="shop: the cross-border shop (all four topics). handbook: the Fraud Detection "
    "Handbook's card-transaction simulator (payments and fraud-labels only).",
)
@click.option(
    "--users", type=click.IntRange(min=1), default=1000, show_default=True, help="Shop only."
)
@click.option(
    "--customers",
    type=click.IntRange(min=1),
    default=None,
    help="Handbook only: customers (one card each) [default: 5000].",
)
@click.option(
    "--terminals",
    type=click.IntRange(min=1),
    default=None,
    help="Handbook only: payment terminals (merchants) [default: 10000].",
)
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Simulated period (shop: may be fractional) [default: 7 for shop, 183 for handbook; "
    "handbook: whole days].",
)
@click.option(
    "--start",
    default=None,
    help=f"Start of the period, ISO-8601 (UTC if no timezone) [default: {DEFAULT_START} for "
    "shop, 2018-04-01T00:00:00Z for handbook].",
)
@click.option(
    "--seed", type=int, default=None, help="Random seed [default: 42 for shop, 0 for handbook]."
)
@click.option(
    "--fraud-rate",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=0.02,
    show_default=True,
    help="Shop only: target share of payments that are fraud.",
)
@click.option(
    "--settlement-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="Delay of 'legit' labels after their payment (handbook: of every label).",
)
@click.option(
    "--items",
    type=click.IntRange(min=len(CATEGORIES)),
    default=None,
    help="Shop only: catalog size [default: users, within 300..10000].",
)
@click.option(
    "--max-events", type=click.IntRange(min=0), default=None, help="Stop after this many events."
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write JSONL envelopes to this file ('-' = stdout) instead of Kafka.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Kafka only: events per second (0 = as fast as possible).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def generate_command(
    ctx: click.Context,
    scenario: str,
    users: int,
    customers: int | None,
    terminals: int | None,
    days: float | None,
    start: str | None,
    seed: int | None,
    fraud_rate: float,
    settlement_days: float,
    items: int | None,
    max_events: int | None,
    out: Path | None,
    rate: float,
    quiet: bool,
) -> None:
    """Simulate a cross-border shop or the fraud handbook, to Kafka or a JSONL file.

    --scenario shop (default) simulates a cross-border shop: clicks, payments, fraud labels
    and shipment scans. --scenario handbook re-implements the Fraud Detection Handbook's
    transaction simulator (customers, terminals, its three fraud scenarios; defaults: its
    published size of 5000 customers, 10000 terminals, 183 days from 2018-04-01): payments
    and one label per payment --settlement-days (7) later; the labels of the last week fall
    after the period and are still written.
    """
    settings: Settings = ctx.obj
    _reject_foreign_options(ctx, scenario)
    began = time.perf_counter()  # world building counts: it is part of the run
    events: Iterator[GeneratedEvent]
    if scenario == "handbook":
        from infra.handbook import HANDBOOK_DAYS, HANDBOOK_START_MS, HandbookConfig

        handbook_days = days if days is not None else HANDBOOK_DAYS
        if not float(handbook_days).is_integer():
            raise BorderflowError("--days must be a whole number for --scenario handbook")
        config_hb = HandbookConfig(
            customers=customers if customers is not None else HandbookConfig.customers,
            terminals=terminals if terminals is not None else HandbookConfig.terminals,
            days=int(handbook_days),
            start_ms=parse_start(start) if start is not None else HANDBOOK_START_MS,
            seed=seed if seed is not None else HandbookConfig.seed,
            label_delay_days=settlement_days,
        )
        events = _handbook_events(config_hb, max_events)
    else:
        config = GeneratorConfig(
            users=users,
            days=days if days is not None else GeneratorConfig.days,
            start_ms=parse_start(start if start is not None else DEFAULT_START),
            seed=seed if seed is not None else GeneratorConfig.seed,
            fraud_rate=fraud_rate,
            settlement_delay_days=settlement_days,
            items=items,
            max_events=max_events,
        )
        events = simulate(config)
    stats = GenerationStats()
    if out is not None:
        if str(out) == "-":
            write_jsonl(events, sys.stdout.buffer, stats)
            sys.stdout.buffer.flush()
            target = "stdout"
        else:
            try:
                with out.open("wb") as handle:
                    write_jsonl(events, handle, stats)
            except OSError as exc:
                raise BorderflowError(f"cannot write {out}: {exc.strerror or exc}") from None
            target = str(out)
    else:
        from infra.replay import Record, send_records
        from sinks.kafka import ensure_topics

        ensure_topics(settings, INPUT_TOPICS)

        def records() -> Iterator[Record]:
            for event in events:
                stats.count(event)
                yield Record(event.topic, event.key, orjson.dumps(event.value), event.ts)

        send_records(settings, records(), rate=rate, quiet=quiet, total=max_events)
        target = f"Kafka {settings.kafka_bootstrap} (prefix {settings.topic_prefix!r})"
    stats.elapsed_s = time.perf_counter() - began
    click.echo(stats.summary(target), err=str(out) == "-")


def _handbook_events(config: HandbookConfig, max_events: int | None) -> Iterator[GeneratedEvent]:
    """The handbook scenario's events, cut after ``max_events`` (lazily: no more are built)."""
    from itertools import islice

    from infra.handbook import simulate_handbook

    events = simulate_handbook(config)
    return events if max_events is None else islice(events, max_events)


if __name__ == "__main__":  # pragma: no cover - `borderflow generate` is the entry point
    try:
        generate_command.main(obj=Settings())
    except BorderflowError as error:
        sys.exit(f"error: {error}")
