"""Least privilege and older or legacy compute (issue 11, points 7 and 8).

A service principal that may read and write but not CREATE must be able to load into objects an
admin (or a first, privileged run) made; a missing object must be named with what an admin has to
run. The legacy hive_metastore catalog has no volumes; clusters before Databricks Runtime 14.2 have
no native query parameters; no statement may exceed Databricks' maximum query text size.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from dbx_e2e import add_sensor_rows, base_env, make_sensor_db, query, upload, uploaded_in
from emulator_harness import Emulator

RESTRICTED = "restricted-" + uuid.uuid4().hex  # a token without CREATE privileges


@pytest.fixture
def restricted(emulator: Emulator) -> Iterator[dict[str, str]]:
    """An environment whose token may read, write, PUT and COPY, but CREATE nothing."""
    emulator.set_config(restricted_tokens=[RESTRICTED])
    try:
        yield base_env(emulator, DATABRICKS_TOKEN=RESTRICTED)
    finally:
        emulator.set_config(restricted_tokens=None)


def count(emulator: Emulator, schema: str, table: str = "sensor_logs") -> dict[str, int]:
    """Rows and distinct ids in the table (none when it was never created)."""
    if not query(emulator, f"SHOW TABLES IN `{schema}` LIKE '{table}'"):
        return {"n": 0, "d": 0}
    return query(emulator, f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM `{schema}`.`{table}`")[0]


def test_restricted_principal_loads_into_objects_that_exist(emulator: Emulator, schema: str, tmp_path: Path,
                                                            restricted: dict[str, str]) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 20)
    state = tmp_path / "state"
    upload(emulator, db, state, schema)  # privileged: creates schema, progress table, table, volume
    add_sensor_rows(db, 10, datetime(2031, 1, 1, tzinfo=timezone.utc))
    second = upload(emulator, db, state, schema, env=restricted)
    assert uploaded_in(second.stderr) == 10, second.stderr[-3000:]
    assert "through the staging volume" in second.stderr  # still the bulk path
    assert count(emulator, schema) == {"n": 30, "d": 30}
    # A target table that does not exist yet: named, with the privilege an admin can grant.
    other = upload(emulator, db, tmp_path / "state2", schema, "--databricks-table", "readings", env=restricted,
                   expect=2)
    assert f"table `{schema}`.`readings` does not exist" in other.stderr, other.stderr[-3000:]
    assert f"CREATE TABLE ON SCHEMA `{schema}`" in other.stderr, other.stderr[-3000:]


def test_restricted_principal_names_the_missing_schema(emulator: Emulator, schema: str, tmp_path: Path,
                                                       restricted: dict[str, str]) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 5)
    result = upload(emulator, db, tmp_path / "state", schema, env=restricted, expect=2)
    message = result.stderr
    assert f"schema `{schema}`" in message and "does not exist" in message, message[-3000:]
    assert f"CREATE SCHEMA IF NOT EXISTS `{schema}`" in message, message[-3000:]  # what an admin runs
    assert "CREATE SCHEMA ON CATALOG" in message, message[-3000:]  # or the privilege to grant
    assert not query(emulator, f"SHOW SCHEMAS LIKE '{schema}'")


def test_hive_metastore_loads_with_insert_and_says_why(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 12)
    env = base_env(emulator, DATABRICKS_CATALOG="hive_metastore", LINEAGE_COLUMNS="batch_id")
    result = upload(emulator, db, tmp_path / "state", schema, env=env)
    assert uploaded_in(result.stderr) == 12
    assert result.stderr.count("cannot hold volumes") == 1, result.stderr[-3000:]
    assert "Grant READ VOLUME" not in result.stderr  # no advice that cannot help
    assert count(emulator, schema) == {"n": 12, "d": 12}
    assert not emulator.volume_dir("hive_metastore", schema, "sqlite_uploader_staging").exists()


def test_a_staging_volume_in_hive_metastore_is_refused(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 5)
    env = base_env(emulator, LINEAGE_COLUMNS="batch_id",
                   STAGING_VOLUME=f"/Volumes/hive_metastore/{schema}/staging")
    result = upload(emulator, db, tmp_path / "state", schema, env=env, expect=2)
    assert "hive_metastore" in result.stderr and "cannot hold volumes" in result.stderr, result.stderr[-3000:]
    assert count(emulator, schema) == {"n": 0, "d": 0}


def test_a_cluster_without_native_parameters_gets_literals(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    """Before Databricks Runtime 14.2 (protocol V8) a cluster ignores native parameters."""
    db = make_sensor_db(tmp_path / "sensor.db", 12)
    state = tmp_path / "state"
    emulator.set_config(protocol_version=7)
    try:
        first = upload(emulator, db, state, schema)  # records its batch with values
        add_sensor_rows(db, 3, datetime(2031, 1, 1, tzinfo=timezone.utc))
        second = upload(emulator, db, state, schema)  # reads its progress record back by app id
    finally:
        emulator.set_config(protocol_version=None)
    assert uploaded_in(first.stderr) + uploaded_in(second.stderr) == 15
    assert count(emulator, schema) == {"n": 15, "d": 15}


def test_a_row_too_large_for_any_statement_stops_the_insert_path(emulator: Emulator, schema: str,
                                                                 tmp_path: Path) -> None:
    """A row over Databricks' 16 MiB query text limit cannot go by INSERT: exit 2 naming it, nothing
    loaded; the bulk path then loads every row."""
    db = tmp_path / "blobs.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, ts TEXT, body TEXT)")
        connection.executemany("INSERT INTO blobs VALUES (?, ?, ?)", [
            (1, "2024-01-01 00:00:00", "small"), (2, "2024-01-01 00:00:01", "x" * (17 * 1024 * 1024)),
            (3, "2024-01-01 00:00:02", "small too")])
    state = tmp_path / "state"
    args = ("--sqlite-table-name", "blobs", "--timestamp-col", "ts")
    refused = upload(emulator, db, state, schema, *args, "--staging-volume", "none",
                     "--lineage-columns", "batch_id", expect=2)
    assert "Row 2 of batch" in refused.stderr and "id = 2" in refused.stderr, refused.stderr[-3000:]
    assert "staging volume" in refused.stderr
    assert count(emulator, schema, "blobs")["n"] == 0
    loaded = upload(emulator, db, state, schema, *args, "--lineage-columns", "batch_id")
    assert uploaded_in(loaded.stderr) == 3, loaded.stderr[-3000:]
    rows = query(emulator, f"SELECT id, length(body) AS n FROM `{schema}`.`blobs` ORDER BY id")
    assert rows == [{"id": 1, "n": 5}, {"id": 2, "n": 17 * 1024 * 1024}, {"id": 3, "n": 9}]
