# /// script
# requires-python = ">=3.10"
# dependencies = ["databricks-sql-connector[pyarrow]>=4.4.0", "databricks-sdk>=0.80", "pyarrow>=18",
#                 "deltalake>=1.2", "pandas>=2.2", "pyyaml>=6"]
# ///
"""A fleet on one machine: many edge nodes land into one warehouse emulator while the loader runs,
then the same workload on the direct COPY path, and what each costs in SQL statements.

    python3 bench/fleet_landing.py [--nodes 50] [--seconds 90] [--rate 10] [--direct-nodes 5]

Landing phase: --nodes uploader processes in loop mode (`load_mode: landing`, no SQL warehouse
configured at all) each follow their own SQLite database, into which this script writes --rate rows
per second per node for --seconds, and the loader (`--load-landed`) runs every --loader-interval
seconds beside them. Direct phase: --direct-nodes uploader processes on the default bulk path
(4 statements per batch), same rate and duration. Fewer nodes there only because the emulator runs
one Spark statement at a time; the per-row and per-node figures do not depend on the node count.

Both phases end by waiting until every row written is in the table, then check every row is there
exactly once (per node id and row id). The emulator counts statements and Files API requests per
client (by token), so the nodes' own count of SQL statements is measured, not assumed.

The emulator runs Spark locally on this machine, together with every node: rows/s here is this
machine's, not Databricks'. The statement counts are the figures that carry over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sqlite_to_databricks_uploader.py"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

from emulator_harness import Emulator  # noqa: E402
from make_sample_db import SCHEMA, sample_rows  # noqa: E402

NODE_TOKEN = "bench-node-token"  # nodes' own token, so the emulator counts their requests apart


def client_key(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


OWN_STATEMENTS = Counter()  # this script's own queries, sent with the emulator's token


def sql(emulator: Emulator, statement: str) -> list:
    OWN_STATEMENTS["total"] += 1
    with emulator.connect() as connection, connection.cursor() as cursor:
        cursor.execute(statement)
        return cursor.fetchall() if cursor.description else []


class Writers:
    """Appends --rate rows per second to every node's database, like its sensors would."""

    def __init__(self, dbs: list[Path], rate: int):
        self.dbs, self.rate = dbs, rate
        self.stop = threading.Event()
        self.written = Counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = datetime(2026, 6, 1, tzinfo=timezone.utc)
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            for index, db in enumerate(self.dbs):
                rows = sample_rows(self.rate, seed=tick * 1000 + index, start=start + timedelta(seconds=tick))
                with sqlite3.connect(db, timeout=30) as connection:
                    connection.executemany("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, "
                                           "status) VALUES (?, ?, ?, ?, ?)", rows)
                self.written[index] += self.rate

    def __enter__(self) -> Writers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def make_dbs(workdir: Path, prefix: str, count: int, initial: int) -> list[Path]:
    dbs = []
    for index in range(count):
        db = workdir / f"{prefix}-{index:03d}.db"
        with sqlite3.connect(db) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SCHEMA)
            connection.executemany("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) "
                                   "VALUES (?, ?, ?, ?, ?)", sample_rows(initial, seed=index))
        dbs.append(db)
    return dbs


def node_env(emulator: Emulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
    env.update({"DATABRICKS_HOST": emulator.url, "DATABRICKS_RETRY_TIMEOUT": "120", "LOG_LEVEL": "WARNING",
                "LINEAGE_COLUMNS": "node_id"}, **extra)
    return env


def ledger(dbs: list[Path], names: list[str]) -> Counter:
    expected: Counter = Counter()
    for db, name in zip(dbs, names):
        with sqlite3.connect(db) as connection:
            expected.update((name, row[0]) for row in connection.execute("SELECT id FROM sensor_logs"))
    return expected


def wait_for_rows(emulator: Emulator, table: str, total: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = sql(emulator, f"SELECT count(*) FROM {table}")[0][0] if table_exists(emulator, table) else 0
        if count >= total:
            return time.monotonic()
        time.sleep(2)
    raise SystemExit(f"timed out: {table} did not reach {total} rows")


def table_exists(emulator: Emulator, table: str) -> bool:
    schema, name = table.split(".")
    return any(row[1] == name for row in sql(emulator, f"SHOW TABLES IN {schema}"))


def check_once(emulator: Emulator, table: str, expected: Counter) -> None:
    got = Counter((row[0], row[1]) for row in sql(emulator, f"SELECT _node_id, id FROM {table}"))
    duplicates = sum(n - 1 for n in got.values() if n > 1)
    missing = sum((expected - got).values())
    extra = sum((got - expected).values())
    print(f"  check: {sum(got.values()):,} rows in {table}; duplicates {duplicates}, missing {missing}, "
          f"unexpected {extra}")
    if duplicates or missing or extra:
        raise SystemExit("FAILED: not every row exactly once")


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def client_stats(emulator: Emulator, token: str) -> dict:
    return emulator.stats().get("clients", {}).get(client_key(token), {"statements": 0, "files_total": 0})


def landing_phase(emulator: Emulator, args: argparse.Namespace, workdir: Path) -> dict:
    sql(emulator, "CREATE SCHEMA IF NOT EXISTS fleet_landing")
    sql(emulator, "CREATE VOLUME IF NOT EXISTS spark_catalog.fleet_landing.landing")
    names = [f"node-{i:03d}" for i in range(args.nodes)]
    dbs = make_dbs(workdir, "land", args.nodes, args.initial)
    volume = "/Volumes/spark_catalog/fleet_landing/landing"
    logs = (workdir / "landing-processes.log").open("ab")
    nodes_before = client_stats(emulator, NODE_TOKEN)
    loader_before, own_before = client_stats(emulator, emulator.token), OWN_STATEMENTS["total"]
    started = time.monotonic()
    with Writers(dbs, args.rate) as writers:
        nodes = [subprocess.Popen(
            [sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir", str(workdir / f"state-{name}"),
             "--interval", str(args.node_interval), "--batch-size", str(args.batch_size)],
            env=node_env(emulator, DATABRICKS_TOKEN=NODE_TOKEN, LOAD_MODE="landing", LANDING_VOLUME=volume,
                         NODE_ID=name), stdout=logs, stderr=subprocess.STDOUT) for db, name in zip(dbs, names)]
        loader = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--load-landed", "--state-dir", str(workdir / "loader-state"),
             "--interval", str(args.loader_interval)],
            env=node_env(emulator, DATABRICKS_TOKEN=emulator.token, DATABRICKS_HTTP_PATH=emulator.http_path,
                         LANDING_VOLUME=volume, DATABRICKS_DATABASE="fleet_landing", LOG_LEVEL="INFO"),
            stdout=logs, stderr=subprocess.STDOUT)
        time.sleep(args.seconds)
    total = args.initial * args.nodes + sum(writers.written.values())
    done = wait_for_rows(emulator, "fleet_landing.sensor_logs", total, timeout=900)
    elapsed = done - started
    nodes_after = client_stats(emulator, NODE_TOKEN)
    loader_after, own = client_stats(emulator, emulator.token), OWN_STATEMENTS["total"] - own_before
    stop_all([*nodes, loader])
    check_once(emulator, "fleet_landing.sensor_logs", ledger(dbs, names))
    # The loader shares the emulator's token with this script's own queries: those are not its.
    loader_statements = loader_after["statements"] - loader_before["statements"] - own
    return {"path": "landing", "nodes": args.nodes, "rows": total, "seconds": elapsed,
            "node_statements": nodes_after["statements"] - nodes_before["statements"],
            "node_file_requests": nodes_after["files_total"] - nodes_before["files_total"],
            "loader_statements": loader_statements,
            "loader_file_requests": loader_after["files_total"] - loader_before["files_total"],
            "loader_passes": count_passes(workdir / "landing-processes.log")}


def count_passes(log: Path) -> int:
    text = log.read_text(errors="replace")
    return text.count("Loaded ") + text.count("Nothing to load")


def direct_phase(emulator: Emulator, args: argparse.Namespace, workdir: Path) -> dict:
    names = [f"direct-{i:03d}" for i in range(args.direct_nodes)]
    dbs = make_dbs(workdir, "direct", args.direct_nodes, args.initial)
    logs = (workdir / "direct-processes.log").open("ab")
    before, own_before = client_stats(emulator, emulator.token), OWN_STATEMENTS["total"]
    started = time.monotonic()
    with Writers(dbs, args.rate) as writers:
        nodes = [subprocess.Popen(
            [sys.executable, str(SCRIPT), "--sqlite", str(db), "--state-dir", str(workdir / f"state-{name}"),
             "--interval", str(args.node_interval), "--batch-size", str(args.batch_size)],
            env=node_env(emulator, DATABRICKS_TOKEN=emulator.token, DATABRICKS_HTTP_PATH=emulator.http_path,
                         DATABRICKS_DATABASE="fleet_direct", NODE_ID=name),
            stdout=logs, stderr=subprocess.STDOUT) for db, name in zip(dbs, names)]
        time.sleep(args.seconds)
    total = args.initial * args.direct_nodes + sum(writers.written.values())
    done = wait_for_rows(emulator, "fleet_direct.sensor_logs", total, timeout=900)
    after, own = client_stats(emulator, emulator.token), OWN_STATEMENTS["total"] - own_before
    stop_all(nodes)
    check_once(emulator, "fleet_direct.sensor_logs", ledger(dbs, names))
    return {"path": "direct COPY", "nodes": args.direct_nodes, "rows": total, "seconds": done - started,
            "node_statements": after["statements"] - before["statements"] - own,
            "node_file_requests": after["files_total"] - before["files_total"],
            "loader_statements": 0, "loader_file_requests": 0, "loader_passes": 0}


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.rate} rows/s written per node for {args.seconds} s; node interval {args.node_interval} s, "
          f"loader interval {args.loader_interval} s, batch size {args.batch_size}")
    header = ("path", "nodes", "rows", "rows/s", "node SQL", "node file req", "loader SQL", "loader file req",
              "SQL per 1M rows", "SQL per node-hour")
    print(" | ".join(header))
    for r in results:
        statements = r["node_statements"] + r["loader_statements"]
        node_hours = r["nodes"] * r["seconds"] / 3600
        r["per_million"] = statements / r["rows"] * 1_000_000
        r["per_node_hour"] = statements / node_hours
        print(" | ".join(str(x) for x in (
            r["path"], r["nodes"], f"{r['rows']:,}", f"{r['rows'] / r['seconds']:,.0f}", r["node_statements"],
            r["node_file_requests"], r["loader_statements"], r["loader_file_requests"],
            f"{r['per_million']:,.0f}", f"{r['per_node_hour']:,.1f}")))
    landing = next(r for r in results if r["path"] == "landing")
    direct = next((r for r in results if r["path"] != "landing"), None)
    goals = [f"statements on landing nodes: {landing['node_statements']} (goal 0)"]
    if direct:
        ratio = direct["per_million"] / max(landing["per_million"], 1e-9)
        goals.append(f"direct COPY needs {ratio:,.0f}x the loader's statements per 1M rows (goal >= 10x)")
    print("\n".join(goals))
    out = ROOT / "bench" / "results" / "fleet_landing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args) | {"workdir": str(args.workdir)}, "results": results},
                              indent=2) + "\n")
    print(f"figures saved in {out}")
    if landing["node_statements"] or (direct and direct["per_million"] < 10 * landing["per_million"]):
        raise SystemExit("a goal was missed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--direct-nodes", type=int, default=5, help="0 skips the direct phase")
    parser.add_argument("--seconds", type=int, default=90, help="how long rows are written")
    parser.add_argument("--rate", type=int, default=10, help="rows per second per node")
    parser.add_argument("--initial", type=int, default=1000, help="rows in each database before the start")
    parser.add_argument("--node-interval", type=float, default=10.0)
    parser.add_argument("--loader-interval", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fleet-landing-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {workdir}")
    with Emulator(data_dir=workdir / "emulator") as emulator:
        # The nodes' token: valid, but only for writing and reading volume files (what a node needs).
        emulator.set_config(volume_grants={NODE_TOKEN: ["READ", "WRITE"]})
        results = [landing_phase(emulator, args, workdir)]
        if args.direct_nodes:
            results.append(direct_phase(emulator, args, workdir))
    report(results, args)


if __name__ == "__main__":
    main()
