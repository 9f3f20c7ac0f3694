"""The client commands of `logd` (append, read, consume, head, ping, stats): flags in, library calls, output out.

They talk to a server through the client library (logd.client). A failure
prints one line "logd: <what went wrong>" on stderr and exits 1; a usage
error exits 2; a reader whose stdout is closed (`logd read | head`) stops
quietly. `logd.cli` adds them to the `logd` group; this module imports
nothing from it, so `python -m logd.cli` loads each module once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from .client.commands import DEFAULT_URL
from .errors import LogdError

__all__ = ["append", "client_options", "consume", "cursors", "head", "ping", "read", "stats", "tls_options"]

EXIT_FAILED = 1


def _keep_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta[f"logd_{param.name}"] = value


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--url (also LOGD_URL), --timeout and the TLS files, shared by every client command.

    The token comes from the URL (logd://:TOKEN@host:port) or LOGD_TOKEN: never
    from a flag, which `ps` would show to every user of the machine.
    """
    fn = click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.001),
                      help="Seconds to wait for each reply.")(fn)
    fn = tls_options(fn)
    return click.option("--url", default=DEFAULT_URL, envvar="LOGD_URL", show_default=True, show_envvar=True,
                        help="The server, logd://[:TOKEN@]HOST:PORT or logds://... for TLS; "
                             "the token may also come from LOGD_TOKEN.")(fn)


def tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-ca, --tls-cert, --tls-key, kept in the click context for `connection_args`.

    Their environment variables are LOGD_CLIENT_TLS_*: LOGD_TLS_* are the server's own certificate.
    """
    for name, what in (("key", "Client certificate's key (with --tls-cert)."),
                       ("cert", "Client certificate, for servers started with --tls-ca."),
                       ("ca", "CA to verify a logds:// server (default: the system's).")):
        fn = click.option(f"--tls-{name}", f"tls_{name}", default=None, envvar=f"LOGD_CLIENT_TLS_{name.upper()}",
                          show_envvar=True, type=click.Path(dir_okay=False), expose_value=False,
                          callback=_keep_tls, help=what)(fn)
    return fn


def connection_args(url: str, param_hint: str = "--url") -> dict[str, Any]:
    """``token`` (from the URL, else LOGD_TOKEN) and ``ssl_context`` for a client of ``url``."""
    import os

    from .tls import client_context
    from .url import split_url

    try:
        _host, _port, tls, token = split_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None
    meta = click.get_current_context().meta
    ca, cert, key = (meta.get(f"logd_tls_{n}") for n in ("ca", "cert", "key"))
    ctx = None
    if tls:  # the scheme decides; the TLS files only say how
        try:
            ctx = client_context(ca, cert, key)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot load TLS files: {exc}", param_hint="--tls-ca/--tls-cert") from None
    return {"token": token or os.environ.get("LOGD_TOKEN") or None, "ssl_context": ctx}


def _client(url: str, timeout: float, attempts: int = 3, param_hint: str = "--url") -> Any:
    """A blocking client; a bad URL is a usage error. Few retries: a CLI should fail fast."""
    from .client import Client, Retry

    args = connection_args(url, param_hint)
    try:
        return Client.from_url(url, timeout=timeout, retry=Retry(attempts=attempts), **args)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None


class _Quiet:
    """Context: LogdError -> one line on stderr + exit 1; closed stdout -> quiet exit; ^C -> 130."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        import os

        if isinstance(exc, LogdError):
            click.echo(f"logd: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`logd read | head`): not an error; keep
            # Python from complaining when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        if isinstance(exc, KeyboardInterrupt):
            sys.exit(130)


def _delimiter(delimiter: str, null: bool) -> bytes:
    if null:
        return b"\0"
    try:
        sep = delimiter.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(str(exc), param_hint="--delimiter") from None
    if not sep:
        raise click.BadParameter("must not be empty", param_hint="--delimiter")
    return sep


def delimiter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-0", "--null", is_flag=True, help="Separate messages by NUL bytes (as find -print0).")(fn)
    return click.option("-d", "--delimiter", default="\\n", show_default=True,
                        help="Separator between messages; escapes such as \\t or \\0 work.")(fn)


@click.command()
@click.argument("messages", nargs=-1)
@delimiter_options
@click.option("-q", "--quiet", is_flag=True, help="Do not print the ids.")
@click.option("--batch", "max_batch", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Most messages per MSG (at most the server's --max-batch).")
@client_options
def append(messages: tuple[str, ...], delimiter: str, null: bool, quiet: bool, max_batch: int,
           url: str, timeout: float) -> None:
    """Append MESSAGEs, or else stdin split at each delimiter; print the ids, one per line.

    stdin is streamed: read in chunks, sent as large pipelined MSGs, so a
    file of any size goes through in bounded memory. A progress bar appears
    on stderr when it is a terminal.
    """
    from .client.streams import read_chunks, split_messages

    sep = _delimiter(delimiter, null)
    out = sys.stdout.buffer
    stdin = sys.stdin.buffer
    bar = _progress(stdin)
    if messages:
        batches: Any = (list(messages[i : i + max_batch]) for i in range(0, len(messages), max_batch))
    else:
        batches = split_messages(read_chunks(stdin), sep, max_batch, bar.update if bar is not None else None)
    try:
        with _Quiet(), _client(url, timeout) as client:
            for ids in client.append_batches(batches):
                if not quiet:
                    out.write(b"\n".join(b"%d" % i for i in ids) + b"\n")
    except ValueError as exc:  # from split_messages: input that cannot be split
        click.echo(f"logd: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        if bar is not None:
            bar.close()
    out.flush()


def _progress(stdin: Any) -> Any:
    """A tqdm bar of bytes read, on stderr, only when stderr is a terminal (else None)."""
    if not sys.stderr.isatty():
        return None
    import os
    import stat

    from tqdm import tqdm

    total = None
    try:
        st = os.fstat(stdin.fileno())
        if stat.S_ISREG(st.st_mode):
            total = st.st_size - os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
    except (OSError, ValueError, AttributeError):
        pass
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="append")


def _from_spec(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    """--from: beginning | end | ID | -N."""
    if value in ("beginning", "end"):
        return value, 0
    if value.startswith("-") and value[1:].isdigit():
        return "last", int(value[1:])
    if value.isdigit() and int(value) >= 1:
        return "id", int(value)
    raise click.BadParameter(f"{value!r}: use beginning, end, an id (>= 1) or -N for the last N")


def _start_id(client: Any, spec: tuple[str, int]) -> int:
    kind, n = spec
    if kind == "id":
        return n
    if kind == "end":
        return int(client.head()) + 1
    first = int(client.first())
    if kind == "beginning":
        return first
    return max(first, int(client.head()) - n + 1)


@click.command()
@click.option("--from", "start", default="beginning", show_default=True, callback=_from_spec,
              help="Where to start: beginning, end (only new messages, with -f), an id, or -N for the last N.")
@click.option("-n", "--count", type=click.IntRange(min=0), default=None, help="Stop after COUNT messages.")
@click.option("-f", "--follow", is_flag=True, help="Keep waiting for new messages (as tail -f).")
@click.option("--format", "fmt", default=None, metavar="raw|json|TEMPLATE",
              help="raw: the bodies; json: JSON lines {\"id\":..,\"body\":..} (a body that is not UTF-8 is "
                   "base64 with \"base64\": true); or a template such as '{id} {body}' (fields id, body, len). "
                   "Default: raw when stdout is not a terminal, '{id}\\t{body}' when it is.")
@delimiter_options
@client_options
def read(start: tuple[str, int], count: int | None, follow: bool, fmt: str | None, delimiter: str, null: bool,
         url: str, timeout: float) -> None:
    """Print messages, one per line (or per delimiter); with -f, keep following the log."""
    from .client.streams import format_records

    out = sys.stdout.buffer
    if fmt is None:
        fmt = "{id}\t{body}" if sys.stdout.isatty() else "raw"
    try:
        render = format_records(fmt, _delimiter(delimiter, null))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    left = count
    # A follower keeps reconnecting for a while when the server restarts.
    with _Quiet(), _client(url, timeout, attempts=12 if follow else 3) as client:
        nxt = _start_id(client, start)
        if follow:
            with client.tail(nxt) as tail:
                while left is None or left > 0:
                    batch = tail.batch(10_000 if left is None else min(left, 10_000))
                    out.write(render(batch))
                    out.flush()
                    if left is not None:
                        left -= len(batch)
            return
        stop = int(client.head())
        if left is not None:
            stop = min(stop, nxt + left - 1)
        while nxt <= stop:
            batch = client.read(nxt, min(10_000, stop - nxt + 1))
            if not batch:
                break
            out.write(render(batch))
            nxt = batch[-1].id + 1
        out.flush()


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
              help="File keeping the id of the last message processed (created if missing).")
@click.option("--cursor", default=None, metavar="NAME",
              help="Instead of --checkpoint: keep it on the server as the named cursor NAME.")
@click.option("--batch", "max_batch", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Most messages per run of COMMAND.")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="Keep waiting for new messages, or stop once caught up with the log's head at start.")
@click.argument("command", nargs=-1, required=True)
@client_options
def consume(checkpoint: str | None, cursor: str | None, max_batch: int, follow: bool, command: tuple[str, ...],
            url: str, timeout: float) -> None:
    """Pipe each batch of messages (newline-separated) to COMMAND's stdin, from the checkpoint on.

    The checkpoint advances only after COMMAND exits 0 (at-least-once: a
    batch interrupted by a crash runs again). A non-zero exit stops with that
    status and the checkpoint where it was. COMMAND also gets LOGD_FIRST_ID
    and LOGD_LAST_ID in its environment. Put it after --:

    \b
        logd consume --checkpoint app.ckpt -- ./handle.sh
        logd consume --cursor app -- ./handle.sh
    """
    import os
    import subprocess

    from .client import Checkpoint, Consumer, FileCheckpoint, Retry, ServerCursor

    link = connection_args(url)  # token and TLS, for the cursor's client and the consumer's
    if (checkpoint is None) == (cursor is None):
        raise click.UsageError("give one of --checkpoint FILE or --cursor NAME")
    store: Checkpoint
    if cursor is not None:
        try:
            store = ServerCursor(cursor, url, timeout=timeout, retry=Retry(attempts=12), **link)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--cursor") from None
    else:
        assert checkpoint is not None
        store = FileCheckpoint(checkpoint)
    try:
        consumer = Consumer(url, store, max_batch=max_batch, follow=follow, timeout=timeout,
                            retry=Retry(attempts=12), **link)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    with _Quiet():
        for batch in consumer:
            env = dict(os.environ, LOGD_FIRST_ID=str(batch[0].id), LOGD_LAST_ID=str(batch[-1].id))
            data = b"".join([r.body + b"\n" for r in batch])
            try:
                status = subprocess.run(command, input=data, env=env).returncode
            except OSError as exc:
                click.echo(f"logd: cannot run {command[0]}: {exc.strerror or exc}", err=True)
                sys.exit(127)
            if status != 0:
                code = 128 - status if status < 0 else min(status, 255)
                click.echo(f"logd: {command[0]} exited with status {code} on ids {batch[0].id}..{batch[-1].id}; "
                           f"checkpoint stays at {consumer.checkpoint.load()}", err=True)
                sys.exit(code)
            consumer.commit()


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object {name: {\"id\": .., \"lag\": ..}}.")
@click.option("--drop", "drop", default=None, metavar="NAME",
              help="Instead: delete the cursor NAME (DROP). With authentication the token must own it "
                   "(its cursor grant) or be admin.")
@client_options
def cursors(as_json: bool, drop: str | None, url: str, timeout: float) -> None:
    """Print the server's named cursors: name, id, and lag (messages behind the head); or drop one."""
    if drop is not None:
        from .storage.cursors import valid_name

        if not valid_name(drop):
            raise click.BadParameter(f"bad cursor name {drop!r}: 1 to 64 of A-Z a-z 0-9 . _ -", param_hint="--drop")
        with _Quiet(), _client(url, timeout) as client:
            client.drop_cursor(drop)  # never resent: see drop_call
        click.echo(f"logd: cursor {drop!r} dropped", err=True)
        return
    with _Quiet(), _client(url, timeout) as client:
        found = client.cursors()
        head_id = client.head() if found else 0
    rows = {name: {"id": id, "lag": max(0, head_id - id)} for name, id in found.items()}
    if as_json:
        import json

        click.echo(json.dumps(rows))
        return
    click.echo(_table([("cursor", "id", "lag")] + [(n, str(r["id"]), str(r["lag"])) for n, r in rows.items()]))


def _table(rows: list[tuple[str, ...]], numbers_right: bool = True) -> str:
    """Rows as aligned columns, the first row a header; numbers right-aligned unless ``numbers_right`` is False."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if numbers_right and cell.isdigit() else cell.ljust(w)
                 for cell, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.command()
@client_options
def head(url: str, timeout: float) -> None:
    """Print the id of the last committed message (0: the log is empty)."""
    with _Quiet(), _client(url, timeout) as client:
        click.echo(client.head())


@click.command()
@click.option("--local", is_flag=True,
              help="Ping the server that `logd serve` would run here: its LOGD_* variables and LOGD_CONFIG "
                   "file give the port and TLS (its certificate is not checked; no token is sent), "
                   "127.0.0.1 for 0.0.0.0. For health checks, as the Docker image's.")
@client_options
def ping(url: str, timeout: float, local: bool) -> None:
    """Print PONG and exit 0 if the server answers, else say why and exit 1 (a health check)."""
    if local:
        if click.get_current_context().get_parameter_source("url") == ParameterSource.COMMANDLINE:
            raise click.UsageError("--url and --local: give one")
        _ping_local(timeout)
        return
    with _Quiet(), _client(url, timeout, attempts=1) as client:
        client.ping()
        click.echo("PONG")


def _ping_local(timeout: float) -> None:
    """`ping --local`: PING the server this machine's settings describe (`health.local_target`).
    Any failure exits 1, bad settings included: Docker reserves a health check's status 2."""
    from .client import NO_RETRY, Client
    from .config import ConfigError, environment, resolve
    from .health import local_target

    meta = click.get_current_context().meta
    try:
        target = local_target(resolve({}, environment()).config, meta.get("logd_tls_cert"), meta.get("logd_tls_key"))
    except ConfigError as exc:
        click.echo(f"logd: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    try:
        with Client(target.host, target.port, timeout=timeout, connect_timeout=timeout, retry=NO_RETRY,
                    token=None, ssl_context=target.ssl_context) as client:
            client.ping()
    except LogdError as exc:
        click.echo(f"logd: {exc}{target.hint}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo("PONG")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (numbers as numbers).")
@click.option("--table/--lines", "as_table", default=None,
              help="An aligned table, or one \"name value\" per line.  [default: a table on a terminal]")
@client_options
def stats(as_json: bool, as_table: bool | None, url: str, timeout: float) -> None:
    """Print the server's figures: a table on a terminal, "name value" lines in a pipe, or JSON."""
    with _Quiet(), _client(url, timeout) as client:
        figures = client.stats()
    if as_json:
        import json

        click.echo(json.dumps({k: int(v) if v.isdigit() else v for k, v in figures.items()}))
    elif as_table or (as_table is None and sys.stdout.isatty()):
        rows = [(name, _readable(name, v)) for name, v in figures.items()]
        click.echo(_table([("figure", "value"), *rows], numbers_right=False))
    else:
        for name, value in figures.items():
            click.echo(f"{name} {value}")


def _readable(name: str, value: str) -> str:
    """A figure for people: byte counts with a unit beside them (the exact number stays)."""
    if name.endswith("bytes") and value.isdigit() and int(value) >= 1024:
        units = ("KiB", "MiB", "GiB", "TiB")
        n, i = int(value) / 1024, 0
        while n >= 1024 and i < len(units) - 1:
            n, i = n / 1024, i + 1
        return f"{value} ({n:.1f} {units[i]})"
    return value
