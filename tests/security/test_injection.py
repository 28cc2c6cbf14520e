"""SQL injection through every setting that reaches SQL.

Each hostile value tries to end its identifier or string and run `DROP TABLE` on a sentinel.
Whatever the tool does with the value - use it literally as a name, or refuse it with a clear
message - the sentinel must survive, the source must be untouched, and nothing may land
anywhere but the named target. (--run-query runs any SQL by design and is not tested here.)
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
from dbx_e2e import base_env, make_sensor_db, query, run, upload

ROWS = 12


def payloads(sentinel: str) -> list[str]:
    drop = f"DROP TABLE {sentinel}"
    return [f"x'; {drop}; --", f"x`; {drop}; --", f'x"; {drop}; --', f"x\\'; {drop}; --", f"x) ; {drop}; --"]


@pytest.fixture
def sentinel(emulator) -> str:
    schema = "sentinel_" + uuid.uuid4().hex[:8]
    query(emulator, f"CREATE SCHEMA {schema}")
    query(emulator, f"CREATE TABLE {schema}.sentinel (n BIGINT)")
    query(emulator, f"INSERT INTO {schema}.sentinel VALUES (42)")
    return f"{schema}.sentinel"


def sentinel_alive(emulator, sentinel: str) -> bool:
    return query(emulator, f"SELECT n FROM {sentinel}") == [{"n": 42}]


def source_fingerprint(db: Path) -> list:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT * FROM sqlite_master").fetchall() + connection.execute(
            "SELECT count(*) FROM sensor_logs").fetchall()


def check_outcome(result, setting: str) -> None:
    """Either it worked, or one clear message (no traceback) said what to change."""
    output = result.stdout + result.stderr
    print(f"{setting}: exit {result.returncode}", [line for line in result.stderr.splitlines() if "ERROR" in line])
    assert "Traceback" not in output, output[-3000:]
    if result.returncode != 0:
        assert result.returncode in (1, 2), output[-3000:]
        assert "ERROR" in result.stderr, output[-3000:]


@pytest.mark.parametrize("setting", ["databricks_table", "databricks_database", "databricks_catalog",
                                     "node_id", "staging_volume"])
def test_databricks_settings(emulator, sentinel, tmp_path, schema, setting):
    db = make_sensor_db(tmp_path / "data" / "s.db", ROWS)
    before = source_fingerprint(db)
    for number, payload in enumerate(payloads(sentinel)):
        value = f"/Volumes/main/{schema}/{payload}" if setting == "staging_volume" else payload
        env = base_env(emulator, **{"LINEAGE_COLUMNS": "all", "DATABRICKS_DATABASE": schema, setting.upper(): value})
        result = run("--sqlite", str(db), "--state-dir", str(tmp_path / f"state{number}"), "--once", env=env,
                     expect=None)
        check_outcome(result, setting)
        assert sentinel_alive(emulator, sentinel), f"{setting}={value!r} dropped the sentinel"
        if result.returncode == 0 and setting == "databricks_database":
            landed = query(emulator, f"SELECT count(*) AS n FROM `{payload.replace('`', '``')}`.`sensor_logs`")
            assert landed[0]["n"] == ROWS
        if result.returncode == 0 and setting == "node_id":
            rows = query(emulator, f"SELECT DISTINCT `_node_id` AS n FROM `{schema}`.`sensor_logs`")
            assert {r["n"] for r in rows} >= {payload}
        if result.returncode == 0 and setting == "databricks_table":
            landed = query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`{payload.replace('`', '``')}`")
            assert landed[0]["n"] == ROWS
    assert source_fingerprint(db) == before


def test_staging_volume_with_a_quote_is_refused_before_anything_runs(emulator, sentinel, tmp_path, schema):
    db = make_sensor_db(tmp_path / "data" / "s.db", ROWS)
    env = base_env(emulator, STAGING_VOLUME=f"/Volumes/main/{schema}/v' ; DROP TABLE {sentinel}; --")
    result = upload(emulator, db, tmp_path / "state", schema, expect=2, env=env)
    assert "staging_volume" in result.stderr and "quote" in result.stderr
    assert query(emulator, f"SHOW SCHEMAS LIKE '{schema}'") == []  # refused before connecting


def test_source_names_table_and_timestamp_column(emulator, sentinel, tmp_path, schema):
    """Hostile SQLite table and column names reach both SQLite's SQL and the target's DDL."""
    table = f"t'`\"; DROP TABLE {sentinel}; --"
    column = f"ts'`\"; DROP TABLE {sentinel}; --"
    value = f"v'`\"; DROP TABLE {sentinel}; --"
    db = tmp_path / "data" / "hostile.db"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as connection:
        connection.execute(f'CREATE TABLE "{table.replace(chr(34), 2 * chr(34))}" '
                           f'(id INTEGER PRIMARY KEY, "{column.replace(chr(34), 2 * chr(34))}" TEXT, note TEXT)')
        connection.executemany(f'INSERT INTO "{table.replace(chr(34), 2 * chr(34))}" VALUES (?, ?, ?)',
                               [(i, f"2026-01-0{1 + i % 9}T00:00:00Z", value) for i in range(ROWS)])
    for number, staging in enumerate(("auto", "none")):
        env = base_env(emulator, SQLITE_TABLE_NAME=table, TIMESTAMP_COL=column, DATABRICKS_TABLE="landed",
                       STAGING_VOLUME=staging, LINEAGE_COLUMNS="batch_id")
        result = upload(emulator, db, tmp_path / f"state{number}", schema, "--databricks-table", f"landed{number}",
                        env=env)
        check_outcome(result, "sqlite_table_name")
        rows = query(emulator, f"SELECT note FROM `{schema}`.`landed{number}`")
        assert [r["note"] for r in rows] == [value] * ROWS
    assert sentinel_alive(emulator, sentinel)


def test_filter_values_are_data_not_sql(emulator, sentinel, tmp_path, schema):
    db = make_sensor_db(tmp_path / "data" / "s.db", ROWS)
    env = base_env(emulator, ENABLE_FILTER="true",
                   FILTER_CONFIG=f'{{"status": {{"!=": "x\'; DROP TABLE {sentinel}; --"}}}}')
    result = run("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--once", "--databricks-database",
                 schema, env=env, expect=None)
    check_outcome(result, "filter_config")
    assert sentinel_alive(emulator, sentinel)
