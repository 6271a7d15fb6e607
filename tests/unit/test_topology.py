"""Worker app settings that come from borderflow's own settings."""

from __future__ import annotations

from pathlib import Path

from schemas.config import Settings
from streams.app import CHANGELOG_BUFFER_PER_BATCH_EVENT, _widen_producer_buffer
from streams.topology import build_app


def test_web_server_listens_where_the_settings_say() -> None:
    # Faust listens on web_bind (default 0.0.0.0); web_host only names the worker.
    assert build_app(Settings()).conf.web_bind == "127.0.0.1"
    container = build_app(Settings(worker_web_host="0.0.0.0", worker_web_port=16070)).conf
    assert (container.web_bind, container.web_port) == ("0.0.0.0", 16070)


def test_faust_keeps_its_data_under_the_stack_folder_not_the_working_directory(
    tmp_path: Path,
) -> None:
    settings = Settings(app_id="bf-data-test", stack_dir=tmp_path / "stack")
    app = build_app(settings)
    assert Path(app.conf.datadir) == tmp_path / "stack" / "faust" / "bf-data-test"
    assert (tmp_path / "stack" / "faust").is_dir()  # Faust itself creates only the last level
    elsewhere = Settings(app_id="bf-data-test", data_dir=tmp_path / "disk")
    assert elsewhere.faust_datadir() == tmp_path / "disk" / "bf-data-test"


def test_topics_faust_creates_get_the_configured_replication() -> None:
    assert build_app(Settings()).conf.topic_replication_factor == 1
    production = build_app(Settings(topic_replication_factor=3, topic_partitions=24)).conf
    assert (production.topic_replication_factor, production.topic_partitions) == (3, 24)


async def test_a_micro_batch_of_table_writes_fits_the_changelog_buffer() -> None:
    app = build_app(Settings())
    assert app.producer.buffer.max_messages == 100  # Faust's: intake pauses beyond it
    await _widen_producer_buffer(app, batch_max_events=1000)()
    assert app.producer.buffer.max_messages == 1000 * CHANGELOG_BUFFER_PER_BATCH_EVENT
    await _widen_producer_buffer(app, batch_max_events=10)()  # never narrower than Faust's
    assert app.producer.buffer.max_messages == 1000 * CHANGELOG_BUFFER_PER_BATCH_EVENT
