"""The staging leg goes to cloud storage, not to the workspace (issue 11, point 2).

A volume PUT or REMOVE is answered by the workspace with a presigned URL on the cloud provider's
storage, and the connector sends the file there itself. When that other host refuses connections or
presents a certificate this machine does not trust (a TLS-inspecting proxy), the uploader must say
so -- naming cloud storage and its host, not "Databricks" -- and either go on with INSERT statements
(when they are exactly-once: the batch_id lineage column) or stop within bounded time.

The emulator's `staging_host` switch points its presigned URLs at a port that refuses, or at an HTTPS
listener with a self-signed certificate.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from dbx_e2e import add_sensor_rows, base_env, make_sensor_db, query, upload, uploaded_in
from emulator_harness import Emulator

# The connector retries a failed transfer for databricks_retry_timeout seconds: keep that short.
FAST = {"DATABRICKS_RETRY_TIMEOUT": "5"}
BATCH_ID = ("--lineage-columns", "batch_id")


@pytest.fixture
def storage(emulator: Emulator) -> Iterator[Any]:
    """Set where presigned URLs point; returns the storage's host:port. Always switched back."""

    def point(mode: str, after: int = 0) -> str:
        config = emulator.set_config(staging_host=mode, staging_host_after=after)["config"]
        return re.sub(r"^\w+://", "", config["staging_url"])

    yield point
    emulator.set_config(staging_host=None, staging_host_after=None)


def _counts(emulator: Emulator, schema: str) -> tuple[int, int]:
    rows = query(emulator, f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM `{schema}`.`sensor_logs`")
    return rows[0]["n"], rows[0]["d"]


def _storage_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Cannot use cloud storage at" in line]


@pytest.mark.parametrize("mode", ["refuse", "untrusted_tls"])
def test_unusable_storage_falls_back_to_insert_and_loads_every_row_once(emulator: Emulator, schema: str,
                                                                        tmp_path: Path, storage: Any,
                                                                        mode: str) -> None:
    where = storage(mode)
    db = make_sensor_db(tmp_path / "sensor.db", 12)
    result = upload(emulator, db, tmp_path / "state", schema, "--batch-size", "6", *BATCH_ID,
                    env=base_env(emulator, **FAST))
    assert uploaded_in(result.stderr) == 12, result.stderr[-4000:]
    assert _counts(emulator, schema) == (12, 12)
    warnings = _storage_lines(result.stderr)
    assert len(warnings) == 1, result.stderr[-4000:]  # said once, not per batch
    assert "WARNING" in warnings[0] and where in warnings[0] and "INSERT" in warnings[0], warnings[0]
    if mode == "untrusted_tls":
        assert "certificate" in warnings[0] and "SSL_CERT_FILE" in warnings[0], warnings[0]
    else:
        assert "refused" in warnings[0], warnings[0]
    assert "Cannot reach Databricks" not in result.stderr


@pytest.mark.parametrize(("mode", "exit_code"), [("refuse", 1), ("untrusted_tls", 2)])
def test_unusable_storage_without_insert_fallback_stops_naming_the_storage(emulator: Emulator, schema: str,
                                                                           tmp_path: Path, storage: Any,
                                                                           mode: str, exit_code: int) -> None:
    """Without the batch_id lineage column the INSERT path is not exactly-once, so only COPY INTO can
    load: the run ends (a refused connection may heal: exit 1; an untrusted certificate needs the
    user: exit 2) instead of retrying "Cannot reach Databricks" forever."""
    where = storage(mode)
    db = make_sensor_db(tmp_path / "sensor.db", 5)
    result = upload(emulator, db, tmp_path / "state", schema, env=base_env(emulator, **FAST), expect=exit_code)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert errors and "cloud storage" in errors[-1] and where in errors[-1], result.stderr[-4000:]
    assert "batch_id" in errors[-1], errors[-1]
    assert "Cannot reach Databricks" not in result.stderr and "warehouse is starting" not in result.stderr
    assert uploaded_in(result.stderr) == 0


def test_batch_switched_to_insert_mid_run_is_never_loaded_twice(emulator: Emulator, schema: str, tmp_path: Path,
                                                               storage: Any) -> None:
    """The volume works at start-up, then the batch's own PUT fails: the batch, recorded for COPY
    INTO, is finished by INSERT. A later run that can use the storage again (the certificate now
    trusted through SSL_CERT_FILE, as the message advises) replays that batch from its records and
    must not COPY it a second time; its new rows go by COPY INTO."""
    storage("refuse", after=2)  # the start-up probe's PUT and REMOVE still work
    db = make_sensor_db(tmp_path / "sensor.db", 10)
    state = tmp_path / "state"
    first = upload(emulator, db, state, schema, "--batch-size", "10", *BATCH_ID, env=base_env(emulator, **FAST))
    assert uploaded_in(first.stderr) == 10 and _counts(emulator, schema) == (10, 10), first.stderr[-4000:]
    assert len(_storage_lines(first.stderr)) == 1, first.stderr[-4000:]

    ca_file = emulator.set_config(staging_host="untrusted_tls")["config"]["staging_ca_file"]
    shutil.move(state, tmp_path / "old-state")  # the state file is a cache: the records decide
    add_sensor_rows(db, 5, start=datetime(2031, 1, 1, tzinfo=timezone.utc))
    second = upload(emulator, db, state, schema, "--batch-size", "10", *BATCH_ID,
                    env=base_env(emulator, SSL_CERT_FILE=ca_file, **FAST))
    assert _counts(emulator, schema) == (15, 15), second.stderr[-4000:]
    assert "with COPY INTO" in second.stderr and not _storage_lines(second.stderr), second.stderr[-4000:]
