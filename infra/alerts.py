"""``borderflow alerts tail``: follow fraud alerts in the terminal.

Reads the capped Redis stream ``bf:alerts`` that the payments agent appends to (the same
documents as the ``fraud-alerts`` topic), so following it needs no Kafka consumer group.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import click
import orjson

from schemas.config import Settings
from sinks.redis_store import RedisStore


def format_alert(alert: dict[str, object]) -> str:
    """One readable line per alert.

    >>> format_alert({"ts": 1767225600000, "txn_id": "t1", "user_id": "u1", "amount": 900.0,
    ...               "currency": "EUR", "score": 0.95, "threshold": 0.8,
    ...               "reasons": ["card testing: burst"]})
    '2026-01-01 00:00:00Z  t1  user u1  900.00 EUR  score 0.95 >= 0.80  card testing: burst'
    """
    when = datetime.fromtimestamp(int(str(alert["ts"])) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    reasons = alert.get("reasons") or []
    assert isinstance(reasons, list)
    return (
        f"{when}Z  {alert['txn_id']}  user {alert['user_id']}  "
        f"{float(str(alert['amount'])):.2f} {alert['currency']}  "
        f"score {float(str(alert['score'])):.2f} >= {float(str(alert['threshold'])):.2f}  "
        + "; ".join(str(r) for r in reasons)
    )


async def tail_alerts(
    settings: Settings, *, from_start: bool, limit: int | None, as_json: bool, idle_exit_s: float
) -> int:
    store = RedisStore(settings)
    shown = 0
    last_id = "0-0" if from_start else "$"
    idle_since = asyncio.get_running_loop().time()
    try:
        while limit is None or shown < limit:
            entries = await store.read_alerts(last_id, count=100, block_ms=500)
            if not entries:
                if idle_exit_s and asyncio.get_running_loop().time() - idle_since > idle_exit_s:
                    break
                continue
            idle_since = asyncio.get_running_loop().time()
            for entry_id, document in entries:
                last_id = entry_id
                click.echo(document.decode() if as_json else format_alert(orjson.loads(document)))
                shown += 1
                if limit is not None and shown >= limit:
                    break
    finally:
        await store.aclose()
    return shown


@click.group(name="alerts")
def alerts_cli() -> None:
    """Fraud alerts for risk teams."""


@alerts_cli.command(name="tail")
@click.option("--from-start", is_flag=True, help="Show the alerts kept so far, then follow.")
@click.option(
    "-n", "--limit", type=click.IntRange(min=1), default=None, help="Stop after this many alerts."
)
@click.option("--json", "as_json", is_flag=True, help="Print each alert as its JSON document.")
@click.option(
    "--idle-exit",
    type=float,
    default=0.0,
    show_default=True,
    help="Stop after this many seconds without a new alert (0: follow forever).",
)
@click.pass_obj
def tail_command(
    settings: Settings, from_start: bool, limit: int | None, as_json: bool, idle_exit: float
) -> None:
    """Follow fraud alerts (from the Redis stream bf:alerts) as they are raised."""
    asyncio.run(
        tail_alerts(settings, from_start=from_start, limit=limit, as_json=as_json,
                    idle_exit_s=idle_exit)
    )  # fmt: skip
