"""logd: a networked, sequenced log server and its client library."""

__version__ = "0.1.0"
