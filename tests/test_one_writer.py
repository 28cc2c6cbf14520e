"""One writer per app id (issue 14, point 1): a second uploader never writes duplicates.

Three ways a second uploader comes to run beside the first: two runs started together on one state
directory (cron overlap, a supervisor restarting beside a still-running process); a second one with
another state directory on the same source and target (or on a filesystem whose locks do not work);
and `uv run` SIGKILLed, which used to leave the script -- its child -- running. The ledger of every
row ever written (the SQLite table, written to only) must match the Delta table exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
from make_sample_db import make_sample_db
from test_concurrent_writer import WRITER
from uploader_testkit import ROOT, SCRIPT, clean_env, read_delta, run_uploader, uploader_command

import sqlite_to_databricks_uploader as upl

LOCKED = "is in use by another process (uploader pid "


def ledger(db: Path) -> Counter:
    with sqlite3.connect(db) as connection:
        return Counter(row[0] for row in connection.execute("SELECT id FROM sensor_logs"))


def target(lake: Path) -> Counter:
    return Counter(read_delta(lake).column("id").to_pylist()) if (lake / "_delta_log").exists() else Counter()


def assert_exactly_once(db: Path, lake: Path) -> None:
    landed, written = target(lake), ledger(db)
    duplicates = {k: n for k, n in landed.items() if n > 1}
    assert not duplicates, f"{sum(duplicates.values()) - len(duplicates)} duplicate row(s), e.g. {list(duplicates)[:5]}"
    assert landed == written, f"missing: {sorted(written - landed)[:10]}, foreign: {sorted(landed - written)[:10]}"


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_two_once_runs_started_together_on_one_state_dir_upload_every_row_once(tmp_path: Path) -> None:
    db, lake, state = tmp_path / "sensor.db", tmp_path / "lake", tmp_path / "state"
    make_sample_db(db, rows=20_000)
    args = ("--sqlite", str(db), "--state-dir", str(state), "--delta-path", str(lake), "--once",
            "--batch-size", "2000")
    runs = [subprocess.Popen(uploader_command(*args), cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]

    assert_exactly_once(db, lake)
    for code, log in results:
        assert "Traceback" not in log, log[-3000:]
        # The one that found the directory taken says by whom and what to do, and exits 1 at once.
        assert code == 0 or (code == 1 and LOCKED in log and " on host " in log and "since 20" in log
                             and "stop the other one" in log), f"exit {code}:\n{log[-3000:]}"
    assert [code for code, _ in results].count(0) >= 1


def test_a_once_run_meeting_a_lock_being_released_uploads(tmp_path: Path) -> None:
    """A holder clears its name from the lock file just before it lets go of the lock; a run that
    tries in that moment finds the lock held by nobody named. It looks again, rather than stopping."""
    import fcntl
    import threading

    db, lake, state = tmp_path / "sensor.db", tmp_path / "lake", tmp_path / "state"
    make_sample_db(db, rows=100)
    state.mkdir()
    fd = os.open(state / "uploader.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, the file empty: a holder in the middle of letting go
    release = threading.Timer(0.8, os.close, [fd])
    release.start()
    try:
        run = run_uploader("--sqlite", str(db), "--state-dir", str(state), "--delta-path", str(lake), "--once",
                           cwd=tmp_path)
    finally:
        release.join()
    assert run.returncode == 0, run.stderr[-3000:]
    assert_exactly_once(db, lake)


def test_loop_uploaders_beside_a_writer_upload_every_row_once(tmp_path: Path) -> None:
    """Two loop-mode uploaders on one state directory and a third with a state directory of its own,
    beside an application writing rows: the second waits for the lock; the third meets the first's
    commits in the Delta table and resumes from them instead of loading the rows again."""
    db, lake = tmp_path / "data" / "sensor.db", tmp_path / "lake"
    make_sample_db(db, rows=200)
    shared, own = tmp_path / "state", tmp_path / "state-own"

    def start(state: Path, name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 -- closed with the process
        return subprocess.Popen(
            uploader_command("--sqlite", str(db), "--state-dir", str(state), "--delta-path", str(lake),
                             "--interval", "0.3", "--batch-size", "25"),
            cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log)

    uploaders = {"first": start(shared, "first"), "second": start(shared, "second"), "own": start(own, "own")}
    try:
        writer = subprocess.run([sys.executable, "-c", WRITER, str(db), "4", "7", str(ROOT / "examples")],
                                capture_output=True, text=True, timeout=120)
        assert writer.returncode == 0, writer.stderr
        assert json.loads(writer.stdout)["written"] > 100

        # While an uploader holds the directory, the health check and query mode still work.
        health = run_uploader("--healthcheck", "--state-dir", str(shared))
        assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr
        info = run_uploader("--run-query", "INFO", "--sqlite", str(db), "--state-dir", str(shared),
                            "--delta-path", str(lake), cwd=tmp_path)
        assert info.returncode == 0 and "last batch" in info.stdout, info.stdout + info.stderr

        drain(db, lake, uploaders)
        assert_exactly_once(db, lake)

        # The holder stops; the one that waited takes over and uploads what comes next.
        waiting = next((name for name in ("first", "second") if "Waiting for it" in read_log(tmp_path, name)), None)
        assert waiting is not None, read_log(tmp_path, "second")[-3000:]
        held = "second" if waiting == "first" else "first"
        assert json.loads((shared / "uploader.lock").read_text())["pid"] == uploaders[held].pid
        assert stop(uploaders[held]) == 0
        # The hand-over alone: with the third one stopped too, the rows that come next are the waiting
        # one's to upload (else the third may take them all before its next look at the lock, 5 s).
        assert stop(uploaders["own"]) == 0
        with sqlite3.connect(db) as connection:
            connection.execute("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) "
                               "SELECT device_id, timestamp, temperature, humidity, status FROM sensor_logs "
                               "ORDER BY id LIMIT 30")
        drain(db, lake, {waiting: uploaders[waiting]})
    finally:
        codes = {name: stop(process) for name, process in uploaders.items()}
    logs = {name: read_log(tmp_path, name) for name in uploaders}

    assert_exactly_once(db, lake)
    assert codes == {"first": 0, "second": 0, "own": 0}, codes
    assert not [name for name, log in logs.items() if "Traceback" in log]
    assert LOCKED in logs[waiting] and "is free now; starting" in logs[waiting], logs[waiting][-3000:]
    assert "Batch " in logs[waiting].split("is free now")[1]  # it went on uploading after the holder


def read_log(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


def drain(db: Path, lake: Path, running: dict[str, subprocess.Popen]) -> None:
    """Wait until the target holds as many rows as the ledger, then a few more cycles: anything
    uploaded twice would show by then."""
    deadline = time.monotonic() + 120
    while sum(target(lake).values()) < sum(ledger(db).values()) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in running.values())
        time.sleep(0.5)
    time.sleep(1.5)


def script_under(uv: psutil.Process) -> psutil.Process:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in uv.children(recursive=True):
            if any(str(SCRIPT) == part for part in child.cmdline()[1:2]):
                return child
        time.sleep(0.2)
    raise AssertionError("uv never started the script")


def test_sigkill_of_uv_run_ends_the_script_so_a_restart_uploads_every_row_once(tmp_path: Path) -> None:
    db, lake, state = tmp_path / "sensor.db", tmp_path / "lake", tmp_path / "state"
    make_sample_db(db, rows=500)
    args = ("--sqlite", str(db), "--state-dir", str(state), "--delta-path", str(lake), "--batch-size", "100")
    log_path = tmp_path / "uv.log"
    with open(log_path, "w") as log:
        uv = subprocess.Popen([sys.executable, "-m", "uv", "run", "-q", "-s", str(SCRIPT), *args, "--interval",
                               "0.5"], cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log)
    script = None
    try:
        script = script_under(psutil.Process(uv.pid))
        deadline = time.monotonic() + 120
        while sum(target(lake).values()) < 500 and time.monotonic() < deadline:
            time.sleep(0.3)
        parent = script.parent()
        assert parent is not None and parent.name() == "uv", parent
        parent.kill()  # what a supervisor's last resort does
        uv.wait()
        try:
            script.wait(timeout=60)
        except psutil.TimeoutExpired:
            raise AssertionError("the script still runs after its uv parent was killed") from None
        assert "The uv process that ran this script" in log_path.read_text(), log_path.read_text()[-3000:]
    finally:
        if script is not None and script.is_running():
            script.kill()
        if uv.poll() is None:
            uv.kill()

    make_sample_db(db, rows=300, seed=8)
    again = run_uploader(*args, "--once", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(db, lake)


def test_two_writers_finding_no_table_commit_the_first_batch_once(tmp_path: Path, monkeypatch) -> None:
    """Two uploaders of one app id starting on a new table (another state directory, or a first
    deployment started twice): both find no table. Each is held until the other has looked too,
    then both commit batch 1. It lands once; the other is told another writer committed it."""
    db, lake = tmp_path / "sensor.db", tmp_path / "lake"
    make_sample_db(db, rows=10)
    settings = upl.load_settings(["--sqlite", str(db), "--delta-path", str(lake),
                                  "--state-dir", str(tmp_path / "state")]).settings
    rows = pa.table({"id": pa.array(range(25), pa.int64()), "status": pa.array(["ok"] * 25)})
    batch = upl.Batch(1, rows, "app", upl.Watermark(), 25, upl.Watermark(), None)
    both_looked = threading.Barrier(2)
    look = upl.DeltaTarget._open

    def look_together(self: upl.DeltaTarget) -> object:
        table = look(self)
        if table is None and not both_looked.broken:
            both_looked.wait(timeout=30)
        return table

    monkeypatch.setattr(upl.DeltaTarget, "_open", look_together)
    outcomes: list[object] = []

    def write() -> None:
        try:
            upl.DeltaTarget(settings, "sensor_logs").write(batch)
            outcomes.append("committed")
        except Exception as exc:  # the outcome is what the test looks at
            outcomes.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)

    assert sorted(Counter(read_delta(lake).column("id").to_pylist()).values()) == [1] * 25
    assert outcomes.count("committed") == 1, outcomes
    (refused,) = [o for o in outcomes if o != "committed"]
    assert isinstance(refused, upl.AnotherWriter), repr(refused)
