"""``borderflow eval recs FILE``: next-click quality of the recommender vs two baselines.

Reads a click file (DIGINETICA ``train-item-views.csv``, JSONL clicks of borderflow's
contract such as ``borderflow generate --out`` writes, RetailRocket ``events.csv``, YOOCHOOSE
``yoochoose-clicks.dat``, or any delimited file with a header naming session or user, item and
time columns; each also gzip-compressed), replays it through borderflow's
:class:`~models.recommender.SessionRecommender`, item-kNN and popularity *in the same process
and in the same order*, and prints HR@k, MRR@k and Precision@k for each. The protocol
(predict the next click from the session so far, then learn it; or ``--protocol split``:
learn all sessions before the last ``--test-days`` days, then predict the test sessions) is
described in :mod:`models.session_eval`. Nothing is read from or written to the running stack.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import click

from models.session_eval import (
    DEFAULT_KS,
    FORMATS,
    SessionDataError,
    check_ks,
    default_models,
    detect_format,
    evaluate,
    load_and_preprocess,
    split_by_days,
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
SPLIT_PROTOCOL = (
    "models learn every session that ends before the last {days:g} day(s) (no predictions); "
    "test sessions (test clicks on items unseen in training removed, as session-rec) are then "
    "predicted click by click{learning}"
)


def evaluate_file(
    path: str | Path,
    *,
    fmt: str = "auto",
    ks: tuple[int, ...] = DEFAULT_KS,
    protocol: str = "prequential",
    test_days: float = 1.0,
    test_learning: bool = True,
    events: str = "auto",
    session_gap_min: float = 30.0,
    min_item_support: int | str = "auto",
    min_session_length: int = 2,
    limit_sessions: int = 0,
) -> dict[str, Any]:
    """Evaluate borderflow, item-kNN and popularity on ``path``; a JSON-ready dict.

    Raises :class:`BorderflowError` (one readable line) for a file that is missing,
    unreadable, in an unknown format, or without a session of two or more clicks.
    """
    path = Path(path)
    try:
        if fmt == "auto":
            fmt = detect_format(path)
        sessions, prep = load_and_preprocess(
            path,
            fmt,
            events=events,
            session_gap_min=session_gap_min,
            min_item_support=min_item_support,
            min_length=min_session_length,
            limit_sessions=limit_sessions,
        )
    except SessionDataError as exc:
        raise BorderflowError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise BorderflowError(f"{path}: not a text file ({exc.reason})") from None
    except (EOFError, gzip.BadGzipFile) as exc:
        raise BorderflowError(f"{path}: broken gzip file ({exc})") from None
    except OSError as exc:
        raise BorderflowError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not sessions:
        raise BorderflowError(f"{path}: no session with two or more clicks, nothing to evaluate")
    if protocol == "split":
        train, test = split_by_days(sessions, test_days)
        if not train or not test:
            raise BorderflowError(
                f"{path}: --test-days {test_days:g} leaves {len(train)} training and "
                f"{len(test)} test sessions; both are needed"
            )
        description = SPLIT_PROTOCOL.format(
            days=test_days,
            learning=", then learned (models keep learning live)"
            if test_learning
            else " by frozen models (each still sees its session's prefix)",
        )
        results = evaluate(test, default_models(), ks=ks, train=train, learn=test_learning)
        evaluated = test
    else:
        train, evaluated, description = [], sessions, PROTOCOL
        results = evaluate(sessions, default_models(), ks=ks)
    return {
        "file": str(path),
        "format": fmt,
        "sessions": len(evaluated),
        "clicks": sum(len(s.items) for s in evaluated),
        "items": len({item for s in evaluated for item in s.items}),
        "train_sessions": len(train),
        "train_clicks": sum(len(s.items) for s in train),
        "ks": list(ks),
        "protocol": protocol,
        "protocol_description": description,
        "preprocessing": prep.describe(),
        "preprocessing_options": dataclasses.asdict(prep),
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
        f"{result['items']:,} items, {n:,} predictions"
        + (
            f" (after {result['train_sessions']:,} training sessions, "
            f"{result['train_clicks']:,} clicks)"
            if result.get("train_sessions")
            else ""
        ),
        f"protocol ({result['protocol']}): {result['protocol_description']}",
        f"preprocessing: {result['preprocessing']}",
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


def _parse_support(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        support = int(value)
    except ValueError:
        support = 0
    if support < 1:
        raise click.BadParameter(f"{value!r}: expected 'auto' or a positive integer")
    return support


@click.command("recs")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="diginetica: train-item-views.csv (session_id;user_id;item_id;timeframe;eventdate). "
    "clicks: JSONL clicks or `borderflow generate --out` envelopes. retailrocket: events.csv "
    "(timestamp,visitorid,event,itemid,transactionid). yoochoose: yoochoose-clicks.dat "
    "(session,timestamp,item,category; no header). delimited: a header (tab, ; or ,) naming "
    "session (SessionId) or user (UserId, visitorid), item (ItemId) and time (Time, timestamp; "
    "epoch s/ms or ISO) columns. auto: from the first line. Gzipped files are read as well.",
)
@click.option(
    "--protocol",
    type=click.Choice(["prequential", "split"]),
    default="prequential",
    show_default=True,
    help="prequential: predict each click, then learn it, over the whole file. split: learn "
    "the sessions before the last --test-days days, then predict the test sessions "
    "(session-rec's single split).",
)
@click.option(
    "--test-days",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Days at the end of the data that are the test set (--protocol split).",
)
@click.option(
    "--test-learning/--frozen-test",
    default=True,
    show_default=True,
    help="split: models keep learning the test clicks after predicting them (live), or are "
    "frozen after training (the literature's setting).",
)
@click.option(
    "--events",
    type=click.Choice(["auto", "view", "all"]),
    default="auto",
    show_default=True,
    help="Which event types are clicks: view (RetailRocket views, as session-rec; other events "
    "still bound sessions) or all. auto: view for RetailRocket, all otherwise.",
)
@click.option(
    "--session-gap",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Minutes of inactivity that end a session of a file without session ids.",
)
@click.option(
    "--min-item-support",
    default="auto",
    show_default=True,
    callback=_parse_support,
    help="Remove clicks on items with fewer clicks (session-rec: 5). auto: 5 for files of "
    "100,000 clicks or more, 1 (keep all) for smaller samples.",
)
@click.option(
    "--min-session-length",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Drop sessions with fewer clicks after filtering.",
)
@click.option(
    "--limit",
    "limit_sessions",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Evaluate only the most recent N sessions after preprocessing (0: all).",
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
def eval_recs_command(
    file: Path,
    fmt: str,
    protocol: str,
    test_days: float,
    test_learning: bool,
    events: str,
    session_gap: float,
    min_item_support: int | str,
    min_session_length: int,
    limit_sessions: int,
    as_json: bool,
    ks: tuple[int, ...],
) -> None:
    """Next-click HR, MRR and Precision@k of borderflow's recommender vs item-kNN and
    popularity, replayed from a click file (no running stack needed)."""
    result = evaluate_file(
        file,
        fmt=fmt,
        ks=ks,
        protocol=protocol,
        test_days=test_days,
        test_learning=test_learning,
        events=events,
        session_gap_min=session_gap,
        min_item_support=min_item_support,
        min_session_length=min_session_length,
        limit_sessions=limit_sessions,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result))
