"""Offline evaluation of session-based recommenders: loaders, a prequential protocol, baselines.

Pure Python (no Faust, Redis or ClickHouse); the only I/O is reading the file in a loader.

Protocol (:func:`evaluate`) - "predict, then learn", the simplest honest streaming protocol:

1. Sessions are replayed in time order (DIGINETICA: by ``eventdate``, then ``session_id``;
   the day is all the dataset says about when a session happened, so sessions of one day are
   replayed one after the other, never interleaved). Items within a session are in
   ``timeframe`` order.
2. For every session and every position ``t >= 1`` each recommender is asked for its top
   ``max(ks)`` items given the session prefix ``items[:t]`` (an immutable tuple); the true
   next item ``items[t]`` is then scored against that list. Only afterwards does the
   recommender learn the click (``observe(items[:t], items[t], ts)``). The first click of a
   session is learned without a prediction (``observe((), items[0], ts)``).
3. A recommender therefore only ever sees the past: earlier sessions and the current
   session's prefix. Nothing is trained up front, there is no separate test set; every click
   of the file except each session's first is a prediction (no temporal split is needed).
4. Metrics at each ``k`` over all predictions, one target each (Ludewig et al. 2021; the
   seed paper's Precision/Recall/MRR at Top-5/10/15/20):

   * ``HR@k`` - share of predictions whose target is in the top ``k`` (= Recall@k for one
     target);
   * ``MRR@k`` - mean of ``1/rank`` of the target, 0 when it is not in the top ``k``;
   * ``P@k`` - Precision@k = ``HR@k / k`` (one relevant item per prediction);
   * ``coverage@k`` - distinct items that appeared in any top-``k`` list, over the distinct
     items of the evaluated sessions (catalog coverage);
   * ``n`` - number of predictions; plus HR/MRR split by the kind of target (``new``: not in
     the prefix; ``repeat``: an earlier item of the session; ``last``: the item just
     clicked again), because re-visits are frequent in click logs and easy to predict;
   * the mean and 99th-percentile wall time of ``recommend`` and ``observe`` per click.

All recommenders of one :func:`evaluate` call see exactly the same clicks in the same order,
in the same process, so their numbers are directly comparable.

Preprocessing as in the literature: sessions with fewer than two clicks are dropped (nothing
to predict). Unlike the full-dataset benchmarks, rare items are *not* dropped: on a small
sample that would remove most of the data; numbers on a sample are only comparable with
baselines run on the same sample.

>>> sessions = [Session("1", ("a", "b"), (0, 1)), Session("2", ("a", "b"), (2, 3))]
>>> result = evaluate(sessions, {"knn": ItemKNN()}, ks=(1, 2))["knn"]
>>> result.n, result.hr[1], result.mrr[2]  # the first session taught it a -> b
(2, 0.5, 0.5)
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from models.recommender import SessionRecommender

#: Cut-offs of the seed paper and of the session-based recommendation literature.
DEFAULT_KS: tuple[int, ...] = (5, 10, 15, 20)
#: Columns of DIGINETICA's ``train-item-views.csv`` (CIKM Cup 2016).
DIGINETICA_COLUMNS = ("session_id", "user_id", "item_id", "timeframe", "eventdate")
#: Kinds of target (see :func:`target_kind`).
TARGET_KINDS = ("new", "repeat", "last")


class SessionDataError(ValueError):
    """A click file that cannot be read as sessions (the message names file and line)."""


@dataclass(frozen=True)
class Session:
    """One session: its item ids in click order, with each click's event time (epoch ms)."""

    session_id: str
    items: tuple[str, ...]
    timestamps: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.items) != len(self.timestamps):
            raise ValueError("a session needs one timestamp per item")


class SessionModel(Protocol):
    """What the protocol needs from a recommender (baselines, borderflow's adapter)."""

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        """Learn one click on ``item`` after ``session_prefix`` (oldest first) at ``ts``."""

    def recommend(self, session_prefix: Sequence[str], n: int) -> Sequence[str]:
        """Up to ``n`` item ids for a session that has clicked ``session_prefix``, best first."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_diginetica(path: str | Path, *, min_length: int = 2) -> list[Session]:
    """Sessions of a DIGINETICA ``train-item-views.csv`` file (``;``-separated, with header).

    Each session's clicks are ordered by ``timeframe`` (ms since the session began; ties
    keep file order); its timestamps are ``eventdate`` (UTC midnight) + ``timeframe``.
    Sessions are sorted by ``eventdate``, then numerically by ``session_id``; sessions with
    fewer than ``min_length`` clicks are dropped (2: nothing to predict in a one-click
    session). ``user_id`` is ignored (mostly ``NA``). Consecutive repeats of an item are kept,
    as in the published benchmarks.

    Raises :class:`SessionDataError` for a file that is not in this format, ``OSError`` for
    one that cannot be read.
    """
    path = Path(path)
    clicks: dict[str, list[tuple[int, int, str]]] = {}
    days: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=";")
        header = next(reader, None)
        if header is None:
            raise SessionDataError(f"{path}: empty file, expected a DIGINETICA header")
        header = [column.strip() for column in header]
        missing = [column for column in DIGINETICA_COLUMNS if column not in header]
        if missing:
            raise SessionDataError(
                f"{path}: not a DIGINETICA item-views file (missing column(s) "
                f"{', '.join(missing)}; expected {';'.join(DIGINETICA_COLUMNS)})"
            )
        at = {column: header.index(column) for column in DIGINETICA_COLUMNS}
        width = max(at.values()) + 1
        for line_no, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                raise SessionDataError(
                    f"{path}:{line_no}: expected {len(header)} ';'-separated fields, got {len(row)}"
                )
            session_id = row[at["session_id"]].strip()
            item = row[at["item_id"]].strip()
            if not session_id or not item:
                raise SessionDataError(f"{path}:{line_no}: empty session_id or item_id")
            try:
                offset = int(row[at["timeframe"]])
                day = _day_ms(row[at["eventdate"]].strip())
            except ValueError as exc:
                raise SessionDataError(f"{path}:{line_no}: {exc}") from None
            seq = clicks.setdefault(session_id, [])
            seq.append((offset, len(seq), item))
            days[session_id] = min(day, days.get(session_id, day))
    sessions = []
    for session_id, seq in clicks.items():
        if len(seq) < min_length:
            continue
        seq.sort()
        day = days[session_id]
        sessions.append(
            Session(
                session_id,
                tuple(item for _, _, item in seq),
                tuple(day + offset for offset, _, _ in seq),
            )
        )
    sessions.sort(key=lambda s: (days[s.session_id], _natural(s.session_id)))
    return sessions


def _day_ms(text: str) -> int:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"eventdate {text!r} is not YYYY-MM-DD") from None
    return int(day.timestamp() * 1000)


def _natural(session_id: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then other ids as strings."""
    return (0, int(session_id)) if session_id.isdigit() else (1, session_id)


#: Click types that say something about an item (as in ``streams.agents.clicks``).
ITEM_CLICK_TYPES = frozenset({"view", "add_to_cart", "purchase"})


def load_clicks(path: str | Path, *, min_length: int = 2) -> list[Session]:
    """Sessions from a JSONL file of borderflow ``clicks`` (the event contract).

    Each line is a click object (``docs/contracts.md``) or an envelope
    ``{"topic": ..., "value": {...}}`` as written by ``borderflow generate --out``; envelopes
    of other topics are skipped. Clicks of type view, add_to_cart and purchase make up a
    session (``user_id`` + ``session_id``), ordered by ``ts`` (ties keep file order);
    consecutive clicks on the same item count once, as in a user's profile (a view, cart and
    purchase of one item are one step of the session). Sessions are sorted by their first
    click; those with fewer than ``min_length`` items are dropped.
    """
    from pydantic import ValidationError

    from schemas.events import ClickEvent

    path = Path(path)
    clicks: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise SessionDataError(f"{path}:{line_no}: not a JSON object") from None
            if isinstance(obj, dict) and "topic" in obj and "value" in obj:
                if obj["topic"] != "clicks":
                    continue
                obj = obj["value"]
            try:
                event = ClickEvent.model_validate(obj)
            except ValidationError as exc:
                reason = exc.errors()[0]
                where = ".".join(str(part) for part in reason["loc"]) or "click"
                raise SessionDataError(
                    f"{path}:{line_no}: not a borderflow click ({where}: {reason['msg']})"
                ) from None
            if event.type not in ITEM_CLICK_TYPES or event.item_id is None:
                continue
            seq = clicks.setdefault((event.user_id, event.session_id), [])
            seq.append((event.ts, len(seq), event.item_id))
    sessions = []
    for (_, session_id), seq in clicks.items():
        seq.sort()
        items: list[str] = []
        stamps: list[int] = []
        for ts, _, item in seq:
            if items and items[-1] == item:
                continue
            items.append(item)
            stamps.append(ts)
        if len(items) >= min_length:
            sessions.append(Session(session_id, tuple(items), tuple(stamps)))
    sessions.sort(key=lambda s: (s.timestamps[0], s.session_id))
    return sessions


def detect_format(path: str | Path) -> str:
    """``"diginetica"`` or ``"clicks"`` from the file's first line."""
    path = Path(path)
    with path.open("rb") as handle:
        first = handle.readline(4096).decode("utf-8-sig", errors="replace").strip()
    if first.startswith("{"):
        return "clicks"
    columns = {column.strip() for column in first.split(";")}
    if columns >= set(DIGINETICA_COLUMNS):
        return "diginetica"
    raise SessionDataError(
        f"{path}: unknown format (expected a DIGINETICA header "
        f"{';'.join(DIGINETICA_COLUMNS)} or JSONL clicks)"
    )


def load_sessions(path: str | Path, fmt: str = "auto") -> list[Session]:
    """Load ``path`` as ``fmt`` (``diginetica``, ``clicks`` or ``auto``)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "diginetica":
        return load_diginetica(path)
    if fmt == "clicks":
        return load_clicks(path)
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------------------------
# Protocol and metrics
# --------------------------------------------------------------------------------------------


def target_kind(prefix: Sequence[str], target: str) -> str:
    """``last`` (the item just clicked again), ``repeat`` (an earlier one) or ``new``."""
    if prefix and prefix[-1] == target:
        return "last"
    return "repeat" if target in prefix else "new"


def rank_of(recommended: Sequence[str], target: str) -> int | None:
    """1-based rank of ``target`` in ``recommended``, None when absent."""
    for rank, item in enumerate(recommended, start=1):
        if item == target:
            return rank
    return None


@dataclass
class _Tally:
    """Running sums for one recommender (internal to :func:`evaluate`)."""

    ks: tuple[int, ...]
    n: int = 0
    hits: dict[int, int] = field(default_factory=dict)
    reciprocal: dict[int, float] = field(default_factory=dict)
    recommended: dict[int, set[str]] = field(default_factory=dict)
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # n, hits@K, rr@K
    recommend_s: list[float] = field(default_factory=list)
    observe_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for k in self.ks:
            self.hits[k] = 0
            self.reciprocal[k] = 0.0
            self.recommended[k] = set()
        for kind in TARGET_KINDS:
            self.by_kind[kind] = [0, 0, 0.0]

    def score(self, recommended: Sequence[str], target: str, kind: str) -> None:
        self.n += 1
        rank = rank_of(recommended, target)
        for k in self.ks:
            self.recommended[k].update(recommended[:k])
            if rank is not None and rank <= k:
                self.hits[k] += 1
                self.reciprocal[k] += 1.0 / rank
        top = self.ks[-1]
        tally = self.by_kind[kind]
        tally[0] += 1
        if rank is not None and rank <= top:
            tally[1] += 1
            tally[2] += 1.0 / rank


@dataclass(frozen=True)
class RecMetrics:
    """Metrics of one recommender under :func:`evaluate` (see the module docstring)."""

    n: int
    hr: dict[int, float]
    mrr: dict[int, float]
    precision: dict[int, float]
    coverage: dict[int, float]
    #: Per target kind (``new``/``repeat``/``last``): ``n``, ``hr`` and ``mrr`` at max(ks).
    by_target: dict[str, dict[str, float]]
    recommend_us_mean: float
    recommend_us_p99: float
    observe_us_mean: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (string keys)."""
        return {
            "n": self.n,
            "hr": {str(k): v for k, v in self.hr.items()},
            "mrr": {str(k): v for k, v in self.mrr.items()},
            "precision": {str(k): v for k, v in self.precision.items()},
            "coverage": {str(k): v for k, v in self.coverage.items()},
            "by_target": self.by_target,
            "recommend_us_mean": self.recommend_us_mean,
            "recommend_us_p99": self.recommend_us_p99,
            "observe_us_mean": self.observe_us_mean,
        }


def _metrics(tally: _Tally, catalog: int) -> RecMetrics:
    n = tally.n
    hr = {k: tally.hits[k] / n if n else 0.0 for k in tally.ks}
    by_target = {
        kind: {
            "n": int(count),
            "hr": hits / count if count else 0.0,
            "mrr": rr / count if count else 0.0,
        }
        for kind, (count, hits, rr) in tally.by_kind.items()
    }
    return RecMetrics(
        n=n,
        hr=hr,
        mrr={k: tally.reciprocal[k] / n if n else 0.0 for k in tally.ks},
        precision={k: hr[k] / k for k in tally.ks},
        coverage={k: len(tally.recommended[k]) / catalog if catalog else 0.0 for k in tally.ks},
        by_target=by_target,
        recommend_us_mean=_mean_us(tally.recommend_s),
        recommend_us_p99=_p99_us(tally.recommend_s),
        observe_us_mean=_mean_us(tally.observe_s),
    )


def _mean_us(seconds: list[float]) -> float:
    return 1e6 * sum(seconds) / len(seconds) if seconds else 0.0


def _p99_us(seconds: list[float]) -> float:
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    return 1e6 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Sorted, distinct, positive cut-offs (ValueError otherwise)."""
    result = tuple(sorted(set(ks)))
    if not result or result[0] < 1:
        raise ValueError("cut-offs k must be positive integers")
    return result


def evaluate(
    sessions: Iterable[Session],
    models: Mapping[str, SessionModel],
    *,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, RecMetrics]:
    """Run the predict-then-learn protocol (module docstring) for every model, side by side.

    Each click is shown to all models before the next one, in the order of ``models``.
    """
    cutoffs = check_ks(ks)
    n = cutoffs[-1]
    tallies = {name: _Tally(cutoffs) for name in models}
    catalog: set[str] = set()
    clock = time.perf_counter
    for session in sessions:
        catalog.update(session.items)
        for t, (item, ts) in enumerate(zip(session.items, session.timestamps, strict=True)):
            prefix = session.items[:t]
            kind = target_kind(prefix, item) if t else ""
            for name, model in models.items():
                tally = tallies[name]
                if t:
                    began = clock()
                    recommended = list(model.recommend(prefix, n))[:n]
                    tally.recommend_s.append(clock() - began)
                    tally.score(recommended, item, kind)
                began = clock()
                model.observe(prefix, item, ts)
                tally.observe_s.append(clock() - began)
    return {name: _metrics(tally, len(catalog)) for name, tally in tallies.items()}


# --------------------------------------------------------------------------------------------
# Baselines and borderflow's adapter
# --------------------------------------------------------------------------------------------


class Popularity:
    """Most clicked items so far (every click counts; ties: smaller item id first).

    The top list is maintained incrementally: counts only grow, so an item can only enter
    the top by its own click, which keeps ``observe`` and ``recommend`` O(top).
    """

    def __init__(self, top: int = 100) -> None:
        self.counts: dict[str, int] = {}
        self._top_size = top
        self._top: list[str] = []

    def _key(self, item: str) -> tuple[int, str]:
        return (-self.counts[item], item)

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        self.counts[item] = self.counts.get(item, 0) + 1
        top = self._top
        if item in top:
            top.sort(key=self._key)
        elif len(top) < self._top_size:
            top.append(item)
            top.sort(key=self._key)
        elif self._key(item) < self._key(top[-1]):
            top[-1] = item
            top.sort(key=self._key)

    def recommend(self, session_prefix: Sequence[str], n: int) -> list[str]:
        if n > self._top_size:
            return [i for i, _ in heapq.nsmallest(n, self.counts.items(), key=_pop_key)]
        return self._top[:n]


def _pop_key(kv: tuple[str, int]) -> tuple[int, str]:
    return (-kv[1], kv[0])


class ItemKNN:
    """Item-to-item kNN of Hidasi et al. (2016), learned online.

    ``sim(i, j) = co(i, j) / sqrt(count(i) * count(j))``: ``count(i)`` is the number of
    sessions that contain ``i``, ``co(i, j)`` the number that contain both (cosine of the
    binary session vectors). It recommends the most similar items of the session's last
    item (never the item itself; nothing when the last item has no neighbour yet; ties:
    smaller item id first). The current session counts from its first click on: a click
    on an item new to the session adds one to ``count(item)`` and to its co-occurrence with
    every distinct earlier item of the session. Memory is not bounded (a baseline).
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.co: dict[str, dict[str, int]] = {}

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        if item in session_prefix:
            return  # the session already contains it
        self.counts[item] = self.counts.get(item, 0) + 1
        row = self.co.setdefault(item, {})
        for other in set(session_prefix):
            row[other] = row.get(other, 0) + 1
            other_row = self.co.setdefault(other, {})
            other_row[item] = other_row.get(item, 0) + 1

    def similarity(self, a: str, b: str) -> float:
        co = self.co.get(a, {}).get(b, 0)
        return co / math.sqrt(self.counts[a] * self.counts[b]) if co else 0.0

    def recommend(self, session_prefix: Sequence[str], n: int) -> list[str]:
        if not session_prefix:
            return []
        last = session_prefix[-1]
        row = self.co.get(last)
        if not row:
            return []
        counts = self.counts
        scored = ((co / math.sqrt(counts[j]), j) for j, co in row.items())
        return [j for _, j in heapq.nsmallest(n, scored, key=lambda sj: (-sj[0], sj[1]))]


class BorderflowAdapter:
    """borderflow's :class:`~models.recommender.SessionRecommender` under the protocol.

    Clicks are views without country or category (global popularity), at the data's event
    time; ``recommend`` is the personalised answer for the session prefix.
    """

    def __init__(self, recommender: SessionRecommender | None = None) -> None:
        self.recommender = recommender if recommender is not None else SessionRecommender()

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        self.recommender.observe(
            session_prefix, item, country=None, category=None, ts_ms=ts, kind="view"
        )

    def recommend(self, session_prefix: Sequence[str], n: int) -> list[str]:
        recs = self.recommender.recommend(session_prefix, country=None, n=n)
        return [item for item, _ in recs]


def default_models() -> dict[str, SessionModel]:
    """The three recommenders ``borderflow eval recs`` compares, in table order."""
    return {"borderflow": BorderflowAdapter(), "item-kNN": ItemKNN(), "popularity": Popularity()}
