"""`logd sink`: flags in, a `logd.sink.Sink` run, an exit status out.

Exit status: 0 when done (``--once`` caught up, or stopped by SIGTERM after
committing the batch in hand); 1 when the sink cannot go on (a missing
table, logd's retention deleted what was next, a stop asked for while the
database was unreachable); 2 for a message that cannot be delivered under
``--on-error stop`` (its id is printed), as for usage errors.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click

from .cli_client import client_options, connection_args
from .errors import LogdError

__all__ = ["sink"]

EXIT_FAILED = 1
EXIT_POISON = 2
EXIT_GAVE_UP = 3


@click.command()
@click.argument("target", metavar="TARGET")
@click.option("--table", required=True, help="The table to fill (columns id and body, or the JSON keys).")
@click.option("--format", "fmt", default="raw", show_default=True, type=click.Choice(["raw", "json"]),
              help="raw: each body into the column body; json: each body is a JSON object filling the columns "
                   "its keys name.")
@click.option("--create", is_flag=True,
              help="Create the table (raw), its dead-letter table and the sink's checkpoint table if missing.")
@click.option("--name", default="default", show_default=True,
              help="The sink's name: several sinks can drain one log into one database.")
@click.option("--batch", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Most messages per transaction.")
@click.option("--linger-ms", default=200.0, show_default=True, type=click.FloatRange(min=0),
              help="Once a batch's first message is in, wait at most this long for it to fill.")
@click.option("--once", is_flag=True, help="Deliver up to the log's head at start, then exit 0 (for cron).")
@click.option("--on-error", default="dead-letter", show_default=True, type=click.Choice(["dead-letter", "stop"]),
              help="A message the database refuses: into TABLE_dead_letters and go on, or stop with status 2.")
@click.option("--json-status", type=click.Path(dir_okay=False), default=None,
              help="Keep the sink's figures in this JSON file (replaced every few seconds), for monitoring.")
@click.option("--retry-max-s", default=10.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Longest wait between two attempts while the database or logd is unreachable.")
@click.option("--give-up-after", "give_up_after", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Stop retrying once the database or logd has been unreachable this long, and exit 3 "
                   "(for cron with --once). Default: retry forever.")
@click.option("--report-cursor/--no-report-cursor", default=True, show_default=True,
              help="Show the position on the server as the named cursor sink.NAME (logd cursors shows its lag); "
                   "advisory: the sink resumes from the database's checkpoint.")
@click.option("--log-format", default="console", show_default=True, type=click.Choice(["console", "json"]),
              help="Format of the log lines on stderr.")
@client_options
def sink(target: str, table: str, fmt: str, create: bool, name: str, batch: int, linger_ms: float, once: bool,
         on_error: str, json_status: str | None, retry_max_s: float, give_up_after: float | None,
         report_cursor: bool, log_format: str, url: str, timeout: float) -> None:
    """Deliver the log into TARGET's table, exactly once, and keep following it (or --once).

    TARGET is sqlite:///relative.db or sqlite:////absolute.db,
    postgresql://user@host:5432/db, or clickhouse://host:8123/db.
    Each batch and the sink's position are committed together (ClickHouse:
    resumes after the largest id in the table), so a crash anywhere neither
    loses nor repeats a message. SIGTERM commits the batch in hand and exits 0.

    \b
        logd sink sqlite:///events.db --table events --create --once
    """
    from .logging import configure_logging
    from .sink import GaveUpError, PoisonMessageError, Sink, SinkConfig

    configure_logging(log_format, "info")
    logd_args = connection_args(url)  # the token (URL or LOGD_TOKEN) and, for logds://, the TLS context
    try:
        config = SinkConfig(target=target, table=table, url=url, name=name, format=fmt, create=create, batch=batch,
                            linger_ms=linger_ms, once=once, on_error=on_error, timeout=timeout,
                            json_status=json_status, retry_max_s=retry_max_s, report_cursor=report_cursor,
                            give_up_after_s=give_up_after, **logd_args)
        runner = Sink(config)
    except (ValueError, LogdError) as exc:
        raise click.UsageError(str(exc)) from None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if runner.stopping:  # the second signal: leave now; the open transaction is rolled back
            raise KeyboardInterrupt
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run()
    except GaveUpError as exc:
        click.echo(f"logd: {exc} (delivered up to {runner.progress.last_id}; run again to resume)", err=True)
        sys.exit(EXIT_GAVE_UP)
    except PoisonMessageError as exc:
        click.echo(f"logd: {exc} (delivered up to {exc.id - 1}; fix or remove it, then run again)", err=True)
        sys.exit(EXIT_POISON)
    except LogdError as exc:
        click.echo(f"logd: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
