"""Column names, old dates and DECIMAL columns a real warehouse treats differently (issue 11, points 3 and 5).

Delta refuses a space or one of ,;{}()= in a column name unless the table uses column mapping; a
Spark 3.x warehouse refuses to read a date before 1582-10-15 from a Parquet file that does not say
which calendar wrote it; Delta refuses a Parquet DOUBLE in a DECIMAL column. The emulator behaves the
same way (the rebase mode is switched on per test through its admin API).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from dbx_e2e import query, upload, uploaded_in
from emulator_harness import Emulator

PATHS = {
    "copy": (),  # the default: PUT into the staging volume, COPY INTO
    "insert": ("--staging-volume", "none", "--lineage-columns", "batch_id"),
}


def make_db(path: Path, columns: str, rows: list[tuple]) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, {columns})")
        marks = ", ".join("?" * (len(rows[0]) + 2))
        connection.executemany(f"INSERT INTO readings VALUES ({marks})",
                               [(i, f"2024-01-15 10:00:{i:02d}", *row) for i, row in enumerate(rows, start=1)])
    connection.close()
    return path


def errors_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.fixture
def spark3_rebase(emulator: Emulator) -> Iterator[None]:
    """The warehouse reads staged Parquet as Spark 3.x does: datetimeRebaseModeInRead = EXCEPTION."""
    emulator.set_config(parquet_datetime_rebase_mode="EXCEPTION")
    yield
    emulator.set_config(parquet_datetime_rebase_mode=None)


@pytest.mark.parametrize("path", list(PATHS))
def test_column_names_delta_refuses_get_a_table_with_column_mapping(emulator: Emulator, schema: str,
                                                                     tmp_path: Path, path: str) -> None:
    db = make_db(tmp_path / "odd.db", '"room temp" REAL, "a=b" TEXT', [(21.5, "x"), (22.0, "y")])
    result = upload(emulator, db, tmp_path / "state", schema, "--timestamp-col", "ts", *PATHS[path])
    assert uploaded_in(result.stderr) == 2, result.stderr[-3000:]
    rows = query(emulator, f"SELECT id, `room temp`, `a=b` FROM `{schema}`.`readings` ORDER BY id")
    assert [(r["id"], r["room temp"], r["a=b"]) for r in rows] == [(1, 21.5, "x"), (2, 22.0, "y")]
    properties = {r["key"]: r["value"] for r in query(emulator, f"SHOW TBLPROPERTIES `{schema}`.`readings`")}
    assert properties.get("delta.columnMapping.mode") == "name"


def test_new_odd_column_on_a_table_without_column_mapping_stops_with_exit_2(emulator: Emulator, schema: str,
                                                                             tmp_path: Path) -> None:
    db = make_db(tmp_path / "grow.db", "temp REAL", [(20.0,), (20.5,)])
    state = tmp_path / "state"
    upload(emulator, db, state, schema, "--timestamp-col", "ts")
    with sqlite3.connect(db) as connection:
        connection.execute('ALTER TABLE readings ADD COLUMN "wind (m/s)" REAL')
        connection.execute("INSERT INTO readings VALUES (3, '2024-01-15 10:00:03', 21.0, 4.5)")
    connection.close()
    refused = upload(emulator, db, state, schema, "--timestamp-col", "ts", expect=2)
    errors = errors_in(refused.stderr)
    assert len(errors) == 1, refused.stderr[-3000:]
    assert "'wind (m/s)'" in errors[0] and "delta.columnMapping.mode" in errors[0], errors[0]
    # The owner follows the message; the next run loads the new row, once.
    query(emulator, f"ALTER TABLE `{schema}`.`readings` SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name')")
    upload(emulator, db, state, schema, "--timestamp-col", "ts")
    rows = query(emulator, f"SELECT id, `wind (m/s)` AS wind FROM `{schema}`.`readings` ORDER BY id")
    assert [(r["id"], r["wind"]) for r in rows] == [(1, None), (2, None), (3, 4.5)]


def test_dates_before_1582_load_on_a_spark3_warehouse(emulator: Emulator, schema: str, tmp_path: Path,
                                                      spark3_rebase: None) -> None:
    db = make_db(tmp_path / "old.db", "born DATE, seen TIMESTAMP",
                 [("1500-03-01", "1200-06-01 12:00:00"), ("2000-01-01", "2000-01-01 00:00:00")])
    result = upload(emulator, db, tmp_path / "state", schema, "--timestamp-col", "ts")
    assert uploaded_in(result.stderr) == 2, result.stderr[-3000:]
    rows = query(emulator, f"SELECT id, born, seen FROM `{schema}`.`readings` ORDER BY id")
    assert [(r["born"], r["seen"]) for r in rows] == [
        (date(1500, 3, 1), datetime(1200, 6, 1, 12, tzinfo=timezone.utc)),
        (date(2000, 1, 1), datetime(2000, 1, 1, tzinfo=timezone.utc))]


@pytest.mark.parametrize("path", list(PATHS))
def test_decimal_column_gets_decimals_and_a_value_too_big_stops_with_exit_2(emulator: Emulator, schema: str,
                                                                             tmp_path: Path, path: str) -> None:
    query(emulator, f"CREATE SCHEMA IF NOT EXISTS `{schema}`")
    query(emulator, f"CREATE TABLE `{schema}`.`readings` (id BIGINT, ts TIMESTAMP, amount DECIMAL(10,2))")
    db = make_db(tmp_path / "money.db", "amount REAL", [(1.005,), (12.5,)])
    state = tmp_path / "state"
    upload(emulator, db, state, schema, "--timestamp-col", "ts", *PATHS[path])
    with sqlite3.connect(db) as connection:
        connection.execute("INSERT INTO readings VALUES (3, '2024-01-15 10:00:03', 123456789012.5)")
    connection.close()
    refused = upload(emulator, db, state, schema, "--timestamp-col", "ts", *PATHS[path], expect=2)
    errors = errors_in(refused.stderr)
    assert len(errors) == 1 and "'amount'" in errors[0] and "DECIMAL(10,2)" in errors[0], refused.stderr[-3000:]
    rows = query(emulator, f"SELECT id, amount FROM `{schema}`.`readings` ORDER BY id")
    # Rounded half up as Databricks' CAST does; the refused row is not there, nothing twice.
    assert [(r["id"], r["amount"]) for r in rows] == [(1, Decimal("1.01")), (2, Decimal("12.50"))]
