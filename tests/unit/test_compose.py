"""docker-compose.yml, .env.example, Dockerfile, Prometheus and Grafana provisioning, as files.

There is no Docker engine on the build machine, so these tests are what keeps the production
path honest: they read the files and compare them with the code they configure (Settings, the
ClickHouse migrations, the CLI entry point, the worker's Prometheus registry) instead of
starting containers. tests/integration/test_dashboard.py runs the dashboard's ClickHouse
queries on the local stack.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlparse

import pytest
import yaml

from infra.migrate import load_migrations
from schemas.config import Settings
from streams.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
GRAFANA = REPO / "infra" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
DATASOURCE = DATASOURCES / "clickhouse.yaml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "borderflow.yaml"
DASHBOARD = GRAFANA / "dashboards" / "borderflow.json"
MIGRATIONS = REPO / "infra" / "migrations"
PROMETHEUS_CONFIG = REPO / "infra" / "prometheus" / "prometheus.yml"

INFRA = ("kafka", "redis", "clickhouse", "prometheus", "grafana")
#: Services the worker cannot run without (Grafana and Prometheus only read what it offers).
WORKER_NEEDS = ("kafka", "redis", "clickhouse")
#: The tables and views the dashboard is allowed to read (database ``borderflow``).
DASHBOARD_TABLES = {
    "events_per_minute",
    "activity_per_hour",
    "click_events",
    "fraud_scores",
    "fraud_labels",
    "fraud_label_events",
    "shipment_events",
    "shipments",
    "alerts",
    "rec_predictions",
    "rec_quality",
}
DATABASE = "borderflow"
#: The provisioned datasources' fixed uids (the dashboard JSON names them) and types.
CLICKHOUSE_UID = "borderflow-clickhouse"
PROMETHEUS_UID = "borderflow-prometheus"
DATASOURCE_TYPES = {CLICKHOUSE_UID: "grafana-clickhouse-datasource", PROMETHEUS_UID: "prometheus"}
#: Dashboard areas: a row whose title contains the key, and what its panels must read
#: (exposition names of worker metrics, ClickHouse tables, SQL fragments).
DASHBOARD_AREAS: dict[str, dict[str, set[str]]] = {
    "Throughput": {
        "metrics": {
            "borderflow_events_processed_total",
            "borderflow_clickhouse_rows_written_total",
        },
        "tables": {"events_per_minute", "activity_per_hour"},
        "sql": set(),
    },
    "Pipeline": {
        "metrics": {
            "borderflow_consumer_lag_messages",
            "borderflow_batch_size_events_bucket",
            "borderflow_clickhouse_insert_duration_seconds_bucket",
            "borderflow_clickhouse_insert_failures_total",
            "borderflow_deadletters_total",
        },
        "tables": {"click_events"},
        "sql": {"ingested_at", "ts_ms"},  # pipeline delay: stored minus event time
    },
    "Fraud": {
        "metrics": set(),
        "tables": {"activity_per_hour", "fraud_scores", "fraud_labels", "fraud_label_events"},
        "sql": {"origin_country", "dest_country", "toStartOfDay"},  # corridors, precision by day
    },
    "Logistics": {
        "metrics": set(),
        "tables": {"alerts", "shipments", "shipment_events"},
        "sql": {"kind != 'fraud'", "carrier", "customs_hours"},
    },
    "Recommendations": {
        "metrics": {"borderflow_rec_hits_total", "borderflow_rec_predictions_total"},
        "tables": {"rec_quality", "rec_predictions"},
        "sql": {"hits_10", "hits_20", "rr_20", "personalised"},
    },
}
#: The series a Prometheus metric family exposes, by type (prometheus-client's exposition).
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
#: PromQL words that are neither metrics nor functions.
_PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan",
    "by", "without", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip

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
    "fromUnixTimestamp64",
    "$__timeFilter_ms",  # expand to fromUnixTimestamp64Milli
    "$__fromTime_ms",
    "$__toTime_ms",
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


def _published(port: Any) -> tuple[str | None, int, int]:
    """(host address, host port, container port) of one ``ports`` entry."""
    if isinstance(port, dict):
        return port.get("host_ip"), int(port["published"]), int(port["target"])
    parts = str(port).split("/", 1)[0].rsplit(":", 2)
    return (parts[0] if len(parts) == 3 else None), int(parts[-2]), int(parts[-1])


def _migration_schema() -> dict[str, str]:
    """What the ClickHouse migrations leave behind: name -> engine of every table, ``View`` /
    ``MaterializedView`` for views, replaying their statements in order (``IF NOT EXISTS``
    creates only what is missing, ``DROP`` removes; e.g. 0008 turns ``fraud_labels`` from a
    ReplacingMergeTree into a view)."""
    table = re.compile(
        r"CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?(?:\w+\.)?(\w+)\s*\(.*?\)\s*ENGINE\s*=\s*(\w+)",
        re.IGNORECASE | re.DOTALL,
    )
    view = re.compile(
        r"CREATE\s+(MATERIALIZED\s+)?VIEW\s+(IF\s+NOT\s+EXISTS\s+)?(?:\w+\.)?(\w+)", re.I
    )
    drop = re.compile(r"DROP\s+TABLE\s+(IF\s+EXISTS\s+)?(?:\w+\.)?(\w+)", re.I)
    schema: dict[str, str] = {}
    for migration in load_migrations(MIGRATIONS):
        for statement in migration.statements():
            if match := table.match(statement):
                if not (match[1] and match[2] in schema):
                    schema[match[2]] = match[3]
            elif match := view.match(statement):
                if not (match[2] and match[3] in schema):
                    schema[match[3]] = "MaterializedView" if match[1] else "View"
            elif match := drop.match(statement):
                schema.pop(match[2], None)
    return schema


def _migration_engines() -> dict[str, str]:
    """Table name -> engine of every table the migrations leave (views left out)."""
    return {
        name: engine
        for name, engine in _migration_schema().items()
        if engine not in ("View", "MaterializedView")
    }


def _migration_views() -> set[str]:
    """Names of the (materialized) views the migrations leave."""
    return {
        name
        for name, engine in _migration_schema().items()
        if engine in ("View", "MaterializedView")
    }


def test_migration_schema_replays_the_migrations() -> None:
    schema = _migration_schema()
    assert schema["fraud_label_events"] == "MergeTree"
    assert schema["fraud_labels"] == "View"  # was ReplacingMergeTree until 0008
    assert schema["route_kpis_daily"] == "View"
    assert schema["events_per_minute_labels_mv"] == "MaterializedView"
    assert "events_per_hour_mv" not in schema  # dropped by 0006
    assert schema["fraud_scores"] == "ReplacingMergeTree"


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every ClickHouse query."""
    for title, target in _dashboard_targets(dashboard):
        if target["datasource"]["uid"] == CLICKHOUSE_UID:
            yield title, target


def _prometheus_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for title, target in _dashboard_targets(dashboard):
        if target["datasource"]["uid"] == PROMETHEUS_UID:
            yield title, target


def _dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def _rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row title -> the panels under it (the dashboard's flat layout, rows not collapsed)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert not panel.get("collapsed"), f"{panel['title']}: keep rows expanded"
            current = rows.setdefault(panel["title"], [])
        else:
            assert current is not None, f"{panel['title']} is above the first row"
            current.append(panel)
    return rows


def _sql_tables(sql: str) -> set[str]:
    return {
        ref.rpartition(".")[2]
        for ref in re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", sql, re.IGNORECASE)
    }


def _promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, label matchers, range/subquery brackets, grouping clauses and Grafana variables
    are removed first; what remains that is not followed by ``(`` (functions, aggregations)
    and is not a keyword is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.I
    )
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue
        if match[0].lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match[0])
    return names


def _exported_series() -> set[str]:
    """Every series name the worker's registry exposes, read from the registry itself.

    The scrape-time gauges are only yielded while a runtime is attached, so a stand-in
    runtime with nothing running is attached first (families are yielded without samples).
    """
    settings = Settings.model_construct()
    metrics = WorkerMetrics(settings)
    metrics.runtime = cast(
        Any,
        SimpleNamespace(
            settings=settings,
            topology=SimpleNamespace(app=SimpleNamespace(_consumer=None)),
            _clickhouse=None,
            fraud_engines={},
            serving=SimpleNamespace(logistics=SimpleNamespace(stats=dict)),
        ),
    )
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
    return names


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


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    """uid -> datasource, over every provisioning file."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DATASOURCES.glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert source["uid"] not in found, f"uid {source['uid']} provisioned twice"
            found[source["uid"]] = source
    return found


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


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
    assert published >= 6  # kafka, redis, clickhouse x2, prometheus, grafana: the loop ran


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
    assert "prometheus" in services["grafana"]["depends_on"]


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
    # Credentials agree with the ones the servers are started with: the Redis pipeline user
    # and the ClickHouse writer (docs/security.md).
    redis_env = {k: _interpolate(v) for k, v in _env_dict(services["redis"]["environment"]).items()}
    password = settings.redis_password
    assert password is not None and settings.redis_username
    assert redis_env["BORDERFLOW_REDIS_USERNAME"] == settings.redis_username
    assert redis_env["BORDERFLOW_REDIS_PASSWORD"] == password.get_secret_value()
    # Least privilege: pipeline containers never get the storefront's or analyst's password.
    assert settings.storefront_redis_password is None
    assert settings.clickhouse_analyst_password is None
    clickhouse_env = _env_dict(services["clickhouse"]["environment"])
    assert _interpolate(clickhouse_env["CLICKHOUSE_USER"]) == settings.clickhouse_user
    assert (
        _interpolate(clickhouse_env["CLICKHOUSE_PASSWORD"])
        == settings.clickhouse_password.get_secret_value()
    )
    assert clickhouse_env["CLICKHOUSE_DB"] == settings.clickhouse_database
    if name == "worker":
        assert settings.store == "memory://"  # rocksdb:// needs an extra the image lacks
        # Reachable from the compose network (Prometheus), not only from its own loopback.
        assert settings.worker_web_host == "0.0.0.0"  # noqa: S104 - inside the container


def test_env_example_parses_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key.strip(), value.strip())
    settings = Settings()
    # The host-side view of the compose stack: the published loopback ports.
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.clickhouse_database == DATABASE


# --- access (docs/security.md) -------------------------------------------------------------


REDIS_START = REPO / "infra" / "redis" / "start.sh"
ANALYST_XML = REPO / "infra" / "clickhouse" / "users.d" / "analyst.xml"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: repository path -> container path."""
    return {
        volume.split(":")[0]: volume.split(":")[1]
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    }


def test_redis_starts_with_the_local_stacks_acl_users(services: dict[str, Any]) -> None:
    from infra.stack import REDIS_PIPELINE_ACL, REDIS_STOREFRONT_ACL

    redis = services["redis"]
    entrypoint = redis["entrypoint"]
    assert _mounts(redis)["./infra/redis/start.sh"] == entrypoint[-1]
    script = REDIS_START.read_text()
    acl = [line for line in script.splitlines() if line.startswith("user ")]
    assert acl[0] == "user default off resetpass resetkeys resetchannels -@all"
    pipeline = 'user ${BORDERFLOW_REDIS_USERNAME} on #$(sha256 "$BORDERFLOW_REDIS_PASSWORD")'
    assert acl[1] == f"{pipeline} ~* resetchannels {REDIS_PIPELINE_ACL}"
    storefront = (
        "user ${BORDERFLOW_STOREFRONT_REDIS_USERNAME} on "
        '#$(sha256 "$BORDERFLOW_STOREFRONT_REDIS_PASSWORD")'
    )
    assert acl[2] == f"{storefront} %R~${{PREFIX}}* resetchannels {REDIS_STOREFRONT_ACL}"
    assert len(acl) == 3
    assert "--aclfile" in script and "--appendonly yes" in script
    assert "exec docker-entrypoint.sh redis-server" in script
    # No password on any command line (`ps`, `docker inspect` would show it).
    command_lines = " ".join(
        [*redis.get("command", []), *entrypoint, *redis["healthcheck"]["test"]]
    )
    assert "PASSWORD" not in command_lines and "requirepass" not in command_lines
    env = _env_dict(redis["environment"])
    for name in ("REDIS_USERNAME", "REDIS_PASSWORD", "STOREFRONT_REDIS_USERNAME"):
        assert f"{_ENV_PREFIX}{name}" in env
    # The healthcheck logs in as the read-only user.
    assert "--user" in redis["healthcheck"]["test"][-1]
    assert env["REDISCLI_AUTH"] == env["BORDERFLOW_STOREFRONT_REDIS_PASSWORD"]


def test_clickhouse_analyst_is_read_only_and_used_by_grafana(services: dict[str, Any]) -> None:
    clickhouse = services["clickhouse"]
    target = _mounts(clickhouse)["./infra/clickhouse/users.d/analyst.xml"]
    assert target.startswith("/etc/clickhouse-server/users.d/") and target.endswith(".xml")
    root = ET.fromstring(ANALYST_XML.read_text())
    assert root.tag == "clickhouse"
    users = root.find("users")
    assert users is not None
    [analyst] = list(users)
    profile = root.find(f"profiles/{analyst.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1"
    # Grafana's plugin sets max_execution_time on every query (its query timeout).
    assert profile.find("constraints/max_execution_time/changeable_in_readonly") is not None
    assert [db.text for db in analyst.iter("database")] == [DATABASE]
    password = analyst.find("password")
    assert password is not None and not (password.text or "").strip()
    clickhouse_env = _env_dict(clickhouse["environment"])
    assert password.get("from_env") in clickhouse_env
    # Grafana logs in as that analyst, never as the writer.
    grafana_env = {
        k: _interpolate(v) for k, v in _env_dict(services["grafana"]["environment"]).items()
    }
    assert grafana_env["BORDERFLOW_CLICKHOUSE_USER"] == analyst.tag
    assert grafana_env["BORDERFLOW_CLICKHOUSE_USER"] != _interpolate(
        clickhouse_env["CLICKHOUSE_USER"]
    )
    assert grafana_env["BORDERFLOW_CLICKHOUSE_PASSWORD"] == _interpolate(
        clickhouse_env[password.get("from_env", "")]
    )
    # .env.example names the same analyst for host-side tools.
    env_example = _env_example()
    assert env_example["BORDERFLOW_CLICKHOUSE_ANALYST_USER"] == analyst.tag


def _env_example() -> dict[str, str]:
    return {
        line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }


def test_env_example_lists_every_secret_with_a_placeholder() -> None:
    """Every secret the containers get is in .env.example, with an obvious placeholder."""
    compose_text = COMPOSE.read_text()
    env_example = _env_example()
    secrets = {
        f"{_ENV_PREFIX}{name.upper()}"
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    used = {name for name in secrets if name in compose_text}
    assert {
        "BORDERFLOW_REDIS_PASSWORD",
        "BORDERFLOW_STOREFRONT_REDIS_PASSWORD",
        "BORDERFLOW_CLICKHOUSE_PASSWORD",
        "BORDERFLOW_CLICKHOUSE_ANALYST_PASSWORD",
        "BORDERFLOW_PSEUDONYM_KEY",
    } <= used
    for name in [*sorted(used), "GRAFANA_ADMIN_PASSWORD"]:
        assert env_example.get(name, "").startswith("change-me"), name


# --- prometheus ---------------------------------------------------------------------------


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_prometheus_service(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    image, _, tag = prometheus["image"].partition(":")
    assert image == "prom/prometheus"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin a release, not {tag!r}"
    flags = {key: _interpolate(value) for key, value in _flags(prometheus["command"]).items()}
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    # The config in git is what the container reads, and the TSDB lives on a named volume.
    assert mounts["./infra/prometheus/prometheus.yml"] == flags["--config.file"]
    assert PROMETHEUS_CONFIG.is_file()
    assert flags["--storage.tsdb.path"] in mounts.values()
    assert not flags["--storage.tsdb.path"].startswith("./")
    retention = flags.get("--storage.tsdb.retention.time") or flags.get(
        "--storage.tsdb.retention.size"
    )
    assert retention and re.fullmatch(r"\d+[smhdwyKMGTPE]B?", retention), "set a retention"
    ((host_ip, host_port, container_port),) = map(_published, prometheus["ports"])
    assert (host_ip, host_port, container_port) == ("127.0.0.1", 19090, 9090)


def test_prometheus_scrapes_the_worker(
    services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """The scrape target is the compose worker service on its BORDERFLOW_WORKER_WEB_PORT."""
    worker_env = {
        k: _interpolate(v) for k, v in _env_dict(services["worker"]["environment"]).items()
    }
    port = int(worker_env["BORDERFLOW_WORKER_WEB_PORT"])
    targets: set[tuple[str, int]] = set()
    for job in prometheus_config["scrape_configs"]:
        if job.get("metrics_path", "/metrics") != "/metrics":
            continue
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, target_port = target.rpartition(":")
                targets.add((host, int(target_port)))
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "compose DNS answers A records, not SRV"
            targets.update((name, int(sd["port"])) for name in sd["names"])
    assert ("worker", port) in targets, f"no job scrapes worker:{port}/metrics: {targets}"
    assert "worker" in services
    # The port is the container's own (the worker publishes nothing to the host).
    assert str(port) in [str(p) for p in services["worker"].get("expose", [])]
    assert not services["worker"].get("ports")


def test_worker_healthcheck_reads_health(services: dict[str, Any]) -> None:
    healthcheck = services["worker"]["healthcheck"]
    test = healthcheck["test"]
    command = " ".join(test[1:]) if isinstance(test, list) else test
    # The image is python:3.11-slim: python is there, curl and wget are not.
    assert test[0] in ("CMD", "CMD-SHELL") and test[1] == "python"
    assert "/health" in command and "BORDERFLOW_WORKER_WEB_PORT" in command
    assert "curl" not in command and "wget" not in command
    assert healthcheck.get("start_period"), "group join and table recovery take a while"


def test_env_example_sets_every_compose_variable() -> None:
    """Each ${NAME} compose fills from .env has a line in .env.example to copy."""
    referenced = {
        match["braced"] or match["bare"]
        for match in _INTERPOLATION.finditer(COMPOSE.read_text())
        if match[0] != "$$"
    }
    defined = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert "PROMETHEUS_RETENTION" in referenced
    assert referenced <= defined, f"missing from .env.example: {sorted(referenced - defined)}"


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


def test_both_datasources_are_provisioned_with_fixed_uids(
    datasources: dict[str, dict[str, Any]],
    services: dict[str, Any],
    prometheus_config: dict[str, Any],
) -> None:
    assert {uid: source["type"] for uid, source in datasources.items()} == DATASOURCE_TYPES
    defaults = [uid for uid, source in datasources.items() if source.get("isDefault")]
    assert defaults == [CLICKHOUSE_UID]
    prometheus = datasources[PROMETHEUS_UID]
    url = urlparse(prometheus["url"])
    # The compose service on the compose network, on its container port.
    ((_, _, container_port),) = map(_published, services["prometheus"]["ports"])
    assert (url.hostname, url.port) == ("prometheus", container_port)
    assert prometheus.get("access", "proxy") == "proxy", "the browser cannot reach prometheus:9090"
    # $__rate_interval assumes the scrape interval Grafana is told about.
    scrape_interval = prometheus_config["global"]["scrape_interval"]
    assert prometheus["jsonData"]["timeInterval"] == scrape_interval
    for job in prometheus_config["scrape_configs"]:
        assert job.get("scrape_interval", scrape_interval) == scrape_interval, job["job_name"]


def test_dashboard_uses_the_provisioned_datasources(
    dashboard: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles)), "panel titles must be unique (tests name them)"
    assert len(list(_dashboard_queries(dashboard))) >= 10
    assert len(list(_prometheus_queries(dashboard))) >= 10
    kinds = {panel["type"] for panel in dashboard["panels"]}
    assert {"timeseries", "stat", "table"} <= kinds
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            title, source = panel["title"], target["datasource"]
            assert source["uid"] in datasources, f"{title}: unknown datasource {source}"
            assert source["type"] == datasources[source["uid"]]["type"], title
            assert panel["datasource"] == source, f"{title}: one datasource per panel"
            if source["uid"] == CLICKHOUSE_UID:
                assert target["editorType"] == "sql", title
                assert target["rawSql"].strip(), title
            else:
                assert target["expr"].strip(), title
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds must be unique"


def test_dashboard_layout_has_no_overlaps(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                other = taken.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_covers_every_area(dashboard: dict[str, Any]) -> None:
    """One row per area; each row's panels read the metrics and tables that area is about."""
    rows = _rows(dashboard)
    for area, needs in DASHBOARD_AREAS.items():
        titles = [title for title in rows if area.lower() in title.lower()]
        assert len(titles) == 1, f"want one row titled like {area!r}, rows: {list(rows)}"
        panels = rows[titles[0]]
        assert panels, f"row {titles[0]} is empty"
        targets = [target for panel in panels for target in panel.get("targets", [])]
        sql = "\n".join(target.get("rawSql", "") for target in targets)
        metrics = {name for target in targets for name in _promql_metrics(target.get("expr", ""))}
        assert needs["metrics"] <= metrics, f"{area}: no panel reads {needs['metrics'] - metrics}"
        tables = _sql_tables(sql)
        assert needs["tables"] <= tables, f"{area}: no panel reads {needs['tables'] - tables}"
        missing = {fragment for fragment in needs["sql"] if fragment not in sql}
        assert not missing, f"{area}: no query mentions {missing}"
    throughput = [
        target["expr"]
        for panel in rows["Throughput"]
        for target in panel["targets"]
        if "expr" in target
    ]
    assert any("rate(borderflow_events_processed_total[" in expr for expr in throughput)


def test_prometheus_queries_name_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """Every metric a panel selects is in the worker's registry (streams/metrics.py)."""
    exported = _exported_series()
    # The stand-in runtime really produced the scrape-time gauges and the histograms.
    assert {"borderflow_consumer_lag_messages", "borderflow_batch_size_events_bucket"} <= exported
    used: set[str] = set()
    for title, target in _prometheus_queries(dashboard):
        names = _promql_metrics(target["expr"])
        assert names, f"{title}: {target['expr']!r} selects no metric"
        unknown = names - exported
        assert not unknown, f"{title}: not exported by streams/metrics.py: {sorted(unknown)}"
        used |= names
        # Windows follow the scrape interval and the time picker, never a hard-coded [1m].
        for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
            assert window in ("$__rate_interval", "$__range"), f"{title}: [{window}]"
    assert len(used) >= 15, "the dashboard should show most of what the worker exports"


def test_promql_metric_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, table) (rate(a_bucket{table="x"}[$__rate_interval])))'
        " / on (job) group_left sum without (instance) (b_total offset 5m) > bool 1e3"
    )
    assert _promql_metrics(expr) == {"a_bucket", "b_total"}
    assert _promql_metrics("count(count by (instance) (c))") == {"c"}


def test_dashboard_query_formats_match_panels(dashboard: dict[str, Any]) -> None:
    """The plugin's format 0 builds time series from long rows; 1 returns the table as is."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target["datasource"]["uid"] != CLICKHOUSE_UID:
                continue
            expected = 0 if panel["type"] == "timeseries" else 1
            assert target["format"] == expected, panel["title"]
            if expected == 0:
                assert re.search(r"\bAS time\b", target["rawSql"]), panel["title"]
                assert "ORDER BY" in target["rawSql"], f"{panel['title']}: series need order"


def test_dashboard_reads_only_known_tables(dashboard: dict[str, Any]) -> None:
    known = set(_migration_engines()) | _migration_views()
    assert DASHBOARD_TABLES <= known, "a dashboard table is missing from the migrations"
    used: set[str] = set()
    for title, target in _dashboard_queries(dashboard):
        for ref in re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", target["rawSql"], re.I):
            database, _, table = ref.rpartition(".")
            assert database in ("", DATABASE), f"{title}: {ref} is outside {DATABASE}"
            assert table in DASHBOARD_TABLES, f"{title}: unexpected table {ref}"
            used.add(table)
    assert used == DASHBOARD_TABLES, f"no panel reads {sorted(DASHBOARD_TABLES - used)}"


def test_dashboard_reads_replacing_tables_with_final(dashboard: dict[str, Any]) -> None:
    """FINAL on every ReplacingMergeTree read (rows written before migration 0006 may hold
    redeliveries not yet merged away, and a repeated logistics alert replaces its row), and
    nowhere else: views and the label history (a MergeTree keeping every row) have nothing
    for it to collapse."""
    schema = _migration_schema()
    replacing = {t for t, engine in schema.items() if engine == "ReplacingMergeTree"}
    assert {"fraud_scores", "shipment_events", "logistics_alerts"} <= replacing
    assert schema["fraud_labels"] == "View" and schema["fraud_label_events"] == "MergeTree"
    for title, target in _dashboard_queries(dashboard):
        for match in re.finditer(
            r"\b(?:FROM|JOIN)\s+(?:\w+\.)?(\w+)(\s+FINAL\b)?", target["rawSql"], re.I
        ):
            if match[1] in replacing:
                assert match[2], f"{title}: {match[1]} read without FINAL"
            elif match[1] in schema:
                assert not match[2], f"{title}: {match[1]} ({schema[match[1]]}) read with FINAL"


def test_dashboard_sql_stays_in_the_shared_dialect(dashboard: dict[str, Any]) -> None:
    for title, target in _dashboard_queries(dashboard):
        for construct in _NOT_ON_18_16:
            assert construct.lower() not in target["rawSql"].lower(), f"{title}: {construct}"
        assert "$__timeFilter(" in target["rawSql"], f"{title}: ignores the time picker"
