"""Fixtures of the hostile-input corpus; the helpers live in kit.py.

The emulator (a local Databricks SQL warehouse on Spark) is started only when a test asks for it,
once for this folder (package scope), and stopped when the folder is done so that it does not sit
beside another folder's emulator for the rest of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .kit import CANARY_TOKEN, Emulator, emulator_fixture, mount_tmpfs, unmount

emulator = emulator_fixture(scope="package", token=CANARY_TOKEN)


@pytest.fixture
def healthy_emulator(emulator: Emulator) -> Iterator[Emulator]:
    """The emulator with no faults, counters zeroed, running (a previous test may have stopped it)."""
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    emulator.reset()
    yield emulator
    emulator.reset()


@pytest.fixture
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A function mounting a small tmpfs (size in bytes) at a fresh directory; skipped when not allowed."""
    mounted = []

    def mount(size: int):
        path = tmp_path_factory.mktemp("tmpfs")
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        unmount(path)
