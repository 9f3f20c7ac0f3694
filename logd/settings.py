"""Every server setting described once: its parser from text, help, flag, ``LOGD_*`` name and TOML types.

The CLI builds its flags from `SETTINGS`; `config.resolve` parses the
environment and the config file with the same parsers, so a value means the
same whichever layer it comes from. The typed object they fill is
`config.Config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .storage.policy import FsyncPolicy
from .url import hide_token

ENV_PREFIX = "LOGD_"


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ValueError with a readable message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def parse_size(value: str | int) -> int:
    """A byte size: 1048576, 64KiB, 128MiB, 1GiB (also K/M/G/KB/MB/GB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 1000, "mb": 10**6, "gb": 10**9, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * mult
    if text.isdigit():
        return int(text)
    raise ValueError(f"not a size: {value!r} (try 1048576, 64KiB, 128MiB)")


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (an environment variable's way of saying a flag)."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


@dataclass(frozen=True)
class Setting:
    """One setting: its parser from text (flags, env), help, and the TOML types it takes."""

    name: str  # the Config field; the flag is --name-with-dashes, the env LOGD_NAME
    parse: Callable[[str], Any]
    help: str
    toml_types: tuple[type, ...] = (str,)
    choices: tuple[str, ...] = ()
    reloadable: bool = False  # SIGHUP applies it to a running server
    flag_only: bool = False  # a boolean flag (--x/--no-x)
    secret: bool = False  # never shown (`logd config` prints ***)
    show: Callable[[Any], str] | None = None  # how `logd config` shows a value (None: as it is)

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def from_text(self, text: str) -> Any:
        value = self.parse(text)
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, not {text!r}")
        return value

    def from_toml(self, value: Any) -> Any:
        """A value read from the config file: a string is parsed as a flag would be."""
        if isinstance(value, str):
            return self.from_text(value)
        ok = isinstance(value, self.toml_types) and isinstance(value, bool) == (bool in self.toml_types)
        if not ok:
            raise ValueError(f"expected {' or '.join(t.__name__ for t in self.toml_types)}, not {value!r}")
        return float(value) if float in self.toml_types else value


def _word(text: str) -> str:
    return text.strip().lower()


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("host", str, "Address or name to listen on; a name is bound on each of its addresses "
            "(localhost: 127.0.0.1 and ::1). 0.0.0.0 for every interface."),
    Setting("port", _int, "TCP port; 0 picks a free one and prints it.", (int,)),
    Setting("data_dir", str, "Directory holding the segments."),
    Setting("fsync", FsyncPolicy.parse, "Durability: always (group commit), interval:<ms>, or never."),
    Setting("segment_bytes", parse_size, "Roll segments at this size.", (int, str)),
    Setting("retention_bytes", parse_size, "Delete oldest segments above this total size.", (int, str)),
    Setting("retention_ms", _int, "Delete segments whose newest write is older than this.", (int,)),
    Setting("retention_keep_cursors", parse_bool,
            "Retention keeps the segments a named cursor still needs (up to --retention-cap-bytes).",
            (bool,), flag_only=True),
    Setting("retention_cap_bytes", parse_size,
            "With --retention-keep-cursors: above this total size segments go even if a cursor needs them.",
            (int, str)),
    Setting("preallocate", parse_bool,
            "Keep zeros written ahead of the data, so an fdatasync need not change the file's size "
            "(default: on with fsync=always).", (bool,), flag_only=True),
    Setting("max_message_bytes", parse_size, "Largest message body.", (int, str)),
    Setting("max_line_bytes", parse_size, "Longest command line.", (int, str)),
    Setting("max_batch", _int, "Most messages in one MSG.", (int,)),
    Setting("max_batch_bytes", parse_size, "Most body bytes in one MSG.", (int, str)),
    Setting("max_connections", _int, "Connections beyond this get ERR BUSY.", (int,)),
    Setting("max_cursors", _int, "Named cursors: a COMMIT that would make one more gets ERR TOO_LARGE "
            "(0: COMMIT makes none).", (int,)),
    Setting("conn_input_bytes", parse_size,
            "Per connection: bytes of commands received and not yet answered before it is not read.", (int, str)),
    Setting("conn_output_bytes", parse_size,
            "Per connection: unsent reply and stream bytes before it is not read (a stream waits).", (int, str)),
    Setting("server_input_bytes", parse_size,
            "All connections: partial MSGs and commands waiting their turn before reading stops.", (int, str)),
    Setting("server_output_bytes", parse_size,
            "All connections: unsent output before streams wait and reading stops.", (int, str)),
    Setting("tail_stall_timeout", _float,
            "Drop a READ/REPLICATE stream (ERR BUSY) whose output has not drained for this many seconds.",
            (float, int)),
    Setting("idle_timeout", _float, "Close connections idle this many seconds (not tails).", (float, int)),
    Setting("auth_timeout", _float, "With --auth-file: close a connection not authenticated after this many "
            "seconds (ERR TIMEOUT).", (float, int)),
    Setting("allow_shutdown", parse_bool, "Let clients stop the server with SHUTDOWN.", (bool,), flag_only=True),
    Setting("shutdown_timeout", _float, "Seconds to let connections finish on a graceful stop.", (float, int)),
    Setting("log_format", _word, "Log output format.", choices=("console", "json")),
    Setting("log_level", _word, "Log level (SIGHUP rereads it from the config file).",
            choices=("debug", "info", "warning", "error"), reloadable=True),
    Setting("replica_of", str, "Run as a follower of this leader: HOST:PORT, logd://[:TOKEN@]HOST:PORT or "
            "logds://... for TLS (read-only until promoted).", show=hide_token),
    Setting("min_replicas", _int, "Acknowledge a MSG only once this many replicas have committed it. Not set: "
            "what this server's leader runs with (a follower keeps it for when it is promoted), else 0.", (int,)),
    Setting("replica_timeout", _float,
            "Seconds a MSG waits for --min-replicas acks; a replica further behind is out of sync.", (float, int)),
    Setting("metrics_port", _int, "Serve Prometheus metrics on this port (0: any free one; unset: off).", (int,)),
    Setting("metrics_host", str, "Address the metrics endpoint listens on (off loopback: see --metrics-public)."),
    Setting("metrics_public", parse_bool, "Allow a non-loopback --metrics-host: the endpoint has no "
            "authentication, whatever --auth-file says.", (bool,), flag_only=True),
    Setting("metrics_max_connections", _int, "Metrics requests served at once; more are answered 503.", (int,)),
    Setting("metrics_timeout", _float, "Seconds a metrics request may take, headers in and page out.",
            (float, int)),
    Setting("replica_token", str, "The follower's token for its leader. As a flag it is visible to other users "
            "(ps): prefer --replica-token-file or the environment.", secret=True),
    Setting("replica_token_file", str, "A file holding the follower's token for its leader (first line)."),
    Setting("auth_file", str, "Tokens and roles (see `logd token`); turns authentication on. SIGHUP rereads it."),
    Setting("insecure", parse_bool, "Allow a non-loopback --host without --auth-file.", (bool,), flag_only=True),
    Setting("tls_cert", str, "TLS certificate (chain), PEM: the server speaks TLS on its port."),
    Setting("tls_key", str, "TLS private key, PEM."),
    Setting("tls_ca", str, "Require client certificates signed by this CA (also verifies a logds:// leader)."),
    Setting("tls_handshake_timeout", _float, "Seconds a TLS handshake may take before the connection is closed.",
            (float, int)),
    Setting("max_tls_handshakes", _int, "TLS handshakes in progress at once (each counts as a connection); "
            "connections beyond are closed at once.", (int,)),
    Setting("advertise", str, "HOST:PORT others reach this server at. A follower names itself so to its leader "
            "(STATS, metrics); not set: its --host and port, or if that is a wildcard or loopback, the address "
            "it connects to the leader from, with its port."),
)}
