"""The ``borderflow`` command line: one entry point for operators, analysts and developers.

Settings are read once here (environment, ``BORDERFLOW_`` prefix) and handed to every
sub-command through the click context. Any failure is printed as one readable line with a
non-zero exit code (unexpected exception types are named); ``BORDERFLOW_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from schemas.config import Settings
from schemas.errors import BorderflowError

if TYPE_CHECKING:
    pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """borderflow: real-time profiles, fraud scoring, recommendations and logistics.

    Configuration comes from BORDERFLOW_* environment variables (see docs/operations.md);
    the defaults point at the local stack started by `borderflow stack up`.
    """
    if ctx.invoked_subcommand != "worker":  # Faust configures the worker's logging itself
        logging.basicConfig(level=logging.ERROR, format="borderflow: %(name)s: %(message)s")
        # The driver logs each failed connection with a traceback, then raises; main()
        # reports the exception as one line, so the log record would only be noise.
        logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)
    if ctx.obj is None:
        ctx.obj = Settings()


@cli.command()
@click.pass_obj
def migrate(settings: Settings) -> None:
    """Apply pending ClickHouse migrations (versioned and idempotent)."""
    from infra.migrate import migrate as apply_migrations

    applied = apply_migrations(settings)
    if applied:
        click.echo(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        click.echo(f"ClickHouse database {settings.clickhouse_database!r} is up to date")


@cli.command()
@click.option(
    "--pipeline",
    type=click.Choice(["batched", "naive"]),
    default=None,
    help="Processing variant (default: BORDERFLOW_PIPELINE or batched). "
    "'naive' is the per-event baseline used by the bench.",
)
@click.option(
    "--web-port",
    type=int,
    default=None,
    help="Port of the worker's web server (0 = any free port). "
    "Give each worker on one machine its own port.",
)
@click.option(
    "--loglevel",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.pass_obj
def worker(settings: Settings, pipeline: str | None, web_port: int | None, loglevel: str) -> None:
    """Run one stream-processing worker in the foreground (several can run side by side)."""
    from faust.worker import Worker

    from schemas.events import ALL_TOPICS
    from sinks.kafka import ensure_topics
    from streams.app import create_worker_app

    updates: dict[str, object] = {}
    if pipeline:
        updates["pipeline"] = pipeline
    if web_port is not None:
        updates["worker_web_port"] = web_port or _free_port()
    settings = settings.model_copy(update=updates)
    ensure_topics(settings, list(ALL_TOPICS))
    app, _ = create_worker_app(settings)
    Worker(app, loglevel=loglevel, redirect_stdouts=False).execute_from_commandline()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@cli.command()
@click.option(
    "--events",
    "n_events",
    default=30_000,
    show_default=True,
    help="Events in the throughput workload (per variant).",
)
@click.option(
    "--latency-seconds",
    default=15.0,
    show_default=True,
    help="Duration of the half-load latency phase.",
)
@click.option(
    "--compare/--skip-naive",
    default=True,
    show_default=True,
    help="Also run the naive per-event pipeline on the same workload, and print the ratio.",
)
@click.option(
    "--users",
    "n_users",
    default=None,
    type=click.IntRange(1),
    help="Users of the generated workload [default: events / 100, about 100 events each]. "
    "More users means fewer of a user's clicks per micro-batch, so fewer are coalesced.",
)
@click.option(
    "--events-per-message",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Send up to N of one user's events as one JSON-array message (tracker batching).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Also measure N workers of one app on the same workload (scale-out ratio).",
)
@click.option(
    "--state-users",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Also measure memory and recovery time after SIGKILL of a worker holding N users.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the results JSON here (also printed).",
)
@click.pass_obj
def bench(
    settings: Settings,
    n_events: int,
    latency_seconds: float,
    compare: bool,
    n_users: int | None,
    events_per_message: int,
    workers: int,
    state_users: int,
    out: str | None,
) -> None:
    """Measure events/s and produce-to-visible latency on the real stack, vs the naive variant."""
    from infra.bench import run_bench

    run_bench(
        settings,
        n_events=n_events,
        latency_seconds=latency_seconds,
        run_naive=compare,
        out=out,
        n_users=n_users,
        events_per_message=events_per_message,
        workers=workers,
        state_users=state_users,
    )


@cli.command()
@click.option("--users", default=1500, show_default=True, help="Simulated users.")
@click.option("--days", default=10, show_default=True, help="Simulated days of event time.")
@click.option("--seed", default=7, show_default=True)
@click.pass_obj
def demo(settings: Settings, users: int, days: int, seed: int) -> None:
    """Run the whole pipeline once on the running stack and show what each user group sees."""
    from infra.demo import run_demo

    run_demo(settings, users=users, days=days, seed=seed)


@cli.command()
@click.argument("ids", nargs=-1, required=True)
@click.option(
    "--kind",
    type=click.Choice(["user", "card"]),
    default="user",
    show_default=True,
    help="What the ids are: each kind is hashed in its own domain.",
)
@click.pass_obj
def pseudonym(settings: Settings, ids: tuple[str, ...], kind: str) -> None:
    """Print the ClickHouse pseudonym of each user (or card) id, one per line.

    ClickHouse holds keyed hashes instead of user and card ids (docs/contracts.md); this
    computes them with BORDERFLOW_PSEUDONYM_KEY, e.g. to look up one customer's rows:
    WHERE user_id = '<pseudonym>'.
    """
    from sinks.pseudonym import Pseudonymiser

    pseudonymiser = Pseudonymiser.from_settings(settings)
    for value in ids:
        click.echo(
            f"{value}\t{pseudonymiser.pseudonym(value, 'card' if kind == 'card' else 'user')}"
        )


@cli.command()
@click.argument("user_id")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the receipt of the worker that owns the user.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be removed; send nothing.")
@click.pass_obj
def forget(settings: Settings, user_id: str, wait_s: float, dry_run: bool) -> None:
    """Erase one user from Redis, the workers' state and ClickHouse, and list what went.

    The workers' part travels as a request on the privacy-requests topic; without a running
    worker it stays pending there (exit code 3) and is applied when the owning worker starts.
    Raw events stay in the Kafka input topics until their retention (docs/privacy.md).
    """
    from infra.privacy import EXIT_PENDING, run_forget

    report = run_forget(settings, user_id, wait_s=wait_s, dry_run=dry_run)
    for line in report.lines():
        click.echo(line)
    if report.pending:
        raise click.exceptions.Exit(EXIT_PENDING)


def _register_optional_commands() -> None:
    """Sub-commands that live next to the code they drive."""
    from infra.alerts import alerts_cli
    from infra.evaluate import eval_cli
    from infra.generator import generate_command
    from infra.replay import replay_command
    from infra.report import report_command
    from infra.retention import retention_command
    from infra.stack import stack_cli

    cli.add_command(stack_cli)
    cli.add_command(generate_command)
    cli.add_command(replay_command)
    cli.add_command(eval_cli)
    cli.add_command(alerts_cli)
    cli.add_command(report_command)
    cli.add_command(retention_command)


_register_optional_commands()


def _help_everywhere(command: click.Command) -> None:
    """``-h`` as well as ``--help`` on every command, also when one is invoked on its own
    (click caches a command's help option from the first context that asks for it)."""
    command.context_settings.setdefault("help_option_names", ["-h", "--help"])
    for child in getattr(command, "commands", {}).values():
        _help_everywhere(child)


_help_everywhere(cli)


def main() -> None:
    try:
        exit_code = cli.main(standalone_mode=False, prog_name="borderflow")
    except click.exceptions.Abort:
        click.echo("borderflow: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"borderflow: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("BORDERFLOW_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, BorderflowError | ValidationError | OSError):
            message = f"{type(exc).__name__}: {message}"
        click.echo(f"borderflow: error: {message}", err=True)
        sys.exit(1)
    # In standalone_mode=False, click returns the code a command passed to ctx.exit().
    if isinstance(exit_code, int) and exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
