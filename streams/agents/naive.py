"""The deliberately naive pipeline, kept only as the bench's baseline.

Same jobs and the same sinks as the production agents, but event by event: each event is
its own "batch" (one table write, one Redis round trip per event) and each processed event
is also forwarded with its own ``send`` - the way a first Faust prototype is usually
written. ``borderflow bench`` runs it next to the batched pipeline in the same run and
reports the ratio. Never use it in production.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import faust

from streams.agents.clicks import process_clicks
from streams.agents.fraud_labels import process_labels
from streams.agents.logistics import process_scans
from streams.agents.payments import process_payments
from streams.runtime import Runtime

Handler = Callable[[Runtime, Sequence[faust.EventT]], Awaitable[int]]


def register(runtime: Runtime) -> list[faust.types.AgentT]:
    topology = runtime.topology
    forwarded = topology.app.topic(
        runtime.settings.topic("naive-processed"), key_serializer="raw", value_serializer="raw"
    )
    handlers: dict[str, tuple[faust.TopicT, Handler]] = {
        "naive_clicks": (topology.clicks, process_clicks),
        "naive_payments": (topology.payments, process_payments),
        "naive_labels": (topology.fraud_labels, process_labels),
        "naive_logistics": (topology.logistics, process_scans),
    }
    agents = []
    for name, (topic, handler) in handlers.items():

        async def per_event(stream: faust.StreamT, handler: Handler = handler) -> None:
            async for event in stream.events():
                await handler(runtime, [event])
                await forwarded.send(key=event.message.key, value=event.value)

        agents.append(topology.app.agent(topic, name=name)(per_event))
    return agents
