"""docker-compose.yml, .env.example, Dockerfile and the Grafana provisioning, checked as files.

There is no Docker engine on the build machine, so these tests are what keeps the production
path honest: they read the files and compare them with the code they configure (Settings, the
ClickHouse migrations, the CLI entry point) instead of starting containers.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
GRAFANA = REPO / "infra" / "grafana"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "borderflow.yaml"
DASHBOARD = GRAFANA / "dashboards" / "borderflow.json"
MIGRATIONS = REPO / "infra" / "migrations"

INFRA = ("kafka", "redis", "clickhouse", "grafana")
#: Services the worker cannot run without (Grafana only reads what the worker wrote).
WORKER_NEEDS = ("kafka", "redis", "clickhouse")
#: The tables the dashboard is allowed to read (database ``borderflow``).
DASHBOARD_TABLES = {"events_per_minute", "fraud_scores", "shipment_events", "fraud_labels"}
DATABASE = "borderflow"

_ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))
_SETTINGS_FIELDS = {name.lower() for name in Settings.model_fields}
_BORDERFLOW_VAR = re.compile(rf"\b{re.escape(_ENV_PREFIX)}[A-Z0-9_]+\b")
# Compose interpolation: $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, $NAME.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
# Constructs the 18.16 local stack rejects (PLATFORM.md); the dashboard must run on both.
_NOT_ON_18_16 = (
    "$__timeInterval",  # expands to toStartOfInterval
    "toStartOfInterval",
    "DateTime64",
    "now64",
    "WITH FILL",
    "JSONExtract",
    " OVER (",
    " OVER(",
)


# --- helpers --------------------------------------------------------------------------------


def _interpolate(value: str) -> str:
    """Resolve compose ``${...}`` references the way compose does with no variables set."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match["bare"]:
            return ""
        return match["default"] or ""

    return _INTERPOLATION.sub(replace, value)


def _env_dict(environment: Any) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list) as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in environment)
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _published_host_ips(port: Any) -> Iterator[str | None]:
    """The host address of one ``ports`` entry; None when it binds every interface."""
    if isinstance(port, dict):  # long syntax
        yield port.get("host_ip")
        return
    spec = str(port).split("/", 1)[0]  # drop /tcp or /udp
    if spec.startswith("["):  # [::1]:8080:80
        yield spec[1 : spec.index("]")]
        return
    parts = spec.split(":")
    yield parts[0] if len(parts) == 3 else None


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML/JSON document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _published_port(port: Any) -> int:
    if isinstance(port, dict):
        return int(port["published"])
    return int(str(port).split("/", 1)[0].rsplit(":", 2)[-2])


def _migration_engines() -> dict[str, str]:
    """Table name -> engine, from the CREATE TABLE statements of the ClickHouse migrations."""
    engines: dict[str, str] = {}
    create = re.compile(
        r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:\w+\.)?(\w+)\s*\(.*?\)\s*ENGINE\s*=\s*(\w+)",
        re.IGNORECASE | re.DOTALL,
    )
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for table, engine in create.findall(path.read_text()):
            engines[table] = engine
    return engines


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    return yaml.safe_load(DATASOURCE.read_text())


# --- compose: shape -------------------------------------------------------------------------


def test_services_exist(services: dict[str, Any]) -> None:
    assert set(INFRA) | {"migrate", "worker", "generator"} <= set(services)


def test_every_published_port_binds_loopback(services: dict[str, Any]) -> None:
    published = 0
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would bypass port bindings"
        for port in service.get("ports", []):
            for host_ip in _published_host_ips(port):
                published += 1
                assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
    assert published >= 5  # kafka, redis, clickhouse x2, grafana: the loop really ran


def test_host_ports_match_local_stack_defaults(services: dict[str, Any]) -> None:
    """Host tools use one set of settings for the compose stack and the local stack."""
    defaults = Settings.model_construct()  # field defaults, whatever the caller's environment
    host_ports = {
        _published_port(port) for service in services.values() for port in service.get("ports", [])
    }
    assert {
        defaults.kafka_port,
        defaults.redis_port,
        defaults.clickhouse_port,
        defaults.clickhouse_http_port,
    } <= host_ports
    kafka_env = _env_dict(services["kafka"]["environment"])
    assert f"EXTERNAL://{defaults.kafka_bootstrap}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]


@pytest.mark.parametrize("name", INFRA)
def test_infrastructure_has_healthcheck(services: dict[str, Any], name: str) -> None:
    healthcheck = services[name].get("healthcheck")
    assert healthcheck and healthcheck.get("test"), f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)


def test_worker_waits_for_healthy_infrastructure_and_migrations(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]
    assert isinstance(depends_on, dict), "use the long form: the short form does not wait"
    for name in WORKER_NEEDS:
        assert depends_on[name]["condition"] == "service_healthy", name
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_migrate_and_generator_wait_too(services: dict[str, Any]) -> None:
    for name in WORKER_NEEDS:
        assert services["migrate"]["depends_on"][name]["condition"] == "service_healthy"
    generator = services["generator"]
    assert generator["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert generator["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert generator["profiles"] == ["demo"], "synthetic traffic must not start by default"
    assert services["grafana"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_app_services_run_the_cli(services: dict[str, Any]) -> None:
    commands = {name: services[name]["command"] for name in ("migrate", "worker", "generator")}
    assert commands["migrate"] == ["migrate"]
    assert commands["worker"] == ["worker"]
    assert commands["generator"][0] == "generate"
    assert services["migrate"].get("restart") == "no"
    for name in commands:
        assert services[name]["build"]["context"] == "."


def test_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    env = _env_dict(services["kafka"]["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["CLUSTER_ID"], "the image's configure script requires CLUSTER_ID in KRaft mode"
    # Every listener name has a protocol; containers reach the broker as kafka:9092.
    pairs = env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    protocol_map = dict(pair.split(":") for pair in pairs)
    for listener in env["KAFKA_LISTENERS"].split(","):
        assert listener.split("://")[0] in protocol_map, listener
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


# --- compose: settings ----------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, ENV_EXAMPLE, DOCKERFILE, DATASOURCE])
def test_borderflow_variables_are_settings_fields(path: Path) -> None:
    """Settings forbids unknown fields, so a misspelt variable would stop every container."""
    names = set(_BORDERFLOW_VAR.findall(path.read_text()))
    assert names, f"{path.name} names no {_ENV_PREFIX}* variable: pattern or file changed"
    unknown = sorted(n for n in names if n[len(_ENV_PREFIX) :].lower() not in _SETTINGS_FIELDS)
    assert not unknown, f"{path.name}: not fields of Settings: {unknown}"


@pytest.mark.parametrize("name", ["migrate", "worker", "generator"])
def test_container_environment_builds_settings(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values (after compose's default interpolation) parse into a valid Settings."""
    env = {k: _interpolate(v) for k, v in _env_dict(services[name]["environment"]).items()}
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.redis_url.startswith("redis://redis:")
    assert settings.clickhouse_host == "clickhouse"
    assert settings.clickhouse_port == 9000
    assert settings.clickhouse_http_port == 8123
    assert settings.clickhouse_database == DATABASE
    # Credentials agree with the ones the servers are started with.
    redis_command = " ".join(services["redis"]["command"])
    password = settings.redis_password
    assert password is not None
    assert password.get_secret_value() in _interpolate(redis_command)
    clickhouse_env = _env_dict(services["clickhouse"]["environment"])
    assert _interpolate(clickhouse_env["CLICKHOUSE_USER"]) == settings.clickhouse_user
    assert (
        _interpolate(clickhouse_env["CLICKHOUSE_PASSWORD"])
        == settings.clickhouse_password.get_secret_value()
    )
    assert clickhouse_env["CLICKHOUSE_DB"] == settings.clickhouse_database
    if name == "worker":
        assert settings.store == "memory://"  # rocksdb:// needs an extra the image lacks


def test_env_example_parses_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key.strip(), value.strip())
    settings = Settings()
    # The host-side view of the compose stack: the published loopback ports.
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.clickhouse_database == DATABASE


# --- image ----------------------------------------------------------------------------------


def test_dockerfile_runs_the_project_cli() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert 'ENTRYPOINT ["borderflow"]' in text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "borderflow" in scripts
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE), "run unprivileged"


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".stack", ".git", ".env"} <= entries
    assert "README.md" not in entries, "pyproject's readme is needed to build the package"


# --- grafana --------------------------------------------------------------------------------


def test_grafana_mounts_the_provisioning(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    plugins = _env_dict(grafana["environment"])["GF_INSTALL_PLUGINS"]
    assert "grafana-clickhouse-datasource" in plugins.split(",")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"] if v.startswith("./")}
    for source in mounts:
        assert (REPO / source).is_dir(), f"{source} is mounted but missing"
    provider = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]
    assert mounts["./infra/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./infra/grafana/provisioning/datasources"].endswith("/datasources")


def test_datasource_points_at_clickhouse_service(
    datasource: dict[str, Any], services: dict[str, Any]
) -> None:
    (source,) = datasource["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource"
    data = source["jsonData"]
    assert data["host"] == "clickhouse"
    assert data["port"] == 9000 and data["protocol"] == "native"
    assert data["defaultDatabase"] == DATABASE
    # Grafana expands $NAME in the values from its own environment: compose must set each one.
    grafana_env = _env_dict(services["grafana"]["environment"])
    referenced = {
        name
        for value in _strings(datasource)
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
    }
    assert {"BORDERFLOW_CLICKHOUSE_USER", "BORDERFLOW_CLICKHOUSE_PASSWORD"} <= referenced
    for name in referenced:
        assert name in grafana_env, f"datasource uses ${name}, which grafana does not get"


def test_dashboard_uses_the_provisioned_datasource(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    uid = datasource["datasources"][0]["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = list(_dashboard_queries(dashboard))
    assert len(queries) >= 10
    kinds = {panel["type"] for panel in dashboard["panels"]}
    assert {"timeseries", "stat", "table"} <= kinds
    for title, target in queries:
        assert target["datasource"]["uid"] == uid, title
        assert target["editorType"] == "sql", title


def test_dashboard_query_formats_match_panels(dashboard: dict[str, Any]) -> None:
    """The plugin's format 0 builds time series from long rows; 1 returns the table as is."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expected = 0 if panel["type"] == "timeseries" else 1
            assert target["format"] == expected, panel["title"]
            if expected == 0:
                assert re.search(r"\bAS time\b", target["rawSql"]), panel["title"]
                assert "ORDER BY" in target["rawSql"], f"{panel['title']}: series need order"


def test_dashboard_reads_only_known_tables(dashboard: dict[str, Any]) -> None:
    engines = _migration_engines()
    assert DASHBOARD_TABLES <= set(engines), "a dashboard table is missing from the migrations"
    used: set[str] = set()
    for title, target in _dashboard_queries(dashboard):
        for ref in re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", target["rawSql"], re.I):
            database, _, table = ref.rpartition(".")
            assert database in ("", DATABASE), f"{title}: {ref} is outside {DATABASE}"
            assert table in DASHBOARD_TABLES, f"{title}: unexpected table {ref}"
            used.add(table)
    assert used == DASHBOARD_TABLES, f"no panel reads {sorted(DASHBOARD_TABLES - used)}"


def test_dashboard_reads_replacing_tables_with_final(dashboard: dict[str, Any]) -> None:
    """Without FINAL, redelivered rows not yet merged away would be counted twice."""
    replacing = {t for t, engine in _migration_engines().items() if engine == "ReplacingMergeTree"}
    assert {"fraud_scores", "fraud_labels", "shipment_events"} <= replacing
    for title, target in _dashboard_queries(dashboard):
        for match in re.finditer(
            r"\b(?:FROM|JOIN)\s+(?:\w+\.)?(\w+)(\s+FINAL\b)?", target["rawSql"], re.I
        ):
            if match[1] in replacing:
                assert match[2], f"{title}: {match[1]} read without FINAL"


def test_dashboard_sql_stays_in_the_shared_dialect(dashboard: dict[str, Any]) -> None:
    for title, target in _dashboard_queries(dashboard):
        for construct in _NOT_ON_18_16:
            assert construct.lower() not in target["rawSql"].lower(), f"{title}: {construct}"
        assert "$__timeFilter(" in target["rawSql"], f"{title}: ignores the time picker"
