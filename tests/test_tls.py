"""TLS contexts (logd/tls.py): TLS 1.2 at least on both sides, client certificates required only with a CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from logd.tls import client_context, describe, server_context


def test_contexts_require_tls_1_2_and_client_certificates_only_with_a_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    open_ctx = server_context(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    mutual = server_context(str(tmp_path / "c.pem"), str(tmp_path / "c.key"), str(tmp_path / "ca.pem"))
    client = client_context(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    # The system's OpenSSL policy may forbid older versions already; logd does not rely on it.
    assert open_ctx.minimum_version == mutual.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert open_ctx.verify_mode == ssl.CERT_NONE and mutual.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_describe_gives_one_line_reasons() -> None:
    err = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    err.reason = "WRONG_VERSION_NUMBER"
    assert describe(err) == "wrong_version_number"
    assert describe(TimeoutError()) == "handshake timed out"
    assert describe(ConnectionResetError()) == "ConnectionResetError"
