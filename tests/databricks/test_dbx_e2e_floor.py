"""The oldest databricks-sql-connector the script accepts must work (issue 11, point 4).

Every other Databricks test runs the newest connector (the test environment's). Here the script runs
the way a user runs it, through `uv run -s`, with the connector pinned to the lowest version its
PEP 723 header allows: both load paths, replay of a batch whose answer was lost, and query mode.
From 4.1.2 to 4.3.x the connector refused REMOVE without `staging_allowed_local_path`; a floor
that lets such a version in fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from dbx_e2e import ROOT, SCRIPT, base_env, expected_sensor_rows, make_sensor_db, query
from emulator_harness import Emulator

CONNECTOR = "databricks-sql-connector"


def declared_floor() -> str:
    """The lowest connector version the script's PEP 723 header allows."""
    header = SCRIPT.read_text().split("# ///", 2)[1]
    match = re.search(rf'"{CONNECTOR}(?:\[[^\]]*\])?>=([0-9.]+)', header)
    assert match, f"no '{CONNECTOR}>=' bound in the PEP 723 header of {SCRIPT.name}"
    return match.group(1)


def run_with_floor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "uv", "run", "-q", "--with", f"{CONNECTOR}[pyarrow]=={declared_floor()}",
               "-s", str(SCRIPT), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("staging_volume", ["auto", "none"], ids=["copy", "insert"])
def test_the_connector_floor_loads_replays_and_queries(emulator: Emulator, schema: str, tmp_path, staging_volume):
    db = make_sensor_db(tmp_path / "sensor.db", 25)
    env = base_env(emulator)
    common = ("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--databricks-database", schema,
              "--staging-volume", staging_volume, "--batch-size", "10", "--log-level", "DEBUG",
              *(["--lineage-columns", "batch_id"] if staging_volume == "none" else []))
    # An answer lost after the statement committed: the connector sends it again, which must not
    # load the batch twice.
    fired = sum(emulator.stats()["faults_fired"].values())
    emulator.set_faults({"kind": "drop_after_execute",
                         "statement": "COPY INTO" if staging_volume == "auto" else "INSERT"})
    first = run_with_floor(*common, "--once", env=env)
    assert first.returncode == 0, first.stderr[-6000:]
    assert f"{CONNECTOR} {declared_floor()}" in first.stderr, first.stderr[-3000:]
    assert sum(emulator.stats()["faults_fired"].values()) > fired, "the lost answer never happened"

    rows = query(emulator, f"SELECT id FROM `{schema}`.`sensor_logs` ORDER BY id")
    assert [r["id"] for r in rows] == [r["id"] for r in expected_sensor_rows(db)], first.stderr[-6000:]

    info = run_with_floor(*common, "--run-query", "INFO", env=env)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "25" in info.stdout, info.stdout
