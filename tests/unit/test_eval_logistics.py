"""``borderflow eval logistics``: the prequential comparison, through the CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from infra.cli import cli
from schemas.config import Settings

ARGS = ["eval", "logistics", "--users", "400", "--days", "30", "--seed", "7"]


def test_eval_logistics_json_shows_the_model_beating_the_baseline() -> None:
    result = CliRunner().invoke(cli, [*ARGS, "--json"], obj=Settings())
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["users"] == 400 and report["deliveries"] > 1000
    overall = report["mae_h"]
    assert overall["n"] == report["predictions_scored"] > 5000
    assert overall["model"] < 0.8 * overall["baseline"]  # the bar: 20 % lower
    quarters = report["per_quarter"]
    assert [q["quarter"] for q in quarters] == [1, 2, 3, 4]
    assert quarters[-1]["model"] < quarters[0]["model"]  # improves as deliveries complete
    assert sum(q["n"] for q in quarters) == overall["n"]
    statuses = report["per_status"]
    assert statuses["out_for_delivery"]["model"] < 0.5 * statuses["out_for_delivery"]["baseline"]
    late = report["alerts"]["predicted_late"]
    assert late["alerts"] > 0 and late["precision"] > 0.5 and late["recall"] > 0.5
    assert report["alerts"]["customs_delay"]["alerts"] > 0
    assert report["alerts_repeated"] == 0  # each kind at most once per shipment
    assert report["invalid_transitions"] == {} and report["duplicates"] == 0
    assert report["timing"]["us_per_scan"] > 0


def test_eval_logistics_text_report_is_deterministic() -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ARGS, obj=Settings())
    assert first.exit_code == 0, first.output
    assert "MAE remaining hours" in first.output and "per quarter" in first.output
    assert "precision" in first.output and "invalid transitions: 0" in first.output
    second = runner.invoke(cli, ARGS, obj=Settings())
    strip = [line for line in first.output.splitlines() if not line.startswith("timing")]
    again = [line for line in second.output.splitlines() if not line.startswith("timing")]
    assert strip == again


def test_eval_logistics_rejects_bad_options() -> None:
    result = CliRunner().invoke(cli, ["eval", "logistics", "--days", "0"], obj=Settings())
    assert result.exit_code != 0
