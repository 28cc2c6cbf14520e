"""Helpers for the Databricks end-to-end tests: run the uploader as a user does, read the target back.

Everything the target holds is read twice, independently: through the real connector (SQL on the
emulator) and straight from the emulator's Parquet files with pyarrow.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sqlite_to_databricks_uploader.py"
sys.path.insert(0, str(ROOT / "examples"))

# The emulator's token: a value that must never show up in anything the uploader prints.
from output_audit import CANARY_TOKEN  # noqa: E402

RUN_TIMEOUT = 420  # generous: other suites load this 2-core machine at the same time

# Settings an uploader run must not inherit from the developer's shell.
_OWN_VARIABLES = {
    "SQLITE_PATH", "SQLITE_TABLE_NAME", "TIMESTAMP_COL", "CURSOR", "SOURCE_TIMEZONE", "INVALID_TIMESTAMPS",
    "BATCH_SIZE", "SQLITE_BUSY_TIMEOUT", "UPLOAD_TARGET", "DELTA_PATH", "STAGING_VOLUME", "CREATE_TABLE",
    "NODE_ID", "LINEAGE_COLUMNS", "ENABLE_SANITIZE", "SANITIZE_CONFIG", "ENABLE_FILTER", "FILTER_CONFIG",
    "ENABLE_AGGREGATE", "AGGREGATE_CONFIG", "STATE_DIR", "UPLOAD_INTERVAL", "ONCE", "LOG_LEVEL", "LOG_FORMAT",
    "UPLOADER_CONFIG", "LOAD_MODE", "LANDING_VOLUME",
}


def base_env(emulator: Any | None = None, *, token: bool = True, **extra: str) -> dict[str, str]:
    """A clean environment; with an emulator, its address and (unless token=False) its token."""
    env = {k: v for k, v in os.environ.items() if k not in _OWN_VARIABLES and not k.startswith("DATABRICKS_")}
    if emulator is not None:
        env["DATABRICKS_HOST"] = emulator.url  # http://127.0.0.1:PORT: plain HTTP to the emulator
        env["DATABRICKS_HTTP_PATH"] = emulator.http_path
        env["DATABRICKS_RETRY_TIMEOUT"] = "30"
        if token:
            env["DATABRICKS_TOKEN"] = emulator.token
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str], expect: int | None = 0,
        secrets: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run the script with the test Python; check the exit code and that no secret leaked."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT)
    output = proc.stdout + proc.stderr
    for secret in (CANARY_TOKEN, *secrets):
        assert secret not in output, f"a secret ({secret[:8]}...) appears in the output:\n{output[-4000:]}"
    if expect is not None:
        assert proc.returncode == expect, (f"exit code {proc.returncode}, expected {expect}\n"
                                           f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def upload(emulator: Any, db: Path, state_dir: Path, schema: str, *args: str, expect: int | None = 0,
           env: dict[str, str] | None = None, secrets: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """One `--once` drain of `db` into `schema` on the emulator."""
    return run("--sqlite", str(db), "--state-dir", str(state_dir), "--once", "--databricks-database", schema,
               *args, env=env if env is not None else base_env(emulator), expect=expect, secrets=secrets)


# --- reading the target back

def query(emulator: Any, sql: str) -> list[dict[str, Any]]:
    """Rows of a SQL statement through the real connector."""
    with emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        if cursor.description is None:
            return []
        return cursor.fetchall_arrow().to_pylist()


def column_types(emulator: Any, name: str) -> dict[str, str]:
    """Column -> upper-case type of a table, from DESCRIBE TABLE (data columns only)."""
    types: dict[str, str] = {}
    for row in query(emulator, f"DESCRIBE TABLE {name}"):
        column, kind = row["col_name"], row["data_type"]
        if not column or column.startswith("#"):
            break
        types[column] = kind.upper()
    return types


def target_rows(emulator: Any, schema: str, table: str, order: str = "id") -> list[dict[str, Any]]:
    return [normalize(r) for r in query(emulator, f"SELECT * FROM `{schema}`.`{table}` ORDER BY `{order}`")]


def read_parquet_files(emulator: Any, schema: str, table: str) -> Any:
    """All data files of a table, each read on its own and concatenated with their schemas unified.

    (emulator.read_table_parquet() takes one file's schema for the whole dataset, so columns added
    by ALTER TABLE after the first file would silently be missing from what it returns.)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = emulator.table_location(schema, table)
    files = sorted(p for p in location.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(location).parts))
    assert not any("=" in p.relative_to(location).parts[0] for p in files), "partitioned tables not handled"
    tables = [pq.read_table(f) for f in files]
    if not tables:
        return pa.table({})
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")


def parquet_rows(emulator: Any, schema: str, table: str, order: str = "id") -> list[dict[str, Any]]:
    """The table's rows read from its Parquet files with pyarrow only (no Spark, no connector)."""
    rows = [normalize(r) for r in read_parquet_files(emulator, schema, table).to_pylist()]
    return sorted(rows, key=lambda r: (r[order] is None, r[order]))


def both_views(emulator: Any, schema: str, table: str, order: str = "id") -> list[dict[str, Any]]:
    """The rows through the connector, after checking the Parquet files hold exactly the same."""
    via_sql = target_rows(emulator, schema, table, order)
    via_files = parquet_rows(emulator, schema, table, order)
    assert_same_rows(via_files, via_sql, "Parquet files vs. connector")
    return via_sql


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as aware UTC datetimes, whatever tzinfo implementation the reader used."""
    out = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        out[key] = value
    return out


def short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} long)"


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b) and not (isinstance(a, datetime) and isinstance(b, datetime)):
        return False
    return a == b


def assert_same_rows(actual: Sequence[dict], expected: Sequence[dict], what: str,
                     ignore: Iterable[str] = ()) -> None:
    """Row-by-row, column-by-column equality with compact messages (values can be megabytes)."""
    skip = set(ignore)
    assert len(actual) == len(expected), f"{what}: {len(actual)} rows, expected {len(expected)}"
    problems = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        got_keys, want_keys = set(got) - skip, set(want) - skip
        if got_keys != want_keys:
            problems.append(f"row {index}: columns {sorted(got_keys)} != {sorted(want_keys)}")
            continue
        for key in sorted(want_keys):
            if not same_value(got[key], want[key]):
                problems.append(f"row {index} ({want.get('id')}) column {key}: got {short(got[key])}, "
                                f"expected {short(want[key])}")
    assert not problems, f"{what}:\n" + "\n".join(problems[:30])


# --- SQLite sources

def sqlite_rows(db: Path, table: str = "sensor_logs") -> list[dict[str, Any]]:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute(f'SELECT * FROM "{table}" ORDER BY rowid')]


def instant(value: Any) -> datetime | None:
    """What the uploader documents for a stored timestamp, computed independently of its code:
    ISO text (naive = UTC), INTEGER unix seconds / milliseconds, REAL Julian day (ms resolution)."""
    if value is None:
        return None
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    if isinstance(value, int):
        return epoch + (timedelta(seconds=value) if value < 100_000_000_000 else timedelta(milliseconds=value))
    millis = round((value - 2440587.5) * 86_400_000)
    return epoch + timedelta(milliseconds=millis)


def expected_sensor_rows(db: Path, table: str = "sensor_logs") -> list[dict[str, Any]]:
    """The sample table as it must land: every column as stored, the timestamp as an instant."""
    return [dict(row, timestamp=instant(row["timestamp"])) for row in sqlite_rows(db, table)]


def make_sensor_db(path: Path, rows: int, seed: int = 7) -> Path:
    """The examples/ sample table (mixed timestamp formats, sweeps sharing a timestamp)."""
    from make_sample_db import make_sample_db

    make_sample_db(path, rows, seed=seed)
    return path


def add_sensor_rows(path: Path, rows: int, start: datetime, seed: int = 11) -> None:
    """More sample rows, later than `start`."""
    from make_sample_db import sample_rows

    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) "
                       "VALUES (?, ?, ?, ?, ?)", sample_rows(rows, seed=seed, start=start))


def iso_z(moment: datetime) -> str:
    text = moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    return text + "Z"


def batches_in(stderr: str) -> int:
    """Batches the runs reported in their cycle summaries."""
    return sum(int(n) for n in re.findall(r"uploaded in (\d+) batch", stderr))


def uploaded_in(stderr: str) -> int:
    return sum(int(n) for n in re.findall(r"read, (\d+) uploaded in", stderr))


def stat_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Statements per kind sent between two emulator.stats() snapshots, plus 'total'."""
    kinds = set(before["statements"]) | set(after["statements"])
    delta = {k: after["statements"].get(k, 0) - before["statements"].get(k, 0) for k in kinds}
    delta["total"] = after["statements_total"] - before["statements_total"]
    return delta

