"""Loading into Databricks end to end: first load, incremental runs, ties at batch edges, schema
changes, hand-made and incompatible tables, and statements per batch on the bulk path.

Each test runs the real script as a subprocess against the emulator and reads the target back
through the connector and from the emulator's Parquet files.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dbx_e2e import (
    add_sensor_rows,
    base_env,
    batches_in,
    both_views,
    column_types,
    expected_sensor_rows,
    make_sensor_db,
    query,
    stat_delta,
    upload,
    uploaded_in,
)
from emulator_harness import Emulator
from make_sample_db import format_timestamp

SENSOR_TYPES = {"id": "BIGINT", "device_id": "STRING", "timestamp": "TIMESTAMP", "temperature": "DOUBLE",
                "humidity": "DOUBLE", "status": "STRING"}


def test_first_load_then_incremental_runs(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 1200)
    state = tmp_path / "state"

    first = upload(emulator, db, state, schema, "--batch-size", "500")
    # Schema and table did not exist: both are created, with the documented types.
    schemas = {str(next(iter(row.values()))).lower() for row in query(emulator, "SHOW SCHEMAS")}
    assert schema.lower() in schemas
    assert column_types(emulator, f"`{schema}`.`sensor_logs`") == SENSOR_TYPES
    assert uploaded_in(first.stderr) == 1200 and batches_in(first.stderr) == 3
    assert both_views(emulator, schema, "sensor_logs") == expected_sensor_rows(db)
    # Staged batch files are removed once loaded.
    staged = emulator.volume_dir("spark_catalog", schema, "sqlite_uploader_staging")
    assert staged.is_dir() and not list(staged.rglob("*.parquet")), list(staged.rglob("*"))
    # databricks_host http://127.0.0.1:PORT: plain HTTP, and the user is told credentials travel in clear.
    assert len(re.findall(r"WARNING .*plain http://", first.stderr)) == 1, first.stderr

    # A second run finds nothing new and sends no data.
    before = emulator.stats()
    second = upload(emulator, db, state, schema, "--batch-size", "500")
    sent = stat_delta(before, emulator.stats())
    assert "0 read, 0 uploaded" in second.stderr
    assert sent.get("COPY INTO", 0) == sent.get("PUT", 0) == sent.get("INSERT", 0) == 0, sent
    assert both_views(emulator, schema, "sensor_logs") == expected_sensor_rows(db)

    # New rows arrive once.
    last = max(row["timestamp"] for row in expected_sensor_rows(db) if row["timestamp"])
    add_sensor_rows(db, 300, start=last + timedelta(minutes=5))
    third = upload(emulator, db, state, schema, "--batch-size", "500")
    assert uploaded_in(third.stderr) == 300
    fourth = upload(emulator, db, state, schema, "--batch-size", "500")
    assert "0 read, 0 uploaded" in fourth.stderr
    rows = both_views(emulator, schema, "sensor_logs")
    assert len(rows) == 1500
    assert rows == expected_sensor_rows(db)


def _insert_readings(db: Path, rows: list[tuple[datetime, int]]) -> None:
    """(instant, style) pairs: one sweep shares an instant, stored in several of SQLite's formats."""
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS sensor_logs (id INTEGER PRIMARY KEY, device_id TEXT, "
                           "timestamp DATETIME, temperature REAL)")
        count = connection.execute("SELECT count(*) FROM sensor_logs").fetchone()[0]
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature) VALUES (?, ?, ?)",
            [(f"dev-{(count + i) % 5}", format_timestamp(moment, style), 20.0 + count + i)
             for i, (moment, style) in enumerate(rows)])


def test_ties_at_the_batch_boundary(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db, state = tmp_path / "ties.db", tmp_path / "state"
    start = datetime(2026, 2, 1, 8, 0, 0, tzinfo=timezone.utc)
    # Sweeps of 2, 4, 3 and 5 rows sharing one instant; batch_size 4 cuts through three of them.
    sweeps = [2, 4, 3, 5]
    readings = [(start + timedelta(seconds=n), (n + i) % 6) for n, size in enumerate(sweeps) for i in range(size)]
    _insert_readings(db, readings)

    first = upload(emulator, db, state, schema, "--batch-size", "4")
    assert uploaded_in(first.stderr) == 14 and batches_in(first.stderr) == 4

    # Rows written later with exactly the last uploaded timestamp (in other formats), and after it.
    last = start + timedelta(seconds=len(sweeps) - 1)
    _insert_readings(db, [(last, 0), (last, 3), (last, 5), (last + timedelta(seconds=1), 1),
                          (last + timedelta(seconds=1), 2)])
    second = upload(emulator, db, state, schema, "--batch-size", "4")
    assert uploaded_in(second.stderr) == 5

    rows = both_views(emulator, schema, "sensor_logs")
    counts = Counter(row["id"] for row in rows)
    assert sorted(counts) == list(range(1, 20)) and set(counts.values()) == {1}, counts
    assert rows == expected_sensor_rows(db)


def test_new_source_column_is_added_to_the_target(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db, state = make_sensor_db(tmp_path / "sensor.db", 40), tmp_path / "state"
    upload(emulator, db, state, schema)
    assert column_types(emulator, f"`{schema}`.`sensor_logs`") == SENSOR_TYPES

    with sqlite3.connect(db) as connection:
        connection.execute("ALTER TABLE sensor_logs ADD COLUMN battery REAL")
        connection.execute("ALTER TABLE sensor_logs ADD COLUMN firmware TEXT")
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status, battery, firmware) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [("sensor-z", f"2026-01-16 10:00:{i:02d}", 20.5, 50.0, "ok", 3.5 + i / 8, f"v1.{i}")
             for i in range(10)])
    second = upload(emulator, db, state, schema)
    assert uploaded_in(second.stderr) == 10

    assert column_types(emulator, f"`{schema}`.`sensor_logs`") == {**SENSOR_TYPES, "battery": "DOUBLE",
                                                                    "firmware": "STRING"}
    rows = both_views(emulator, schema, "sensor_logs")
    assert rows == expected_sensor_rows(db)
    assert all(row["battery"] is None and row["firmware"] is None for row in rows[:40])
    assert [row["firmware"] for row in rows[40:]] == [f"v1.{i}" for i in range(10)]


README_TABLE = """CREATE TABLE IF NOT EXISTS sensor_data.raw_readings (
    id BIGINT,
    device_id STRING,
    timestamp TIMESTAMP,
    temperature DOUBLE,
    humidity DOUBLE,
    status STRING
)"""


def test_table_created_by_hand_from_the_readme_is_loaded_as_is(emulator: Emulator, tmp_path: Path) -> None:
    query(emulator, "CREATE DATABASE IF NOT EXISTS sensor_data")
    query(emulator, README_TABLE)
    made_by_hand = column_types(emulator, "sensor_data.raw_readings")

    db = make_sensor_db(tmp_path / "sensor.db", 300)
    result = upload(emulator, db, tmp_path / "state", "sensor_data", "--databricks-table", "raw_readings")

    assert uploaded_in(result.stderr) == 300
    assert column_types(emulator, "sensor_data.raw_readings") == made_by_hand == SENSOR_TYPES
    assert "Created table" not in result.stderr and "Added column" not in result.stderr
    assert both_views(emulator, "sensor_data", "raw_readings") == expected_sensor_rows(db)


def test_incompatible_existing_table_is_an_error(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    query(emulator, f"CREATE SCHEMA `{schema}`")
    query(emulator, f"CREATE TABLE `{schema}`.`sensor_logs` (id BIGINT, device_id STRING, timestamp TIMESTAMP, "
                    "temperature DOUBLE, humidity DOUBLE, status BOOLEAN)")
    db = make_sensor_db(tmp_path / "sensor.db", 50)

    result = upload(emulator, db, tmp_path / "state", schema, expect=2)

    error = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(error) == 1, result.stderr
    assert re.search(r"\bstatus\b.*STRING.*BOOLEAN", error[0], re.IGNORECASE), error[0]
    assert "Traceback" not in result.stderr
    assert query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`sensor_logs`") == [{"n": 0}]
    assert column_types(emulator, f"`{schema}`.`sensor_logs`")["status"] == "BOOLEAN"


def test_bulk_path_statements_per_batch_do_not_grow_with_batch_size(emulator: Emulator, schema: str,
                                                                    tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 2000)
    sent, batches = {}, {}
    for batch_size in (500, 5000):
        target_schema = f"{schema}_{batch_size}"
        before = emulator.stats()
        result = upload(emulator, db, tmp_path / f"state{batch_size}", target_schema, "--batch-size",
                        str(batch_size))
        sent[batch_size] = stat_delta(before, emulator.stats())
        batches[batch_size] = batches_in(result.stderr)
        assert uploaded_in(result.stderr) == 2000
        assert query(emulator, f"SELECT count(*) AS n FROM `{target_schema}`.`sensor_logs`") == [{"n": 2000}]

    assert batches == {500: 4, 5000: 1}
    # The bulk path was used: one COPY INTO per batch.
    assert sent[500].get("COPY INTO") == 4 and sent[5000].get("COPY INTO") == 1, sent
    # The same set-up in both runs, so the difference is what the 3 extra batches cost: at most 4 each.
    extra = sent[500]["total"] - sent[5000]["total"]
    assert extra <= 4 * (batches[500] - batches[5000]), sent


def test_same_source_into_two_tables_of_one_schema(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    """Two uploaders with their own state dirs load one SQLite table into two target tables of the
    same schema (say, a copy for a second team): each target table must get every row."""
    db = make_sensor_db(tmp_path / "sensor.db", 600)
    env = base_env(emulator)
    upload(emulator, db, tmp_path / "state_a", schema, "--databricks-table", "copy_a", "--batch-size", "300",
           env=env)
    upload(emulator, db, tmp_path / "state_b", schema, "--databricks-table", "copy_b", "--batch-size", "300",
           env=env)
    assert both_views(emulator, schema, "copy_a") == expected_sensor_rows(db)
    rows_b = both_views(emulator, schema, "copy_b")
    assert len(rows_b) == 600, f"copy_b holds {len(rows_b)} of 600 rows"
    assert rows_b == expected_sensor_rows(db)
