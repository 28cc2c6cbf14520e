"""The state file deleted, or put back to an older copy, between runs: no duplicates, no gaps.

On Databricks the progress table is the record of what was loaded; the state file is only a
cache of it. A restore to an older copy makes the uploader replay the last recorded batch (the
target must make that a no-op) and go on from the record.
"""

from __future__ import annotations

import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import Job, Source, assert_exactly_once, new_schema

PATHS = {"bulk": [], "insert": ["--staging-volume", "none", "--lineage-columns", "batch_id"]}


def run_ok(job: Job) -> None:
    run = job.run("--once")
    assert run.returncode == 0, run.describe()


def restore_and_delete(emulator, work: Path, load_path: str) -> None:
    source = Source(work / "sensors.db", random.Random(81))
    job = Job(emulator, source.path, work, new_schema(f"state{load_path}"), ["--batch-size", "10", *PATHS[load_path]])
    source.insert(25)
    run_ok(job)
    older = work / "older_state.json"
    shutil.copy(job.state_file, older)
    source.insert(25, tie_with_last=True)
    run_ok(job)

    # Put back to the copy of three batches ago, with new rows waiting.
    shutil.copy(older, job.state_file)
    source.insert(12, tie_with_last=True)
    run_ok(job)
    assert_exactly_once(emulator, job.schema, source.expected(),
                        context=f" ({load_path} path) after restoring an older state file")

    # Deleted, with new rows waiting.
    shutil.rmtree(job.state_dir)
    source.insert(12)
    run_ok(job)
    assert_exactly_once(emulator, job.schema, source.expected(),
                        context=f" ({load_path} path) after deleting the state file")


def test_state_file_restored_or_deleted_between_runs(emulator, tmp_path: Path):
    """Both load paths, side by side (each with its own source and table)."""
    with ThreadPoolExecutor(max_workers=len(PATHS)) as pool:
        for future in [pool.submit(restore_and_delete, emulator, tmp_path / name, name) for name in PATHS]:
            future.result()


def test_restored_state_file_and_a_volume_that_can_no_longer_be_used(emulator, tmp_path: Path):
    """The replay of the last recorded batch happens on the other load path: the staging volume is
    gone and may not be created again, so the uploader falls back to INSERT statements (as it does
    on its own when a volume cannot be used). The replayed rows must not land twice."""
    source = Source(tmp_path / "sensors.db", random.Random(82))
    job = Job(emulator, source.path, tmp_path, new_schema("statevolume"),
              ["--batch-size", "10", "--lineage-columns", "batch_id"])
    source.insert(25)
    run_ok(job)
    older = tmp_path / "older_state.json"
    shutil.copy(job.state_file, older)
    source.insert(15, tie_with_last=True)
    run_ok(job)
    with emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(f"DROP VOLUME spark_catalog.`{job.schema}`.sqlite_uploader_staging")
    shutil.copy(older, job.state_file)
    run = job.run("--once", "--no-create-table")
    assert run.returncode == 0, run.describe()
    assert "INSERT statements" in run.log(), run.describe()
    assert_exactly_once(emulator, job.schema, source.expected(),
                        context=" after a batch recorded on the bulk path was replayed with INSERT statements")
