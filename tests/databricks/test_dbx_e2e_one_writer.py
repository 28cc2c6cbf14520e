"""Two uploaders of one app id on Databricks (issue 14, point 1): no duplicates.

The state directory's lock cannot see a second uploader with a state directory of its own (or one
on a filesystem whose locks do not work). The progress table is then the guard: a batch's record
is written only while no record of its app id has that batch number, so the second writer stops
before it stages or loads anything, and resumes from the first one's record.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from dbx_e2e import ROOT, RUN_TIMEOUT, SCRIPT, base_env, make_sensor_db, query
from emulator_harness import Emulator

ROWS = 120  # three batches each: the two runs overlap from their first batch on


def test_two_uploaders_with_their_own_state_dirs_load_every_row_once(emulator: Emulator, schema: str,
                                                                      tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", ROWS)
    env = base_env(emulator)

    def start(state: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir", str(tmp_path / state), "--once",
             "--databricks-database", schema, "--node-id", "edge-1", "--batch-size", "40"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start("state-a"), start("state-b")]
    results = [(run.wait(timeout=RUN_TIMEOUT), run.communicate()[1]) for run in runs]
    for code, log in results:
        assert "Traceback" not in log, log[-4000:]
        assert code == 0 or (code == 1 and "was not written: " in log and "Stop that process" in log), \
            f"exit {code}:\n{log[-4000:]}"

    ids = Counter(row["id"] for row in query(emulator, f"SELECT id FROM `{schema}`.`sensor_logs`"))
    duplicates = {k: n for k, n in ids.items() if n > 1}
    assert not duplicates, f"{sum(duplicates.values()) - len(duplicates)} duplicate row(s): {sorted(duplicates)[:10]}"
    # A run that stopped left the rest to the next run; the ledger is then loaded exactly once.
    again = subprocess.run([sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir", str(tmp_path / "state-b"),
                            "--once", "--databricks-database", schema, "--node-id", "edge-1", "--batch-size", "40"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr[-4000:]
    ids = Counter(row["id"] for row in query(emulator, f"SELECT id FROM `{schema}`.`sensor_logs`"))
    assert ids == Counter(range(1, ROWS + 1)), sorted((ids - Counter(range(1, ROWS + 1))).items())[:10]
