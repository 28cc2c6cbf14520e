"""Helpers for the container tests: a throwaway podman/buildah store, the local base image, runs.

A plain module (not conftest.py), so test files import it without clashing with other folders'
conftest modules. See README.md in this folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

from uploader_testkit import UPLOADER_VARIABLES  # noqa: E402

# In CI (.ci/run) a missing tool is a failure, not a skip.
REQUIRED = os.environ.get("REQUIRE_CONTAINER_TESTS") == "1"
IMAGE_UID = 10001
BASE_IMAGE_NAME = "localhost/python:3.11-slim"
PODMAN_TIMEOUT = 900


def tool_path(tool: str) -> str | None:
    """A program on PATH, or beside the test Python (pip-installed ones: hadolint, podman-compose)."""
    beside = Path(sys.executable).parent / tool
    return shutil.which(tool) or (str(beside) if beside.exists() else None)


def need(*tools: str) -> None:
    """Skip (or, with REQUIRE_CONTAINER_TESTS=1, fail) when a tool is not installed."""
    missing = [tool for tool in tools if tool_path(tool) is None]
    if not missing:
        return
    message = (f"{', '.join(missing)} not installed: the container tests need podman, buildah, runc and "
               "debootstrap (apt-get install buildah podman runc debootstrap ...; see tests/container/README.md)")
    if REQUIRED:
        pytest.fail(message + " [REQUIRE_CONTAINER_TESTS=1]", pytrace=False)
    pytest.skip(message)


class Podman:
    """podman and buildah pointed at a throwaway storage root (vfs grows fast: one per session).

    The settings this machine needs live in a containers.conf/storage.conf pair passed through
    CONTAINERS_CONF and CONTAINERS_STORAGE_CONF, so every command line stays what a user types.
    """

    def __init__(self, root: Path | None = None) -> None:
        base = os.environ.get("CONTAINER_TEST_ROOT") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="uploader-containers-", dir=base))
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.storage_conf = self.root / "storage.conf"
        self.containers_conf = self.root / "containers.conf"
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n')
        # runc (crun trips over this machine's hybrid cgroups); limits the kernel lets us set.
        self.containers_conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{self.root / "tmp"}"\n')

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in UPLOADER_VARIABLES}
        env.update(CONTAINERS_CONF=str(self.containers_conf), CONTAINERS_STORAGE_CONF=str(self.storage_conf),
                   TMPDIR=str(self.root / "tmp"))
        return env

    def __call__(self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT,
                 env: dict[str, str] | None = None, tool: str = "podman") -> subprocess.CompletedProcess:
        proc = subprocess.run([tool, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{strip_noise(proc.stderr)[-5000:]}")
        return proc

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self(kind, "inspect", name).stdout)[0]

    def wait_exit(self, name: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # --format: a full inspect would print the container's environment (a token, maybe)
            status, code = self("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
            if status in ("exited", "stopped"):
                return int(code)
            time.sleep(0.5)
        raise AssertionError(f"container {name} still running after {timeout} s")

    def cleanup(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        subprocess.run(["umount", "-R", str(self.root / "storage")], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def strip_noise(text: str) -> str:
    """Drop podman's complaints about systemd health-check timers (no systemd on these machines)."""
    return "\n".join(line for line in text.splitlines()
                     if "unable to get systemd connection" not in line)


def make_base_image(podman: Podman, arch: str | None = None, name: str = BASE_IMAGE_NAME) -> str:
    """Import the debootstrap base (cached tarball, see make_base_image.sh) as `name`."""
    args = [str(HERE / "make_base_image.sh")] + (["--arch", arch] if arch else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"make_base_image.sh failed:\n{proc.stderr[-4000:]}"
    tarball = proc.stdout.strip().splitlines()[-1]
    extra = ["--arch", arch] if arch else []
    podman("import", *extra, "--change", 'CMD ["python3"]', tarball, name)
    return name


def write_sample_rows(db: Path, rows: int, start: datetime | None = None, seed: int = 7) -> None:
    """Create or extend the sample database (examples/make_sample_db.py's rows), starting at `start`
    (later rows need a later start: rows older than the watermark are behind the cursor), and close
    the connection at once (an open one would checkpoint the WAL whenever it is collected)."""
    from make_sample_db import SCHEMA, START, sample_rows

    db.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(SCHEMA)
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) VALUES (?, ?, ?, ?, ?)",
            sample_rows(rows, seed=seed, start=start or START))
        connection.commit()
    finally:
        connection.close()


def source_ids(db: Path) -> list[int]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(row[0] for row in connection.execute("SELECT id FROM sensor_logs"))
    finally:
        connection.close()


def chown_tree(path: Path, uid: int, gid: int | None = None) -> None:
    for directory, dirs, files in os.walk(path):
        os.chown(directory, uid, uid if gid is None else gid)
        for name in dirs + files:
            os.chown(os.path.join(directory, name), uid, uid if gid is None else gid)


def owned_dir(path: Path, uid: int = IMAGE_UID) -> Path:
    """A host directory the container's user can write (as an operator would prepare it)."""
    path.mkdir(parents=True, exist_ok=True)
    chown_tree(path, uid)
    return path


def state_of(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "upload_state.json").read_text())


def run_args(image: str, *args: str, data: Path | None = None, state: Path | None = None,
             lake: Path | None = None, env: dict[str, str] | None = None, pass_env: Sequence[str] = (),
             network: str = "none", user: str | None = None, name: str | None = None,
             detach: bool = False) -> list[str]:
    """`podman run` arguments the way the README tells users to run the image (hardened)."""
    cmd = ["run"] + (["--detach"] if detach else ["--rm"])
    if name:
        cmd += ["--name", name]
    cmd += ["--read-only", "--read-only-tmpfs=false",  # like docker --read-only: not even /tmp writable
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", network]
    if user:
        cmd += ["--user", user]
    if data:
        cmd += ["--volume", f"{data}:/data:ro"]
    if state:
        cmd += ["--volume", f"{state}:/state"]
    if lake:
        cmd += ["--volume", f"{lake}:/lakehouse"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    for key in pass_env:  # value taken from podman's own environment: never on a command line
        cmd += ["--env", key]
    return [*cmd, image, *args]
