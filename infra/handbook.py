"""The Fraud Detection Handbook's transaction simulator as a borderflow event source.

Why: ANCHORS.md measures borderflow's fraud scoring against the batch results of the
"Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook"
(Le Borgne et al.). Those numbers are only comparable on data drawn from the same rules, so
this module re-implements the handbook's simulator **from its published description**
(ANCHORS.md) and maps it onto the borderflow contract (``payments`` and ``fraud-labels``).

The rules:

* customers: location ``~ U(0,100)^2``, ``mean_amount ~ U(5,100)``, ``std = mean / 2``,
  ``mean_nb_tx_per_day ~ U(0,4)``; terminals: location ``~ U(0,100)^2``. A customer's
  available terminals are those at a distance ``< radius`` (5 by default: ~75 terminals);
  a customer with none makes no transactions.
* each customer and day: ``Poisson(mean_nb_tx_per_day)`` transactions, time of day
  ``~ N(43200 s, 20000 s)`` (draws outside ``(0, 86400)`` are discarded, so ~3% of the
  Poisson count is lost), amount ``~ N(mean, std)`` (a negative draw is replaced by
  ``U(0, 2 * mean)``), terminal uniform among the available ones.
* fraud, applied day by day, windows counted in whole simulated days from the day of the
  compromise (day ``d`` covers days ``d .. d+27`` / ``d .. d+13``):

  1. ``high_amount``: a (genuine) amount above 220 is fraud;
  2. ``compromised_terminal``: each day 2 distinct random terminals are compromised; every
     transaction on them in the 28 days from that day is fraud;
  3. ``compromised_customer``: each day 3 distinct random customers are compromised; of each
     one's transactions in the 14 days from that day, ``n // 3`` chosen at random get their
     amount multiplied by 5 and are fraud. A transaction already multiplied by an earlier
     compromise of the same customer is not chosen again (amounts are x5, never x25), and
     a customer with fewer than 3 transactions in the window loses none.

  A transaction can match several rules. Its ``scenario`` is the **first match in the order
  1, 2, 3**; rule 1 looks at the genuine amount (before any x5), so a transaction pushed above
  220 only by the x5 is a ``compromised_customer`` fraud. A transaction chosen by rule 3 is
  multiplied even when rule 1 or 2 already made it fraud (the rules are independent; only
  the attribution picks one). :class:`HandbookSummary` reports both the attribution (it sums
  to the fraud count) and the overlapping per-rule matches.

Mapping onto the contract: one card per customer (the handbook's "cards" are customers),
``user_id="c<customer>"``, ``card_id="card-c<customer>"``, ``merchant_id="t<terminal>"``,
amounts in EUR cents (0.00 becomes 0.01: the contract wants a positive amount), no countries
and no device (the handbook has none). Transactions are numbered in ``ts`` order from 0
(``event_id="hb-<index>"``) like the handbook's transaction ids. Every transaction gets one
label on ``fraud-labels`` ``label_delay_days`` (7) later - the handbook's protocol, where
the truth is known a week after the payment. Labels that fall after the simulated period
are still emitted, after the last payment: an evaluation of the last week needs them. A
consumer that must not see the future should stop at the period's end itself.

Determinism and speed: four independent numpy generators spawned from the seed (customers,
terminals, transactions, compromises), so e.g. changing the number of terminals does not
change the customers. Transactions are drawn one simulated day at a time, vectorised over
all customers; rule 3 needs the next 14 days of a customer, so raw days are drawn 13 days
ahead of the day being emitted. Events are built lazily from the day arrays: memory stays at
a few days of numpy columns plus the customer-terminal table, whatever the period.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from infra.generator import DAY_MS, GeneratedEvent
from schemas.errors import BorderflowError
from schemas.events import FRAUD_LABELS, MAX_TS_MS, MIN_TS_MS, PAYMENTS

#: 2018-04-01T00:00:00Z, the first day of the handbook's published set.
HANDBOOK_START_MS = 1_522_540_800_000
HANDBOOK_START = "2018-04-01T00:00:00Z"
#: The published set's size, for the defaults.
HANDBOOK_DAYS = 183

#: Side of the square world customers and terminals live in.
WORLD_SIZE = 100.0
TIME_MEAN_S = 43_200.0
TIME_STD_S = 20_000.0
DAY_S = 86_400.0

HIGH_AMOUNT_CENTS = 22_000  # rule 1: strictly above 220.00
TERMINALS_PER_DAY = 2  # rule 2
TERMINAL_WINDOW_DAYS = 28
CUSTOMERS_PER_DAY = 3  # rule 3
CUSTOMER_WINDOW_DAYS = 14
CUSTOMER_SHARE_DIVISOR = 3  # rule 3 takes n // 3 of the window's transactions
CUSTOMER_MULTIPLIER = 5

#: Rule number -> the name carried in :attr:`GeneratedEvent.scenario`.
SCENARIO_NAMES: dict[int, str] = {
    1: "high_amount",
    2: "compromised_terminal",
    3: "compromised_customer",
}

#: Upper bound of customer-terminal pairs kept in memory (8 bytes each): a huge radius with
#: large populations would otherwise exhaust memory before the first event.
MAX_PAIRS = 300_000_000
#: Elements of one chunk of the customer x terminal distance matrix (8 MB per float64 temporary).
DISTANCE_CHUNK = 1_000_000

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class HandbookConfig:
    """The handbook simulator's parameters; defaults are the published set's size."""

    customers: int = 5000
    terminals: int = 10_000
    days: int = HANDBOOK_DAYS
    start_ms: int = HANDBOOK_START_MS
    seed: int = 0
    radius: float = 5.0
    label_delay_days: float = 7.0

    def __post_init__(self) -> None:
        for name in ("customers", "terminals", "days", "seed", "start_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise BorderflowError(f"handbook {name} must be an integer, got {value!r}")
        if not 1 <= self.customers <= 10_000_000:
            raise BorderflowError("--customers must be in [1, 10000000]")
        if not 1 <= self.terminals <= 10_000_000:
            raise BorderflowError("--terminals must be in [1, 10000000]")
        if not 1 <= self.days <= 3650:
            raise BorderflowError("--days must be a whole number in [1, 3650] for the handbook")
        if self.seed < 0:
            raise BorderflowError("--seed must not be negative for the handbook scenario")
        if not (math.isfinite(self.radius) and 0 < self.radius <= 2 * WORLD_SIZE):
            raise BorderflowError(f"radius must be in (0, {2 * WORLD_SIZE:g}]")
        if not (math.isfinite(self.label_delay_days) and 0 <= self.label_delay_days <= 365):
            raise BorderflowError("label delay must be in [0, 365] days")
        # Both the last payment and its label must be valid contract timestamps.
        if self.start_ms < MIN_TS_MS or self.label_end_ms > MAX_TS_MS:
            raise BorderflowError("handbook period (with its label delay) must lie in 2000..2100")
        coverage = min(1.0, math.pi * self.radius**2 / WORLD_SIZE**2)
        if self.customers * self.terminals * coverage > MAX_PAIRS:
            raise BorderflowError(
                "too many customer-terminal pairs for memory: lower --customers, "
                "--terminals or the radius"
            )

    @property
    def end_ms(self) -> int:
        """End of the simulated period (exclusive): the last payment is before it."""
        return self.start_ms + self.days * DAY_MS

    @property
    def label_delay_ms(self) -> int:
        return round(self.label_delay_days * DAY_MS)

    @property
    def label_end_ms(self) -> int:
        """Bound (exclusive) of the labels' ts: the last labels come after ``end_ms``."""
        return self.end_ms + self.label_delay_ms


@dataclass(frozen=True, slots=True)
class DayBatch:
    """One simulated day's transactions as columns, in ``ts`` order (index = first_index + i).

    ``rules`` is a bit set of the matching fraud rules (bit 0: rule 1, bit 1: rule 2, bit 2:
    rule 3); ``scenario`` is the first match (0 = legitimate).
    """

    day: int
    first_index: int
    ts: IntArray
    customer: IntArray
    terminal: IntArray
    genuine_cents: IntArray  # the amount drawn for the customer
    cents: IntArray  # the amount paid: genuine x5 when rule 3 chose the transaction
    rules: npt.NDArray[np.int8]
    scenario: npt.NDArray[np.int8]

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def fraud(self) -> BoolArray:
        return self.scenario > 0

    @property
    def multiplied(self) -> BoolArray:
        return (self.rules & 4) > 0


@dataclass(slots=True)
class _RawDay:
    """A day drawn but not yet final (rule 3 may still multiply some of its amounts)."""

    day: int
    ts: IntArray
    customer: IntArray
    terminal: IntArray
    genuine_cents: IntArray
    multiplied: BoolArray


class HandbookSimulator:
    """Builds the world from the seed; :meth:`batches` and :meth:`events` run the days.

    Each call of :meth:`batches` (or :meth:`events`) replays the period from the seed, so the
    same simulator can be iterated twice with identical results. The compromise logs of the
    last run are kept for inspection (tests check the rules against them).
    """

    def __init__(self, config: HandbookConfig) -> None:
        self.cfg = config
        seeds = np.random.SeedSequence(config.seed).spawn(4)
        self._tx_seed, self._fraud_seed = seeds[2], seeds[3]
        cust_rng = np.random.default_rng(seeds[0])
        n = config.customers
        self.customer_xy: FloatArray = cust_rng.uniform(0.0, WORLD_SIZE, size=(n, 2))
        self.mean_amount: FloatArray = cust_rng.uniform(5.0, 100.0, size=n)
        self.std_amount: FloatArray = self.mean_amount / 2.0
        self.mean_nb_tx_per_day: FloatArray = cust_rng.uniform(0.0, 4.0, size=n)
        term_rng = np.random.default_rng(seeds[1])
        self.terminal_xy: FloatArray = term_rng.uniform(0.0, WORLD_SIZE, size=(config.terminals, 2))
        self.available_offsets, self.available = self._available_terminals()
        self.n_available: IntArray = np.diff(self.available_offsets)
        #: (day, terminal) and (day, customer) of every compromise of the last run.
        self.compromised_terminals: list[tuple[int, int]] = []
        self.compromised_customers: list[tuple[int, int]] = []

    # -- world -----------------------------------------------------------------------------
    def _available_terminals(self) -> tuple[IntArray, IntArray]:
        """Every customer's terminals within ``radius`` as CSR (offsets, terminal ids).

        The full customer x terminal distance matrix (50M entries at the published size)
        is computed in chunks of customers to bound memory; ``np.nonzero`` walks each chunk
        row by row, so the ids come out grouped by customer and sorted within it.
        """
        r2 = self.cfg.radius**2
        tx, ty = self.terminal_xy[:, 0], self.terminal_xy[:, 1]
        chunk = max(1, DISTANCE_CHUNK // self.cfg.terminals)
        counts: list[IntArray] = []
        ids: list[IntArray] = []
        for lo in range(0, self.cfg.customers, chunk):
            cxy = self.customer_xy[lo : lo + chunk]
            dx = cxy[:, 0:1] - tx[None, :]
            dy = cxy[:, 1:2] - ty[None, :]
            rows, cols = np.nonzero(dx * dx + dy * dy < r2)
            counts.append(np.bincount(rows, minlength=len(cxy)).astype(np.int64))
            ids.append(cols.astype(np.int64))
        offsets = np.zeros(self.cfg.customers + 1, dtype=np.int64)
        np.cumsum(np.concatenate(counts), out=offsets[1:])
        return offsets, np.concatenate(ids)

    # -- days ------------------------------------------------------------------------------
    def _draw_day(self, rng: np.random.Generator, day: int) -> _RawDay:
        """All customers' transactions of one day, before the fraud rules (vectorised)."""
        counts = rng.poisson(self.mean_nb_tx_per_day)
        counts[self.n_available == 0] = 0  # drawn anyway: the stream stays seed-aligned
        customer = np.repeat(np.arange(self.cfg.customers, dtype=np.int64), counts)
        n = len(customer)
        seconds = rng.normal(TIME_MEAN_S, TIME_STD_S, size=n)
        mean = self.mean_amount[customer]
        amount = rng.normal(mean, self.std_amount[customer])
        negative = amount < 0
        amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
        pick = rng.random(n)
        keep = (seconds > 0) & (seconds < DAY_S)
        customer, seconds, amount, pick = customer[keep], seconds[keep], amount[keep], pick[keep]
        n_avail = self.n_available[customer]
        # min() guards the (measure-zero) float rounding of pick * n up to n.
        slot = np.minimum((pick * n_avail).astype(np.int64), n_avail - 1)
        terminal = self.available[self.available_offsets[customer] + slot]
        ts = self.cfg.start_ms + day * DAY_MS + (seconds * 1000.0).astype(np.int64)
        cents = np.maximum(np.rint(amount * 100.0).astype(np.int64), 1)  # 0.00 -> 0.01
        order = np.argsort(ts, kind="stable")  # ties keep customer order
        return _RawDay(
            day,
            ts[order],
            customer[order],
            terminal[order],
            cents[order],
            np.zeros(len(order), dtype=np.bool_),
        )

    def _compromise_customers(
        self, rng: np.random.Generator, day: int, window: deque[_RawDay]
    ) -> None:
        """Rule 3: mark n // 3 of each compromised customer's next-14-days transactions."""
        n_pick = min(CUSTOMERS_PER_DAY, self.cfg.customers)
        for c in rng.choice(self.cfg.customers, size=n_pick, replace=False).tolist():
            self.compromised_customers.append((day, c))
            hits = [(raw, np.flatnonzero((raw.customer == c) & ~raw.multiplied)) for raw in window]
            total = sum(len(idx) for _, idx in hits)
            chosen = np.sort(rng.choice(total, size=total // CUSTOMER_SHARE_DIVISOR, replace=False))
            # ``chosen`` indexes the window's candidates laid end to end: map back per day.
            start = 0
            for raw, idx in hits:
                end = start + len(idx)
                mine = chosen[(chosen >= start) & (chosen < end)] - start
                raw.multiplied[idx[mine]] = True
                start = end

    def batches(self) -> Iterator[DayBatch]:
        """The final transactions, one :class:`DayBatch` per simulated day, in ``ts`` order."""
        cfg = self.cfg
        tx_rng = np.random.default_rng(self._tx_seed)
        fraud_rng = np.random.default_rng(self._fraud_seed)
        self.compromised_terminals = []
        self.compromised_customers = []
        #: Rule 2: first day on which each terminal is no longer compromised.
        terminal_until = np.zeros(cfg.terminals, dtype=np.int64)
        window: deque[_RawDay] = deque()
        drawn = 0
        next_index = 0
        for day in range(cfg.days):
            # Rule 3 on ``day`` needs days day .. day+13: keep them drawn.
            while drawn < min(cfg.days, day + CUSTOMER_WINDOW_DAYS):
                window.append(self._draw_day(tx_rng, drawn))
                drawn += 1
            n_terms = min(TERMINALS_PER_DAY, cfg.terminals)
            for t in fraud_rng.choice(cfg.terminals, size=n_terms, replace=False).tolist():
                self.compromised_terminals.append((day, t))
                terminal_until[t] = max(terminal_until[t], day + TERMINAL_WINDOW_DAYS)
            self._compromise_customers(fraud_rng, day, window)
            raw = window.popleft()
            rules = (
                (raw.genuine_cents > HIGH_AMOUNT_CENTS).astype(np.int8)
                | ((terminal_until[raw.terminal] > day).astype(np.int8) << 1)
                | (raw.multiplied.astype(np.int8) << 2)
            )
            # First match in rule order: the lowest set bit (0 when none).
            scenario = np.select([rules & 1 > 0, rules & 2 > 0, rules & 4 > 0], [1, 2, 3], 0)
            cents = np.where(
                raw.multiplied, raw.genuine_cents * CUSTOMER_MULTIPLIER, raw.genuine_cents
            )
            yield DayBatch(
                day=day,
                first_index=next_index,
                ts=raw.ts,
                customer=raw.customer,
                terminal=raw.terminal,
                genuine_cents=raw.genuine_cents,
                cents=cents,
                rules=rules.astype(np.int8),
                scenario=scenario.astype(np.int8),
            )
            next_index += len(raw.ts)

    # -- events ----------------------------------------------------------------------------
    def events(self) -> Iterator[GeneratedEvent]:
        """Payments and their labels, merged in non-decreasing ``ts`` order.

        Labels are the payments shifted by a constant delay, so both streams are sorted; each
        day's payments are merged with the labels due before the day's end (a stable sort with
        payments first, so on equal ts - or a zero delay - a payment precedes its label).
        """
        delay = self.cfg.label_delay_ms
        users = [f"c{c}" for c in range(self.cfg.customers)]
        cards = [f"card-c{c}" for c in range(self.cfg.customers)]
        merchants = [f"t{t}" for t in range(self.cfg.terminals)]
        labels = _LabelQueue()
        for batch in self.batches():
            labels.push(batch, delay)
            day_end = self.cfg.start_ms + (batch.day + 1) * DAY_MS
            yield from _merged(batch, labels.pop_before(day_end), users, cards, merchants)
        yield from _merged(None, labels.pop_before(None), users, cards, merchants)


@dataclass(slots=True)
class _Labels:
    """Columns of labels: transaction index, label ts, customer, fraud (0/1)."""

    index: IntArray
    ts: IntArray
    customer: IntArray
    fraud: BoolArray


@dataclass(slots=True)
class _LabelQueue:
    """Labels not yet emitted, oldest first (each part sorted by ts, parts in order)."""

    parts: deque[_Labels] = field(default_factory=deque)

    def push(self, batch: DayBatch, delay_ms: int) -> None:
        index = batch.first_index + np.arange(len(batch), dtype=np.int64)
        self.parts.append(_Labels(index, batch.ts + delay_ms, batch.customer, batch.fraud))

    def pop_before(self, limit: int | None) -> _Labels:
        """Remove and return the labels with ``ts < limit`` (all of them for None)."""
        taken: list[_Labels] = []
        while self.parts:
            part = self.parts[0]
            cut = len(part.ts) if limit is None else int(np.searchsorted(part.ts, limit))
            if cut == len(part.ts):
                taken.append(self.parts.popleft())
                continue
            if cut:
                taken.append(
                    _Labels(part.index[:cut], part.ts[:cut], part.customer[:cut], part.fraud[:cut])
                )
                self.parts[0] = _Labels(
                    part.index[cut:], part.ts[cut:], part.customer[cut:], part.fraud[cut:]
                )
            break
        if not taken:
            empty = np.zeros(0, dtype=np.int64)
            return _Labels(empty, empty, empty, np.zeros(0, dtype=np.bool_))
        return _Labels(
            np.concatenate([p.index for p in taken]),
            np.concatenate([p.ts for p in taken]),
            np.concatenate([p.customer for p in taken]),
            np.concatenate([p.fraud for p in taken]),
        )


def _merged(
    batch: DayBatch | None,
    labels: _Labels,
    users: list[str],
    cards: list[str],
    merchants: list[str],
) -> Iterator[GeneratedEvent]:
    """One day's payments and the given labels as events, in ts order."""
    n_pay = 0 if batch is None else len(batch)
    pay_ts: IntArray = np.zeros(0, dtype=np.int64) if batch is None else batch.ts
    order = np.argsort(np.concatenate([pay_ts, labels.ts]), kind="stable").tolist()
    # Python lists: per-element access to numpy arrays would dominate the run time.
    if batch is not None:
        p_ts = batch.ts.tolist()
        p_cust = batch.customer.tolist()
        p_term = batch.terminal.tolist()
        p_cents = batch.cents.tolist()
        p_scen = batch.scenario.tolist()
        first = batch.first_index
    l_index = labels.index.tolist()
    l_ts = labels.ts.tolist()
    l_cust = labels.customer.tolist()
    l_fraud = labels.fraud.tolist()
    names = SCENARIO_NAMES
    for k in order:
        if k < n_pay:
            c = p_cust[k]
            ts = p_ts[k]
            user = users[c]
            value: dict[str, Any] = {
                "event_id": f"hb-{first + k}",
                "ts": ts,
                "user_id": user,
                "card_id": cards[c],
                "merchant_id": merchants[p_term[k]],
                "amount": p_cents[k] / 100,  # int / 100 is the correctly rounded decimal
                "currency": "EUR",
            }
            yield GeneratedEvent(PAYMENTS, user, value, ts, names.get(p_scen[k]))
        else:
            j = k - n_pay
            c = l_cust[j]
            ts = l_ts[j]
            user = users[c]
            i = l_index[j]
            value = {
                "event_id": f"hbl-{i}",
                "ts": ts,
                "user_id": user,
                "txn_id": f"hb-{i}",
                "label": "fraud" if l_fraud[j] else "legit",
                "source": "handbook",
            }
            yield GeneratedEvent(FRAUD_LABELS, user, value, ts)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def simulate_handbook(config: HandbookConfig) -> Iterator[GeneratedEvent]:
    """Payments and labels of the handbook simulator, in non-decreasing ``ts`` order (lazy).

    Fraud payments carry their scenario name (:data:`SCENARIO_NAMES`) in ``scenario``;
    legitimate payments and all labels carry None.
    """
    return HandbookSimulator(config).events()


@dataclass(frozen=True)
class HandbookSummary:
    """What a handbook run contains (computed from the day arrays, no events built)."""

    transactions: int
    frauds: int
    #: Scenario name -> frauds attributed to it (first match in rule order; sums to frauds).
    per_scenario: dict[str, int]
    #: Scenario name -> transactions its rule matched (overlapping).
    matches: dict[str, int]
    customers_without_terminals: int
    mean_terminals_per_customer: float

    @property
    def fraud_share(self) -> float:
        return self.frauds / self.transactions if self.transactions else 0.0

    def format(self) -> str:
        per = ", ".join(f"{name}={n}" for name, n in self.per_scenario.items())
        both = ", ".join(f"{name}={n}" for name, n in self.matches.items())
        return (
            f"{self.transactions} tx, {self.frauds} fraud ({self.fraud_share:.2%}); "
            f"by scenario: {per}; rule matches: {both}; "
            f"{self.mean_terminals_per_customer:.1f} terminals per customer, "
            f"{self.customers_without_terminals} customers without any"
        )


def handbook_summary(config: HandbookConfig) -> HandbookSummary:
    """Counts of a full run: transactions, frauds, share, frauds per scenario."""
    sim = HandbookSimulator(config)
    transactions = 0
    per_scenario = dict.fromkeys(SCENARIO_NAMES.values(), 0)
    matches = dict.fromkeys(SCENARIO_NAMES.values(), 0)
    for batch in sim.batches():
        transactions += len(batch)
        scenario_counts = np.bincount(batch.scenario, minlength=4)
        for rule, name in SCENARIO_NAMES.items():
            per_scenario[name] += int(scenario_counts[rule])
            matches[name] += int(np.count_nonzero(batch.rules & (1 << (rule - 1))))
    return HandbookSummary(
        transactions=transactions,
        frauds=sum(per_scenario.values()),
        per_scenario=per_scenario,
        matches=matches,
        customers_without_terminals=int(np.count_nonzero(sim.n_available == 0)),
        mean_terminals_per_customer=float(sim.n_available.mean()),
    )
