"""Opt-in: build the linux/arm64 image under QEMU user emulation and run it.

Too slow for every CI run (an arm64 debootstrap and pip install under emulation take several
minutes). Run it with tests/container/arm64_check.sh, which installs qemu-user-static and sets
RUN_ARM64_CHECK=1.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest
from container_kit import ROOT, Podman, make_base_image, need, owned_dir, run_args, source_ids, state_of, strip_noise
from container_kit import write_sample_rows as write_rows
from uploader_testkit import read_delta

pytestmark = pytest.mark.skipif(os.environ.get("RUN_ARM64_CHECK") != "1",
                                 reason="opt-in arm64 check: run tests/container/arm64_check.sh")


def test_arm64_image_builds_and_runs_under_emulation(podman: Podman, tmp_path: Path):
    need("debootstrap")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.fail("QEMU for aarch64 is not registered with binfmt_misc (run arm64_check.sh)", pytrace=False)
    timings = {}
    started = time.monotonic()
    base = make_base_image(podman, arch="arm64", name="localhost/python:3.11-slim-arm64")
    timings["base image (debootstrap under qemu, or cache)"] = time.monotonic() - started

    tag = "arm64-" + uuid.uuid4().hex[:6]
    started = time.monotonic()
    proc = podman("--registry", "local", "--tag", tag, tool=str(ROOT / "build.sh"), check=False,
                  env={"BASE_IMAGE": base, "BUILDER": "podman", "PLATFORMS": "linux/arm64"})
    timings["./build.sh (PLATFORMS=linux/arm64)"] = time.monotonic() - started
    assert proc.returncode == 0, strip_noise(proc.stderr)[-6000:]
    image = f"localhost/databricks-uploader:{tag}"
    info = podman.inspect("image", image)
    assert info["Architecture"] == "arm64"

    data = tmp_path / "data"
    write_rows(data / "sensor_data.db", 5000)
    state, lake = owned_dir(tmp_path / "state"), owned_dir(tmp_path / "lakehouse")
    env = {"SQLITE_PATH": "/data/sensor_data.db", "DELTA_PATH": "/lakehouse/sensor_logs", "BATCH_SIZE": "2000"}
    started = time.monotonic()
    podman(*run_args(image, "--once", data=data, state=state, lake=lake, env=env))
    timings["--once, 5000 rows into Delta (no network)"] = time.monotonic() - started
    assert sorted(read_delta(lake / "sensor_logs").column("id").to_pylist()) == source_ids(data / "sensor_data.db")
    assert state_of(state)["rows_uploaded"] == 5000
    arch = podman("run", "--rm", "--entrypoint", "uname", image, "-m").stdout.strip()
    assert arch == "aarch64"

    print(f"\narm64 check: {image}, architecture {info['Architecture']} (uname -m in the container: {arch}), "
          f"size {info['Size'] / 1e6:.0f} MB", file=sys.stderr)
    for step, seconds in timings.items():
        print(f"  {step}: {seconds:.0f} s", file=sys.stderr)
