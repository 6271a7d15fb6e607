"""The chaos tests' inputs: one valid workload, and the same workload inside a hostile stream.

Both runs see the valid events in the same micro-batches (the hostile run's batches carry
the hostile messages between them, plus hostile-only batches), so any difference in their
results is caused by the hostile input, not by batching.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass
from typing import Any

from infra.generator import GeneratorConfig, generate_to_list
from infra.hostile import (
    INPUT_TOPICS,
    Event,
    HostileGenerator,
    Message,
    Mix,
    Reject,
    odd_workload,
    plain_bytes,
    stream_stats,
)
from schemas.events import DeadLetter
from streams.runtime import DEADLETTER_TEXT_BYTES, MAX_DEADLETTER_PAYLOAD

#: A few thousand valid events with every topic, fraud, labels and whole shipment journeys.
VALID = GeneratorConfig(users=60, days=4, seed=7, settlement_delay_days=1.0, fraud_rate=0.1)
#: Valid events per step; each step is one batch per input topic, in this order.
CHUNK = 150


@dataclass(frozen=True)
class Step:
    """One micro-batch of one input topic."""

    topic: str
    messages: list[Message]


def valid_workload(seed: int = 1) -> list[Event]:
    """The valid workload: simulated events, with odd but valid ids, texts and codes."""
    return odd_workload(generate_to_list(VALID), seed=seed)


def schedules(
    workload: list[Event],
    hostile_per_topic: int,
    *,
    seed: int = 3,
    chunk: int = CHUNK,
    huge_bytes: int | None = None,
    mix: Mix | None = None,
) -> tuple[list[Step], list[Step]]:
    """(baseline, hostile): the workload alone, plainly encoded; and the workload oddly
    encoded among ``hostile_per_topic`` hostile events per input topic."""
    chunks = [workload[i : i + chunk] for i in range(0, len(workload), chunk)]
    generator = HostileGenerator(seed=seed, mix_shares=mix or Mix())
    if huge_bytes is not None:
        generator.huge_bytes = huge_bytes
    baseline: list[Step] = []
    hostile: list[Step] = []
    for number, events in enumerate(chunks):
        for topic in INPUT_TOPICS:
            valid = [event for event in events if event.topic == topic]
            # Spread the hostile budget evenly; the last chunk takes the remainder.
            budget = hostile_per_topic // len(chunks)
            if number == len(chunks) - 1:
                budget = hostile_per_topic - budget * (len(chunks) - 1)
            if valid:
                plain = [
                    Message(
                        topic, e.key.encode(), plain_bytes(e), accepted=(str(e.value["event_id"]),)
                    )
                    for e in valid
                ]
                baseline.append(Step(topic, plain))
            hostile.append(Step(topic, generator.mix(topic, valid, budget)))
    return baseline, hostile


def stats_by_topic(steps: list[Step]) -> dict[str, dict[str, int]]:
    return {
        topic: stream_stats(m for step in steps if step.topic == topic for m in step.messages)
        for topic in INPUT_TOPICS
    }


def check_deadletters(
    letters: list[dict[str, Any]], placed: dict[tuple[str, int, int], Message]
) -> tuple[Counter[str], list[str]]:
    """Match every dead letter (its JSON fields plus ``key``) to its expected reject, by
    (source topic, partition, offset, index) of the ``placed`` messages; returns (cases
    seen, problems)."""
    expected: dict[tuple[str, int, int, int | None], tuple[Message, Reject]] = {}
    for position, message in placed.items():
        for reject in message.rejects:
            expected[(*position, reject.index)] = (message, reject)
    problems: list[str] = []
    cases: Counter[str] = Counter()
    seen: set[tuple[str, int, int, int | None]] = set()
    for letter in letters:
        where = (letter["source_topic"], letter["partition"], letter["offset"], letter["index"])
        found = expected.get(where)
        if found is None or where in seen:
            problems.append(f"unexpected dead letter at {where}: {letter['error'][:200]}")
            continue
        seen.add(where)
        message, reject = found
        cases[reject.case.split("=")[0]] += 1
        kept = reject.payload[:MAX_DEADLETTER_PAYLOAD]
        if reject.expect.lower() not in letter["error"].lower():
            problems.append(f"{where} {reject.case}: error {letter['error'][:200]!r}")
        elif letter["key"] != message.key:
            problems.append(f"{where} {reject.case}: key {letter['key']!r} != {message.key!r}")
        elif base64.b64decode(letter["payload_b64"]) != kept:
            problems.append(f"{where} {reject.case}: payload_b64 is not the original bytes")
        elif (letter["payload_bytes"], letter["truncated"]) != (
            len(reject.payload),
            len(kept) < len(reject.payload),
        ):
            problems.append(f"{where} {reject.case}: size {letter['payload_bytes']}")
        elif letter["payload"] != kept[:DEADLETTER_TEXT_BYTES].decode("utf-8", "replace"):
            problems.append(f"{where} {reject.case}: payload text differs")
    for where in expected.keys() - seen:
        problems.append(f"missing dead letter at {where}: {expected[where][1].case}")
    # The contract's schema, checked on a sample (every letter was built by the model).
    for letter in letters[:: max(1, len(letters) // 500)]:
        DeadLetter.model_validate({k: v for k, v in letter.items() if k != "key"})
    return cases, problems
