"""A sensor application keeps writing while the uploader runs (issue 2, acceptance point 4).

A writer process inserts rows continuously in small transactions -- current, non-decreasing
timestamps in every SQLite storage style -- into a WAL database and into a rollback-journal
database, while the uploader runs in loop mode. At the end every row is in the Delta table once,
the uploader stops cleanly on SIGTERM, and the writer never met 'database is locked'.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from make_sample_db import make_sample_db
from uploader_testkit import ROOT, clean_env, read_delta, uploader_command

WRITE_SECONDS = 4.0

# The sensor application: what it does is typical -- short transactions, a busy timeout, its own
# clock for the timestamps, whichever datetime form its author chose (here: all of them).
WRITER = r"""
import json, random, sqlite3, sys, time
from datetime import datetime, timezone
sys.path.insert(0, sys.argv[4])
from make_sample_db import DEVICES, STATUSES, format_timestamp

db, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
connection = sqlite3.connect(db, timeout=2.0, isolation_level=None)
written = transactions = 0
errors = []
last = None
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    last = now if last is None or now > last else last  # never backwards, even if the clock is
    rows = [(rng.choice(DEVICES), format_timestamp(last, rng.randrange(6)), round(rng.gauss(21.5, 4), 2),
             round(rng.uniform(20, 80), 1), rng.choice(STATUSES)) for _ in range(rng.randint(1, 6))]
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) VALUES (?, ?, ?, ?, ?)",
            rows)
        connection.execute("COMMIT")
        written += len(rows)
        transactions += 1
    except sqlite3.Error as exc:
        errors.append(str(exc))
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    time.sleep(rng.uniform(0, 0.008))
connection.close()
print(json.dumps({"written": written, "transactions": transactions, "errors": errors}))
"""


def delta_ids(lake: Path) -> Counter:
    if not (lake / "_delta_log").exists():
        return Counter()
    return Counter(read_delta(lake).column("id").to_pylist())


def source_ids(db: Path) -> Counter:
    with sqlite3.connect(db) as connection:
        return Counter(row[0] for row in connection.execute("SELECT id FROM sensor_logs"))


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_rows_written_while_the_uploader_runs_arrive_exactly_once(tmp_path: Path, journal: str):
    db = tmp_path / "data" / "sensor_data.db"
    lake = tmp_path / "lake"
    make_sample_db(db, rows=200, wal=journal == "wal")
    with sqlite3.connect(db) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == journal

    log_path = tmp_path / "uploader.log"
    with open(log_path, "w") as log:
        uploader = subprocess.Popen(
            uploader_command("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--delta-path", str(lake),
                             "--interval", "0.5", "--batch-size", "25"),
            cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        writer = subprocess.run(
            [sys.executable, "-c", WRITER, str(db), str(WRITE_SECONDS), "7", str(ROOT / "examples")],
            capture_output=True, text=True, timeout=120)
        assert writer.returncode == 0, writer.stderr
        report = json.loads(writer.stdout)
        locked = [e for e in report["errors"] if "locked" in e or "busy" in e]
        assert not locked, f"the writer was blocked {len(locked)} time(s): {locked[:3]}"
        assert not report["errors"], report["errors"][:3]
        assert report["written"] > 100, report

        expected = source_ids(db)
        assert sum(expected.values()) == 200 + report["written"]
        # Let the uploader drain what the writer left behind.
        deadline = time.monotonic() + 90
        while sum(delta_ids(lake).values()) < len(expected) and time.monotonic() < deadline:
            assert uploader.poll() is None, log_path.read_text()
            time.sleep(0.5)
        assert uploader.poll() is None, log_path.read_text()
        uploader.send_signal(signal.SIGTERM)
        code = uploader.wait(timeout=15)
    finally:
        if uploader.poll() is None:
            uploader.kill()
            uploader.wait()
    assert code == 0, log_path.read_text()

    target = delta_ids(lake)
    duplicates = {k: n for k, n in target.items() if n > 1}
    assert not duplicates, f"uploaded more than once: {duplicates}"
    assert not expected - target, f"never uploaded: {sorted(expected - target)[:20]}"
    assert not target - expected
    assert "Traceback" not in log_path.read_text()
