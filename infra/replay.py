"""``borderflow replay FILE...``: send recorded events (JSONL envelopes or CSV) to Kafka.

Replay is how recorded or hand-made data enters the same path as live traffic: each record
goes to ``settings.topic(topic)`` keyed by its user id, with its own ``ts`` untouched (also
used as the Kafka message timestamp). Replay deliberately validates nothing: the worker is
the one place that validates and dead-letters, so a bad row must reach the topic like any
other. Only what replay itself needs is checked - that a file exists and that each record
names a known input topic.

Inputs:

* JSONL: one envelope per line, ``{"topic": "clicks", "key": "u1", "value": {...}}`` (what
  ``borderflow generate --out`` writes). With ``--topic``, bare event objects and lines that
  are not JSON at all (sent as raw bytes, for the worker to reject) are accepted too.
* CSV: a header row; a ``topic`` column or ``--topic`` for the whole file; every other column
  is a value field, empty cells are dropped, and ``ts``/``promised_ts`` digits and
  ``price``/``amount`` numbers are converted from text. The delimiter (``,;|`` or tab) is
  taken from the header line.

Pacing: ``--rate N`` (token bucket, N events per second) or ``--speed X`` (event time: X times
real time, from the gaps between ``ts`` values). The pacing logic is pure (the clock is passed
in) so it is unit tested without sleeping; :func:`send_records` is shared with
``borderflow generate``.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click
import orjson

from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS, to_epoch_ms

INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)
#: CSV columns converted from text: epoch-ms timestamps and money.
INT_FIELDS = frozenset({"ts", "promised_ts"})
FLOAT_FIELDS = frozenset({"price", "amount"})
#: Waits shorter than this are deferred (the token bucket remembers the debt): sleeping for
#: microseconds costs more than it paces.
MIN_WAIT_S = 0.002


class Record(NamedTuple):
    """One message to send: contract topic, key (None: unkeyed), value bytes, event time."""

    topic: str
    key: str | None
    value: bytes
    ts: int | None


# --------------------------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------------------------


def check_topic(topic: Any, where: str) -> str:
    """The contract topic name, or a readable :class:`BorderflowError`."""
    if not topic:
        raise BorderflowError(f"{where}: no topic (add a 'topic' or pass --topic)")
    if topic not in INPUT_TOPICS:
        raise BorderflowError(
            f"{where}: unknown topic {topic!r} (expected one of: {', '.join(INPUT_TOPICS)})"
        )
    return str(topic)


def event_ts(value: Any) -> int | None:
    """The event time of a value in epoch ms, or None when absent or unreadable."""
    if not isinstance(value, dict):
        return None
    try:
        return to_epoch_ms(value.get("ts"))
    except ValueError:
        return None


def record_key(key: Any, value: Any) -> str | None:
    """The partition key: the envelope's key, else the value's ``user_id``."""
    for candidate in (key, value.get("user_id") if isinstance(value, dict) else None):
        if isinstance(candidate, str) and candidate:
            return candidate
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return str(candidate)
    return None


def parse_jsonl_line(line: bytes, default_topic: str | None, where: str) -> Record | None:
    """One JSONL line as a record; None for a blank line.

    >>> parse_jsonl_line(b'{"topic":"clicks","key":"u1","value":{"ts":1767225600000}}', None, "x")
    Record(topic='clicks', key='u1', value=b'{"ts":1767225600000}', ts=1767225600000)
    """
    line = line.strip()
    if not line:
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        if default_topic is None:
            raise BorderflowError(
                f"{where}: not JSON and no --topic to send it to (expected an envelope "
                '{"topic": ..., "key": ..., "value": {...}})'
            ) from None
        # Not JSON, but the topic is known: the worker dead-letters it with its reason.
        return Record(default_topic, None, line, None)
    if isinstance(obj, dict) and "value" in obj and ("topic" in obj or default_topic):
        topic = check_topic(obj.get("topic") or default_topic, where)
        value = obj["value"]
        return Record(
            topic, record_key(obj.get("key"), value), orjson.dumps(value), event_ts(value)
        )
    if default_topic is None:
        raise BorderflowError(
            f"{where}: not an envelope with 'topic' and 'value' (use --topic for bare events)"
        )
    return Record(default_topic, record_key(None, obj), line, event_ts(obj))


def _convert_cell(name: str, text: str) -> Any:
    if name in INT_FIELDS and text.isascii() and text.isdigit():
        return int(text)
    if name in FLOAT_FIELDS:
        try:
            number = float(text)
        except ValueError:
            return text  # left as text: the worker reports the bad amount
        return number if math.isfinite(number) else text
    return text


def csv_row_value(row: dict[str | None, Any]) -> dict[str, Any]:
    """A CSV row (without its ``topic``) as an event value: empty cells dropped, numbers parsed.

    >>> csv_row_value({"ts": "1767225600000", "amount": "12.5", "currency": "EUR", "x": ""})
    {'ts': 1767225600000, 'amount': 12.5, 'currency': 'EUR'}
    """
    value: dict[str, Any] = {}
    for name, cell in row.items():
        # DictReader puts surplus cells under None and fills missing ones with None.
        if name is None or name == "topic" or cell is None:
            continue
        text = cell.strip()
        if text:  # empty (or blank) cells are absent fields, not empty strings
            value[name] = _convert_cell(name, text)
    return value


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def parse_csv(
    text_lines: Iterable[str], default_topic: str | None, source: str
) -> Iterator[Record]:
    """Records of a CSV file given as lines (header first)."""
    lines = iter(text_lines)
    header = next(lines, None)
    if header is None:
        return
    fields = next(csv.reader([header], delimiter=_sniff_delimiter(header)))
    fields = [f.strip() for f in fields]
    if "topic" not in fields and default_topic is None:
        raise BorderflowError(f"{source}: no 'topic' column; pass --topic for the whole file")
    reader = csv.DictReader(lines, fieldnames=fields, delimiter=_sniff_delimiter(header))
    for row in reader:
        where = f"{source}:{reader.line_num + 1}"
        topic = check_topic(row.get("topic") or default_topic, where)
        value = csv_row_value(row)
        yield Record(topic, record_key(None, value), orjson.dumps(value), event_ts(value))


def is_csv(path: Path) -> bool:
    """CSV by extension; anything else is read as JSONL."""
    return path.suffix.lower() in {".csv", ".tsv"}


def read_records(paths: Sequence[Path], default_topic: str | None) -> Iterator[Record]:
    """Every record of every file, in file order."""
    for path in paths:
        try:
            if is_csv(path):
                with path.open(encoding="utf-8-sig", newline="") as text:
                    yield from parse_csv(text, default_topic, str(path))
            else:
                with path.open("rb") as raw:
                    for number, line in enumerate(raw, start=1):
                        record = parse_jsonl_line(line, default_topic, f"{path}:{number}")
                        if record is not None:
                            yield record
        except OSError as exc:
            raise BorderflowError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise BorderflowError(f"{path}: not UTF-8 text ({exc.reason})") from None


def count_records(paths: Sequence[Path]) -> int:
    """Upper bound of the record count (lines, minus CSV headers), for the progress bar."""
    total = 0
    for path in paths:
        with path.open("rb") as raw:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: raw.read(1 << 20), b""))
        total += max(0, lines - 1) if is_csv(path) else lines
    return total


# --------------------------------------------------------------------------------------------
# Pacing (pure: the caller passes the clock)
# --------------------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` events per second with a small burst; :meth:`delay` says how long to wait.

    Tokens may go negative (a debt): the returned wait pays it back, and short waits the
    caller skips are simply repaid by a longer one later, so the average rate stays exact.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate / 20)  # 50 ms of burst
        self.tokens = self.capacity
        self.last: float | None = None

    def delay(self, now: float) -> float:
        """Take one token at time ``now`` (seconds); return the seconds to wait before sending."""
        if self.last is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class EventTimePacer:
    """Event-time pacing: an event is due ``(ts - first_ts) / speed`` after the first one.

    Out-of-order and ts-less events are due as soon as the latest ts seen so far: the replay
    clock never runs backwards, so a late event is sent at once instead of stalling the rest.
    """

    def __init__(self, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self.first_ts: int | None = None
        self.max_ts: int | None = None
        self.start: float | None = None

    def due(self, ts: int | None) -> float:
        """Seconds after the first event at which this one should be sent."""
        if ts is not None:
            if self.first_ts is None:
                self.first_ts = self.max_ts = ts
            elif self.max_ts is not None and ts > self.max_ts:
                self.max_ts = ts
        if self.first_ts is None or self.max_ts is None:
            return 0.0
        return (self.max_ts - self.first_ts) / 1000.0 / self.speed

    def delay(self, ts: int | None, now: float) -> float:
        """Seconds to wait at wall time ``now`` before sending the event with ``ts``."""
        due = self.due(ts)
        if self.start is None:
            self.start = now
        return max(0.0, self.start + due - now)


def pacing_offsets(ts_values: Iterable[int | None], speed: float) -> list[float]:
    """When each event is due, in seconds after the first, at ``speed`` x real time.

    >>> pacing_offsets([1_000, 3_000, 2_000, None, 7_000], speed=2.0)
    [0.0, 1.0, 1.0, 1.0, 3.0]
    """
    pacer = EventTimePacer(speed)
    return [pacer.due(ts) for ts in ts_values]


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


@dataclass
class SendStats:
    per_topic: Counter[str] = field(default_factory=Counter)
    unkeyed: int = 0
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.per_topic.values())


def send_records(
    settings: Settings,
    records: Iterable[Record],
    *,
    rate: float = 0.0,
    speed: float = 0.0,
    quiet: bool = False,
    total: int | None = None,
    stats: SendStats | None = None,
) -> SendStats:
    """Produce ``records`` to their broker-side topics, paced, with a progress bar.

    Pass ``stats`` to keep the counts when a record fails to parse half-way (the records
    before it are sent and flushed by then).
    """
    from tqdm import tqdm

    from sinks.kafka import EventProducer

    if rate and speed:
        raise BorderflowError("use either --rate or --speed, not both")
    bucket = TokenBucket(rate) if rate > 0 else None
    pacer = EventTimePacer(speed) if speed > 0 else None
    stats = stats if stats is not None else SendStats()
    names = {topic: settings.topic(topic) for topic in INPUT_TOPICS}
    began = time.perf_counter()
    progress = tqdm(
        total=total,
        unit="ev",
        unit_scale=True,
        mininterval=0.5,
        disable=quiet or not sys.stderr.isatty(),
    )
    pending_progress = 0
    try:
        with EventProducer(settings) as producer:
            for record in records:
                if bucket is not None or pacer is not None:
                    now = time.monotonic()
                    wait = bucket.delay(now) if bucket is not None else 0.0
                    if pacer is not None:
                        wait = max(wait, pacer.delay(record.ts, now))
                    if wait >= MIN_WAIT_S:
                        progress.update(pending_progress)
                        pending_progress = 0
                        producer.wait(wait)
                producer.send(names[record.topic], record.key, record.value, record.ts)
                stats.per_topic[record.topic] += 1
                if record.key is None:
                    stats.unkeyed += 1
                pending_progress += 1
                if pending_progress >= 1000:
                    progress.update(pending_progress)
                    pending_progress = 0
            progress.update(pending_progress)
    finally:
        progress.close()
    stats.elapsed_s = time.perf_counter() - began
    return stats


@click.command("replay")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--topic",
    default=None,
    help="Topic for records that do not name one (CSV without a topic column, bare JSON events).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Events per second (0 = as fast as possible).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Event-time pacing: X times real time, from the gaps between ts values.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def replay_command(
    settings: Settings,
    files: tuple[Path, ...],
    topic: str | None,
    rate: float,
    speed: float,
    quiet: bool,
) -> None:
    """Send JSONL envelopes or CSV rows to the contract topics, keyed by user id."""
    from sinks.kafka import ensure_topics

    if rate and speed:
        raise BorderflowError("use either --rate or --speed, not both")
    if topic is not None:
        check_topic(topic, "--topic")
    for path in files:
        if not path.is_file():
            raise BorderflowError(f"no such file: {path}")
    total = None if quiet or not sys.stderr.isatty() else count_records(files)
    ensure_topics(settings, INPUT_TOPICS)
    stats = SendStats()
    try:
        send_records(
            settings,
            read_records(files, topic),
            rate=rate,
            speed=speed,
            quiet=quiet,
            total=total,
            stats=stats,
        )
    except BorderflowError as error:
        raise BorderflowError(f"{error} ({stats.total} earlier events were sent)") from None
    topics = " ".join(f"{t}={stats.per_topic.get(t, 0)}" for t in INPUT_TOPICS)
    per_s = stats.total / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    unkeyed = f"; {stats.unkeyed} without a key (sent unkeyed)" if stats.unkeyed else ""
    click.echo(
        f"replayed {stats.total} events from {len(files)} file(s) ({topics}){unkeyed}; "
        f"{stats.elapsed_s:.1f}s, {per_s:,.0f} events/s -> Kafka {settings.kafka_bootstrap} "
        f"(prefix {settings.topic_prefix!r})"
    )


if __name__ == "__main__":  # pragma: no cover - `borderflow replay` is the entry point
    try:
        replay_command.main(obj=Settings())
    except BorderflowError as error:
        sys.exit(f"error: {error}")
