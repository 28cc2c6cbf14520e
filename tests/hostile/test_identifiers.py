"""Hostile identifiers: table and column names with spaces, quotes, backticks, dots, unicode, SQL
keywords, leading digits, `x; DROP TABLE y`, names the uploader uses itself, and names that differ
only in case -- on the Delta target and on Databricks (the emulator).

What a user expects: every name arrives exactly as SQLite spells it (and is queried back under it),
or, when the target cannot hold a name, one clear error (exit 2) that names it and says which
setting to use -- never a statement that fails over and over in loop mode.
"""

from __future__ import annotations

import sqlite3
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from .kit import (
    UTC,
    Emulator,
    Place,
    assert_refused,
    assert_same_rows,
    both_views,
    clean_env,
    dbx_upload,
    delta_columns,
    delta_exists,
    make_db,
    no_progress_recorded,
    query,
    quote,
    read_delta_rows,
    schema_tables,
    sqlite_dicts,
    uploader_command,
)

# Column names that must survive as they are. "" (SQLite allows an empty quoted name), "# hash" (DESCRIBE
# TABLE starts its extra sections with '#' lines), a name that shadows rowid, and the aliases the
# uploader's own SQL uses (__l0, __upl_key, k, l0) are included.
HOSTILE_COLUMNS = [
    "a b", 'q"uote', "s'q", "back`tick", "dot.ted", "ünïcödé 漢字", "select", "from", "1st", "x; DROP TABLE y",
    "tab\tnew\nline", "  padded  ", "-- comment", "# hash", "a,b;{c}(d)=e", "😀", "", "__l0", "__upl_key", "k",
    "l0", "rowid",
]
KINDS = ["TEXT", "INTEGER", "REAL", "BLOB"]
BASE = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def _value(kind: str, row: int, column: int) -> object:
    return {"TEXT": f"{row}:{column}:'\"`;", "INTEGER": row * 1000 + column, "REAL": row + column / 8,
            "BLOB": bytes([row % 256, column % 256, 0, 255])}[kind]


def hostile_columns_db(path: Path, table: str = "readings") -> Path:
    columns = ", ".join(f"{quote(name)} {KINDS[i % 4]}" for i, name in enumerate(HOSTILE_COLUMNS))
    return make_db(path, f"CREATE TABLE {quote(table)} (id INTEGER PRIMARY KEY, ts TEXT, {columns})")


def add_rows(db: Path, ids_and_moments: list[tuple[int, datetime]], table: str = "readings") -> None:
    names = ", ".join(quote(n) for n in ["id", "ts", *HOSTILE_COLUMNS])
    marks = ", ".join("?" for _ in range(len(HOSTILE_COLUMNS) + 2))
    rows = [(i, moment.strftime("%Y-%m-%d %H:%M:%S"),
             *(_value(KINDS[c % 4], i, c) for c in range(len(HOSTILE_COLUMNS)))) for i, moment in ids_and_moments]
    connection = sqlite3.connect(db)
    try:
        connection.executemany(f"INSERT INTO {quote(table)} ({names}) VALUES ({marks})", rows)
        connection.commit()
    finally:
        connection.close()


def expected_rows(db: Path, ids: set[int], table: str = "readings") -> list[dict]:
    rows = [r for r in sqlite_dicts(db, table, order="id") if r["id"] in ids]
    return [dict(r, ts=datetime.fromisoformat(r["ts"]).replace(tzinfo=UTC)) for r in rows]


FIRST = [(i, BASE + timedelta(seconds=i)) for i in range(1, 4)]
# A newer row, a late row older than the cursor (uploaded: rows are new by insertion order), a newer
# one, and one inserted with an explicit id below the uploaded ones and a newer timestamp: it makes
# the next read scan with the cursor-key filter, whose SQL names the columns again.
SECOND = [(4, BASE + timedelta(minutes=5)), (5, BASE - timedelta(days=1)), (6, BASE + timedelta(minutes=6)),
          (0, BASE + timedelta(minutes=7))]
EVERY_ID = {0, 1, 2, 3, 4, 5, 6}


# ---------------------------------------------------------------------------------------------
# Column names, Delta
# ---------------------------------------------------------------------------------------------

def test_hostile_column_names_arrive_exactly_on_delta(tmp_path):
    place = Place(tmp_path, hostile_columns_db(tmp_path / "src" / "names.db"))
    add_rows(place.db, FIRST)
    first = place.run("--timestamp-col", "ts")
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert delta_columns(place.lake) == ["id", "ts", *HOSTILE_COLUMNS]
    assert_same_rows(read_delta_rows(place.lake), expected_rows(place.db, {1, 2, 3}), "first run")

    add_rows(place.db, SECOND)
    second = place.run("--timestamp-col", "ts")
    assert second.returncode == 0, second.stderr
    assert_same_rows(read_delta_rows(place.lake), expected_rows(place.db, EVERY_ID), "second run")

    info = place.run("--run-query", "INFO")
    assert info.returncode == 0, info.stderr
    for name in ("a b", "x; DROP TABLE y", "ünïcödé 漢字"):
        assert name in info.stdout


# ---------------------------------------------------------------------------------------------
# Column names, Databricks
# ---------------------------------------------------------------------------------------------

def test_hostile_column_names_arrive_exactly_on_databricks(healthy_emulator: Emulator, tmp_path):
    db = hostile_columns_db(tmp_path / "src" / "names.db")
    add_rows(db, FIRST)
    schema, state = "hostile_columns", tmp_path / "state"
    first = dbx_upload(healthy_emulator, db, state, schema, "--timestamp-col", "ts")
    assert first.returncode == 0, first.stderr[-6000:]
    add_rows(db, SECOND)
    second = dbx_upload(healthy_emulator, db, state, schema, "--timestamp-col", "ts")
    assert second.returncode == 0, second.stderr[-6000:]
    rows = both_views(healthy_emulator, schema, "readings")
    assert list(rows[0]) == ["id", "ts", *HOSTILE_COLUMNS]
    assert_same_rows(rows, expected_rows(db, EVERY_ID), "Databricks, two runs")


# ---------------------------------------------------------------------------------------------
# Names that differ only in case
# ---------------------------------------------------------------------------------------------

def case_pair_db(path: Path) -> Path:
    # SQLite folds only ASCII letters, so "é" and "É" are two columns; Delta and Databricks fold
    # case for every letter, so no target table can hold both.
    return make_db(path, 'CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, "é" TEXT, "É" TEXT)',
                   rows=[(1, "2024-03-01 00:00:00", "lower", "upper")],
                   insert_sql="INSERT INTO readings VALUES (?, ?, ?, ?)")


def test_columns_differing_only_in_case_are_refused_on_delta(tmp_path):
    place = Place(tmp_path, case_pair_db(tmp_path / "src" / "case.db"))
    message = assert_refused(place.run(), "é", "É")
    assert "readings" in message
    assert not delta_exists(place.lake)
    assert not place.state_file.exists()


def test_columns_differing_only_in_case_are_refused_on_databricks(healthy_emulator: Emulator, tmp_path):
    db, state = case_pair_db(tmp_path / "src" / "case.db"), tmp_path / "state"
    assert_refused(dbx_upload(healthy_emulator, db, state, "hostile_case"), "é", "É")
    assert "readings" not in schema_tables(healthy_emulator, "hostile_case")
    assert no_progress_recorded(state)


def test_table_and_timestamp_column_named_in_another_case(tmp_path):
    """`READINGS` and `TS` find `readings` and `ts`; a later run that spells them exactly is the
    same source (same state binding, nothing uploaded twice)."""
    db = make_db(tmp_path / "src" / "case.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, v REAL)",
                 rows=[(i, f"2024-03-01 00:00:0{i}", i / 2) for i in range(1, 6)],
                 insert_sql="INSERT INTO readings VALUES (?, ?, ?)")
    place = Place(tmp_path, db)
    shouted = place.run("--sqlite-table-name", "READINGS", "--timestamp-col", "TS")
    assert shouted.returncode == 0, shouted.stderr
    assert place.state()["source"]["table"] == "readings"
    assert place.state()["source"]["timestamp_col"] == "ts"
    make_db(db, "INSERT INTO readings VALUES (6, '2024-03-01 00:00:09', 3.0)")
    exact = place.run("--sqlite-table-name", "readings", "--timestamp-col", "ts")
    assert exact.returncode == 0, exact.stderr
    assert place.ids() == [1, 2, 3, 4, 5, 6]


def test_existing_delta_table_with_columns_in_another_case(tmp_path):
    """A Delta table made beforehand with upper-case names: rows go into those columns."""
    import pyarrow as pa
    from deltalake import write_deltalake

    db = make_db(tmp_path / "src" / "case.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, value REAL)",
                 rows=[(i, f"2024-03-01 00:00:0{i}", i / 2) for i in range(1, 4)],
                 insert_sql="INSERT INTO readings VALUES (?, ?, ?)")
    place = Place(tmp_path, db)
    made = pa.table({"ID": pa.array([0], pa.int64()), "TS": pa.array([BASE], pa.timestamp("us", tz="UTC")),
                     "VALUE": pa.array([0.0])})
    write_deltalake(str(place.lake), made)
    result = place.run()
    assert result.returncode == 0, result.stderr
    assert delta_columns(place.lake) == ["ID", "TS", "VALUE"]
    assert [(r["ID"], r["VALUE"]) for r in read_delta_rows(place.lake, order="ID")] == [
        (0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]


def test_existing_databricks_table_with_columns_in_another_case(healthy_emulator: Emulator, tmp_path):
    schema = "hostile_case_table"
    with healthy_emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS `{schema}`")
        cursor.execute(f"CREATE TABLE `{schema}`.`readings` (ID BIGINT, TS TIMESTAMP, VALUE DOUBLE)")
    db = make_db(tmp_path / "src" / "case.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, value REAL)",
                 rows=[(i, f"2024-03-01 00:00:0{i}", i / 2) for i in range(1, 4)],
                 insert_sql="INSERT INTO readings VALUES (?, ?, ?)")
    result = dbx_upload(healthy_emulator, db, tmp_path / "state", schema)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = query(healthy_emulator, f"SELECT * FROM `{schema}`.`readings` ORDER BY ID")
    assert [list(r) for r in rows] == [["ID", "TS", "VALUE"]] * 3
    assert [(r["ID"], r["VALUE"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 1.5)]


# ---------------------------------------------------------------------------------------------
# Table names, Delta: the default location ./lakehouse/<table> must stay a directory of its own
# inside ./lakehouse, whatever the name holds ('/', '..', an absolute path)
# ---------------------------------------------------------------------------------------------

TABLE_NAMES = ["odd table", 'q"uote', "s'q", "back`tick", "dot.ted", "ünïcödé 漢字", "select", "1st",
               "x; DROP TABLE y", "hash#and?query%20", "sub/dir", ".", "..", "../escape", "<absolute>"]


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_hostile_table_name_on_delta(tmp_path, name):
    if name == "<absolute>":
        name = str(tmp_path / "elsewhere" / "abs")  # contained in tmp_path even if it were honoured
    db = make_db(tmp_path / "src" / "names.db", f"CREATE TABLE {quote(name)} (id INTEGER PRIMARY KEY, ts TEXT)",
                 rows=[(1, "2024-03-01 00:00:00"), (2, "2024-03-01 00:00:01")],
                 insert_sql=f"INSERT INTO {quote(name)} VALUES (?, ?)")
    work = tmp_path / "work"
    work.mkdir()
    command = ["--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--target", "delta"]
    result = subprocess.run(uploader_command(*command, "--once"), cwd=work, env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    tables = [p.parent for p in tmp_path.rglob("_delta_log")]
    if result.returncode == 2:  # refusing is fine when it says what to set
        assert_refused(result, "delta_path")
        assert tables == []
        return
    assert result.returncode == 0, result.stderr
    lakehouse = (work / "lakehouse").resolve()
    assert len(tables) == 1, tables
    location = tables[0].resolve()
    assert lakehouse in location.parents, f"the Delta table went to {location}, outside {lakehouse}"
    assert sorted(r["id"] for r in read_delta_rows(location)) == [1, 2]
    info = subprocess.run(uploader_command(*command, "--run-query", "INFO"), cwd=work, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr


# ---------------------------------------------------------------------------------------------
# Table and schema names, Databricks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["select", "1st"])
def test_keyword_and_leading_digit_table_names_on_databricks(healthy_emulator: Emulator, tmp_path, name):
    db = make_db(tmp_path / "src" / "names.db", f"CREATE TABLE {quote(name)} (id INTEGER PRIMARY KEY, ts TEXT)",
                 rows=[(1, "2024-03-01 00:00:00"), (2, "2024-03-01 00:00:01")],
                 insert_sql=f"INSERT INTO {quote(name)} VALUES (?, ?)")
    result = dbx_upload(healthy_emulator, db, tmp_path / "state", "hostile_tables")
    assert result.returncode == 0, result.stderr[-6000:]
    rows = both_views(healthy_emulator, "hostile_tables", name)
    assert [r["id"] for r in rows] == [1, 2]


@pytest.mark.parametrize("name", ["odd table", "x; DROP TABLE y"])
def test_table_name_databricks_cannot_hold_is_refused_clearly(healthy_emulator: Emulator, tmp_path, name):
    """Databricks (like the emulator's Spark catalog) refuses such table names: the uploader must say
    so once and name the setting to use, not exit 1 (and retry forever in loop mode)."""
    db = make_db(tmp_path / "src" / "names.db", f"CREATE TABLE {quote(name)} (id INTEGER PRIMARY KEY, ts TEXT)",
                 rows=[(1, "2024-03-01 00:00:00")], insert_sql=f"INSERT INTO {quote(name)} VALUES (?, ?)")
    state = tmp_path / "state"
    assert_refused(dbx_upload(healthy_emulator, db, state, "hostile_bad_tables"), name, "databricks_table")
    assert no_progress_recorded(state)
    # Following the message works.
    renamed = "renamed_" + "".join(c if c.isalnum() else "_" for c in name)  # one table per case
    fixed = dbx_upload(healthy_emulator, db, state, "hostile_bad_tables", "--databricks-table", renamed)
    assert fixed.returncode == 0, fixed.stderr[-6000:]
    assert [r["id"] for r in both_views(healthy_emulator, "hostile_bad_tables", renamed)] == [1]


def test_schema_name_databricks_cannot_hold_is_refused_clearly(healthy_emulator: Emulator, tmp_path):
    db = make_db(tmp_path / "src" / "s.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT)",
                 rows=[(1, "2024-03-01 00:00:00")], insert_sql="INSERT INTO readings VALUES (?, ?)")
    state = tmp_path / "state"
    assert_refused(dbx_upload(healthy_emulator, db, state, "my schema"), "my schema", "databricks_database")
    assert no_progress_recorded(state)


def test_source_table_named_like_the_progress_table(healthy_emulator: Emulator, tmp_path):
    """The progress table's name is the uploader's own: a source table of that name must not be
    loaded into it (that would mix sensor rows into the exactly-once records)."""
    schema = "hostile_reserved"
    db = make_db(tmp_path / "src" / "s.db",
                 "CREATE TABLE _sqlite_uploader_batches (id INTEGER PRIMARY KEY, ts TEXT, v REAL)",
                 rows=[(1, "2024-03-01 00:00:00", 1.5)],
                 insert_sql="INSERT INTO _sqlite_uploader_batches VALUES (?, ?, ?)")
    assert_refused(dbx_upload(healthy_emulator, db, tmp_path / "state", schema),
                   "_sqlite_uploader_batches", "databricks_table")
    if "_sqlite_uploader_batches" in schema_tables(healthy_emulator, schema):
        described = query(healthy_emulator, f"DESCRIBE TABLE `{schema}`.`_sqlite_uploader_batches`")
        columns = [r["col_name"] for r in described]
        assert "v" not in columns, "source columns were added to the progress table"


def test_source_column_named_like_a_lineage_column(healthy_emulator: Emulator, tmp_path):
    db = make_db(tmp_path / "src" / "s.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, _batch_id TEXT)",
                 rows=[(1, "2024-03-01 00:00:00", "mine")], insert_sql="INSERT INTO readings VALUES (?, ?, ?)")
    state = tmp_path / "state"
    assert_refused(dbx_upload(healthy_emulator, db, state, "hostile_lineage", "--lineage-columns", "batch_id"),
                   "_batch_id", "lineage_columns")
    assert no_progress_recorded(state)
    # Without the lineage column the source's own _batch_id is just data.
    plain = dbx_upload(healthy_emulator, db, state, "hostile_lineage")
    assert plain.returncode == 0, plain.stderr[-6000:]
    assert [r["_batch_id"] for r in both_views(healthy_emulator, "hostile_lineage", "readings")] == ["mine"]
