"""Conformance suite of the Databricks emulator: one emulator process for the whole session."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator_harness import Emulator, emulator_fixture

emulator = emulator_fixture()


@pytest.fixture(autouse=True)
def _clean_faults(emulator: Emulator) -> Iterator[None]:
    # A fault left behind by a failing test must not break the next one.
    yield
    emulator.reset()


@pytest.fixture
def conn(emulator: Emulator, tmp_path: Path) -> Iterator[Any]:
    c = emulator.connect(staging_allowed_local_path=[str(tmp_path)])
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cur(conn: Any) -> Iterator[Any]:
    with conn.cursor() as c:
        yield c


@pytest.fixture
def schema(cur: Any) -> str:
    """A fresh schema in catalog `main` for one test."""
    name = "t_" + uuid.uuid4().hex[:10]
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS main.{name}")
    return name
