"""A real Redis stopped and started again under the write-behind: nothing lost, no crash.

A throwaway ``redis-server`` of its own (a free loopback port, AOF in a temporary folder)
so stopping it cannot disturb the shared stack. The restarted server has an empty script
cache, so this also proves the Lua scripts are loaded again.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.config import Settings
from sinks.redis_store import RedisStore, UserState
from sinks.redis_writes import RedisWriteBehind

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def user_state(user: str, ts: int) -> UserState:
    return UserState(user, f"{user}-{ts}", ts, {"events": ts}, [(f"item-{ts}", 1.0)])


async def test_writes_queued_during_a_redis_restart_are_stored_after_it(
    redis_server: RedisServer,
) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
        redis_prefix="outage:",
        redis_socket_timeout_s=1.0,
    )
    store = RedisStore(settings)
    writes = RedisWriteBehind(store, retry_initial_s=0.05, retry_max_s=0.2)
    released: list[int] = []
    try:
        writes.add_user_states([user_state("u1", 1)])
        writes.add_processed({"clicks": 1})
        assert await writes.flush(lambda: released.append(1))

        redis_server.stop()
        for batch in range(2, 6):  # batches go on while Redis is down
            writes.add_user_states([user_state("u1", batch), user_state("u2", batch)])
            writes.add_processed({"clicks": 2})
            writes.add_alerts([f'{{"user_id":"u2","n":{batch}}}'.encode()])
            assert not await writes.flush(lambda b=batch: released.append(b))
        await asyncio.sleep(0.3)
        assert writes.retrying and released == [1]
        assert writes.pending == 2 + 4  # one state per user, every alert

        redis_server.start()
        for _ in range(200):
            if not writes.retrying:
                break
            await asyncio.sleep(0.05)
        assert not writes.retrying and released == [1, 2, 3, 4, 5]

        # Stored once, newest state per user, data from before the restart kept (AOF).
        assert (await store.read_meta("u1"))["last_event_id"] == "u1-5"
        assert (await store.read_meta("u2"))["last_event_id"] == "u2-5"
        assert await store.read_recs("u2") == [("item-5", 1.0)]
        assert await store.processed_counts() == {"clicks": 9}
        alerts = await store.read_alerts(count=100)
        assert [a for _, a in alerts] == [
            f'{{"user_id":"u2","n":{b}}}'.encode() for b in range(2, 6)
        ]
        assert writes.failures >= 1 and len(writes.recoveries_s) == 1
    finally:
        await store.aclose()
