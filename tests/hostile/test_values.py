"""Hostile values, on the Delta target and on Databricks (both load paths): TEXT with backslashes,
quotes, NUL characters and invalid UTF-8, a 10 MB string, BLOBs, huge and negative integers, REAL
infinities, SQLite's dynamic typing (text, reals and blobs in INTEGER/REAL/BOOLEAN/DATE/TEXT
columns), and timestamps in every storage form, before 1970, far in the future, with and without
offsets, and garbage.

One database holds every case, one case per row (the other columns NULL), so a mismatch names its
case; each target gets one load. Expected values are written out here, never computed by the
uploader's code: the value exactly, or the README's conversion (a value its column's type cannot
hold is NULL and counted in a WARNING; an unreadable timestamp is NULL and counted).
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from .kit import (
    UTC,
    Emulator,
    Place,
    _delta_table,
    assert_same_rows,
    base_env,
    both_views,
    dbx_upload,
    make_db,
    read_delta_rows,
    warning_lines,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = datetime(2024, 1, 15, 14, 30, tzinfo=UTC)


@dataclass(frozen=True)
class Sql:
    """A value SQLite must build itself (Python cannot bind invalid UTF-8 as TEXT)."""

    expression: str


@dataclass(frozen=True)
class Case:
    name: str
    column: str
    stored: Any
    expected: Any  # what must land; None = NULL
    nulled: bool = False  # counted in the "did not fit its type" warning of its column
    also: tuple = ()  # other acceptable outcomes (where the README leaves the conversion open)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def seconds(value: float) -> datetime:
    return EPOCH + timedelta(seconds=value)


BACKSLASHES = "\\ \\\\ \\n \\x00 \\u0000 \\' \\\" C:\\path\\"
_LINE = "{:08d} äöü 漢字 😀 \\ ' \" \x00 \n"
TEN_MB = "".join(_LINE.format(i) for i in range(10 * 2**20 // len(_LINE.format(0).encode()) + 1))
HALF_MB = TEN_MB[: 2**19 // 2]
RANDOM_BLOB = random.Random(5).randbytes(2**20)

CASES: list[Case] = [
    # --- the cursor column, no declared type: every storage class stays as written
    Case("ts text space", "ts", "2024-01-15 14:30:00", T),
    Case("ts text T micro Z", "ts", "2024-01-15T14:30:00.123456Z", T + timedelta(microseconds=123456)),
    Case("ts offset +02:00", "ts", "2024-01-15T16:30:00+02:00", T),
    Case("ts offset -0530", "ts", "2024-01-15T09:00:00-0530", T),
    Case("ts nanoseconds", "ts", "2024-01-15 14:30:00.123456789", T + timedelta(microseconds=123456)),
    Case("ts date only", "ts", "2024-01-15", utc(2024, 1, 15)),
    Case("ts no seconds", "ts", "2024-01-15 14:30", T),
    Case("ts just before 1970", "ts", "1969-12-31 23:59:59.999999", utc(1969, 12, 31, 23, 59, 59, 999999)),
    Case("ts 1969 with offset", "ts", "1969-07-20T20:17:40-04:00", utc(1969, 7, 21, 0, 17, 40)),
    Case("ts 1900", "ts", "1900-01-01 00:00:00", utc(1900, 1, 1)),
    Case("ts year 1", "ts", "0001-01-01 00:00:00", utc(1, 1, 1)),
    Case("ts 2100 Z", "ts", "2100-01-01T00:00:00Z", utc(2100, 1, 1)),
    Case("ts past pandas ns", "ts", "2262-04-12 00:00:00", utc(2262, 4, 12)),
    Case("ts year 9999", "ts", "9999-12-31 23:59:59.999999", utc(9999, 12, 31, 23, 59, 59, 999999)),
    Case("ts int seconds", "ts", 1705329000, T),
    Case("ts int millis", "ts", 1705329000123, T + timedelta(milliseconds=123)),
    Case("ts int micros", "ts", 1705329000123456, T + timedelta(microseconds=123456)),
    Case("ts int seconds 1938", "ts", -1_000_000_000, seconds(-1_000_000_000)),
    Case("ts int millis 1938", "ts", -1_000_000_000_000, seconds(-1_000_000_000)),
    Case("ts int seconds 2100", "ts", 4102444800, utc(2100, 1, 1)),
    Case("ts int julian day", "ts", 2460326, utc(2024, 1, 16, 12)),
    Case("ts real julian day", "ts", 2460325.1041666665, T),
    Case("ts real julian 1900", "ts", 2415020.5, utc(1900, 1, 1)),
    Case("ts real unix seconds", "ts", 1705329000.5, T + timedelta(milliseconds=500)),
    Case("ts real unix 1938", "ts", -1000000000.25, seconds(-1000000000.25)),
    Case("ts text seconds", "ts", "1705329000", T),
    Case("ts text millis", "ts", "1705329000123", T + timedelta(milliseconds=123)),
    Case("ts blob text", "ts", b"2024-01-15 14:30:00", T),
    # unreadable: NULL, counted, never blocking
    Case("ts null", "ts", None, None),
    Case("ts empty", "ts", "", None),
    Case("ts garbage", "ts", "garbage", None),
    Case("ts feb 30", "ts", "2024-02-30 00:00:00", None),
    Case("ts time only", "ts", "24:00:00", None),
    Case("ts year 10000", "ts", "10000-01-01", None),
    Case("ts real inf", "ts", float("inf"), None),
    Case("ts real -inf", "ts", float("-inf"), None),
    Case("ts int64 max", "ts", 2**63 - 1, None),
    Case("ts blob garbage", "ts", b"\xff\xfe", None),
    Case("ts now", "ts", "now", None),
    # --- a declared DATETIME column (NUMERIC affinity turns numeric text into numbers)
    Case("at offset", "at", "2024-01-15T16:30:00+02:00", T),
    Case("at numeric text", "at", "1705329000", T),
    Case("at julian", "at", 2460325.1041666665, T),
    Case("at garbage", "at", "garbage", None, nulled=True),
    # --- TEXT
    Case("text backslashes", "t", BACKSLASHES, BACKSLASHES),
    Case("text quotes", "t", "it's \"q\" '' \"\" `b` ``", "it's \"q\" '' \"\" `b` ``"),
    Case("text nul inside", "t", "a\x00b\x00\x00c", "a\x00b\x00\x00c"),
    Case("text only nul", "t", "\x00", "\x00"),
    Case("text empty", "t", "", ""),
    Case("text blanks", "t", " \t\r\n ", " \t\r\n "),
    Case("text injection", "t", "'); DROP TABLE vals; -- ${x} %s ? :p {0} CAST(X'00' AS STRING)",
         "'); DROP TABLE vals; -- ${x} %s ? :p {0} CAST(X'00' AS STRING)"),
    Case("text emoji zwj rtl", "t", "👨\u200d👩\u200d👧 \u202eabc \U0010ffff \ufeff",
         "👨\u200d👩\u200d👧 \u202eabc \U0010ffff \ufeff"),
    Case("text 10 MB", "t", TEN_MB, TEN_MB),
    Case("text invalid utf-8", "t", Sql("CAST(X'66FF6F' AS TEXT)"), "f\ufffdo"),
    Case("text truncated utf-8", "t", Sql("CAST(X'61C3' AS TEXT)"), "a\ufffd"),
    Case("text encoded surrogate", "t", Sql("CAST(X'EDA080' AS TEXT)"), "\ufffd\ufffd\ufffd"),
    # --- dynamic typing: a BLOB in a TEXT column
    Case("text column, utf-8 blob", "t2", b"plain text in a blob", "plain text in a blob"),
    # Bytes that are not UTF-8 cannot be text: replaced (as for invalid TEXT) or NULL, and told.
    Case("text column, binary blob", "t2", b"\xff\x00\xfe", "\ufffd\x00\ufffd", nulled=True, also=(None,)),
    # --- BLOB
    Case("blob empty", "b", b"", b""),
    Case("blob nul", "b", b"\x00", b"\x00"),
    Case("blob every byte", "b", bytes(range(256)), bytes(range(256))),
    Case("blob 1 MB random", "b", RANDOM_BLOB, RANDOM_BLOB),
    Case("blob column, text", "b", "hello", b"hello"),
    # --- INTEGER
    Case("int max", "i", 2**63 - 1, 2**63 - 1),
    Case("int min", "i", -(2**63), -(2**63)),
    Case("int zero", "i", 0, 0),
    Case("int minus one", "i", -1, -1),
    Case("int column, text", "i", "abc", None, nulled=True),
    Case("int column, fraction", "i", 1.5, None, nulled=True),
    Case("int column, blob", "i", b"\x01", None, nulled=True),
    # --- REAL
    Case("real inf", "r", float("inf"), float("inf")),
    Case("real -inf", "r", float("-inf"), float("-inf")),
    Case("real max", "r", 1.7976931348623157e308, 1.7976931348623157e308),
    Case("real denormal", "r", 5e-324, 5e-324),
    Case("real tiny negative", "r", -1e-300, -1e-300),
    Case("real column, int64 max", "r", 2**63 - 1, 9.223372036854776e18),  # REAL affinity converts
    Case("real column, text", "r", "abc", None, nulled=True),
    Case("real column, blob", "r", b"\x00", None, nulled=True),
    # --- BOOLEAN
    Case("bool one", "flag", 1, True),
    Case("bool zero", "flag", 0, False),
    Case("bool text true", "flag", "true", True),
    Case("bool text no", "flag", "no", False),
    Case("bool two", "flag", 2, None, nulled=True),
    Case("bool text maybe", "flag", "maybe", None, nulled=True),
    # --- DATE
    Case("date leap day", "d", "2024-02-29", date(2024, 2, 29)),
    Case("date 1900", "d", "1900-01-01", date(1900, 1, 1)),
    Case("date year 1", "d", "0001-01-01", date(1, 1, 1)),
    Case("date year 9999", "d", "9999-12-31", date(9999, 12, 31)),
    Case("date garbage", "d", "garbage", None, nulled=True),
    Case("date feb 30", "d", "2024-02-30", None, nulled=True),
]

DDL = """CREATE TABLE vals (
    id INTEGER PRIMARY KEY,
    ts,            -- the cursor column: no declared type, so SQLite keeps every storage class
    at DATETIME,
    t TEXT,
    t2 TEXT,
    b BLOB,
    i INTEGER,
    r REAL,
    flag BOOLEAN,
    d DATE
)"""
COLUMNS = ["id", "ts", "at", "t", "t2", "b", "i", "r", "flag", "d"]
# The INSERT path renders a value as a literal of its UTF-8 in hex: the 10 MB text would be one
# 20 MB statement, far above the path's 0.9 MB statement budget, which the emulator's Spark parses
# for minutes before dropping the connection. That path gets a half-megabyte text in its place.
SMALLER_TEXT = [Case("text half MB", "t", HALF_MB, HALF_MB) if c.name == "text 10 MB" else c for c in CASES]
UNREADABLE_TS = sum(1 for c in CASES if c.column == "ts" and c.expected is None)
NULLED = Counter(c.column for c in CASES if c.nulled)


def default_ts(row_id: int) -> str:
    return (utc(2024, 6, 1) + timedelta(seconds=row_id)).strftime("%Y-%m-%d %H:%M:%S")


def build_source(path: Path, cases: list[Case] = CASES) -> Path:
    make_db(path, DDL)
    connection = sqlite3.connect(path)
    try:
        for row_id, case in enumerate(cases, start=1):
            values = dict.fromkeys(COLUMNS)
            values["id"] = row_id
            values["ts"] = default_ts(row_id)
            values[case.column] = case.stored
            if isinstance(case.stored, Sql):
                values[case.column] = None
            connection.execute(f"INSERT INTO vals VALUES ({', '.join('?' * len(COLUMNS))})",
                               [values[c] for c in COLUMNS])
            if isinstance(case.stored, Sql):
                connection.execute(f"UPDATE vals SET {case.column} = {case.stored.expression} WHERE id = ?", (row_id,))
        connection.commit()
    finally:
        connection.close()
    return path


def expected_rows(cases: list[Case] = CASES) -> list[dict[str, Any]]:
    rows = []
    for row_id, case in enumerate(cases, start=1):
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row["id"] = row_id
        row["ts"] = datetime.fromisoformat(default_ts(row_id)).replace(tzinfo=UTC)
        row[case.column] = case.expected
        rows.append(row)
    return rows


def check_rows(actual: list[dict], what: str, ignore: tuple[str, ...] = (), cases_: list[Case] = CASES) -> None:
    """Row by row; a mismatch is reported with its case's name."""
    expected = expected_rows(cases_)
    cases = dict(enumerate(cases_, start=1))
    assert [r["id"] for r in actual] == [r["id"] for r in expected], f"{what}: rows missing or extra"
    problems = []
    for got, want in zip(actual, expected):
        case = cases[want["id"]]
        problems += kept_originals(got, case)
        if got.get(case.column) in case.also:
            want = dict(want, **{case.column: got[case.column]})
        try:
            assert_same_rows([got], [want], what, ignore=ignore)
        except AssertionError as exc:
            problems.append(f"case {case.name!r}: {str(exc).splitlines()[-1]}")
    assert not problems, f"{what}: {len(problems)} case(s) differ:\n" + "\n".join(problems)


def kept_originals(got: dict, case: Case) -> list[str]:
    """A value loaded as NULL has its stored text in <column>__original (and only such a value):
    checked, then those columns are taken out of the row."""
    problems = []
    for key in [k for k in got if k.endswith("__original")]:
        kept, column = got.pop(key), key.removesuffix("__original")
        if kept is not None and (column != case.column or got.get(column) is not None):
            problems.append(f"case {case.name!r}: {key} holds {kept!r} but {column} was not nulled")
        if kept is None and column == case.column and got.get(column) is None and case.stored is not None:
            problems.append(f"case {case.name!r}: {column} was nulled but its value is not kept in {key}")
    return problems


def check_warnings(stderr: str) -> None:
    warnings = warning_lines(stderr)
    text = "\n".join(warnings)
    assert f"{UNREADABLE_TS} row(s) had a NULL or unreadable timestamp" in text, text
    for column, count in NULLED.items():
        if column == "t2":
            continue  # checked below: how the message is worded is the uploader's choice
        assert f"{count} value(s) of column '{column}' did not fit its type" in text, (column, text)
    assert any("UTF-8" in w for w in warnings), f"no warning about invalid UTF-8:\n{text}"
    assert any("'t2'" in w for w in warnings), f"nothing tells that a BLOB in TEXT column t2 was altered:\n{text}"


def test_source_holds_what_the_cases_mean(tmp_path):
    db = build_source(tmp_path / "vals.db")
    connection = sqlite3.connect(db)
    try:
        kinds = {row_id: (typeof_ts, typeof_i, typeof_t) for row_id, typeof_ts, typeof_i, typeof_t in
                 connection.execute("SELECT id, typeof(ts), typeof(i), typeof(t) FROM vals")}
    finally:
        connection.close()
    by_name = {case.name: kinds[row_id] for row_id, case in enumerate(CASES, start=1)}
    assert by_name["ts int julian day"][0] == "integer" and by_name["ts real julian day"][0] == "real"
    assert by_name["ts text seconds"][0] == "text" and by_name["ts blob text"][0] == "blob"
    assert by_name["int column, fraction"][1] == "real" and by_name["int column, text"][1] == "text"
    assert by_name["text invalid utf-8"][2] == "text" and by_name["text 10 MB"][2] == "text"
    assert len(TEN_MB.encode()) >= 10 * 2**20


# ---------------------------------------------------------------------------------------------
# Delta
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def delta_load(tmp_path_factory: pytest.TempPathFactory) -> tuple[Place, Any]:
    root = tmp_path_factory.mktemp("values_delta")
    place = Place(root, build_source(root / "src" / "vals.db"), table="vals")
    return place, place.run("--timestamp-col", "ts", "--batch-size", "40")


def test_every_value_lands_in_delta(delta_load):
    place, result = delta_load
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Traceback" not in result.stderr
    check_rows(read_delta_rows(place.lake), "Delta")


def test_delta_load_warns_about_every_altered_value(delta_load):
    _place, result = delta_load
    assert result.returncode == 0, result.stderr[-6000:]
    check_warnings(result.stderr)


def test_delta_rerun_uploads_nothing(delta_load):
    place, result = delta_load
    assert result.returncode == 0, result.stderr[-6000:]
    again = place.run("--timestamp-col", "ts", "--batch-size", "40")
    assert again.returncode == 0, again.stderr
    assert "0 read, 0 uploaded" in again.stderr
    assert len(read_delta_rows(place.lake)) == len(CASES)


def test_both_sqlite_readers_land_the_same_delta_table(delta_load, tmp_path):
    """The native reader (the default, above) and the Python reader: the same table, the same warnings."""
    place, result = delta_load
    assert result.returncode == 0, result.stderr[-6000:]
    python = Place(tmp_path, place.db, table="vals")
    again = python.run("--timestamp-col", "ts", "--batch-size", "40", "--sqlite-reader", "python")
    assert again.returncode == 0, again.stderr[-6000:]
    assert _delta_table(python.lake).schema == _delta_table(place.lake).schema
    assert read_delta_rows(python.lake) == read_delta_rows(place.lake)
    def messages(stderr: str) -> list[str]:  # without the time of day
        return sorted(line.split(" WARNING ", 1)[-1] for line in warning_lines(stderr))

    assert messages(again.stderr) == messages(result.stderr)


# ---------------------------------------------------------------------------------------------
# Databricks, both load paths
# ---------------------------------------------------------------------------------------------

PATHS = {"copy": (), "insert": ("--staging-volume", "none", "--lineage-columns", "batch_id")}
PATH_CASES = {"copy": CASES, "insert": SMALLER_TEXT}


@pytest.fixture(scope="module")
def dbx_loads(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("values_dbx")
    results = {}
    for path, args in PATHS.items():
        db = build_source(root / f"{path}.db", PATH_CASES[path])
        env = base_env(emulator, DATABRICKS_RETRY_TIMEOUT="120")  # Spark is slow with big statements
        results[path] = dbx_upload(emulator, db, root / f"state_{path}", "hostile_values", "--timestamp-col", "ts",
                                   "--databricks-table", f"vals_{path}", "--batch-size", "40", *args, env=env)
    return results


@pytest.mark.parametrize("path", list(PATHS))
def test_every_value_lands_in_databricks(emulator: Emulator, dbx_loads, path):
    result = dbx_loads[path]
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Traceback" not in result.stderr
    check_rows(both_views(emulator, "hostile_values", f"vals_{path}"), f"Databricks, {path} path",
               ignore=("_batch_id",), cases_=PATH_CASES[path])


@pytest.mark.parametrize("path", list(PATHS))
def test_databricks_load_warns_about_every_altered_value(dbx_loads, path):
    result = dbx_loads[path]
    assert result.returncode == 0, result.stderr[-6000:]
    check_warnings(result.stderr)


# ---------------------------------------------------------------------------------------------
# An INTEGER column holding REALs beyond the 64-bit range (SQLite stores '99999999999999999999' as
# REAL 1e20): NULL and counted like any value its type cannot hold. A table of its own, so that a
# crash here does not hide the rest of the corpus.
# ---------------------------------------------------------------------------------------------

def huge_db(path: Path) -> Path:
    return make_db(path, "CREATE TABLE big (id INTEGER PRIMARY KEY, ts TEXT, i INTEGER)",
                   rows=[(1, "2024-05-01 10:00:00", "99999999999999999999"), (2, "2024-05-01 10:00:01", -9.3e18),
                         (3, "2024-05-01 10:00:02", 5)],
                   insert_sql="INSERT INTO big VALUES (?, ?, ?)")


HUGE_EXPECTED = [(1, None), (2, None), (3, 5)]


def test_integer_column_holding_reals_beyond_int64_on_delta(tmp_path):
    place = Place(tmp_path, huge_db(tmp_path / "src" / "big.db"), table="big")
    result = place.run()
    assert result.returncode == 0, result.stderr[-6000:]
    assert [(r["id"], r["i"]) for r in read_delta_rows(place.lake)] == HUGE_EXPECTED
    assert any("2 value(s) of column 'i' did not fit its type" in w for w in warning_lines(result)), result.stderr


def test_integer_column_holding_reals_beyond_int64_on_databricks(emulator: Emulator, tmp_path):
    db = huge_db(tmp_path / "src" / "big.db")
    result = dbx_upload(emulator, db, tmp_path / "state", "hostile_values", "--databricks-table", "big")
    assert result.returncode == 0, result.stderr[-6000:]
    assert [(r["id"], r["i"]) for r in both_views(emulator, "hostile_values", "big")] == HUGE_EXPECTED
    assert any("2 value(s) of column 'i' did not fit its type" in w for w in warning_lines(result)), result.stderr


# ---------------------------------------------------------------------------------------------
# A timestamp far in the future (a device with a bad clock) and the cursor
# ---------------------------------------------------------------------------------------------

def readings_db(path: Path, rows: list[tuple[int, str]]) -> Path:
    return make_db(path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, v REAL)",
                   rows=[(i, ts, float(i)) for i, ts in rows], insert_sql="INSERT INTO readings VALUES (?, ?, ?)")


@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_a_far_future_timestamp_does_not_silently_hide_later_rows(tmp_path, cursor):
    """One reading from 2099 is uploaded like any other. Rows written after it carry real (older)
    timestamps: in timestamp mode they are behind the cursor (the README's trade-off), which the
    user must at least be told about -- with the way out (cursor: rowid) -- instead of runs that
    report '0 read, 0 uploaded' for ever. In rowid mode they simply arrive."""
    db = readings_db(tmp_path / "src" / "clock.db", [(1, "2024-05-01 10:00:00"), (2, "2099-01-01 00:00:00"),
                                                     (3, "2024-05-01 10:00:05")])
    place = Place(tmp_path, db)
    first = place.run("--cursor", cursor)
    assert first.returncode == 0, first.stderr
    assert place.ids() == [1, 2, 3]
    make_db(db, "INSERT INTO readings VALUES (4, '2024-05-01 10:01:00', 4.0), (5, '2024-05-01 10:02:00', 5.0)")
    second = place.run("--cursor", cursor)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    if cursor == "rowid":
        assert place.ids() == [1, 2, 3, 4, 5]
        return
    if place.ids() == [1, 2, 3, 4, 5]:
        return  # uploading them is fine too
    assert place.ids() == [1, 2, 3], "rows were neither all uploaded nor all held back"
    told = [w for w in warning_lines(second) if "2 row" in w and "rowid" in w]
    assert told, ("2 rows are behind the cursor (older than the 2099 reading) and the run says nothing:\n"
                  + second.stderr[-3000:])
