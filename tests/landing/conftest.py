"""End-to-end tests of the landing path (issue 12): nodes land files through the Files API with the
real databricks-sdk, the loader loads them with COPY INTO through the unmodified connector, both
against one emulator process for the folder. Helpers live in landing_e2e.py."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # emulator_harness
sys.path.insert(0, str(HERE.parent / "databricks"))  # dbx_e2e
sys.path.insert(0, str(HERE))  # landing_e2e

from dbx_e2e import CANARY_TOKEN  # noqa: E402
from emulator_harness import Emulator, emulator_fixture  # noqa: E402
from landing_e2e import Landing  # noqa: E402

emulator = emulator_fixture(token=CANARY_TOKEN)


@pytest.fixture(autouse=True)
def _no_faults_left(emulator: Emulator) -> Iterator[None]:
    yield
    emulator.clear_faults()


@pytest.fixture
def landing(emulator: Emulator, tmp_path: Path) -> Landing:
    """A schema and landing volume of their own for one test."""
    return Landing.create(emulator, "land_" + uuid.uuid4().hex[:10], tmp_path)
