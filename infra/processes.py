"""Worker processes for tools and tests: start ``borderflow worker`` as a child, stop it by
pid, and wait until it has processed a number of events (its ``stats:processed`` counters).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import Settings
from schemas.errors import BorderflowError
from sinks.redis_store import RedisStore


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    #: Port of the worker's web server (/metrics, /health) when the caller chose it.
    web_port: int | None = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_worker(
    settings: Settings, log_dir: Path, name: str, *, web_port: int | None = None
) -> WorkerProcess:
    """Start ``borderflow worker`` for ``settings`` as a child process: its web server on
    ``web_port`` when given, else on any free port."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, **settings.to_env()}
    log_file = log_path.open("wb")
    command = [sys.executable, "-m", "infra.cli", "worker", "--loglevel", "warning"]
    process = subprocess.Popen(
        [*command, "--web-port", str(web_port or 0)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return WorkerProcess(process, log_path, web_port)


def isolated(settings: Settings, label: str, **updates: Any) -> Settings:
    tag = f"{label}{uuid.uuid4().hex[:6]}"
    return settings.model_copy(
        update={
            "topic_prefix": f"{tag}-",
            "app_id": f"bf-{tag}",
            "redis_prefix": f"{tag}:",
            **updates,
        }
    )


async def _processed_total(store: RedisStore) -> int:
    return sum((await store.processed_counts()).values())


def processed_total(settings: Settings) -> int:
    """Events processed so far under ``settings``' Redis prefix, all workers together."""

    async def read() -> int:
        store = RedisStore(settings)
        try:
            return await _processed_total(store)
        finally:
            await store.aclose()

    return asyncio.run(read())


def per_worker_processed(settings: Settings) -> dict[str, int]:
    """Events processed per worker (``stats:processed:{host}:{pid}``) of this app's prefix."""

    async def read() -> dict[str, int]:
        store = RedisStore(settings)
        try:
            counts: dict[str, int] = {}
            async for key in store.client.scan_iter(match=f"{store.stats_key()}:*"):
                values = await store.client.hgetall(key)
                counts[key.decode()] = sum(int(v) for v in values.values())
            return counts
        finally:
            await store.aclose()

    return asyncio.run(read())


def wait_processed(
    settings: Settings,
    expected: int,
    worker: WorkerProcess,
    timeout_s: float,
    *,
    baseline: int = 0,
) -> tuple[float, int, float]:
    """Poll the processed counters until ``expected`` events more than ``baseline`` are done;
    returns (first_progress_time, count_then, done_time), counts relative to ``baseline``."""

    async def poll() -> tuple[float, int, float]:
        store = RedisStore(settings)
        try:
            deadline = time.monotonic() + timeout_s
            first: tuple[float, int] | None = None
            while time.monotonic() < deadline:
                if worker.process.poll() is not None:
                    raise BorderflowError(
                        f"worker exited with {worker.process.returncode}; see {worker.log_path}"
                    )
                done = await _processed_total(store) - baseline
                now = time.perf_counter()
                if first is None and done > 0:
                    first = (now, done)
                if done >= expected and first is not None:
                    return first[0], first[1], now
                await asyncio.sleep(0.02)
            raise BorderflowError(
                f"worker processed fewer than {expected} events in {timeout_s:.0f}s; "
                f"see {worker.log_path}"
            )
        finally:
            await store.aclose()

    return asyncio.run(poll())
