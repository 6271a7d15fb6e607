"""LocalStack on its own ports and stack directory, so it never touches the dev stack.

One up/down cycle for the whole module (ClickHouse start/stop dominates the run time); the
tests run in file order and share that stack. Only Redis is restarted for the stale-pid cases
because it restarts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from clickhouse_driver import Client
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infra.stack import LocalStack, stack_cli
from schemas.config import Settings
from schemas.errors import BorderflowError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KAFKA_PORT = 29092
REDIS_PORT = 26379
CLICKHOUSE_PORT = 29000
CLICKHOUSE_HTTP_PORT = 28123


def _settings(stack_dir: Path) -> Settings:
    return Settings(
        kafka_bootstrap=f"127.0.0.1:{KAFKA_PORT}",
        redis_url=f"redis://127.0.0.1:{REDIS_PORT}/0",
        clickhouse_port=CLICKHOUSE_PORT,
        clickhouse_http_port=CLICKHOUSE_HTTP_PORT,
        stack_dir=stack_dir,
    )


def _alive(pid: int) -> bool:
    """Running and not a zombie (the sandbox's pid 1 reaps orphans only now and then)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(host, port) of the TCP sockets ``pid`` listens on, from /proc (no `ss` on bare Debian)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = local_address.split(":")
            if len(host_hex) == 8:
                host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
            else:
                host = f"ipv6:{host_hex}"
            addresses.add((host, int(port_hex, 16)))
    return addresses


def _pids(local: LocalStack) -> dict[str, int]:
    services = local.status()["services"]
    assert all(entry["running"] for entry in services.values()), services
    return {name: entry["pid"] for name, entry in services.items()}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return _settings(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def local_stack(settings: Settings) -> Iterator[tuple[LocalStack, dict]]:
    local = LocalStack(settings)
    try:
        first_up = local.up()
        yield local, first_up
    finally:
        # Whatever a test did, leave nothing running on the test ports.
        local.down()


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not ours, to plant as a 'reused' pid; it must survive the stack."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def test_up_starts_every_service_and_each_answers(local_stack: tuple[LocalStack, dict]) -> None:
    local, first_up = local_stack
    assert {name: entry["action"] for name, entry in first_up["services"].items()} == {
        "kafka": "started",
        "redis": "started",
        "clickhouse": "started",
    }
    assert first_up["endpoints"]["kafka_bootstrap"] == f"127.0.0.1:{KAFKA_PORT}"

    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    bootstrap: dict[str, str | int | float | bool] = {
        "bootstrap.servers": f"127.0.0.1:{KAFKA_PORT}"
    }
    # Keep the admin client referenced until the future resolves (GC destroys its handle).
    admin = AdminClient(bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(10)
    producer = Producer(bootstrap)
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(10) == 0
    # assign() instead of subscribe(): no consumer-group join, which takes seconds on Tansu.
    consumer = Consumer({**bootstrap, "group.id": "stack-test", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    message = consumer.poll(10)
    consumer.close()
    assert message is not None and message.error() is None
    assert message.value() == b"hello"

    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT)
    client.set("stack-test", "v")
    assert client.get("stack-test") == b"v"
    client.close()

    clickhouse = Client("127.0.0.1", port=CLICKHOUSE_PORT)
    assert clickhouse.execute("SELECT 1") == [(1,)]
    assert clickhouse.execute("SELECT timezone()")[0][0] in ("UTC", "Etc/UTC")
    clickhouse.disconnect()

    # Only loopback, only the configured ports (no interserver 9009 and the like).
    for pid in _pids(local).values():
        addresses = _listening_addresses(pid)
        assert addresses, f"pid {pid} listens nowhere"
        assert {host for host, _ in addresses} == {"127.0.0.1"}, addresses
        ports = {port for _, port in addresses}
        assert ports <= {KAFKA_PORT, REDIS_PORT, CLICKHOUSE_PORT, CLICKHOUSE_HTTP_PORT}


def test_second_up_is_a_no_op(local_stack: tuple[LocalStack, dict]) -> None:
    local, first_up = local_stack
    again = local.up()
    for name, entry in again["services"].items():
        assert entry["action"] == "already running"
        assert entry["pid"] == first_up["services"][name]["pid"]


def test_cli_up_and_status(local_stack: tuple[LocalStack, dict], settings: Settings) -> None:
    local, _ = local_stack
    runner = CliRunner()

    up = runner.invoke(stack_cli, ["up"], obj=settings)
    assert up.exit_code == 0, up.output
    assert up.output.count("already running") == 3

    status = runner.invoke(stack_cli, ["status", "--json"], obj=settings)
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert {name: entry["pid"] for name, entry in report["services"].items()} == _pids(local)
    assert report["services"]["clickhouse"]["log"].startswith(str(settings.stack_dir))
    assert report["endpoints"] == {
        "kafka_bootstrap": f"127.0.0.1:{KAFKA_PORT}",
        "redis_url": f"redis://127.0.0.1:{REDIS_PORT}/0",
        "clickhouse_host": "127.0.0.1",
        "clickhouse_port": CLICKHOUSE_PORT,
        "clickhouse_http_port": CLICKHOUSE_HTTP_PORT,
    }

    table = runner.invoke(stack_cli, ["status"], obj=settings)
    assert table.exit_code == 0 and "clickhouse" in table.output and "yes" in table.output

    for command in ("up", "down", "status"):
        help_text = runner.invoke(stack_cli, [command, "--help"], obj=settings)
        assert help_text.exit_code == 0 and "Usage:" in help_text.output


def test_stale_pid_file_of_a_dead_process_is_replaced(
    local_stack: tuple[LocalStack, dict],
) -> None:
    local, _ = local_stack
    pid_file = local.specs["redis"].pid_file
    local.down(["redis"])
    finished = subprocess.Popen(["true"])
    finished.wait()
    pid_file.write_text(f"{finished.pid}\n")

    result = local.up(["redis"])["services"]["redis"]

    assert result["action"] == "started"
    assert "process gone" in result["note"]
    assert result["pid"] != finished.pid and _alive(result["pid"])
    assert redis.Redis(host="127.0.0.1", port=REDIS_PORT).ping()


def test_pid_reused_by_another_program_is_never_signalled(
    local_stack: tuple[LocalStack, dict], bystander: subprocess.Popen[bytes]
) -> None:
    local, _ = local_stack
    pid_file = local.specs["redis"].pid_file
    local.down(["redis"])

    pid_file.write_text(f"{bystander.pid}\n")
    assert local.status()["services"]["redis"]["running"] is False
    down = local.down(["redis"])["services"]["redis"]
    assert down["action"] == "stale pid file removed"
    assert not pid_file.exists()

    pid_file.write_text(f"{bystander.pid}\n")
    result = local.up(["redis"])["services"]["redis"]
    assert result["action"] == "started"
    assert "another program" in result["note"]
    assert result["pid"] != bystander.pid
    assert bystander.poll() is None, "the bystander process was signalled"


def test_port_held_by_a_foreign_process_fails_in_one_line(
    local_stack: tuple[LocalStack, dict], tmp_path: Path
) -> None:
    local, _ = local_stack
    running = _pids(local)

    # Another stack directory on the same ports: those processes are not ours there.
    intruder = LocalStack(_settings(tmp_path / "other"))
    with pytest.raises(BorderflowError) as raised:
        intruder.up()
    message = str(raised.value)
    assert "\n" not in message
    for port in (KAFKA_PORT, REDIS_PORT, CLICKHOUSE_PORT, CLICKHOUSE_HTTP_PORT):
        assert str(port) in message
    assert _pids(local) == running
    assert not any(spec.pid_file.exists() for spec in intruder.specs.values())

    # A plain socket on the port is refused the same way, before anything is started.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        blocked = LocalStack(
            _settings(tmp_path / "blocked").model_copy(
                update={"redis_url": f"redis://127.0.0.1:{port}/0"}
            )
        )
        with pytest.raises(BorderflowError, match=f"redis port {port} already in use"):
            blocked.up(["redis"])
        result = CliRunner().invoke(stack_cli, ["up"], obj=blocked.settings)
        assert result.exit_code == 1
        assert result.output.startswith("Error: cannot start the local stack")


def test_down_stops_exactly_its_own_pids(
    local_stack: tuple[LocalStack, dict], bystander: subprocess.Popen[bytes]
) -> None:
    local, _ = local_stack
    before = _pids(local)

    stopped = local.down()["services"]

    assert {name: entry["pid"] for name, entry in stopped.items()} == before
    assert all(entry["action"] in ("stopped", "killed") for entry in stopped.values())
    assert not any(_alive(pid) for pid in before.values())
    assert bystander.poll() is None
    assert not any(spec.pid_file.exists() for spec in local.specs.values())
    status = local.status()["services"]
    assert not any(entry["running"] for entry in status.values())
    assert local.down()["services"]["clickhouse"]["action"] == "not running"
