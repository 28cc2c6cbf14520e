"""Delta-style optimistic write conflicts (admin config "conflicts"): which overlapping statements fail."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from databricks.sql.exc import ServerOperationError
from emulator_harness import Emulator


def _together(emulator: Emulator, *statements: str) -> list[str | None]:
    """Run the statements at the same time, each on its own connection: the error class of each, or None."""
    outcomes: list[str | None] = [None] * len(statements)

    def run(index: int, statement: str) -> None:
        with emulator.connect() as connection, connection.cursor() as cursor:
            try:
                cursor.execute(statement)
            except ServerOperationError as exc:
                outcomes[index] = str(exc).split("]")[0].lstrip("[").split(".")[0]

    threads = [threading.Thread(target=run, args=item) for item in enumerate(statements)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.fixture
def conflicts(emulator: Emulator) -> None:
    # Long enough that statements sent together overlap even on a loaded machine.
    emulator.set_config(conflicts=True, conflict_window=1.5)


def test_blind_appends_never_conflict(emulator: Emulator, conflicts: None, cur: Any, schema: str) -> None:
    table = f"main.{schema}.t"
    cur.execute(f"CREATE TABLE {table} (x STRING)")
    assert _together(emulator, f"INSERT INTO {table} VALUES ('a')", f"INSERT INTO {table} VALUES ('b')") == [None, None]
    cur.execute(f"SELECT count(*) FROM {table}")
    assert cur.fetchone()[0] == 2
    assert not emulator.stats()["conflicts"]


def test_an_insert_that_reads_its_table_loses_to_a_concurrent_append(emulator: Emulator, conflicts: None, cur: Any,
                                                                      schema: str) -> None:
    table = f"main.{schema}.t"
    cur.execute(f"CREATE TABLE {table} (x STRING)")
    guarded = ("INSERT INTO {t} SELECT * FROM VALUES ('{v}') AS v(x) "
               "WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE x = '{v}')")
    outcomes = _together(emulator, guarded.format(t=table, v="a"), guarded.format(t=table, v="b"))
    assert sorted(map(str, outcomes)) == ["DELTA_CONCURRENT_APPEND", "None"]
    cur.execute(f"SELECT count(*) FROM {table}")
    assert cur.fetchone()[0] == 1  # the loser committed nothing
    assert emulator.stats()["conflicts"] == {"DELTA_CONCURRENT_APPEND": 1}


def test_concurrent_metadata_changes_conflict(emulator: Emulator, conflicts: None, cur: Any, schema: str) -> None:
    table = f"main.{schema}.t"
    cur.execute(f"CREATE TABLE {table} (x STRING)")
    outcomes = _together(emulator, f"ALTER TABLE {table} ADD COLUMNS (a STRING)",
                         f"ALTER TABLE {table} ADD COLUMNS (b STRING)")
    assert sorted(map(str, outcomes)) == ["DELTA_METADATA_CHANGED", "None"]
    cur.execute(f"DESCRIBE TABLE {table}")
    assert len({row[0] for row in cur.fetchall()} & {"a", "b"}) == 1
