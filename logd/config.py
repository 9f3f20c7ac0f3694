"""One typed settings object for the server, and where each value comes from.

`Config` holds everything `logd serve` can be told, and checks it; its
defaults come from `defaults`. `settings.SETTINGS` describes each setting
once (parser, help, whether SIGHUP reloads it); `resolve` applies the layers:
flags > ``LOGD_*`` environment > config file (TOML) > defaults, remembering
the source of every value for `logd config` (`describe`).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import defaults
from .protocol.commands import LONGEST_COMMAND as MIN_LINE_BYTES
from .protocol.commands import valid_address
from .settings import ENV_PREFIX, SETTINGS
from .storage.policy import FsyncPolicy
from .url import split_url

CONFIG_ENV = "LOGD_CONFIG"  # the config file, when --config is not given


class ConfigError(ValueError):
    """A setting that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class Config:
    """Everything `logd serve` can be told. Sizes in bytes, times in seconds unless named _ms."""

    host: str = defaults.HOST
    port: int = defaults.PORT
    data_dir: str = defaults.DATA_DIR
    fsync: FsyncPolicy = FsyncPolicy(defaults.FSYNC)
    segment_bytes: int = defaults.SEGMENT_BYTES
    retention_bytes: int | None = None
    retention_ms: int | None = None
    retention_keep_cursors: bool = False
    retention_cap_bytes: int | None = None  # None: no cap on what cursors keep
    preallocate: bool | None = None  # zeros written ahead of the data; None: on with fsync=always
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    max_line_bytes: int = defaults.MAX_LINE_BYTES
    max_batch: int = defaults.MAX_BATCH
    max_batch_bytes: int = defaults.MAX_BATCH_BYTES  # total body bytes of one MSG
    max_connections: int = defaults.MAX_CONNECTIONS
    max_cursors: int = defaults.MAX_CURSORS  # a COMMIT that would make one more is refused (TOO_LARGE)
    # Memory budgets (protocol.md 3.6; Redis's client-output-buffer-limit and
    # Kafka's queued.max.request.bytes): over one, the server stops reading.
    # Per connection, commands received and not yet answered (waiting their
    # turn, or MSG bodies not yet acknowledged), and unsent output:
    conn_input_bytes: int = defaults.CONN_INPUT_BYTES
    conn_output_bytes: int = defaults.CONN_OUTPUT_BYTES
    # All connections together: partial MSGs, commands waiting, unsent output.
    server_input_bytes: int = defaults.SERVER_INPUT_BYTES
    server_output_bytes: int = defaults.SERVER_OUTPUT_BYTES
    tail_stall_timeout: float = defaults.TAIL_STALL_TIMEOUT  # a stream whose output does not drain this long
    idle_timeout: float | None = None  # seconds; None = never time out
    auth_timeout: float = defaults.AUTH_TIMEOUT  # with auth_file: AUTH within this or be closed
    allow_shutdown: bool = False
    shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT  # seconds to let connections finish on stop
    log_format: str = defaults.LOG_FORMAT  # or "json"
    log_level: str = defaults.LOG_LEVEL
    replica_of: str | None = field(default=None, repr=False)  # may carry a token
    # None: not configured here; then what a leader or a promotion left in the data dir (CLUSTER), else
    # defaults.MIN_REPLICAS (replication/durability.py).
    min_replicas: int | None = None
    replica_timeout: float = defaults.REPLICA_TIMEOUT
    metrics_port: int | None = None  # None: no metrics endpoint
    metrics_host: str = defaults.METRICS_HOST
    metrics_max_connections: int = defaults.METRICS_MAX_CONNECTIONS  # requests served at once
    metrics_timeout: float = defaults.METRICS_TIMEOUT  # seconds for a whole request, in and out
    metrics_public: bool = False  # allow a non-loopback --metrics-host (the endpoint has no authentication)
    replica_token: str | None = field(default=None, repr=False)  # never shown
    replica_token_file: str | None = None  # read into replica_token by `resolve`
    auth_file: str | None = None  # tokens and roles; None: no authentication
    insecure: bool = False  # allow a non-loopback --host without --auth-file
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # with it, clients must present a certificate it signed
    tls_handshake_timeout: float = defaults.TLS_HANDSHAKE_TIMEOUT
    max_tls_handshakes: int = defaults.MAX_TLS_HANDSHAKES  # in progress at once
    advertise: str | None = None  # HOST:PORT others reach this server at; a follower's name to its leader

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics-port must be 0..65535, not {self.metrics_port}")
        positive = ("segment_bytes", "max_message_bytes", "max_line_bytes", "max_batch", "max_batch_bytes",
                    "max_connections", "conn_input_bytes", "conn_output_bytes", "server_input_bytes",
                    "server_output_bytes", "metrics_max_connections", "max_tls_handshakes", "retention_bytes",
                    "retention_ms", "retention_cap_bytes")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, not {value}")
        # Seconds: NaN compares false with everything, so it would pass a plain `<= 0` and then
        # never expire (or always); infinity would never expire either: a number or unset.
        for name in ("tail_stall_timeout", "idle_timeout", "replica_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a number of seconds, not {value}")
        if self.max_line_bytes < MIN_LINE_BYTES:
            raise ValueError(f"max-line-bytes must be at least {MIN_LINE_BYTES}, the longest command the server must "
                             f"take (COMMIT with a 64-character name and a 19-digit id), not {self.max_line_bytes}")
        if self.log_format not in ("console", "json"):
            raise ValueError("log-format must be console or json")
        if self.server_input_bytes < self.max_batch_bytes:
            raise ValueError("server-input-bytes must be at least max-batch-bytes (one MSG must fit)")
        if self.tail_stall_timeout <= 0:
            raise ValueError("tail-stall-timeout must be positive")
        for name in ("auth_timeout", "tls_handshake_timeout", "metrics_timeout"):
            if not 0 < getattr(self, name) < float("inf"):  # NaN fails too
                raise ValueError(f"{name.replace('_', '-')} must be a positive number of seconds")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError("log-level must be debug, info, warning or error")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise ValueError("min-replicas must be 0 or more")
        if self.advertise is not None and not valid_address(self.advertise):
            raise ValueError(f"advertise must be HOST:PORT (a name, an IPv4 address or [IPv6], port 1-65535), "
                             f"not {self.advertise!r}")
        if self.advertise is not None and _wildcard(self.advertise):
            raise ValueError(f"advertise must be an address others can reach, not the wildcard {self.advertise!r}")
        if self.max_cursors < 0:
            raise ValueError("max-cursors must be 0 or more")
        if self.replica_timeout <= 0:
            raise ValueError("replica-timeout must be positive")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown-timeout must be 0 or more")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls-cert and tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls-ca needs tls-cert and tls-key")
        if self.replica_of is not None:
            try:
                split_url(self.replica_of)
            except ValueError as exc:
                raise ValueError(f"replica-of: {exc}") from None

    # --replica-of is HOST:PORT, logd://[:TOKEN@]HOST:PORT or logds://... (TLS).

    @property
    def replica_address(self) -> str | None:
        """The leader as HOST:PORT (no token: this is what logs and STATS show)."""
        if self.replica_of is None:
            return None
        host, port, _tls, _token = split_url(self.replica_of)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def replica_tls(self) -> bool:
        return self.replica_of is not None and split_url(self.replica_of)[2]

    @property
    def replica_secret(self) -> str | None:
        """The follower's token: from the --replica-of URL, else --replica-token (LOGD_REPLICA_TOKEN)."""
        if self.replica_of is None:
            return None
        return split_url(self.replica_of)[3] or self.replica_token


def _wildcard(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("0.0.0.0", "::") or host.strip("0:.") == ""


DEFAULTS = Config()


@dataclass(frozen=True)
class Resolved:
    """The effective configuration and, per setting, where its value came from."""

    config: Config
    sources: dict[str, str]  # name -> "default", "flag --x", "env LOGD_X" or "file PATH"
    config_file: str | None


def load_file(path: str) -> dict[str, Any]:
    """The settings of a TOML config file, parsed; keys may use dashes or underscores."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a TOML file is UTF-8") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        setting = SETTINGS.get(name)
        if setting is None:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        try:
            values[name] = setting.from_toml(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    return values


def resolve(flags: Mapping[str, Any], env: Mapping[str, str], config_file: str | None = None) -> Resolved:
    """Apply the layers: ``flags`` (already parsed; None = not given) > ``LOGD_*`` in ``env`` > file > defaults.

    ``config_file`` None: the file named by ``LOGD_CONFIG`` in ``env``, if any.
    """
    if config_file is None:
        config_file = env.get(CONFIG_ENV) or None
    from_file = load_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, setting in SETTINGS.items():
        if flags.get(name) is not None:
            values[name], sources[name] = flags[name], f"flag --{setting.flag}"
        elif env.get(setting.env, "") != "":
            try:
                values[name] = setting.from_text(env[setting.env])
            except ValueError as exc:
                raise ConfigError(f"{setting.env}: {exc}") from None
            sources[name] = f"env {setting.env}"
        elif name in from_file:
            values[name], sources[name] = from_file[name], f"file {config_file}"
        else:
            sources[name] = "default"
    if values.get("replica_token_file") is not None:
        if values.get("replica_token") is not None:
            raise ConfigError(f"replica-token ({sources['replica_token']}) and replica-token-file "
                              f"({sources['replica_token_file']}): give one of them")
        values["replica_token"] = read_token_file(values["replica_token_file"])
        sources["replica_token"] = f"replica-token-file {values['replica_token_file']}"
    try:
        config = replace(DEFAULTS, **values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Resolved(config, sources, config_file)


def read_token_file(path: str) -> str:
    """The token in the first line of ``path`` (a file keeps it out of ``ps``, unlike a flag)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read replica-token-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"replica-token-file {path}: not text") from None
    if not token:
        raise ConfigError(f"replica-token-file {path} is empty")
    return token


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def describe(resolved: Resolved) -> str:
    """`logd config`'s output: the effective settings as TOML, each with its source as a comment.

    Unset settings are shown commented out, so the output is itself a valid config file.
    """
    lines = ["# logd: effective configuration (flags > LOGD_* environment > config file > defaults)"]
    if resolved.config_file:
        lines.append(f"# config file: {resolved.config_file}")
    rows = []
    for f in fields(Config):
        setting = SETTINGS[f.name]
        value = getattr(resolved.config, f.name)
        if value is not None and setting.secret:
            value = "***"
        elif value is not None and setting.show is not None:
            value = setting.show(value)
        text = f"# {setting.flag} (not set)" if value is None else f"{setting.flag} = {_toml_value(value)}"
        rows.append((text, resolved.sources[f.name]))
    width = max(len(text) for text, _ in rows)
    lines += [f"{text:<{width}}  # {source}" for text, source in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, str]:
    """The ``LOGD_*`` variables of this process (the only part of the environment config reads)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
