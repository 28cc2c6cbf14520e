"""A live suite against a real Databricks workspace (issue 11, point 9).

Skipped unless a workspace is configured in the environment:

    DATABRICKS_HOST, DATABRICKS_HTTP_PATH (a SQL warehouse), and either DATABRICKS_TOKEN or
    DATABRICKS_CLIENT_ID + DATABRICKS_CLIENT_SECRET; optionally DATABRICKS_CATALOG.

Every test works in a schema of its own (`sqlite_uploader_live_<random>`) that the uploader creates,
and drops it with everything in it (tables, staging volume) when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "examples"))

from live_workspace import Workspace  # noqa: E402


def workspace_configured() -> bool:
    has_credentials = bool(os.environ.get("DATABRICKS_TOKEN")) or bool(
        os.environ.get("DATABRICKS_CLIENT_ID") and os.environ.get("DATABRICKS_CLIENT_SECRET"))
    return bool(os.environ.get("DATABRICKS_HOST") and os.environ.get("DATABRICKS_HTTP_PATH") and has_credentials)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if workspace_configured():
        return
    skip = pytest.mark.skip(reason="live Databricks suite: set DATABRICKS_HOST, DATABRICKS_HTTP_PATH and "
                                   "DATABRICKS_TOKEN (or DATABRICKS_CLIENT_ID/SECRET) to run it")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    ws = Workspace(schema="sqlite_uploader_live_" + uuid.uuid4().hex[:12], state_root=tmp_path)
    try:
        yield ws
    finally:
        catalog = os.environ.get("DATABRICKS_CATALOG")
        target = (f"`{catalog}`." if catalog else "") + f"`{ws.schema}`"
        ws.sql(f"DROP SCHEMA IF EXISTS {target} CASCADE")
