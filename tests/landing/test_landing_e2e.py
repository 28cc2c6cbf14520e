"""The landing path end to end: nodes land through the Files API (real databricks-sdk, no SQL
warehouse configured), the loader loads with COPY INTO (unmodified connector), against the emulator.

Every test ends with the ledger check: each row of each node's SQLite database is in the target
table exactly once, and nothing else is.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dbx_e2e import SCRIPT, add_sensor_rows, make_sensor_db, stat_delta
from landing_e2e import TABLE, Landing, assert_exactly_once, manifest_of


def later(db_rows: int) -> datetime:
    return datetime(2026, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=db_rows)


def test_nodes_land_without_sql_and_the_loader_loads_every_row_once(landing: Landing, tmp_path: Path):
    dbs = {f"node-{n}": make_sensor_db(tmp_path / f"n{n}.db", 300 + 50 * n, seed=n) for n in range(3)}
    before = landing.emulator.stats()
    for node, db in dbs.items():
        landing.land(db, tmp_path / f"state-{node}", node, "--batch-size", "120")
    assert stat_delta(before, landing.emulator.stats())["total"] == 0, "a landing node ran SQL statements"
    files = landing.landed_files()
    assert len(files) == 3 + 3 + 4  # 300, 350, 400 rows in batches of 120

    loaded = landing.load()
    assert "Loaded 10 file(s) from 3 node(s)" in loaded.stderr, loaded.stderr[-3000:]
    assert assert_exactly_once(landing, dbs) == 1050
    assert landing.landed_files() == []
    # The newest manifest of each node stays: its proof of what it landed.
    assert sorted(manifest_of(m)["seq"] for m in landing.manifests()) == [3, 3, 4]

    # More rows, landed and loaded again; a second loader pass finds nothing.
    for n, (node, db) in enumerate(dbs.items()):
        add_sensor_rows(db, 70, later(n), seed=20 + n)
        landing.land(db, tmp_path / f"state-{node}", node, "--batch-size", "120")
    landing.load()
    again = landing.load()
    assert "Nothing to load" in again.stderr
    assert assert_exactly_once(landing, dbs) == 1050 + 210
    info = landing.land(dbs["node-0"], tmp_path / "state-node-0", "node-0", "--run-query", "INFO")
    assert "files waiting for the loader" in info.stdout and "landed" in info.stdout


def test_dropped_answers_and_unavailable_storms_on_uploads(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 500)
    state = tmp_path / "state"
    # The upload reaches the volume but its answer is lost, twice; then a 503 storm; then 429s.
    landing.emulator.set_faults({"kind": "drop_after_write", "scope": "files", "method": "PUT", "count": 2},
                                {"kind": "unavailable", "scope": "files", "count": 4},
                                {"kind": "throttle", "scope": "files", "count": 3})
    landing.land(db, state, "n1", "--batch-size", "100")
    fired = landing.emulator.stats().get("faults_fired", {})
    assert fired.get("drop_after_write", 0) >= 2 and fired.get("unavailable", 0) >= 4, fired
    landing.load()
    assert assert_exactly_once(landing, {"n1": db}) == 500

    # A dropped answer to the loader's COPY INTO: the connector sends it again, and COPY INTO's load
    # history makes the second one a no-op.
    add_sensor_rows(db, 200, later(1))
    landing.land(db, state, "n1", "--batch-size", "100")
    landing.emulator.set_faults({"kind": "drop_after_execute", "statement": "COPY INTO", "count": 1})
    landing.load()
    assert assert_exactly_once(landing, {"n1": db}) == 700


def test_a_node_that_cannot_reach_the_files_api_fails_the_run_and_lands_later(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 200)
    state = tmp_path / "state"
    env = landing.node_env("n1", DATABRICKS_RETRY_TIMEOUT="3")
    landing.emulator.set_faults({"kind": "unavailable", "scope": "files", "count": 1000})
    failed = landing.land(db, state, "n1", env=env, expect=1)
    assert "Files API" in failed.stderr and "Retrying" in failed.stderr, failed.stderr[-2000:]
    landing.emulator.clear_faults()
    landing.land(db, state, "n1", env=env)
    landing.load()
    assert assert_exactly_once(landing, {"n1": db}) == 200


def test_kills_of_nodes_and_loader_at_random_moments_while_they_overlap(landing: Landing, tmp_path: Path):
    """Two nodes in loop mode and the loader in loop mode, all SIGKILLed at random moments and
    restarted, while rows keep arriving; then one final drain and load."""
    rng = random.Random(12)
    dbs = {f"k{n}": make_sensor_db(tmp_path / f"k{n}.db", 400, seed=n) for n in range(2)}
    log = tmp_path / "processes.log"

    def node(name: str):
        args = landing.node_args(dbs[name], tmp_path / f"state-{name}", "--batch-size", "40", "--interval", "0.3")
        return landing.spawn(args, landing.node_env(name), log)

    def loader():
        args = ["--load-landed", "--state-dir", str(tmp_path / "loader-state"), "--interval", "0.5"]
        return landing.spawn(args, landing.loader_env(), log)

    processes = {name: node(name) for name in dbs} | {"loader": loader()}
    kills = 0
    deadline = time.monotonic() + 50
    round_ = 0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.5, 5.0))
        victim = rng.choice(sorted(processes))
        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait()
        kills += 1
        round_ += 1
        if victim != "loader":
            add_sensor_rows(dbs[victim], rng.randint(10, 90), later(100 * round_), seed=round_)
        processes[victim] = loader() if victim == "loader" else node(victim)
    for process in processes.values():
        process.send_signal(signal.SIGKILL)
        process.wait()
    for name, db in dbs.items():
        landing.land(db, tmp_path / f"state-{name}", name, "--batch-size", "40")
    landing.load()
    total = assert_exactly_once(landing, dbs)
    assert kills >= 8 and total >= 800, (kills, total, log.read_text()[-3000:])
    assert landing.landed_files() == []


def test_a_batch_landing_while_the_loader_lists_a_node_is_loaded_later(landing: Landing, tmp_path: Path):
    """The loader lists a node's directory while that node lands two more batches (files and
    manifests) between the loader's listings. Those batches are loaded by a later pass, never
    mistaken for spent ones."""
    import sqlite_to_databricks_uploader as uploader

    db = make_sensor_db(tmp_path / "n.db", 100)
    state = tmp_path / "state"
    landing.land(db, state, "r1", "--batch-size", "100")
    landing.load()
    add_sensor_rows(db, 80, later(5))

    invocation = uploader.load_settings(["--load-landed", "--once", "--state-dir", str(tmp_path / "ls")],
                                        landing.loader_env())
    loader = uploader.LandedLoader(invocation.settings)
    table_dir = f"{loader.volume.root}/{TABLE}/"
    real_list = loader.volume.list
    landed = []

    def list_then_land(directory: str) -> list:
        entries = real_list(directory)
        if directory.startswith(table_dir) and not landed:  # the first listing inside the node's directory
            landed.append(landing.land(db, state, "r1", "--batch-size", "40"))
        return entries

    loader.volume.list = list_then_land  # type: ignore[method-assign]
    try:
        loader.run_once(uploader.threading.Event())
    finally:
        loader.close()
    assert landed, "the node did not land during the loader's pass"
    landing.load()
    assert assert_exactly_once(landing, {"r1": db}) == 180
    assert landing.landed_files() == []


def test_write_only_node_lands_and_a_lost_state_dir_resumes_from_the_manifest(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 300)
    writer = "write-only-token"
    landing.emulator.set_config(volume_grants={writer: ["WRITE"]})
    try:
        env = landing.node_env("w1", DATABRICKS_TOKEN=writer)
        landed = landing.land(db, tmp_path / "state", "w1", "--batch-size", "100", env=env)
        assert "no READ VOLUME" in landed.stderr  # said once: its state_dir is its only record
    finally:
        landing.emulator.set_config(volume_grants={})
    landing.load()
    assert assert_exactly_once(landing, {"w1": db}) == 300

    # The state_dir is lost; with READ VOLUME the node resumes after its newest manifest.
    add_sensor_rows(db, 120, later(5))
    resumed = landing.land(db, tmp_path / "new-state", "w1", "--batch-size", "100")
    assert "resuming after batch 3" in resumed.stderr, resumed.stderr[-2000:]
    landing.load()
    assert assert_exactly_once(landing, {"w1": db}) == 420


def test_new_columns_reach_the_table_and_bad_settings_are_refused(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 100)
    landing.land(db, tmp_path / "state", "c1")
    landing.load()
    import sqlite3

    with sqlite3.connect(db) as connection:
        connection.execute(f"ALTER TABLE {TABLE} ADD COLUMN pressure REAL")
        connection.execute(f"INSERT INTO {TABLE} (device_id, timestamp, temperature, pressure) "
                           "VALUES ('d9', '2026-04-01 00:00:00', 1.5, 1013.25)")
    landing.land(db, tmp_path / "state", "c1")
    landing.load()
    assert assert_exactly_once(landing, {"c1": db}) == 101

    no_volume = landing.land(db, tmp_path / "s2", "c2", env={**landing.node_env("c2"), "LANDING_VOLUME": ""},
                             expect=2)
    assert "landing_volume" in no_volume.stderr
    missing = landing.land(db, tmp_path / "s3", "c3", env={
        **landing.node_env("c3"), "LANDING_VOLUME": f"/Volumes/{landing.catalog}/{landing.schema}/nope"}, expect=2)
    assert "does not exist" in missing.stderr and "CREATE VOLUME" in missing.stderr, missing.stderr[-2000:]


def test_a_batch_cut_off_before_its_manifest_is_landed_again_under_its_name(landing: Landing, tmp_path: Path):
    """The data file is uploaded, the manifest is not (the Files API stops answering): the loader
    leaves the file alone, and the next node run sends the same rows under the same name."""
    db = make_sensor_db(tmp_path / "n.db", 250)
    state = tmp_path / "state"
    env = landing.node_env("m1", DATABRICKS_RETRY_TIMEOUT="3")
    landing.emulator.set_faults({"kind": "unavailable", "scope": "files", "method": "PUT", "path": "_manifest",
                                 "count": 1000})
    landing.land(db, state, "m1", "--batch-size", "1000", env=env, expect=1)
    (cut_off,) = landing.landed_files()
    assert landing.manifests() == []
    waiting = landing.load()
    assert "1 file(s) still landing" in waiting.stderr, waiting.stderr[-2000:]
    assert landing.landed_files() == [cut_off]
    landing.emulator.clear_faults()

    replayed = landing.land(db, state, "m1", "--batch-size", "1000", env=env)
    assert "loading it again" in replayed.stderr, replayed.stderr[-2000:]
    assert landing.landed_files() == [cut_off]  # the same name, not a second file
    landing.load()
    assert assert_exactly_once(landing, {"m1": db}) == 250


def test_an_attempt_orphaned_by_a_lost_state_dir_is_never_loaded(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 200)
    landing.land(db, tmp_path / "state", "o1", "--batch-size", "100")
    add_sensor_rows(db, 50, later(2))
    env = landing.node_env("o1", DATABRICKS_RETRY_TIMEOUT="3")
    landing.emulator.set_faults({"kind": "unavailable", "scope": "files", "method": "PUT", "path": "_manifest",
                                 "count": 1000})
    landing.land(db, tmp_path / "state", "o1", "--batch-size", "100", env=env, expect=1)
    landing.emulator.clear_faults()
    orphan = [f for f in landing.landed_files() if f.name.startswith("batch-000000000003-")]
    assert len(orphan) == 1
    # The state directory is lost with the journal naming that attempt: the node resumes after its
    # newest manifest (batch 2) and lands batch 3 again, under a new name, with more rows now.
    add_sensor_rows(db, 30, later(3))
    landing.land(db, tmp_path / "new-state", "o1", "--batch-size", "100")
    loaded = landing.load()
    assert f"Removing {orphan[0].parent.name}" in loaded.stderr or orphan[0].name in loaded.stderr, \
        loaded.stderr[-2000:]
    assert assert_exactly_once(landing, {"o1": db}) == 280
    assert landing.landed_files() == []


def test_a_loader_stopped_between_its_copy_and_the_removals_loads_nothing_twice(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 300)
    landing.land(db, tmp_path / "state", "l1", "--batch-size", "100")
    landing.emulator.set_faults({"kind": "unavailable", "scope": "files", "method": "DELETE", "count": 1000})
    failed = landing.load(env=landing.loader_env(DATABRICKS_RETRY_TIMEOUT="3"), expect=1)
    assert "removing" in failed.stderr, failed.stderr[-2000:]
    assert len(landing.landed_files()) == 3  # loaded, not removed
    landing.emulator.clear_faults()
    again = landing.load()
    assert "300 already loaded by an interrupted run" in again.stderr, again.stderr[-2000:]
    assert assert_exactly_once(landing, {"l1": db}) == 300
    assert landing.landed_files() == []


def declared_sdk_floor() -> str:
    header = SCRIPT.read_text().split("# ///", 2)[1]
    match = re.search(r'"databricks-sdk>=([0-9.]+)', header)
    assert match, "no 'databricks-sdk>=' bound in the PEP 723 header"
    return match.group(1)


def test_the_sdk_floor_lands_through_a_lost_answer(landing: Landing, tmp_path: Path):
    """The oldest databricks-sdk the header allows re-sends an upload whose answer was lost."""
    db = make_sensor_db(tmp_path / "n.db", 150)
    landing.emulator.set_faults({"kind": "drop_after_write", "scope": "files", "method": "PUT", "count": 2})
    command = [sys.executable, "-m", "uv", "run", "-q", "--with", f"databricks-sdk=={declared_sdk_floor()}",
               "-s", str(SCRIPT), *landing.node_args(db, tmp_path / "state", "--once", "--batch-size", "50",
                                                     "--log-level", "DEBUG")]
    proc = subprocess.run(command, env=landing.node_env("f1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"databricks-sdk {declared_sdk_floor()}" in proc.stderr, proc.stderr[-3000:]
    assert landing.emulator.stats()["faults_fired"].get("drop_after_write", 0) >= 2
    landing.load()
    assert assert_exactly_once(landing, {"f1": db}) == 150
