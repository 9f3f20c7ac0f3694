"""What a follower names itself by, which --min-replicas a server runs with, and a promotion's high watermark."""

from __future__ import annotations

from pathlib import Path

import pytest

from logd.config import Config, ConfigError, resolve
from logd.errors import UnavailableError
from logd.replication import ReplicaSet
from logd.replication.durability import MinReplicas
from logd.replication.naming import replica_address


@pytest.mark.parametrize(("advertise", "listening", "outgoing", "name"), [
    ("db-2.example:1774", ("127.0.0.1", 7001), "10.0.0.5", "db-2.example:1774"),  # --advertise wins
    (None, ("10.0.0.7", 1774), "10.0.0.5", "10.0.0.7:1774"),  # a specific address: where it listens
    (None, ("2001:db8::7", 1774), "10.0.0.5", "[2001:db8::7]:1774"),
    (None, ("0.0.0.0", 1774), "10.0.0.5", "10.0.0.5:1774"),  # a wildcard: the outgoing address, its port
    (None, ("::", 1774), "2001:db8::5", "[2001:db8::5]:1774"),
    (None, ("127.0.0.1", 7001), "127.0.0.1", "127.0.0.1:7001"),  # loopback: two hosts could share it
    (None, ("127.0.0.1", 1774), "10.0.0.5", "10.0.0.5:1774"),
    (None, ("::", 1774), "fe80::1%eth0", None),  # no valid name: the leader uses the connection's address
    (None, ("0.0.0.0", 1774), None, None),
])
def test_replica_address(advertise: str | None, listening: tuple[str, int], outgoing: str | None,
                         name: str | None) -> None:
    assert replica_address(advertise, listening, outgoing) == name


def test_advertise_setting_is_checked() -> None:
    assert resolve({"advertise": "db-2.example:1774"}, {}).config.advertise == "db-2.example:1774"
    for bad in ("db-2", "db-2:0", "db_2:1774", "0.0.0.0:1774", "[::]:1774", "a b:1"):
        with pytest.raises(ConfigError, match="advertise"):
            resolve({}, {"LOGD_ADVERTISE": bad})
    assert Config().min_replicas is None  # not set: what the data dir kept, else 0


def test_min_replicas_precedence_and_what_is_kept(tmp_path: Path) -> None:
    d = str(tmp_path)
    fresh = MinReplicas(d, None)
    assert (fresh.value, fresh.source) == (0, "default")
    fresh.told_by_leader(2, "a:1774")
    assert (fresh.value, fresh.source) == (2, "leader")
    assert (tmp_path / "CLUSTER").read_text() == "min_replicas 2 leader\n"
    assert (MinReplicas(d, None).value, MinReplicas(d, None).source) == (2, "leader")  # a restart keeps it
    configured = MinReplicas(d, 0)  # the flag wins at start, and over what a leader says...
    configured.told_by_leader(3, "a:1774")
    assert (configured.value, configured.source) == (0, "config")
    assert (tmp_path / "CLUSTER").read_text() == "min_replicas 3 leader\n"  # ...which is still kept
    assert configured.promoted(None) == 0
    assert configured.promoted(1) == 1 and configured.source == "promote"  # promote wins over everything
    assert (MinReplicas(d, None).value, MinReplicas(d, None).source) == (1, "promote")
    again = MinReplicas(d, None)
    again.told_by_leader(2, "b:1774")  # a new leader's setting replaces a saved one
    assert (again.value, again.source) == (2, "leader")


def test_a_promotion_that_cannot_record_its_setting_changes_nothing(tmp_path: Path) -> None:
    setting = MinReplicas(str(tmp_path / "gone"), None)
    with pytest.raises(UnavailableError, match="cannot record min_replicas 1"):
        setting.promoted(1)
    assert (setting.value, setting.source) == (0, "default")
    setting.told_by_leader(1, "a:1774")  # not saved, but it still applies to this process
    assert (setting.value, setting.source) == (1, "leader")


def test_configure_keeps_what_readers_saw() -> None:
    rs = ReplicaSet(min_replicas=0, timeout=5.0, head=10)
    rs.configure(1, head=12, visible=9)  # a follower whose leader had shown up to 9
    assert (rs.min_replicas, rs.hw) == (1, 9)
    assert rs.ack(object(), 11) is True and rs.hw == 11
    rs.configure(0, head=12, visible=11)  # asynchronous from now on: everything committed is visible
    assert (rs.min_replicas, rs.hw) == (0, 12)
