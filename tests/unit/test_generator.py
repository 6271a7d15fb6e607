"""The simulator: determinism, contract validity, ordering, labels, scenarios, journeys."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from infra.generator import (
    DAY_MS,
    DEFAULT_START_MS,
    EU,
    FX_USD_PER_UNIT,
    MINUTE_MS,
    SCENARIOS,
    SHIPMENT_TRANSITIONS,
    GeneratedEvent,
    GeneratorConfig,
    generate_command,
    generate_to_list,
    parse_start,
    simulate,
    to_local,
)
from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import CLICKS, FRAUD_LABELS, INPUT_MODELS, LOGISTICS, PAYMENTS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = GeneratorConfig(users=400, days=21, seed=7, fraud_rate=0.03)


@pytest.fixture(scope="module")
def events() -> list[GeneratedEvent]:
    return generate_to_list(CONFIG)


@pytest.fixture(scope="module")
def by_topic(events: list[GeneratedEvent]) -> dict[str, list[GeneratedEvent]]:
    grouped: dict[str, list[GeneratedEvent]] = defaultdict(list)
    for event in events:
        grouped[event.topic].append(event)
    return grouped


def digest(events: list[GeneratedEvent]) -> str:
    h = hashlib.sha256()
    for event in events:
        h.update(orjson.dumps([event.topic, event.key, event.value, event.ts, event.scenario]))
    return h.hexdigest()


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_same_events_and_other_seed_differs() -> None:
    config = GeneratorConfig(users=60, days=3, seed=3)
    first = generate_to_list(config)
    assert first == generate_to_list(config)
    assert digest(first) != digest(generate_to_list(GeneratorConfig(users=60, days=3, seed=4)))


def test_determinism_does_not_depend_on_hash_randomisation() -> None:
    """A set or dict-of-str iteration order leaking into the draws would break this."""
    config = GeneratorConfig(users=40, days=2, seed=5)
    code = (
        "from infra.generator import GeneratorConfig, generate_to_list\n"
        "from tests.unit.test_generator import digest\n"
        "print(digest(generate_to_list(GeneratorConfig(users=40, days=2, seed=5))))\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout.strip())
    assert outputs == {digest(generate_to_list(config))}


def test_max_events_is_a_prefix_of_the_full_run() -> None:
    full = generate_to_list(GeneratorConfig(users=50, days=2, seed=1))
    capped = generate_to_list(GeneratorConfig(users=50, days=2, seed=1, max_events=500))
    assert capped == full[:500]
    assert generate_to_list(GeneratorConfig(users=50, days=2, seed=1, max_events=0)) == []


def test_simulate_is_lazy() -> None:
    """Ten years of events (minutes to generate) are not drawn before the first one is used."""
    stream = simulate(GeneratorConfig(users=200, days=3650))
    assert next(stream).topic == CLICKS  # no payment precedes the first click


# -- the contract -----------------------------------------------------------------------------


def test_every_value_validates_against_its_topic_model(events: list[GeneratedEvent]) -> None:
    for event in events:
        model = INPUT_MODELS[event.topic].model_validate(event.value)
        assert model.ts == event.ts
        assert event.key == model.user_id
        # Ground truth never travels inside the value.
        assert "scenario" not in event.value and "is_fraud" not in event.value


def test_ts_non_decreasing_and_inside_the_period(events: list[GeneratedEvent]) -> None:
    ts = [e.ts for e in events]
    assert all(a <= b for a, b in zip(ts, ts[1:], strict=False))
    assert CONFIG.start_ms <= ts[0] and ts[-1] < CONFIG.end_ms


def test_event_ids_unique_per_topic(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    for topic_events in by_topic.values():
        ids = [e.value["event_id"] for e in topic_events]
        assert len(ids) == len(set(ids))


def test_mix_is_dominated_by_clicks(events: list[GeneratedEvent]) -> None:
    share = Counter(e.topic for e in events)[CLICKS] / len(events)
    assert 0.80 <= share <= 0.92


# -- users, markets, prices -------------------------------------------------------------------


def test_at_least_ten_countries_with_their_currency_and_language(
    by_topic: dict[str, list[GeneratedEvent]],
) -> None:
    clicks = [e.value for e in by_topic[CLICKS]]
    countries = {v["country"] for v in clicks}
    assert len(countries) >= 10
    pairs = {(v["country"], v["currency"], v["lang"]) for v in clicks}
    assert ("JP", "JPY", "ja") in pairs and ("BR", "BRL", "pt") in pairs
    assert len({p[0] for p in pairs}) == len(pairs)  # one currency/language per country
    assert any(v["personalisation"] is False for v in clicks)
    assert {v["device"] for v in clicks} >= {"ios", "android", "web-desktop"}


def test_prices_follow_the_fx_table(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    usd: dict[str, float] = {}
    eur: dict[str, float] = {}
    for event in by_topic[CLICKS]:
        value = event.value
        if value.get("price") is not None:
            {"USD": usd, "EUR": eur}.get(value["currency"], {})[value["item_id"]] = value["price"]
    common = set(usd) & set(eur)
    assert len(common) > 20
    for item in common:
        assert eur[item] == to_local(usd[item], "EUR")
    assert to_local(10.0, "JPY") == round(10.0 / FX_USD_PER_UNIT["JPY"])


def test_sessions_have_learnable_structure(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    """Consecutive views mostly stay in a category (12 categories: ~8% by chance)."""
    last: dict[str, str] = {}
    same = total = 0
    for event in by_topic[CLICKS]:
        value = event.value
        if value["type"] != "view":
            continue
        previous = last.get(value["session_id"])
        if previous is not None:
            total += 1
            same += previous == value["category"]
        last[value["session_id"]] = value["category"]
    assert total > 1000 and same / total > 0.6


def test_item_popularity_is_skewed(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    views = Counter(e.value["item_id"] for e in by_topic[CLICKS] if e.value["type"] == "view")
    counts = sorted(views.values(), reverse=True)
    top = sum(counts[: max(1, len(counts) // 10)])
    assert top / sum(counts) > 0.3  # the top 10% of items get well over 10% of the views


# -- funnels and sessions ---------------------------------------------------------------------


def test_funnel_order_per_session(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    viewed: dict[str, set[str]] = defaultdict(set)
    cart: dict[str, set[str]] = defaultdict(set)
    owner: dict[str, str] = {}
    purchases = 0
    for event in by_topic[CLICKS]:
        v = event.value
        session = v["session_id"]
        assert owner.setdefault(session, v["user_id"]) == v["user_id"]
        kind, item = v["type"], v.get("item_id")
        if kind == "search":
            assert v["query"]
        elif kind == "view":
            viewed[session].add(item)
        elif kind == "add_to_cart":
            assert item in viewed[session], "added to cart before viewing"
            cart[session].add(item)
        elif kind == "remove_from_cart":
            assert item in cart[session], "removed an item that was not in the cart"
            cart[session].discard(item)
        elif kind == "purchase":
            assert item in cart[session], "bought an item that was not in the cart"
            purchases += 1
    assert purchases > 100


def test_each_purchase_session_has_one_payment(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    orders = {e.value.get("order_id") for e in by_topic[PAYMENTS]} - {None}
    assert len(orders) == sum(1 for e in by_topic[PAYMENTS] if "order_id" in e.value)
    bought = {e.value["session_id"] for e in by_topic[CLICKS] if e.value["type"] == "purchase"}
    # One order per buying session (a payment may fall after the period's end).
    assert len(orders) <= len(bought) <= len(orders) + 5


# -- payments, fraud and labels ---------------------------------------------------------------


def test_fraud_rate_near_target_and_every_scenario_present(
    by_topic: dict[str, list[GeneratedEvent]],
) -> None:
    payments = by_topic[PAYMENTS]
    fraud = [e for e in payments if e.scenario is not None]
    assert abs(len(fraud) / len(payments) - CONFIG.fraud_rate) < 0.01
    assert {e.scenario for e in fraud} == set(SCENARIOS)


def test_default_fraud_rate_and_zero() -> None:
    payments = [
        e for e in generate_to_list(GeneratorConfig(users=500, days=10)) if e.topic == PAYMENTS
    ]
    share = sum(e.scenario is not None for e in payments) / len(payments)
    assert 0.01 <= share <= 0.03
    clean = generate_to_list(GeneratorConfig(users=100, days=5, fraud_rate=0.0))
    assert not any(e.scenario for e in clean)


def test_scenarios_look_like_their_description(
    by_topic: dict[str, list[GeneratedEvent]],
) -> None:
    payments = by_topic[PAYMENTS]
    by_scenario: dict[str | None, list[dict]] = defaultdict(list)
    for event in payments:
        by_scenario[event.scenario].append(event.value)

    # Card testing: bursts of tiny amounts on one card within minutes, then a large one.
    testing = defaultdict(list)
    for v in by_scenario["card_testing"]:
        testing[v["card_id"]].append(v)
    for burst in testing.values():
        usd = [v["amount"] * FX_USD_PER_UNIT[v["currency"]] for v in burst]
        assert sum(u <= 3.5 for u in usd) >= 4 and max(usd) > 100
        tiny_ts = [v["ts"] for v, u in zip(burst, usd, strict=True) if u <= 3.5]
        assert max(tiny_ts) - min(tiny_ts) < 15 * MINUTE_MS
        assert all("order_id" not in v for v, u in zip(burst, usd, strict=True) if u <= 3.5)

    # Compromised cards: used by an account other than the card's owner, from abroad.
    owners: dict[str, set[str]] = defaultdict(set)
    for v in by_scenario[None]:
        owners[v["card_id"]].add(v["user_id"])
    for v in by_scenario["compromised_card"]:
        assert v["user_id"] not in owners[v["card_id"]]
        assert v["ip_country"] != v["billing_country"]

    # Geo mismatch: the user's own billing country, shipped and connected from elsewhere.
    for v in by_scenario["geo_mismatch"]:
        assert v["billing_country"] != v["shipping_country"]
        assert v["billing_country"] != v["ip_country"]

    # Amount spikes: several times the user's usual legit amount.
    usual: dict[str, list[float]] = defaultdict(list)
    for v in by_scenario[None]:
        usual[v["user_id"]].append(v["amount"])
    ratios = [
        v["amount"] / statistics.median(usual[v["user_id"]])
        for v in by_scenario["amount_spike"]
        if usual[v["user_id"]]
    ]
    assert ratios and statistics.median(ratios) >= 3

    # Compromised merchants: fraud at a merchant clusters in time.
    merchants = Counter(v["merchant_id"] for v in by_scenario["compromised_merchant"])
    assert merchants.most_common(1)[0][1] >= 2


def test_labels_follow_their_payments(by_topic: dict[str, list[GeneratedEvent]]) -> None:
    payments = {e.value["event_id"]: e for e in by_topic[PAYMENTS]}
    labels: dict[str, GeneratedEvent] = {}
    for event in by_topic[FRAUD_LABELS]:
        v = event.value
        assert v["txn_id"] not in labels, "one label per transaction"
        labels[v["txn_id"]] = event
        payment = payments[v["txn_id"]]
        assert v["user_id"] == payment.value["user_id"]
        delay = event.ts - payment.ts
        if payment.scenario is None:
            assert (v["label"], v["source"]) == ("legit", "settlement")
            settlement = int(CONFIG.settlement_delay_days * DAY_MS)
            assert settlement <= delay < settlement + 30 * MINUTE_MS
        else:
            assert (v["label"], v["source"]) == ("fraud", "chargeback")
            assert DAY_MS <= delay <= 14 * DAY_MS
    label_ids = {e.value["event_id"] for e in by_topic[FRAUD_LABELS]}
    assert not label_ids & set(payments)
    # Every payment whose label is due inside the period has it.
    for txn, payment in payments.items():
        due = 14 * DAY_MS if payment.scenario else CONFIG.settlement_delay_days * DAY_MS + 1
        if payment.ts + due + 30 * MINUTE_MS < CONFIG.end_ms:
            assert txn in labels, f"{txn} ({payment.scenario}) has no label"


def test_no_label_precedes_its_payment_in_the_stream(events: list[GeneratedEvent]) -> None:
    seen: set[str] = set()
    for event in events:
        if event.topic == PAYMENTS:
            seen.add(event.value["event_id"])
        elif event.topic == FRAUD_LABELS:
            assert event.value["txn_id"] in seen


def test_settlement_delay_is_configurable() -> None:
    config = GeneratorConfig(users=80, days=6, seed=2, settlement_delay_days=2)
    events = generate_to_list(config)
    payments = {e.value["event_id"]: e.ts for e in events if e.topic == PAYMENTS}
    delays = [
        e.ts - payments[e.value["txn_id"]]
        for e in events
        if e.topic == FRAUD_LABELS and e.value["label"] == "legit"
    ]
    assert delays and all(2 * DAY_MS <= d < 2 * DAY_MS + 30 * MINUTE_MS for d in delays)


# -- logistics --------------------------------------------------------------------------------


def test_shipment_journeys_are_valid_and_in_time_order(
    by_topic: dict[str, list[GeneratedEvent]],
) -> None:
    payments = {e.value["order_id"]: e for e in by_topic[PAYMENTS] if "order_id" in e.value}
    journeys: dict[str, list[dict]] = defaultdict(list)
    for event in by_topic[LOGISTICS]:
        journeys[event.value["order_id"]].append(event.value)
    assert len(journeys) > 100
    statuses: Counter[str] = Counter()
    for order, scans in journeys.items():
        payment = payments[order]
        assert scans[0]["status"] == "created" and scans[0]["ts"] >= payment.ts
        for before, after in zip(scans, scans[1:], strict=False):
            assert after["status"] in SHIPMENT_TRANSITIONS[before["status"]], [
                s["status"] for s in scans
            ]
            assert before["ts"] <= after["ts"]
        first = scans[0]
        assert all(s["promised_ts"] == first["promised_ts"] for s in scans)
        assert first["promised_ts"] > payment.ts + DAY_MS
        assert all(s["carrier"] == first["carrier"] for s in scans)
        assert first["dest_country"] == payment.value.get("shipping_country")
        origin, dest = first["origin_country"], first["dest_country"]
        names = [s["status"] for s in scans]
        customs = origin != dest and not (origin in EU and dest in EU)
        if not customs:
            assert "customs_cleared" not in names and "customs_hold" not in names
        elif "out_for_delivery" in names:
            assert "customs_cleared" in names
        statuses.update(names)
    for status in ("delivered", "customs_hold", "customs_cleared", "failed_attempt"):
        assert statuses[status] > 0, status


def test_cross_border_takes_longer_than_domestic(
    by_topic: dict[str, list[GeneratedEvent]],
) -> None:
    created: dict[str, int] = {}
    durations: dict[bool, list[float]] = defaultdict(list)
    for event in by_topic[LOGISTICS]:
        v = event.value
        if v["status"] == "created":
            created[v["order_id"]] = v["ts"]
        elif v["status"] == "delivered" and v["order_id"] in created:
            cross = v["origin_country"] != v["dest_country"]
            durations[cross].append((v["ts"] - created[v["order_id"]]) / DAY_MS)
    assert statistics.median(durations[True]) > statistics.median(durations[False]) + 2


# -- config and CLI ---------------------------------------------------------------------------


def test_parse_start() -> None:
    assert parse_start("2026-01-01") == DEFAULT_START_MS
    assert parse_start("2026-01-01T01:00:00+01:00") == DEFAULT_START_MS
    assert parse_start("2026-01-01T00:00:00Z") == DEFAULT_START_MS
    with pytest.raises(BorderflowError):
        parse_start("tomorrow")


def test_config_rejects_nonsense() -> None:
    with pytest.raises(BorderflowError):
        GeneratorConfig(fraud_rate=0.7)
    with pytest.raises(BorderflowError):
        GeneratorConfig(days=0)


def test_generate_command_writes_jsonl_envelopes(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    args = ["--users", "30", "--days", "2", "--seed", "9", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(generate_command, args, obj=Settings())
    assert result.exit_code == 0, result.output
    assert result.output.startswith("generated ") and "fraud payments=" in result.output
    lines = out.read_bytes().splitlines()
    expected = generate_to_list(GeneratorConfig(users=30, days=2, seed=9))
    assert len(lines) == len(expected)
    for line, event in zip(lines, expected, strict=True):
        assert orjson.loads(line) == {"topic": event.topic, "key": event.key, "value": event.value}
