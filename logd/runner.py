"""Running a server: `serve` until a signal or SHUTDOWN, `run` for the CLI (uvloop).

Signals: SIGTERM/SIGINT stop gracefully (a second one, or a watchdog past the
shutdown deadlines, forces the exit); SIGHUP rereads the config and the auth file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable

import structlog

from . import systemd
from .config import Config
from .server import EXIT_FAIL_STOPPED, LogServer

log = structlog.get_logger("logd.server")

STOP_GRACE_S = 5.0  # beyond shutdown_timeout, for the final commit and sync, before a signal forces the exit


async def serve(
    config: Config,
    ready: Callable[[str, int], None] | None = None,
    reload: Callable[[], Config] | None = None,
    metrics_ready: Callable[[str, int], None] | None = None,
) -> int:
    """Run a server until it is asked to stop (signal or SHUTDOWN); return the exit status.

    ``ready`` and ``metrics_ready`` are told where the server and its metrics
    endpoint listen. ``reload`` (SIGHUP) returns the configuration read
    afresh; its reloadable parts (the log level) are applied.
    """
    server = LogServer(config)
    host, port = await server.start()
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal(sig: signal.Signals) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("forced_exit", signal=sig.name)
            os._exit(1)
        server.request_stop(sig.name)
        # Whatever state the server is in (a stuck task, a hung disk), a
        # signal stops the process: a thread that needs no event loop.
        grace = 2 * config.shutdown_timeout + STOP_GRACE_S  # shutdown() allows up to twice the timeout
        watchdog = threading.Timer(grace, _force_exit, args=(sig.name, grace))
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    def on_hangup() -> None:
        # SIGHUP: the config file's reloadable settings, and the auth file.
        if reload is not None:
            server.reload(reload)
        server.reload_auth()

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (NotImplementedError, RuntimeError):
        pass
    if ready is not None:
        ready(host, port)
    if metrics_ready is not None and server.metrics is not None:
        metrics_ready(*server.metrics.address)
    systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}\nMAINPID={os.getpid()}")
    await server.wait_stopped()
    return server.exit_code


def _force_exit(signal_name: str, after_s: float) -> None:
    log.error("forced_exit", signal=signal_name, reason="graceful stop did not finish", after_s=after_s)
    os._exit(EXIT_FAIL_STOPPED)


def run(
    config: Config,
    ready: Callable[[str, int], None] | None = None,
    reload: Callable[[], Config] | None = None,
    metrics_ready: Callable[[str, int], None] | None = None,
) -> int:
    """Blocking entry point for the CLI: uvloop, then `serve`; returns the exit status."""
    import uvloop

    return uvloop.run(serve(config, ready, reload, metrics_ready))
