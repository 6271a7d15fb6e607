"""Credentials in Settings: one object configures Faust, confluent-kafka and Redis clients the
same way, inconsistent settings fail early, and no secret is ever shown (docs/security.md)."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any, cast

import faust
import pytest
from click.testing import CliRunner
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import AuthProtocol, SASLMechanism
from pydantic import SecretStr, ValidationError

from infra.cli import cli
from schemas.config import Settings
from sinks.storefront_client import StorefrontClient
from streams.topology import build_app

#: A distinctive value for every secret field; none may appear in any output.
SECRETS = {
    "kafka_sasl_password": "kafka-sasl-Pa55-never-shown",
    "redis_password": "redis-pipe-Pa55-never-shown",
    "storefront_redis_password": "redis-shop-Pa55-never-shown",
    "clickhouse_password": "ch-writer-Pa55-never-shown",
    "clickhouse_analyst_password": "ch-analyst-Pa55-never-shown",
    "pseudonym_key": "pseudonym-key-never-shown",
}
KEY_PASSWORD = "tls-key-Pa55-never-shown"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA certificate and a client certificate with an encrypted key."""
    # openssl is a Debian package `make setup` installs (never skipped: a skip tests nothing).
    folder = tmp_path_factory.mktemp("tls")
    files = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "1"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-nodes", "-subj", "/CN=borderflow-test-ca"]
        + ["-keyout", str(files["ca-key"]), "-out", str(files["ca"])],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-subj", "/CN=borderflow-worker"]
        + ["-passout", f"pass:{KEY_PASSWORD}"]
        + ["-keyout", str(files["key"]), "-out", str(files["cert"])],
        check=True,
        capture_output=True,
    )
    return files


def _secret_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "bf-pipeline",
        "redis_username": "bf_pipeline",
        "storefront_redis_username": "bf_storefront",
        "clickhouse_user": "bf_writer",
        "clickhouse_analyst_user": "bf_analyst",
        **{name: SecretStr(value) for name, value in SECRETS.items()},
    }
    values.update(overrides)
    return Settings(**values)


# --- Kafka: one Settings object, two clients ---------------------------------------------------


def test_plaintext_by_default() -> None:
    settings = Settings()
    assert settings.confluent_config() == {"bootstrap.servers": settings.kafka_bootstrap}
    assert settings.faust_broker_credentials() is None
    assert settings.kafka_ssl_context() is None
    assert build_app(settings).conf.broker_credentials is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_reaches_faust_and_confluent_kafka(mechanism: str) -> None:
    settings = _secret_settings(kafka_sasl_mechanism=mechanism)
    confluent = settings.confluent_config()
    assert confluent == {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": "bf-pipeline",
        "sasl.password": SECRETS["kafka_sasl_password"],
    }
    credentials = settings.faust_broker_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    aiokafka = credentials_to_aiokafka_auth(credentials)
    assert aiokafka == {
        "security_protocol": confluent["security.protocol"],
        "sasl_mechanism": confluent["sasl.mechanism"],
        "sasl_plain_username": confluent["sasl.username"],
        "sasl_plain_password": confluent["sasl.password"],
        "ssl_context": None,
    }
    # The worker's app carries them, and Faust's repr of them names the user only.
    app = build_app(settings)
    assert credentials_to_aiokafka_auth(app.conf.broker_credentials) == aiokafka
    assert SECRETS["kafka_sasl_password"] not in repr(app.conf.broker_credentials)


def test_sasl_ssl_with_mutual_tls_reaches_both_clients(tls_files: dict[str, Path]) -> None:
    settings = _secret_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_ssl_cafile=tls_files["ca"],
        kafka_ssl_certfile=tls_files["cert"],
        kafka_ssl_keyfile=tls_files["key"],
        kafka_ssl_key_password=SecretStr(KEY_PASSWORD),
        kafka_ssl_check_hostname=False,
    )
    confluent = settings.confluent_config()
    assert confluent["security.protocol"] == "SASL_SSL"
    assert confluent["sasl.mechanism"] == "SCRAM-SHA-512"
    assert confluent["ssl.ca.location"] == str(tls_files["ca"])
    assert confluent["ssl.certificate.location"] == str(tls_files["cert"])
    assert confluent["ssl.key.location"] == str(tls_files["key"])
    assert confluent["ssl.key.password"] == KEY_PASSWORD
    assert confluent["ssl.endpoint.identification.algorithm"] == "none"

    app = build_app(settings)
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_SSL
    assert credentials.mechanism is SASLMechanism.SCRAM_SHA_512
    aiokafka = credentials_to_aiokafka_auth(credentials)
    assert aiokafka["security_protocol"] == "SASL_SSL"
    assert (aiokafka["sasl_plain_username"], aiokafka["sasl_plain_password"]) == (
        confluent["sasl.username"],
        confluent["sasl.password"],
    )
    context = aiokafka["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    # The chain is verified against the given CA; only the host name check is off.
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False
    subjects = [
        {key: value for ((key, value),) in cast(Any, ca["subject"])}
        for ca in context.get_ca_certs()
    ]
    assert {"commonName": "borderflow-test-ca"} in subjects


def test_ssl_without_sasl(tls_files: dict[str, Path]) -> None:
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tls_files["ca"])
    confluent = settings.confluent_config()
    assert confluent["security.protocol"] == "SSL"
    assert "sasl.mechanism" not in confluent and "ssl.certificate.location" not in confluent
    assert confluent["ssl.endpoint.identification.algorithm"] == "https"
    credentials = settings.faust_broker_credentials()
    assert isinstance(credentials, faust.SSLCredentials)
    aiokafka = credentials_to_aiokafka_auth(credentials)
    assert aiokafka["security_protocol"] == "SSL"
    assert aiokafka["ssl_context"].check_hostname is True


def test_a_wrong_key_password_fails_loudly(tls_files: dict[str, Path]) -> None:
    settings = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=tls_files["cert"],
        kafka_ssl_keyfile=tls_files["key"],
        kafka_ssl_key_password=SecretStr("not-the-password"),
    )
    with pytest.raises(ssl.SSLError):
        settings.kafka_ssl_context()


# --- Redis and ClickHouse users -------------------------------------------------------------


def test_redis_clients_use_their_users() -> None:
    settings = _secret_settings()
    assert settings.redis_credentials() == {
        "username": "bf_pipeline",
        "password": SECRETS["redis_password"],
    }
    assert settings.storefront_redis_credentials() == {
        "username": "bf_storefront",
        "password": SECRETS["storefront_redis_password"],
    }
    shop = StorefrontClient.from_settings(settings)
    kwargs = shop.client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == (
        "bf_storefront",
        SECRETS["storefront_redis_password"],
    )
    shop.close()
    # Without a storefront user, the storefront client uses the pipeline's credentials.
    pipeline_only = settings.model_copy(
        update={"storefront_redis_username": None, "storefront_redis_password": None}
    )
    assert pipeline_only.storefront_redis_credentials() == settings.redis_credentials()
    assert Settings().redis_credentials() == {"username": None, "password": None}


def test_redis_store_uses_the_pipeline_user() -> None:
    from sinks.redis_store import RedisStore

    store = RedisStore(_secret_settings())
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("bf_pipeline", SECRETS["redis_password"])


def test_analyst_settings() -> None:
    analyst = _secret_settings().as_clickhouse_analyst()
    assert analyst.clickhouse_user == "bf_analyst"
    assert analyst.clickhouse_password.get_secret_value() == SECRETS["clickhouse_analyst_password"]
    assert analyst.clickhouse_analyst_user is None
    with pytest.raises(ValueError, match="ANALYST_USER"):
        Settings().as_clickhouse_analyst()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs KAFKA_SASL_MECHANISM"),
        ({"kafka_sasl_mechanism": "PLAIN"}, "need KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"),
        ({"kafka_ssl_cafile": "/etc/ca.pem"}, "need KAFKA_SECURITY_PROTOCOL=SSL"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"},
            "KEYFILE needs KAFKA_SSL_CERTFILE",
        ),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({"redis_username": "bf"}, "REDIS_USERNAME needs REDIS_PASSWORD"),
        ({"storefront_redis_username": "shop"}, "both STOREFRONT_REDIS_USERNAME"),
        (
            {"storefront_redis_username": "default", "storefront_redis_password": "x"},
            "must differ",
        ),
        ({"clickhouse_analyst_user": "default"}, "must differ from CLICKHOUSE_USER"),
        ({"clickhouse_user": "bad user"}, "letters, digits"),
        ({"redis_username": "x y", "redis_password": "p"}, "letters, digits"),
    ],
)
def test_inconsistent_credentials_fail_early(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_credentials_in_the_redis_url_are_refused_without_echoing_them() -> None:
    url = f"redis://bf:{SECRETS['redis_password']}@127.0.0.1:16379/0"
    with pytest.raises(ValidationError) as error:
        Settings(redis_url=url)
    assert "BORDERFLOW_REDIS_PASSWORD" in str(error.value)
    assert SECRETS["redis_password"] not in str(error.value)


# --- secrets are never shown ----------------------------------------------------------------


def test_every_secret_field_is_a_secret_str() -> None:
    secret_like = [
        name
        for name in Settings.model_fields
        if name.endswith(("_password", "_key")) or "secret" in name or "token" in name
    ]
    assert set(SECRETS) | {"kafka_ssl_key_password"} <= set(secret_like)
    for name in secret_like:
        annotation = Settings.model_fields[name].annotation
        assert annotation in (SecretStr, SecretStr | None), f"{name} is {annotation}"


def test_secrets_never_appear_in_repr_dumps_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    settings = _secret_settings(kafka_ssl_key_password=None)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("borderflow.test").info("settings %s / %r", settings, settings)
    shown = [
        repr(settings),
        str(settings),
        repr(settings.model_dump()),
        json.dumps(settings.model_dump(mode="json")),
        settings.model_dump_json(),
        caplog.text,
        repr(settings.faust_broker_credentials()),
    ]
    for secret in SECRETS.values():
        for text in shown:
            assert secret not in text
    # ... while child processes still get them (Settings.to_env), and read them back.
    env = settings.to_env()
    assert {env[f"BORDERFLOW_{name.upper()}"] for name in SECRETS} == set(SECRETS.values())


def test_validation_errors_never_echo_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints validation errors as they are: no input may be in them."""
    monkeypatch.setenv("BORDERFLOW_REDIS_PASSWORD", SECRETS["redis_password"])
    monkeypatch.setenv("BORDERFLOW_CLICKHOUSE_PASSWORD", SECRETS["clickhouse_password"])
    monkeypatch.setenv("BORDERFLOW_STOREFRONT_REDIS_PASSWORD", SECRETS["storefront_redis_password"])
    # A field that does not parse, then settings that do not fit together.
    for variable, value, expected in (
        ("BORDERFLOW_CLICKHOUSE_PORT", "not-a-port", "clickhouse_port"),
        ("BORDERFLOW_CLICKHOUSE_PORT", "19000", "STOREFRONT_REDIS_USERNAME"),
    ):
        monkeypatch.setenv(variable, value)
        result = CliRunner().invoke(cli, ["migrate"])
        assert isinstance(result.exception, ValidationError)
        text = str(result.exception) + result.output
        assert expected in text
        for secret in SECRETS.values():
            assert secret not in text


def test_stack_status_shows_users_never_passwords(tmp_path: Path) -> None:
    settings = _secret_settings(stack_dir=tmp_path, kafka_ssl_key_password=None)
    runner = CliRunner()
    table = runner.invoke(cli, ["stack", "status"], obj=settings)
    as_json = runner.invoke(cli, ["stack", "status", "--json"], obj=settings)
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    users = json.loads(as_json.output)["users"]
    assert users == {
        "redis": {
            "bf_pipeline": "pipeline (password)",
            "bf_storefront": "storefront, read-only (password)",
        },
        "clickhouse": {
            "bf_writer": "writer (password)",
            "bf_analyst": "analyst, read-only on borderflow (password)",
        },
    }
    assert "bf_storefront: storefront, read-only" in table.output
    for secret in SECRETS.values():
        assert secret not in table.output and secret not in as_json.output
