"""Hostile state: a state file edited by hand, from another table or target, from a newer version of
the tool; a disk that fills up and a state directory that turns read-only while the uploader writes.

(The truncated, garbage, empty and non-object state files are tests/test_bad_input.py's.)

What a user expects: the Delta table records every batch's cursor, so a state file that disagrees
with it is either corrected from the target's record (nothing lost, nothing sent twice) or refused
with exit 2 naming the file -- never trusted into skipping rows or uploading them again, never a
traceback; a failed write leaves the previous state file intact and no debris, the message names
the file or directory, and once the disk is writable again everything arrives exactly once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Callable
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
    temp_debris,
    unmount,
)


def rows(prefix: str, count: int, day: str = "2024-05-01") -> list[tuple]:
    return [(f"{prefix}-{i}", f"{day} {i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}", float(i)) for i in range(count)]


def new_place(root: Path, count: int = 300) -> Place:
    return Place(root, make_db(root / "src" / "sensors.db", SCHEMA, rows=rows("old", count), insert_sql=INSERT))


def assert_exactly(place: Place, expected: list[str]) -> None:
    got = sorted(r["uid"] for r in place.rows())
    duplicates = sorted({u for u in got if got.count(u) > 1})
    assert not duplicates, f"uploaded twice: {len(duplicates)} rows, e.g. {duplicates[:10]}"
    missing = sorted(set(expected) - set(got))
    assert not missing, f"never uploaded: {len(missing)} rows, e.g. {missing[:10]}"
    assert len(got) == len(expected), f"{len(got)} rows, expected {len(expected)}"


OLD = [f"old-{i}" for i in range(300)]
NEW = [f"new-{i}" for i in range(5)]


# ---------------------------------------------------------------------------------------------
# A state file edited by hand
# ---------------------------------------------------------------------------------------------

def _cursor(**changes) -> Callable[[dict], None]:
    return lambda state: state["cursor"].update(changes)


def _top(**changes) -> Callable[[dict], None]:
    return lambda state: state.update(changes)


EDITS: dict[str, Callable[[dict], None]] = {
    "cursor-key-in-the-future": lambda s: s["cursor"].update(key=s["cursor"]["key"] + 10**12),
    "cursor-rewound-to-the-start": _cursor(key=None, loc=None, null_loc=None),
    "cursor-key-is-text": _cursor(key="2024-05-01"),
    "cursor-key-is-nan": _cursor(key=math.nan),
    "cursor-key-beyond-int64": _cursor(key=10**40),
    "cursor-key-with-a-fraction": lambda s: s["cursor"].update(key=s["cursor"]["key"] + 0.5),
    "cursor-mode-flipped": _cursor(mode="rowid"),
    "cursor-mode-unknown": _cursor(mode="sideways"),
    "cursor-locator-of-two-values": _cursor(loc=[1, 2]),
    "cursor-locator-zero": _cursor(loc=[0]),
    "cursor-locator-not-a-list": _cursor(loc=5),
    "cursor-null-locator-zero": _cursor(null_loc=[0]),
    "cursor-ties-junk": _cursor(ties=[[1], "x"]),
    "cursor-window-half-written": _cursor(window={"top": [1]}),
    "cursor-window-invented": _cursor(window={"top": [305], "top_key": None, "start": [1], "done": None,
                                              "filtered": False, "rows": 5}),
    "batch-seq-lower": _top(batch_seq=1),
    "batch-seq-higher": _top(batch_seq=9),
    "batch-seq-negative": _top(batch_seq=-1),
    "batch-seq-boolean": _top(batch_seq=True),
    "batch-seq-fraction": _top(batch_seq=2.9),
    "last-upload-edited": _top(last_upload="2020-01-01T00:00:00Z"),
    "app-id-edited": _top(app_id="sqlite_to_databricks_uploader:0000000000000000"),
    "rows-uploaded-negative": _top(rows_uploaded=-5),
    "format-as-text": _top(format="1"),
    "unknown-top-level-field": _top(comment="edited by ops"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_state_file_edited_by_hand(tmp_path, edit):
    place = new_place(tmp_path)
    first = place.run("--batch-size", "100")
    assert first.returncode == 0, first.stderr
    state = place.state()
    EDITS[edit](state)
    edited = json.dumps(state, indent=2).encode()
    place.state_file.write_bytes(edited)
    add(place.db, rows("new", 5, day="2024-05-02"))
    before = place.snapshot()

    result = place.run("--batch-size", "100")
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    if result.returncode == 2:
        assert_refused(result, "upload_state.json")
        assert place.snapshot() == before, "a refused run changed the state file or the target"
        assert place.state_file.read_bytes() == edited
        return
    assert result.returncode == 0, (f"exit {result.returncode}: neither corrected from the target's record nor "
                                    f"refused\n{result.stderr[-4000:]}")
    assert_exactly(place, OLD + NEW)
    again = place.run("--batch-size", "100")
    assert again.returncode == 0, again.stderr
    assert_exactly(place, OLD + NEW)


def test_state_file_saved_with_a_byte_order_mark(tmp_path):
    """An editor that adds a UTF-8 BOM: refused naming the file (or read); never a traceback."""
    place = new_place(tmp_path)
    assert place.run().returncode == 0
    text = place.state_file.read_text(encoding="utf-8")
    place.state_file.write_bytes(b"\xef\xbb\xbf" + text.encode())
    add(place.db, rows("new", 5, day="2024-05-02"))
    result = place.run()
    if result.returncode == 2:
        assert_refused(result, "upload_state.json")
        return
    assert result.returncode == 0, result.stderr
    assert_exactly(place, OLD + NEW)


# ---------------------------------------------------------------------------------------------
# A state file of another table or target
# ---------------------------------------------------------------------------------------------

def test_state_file_of_another_table_of_the_same_database(tmp_path):
    place = new_place(tmp_path)
    make_db(place.db, "CREATE TABLE other (id INTEGER PRIMARY KEY, ts TEXT)",
            "INSERT INTO other (ts) VALUES ('2024-05-01 00:00:00')")
    assert place.run("--table", "readings").returncode == 0
    before = place.snapshot()
    other = Place(tmp_path, place.db, table="other")  # same state directory, another table
    assert_refused(other.run("--table", "other"), "upload_state.json", "readings", "other")
    assert place.snapshot() == before
    assert not other.lake.exists()


def test_state_file_of_another_target(tmp_path):
    place = new_place(tmp_path)
    assert place.run().returncode == 0
    before = place.snapshot()
    moved = Place(tmp_path, place.db)
    moved.lake = tmp_path / "lake2" / "readings"
    assert_refused(moved.run(), "upload_state.json", str(place.lake), str(moved.lake))
    assert place.snapshot() == before
    assert not moved.lake.exists()


# ---------------------------------------------------------------------------------------------
# A state file from a newer version of the tool
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [3, 99, 10**20])  # the current format is 2
def test_state_file_from_a_newer_version(tmp_path, version):
    place = new_place(tmp_path)
    assert place.run().returncode == 0
    state = place.state()
    state.update(format=version, tool="sqlite_to_databricks_uploader 9.0.0", checksum="abc")
    state["cursor"]["epoch"] = 3  # a field this version does not know
    newer = json.dumps(state, indent=2).encode()
    place.state_file.write_bytes(newer)
    add(place.db, rows("new", 5, day="2024-05-02"))
    before = place.snapshot()
    assert_refused(place.run(), "upload_state.json", "newer", "upgrade")
    assert place.snapshot() == before
    assert place.state_file.read_bytes() == newer
    info = place.run("--run-query", "INFO")  # looking must still work
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr


# ---------------------------------------------------------------------------------------------
# A disk that fills up (a small tmpfs)
# ---------------------------------------------------------------------------------------------

def fill(directory: Path) -> Path:
    """Fill a tmpfs to the last byte; returns the filler to delete later."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(descriptor)
    return filler


def test_disk_full_while_writing_the_state_file(tmp_path, tmpfs):
    place = new_place(tmp_path, count=3000)
    place.state_dir = tmpfs(64 * 1024)
    assert place.run("--batch-size", "1000").returncode == 0
    add(place.db, rows("new", 1500, day="2024-05-02"))
    before = place.state_file.read_bytes()
    filler = fill(place.state_dir)

    full = place.run("--batch-size", "1000")
    problems = []
    if place.state_file.read_bytes() != before:
        problems.append("the state file was damaged by the failed write")
    if temp_debris(place.state_dir):
        problems.append(f"the failed write left temporary files behind: {temp_debris(place.state_dir)}")
    try:
        assert_failed_cleanly(full, "No space left", str(place.state_dir))
    except AssertionError as exc:
        problems.append(f"the message does not say which disk is full: {str(exc).splitlines()[0]}")
    assert not problems, "\n".join(problems)

    filler.unlink()
    again = place.run("--batch-size", "1000")
    assert again.returncode == 0, again.stderr
    assert_exactly(place, [f"old-{i}" for i in range(3000)] + [f"new-{i}" for i in range(1500)])
    # The state file caught up with the target (its rows_uploaded counter only counts what the
    # file itself saw, so it is not compared): a further run finds nothing to do.
    last = place.run("--batch-size", "1000")
    assert last.returncode == 0 and "0 read, 0 uploaded" in last.stderr, last.stderr


def test_disk_full_in_loop_mode_recovers_when_space_returns(tmp_path, tmpfs):
    place = new_place(tmp_path)
    place.state_dir = tmpfs(64 * 1024)
    loop = place.start("--interval", "1", "--batch-size", "100")
    try:
        loop.wait_for(lambda: place.state()["rows_uploaded"] == 300, "the first 300 rows")
        filler = fill(place.state_dir)
        errors = len(error_lines(loop.log))
        add(place.db, rows("new", 250, day="2024-05-02"))
        loop.wait_for(lambda: len(error_lines(loop.log)) > errors, "an error about the full disk")
        assert any("No space left" in e for e in error_lines(loop.log)[errors:]), loop.log[-3000:]
        assert json.loads(place.state_file.read_text())["rows_uploaded"] == 300
        loop.wait_for(lambda: len(place.rows()) == 550, "the new rows to reach the target meanwhile")
        filler.unlink()
        # Space again: the state file records where the uploader is, without waiting for new rows.
        loop.wait_for(lambda: place.state()["rows_uploaded"] == 550, "the state file to catch up", timeout=60)
    finally:
        code = loop.stop()
    assert code == 0, loop.log[-4000:]
    assert_exactly(place, OLD + [f"new-{i}" for i in range(250)])


def test_disk_full_for_the_delta_table(tmp_path, tmpfs):
    place = new_place(tmp_path, count=3000)
    place.lake = tmpfs(1024 * 1024) / "readings"
    assert place.run().returncode == 0
    add(place.db, rows("new", 3000, day="2024-05-02"))
    before = place.snapshot()
    filler = fill(place.lake.parent)

    full = place.run()
    assert_failed_cleanly(full, "No space left", str(place.lake))
    assert place.snapshot() == before
    assert len(place.rows()) == 3000, "the Delta table is no longer readable as it was"

    filler.unlink()
    again = place.run()
    assert again.returncode == 0, again.stderr
    assert_exactly(place, [f"old-{i}" for i in range(3000)] + [f"new-{i}" for i in range(3000)])


# ---------------------------------------------------------------------------------------------
# The state directory turning read-only (a real read-only remount, which binds root too)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def switchable_state_dir(tmp_path):
    """(path, make_read_only, make_writable): a state directory that is its own bind mount."""
    real, path = tmp_path / "state-disk", tmp_path / "state"
    real.mkdir()
    bind_read_only(real, path)
    remount = lambda mode: subprocess.run(["mount", "-o", f"remount,{mode},bind", str(path)],  # noqa: E731
                                          capture_output=True, text=True, check=True)
    remount("rw")
    yield path, lambda: remount("ro"), lambda: remount("rw")
    unmount(path)


def test_state_dir_turns_read_only_while_running(tmp_path, switchable_state_dir):
    state_dir, read_only, writable = switchable_state_dir
    place = new_place(tmp_path)
    place.state_dir = state_dir
    loop = place.start("--interval", "1", "--batch-size", "100")
    try:
        loop.wait_for(lambda: place.state()["rows_uploaded"] == 300, "the first 300 rows")
        good = place.state_file.read_bytes()
        errors = len(error_lines(loop.log))
        read_only()
        add(place.db, rows("new", 250, day="2024-05-02"))
        loop.wait_for(lambda: len(error_lines(loop.log)) > errors, "an error about the read-only state directory")
        message = "\n".join(error_lines(loop.log)[errors:])
        assert "read-only" in message.lower() and str(state_dir) in message, message
        assert loop.alive()
        assert place.state_file.read_bytes() == good
        loop.wait_for(lambda: len(place.rows()) == 550, "the new rows to reach the target meanwhile")
        writable()
        # Writable again: the state file records where the uploader is, without waiting for new rows.
        loop.wait_for(lambda: place.state()["rows_uploaded"] == 550, "the state file to catch up", timeout=60)
    finally:
        writable()
        code = loop.stop()
    assert code == 0, loop.log[-4000:]
    assert "Traceback" not in loop.log
    assert_exactly(place, OLD + [f"new-{i}" for i in range(250)])
    assert temp_debris(state_dir) == []


def test_state_dir_read_only_at_start(tmp_path, switchable_state_dir):
    state_dir, read_only, writable = switchable_state_dir
    place = new_place(tmp_path)
    place.state_dir = state_dir
    assert place.run().returncode == 0
    add(place.db, rows("new", 5, day="2024-05-02"))
    before = place.snapshot()
    read_only()
    try:
        assert_refused(place.run(), str(state_dir), "writable")
        assert place.snapshot() == before
    finally:
        writable()
    again = place.run()
    assert again.returncode == 0, again.stderr
    assert_exactly(place, OLD + NEW)
