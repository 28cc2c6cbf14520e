"""Exactly once through an edge database's everyday life (issue 10), on the local Delta target.

Three lives, each with the default settings and with `cursor: rowid`:
1. the clock steps back (a board without a real-time clock boots with an old time): rows written
   then carry timestamps older than rows already uploaded;
2. retention deletes the oldest rows and VACUUMs the file, which renumbers the rowids of a table
   without an INTEGER PRIMARY KEY;
3. both in one life: a reboot with a stepped-back clock, then retention + VACUUM before the next cycle.

Each life is also lived in loop mode beside a writer that keeps appending, with random SIGKILLs of
the uploader; and a property test mixes all of it in random order. The ledger of every row ever
written (rows later deleted by retention included) must match the target exactly once.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from database_life import TABLE, Device, ledger_report
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from uploader_testkit import clean_env, read_delta, run_uploader, uploader_command

CURSORS = [pytest.param((), id="default"), pytest.param(("--cursor", "rowid"), id="rowid")]


class Node:
    """The uploader on one device: runs it as a user does and reads what the target holds."""

    def __init__(self, root: Path, cursor: tuple[str, ...] = ()):
        self.root = root
        self.device = Device(root / "data" / "sensors.db", random.Random(str(root)))
        self.lake = root / "lake"
        self.cursor = cursor

    def args(self, *extra: str) -> list[str]:
        return ["--sqlite", str(self.device.path), "--state-dir", str(self.root / "state"),
                "--delta-path", str(self.lake), *self.cursor, *extra]

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        result = run_uploader(*self.args("--once", *extra), cwd=self.root, timeout=300)
        assert result.returncode == 0, result.stderr[-6000:]
        assert "Traceback" not in result.stderr, result.stderr[-6000:]
        return result

    def uploaded(self) -> Counter:
        if not (self.lake / "_delta_log").exists():
            return Counter()
        return Counter(read_delta(self.lake).column("uid").to_pylist())

    def assert_exactly_once(self) -> None:
        problems = ledger_report(self.uploaded(), self.device.ledger)
        assert not problems, "; ".join(problems)


@pytest.fixture(params=CURSORS)
def node(request, tmp_path: Path) -> Node:
    return Node(tmp_path, request.param)


# ---------------------------------------------------------------------------------------------
# The three lives, one step at a time
# ---------------------------------------------------------------------------------------------

def test_clock_steps_back(node: Node):
    node.device.append(100)
    node.run()
    node.device.step_back(3600)  # rows an hour older than the ones uploaded
    node.device.append(50)
    result = node.run()
    node.assert_exactly_once()
    assert "not uploaded" not in result.stderr.lower(), result.stderr
    node.run()  # and nothing twice on the next run
    node.assert_exactly_once()


def test_retention_and_vacuum_renumber_the_rowids(node: Node):
    node.device.append(100)
    node.run()
    assert node.device.retention(50) == 50
    node.device.vacuum()
    assert node.device.rowids_renumbered_by_vacuum()
    node.device.append(10)
    result = node.run()
    node.assert_exactly_once()
    assert "renumbered" in result.stderr, result.stderr
    node.device.append(5)
    node.run()
    node.assert_exactly_once()


def test_stepped_back_clock_then_retention_and_vacuum(node: Node):
    node.device.append(100)
    node.run()
    node.device.step_back(7200)  # reboot: the clock is two hours behind
    node.device.append(30)
    node.device.retention(40)  # the oldest uploaded rows go, before the next cycle ran
    node.device.vacuum()
    node.run()
    node.assert_exactly_once()
    node.device.append(20)
    node.device.retention(60)
    node.device.vacuum()
    node.run()
    node.assert_exactly_once()


def test_every_uploaded_row_deleted_then_vacuum(node: Node):
    """Retention took every uploaded row: all rows the table holds now are new."""
    node.device.append(40)
    node.run()
    node.device.append(15)  # not uploaded yet
    node.device.retention(40)
    node.device.vacuum()
    result = node.run()
    node.assert_exactly_once()
    assert "None of the rows uploaded last" in result.stderr, result.stderr


def test_vacuum_in_the_middle_of_a_window(node: Node):
    """Rows renumbered between two batches of one window: the next batch notices it."""
    node.device.append(300)
    first = subprocess.Popen(uploader_command(*node.args("--once", "--batch-size", "1")), cwd=node.root,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(node.uploaded()) < 20 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        node.device.retention(15, uploaded=node.uploaded())
        node.device.vacuum()
        node.device.append(10)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-6000:]
    node.run()
    node.assert_exactly_once()


def test_low_rowids_inserted_below_the_cursor(tmp_path: Path):
    """Rows inserted with explicit rowids below the cursor: found by their newer timestamps in the
    default mode; in rowid mode, where they cannot be told from uploaded rows, the log says so."""
    for cursor in ((), ("--cursor", "rowid")):
        node = Node(tmp_path / ("rowid" if cursor else "default"), cursor)
        node.device.append(50)
        node.run()
        uids = []
        with contextlib.closing(sqlite3.connect(node.device.path)) as connection, connection:
            connection.execute(f"DELETE FROM {TABLE} WHERE rowid BETWEEN 10 AND 14")  # five uploaded rows go
            for rowid in (0, 10, 11, 12, 13, 14):  # six come back, with explicit rowids: one more than before
                uid = f"low-{rowid}"
                connection.execute(f"INSERT INTO {TABLE} (rowid, uid, timestamp, sensor, value) "
                                   "VALUES (?, ?, '2030-01-01 00:00:00', 's9', 1)", (rowid, uid))
                uids.append(uid)
        node.device.ledger += uids
        result = node.run()
        found = node.uploaded()
        if not cursor:
            node.assert_exactly_once()
            assert "scanned once" in result.stderr, result.stderr
        else:
            assert not [uid for uid, n in found.items() if n > 1]
            assert "NOT uploaded" in result.stderr and "cursor: timestamp" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Loop mode beside a writer that keeps going, with random SIGKILLs
# ---------------------------------------------------------------------------------------------

LIFE_SECONDS = 7.0


def live(node: Node, life: str, stop: threading.Event, errors: list[str]) -> None:
    """The application: appends every few ms; steps its clock back and/or ages its data."""
    rng = random.Random(life)
    next_event = time.monotonic() + 1.0
    try:
        while not stop.is_set():
            node.device.append(rng.randint(1, 8), ties=rng.random() < 0.3)
            if time.monotonic() >= next_event:
                next_event = time.monotonic() + rng.uniform(0.6, 1.5)
                if life in ("clock", "both"):
                    node.device.step_back(rng.choice([600, 3600, 86400]))
                if life in ("vacuum", "both"):
                    with contextlib.suppress(Exception):  # the table may be mid-commit: next time
                        uploaded = node.uploaded()
                        node.device.retention(rng.randint(5, 60), uploaded=uploaded)
                        node.device.vacuum()
            time.sleep(rng.uniform(0.001, 0.02))
    except Exception as exc:  # reported by the test, not lost in the thread
        errors.append(repr(exc))


@pytest.mark.parametrize("life", ["clock", "vacuum", "both"])
@pytest.mark.parametrize("cursor", CURSORS)
def test_loop_mode_with_a_writer_and_sigkills(tmp_path: Path, life: str, cursor: tuple[str, ...]):
    node = Node(tmp_path, cursor)
    node.device.append(50)
    stop, errors = threading.Event(), []
    writer = threading.Thread(target=live, args=(node, life, stop, errors), daemon=True)
    writer.start()
    rng = random.Random(f"{life}{cursor}")
    kills = 0
    logs: list[Path] = []
    deadline = time.monotonic() + LIFE_SECONDS
    try:
        while time.monotonic() < deadline:
            logs.append(node.root / f"run-{len(logs)}.log")
            with open(logs[-1], "w") as log:
                process = subprocess.Popen(uploader_command(*node.args("--interval", "0.2", "--batch-size",
                                                                       str(rng.choice([3, 20, 1000])))),
                                           cwd=node.root, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=rng.uniform(0.3, 2.0))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            code = process.wait(timeout=60)
            assert code in (0, -signal.SIGKILL), f"uploader exited {code}"
    finally:
        stop.set()
        writer.join(timeout=60)
    assert not errors, errors
    assert kills >= 3, kills
    result = node.run()  # drain what the writer added last
    node.assert_exactly_once()
    logged = "".join(path.read_text() for path in logs) + result.stderr
    assert "NOT uploaded" not in logged
    assert "Traceback" not in logged
    if life != "clock":  # the life really happened: the uploader met renumbered rows
        assert "renumbered" in logged or "None of the rows uploaded last" in logged


# ---------------------------------------------------------------------------------------------
# Everything mixed, in random order (property-based)
# ---------------------------------------------------------------------------------------------

def commits(lake: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(1 for name in (lake / "_delta_log").iterdir() if name.name.endswith(".json"))
    return 0


change = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 40), st.booleans()),
    st.tuples(st.just("step_back"), st.sampled_from([1, 60, 3600, 86400 * 30])),
    st.tuples(st.just("retention"), st.integers(1, 60)),
    st.tuples(st.just("vacuum")),
    st.tuples(st.just("low"), st.integers(1, 5)),  # explicit rowids below the cursor (default mode)
)
# Each round: what the application does, then one run with a batch size, SIGKILLed once that many
# more batches committed (None: the run is left to finish).
rounds = st.lists(st.tuples(st.lists(change, max_size=5), st.integers(1, 25), st.sampled_from([None, 0, 1, 2, 3])),
                  min_size=2, max_size=7)


def test_random_lives_keep_every_row_exactly_once(tmp_path_factory):
    tally: Counter = Counter()

    @settings(max_examples=26, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
              suppress_health_check=list(HealthCheck))
    @given(plan=rounds, cursor=st.sampled_from([(), ("--cursor", "rowid")]))
    def example(plan: list[tuple], cursor: tuple[str, ...]) -> None:
        node = Node(tmp_path_factory.mktemp("life"), cursor)
        note(f"work directory {node.root}")
        node.device.append(10)
        # Rows inserted below the cursor are found when the row count below it grew (default mode).
        # The documented limits: rowid mode cannot tell them from uploaded rows, and deletes or a
        # VACUUM between the last count and the next one hide them. So they come only where a
        # count will see them, and deletes and VACUUMs wait for a complete run after them.
        deleted_since_a_full_run = low_rows_waiting = False
        for changes, batch_size, kill_after in [*plan, ([], 7, None)]:
            for op in changes:
                kind = op[0]
                if kind == "low":
                    if not cursor and not deleted_since_a_full_run:
                        inserted = node.device.insert_low(op[1])
                        tally["low rows"] += inserted
                        low_rows_waiting |= inserted > 0
                elif kind in ("retention", "vacuum") and low_rows_waiting:
                    continue
                elif kind == "append":
                    node.device.append(op[1], ties=op[2])
                elif kind == "step_back":
                    node.device.step_back(op[1])
                elif kind == "retention":
                    deleted_since_a_full_run |= node.device.retention(op[1], uploaded=node.uploaded()) > 0
                else:
                    node.device.vacuum()
                    deleted_since_a_full_run = True
            before = commits(node.lake)
            process = subprocess.Popen(uploader_command(*node.args("--once", "--batch-size", str(batch_size))),
                                       cwd=node.root, env=clean_env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            if kill_after is None:
                process.wait(timeout=300)
            else:  # while it commits batches: after `kill_after` more of them, a moment later
                deadline = time.monotonic() + 60
                while (process.poll() is None and commits(node.lake) < before + kill_after
                       and time.monotonic() < deadline):
                    time.sleep(0.002)
                time.sleep(random.Random(len(node.device.ledger)).uniform(0, 0.03))
            if process.poll() is None:
                process.kill()
                tally["kills"] += 1
            _, stderr = process.communicate(timeout=60)
            found = node.uploaded()
            assert not [uid for uid, n in found.items() if n > 1], f"duplicates after a run\n{stderr[-4000:]}"
            if process.returncode == 0:
                tally["runs"] += 1
                deleted_since_a_full_run = low_rows_waiting = False
                problems = ledger_report(found, node.device.ledger)
                assert not problems, "; ".join(problems) + "\n" + stderr[-4000:]
            else:
                assert process.returncode == -signal.SIGKILL, stderr[-4000:]

    example()
    print(f"\n{tally['runs']} complete runs checked against the ledger, {tally['kills']} SIGKILLs, "
          f"{tally['low rows']} rows inserted below the cursor")
    assert tally["kills"] >= 20, tally


def test_without_rowid_table_reports_rows_it_cannot_upload(tmp_path: Path):
    """A WITHOUT ROWID table has no insertion order: rows added later with older timestamps cannot be
    told from uploaded ones. They are not uploaded, and the log says how many, why and what to do."""
    db = tmp_path / "events.db"
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("CREATE TABLE events (key TEXT PRIMARY KEY, ts TEXT, v REAL) WITHOUT ROWID")
        connection.executemany("INSERT INTO events VALUES (?, ?, ?)",
                               [(f"k{i:03d}", f"2026-06-01 12:00:{i:02d}", i) for i in range(10)])
    args = ["--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--delta-path", str(tmp_path / "lake"),
            "--once"]
    assert run_uploader(*args, cwd=tmp_path).returncode == 0
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.executemany("INSERT INTO events VALUES (?, ?, ?)",
                               [(f"late{i}", f"2026-05-01 00:00:0{i}", i) for i in range(3)]
                               + [(f"new{i}", f"2026-06-01 13:00:0{i}", i) for i in range(2)])
    result = run_uploader(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    keys = Counter(read_delta(tmp_path / "lake").column("key").to_pylist())
    assert keys == Counter([f"k{i:03d}" for i in range(10)] + ["new0", "new1"])
    assert "3 row(s) were added to the WITHOUT ROWID table 'events'" in result.stderr, result.stderr
    assert "Give the table a rowid" in result.stderr


def test_a_cursor_written_by_the_previous_version_keeps_working(node: Node):
    """State files from before insertion order: their cursor is converted on the first cycle."""
    import json

    import sqlite_to_databricks_uploader as uploader

    node.device.append(30)
    node.run()
    path = node.root / "state" / "upload_state.json"
    state = json.loads(path.read_text())
    cursor = state["cursor"]
    state["cursor"] = {"mode": cursor["mode"], "key": cursor["key"], "loc": cursor["loc"], "null_loc": cursor["loc"],
                       "last_upload": cursor["last_upload"], "window": None, "ties": None}
    state["format"] = 1
    state["checksum"] = uploader.state_checksum(state)
    path.write_text(json.dumps(state))
    node.device.step_back(3600)
    node.device.append(10)
    node.run()
    node.assert_exactly_once()
    node.device.retention(20)
    node.device.vacuum()
    node.device.append(5)
    node.run()
    node.assert_exactly_once()


def test_vacuum_of_a_table_without_timestamps(tmp_path: Path):
    """No timestamp to find the fingerprinted rows by: every row is hashed once instead."""
    db = tmp_path / "counts.db"
    ledger = [f"u{i}" for i in range(80)]
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("CREATE TABLE counts (uid TEXT, value REAL)")
        connection.executemany("INSERT INTO counts VALUES (?, ?)", [(uid, 1.0) for uid in ledger[:60]])
    args = ["--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--delta-path", str(tmp_path / "lake"),
            "--once", "--cursor", "rowid"]
    assert run_uploader(*args, cwd=tmp_path).returncode == 0
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as connection:
        connection.execute("DELETE FROM counts WHERE rowid <= 25")
        connection.execute("VACUUM")
        connection.executemany("INSERT INTO counts VALUES (?, ?)", [(uid, 1.0) for uid in ledger[60:]])
    result = run_uploader(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "renumbered" in result.stderr, result.stderr
    assert not ledger_report(Counter(read_delta(tmp_path / "lake").column("uid").to_pylist()), ledger)


# ---------------------------------------------------------------------------------------------
# Changes around the rows at the cursor (found by review; each lost or duplicated rows once)
# ---------------------------------------------------------------------------------------------

class Table:
    """A small table `t(ts, v)` with or without INTEGER PRIMARY KEY, uploaded --once."""

    def __init__(self, root: Path, integer_key: bool = False):
        self.root = root
        self.db = root / "t.db"
        self.expected: list[str] = []
        with contextlib.closing(sqlite3.connect(self.db)) as connection, connection:
            key = "id INTEGER PRIMARY KEY, " if integer_key else ""
            connection.execute(f"CREATE TABLE t ({key}ts TEXT, v TEXT)")

    def sql(self, statement: str, rows: list[tuple] = (), vacuum: bool = False) -> None:
        with contextlib.closing(sqlite3.connect(self.db, isolation_level=None)) as connection:
            if rows:
                connection.executemany(statement, rows)
            else:
                connection.execute(statement)
            if vacuum:
                connection.execute("VACUUM")

    def add(self, numbers: range) -> None:
        self.sql("INSERT INTO t (ts, v) VALUES (?, ?)", [(f"2024-01-01 00:00:{i % 60:02d}", f"r{i}") for i in numbers])
        self.expected += [f"r{i}" for i in numbers]

    def run(self) -> str:
        result = run_uploader("--sqlite", str(self.db), "--state-dir", str(self.root / "state"), "--delta-path",
                              str(self.root / "lake"), "--once", cwd=self.root)
        assert result.returncode == 0, result.stderr
        problems = ledger_report(Counter(read_delta(self.root / "lake").column("v").to_pylist()), self.expected)
        assert not problems, "; ".join(problems) + "\n" + result.stderr
        return result.stderr


def test_one_of_the_last_uploaded_rows_deleted(tmp_path: Path):
    table = Table(tmp_path)
    table.add(range(1, 31))
    table.run()
    table.sql("DELETE FROM t WHERE v = 'r27'")  # among the fingerprinted rows; nothing renumbered
    table.run()
    table.add(range(31, 35))
    table.run()


def test_the_last_uploaded_row_deleted_then_vacuum(tmp_path: Path):
    """The next row moves into the last uploaded row's rowid: it must not pass for that row."""
    table = Table(tmp_path)
    table.add(range(1, 31))
    table.run()
    table.add(range(31, 36))
    table.sql("DELETE FROM t WHERE v = 'r30'", vacuum=True)
    table.run()


def test_the_last_uploaded_row_updated_in_place(tmp_path: Path):
    """With an INTEGER PRIMARY KEY rowids never move: a changed newest row is an update (not uploaded)."""
    table = Table(tmp_path, integer_key=True)
    table.add(range(1, 31))
    table.run()
    table.sql("UPDATE t SET ts = '2024-01-02 00:00:00' WHERE v = 'r30'")
    stderr = table.run()
    assert "changed in place" in stderr, stderr


def test_a_row_inserted_below_the_cursor_alone(tmp_path: Path):
    """The window holds only a row below the cursor: the cursor must stay where it was."""
    table = Table(tmp_path, integer_key=True)
    table.add(range(10, 31))
    table.run()
    table.sql("INSERT INTO t (id, ts, v) VALUES (0, '2025-01-01 00:00:00', 'late5')")
    table.expected.append("late5")
    table.run()
    table.run()
    table.add(range(31, 33))
    table.run()
