"""The image: built with ./build.sh from a local base, then run the way the README runs it.

Every run is hardened as the README recommends: read-only root filesystem (without podman's
writable /tmp, like `docker run --read-only`), all capabilities dropped, no new privileges, a
non-root user, the SQLite directory mounted read-only.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from container_kit import (
    IMAGE_UID,
    ROOT,
    Podman,
    owned_dir,
    run_args,
    source_ids,
    state_of,
    strip_noise,
    write_sample_rows,
)
from output_audit import CANARY_TOKEN
from uploader_testkit import read_delta

# Bigger than one batch, so runs commit several batches.
ROWS = 3000


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_sample_rows(data / "sensor_data.db", ROWS)
    return data


def header_requirements() -> list[str]:
    sys.path.insert(0, str(ROOT / "docker"))
    from pep723_requirements import script_metadata

    return script_metadata((ROOT / "sqlite_to_databricks_uploader.py").read_text())["dependencies"]


def test_image_metadata(podman: Podman, uploader_image: str):
    image = podman.inspect("image", uploader_image)
    config = image["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/opt/venv/bin/python", "/app/sqlite_to_databricks_uploader.py"]
    assert config.get("StopSignal") == "SIGTERM"
    health = image.get("Healthcheck") or config.get("Healthcheck")
    assert health and health["Test"][-1] == "--healthcheck", "the HEALTHCHECK was lost (build with --format docker)"
    labels = config["Labels"]
    for key in ("title", "description", "source", "version", "revision", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == uploader_image.rsplit(":", 1)[1]
    assert image["Size"] < 650e6, f"image grew to {image['Size'] / 1e6:.0f} MB"


def test_image_contents(podman: Podman, uploader_image: str):
    """Dependencies from the PEP 723 header are installed and import; no compiler, installer, cache or pyspark."""
    names = [req.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for req in header_requirements()]
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os, shutil, sys\n"
        f"names = {names!r}\n"
        "out = {'versions': {n: m.version(n) for n in names}, 'uid': os.getuid(),\n"
        "       'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'pip', 'pip3', 'uv') if shutil.which(t)],\n"
        "       'venv_pip': u.find_spec('pip') is not None, 'pyspark': u.find_spec('pyspark') is not None,\n"
        "       'caches': [p for p in ('/root/.cache', '/nonexistent/.cache', '/tmp/pip') if os.path.exists(p)],\n"
        "       'pandas_pyc': any(f.endswith('.pyc') for _, _, fs in os.walk(os.path.dirname(\n"
        "           u.find_spec('pandas').origin)) for f in fs)}\n"
        # Everything the script imports on any path (Delta, SQL connector, landing, the native reader):
        # the Dockerfile removes parts of these packages.
        "import databricks.sql, databricks.sql.exc, deltalake, deltalake.exceptions, pandas, yaml\n"
        "import pyarrow.compute, pyarrow.dataset, pyarrow.fs, pyarrow.parquet, adbc_driver_sqlite.dbapi\n"
        "from databricks.sdk import WorkspaceClient, errors\n"
        "from databricks.sdk.config import Config\n"
        "print(json.dumps(out))\n")
    proc = podman(
        "run", "--rm", "--network", "none", "--read-only", "--entrypoint", "/opt/venv/bin/python",
        uploader_image, "-c", probe)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found["versions"]) == set(names)
    assert found["uid"] == IMAGE_UID
    # The base image's own pip may exist on PATH (/usr/bin in Debian's python3-pip, /usr/local/bin in
    # the official image); none in the uploader's environment, and no compiler anywhere.
    assert not {"gcc", "cc", "g++", "make", "uv"} & set(found["tools"]), found["tools"]
    assert not found["venv_pip"] and not found["pyspark"]
    assert not found["caches"], found["caches"]
    assert found["pandas_pyc"], "dependencies are not byte-compiled (the root filesystem is read-only)"


def test_delta_once_offline_read_only(podman: Podman, uploader_image: str, data_dir: Path, tmp_path: Path):
    """--once into a mounted Delta directory, no network at all; again: nothing uploaded twice."""
    state = owned_dir(tmp_path / "state")
    lake = owned_dir(tmp_path / "lakehouse")
    ids = source_ids(data_dir / "sensor_data.db")  # (closing the last host connection checkpoints the WAL)
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    env = {"SQLITE_PATH": "/data/sensor_data.db", "DELTA_PATH": "/lakehouse/sensor_logs", "BATCH_SIZE": "1000"}

    first = podman(*run_args(uploader_image, "--once", data=data_dir, state=state, lake=lake, env=env))
    table = read_delta(lake / "sensor_logs")
    assert sorted(table.column("id").to_pylist()) == ids
    recorded = state_of(state)
    assert recorded["rows_uploaded"] == len(ids) and recorded["batch_seq"] == 3
    assert recorded["target"] == "delta:/lakehouse/sensor_logs"
    assert all(p.stat().st_uid == IMAGE_UID for p in state.iterdir()), "state written by another user"
    assert "uploaded" in strip_noise(first.stderr + first.stdout)

    podman(*run_args(uploader_image, "--once", data=data_dir, state=state, lake=lake, env=env))
    # The source directory was only read: no -wal/-shm files created, nothing modified.
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before
    assert read_delta(lake / "sensor_logs").num_rows == len(ids)
    assert state_of(state)["batch_seq"] == 3


def test_state_dir_not_writable_is_a_clear_error(podman: Podman, uploader_image: str, data_dir: Path,
                                                 tmp_path: Path):
    """A state directory the image's user cannot write (forgot to chown) says so and exits 2."""
    state = tmp_path / "root-owned-state"
    state.mkdir()
    lake = owned_dir(tmp_path / "lakehouse")
    proc = podman(*run_args(uploader_image, "--once", data=data_dir, state=state, lake=lake,
                            env={"SQLITE_PATH": "/data/sensor_data.db", "DELTA_PATH": "/lakehouse/t"}), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "State directory /state is not writable" in proc.stderr


def test_databricks_once_through_the_emulator(podman: Podman, uploader_image: str, emulator, data_dir: Path,
                                              tmp_path: Path):
    """--once into the warehouse emulator on the host; the token only travels in the environment."""
    schema = "ctr_" + uuid.uuid4().hex[:8]
    state = owned_dir(tmp_path / "state")
    db = data_dir / "sensor_data.db"
    env = {"SQLITE_PATH": "/data/sensor_data.db", "DATABRICKS_HOST": emulator.url,
           "DATABRICKS_HTTP_PATH": emulator.http_path, "DATABRICKS_DATABASE": schema, "NODE_ID": "edge-node-1",
           "DATABRICKS_RETRY_TIMEOUT": "30", "BATCH_SIZE": "2000"}
    token = {"DATABRICKS_TOKEN": emulator.token}
    assert emulator.token == CANARY_TOKEN  # the session's canary audit watches every output for it

    podman(*run_args(uploader_image, "--once", data=data_dir, state=state, env=env,
                     pass_env=["DATABRICKS_TOKEN"], network="host"), env=token)
    landed = emulator.read_table_parquet(schema, "sensor_logs")
    assert sorted(landed.column("id").to_pylist()) == source_ids(db)

    # New rows, a new container (another host name), the same node id: only the new rows go.
    write_sample_rows(db, 500, start=datetime(2026, 2, 1, tzinfo=timezone.utc), seed=11)
    podman(*run_args(uploader_image, "--once", data=data_dir, state=state, env=env,
                     pass_env=["DATABRICKS_TOKEN"], network="host"), env=token)
    landed = emulator.read_table_parquet(schema, "sensor_logs")
    ids = landed.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == source_ids(db)
    assert state_of(state)["rows_uploaded"] == ROWS + 500


def test_loop_mode_sigterm_health_and_restart(podman: Podman, uploader_image: str, tmp_path: Path):
    """Loop mode as an arbitrary non-root user: SIGTERM mid-drain and while sleeping stops it within
    `podman stop`'s 10 s with exit code 0 and consistent state; the HEALTHCHECK reports it."""
    uid = 4242
    data = tmp_path / "data"
    write_sample_rows(data / "sensor_data.db", 300_000)
    db = data / "sensor_data.db"
    state = owned_dir(tmp_path / "state", uid)
    lake = owned_dir(tmp_path / "lakehouse", uid)
    env = {"SQLITE_PATH": "/data/sensor_data.db", "DELTA_PATH": "/lakehouse/sensor_logs", "BATCH_SIZE": "2000",
           "UPLOAD_INTERVAL": "3600"}
    name = "loop-" + uuid.uuid4().hex[:8]

    def start(container: str) -> None:
        podman(*run_args(uploader_image, data=data, state=state, lake=lake, env=env, user=f"{uid}:{uid}",
                         name=container, detach=True))

    def stop(container: str) -> tuple[int, float]:
        started = time.monotonic()
        podman("stop", "--time", "10", container)
        elapsed = time.monotonic() - started
        code = podman.wait_exit(container, 30)
        return code, elapsed

    def consistent() -> int:
        recorded = state_of(state)
        ids = read_delta(lake / "sensor_logs").column("id").to_pylist()
        assert len(ids) == len(set(ids)), "duplicates in the target"
        assert len(ids) == recorded["rows_uploaded"], (len(ids), recorded)
        return len(ids)

    # 1. Stop while it drains (about 150 batches): as soon as a few batches are committed.
    start(name)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (state / "upload_state.json").exists() and state_of(state).get("batch_seq", 0) >= 3:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no batch committed in 240 s:\n" + podman("logs", name).stderr[-3000:])
    code, elapsed = stop(name)
    logs = strip_noise(podman("logs", name).stderr)
    podman("rm", name)
    assert code == 0, f"exit code {code} after SIGTERM (137 = killed after the 10 s grace):\n{logs[-3000:]}"
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    partial = consistent()
    print(f"\nSIGTERM mid-drain: stopped in {elapsed:.1f} s with {partial} of 300000 rows committed",
          file=sys.stderr)

    # 2. Restart: it finishes the backlog, sleeps, and is healthy while it sleeps.
    start(name)
    heartbeat = state / "heartbeat.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if heartbeat.exists() and json.loads(heartbeat.read_text()).get("phase") == "sleeping":
            break
        time.sleep(0.5)
    else:
        raise AssertionError("did not finish the backlog in 300 s:\n" + podman("logs", name).stderr[-3000:])
    health = podman("healthcheck", "run", name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    code, elapsed = stop(name)
    podman("rm", name)
    assert code == 0 and elapsed < 10, (code, elapsed)
    print(f"SIGTERM while sleeping: stopped in {elapsed:.1f} s", file=sys.stderr)
    assert consistent() == len(source_ids(db))

    # 3. --once afterwards: nothing left, nothing uploaded twice.
    batches = state_of(state)["batch_seq"]
    podman(*run_args(uploader_image, "--once", data=data, state=state, lake=lake, env=env, user=f"{uid}:{uid}"))
    assert state_of(state)["batch_seq"] == batches
    assert consistent() == len(source_ids(db))


def test_healthcheck_without_a_running_loop_is_unhealthy(podman: Podman, uploader_image: str, tmp_path: Path):
    state = owned_dir(tmp_path / "state")
    proc = podman(*run_args(uploader_image, "--healthcheck", state=state), check=False)
    assert proc.returncode == 1
    assert proc.stdout.startswith("unhealthy: no heartbeat at /state/heartbeat.json")
