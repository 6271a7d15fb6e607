"""``adaptive_batches``: the micro-batching of every agent, on a stand-in for a Faust stream.

The stand-in drives the batcher exactly through the Stream API it uses: a passive drainer
that runs the registered processors with ``current_event`` set, ``wait_for_stopped``,
``enable_acks`` and ``ack``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import faust
import pytest

from schemas.config import Settings
from streams.runtime import adaptive_batches, micro_batches


@dataclass(eq=False)
class FakeEvent:
    value: int


class FakeStream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
        self.channel: Any = self
        self.enable_acks = True
        self.should_stop = False
        self.current_event: FakeEvent | None = None
        self._processors: list[Callable[[Any], Awaitable[Any]]] = []
        self.acked: list[int] = []
        self._drainer: asyncio.Task[None] | None = None

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> FakeEvent:  # only there to make ``aiter(channel)`` work
        raise StopAsyncIteration

    def add_processor(self, processor: Callable[[Any], Awaitable[Any]]) -> None:
        self._processors.append(processor)

    def _enable_passive(self, channel: Any) -> None:
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while True:
            event = await self.queue.get()
            self.current_event = event
            for processor in self._processors:
                await processor(event.value)

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return self.should_stop

    async def ack(self, event: FakeEvent) -> bool:
        self.acked.append(event.value)
        return True

    def put(self, *values: int) -> None:
        for value in values:
            self.queue.put_nowait(FakeEvent(value))

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()


def batches_of(stream: FakeStream, max_events: int, max_wait_s: float) -> Any:
    return adaptive_batches(cast(faust.Stream, stream), max_events, max_wait_s)


def values(batch: Any) -> list[int]:
    return [event.value for event in batch]


async def test_waits_at_most_max_wait_for_a_batch_to_fill() -> None:
    stream = FakeStream()
    batches = batches_of(stream, 100, 0.05)
    loop = asyncio.get_running_loop()
    stream.put(1, 2)
    started = loop.time()
    first = await anext(batches)
    waited = loop.time() - started
    assert values(first) == [1, 2]
    assert 0.04 <= waited < 0.5
    await batches.aclose()
    stream.close()


async def test_a_full_batch_is_taken_at_once() -> None:
    stream = FakeStream()
    batches = batches_of(stream, 3, 10.0)
    stream.put(1, 2, 3, 4)
    first = await asyncio.wait_for(anext(batches), 1.0)
    assert values(first) == [1, 2, 3]
    await batches.aclose()
    stream.close()


async def test_events_that_arrive_during_processing_form_the_next_batch_without_waiting() -> None:
    stream = FakeStream()
    max_wait = 0.2
    batches = batches_of(stream, 100, max_wait)
    loop = asyncio.get_running_loop()
    stream.put(1)
    first = await anext(batches)
    assert values(first) == [1]
    stream.put(2, 3)
    await asyncio.sleep(max_wait + 0.05)  # "processing" outlasts the wait of event 2
    started = loop.time()
    second = await anext(batches)
    assert values(second) == [2, 3]
    assert loop.time() - started < max_wait / 2
    await batches.aclose()
    stream.close()


async def test_acks_each_batch_after_it_is_processed_and_restores_acks() -> None:
    stream = FakeStream()
    batches = batches_of(stream, 2, 0.01)
    stream.put(1, 2, 3)
    first = await anext(batches)
    assert values(first) == [1, 2]
    assert stream.enable_acks is False
    assert stream.acked == []
    second = await anext(batches)  # asking for the next batch acks the previous one
    assert values(second) == [3]
    assert stream.acked == [1, 2]
    await batches.aclose()  # the caller stopped inside the batch (it raised): not acked
    assert stream.acked == [1, 2]
    assert stream.enable_acks is True
    assert stream._processors == []
    stream.close()


async def test_the_next_batch_never_exceeds_max_events() -> None:
    stream = FakeStream()
    batches = batches_of(stream, 2, 0.01)
    stream.put(*range(7))
    seen = []
    while len(seen) < 7:
        batch = await asyncio.wait_for(anext(batches), 1.0)
        assert 1 <= len(batch) <= 2
        seen.extend(values(batch))
    assert seen == list(range(7))
    await batches.aclose()
    stream.close()


async def test_micro_batches_uses_the_batch_settings() -> None:
    stream = FakeStream()
    settings = Settings(batch_max_events=2, batch_within_s=5.0)
    batches = micro_batches(cast(faust.StreamT, stream), settings)
    stream.put(1, 2, 3)
    first = await asyncio.wait_for(anext(batches), 1.0)  # full: no 5 s wait
    assert values(first) == [1, 2]
    await cast(Any, batches).aclose()
    stream.close()


def test_batch_within_s_may_be_zero() -> None:
    assert Settings(batch_within_s=0).batch_within_s == 0
    with pytest.raises(ValueError):
        Settings(batch_within_s=-1)
