"""The logd client library: sync and asyncio clients, producers, consumers (model: redis-py).

Every command is written once (`commands.Call`: what to send, whether it may
be sent again, how its replies become a value); `Client` runs calls over one
blocking socket (`sync`), `AsyncClient` over one asyncio transport (`aio`).
Both parse replies with `protocol.ClientProtocol`, the one parser of the
wire, which also checks each record's id and CRC (`CorruptRecordError`).

Failures and retries:

- A call's ``timeout`` (seconds) is one deadline for the whole call:
  connecting, retries and the reply. ``None`` uses the client's default.
- Connection failures are retried with jittered exponential backoff
  (tenacity; the policy is a `Retry`) for the idempotent commands (HEAD,
  PING, STATS, READ). A MSG is retried only if it failed before any of its
  bytes was written: a MSG that may have reached the server is never sent
  twice, since that could append its messages twice.
- ``ERR BUSY`` and ``ERR TIMEOUT`` mean the server closed the connection
  without acting on the command, so they are retried like a lost connection.
- A failure or cancellation while a reply is outstanding drops the
  connection: the next call starts on a fresh one, so replies can never get
  out of step. A connection the server closed while it was idle (idle
  timeout, restart) is noticed before the next command and replaced.
- Tails reconnect on their own and resume at the last id received + 1.
- Every ``ERR`` reply is raised as the class `errors.error_from_reply` maps
  its code to (`ReadOnlyError`, `NotFoundError`, `TooLargeError`, ...).
"""

from ..protocol import RecordRow
from .aio import AsyncClient, AsyncTail
from .aio_producer import AsyncProducer
from .commands import DEFAULT_URL, NO_RETRY, Record, Retry, parse_url
from .consumer import CallbackCheckpoint, Checkpoint, Consumer, FileCheckpoint, ServerCursor
from .pending import PendingId
from .producer import Producer
from .sync import Client, Tail, connect

__all__ = [
    "DEFAULT_URL",
    "NO_RETRY",
    "AsyncClient",
    "AsyncProducer",
    "AsyncTail",
    "CallbackCheckpoint",
    "Checkpoint",
    "Client",
    "Consumer",
    "FileCheckpoint",
    "PendingId",
    "Producer",
    "Record",
    "RecordRow",
    "Retry",
    "ServerCursor",
    "Tail",
    "connect",
    "parse_url",
]
