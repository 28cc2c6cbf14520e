"""The heartbeat behind the container HEALTHCHECK: fresh while the loop runs, stale when it stops."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from uploader_testkit import clean_env, run_uploader, uploader_command

import sqlite_to_databricks_uploader as up


def test_missing_heartbeat_is_unhealthy(tmp_path):
    healthy, message = up.check_health(str(tmp_path))
    assert not healthy and "no heartbeat" in message


def test_fresh_and_stale_heartbeat(tmp_path):
    beat = up.Heartbeat(str(tmp_path), stale_after=300)
    beat.failed()
    beat.beat("sleeping")
    written = json.loads((tmp_path / up.HEARTBEAT_FILE_NAME).read_text())
    assert up.check_health(str(tmp_path), now=written["time"] + 299)[0]
    healthy, message = up.check_health(str(tmp_path), now=written["time"] + 301)
    assert not healthy and "stale after 300 s" in message and "1 failure" in message


def test_unreadable_heartbeat_is_unhealthy(tmp_path):
    (tmp_path / up.HEARTBEAT_FILE_NAME).write_text("{not json")
    assert not up.check_health(str(tmp_path))[0]


def test_heartbeat_outlives_the_connector_retry_budget():
    settings = up.load_settings(["--databricks-retry-timeout", "600"], environ={}).settings
    assert up.heartbeat_stale_after(settings) >= 600 * 4


def test_loop_keeps_the_heartbeat_fresh_and_healthcheck_reads_it(tmp_path, sample_db):
    state = tmp_path / "state"
    env = clean_env(SQLITE_PATH=str(sample_db), STATE_DIR=str(state), DELTA_PATH=str(tmp_path / "delta"),
                    UPLOAD_INTERVAL="3")
    assert run_uploader("--healthcheck", env=env).returncode == 1  # nothing has run yet
    process = subprocess.Popen(uploader_command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            check = run_uploader("--healthcheck", env=env)
            if check.returncode == 0 and "last successful cycle 20" in check.stdout:
                break
            time.sleep(1)
        assert check.returncode == 0, check.stdout + check.stderr
        first = json.loads((state / up.HEARTBEAT_FILE_NAME).read_text())["time"]
        time.sleep(4)  # longer than one interval: the loop has slept and woken since
        assert json.loads((state / up.HEARTBEAT_FILE_NAME).read_text())["time"] > first
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
