"""The Redis write-behind: coalescing, retries while Redis is down, callbacks, back-pressure."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sinks.redis_store import UserState
from sinks.redis_writes import PendingWrites, RedisWriteBehind, retry_redis

pytestmark = pytest.mark.timeout(30)


def state(user: str, ts: int, event_id: str | None = None) -> UserState:
    return UserState(user, event_id or f"{user}@{ts}", ts, {"events": ts}, [("i1", 1.0)])


def shipment(order: str, ts: int, user: str = "u1") -> dict[str, str | int | float]:
    return {"order_id": order, "last_scan_ts": ts, "user_id": user, "status": f"s{ts}"}


class FlakyStore:
    """Stores batches like the real pipeline would; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.down = False
        self.batches: list[PendingWrites] = []
        self.calls = 0
        #: Set while a write is on its way (to queue more writes meanwhile).
        self.gate: asyncio.Event | None = None
        self.error: BaseException = RedisConnectionError("Connection refused")

    async def write_serving_batch(self, batch: PendingWrites, *, updated_at_ms: int) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise self.error
        self.batches.append(batch)

    def stored_states(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for batch in self.batches:
            for user, st in batch.user_states.items():
                out[user] = st.event_id
        return out


async def wait_until_stored(writes: RedisWriteBehind) -> None:
    for _ in range(500):
        if not writes.retrying:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("queued writes were never stored")


def test_queue_keeps_the_newest_state_per_key_by_event_time() -> None:
    pending = PendingWrites()
    pending.add_user_state(state("u1", 20))
    pending.add_user_state(state("u1", 10))  # older: a replay or a late batch
    pending.add_user_state(state("u1", 20, "second-at-20"))  # same time: the later call
    pending.add_shipment(shipment("o1", 5), 60)
    pending.add_shipment(shipment("o1", 3), 60)
    assert pending.user_states["u1"].event_id == "second-at-20"
    assert pending.shipments["o1"][0]["status"] == "s5"
    assert len(pending) == 2


def test_failed_writes_go_back_under_the_newer_ones() -> None:
    older = PendingWrites()
    older.add_user_state(state("u1", 30))
    older.add_user_state(state("u2", 10))
    older.item_lists[("fbt", "i1")] = [("old", 1.0)]
    older.alerts.append(b'{"user_id":"u1","n":1}')
    older.processed.update({"clicks": 3})
    newer = PendingWrites()
    newer.add_user_state(state("u2", 20))
    newer.item_lists[("fbt", "i1")] = [("new", 1.0)]
    newer.alerts.append(b'{"user_id":"u1","n":2}')
    newer.processed.update({"clicks": 2})

    newer.absorb_older(older)
    # u1's state from the failed batch is newer by event time than nothing: kept; u2 keeps
    # the newer one; the list keeps its newest value; alerts keep their order; counts add up.
    assert {u: s.event_ts for u, s in newer.user_states.items()} == {"u1": 30, "u2": 20}
    assert newer.item_lists[("fbt", "i1")] == [("new", 1.0)]
    assert [orjson.loads(a)["n"] for a in newer.alerts] == [1, 2]
    assert newer.processed == Counter({"clicks": 5})


def test_a_forgotten_user_leaves_no_queued_write() -> None:
    pending = PendingWrites()
    pending.add_user_state(state("gone", 1))
    pending.add_user_state(state("stays", 1))
    pending.add_shipment(shipment("o1", 1, user="gone"), 0)
    pending.add_shipment(shipment("o2", 1, user="stays"), 0)
    pending.alerts += [b'{"user_id":"gone"}', b'{"user_id":"stays"}']
    assert pending.drop_user("gone") == 3
    assert set(pending.user_states) == {"stays"} and set(pending.shipments) == {"o2"}
    assert pending.alerts == [b'{"user_id":"stays"}']


async def test_writes_are_stored_at_once_when_redis_answers() -> None:
    store = FlakyStore()
    writes = RedisWriteBehind(store)
    stored: list[int] = []
    writes.add_user_states([state("u1", 1)])
    writes.add_processed({"clicks": 1, "payments": 0})
    assert await writes.flush(lambda: stored.append(1))
    assert stored == [1] and writes.pending == 0 and not writes.retrying
    assert store.stored_states() == {"u1": "u1@1"}
    assert store.batches[0].processed == Counter({"clicks": 1})


async def test_an_outage_queues_retries_and_stores_everything_once_back() -> None:
    store = FlakyStore()
    writes = RedisWriteBehind(store, retry_initial_s=0.01, retry_max_s=0.02)
    released: list[str] = []
    store.down = True
    writes.add_user_states([state("u1", 1)])
    assert not await writes.flush(lambda: released.append("b1"))
    calls_at_failure = store.calls
    # Later batches do not each wait for a connection error: they queue and go on.
    writes.add_user_states([state("u1", 2), state("u2", 2)])
    writes.add_alerts([b'{"user_id":"u2"}'])
    assert not await writes.flush(lambda: released.append("b2"))
    assert released == [] and writes.retrying and writes.pending == 3
    await asyncio.sleep(0.1)
    assert store.calls > calls_at_failure  # the background task kept trying

    store.down = False
    await wait_until_stored(writes)
    assert released == ["b1", "b2"]
    assert store.stored_states() == {"u1": "u1@2", "u2": "u2@2"}
    assert [a for b in store.batches for a in b.alerts] == [b'{"user_id":"u2"}']
    assert writes.failures >= 2 and len(writes.recoveries_s) == 1 and writes.pending == 0


async def test_writes_queued_during_a_store_wait_for_their_own() -> None:
    store = FlakyStore()
    writes = RedisWriteBehind(store, retry_initial_s=0.01)
    store.down = True
    writes.add_user_states([state("u1", 1)])
    assert not await writes.flush(lambda: None)
    # The retry is on its way (held at the gate) when the next batch queues its writes.
    store.gate = asyncio.Event()
    while store.calls < 2:
        await asyncio.sleep(0.005)
    store.down = False
    released: list[str] = []
    writes.add_user_states([state("u2", 1)])
    assert not await writes.flush(lambda: released.append("late"))
    store.gate.set()
    await wait_until_stored(writes)
    # The retry stored u1 only; u2's callback must wait for u2 to be stored.
    assert store.stored_states() == {"u1": "u1@1"} and released == []
    store.gate = None
    assert await writes.flush()
    assert store.stored_states() == {"u1": "u1@1", "u2": "u2@1"} and released == ["late"]


async def test_a_full_queue_pauses_the_agents_until_redis_is_back() -> None:
    store = FlakyStore()
    writes = RedisWriteBehind(store, max_pending=3, retry_initial_s=0.01, retry_max_s=0.02)
    store.down = True
    writes.add_user_states([state(f"u{i}", 1) for i in range(3)])
    await writes.flush()
    assert not writes.has_capacity()
    paused = asyncio.create_task(writes.wait_for_capacity())
    await asyncio.sleep(0.1)
    assert not paused.done()
    store.down = False
    await asyncio.wait_for(paused, 5)
    assert writes.pending == 0 and len(store.stored_states()) == 3


async def test_other_redis_errors_are_raised_not_retried() -> None:
    store = FlakyStore()
    store.down, store.error = True, ResponseError("NOPERM this user has no permissions")
    writes = RedisWriteBehind(store)
    writes.add_user_states([state("u1", 1)])
    with pytest.raises(ResponseError):
        await writes.flush()
    assert not writes.retrying


async def test_retry_redis_waits_for_an_answer() -> None:
    answers = iter([RedisConnectionError("refused"), TimeoutError("timed out"), b"blob"])

    async def load() -> bytes:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await retry_redis(load, what="a test", initial_s=0.001) == b"blob"
