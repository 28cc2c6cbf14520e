"""TLS to Databricks: certificates are always verified; a private CA is trusted only when named."""

from __future__ import annotations

import time

import pytest
from dbx_e2e import base_env, make_sensor_db, query, upload
from tls_proxy import TlsProxy, make_certificate


@pytest.fixture
def proxy(emulator, tmp_path):
    cert, key = make_certificate(tmp_path)
    front = TlsProxy(emulator.port, cert, key)
    yield front, cert
    front.close()


def https_env(emulator, port: int, **extra: str) -> dict[str, str]:
    return base_env(emulator, DATABRICKS_HOST=f"https://localhost:{port}", DATABRICKS_RETRY_TIMEOUT="10", **extra)


def test_self_signed_certificate_is_refused(emulator, proxy, tmp_path, schema):
    front, _cert = proxy
    db = make_sensor_db(tmp_path / "data" / "s.db", 20)
    started = time.monotonic()
    result = upload(emulator, db, tmp_path / "state", schema, expect=1, env=https_env(emulator, front.port))
    assert "certificate" in result.stderr.lower(), result.stderr
    assert "SSL_CERT_FILE" in result.stderr  # says how to trust a private CA
    assert front.handshake_failures >= 1
    assert time.monotonic() - started < 120
    assert not (tmp_path / "state" / "upload_state.json").exists()


def test_private_ca_is_trusted_when_named(emulator, proxy, tmp_path, schema):
    front, cert = proxy
    db = make_sensor_db(tmp_path / "data" / "s.db", 20)
    upload(emulator, db, tmp_path / "state", schema, env=https_env(emulator, front.port, SSL_CERT_FILE=str(cert)))
    assert query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`sensor_logs`")[0]["n"] == 20


def test_plain_http_to_a_workspace_is_refused(tmp_path):
    db = make_sensor_db(tmp_path / "data" / "s.db", 5)
    env = base_env(None, DATABRICKS_HOST="http://adb-123.4.azuredatabricks.net", DATABRICKS_HTTP_PATH="/sql/1.0/x",
                   DATABRICKS_TOKEN="dapi-x")
    result = upload(None, db, tmp_path / "state", "s", expect=2, env=env)
    assert "http://" in result.stderr and "HTTPS" in result.stderr


def test_plain_http_elsewhere_warns_loudly(emulator, tmp_path, schema):
    db = make_sensor_db(tmp_path / "data" / "s.db", 5)
    result = upload(emulator, db, tmp_path / "state", schema)
    assert "WARNING" in result.stderr and "unencrypted" in result.stderr
