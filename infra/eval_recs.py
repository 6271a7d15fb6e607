"""``borderflow eval recs FILE``: next-click quality of the recommender vs two baselines.

Reads a click file (DIGINETICA ``train-item-views.csv``, or JSONL clicks of borderflow's
contract such as ``borderflow generate --out`` writes), replays it through borderflow's
:class:`~models.recommender.SessionRecommender`, item-kNN and popularity *in the same process
and in the same order*, and prints HR@k, MRR@k and Precision@k for each. The protocol
(predict the next click from the session so far, then learn it) is described in
:mod:`models.session_eval`. Nothing is read from or written to the running stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from models.session_eval import (
    DEFAULT_KS,
    SessionDataError,
    check_ks,
    default_models,
    detect_format,
    evaluate,
    load_sessions,
)
from schemas.errors import BorderflowError

#: Published results on the *full* DIGINETICA (Ludewig et al., UMUAI 2021): HR@20, MRR@20.
LITERATURE_DIGINETICA: dict[str, tuple[float, float]] = {
    "SKNN": (0.475, 0.171),
    "V-SKNN": (0.473, 0.178),
    "GRU4Rec": (0.464, 0.164),
    "STAN": (0.480, 0.183),
}

PROTOCOL = (
    "sessions in time order; for each click after a session's first, every model ranks "
    "its top-k for the session so far, the true next click is scored, then the model "
    "learns the click (it never sees the future)"
)


def evaluate_file(
    path: str | Path, *, fmt: str = "auto", ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, Any]:
    """Evaluate borderflow, item-kNN and popularity on ``path``; a JSON-ready dict.

    Raises :class:`BorderflowError` (one readable line) for a file that is missing,
    unreadable, in an unknown format, or without a session of two or more clicks.
    """
    path = Path(path)
    try:
        if fmt == "auto":
            fmt = detect_format(path)
        sessions = load_sessions(path, fmt)
    except SessionDataError as exc:
        raise BorderflowError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise BorderflowError(f"{path}: not a text file ({exc.reason})") from None
    except OSError as exc:
        raise BorderflowError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not sessions:
        raise BorderflowError(f"{path}: no session with two or more clicks, nothing to evaluate")
    results = evaluate(sessions, default_models(), ks=ks)
    return {
        "file": str(path),
        "format": fmt,
        "sessions": len(sessions),
        "clicks": sum(len(s.items) for s in sessions),
        "items": len({item for s in sessions for item in s.items}),
        "ks": list(ks),
        "protocol": PROTOCOL,
        "models": {name: metrics.as_dict() for name, metrics in results.items()},
        "literature_full_diginetica": {
            name: {"hr@20": hr, "mrr@20": mrr} for name, (hr, mrr) in LITERATURE_DIGINETICA.items()
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """The plain-text report ``borderflow eval recs`` prints."""
    ks = result["ks"]
    top = str(ks[-1])
    models = result["models"]
    n = next(iter(models.values()))["n"] if models else 0
    lines = [
        f"session-based recommendations - {result['file']} ({result['format']}): "
        f"{result['sessions']:,} sessions, {result['clicks']:,} clicks, "
        f"{result['items']:,} items, {n:,} predictions",
        f"protocol: {PROTOCOL}",
        "",
        f"{'':12}" + "".join(f"{f'{m}@{k}':>8}" for k in ks for m in ("HR", "MRR", "P")),
    ]
    for name, m in models.items():
        cells = "".join(
            f"{m[metric][str(k)]:>8.4f}" for k in ks for metric in ("hr", "mrr", "precision")
        )
        lines.append(f"{name:12}{cells}")
    lines += [
        "",
        f"by kind of next click, HR@{top} / MRR@{top} (new: not yet in the session; repeat: "
        "an earlier item of it; last: the current item again), catalog coverage and time:",
        f"{'':12}"
        + "".join(f"{kind + ' HR / MRR':>19}" for kind in ("new", "repeat", "last"))
        + f"{'cov@' + top:>9}{'rec us':>9}{'p99':>7}{'obs us':>8}",
    ]
    for name, m in models.items():
        kinds = "".join(
            f"{m['by_target'][kind]['hr']:>11.3f} / {m['by_target'][kind]['mrr']:.3f}"
            for kind in ("new", "repeat", "last")
        )
        lines.append(
            f"{name:12}{kinds}{m['coverage'][top]:>9.3f}{m['recommend_us_mean']:>9.0f}"
            f"{m['recommend_us_p99']:>7.0f}{m['observe_us_mean']:>8.0f}"
        )
    counts = next(iter(models.values()))["by_target"] if models else {}
    if counts:
        lines.append(
            f"{'predictions':12}"
            + "".join(f"{counts[kind]['n']:>11,}" + " " * 8 for kind in ("new", "repeat", "last"))
        )
    if result["format"] == "diginetica":
        lines += [
            "",
            "published, full DIGINETICA (Ludewig et al. 2021), HR@20 / MRR@20 - another data "
            "size: compare with the baselines above, not with these:",
            "  "
            + ", ".join(
                f"{name} {hr:.3f} / {mrr:.3f}" for name, (hr, mrr) in LITERATURE_DIGINETICA.items()
            ),
        ]
    return "\n".join(line.rstrip() for line in lines)


def _parse_ks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return check_ks(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected positive integers separated by commas, e.g. 5,10,15,20"
        ) from None


@click.command("recs")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "diginetica", "clicks"]),
    default="auto",
    show_default=True,
    help="diginetica: train-item-views.csv (session_id;user_id;item_id;timeframe;eventdate). "
    "clicks: JSONL clicks or `borderflow generate --out` envelopes. auto: from the first line.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--k",
    "ks",
    default=",".join(str(k) for k in DEFAULT_KS),
    show_default=True,
    callback=_parse_ks,
    help="Cut-offs, comma-separated.",
)
def eval_recs_command(file: Path, fmt: str, as_json: bool, ks: tuple[int, ...]) -> None:
    """Next-click HR, MRR and Precision@k of borderflow's recommender vs item-kNN and
    popularity, replayed from a click file (no running stack needed)."""
    result = evaluate_file(file, fmt=fmt, ks=ks)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result))
