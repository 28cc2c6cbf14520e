"""End-to-end tests of the Databricks target (issue 4, acceptance point 1).

One emulator process serves the whole folder (session scope). It is started with a canary token:
every run of the uploader checks that this value never appears in its output. Helpers live in
dbx_e2e.py (a plain module, so test files import it without clashing with other conftest.py files).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # emulator_harness
sys.path.insert(0, str(HERE))  # dbx_e2e

from dbx_e2e import CANARY_TOKEN  # noqa: E402
from emulator_harness import Emulator, emulator_fixture  # noqa: E402

emulator = emulator_fixture(token=CANARY_TOKEN)


@pytest.fixture(autouse=True)
def _no_faults_left(emulator: Emulator) -> Iterator[None]:
    yield
    emulator.clear_faults()


@pytest.fixture
def schema() -> str:
    """A schema name of its own for one test (the schema itself is created by the uploader)."""
    return "e2e_" + uuid.uuid4().hex[:10]
