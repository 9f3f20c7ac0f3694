"""The follower: stream the leader's records, append them byte for byte, ACK; reconnect with backoff."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from ..errors import CorruptRecordError, LogdError, NotFoundError, ProtocolError, UnavailableError
from ..protocol.commands import Ack, encode_command
from ..protocol.replica import (
    Chunk,
    CursorCommit,
    CursorDrop,
    EpochStart,
    Event,
    LeaderPosition,
    ReplicaStreamParser,
    SegmentStart,
    StreamEnd,
    StreamError,
    StreamOk,
)
from ..settings import parse_address
from ..storage import watermark
from ..storage.truncate import dropped_name
from ..tls import client_context
from .naming import replica_address

if TYPE_CHECKING:
    from ..server import LogServer

log = structlog.get_logger("logd.replication")

EXIT_REPLICATION_FAILED = 4  # a follower that must not go on (DIVERGED, NOT_FOUND, misaligned segments)
LINK_HIGH_WATER = 16 * 1024 * 1024  # bytes received but not yet applied before we stop reading
FLOOR_SAVE_S = 0.2  # how often a grown acknowledged floor is saved (HIGH_WATERMARK)


class LinkLost(LogdError):
    """The connection to the leader failed or ended; reconnect with backoff."""


class ReplicationFailed(LogdError):
    """Following must stop: going on would mix two histories or skip records."""


def _address(sockname: object) -> str | None:
    """``host:port`` of a socket address, as a connection names its peer."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{sockname[0]}:{sockname[1]}"
    return None


def _feed_all(parser: ReplicaStreamParser, chunks: list[bytes]) -> list[Event]:
    """The events of received chunks, up to the end of the stream (nothing after that counts)."""
    events: list[Event] = []
    for data in chunks:
        events += parser.feed(data)
        if events and type(events[-1]) in (StreamEnd, StreamError):
            break
    return events


class _Link(asyncio.Protocol):
    """The follower's connection to its leader: buffers received bytes for the loop to take."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.lost = False
        self.paused = False
        self.event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self.event.set()
        if self.size > LINK_HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.event.set()

    async def take(self) -> list[bytes]:
        """The chunks received so far (waits for some); [] once the connection is gone.

        Not joined: the stream parser takes them one by one, so each byte is
        copied once on its way from the socket to the segment file.
        """
        while not self.chunks:
            if self.lost:
                return []
            self.event.clear()
            await self.event.wait()
        data = self.chunks
        self.chunks = []
        self.size = 0
        if self.paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()
            self.paused = False
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Follower:
    """Follows a leader: REPLICATE, append what arrives, ACK; reconnect with jittered backoff."""

    def __init__(self, server: LogServer, leader: str, listening: tuple[str, int] = ("", 0)) -> None:
        self.server = server
        self.leader = leader
        self.listening = listening  # where this server listens: its name in REPLICATE (naming.py)
        self.host, self.port = parse_address(leader)
        self.state = "connecting"
        self.leader_head = server.log.head  # the leader's commit point, as last told
        # What readers here may see: the leader's high watermark, as last told.
        # Until the first +HEAD, what this server already held.
        self.leader_visible = server.log.head
        self.behind_since: float | None = time.monotonic()
        # The highest id known to be acknowledged to clients under --min-replicas:
        # what this server saved as a leader, or its leader's high watermark when
        # that leader runs with --min-replicas. Cutting the log below it would
        # lose an acknowledged message, so that stops the follower instead.
        self.acked_floor = min(watermark.load(server.log.directory), server.log.head)
        self.leader_min_replicas = 0
        self.dropped = 0  # records moved aside by truncations in this process
        self.sessions = 0
        # Why the last attempt to follow failed ("-" once streaming): an ERR from
        # the leader (e.g. UNAVAILABLE over a corrupt record) shows in STATS.
        self.last_error = "-"
        self._task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self.link_address: str | None = None  # "host:port" of our end of the link to the leader
        self._committer: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._uncommitted = [0, 0]  # messages and bytes written, not yet in a commit round
        self._cancelled = False
        cfg = server.config
        # --replica-of logds://...: verify the leader with --tls-ca (else the system's trust
        # store) and show our own --tls-cert if the leader asks for a client certificate.
        self.tls = client_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if cfg.replica_tls else None
        self.token = cfg.replica_secret

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="logd-follower")
        self._saver = loop.create_task(self._save_floor(), name="logd-follower-floor")

    def cancel(self) -> None:
        """Stop following now (promotion): the loop applies nothing after this call."""
        self._cancelled = True
        if self._link is not None:
            self._link.close()
        if self._task is not None:
            self._task.cancel()
        if self._saver is not None:
            self._saver.cancel()
        self.state = "stopped"

    async def stop(self) -> None:
        """Stop following and wait for the loop to finish (shutdown)."""
        task = self._task
        self.cancel()
        if task is not None and not task.done():
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        try:
            while True:
                retrying = AsyncRetrying(
                    wait=wait_random_exponential(multiplier=0.05, max=2.0),
                    retry=retry_if_exception_type(LinkLost),
                    before_sleep=self._before_retry,
                    reraise=True,
                )
                # A session that got going and then lost the leader reconnects at
                # once (backoff starts afresh); failing to get going backs off.
                async for attempt in retrying:
                    with attempt:
                        await self._session()
        except (ReplicationFailed, LogdError, OSError, ValueError) as exc:
            log.error("replication_failed", leader=self.leader, error=str(exc), head=self.server.log.head)
            self.state = "failed"
            self.server.fail(EXIT_REPLICATION_FAILED, "replication_failed")

    async def _save_floor(self) -> None:
        """Keep ``acked_floor`` in ``HIGH_WATERMARK`` (as a leader keeps its high watermark), so a
        restarted follower still refuses to cut acknowledged records."""
        saved = self.acked_floor
        while True:
            await asyncio.sleep(FLOOR_SAVE_S)
            if self.acked_floor > saved:
                try:
                    watermark.save(self.server.log.directory, self.acked_floor)
                    saved = self.acked_floor
                except OSError as exc:
                    log.warning("watermark_not_saved", error=str(exc))

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self.last_error = str(exc)
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("leader_unreachable", leader=self.leader, error=str(exc), attempt=state.attempt_number,
                    retry_in_s=round(wait, 3))

    async def _session(self) -> None:
        """One connection to the leader, from our next id until it ends."""
        if self._cancelled:
            # Python 3.11's wait_for can swallow a task's cancellation when the connect it waits
            # for fails at that moment (the refused connect then reads as a lost link, retried):
            # a follower told to stop must not go on retrying, or a stop waits for its watchdog.
            raise asyncio.CancelledError
        srv = self.server
        lg = srv.log
        self.state = "connecting"
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            _tr, link = await asyncio.wait_for(
                loop.create_connection(
                    _Link, self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
                ),
                timeout=srv.config.replica_timeout,
            )
        except OSError as exc:  # TimeoutError included
            raise LinkLost(f"cannot connect to {self.leader}: {exc}") from None
        self._link = link
        # Our end of the link, as the leader names its peer: if the leader is this very server
        # (--replica-of names its own address), a REPLICATE arrives from here and is refused
        # (`LogServer.check_stream_start`).
        self.link_address = _address(_tr.get_extra_info("sockname"))
        try:
            if self.token is not None:
                await self._authenticate(link)
            start = lg.written + 1
            prev_crc = lg.crc_of(start - 1) if start > 1 else 0
            epochs = srv.epochs
            replicate = b"REPLICATE %d %08x %d %d" % (start, prev_crc, epochs.current, epochs.seen)
            name = self._name(link)
            link.write(replicate + (b" %s\r\n" % name.encode("ascii") if name else b"\r\n"))
            parser = ReplicaStreamParser(start)
            started = False
            self._uncommitted = [0, 0]
            while True:
                chunks = await link.take()
                self._check_commit()
                if not chunks:
                    await self._drain_commits()
                    if started:
                        log.warning("leader_lost", leader=self.leader, head=lg.head)
                        return
                    raise LinkLost(f"{self.leader} closed the connection")
                try:
                    events = _feed_all(parser, chunks)
                except (CorruptRecordError, ProtocolError) as exc:
                    # Possibly damage in transit: start again from what we hold.
                    log.error("replication_stream_bad", leader=self.leader, error=str(exc))
                    raise LinkLost(str(exc)) from None
                count = nbytes = 0
                for ev in events:
                    if type(ev) is Chunk:
                        try:
                            lg.append_encoded(ev.data, ev.offsets, ev.count)
                        except UnavailableError as exc:
                            if lg.failed is not None:
                                raise ReplicationFailed(str(exc)) from None
                            raise LinkLost(str(exc)) from None
                        count += ev.count
                        nbytes += len(ev.data)
                    elif type(ev) is SegmentStart:
                        self._segment(ev.id)
                    elif type(ev) is EpochStart:
                        self._epoch(ev)
                    elif type(ev) is CursorCommit:
                        try:
                            srv.cursors.replicated(ev.name, ev.id)
                        except OSError as exc:  # e.g. a full disk: the next stream sends every cursor again
                            raise LinkLost(f"cannot write cursor {ev.name}: {exc}") from None
                    elif type(ev) is CursorDrop:
                        try:
                            srv.cursors.replicated_drop(ev.name)
                        except OSError as exc:  # as for +CURSOR: the next stream sends every drop again
                            raise LinkLost(f"cannot drop cursor {ev.name}: {exc}") from None
                    elif type(ev) is LeaderPosition:
                        self.leader_head = ev.head
                        self._set_visible(ev.visible)
                        if self.leader_min_replicas:
                            self.acked_floor = max(self.acked_floor, min(ev.visible, lg.written))
                    elif type(ev) is StreamOk:
                        if not self._handshake(ev, start):
                            return  # the log was cut to where the leader's history agrees: again from there
                        started = True
                        self.sessions += 1
                        self.state = "streaming"
                        # Count toward the leader's --min-replicas now, not only after new records.
                        link.write(encode_command(Ack(start - 1)))
                        self.last_error = "-"
                        log.info("following", leader=self.leader, start=start)
                    elif type(ev) is StreamEnd:
                        self._commit_soon(link, count, nbytes)
                        await self._drain_commits()
                        log.warning("leader_stopping", leader=self.leader, head=lg.head)
                        return
                    elif type(ev) is StreamError:
                        if ev.code == "BAD_FORMAT" and name and not started:
                            # A leader older than the <address> argument: ask again without it (it
                            # then names us by our connection's address), on the same connection.
                            name = None
                            link.write(replicate + b"\r\n")
                            parser = ReplicaStreamParser(start)
                            break
                        if ev.code == "FENCED":
                            self.state = "fenced"
                            log.error("leader_fenced", leader=self.leader, error=ev.message)
                            raise LinkLost(f"leader {self.leader} is stale: {ev.message}")
                        if ev.code in ("DIVERGED", "NOT_FOUND", "DENIED"):  # DENIED: the token lacks the role
                            raise ReplicationFailed(f"leader {self.leader} refused: {ev.code} {ev.message}")
                        raise LinkLost(f"leader {self.leader}: {ev.code} {ev.message}")
                self._commit_soon(link, count, nbytes)
                self._update_lag()
        finally:
            if self._committer is not None and not self._committer.done():
                self._committer.cancel()
            self._committer = None
            link.close()
            self._link = None
            self.link_address = None
            if self.state == "streaming":
                self.state = "connecting"

    def _handshake(self, ok: StreamOk, start: int) -> bool:
        """Check the leader's answer to REPLICATE; False if the log had to be cut (reconnect now).

        Fencing: a leader whose epoch is older than one we have seen is stale.
        Truncation (Kafka's OffsetsForLeaderEpoch): the leader said where our
        newest epoch ends in its history; what we hold past that was never
        the leader's.
        """
        if ok.leader_epoch < 0:
            return True  # an older leader: no epochs
        epochs = self.server.epochs
        if ok.leader_epoch < epochs.seen:
            self.state = "fenced"
            log.error("leader_fenced", leader=self.leader, leader_epoch=ok.leader_epoch, epoch_seen=epochs.seen)
            raise LinkLost(f"leader {self.leader} is at epoch {ok.leader_epoch}, older than epoch {epochs.seen}")
        epochs.see(ok.leader_epoch)
        self.leader_min_replicas = ok.min_replicas
        self.server.min_replicas.told_by_leader(ok.min_replicas, self.leader)  # kept for a promotion
        if ok.epoch == epochs.current and ok.end >= start:
            return True
        _found, own_end = epochs.end_of(ok.epoch, start)
        self._truncate(min(ok.end, own_end), ok)
        return False

    def _truncate(self, cut: int, ok: StreamOk) -> None:
        """Drop our records from ``cut`` on (moved to a file first) and our epochs that start there."""
        lg = self.server.log
        epochs = self.server.epochs
        if cut <= min(self.acked_floor, lg.written):
            raise ReplicationFailed(
                f"leader {self.leader} lacks id {cut}, which was acknowledged under --min-replicas "
                f"(acknowledged up to {self.acked_floor}); not cutting the log"
            )
        if cut <= lg.written and cut - 1 < lg.first - 1:  # retention took what the cut needs: change nothing
            raise ReplicationFailed(
                f"cannot cut the log to follow {self.leader}: id {cut - 1} is before the oldest retained id {lg.first}"
            )
        epoch_of_cut = epochs.epoch_of(cut)[0]
        epochs.truncate_after(cut - 1)
        if cut > lg.written:
            log.info("epochs_cut", leader=self.leader, after=cut - 1, epoch=epochs.current)
            return
        path = os.path.join(lg.directory, dropped_name(epoch_of_cut, cut))
        try:
            n = lg.truncate_after(cut - 1, path)
        except NotFoundError as exc:
            raise ReplicationFailed(f"cannot cut the log to follow {self.leader}: {exc}") from None
        self.dropped += n
        try:
            self.server.cursors.cut_back(cut - 1)
        except OSError as exc:  # a restart cuts them back at open
            raise ReplicationFailed(f"cannot cut the cursors back to {cut - 1}: {exc}") from None
        self.leader_visible = min(self.leader_visible, lg.head)
        self.leader_head = ok.end - 1
        log.warning("diverged_records_dropped", leader=self.leader, first_id=cut, count=n, file=path,
                    epoch=epoch_of_cut, leader_epoch=ok.leader_epoch)

    def _epoch(self, ev: EpochStart) -> None:
        """``+EPOCH``: record a newer epoch durably before any of its records is written."""
        epochs = self.server.epochs
        if ev.epoch <= epochs.current:
            return
        nxt = self.server.log.written + 1
        if ev.first_id != nxt:
            raise LinkLost(f"leader {self.leader} starts epoch {ev.epoch} at {ev.first_id}, our next id is {nxt}")
        epochs.start(ev.epoch, nxt)

    def _name(self, link: _Link) -> str | None:
        """The address this server names itself by to the leader (naming.py)."""
        sockname = link.transport.get_extra_info("sockname") if link.transport is not None else None
        outgoing = str(sockname[0]) if sockname else None
        return replica_address(self.server.config.advertise, self.listening, outgoing)

    async def _authenticate(self, link: _Link) -> None:
        """AUTH with the replica token and wait for the answer (nothing else is in flight)."""
        assert self.token is not None
        link.write(b"AUTH %s\r\n" % self.token.encode())
        buf = b""
        while b"\n" not in buf:
            chunks = await link.take()
            if not chunks:
                raise LinkLost(f"{self.leader} closed the connection during AUTH")
            buf += b"".join(chunks)
        line = buf.split(b"\n", 1)[0].rstrip(b"\r")
        if line == b"OK":
            return
        text = line.decode("utf-8", "replace")
        if text.startswith("ERR DENIED"):
            raise ReplicationFailed(f"leader {self.leader} refused the replica token: {text}")
        raise LinkLost(f"leader {self.leader} answered AUTH with {text!r}")

    def _segment(self, first_id: int) -> None:
        lg = self.server.log
        nxt = lg.written + 1
        try:
            if first_id == nxt:
                lg.start_segment(first_id)
                return
        except ValueError as exc:
            raise ReplicationFailed(f"cannot start segment {first_id}: {exc}") from None
        active = lg.segment_of(nxt)
        if first_id != active:
            raise ReplicationFailed(
                f"segment layout differs: the leader's id {nxt} is in segment {first_id}, ours in {active}"
            )

    # Commits run beside the loop: while one fsync is in flight the loop parses
    # and writes the next chunks, and the following fsync covers all of them
    # (group commit, as the leader's queue does for MSG).

    def _commit_soon(self, link: _Link, count: int, nbytes: int) -> None:
        if not count:
            return
        self._uncommitted[0] += count
        self._uncommitted[1] += nbytes
        if self._committer is None or self._committer.done():
            self._check_commit()
            self._committer = asyncio.get_running_loop().create_task(self._commit_rounds(link))

    async def _commit_rounds(self, link: _Link) -> None:
        while self._uncommitted[0]:
            count, nbytes = self._uncommitted
            self._uncommitted = [0, 0]
            head = await self.server.queue.commit_written(count, nbytes)
            link.write(b"ACK %d\r\n" % head)
            self._update_lag()

    def _check_commit(self) -> None:
        task = self._committer
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise ReplicationFailed(f"commit failed: {task.exception()}")

    async def _drain_commits(self) -> None:
        if self._committer is not None:
            await asyncio.wait([self._committer])
            self._check_commit()

    def _set_visible(self, visible: int) -> None:
        if visible > self.leader_visible:
            self.leader_visible = visible
            self.server.wake_streams()

    def _update_lag(self) -> None:
        if self.server.log.head >= self.leader_head:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.monotonic()

    def stats(self) -> dict[str, object]:
        """Figures for a follower's STATS."""
        lag_s = 0.0 if self.behind_since is None else time.monotonic() - self.behind_since
        return {
            "leader": self.leader,
            "replication": self.state,
            "leader_head": self.leader_head,
            "lag_messages": max(0, self.leader_head - self.server.log.head),
            "lag_s": round(lag_s, 3),
            "dropped_records": self.dropped,
            "replication_error": self.last_error,
        }
