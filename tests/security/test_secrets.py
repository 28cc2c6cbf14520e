"""Secrets hygiene: tokens and client secrets never reach any output, at any log level, on any path.

The session-wide canary audit (tests/output_audit.py) also checks every other test's output; the
runs here are the paths most likely to leak: failures, retries, DEBUG logs, JSON logs, query output.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from dbx_e2e import base_env, make_sensor_db, run
from output_audit import CANARIES, CANARY_SECRET, CANARY_TOKEN

WRONG_TOKEN = "dapi-canary-wrong-0d9e8f7a6b5c"
WRONG_SECRET = "sp-secret-canary-wrong-77aa01"
EVERY_SECRET = (*CANARIES, WRONG_TOKEN, WRONG_SECRET)


def assert_nothing_leaked(result, *places: Path) -> None:
    output = result.stdout + result.stderr
    for secret in EVERY_SECRET:
        assert secret not in output, f"{secret[:10]}... printed:\n{output[-3000:]}"
        for place in places:
            for path in place.rglob("*") if place.is_dir() else [place]:
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), f"{secret[:10]}... written to {path}"


def uploader(db: Path, state: Path, env: dict[str, str], *more: str, expect: int | None = None):
    return run("--sqlite", str(db), "--state-dir", str(state), "--once", "--log-level", "DEBUG", *more,
               env=env, expect=expect, secrets=EVERY_SECRET)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return make_sensor_db(tmp_path / "data" / "s.db", 30)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_success_query_and_info_at_debug(emulator, db, tmp_path, schema, log_format):
    env = base_env(emulator, DATABRICKS_DATABASE=schema, LOG_FORMAT=log_format)
    state = tmp_path / "state"
    assert_nothing_leaked(uploader(db, state, env, expect=0), state)
    for output in ("table", "json", "csv"):
        for sql in ("INFO", "SELECT current_user() AS who, * FROM sensor_logs LIMIT 3", "SELEC nonsense"):
            result = run("--sqlite", str(db), "--state-dir", str(state), "--log-level", "DEBUG",
                         "--run-query", sql, "--output", output, env=env, expect=None, secrets=EVERY_SECRET)
            assert_nothing_leaked(result)


def test_wrong_token(emulator, db, tmp_path, schema):
    env = base_env(emulator, token=False, DATABRICKS_DATABASE=schema, DATABRICKS_TOKEN=WRONG_TOKEN)
    result = uploader(db, tmp_path / "state", env, expect=1)
    assert "refused the credentials" in result.stderr
    assert_nothing_leaked(result, tmp_path / "state")


def test_token_as_a_flag_warns_and_is_not_echoed(emulator, db, tmp_path, schema):
    env = base_env(emulator, token=False, DATABRICKS_DATABASE=schema)
    result = uploader(db, tmp_path / "state", env, "--databricks-token", CANARY_TOKEN, expect=0)
    assert "process list" in result.stderr
    assert_nothing_leaked(result, tmp_path / "state")


@pytest.mark.parametrize("secret", [CANARY_SECRET, WRONG_SECRET])
def test_service_principal(emulator, db, tmp_path, schema, secret):
    env = base_env(emulator, token=False, DATABRICKS_DATABASE=schema, DATABRICKS_CLIENT_ID=emulator.client_id,
                   DATABRICKS_CLIENT_SECRET=secret)
    result = uploader(db, tmp_path / "state", env, expect=0 if secret == CANARY_SECRET else 1)
    assert_nothing_leaked(result, tmp_path / "state")


def test_unreachable_host_and_unavailable_warehouse(emulator, db, tmp_path, schema):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    env = base_env(emulator, DATABRICKS_DATABASE=schema, DATABRICKS_HOST=f"http://127.0.0.1:{dead_port}",
                   DATABRICKS_RETRY_TIMEOUT="5")
    assert_nothing_leaked(uploader(db, tmp_path / "state", env, expect=1))
    emulator.set_faults({"kind": "unavailable", "seconds": 8})
    env = base_env(emulator, DATABRICKS_DATABASE=schema, DATABRICKS_RETRY_TIMEOUT="4")
    assert_nothing_leaked(uploader(db, tmp_path / "state", env, expect=None), tmp_path / "state")


# --- warnings about where secrets are kept

def config_with(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(("text", "mode", "warned"), [
    ("databricks_token: dapi-in-file\n", 0o644, True),
    ("databricks_token: dapi-in-file\n", 0o640, True),
    ("databricks_client_secret: s3cr3t-in-file\n", 0o604, True),
    ("databricks_token: dapi-in-file\n", 0o600, False),
    ("databricks_host: example.cloud.databricks.com\n", 0o644, False),
])
def test_readable_config_holding_a_secret_warns(tmp_path, text, mode, warned):
    config = config_with(tmp_path, text, mode)
    result = run("--config", str(config), "--healthcheck", "--state-dir", str(tmp_path), env=base_env(None),
                 expect=None, secrets=("dapi-in-file", "s3cr3t-in-file"))
    assert ("can be read by other users" in result.stderr) is warned, result.stderr
    if warned:
        assert "chmod 600" in result.stderr
