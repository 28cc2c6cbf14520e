"""The statement runs, the connection drops before the answer, the connector re-sends it.

The emulator's `drop_after_execute` fault executes (and commits) a statement, then closes the
socket without answering; the connector re-sends the request, so the statement runs twice --
the duplicate-write hazard of real networks. Each kind of statement the uploader sends gets it:
on the bulk path (PUT, the progress record's INSERT, COPY INTO, REMOVE, CREATE of schema / table /
progress table / volume, DESCRIBE, SELECT), on the INSERT path (its INSERT statements, CREATE,
DESCRIBE, SELECT) and on ALTER TABLE ADD COLUMNS (a new source column). Every run must end with
every source row in the target exactly once.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from .conftest import Job, Source, assert_exactly_once, connector_count, fired, new_schema, wait_until

INSERT_PATH = ["--staging-volume", "none", "--lineage-columns", "batch_id"]


def run_with_drops(emulator, job: Job, source: Source, drops: list[tuple[str, str]], *more: str) -> None:
    """One --once run; each (match, what) loses the answer of the first statement it matches.

    `match` is a statement kind or a piece of SQL text (the emulator's filter). Each fault fires
    once: the re-sent statement gets its answer. Every fault must fire, the run must succeed and
    the target must hold every row exactly once.
    """
    before = fired(emulator, "drop_after_execute")
    emulator.set_faults(*({"kind": "drop_after_execute", "statement": match, "count": 1} for match, _ in drops))
    run = job.run("--once", *more, timeout=300)
    stats = emulator.stats()
    left = [what for match, what in drops
            if any(f["kind"] == "drop_after_execute" and f["statement"] == match for f in stats["faults_active"])]
    emulator.clear_faults()
    names = [what for _, what in drops]
    assert run.returncode == 0, f"answers lost: {names}\n{run.describe()}"
    assert not left, f"these statements were never sent, so their answers were not dropped: {left}\n{run.describe()}"
    assert stats["faults_fired"].get("drop_after_execute", 0) - before == len(drops)
    assert_exactly_once(emulator, job.schema, source.expected(), context=f" after losing the answers of {names}")


def test_bulk_path_every_statement_kind(emulator, tmp_path: Path):
    source = Source(tmp_path / "sensors.db", random.Random(41))
    job = Job(emulator, source.path, tmp_path, new_schema("daebulk"), ["--batch-size", "15"])
    # First run, into a missing schema: filters are listed so that each one takes a different
    # statement (a re-sent statement finds its fault used up).
    source.insert(25)
    run_with_drops(emulator, job, source, [
        ("CREATE", "CREATE SCHEMA"),
        ("CREATE TABLE", "CREATE TABLE of the progress table"),
        ("CREATE VOLUME", "CREATE VOLUME"),
        ("DEVICE_ID", "CREATE TABLE of the target (the only statement naming a source column)"),
        ("INSERT", "INSERT of the progress record"),
        ("COPY INTO", "COPY INTO"),
    ])
    # Next run, everything exists: the answers of the DESCRIBE and SELECT of the progress table, of
    # a batch file's PUT (the first statement naming a .parquet file) and of a REMOVE are lost.
    source.insert(20, tie_with_last=True)
    run_with_drops(emulator, job, source, [
        ("DESCRIBE", "DESCRIBE"),
        ("SELECT", "SELECT"),
        (".PARQUET", "PUT of a batch file"),
        ("REMOVE", "REMOVE"),
    ])


def test_insert_path_every_statement_kind(emulator, tmp_path: Path):
    source = Source(tmp_path / "sensors.db", random.Random(42))
    job = Job(emulator, source.path, tmp_path, new_schema("daeins"), ["--batch-size", "15", *INSERT_PATH])
    source.insert(30)
    run_with_drops(emulator, job, source, [
        ("CREATE", "CREATE SCHEMA"),
        ("DEVICE_ID", "CREATE TABLE of the target"),
        ("DESCRIBE", "DESCRIBE"),
        ("INSERT", "INSERT of the progress record"),
    ])
    # Next run: the first INSERT is a progress record, the first statement naming a source column
    # is an INSERT of rows.
    source.insert(20, tie_with_last=True)
    run_with_drops(emulator, job, source, [
        ("SELECT", "SELECT"),
        ("INSERT", "INSERT of the progress record"),
        ("DEVICE_ID", "INSERT of rows"),
    ])


def test_alter_table_add_columns(emulator, tmp_path: Path):
    """A new source column: the uploader adds it with ALTER TABLE ... ADD COLUMNS, whose answer is
    lost; the re-sent ALTER then meets a column that exists. In loop mode the uploader must still
    get the new rows in (it may fail a cycle, not every cycle)."""
    source = Source(tmp_path / "sensors.db", random.Random(43))
    job = Job(emulator, source.path, tmp_path, new_schema("newcol"), ["--batch-size", "20"])
    source.insert(25)
    first = job.run("--once")
    assert first.returncode == 0, first.describe()
    with sqlite3.connect(source.path) as connection:
        connection.execute("ALTER TABLE sensor_logs ADD COLUMN battery REAL")
    connection.close()
    source.insert(15)
    with sqlite3.connect(source.path) as connection:
        connection.execute("UPDATE sensor_logs SET battery = id / 4.0 WHERE battery IS NULL AND id > 25")
    connection.close()
    emulator.set_faults({"kind": "drop_after_execute", "statement": "ALTER", "count": 1})
    loop = job.start("--interval", "1", label="loop")
    try:
        landed = wait_until(lambda: connector_count(emulator, job.schema) == source.count()
                            or loop.count(r"Cycle failed") >= 3, timeout=120, interval=1.0, while_alive=[loop])
        assert fired(emulator, "drop_after_execute") == 1, loop.describe()
        assert landed and connector_count(emulator, job.schema) == source.count(), (
            "the rows with the new column never arrived: every cycle fails on the re-sent ALTER TABLE "
            f"ADD COLUMNS ({loop.count('Cycle failed')} failed cycles).\n{loop.describe()}")
        assert loop.terminate() == 0, loop.describe()
    finally:
        loop.stop_hard()
    assert_exactly_once(emulator, job.schema, source.expected(("id", "device_id", "temperature", "battery")),
                        columns=("id", "device_id", "temperature", "battery"))

