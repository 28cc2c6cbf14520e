"""Both SQLite readers load the same Delta table: `sqlite_reader: native` (the default: batches read
straight into Arrow, timestamps normalized by Arrow compute) and `python` (every value through
Python's sqlite3). The source is the sample database (all six timestamp forms, ties, NULLs) with
rows appended whose values sit on the edges of the forms the native reader converts itself, and
values of other storage classes than their columns' (read through Python for that batch).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from make_sample_db import make_sample_db
from uploader_testkit import clean_env, read_delta, run_uploader

EDGE_TIMESTAMPS = [
    # text: days and times that do not exist, years 0000/0001/9999, other spellings
    "2023-02-29 00:00:00", "2024-02-29 12:00:00", "2024-01-01 24:00:00", "2024-01-01 23:59:60",
    "0000-01-01 00:00:00", "0000-12-31 23:59:00.123-00:30", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999",
    "2024-01-01T10:00:00.1234567",
    "2024-01-01T10:00:00.5Z", "2024-01-01 10:00:00+12:60", "2024-01-01 10:00:00+24:00", "2024-01-01 10:00:00-00:30",
    "2024-01-01 10:00:00+0530", "2024-01-01t10:00:00", " 2024-01-01 10:00:00", "2024-01-01 10:00", "2024-01-01",
    "１２３４-01-01 00:00:00", "2024-01-15 14:30:00 +0000 UTC", "1705329000", "1705329000.5", "2460325.1", "n/a", "",
    # integers: every magnitude boundary, both signs, 64-bit extremes, Julian day bounds
    0, 1, -1, 9_999_999, 10_000_000, -10_000_000, 1705329000, -1705329000, 99_999_999_999, 100_000_000_000,
    -100_000_000_000, 1705329000123, 99_999_999_999_999, 100_000_000_000_000, 1705329000123456, -1705329000123456,
    2**53 + 1, 2**63 - 1, -(2**62), 1721425, 1721426, 5373484, 5373485, 2460325,
    # reals: Julian days, unix seconds with fractions (ties to even), bounds, infinities
    2460325.5, 2460325.123456789, 1721425.5, 1721425.4, 5373484.49, 5373484.5, 1e7, 1705329000.0000005,
    1705329000.5, -1705329000.25, 99_999_999_999.9, 1e11, 1.7e14, 1e300, float("inf"), float("-inf"), 0.0, 1.5,
    # blobs
    b"2024-01-01 10:00:00", b"\xff",
]
# (temperature REAL, humidity REAL, status TEXT, device_id TEXT): other storage classes
EDGE_VALUES = [(2**53 + 1, 5, 7, b"blob-device"), (2**60, None, 1.5, "d"), ("warm", 2.5, "ok", "d"),
               (None, 3, None, "d")]


def build(path: Path) -> Path:
    make_sample_db(path, 2000, seed=11)
    connection = sqlite3.connect(path)
    with connection:
        edges = [("edge", ts, 20.5, 40.0, "ok") for ts in EDGE_TIMESTAMPS]
        edges += [(device, "2024-01-01 10:00:00", t, h, s) for t, h, s, device in EDGE_VALUES]
        connection.executemany("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) "
                               "VALUES (?, ?, ?, ?, ?)", edges)
    connection.close()
    return path


def load_with_both_readers(db: Path, tmp_path: Path, *args: str) -> tuple[dict, dict]:
    tables, warnings = {}, {}
    for reader in ("native", "python"):
        result = run_uploader("--sqlite", str(db), "--state-dir", str(tmp_path / reader / "state"),
                              "--delta-path", str(tmp_path / reader / "lake"), "--once", "--batch-size", "500",
                              "--sqlite-reader", reader, *args, env=clean_env())
        assert result.returncode == 0, result.stderr[-4000:]
        tables[reader] = read_delta(tmp_path / reader / "lake").sort_by("id")
        warnings[reader] = sorted(line.split(" WARNING ", 1)[-1] for line in result.stderr.splitlines()
                                  if " WARNING " in line)
    return tables, warnings


def test_native_and_python_readers_land_the_same_table(tmp_path):
    db = build(tmp_path / "sample.db")
    tables, warnings = load_with_both_readers(db, tmp_path)
    assert tables["native"].num_rows == 2000 + len(EDGE_TIMESTAMPS) + len(EDGE_VALUES)
    assert tables["native"].schema == tables["python"].schema
    assert tables["native"].to_pylist() == tables["python"].to_pylist()
    assert warnings["native"] == warnings["python"]


def test_integer_times_read_natively_keep_nanoseconds_and_unreadable_values(tmp_path):
    """An INTEGER time column the driver reads as int64 (converted by Arrow compute): nanosecond
    epochs, the 2**63-1 sentinel and values of no readable form land as with the Python reader,
    the unreadable ones NULL with their stored value in <column>__original."""
    db = tmp_path / "ints.db"
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, ts INTEGER, at TIME, big NUMERIC)")
        stamps = [1705329000123456789 + i * 1_001 for i in range(50)] + [10**18, 2**63 - 1, 0, -5, 1705329000]
        connection.executemany("INSERT INTO m (ts, at, big) VALUES (?, '14:30:00', ?)",
                               [(ts, 2**60 + i) for i, ts in enumerate(stamps)])
    connection.close()
    tables, warnings = load_with_both_readers(db, tmp_path, "--timestamp-col", "ts")
    native = tables["native"]
    assert native.schema == tables["python"].schema
    assert native.to_pylist() == tables["python"].to_pylist()
    assert warnings["native"] == warnings["python"]
    rows = native.to_pylist()
    assert rows[0]["ts"].isoformat() == "2024-01-15T14:30:00.123456+00:00"
    assert [r["ts__original"] for r in rows if r["ts"] is None] == [str(2**63 - 1), "0", "-5"]
    assert {r["at"] for r in rows} == {"14:30:00"} and rows[-1]["big"] == 2**60 + 54
