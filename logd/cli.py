"""The `logd` command line: the click group and the server-side commands (serve, check, promote, demote).

Click commands only; the work is in the library. The client commands
(append, read, consume, head, ping, stats) are in `cli_client` and added to
the group here.

Every `serve` flag can also be given as an environment variable LOGD_<NAME>
(e.g. LOGD_PORT, LOGD_DATA_DIR) or in a TOML file (--config); flags win over
the environment, which wins over the file (see `config.resolve`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .cli_client import _client, _Quiet, append, consume, cursors, head, ping, read, stats, tls_options
from .cli_sink import sink
from .cli_token import token
from .config import CONFIG_ENV, DEFAULTS, Config, ConfigError, Resolved, describe, environment, resolve
from .errors import DamagedLogError, LogdError
from .settings import SETTINGS, Setting

EXIT_STARTUP_FAILED = 3  # distinct from 1 (runtime error) and 2 (usage)
# 4: a follower stopped (diverged); 5: stopped after a fail-stop (server.py)
EXIT_DAMAGED = 6  # the data dir holds damage recovery must not cut away: run logd check


class SettingType(click.ParamType):
    """A click type that parses a flag as `settings.SETTINGS` says (the same parser as env and file)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.name = setting.name

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.setting.from_text(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _help(setting: Setting) -> str:
    default = getattr(DEFAULTS, setting.name)
    shown = "not set" if default is None else str(default)
    return f"{setting.help}  [env: {setting.env}; default: {shown}]"


def server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and one flag per server setting (settings.SETTINGS); a flag not given is None.

    Defaults are not click's: `config.resolve` applies them last, after the
    environment and the config file, and says where each value came from.
    """
    for setting in reversed(SETTINGS.values()):
        if setting.flag_only:
            opt = click.option(f"--{setting.flag}/--no-{setting.flag}", setting.name, default=None,
                               help=_help(setting))
        else:
            metavar = setting.choices and "|".join(setting.choices) or setting.name.rsplit("_", 1)[-1].upper()
            opt = click.option(f"--{setting.flag}", setting.name, default=None, type=SettingType(setting),
                               metavar=metavar, help=_help(setting))
        fn = opt(fn)
    return click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                        help=f"A TOML file of settings (keys as the flags).  [env: {CONFIG_ENV}]")(fn)


def _resolve(flags: dict[str, Any], config_file: str | None) -> Resolved:
    try:
        resolved = resolve(flags, environment(), config_file)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if flags.get("replica_token") is not None:
        # Kept working for existing scripts, but any user of the machine can read it.
        click.echo("logd: warning: --replica-token is visible to other users of this machine (ps, "
                   "/proc/PID/cmdline); use --replica-token-file PATH or LOGD_REPLICA_TOKEN", err=True)
    token_file = resolved.config.replica_token_file
    if token_file is not None:
        from .auth import loose_permissions
    if token_file is not None and loose_permissions(token_file):
        click.echo(f"logd: warning: {token_file} may be read by other users; chmod 600 it", err=True)
    return resolved


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logd")
def main() -> None:
    """logd: a networked, sequenced log server."""


@main.command()
@server_options
def serve(config_file: str | None, **flags: Any) -> None:
    """Run the logd server.

    Settings come from flags, then LOGD_* environment variables, then the
    --config file, then the defaults (`logd config` shows the result).
    SIGHUP rereads the config file and applies its log level.
    """
    from .logging import configure_logging
    from .protected import refusals
    from .runner import run

    resolved = _resolve(flags, config_file)
    config = resolved.config
    configure_logging(config.log_format, config.log_level)
    refused = refusals(config)  # protected mode: every listening port, the metrics one included
    for reason in refused:
        click.echo(f"logd: {reason}", err=True)
    if refused:
        sys.exit(EXIT_STARTUP_FAILED)

    def ready(host: str, port: int) -> None:
        click.echo(f"logd listening on {host}:{port}")
        sys.stdout.flush()

    def metrics_ready(host: str, port: int) -> None:
        click.echo(f"logd metrics on http://{host}:{port}/metrics")
        sys.stdout.flush()

    def reload() -> Config:
        return resolve(flags, environment(), resolved.config_file).config

    try:
        status = run(config, ready, reload, metrics_ready)
    except DamagedLogError as exc:
        click.echo(f"logd: cannot start: the data dir is damaged: {exc}", err=True)
        sys.exit(EXIT_DAMAGED)
    except (OSError, LogdError) as exc:  # port taken, data dir locked or unreadable, ...
        click.echo(f"logd: cannot start: {exc}", err=True)
        sys.exit(EXIT_STARTUP_FAILED)
    if status:
        click.echo(f"logd: stopped with status {status} (see the log above)", err=True)
        sys.exit(status)


@main.command("config")
@server_options
def show_config(config_file: str | None, **flags: Any) -> None:
    """Print the configuration `logd serve` would run with, and where each value comes from.

    The output is TOML: save it as a config file to start from.
    """
    click.echo(describe(_resolve(flags, config_file)), nl=False)


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


def _send_admin(address: str, send: Callable[[Any], None], timeout: float) -> None:
    """Send one admin command (ACCEPT, REFUSE); exit non-zero unless it is answered OK."""
    with _Quiet(), _client(address, timeout, attempts=1, param_hint="ADDRESS") as client:
        send(client)


@main.command()
@click.argument("address", metavar="URL")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
@click.option("--next-id", default=None, type=click.IntRange(min=1),
              help="Promote only if the server's next id is this (its log_head + 1 in STATS), "
                   "so the replica you checked is the one promoted.")
@click.option("--min-replicas", default=None, type=click.IntRange(min=0),
              help="Run the new leader with this --min-replicas instead of the one it kept (its old "
                   "leader's, or its own flag: STATS min_replicas); kept across restarts.")
@tls_options
def promote(address: str, timeout: float, next_id: int | None, min_replicas: int | None) -> None:
    """Make the server at URL (HOST:PORT, logd://[:TOKEN@]HOST:PORT, logds://...) a leader (ACCEPT):
    it stops following, starts a new epoch and accepts MSG, with the --min-replicas its leader ran
    with unless told otherwise. Needs an admin token when the server has --auth-file."""
    figures: dict[str, str] = {}

    def accept(client: Any) -> None:
        client.accept_writes(next_id=next_id, min_replicas=min_replicas)
        figures.update(client.stats())

    _send_admin(address, accept, timeout)
    durability = ""
    if "min_replicas_from" in figures:  # an older server does not say
        durability = f", min_replicas {figures['min_replicas']} ({figures['min_replicas_from']})"
    click.echo(f"{_shown(address)} accepts writes{durability}")


@main.command()
@click.argument("address", metavar="URL")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
@tls_options
def demote(address: str, timeout: float) -> None:
    """Make the server at URL read-only (REFUSE); it keeps serving reads. Needs an admin token
    when the server has --auth-file."""
    _send_admin(address, lambda c: c.refuse_writes(), timeout)
    click.echo(f"{_shown(address)} refuses writes")


def _shown(address: str) -> str:
    """The address without its token."""
    from .url import split_url

    host, port, _tls, _token = split_url(address)
    return f"{host}:{port}"


# --- client commands: append, read, consume, head, ping, stats, cursors -----------------------
#
# Defined in cli_client, which imports nothing from this module: under
# `python -m logd.cli` this file is __main__, and an import of logd.cli from
# there would build a second `main` group.

for _command in (append, read, consume, head, ping, stats, cursors, token, sink):
    main.add_command(_command)


if __name__ == "__main__":
    main()
