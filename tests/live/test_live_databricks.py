"""End-to-end cases against a real Databricks workspace (skipped without one; see conftest.py).

These repeat, on the real service, what the emulator suites check: both load paths, the replay of a
batch after a kill, a reset after emptying the table, column names Delta needs column mapping for,
and OAuth M2M. Each asserts the outcome a user sees: every source row exactly once in the table.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from live_workspace import Workspace

TABLE = "sensor_logs"


def sample_db(path: Path, rows: int) -> Path:
    from make_sample_db import make_sample_db

    make_sample_db(path, rows)
    return path


def source_ids(db: Path, table: str = TABLE) -> list[int]:
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute(f'SELECT id FROM "{table}" ORDER BY id')]


def target_ids(ws: Workspace, table: str = TABLE) -> list[int]:
    return [row["id"] for row in ws.sql(f"SELECT id FROM {ws.qualified(table)} ORDER BY id")]


@pytest.mark.parametrize("path", ["copy", "insert"])
def test_both_load_paths_land_every_row_once(workspace: Workspace, tmp_path: Path, path: str):
    db = sample_db(tmp_path / "sensor.db", 1200)
    args = ["--once", "--batch-size", "500"]
    if path == "insert":
        args += ["--staging-volume", "none", "--lineage-columns", "batch_id"]
    workspace.run(db, *args)
    assert target_ids(workspace) == source_ids(db)
    workspace.run(db, *args)  # nothing new: nothing loaded twice
    assert target_ids(workspace) == source_ids(db)


def test_a_killed_run_is_replayed_not_repeated(workspace: Workspace, tmp_path: Path):
    db = sample_db(tmp_path / "sensor.db", 3000)
    node = workspace.start(db, "--batch-size", "200", "--interval", "5")
    deadline = time.monotonic() + 900
    seen = ""
    while "committed" not in seen and time.monotonic() < deadline and node.poll() is None:
        seen += node.stderr.readline()
    node.send_signal(signal.SIGKILL)  # mid-run: a batch may be staged, recorded or half loaded
    node.wait()
    assert "committed" in seen, seen[-4000:]
    workspace.run(db, "--once", "--batch-size", "200")
    assert target_ids(workspace) == source_ids(db)


def test_reset_after_emptying_the_table_loads_every_row_again(workspace: Workspace, tmp_path: Path):
    db = sample_db(tmp_path / "sensor.db", 600)
    workspace.run(db, "--once", "--batch-size", "100")
    # The README's reset: empty the table, forget the progress, move the state directory away.
    workspace.sql(f"TRUNCATE TABLE {workspace.qualified(TABLE)}")
    workspace.sql(f"DELETE FROM {workspace.qualified('_sqlite_uploader_batches')}")
    shutil.move(workspace.state_root / "state", workspace.state_root / "old-state")
    workspace.run(db, "--once", "--batch-size", "150")
    assert target_ids(workspace) == source_ids(db)


def test_column_names_delta_needs_column_mapping_for(workspace: Workspace, tmp_path: Path):
    db = tmp_path / "odd.db"
    with sqlite3.connect(db) as connection:
        connection.execute('CREATE TABLE readings (id INTEGER PRIMARY KEY, timestamp TEXT, '
                           '"outside temp" REAL, "rate(1/s)" REAL, "a,b;c=d" TEXT)')
        connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?)",
                               [(i, f"2026-01-01T00:00:{i:02d}Z", i / 2, i * 3.0, f"v{i}") for i in range(1, 41)])
    workspace.run(db, "--once", "--batch-size", "15")
    rows = workspace.sql(f"SELECT id, `outside temp` AS t, `a,b;c=d` AS v FROM {workspace.qualified('readings')} "
                         "ORDER BY id")
    assert [(r["id"], r["t"], r["v"]) for r in rows] == [(i, i / 2, f"v{i}") for i in range(1, 41)]


@pytest.mark.skipif(not (os.environ.get("DATABRICKS_CLIENT_ID") and os.environ.get("DATABRICKS_CLIENT_SECRET")),
                    reason="OAuth M2M: set DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET")
def test_oauth_machine_to_machine(workspace: Workspace, tmp_path: Path):
    db = sample_db(tmp_path / "sensor.db", 300)
    workspace.run(db, "--once", env=workspace.env(oauth_only=True))
    assert target_ids(workspace) == source_ids(db)
