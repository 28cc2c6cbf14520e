"""Session fixtures of the container tests: one throwaway store, one base image, one image build."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # emulator_harness

from container_kit import ROOT, Podman, make_base_image, need, strip_noise  # noqa: E402
from emulator_harness import emulator_fixture  # noqa: E402

emulator = emulator_fixture()


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    need("podman", "buildah", "runc")
    store = Podman()
    try:
        yield store
    finally:
        store.cleanup()


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    need("debootstrap")
    return make_base_image(podman)


@pytest.fixture(scope="session")
def uploader_image(podman: Podman, base_image: str) -> str:
    """The image, built once per session exactly as the README says: ./build.sh --registry local."""
    tag = "ci-" + uuid.uuid4().hex[:8]
    started = time.monotonic()
    proc = podman("--registry", "local", "--tag", tag, tool=str(ROOT / "build.sh"),
                  env={"BASE_IMAGE": base_image, "BUILDER": "podman"}, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"./build.sh failed ({elapsed:.0f} s):\n{strip_noise(proc.stderr)[-6000:]}"
    image = f"localhost/databricks-uploader:{tag}"
    size = podman.inspect("image", image)["Size"]
    print(f"\nbuilt {image} in {elapsed:.0f} s, {size / 1e6:.0f} MB", file=sys.stderr)
    return image
