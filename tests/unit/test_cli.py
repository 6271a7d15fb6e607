"""The ``borderflow`` command line: help for every command, and errors as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from infra import cli as cli_module
from infra.cli import cli, main
from schemas.config import Settings
from schemas.errors import BorderflowError

ROOT = Path(__file__).resolve().parents[2]


def command_paths(command: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command in the tree, as the words one types after ``borderflow``."""
    paths = [prefix]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            paths.extend(command_paths(sub, (*prefix, name)))
    return paths


ALL_PATHS = command_paths(cli)


def test_the_command_tree_has_every_documented_command() -> None:
    assert set(ALL_PATHS) >= {
        (),
        ("stack",),
        ("stack", "up"),
        ("stack", "down"),
        ("stack", "status"),
        ("migrate",),
        ("worker",),
        ("bench",),
        ("demo",),
        ("generate",),
        ("replay",),
    }


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p) or "borderflow")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_works_for_every_command(path: tuple[str, ...], flag: str) -> None:
    result = CliRunner().invoke(cli, [*path, flag], obj=Settings(), prog_name="borderflow")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join(('borderflow', *path))} ")
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    summary = command.get_short_help_str(limit=300)
    assert summary.split()[0] in result.output  # its own help text, not its parent's


def test_group_help_lists_its_sub_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"], obj=Settings())
    for name in ("stack", "migrate", "worker", "bench", "demo", "generate", "replay"):
        assert f"  {name} " in result.output
    stack = CliRunner().invoke(cli, ["stack", "--help"], obj=Settings())
    for name in ("up", "down", "status"):
        assert f"  {name} " in stack.output


def test_help_does_not_need_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BORDERFLOW_TOPIC_PARTITIONS", "zero")
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0


# -- errors as one line: main() in a real process ------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BORDERFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_clickhouse_ends_in_a_readable_error_and_a_failure_code() -> None:
    result = run_cli("migrate", BORDERFLOW_CLICKHOUSE_PORT="1")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("borderflow: error: ")
    assert "127.0.0.1:1" in last
    assert result.stdout == ""


def test_unreachable_clickhouse_is_exactly_one_line_on_stderr() -> None:
    result = run_cli("migrate", BORDERFLOW_CLICKHOUSE_PORT="1")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("borderflow: error: ")


def test_invalid_setting_is_one_line() -> None:
    result = run_cli("migrate", BORDERFLOW_TOPIC_PARTITIONS="zero")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("borderflow: error: ")
    assert "topic_partitions" in lines[0]


def test_unknown_command_is_one_line_with_usage_exit_code() -> None:
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["borderflow: error: No such command 'no-such-command'."]


def test_debug_shows_the_traceback() -> None:
    result = run_cli("migrate", BORDERFLOW_TOPIC_PARTITIONS="zero", BORDERFLOW_DEBUG="1")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr


# -- main() in process --------------------------------------------------------------------------


def _run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["borderflow", *args])
    monkeypatch.delenv("BORDERFLOW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main()
    code = exc.value.code
    return code if isinstance(code, int) else 1


def _add_failing_command(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    @click.command("boom")
    def boom() -> None:
        raise error

    monkeypatch.setitem(cli.commands, "boom", boom)


def test_borderflow_error_becomes_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_failing_command(monkeypatch, BorderflowError("first part\nsecond part"))
    assert _run_main(monkeypatch, "boom") == 1
    err = capsys.readouterr().err
    assert err == "borderflow: error: first part second part\n"


def test_help_through_main_returns_normally(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["borderflow", "--help"])
    cli_module.main()  # no SystemExit: the process exits 0
    assert capsys.readouterr().out.startswith("Usage: borderflow ")


def test_explicit_exit_code_of_a_command_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command("exit3")
    @click.pass_context
    def exit3(ctx: click.Context) -> None:
        ctx.exit(3)

    monkeypatch.setitem(cli.commands, "exit3", exit3)
    monkeypatch.setattr(sys, "argv", ["borderflow", "exit3"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 3


def test_any_other_failure_becomes_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_failing_command(monkeypatch, RuntimeError("unexpected"))
    assert _run_main(monkeypatch, "boom") != 0
    assert capsys.readouterr().err == "borderflow: error: RuntimeError: unexpected\n"


def test_pseudonym_prints_what_clickhouse_holds_for_each_id() -> None:
    settings = Settings(pseudonym_key="k-test")
    result = CliRunner().invoke(cli, ["pseudonym", "u1", "u2"], obj=settings)
    assert result.exit_code == 0, result.output
    from sinks.pseudonym import Pseudonymiser

    expected = Pseudonymiser(b"k-test")
    assert result.output.splitlines() == [
        f"u1\t{expected.pseudonym('u1', 'user')}",
        f"u2\t{expected.pseudonym('u2', 'user')}",
    ]
    card = CliRunner().invoke(cli, ["pseudonym", "--kind", "card", "u1"], obj=settings)
    assert card.output.split("\t")[1].strip() == expected.pseudonym("u1", "card")
