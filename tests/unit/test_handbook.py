"""The handbook simulator: determinism, contract, ordering, fraud rules, labels, statistics, CLI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from infra.generator import DAY_MS, GeneratedEvent, generate_command
from infra.handbook import (
    CUSTOMER_WINDOW_DAYS,
    HANDBOOK_START_MS,
    HIGH_AMOUNT_CENTS,
    SCENARIO_NAMES,
    TERMINAL_WINDOW_DAYS,
    DayBatch,
    HandbookConfig,
    HandbookSimulator,
    handbook_summary,
    simulate_handbook,
)
from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import FRAUD_LABELS, INPUT_MODELS, PAYMENTS

#: The statistical-sanity size of the brief: big enough for stable means, a few k payments.
SMALL = HandbookConfig(customers=200, terminals=400, days=30, seed=3)
#: P(0 < N(43200, 20000) < 86400): the share of drawn transactions whose time is kept.
KEPT_TIME_SHARE = 0.96923


@pytest.fixture(scope="module")
def events() -> list[GeneratedEvent]:
    return list(simulate_handbook(SMALL))


@pytest.fixture(scope="module")
def run() -> tuple[HandbookSimulator, list[DayBatch]]:
    sim = HandbookSimulator(SMALL)
    return sim, list(sim.batches())


def _columns(batches: list[DayBatch]) -> dict[str, np.ndarray]:
    """The run's transactions as whole-period columns (plus each one's day)."""
    cols = {
        name: np.concatenate([getattr(b, name) for b in batches])
        for name in ("ts", "customer", "terminal", "genuine_cents", "cents", "rules", "scenario")
    }
    cols["day"] = np.concatenate([np.full(len(b), b.day) for b in batches])
    return cols


# -- determinism and contract ------------------------------------------------------------------


def test_same_seed_same_events_other_seed_other_events(events: list[GeneratedEvent]) -> None:
    assert list(simulate_handbook(SMALL)) == events
    other = list(simulate_handbook(HandbookConfig(customers=200, terminals=400, days=30, seed=4)))
    assert other[:50] != events[:50]


def test_a_simulator_replays_identically() -> None:
    sim = HandbookSimulator(HandbookConfig(customers=60, terminals=120, days=8, seed=1))
    first = [(b.ts.tolist(), b.cents.tolist()) for b in sim.batches()]
    assert first == [(b.ts.tolist(), b.cents.tolist()) for b in sim.batches()]


def test_every_value_validates_against_the_contract(events: list[GeneratedEvent]) -> None:
    topics = Counter(e.topic for e in events)
    assert set(topics) == {PAYMENTS, FRAUD_LABELS}
    assert topics[PAYMENTS] == topics[FRAUD_LABELS] > 1000
    for event in events:
        model = INPUT_MODELS[event.topic].model_validate(event.value)
        assert event.key == event.value["user_id"] == model.user_id
        assert event.ts == event.value["ts"] == model.ts
    payment = next(e.value for e in events if e.topic == PAYMENTS)
    assert payment["currency"] == "EUR"
    assert payment["card_id"] == "card-" + payment["user_id"]
    assert set(payment) == {
        "event_id", "ts", "user_id", "card_id", "merchant_id", "amount", "currency"
    }  # fmt: skip


def test_ids_follow_the_mapping_and_count_in_ts_order(events: list[GeneratedEvent]) -> None:
    payments = [e.value for e in events if e.topic == PAYMENTS]
    assert [p["event_id"] for p in payments] == [f"hb-{i}" for i in range(len(payments))]
    for p in payments[:200]:
        assert p["user_id"][0] == "c" and p["user_id"][1:].isdigit()
        assert p["merchant_id"][0] == "t" and p["merchant_id"][1:].isdigit()
        assert round(p["amount"], 2) == p["amount"] > 0


def test_events_are_in_ts_order_and_payments_inside_the_period(
    events: list[GeneratedEvent],
) -> None:
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    pay_ts = [e.ts for e in events if e.topic == PAYMENTS]
    assert SMALL.start_ms <= min(pay_ts) and max(pay_ts) < SMALL.end_ms
    # The last week's labels fall after the period and are still emitted (documented).
    label_ts = [e.ts for e in events if e.topic == FRAUD_LABELS]
    assert max(label_ts) >= SMALL.end_ms and max(label_ts) < SMALL.label_end_ms


def test_scenario_is_carried_beside_fraud_payments_only(events: list[GeneratedEvent]) -> None:
    label_of = {e.value["txn_id"]: e.value["label"] for e in events if e.topic == FRAUD_LABELS}
    for event in events:
        if event.topic == FRAUD_LABELS:
            assert event.scenario is None
        else:
            fraud = label_of[event.value["event_id"]] == "fraud"
            assert (event.scenario is not None) == fraud
            assert event.scenario is None or event.scenario in SCENARIO_NAMES.values()
            assert "scenario" not in event.value and "fraud" not in event.value


def test_events_match_the_day_batches(
    events: list[GeneratedEvent], run: tuple[HandbookSimulator, list[DayBatch]]
) -> None:
    cols = _columns(run[1])
    payments = [e for e in events if e.topic == PAYMENTS]
    assert len(payments) == len(cols["ts"])
    assert [p.ts for p in payments] == cols["ts"].tolist()
    assert [p.value["amount"] for p in payments] == (cols["cents"] / 100).tolist()
    assert [p.value["merchant_id"] for p in payments] == [f"t{t}" for t in cols["terminal"]]
    names = [SCENARIO_NAMES.get(s) for s in cols["scenario"].tolist()]
    assert [p.scenario for p in payments] == names


# -- labels --------------------------------------------------------------------------------


def test_each_payment_has_exactly_one_label_seven_days_later(
    events: list[GeneratedEvent],
) -> None:
    payments = {e.value["event_id"]: e for e in events if e.topic == PAYMENTS}
    labels = [e for e in events if e.topic == FRAUD_LABELS]
    assert Counter(e.value["txn_id"] for e in labels) == Counter(dict.fromkeys(payments, 1))
    for label in labels:
        payment = payments[label.value["txn_id"]]
        assert label.ts == payment.ts + 7 * DAY_MS
        assert label.value["user_id"] == payment.value["user_id"]
        assert label.value["event_id"] == "hbl-" + payment.value["event_id"][3:]
        assert label.value["source"] == "handbook"
        assert label.value["label"] == ("legit" if payment.scenario is None else "fraud")


def test_zero_label_delay_puts_each_label_right_after_its_payment() -> None:
    config = HandbookConfig(customers=40, terminals=80, days=4, seed=2, label_delay_days=0.0)
    seen: set[str] = set()
    for event in simulate_handbook(config):
        if event.topic == PAYMENTS:
            seen.add(event.value["event_id"])
        else:
            assert event.value["txn_id"] in seen


# -- fraud rules ---------------------------------------------------------------------------


def test_fraud_is_exactly_the_union_of_the_rules(
    run: tuple[HandbookSimulator, list[DayBatch]],
) -> None:
    cols = _columns(run[1])
    rules, scenario = cols["rules"], cols["scenario"]
    assert np.array_equal(scenario > 0, rules > 0)
    # The attribution is the first matching rule in the order 1, 2, 3.
    first = np.where(rules & 1, 1, np.where(rules & 2, 2, np.where(rules & 4, 3, 0)))
    assert np.array_equal(scenario, first)
    assert set(np.unique(scenario).tolist()) == {0, 1, 2, 3}


def test_rule_1_every_amount_above_220_is_fraud(
    events: list[GeneratedEvent], run: tuple[HandbookSimulator, list[DayBatch]]
) -> None:
    above = [e for e in events if e.topic == PAYMENTS and e.value["amount"] > 220]
    assert above  # rule 3's x5 alone makes some
    assert all(e.scenario is not None for e in above)
    cols = _columns(run[1])
    high = cols["genuine_cents"] > HIGH_AMOUNT_CENTS
    assert np.array_equal(high, (cols["rules"] & 1) > 0)
    assert np.all(cols["scenario"][high] == 1)


def test_rule_2_every_tx_on_a_compromised_terminal_within_28_days_is_fraud(
    run: tuple[HandbookSimulator, list[DayBatch]],
) -> None:
    sim, batches = run
    cols = _columns(batches)
    assert len(sim.compromised_terminals) == 2 * SMALL.days
    in_window = np.zeros(len(cols["ts"]), dtype=bool)
    for day, terminal in sim.compromised_terminals:
        hit = (
            (cols["terminal"] == terminal)
            & (cols["day"] >= day)
            & (cols["day"] < day + TERMINAL_WINDOW_DAYS)
        )
        assert np.all(cols["scenario"][hit] > 0)
        in_window |= hit
    assert in_window.any()
    # ...and rule 2 matches nothing else.
    assert np.array_equal(in_window, (cols["rules"] & 2) > 0)
    for day in range(SMALL.days):  # 2 distinct terminals a day
        assert len({t for d, t in sim.compromised_terminals if d == day}) == 2


def test_rule_3_multiplies_a_third_of_a_compromised_customers_window_by_5(
    run: tuple[HandbookSimulator, list[DayBatch]],
) -> None:
    sim, batches = run
    cols = _columns(batches)
    multiplied = (cols["rules"] & 4) > 0
    assert multiplied.any()
    assert np.array_equal(cols["cents"][multiplied], 5 * cols["genuine_cents"][multiplied])
    assert np.array_equal(cols["cents"][~multiplied], cols["genuine_cents"][~multiplied])
    assert np.all(cols["scenario"][multiplied] > 0)
    s3 = cols["scenario"] == 3
    assert s3.any() and np.all(multiplied[s3])
    assert len(sim.compromised_customers) == 3 * SMALL.days
    windows: dict[int, list[int]] = {}
    for day, customer in sim.compromised_customers:
        windows.setdefault(customer, []).append(day)
    covered = np.zeros(len(cols["ts"]), dtype=bool)
    checked = 0
    for customer, days in windows.items():
        mine = cols["customer"] == customer
        for day in days:
            window = mine & (cols["day"] >= day) & (cols["day"] < day + CUSTOMER_WINDOW_DAYS)
            covered |= window
            if len(days) == 1:  # no overlapping compromise: exactly n // 3 of the window
                n = int(window.sum())
                assert int((window & multiplied).sum()) == n // 3
                checked += 1
    assert checked > 20
    assert not np.any(multiplied & ~covered)  # only compromised windows are touched


def test_customers_only_use_terminals_within_the_radius(events: list[GeneratedEvent]) -> None:
    sim = HandbookSimulator(SMALL)
    pairs = {
        (int(e.value["user_id"][1:]), int(e.value["merchant_id"][1:]))
        for e in events
        if e.topic == PAYMENTS
    }
    customers = np.array([c for c, _ in pairs])
    terminals = np.array([t for _, t in pairs])
    distance = np.hypot(*(sim.customer_xy[customers] - sim.terminal_xy[terminals]).T)
    assert distance.max() < SMALL.radius
    # The CSR table is exactly the within-radius set.
    c = 17
    all_d = np.hypot(*(sim.terminal_xy - sim.customer_xy[c]).T)
    start, end = sim.available_offsets[c], sim.available_offsets[c + 1]
    assert sim.available[start:end].tolist() == np.flatnonzero(all_d < SMALL.radius).tolist()


def test_tiny_world_one_terminal_compromised_every_day() -> None:
    config = HandbookConfig(customers=2, terminals=1, days=5, seed=0, radius=200.0)
    batches = list(HandbookSimulator(config).batches())
    assert sum(len(b) for b in batches) > 0
    assert all(np.all(b.terminal == 0) and np.all(b.scenario > 0) for b in batches)


# -- statistics ----------------------------------------------------------------------------


def test_transaction_counts_match_the_profiles(
    run: tuple[HandbookSimulator, list[DayBatch]],
) -> None:
    sim, batches = run
    cols = _columns(batches)
    active = sim.n_available > 0
    assert 0.8 < active.mean() < 1.0  # ~3 terminals per customer here: a few have none
    per_day = len(cols["ts"]) / active.sum() / SMALL.days
    # U(0,4) averages 2, minus the ~3% of times discarded; 200 customers: sd of mean ~0.08.
    assert 2 * KEPT_TIME_SHARE - 0.3 < per_day < 2 * KEPT_TIME_SHARE + 0.3
    # Against this seed's own profiles the Poisson noise alone is ~1%.
    expected = sim.mean_nb_tx_per_day[active].sum() * SMALL.days * KEPT_TIME_SHARE
    assert abs(len(cols["ts"]) / expected - 1) < 0.04
    assert np.bincount(cols["customer"], minlength=SMALL.customers)[~active].sum() == 0


def test_amounts_and_times_follow_the_profiles(
    run: tuple[HandbookSimulator, list[DayBatch]],
) -> None:
    sim, batches = run
    cols = _columns(batches)
    ratio = cols["genuine_cents"] / 100 / sim.mean_amount[cols["customer"]]
    # N(mean, mean/2), negatives redrawn in U(0, 2 mean): the ratio averages ~1.
    assert 0.95 < ratio.mean() < 1.05
    assert cols["genuine_cents"].min() >= 1
    seconds = (cols["ts"] - SMALL.start_ms) % DAY_MS / 1000
    assert 42_000 < seconds.mean() < 44_400
    # N(43200, 20000) cut at +-2.16 sd keeps ~91% of the sd: ~18,190 s.
    assert 17_600 < seconds.std() < 18_800


def test_fraud_share_is_plausible_for_the_size(events: list[GeneratedEvent]) -> None:
    payments = [e for e in events if e.topic == PAYMENTS]
    share = sum(e.scenario is not None for e in payments) / len(payments)
    # The daily compromise counts are fixed (2 terminals, 3 customers) whatever the size, so
    # a small world is far more fraudulent than the published 0.84%: here ~8% of terminal-
    # days are compromised and ~5% of the payments are rule-3 frauds, so about 13% overall.
    assert 0.07 < share < 0.22
    by = Counter(e.scenario for e in payments if e.scenario is not None)
    assert by["compromised_terminal"] > by["high_amount"] > 0
    assert by["compromised_customer"] > by["high_amount"]


def test_summary_agrees_with_the_events(events: list[GeneratedEvent]) -> None:
    summary = handbook_summary(SMALL)
    payments = [e for e in events if e.topic == PAYMENTS]
    assert summary.transactions == len(payments)
    by = Counter(e.scenario for e in payments if e.scenario is not None)
    assert summary.per_scenario == {name: by[name] for name in SCENARIO_NAMES.values()}
    assert summary.frauds == sum(by.values())
    assert summary.fraud_share == pytest.approx(summary.frauds / len(payments))
    assert all(summary.matches[n] >= summary.per_scenario[n] for n in summary.matches)
    assert "tx" in summary.format()


# -- config and CLI ------------------------------------------------------------------------


def test_config_defaults_are_the_published_size() -> None:
    config = HandbookConfig()
    assert (config.customers, config.terminals, config.days) == (5000, 10_000, 183)
    assert config.start_ms == HANDBOOK_START_MS == 1_522_540_800_000  # 2018-04-01T00:00:00Z
    assert config.label_delay_ms == 7 * DAY_MS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"customers": 0},
        {"terminals": 0},
        {"days": 0},
        {"days": 2.5},
        {"seed": -1},
        {"radius": 0.0},
        {"radius": float("nan")},
        {"label_delay_days": -1.0},
        {"start_ms": 0},
        {"customers": 10_000_000, "terminals": 10_000_000},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(BorderflowError):
        HandbookConfig(**kwargs)  # type: ignore[arg-type]


def _envelopes(events: list[GeneratedEvent]) -> list[dict[str, object]]:
    return [{"topic": e.topic, "key": e.key, "value": e.value} for e in events]


def test_generate_command_writes_a_handbook_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "handbook.jsonl"
    args = ["--scenario", "handbook", "--customers", "50", "--terminals", "100", "--days", "10"]
    result = CliRunner().invoke(generate_command, [*args, "--out", str(out)], obj=Settings())
    assert result.exit_code == 0, result.output
    assert result.output.startswith("generated ") and "logistics=0" in result.output
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    expected = list(simulate_handbook(HandbookConfig(customers=50, terminals=100, days=10)))
    assert lines and lines == _envelopes(expected)
    assert {line["topic"] for line in lines} == {PAYMENTS, FRAUD_LABELS}


def test_generate_command_handbook_options(tmp_path: Path) -> None:
    out = tmp_path / "cut.jsonl"
    base = ["--scenario", "handbook", "--customers", "30", "--terminals", "60", "--days", "3"]
    args = [*base, "--seed", "5", "--start", "2024-01-01", "--settlement-days", "2"]
    result = CliRunner().invoke(
        generate_command, [*args, "--max-events", "25", "--out", str(out)], obj=Settings()
    )
    assert result.exit_code == 0, result.output
    config = HandbookConfig(
        customers=30,
        terminals=60,
        days=3,
        seed=5,
        start_ms=1_704_067_200_000,
        label_delay_days=2.0,
    )
    expected = list(simulate_handbook(config))[:25]
    assert [orjson.loads(line) for line in out.read_bytes().splitlines()] == _envelopes(expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "handbook", "--users", "10"], "--users does not apply"),
        (["--scenario", "handbook", "--days", "2.5"], "whole number"),
        (["--customers", "10"], "--customers does not apply"),
    ],
)
def test_generate_command_rejects_options_of_the_other_scenario(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "never.jsonl"
    result = CliRunner().invoke(generate_command, [*args, "--out", str(out)], obj=Settings())
    assert result.exit_code != 0
    assert isinstance(result.exception, BorderflowError)
    assert message in str(result.exception)
    assert not out.exists()


def test_generate_help_documents_the_handbook_scenario() -> None:
    result = CliRunner().invoke(generate_command, ["--help"], obj=Settings())
    assert result.exit_code == 0
    for text in ("--scenario", "handbook", "--customers", "--terminals", "183"):
        assert text in result.output
