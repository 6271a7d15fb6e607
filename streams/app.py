"""Builds a runnable borderflow worker: topology + shared runtime + the agents.

``create_worker_app(settings)`` is what ``borderflow worker`` runs. The pipeline variant is
chosen by name (``settings.pipeline``): ``batched`` (production) or ``naive`` (bench baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import faust
import mode

from schemas.config import Settings
from schemas.errors import BorderflowError
from streams.agents import clicks, fraud_labels, logistics, naive, payments
from streams.runtime import Runtime
from streams.topology import build_topology


def _register_batched(runtime: Runtime) -> None:
    clicks.register(runtime)
    payments.register(runtime)
    fraud_labels.register(runtime)
    logistics.register(runtime)


PIPELINES: dict[str, Callable[[Runtime], object]] = {
    "batched": _register_batched,
    "naive": naive.register,
}


def create_worker_app(settings: Settings) -> tuple[faust.App, Runtime]:
    register = PIPELINES.get(settings.pipeline)
    if register is None:
        raise BorderflowError(
            f"unknown pipeline {settings.pipeline!r}; choose one of {', '.join(PIPELINES)}"
        )
    topology = build_topology(settings)
    runtime = Runtime(settings, topology)
    register(runtime)

    class RuntimeService(mode.Service):
        """Flushes ClickHouse and closes Redis when the worker stops."""

        async def on_stop(self) -> None:
            await runtime.close()

    topology.app.service(RuntimeService)
    return topology.app, runtime
