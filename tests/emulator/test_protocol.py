"""Thrift protocol: sessions, direct results, paging, result formats, metadata calls."""

from __future__ import annotations

from typing import Any

import pytest
from databricks.sql.exc import DatabaseError, ServerOperationError
from emulator_harness import Emulator


def test_select_literal_and_description(cur: Any) -> None:
    cur.execute("SELECT 1 AS a, 'x' AS b, CAST(1.25 AS DECIMAL(5,2)) AS d, DATE'2024-02-29' AS dt")
    row = cur.fetchone()
    assert (row.a, row.b, str(row.d), row.dt.isoformat()) == (1, "x", "1.25", "2024-02-29")
    names_types = [(d[0], d[1]) for d in cur.description]
    assert names_types == [("a", "int"), ("b", "string"), ("d", "decimal"), ("dt", "date")]
    assert cur.description[2][4:6] == (5, 2)


def test_both_http_paths(emulator: Emulator) -> None:
    for path in ("/sql/1.0/warehouses/abc123", "/sql/protocolv1/o/1234567890/0101-abcdef-xyz"):
        with emulator.connect(_connection_uri=emulator.url + path) as c, c.cursor() as cur:
            cur.execute("SELECT 42 AS answer")
            assert cur.fetchall()[0].answer == 42


def test_large_select_is_fetched_completely(emulator: Emulator, cur: Any) -> None:
    before = emulator.stats()["rpc"].get("FetchResults", 0)
    cur.execute("SELECT id, CAST(id AS STRING) AS s FROM range(250000)")
    rows = cur.fetchall()
    assert len(rows) == 250000
    assert [r.id for r in rows[:3]] == [0, 1, 2]
    assert sum(r.id for r in rows) == 249999 * 250000 // 2
    assert rows[-1].s == "249999"
    # Direct results carry the first page only; the rest came through paged FetchResults.
    assert emulator.stats()["rpc"].get("FetchResults", 0) > before


def test_fetchmany_arrow_pages_small(emulator: Emulator, conn: Any) -> None:
    with conn.cursor(arraysize=1000) as cur:
        cur.execute("SELECT id FROM range(5500)")
        seen = 0
        while True:
            t = cur.fetchmany_arrow(700)
            if t.num_rows == 0:
                break
            assert t.column("id")[0].as_py() == seen
            seen += t.num_rows
        assert seen == 5500


def test_column_based_results(emulator: Emulator, cur: Any) -> None:
    emulator.set_config(result_format="column", max_rows_per_fetch=333)
    cur.execute("SELECT id, IF(id % 3 = 0, NULL, CAST(id AS STRING)) AS s, id * 0.5 AS f, id % 2 = 0 AS b, "
                "TIMESTAMP_NTZ'2024-01-01 00:00:00' AS ts FROM range(1000)")
    rows = cur.fetchall()
    assert len(rows) == 1000
    assert rows[3].s is None and rows[4].s == "4"
    assert rows[5].f == 2.5 and rows[4].b is True
    assert rows[0].ts.year == 2024


def test_empty_result_and_ddl(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.e (a INT)")
    # Like recorded warehouse traffic: DDL answers with an empty STRING column "Result".
    assert [(d[0], d[1]) for d in cur.description] == [("Result", "string")]
    assert cur.fetchall() == []
    cur.execute(f"SELECT * FROM main.{schema}.e")
    assert cur.fetchall() == []
    assert [d[0] for d in cur.description] == ["a"]


def test_async_execute_and_cancel(cur: Any) -> None:
    cur.execute_async("SELECT count(*) AS n FROM range(1000)")
    while cur.is_query_pending():
        pass
    cur.get_async_execution_result()
    assert cur.fetchall()[0].n == 1000


def test_cancel_of_unknown_or_finished_operation_is_harmless(cur: Any) -> None:
    cur.execute("SELECT 1")
    cur.cancel()
    cur.execute("SELECT 2 AS two")
    assert cur.fetchone().two == 2


def test_metadata_calls(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.meta_t (id BIGINT, name STRING, amount DECIMAL(12,3))")
    catalogs = [r.TABLE_CAT for r in cur.catalogs().fetchall()]
    assert "main" in catalogs
    schemas = [r.TABLE_SCHEM for r in cur.schemas(catalog_name="main").fetchall()]
    assert schema in schemas
    tables = cur.tables(catalog_name="main", schema_name=schema).fetchall()
    assert [(t.TABLE_CAT, t.TABLE_SCHEM, t.TABLE_NAME, t.TABLE_TYPE) for t in tables] == [
        ("main", schema, "meta_t", "TABLE")]
    cols = cur.columns(catalog_name="main", schema_name=schema, table_name="meta_t").fetchall()
    assert [(c.COLUMN_NAME, c.TYPE_NAME, c.ORDINAL_POSITION) for c in cols] == [
        ("id", "BIGINT", 1), ("name", "STRING", 2), ("amount", "DECIMAL(12,3)", 3)]
    assert cols[0].DATA_TYPE == -5 and cols[2].DECIMAL_DIGITS == 3
    assert cur.tables(catalog_name="main", schema_name=schema, table_name="nope%").fetchall() == []


def test_close_session_and_operations_are_counted(emulator: Emulator) -> None:
    emulator.reset()
    with emulator.connect() as c:
        with c.cursor(arraysize=5000) as cur:
            cur.execute("SELECT id FROM range(20000)")
            assert len(cur.fetchall()) == 20000
        with c.cursor() as cur:
            cur.execute("SELECT 1")  # fits in the direct results: closed by the server
            cur.fetchall()
    rpc = emulator.stats()["rpc"]
    assert rpc["OpenSession"] == 1 and rpc["ExecuteStatement"] == 2 and rpc["CloseSession"] == 1
    assert rpc["FetchResults"] == 3  # 5000 rows inline, then 3 pages of 5000
    assert rpc.get("CloseOperation", 0) == 1  # only the paged result is closed by the client


def test_error_is_server_operation_error(cur: Any) -> None:
    with pytest.raises(ServerOperationError) as exc:
        cur.execute("SELECT * FROM main.default.does_not_exist")
    assert "TABLE_OR_VIEW_NOT_FOUND" in str(exc.value)
    # Parse errors: recorded warehouse traffic fails the ExecuteStatement RPC itself (ERROR_STATUS,
    # SQLSTATE 42601), so the connector raises DatabaseError (ServerOperationError's parent).
    with pytest.raises(DatabaseError, match="PARSE_SYNTAX_ERROR") as exc2:
        cur.execute("SELEC 1")
    assert "Error running query" in str(exc2.value)
    cur.execute("SELECT 1 AS still_usable")
    assert cur.fetchone().still_usable == 1
