"""Helpers for the landing-path tests: a schema with a landing volume, node runs that have no SQL
warehouse (no DATABRICKS_HTTP_PATH at all), loader runs, and the exactly-once check."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbx_e2e import SCRIPT, base_env, query, run

TABLE = "sensor_logs"


@dataclass
class Landing:
    emulator: Any
    schema: str
    tmp: Path
    catalog: str

    @classmethod
    def create(cls, emulator: Any, schema: str, tmp: Path) -> Landing:
        query(emulator, f"CREATE SCHEMA IF NOT EXISTS `{schema}`")
        catalog = query(emulator, "SELECT current_catalog() AS c")[0]["c"]
        query(emulator, f"CREATE VOLUME IF NOT EXISTS `{catalog}`.`{schema}`.`landing`")
        return cls(emulator, schema, tmp, catalog)

    @property
    def volume(self) -> str:
        return f"/Volumes/{self.catalog}/{self.schema}/landing"

    def volume_path(self) -> Path:
        return self.emulator.volume_dir(self.catalog, self.schema, "landing")

    # --- environments: a node has no warehouse; the loader has one
    def node_env(self, node: str, **extra: str) -> dict[str, str]:
        env = base_env(self.emulator, LOAD_MODE="landing", LANDING_VOLUME=self.volume, NODE_ID=node,
                       LINEAGE_COLUMNS="all", **extra)
        env.pop("DATABRICKS_HTTP_PATH")
        return env

    def loader_env(self, **extra: str) -> dict[str, str]:
        return base_env(self.emulator, LANDING_VOLUME=self.volume, DATABRICKS_DATABASE=self.schema, **extra)

    def node_args(self, db: Path, state: Path, *args: str) -> list[str]:
        return ["--sqlite", str(db), "--state-dir", str(state), *args]

    def land(self, db: Path, state: Path, node: str, *args: str, expect: int | None = 0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One `--once` drain of `db` into the landing volume."""
        return run(*self.node_args(db, state, "--once", *args), env=env or self.node_env(node), expect=expect)

    def load(self, *args: str, expect: int | None = 0, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
        """One pass of the loader."""
        return run("--load-landed", "--once", "--state-dir", str(self.tmp / "loader-state"), *args,
                   env=env or self.loader_env(), expect=expect)

    def spawn(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        handle = log.open("ab")
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT)

    # --- reading back
    def target_ids(self, table: str = TABLE) -> Counter:
        rows = query(self.emulator, f"SELECT id, _node_id FROM `{self.schema}`.`{table}`")
        return Counter((r["_node_id"], r["id"]) for r in rows)

    def landed_files(self) -> list[Path]:
        return sorted(self.volume_path().rglob("batch-*.parquet"))

    def manifests(self) -> list[Path]:
        return sorted(self.volume_path().rglob("_manifest/batch-*.json"))


def sqlite_ids(db: Path, table: str = TABLE) -> list[int]:
    with sqlite3.connect(db) as connection:
        return [r[0] for r in connection.execute(f"SELECT id FROM {table} ORDER BY id")]


def assert_exactly_once(landing: Landing, dbs: dict[str, Path], table: str = TABLE) -> int:
    """Every row of every node's database in the target exactly once, and nothing else."""
    got = landing.target_ids(table)
    expected = Counter((node, i) for node, db in dbs.items() for i in sqlite_ids(db, table))
    duplicates = {k: n for k, n in got.items() if n > 1}
    missing = expected - got
    extra = got - expected
    assert not duplicates, f"{len(duplicates)} rows loaded more than once, e.g. {list(duplicates.items())[:5]}"
    assert not missing, f"{sum(missing.values())} rows missing, e.g. {list(missing)[:5]}"
    assert not extra, f"{sum(extra.values())} rows that no node has, e.g. {list(extra)[:5]}"
    return sum(got.values())


def manifest_of(path: Path) -> dict:
    return json.loads(path.read_text())
