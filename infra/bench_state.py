"""``borderflow bench --state-users N``: memory and recovery time of a worker holding N users.

A worker's per-user state lives in its Faust tables (``user_profiles``, ``user_shipments``),
kept in memory and restored from their changelog topics when a worker starts or takes over
partitions. Feeding N users through the whole pipeline would take hours here, so the state
is built the way recovery sees it: profiles of a generated shop (every click applied by
:func:`models.profile.apply_click`, 12 days of history each) are cloned to N user ids and
written to the ``user_profiles`` changelog, partitioned like the worker writes it. Then:

0. a worker of the app starts with no state (the baseline; it also creates the changelog);
1. the profiles are written, and a worker of the same app starts, restores them and
   processes a probe click: *cold start* time (process start to the probe processed) and
   resident memory (VmRSS) then;
2. it is SIGKILLed and a new worker starts: *recovery time after SIGKILL*;

Memory per user = (RSS with N users - RSS without) / N. Not included: the fraud engines'
per-card and per-user velocity state and the recommender's sessions, which are bounded by
their own caps and checkpointed to Redis, not restored from a changelog.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from infra.generator import GeneratorConfig, generate_to_list
from infra.processes import WorkerProcess, isolated, processed_total, start_worker
from models.profile import UserProfile, apply_click
from schemas.config import Settings
from schemas.events import ALL_TOPICS, ClickEvent
from sinks.kafka import ensure_topics
from sinks.redis_store import RedisStore
from streams.topology import user_partition

#: Users of the generated shop whose profiles are cloned.
TEMPLATE_USERS = 2_000


def template_profiles(users: int = TEMPLATE_USERS, days: float = 12.0) -> list[dict[str, Any]]:
    """Profiles (as the table stores them) of a generated shop's users after ``days``."""
    events = generate_to_list(GeneratorConfig(users=users, days=days, seed=23))
    profiles: dict[str, UserProfile] = {}
    for offset, event in enumerate(events):
        if event.topic != "clicks":
            continue
        click = ClickEvent.model_validate(event.value)
        profile = profiles.setdefault(click.user_id, UserProfile.new(click.user_id))
        apply_click(profile, click, (0, offset))
    return [orjson.loads(profile.to_bytes()) for profile in profiles.values()]


def changelog_topic(settings: Settings) -> str:
    """Faust's changelog topic of the ``user_profiles`` table: ``{app_id}-{table}-changelog``."""
    return f"{settings.app_id}-{settings.topic_prefix}user_profiles-changelog"


def write_profiles(settings: Settings, templates: list[dict[str, Any]], n_users: int) -> int:
    """Write ``n_users`` cloned profiles to the changelog; returns the bytes written."""
    partitions = settings.topic_partitions
    producer = Producer(
        {**settings.confluent_config(), "linger.ms": 20, "batch.num.messages": 10_000}
    )
    topic = changelog_topic(settings)
    written = 0
    for i in range(n_users):
        user_id = f"state-u{i:08d}"
        value = dict(templates[i % len(templates)], user_id=user_id)
        raw = orjson.dumps(value)
        key = user_id.encode()
        while True:
            try:
                producer.produce(topic, raw, key, partition=user_partition(key, partitions))
                break
            except BufferError:
                producer.poll(0.05)
        written += len(raw)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("changelog records not delivered")
    return written


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_and_probe(
    settings: Settings, log_dir: Path, name: str, timeout_s: float = 600.0
) -> tuple[WorkerProcess, float, float]:
    """Start a worker and send one new click: (worker, seconds until it was processed, RSS MB
    then). The click is for a user of its own, so it needs no restored state to be processed."""
    before = processed_total(settings)
    started = time.perf_counter()
    worker = start_worker(settings, log_dir, name)
    user_id = f"probe-{name}"
    probe = {
        "event_id": f"probe-{name}-{time.time_ns()}",
        "ts": 1_767_268_800_000,
        "user_id": user_id,
        "session_id": "probe",
        "type": "view",
        "item_id": "probe-item",
        "country": "DE",
    }
    producer = Producer(settings.confluent_config())
    producer.produce(settings.topic("clicks"), orjson.dumps(probe), user_id.encode())
    producer.flush(30)
    deadline = started + timeout_s
    while processed_total(settings) <= before:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited; see {worker.log_path}")
        if time.perf_counter() > deadline:
            worker.stop()
            raise RuntimeError(f"probe not processed in {timeout_s:.0f} s; see {worker.log_path}")
        time.sleep(0.1)
    return worker, time.perf_counter() - started, _rss_mb(worker.process.pid)


def measure_state(settings: Settings, n_users: int, log_dir: Path) -> dict[str, Any]:
    templates = template_profiles()
    sizes = [len(orjson.dumps(t)) for t in templates]

    # The app starts once without state: the baseline, and Faust creates its changelog
    # topics (partitions and compaction as it wants them).
    run = isolated(settings, "state")
    ensure_topics(run, list(ALL_TOPICS))
    worker, empty_start_s, empty_rss = start_and_probe(run, log_dir, "state-empty")
    worker.stop()

    started = time.perf_counter()
    bytes_written = write_profiles(run, templates, n_users)
    write_s = time.perf_counter() - started
    worker, cold_start_s, rss = start_and_probe(run, log_dir, "state-cold")
    worker.process.kill()  # SIGKILL: no shutdown, no commit
    worker.process.wait(30)
    worker, recovery_s, rss_after_kill = start_and_probe(run, log_dir, "state-recover")
    worker.stop()
    _drop_redis(run)
    per_user = (rss - empty_rss) * 1024 * 1024 / n_users
    return {
        "users": n_users,
        "store": settings.store,
        "partitions": settings.topic_partitions,
        "profile_templates": len(templates),
        "profile_bytes": {
            "mean": round(sum(sizes) / len(sizes), 1),
            "max": max(sizes),
        },
        "changelog_mb_written": round(bytes_written / 1e6, 1),
        "changelog_write_seconds": round(write_s, 1),
        "worker_rss_mb": {
            "no_state": round(empty_rss, 1),
            "with_users": round(rss, 1),
            "after_sigkill_recovery": round(rss_after_kill, 1),
        },
        "memory_bytes_per_user": round(per_user, 1),
        "memory_gb_per_million_users": round(per_user * 1_000_000 / 1e9, 3),
        "start_seconds_no_state": round(empty_start_s, 2),
        "cold_start_seconds": round(cold_start_s, 2),
        "recovery_seconds_after_sigkill": round(recovery_s, 2),
        "what": (
            "worker start to a probe click processed, with the user_profiles table restored "
            "from its changelog; RSS from /proc after the probe"
        ),
    }


def _drop_redis(settings: Settings) -> None:
    async def drop() -> None:
        store = RedisStore(settings)
        try:
            keys = [k async for k in store.client.scan_iter(match=f"{settings.redis_prefix}*")]
            for start in range(0, len(keys), 1000):
                await store.client.delete(*keys[start : start + 1000])
        finally:
            await store.aclose()

    asyncio.run(drop())
