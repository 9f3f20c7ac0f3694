"""logd.sink.source against a real `logd serve`: --once stops at the head seen at start; linger closes a batch."""

from __future__ import annotations

from logd.client import Retry
from logd.sink.source import LogSource
from tests.e2e.conftest import wait_for
from tests.e2e.helpers import url_of
from tests.sink.helpers import fill


def _never() -> bool:
    return False


def test_once_reads_up_to_the_head_seen_at_start_in_batches(server) -> None:  # type: ignore[no-untyped-def]
    fill(server, [b"%d" % i for i in range(25)])
    source = LogSource(url_of(server), 0, follow=False, timeout=5, retry=Retry())
    source.begin()
    fill(server, [b"later"])  # after the start: not part of this run
    sizes = []
    while not source.done:
        sizes.append(len(source.batch(10, 0.0, _never)))
    assert sizes == [10, 10, 5]
    assert source.next_id == 26
    source.close()


def test_following_closes_a_batch_after_linger_or_when_full(server) -> None:  # type: ignore[no-untyped-def]
    fill(server, [b"a", b"b", b"c"])
    # A timeout far longer than the linger: only the linger can close the second batch.
    source = LogSource(url_of(server), 2, follow=True, timeout=600, retry=Retry())
    source.begin()
    assert _first_batch(source, 2, 10.0) == [b"b", b"c"]  # full: no waiting for linger
    fill(server, [b"d"])
    assert _first_batch(source, 100, 0.05) == [b"d"]  # lingered 50 ms for more, then closed
    source.close()


def _first_batch(source: LogSource, size: int, linger: float) -> list[bytes]:
    """The bodies of the first batch that is not empty.

    `LogSource.batch` gives up after `POLL_S` with nothing (so the sink can look at its
    stop flag); a slow connect or a slow append can take longer than that, so empty
    batches are skipped. The first batch with records is the one the test is about.
    """
    return [body for _, body in wait_for(lambda: source.batch(size, linger, _never), 30, "a batch")]


def test_a_stop_request_ends_the_wait_for_new_records(server) -> None:  # type: ignore[no-untyped-def]
    source = LogSource(url_of(server), 0, follow=True, timeout=5, retry=Retry())
    source.begin()
    assert source.batch(100, 1.0, lambda: True) == []
    source.close()
