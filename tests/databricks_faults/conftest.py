"""Shared pieces of the Databricks fault tests: one emulator for the folder, sources, runs, checks.

Every test runs the real uploader script as a subprocess against the local warehouse emulator
(tools/databricks_emulator.py, real connector, real Spark SQL) and ends by reading the target
back twice: through the connector, and straight from the emulator's Parquet files.
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
for _path in (TESTS_DIR, TESTS_DIR.parent / "examples"):  # emulator_harness, uploader_testkit; make_sample_db
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from emulator_harness import Emulator, emulator_fixture  # noqa: E402
from make_sample_db import DEVICES, SCHEMA, STATUSES, format_timestamp  # noqa: E402
from uploader_testkit import clean_env, sqlite_rows, uploader_command  # noqa: E402

# Settings uploader_testkit.clean_env does not strip (yet); a developer's shell must not reach a run.
MORE_UPLOADER_VARIABLES = (
    "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_CATALOG", "STAGING_VOLUME", "CREATE_TABLE",
    "NODE_ID", "LINEAGE_COLUMNS", "DATABRICKS_RETRY_TIMEOUT",
)
VALUE_COLUMNS = ("id", "device_id", "temperature", "humidity", "status")
TABLE = "sensor_logs"
START = datetime(2026, 5, 4, 23, 59, 0, tzinfo=timezone.utc)

# One emulator for this folder, stopped when the folder is done (package scope) so that it does not
# sit beside the next folder's emulator for the rest of the session.
emulator = emulator_fixture(scope="package")


@pytest.fixture(autouse=True)
def _healthy_emulator(emulator: Emulator) -> Iterator[None]:
    """Each test starts with no faults and zeroed counters, and leaves the emulator running."""
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    emulator.reset()
    yield
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()  # a test that stopped it failed before bringing it back
    emulator.reset()


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class Source:
    """A sensor database whose clock never goes backwards: timestamp mode must upload every row.

    Rows use every storage style of make_sample_db (text with and without offset, unix seconds
    and millis, Julian days), share timestamps (sweeps, ties with the previous insert) and a few
    have a NULL timestamp. With id_base, ids start above it, so several sources can share a table.
    """

    def __init__(self, path: Path, rng: random.Random, id_base: int = 0, null_share: float = 0.03):
        self.path = path
        self.rng = rng
        self.id_base = id_base
        self.null_share = null_share
        self.clock = START
        self.next_id = id_base + 1
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SCHEMA)
        connection.close()

    def insert(self, count: int, tie_with_last: bool = False) -> None:
        rng = self.rng
        if not tie_with_last:
            self.clock += timedelta(seconds=rng.choice([1, 2, 5]))
        rows = []
        for index in range(count):
            if index and rng.random() < 0.5:  # otherwise a tie with the previous row
                self.clock += timedelta(seconds=rng.choice([1, 1, 3]))
            moment = None if rng.random() < self.null_share else format_timestamp(self.clock, rng.randrange(6))
            temperature = None if rng.random() < 0.02 else round(rng.gauss(21.5, 4.0), 2)
            rows.append((self.next_id, rng.choice(DEVICES), moment, temperature, round(rng.uniform(20, 80), 1),
                         rng.choice(STATUSES)))
            self.next_id += 1
        with sqlite3.connect(self.path) as connection:
            connection.executemany(
                "INSERT INTO sensor_logs (id, device_id, timestamp, temperature, humidity, status) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)
        connection.close()

    def expected(self, columns: Sequence[str] = VALUE_COLUMNS) -> Counter:
        return Counter(sqlite_rows(self.path, TABLE, ", ".join(columns)))

    def count(self) -> int:
        return len(sqlite_rows(self.path, TABLE, "id"))


def new_schema(prefix: str) -> str:
    """A schema of its own for one test (the emulator allows [A-Za-z0-9_] names)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# Running the uploader
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One uploader configuration: a source database, a state dir, a target schema, flags."""

    emulator: Emulator
    db: Path
    work: Path
    schema: str
    extra: list[str] = field(default_factory=list)
    node_id: str = "node-1"
    runs: int = 0

    @property
    def state_dir(self) -> Path:
        return self.work / "state"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "upload_state.json"

    def args(self, *more: str) -> list[str]:
        return ["--sqlite", str(self.db), "--state-dir", str(self.state_dir),
                "--databricks-host", self.emulator.url, "--databricks-http-path", self.emulator.http_path,
                "--databricks-database", self.schema, "--node-id", self.node_id, *self.extra, *more]

    def env(self) -> dict[str, str]:
        env = clean_env(DATABRICKS_TOKEN=self.emulator.token or "unused")
        for name in MORE_UPLOADER_VARIABLES:
            env.pop(name, None)
        return env

    def log_path(self, label: str = "run") -> Path:
        self.runs += 1
        self.work.mkdir(parents=True, exist_ok=True)
        return self.work / f"{label}-{self.runs:03d}.log"

    def run(self, *more: str, timeout: float = 300) -> Run:
        """Run to the end (normally with --once) and return its exit code and log."""
        process = self.start(*more)
        try:
            process.popen.wait(timeout=timeout)
        finally:
            process.stop_hard()
        return process

    def query(self, *more: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """A run whose stdout matters (--run-query): stdout and stderr captured apart."""
        self.work.mkdir(parents=True, exist_ok=True)
        return subprocess.run(uploader_command(*self.args(*more)), cwd=self.work, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *more: str, label: str = "run") -> Run:
        log_path = self.log_path(label)
        with open(log_path, "w") as log:
            popen = subprocess.Popen(uploader_command(*self.args(*more)), cwd=self.work, env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT)
        return Run(popen, log_path)


@dataclass
class Run:
    popen: subprocess.Popen
    log_path: Path

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log(), flags=re.MULTILINE))

    def stop_hard(self) -> None:
        """SIGKILL this run's process if it is still alive (cleanup, not a test action)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM: the uploader finishes the batch in flight and exits 0."""
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop_hard()
            raise

    def describe(self) -> str:
        return f"exit code {self.returncode}, log {self.log_path}:\n{self.log()[-6000:]}"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 1.0,
               while_alive: Sequence[Run] = ()) -> bool:
    """Poll until predicate() is true; False on timeout or when a run that must stay alive exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if any(run.returncode is not None for run in while_alive):
            return predicate()
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------------------------------
# Reading the target back, two independent ways
# ---------------------------------------------------------------------------------------------


def _normalize(value: Any) -> Any:
    return value.as_py() if hasattr(value, "as_py") else value


def connector_rows(emulator: Emulator, schema: str, table: str = TABLE,
                   columns: Sequence[str] = VALUE_COLUMNS) -> Counter:
    """The target's rows through the real connector (a SELECT on the warehouse)."""
    names = ", ".join(f"`{c}`" for c in columns)
    with emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT {names} FROM `{schema}`.`{table}`")
        return Counter(tuple(_normalize(v) for v in row) for row in cursor.fetchall())


def connector_count(emulator: Emulator, schema: str, table: str = TABLE) -> int:
    """Row count through the connector; -1 while the table does not exist or cannot be read."""
    try:
        with emulator.connect() as connection, connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM `{schema}`.`{table}`")
            return int(cursor.fetchall()[0][0])
    except Exception:
        return -1


def parquet_rows(emulator: Emulator, schema: str, table: str = TABLE,
                 columns: Sequence[str] = VALUE_COLUMNS) -> Counter:
    """The target's rows from the emulator's Parquet files (pyarrow only, no Spark)."""
    data = emulator.read_table_parquet(schema, table)
    if data.num_rows == 0:
        return Counter()
    by_lower = {name.lower(): name for name in data.column_names}
    if any(c.lower() not in by_lower for c in columns):
        # A column added by ALTER TABLE is missing from older files, and the dataset reader takes
        # its schema from one file: read each file and let pyarrow fill the gaps with NULLs.
        data = _read_files_unified(emulator, schema, table)
        by_lower = {name.lower(): name for name in data.column_names}
    lists = [data.column(by_lower[c.lower()]).to_pylist() for c in columns]
    return Counter(zip(*lists))


def _read_files_unified(emulator: Emulator, schema: str, table: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = emulator.table_location(schema, table)
    files = [p for p in sorted(location.rglob("*.parquet"))
             if not any(part.startswith((".", "_")) for part in p.relative_to(location).parts)]
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def diff_report(found: Counter, expected: Counter, limit: int = 8) -> list[str]:
    duplicates = {k: n for k, n in found.items() if n > 1}
    missing = expected - found
    extra = found - expected - Counter({k: n - 1 for k, n in duplicates.items()})
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates)} row(s) more than once, e.g. {sorted(duplicates.items())[:limit]}")
    if missing:
        problems.append(f"{sum(missing.values())} row(s) never uploaded, e.g. {sorted(missing)[:limit]}")
    if extra:
        problems.append(f"{sum(extra.values())} row(s) not in the source, e.g. {sorted(extra, key=repr)[:limit]}")
    return problems


def assert_exactly_once(emulator: Emulator, schema: str, expected: Counter, table: str = TABLE,
                        columns: Sequence[str] = VALUE_COLUMNS, context: str = "") -> None:
    """Every expected row exactly once, read back through the connector and from the Parquet files."""
    problems = []
    for how, found in (("through the connector", connector_rows(emulator, schema, table, columns)),
                       ("in the Parquet files", parquet_rows(emulator, schema, table, columns))):
        problems += [f"{how}: {p}" for p in diff_report(found, expected)]
    assert not problems, (f"{schema}.{table} does not hold every source row exactly once "
                          f"({sum(expected.values())} expected){context}:\n" + "\n".join(problems))


def fired(emulator: Emulator, kind: str) -> int:
    return int(emulator.stats()["faults_fired"].get(kind, 0))
