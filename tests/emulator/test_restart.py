"""Persistence: tables and COPY INTO load history survive a restart (run last: it restarts)."""

from __future__ import annotations

import io
import uuid

from emulator_harness import Emulator


def test_restart_keeps_tables_and_load_history(emulator: Emulator) -> None:
    schema = "r_" + uuid.uuid4().hex[:8]
    copy = (f"COPY INTO main.{schema}.t FROM '/Volumes/main/{schema}/v/in' FILEFORMAT = CSV "
            "FORMAT_OPTIONS ('header' = 'true', 'inferSchema' = 'true')")
    with emulator.connect() as c, c.cursor() as cur:
        cur.execute(f"CREATE SCHEMA main.{schema}")
        cur.execute(f"CREATE TABLE main.{schema}.t (id INT, part STRING) PARTITIONED BY (part)")
        cur.execute(f"INSERT INTO main.{schema}.t VALUES (1, 'a'), (2, 'b')")
        cur.execute(f"CREATE VOLUME main.{schema}.v")
        cur.execute(f"PUT '__input_stream__' INTO '/Volumes/main/{schema}/v/in/f1.csv'",
                    input_stream=io.BytesIO(b"id,part\n3,a\n4,c\n"))
        cur.execute(copy)
        assert cur.fetchone().num_inserted_rows == 2
    emulator.restart()
    with emulator.connect() as c, c.cursor() as cur:
        cur.execute(f"SELECT id, part FROM main.{schema}.t ORDER BY id")
        assert [tuple(r) for r in cur.fetchall()] == [(1, "a"), (2, "b"), (3, "a"), (4, "c")]
        cur.execute(copy)
        assert cur.fetchone().num_inserted_rows == 0
        cur.execute(f"INSERT INTO main.{schema}.t VALUES (5, 'a')")
        cur.execute(f"SELECT count(*) AS n FROM main.{schema}.t")
        assert cur.fetchone().n == 5
    on_disk = emulator.read_table_parquet(schema, "t")
    assert sorted(on_disk.column("id").to_pylist()) == [1, 2, 3, 4, 5]
