"""Shipment state: one user's shipments, built from tracking scans in *event time*.

A :class:`Shipment` is the state machine of one order's parcel over the contract's statuses
(:data:`SHIPMENT_TRANSITIONS`, the one source of truth; the simulator imports it). A
:class:`ShipmentBook` holds one user's shipments and is what the logistics agent keeps in its
Faust table (``to_bytes`` / ``from_bytes``, orjson).

Rules, precisely:

* **Order.** Scans are kept sorted by event time (``ts``; equal times keep arrival order). A
  scan older than the shipment's newest scan is *out of order*: it is inserted at its place.
  The current ``status`` (and ``status_ts``, ``location``) is always that of the scan with the
  latest event time.
* **Duplicates.** A scan whose ``event_id`` the shipment already holds changes nothing and is
  reported as not applied, with the Kafka position the held scan was applied at
  (``ApplyOutcome.seen_at``: the agent tells a replay from a duplicate by it). So is any scan
  of an order completed long ago whose full state was dropped (only its id is remembered,
  :data:`MAX_DONE`).
* **Valid transitions.** ``a -> b`` between event-time neighbours is valid when ``b == a`` (a
  re-scan, e.g. a second hub) or ``b`` is *reachable* from ``a`` in
  :data:`SHIPMENT_TRANSITIONS` (skipped scans are normal: carriers miss scans). Anything else
  goes backwards - ``delivered -> picked``, ``customs_cleared -> customs_hold``, ``created``
  after anything - and is *invalid*. A new scan is checked against its predecessor and its
  successor in event time; a scan with an invalid edge counts once in
  ``invalid_transitions`` and is reported (``"delivered -> picked"``). It is still recorded:
  never fatal.
* **Customs.** A hold lasts from a ``customs_hold`` scan to the next scan of another status;
  ``customs_holds`` counts entries into a hold, ``customs_ms`` sums finished holds and
  ``hold_start_ts`` is the start of the hold the parcel is in now (0 when not held).
* **Completion.** A shipment is complete once it has a ``delivered`` or a ``returned`` scan.
  The book then moves it from ``open`` to ``completed`` (the :data:`MAX_COMPLETED` most
  recent, full state, so a return after delivery or a late scan still applies), and later to
  ``done`` (ids only).

>>> from schemas.events import LogisticsEvent
>>> def scan(eid, status, hours):
...     return LogisticsEvent(event_id=eid, ts=1767225600000 + hours * 3600000, user_id="u1",
...                           order_id="o1", carrier="dhl", origin_country="DE",
...                           dest_country="FR", status=status)
>>> book = ShipmentBook("u1")
>>> book.apply(scan("s1", "created", 0))[1].applied
True
>>> book.apply(scan("s3", "departed", 20))[0].status
'departed'
>>> outcome = book.apply(scan("s2", "picked", 10))[1]  # late, but in its place
>>> outcome.out_of_order, outcome.invalid_transition
(True, None)
>>> book.apply(scan("s2", "picked", 10))[1].applied  # duplicate
False
>>> book.apply(scan("s4", "created", 30))[1].invalid_transition
'departed -> created'
>>> status_text("out_for_delivery", "de-DE"), status_text("delivered", "ja")
('In Zustellung', '配達完了')
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, get_args

import orjson

from models.profile import DeliveryExperience
from schemas.events import LogisticsEvent, ShipmentStatus

#: The contract's statuses, in journey order (one source of truth: schemas.events).
STATUSES: tuple[str, ...] = get_args(ShipmentStatus)

#: Valid successors of each shipment status (tests check every simulated journey against it).
SHIPMENT_TRANSITIONS: dict[str, frozenset[str]] = {
    "created": frozenset({"picked"}),
    "picked": frozenset({"departed"}),
    "departed": frozenset({"arrived_hub"}),
    "arrived_hub": frozenset({"customs_hold", "customs_cleared", "out_for_delivery"}),
    "customs_hold": frozenset({"customs_cleared", "returned"}),
    "customs_cleared": frozenset({"out_for_delivery"}),
    "out_for_delivery": frozenset({"delivered", "failed_attempt"}),
    "failed_attempt": frozenset({"out_for_delivery", "returned"}),
    "delivered": frozenset({"returned"}),
    "returned": frozenset(),
}


def _reachable(graph: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    closure: dict[str, frozenset[str]] = {}
    for start in graph:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            status = stack.pop()
            if status not in seen:
                seen.add(status)
                stack.extend(graph.get(status, ()))
        closure[start] = frozenset(seen)
    return closure


#: Statuses reachable from each status in one or more steps.
REACHABLE: dict[str, frozenset[str]] = _reachable(SHIPMENT_TRANSITIONS)


def is_valid_transition(before: str, after: str) -> bool:
    """True when ``after`` may follow ``before`` in event time (see the module docstring).

    >>> is_valid_transition("picked", "arrived_hub"), is_valid_transition("delivered", "picked")
    (True, False)
    """
    if before == after:
        return True
    reachable = REACHABLE.get(before)
    return reachable is not None and after in reachable


#: Bounds (memory per user stays small whatever the input).
MAX_SCANS = 64  # per shipment; beyond, the oldest scans are folded into counters
MAX_SNAPSHOTS = 32  # feature snapshots per shipment (one per scan that moved it)
MAX_OPEN = 32  # open shipments per user; the one with the oldest news is dropped beyond
MAX_COMPLETED = 8  # recently completed shipments kept in full per user
MAX_DONE = 128  # completed order ids remembered per user after that
#: An open shipment without a scan for this long is dropped (lost parcels, missing scans).
OPEN_TTL_MS = 120 * 86_400_000


@dataclass(slots=True)
class Shipment:
    """One order's shipment (JSON-ready: plain fields only). Times are epoch ms."""

    order_id: str
    user_id: str
    carrier: str
    origin_country: str
    dest_country: str
    #: Event time of the first (earliest) scan.
    created_ts: int
    promised_ts: int = 0
    status: str = "created"
    status_ts: int = 0
    location: str | None = None
    #: ``[ts, status, event_id, partition, offset]`` sorted by event time (bounded,
    #: :data:`MAX_SCANS`); the Kafka position is missing from scans applied without one (and
    #: from books stored before positions were kept).
    scans: list[list[Any]] = field(default_factory=list)
    customs_holds: int = 0
    customs_ms: int = 0
    hold_start_ts: int = 0
    #: Finished holds whose duration the customs statistics have learned.
    customs_learned: int = 0
    failed_attempts: int = 0
    invalid_transitions: int = 0
    delivered_ts: int = 0
    returned: bool = False
    predicted_delivery_ts: int = 0
    delay_risk: float = 0.0
    #: Alert kinds already raised for this shipment (each fires at most once).
    alerted: list[str] = field(default_factory=list)
    #: Feature snapshots taken at scans (rows, see models.delivery_time), learned on delivery.
    snapshots: list[list[Any]] = field(default_factory=list)
    #: Contributions of scans dropped beyond MAX_SCANS: [holds, customs ms, failed attempts].
    folded: list[int] = field(default_factory=lambda: [0, 0, 0])

    @classmethod
    def from_scan(cls, scan: LogisticsEvent) -> Shipment:
        return cls(
            order_id=scan.order_id,
            user_id=scan.user_id,
            carrier=scan.carrier,
            origin_country=scan.origin_country,
            dest_country=scan.dest_country,
            created_ts=scan.ts,
            promised_ts=scan.promised_ts or 0,
            status=scan.status,
            status_ts=scan.ts,
            location=scan.location,
        )

    # -- derived views ------------------------------------------------------------------------
    @property
    def route(self) -> str:
        return f"{self.origin_country}>{self.dest_country}"

    @property
    def completed(self) -> bool:
        return bool(self.delivered_ts) or self.returned

    @property
    def in_customs_hold(self) -> bool:
        return self.hold_start_ts > 0

    def has_scan(self, event_id: str) -> bool:
        return self.find_scan(event_id) is not None

    def find_scan(self, event_id: str) -> list[Any] | None:
        return next((row for row in self.scans if row[2] == event_id), None)

    def hold_durations(self) -> list[int]:
        """Durations (ms) of the finished customs holds in the kept scans, in event time."""
        durations = []
        start = 0
        for ts, status, *_ in self.scans:
            if status == "customs_hold":
                if not start:
                    start = ts
            elif start:
                durations.append(ts - start)
                start = 0
        return durations

    def customs_ms_at(self, ts: int) -> int:
        """Time spent in customs holds up to ``ts`` (a running hold counts until ``ts``)."""
        running = max(0, ts - self.hold_start_ts) if self.hold_start_ts else 0
        return self.customs_ms + running

    # -- mutation -----------------------------------------------------------------------------
    def insert(
        self, scan: LogisticsEvent, position: tuple[int, int] | None = None
    ) -> tuple[bool, str | None]:
        """Insert a new scan in event-time order; returns (out_of_order, invalid edge)."""
        times = [row[0] for row in self.scans]
        at = bisect_right(times, scan.ts)
        out_of_order = at < len(self.scans)
        invalid = None
        if at > 0 and not is_valid_transition(self.scans[at - 1][1], scan.status):
            invalid = f"{self.scans[at - 1][1]} -> {scan.status}"
        elif out_of_order and not is_valid_transition(scan.status, self.scans[at][1]):
            invalid = f"{scan.status} -> {self.scans[at][1]}"
        if invalid is not None:
            self.invalid_transitions += 1
        self.scans.insert(at, scan_row(scan, position))
        if not out_of_order:
            self.location = scan.location if scan.location is not None else self.location
        if scan.promised_ts and not self.promised_ts:
            self.promised_ts = scan.promised_ts
        self.created_ts = min(self.created_ts, scan.ts)
        while len(self.scans) > MAX_SCANS:
            self._fold_oldest()
        self._derive()
        return out_of_order, invalid

    def _fold_oldest(self) -> None:
        ts, status, *_ = self.scans.pop(0)
        if status == "customs_hold":
            following = self.scans[0]
            self.folded[1] += following[0] - ts  # hold time is additive over scan pairs
            if following[1] != "customs_hold":  # else the run goes on and counts there
                self.folded[0] += 1
        elif status == "failed_attempt":
            self.folded[2] += 1

    def _derive(self) -> None:
        """Recompute status and counters from the sorted scans (cheap: a few dozen rows)."""
        last_ts, last_status, *_ = self.scans[-1]
        self.status, self.status_ts = last_status, last_ts
        holds, hold_ms, failed = self.folded
        start = 0
        delivered = 0
        returned = False
        for ts, status, *_ in self.scans:
            if status == "customs_hold":
                if not start:
                    start = ts
                    holds += 1
            elif start:
                hold_ms += ts - start
                start = 0
            if status == "failed_attempt":
                failed += 1
            elif status == "delivered" and not delivered:
                delivered = ts
            elif status == "returned":
                returned = True
        self.customs_holds, self.customs_ms, self.hold_start_ts = holds, hold_ms, start
        self.failed_attempts = failed
        self.delivered_ts, self.returned = delivered, returned


def scan_row(scan: LogisticsEvent, position: tuple[int, int] | None) -> list[Any]:
    """A shipment's ``scans`` row of ``scan``."""
    row: list[Any] = [scan.ts, scan.status, scan.event_id]
    if position is not None:
        row.extend(position)
    return row


def scan_position(row: list[Any]) -> tuple[int, int] | None:
    """The Kafka (partition, offset) of a ``scans`` row, None when it was not kept."""
    return (int(row[3]), int(row[4])) if len(row) >= 5 else None


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What :meth:`ShipmentBook.apply` did with one scan."""

    applied: bool
    out_of_order: bool = False
    invalid_transition: str | None = None
    #: True when this scan completed the shipment (first delivered or returned scan).
    completed_now: bool = False
    #: True when the scan hit an order known only by id (completed long ago).
    stale: bool = False
    #: Not applied because the shipment holds it: the (partition, offset) the held scan was
    #: applied at, None when unknown.
    seen_at: tuple[int, int] | None = None


class ShipmentBook:
    """One user's shipments: open ones, recently completed ones, ids of older completions."""

    __slots__ = ("completed", "done", "experience", "open", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.open: dict[str, Shipment] = {}
        self.completed: dict[str, Shipment] = {}
        #: order_id -> [final status, completion ts] of completions no longer kept in full.
        self.done: dict[str, list[Any]] = {}
        #: The user's delivery experience counted from the scans applied here (None in a
        #: book stored before books kept it: the agent starts it from the profile's).
        self.experience: DeliveryExperience | None = None

    def get(self, order_id: str) -> Shipment | None:
        return self.open.get(order_id) or self.completed.get(order_id)

    def __len__(self) -> int:
        return len(self.open) + len(self.completed)

    def apply(
        self, scan: LogisticsEvent, position: tuple[int, int] | None = None
    ) -> tuple[Shipment, ApplyOutcome]:
        """Fold one scan in (see the module docstring for the rules); ``position`` is its
        Kafka (partition, offset), kept with the scan."""
        order_id = scan.order_id
        shipment = self.open.get(order_id)
        if shipment is None:
            shipment = self.completed.get(order_id)
        if shipment is None:
            gone = self.done.get(order_id)
            if gone is not None:
                stub = Shipment.from_scan(scan)
                stub.status, stub.status_ts = str(gone[0]), int(gone[1])
                return stub, ApplyOutcome(applied=False, stale=True)
            shipment = Shipment.from_scan(scan)
            shipment.scans.append(scan_row(scan, position))
            shipment._derive()
            self.open[order_id] = shipment
            self._bound_open(order_id)
            return shipment, self._settle(shipment, ApplyOutcome(applied=True))
        held = shipment.find_scan(scan.event_id)
        if held is not None:
            return shipment, ApplyOutcome(applied=False, seen_at=scan_position(held))
        out_of_order, invalid = shipment.insert(scan, position)
        return shipment, self._settle(shipment, ApplyOutcome(True, out_of_order, invalid))

    def _settle(self, shipment: Shipment, outcome: ApplyOutcome) -> ApplyOutcome:
        order_id = shipment.order_id
        if not shipment.completed or order_id not in self.open:
            return outcome
        del self.open[order_id]
        self.completed[order_id] = shipment
        while len(self.completed) > MAX_COMPLETED:
            oldest = next(iter(self.completed))
            old = self.completed.pop(oldest)
            self.done[oldest] = [old.status, old.status_ts]
            while len(self.done) > MAX_DONE:
                del self.done[next(iter(self.done))]
        return ApplyOutcome(
            outcome.applied, outcome.out_of_order, outcome.invalid_transition, completed_now=True
        )

    def _bound_open(self, keep: str) -> None:
        while len(self.open) > MAX_OPEN:
            stalest = min((o for o in self.open if o != keep), key=lambda o: self.open[o].status_ts)
            del self.open[stalest]

    def expire(self, now_ts: int, ttl_ms: int = OPEN_TTL_MS) -> list[str]:
        """Drop open shipments whose newest scan is older than ``now_ts - ttl_ms``."""
        stale = [o for o, s in self.open.items() if s.status_ts < now_ts - ttl_ms]
        for order_id in stale:
            del self.open[order_id]
        return stale

    # -- persistence --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "user_id": self.user_id,
                # orjson writes dataclasses natively (the same fields as ``asdict``), without
                # ``asdict``'s deep copy of every scan list: books are written every batch.
                "open": list(self.open.values()),
                "completed": list(self.completed.values()),
                "done": self.done,
                "experience": self.experience,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShipmentBook:
        data = orjson.loads(raw)
        book = cls(data["user_id"])
        book.open = {s["order_id"]: Shipment(**s) for s in data.get("open", ())}
        book.completed = {s["order_id"]: Shipment(**s) for s in data.get("completed", ())}
        book.done = dict(data.get("done", {}))
        experience = data.get("experience")
        book.experience = None if experience is None else DeliveryExperience(**experience)
        return book


# --------------------------------------------------------------------------------------------
# Human-readable status, in the user's language
# --------------------------------------------------------------------------------------------

STATUS_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "created": "Shipment created",
        "picked": "Picked up by the carrier",
        "departed": "In transit",
        "arrived_hub": "Arrived at the sorting hub",
        "customs_hold": "Held at customs",
        "customs_cleared": "Cleared customs",
        "out_for_delivery": "Out for delivery",
        "delivered": "Delivered",
        "failed_attempt": "Delivery attempt failed",
        "returned": "Returned to sender",
    },
    "de": {
        "created": "Sendung erstellt",
        "picked": "Vom Paketdienst abgeholt",
        "departed": "Unterwegs",
        "arrived_hub": "Im Paketzentrum angekommen",
        "customs_hold": "Vom Zoll zurückgehalten",
        "customs_cleared": "Verzollt",
        "out_for_delivery": "In Zustellung",
        "delivered": "Zugestellt",
        "failed_attempt": "Zustellversuch fehlgeschlagen",
        "returned": "Zurück an den Absender",
    },
    "fr": {
        "created": "Envoi créé",
        "picked": "Pris en charge par le transporteur",
        "departed": "En cours d'acheminement",
        "arrived_hub": "Arrivé au centre de tri",
        "customs_hold": "Retenu en douane",
        "customs_cleared": "Dédouané",
        "out_for_delivery": "En cours de livraison",
        "delivered": "Livré",
        "failed_attempt": "Tentative de livraison infructueuse",
        "returned": "Retourné à l'expéditeur",
    },
    "es": {
        "created": "Envío creado",
        "picked": "Recogido por el transportista",
        "departed": "En tránsito",
        "arrived_hub": "En el centro de distribución",
        "customs_hold": "Retenido en aduana",
        "customs_cleared": "Liberado por la aduana",
        "out_for_delivery": "En reparto",
        "delivered": "Entregado",
        "failed_attempt": "Intento de entrega fallido",
        "returned": "Devuelto al remitente",
    },
    "pt": {
        "created": "Envio criado",
        "picked": "Coletado pela transportadora",
        "departed": "Em trânsito",
        "arrived_hub": "Chegou ao centro de distribuição",
        "customs_hold": "Retido na alfândega",
        "customs_cleared": "Liberado pela alfândega",
        "out_for_delivery": "Saiu para entrega",
        "delivered": "Entregue",
        "failed_attempt": "Tentativa de entrega sem sucesso",
        "returned": "Devolvido ao remetente",
    },
    "zh": {
        "created": "已创建运单",
        "picked": "快递员已揽收",
        "departed": "运输中",
        "arrived_hub": "已到达转运中心",
        "customs_hold": "海关查验中",
        "customs_cleared": "已清关",
        "out_for_delivery": "派送中",
        "delivered": "已签收",
        "failed_attempt": "派送未成功",
        "returned": "已退回寄件人",
    },
    "ja": {
        "created": "出荷準備中",
        "picked": "集荷済み",
        "departed": "輸送中",
        "arrived_hub": "配送センターに到着",
        "customs_hold": "税関で保留中",
        "customs_cleared": "通関完了",
        "out_for_delivery": "配達中",
        "delivered": "配達完了",
        "failed_attempt": "ご不在のため持ち戻り",
        "returned": "差出人に返送",
    },
    "ru": {
        "created": "Отправление создано",
        "picked": "Принято перевозчиком",
        "departed": "В пути",
        "arrived_hub": "Прибыло в сортировочный центр",
        "customs_hold": "Задержано на таможне",
        "customs_cleared": "Таможенное оформление завершено",
        "out_for_delivery": "Передано курьеру",
        "delivered": "Доставлено",
        "failed_attempt": "Неудачная попытка вручения",
        "returned": "Возвращено отправителю",
    },
    "ar": {
        "created": "تم إنشاء الشحنة",
        "picked": "استلمتها شركة الشحن",
        "departed": "في الطريق",
        "arrived_hub": "وصلت إلى مركز الفرز",
        "customs_hold": "محتجزة لدى الجمارك",
        "customs_cleared": "تم التخليص الجمركي",
        "out_for_delivery": "خرجت للتوصيل",
        "delivered": "تم التوصيل",
        "failed_attempt": "تعذّر التوصيل",
        "returned": "أُعيدت إلى المرسل",
    },
    "ko": {
        "created": "배송 접수",
        "picked": "집화 완료",
        "departed": "운송 중",
        "arrived_hub": "물류센터 도착",
        "customs_hold": "세관 보류 중",
        "customs_cleared": "통관 완료",
        "out_for_delivery": "배송 출발",
        "delivered": "배송 완료",
        "failed_attempt": "배달 실패(부재)",
        "returned": "발송인에게 반송",
    },
}
#: Languages whose text puts the location in full-width parentheses.
_FULLWIDTH = frozenset({"zh", "ja"})


def language_of(tag: str | None) -> str:
    """The primary language of a tag we have texts for ('de-DE' -> 'de'), else 'en'.

    >>> language_of("pt_BR"), language_of("ZH-Hans-CN"), language_of("xx"), language_of(None)
    ('pt', 'zh', 'en', 'en')
    """
    if not tag:
        return "en"
    primary = tag.strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in STATUS_TEXT else "en"


def status_text(status: str, lang: str | None, location: str | None = None) -> str:
    """A short human-readable status in ``lang`` (English for an unknown language).

    >>> status_text("customs_hold", "fr", "Paris, FR")
    'Retenu en douane (Paris, FR)'
    >>> status_text("out_for_delivery", "ja", "Tokyo, JP")
    '配達中（Tokyo, JP）'
    """
    code = language_of(lang)
    text = STATUS_TEXT[code].get(status) or status.replace("_", " ").capitalize()
    if not location:
        return text
    return f"{text}（{location}）" if code in _FULLWIDTH else f"{text} ({location})"
