"""The local stack's generated Redis ACL and ClickHouse users (docs/security.md), as files.

tests/integration/test_access.py starts a stack with them and checks what each user can do.
"""

from __future__ import annotations

import hashlib
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from infra.stack import (
    REDIS_PIPELINE_ACL,
    REDIS_STOREFRONT_ACL,
    LocalStack,
    _clickhouse_users_xml,
    _redis_conf,
    _write_private,
)
from schemas.config import Settings
from schemas.errors import BorderflowError

PASSWORDS = {
    "redis_password": "pipe-Pa55-in-no-file",
    "storefront_redis_password": "shop-Pa55-in-no-file",
    "clickhouse_password": "writer-Pa55-in-no-file",
    "clickhouse_analyst_password": "analyst-Pa55-in-no-file",
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "stack_dir": tmp_path,
        "redis_username": "bf_pipeline",
        "storefront_redis_username": "bf_storefront",
        "clickhouse_user": "bf_writer",
        "clickhouse_analyst_user": "bf_analyst",
        **{name: SecretStr(value) for name, value in PASSWORDS.items()},
    }
    values.update(overrides)
    return Settings(**values)


def _redis_conf_for(settings: Settings) -> str:
    return _redis_conf(settings, LocalStack(settings).specs["redis"])


def _users(xml: str) -> dict[str, ET.Element]:
    users = ET.fromstring(xml).find("users")
    assert users is not None
    return {user.tag: user for user in users}


def test_default_stack_has_no_credentials(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path)
    conf = _redis_conf_for(settings)
    assert "user " not in conf and "requirepass" not in conf
    users = _users(_clickhouse_users_xml(settings))
    assert list(users) == ["default"]
    assert users["default"].findtext("password") == ""
    assert [ip.text for ip in users["default"].iter("ip")] == ["127.0.0.1", "::1"]


def test_redis_acl_users(tmp_path: Path) -> None:
    conf = _redis_conf_for(_settings(tmp_path, redis_prefix="shop1:"))
    acl = [line for line in conf.splitlines() if line.startswith("user ")]
    assert acl == [
        "user default off resetpass resetkeys resetchannels -@all",
        f"user bf_pipeline on #{_sha256(PASSWORDS['redis_password'])} ~* resetchannels "
        + REDIS_PIPELINE_ACL,
        f"user bf_storefront on #{_sha256(PASSWORDS['storefront_redis_password'])} "
        f"%R~shop1:* resetchannels {REDIS_STOREFRONT_ACL}",
    ]
    # What the code runs is granted; administration and bulk deletes are not.
    pipeline = REDIS_PIPELINE_ACL.split()
    assert pipeline[0] == "-@all" and pipeline[-1] == "-@dangerous"
    assert {"+evalsha", "+script|load", "+@write", "+@read"} <= set(pipeline)
    storefront = REDIS_STOREFRONT_ACL.split()
    assert "+@write" not in storefront and "+evalsha" not in storefront
    assert storefront[0] == "-@all" and "-@dangerous" in storefront
    for password in PASSWORDS.values():
        assert password not in conf


def test_redis_password_without_a_user_protects_the_default_user(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, redis_password=SecretStr("only-a-password"))
    acl = [line for line in _redis_conf_for(settings).splitlines() if line.startswith("user ")]
    assert acl == [f"user default on resetpass #{_sha256('only-a-password')} ~* &* +@all"]


def test_unsafe_prefix_is_refused_for_the_storefront_acl(tmp_path: Path) -> None:
    with pytest.raises(BorderflowError, match="redis_prefix"):
        _redis_conf_for(_settings(tmp_path, redis_prefix="bf *"))


def test_clickhouse_writer_and_read_only_analyst(tmp_path: Path) -> None:
    xml = _clickhouse_users_xml(_settings(tmp_path, clickhouse_database="facts"))
    root = ET.fromstring(xml)
    users = _users(xml)
    assert set(users) == {"bf_writer", "bf_analyst"}  # no password-less `default` user
    writer, analyst = users["bf_writer"], users["bf_analyst"]
    assert writer.findtext("password_sha256_hex") == _sha256(PASSWORDS["clickhouse_password"])
    assert analyst.findtext("password_sha256_hex") == _sha256(
        PASSWORDS["clickhouse_analyst_password"]
    )
    assert writer.find("allow_databases") is None  # migrations create databases
    assert [db.text for db in analyst.iter("database")] == ["facts"]
    profile = analyst.findtext("profile")
    assert root.findtext(f"profiles/{profile}/readonly") == "1"
    assert root.findtext(f"profiles/{writer.findtext('profile')}/readonly") is None
    for user in users.values():
        assert [ip.text for ip in user.iter("ip")] == ["127.0.0.1", "::1"]
    for password in PASSWORDS.values():
        assert password not in xml


def test_generated_files_are_private(tmp_path: Path) -> None:
    new, existing = tmp_path / "users.xml", tmp_path / "redis.conf"
    existing.write_text("old")
    existing.chmod(0o644)
    for path in (new, existing):
        _write_private(path, "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "x"
