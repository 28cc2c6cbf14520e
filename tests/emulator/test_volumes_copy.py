"""Volumes through the connector's staging flow, and COPY INTO with Databricks' load history."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from databricks.sql.exc import ServerOperationError
from emulator_harness import Emulator


@pytest.fixture
def volume(cur: Any, schema: str) -> str:
    cur.execute(f"CREATE VOLUME IF NOT EXISTS main.{schema}.landing")
    cur.execute(f"CREATE VOLUME IF NOT EXISTS main.{schema}.landing")  # idempotent
    return f"/Volumes/main/{schema}/landing"


def test_put_get_remove_round_trip(emulator: Emulator, cur: Any, schema: str, volume: str,
                                   tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    payload = bytes(range(256)) * 1000
    src.write_bytes(payload)
    cur.execute(f"PUT '{src}' INTO '{volume}/a/in.bin' OVERWRITE")
    assert (emulator.volume_dir("main", schema, "landing") / "a" / "in.bin").read_bytes() == payload
    dst = tmp_path / "out.bin"
    cur.execute(f"GET '{volume}/a/in.bin' TO '{dst}'")
    assert dst.read_bytes() == payload
    cur.execute(f"REMOVE '{volume}/a/in.bin'")
    assert not (emulator.volume_dir("main", schema, "landing") / "a" / "in.bin").exists()
    with pytest.raises(ServerOperationError):
        cur.execute(f"GET '{volume}/a/in.bin' TO '{dst}'")
    stats = emulator.stats()["statements"]
    assert stats["PUT"] >= 1 and stats["GET"] >= 2 and stats["REMOVE"] >= 1


def test_put_input_stream_and_overwrite_rules(cur: Any, volume: str, tmp_path: Path) -> None:
    cur.execute(f"PUT '__input_stream__' INTO '{volume}/s.txt'", input_stream=io.BytesIO(b"one"))
    with pytest.raises(ServerOperationError, match="already exists"):
        cur.execute(f"PUT '__input_stream__' INTO '{volume}/s.txt'", input_stream=io.BytesIO(b"two"))
    cur.execute(f"PUT '__input_stream__' INTO '{volume}/s.txt' OVERWRITE", input_stream=io.BytesIO(b"two"))
    cur.execute(f"GET '{volume}/s.txt' TO '{tmp_path / 's.txt'}'")
    assert (tmp_path / "s.txt").read_bytes() == b"two"


def test_put_into_missing_volume_fails(cur: Any, schema: str) -> None:
    with pytest.raises(ServerOperationError, match="VOLUME"):
        cur.execute(f"PUT '__input_stream__' INTO '/Volumes/main/{schema}/nope/x'", input_stream=io.BytesIO(b"x"))


def _stage_parquet(cur: Any, volume: str, tmp_path: Path, name: str, ids: range) -> None:
    path = tmp_path / name
    pq.write_table(pa.table({"id": pa.array(list(ids), pa.int64()),
                             "name": [f"n{i}" for i in ids]}), path)
    cur.execute(f"PUT '{path}' INTO '{volume}/batches/{name}' OVERWRITE")


def test_copy_into_parquet_is_idempotent(emulator: Emulator, cur: Any, schema: str, volume: str,
                                         tmp_path: Path) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.target (id BIGINT, name STRING)")
    _stage_parquet(cur, volume, tmp_path, "b1.parquet", range(0, 100))
    _stage_parquet(cur, volume, tmp_path, "b2.parquet", range(100, 150))
    copy = (f"COPY INTO main.{schema}.target FROM '{volume}/batches' FILEFORMAT = PARQUET "
            "PATTERN = '*.parquet' COPY_OPTIONS ('mergeSchema' = 'false')")
    cur.execute(copy)
    assert cur.fetchone().asDict() == {"num_affected_rows": 150, "num_inserted_rows": 150,
                                       "num_skipped_corrupt_files": 0}
    assert cur.rowcount == 150
    cur.execute(copy)
    assert cur.fetchone().num_inserted_rows == 0
    _stage_parquet(cur, volume, tmp_path, "b3.parquet", range(150, 160))
    cur.execute(copy)
    assert cur.fetchone().num_inserted_rows == 10
    cur.execute(f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM main.{schema}.target")
    row = cur.fetchone()
    assert (row.n, row.d) == (160, 160)
    assert emulator.read_table_parquet(schema, "target").num_rows == 160
    assert set(emulator.copy_history(schema, "target")) == {
        f"{volume}/batches/b{i}.parquet" for i in (1, 2, 3)}
    # force = true loads already-loaded files again.
    cur.execute(copy.replace("'mergeSchema' = 'false'", "'force' = 'true'"))
    assert cur.fetchone().num_inserted_rows == 160


def test_copy_into_csv_with_options_and_files(cur: Any, schema: str, volume: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.csvt (id INT, name STRING, amount DOUBLE)")
    for name, body in (("a.csv", b"id;name;amount\n1;x;1.5\n2;y;2.5\n"), ("b.csv", b"id;name;amount\n3;z;\n"),
                       ("skip.txt", b"junk")):
        cur.execute(f"PUT '__input_stream__' INTO '{volume}/csv/{name}' OVERWRITE", input_stream=io.BytesIO(body))
    cur.execute(f"COPY INTO main.{schema}.csvt FROM '{volume}/csv' FILEFORMAT = CSV PATTERN = '*.csv' "
                "FORMAT_OPTIONS ('header' = 'true', 'sep' = ';')")
    assert cur.fetchone().num_inserted_rows == 3
    cur.execute(f"COPY INTO main.{schema}.csvt FROM '{volume}/csv' FILEFORMAT = CSV FILES = ('a.csv') "
                "FORMAT_OPTIONS ('header' = 'true', 'sep' = ';')")
    assert cur.fetchone().num_inserted_rows == 0
    cur.execute(f"SELECT id, name, amount FROM main.{schema}.csvt ORDER BY id")
    assert [tuple(r) for r in cur.fetchall()] == [(1, "x", 1.5), (2, "y", 2.5), (3, "z", None)]


def test_copy_into_merge_schema(cur: Any, schema: str, volume: str, tmp_path: Path) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.ms (id BIGINT)")
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "extra": ["e"]}), path)
    cur.execute(f"PUT '{path}' INTO '{volume}/wide/wide.parquet' OVERWRITE")
    copy = f"COPY INTO main.{schema}.ms FROM '{volume}/wide' FILEFORMAT = PARQUET"
    with pytest.raises(ServerOperationError, match="schema mismatch"):
        cur.execute(copy)
    cur.execute(copy + " COPY_OPTIONS ('mergeSchema' = 'true')")
    assert cur.fetchone().num_inserted_rows == 1
    cur.execute(f"SELECT id, extra FROM main.{schema}.ms")
    assert tuple(cur.fetchone()) == (1, "e")


def test_failed_copy_commits_nothing(emulator: Emulator, cur: Any, schema: str, volume: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.strict (id INT)")
    cur.execute(f"PUT '__input_stream__' INTO '{volume}/bad/1.csv' OVERWRITE", input_stream=io.BytesIO(b"id\n1\n"))
    cur.execute(f"PUT '__input_stream__' INTO '{volume}/bad/2.csv' OVERWRITE",
                input_stream=io.BytesIO(b"id\nnot-a-number\n"))
    with pytest.raises(ServerOperationError):
        cur.execute(f"COPY INTO main.{schema}.strict FROM '{volume}/bad' FILEFORMAT = CSV "
                    "FORMAT_OPTIONS ('header' = 'true')")
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.strict")
    assert cur.fetchone().n == 0
    assert emulator.copy_history(schema, "strict") == {}


def test_copy_into_resent_after_dropped_answer_loads_once(emulator: Emulator, cur: Any, schema: str,
                                                          volume: str, tmp_path: Path) -> None:
    # Unlike INSERT, a COPY INTO that the connector re-sends after a lost answer is harmless:
    # the second run finds the files in the load history.
    cur.execute(f"CREATE TABLE main.{schema}.resent (id BIGINT, name STRING)")
    _stage_parquet(cur, volume, tmp_path, "r1.parquet", range(0, 30))
    emulator.set_faults({"kind": "drop_after_execute", "count": 1, "statement": "COPY INTO"})
    cur.execute(f"COPY INTO main.{schema}.resent FROM '{volume}/batches' FILEFORMAT = PARQUET "
                "PATTERN = 'r1.parquet'")
    assert cur.fetchone().num_inserted_rows == 0  # the answer of the re-sent, second run
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.resent")
    assert cur.fetchone().n == 30
    assert emulator.stats()["statements"]["COPY INTO"] >= 2


@pytest.mark.parametrize(("number", "empty"), enumerate(["TRUNCATE TABLE {t}", "DELETE FROM {t}",
                                                           "DELETE FROM {t} WHERE id >= 0"]))
def test_load_history_survives_truncate_and_delete(emulator: Emulator, cur: Any, schema: str, volume: str,
                                                   tmp_path: Path, number: int, empty: str) -> None:
    """As on Databricks, where COPY INTO's load history is in the table's Delta log: emptying the
    table does not forget which files were loaded, so the same file name loads nothing again."""
    table = f"main.{schema}.history_{number}"
    cur.execute(f"CREATE TABLE {table} (id BIGINT, name STRING)")
    _stage_parquet(cur, volume, tmp_path, "h1.parquet", range(0, 20))
    copy = f"COPY INTO {table} FROM '{volume}/batches' FILEFORMAT = PARQUET FILES = ('h1.parquet')"
    cur.execute(copy)
    assert cur.fetchone().num_inserted_rows == 20
    cur.execute(empty.format(t=table))
    cur.execute(f"SELECT count(*) AS n FROM {table}")
    assert cur.fetchone().n == 0
    _stage_parquet(cur, volume, tmp_path, "h1.parquet", range(100, 130))  # other rows, same name
    cur.execute(copy)
    assert cur.fetchone().num_inserted_rows == 0
    cur.execute(f"SELECT count(*) AS n FROM {table}")
    assert cur.fetchone().n == 0


def test_delete_with_a_condition_keeps_the_other_rows(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.del (id BIGINT, tag STRING)")
    cur.execute(f"INSERT INTO main.{schema}.del VALUES (1, 'a'), (2, 'b'), (3, NULL), (4, 'b')")
    cur.execute(f"DELETE FROM main.{schema}.del WHERE tag = :tag", {"tag": "b"})
    assert cur.fetchone().num_affected_rows == 2
    cur.execute(f"SELECT id FROM main.{schema}.del ORDER BY id")
    assert [row.id for row in cur.fetchall()] == [1, 3]  # a NULL condition keeps the row
