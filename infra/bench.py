"""``borderflow bench``: throughput and latency of the real pipeline on the running stack.

Workload: the seeded generator (``GeneratorConfig(users=n_events // 100, days=12,
seed=11)``, or ``--users N``), the first ``n_events`` events in event-time order: mostly
clicks, with payments, fraud labels and logistics scans, every capability on. Each variant
gets fresh topics, app id and Redis prefix, so runs never see each other's data.

1. **Throughput**, per variant (``naive`` then ``batched``, same process, same workload):
   the workload is produced to the topics first, then one worker is started; events/s is
   measured from the first processed batch to the last, from the worker's own
   ``stats:processed`` counters in Redis.
2. **Latency at half load** (batched): a fresh worker gets the workload at half the measured
   throughput; produce-to-visible latency is taken per click from the producer timestamp to
   the moment the recommendation write returned (recorded by the worker), and per alert from
   produce to the alert being consumed from ``fraud-alerts``.

Results are printed and written as JSON with a description of the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from infra.generator import GeneratedEvent, GeneratorConfig, generate_to_list
from infra.migrate import migrate
from infra.processes import (
    WorkerProcess,
    isolated,
    per_worker_processed,
    processed_total,
    start_worker,
    wait_processed,
)
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import EventProducer, TopicReader, ensure_topics
from sinks.redis_store import RedisStore

#: librdkafka linger of the paced latency producer (1 ms still lets a burst share a request).
PACED_LINGER_MS = 1

TOPICS = list(ALL_TOPICS)

#: A tracker flushes a user's buffered events at least this often (event time): 10 s is the
#: flush interval of Segment's analytics.js and RudderStack's SDKs (both also flush at 20
#: events, hence ``--events-per-message 20`` for that workload).
TRACKER_FLUSH_MS = 10_000


@dataclass(frozen=True)
class Message:
    """One Kafka message of the workload: a single event, or a JSON array of one user's."""

    topic: str
    key: str
    value: bytes
    events: list[GeneratedEvent]


def pack_messages(events: list[GeneratedEvent], per_message: int) -> list[Message]:
    """Group the workload the way web trackers send it: one user's consecutive events of one
    topic in a JSON array, flushed at ``per_message`` events or ``TRACKER_FLUSH_MS`` of event
    time after its first; ``per_message == 1`` sends every event on its own. A user's events
    keep their order (one key, one partition); messages go out in flush order."""
    if per_message <= 1:
        return [
            Message(e.topic, e.key, orjson.dumps(e.value), [e]) for e in events
        ]  # fmt: skip
    messages: list[Message] = []
    open_batches: dict[tuple[str, str], list[GeneratedEvent]] = {}

    def flush(slot: tuple[str, str]) -> None:
        batch = open_batches.pop(slot)
        value = orjson.dumps([e.value for e in batch])
        messages.append(Message(slot[0], slot[1], value, batch))

    for event in events:
        # Close every batch whose flush time has passed by this event's time.
        for slot in [
            slot
            for slot, batch in open_batches.items()
            if event.ts - batch[0].ts >= TRACKER_FLUSH_MS
        ]:
            flush(slot)
        slot = (event.topic, event.key)
        open_batches.setdefault(slot, []).append(event)
        if len(open_batches[slot]) >= per_message:
            flush(slot)
    for slot in list(open_batches):
        flush(slot)
    return messages


def produce_all(settings: Settings, messages: list[Message]) -> float:
    """Produce every message as fast as possible; returns messages/s."""
    started = time.perf_counter()
    with EventProducer(settings) as producer:
        for message in messages:
            producer.send(settings.topic(message.topic), message.key, message.value)
        producer.flush(60)
    return len(messages) / (time.perf_counter() - started)


def measure_throughput(
    settings: Settings,
    messages: list[Message],
    pipeline: str,
    log_dir: Path,
    *,
    workers: int = 1,
) -> dict[str, Any]:
    """Events/s of ``workers`` workers of one app on the workload, produced as a backlog.

    The workers start first and are warmed up until each owns partitions and has processed
    events (so no group join or rebalance falls into the measurement); then the workload is
    produced at once and timed from the first processed batch to the last.
    """
    run = isolated(settings, f"{pipeline[:5]}{workers}w", pipeline=pipeline)
    ensure_topics(run, TOPICS)
    n_events = sum(len(m.events) for m in messages)
    procs = [start_worker(run, log_dir, f"throughput-{pipeline}-{i}") for i in range(workers)]
    try:
        baseline = warm_up(run, procs)
        produce_rate = produce_all(run, messages)
        first_t, first_n, done_t = wait_processed(
            run, n_events, procs[0], timeout_s=900, baseline=baseline
        )
        for proc in procs[1:]:
            if proc.process.poll() is not None:
                raise click.ClickException(f"a bench worker died; see {proc.log_path}")
        shares = sorted(per_worker_processed(run).values(), reverse=True)
    finally:
        for proc in procs:
            proc.stop()
    elapsed = max(done_t - first_t, 1e-6)
    rate = (n_events - first_n) / elapsed
    return {
        "pipeline": pipeline,
        "workers": workers,
        "events": n_events,
        "messages": len(messages),
        "events_per_s": round(rate, 1),
        "events_per_s_per_worker": round(rate / workers, 1),
        # The worker counts events; messages/s scales by the workload's events per message.
        "messages_per_s": round(rate * len(messages) / n_events, 1),
        "producer_messages_per_s": round(produce_rate, 1),
        "processing_seconds": round(elapsed, 3),
        "events_per_worker": shares,
    }


#: Warm-up clicks per round: enough distinct users to reach every partition.
WARM_UP_USERS = 64


def warm_up(settings: Settings, workers: list[WorkerProcess], timeout_s: float = 180.0) -> int:
    """Send rounds of warm-up clicks (users of their own) until every worker has processed
    some; returns the processed count then (the measurement's baseline)."""
    deadline = time.monotonic() + timeout_s
    sent = 0
    for round_no in itertools.count():
        with EventProducer(settings) as producer:
            for i in range(WARM_UP_USERS):
                user = f"bench-warm-{i}"
                value = {
                    "event_id": f"{user}-{round_no}",
                    "ts": 1_700_000_000_000 + round_no * 1000,
                    "user_id": user,
                    "session_id": f"{user}-s",
                    "type": "view",
                    "item_id": f"warm-item-{i % 8}",
                    "country": "DE",
                }
                producer.send(settings.topic("clicks"), user, orjson.dumps(value))
            producer.flush(10)
        sent += WARM_UP_USERS
        wait_processed(settings, sent, workers[0], timeout_s=max(1.0, deadline - time.monotonic()))
        if len(per_worker_processed(settings)) >= len(workers):
            return processed_total(settings)
        if time.monotonic() > deadline:
            raise click.ClickException("bench workers did not all get partitions in time")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def _percentiles(samples: list[float]) -> dict[str, float | int]:
    if not samples:
        return {"samples": 0}
    values = np.asarray(samples)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "samples": len(samples),
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(values.max()), 2),
    }


#: The latency phase's workload gets one card-testing burst (one alert) per this many seconds.
ALERT_BURST_EVERY_S = 0.5


def card_testing_burst(ts: int, number: int) -> list[Message]:
    """Four tiny charges and a large one on a new card within seconds, from event time ``ts``:
    the fraud engine's card-testing rule alerts on the large one (whatever the model learned),
    so every burst gives one produce-to-alert sample."""
    user = f"bench-card-tester-{number}"
    charges = [1.0, 1.0, 1.0, 1.0, 900.0]
    messages = []
    for i, amount in enumerate(charges):
        event_ts = ts + i * 1000
        value: dict[str, Any] = {
            "event_id": f"bench-burst-{number}-{i}",
            "ts": event_ts,
            "user_id": user,
            "card_id": f"card-{user}",
            "merchant_id": "bench-merchant",
            "amount": amount,
            "currency": "USD",
            "billing_country": "DE",
            "shipping_country": "DE",
            "ip_country": "NG" if amount > 100 else "DE",
            "device_id": f"device-{user}",
        }
        event = GeneratedEvent("payments", user, value, event_ts)
        messages.append(Message("payments", user, orjson.dumps(value), [event]))
    return messages


def measure_latency(
    settings: Settings,
    messages: list[Message],
    rate: float,
    seconds: float,
    log_dir: Path,
) -> dict[str, Any]:
    run = isolated(settings, "lat", record_latency=True)
    ensure_topics(run, TOPICS)
    worker = start_worker(run, log_dir, "latency-batched")
    wanted = max(1, int(rate * seconds))
    workload: list[Message] = []
    n = 0
    burst_every = max(1, int(rate * ALERT_BURST_EVERY_S))
    next_burst = burst_every
    for message in messages:
        if n >= wanted:
            break
        workload.append(message)
        n += len(message.events)
        if n >= next_burst:
            # The shop's own fraud is rare in a few seconds of traffic: card-testing bursts
            # make alerts to time (one per burst, from the engine's rules).
            burst = card_testing_burst(message.events[-1].ts, next_burst // burst_every)
            workload.extend(burst)
            n += len(burst)
            next_burst += burst_every
    produced_at: dict[str, float] = {}
    alert_latencies: list[float] = []
    stop_consuming = threading.Event()

    def consume_alerts() -> None:
        with TopicReader(run, run.topic("fraud-alerts")) as reader:
            while not stop_consuming.is_set():
                for message in reader.poll(0.05):
                    now = time.time() * 1000
                    txn_id = orjson.loads(message.value())["txn_id"]
                    if txn_id in produced_at:
                        alert_latencies.append(now - produced_at[txn_id])

    alerts_thread = threading.Thread(target=consume_alerts, daemon=True)
    alerts_thread.start()
    try:
        # Wait until the worker has joined its group and processes events.
        with EventProducer(run) as producer:
            warm = messages[0]
            producer.send(run.topic(warm.topic), warm.key, warm.value)
            producer.flush(10)
        wait_processed(run, len(warm.events), worker, timeout_s=120)
        asyncio.run(_forget_latencies(run))  # the warm-up event waited for the group join
        interval = 1.0 / rate
        started = time.perf_counter()
        # A paced producer must not hold messages back: librdkafka's default 5 ms linger
        # would count in every sample (the timestamp is taken at the produce call).
        with EventProducer(run, {"linger.ms": PACED_LINGER_MS}) as producer:
            sent_events = 0
            for message in workload:
                target = started + sent_events * interval  # paced in events, not messages
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if message.topic == "payments":
                    now_ms = time.time() * 1000
                    for event in message.events:
                        produced_at[event.value["event_id"]] = now_ms
                producer.send(run.topic(message.topic), message.key, message.value)
                producer.poll(0)
                sent_events += len(message.events)
            producer.flush(30)
        achieved = n / (time.perf_counter() - started)
        wait_processed(run, n + len(messages[0].events), worker, timeout_s=300)
        time.sleep(1.0)  # let the last alerts arrive
    finally:
        stop_consuming.set()
        alerts_thread.join(10)
        worker.stop()

    async def read() -> list[float]:
        store = RedisStore(run)
        try:
            return await store.read_latencies("recs")
        finally:
            await store.aclose()

    return {
        "target_events_per_s": round(rate, 1),
        "achieved_events_per_s": round(achieved, 1),
        "events": n,
        "click_to_recs_in_redis": _percentiles(asyncio.run(read())),
        "payment_to_alert_on_topic": _percentiles(alert_latencies),
    }


def measure_fraud_scoring_cost(n_payments: int = 20_000) -> dict[str, Any]:
    """In-process cost of the fraud engine alone (features + ensemble + learning), on
    handbook-simulator payments with their labels, after a warm-up that makes the models used."""
    from infra.handbook import HandbookConfig, simulate_handbook
    from models.fraud import FraudEngine
    from schemas.events import FraudLabelEvent, PaymentEvent

    engine = FraudEngine()
    payments: list[PaymentEvent] = []
    labels: list[FraudLabelEvent] = []
    for event in simulate_handbook(HandbookConfig(customers=500, terminals=1000, days=60)):
        if event.topic == "payments":
            payments.append(PaymentEvent.model_validate(event.value))
        else:
            labels.append(FraudLabelEvent.model_validate(event.value))
        if len(payments) >= 2 * n_payments:
            break
    warm, timed = payments[:n_payments], payments[n_payments : 2 * n_payments]
    engine.add_labels(labels)
    engine.score(warm)
    started = time.perf_counter()
    engine.score(timed)
    elapsed = time.perf_counter() - started
    return {
        "payments": len(timed),
        "us_per_payment": round(elapsed / max(1, len(timed)) * 1e6, 1),
        "model_version": engine.model_version,
        "what": "features + ensemble score + label learning, one process, no I/O",
    }


async def _forget_latencies(settings: Settings) -> None:
    store = RedisStore(settings)
    try:
        await store.client.delete(store.latency_key("recs"))
    finally:
        await store.aclose()


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def run_bench(
    settings: Settings,
    *,
    n_events: int,
    latency_seconds: float,
    run_naive: bool,
    out: str | None,
    n_users: int | None = None,
    events_per_message: int = 1,
    workers: int = 1,
    state_users: int = 0,
) -> dict[str, Any]:
    bench_settings = settings.model_copy(
        update={"clickhouse_database": f"{settings.clickhouse_database}_bench"}
    )
    migrate(bench_settings)
    # The generator makes ~8.5 events per user and day: n/100 users over 12 days fill the
    # workload and reach past the 7-day settlement delay, so labels are part of the mix.
    # More users (``n_users``) spread the same events over fewer days of event time.
    users = n_users if n_users is not None else max(100, n_events // 100)
    config = GeneratorConfig(users=users, days=12, seed=11, max_events=n_events)
    events = generate_to_list(config)
    messages = pack_messages(events, events_per_message)
    mix = Counter(event.topic for event in events)
    log_dir = settings.stack_dir / "bench"
    click.echo(f"workload: {len(events)} events {dict(mix)}")

    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "workload": {
            "generator": {"users": config.users, "days": config.days, "seed": config.seed},
            "events": len(events),
            "mix": dict(mix),
            "max_events_per_message": events_per_message,
            "messages": len(messages),
            "mean_events_per_message": round(len(events) / len(messages), 2),
        },
        "settings": {
            "batch_max_events": settings.batch_max_events,
            "batch_within_s": settings.batch_within_s,
            "consumer_fetch_max_wait_ms": settings.consumer_fetch_max_wait_ms,
            "latency_producer_linger_ms": PACED_LINGER_MS,
            "topic_partitions": settings.topic_partitions,
            "broker": settings.kafka_bootstrap,
        },
        "throughput": {},
    }
    click.echo("fraud scoring cost (in process) ...")
    results["fraud_scoring"] = measure_fraud_scoring_cost()
    click.echo(f"  {results['fraud_scoring']['us_per_payment']} us per payment")
    variants = (["naive"] if run_naive else []) + ["batched"]
    for variant in variants:
        click.echo(f"throughput: {variant} pipeline ...")
        result = measure_throughput(bench_settings, messages, variant, log_dir)
        results["throughput"][variant] = result
        click.echo(f"  {result['events_per_s']:.0f} events/s")
    batched_rate = results["throughput"]["batched"]["events_per_s"]
    if workers > 1:
        click.echo(f"throughput: batched pipeline, {workers} workers ...")
        scaled = measure_throughput(bench_settings, messages, "batched", log_dir, workers=workers)
        results["throughput"][f"batched_{workers}_workers"] = scaled
        results["scale_out"] = {
            "workers": workers,
            "events_per_s": scaled["events_per_s"],
            "speedup_vs_1_worker": round(scaled["events_per_s"] / batched_rate, 2),
        }
        click.echo(
            f"  {scaled['events_per_s']:.0f} events/s, "
            f"{results['scale_out']['speedup_vs_1_worker']}x one worker"
        )
    if run_naive:
        naive_rate = results["throughput"]["naive"]["events_per_s"]
        results["speedup_vs_naive"] = round(batched_rate / naive_rate, 2)
        click.echo(f"speed-up batched / naive: {results['speedup_vs_naive']}x")
    if latency_seconds > 0:
        click.echo(f"latency at half load ({batched_rate / 2:.0f} events/s) ...")
        results["latency_half_load"] = measure_latency(
            bench_settings, messages, batched_rate / 2, latency_seconds, log_dir
        )
    if state_users:
        from infra.bench_state import measure_state

        click.echo(f"state: {state_users} users restored, SIGKILL, recovered ...")
        results["state"] = measure_state(bench_settings, state_users, log_dir)
        state = results["state"]
        click.echo(
            f"  {state['memory_gb_per_million_users']} GB per 1M users, recovery after "
            f"SIGKILL {state['recovery_seconds_after_sigkill']} s"
        )
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2).decode()
    click.echo(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        click.echo(f"written to {out}")
    return results
