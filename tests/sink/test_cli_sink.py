"""`logd sink` on the command line: clear messages and exit statuses, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from tests.sink.helpers import fill, run_sink


def test_an_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    done = run_sink(None, "ftp://host/x", "ev", "--once")
    assert done.returncode == 2
    assert "unknown target 'ftp://host/x'" in done.stderr and "Traceback" not in done.stderr


def test_a_table_name_that_is_not_an_identifier_is_a_usage_error(tmp_path: Path) -> None:
    done = run_sink(None, f"sqlite:///{tmp_path}/x.db", "ev; DROP TABLE x", "--once")
    assert done.returncode == 2
    assert "bad table name" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_logd_url_is_a_usage_error(tmp_path: Path) -> None:
    done = run_sink(None, f"sqlite:///{tmp_path}/x.db", "ev", "--once", "--url", "http://x:1/")
    assert done.returncode == 2
    assert "not a logd URL" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_table_exits_1_with_what_to_do(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    done = run_sink(server, f"sqlite:///{tmp_path}/x.db", "ev", "--once")
    assert done.returncode == 1
    assert "logd: no table ev" in done.stderr and "--create" in done.stderr and "Traceback" not in done.stderr


def test_once_writes_the_final_figures_to_the_json_status_file(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fill(server, [b"a", b"b", b"c"])
    status = tmp_path / "status.json"
    done = run_sink(server, f"sqlite:///{tmp_path}/x.db", "ev", "--create", "--once", "--json-status", str(status))
    assert done.returncode == 0, done.stderr
    figures = json.loads(status.read_text())
    assert (figures["state"], figures["delivered"], figures["last_id"], figures["lag"]) == ("stopped", 3, 3, 0)


def test_help_names_the_three_targets() -> None:
    done = run_sink(None, "--help", "x")
    assert done.returncode == 0
    for word in ("sqlite:///", "postgresql://", "clickhouse://", "--once", "--on-error"):
        assert word in done.stdout


def test_give_up_after_bounds_the_retries_when_logd_is_unreachable_and_exits_3(tmp_path: Path) -> None:
    # No server (port 9): without --give-up-after this would retry until run_sink's own timeout fails the test.
    done = run_sink(None, f"sqlite:///{tmp_path}/x.db", "ev", "--create", "--once", "--give-up-after", "1",
                    "--retry-max-s", "0.2")
    assert done.returncode == 3, done.stderr
    assert "logd: gave up after 1 s of retrying" in done.stderr
    assert "delivered up to 0; run again to resume" in done.stderr and "Traceback" not in done.stderr


def test_give_up_after_bounds_the_retries_when_the_database_is_unreachable(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fill(server, [b"a"])
    done = run_sink(server, "postgresql://postgres@127.0.0.1:9/nowhere", "ev", "--once", "--give-up-after", "1",
                    "--retry-max-s", "0.2")
    assert done.returncode == 3, done.stderr
    assert "logd: gave up after 1 s of retrying" in done.stderr and "Traceback" not in done.stderr
