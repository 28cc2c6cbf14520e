"""An edge database's everyday life on the Databricks target (issue 10, acceptance point 3).

The same three lives as tests/test_database_life.py -- the clock steps back; retention + VACUUM
renumbers the rowids; both before one cycle -- through the real connector into the emulator, with
the default settings and with `cursor: rowid`. One more: a batch whose load failed after its
progress record was written is replayed after the rows were renumbered, and must load the same rows.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from dbx_e2e import base_env, query, upload
from emulator_harness import Emulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from database_life import TABLE, Device, ledger_report

CURSORS = [pytest.param((), id="default"), pytest.param(("--cursor", "rowid"), id="rowid")]
INSERT_PATH = ("--staging-volume", "none", "--lineage-columns", "batch_id")


def uploaded(emulator: Emulator, schema: str) -> Counter:
    return Counter(row["uid"] for row in query(emulator, f"SELECT uid FROM `{schema}`.`{TABLE}`"))


def assert_exactly_once(emulator: Emulator, schema: str, device: Device) -> None:
    problems = ledger_report(uploaded(emulator, schema), device.ledger)
    assert not problems, "; ".join(problems)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path / "data" / "sensors.db", random.Random(str(tmp_path)))


@pytest.mark.parametrize("cursor", CURSORS)
def test_clock_steps_back(emulator: Emulator, schema: str, tmp_path: Path, device: Device, cursor):
    device.append(100)
    upload(emulator, device.path, tmp_path / "state", schema, *cursor)
    device.step_back(3600)
    device.append(50)
    result = upload(emulator, device.path, tmp_path / "state", schema, *cursor)
    assert "not uploaded" not in result.stderr.lower(), result.stderr[-4000:]
    assert_exactly_once(emulator, schema, device)


@pytest.mark.parametrize("cursor", CURSORS)
def test_retention_and_vacuum(emulator: Emulator, schema: str, tmp_path: Path, device: Device, cursor):
    device.append(100)
    upload(emulator, device.path, tmp_path / "state", schema, *cursor)
    device.retention(50)
    device.vacuum()
    assert device.rowids_renumbered_by_vacuum()
    device.append(10)
    result = upload(emulator, device.path, tmp_path / "state", schema, *cursor)
    assert "renumbered" in result.stderr, result.stderr[-4000:]
    assert_exactly_once(emulator, schema, device)


@pytest.mark.parametrize("cursor", CURSORS)
def test_stepped_back_clock_then_retention_and_vacuum(emulator: Emulator, schema: str, tmp_path: Path,
                                                      device: Device, cursor):
    device.append(100)
    upload(emulator, device.path, tmp_path / "state", schema, *cursor, *INSERT_PATH)
    device.step_back(7200)
    device.append(30)
    device.retention(40)
    device.vacuum()
    upload(emulator, device.path, tmp_path / "state", schema, *cursor, *INSERT_PATH)
    assert_exactly_once(emulator, schema, device)


def test_replay_of_an_unconfirmed_batch_after_vacuum(emulator: Emulator, schema: str, tmp_path: Path,
                                                     device: Device):
    """COPY INTO fails after the batch's progress record was written; before the next run the
    application deletes its oldest rows and VACUUMs. The replay finds the batch's rows again."""
    device.append(60)
    state = tmp_path / "state"
    upload(emulator, device.path, state, schema, "--batch-size", "20")
    device.append(45)
    emulator.set_faults({"kind": "unavailable", "statement": "COPY INTO", "seconds": 600})
    failed = upload(emulator, device.path, state, schema, "--batch-size", "20", expect=1,
                    env=base_env(emulator, DATABRICKS_RETRY_TIMEOUT="2"))
    emulator.clear_faults()
    assert "COPY" in failed.stderr or "unavailable" in failed.stderr.lower(), failed.stderr[-4000:]
    device.retention(50)
    device.vacuum()
    device.append(5)
    result = upload(emulator, device.path, state, schema, "--batch-size", "20")
    assert "recorded but not confirmed" in result.stderr, result.stderr[-4000:]
    assert "renumbered since" in result.stderr, result.stderr[-4000:]
    assert_exactly_once(emulator, schema, device)
