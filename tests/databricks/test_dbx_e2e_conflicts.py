"""Several nodes load one Databricks table at the same time (issue 11, point 6).

Delta commits optimistically: an INSERT guarded by NOT EXISTS on its own table reads that table, so
it fails with DELTA_CONCURRENT_APPEND when another node appended during it, and every write fails
with DELTA_METADATA_CHANGED when a node's ALTER TABLE ADD COLUMNS commits during it. The emulator
models this when its "conflicts" switch is on. A node retries such a statement; none exits 1 for it,
and every row of every node lands exactly once.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dbx_e2e import CANARY_TOKEN, ROOT, RUN_TIMEOUT, SCRIPT, base_env, make_sensor_db, query, sqlite_rows
from emulator_harness import Emulator

TABLE = "fleet"
ROWS = 12  # per node; with 4 rows a batch, every node commits several batches while the others do
NODES = ["edge-1", "edge-2", "edge-3", "edge-4"]
NEW_COLUMN = "firmware"  # only edge-4's database has it: edge-4 adds it to the table


def _node_db(path: Path, seed: int, new_column: bool) -> Path:
    make_sensor_db(path, ROWS, seed=seed)
    if new_column:
        with sqlite3.connect(path) as db:
            db.execute(f"ALTER TABLE sensor_logs ADD COLUMN {NEW_COLUMN} TEXT")
            db.execute(f"UPDATE sensor_logs SET {NEW_COLUMN} = 'fw-' || id")
    return path


def test_concurrent_nodes_retry_write_conflicts_and_load_every_row_once(emulator: Emulator, schema: str,
                                                                        tmp_path: Path) -> None:
    dbs = {node: _node_db(tmp_path / node / "sensor.db", seed=index, new_column=node == NODES[-1])
           for index, node in enumerate(NODES, start=1)}
    # The table exists before the nodes start (as in a fleet that runs already), without the new
    # column: edge-4's ALTER TABLE ADD COLUMNS then commits while the other nodes write.
    query(emulator, f"CREATE SCHEMA IF NOT EXISTS `{schema}`")
    query(emulator, f"CREATE TABLE `{schema}`.`{TABLE}` (id BIGINT, device_id STRING, timestamp TIMESTAMP, "
                    "temperature DOUBLE, humidity DOUBLE, status STRING, _batch_id STRING, _node_id STRING)")
    before = emulator.stats()["conflicts"]
    emulator.set_config(conflicts=True, conflict_window=0.3)

    def start(node: str) -> subprocess.Popen:
        db = dbs[node]
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir", str(db.parent / "state"), "--once",
             "--databricks-database", schema, "--databricks-table", TABLE, "--node-id", node,
             "--staging-volume", "none", "--lineage-columns", "batch_id,node_id", "--batch-size", "4"],
            env=base_env(emulator), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        processes = {node: start(node) for node in NODES[:-1]}
        # edge-4 starts once the others are loading, so that its ALTER lands among their writes.
        deadline = time.monotonic() + 120
        while (time.monotonic() < deadline and all(p.poll() is None for p in processes.values())
               and not query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`{TABLE}`")[0]["n"]):
            time.sleep(0.5)
        processes[NODES[-1]] = start(NODES[-1])
        outputs = {node: process.communicate(timeout=RUN_TIMEOUT) for node, process in processes.items()}
    finally:
        emulator.set_config(conflicts=None, conflict_window=None)
    conflicts = emulator.stats()["conflicts"]
    logs = "\n".join(f"--- {node} (exit {processes[node].returncode})\n{err[-3000:]}"
                     for node, (_, err) in outputs.items())
    assert all(CANARY_TOKEN not in out + err for out, err in outputs.values())
    assert {node: p.returncode for node, p in processes.items()} == dict.fromkeys(NODES, 0), logs
    # The nodes did meet conflicts (otherwise this test shows nothing).
    assert sum(conflicts.values()) > sum(before.values()), (conflicts, logs)

    for node, db in dbs.items():
        landed = query(emulator, f"SELECT id, device_id, {NEW_COLUMN} FROM `{schema}`.`{TABLE}` "
                                 f"WHERE _node_id = '{node}' ORDER BY id")
        expected = [{"id": r["id"], "device_id": r["device_id"], NEW_COLUMN: r.get(NEW_COLUMN)}
                    for r in sqlite_rows(db)]
        assert landed == expected, f"{node}: {len(landed)} rows landed, {len(expected)} expected\n{logs}"
    total = query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`{TABLE}`")[0]["n"]
    assert total == ROWS * len(NODES), logs
