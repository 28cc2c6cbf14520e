# /// script
# requires-python = ">=3.10"
# dependencies = ["databricks-sql-connector[pyarrow]>=4.4.0", "pyarrow>=18", "deltalake>=1.2", "pandas>=2.2",
#                 "pyyaml>=6"]
# ///
"""Load rows into Databricks (the local warehouse emulator) two ways, in one run, and compare.

    python3 bench/load_databricks.py [--rows 100000] [--sample 2000] [--workdir DIR]

1. The uploader: `sqlite_to_databricks_uploader.py --once` as a subprocess, the way users run it
   (bulk path: Parquet -> volume -> COPY INTO), into a fresh table.
2. A loader written the way the original example did it: read the rows, then
   `cursor.executemany("INSERT INTO t VALUES (?, ...)", rows[i:i + 500])` for slices of 500.
   The connector runs executemany as one statement per row, so this loader is timed on the
   first --sample rows only and its rate is reported per row (loading everything would take
   hours); the report says so.

For each: wall time, rows/s, and statements the warehouse received (the emulator's counters).
The emulator runs Spark locally, so absolute times are not Databricks' times; the statement
counts and the ratio of the two loaders are the figures that carry over.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

from emulator_harness import Emulator  # noqa: E402
from make_sample_db import make_sample_db  # noqa: E402


def statements(emulator: Emulator) -> dict[str, int]:
    return dict(emulator.stats().get("statements", {}))


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def run_uploader(db: Path, workdir: Path, emulator: Emulator, table: str, batch_size: int | None) -> float:
    command = [sys.executable, str(ROOT / "sqlite_to_databricks_uploader.py"), "--sqlite", str(db),
               "--state-dir", str(workdir / f"state-{table}"), "--databricks-host", emulator.url,
               "--databricks-http-path", emulator.http_path, "--databricks-database", "bench",
               "--databricks-table", table, "--once", "--log-level", "WARNING"]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    env = {"DATABRICKS_TOKEN": emulator.token, "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=workdir)
    return time.perf_counter() - started


def run_executemany(db: Path, emulator: Emulator, table: str, sample: int) -> float:
    rows = sqlite3.connect(db).execute(
        "SELECT id, device_id, CAST(timestamp AS TEXT), temperature, humidity, status FROM sensor_logs "
        f"LIMIT {int(sample)}").fetchall()
    with emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS bench.{table} (id BIGINT, device_id STRING, "
                       "timestamp STRING, temperature DOUBLE, humidity DOUBLE, status STRING)")
        started = time.perf_counter()
        for start in range(0, len(rows), 500):
            cursor.executemany(f"INSERT INTO bench.{table} VALUES (?, ?, ?, ?, ?, ?)", rows[start:start + 500])
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2_000, help="rows the executemany loader is timed on")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dbx-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / f"sensor-{args.rows}.db"
    if not db.exists():
        make_sample_db(db, rows=args.rows, wal=False)

    with Emulator(data_dir=workdir / "emulator") as emulator:
        with emulator.connect() as connection, connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA IF NOT EXISTS bench")
        results = []
        for label, batch_size in (("uploader, default batch_size (100000)", None),
                                  ("uploader, batch_size 10000", 10_000)):
            table = f"uploader_{batch_size or 'default'}"
            before = statements(emulator)
            seconds = run_uploader(db, workdir, emulator, table, batch_size)
            sent = delta(statements(emulator), before)
            loaded = emulator.read_table_parquet("bench", table).num_rows
            results.append((label, args.rows, loaded, seconds, sent))
        before = statements(emulator)
        seconds = run_executemany(db, emulator, "executemany", args.sample)
        sent = delta(statements(emulator), before)
        loaded = emulator.read_table_parquet("bench", "executemany").num_rows
        results.append((f"executemany, slices of 500 (timed on {args.sample} rows)", args.sample, loaded,
                        seconds, sent))

    print(f"\nLoading {args.rows} sensor rows into the local Databricks SQL warehouse emulator")
    print(f"{'loader':<52} {'rows':>8} {'landed':>8} {'seconds':>9} {'rows/s':>10} {'statements':>11}  by kind")
    rates = []
    for label, rows, landed, seconds, sent in results:
        rate = rows / seconds
        rates.append(rate)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(sent.items()))
        print(f"{label:<52} {rows:>8} {landed:>8} {seconds:>9.1f} {rate:>10.0f} {sum(sent.values()):>11}  {kinds}")
    print(f"\nuploader (default) / executemany rows/s: {rates[0] / rates[-1]:.0f}x")
    batches = -(-args.rows // 10_000)
    per_batch = sum(results[1][4].values()) / batches
    print(f"statements per batch at batch_size 10000: {per_batch:.1f} (run-level set-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
