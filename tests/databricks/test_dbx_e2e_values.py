"""Every kind of value survives the trip exactly, on both load paths (bulk COPY INTO through the
staging volume, and the INSERT path), read back through the connector and from the Parquet files.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from dbx_e2e import (
    assert_same_rows,
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

UTC = timezone.utc
# Several MB of text mixing 1- to 4-byte UTF-8 characters, combining marks, quotes and NUL.
LONG_TEXT = "".join(f"{i:07d} Grüße 🌍 漢字 e\u0301 'q' \"dq\" \\ \x00 \n" for i in range(90_000))

SCHEMA_SQL = """CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    ts TIMESTAMP,          -- the cursor column
    r REAL,
    t TEXT,
    b BLOB,
    flag BOOLEAN,
    big INTEGER,
    n INTEGER,             -- also holds a text value
    d DATE,
    at DATETIME,           -- timestamps in every style
    note VARCHAR(40),
    "select" TEXT,         -- a reserved word as column name
    raw                    -- no declared type, BLOB values
)"""
COLUMNS = ["id", "ts", "r", "t", "b", "flag", "big", "n", "d", "at", "note", "select", "raw"]

# (value stored in SQLite, value expected in Databricks -- None: the same value) per column, row by row.
VALUES: list[dict[str, tuple[Any, Any]]] = [
    {},  # row 1: everything NULL but id and ts
    {"r": (float("nan"), None),  # SQLite stores NaN as NULL
     "t": ("😀🎉 漢字かな한국어 e\u0301 n\u0303 \U0001F468\u200D\U0001F469\u200D\U0001F467 \u202Eabc", None),
     "b": (b"\x00\x01\x02\x00", None), "flag": (1, True), "big": (2**53 + 1, None), "n": (5, None),
     "d": ("2024-02-29", date(2024, 2, 29)),
     "at": ("2024-01-15 14:30:00.123456", datetime(2024, 1, 15, 14, 30, 0, 123456, UTC)),
     "note": ("plain", None), "select": ("from", None), "raw": (b"\x00raw\xff", None)},
    {"r": (float("inf"), None),
     "t": ("it's \"quoted\" \\back\\slash\\ \nnew\r\nline\ttab \x00 nul \\x00 \\\\' '' \\'", None),
     "b": (b"", None), "flag": (0, False), "big": (-(2**53 + 1), None), "n": ("abc", None),  # -> NULL + warning
     "d": ("1970-01-01", date(1970, 1, 1)),
     "at": ("2024-01-15T14:30:00.654321+05:30", datetime(2024, 1, 15, 9, 0, 0, 654321, UTC)),
     "note": ("", None), "raw": (b"", None)},
    {"r": (float("-inf"), None), "t": (LONG_TEXT, None), "b": (bytes(range(256)) * 4, None), "flag": (1, True),
     "big": (2**63 - 1, None), "n": (7, None), "d": ("9999-12-31", date(9999, 12, 31)),
     "at": ("2024-01-15T23:59:59.999999Z", datetime(2024, 1, 15, 23, 59, 59, 999999, UTC)),
     "note": ("x" * 40, None)},
    {"r": (1.7976931348623157e308, None), "t": ("", None), "b": (b"\xff" * 1000, None), "flag": (0, False),
     "big": (-(2**63), None), "d": ("2000-01-01", date(2000, 1, 1)),
     "at": ("1999-12-31T23:00:00-01:00", datetime(2000, 1, 1, 0, 0, 0, tzinfo=UTC))},
    {"r": (5e-324, None), "t": ("' OR 1=1; DROP TABLE readings; --", None), "b": (b"'", None),
     "big": (0, None), "n": (0, None), "at": (1700000000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
     "select": ("`; DROP TABLE x; `", None)},
    {"r": (3.141592653589793, None), "t": ("CAST(X'00' AS STRING) ${var} :name ? %s {0} \u2028\u2029", None),
     "b": (b"\\", None), "flag": (1, True), "big": (2**63 - 2, None), "n": (-1, None),
     "at": ("2024-06-01 12:00:00.000001", datetime(2024, 6, 1, 12, 0, 0, 1, UTC))},
    {"r": (-2.5e-10, None), "t": ("\U0010FFFF \uFFFD \u00A0 \u200B zero-width", None), "b": (b"\x00" * 64, None),
     "big": (-(2**62), None), "n": (2**62, None),
     "at": ("2024-02-29T00:00:00.5+00:00", datetime(2024, 2, 29, 0, 0, 0, 500000, UTC))},
]


def _source_rows() -> list[tuple]:
    rows = []
    for index, values in enumerate(VALUES, start=1):
        row = {"id": index, "ts": f"2024-01-15 14:30:{index:02d}"}
        row.update({k: v[0] for k, v in values.items()})
        rows.append(tuple(row.get(c) for c in COLUMNS))
    return rows


def _expected(column: str, stored: Any, wanted: Any) -> Any:
    if wanted is not None:
        return wanted
    if column == "r" and stored != stored:
        return None  # NaN: SQLite already stored NULL
    if column == "n" and not isinstance(stored, int):
        return None  # text in an INTEGER column: documented as NULL with a warning
    return stored  # everything else arrives exactly as SQLite holds it


def _expected_rows() -> list[dict[str, Any]]:
    expected = []
    for index, values in enumerate(VALUES, start=1):
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row["id"], row["ts"] = index, datetime(2024, 1, 15, 14, 30, index, tzinfo=UTC)
        row.update({column: _expected(column, *pair) for column, pair in values.items()})
        stored_n = values.get("n", (None,))[0]
        row["n__original"] = stored_n if stored_n is not None and not isinstance(stored_n, int) else None
        expected.append(row)
    return expected


EXPECTED_TYPES = {"id": "BIGINT", "ts": "TIMESTAMP", "r": "DOUBLE", "t": "STRING", "b": "BINARY",
                  "flag": "BOOLEAN", "big": "BIGINT", "n": "BIGINT", "d": "DATE", "at": "TIMESTAMP",
                  "note": "STRING", "select": "STRING", "raw": "BINARY",
                  "n__original": "STRING"}  # the text that did not fit n, kept
PATHS = {
    "copy": (),  # the default: PUT into the staging volume, COPY INTO
    "insert": ("--staging-volume", "none", "--lineage-columns", "batch_id"),
}


@pytest.fixture(scope="module")
def loads(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same source loaded once per path into its own table (of one schema)."""
    work = tmp_path_factory.mktemp("values")
    source = work / "values.db"
    with sqlite3.connect(source) as connection:
        connection.execute(SCHEMA_SQL)
        connection.executemany(f"INSERT INTO readings VALUES ({', '.join('?' * len(COLUMNS))})", _source_rows())
    results = {}
    for path, args in PATHS.items():
        db = work / f"{path}.db"
        shutil.copy(source, db)
        results[path] = upload(emulator, db, work / f"state_{path}", "e2e_values", "--timestamp-col", "ts",
                               "--databricks-table", f"readings_{path}", *args)
    return results


def test_source_is_what_the_test_means(tmp_path: Path) -> None:
    """Guard the fixture itself: SQLite kept what we meant (NaN becomes NULL, infinities stay REAL)."""
    db = tmp_path / "check.db"
    with sqlite3.connect(db) as connection:
        connection.execute(SCHEMA_SQL)
        connection.executemany(f"INSERT INTO readings VALUES ({', '.join('?' * len(COLUMNS))})", _source_rows())
        kinds = dict(connection.execute("SELECT id, typeof(r) FROM readings").fetchall())
        long_text = connection.execute("SELECT t FROM readings WHERE id = 4").fetchone()[0]
    assert kinds[2] == "null" and kinds[3] == kinds[4] == "real"
    assert long_text == LONG_TEXT and len(LONG_TEXT.encode()) > 3_000_000


@pytest.mark.parametrize("path", list(PATHS))
def test_created_table_has_the_documented_types(emulator: Emulator, loads: dict, path: str) -> None:
    types = column_types(emulator, f"e2e_values.readings_{path}")
    types.pop("_batch_id", None)
    assert types == EXPECTED_TYPES


@pytest.mark.parametrize("path", list(PATHS))
def test_every_value_survives_the_trip(emulator: Emulator, loads: dict, path: str) -> None:
    assert uploaded_in(loads[path].stderr) == len(VALUES)
    rows = both_views(emulator, "e2e_values", f"readings_{path}")
    assert_same_rows(rows, _expected_rows(), f"{path} path", ignore=["_batch_id"])


@pytest.mark.parametrize("path", list(PATHS))
def test_text_in_an_integer_column_is_null_with_a_warning(loads: dict, path: str) -> None:
    warnings = [line for line in loads[path].stderr.splitlines() if "did not fit its type" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and "'n'" in warnings[0], loads[path].stderr
    assert warnings[0].split(" WARNING ")[1].startswith("1 value(s)")


def test_both_paths_give_identical_contents(emulator: Emulator, loads: dict) -> None:
    by_copy = both_views(emulator, "e2e_values", "readings_copy")
    by_insert = both_views(emulator, "e2e_values", "readings_insert")
    assert_same_rows(by_insert, by_copy, "INSERT path vs COPY INTO path", ignore=["_batch_id"])
    assert {row["_batch_id"] is not None for row in by_insert} == {True}


def test_insert_path_without_batch_id_is_refused(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db, state = make_sensor_db(tmp_path / "sensor.db", 30), tmp_path / "state"

    refused = upload(emulator, db, state, schema, "--staging-volume", "none", expect=2)
    errors = [line for line in refused.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "batch_id" in errors[0] and "lineage_columns" in errors[0], refused.stderr
    tables = {row["tableName"] for row in query(emulator, f"SHOW TABLES IN `{schema}`")}
    if "sensor_logs" in tables:
        assert query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`sensor_logs`") == [{"n": 0}]

    # Following the message loads everything, once, in multi-row statements (not one per row).
    before = emulator.stats()
    upload(emulator, db, state, schema, "--staging-volume", "none", "--lineage-columns", "batch_id")
    sent = stat_delta(before, emulator.stats())
    assert sent.get("INSERT", 0) <= 4 and sent.get("COPY INTO", 0) == sent.get("PUT", 0) == 0, sent
    rows = both_views(emulator, schema, "sensor_logs")
    assert_same_rows(rows, expected_sensor_rows(db), "after adding batch_id", ignore=["_batch_id"])
