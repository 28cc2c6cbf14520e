"""The workspace a live test runs against (see conftest.py), in a plain module so that test files
can import it without clashing with the other folders' conftest.py files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sqlite_to_databricks_uploader.py"

# Settings a developer's shell may carry that would change what a run does.
OWN_SETTINGS = ("SQLITE_PATH", "SQLITE_TABLE_NAME", "TIMESTAMP_COL", "CURSOR", "BATCH_SIZE", "UPLOAD_TARGET",
                "DELTA_PATH", "DATABRICKS_DATABASE", "DATABRICKS_TABLE", "STAGING_VOLUME", "CREATE_TABLE",
                "NODE_ID", "LINEAGE_COLUMNS", "STATE_DIR", "UPLOAD_INTERVAL", "ONCE", "UPLOADER_CONFIG",
                "ENABLE_SANITIZE", "ENABLE_FILTER", "ENABLE_AGGREGATE")
RUN_TIMEOUT = 900  # a serverless warehouse may need minutes to wake up


@dataclass
class Workspace:
    """The configured workspace and one test's schema in it."""

    schema: str
    state_root: Path

    def env(self, *, oauth_only: bool = False, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
        if oauth_only:
            env.pop("DATABRICKS_TOKEN", None)
        env.update(extra)
        return env

    def run(self, db: Path, *args: str, state: str = "state", expect: int | None = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One uploader run against this schema, the way a user starts it."""
        proc = subprocess.run([sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir",
                               str(self.state_root / state), "--databricks-database", self.schema, *args],
                              env=env or self.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if expect is not None:
            assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
        return proc

    def start(self, db: Path, *args: str, state: str = "state") -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir",
                                 str(self.state_root / state), "--databricks-database", self.schema, *args],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sql(self, statement: str) -> list[dict[str, Any]]:
        """Run SQL through the uploader's query mode (its own authentication path)."""
        proc = subprocess.run([sys.executable, str(SCRIPT), "--run-query", statement, "--output", "json",
                               "--databricks-database", self.schema, "--state-dir", str(self.state_root / "query")],
                              env=self.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, f"{statement}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        return json.loads(proc.stdout or "[]")

    def qualified(self, table: str) -> str:
        catalog = os.environ.get("DATABRICKS_CATALOG")
        return (f"`{catalog}`." if catalog else "") + f"`{self.schema}`.`{table}`"
