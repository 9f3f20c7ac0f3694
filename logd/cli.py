"""The `logd` command line: the click group and the server-side commands (serve, check, promote, demote).

Click commands only; the work is in the library. The client commands
(append, read, consume, head, ping, stats) are in `cli_client` and added to
the group here.

Every `serve` flag can also be given as an environment variable LOGD_<NAME>
(e.g. LOGD_PORT, LOGD_DATA_DIR); flags win over the environment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .cli_client import append, consume, head, ping, read, stats
from .config import DEFAULT_PORT, Config
from .errors import DamagedLogError, LogdError
from .storage.log import DEFAULT_SEGMENT_BYTES, FsyncPolicy

EXIT_STARTUP_FAILED = 3  # distinct from 1 (runtime error) and 2 (usage)
# 4: a follower stopped (diverged); 5: stopped after a fail-stop (server.py)
EXIT_DAMAGED = 6  # the data dir holds damage recovery must not cut away: run logd check


def _env(name: str) -> str:
    return "LOGD_" + name.upper().replace("-", "_")


def option(name: str, **kw: Any) -> Callable[[Any], Any]:
    """A click option named --NAME that also reads LOGD_NAME, default shown in --help."""
    kw.setdefault("show_default", True)
    kw.setdefault("show_envvar", True)
    return click.option(f"--{name}", envvar=_env(name), **kw)


def _fsync_type(value: str) -> FsyncPolicy:
    try:
        return FsyncPolicy.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _size(value: str | int) -> int:
    """Parse a byte size: 1048576, 64KiB, 128MiB, 1GiB (also K/M/G/KB/MB/GB)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 1000, "mb": 10**6, "gb": 10**9, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * mult
    if text.isdigit():
        return int(text)
    raise click.BadParameter(f"not a size: {value!r} (try 1048576, 64KiB, 128MiB)")


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        return _size(value)


SIZE = SizeType()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logd")
def main() -> None:
    """logd: a networked, sequenced log server."""


@main.command()
@option("host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
@option("port", default=DEFAULT_PORT, type=int, help="TCP port; 0 picks a free one and prints it.")
@option("data-dir", default="./logd-data", help="Directory holding the segments.")
@option("fsync", default="always", callback=lambda c, p, v: _fsync_type(v),
        help="Durability: always (group commit), interval:<ms>, or never.")
@option("segment-bytes", default=str(DEFAULT_SEGMENT_BYTES), type=SIZE, help="Roll segments at this size.")
@option("retention-bytes", default=None, type=SIZE, help="Delete oldest segments above this total size.")
@option("retention-ms", default=None, type=int, help="Delete segments whose newest write is older than this.")
@click.option("--preallocate/--no-preallocate", default=None, envvar=_env("preallocate"), show_envvar=True,
              help="Keep zeros written ahead of the data, so an fdatasync need not change the file's size "
                   "(about half the cost here). [default: on with fsync=always]")
@option("max-message-bytes", default=1 << 20, type=SIZE, help="Largest message body.")
@option("max-line-bytes", default=64 * 1024, type=SIZE, help="Longest command line.")
@option("max-batch", default=10_000, type=int, help="Most messages in one MSG.")
@option("max-batch-bytes", default=str(64 << 20), type=SIZE, help="Most body bytes in one MSG.")
@option("max-connections", default=10_000, type=int, help="Connections beyond this get ERR BUSY.")
@option("conn-input-bytes", default=str(64 << 20), type=SIZE,
        help="Per connection: bytes of commands received and not yet answered before it is not read.")
@option("conn-output-bytes", default=str(2 << 20), type=SIZE,
        help="Per connection: unsent reply and stream bytes before it is not read (a stream waits).")
@option("server-input-bytes", default=str(512 << 20), type=SIZE,
        help="All connections: partial MSGs and commands waiting their turn before reading stops.")
@option("server-output-bytes", default=str(256 << 20), type=SIZE,
        help="All connections: unsent output before streams wait and reading stops.")
@option("tail-stall-timeout", default=60.0, type=float,
        help="Drop a READ/REPLICATE stream (ERR BUSY) whose output has not drained for this many seconds.")
@option("idle-timeout", default=None, type=float, help="Close connections idle this many seconds (not tails).")
@option("allow-shutdown", is_flag=True, default=False, help="Let clients stop the server with SHUTDOWN.")
@option("log-format", default="console", type=click.Choice(["console", "json"]), help="Log output format.")
@option("log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level.")
@option("replica-of", default=None, metavar="HOST:PORT",
        help="Run as a follower of this leader (read-only until promoted with ACCEPT).")
@option("min-replicas", default=0, type=int,
        help="Acknowledge a MSG only once this many replicas have committed it (0: asynchronous).")
@option("replica-timeout", default=5.0, type=float,
        help="Seconds a MSG waits for --min-replicas acks; a replica further behind is out of sync.")
def serve(**flags: Any) -> None:
    """Run the logd server."""
    from .logging import configure_logging
    from .server import run

    configure_logging(flags["log_format"], flags["log_level"])
    try:
        config = Config(**flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def ready(host: str, port: int) -> None:
        click.echo(f"logd listening on {host}:{port}")
        sys.stdout.flush()

    try:
        status = run(config, ready)
    except DamagedLogError as exc:
        click.echo(f"logd: cannot start: the data dir is damaged: {exc}", err=True)
        sys.exit(EXIT_DAMAGED)
    except (OSError, LogdError) as exc:  # port taken, data dir locked or unreadable, ...
        click.echo(f"logd: cannot start: {exc}", err=True)
        sys.exit(EXIT_STARTUP_FAILED)
    if status:
        click.echo(f"logd: stopped with status {status} (see the log above)", err=True)
        sys.exit(status)


@main.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--repair", is_flag=True, help="Truncate the log at the first bad record (says what is lost first).")
@click.option("--diverge", "other_dir", default=None, type=click.Path(file_okay=False), metavar="OTHER_DIR",
              help="Instead: print the first id where OTHER_DIR and DATA_DIR differ; exit 1 if they do.")
def check(data_dir: str, repair: bool, other_dir: str | None) -> None:
    """Verify every record and index of DATA_DIR; exit non-zero if anything is wrong."""
    if other_dir is not None:
        from .storage.check import diverge_point

        try:
            point = diverge_point(other_dir, data_dir)
        except LogdError as exc:
            click.echo(f"logd: {exc}", err=True)
            sys.exit(2)
        if point is None:
            click.echo("no divergence: one log is a prefix of the other")
            sys.exit(0)
        click.echo(f"diverged at id {point}")
        sys.exit(1)
    from .storage.check import check_data_dir

    sys.exit(check_data_dir(data_dir, repair=repair))


def _send_admin(address: str, verb: bytes, timeout: float) -> None:
    """Send one admin command (ACCEPT, REFUSE) and exit non-zero unless it is answered OK."""
    import socket

    from .config import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(verb + b"\r\nCLOSE\r\n")
            reply = b""
            while b"\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        click.echo(f"logd: cannot reach {address}: {exc}", err=True)
        sys.exit(1)
    line = reply.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    if line != "OK":
        click.echo(f"logd: {address} answered {line or 'nothing'}", err=True)
        sys.exit(1)


@main.command()
@click.argument("address", metavar="HOST:PORT")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
@click.option("--next-id", default=None, type=click.IntRange(min=1),
              help="Promote only if the server's next id is this (its log_head + 1 in STATS), "
                   "so the replica you checked is the one promoted.")
def promote(address: str, timeout: float, next_id: int | None) -> None:
    """Make the server at HOST:PORT a leader (ACCEPT): it stops following, starts a new epoch and accepts MSG."""
    _send_admin(address, b"ACCEPT" if next_id is None else b"ACCEPT %d" % next_id, timeout)
    click.echo(f"{address} accepts writes")


@main.command()
@click.argument("address", metavar="HOST:PORT")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
def demote(address: str, timeout: float) -> None:
    """Make the server at HOST:PORT read-only (REFUSE); it keeps serving reads."""
    _send_admin(address, b"REFUSE", timeout)
    click.echo(f"{address} refuses writes")


# --- client commands: append, read, consume, head, ping, stats -----------------------
#
# Defined in cli_client, which imports nothing from this module: under
# `python -m logd.cli` this file is __main__, and an import of logd.cli from
# there would build a second `main` group.

for _command in (append, read, consume, head, ping, stats):
    main.add_command(_command)


if __name__ == "__main__":
    main()
