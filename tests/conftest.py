"""Fixtures shared by every test: the real-server fixtures of tests/e2e (start_server, server)."""

from tests.e2e.conftest import server, start_server  # noqa: F401 - re-exported fixtures
