"""SQL surface on Spark: DDL/DML kinds, three-level names, timestamps, errors, atomic INSERT."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest
from databricks.sql.exc import ServerOperationError
from emulator_harness import Emulator


def test_ddl_dml_round_trip_and_parquet_on_disk(emulator: Emulator, cur: Any, schema: str) -> None:
    t = f"main.`{schema}`.`my_table`"
    cur.execute(f"CREATE TABLE IF NOT EXISTS {t} (id BIGINT, `odd name` STRING, ts TIMESTAMP, "
                "ntz TIMESTAMP_NTZ) USING DELTA TBLPROPERTIES ('delta.columnMapping.mode' = 'name')")
    cur.execute(f"CREATE TABLE IF NOT EXISTS {t} (id BIGINT)")  # no-op
    cur.execute(f"INSERT INTO {t} VALUES (1, 'a', TIMESTAMP'2024-03-01 12:00:00+02:00', "
                "TIMESTAMP_NTZ'2024-03-01 12:00:00'), (2, NULL, NULL, NULL)")
    assert cur.fetchall()[0].asDict() == {"num_affected_rows": 2, "num_inserted_rows": 2}
    assert cur.rowcount == 2
    cur.execute(f"INSERT INTO {t} SELECT id + 10, `odd name`, ts, ntz FROM {t}")
    assert cur.fetchone().num_inserted_rows == 2
    cur.execute(f"SELECT * FROM {t} ORDER BY id")
    rows = cur.fetchall()
    assert [r.id for r in rows] == [1, 2, 11, 12]
    # TIMESTAMP is an instant (normalised to UTC), TIMESTAMP_NTZ a wall-clock value.
    assert rows[0].ts == dt.datetime(2024, 3, 1, 10, 0, tzinfo=dt.timezone.utc)
    assert rows[0].ntz == dt.datetime(2024, 3, 1, 12, 0)
    on_disk = emulator.read_table_parquet(schema, "my_table").sort_by("id")
    assert on_disk.column("id").to_pylist() == [1, 2, 11, 12]
    assert on_disk.schema.field("ntz").type == pa.timestamp("us")
    assert on_disk.schema.field("ts").type.tz is not None or on_disk.schema.field("ts").type.unit == "us"


def test_describe_show_alter_use(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.d (a INT)")
    cur.execute(f"ALTER TABLE main.{schema}.d ADD COLUMNS (b STRING, c TIMESTAMP_NTZ)")
    cur.execute(f"DESCRIBE TABLE main.{schema}.d")
    assert [r.col_name for r in cur.fetchall()][:3] == ["a", "b", "c"]
    cur.execute(f"DESCRIBE TABLE EXTENDED main.{schema}.d")
    assert "Location" in [r.col_name for r in cur.fetchall()]
    cur.execute(f"SHOW TABLES IN main.{schema}")
    assert [r.tableName for r in cur.fetchall()] == ["d"]
    cur.execute("SHOW SCHEMAS IN main")
    assert schema in [r.databaseName for r in cur.fetchall()]
    cur.execute(f"USE main.{schema}")
    cur.execute("INSERT INTO d (a, b) VALUES (1, 'x')")
    cur.execute("SELECT a, b, c FROM d")
    assert cur.fetchall()[0].asDict() == {"a": 1, "b": "x", "c": None}
    cur.execute(f"USE SCHEMA {schema}")
    cur.execute("USE CATALOG main")


def test_drop_if_exists_and_schema(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.x (a INT)")
    cur.execute(f"DROP TABLE main.{schema}.x")
    cur.execute(f"DROP TABLE IF EXISTS main.{schema}.x")
    with pytest.raises(ServerOperationError, match="TABLE_OR_VIEW_NOT_FOUND"):
        cur.execute(f"DROP TABLE main.{schema}.x")
    cur.execute(f"DROP SCHEMA IF EXISTS main.{schema} CASCADE")
    cur.execute("SHOW SCHEMAS IN main")
    assert schema not in [r.databaseName for r in cur.fetchall()]


def test_create_or_replace_and_ctas(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.r (a INT)")
    cur.execute(f"INSERT INTO main.{schema}.r VALUES (1)")
    cur.execute(f"CREATE OR REPLACE TABLE main.{schema}.r (a INT, b INT)")
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.r")
    assert cur.fetchone().n == 0
    cur.execute(f"CREATE TABLE main.{schema}.c AS SELECT id FROM range(5)")
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.c")
    assert cur.fetchone().n == 5


def test_failed_insert_writes_nothing(emulator: Emulator, cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.atomic (id INT NOT NULL, v INT)")
    cur.execute(f"INSERT INTO main.{schema}.atomic VALUES (1, 1)")
    # The 500th row fails the ANSI cast: the statement fails and none of its rows may land.
    with pytest.raises(ServerOperationError) as exc:
        cur.execute(f"INSERT INTO main.{schema}.atomic SELECT id, CAST(IF(id = 500, 'x', '1') AS INT) "
                    "FROM range(1000)")
    assert "CAST_INVALID_INPUT" in str(exc.value) or "x" in str(exc.value)
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.atomic")
    assert cur.fetchone().n == 1
    assert emulator.read_table_parquet(schema, "atomic").num_rows == 1


def test_unknown_catalog_and_bad_column_errors(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.e (a INT)")
    with pytest.raises(ServerOperationError, match="UNRESOLVED_COLUMN"):
        cur.execute(f"SELECT nope FROM main.{schema}.e")
    with pytest.raises(ServerOperationError):
        cur.execute("SELECT * FROM no_such_catalog.s.t")


def test_insert_replace_where_is_reported_not_silently_wrong(cur: Any, schema: str) -> None:
    # Nice-to-have in the issue; Spark's parser has no REPLACE WHERE for Parquet tables. Must fail loudly.
    cur.execute(f"CREATE TABLE main.{schema}.rw (batch INT, v INT)")
    with pytest.raises(ServerOperationError):
        cur.execute(f"INSERT INTO main.{schema}.rw REPLACE WHERE batch = 1 SELECT 1, 2")
