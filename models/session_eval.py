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

``split`` protocol (:func:`split_by_days`, session-rec's single split): sessions ending before
the last ``test_days`` are learned first without predictions, test clicks on items unseen in
training are removed; the test sessions are then predicted as above, the models learning each
click after predicting it (``learn=True``) or frozen (``learn=False``, the literature's).

Formats (:func:`detect_format`, each also gzip-compressed): DIGINETICA, borderflow JSONL
clicks, RetailRocket ``events.csv`` (sessions = a visitor's events with < 30 min gaps, cut on
all events, then only views kept, as session-rec), YOOCHOOSE clicks, and delimited files whose
header names session or user, item and time columns (:data:`COLUMN_ALIASES`).

Preprocessing as in the literature (:func:`filter_sessions`, session-rec's order): one-click
sessions dropped, then clicks on items with fewer than ``min_item_support`` clicks, then
sessions left shorter than two clicks; consecutive repeats are kept. ``min_item_support``
defaults to 5 (session-rec) only for files of 100,000+ clicks: on a small sample it would
remove most of the data; numbers on a sample are only comparable with baselines run on the
same sample.

>>> sessions = [Session("1", ("a", "b"), (0, 1)), Session("2", ("a", "b"), (2, 3))]
>>> result = evaluate(sessions, {"knn": ItemKNN()}, ks=(1, 2))["knn"]
>>> result.n, result.hr[1], result.mrr[2]  # the first session taught it a -> b
(2, 0.5, 0.5)
"""

from __future__ import annotations

import csv
import gzip
import heapq
import io
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TextIO

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
    with open_text(path) as handle:
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
    return (
        (0, int(session_id)) if session_id.isascii() and session_id.isdigit() else (1, session_id)
    )


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
    with open_text(path) as handle:
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


def open_text(path: str | Path) -> TextIO:
    """``path`` as UTF-8 text (a BOM is skipped), transparently gunzipped when compressed."""
    path = Path(path)
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


#: Column names (lower case, ``_``/``-``/spaces removed) of a generic click file, by role.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "session": ("sessionid", "session", "sid"),
    "user": ("userid", "user", "visitorid", "visitor", "customerid", "clientid"),
    "item": ("itemid", "item", "productid", "product", "aid"),
    "time": ("time", "timestamp", "ts", "eventtime", "datetime", "timeframe", "eventdate", "date"),
    "type": ("type", "event", "eventtype", "action"),
}
#: Event types that are item views (``--events view``); other types still bound sessions.
VIEW_TYPES = frozenset({"view", "views", "click", "clicks", "pageview", "detail", "0"})
#: RetailRocket's ``events.csv`` header.
RETAILROCKET_COLUMNS = ("timestamp", "visitorid", "event", "itemid")
#: Sessions of users without session ids end after this much inactivity (session-rec's 30 min).
SESSION_GAP_MS = 30 * 60 * 1000
FORMATS = ("diginetica", "clicks", "retailrocket", "yoochoose", "delimited")
_ISO = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


def _column_key(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", name.strip().strip('"').lower())


@dataclass(frozen=True)
class ColumnSpec:
    """Where a delimited click file keeps what a session needs (0-based column indices)."""

    delimiter: str
    header: bool
    item: int
    time: int
    session: int | None = None
    user: int | None = None
    type: int | None = None


def _sniff(first: str) -> tuple[str, list[str]]:
    """The delimiter (tab, ``;`` or ``,``) that splits ``first`` into the most fields."""
    best = max(("\t", ";", ","), key=lambda d: len(first.split(d)))
    return best, next(csv.reader([first], delimiter=best))


def _header_spec(delimiter: str, fields: list[str]) -> ColumnSpec | None:
    keys = [_column_key(f) for f in fields]
    found: dict[str, int] = {}
    for role, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in keys and keys.index(alias) not in found.values():
                found[role] = keys.index(alias)
                break
    if "item" not in found or "time" not in found:
        return None
    if "session" not in found and "user" not in found:
        return None
    return ColumnSpec(
        delimiter,
        True,
        item=found["item"],
        time=found["time"],
        session=found.get("session"),
        user=found.get("user"),
        type=found.get("type"),
    )


def _first_line(path: Path) -> str:
    with path.open("rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if compressed else path.open("rb") as handle:
        first = handle.readline(65536)
    return first.decode("utf-8-sig", errors="replace").strip("\r\n")


def detect_format(path: str | Path) -> str:
    """The format of a click file from its first line (one of :data:`FORMATS`)."""
    path = Path(path)
    try:
        first = _first_line(path)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise SessionDataError(f"{path}: not a text click file ({exc})") from None
    if not first.strip():
        raise SessionDataError(f"{path}:1: empty first line, expected a header or a click")
    if first.lstrip().startswith("{"):
        return "clicks"
    columns = {column.strip() for column in first.split(";")}
    if columns >= set(DIGINETICA_COLUMNS):
        return "diginetica"
    delimiter, fields = _sniff(first)
    keys = [_column_key(f) for f in fields]
    if delimiter == "," and set(keys) >= set(RETAILROCKET_COLUMNS):
        return "retailrocket"
    if delimiter == "," and len(fields) in (4, 5) and _ISO.match(fields[1].strip()):
        if len(fields) == 5:
            raise SessionDataError(
                f"{path}:1: looks like YOOCHOOSE buys (session,timestamp,item,price,quantity); "
                "evaluate the clicks file (yoochoose-clicks.dat) instead"
            )
        return "yoochoose"
    if _header_spec(delimiter, fields) is not None:
        return "delimited"
    raise SessionDataError(
        f"{path}:1: unknown format (expected a DIGINETICA header, JSONL clicks, RetailRocket "
        "events.csv, YOOCHOOSE clicks, or a delimited header with session or user, item and "
        f"time columns such as SessionId,ItemId,Time; got {first[:80]!r})"
    )


def _epoch_ms(text: str) -> int:
    """Epoch time in ms from seconds, ms or us since 1970 (told apart by size) or ISO 8601."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"time {text!r} is neither epoch seconds/ms nor ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    if not math.isfinite(value):
        raise ValueError(f"time {text!r} is not a number")
    magnitude = abs(value)
    if magnitude >= 1e14:  # microseconds
        return int(value // 1000)
    if magnitude >= 1e11:  # milliseconds (1e11 s would be the year 5138)
        return int(value)
    return int(value * 1000)  # seconds


def load_delimited(
    path: str | Path,
    spec: ColumnSpec | None = None,
    *,
    events: str = "all",
    session_gap_ms: int = SESSION_GAP_MS,
    min_length: int = 2,
) -> list[Session]:
    """Sessions from a delimited click file: RetailRocket, YOOCHOOSE or a generic header.

    Clicks of a session column are grouped by it; without one, each user's clicks (in time
    order) are cut into sessions wherever ``session_gap_ms`` passes without a click, as
    session-rec does for RetailRocket. ``events="view"`` keeps only views (type column values
    in :data:`VIEW_TYPES`) *after* sessionizing on all events; ``"all"`` keeps every row.
    Clicks in a session are in time order (ties keep file order); sessions are sorted by
    their first click and those with fewer than ``min_length`` clicks dropped.
    """
    path = Path(path)
    if spec is None:
        delimiter, fields = _sniff(_first_line(path))
        spec = _header_spec(delimiter, fields)
        if spec is None:
            raise SessionDataError(f"{path}:1: no session/user, item and time columns in header")
    only_views = events == "view" and spec.type is not None
    by_session = spec.session is not None
    group_at = spec.session if spec.session is not None else spec.user
    assert group_at is not None
    width = max(i for i in (spec.item, spec.time, group_at, spec.type) if i is not None) + 1
    interned: dict[str, str] = {}
    groups: dict[str, list[tuple[int, str, bool]]] = {}
    sep = repr(spec.delimiter)
    item_at, time_at, type_at = spec.item, spec.time, spec.type
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=spec.delimiter)
        line_no = 0
        if spec.header:
            next(reader, None)
            line_no = 1
        for row in reader:
            line_no += 1
            if len(row) < width:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                raise SessionDataError(
                    f"{path}:{line_no}: expected at least {width} {sep}-separated fields, "
                    f"got {len(row)}"
                )
            item = row[item_at].strip()
            key = row[group_at].strip()
            if not item or not key:
                raise SessionDataError(f"{path}:{line_no}: empty item or session/user id")
            try:
                ts = _epoch_ms(row[time_at])
            except ValueError as exc:
                raise SessionDataError(f"{path}:{line_no}: {exc}") from None
            item = interned.setdefault(item, item)
            keep = not only_views or row[type_at].strip().lower() in VIEW_TYPES  # type: ignore[index]
            seq = groups.get(key)
            if seq is None:
                groups[key] = [(ts, item, keep)]
            else:
                seq.append((ts, item, keep))
    sessions: list[Session] = []
    first_of = itemgetter(0)
    for key, seq in groups.items():
        seq.sort(key=first_of)
        if by_session:
            parts = [seq]
        else:
            parts = []
            start = 0
            for i in range(1, len(seq)):
                if seq[i][0] - seq[i - 1][0] > session_gap_ms:
                    parts.append(seq[start:i])
                    start = i
            parts.append(seq[start:])
        for n, part in enumerate(parts):
            clicks = [(ts, item) for ts, item, keep in part if keep]
            if len(clicks) < min_length:
                continue
            session_id = key if by_session else f"{key}:{n}"
            sessions.append(
                Session(
                    session_id,
                    tuple(item for _, item in clicks),
                    tuple(ts for ts, _ in clicks),
                )
            )
    sessions.sort(key=lambda s: (s.timestamps[0], _natural(s.session_id)))
    return sessions


#: YOOCHOOSE (RecSys Challenge 2015) ``yoochoose-clicks.dat``: session,timestamp,item,category.
YOOCHOOSE_SPEC = ColumnSpec(",", False, item=2, time=1, session=0)


@dataclass(frozen=True)
class Preprocessing:
    """How sessions are filtered before evaluation (reported with the results)."""

    min_item_support: int = 1
    min_session_length: int = 2
    events: str = "all"
    session_gap_min: float = 30.0
    limit_sessions: int = 0

    def describe(self) -> str:
        parts = [
            f"events: {self.events}",
            f"users' sessions (files without session ids) end after {self.session_gap_min:g} "
            "min idle",
            f"clicks on items with < {self.min_item_support} clicks removed"
            if self.min_item_support > 1
            else "all items kept",
            f"sessions with < {self.min_session_length} clicks removed",
            "consecutive repeats kept",
        ]
        if self.limit_sessions:
            parts.append(f"only the last {self.limit_sessions:,} sessions")
        return "; ".join(parts)


def filter_sessions(
    sessions: Sequence[Session], *, min_item_support: int = 1, min_length: int = 2
) -> list[Session]:
    """session-rec's filter: drop one-click sessions, then clicks on items with fewer than
    ``min_item_support`` clicks, then sessions left with fewer than ``min_length`` clicks."""
    sessions = [s for s in sessions if len(s.items) > 1]
    if min_item_support > 1:
        support: dict[str, int] = {}
        for s in sessions:
            for item in s.items:
                support[item] = support.get(item, 0) + 1
        kept = []
        for s in sessions:
            pairs = [
                (i, t)
                for i, t in zip(s.items, s.timestamps, strict=True)
                if support[i] >= min_item_support
            ]
            if len(pairs) != len(s.items):
                s = Session(s.session_id, tuple(i for i, _ in pairs), tuple(t for _, t in pairs))
            kept.append(s)
        sessions = kept
    return [s for s in sessions if len(s.items) >= min_length]


#: ``min_item_support="auto"``: literature's 5 for files of at least this many clicks, else 1.
AUTO_SUPPORT_CLICKS = 100_000


def load_sessions(
    path: str | Path,
    fmt: str = "auto",
    *,
    events: str = "auto",
    session_gap_min: float = 30.0,
    min_item_support: int | str = 1,
    min_length: int = 2,
    limit_sessions: int = 0,
) -> list[Session]:
    """Load ``path`` as ``fmt`` (one of :data:`FORMATS` or ``auto``) and filter it.

    ``events="auto"`` keeps only views for RetailRocket (as session-rec) and every click
    elsewhere. ``min_item_support="auto"`` is 5 (the literature's) for files of at least
    :data:`AUTO_SUPPORT_CLICKS` clicks, 1 for smaller samples. ``limit_sessions`` keeps only
    the most recent sessions (0: all).
    """
    sessions, _ = load_and_preprocess(
        path,
        fmt,
        events=events,
        session_gap_min=session_gap_min,
        min_item_support=min_item_support,
        min_length=min_length,
        limit_sessions=limit_sessions,
    )
    return sessions


def load_and_preprocess(
    path: str | Path,
    fmt: str = "auto",
    *,
    events: str = "auto",
    session_gap_min: float = 30.0,
    min_item_support: int | str = 1,
    min_length: int = 2,
    limit_sessions: int = 0,
) -> tuple[list[Session], Preprocessing]:
    """:func:`load_sessions` and the preprocessing it applied."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    if events == "auto":
        events = "view" if fmt == "retailrocket" else "all"
    if events not in ("view", "all"):
        raise ValueError(f"unknown events {events!r}")
    gap_ms = int(session_gap_min * 60_000)
    if fmt == "diginetica":
        sessions = load_diginetica(path, min_length=2)
    elif fmt == "clicks":
        sessions = load_clicks(path, min_length=2)
    elif fmt == "yoochoose":
        sessions = load_delimited(path, YOOCHOOSE_SPEC, session_gap_ms=gap_ms)
    else:
        sessions = load_delimited(path, events=events, session_gap_ms=gap_ms)
    if min_item_support == "auto":
        clicks = sum(len(s.items) for s in sessions)
        support = 5 if clicks >= AUTO_SUPPORT_CLICKS else 1
    else:
        support = int(min_item_support)
    sessions = filter_sessions(sessions, min_item_support=support, min_length=min_length)
    if limit_sessions and len(sessions) > limit_sessions:
        sessions = sessions[-limit_sessions:]
    return sessions, Preprocessing(support, min_length, events, session_gap_min, limit_sessions)


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


def split_by_days(
    sessions: Sequence[Session], test_days: float = 1.0
) -> tuple[list[Session], list[Session]]:
    """session-rec's time split: sessions that end in the last ``test_days`` days of the data
    are the test set, the others the training set; test clicks on items the training set
    never saw are removed, and test sessions left with fewer than two clicks dropped."""
    if not sessions:
        return [], []
    end = max(s.timestamps[-1] for s in sessions)
    boundary = end - int(test_days * 86_400_000)
    train = [s for s in sessions if s.timestamps[-1] < boundary]
    known = {item for s in train for item in s.items}
    test = []
    for s in sessions:
        if s.timestamps[-1] < boundary:
            continue
        pairs = [(i, t) for i, t in zip(s.items, s.timestamps, strict=True) if i in known]
        if len(pairs) >= 2:
            test.append(
                Session(s.session_id, tuple(i for i, _ in pairs), tuple(t for _, t in pairs))
            )
    return train, test


def evaluate(
    sessions: Iterable[Session],
    models: Mapping[str, SessionModel],
    *,
    ks: Iterable[int] = DEFAULT_KS,
    train: Iterable[Session] = (),
    learn: bool = True,
) -> dict[str, RecMetrics]:
    """Run the predict-then-learn protocol (module docstring) for every model, side by side.

    Each click is shown to all models before the next one, in the order of ``models``.
    ``train`` sessions are learned first, without predictions (the split protocol);
    ``learn=False`` freezes the models on ``sessions`` (they still see each session's prefix
    when asked, as in the literature's evaluation of a trained model).
    """
    cutoffs = check_ks(ks)
    n = cutoffs[-1]
    tallies = {name: _Tally(cutoffs) for name in models}
    catalog: set[str] = set()
    clock = time.perf_counter
    for session in train:
        for t, (item, ts) in enumerate(zip(session.items, session.timestamps, strict=True)):
            prefix = session.items[:t]
            for name, model in models.items():
                began = clock()
                model.observe(prefix, item, ts)
                tallies[name].observe_s.append(clock() - began)
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
                if learn:
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
