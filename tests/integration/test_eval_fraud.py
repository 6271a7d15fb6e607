"""``borderflow eval fraud`` against the real ClickHouse of the local stack (isolated database).

Known rows go into ``fraud_scores`` / ``fraud_label_events``; the numbers must equal
models.evaluation on the same payments after the expected de-duplication (FINAL for a
re-scored payment, the latest label by label time for a relabelled one, whatever the order the
labels were ingested in), both through ``evaluate_fraud`` and the CLI, also after ClickHouse
has merged the label history, and ``model_metrics`` must hold what was computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from clickhouse_driver import Client

from infra.cli import cli
from infra.evaluate import evaluate_fraud
from infra.migrate import clickhouse_client, migrate
from models.evaluation import alert_metrics, average_precision, card_precision_at_k, roc_auc
from schemas.config import Settings
from schemas.errors import BorderflowError
from sinks.clickhouse import TABLE_COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAYS = [date(2026, 1, 5), date(2026, 1, 6), date(2026, 1, 7)]
#: A fourth day whose payments have no label at all: AUC/AP undefined there.
QUIET_DAY = date(2026, 1, 8)
#: The newest label's time (the relabel's chargeback), in another monthly partition.
NEWEST_LABEL = datetime(2026, 2, 10, tzinfo=UTC)


def epoch(day: date, seconds: int = 0) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) + seconds


@dataclass
class Payment:
    txn_id: str
    card: str
    ts: int
    score: float
    is_alert: int
    model_version: str
    label: str | None  # the label that must win; None: unlabelled

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.ts, UTC).date().isoformat()


def score_row(p: Payment, scored_at: int = 1_000) -> tuple[Any, ...]:
    values = {
        "txn_id": p.txn_id,
        "user_id": f"u-{p.card}",
        "card_id": p.card,
        "merchant_id": "m1",
        "ts": p.ts,
        "ts_ms": p.ts * 1000,
        "amount": 10.0,
        "currency": "EUR",
        "amount_usd": 11.0,
        "score": p.score,
        "is_alert": p.is_alert,
        "threshold": 0.8,
        "reasons": [],
        "model_version": p.model_version,
        "billing_country": "DE",
        "shipping_country": "DE",
        "ip_country": "DE",
        "scored_at": scored_at,
        "origin_country": "CN",
        "src_partition": 0,
        "src_next_offset": 0,
    }
    return tuple(values[c] for c in TABLE_COLUMNS["fraud_scores"])


def label_row(
    txn_id: str, label: str, ts: int, ingested_at: int = 2_000, event_id: str | None = None
) -> tuple[Any, ...]:
    values = {
        "event_id": event_id or f"{txn_id}:{label}:{ts}",
        "txn_id": txn_id,
        "user_id": "u",
        "label": label,
        "ts": ts,
        "ts_ms": ts * 1000,
        "source": "chargeback" if label == "fraud" else "settlement",
        "ingested_at": ingested_at,
        "src_partition": 0,
        "src_next_offset": 0,
    }
    return tuple(values[c] for c in TABLE_COLUMNS["fraud_label_events"])


def insert(client: Client, table: str, rows: list[tuple[Any, ...]]) -> None:
    columns = ", ".join(TABLE_COLUMNS[table])
    client.execute(f"INSERT INTO {table} ({columns}) VALUES", rows)


@dataclass
class Dataset:
    settings: Settings
    #: What evaluation must see: one entry per payment, the winning row and label.
    payments: list[Payment]

    def arrays(self, days: set[str] | None = None, model: str | None = None) -> dict[str, Any]:
        chosen = [
            p
            for p in self.payments
            if (days is None or p.day in days)
            and (model is None or p.model_version.split("@")[0] == model)
        ]
        return {
            "day": np.array([p.day for p in chosen]),
            "card": np.array([p.card for p in chosen]),
            "y": np.array([p.label == "fraud" for p in chosen]),
            "score": np.array([p.score for p in chosen]),
            "alert": np.array([p.is_alert for p in chosen]),
            "unlabelled": sum(p.label is None for p in chosen),
        }


@pytest.fixture
def dataset(isolated_settings: Settings) -> Iterator[Dataset]:
    migrate(isolated_settings)
    rng = np.random.default_rng(2026)
    payments = []
    for day in DAYS:
        for i in range(40):
            # Scores on a 0.05 grid: plenty of ties, which must be handled like the library.
            score = round(float(rng.integers(0, 21)) * 0.05, 2)
            fraud = rng.random() < 0.1 + 0.5 * score
            labelled = rng.random() < 0.75
            payments.append(
                Payment(
                    txn_id=f"{day:%m%d}-{i}",
                    card=f"card{rng.integers(0, 12)}",
                    ts=epoch(day, int(rng.integers(0, 86_400))),
                    score=score,
                    is_alert=int(score >= 0.8),
                    model_version="shadow-v2@3" if i % 4 == 0 else f"lr-rules-v1@{i}",
                    label=("fraud" if fraud else "legit") if labelled else None,
                )
            )
    payments += [
        Payment("quiet-1", "card1", epoch(QUIET_DAY, 100), 0.3, 0, "lr-rules-v1@99", None),
        Payment("quiet-2", "card2", epoch(QUIET_DAY, 200), 0.9, 1, "lr-rules-v1@99", None),
    ]
    # Re-scored payment: the first row (alert) is superseded by a later scored_at.
    duplicate_first = Payment("dup", "card3", epoch(DAYS[0], 500), 0.99, 1, "lr-rules-v1@1", None)
    duplicate_final = Payment("dup", "card3", epoch(DAYS[0], 500), 0.05, 0, "lr-rules-v1@2", None)
    # Relabelled payment: settled as legit in January, charged back in February.
    relabelled = Payment("relabel", "card4", epoch(DAYS[0], 600), 0.1, 0, "lr-rules-v1@5", "fraud")
    # And the other way round (a chargeback withdrawn): two directions, so picking either
    # label by storage order instead of by label time gets one of the two wrong.
    cleared = Payment("cleared", "card6", epoch(DAYS[1], 800), 0.95, 1, "lr-rules-v1@5", "legit")
    # A payment the model could not score: left out and counted.
    broken = Payment("nan", "card5", epoch(DAYS[1], 700), math.nan, 0, "lr-rules-v1@5", "fraud")

    client = clickhouse_client(isolated_settings, isolated_settings.clickhouse_database)
    try:
        insert(client, "fraud_scores", [score_row(p) for p in [*payments, duplicate_first]])
        # Separate inserts leave separate parts: only FINAL collapses the duplicate.
        insert(client, "fraud_scores", [score_row(duplicate_final, scored_at=2_000)])
        insert(client, "fraud_scores", [score_row(p) for p in (relabelled, cleared, broken)])
        labels = [label_row(p.txn_id, p.label, p.ts + 7 * 86_400) for p in payments if p.label]
        labels.append(label_row("nan", "fraud", broken.ts + 86_400))
        labels.append(label_row("relabel", "legit", relabelled.ts + 86_400))
        labels.append(label_row("cleared", "legit", int(NEWEST_LABEL.timestamp()) - 5 * 86_400))
        insert(client, "fraud_label_events", labels)
        later = [
            label_row("relabel", "fraud", int(NEWEST_LABEL.timestamp())),
            label_row("cleared", "fraud", cleared.ts + 86_400),
        ]
        insert(client, "fraud_label_events", later)
        # Labels stored twice (e.g. rows from before migration 0006, copied into the history
        # by 0008): a payment still has one latest label.
        redelivered = [
            label_row(p.txn_id, p.label, p.ts + 7 * 86_400, ingested_at=3_000)
            for p in payments[:5]
            if p.label
        ]
        insert(client, "fraud_label_events", redelivered)
        ((raw,),) = client.execute("SELECT count() FROM fraud_scores")
        assert raw == len(payments) + 5  # the duplicate really is stored twice
    finally:
        client.disconnect()
    yield Dataset(isolated_settings, [*payments, duplicate_final, relabelled, cleared])


def expected_summary(
    data: Dataset, days: set[str] | None = None, model: str | None = None
) -> dict[str, Any]:
    a = data.arrays(days, model)
    alerts = alert_metrics(a["y"], a["alert"])
    cp = card_precision_at_k(a["day"], a["card"], a["y"], a["score"], 100)
    return {
        "payments": int(a["y"].size),
        "frauds": int(a["y"].sum()),
        "alerts": alerts.alerts,
        "unlabelled": a["unlabelled"],
        "auc_roc": roc_auc(a["y"], a["score"]),
        "average_precision": average_precision(a["y"], a["score"]),
        "cp_at_100": cp.mean,
        "cp_at_100_excl_detected": card_precision_at_k(
            a["day"], a["card"], a["y"], a["score"], 100, remove_detected=True
        ).mean,
        "alert_precision": alerts.precision,
        "alert_recall": alerts.recall,
        "alert_fpr": alerts.false_positive_rate,
        "days": int(cp.days.size),
    }


def assert_matches(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        got = actual[key]
        if isinstance(value, float) and math.isnan(value):
            assert got is None or math.isnan(got), key
        else:
            assert got == pytest.approx(value, abs=1e-12), key


def metric_rows(settings: Settings, run_id: str) -> dict[tuple[str, str, str], tuple[float, int]]:
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        # The day travels as a date: 18.16's toString renders day 0 as '0000-00-00'.
        rows = client.execute(
            "SELECT model, day, metric, value, n FROM model_metrics FINAL "
            "WHERE run_id = %(run_id)s",
            {"run_id": run_id},
        )
    finally:
        client.disconnect()
    return {(model, day.isoformat(), metric): (value, n) for model, day, metric, value, n in rows}


# --------------------------------------------------------------------------------------------


def test_evaluate_fraud_equals_the_library_on_the_deduplicated_payments(dataset: Dataset) -> None:
    result = evaluate_fraud(dataset.settings)

    expected = expected_summary(dataset)
    assert_matches(result, expected)
    # By hand: 3 x 40 generated + 2 quiet + dup + 2 relabelled; the NaN-scored one left out.
    assert result["payments"] == 125
    assert result["non_finite_scores"] == 1
    assert result["unlabelled"] == expected["unlabelled"] > 0
    assert result["first_day"] == "2026-01-05" and result["last_day"] == "2026-01-08"
    assert result["window"]["from"] is None and result["window"]["to"] is None

    # Per day: the window's arrays split by day.
    assert [d["day"] for d in result["per_day"]] == [*(d.isoformat() for d in DAYS), "2026-01-08"]
    for day in result["per_day"]:
        a = dataset.arrays({day["day"]})
        assert day["payments"] == a["y"].size
        assert day["frauds"] == a["y"].sum()
        assert day["alerts"] == a["alert"].sum()
        assert day["cards"] == np.unique(a["card"]).size
        cp = card_precision_at_k(a["day"], a["card"], a["y"], a["score"], 100)
        assert day["cp_at_100"] == pytest.approx(cp.values[0])
        for name, metric in (("auc_roc", roc_auc), ("average_precision", average_precision)):
            value = metric(a["y"], a["score"])
            assert day[name] == pytest.approx(value, nan_ok=True)
    quiet = result["per_day"][-1]
    assert quiet["payments"] == 2 and math.isnan(quiet["auc_roc"]) and quiet["cp_at_100"] == 0.0

    # Per model prefix (two models scored this window).
    assert sorted(result["by_model"]) == ["lr-rules-v1", "shadow-v2"]
    for model, summary in result["by_model"].items():
        assert_matches(summary, expected_summary(dataset, model=model))
    assert result["handbook"]["logistic regression"] == {
        "auc_roc": 0.871,
        "average_precision": 0.606,
        "cp_at_100": 0.291,
    }


def test_duplicate_score_counts_once_with_its_latest_row(dataset: Dataset) -> None:
    only_day = {DAYS[0].isoformat()}
    result = evaluate_fraud(dataset.settings, date_from=DAYS[0], date_to=DAYS[0])
    assert_matches(result, expected_summary(dataset, only_day))
    # The superseded row was an alert; the latest is not. Alerts of day 1 exclude it.
    assert result["alerts"] == sum(
        p.is_alert for p in dataset.payments if p.day == DAYS[0].isoformat()
    )


def test_relabels_survive_merges_of_the_label_history(dataset: Dataset) -> None:
    client = clickhouse_client(dataset.settings, dataset.settings.clickhouse_database)
    try:
        client.execute("OPTIMIZE TABLE fraud_label_events FINAL")  # what merges do eventually
        latest = dict(
            client.execute(
                "SELECT txn_id, label FROM fraud_labels WHERE txn_id IN ('relabel', 'cleared')"
            )
        )
        ((events,),) = client.execute(
            "SELECT sum(label_events) FROM fraud_labels WHERE txn_id IN ('relabel', 'cleared')"
        )
    finally:
        client.disconnect()
    assert latest == {"relabel": "fraud", "cleared": "legit"}
    assert events == 4  # both labels of each are kept
    assert_matches(evaluate_fraud(dataset.settings), expected_summary(dataset))


def test_from_and_to_select_whole_utc_days(dataset: Dataset) -> None:
    result = evaluate_fraud(dataset.settings, date_from=DAYS[1], date_to=DAYS[1])
    assert_matches(result, expected_summary(dataset, {DAYS[1].isoformat()}))
    assert [d["day"] for d in result["per_day"]] == [DAYS[1].isoformat()]
    assert result["window"] == {
        "from": "2026-01-06",
        "to": "2026-01-06",
        "label_delay_days": None,
        "labels_known_until": None,
        "payments_before": None,
    }

    open_end = evaluate_fraud(dataset.settings, date_from=DAYS[2])
    assert [d["day"] for d in open_end["per_day"]] == ["2026-01-07", "2026-01-08"]
    open_start = evaluate_fraud(dataset.settings, date_to=DAYS[0])
    assert [d["day"] for d in open_start["per_day"]] == ["2026-01-05"]


def test_label_delay_drops_payments_whose_labels_may_be_missing(dataset: Dataset) -> None:
    # Newest label 2026-02-10 00:00; 35 days earlier is 2026-01-06 00:00: day 1 only.
    result = evaluate_fraud(dataset.settings, label_delay_days=35)
    assert_matches(result, expected_summary(dataset, {DAYS[0].isoformat()}))
    assert result["window"]["labels_known_until"] == "2026-02-10T00:00:00+00:00"
    assert result["window"]["payments_before"] == "2026-01-06T00:00:00+00:00"
    # A --to earlier than the cut-off wins.
    both = evaluate_fraud(dataset.settings, date_to=DAYS[0], label_delay_days=1)
    assert both["payments"] == result["payments"]


def test_cli_json_writes_model_metrics_and_a_rerun_replaces_them(dataset: Dataset) -> None:
    settings = dataset.settings
    runner = CliRunner()
    args = ["eval", "fraud", "--json", "--run-id", "run-1"]
    outcome = runner.invoke(cli, args, obj=settings, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.output)
    direct = evaluate_fraud(settings)
    assert_matches(printed, {k: v for k, v in direct.items() if isinstance(v, float | int)})
    assert printed["run_id"] == "run-1"
    quiet = printed["per_day"][-1]
    assert quiet["auc_roc"] is None  # nan is not JSON: undefined metrics are null

    rows = metric_rows(settings, "run-1")
    assert len(rows) == printed["model_metrics_rows"] > 0
    window = "1970-01-01"
    assert rows[("all", window, "auc_roc")] == (pytest.approx(direct["auc_roc"]), 125)
    assert rows[("all", window, "payments")] == (125.0, 125)
    assert rows[("all", window, "unlabelled")][0] == direct["unlabelled"]
    assert rows[("shadow-v2", window, "cp_at_100")][0] == pytest.approx(
        direct["by_model"]["shadow-v2"]["cp_at_100"]
    )
    for day in direct["per_day"]:
        assert rows[("all", day["day"], "cp_at_100")] == (
            pytest.approx(day["cp_at_100"]),
            day["cards"],
        )
        assert rows[("all", day["day"], "payments")][1] == day["payments"]
    # Undefined values are not written; the quiet day still has its counts.
    assert ("all", "2026-01-08", "auc_roc") not in rows
    assert ("all", "2026-01-08", "payments") in rows

    again = runner.invoke(cli, args, obj=settings, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert metric_rows(settings, "run-1") == rows  # same key: replaced, not doubled
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        ((stored,),) = client.execute("SELECT count() FROM model_metrics FINAL")
    finally:
        client.disconnect()
    assert stored == len(rows)


def test_cli_table_and_no_write(dataset: Dataset) -> None:
    settings = dataset.settings
    outcome = CliRunner().invoke(
        cli,
        [
            "eval",
            "fraud",
            "--no-write",
            "--run-id",
            "dry",
            "--from",
            "2026-01-05",
            "--to",
            "2026-01-08",
        ],
        obj=settings,
        catch_exceptions=False,
    )
    assert outcome.exit_code == 0, outcome.output
    text = outcome.output
    result = evaluate_fraud(settings)
    assert "payments 125" in text
    assert f"unlabelled {result['unlabelled']}" in text
    assert "left out: 1 payments with a NaN/inf score" in text
    assert f"{result['auc_roc']:.3f}" in text
    assert "logistic regression" in text and "0.871" in text and "0.606" in text
    assert "isolation forest (unsupervised)" in text and "0.164" in text
    assert "shadow-v2" in text  # two models: one line each
    quiet_line = next(line for line in text.splitlines() if line.startswith("2026-01-08"))
    assert "n/a" in quiet_line
    assert "model_metrics: not written (--no-write)" in text
    assert metric_rows(settings, "dry") == {}


def test_empty_window_reports_no_payments(dataset: Dataset) -> None:
    result = evaluate_fraud(dataset.settings, date_from=date(2030, 1, 1))
    assert result["payments"] == 0 and result["per_day"] == [] and result["by_model"] == {}
    assert math.isnan(result["auc_roc"]) and math.isnan(result["cp_at_100"])
    outcome = CliRunner().invoke(
        cli, ["eval", "fraud", "--from", "2030-01-01", "--run-id", "empty"], obj=dataset.settings
    )
    assert outcome.exit_code == 0, outcome.output
    assert "no scored payments in this window" in outcome.output
    # Only the defined whole-window counts are written (all zero).
    assert metric_rows(dataset.settings, "empty")[("all", "1970-01-01", "payments")] == (0.0, 0)


def test_errors_are_one_readable_line(isolated_settings: Settings) -> None:
    # Not migrated: the database does not exist yet.
    with pytest.raises(BorderflowError) as exc:
        evaluate_fraud(isolated_settings)
    assert "borderflow migrate" in str(exc.value) and "\n" not in str(exc.value)

    with pytest.raises(BorderflowError, match="after"):
        evaluate_fraud(isolated_settings, date_from=DAYS[1], date_to=DAYS[0])

    closed = isolated_settings.model_copy(update={"clickhouse_port": 1})
    with pytest.raises(BorderflowError, match="cannot reach ClickHouse at 127.0.0.1:1: ") as exc:
        evaluate_fraud(closed)
    assert "\n" not in str(exc.value)
