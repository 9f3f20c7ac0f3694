"""What a follower names itself by."""

from __future__ import annotations

import pytest

from logd.config import ConfigError, resolve
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
