"""The logd wire protocol, sans-IO (protocol.md, sections 1 and 3).

Nothing here touches a socket or an event loop. The server feeds received
bytes to a `CommandParser` and gets `Command` objects back, then encodes its
answers with `ok`, `error_reply`, `stats_reply`, `PONG` and `EOF`. The client
encodes commands through a `ClientProtocol`, which remembers what reply each
outstanding command will get, and feeds it the bytes it receives. Both parsers
accept any split of the stream into chunks and keep partial input between
calls, so the tests can cut a stream at every byte.

Cost model: per-command Python work is what counts (a pipelined client sends
hundreds of thousands of commands a second). Each parser handles one bytes
object per call, finds line ends with ``bytes.find`` from a moving position,
slices bodies straight out of it, and keeps only the unconsumed tail; while
waiting for a body it does no work at all until enough bytes have arrived.
"""

from .client import (
    ClientProtocol,
    ReadRows,
)
from .commands import (
    CURSORS_MAX,
    DEFAULT_PORT,
    Accept,
    Ack,
    Auth,
    Close,
    Command,
    Commit,
    Cursor,
    Cursors,
    Drop,
    Head,
    Msg,
    Ping,
    Read,
    Refuse,
    Replicate,
    Shutdown,
    Stats,
    encode_command,
    encode_msg,
)
from .parser import (
    CommandParser,
)
from .replies import (
    EOF,
    PONG,
    EndOfStream,
    ErrorReply,
    OkReply,
    PongReply,
    Record,
    RecordRow,
    Reply,
    StatsReply,
    error_reply,
    ok,
    ok_id,
    stats_reply,
)

__all__ = [
    "CURSORS_MAX",
    "DEFAULT_PORT",
    "EOF",
    "PONG",
    "Accept",
    "Ack",
    "Auth",
    "ClientProtocol",
    "Close",
    "Command",
    "CommandParser",
    "Commit",
    "Cursor",
    "Cursors",
    "Drop",
    "EndOfStream",
    "ErrorReply",
    "Head",
    "Msg",
    "OkReply",
    "Ping",
    "PongReply",
    "Read",
    "ReadRows",
    "Record",
    "RecordRow",
    "Refuse",
    "Replicate",
    "Reply",
    "Shutdown",
    "Stats",
    "StatsReply",
    "encode_command",
    "encode_msg",
    "error_reply",
    "ok",
    "ok_id",
    "stats_reply",
]
