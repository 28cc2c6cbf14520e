"""Hostile files: a truncated or corrupt database, a database replaced by another file while the
uploader runs (log rotation), the table dropped and recreated, rows deleted, a WAL database on a
read-only mount, and a database locked by a long writer transaction.

The source is the same for every target, so these run against the Delta target. What a user
expects: no row lost or sent twice; when the uploader cannot go on, one clear message naming the
file and the problem (exit 2 when retrying cannot help, exit 1 -- retried in loop mode -- when it
can); state file and target never corrupted. Rows deleted at the source are not propagated (the
README: an append-only pipeline); the tests below pin down exactly what happens.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from .kit import (
    INSERT,
    SCHEMA,
    Place,
    add,
    assert_failed_cleanly,
    assert_refused,
    bind_read_only,
    error_lines,
    make_db,
    unmount,
)


def rows(prefix: str, count: int, start_second: int = 0, day: str = "2024-05-01") -> list[tuple]:
    return [(f"{prefix}-{i}", f"{day} {(start_second + i) // 3600:02d}:{(start_second + i) // 60 % 60:02d}:"
             f"{(start_second + i) % 60:02d}", float(i)) for i in range(count)]


def source(path: Path, count: int = 300, prefix: str = "old", wal: bool = False, day: str = "2024-05-01") -> Path:
    return make_db(path, SCHEMA, rows=rows(prefix, count, day=day), insert_sql=INSERT, wal=wal)


def uids(place: Place) -> list[str]:
    return sorted(r["uid"] for r in place.rows())


def assert_exactly(place: Place, expected: list[str]) -> None:
    got = uids(place)
    duplicates = sorted({u for u in got if got.count(u) > 1})
    assert not duplicates, f"uploaded twice: {duplicates[:20]}"
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:20]} ({len(missing)}), unexpected {extra[:20]}"


# ---------------------------------------------------------------------------------------------
# A truncated or corrupt database
# ---------------------------------------------------------------------------------------------

def damage(db: Path, how: str) -> None:
    data = bytearray(db.read_bytes())
    page = 4096
    if how == "truncated-half":
        data = data[: len(data) // 2]
    elif how == "truncated-to-header":
        data = data[:100]
    elif how == "header-garbage":
        data[:16] = b"not sqlite here!"
    elif how == "pages-overwritten":  # every data page's cell area, the first two pages spared
        # (A cycle reads only the newest rows and the rows at its cursor: damage confined to rows
        # uploaded long ago goes unnoticed, see README, Troubleshooting.)
        noise = random.Random(3)
        for offset in range(2 * page, len(data), page):
            data[offset + 100: offset + 1000] = noise.randbytes(900)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated-half", "truncated-to-header", "header-garbage", "pages-overwritten"])
def test_corrupt_database_after_a_good_upload(tmp_path, how):
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=3000))
    first = place.run("--batch-size", "1000")
    assert first.returncode == 0, first.stderr
    before = place.snapshot()
    damage(place.db, how)
    message = assert_refused(place.run("--batch-size", "1000"), "sensors.db")
    assert "corrupt" in message.lower() or "malformed" in message.lower(), message
    assert place.snapshot() == before, "a refused run changed the state or the target"
    assert len(place.rows()) == 3000


# ---------------------------------------------------------------------------------------------
# The database replaced by another file while the uploader runs (log rotation), and the table
# dropped and recreated: the new rows start again at rowid 1
# ---------------------------------------------------------------------------------------------

def rotated_rows() -> list[tuple]:
    # Later than everything in the old file, and one without a timestamp.
    return [*rows("new", 20, day="2024-05-02"), ("new-null", None, 99.0)]


@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_database_file_replaced_while_running(tmp_path, cursor):
    db = source(tmp_path / "src" / "sensors.db", count=300)
    place = Place(tmp_path, db)
    loop = place.start("--interval", "1", "--cursor", cursor)
    try:
        loop.wait_for(lambda: len(uids(place)) == 300 and place.state()["rows_uploaded"] == 300,
                      "the first 300 rows to be uploaded")
        # Rotation as logrotate/applications do it: the old file moves away, a new file takes the path.
        fresh = source(tmp_path / "src" / "sensors.db.new", count=0)
        add(fresh, rotated_rows())
        os.replace(db, tmp_path / "src" / "sensors.db.1")
        os.replace(fresh, db)
        expected = [f"old-{i}" for i in range(300)] + [r[0] for r in rotated_rows()]
        with contextlib.suppress(AssertionError):  # judged below, with the full picture
            loop.wait_for(lambda: len(uids(place)) >= len(expected), "the rotated file's rows to arrive", timeout=45)
        assert loop.alive(), loop.log[-6000:]
    finally:
        code = loop.stop()
    assert code == 0, loop.log[-6000:]
    assert "Traceback" not in loop.log
    assert_exactly(place, expected)


@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_table_dropped_and_recreated_while_running(tmp_path, cursor):
    db = source(tmp_path / "src" / "sensors.db", count=300, wal=True)
    place = Place(tmp_path, db)
    loop = place.start("--interval", "1", "--cursor", cursor)
    try:
        loop.wait_for(lambda: len(uids(place)) == 300, "the first 300 rows to be uploaded")
        errors_before = len(error_lines(loop.log))
        make_db(db, "DROP TABLE readings")
        loop.wait_for(lambda: any("readings" in e for e in error_lines(loop.log)[errors_before:]),
                      "an error about the missing table")
        assert loop.alive(), "a table being recreated must not stop a loop-mode uploader"
        make_db(db, SCHEMA)
        add(db, rotated_rows())
        expected = [f"old-{i}" for i in range(300)] + [r[0] for r in rotated_rows()]
        with contextlib.suppress(AssertionError):  # judged below, with the full picture
            loop.wait_for(lambda: len(uids(place)) >= len(expected), "the recreated table's rows", timeout=45)
    finally:
        code = loop.stop()
    assert code == 0, loop.log[-6000:]
    assert "Traceback" not in loop.log
    assert_exactly(place, expected)


# ---------------------------------------------------------------------------------------------
# Rows deleted at the source: not propagated (append-only); what happens exactly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_retention_delete_of_uploaded_rows(tmp_path, cursor):
    """Deleting old, uploaded rows (retention) changes nothing in the target; new rows arrive once."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300))
    assert place.run("--cursor", cursor).returncode == 0
    make_db(place.db, "DELETE FROM readings WHERE id <= 200")
    add(place.db, rows("more", 10, day="2024-05-02"))
    result = place.run("--cursor", cursor)
    assert result.returncode == 0, result.stderr
    assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"more-{i}" for i in range(10)])


@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_rows_deleted_before_they_were_uploaded(tmp_path, cursor):
    """Rows deleted before a run saw them never arrive; the others arrive once."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300))
    assert place.run("--cursor", cursor).returncode == 0
    add(place.db, rows("more", 10, day="2024-05-02"))
    make_db(place.db, "DELETE FROM readings WHERE uid IN ('more-1', 'more-3', 'more-9')")
    result = place.run("--cursor", cursor)
    assert result.returncode == 0, result.stderr
    kept = [f"more-{i}" for i in range(10) if i not in (1, 3, 9)]
    assert_exactly(place, [f"old-{i}" for i in range(300)] + kept)


@pytest.mark.parametrize("cursor", ["timestamp", "rowid"])
def test_table_emptied_then_refilled(tmp_path, cursor):
    """An edge device that empties its table after each upload: SQLite then numbers new rows from
    1 again (no AUTOINCREMENT). The new rows must arrive, whatever the cursor mode."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300))
    assert place.run("--cursor", cursor).returncode == 0
    make_db(place.db, "DELETE FROM readings")
    add(place.db, rotated_rows())
    result = place.run("--cursor", cursor)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_exactly(place, [f"old-{i}" for i in range(300)] + [r[0] for r in rotated_rows()])


# ---------------------------------------------------------------------------------------------
# A WAL database on a read-only mount (a real `mount -o ro`: EROFS binds root too)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def read_only_view(tmp_path):
    """A function: read_only_view(directory) -> the same files through a read-only bind mount."""
    mounted = []

    def view(directory: Path) -> Path:
        target = tmp_path / f"ro-{len(mounted)}"
        bind_read_only(directory, target)
        mounted.append(target)
        return target

    yield view
    for target in mounted:
        unmount(target)


def test_checkpointed_wal_database_on_a_read_only_mount(tmp_path, read_only_view):
    db = source(tmp_path / "src" / "sensors.db", count=300, wal=True)
    gc.collect()
    assert not (db.parent / "sensors.db-wal").exists()
    view = read_only_view(db.parent)
    place = Place(tmp_path, view / "sensors.db")
    first = place.run()
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert_exactly(place, [f"old-{i}" for i in range(300)])
    again = place.run()
    assert again.returncode == 0, again.stderr
    assert "0 read, 0 uploaded" in again.stderr


def test_wal_database_with_a_live_writer_on_a_read_only_mount(tmp_path, read_only_view):
    """The application writes on its side (its -wal holds rows not yet checkpointed); the uploader
    sees the files through a read-only mount and must upload every committed row."""
    db = source(tmp_path / "src" / "sensors.db", count=300, wal=True)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.executemany(INSERT, rows("wal", 25, day="2024-05-02"))
        assert (db.parent / "sensors.db-wal").stat().st_size > 0
        view = read_only_view(db.parent)
        place = Place(tmp_path, view / "sensors.db")
        result = place.run()
        assert result.returncode == 0, result.stderr
        assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"wal-{i}" for i in range(25)])
        writer.executemany(INSERT, rows("later", 5, day="2024-05-03"))
        again = place.run()
        assert again.returncode == 0, again.stderr
        assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"wal-{i}" for i in range(25)]
                       + [f"later-{i}" for i in range(5)])
    finally:
        writer.close()


def test_wal_file_without_its_index_on_a_read_only_mount(tmp_path, read_only_view):
    """A copy taken while the writer was running: committed rows are still in sensors.db-wal and
    there is no -shm. On a read-only mount SQLite cannot rebuild the index, and reading the main
    file alone would silently miss those rows: the uploader must refuse, saying why and what to do."""
    live = source(tmp_path / "live" / "sensors.db", count=300, wal=True)
    writer = sqlite3.connect(live, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.executemany(INSERT, rows("wal", 25, day="2024-05-02"))
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(live, copy / "sensors.db")
        shutil.copy(live.parent / "sensors.db-wal", copy / "sensors.db-wal")
    finally:
        writer.close()
    view = read_only_view(copy)
    place = Place(tmp_path, view / "sensors.db")
    result = place.run()
    message = assert_refused(result, "sensors.db")
    reason = message.replace(str(view), "<dir>").lower()
    assert "read-only" in reason and "-wal" in reason, f"the message does not say why: {message}"
    assert not place.lake.exists() and not place.state_file.exists()


# ---------------------------------------------------------------------------------------------
# A database locked by a long writer transaction
# ---------------------------------------------------------------------------------------------

def test_rollback_journal_database_locked_by_a_writer(tmp_path):
    """--once: the run fails as a run-time failure (exit 1, the lock named); nothing is touched;
    the next run after the writer commits uploads everything once, the writer's rows included."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300))
    assert place.run().returncode == 0
    add(place.db, rows("more", 10, day="2024-05-02"))
    before = place.snapshot()
    writer = sqlite3.connect(place.db, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        writer.executemany(INSERT, rows("locked", 5, day="2024-05-03"))
        locked = place.run("--sqlite-busy-timeout", "1")
        assert_failed_cleanly(locked, "sensors.db", "locked")
        assert place.snapshot() == before
        writer.execute("COMMIT")
    finally:
        writer.close()
    result = place.run()
    assert result.returncode == 0, result.stderr
    assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"more-{i}" for i in range(10)]
                   + [f"locked-{i}" for i in range(5)])


def test_loop_mode_waits_out_a_lock_held_at_start_up(tmp_path):
    """In loop mode a lock is a run-time failure like any other: logged, retried with backoff --
    also when the service starts while the writer holds the lock (a container restarting)."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300))
    writer = sqlite3.connect(place.db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    writer.executemany(INSERT, rows("locked", 5, day="2024-05-03"))
    loop = place.start("--interval", "1", "--sqlite-busy-timeout", "1")
    try:
        loop.wait_for(lambda: "locked" in "\n".join(error_lines(loop.log)), "an error about the lock")
        assert loop.alive(), f"the loop gave up on a lock:\n{loop.log[-3000:]}"
        writer.execute("COMMIT")
        loop.wait_for(lambda: len(uids(place)) == 305, "the rows once the writer committed", timeout=120)
    finally:
        writer.close()
        code = loop.stop()
    assert code == 0, loop.log[-6000:]
    assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"locked-{i}" for i in range(5)])


def test_wal_database_with_a_long_write_transaction_open(tmp_path):
    """WAL: a writer's open transaction blocks nobody; its rows are not visible until it commits,
    and then arrive exactly once."""
    place = Place(tmp_path, source(tmp_path / "src" / "sensors.db", count=300, wal=True))
    writer = sqlite3.connect(place.db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.executemany(INSERT, rows("pending", 5, day="2024-05-02"))
        result = place.run("--sqlite-busy-timeout", "1")
        assert result.returncode == 0, result.stderr
        assert_exactly(place, [f"old-{i}" for i in range(300)])
        writer.execute("COMMIT")
    finally:
        writer.close()
    result = place.run()
    assert result.returncode == 0, result.stderr
    assert_exactly(place, [f"old-{i}" for i in range(300)] + [f"pending-{i}" for i in range(5)])
