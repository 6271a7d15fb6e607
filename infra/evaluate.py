"""``borderflow eval fraud``: score quality of the live fraud model, from ClickHouse.

Every scored payment is in ``fraud_scores``, every label event in ``fraud_label_events`` and
each payment's latest label in the ``fraud_labels`` view. This joins the scores with the view
in ClickHouse, fetches the few numeric columns the metrics need in one columnar block, and
computes the Fraud Detection Handbook's metrics with :mod:`models.evaluation`: AUC ROC,
Average Precision and Card Precision@100 over the window and per day, plus the precision,
recall and false-positive rate of the alerts the pipeline raised (``is_alert``).

Conventions, and why:

* A payment without a label counts as legitimate. That is the handbook's convention (and how
  a bank sees it: no chargeback, no fraud); the number of unlabelled payments is reported so a
  lagging label stream is visible. ``--label-delay-days N`` leaves out the payments of the
  last N days before the newest label, whose frauds may not be reported yet.
* Days are UTC days of the payment's event time (``ts``), the window ``--from``/``--to`` is
  inclusive on both ends.
* A payment scored twice (redelivery) counts once: ``fraud_scores FINAL`` keeps the latest
  row per ``txn_id`` (all rows of a payment share its ``ts``, hence its partition).
* A payment labelled twice takes its latest label by label time (e.g. a settlement, then a
  chargeback; or a chargeback, then a manual review clearing it), whatever order the labels
  were ingested in: that is what the ``fraud_labels`` view holds (migration 0008: the latest
  of the payment's ``fraud_label_events`` by ``ts_ms``, ties broken by ``event_id``).
* Payments with a non-finite score have no rank; they are left out and counted.

Results are written to ``model_metrics`` (migration 0002) for dashboards: one row per
(run, model, day, metric), ``model`` being the ``model_version`` prefix (before ``@``) or
``all``, ``day`` 1970-01-01 for whole-window values. Undefined values (``nan``, e.g. the AUC
of a day without fraud) are not written: a missing point is what a dashboard shows best.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from clickhouse_driver import Client
from clickhouse_driver.errors import Error as ClickHouseError
from clickhouse_driver.errors import NetworkError, SocketTimeoutError

from infra.eval_logistics import eval_logistics_command
from infra.eval_recs import eval_recs_command
from models.evaluation import (
    CardPrecisionAtK,
    alert_metrics,
    average_precision,
    card_precision_at_k,
    roc_auc,
)
from schemas.config import Settings
from schemas.errors import BorderflowError
from sinks.clickhouse import TABLE_COLUMNS, clickhouse_client

#: Cards an investigator team checks per day in the handbook's protocol.
CP_K = 100
#: ``model`` of the rows that cover every model.
ALL_MODELS = "all"
#: ``day`` of whole-window rows in ``model_metrics``.
WINDOW_DAY = date(1970, 1, 1)
#: Origin of the day numbers the query returns (``toUInt16(toDate(ts))``).
_EPOCH = date(1970, 1, 1)

#: The handbook's batch results (test week, 7-day label delay): AUC ROC, AP, CP@100.
HANDBOOK_RESULTS: dict[str, tuple[float, float, float]] = {
    "logistic regression": (0.871, 0.606, 0.291),
    "random forest": (0.867, 0.658, 0.287),
    "XGBoost": (0.862, 0.639, 0.273),
    "balanced bagging": (0.879, 0.680, 0.305),
    "weighted XGBoost": (0.872, 0.687, 0.300),
    "isolation forest (unsupervised)": (0.808, 0.164, 0.190),
}

# One row per scored payment in the window, only numbers except the short model name:
# strings of millions of rows would dominate the transfer, so the card id travels as a
# 64-bit hash (collisions among even 10^7 cards have probability ~10^-5) and the day as
# days since 1970. The label side (the fraud_labels view) has one row per txn_id, so ANY and
# ALL joins agree; unmatched payments get the column defaults (labelled = 0, is_fraud = 0) on
# 18.16 and on 24+ (join_use_nulls = 0).
_PAYMENTS_SQL = """
SELECT
    toUInt16(toDate(ts)) AS day,
    cityHash64(card_id) AS card,
    score,
    is_alert,
    splitByChar('@', model_version)[1] AS model,
    is_fraud,
    labelled
FROM
(
    SELECT txn_id, ts, card_id, score, is_alert, model_version
    FROM fraud_scores FINAL
    {where}
)
ANY LEFT JOIN
(
    SELECT txn_id, toUInt8(label = 'fraud') AS is_fraud, toUInt8(1) AS labelled
    FROM fraud_labels
) USING (txn_id)
"""

_MODEL_METRICS_COLUMNS = TABLE_COLUMNS["model_metrics"]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@contextmanager
def _clickhouse(settings: Settings) -> Iterator[Client]:
    """A client on the settings' database; driver and socket errors become one line."""
    where = f"ClickHouse at {settings.clickhouse_host}:{settings.clickhouse_port}"
    client = clickhouse_client(settings, timeout_s=300)
    try:
        yield client
    except (NetworkError, SocketTimeoutError) as exc:
        raise BorderflowError(f"cannot reach {where}: {_first_line(exc)}") from exc
    except ClickHouseError as exc:
        text = str(exc)
        hint = ""
        if "doesn't exist" in text or "does not exist" in text:
            hint = " (run `borderflow migrate` first)"
        raise BorderflowError(f"{where}: {_first_line(exc)}{hint}") from exc
    except OSError as exc:
        raise BorderflowError(f"cannot reach {where}: {exc}") from exc
    finally:
        client.disconnect()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _window(
    client: Client, date_from: date | None, date_to: date | None, label_delay_days: float | None
) -> tuple[dict[str, datetime], dict[str, Any]]:
    """Bounds on the payment time (SQL parameters) and their description for the report."""
    bounds: dict[str, datetime] = {}
    if date_from is not None:
        bounds["ts_from"] = datetime.combine(date_from, time(), UTC)
    if date_to is not None:
        bounds["ts_to"] = datetime.combine(date_to + timedelta(days=1), time(), UTC)
    described: dict[str, Any] = {
        "from": date_from.isoformat() if date_from else None,
        "to": date_to.isoformat() if date_to else None,
        "label_delay_days": label_delay_days,
        "labels_known_until": None,
        "payments_before": None,
    }
    if label_delay_days is not None:
        # Event time, not wall-clock time: a replay of last year's data has labels up to
        # last year, and "now" minus the delay would then keep everything.
        ((newest, n_labels),) = client.execute("SELECT max(ts), count() FROM fraud_label_events")
        newest = newest.astimezone(UTC) if n_labels else None
        # Without any label nothing is known yet: the cut-off excludes every payment.
        cutoff = (
            newest - timedelta(days=label_delay_days) if newest else datetime.fromtimestamp(0, UTC)
        )
        if "ts_to" not in bounds or cutoff < bounds["ts_to"]:
            bounds["ts_to"] = cutoff
        described["labels_known_until"] = newest.isoformat() if newest else None
        described["payments_before"] = bounds["ts_to"].isoformat()
    return bounds, described


def _payments_sql(bounds: Mapping[str, datetime]) -> str:
    # Bounds travel as epoch seconds: clickhouse-driver renders a datetime in the server's
    # time zone while ClickHouse parses the literal in the column's (UTC), which differ on a
    # server not set to UTC. toDateTime(number) has no time zone to get wrong.
    conditions = []
    if "ts_from" in bounds:
        conditions.append("ts >= toDateTime(%(ts_from)s)")
    if "ts_to" in bounds:
        conditions.append("ts < toDateTime(%(ts_to)s)")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return _PAYMENTS_SQL.format(where=where)


def _epoch_params(bounds: Mapping[str, datetime]) -> dict[str, int]:
    return {name: max(0, int(moment.timestamp())) for name, moment in bounds.items()}


def _fetch(client: Client, sql: str, params: Mapping[str, Any]) -> dict[str, npt.NDArray[Any]]:
    columns = client.execute(sql, dict(params), columnar=True)
    names = ("day", "card", "score", "is_alert", "model", "is_fraud", "labelled")
    if not columns:  # clickhouse-driver returns [] rather than empty columns for no rows
        columns = [[] for _ in names]
    dtypes = (np.int64, np.uint64, np.float64, np.bool_, object, np.bool_, np.bool_)
    return {
        name: np.asarray(column, dtype=dtype)
        for name, column, dtype in zip(names, columns, dtypes, strict=True)
    }


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _iso_day(day: int) -> str:
    return (_EPOCH + timedelta(days=int(day))).isoformat()


def _summary(data: Mapping[str, npt.NDArray[Any]]) -> tuple[dict[str, Any], CardPrecisionAtK]:
    """Whole-window metrics of one set of payments (all models, or one), and its CP@100."""
    y, s = data["is_fraud"], data["score"]
    alerts = alert_metrics(y, data["is_alert"])
    cp = card_precision_at_k(data["day"], data["card"], y, s, CP_K)
    cp_handbook = card_precision_at_k(data["day"], data["card"], y, s, CP_K, remove_detected=True)
    summary = {
        "payments": int(y.size),
        "frauds": int(y.sum()),
        "alerts": alerts.alerts,
        "unlabelled": int(y.size - data["labelled"].sum()),
        "auc_roc": roc_auc(y, s),
        "average_precision": average_precision(y, s),
        "cp_at_100": cp.mean,
        "cp_at_100_excl_detected": cp_handbook.mean,
        "alert_precision": alerts.precision,
        "alert_recall": alerts.recall,
        "alert_fpr": alerts.false_positive_rate,
        "days": int(cp.days.size),
    }
    return summary, cp


def _per_day(data: Mapping[str, npt.NDArray[Any]], cp: CardPrecisionAtK) -> list[dict[str, Any]]:
    """Metrics of each day; ``cp`` is the CP@100 of the same data (computed once)."""
    y, s, days = data["is_fraud"], data["score"], data["day"]
    order = np.argsort(days)  # unstable: the metrics do not depend on the order within a day
    bounds = np.searchsorted(days[order], cp.days, side="left").tolist() + [days.size]
    result = []
    for i, day in enumerate(cp.days):
        rows = order[bounds[i] : bounds[i + 1]]
        y_day = y[rows]
        result.append(
            {
                "day": _iso_day(day),
                "payments": int(rows.size),
                "frauds": int(y_day.sum()),
                "alerts": int(data["is_alert"][rows].sum()),
                "cards": int(cp.cards[i]),
                "auc_roc": roc_auc(y_day, s[rows]),
                "average_precision": average_precision(y_day, s[rows]),
                "cp_at_100": float(cp.values[i]),
            }
        )
    return result


def evaluate_fraud(
    settings: Settings,
    *,
    date_from: date | None = None,
    date_to: date | None = None,
    label_delay_days: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``fraud_scores`` against the latest labels (the ``fraud_labels`` view) in
    ``settings.clickhouse_database``.

    ``date_from``/``date_to`` bound the payment's UTC day, both inclusive (None: open).
    ``label_delay_days`` additionally drops the payments made within that many days before
    the newest label's time (their labels may not be known yet).

    Returns a JSON-ready dict (``nan`` where a metric is undefined): ``window``; whole-window
    ``payments``, ``frauds``, ``alerts``, ``unlabelled``, ``non_finite_scores``, ``auc_roc``,
    ``average_precision``, ``cp_at_100`` (mean over days), ``cp_at_100_excl_detected`` (the
    handbook notebook's variant, cards detected on earlier days left out), ``alert_precision``,
    ``alert_recall``, ``alert_fpr``, ``days``; ``per_day`` (a list of dicts with ``day``,
    counts, ``auc_roc``, ``average_precision``, ``cp_at_100``); ``by_model`` (the whole-window
    metrics per ``model_version`` prefix) and ``handbook`` (reference results).
    """
    if date_from and date_to and date_from > date_to:
        raise BorderflowError(f"--from {date_from} is after --to {date_to}")
    if label_delay_days is not None and label_delay_days < 0:
        raise BorderflowError("--label-delay-days must not be negative")
    with _clickhouse(settings) as client:
        bounds, window = _window(client, date_from, date_to, label_delay_days)
        data = _fetch(client, _payments_sql(bounds), _epoch_params(bounds))

    finite = np.isfinite(data["score"])
    non_finite = int(finite.size - finite.sum())
    if non_finite:
        data = {name: column[finite] for name, column in data.items()}

    summary, cp = _summary(data)
    result: dict[str, Any] = {"database": settings.clickhouse_database, "window": window}
    result.update(summary)
    result["non_finite_scores"] = non_finite
    result["first_day"] = _iso_day(data["day"].min()) if data["day"].size else None
    result["last_day"] = _iso_day(data["day"].max()) if data["day"].size else None
    result["per_day"] = _per_day(data, cp)
    models = sorted(set(data["model"].tolist()))
    if len(models) == 1:  # the usual case: one model scored everything, nothing to recompute
        result["by_model"] = {models[0]: summary}
    else:
        result["by_model"] = {
            model: _summary(
                {name: column[data["model"] == model] for name, column in data.items()}
            )[0]
            for model in models
        }
    result["handbook"] = {
        name: {"auc_roc": auc, "average_precision": ap, "cp_at_100": cp}
        for name, (auc, ap, cp) in HANDBOOK_RESULTS.items()
    }
    return result


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_WINDOW_METRICS = (
    "auc_roc",
    "average_precision",
    "cp_at_100",
    "cp_at_100_excl_detected",
    "alert_precision",
    "alert_recall",
    "alert_fpr",
    "payments",
    "frauds",
    "alerts",
    "unlabelled",
)
_DAY_METRICS = ("auc_roc", "average_precision", "cp_at_100", "payments", "frauds", "alerts")


def model_metrics_rows(
    result: Mapping[str, Any], *, run_id: str, computed_at: datetime
) -> list[tuple[Any, ...]]:
    """Rows for ``model_metrics`` (column order :data:`_MODEL_METRICS_COLUMNS`).

    ``n`` is what the value was computed over: payments, or cards for a day's CP@100.
    """
    rows: list[tuple[Any, ...]] = []

    def add(model: str, day: date, metric: str, value: float, n: int) -> None:
        if math.isfinite(value):
            rows.append((computed_at, run_id, model, day, metric, float(value), int(n)))

    for model, summary in [(ALL_MODELS, result), *result["by_model"].items()]:
        for metric in _WINDOW_METRICS:
            add(model, WINDOW_DAY, metric, summary[metric], summary["payments"])
    for day in result["per_day"]:
        for metric in _DAY_METRICS:
            n = day["cards"] if metric == "cp_at_100" else day["payments"]
            add(ALL_MODELS, date.fromisoformat(day["day"]), metric, day[metric], n)
    return rows


def write_model_metrics(
    settings: Settings,
    result: Mapping[str, Any],
    *,
    run_id: str,
    computed_at: datetime | None = None,
) -> int:
    """Insert ``result`` into ``model_metrics``; returns the number of rows written."""
    rows = model_metrics_rows(
        result, run_id=run_id, computed_at=computed_at or datetime.now(UTC).replace(microsecond=0)
    )
    if rows:
        with _clickhouse(settings) as client:
            client.execute(
                f"INSERT INTO model_metrics ({', '.join(_MODEL_METRICS_COLUMNS)}) VALUES", rows
            )
    return len(rows)


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """``nan`` is not JSON: undefined metrics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def format_report(result: Mapping[str, Any]) -> str:
    """The evaluation as a plain-text report (what ``borderflow eval fraud`` prints)."""
    window = result["window"]
    span = f"{window['from'] or 'start'} .. {window['to'] or 'end'}"
    lines = [
        f"fraud model evaluation - database {result['database']}, payment days {span}"
        + (f" (data {result['first_day']} .. {result['last_day']})" if result["days"] else ""),
    ]
    if window["label_delay_days"] is not None:
        lines.append(
            f"label delay {window['label_delay_days']:g} days: labels known until "
            f"{window['labels_known_until'] or 'never'}, payments before "
            f"{window['payments_before']}"
        )
    n = result["payments"]
    lines += [
        f"payments {n:,}  frauds {result['frauds']:,} ({_share(result['frauds'], n)})  "
        f"alerts {result['alerts']:,} ({_share(result['alerts'], n)})  days {result['days']}",
        f"unlabelled {result['unlabelled']:,} ({_share(result['unlabelled'], n)}), "
        "counted as legitimate (the handbook's convention)",
    ]
    if result["non_finite_scores"]:
        lines.append(f"left out: {result['non_finite_scores']:,} payments with a NaN/inf score")
    if not n:
        lines.append("no scored payments in this window")
        return "\n".join(lines)

    lines += [
        "",
        f"{'':34}{'AUC ROC':>9}{'AP':>9}{'CP@100':>9}",
        f"{'borderflow (this window)':34}{_num(result['auc_roc']):>9}"
        f"{_num(result['average_precision']):>9}{_num(result['cp_at_100']):>9}",
    ]
    if len(result["by_model"]) > 1:
        for model, summary in result["by_model"].items():
            lines.append(
                f"{'  model ' + (model or '(none)'):34}{_num(summary['auc_roc']):>9}"
                f"{_num(summary['average_precision']):>9}{_num(summary['cp_at_100']):>9}"
            )
    lines.append("handbook, batch (test week, 7-day label delay):")
    for name, (auc, ap, cp) in HANDBOOK_RESULTS.items():
        lines.append(f"{'  ' + name:34}{auc:>9.3f}{ap:>9.3f}{cp:>9.3f}")
    lines += [
        "",
        f"CP@100 with cards detected on earlier days left out (the handbook notebook's "
        f"default): {_num(result['cp_at_100_excl_detected'])}",
        f"alerts (is_alert): precision {_num(result['alert_precision'])}  "
        f"recall {_num(result['alert_recall'])}  "
        f"false-positive rate {_num(result['alert_fpr'], 4)}",
        "",
        f"{'day':<12}{'payments':>10}{'frauds':>8}{'alerts':>8}{'cards':>8}"
        f"{'AUC ROC':>9}{'AP':>9}{'CP@100':>9}",
    ]
    for day in result["per_day"]:
        lines.append(
            f"{day['day']:<12}{day['payments']:>10,}{day['frauds']:>8,}{day['alerts']:>8,}"
            f"{day['cards']:>8,}{_num(day['auc_roc']):>9}{_num(day['average_precision']):>9}"
            f"{_num(day['cp_at_100']):>9}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@click.group(name="eval")
def eval_cli() -> None:
    """Evaluate models: fraud scores in ClickHouse, recommendations on a session file,
    delivery-time predictions on a simulated shop."""


@eval_cli.command()
@click.option(
    "--from",
    "date_from",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="First payment day (UTC, inclusive). Default: the earliest.",
)
@click.option(
    "--to",
    "date_to",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Last payment day (UTC, inclusive). Default: the latest.",
)
@click.option(
    "--label-delay-days",
    type=click.FloatRange(min=0),
    default=None,
    help="Leave out payments of the last N days before the newest label, whose labels may "
    "not be known yet. Default: keep every payment.",
)
@click.option(
    "--run-id",
    default=None,
    help="Identifies this run in model_metrics (re-using one replaces its rows). "
    "Default: the UTC time, e.g. 20260101T120000Z.",
)
@click.option("--no-write", is_flag=True, help="Do not write the results to model_metrics.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def fraud(
    settings: Settings,
    date_from: datetime | None,
    date_to: datetime | None,
    label_delay_days: float | None,
    run_id: str | None,
    no_write: bool,
    as_json: bool,
) -> None:
    """AUC ROC, Average Precision and Card Precision@100 of the fraud scores, vs the handbook."""
    computed_at = datetime.now(UTC).replace(microsecond=0)
    run_id = run_id or computed_at.strftime("%Y%m%dT%H%M%SZ")
    result = evaluate_fraud(
        settings,
        date_from=date_from.date() if date_from else None,
        date_to=date_to.date() if date_to else None,
        label_delay_days=label_delay_days,
    )
    written = 0
    if not no_write:
        written = write_model_metrics(settings, result, run_id=run_id, computed_at=computed_at)
    result = {**result, "run_id": run_id, "model_metrics_rows": written}
    if as_json:
        click.echo(json.dumps(_json_ready(result), indent=2))
        return
    click.echo(format_report(result))
    click.echo("")
    if no_write:
        click.echo("model_metrics: not written (--no-write)")
    else:
        click.echo(f"model_metrics: {written} rows written, run_id {run_id}")


eval_cli.add_command(eval_recs_command)
eval_cli.add_command(eval_logistics_command)
