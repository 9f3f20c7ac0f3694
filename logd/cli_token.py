"""`logd token add|list|remove`: manage the auth file (`logd serve --auth-file`).

A new token is printed once, alone on stdout, so that a script can capture
it; only its hash is kept. Messages for people go to stderr.
"""

from __future__ import annotations

import sys

import click

from .auth import ROLES, AuthFileError, add_token, load_table, remove_token

__all__ = ["token"]

AUTH_FILE = click.option("--auth-file", required=True, envvar="LOGD_AUTH_FILE", show_envvar=True,
                         type=click.Path(dir_okay=False), help="The auth file (created with mode 0600).")


@click.group()
def token() -> None:
    """Manage the tokens of an auth file; send SIGHUP to a running server to apply changes."""


@token.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES),
              help="read: READ HEAD STATS and its cursors; write: + MSG; replicate: read + REPLICATE ACK; "
                   "admin: everything.")
@click.option("--cursors", "grant", default=None, metavar="PATTERNS",
              help="The named cursors it may move (COMMIT) and drop: comma-separated names or prefixes ending "
                   "in *, e.g. 'billing,sink.*' ('' for none). Default: NAME and NAME.* (admin: every cursor).")
@AUTH_FILE
def add(name: str, role: str, grant: str | None, auth_file: str) -> None:
    """Create a token NAME with ROLE; print it (the only time it is shown)."""
    try:
        secret = add_token(auth_file, name, role, grant)
    except (AuthFileError, OSError) as exc:
        click.echo(f"logd: {exc}", err=True)
        sys.exit(1)
    click.echo(secret)
    click.echo(f"logd: token {name!r} (role {role}) added to {auth_file}; it is not shown again. "
               "Send SIGHUP to a running server to use it.", err=True)


@token.command("list")
@AUTH_FILE
def list_tokens(auth_file: str) -> None:
    """Print each token's name, role and the cursors it may move (the tokens themselves are not stored)."""
    try:
        table = load_table(auth_file)
    except AuthFileError as exc:
        click.echo(f"logd: {exc}", err=True)
        sys.exit(1)
    for entry in table.entries.values():
        owned = "*" if entry.role == "admin" else ",".join(entry.cursor_patterns)
        click.echo(f"{entry.name}\t{entry.role}\tcursors={owned}")


@token.command("remove")
@click.argument("name")
@AUTH_FILE
def remove(name: str, auth_file: str) -> None:
    """Remove the token NAME; after SIGHUP, connections that used it are closed."""
    try:
        remove_token(auth_file, name)
    except (AuthFileError, OSError) as exc:
        click.echo(f"logd: {exc}", err=True)
        sys.exit(1)
    click.echo(f"logd: token {name!r} removed from {auth_file}", err=True)
