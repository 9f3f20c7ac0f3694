"""Benchmark of logd against Redis Streams: ``python -m bench`` (see README.md)."""
