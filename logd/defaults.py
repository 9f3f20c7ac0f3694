"""Every default value of logd, in one place.

The server's settings (`config.Config`), the CLI's flags and `logd config`,
the wire parser (`protocol.CommandParser`) and the clients (`client.Client`,
`protocol.ClientProtocol`) all read their defaults from here, so a default
is changed once. Pure constants: this module imports nothing, so the
sans-IO protocol package can use it too. Sizes in bytes, times in seconds.
"""

from __future__ import annotations

PORT = 1774  # protocol.md section 3: the server's port, and where clients look
HOST = "127.0.0.1"
DATA_DIR = "./logd-data"
FSYNC = "always"
SEGMENT_BYTES = 128 * 1024 * 1024

MAX_MESSAGE_BYTES = 1 << 20
MAX_LINE_BYTES = 64 * 1024  # a command line (server) or reply line (client), terminator included
MAX_BATCH = 10_000  # messages in one MSG
MAX_BATCH_BYTES = 64 << 20  # body bytes in one MSG
MAX_CONNECTIONS = 10_000
MAX_CURSORS = 10_000  # named cursors a COMMIT may make (protocol.md 3.1)
# Memory budgets (protocol.md 3.6): per connection, commands received and not
# yet answered, and unsent output; and for all connections together.
CONN_INPUT_BYTES = 64 << 20
CONN_OUTPUT_BYTES = 2 << 20
SERVER_INPUT_BYTES = 512 << 20
SERVER_OUTPUT_BYTES = 256 << 20
TAIL_STALL_TIMEOUT = 60.0  # a stream whose output does not drain this long is dropped
# Nothing unauthenticated or slow holds the server (protocol.md 3.6, 3.7): with --auth-file a
# connection must AUTH within this; a TLS handshake must finish within this, and only so many
# run at once; the metrics endpoint serves so many requests at once, each within a deadline.
AUTH_TIMEOUT = 5.0
TLS_HANDSHAKE_TIMEOUT = 5.0
MAX_TLS_HANDSHAKES = 128
METRICS_MAX_CONNECTIONS = 8
METRICS_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 10.0

LOG_FORMAT = "console"
LOG_LEVEL = "info"

REPLICA_TIMEOUT = 5.0
MIN_REPLICAS = 0

METRICS_HOST = "127.0.0.1"  # loopback: /metrics is not for the open network

CLIENT_TIMEOUT = 10.0  # seconds a client call waits by default
CLIENT_CONNECT_TIMEOUT = 5.0
MAX_RECORD_BYTES = 1 << 30  # a record header claiming more is taken as corrupt by a client
