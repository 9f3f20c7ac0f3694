"""Fixtures shared by every test: the real-server fixtures of tests/e2e (start_server, server).

Hypothesis runs with no per-example deadline and without its too-slow health
check, wherever it runs: its 200 ms default failed examples that a loaded
machine, the pure-Python twins or the sanitizer build merely made slow, and
its own "ci" profile (which drops the deadline) only loads where a CI variable
happens to be set. A hang is still bounded by pytest-timeout.
"""

from hypothesis import HealthCheck, settings

from tests.e2e.conftest import server, start_server  # noqa: F401 - re-exported fixtures

settings.register_profile("logd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("logd")
