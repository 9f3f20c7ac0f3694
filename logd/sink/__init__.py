"""`logd sink`: exactly-once delivery from the log into SQLite, PostgreSQL or ClickHouse.

::

    from logd.sink import Sink, SinkConfig

    sink = Sink(SinkConfig("sqlite:///events.db", "events", url="logd://127.0.0.1:1774", create=True, once=True))
    sink.run()                      # -> Progress(delivered=..., last_id=..., ...)

Exactly once: SQLite and PostgreSQL commit each batch with the sink's
position (``logd_sink_checkpoints``) in one transaction; ClickHouse inserts
each batch atomically and in id order, and resumes after the largest id in
the table (or its dead letters). Pass ``mapper=`` to fill the columns from a
record your own way. Modules: `pipeline` (the loop, retries, stop),
`source` (reading the log), `deliver` (one batch, bad rows to dead letters),
`rows` (mappings), `target` and one module per database, `status`.
"""

from .deliver import Delivery, deliver
from .errors import BadRowsError, DatabaseUnavailableError, GaveUpError, PoisonMessageError, SchemaError, SinkError
from .pipeline import Sink, SinkConfig
from .rows import DeadLetter, Mapper, Row, json_mapper, raw_mapper
from .status import Progress, StatusReporter
from .target import Target, TargetSpec, open_target

__all__ = [
    "BadRowsError",
    "DatabaseUnavailableError",
    "DeadLetter",
    "Delivery",
    "GaveUpError",
    "Mapper",
    "PoisonMessageError",
    "Progress",
    "Row",
    "SchemaError",
    "Sink",
    "SinkConfig",
    "SinkError",
    "StatusReporter",
    "Target",
    "TargetSpec",
    "deliver",
    "json_mapper",
    "open_target",
    "raw_mapper",
]
