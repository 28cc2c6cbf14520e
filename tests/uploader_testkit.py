"""Shared test helpers: run the uploader the way a user does, and read what landed in the target.

A module of its own (not conftest.py): several test folders have a conftest.py, and
`from conftest import ...` would get whichever one pytest imported last.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sqlite_to_databricks_uploader.py"
SAMPLE = ROOT / "examples" / "make_sample_db.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

# Variables a developer's shell may carry that would change what the uploader does.
UPLOADER_VARIABLES = {
    "SQLITE_PATH", "SQLITE_TABLE_NAME", "TIMESTAMP_COL", "CURSOR", "SOURCE_TIMEZONE", "INVALID_TIMESTAMPS",
    "BATCH_SIZE", "SQLITE_BUSY_TIMEOUT", "UPLOAD_TARGET", "DELTA_PATH", "DATABRICKS_HOST",
    "DATABRICKS_HTTP_PATH", "DATABRICKS_TOKEN", "DATABRICKS_DATABASE", "DATABRICKS_TABLE",
    "ENABLE_SANITIZE", "SANITIZE_CONFIG", "ENABLE_FILTER", "FILTER_CONFIG", "ENABLE_AGGREGATE",
    "AGGREGATE_CONFIG", "STATE_DIR", "UPLOAD_INTERVAL", "ONCE", "LOG_LEVEL", "LOG_FORMAT",
    "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_CATALOG", "STAGING_VOLUME", "CREATE_TABLE",
    "NODE_ID", "LINEAGE_COLUMNS", "DATABRICKS_RETRY_TIMEOUT", "UPLOADER_CONFIG",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UPLOADER_VARIABLES}
    env.update(extra)
    return env


def uploader_command(*args: str) -> list[str]:
    """The script run by the test environment's Python (its dependencies are installed there)."""
    return [sys.executable, str(SCRIPT), *args]


def run_uploader(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(uploader_command(*args), cwd=cwd, env=env if env is not None else clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_delta(path: Path | str):
    """Read a Delta table's current rows with pyarrow, in this process.

    Reading through an explicit pyarrow filesystem avoids the delta-rs shutdown abort
    described in the README (a pyarrow IO thread at interpreter exit).
    """
    import pyarrow.dataset as ds
    from deltalake import DeltaTable
    from pyarrow.fs import LocalFileSystem

    table = DeltaTable(str(path))
    files = [uri.removeprefix("file://") for uri in table.file_uris()]
    schema = None
    import pyarrow as pa

    schema = pa.schema(table.schema().to_arrow())
    return ds.dataset(files, schema=schema, format="parquet", filesystem=LocalFileSystem()).to_table()


def sqlite_rows(db: Path, table: str = "sensor_logs", columns: str = "*") -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(f'SELECT {columns} FROM "{table}"').fetchall()


@pytest.fixture
def sample_db(tmp_path: Path) -> Path:
    from make_sample_db import make_sample_db

    path = tmp_path / "data" / "sensor_data.db"
    make_sample_db(path, rows=3000)
    return path
