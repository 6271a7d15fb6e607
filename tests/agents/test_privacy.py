"""The ``forget_users`` agent (same harness and fakes as test_agents.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from models.profile import UserProfile
from sinks.redis_store import UserState
from streams.agents.clicks import process_clicks
from streams.agents.logistics import process_scans
from streams.agents.payments import process_payments
from streams.agents.privacy import process_requests
from tests.agents import test_agents as base

pytestmark = pytest.mark.timeout(30)

harness = base.harness  # the fixture, shared
T0, MINUTE = base.T0, base.MINUTE


def request(user: str) -> dict[str, Any]:
    return {"request_id": uuid.uuid4().hex, "user_id": user, "requested_at": T0 + 3_600_000}


def stored_profile(h: base.Harness, user: str) -> UserProfile | None:
    raw = h.runtime.topology.user_profiles.get(user.encode())
    return UserProfile.from_bytes(raw) if raw else None


async def test_a_request_erases_the_users_state_and_writes_a_receipt(
    harness: base.Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, runtime = harness, harness.runtime
    deleted: list[bytes] = []  # keys whose changelog got a tombstone
    for table in (runtime.topology.user_profiles, runtime.topology.user_shipments):
        original = table.on_key_del

        def on_key_del(key: bytes, original: Any = original) -> None:
            deleted.append(key)
            original(key)

        monkeypatch.setattr(table, "on_key_del", on_key_del)

    clicks = [base.click(u, T0 + i, item_id=f"i{i}") for u in ("gone", "stays") for i in range(3)]
    await process_clicks(runtime, [h.event("clicks", c) for c in clicks])
    payments = [base.payment(u, T0 + i * MINUTE) for u in ("gone", "stays") for i in range(3)]
    # A card-testing pattern, so the forgotten user also has an entry in the alert stream.
    payments += [
        base.payment("gone", T0 + 10 * MINUTE, amount=1.0),
        base.payment("gone", T0 + 10 * MINUTE + 20_000, amount=900.0),
    ]
    await process_payments(runtime, [h.event("payments", p) for p in payments])
    scans = [base.scan(u, f"o-{u}", "created", T0) for u in ("gone", "stays")]
    await process_scans(runtime, [h.event("logistics", s) for s in scans])
    assert {"gone", "stays"} <= set(h.redis.user_states) and "o-gone" in h.redis.shipments
    assert any(b'"user_id":"gone"' in alert for alert in h.redis.alerts)
    engine = runtime.fraud_engines[0]
    assert "gone" in engine.features.users

    asked = request("gone")
    assert await process_requests(runtime, [h.event("privacy-requests", asked)]) == 1

    topology = runtime.topology
    assert stored_profile(h, "gone") is None and topology.user_shipments.get(b"gone") is None
    assert deleted == [b"gone", b"gone"]  # one tombstone per table
    assert stored_profile(h, "stays") is not None and topology.user_shipments.get(b"stays")
    assert "gone" not in engine.features.users and "stays" in engine.features.users
    assert all(s.user_id != "gone" for s in engine.snapshots.values())
    assert set(h.redis.user_states) == {"stays"}
    assert set(h.redis.shipments) == {"o-stays"}
    assert not any(b'"user_id":"gone"' in alert for alert in h.redis.alerts)
    assert not any(key.startswith("gone:") for key in runtime.serving.recommender._open)
    # The checkpoints were replaced at once, without the user.
    assert (
        b"gone"
        not in runtime.new_fraud_engine()
        .from_checkpoint(h.redis.checkpoints[(h.settings.app_id, 0)])
        .pickle()
    )
    receipt = h.redis.receipts[asked["request_id"]]
    assert receipt["status"] == "done" and receipt["partition"] == 0
    assert receipt["table_user_profiles"] == receipt["table_user_shipments"] == 1
    assert (receipt["fraud_users"], receipt["fraud_cards"], receipt["fraud_devices"]) == (1, 1, 1)
    assert receipt["fraud_snapshots"] == 5 and receipt["orders"] == 1
    assert (receipt["redis_profile"], receipt["redis_shipments"]) == (1, 1)
    assert receipt["redis_alerts"] >= 1 and receipt["serving_sessions"] == 1
    assert receipt["drained"] == 1 and receipt["clickhouse_flushed"] == 1
    assert "gone" not in str(receipt)  # the receipt names no user
    # Read again (a redelivery): nothing more to erase, the first receipt stays.
    await process_requests(runtime, [h.replay(h.event("privacy-requests", asked))])
    assert h.redis.receipts[asked["request_id"]] == receipt

    # Later events: the forgotten user starts afresh, the other user's profile goes on.
    later = [base.click(u, T0 + 2 * 3_600_000, item_id="i9") for u in ("gone", "stays")]
    await process_clicks(runtime, [h.event("clicks", c) for c in later])
    fresh, kept = stored_profile(h, "gone"), stored_profile(h, "stays")
    assert fresh is not None and kept is not None
    assert (fresh.events, fresh.sessions, fresh.first_ts) == (1, 1, T0 + 2 * 3_600_000)
    assert kept.events == 4 and kept.first_ts == T0


async def test_a_batch_in_flight_cannot_write_the_keys_back(
    harness: base.Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, runtime = harness, harness.runtime
    gate, writing = asyncio.Event(), asyncio.Event()
    original = h.redis.write_user_states

    async def slow_write(states: list[UserState], **kwargs: Any) -> list[int]:
        writing.set()
        await gate.wait()  # the batch has written the table, its Redis write is on the way
        return await original(states, **kwargs)

    monkeypatch.setattr(h.redis, "write_user_states", slow_write)

    async def clicks_batch() -> None:
        async with runtime.batches.track():
            await process_clicks(runtime, [h.event("clicks", base.click("gone", T0))])

    batch = asyncio.create_task(clicks_batch())
    await writing.wait()
    asked = request("gone")
    forget = asyncio.create_task(process_requests(runtime, [h.event("privacy-requests", asked)]))
    await asyncio.sleep(0.05)
    assert not forget.done()  # waiting for the batch
    assert ("forget", "gone") not in h.redis.log
    gate.set()
    await asyncio.gather(batch, forget)

    assert h.redis.log == [("write", "gone"), ("forget", "gone")]
    assert "gone" not in h.redis.user_states and stored_profile(h, "gone") is None
    assert h.redis.receipts[asked["request_id"]]["drained"] == 1


async def test_an_invalid_request_is_dead_lettered(harness: base.Harness) -> None:
    bad = harness.event("privacy-requests", {"request_id": "r1"}, key=b"u1")
    assert await process_requests(harness.runtime, [bad]) == 0
    [record] = harness.deadletters
    base.assert_deadletter(record, bad, None)
    assert "user_id" in record["error"] and harness.redis.receipts == {}


async def test_after_consent_is_withdrawn_nothing_personal_is_served_or_kept(
    harness: base.Harness,
) -> None:
    h, runtime = harness, harness.runtime
    # Others teach the recommender that "case" follows "phone"; "me" has a taste for shoes.
    teach = [base.click(f"o{i}", T0 + j, item_id=item) for i in range(3)
             for j, item in enumerate(("phone", "case"))]  # fmt: skip
    teach += [base.click(f"p{i}", T0, item_id="bestseller") for i in range(6)]
    mine = [
        base.click("me", T0 + i, item_id=f"shoe{i}", category="shoes", price=90.0,
                   currency="EUR", type="purchase" if i == 2 else "view")
        for i in range(3)
    ]  # fmt: skip
    await process_clicks(runtime, [h.event("clicks", c) for c in [*teach, *mine]])
    profile = stored_profile(h, "me")
    assert profile is not None and profile.affinity and profile.purchases == 1
    assert any(key.startswith("me:") for key in runtime.serving.recommender._open)

    withdrawn = base.click("me", T0 + MINUTE, item_id="phone", personalisation=False)
    await process_clicks(runtime, [h.event("clicks", withdrawn)])

    state = h.redis.user_states["me"]
    assert state.meta == {"personalised": 0, "basis": "popular-country"}
    expected = runtime.serving.recommender.recommend(
        [], country="DE", n=h.settings.recs_top_n, personalised=False
    )
    assert [item for item, _ in state.recs] == [item for item, _ in expected]
    assert state.recs[0][0] == "bestseller"
    hash_ = state.profile
    assert (hash_["personalisation"], hash_["top_categories"], hash_["price_band"]) == (
        0, "[]", "",
    )  # fmt: skip
    assert (hash_["frequency_purchases"], hash_["device"], hash_["segment"]) == (0, "", "")
    profile = stored_profile(h, "me")
    assert profile is not None
    assert not profile.affinity and not profile.session_items and not profile.recent_purchases
    # The withdrawing click taught the item, not a session of the user's; the sessions kept
    # under the user's id while consent was given are gone.
    assert not any(key.startswith("me:") for key in runtime.serving.recommender._open)
    assert runtime.serving.recommender.popularity["DE"]["phone"] > 0
    links = runtime.serving.recommender.cooccurrence.get("shoe2", {})
    assert "phone" not in links
