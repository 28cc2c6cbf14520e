"""Security tests: secrets, TLS, SQL injection. One emulator serves the folder."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "databricks"))
sys.path.insert(0, str(HERE))

from emulator_harness import Emulator, emulator_fixture  # noqa: E402

emulator = emulator_fixture()


@pytest.fixture(autouse=True)
def _no_faults_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator" in request.fixturenames:
        emu: Emulator = request.getfixturevalue("emulator")
        emu.clear_faults()


@pytest.fixture
def schema() -> str:
    return "sec_" + uuid.uuid4().hex[:10]
