"""Worker crashes (issue 7, item 1): SIGKILL under a million-event replay, and a takeover
(``make chaos``; marked ``chaos``, so the default ``make test`` run leaves it out).

``test_ten_sigkills_during_a_million_event_replay``: a shop from ``borderflow generate``
(``BORDERFLOW_CHAOS_KILL_EVENTS`` events, default 1,000,000, fixed seed) is replayed with
``borderflow replay FILE --rate 0`` twice, into isolated namespaces: once to one worker that
runs undisturbed (the reference), once to a worker that is SIGKILLed 10 times at seeded random
moments and restarted each time (see :func:`kill_plan`: one while payments are scored, one
while scans are tracked, five spread over the rest; three of those are followed by a second
kill a few seconds after the restart, i.e. during start-up, group join or table recovery).
The last worker runs to completion, judged from ClickHouse (every fact there) and the
committed consumer lag (none), not from the processed counters, which count replays again.
Then the killed run is compared with the truth and with the reference; one JSON line:

    worker-kills {"events_sent": ..., "kills": 10, "facts_expected": {...}, "facts_found": {...},
                  "lost": 0, "duplicated": 0, "rollups_exact": true, "fraud": {...},
                  "redis": {...}, "profiles_vs_truth": {...}, "restarts": [...], ...}

What the design guarantees, and is asserted:

* no fact lost or doubled: ``count()`` without FINAL against the events' ids, plus the
  rollups (materialized views count every insert) against the truth computed from the file;
* fraud scores and model versions identical to the reference per transaction (the engines
  are checkpointed with their offsets held);
* profiles (the ``user_profiles`` Faust table): every click and delivery applied once (the
  ``events`` and ``deliveries`` of each profile equal the truth's), and every field of the
  Redis profile equal to the reference's when both hashes are snapshots of the same event
  (same ``last_event_id``), except ``segment`` (below);
* the same ``last_event_id`` for every user whose newest event is a click. A hash is
  rewritten at each click and at each scan that changes the delivery experience, not at
  other scans, so for users whose newest events are such scans the snapshot depends on how
  the topics interleaved (reported, not asserted).

What it does not guarantee, and is only measured: the serving models (recommender, catalog,
lanes, bought-together, logistics engine, RFM segmenters; ``models/serving.py``) are soft
state checkpointed to Redis every ``serving_checkpoint_interval_s``. A SIGKILL loses what they
learned since the last checkpoint, and the replayed events do not teach them again (the
profiles recognise them as replays), so recommendations, shipment predictions, logistics
alerts and the profile's ``segment`` (the segmenters assign it) may differ from the
reference. The JSON reports how much (``redis``, ``derived_facts``).

``test_survivor_takes_over_a_killed_workers_partitions``: two workers share a smaller replay
(``BORDERFLOW_CHAOS_TAKEOVER_EVENTS``, default 150,000); once both process, one is SIGKILLed
and not restarted. The survivor must finish everything with exact facts; the JSON line
``worker-takeover {...}`` reports how long the victim's partitions stood still.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infra.migrate import migrate
from infra.processes import WorkerProcess, isolated, start_worker
from schemas.config import Settings
from schemas.events import ALL_TOPICS, CLICKS
from sinks.kafka import ensure_topics
from tests.chaos.kills import (
    INPUT_TOPICS,
    Counters,
    Facts,
    Shop,
    check_facts,
    check_rollups,
    committed_offsets,
    compare_derived_facts,
    compare_fraud_scores,
    compare_serving,
    drop_run,
    dumps,
    finish_replay,
    generate_shop,
    log_crashes,
    profiles_vs_truth,
    read_serving_state,
    scrape,
    sigkill,
    start_replay,
    wait_complete,
)

KILL_EVENTS = int(os.environ.get("BORDERFLOW_CHAOS_KILL_EVENTS", "1000000"))
TAKEOVER_EVENTS = int(os.environ.get("BORDERFLOW_CHAOS_TAKEOVER_EVENTS", "150000"))
BASELINE_EVENTS = int(os.environ.get("BORDERFLOW_CHAOS_BASELINE_EVENTS", "60000"))
#: Keep the runs' Redis keys and ClickHouse databases afterwards (to look into a failure).
KEEP_DATA = os.environ.get("BORDERFLOW_CHAOS_KEEP_DATA", "") not in ("", "0")
SEED = 20260107
KILLS_AT_PROGRESS = 7
KILLS_AFTER_RESTART = 3
#: Profile fields that do not come from the Faust table alone: the RFM segmenters (soft
#: serving state, ``ServingModels.segmenters``) assign ``segment`` at each purchase.
SOFT_PROFILE_FIELDS = frozenset({"segment"})
#: Generous limits for a shared 2-core machine: a run may take about 4 ms per event.
RUN_TIMEOUT_S = max(900.0, KILL_EVENTS * 0.006)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


@pytest.fixture
def run_settings(stack: Settings) -> Iterator[Any]:
    """A factory of isolated namespaces (topics, app, Redis prefix, ClickHouse database)."""
    made: list[Settings] = []

    def make(label: str) -> Settings:
        settings = isolated(stack, label, clickhouse_database=f"bf_{label}_{uuid.uuid4().hex[:8]}")
        migrate(settings)
        ensure_topics(settings, list(ALL_TOPICS))
        made.append(settings)
        return settings

    yield make
    if not KEEP_DATA:
        for settings in made:
            drop_run(settings)


def partitions_of(settings: Settings) -> int:
    return len(INPUT_TOPICS) * settings.topic_partitions


@dataclass
class Restart:
    """One kill and the restart after it."""

    trigger: str
    progress_at_kill: dict[str, float]
    facts_at_kill: int
    #: Clicks events each partition will process again: written position minus committed.
    replay_span: dict[int, int]
    processed_at_restart: int
    restarted_at: float
    resume_s: float | None = None  # first processed batch after the restart
    facts_s: float | None = None  # first new fact row after the restart

    def report(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "progress": {t: round(f, 3) for t, f in self.progress_at_kill.items()},
            "replay_span": self.replay_span,
            "resume_s": None if self.resume_s is None else round(self.resume_s, 1),
            "new_facts_s": None if self.facts_s is None else round(self.facts_s, 1),
        }


@dataclass
class KilledRun:
    """One worker at a time, killed and restarted; watches progress between the kills."""

    settings: Settings
    shop: Shop
    log_dir: Path
    facts: Facts
    counters: Counters
    worker: WorkerProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.worker = start_worker(
            self.settings,
            self.log_dir,
            f"killed-{len(self.workers)}",
            web_port=self.settings.worker_web_port,
        )
        self.workers.append(self.worker)

    def facts_total(self) -> int:
        return sum(self.facts.counts().values())

    def progress(self) -> dict[str, float]:
        """Share of each fact table's rows in ClickHouse."""
        counts = self.facts.counts()
        return {t: counts[t] / n for t, n in self.shop.expected_counts().items()}

    def tick(self) -> None:
        """Watch the worker (an exit we did not cause is a crash: noted, and restarted) and
        fill in the recovery times of the latest restart."""
        assert self.worker is not None
        if self.worker.process.poll() is not None:
            self.unexpected_exits.append(int(self.worker.process.returncode))
            self.start()
            return
        if self.restarts:
            now = time.monotonic()
            last = self.restarts[-1]
            if last.resume_s is None and self.counters.total() > last.processed_at_restart:
                last.resume_s = now - last.restarted_at
            if last.facts_s is None and self.facts_total() > last.facts_at_kill:
                last.facts_s = now - last.restarted_at

    def kill_and_restart(self, trigger: str) -> None:
        assert self.worker is not None
        if not sigkill(self.worker):
            self.unexpected_exits.append(int(self.worker.process.returncode))
        progress = self.progress()
        facts = self.facts_total()
        committed = committed_offsets(self.settings, CLICKS)
        written = self.facts.written("click_events")
        span = {p: written.get(p, 0) - max(0, o) for p, o in sorted(committed.items())}
        processed = self.counters.total()
        self.start()
        self.restarts.append(Restart(trigger, progress, facts, span, processed, time.monotonic()))

    def wait_for_progress(self, trigger: Trigger, timeout_s: float) -> str:
        """Until the trigger's share of facts is in ClickHouse, with the worker processing;
        returns what was reached (for the report)."""
        deadline = time.monotonic() + timeout_s
        threshold: float | None = None
        while time.monotonic() < deadline:
            self.tick()
            resumed = not self.restarts or self.restarts[-1].resume_s is not None
            share = trigger.share(self.facts.counts(), self.shop)
            if threshold is None:
                threshold = trigger.threshold(share)
            if resumed and share >= threshold:
                return f"{trigger.table or 'all facts'} >= {threshold:.3f}"
            time.sleep(0.5)
        raise AssertionError(f"{trigger} not reached after {timeout_s}s")

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.tick()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


@dataclass(frozen=True)
class Trigger:
    """Kill when a share of a fact table's rows (``table``; None: of all facts) is in
    ClickHouse: ``u`` of the way from the share when the wait starts to ``end``, divided
    among the ``bins`` kills still to come on that range (so they spread over it)."""

    table: str | None
    end: float
    u: float
    bins: int = 1

    def share(self, counts: dict[str, int], shop: Shop) -> float:
        if self.table is None:
            return sum(counts.values()) / shop.total
        return counts[self.table] / shop.expected_counts()[self.table]

    def threshold(self, start: float) -> float:
        return start + max(0.0, self.end - start) * self.u / self.bins


def kill_plan(seed: int) -> tuple[list[Trigger], dict[int, float]]:
    """Seven kills at progress points, and after which three of them a quick second kill
    follows (its delay after the restart: start-up, group join, table recovery).

    With ``--rate 0`` each topic is consumed at its own pace: payments (2% of the events)
    are scored early and fast, scans (9%) are done before the clicks. So the first kill comes
    while payments are being scored, the second while scans are tracked, and the other five
    spread over the rest of all facts, up to 95%."""
    rng = random.Random(seed)
    triggers = [
        Trigger("fraud_scores", 0.85, rng.uniform(0.2, 1.0)),
        Trigger("shipment_events", 0.85, rng.uniform(0.2, 1.0)),
    ]
    triggers += [Trigger(None, 0.95, rng.uniform(0.3, 1.0), bins=5 - i) for i in range(5)]
    quick = {i: round(rng.uniform(0.5, 12.0), 2) for i in rng.sample(range(len(triggers)), 3)}
    return triggers, quick


def run_reference(settings: Settings, shop: Shop, log_dir: Path) -> dict[str, float]:
    facts = Facts(settings)
    started = time.monotonic()
    worker = start_worker(settings, log_dir, "reference", web_port=settings.worker_web_port)
    replay = start_replay(settings, shop.path, log_dir)
    try:

        def watch() -> None:
            assert worker.process.poll() is None, f"reference worker died: {worker.log_path}"

        finish_replay(replay)
        replayed = time.monotonic()
        done = wait_complete(
            facts,
            shop.expected_counts(),
            [settings.worker_web_port],
            partitions_of(settings),
            timeout_s=RUN_TIMEOUT_S,
            tick=watch,
        )
        time.sleep(4.0)  # a late double would be flushed by now
    finally:
        if replay.poll() is None:
            replay.kill()
        worker.stop(timeout=120)
        facts.close()
    assert log_crashes([worker.log_path]) == 0, f"reference worker crashed: {worker.log_path}"
    return {"replay": replayed - started, "complete": done - started}


@pytest.mark.timeout(int(RUN_TIMEOUT_S * 3 + 1800))
def test_ten_sigkills_during_a_million_event_replay(run_settings: Any, tmp_path: Path) -> None:
    began = time.monotonic()
    shop = generate_shop(tmp_path / "shop.jsonl", KILL_EVENTS, SEED)

    reference = run_settings("ref")
    ref_times = run_reference(reference, shop, tmp_path)

    settings = run_settings("kill")
    triggers, quick = kill_plan(SEED)
    facts = Facts(settings)
    counters = Counters(settings)
    run = KilledRun(settings, shop, tmp_path, facts, counters)
    started = time.monotonic()
    run.start()
    replay = start_replay(settings, shop.path, tmp_path)
    try:
        for number, trigger in enumerate(triggers):
            reached = run.wait_for_progress(trigger, timeout_s=RUN_TIMEOUT_S)
            run.kill_and_restart(reached)
            if number in quick:
                run.sleep(quick[number])
                run.kill_and_restart(f"{quick[number]}s after restart")
        finish_replay(replay, timeout_s=RUN_TIMEOUT_S)
        done = wait_complete(
            facts,
            shop.expected_counts(),
            [settings.worker_web_port],
            partitions_of(settings),
            timeout_s=RUN_TIMEOUT_S,
            tick=run.tick,
        )
        time.sleep(4.0)  # a late double would be flushed by now
        run.tick()
        final_alive = run.worker is not None and run.worker.process.poll() is None
    finally:
        if replay.poll() is None:
            replay.kill()
        if run.worker is not None:
            run.worker.stop(timeout=120)
    killed_s = done - started

    # -- the truth: facts and rollups --------------------------------------------------------
    checked = check_facts(facts, shop)
    rollups = check_rollups(facts, shop)
    ref_facts = Facts(reference)
    try:
        fraud = compare_fraud_scores(ref_facts, facts)
        derived = compare_derived_facts(ref_facts, facts)
    finally:
        ref_facts.close()
        facts.close()
        counters.close()
    # -- the reference: Redis ----------------------------------------------------------------
    ref_state, run_state = read_serving_state(reference), read_serving_state(settings)
    serving = compare_serving(ref_state, run_state, settings.recs_top_n, shop.click_last)
    vs_truth = {
        "ref": profiles_vs_truth(ref_state, shop),
        "run": profiles_vs_truth(run_state, shop),
    }
    crashes = len(run.unexpected_exits) + log_crashes(w.log_path for w in run.workers)
    lost = sum(checked["lost"].values())
    duplicated = sum(checked["dup"].values()) + sum(
        max(0, n) for n in checked["rollup_overcount"].values()
    )
    resumes = [r.resume_s for r in run.restarts if r.resume_s is not None]
    summary = {
        "events_sent": shop.total,
        "events_per_topic": {t: len(shop.events[t]) for t in INPUT_TOPICS},
        "users": shop.users,
        "kills": len(run.restarts),
        "facts_expected": checked["expected"],
        "facts_found": checked["found"],
        "lost": lost,
        "lost_per_table": checked["lost"],
        "duplicated": duplicated,
        "duplicated_per_table": checked["dup"],
        "rollup_overcount": checked["rollup_overcount"],
        "rollups_exact": not any(rollups.values()),
        "rollup_keys_differ": rollups,
        "fraud": fraud,
        "derived_facts": derived,
        "redis": serving,
        "profiles_vs_truth": vs_truth,
        "worker_crashes": crashes,
        "unexpected_exits": run.unexpected_exits,
        "final_worker_alive": final_alive,
        "restarts": [r.report() for r in run.restarts],
        "recovery_s": {
            "mean_resume": round(sum(resumes) / len(resumes), 1) if resumes else None,
            "max_resume": round(max(resumes), 1) if resumes else None,
        },
        "seconds": {
            "generate": round(shop.generate_s, 1),
            "read_truth": round(shop.read_s, 1),
            "reference_replay": round(ref_times["replay"], 1),
            "reference_run": round(ref_times["complete"], 1),
            "killed_run": round(killed_s, 1),
            "total": round(time.monotonic() - began, 1),
        },
        "logs": str(tmp_path),
    }
    print("worker-kills " + dumps(summary))

    assert crashes == 0 and final_alive, f"worker crashes besides our kills; see {tmp_path}"
    assert summary["kills"] == KILLS_AT_PROGRESS + KILLS_AFTER_RESTART
    assert lost == 0, checked["lost"]
    assert duplicated == 0, (checked["dup"], checked["rollup_overcount"])
    assert summary["rollups_exact"], rollups
    assert fraud["missing"] == fraud["extra"] == 0, fraud
    assert fraud["score_mismatches"] == fraud["model_version_mismatches"] == 0, fraud
    assert serving["users_missing"] == serving["users_extra"] == 0, serving
    assert serving["meta_users_missing"] == 0, serving
    # Profiles (a Faust table): every click and delivery applied exactly once.
    assert vs_truth["run"] == vs_truth["ref"] == dict.fromkeys(vs_truth["ref"], 0), vs_truth
    assert serving["last_event_id_equal_share_click_last"] == 1.0, serving
    table_fields = set(serving["profile_fields_differ"]) - SOFT_PROFILE_FIELDS
    assert not table_fields, serving["profile_fields_differ"]


@pytest.mark.timeout(int(max(1800.0, TAKEOVER_EVENTS * 0.02)))
def test_survivor_takes_over_a_killed_workers_partitions(run_settings: Any, tmp_path: Path) -> None:
    began = time.monotonic()
    timeout_s = max(600.0, TAKEOVER_EVENTS * 0.006)
    shop = generate_shop(tmp_path / "shop.jsonl", TAKEOVER_EVENTS, SEED + 1)
    settings = run_settings("takeover")
    ports = [settings.worker_web_port, settings.worker_web_port + 1]
    workers = [
        start_worker(settings, tmp_path, f"worker-{i}", web_port=port)
        for i, port in enumerate(ports)
    ]
    facts = Facts(settings)
    counters = Counters(settings)
    replay = None
    try:
        # Both in the group with a share each before any event arrives.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            views = [scrape(port) for port in ports]
            if all(v is not None and v.assigned > 0 for v in views) and sum(
                v.assigned for v in views if v is not None
            ) == partitions_of(settings):
                break
            assert all(w.process.poll() is None for w in workers), "a worker died at start"
            time.sleep(1.0)
        else:
            raise AssertionError("the two workers never shared the partitions")
        replay = start_replay(settings, shop.path, tmp_path)
        started = time.monotonic()
        # Kill mid-stream, once both have processed events and a third of the facts is in.
        while True:
            assert time.monotonic() - started < timeout_s, "no progress before the kill"
            assert all(w.process.poll() is None for w in workers), "a worker died"
            both = all(counters.of_pid(w.process.pid) > 0 for w in workers)
            if both and sum(facts.counts().values()) >= shop.total // 3:
                break
            time.sleep(0.5)
        victim_index = random.Random(SEED).randrange(2)
        victim, survivor = workers[victim_index], workers[1 - victim_index]
        view = scrape(ports[victim_index])
        assert view is not None, "the victim's /metrics did not answer"
        victim_partitions = sorted(view.partitions(CLICKS))
        assert victim_partitions, "the victim owned no clicks partition"
        progress_at_kill = sum(facts.counts().values()) / shop.total
        killed_at = time.monotonic()
        assert sigkill(victim), "the victim had died by itself"
        # An insert the victim sent just before it died may still complete: the positions
        # to beat are those after it (the group needs the session timeout, 6 s, to notice).
        time.sleep(2.0)
        before = facts.written("click_events")
        first_s = all_s = reassigned_s = None
        moved: dict[int, float] = {}
        while all_s is None or reassigned_s is None:
            now = time.monotonic()
            assert now - killed_at < timeout_s, f"no takeover: moved {moved} of {victim_partitions}"
            assert survivor.process.poll() is None, f"survivor died: {survivor.log_path}"
            written = facts.written("click_events")
            for partition in victim_partitions:
                if partition not in moved and written.get(partition, 0) > before.get(partition, 0):
                    moved[partition] = now - killed_at
            if moved and first_s is None:
                first_s = min(moved.values())
            if len(moved) == len(victim_partitions):
                all_s = max(moved.values())
            if reassigned_s is None:
                mine = scrape(ports[1 - victim_index])
                if mine is not None and mine.assigned == partitions_of(settings):
                    reassigned_s = now - killed_at
            time.sleep(0.25)
        finish_replay(replay, timeout_s=timeout_s)

        def watch() -> None:
            assert survivor.process.poll() is None, f"survivor died: {survivor.log_path}"

        done = wait_complete(
            facts,
            shop.expected_counts(),
            [ports[1 - victim_index]],
            partitions_of(settings),
            timeout_s=timeout_s,
            tick=watch,
        )
        time.sleep(4.0)
        survivor_alive = survivor.process.poll() is None
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
        for worker in workers:
            worker.stop(timeout=120)
        counters.close()
    checked = check_facts(facts, shop)
    rollups = check_rollups(facts, shop)
    facts.close()
    crashes = log_crashes([survivor.log_path]) + (0 if survivor_alive else 1)
    lost = sum(checked["lost"].values())
    duplicated = sum(checked["dup"].values()) + sum(
        max(0, n) for n in checked["rollup_overcount"].values()
    )
    summary = {
        "events_sent": shop.total,
        "victim_clicks_partitions": victim_partitions,
        "progress_at_kill": round(progress_at_kill, 3),
        "reassigned_s": round(reassigned_s, 1),
        "takeover_first_s": None if first_s is None else round(first_s, 1),
        "takeover_s": round(all_s, 1),
        "takeover_per_partition_s": {p: round(s, 1) for p, s in sorted(moved.items())},
        "facts_expected": checked["expected"],
        "facts_found": checked["found"],
        "lost": lost,
        "duplicated": duplicated,
        "duplicated_per_table": checked["dup"],
        "rollup_overcount": checked["rollup_overcount"],
        "rollups_exact": not any(rollups.values()),
        "rollup_keys_differ": rollups,
        "worker_crashes": crashes,
        "seconds": {
            "generate": round(shop.generate_s, 1),
            "kill_to_complete": round(done - killed_at, 1),
            "total": round(time.monotonic() - began, 1),
        },
        "logs": str(tmp_path),
    }
    print("worker-takeover " + dumps(summary))
    assert crashes == 0, f"survivor crashed; see {survivor.log_path}"
    assert lost == 0, checked["lost"]
    assert duplicated == 0, (checked["dup"], checked["rollup_overcount"])
    assert summary["rollups_exact"], rollups


@pytest.mark.timeout(int(RUN_TIMEOUT_S * 2 + 1800))
def test_two_uninterrupted_runs_differ_only_in_the_soft_serving_state(
    run_settings: Any, tmp_path: Path
) -> None:
    """The baseline for the kill test's soft-state numbers: the same file replayed twice, with
    no fault at all. Partitions and topics interleave by arrival, and the serving models learn
    from all of them in that order, so recommendations differ between two clean runs too;
    whatever the kills add is measured against this (``BASELINE_EVENTS``, default 60,000)."""
    shop = generate_shop(tmp_path / "shop.jsonl", BASELINE_EVENTS, SEED)
    first, second = run_settings("base1"), run_settings("base2")
    run_reference(first, shop, tmp_path)
    run_reference(second, shop, tmp_path)
    facts_a, facts_b = Facts(first), Facts(second)
    try:
        checked = check_facts(facts_b, shop)
        fraud = compare_fraud_scores(facts_a, facts_b)
        derived = compare_derived_facts(facts_a, facts_b)
    finally:
        facts_a.close()
        facts_b.close()
    state_a, state_b = read_serving_state(first), read_serving_state(second)
    serving = compare_serving(state_a, state_b, first.recs_top_n, shop.click_last)
    summary = {
        "events_sent": shop.total,
        "users": shop.users,
        "lost": sum(checked["lost"].values()),
        "duplicated": sum(checked["dup"].values()),
        "fraud": fraud,
        "derived_facts": derived,
        "redis": serving,
    }
    print("uninterrupted-runs " + dumps(summary))
    assert summary["lost"] == summary["duplicated"] == 0, checked
    assert fraud["score_mismatches"] == fraud["missing"] == fraud["extra"] == 0, fraud
    assert serving["users_missing"] == serving["users_extra"] == 0, serving
    table_fields = set(serving["profile_fields_differ"]) - SOFT_PROFILE_FIELDS
    assert not table_fields, serving["profile_fields_differ"]
