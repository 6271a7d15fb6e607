"""``borderflow demo``: the main job once, end to end, on the running stack.

Starts a worker, sends a seeded simulated shop (clicks, payments, chargebacks, shipments)
through Kafka, waits until every event is processed, then prints what each user group sees:
storefronts (recommendations and profiles from Redis), risk teams (alerts with reasons from
``fraud-alerts``) and analysts (aggregates from ClickHouse). The worker is stopped at the end.

Each run uses its own topics and consumer group (``demo-<run>-*``) so reruns never mix with
earlier runs' offsets; Redis keys (``bf:``) and the ClickHouse database are the real ones.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import click
import orjson

from infra.bench import TOPICS
from infra.generator import GeneratorConfig, generate_to_list
from infra.migrate import clickhouse_client, migrate
from infra.processes import processed_total, start_worker, wait_processed
from schemas.config import Settings
from sinks.kafka import EventProducer, TopicReader, ensure_topics
from sinks.storefront_client import StorefrontClient


def _section(title: str) -> None:
    click.echo("")
    click.secho(f"== {title} ", bold=True, nl=False)
    click.echo("=" * max(0, 70 - len(title)))


def run_demo(settings: Settings, *, users: int, days: int, seed: int) -> None:
    run = settings.model_copy(
        update={
            "topic_prefix": f"demo-{uuid.uuid4().hex[:6]}-",
            "app_id": f"borderflow-demo-{uuid.uuid4().hex[:6]}",
        }
    )
    _section("setup")
    migrate(run)
    ensure_topics(run, TOPICS)
    click.echo(
        f"Kafka {run.kafka_bootstrap}  Redis {run.redis_url}  "
        f"ClickHouse {run.clickhouse_host}:{run.clickhouse_port}/{run.clickhouse_database}"
    )
    click.echo(f"topics: {', '.join(run.topic(t) for t in TOPICS)}")

    events = generate_to_list(GeneratorConfig(users=users, days=days, seed=seed))
    mix = Counter(event.topic for event in events)
    click.echo(f"simulated {len(events)} events over {days} days for {users} users: {dict(mix)}")

    # Redis counters are shared with earlier runs: count from where they stand now.
    baseline = processed_total(run)
    worker = start_worker(run, run.stack_dir / "demo", "worker")
    click.echo(f"worker started (pid {worker.process.pid}, log {worker.log_path})")
    try:
        _section("pipeline")
        started = time.perf_counter()
        with EventProducer(run) as producer:
            for event in events:
                producer.send(run.topic(event.topic), event.key, orjson.dumps(event.value))
            producer.flush(60)
        produced_in = time.perf_counter() - started
        click.echo(f"produced {len(events)} events in {produced_in:.1f}s")
        first_t, first_n, done_t = wait_processed(
            run, len(events), worker, timeout_s=600, baseline=baseline
        )
        rate = (len(events) - first_n) / max(done_t - first_t, 1e-6)
        click.echo(
            f"processed {len(events)} events; {rate:,.0f} events/s once the worker was "
            f"running (one worker, {run.topic_partitions} partitions)"
        )
        time.sleep(run.clickhouse_flush_interval_s + 0.5)  # last ClickHouse flush
        _show_storefront(run, events)
        _show_alerts(run)
        _show_analytics(run)
    finally:
        worker.stop()
        click.echo("")
        click.echo("worker stopped; the stack keeps running (make down stops it)")


def _show_storefront(settings: Settings, events: list[Any]) -> None:
    _section("storefronts: Redis (sinks/storefront_client.py)")
    purchases = [e for e in events if e.topic == "clicks" and e.value.get("type") == "purchase"]
    sample = list(dict.fromkeys(e.key for e in reversed(purchases)))[:3]
    with StorefrontClient.from_settings(settings) as shop:
        for user_id in sample:
            profile = shop.profile(user_id) or {}
            recs = shop.recommendations(user_id, 5)
            delivery = (
                f"{profile['deliveries']} deliveries: {profile['avg_delivery_days']:.1f} days on "
                f"average, {profile['late_delivery_share']:.0%} late"
                if profile.get("deliveries")
                else "no delivery yet"
            )
            click.echo(
                f"user {user_id} ({profile.get('country')}, {profile.get('device')}, "
                f"{profile.get('lang')}): segment {profile.get('segment') or '-'}, "
                f"{profile.get('frequency_purchases')} purchases, "
                f"{profile.get('monetary_usd') or 0:.2f} USD, price band "
                f"{profile.get('price_band') or '-'}, {delivery}"
            )
            click.echo(f"  top categories {profile.get('top_categories')}")
            click.echo(
                f"  recs ({recs.basis}, after event {recs.event_id}): "
                + ", ".join(f"{item} ({score:.3g})" for item, score in recs.items)
            )
        bought = [e.value["item_id"] for e in reversed(purchases)]
        for item_id in dict.fromkeys(bought):
            together = shop.bought_together(item_id, 3)
            if together:
                click.echo(
                    f"bought together with {item_id}: "
                    + ", ".join(f"{item} ({p:.0%})" for item, p in together)
                )
                break
        trending = shop.popular("DE", 5)
        click.echo("trending in DE: " + ", ".join(item for item, _ in trending))
    if sample:
        click.echo(
            f"read it yourself: redis-cli -p {settings.redis_port} "
            f"ZREVRANGE {settings.redis_prefix}recs:{sample[0]} 0 9 WITHSCORES"
        )


def _show_alerts(settings: Settings) -> None:
    _section("risk team: fraud-alerts topic")
    with TopicReader(settings, settings.topic("fraud-alerts")) as reader:
        alerts = [orjson.loads(m.value()) for m in reader.read_until_idle(idle_s=1.5)]
    click.echo(f"{len(alerts)} alerts; the latest:")
    for alert in alerts[-5:]:
        click.echo(
            f"  {alert['txn_id']} user {alert['user_id']} {alert['amount']:.2f} "
            f"{alert['currency']} score {alert['score']:.2f}: {'; '.join(alert['reasons'])}"
        )


def _show_analytics(settings: Settings) -> None:
    _section("analysts: ClickHouse")
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        rows = client.execute(
            "SELECT topic, sum(events) AS events FROM events_per_minute "
            "GROUP BY topic ORDER BY events DESC"
        )
        click.echo("events per topic (events_per_minute, all runs so far):")
        for topic, count in rows:
            click.echo(f"  {topic:<14}{count:>10,}")
        rows = client.execute(
            "SELECT ip_country, count() AS payments, sum(is_alert) AS alerts, "
            "round(avg(score), 3) AS mean_score, round(sum(amount_usd), 2) AS usd "
            "FROM fraud_scores FINAL GROUP BY ip_country ORDER BY payments DESC LIMIT 6"
        )
        click.echo("payments by IP country (fraud_scores FINAL):")
        click.echo(f"  {'country':<9}{'payments':>9}{'alerts':>8}{'mean score':>12}{'USD':>14}")
        for country, payments, alerts, mean_score, usd in rows:
            click.echo(
                f"  {country or '-':<9}{payments:>9}{alerts:>8}{mean_score:>12}{usd:>14,.2f}"
            )
        [(predictions, hr5, hr20, mrr20)] = client.execute(
            "SELECT sum(predictions), sum(hits_5) / sum(predictions), "
            "sum(hits_20) / sum(predictions), sum(rr_20) / sum(predictions) FROM rec_quality"
        )
        if predictions:
            click.echo(
                f"recommendation quality online (rec_quality): {predictions:,} clicks scored "
                f"against the recs served before them: HR@5 {hr5:.3f}, HR@20 {hr20:.3f}, "
                f"MRR@20 {mrr20:.3f}"
            )
    finally:
        client.disconnect()
    click.echo(
        f"query it yourself: clickhouse-client --port {settings.clickhouse_port} "
        f"-d {settings.clickhouse_database} -q 'SELECT count() FROM fraud_scores FINAL'"
    )
