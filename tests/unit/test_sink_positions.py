"""Written positions are read from ClickHouse; while it is unreachable the read waits."""

from __future__ import annotations

from typing import Any

import pytest
from clickhouse_driver.errors import NetworkError

from schemas.config import Settings
from streams import facts
from streams.facts import SinkPositions


class Event:
    def __init__(self, partition: int, offset: int) -> None:
        self.message = type("M", (), {"partition": partition, "offset": offset})()


async def test_positions_are_read_again_until_clickhouse_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(facts, "READ_RETRY_INITIAL_S", 0.001)
    positions = SinkPositions(Settings())
    answers: list[Any] = [
        NetworkError("Connection refused"),
        EOFError(),
        {("fraud_label_events", 1): 6},
    ]
    calls: list[list[int]] = []

    def read(tables: Any, partitions: list[int]) -> dict[tuple[str, int], int]:
        calls.append(partitions)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(positions, "_read", read)
    rows = await positions.rows_for("fraud-labels", [Event(1, 3), Event(1, 7)])  # type: ignore[list-item]
    assert calls == [[1], [1], [1]]
    rows.add("fraud_label_events", Event(1, 3), ("below",))  # type: ignore[arg-type]
    rows.add("fraud_label_events", Event(1, 7), ("above",))  # type: ignore[arg-type]
    # Offset 3 is below the written position 6 (already stored): only offset 7 is written.
    assert rows.rows["fraud_label_events"] == [("above", 1, 8)]


async def test_other_errors_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    positions = SinkPositions(Settings())

    def read(tables: Any, partitions: list[int]) -> dict[tuple[str, int], int]:
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(positions, "_read", read)
    with pytest.raises(ValueError):
        await positions.rows_for("clicks", [Event(0, 1)])  # type: ignore[list-item]
