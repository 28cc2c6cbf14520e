"""Bad input (issue 2, acceptance 5): each problem gets its own test asserting a clear message that
names the problem, exit code 2, and a target and state left exactly as they were.

A read-only source directory is not bad input: the uploader must still work and upload everything.
These tests run as root in CI, where file modes do not bind. Where a permission must really be
enforced, the uploader runs as root *without* the capabilities that bypass file permissions
(`setpriv --bounding-set=-dac_override,...`): root then gets only the owner bits of its own files,
exactly like an ordinary user. (Switching to uid 65534 does not work here: the test Python lives
under /root, which only root can enter.)
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from uploader_testkit import clean_env, read_delta, run_uploader, sqlite_rows, uploader_command

# -------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------


class Place:
    """A database, a state directory and a Delta location under one temporary directory."""

    def __init__(self, root: Path, db: Path):
        self.root = root
        self.db = db
        self.state_dir = root / "state"
        self.lake = root / "lake" / "sensor_logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "upload_state.json"

    def args(self, *extra: str) -> list[str]:
        return ["--sqlite", str(self.db), "--state-dir", str(self.state_dir), "--target", "delta",
                "--delta-path", str(self.lake), "--once", *extra]

    def run(self, *extra: str, env: dict | None = None, prefix: list[str] | None = None):
        if prefix:
            return subprocess.run([*prefix, *uploader_command(*self.args(*extra))], cwd=self.root,
                                  env=env or clean_env(), capture_output=True, text=True, timeout=300)
        return run_uploader(*self.args(*extra), cwd=self.root, env=env or clean_env())

    def snapshot(self) -> tuple:
        """Everything a failed run must leave alone: Delta commits, state file bytes, state dir listing."""
        commits = sorted(p.name for p in (self.lake / "_delta_log").glob("*")) if self.lake.exists() else None
        state = self.state_file.read_bytes() if self.state_file.exists() else None
        listing = sorted(p.name for p in self.state_dir.iterdir()) if self.state_dir.is_dir() else None
        return commits, state, listing

    def baseline(self) -> tuple:
        """A good first upload, then new rows waiting: a failed run must not touch either side."""
        result = self.run("--batch-size", "1000")
        assert result.returncode == 0, result.stderr
        assert read_delta(self.lake).num_rows == 3000
        add_rows(self.db, 10)
        return self.snapshot()


def add_rows(db: Path, count: int, moment: str = "2026-02-01 00:00:00") -> None:
    with sqlite3.connect(db) as connection:
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) VALUES (?, ?, ?, ?, ?)",
            [("sensor-z", moment, 20.0 + i, 50.0, "ok") for i in range(count)])
    connection.close()


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and an ERROR line naming the problem. Returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert errors, f"no ERROR line in:\n{result.stderr}"
    message = "\n".join(errors)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def assert_nothing_created(place: Place) -> None:
    assert not (place.lake / "_delta_log").exists(), "a Delta table was created"
    assert not place.state_file.exists(), "a state file was written"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def place(tmp_path: Path, sample_db: Path) -> Place:
    return Place(tmp_path, sample_db)


def new_db(path: Path, *statements: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    for statement in statements:
        connection.execute(statement)
    connection.commit()
    connection.close()
    return path


# -------------------------------------------------------------------------------------------
# Enforcing permissions while running as root
# -------------------------------------------------------------------------------------------

DROP_FILE_CAPS = "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"


@pytest.fixture(scope="session")
def unprivileged(tmp_path_factory) -> list[str]:
    """A command prefix under which file modes bind ([] when not root); skips when none works."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is not available to drop the file-permission capabilities")
    probe = tmp_path_factory.mktemp("probe")
    locked = probe / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    prefix = [setpriv, DROP_FILE_CAPS, "--"]
    try:
        attempt = subprocess.run([*prefix, sys.executable, "-c",
                                  f"open({str(locked / 'x')!r}, 'w')"], capture_output=True, text=True)
    except OSError as exc:
        pytest.skip(f"setpriv cannot run here: {exc}")
    finally:
        locked.chmod(0o755)
    if attempt.returncode == 0:
        pytest.skip("cannot make file permissions bind for root here")
    if "PermissionError" not in attempt.stderr:
        pytest.skip(f"setpriv probe failed for another reason: {attempt.stderr[-300:]}")
    return prefix


# -------------------------------------------------------------------------------------------
# The source
# -------------------------------------------------------------------------------------------

def test_missing_database_file(tmp_path):
    place = Place(tmp_path, tmp_path / "data" / "nope.db")
    assert_refused(place.run(), "nope.db", "does not exist")
    assert_nothing_created(place)
    assert not place.db.exists(), "the uploader must not create the database"
    assert not place.db.parent.exists()


def test_database_path_is_a_directory(tmp_path):
    place = Place(tmp_path, tmp_path / "data")
    place.db.mkdir()
    assert_refused(place.run(), "directory")
    assert_nothing_created(place)


def test_not_a_sqlite_file(tmp_path):
    db = tmp_path / "data" / "sensor_data.db"
    db.parent.mkdir()
    db.write_text("device,timestamp,temperature\nsensor-a,2026-01-15 14:00:00,21.5\n" * 200)
    before = digest(db)
    place = Place(tmp_path, db)
    assert_refused(place.run(), "sensor_data.db", "not a SQLite database")
    assert_nothing_created(place)
    assert digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["sensor_data.db"]


@pytest.mark.parametrize("kind", ["no-tables", "zero-bytes"])
def test_empty_database(tmp_path, kind):
    db = tmp_path / "data" / "sensor_data.db"
    if kind == "no-tables":
        new_db(db, "PRAGMA user_version = 7")
    else:
        db.parent.mkdir()
        db.write_bytes(b"")
    before = digest(db)
    place = Place(tmp_path, db)
    assert_refused(place.run(), "sensor_data.db", "no tables")
    assert_nothing_created(place)
    assert digest(db) == before


def test_missing_table(place):
    message = assert_refused(place.run("--sqlite-table-name", "readings"), "readings")
    assert "sensor_logs" in message, "the message should list the tables that do exist"
    assert_nothing_created(place)


def test_several_tables_without_table_setting(tmp_path, sample_db):
    with sqlite3.connect(sample_db) as connection:
        connection.execute("CREATE TABLE devices (id INTEGER PRIMARY KEY, name TEXT)")
    connection.close()
    place = Place(tmp_path, sample_db)
    assert_refused(place.run(), "devices", "sensor_logs", "sqlite_table_name")
    assert_nothing_created(place)
    # ... and naming the table resolves it.
    assert place.run("--sqlite-table-name", "sensor_logs").returncode == 0


def test_no_timestamp_column(tmp_path):
    db = new_db(tmp_path / "data" / "plain.db",
                "CREATE TABLE readings (id INTEGER PRIMARY KEY, device TEXT, value REAL, label TEXT)",
                "INSERT INTO readings (device, value, label) VALUES ('a', 21.5, 'x'), ('b', 22.5, 'y')")
    place = Place(tmp_path, db)
    place.lake = tmp_path / "lake" / "readings"
    assert_refused(place.run(), "timestamp", "readings")
    assert_nothing_created(place)


def test_configured_timestamp_column_missing(place):
    assert_refused(place.run("--timestamp-col", "event_time"), "event_time")
    assert_nothing_created(place)


def test_ambiguous_timestamp_column(tmp_path):
    db = new_db(tmp_path / "data" / "jobs.db",
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, started DATETIME, finished DATETIME, name TEXT)",
                "INSERT INTO jobs (started, finished, name) VALUES "
                "('2026-01-15 14:00:00', '2026-01-15 14:05:00', 'a'), "
                "('2026-01-15 14:01:00', '2026-01-15 14:09:00', 'b')")
    place = Place(tmp_path, db)
    place.lake = tmp_path / "lake" / "jobs"
    assert_refused(place.run(), "started", "finished", "timestamp_col")
    assert_nothing_created(place)


# -------------------------------------------------------------------------------------------
# The configuration
# -------------------------------------------------------------------------------------------

def test_malformed_yaml(place):
    config = place.root / "uploader.yaml"
    config.write_text("sqlite: /data/sensor.db\nfilter_config:\n  temperature: {\">\": -50\n  status: ok\n")
    assert_refused(place.run("--config", str(config)), "uploader.yaml", "YAML")
    assert_nothing_created(place)


def test_yaml_that_is_not_a_mapping(place):
    config = place.root / "uploader.yaml"
    config.write_text("- sqlite\n- /data/sensor.db\n")
    assert_refused(place.run("--config", str(config)), "uploader.yaml")
    assert_nothing_created(place)


def test_unknown_yaml_key(place):
    config = place.root / "uploader.yaml"
    config.write_text("batch_size: 500\nupload_intervall: 60\n")
    assert_refused(place.run("--config", str(config)), "upload_intervall", "uploader.yaml")
    assert_nothing_created(place)


def test_bad_operator(place):
    before = place.baseline()
    message = assert_refused(place.run("--enable-filter", "--filter-config", '{"temperature": {"=>": -50}}'),
                             "=>", "temperature")
    assert "filter" in message.lower()
    assert place.snapshot() == before
    assert read_delta(place.lake).num_rows == 3000


def test_bad_operator_before_first_upload(place):
    config = place.root / "uploader.yaml"
    config.write_text("enable_filter: true\nfilter_config:\n  temperature:\n    '~': 5\n")
    assert_refused(place.run("--config", str(config)), "~", "temperature", "uploader.yaml")
    assert_nothing_created(place)


@pytest.mark.parametrize(("flags", "column"), [
    (["--enable-sanitize", "--sanitize-config", '{"remove_nulls": ["pressure"]}'], "pressure"),
    (["--enable-sanitize", "--sanitize-config", '{"replace_values": {"state": {"error": "x"}}}'], "state"),
    (["--enable-filter", "--filter-config", '{"pressure": {">": 900}}'], "pressure"),
    (["--enable-aggregate", "--aggregate-config", '{"group_by": ["site"], "aggregations": {"temperature": "avg"}}'],
     "site"),
    (["--enable-aggregate", "--aggregate-config",
      '{"group_by": ["device_id"], "aggregations": {"pressure": "avg"}}'], "pressure"),
], ids=["remove_nulls", "replace_values", "filter", "group_by", "aggregations"])
def test_transform_names_a_column_that_does_not_exist(place, flags, column):
    before = place.baseline()
    assert_refused(place.run(*flags), column)
    assert place.snapshot() == before
    assert read_delta(place.lake).num_rows == 3000


def test_transform_column_missing_named_from_environment(place):
    env = clean_env(ENABLE_FILTER="true", FILTER_CONFIG='{"pressure": {">": 900}}')
    assert_refused(place.run(env=env), "pressure", "FILTER_CONFIG")
    assert_nothing_created(place)


# -------------------------------------------------------------------------------------------
# The state
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["truncated", "garbage", "empty", "json-list", "foreign-json", "bad-cursor"])
def test_corrupt_state_file(place, content):
    place.baseline()
    good = place.state_file.read_bytes()
    bad = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\x01binary junk\xff",
        "empty": b"",
        "json-list": b"[1, 2, 3]\n",
        "foreign-json": b'{"last_upload": "2026-01-15T14:45:13Z"}\n',
        "bad-cursor": json.dumps({**json.loads(good), "cursor": "2026-01-15"}).encode(),
    }[content]
    place.state_file.write_bytes(bad)
    before = place.snapshot()
    assert_refused(place.run(), "upload_state.json")
    assert place.snapshot() == before
    assert place.state_file.read_bytes() == bad
    assert read_delta(place.lake).num_rows == 3000


def test_corrupt_state_file_before_any_upload(place):
    place.state_dir.mkdir()
    place.state_file.write_text("{ half a state")
    assert_refused(place.run(), "upload_state.json")
    assert place.state_file.read_text() == "{ half a state"
    assert not (place.lake / "_delta_log").exists()


def test_state_file_of_another_source(tmp_path, place):
    place.baseline()
    other = tmp_path / "other" / "sensor_data.db"
    other.parent.mkdir()
    with sqlite3.connect(place.db) as source, sqlite3.connect(other) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    foreign = Place(tmp_path, other)
    foreign.lake = tmp_path / "lake-other"
    before = place.snapshot()
    assert_refused(foreign.run(), "upload_state.json")
    assert place.snapshot() == before
    assert not foreign.lake.exists()


def test_state_dir_under_a_regular_file(place):
    blocker = place.root / "not-a-directory"
    blocker.write_text("a file where the state directory should be\n")
    place.state_dir = blocker / "state"
    assert_refused(place.run(), str(place.state_dir))
    assert_nothing_created(place)
    assert blocker.read_text() == "a file where the state directory should be\n"


def test_state_dir_without_write_permission(place, unprivileged):
    place.state_dir.mkdir()
    place.state_dir.chmod(0o500)
    try:
        assert_refused(place.run(prefix=unprivileged), str(place.state_dir), "writable")
        assert sorted(place.state_dir.iterdir()) == []
    finally:
        place.state_dir.chmod(0o755)
    assert not (place.lake / "_delta_log").exists()


# -------------------------------------------------------------------------------------------
# A read-only source directory must still work
# -------------------------------------------------------------------------------------------

def make_read_only(db: Path) -> None:
    db.chmod(0o444)
    db.parent.chmod(0o555)


def make_writable(db: Path) -> None:
    db.parent.chmod(0o755)
    for path in db.parent.iterdir():
        path.chmod(0o644)


def sample(tmp_path: Path, wal: bool) -> Path:
    from make_sample_db import make_sample_db

    db = tmp_path / "data" / "sensor_data.db"
    make_sample_db(db, rows=3000, wal=wal)
    gc.collect()  # make_sample_db leaves its connection to the collector: close every handle now
    return db


def assert_uploaded_everything(place: Place) -> None:
    table = read_delta(place.lake)
    source = sqlite_rows(place.db, columns="id")
    assert sorted(table.column("id").to_pylist()) == sorted(i for (i,) in source)


@pytest.mark.parametrize("journal", ["wal", "rollback"])
def test_read_only_source_directory_modes_only(tmp_path, journal):
    """Modes 0444/0555 (which root ignores): the run works and the database is not modified."""
    db = sample(tmp_path, wal=journal == "wal")
    before = digest(db)
    make_read_only(db)
    place = Place(tmp_path, db)
    try:
        result = place.run()
        assert result.returncode == 0, result.stderr
        assert_uploaded_everything(place)
        assert digest(db) == before
    finally:
        make_writable(db)


@pytest.mark.parametrize("journal", ["wal", "rollback"])
def test_read_only_source_directory_enforced(tmp_path, journal, unprivileged):
    """The directory and file really cannot be written (as on a read-only mount)."""
    db = sample(tmp_path, wal=journal == "wal")
    listing = sorted(p.name for p in db.parent.iterdir())
    before = digest(db)
    make_read_only(db)
    place = Place(tmp_path, db)
    try:
        result = place.run(prefix=unprivileged)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        # Before this test reads the database itself (its own connection may add -shm/-wal).
        assert sorted(p.name for p in db.parent.iterdir()) == listing
        assert digest(db) == before
        assert_uploaded_everything(place)
        # A second run finds nothing new and still succeeds.
        again = place.run(prefix=unprivileged)
        assert again.returncode == 0, again.stderr
        assert_uploaded_everything(place)
    finally:
        make_writable(db)


def test_read_only_source_directory_with_a_live_writer(tmp_path, unprivileged):
    """A writer has the WAL database open (its -wal holds rows not yet checkpointed); the uploader
    only gets read access to the directory and files, and must still see and upload every row."""
    db = sample(tmp_path, wal=True)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) VALUES (?, ?, ?, ?, ?)",
            [("sensor-w", "2026-02-01 00:00:00", 20.0, 50.0, "ok")] * 25)
        assert (db.parent / (db.name + "-wal")).stat().st_size > 0
        for path in db.parent.iterdir():
            path.chmod(0o444)
        db.parent.chmod(0o555)
        place = Place(tmp_path, db)
        result = place.run(prefix=unprivileged)
        assert result.returncode == 0, result.stderr
        table = read_delta(place.lake)
        assert table.num_rows == 3025
        assert table.column("device_id").to_pylist().count("sensor-w") == 25
    finally:
        make_writable(db)
        writer.close()
