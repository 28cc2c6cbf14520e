"""What a real warehouse does that a lenient emulator would let through (issue 11).

COPY INTO's load history is kept in the table's Delta log: it outlives TRUNCATE and DELETE, and a
file name already loaded is skipped even when the file now holds other rows. After a user empties
the table and resets progress as the README describes, the uploader must still load every row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dbx_e2e import SCRIPT, base_env, expected_sensor_rows, make_sensor_db, query, upload, uploaded_in
from emulator_harness import Emulator

PROGRESS = "_sqlite_uploader_batches"


@pytest.mark.parametrize(("empty", "second_batch_size"), [("TRUNCATE TABLE {t}", "10"), ("DELETE FROM {t}", "15")])
def test_reset_after_emptying_the_table_loads_every_row_again(emulator: Emulator, schema: str, tmp_path: Path,
                                                              empty: str, second_batch_size: str) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 30)
    state = tmp_path / "state"
    first = upload(emulator, db, state, schema, "--batch-size", "10")
    assert uploaded_in(first.stderr) == 30
    # The README's reset: empty the table, forget the progress, move the state file away.
    query(emulator, empty.format(t=f"`{schema}`.`sensor_logs`"))
    query(emulator, f"DELETE FROM `{schema}`.`{PROGRESS}`")
    shutil.move(state, tmp_path / "old-state")
    second = upload(emulator, db, state, schema, "--batch-size", second_batch_size)
    assert uploaded_in(second.stderr) == 30, second.stderr[-4000:]
    rows = query(emulator, f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM `{schema}`.`sensor_logs`")
    assert (rows[0]["n"], rows[0]["d"]) == (30, 30), second.stderr[-4000:]
    assert len(expected_sensor_rows(db)) == 30


@pytest.mark.parametrize("name", ["sensor_401", "readings_503_starting"])
def test_digits_in_a_name_are_not_taken_for_an_http_status(emulator: Emulator, schema: str, tmp_path: Path,
                                                           name: str) -> None:
    """A table name (or a file name, a request id) holding 401 or 503 is no credentials problem and
    no warehouse start-up: the error says what Databricks said."""
    db = make_sensor_db(tmp_path / "sensor.db", 3)
    result = upload(emulator, db, tmp_path / "state", schema, "--run-query", f"SELECT * FROM `{schema}`.`{name}`",
                    expect=None)
    assert result.returncode != 0
    assert "TABLE_OR_VIEW_NOT_FOUND" in result.stderr, result.stderr[-3000:]
    assert "credentials" not in result.stderr and "HTTP 503" not in result.stderr, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare(1) to give each uploader a PID namespace of its own")
def test_uploaders_with_the_same_pid_probe_one_staging_volume_side_by_side(emulator: Emulator, schema: str,
                                                                           tmp_path: Path) -> None:
    """In containers every uploader is pid 1. A start-up probe file named after the pid was the same
    file for every node of a fleet: one node's clean-up removed another's probe, which then took the
    volume for unusable. Both nodes here run as pid 1 of their own PID namespace; the first probe
    clean-up to arrive is held back so that the other node's probe runs in between."""
    emulator.set_faults({"kind": "delay", "delay": 8, "statement": "REMOVE", "count": 1})
    nodes = []
    for n in (1, 2):
        db = make_sensor_db(tmp_path / f"node{n}.db", 6, seed=n)
        command = ["unshare", "--pid", "--fork", sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir",
                   str(tmp_path / f"state{n}"), "--once", "--databricks-database", schema,
                   "--databricks-table", f"readings_{n}", "--node-id", f"node{n}"]
        nodes.append(subprocess.Popen(command, env=base_env(emulator), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=300)[1] for node in nodes]
    for n, (node, stderr) in enumerate(zip(nodes, outputs), start=1):
        assert node.returncode == 0, f"node{n} exit {node.returncode}\n{stderr[-4000:]}"
        assert "COPY INTO" in stderr and "cannot be used" not in stderr, stderr[-4000:]
        assert query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`readings_{n}`")[0]["n"] == 6
