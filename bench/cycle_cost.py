# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "databricks-sql-connector[pyarrow]>=4.4.0,<5",
#     "deltalake>=1.2,<2",
#     "pyarrow>=18",
#     "pandas>=2.2",
#     "pyyaml>=6",
# ]
# ///
"""Benchmark: the seconds of one upload cycle of 1,000 new rows, on a small and on a large table.

    python3 -m uv run -s bench/cycle_cost.py [--sizes 20000,2000000] [--big] [--repeat 5] [--keep]

With the uploader's default settings (local Delta target, default cursor and batch size) a cycle
that uploads the same 1,000 new rows should cost about the same whatever the number of rows
already in SQLite: the goal is a median cycle on 2M rows at most 1.5x the median on 20k rows.

In one run, for every size (20k and 2M rows; 20M too with --big, when the disk has room):
  1. a sensor table without INTEGER PRIMARY KEY (timestamp TEXT, device_id TEXT, temperature
     REAL, humidity REAL, status TEXT; WAL; ISO timestamps increasing, 10 rows per second) is
     made once and cached under bench/results/ keyed by row count and generator version, then
     copied to a fresh work directory, so the uploader's state and Delta table start empty;
  2. the uploader is imported as a module and started in this process (load_settings,
     start_uploader), and drains the whole table (run_cycle until a cycle uploads nothing);
  3. --repeat times, alternating the sizes: another connection appends and commits 1,000 newer
     rows, then one run_cycle() is timed with time.perf_counter; it must upload exactly 1,000 rows.
     The cycle's phases are timed too: the check against the target (resync), planning the
     window (_plan) and reading + writing the rows (_drain_window).
Medians per size and the ratios to the smallest size are printed; the figures are saved in
bench/results/cycle_cost.json. It is a benchmark, not a test: it exits 1 only when a cycle
uploads the wrong number of rows or the Delta table misses rows, never because a goal is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UPLOADER = REPO / "sqlite_to_databricks_uploader.py"
RESULTS = REPO / "bench" / "results"  # git-ignored
TABLE = "sensor_logs"

DEFAULT_SIZES = [20_000, 2_000_000]
BIG_SIZE = 20_000_000
NEW_ROWS = 1_000  # rows appended before each timed cycle
DRAIN_COMMITS = 40  # batches of the initial drain, for every size
RATIO_GOAL = 1.5  # median cycle on the large table <= 1.5 x median cycle on the small one
CHUNK = 100_000  # rows per executemany while building a database
DEVICES = 50
ROWS_PER_SECOND = 10  # readings sharing one timestamp
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
SEED = 7
BYTES_PER_ROW_GUESS = 80  # database file size per row before one has been built (measured: ~60)


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def label(rows: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if rows >= scale:
            value = rows / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(rows)


# --- The sensor table ----------------------------------------------------------------------

SCHEMA = (f"CREATE TABLE {TABLE} (timestamp TEXT, device_id TEXT, temperature REAL, humidity REAL, "
          "status TEXT)")


def sensor_rows(start: int, count: int) -> list[tuple]:
    """Rows start .. start+count-1 of the endless sensor log: ISO timestamps (UTC, text as SQLite's
    CURRENT_TIMESTAMP writes them) increasing by one second every ROWS_PER_SECOND rows."""
    rng = random.Random(SEED * 1_000_003 + start)
    devices = [f"dev-{d:03d}" for d in range(DEVICES)]
    rows = []
    second, stamp = -1, ""
    for index in range(start, start + count):
        if index // ROWS_PER_SECOND != second:
            second = index // ROWS_PER_SECOND
            stamp = (START + timedelta(seconds=second)).strftime("%Y-%m-%d %H:%M:%S")
        draw = rng.random()
        status = "ok" if draw < 0.97 else "warn" if draw < 0.995 else "error"
        rows.append((stamp, devices[index % DEVICES], round(15 + 15 * rng.random(), 2),
                     round(30 + 50 * rng.random(), 1), status))
    return rows


def generator_tag() -> str:
    """Cached databases are valid while the code that makes them is unchanged."""
    source = inspect.getsource(sensor_rows) + SCHEMA + repr((DEVICES, ROWS_PER_SECOND, START, SEED))
    return hashlib.sha256(source.encode()).hexdigest()[:10]


def cached_database(rows: int) -> Path:
    """The database of `rows` rows, built once (in ~2.4 s per million rows) and kept under RESULTS."""
    path = RESULTS / "db" / f"{TABLE}-{rows}-{generator_tag()}.db"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    started = time.perf_counter()
    connection = sqlite3.connect(partial)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute(SCHEMA)
        for first in range(0, rows, CHUNK):
            connection.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
                                   sensor_rows(first, min(CHUNK, rows - first)))
            connection.commit()
    finally:
        connection.close()  # checkpoints the WAL into the file and removes it
    partial.rename(path)
    print(f"  built {path.name} ({rows:,} rows, {path.stat().st_size / 1e6:.0f} MB) "
          f"in {time.perf_counter() - started:.1f} s")
    return path


def room_for(rows: int, workroot: Path) -> tuple[bool, str]:
    """Enough free disk for the cached database (if not built yet), its work copy and its Delta table?"""
    known = sorted(RESULTS.glob(f"db/{TABLE}-*-{generator_tag()}.db"))
    per_row = BYTES_PER_ROW_GUESS
    if known:
        biggest = max(known, key=lambda p: p.stat().st_size)
        per_row = biggest.stat().st_size / int(biggest.name.split("-")[1])
    database = rows * per_row
    cached = (RESULTS / "db" / f"{TABLE}-{rows}-{generator_tag()}.db").exists()
    need = (0 if cached else database) + database + 0.6 * database + 2e9  # copy, Delta table, margin
    free = shutil.disk_usage(workroot).free
    if free < need:
        return False, f"needs about {need / 1e9:.1f} GB free on {workroot}, {free / 1e9:.1f} GB is free"
    return True, f"about {need / 1e9:.1f} GB of {free / 1e9:.1f} GB free"


# --- One table, one uploader ---------------------------------------------------------------

PHASES = ("resync", "_plan", "_drain_window")  # Uploader methods timed inside each cycle
TARGET_PHASES = ("committed", "write")  # and its target's (inside resync and _drain_window)


@dataclass
class Cycle:
    wall: float  # time.perf_counter around run_cycle()
    stats_seconds: float  # the uploader's own CycleStats.seconds
    rows_uploaded: int
    phases: dict[str, float]


@dataclass
class Case:
    rows: int
    workdir: Path
    uploader: Any = None
    writer: sqlite3.Connection | None = None
    next_index: int = 0
    drain_seconds: float = 0.0
    drain_cycles: int = 0
    drain_commits: int = 0
    idle_cycle: float = 0.0  # the drain's last cycle, which found nothing to upload
    cycles: list[Cycle] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.workdir / f"{TABLE}.db"

    @property
    def lake(self) -> Path:
        return self.workdir / "delta"


def instrument(uploader: Any, phases: dict[str, float]) -> None:
    """Add the time spent in each of PHASES (and TARGET_PHASES of the uploader's target, as
    "target.<name>") to `phases`; the wrappers are set on these instances only."""
    methods = [(uploader, name, name) for name in PHASES]
    methods += [(uploader.target, name, f"target.{name}") for name in TARGET_PHASES]
    for owner, attribute, name in methods:
        original = getattr(owner, attribute)

        def timed(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)


def start_case(module: Any, rows: int, workroot: Path) -> Case:
    case = Case(rows=rows, workdir=workroot / f"rows-{rows}")
    case.workdir.mkdir(parents=True)
    shutil.copyfile(cached_database(rows), case.db)
    case.next_index = rows
    # The application's connection, open all along as it would be (WAL mode is in the file).
    case.writer = sqlite3.connect(case.db, timeout=30)
    argv = ["--sqlite", str(case.db), "--state-dir", str(case.workdir / "state"),
            "--delta-path", str(case.lake), "--once", "--log-level", "WARNING"]
    # The initial drain commits DRAIN_COMMITS batches whatever the size, so that every Delta
    # table has the same history (files and log entries): the cycles then differ only in the
    # number of rows SQLite holds, which is what this benchmark is about.
    drain_argv = [*argv, "--batch-size", str(max(1, rows // DRAIN_COMMITS))]
    case.uploader = module.start_uploader(module.load_settings(drain_argv, environ={}).settings,
                                          threading.Event())
    started = time.perf_counter()
    uploaded = 0
    while True:
        cycle_started = time.perf_counter()
        stats = case.uploader.run_cycle()
        case.drain_cycles += 1
        case.drain_commits += stats.batches
        uploaded += stats.rows_uploaded
        if stats.rows_uploaded == 0:
            case.idle_cycle = time.perf_counter() - cycle_started
            break
        if case.drain_cycles > 5:
            case.problems.append("the initial drain did not finish in 5 cycles")
            break
    case.drain_seconds = time.perf_counter() - started
    case.uploader.target.close()
    # The timed cycles: the uploader as a user runs it, default settings.
    case.uploader = module.start_uploader(module.load_settings(argv, environ={}).settings, threading.Event())
    instrument(case.uploader, case.phases)
    if uploaded != rows:
        case.problems.append(f"the initial drain uploaded {uploaded:,} rows, the table holds {rows:,}")
    return case


def append_rows(case: Case) -> None:
    assert case.writer is not None
    with case.writer:  # one committed transaction
        case.writer.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
                                sensor_rows(case.next_index, NEW_ROWS))
    case.next_index += NEW_ROWS


def timed_cycle(case: Case) -> Cycle:
    append_rows(case)
    case.phases.clear()
    started = time.perf_counter()
    stats = case.uploader.run_cycle()
    wall = time.perf_counter() - started
    cycle = Cycle(wall=wall, stats_seconds=stats.seconds, rows_uploaded=stats.rows_uploaded,
                  phases=dict(case.phases))
    if stats.rows_uploaded != NEW_ROWS:
        case.problems.append(f"cycle {len(case.cycles) + 1} uploaded {stats.rows_uploaded} rows, not {NEW_ROWS}")
    if stats.behind:
        case.problems.append(f"cycle {len(case.cycles) + 1} left {stats.behind} rows behind")
    case.cycles.append(cycle)
    return cycle


def finish_case(case: Case) -> None:
    """Close the target and the writer; check the Delta table holds every row once."""
    import pyarrow as pa
    from deltalake import DeltaTable

    close = getattr(case.uploader.target, "close", None)
    if close is not None:
        close()
    if case.writer is not None:
        case.writer.close()
    added = pa.table(DeltaTable(str(case.lake)).get_add_actions(flatten=True)).column("num_records")
    if sum(added.to_pylist()) != case.next_index:
        case.problems.append(f"the Delta table holds {sum(added.to_pylist()):,} rows, SQLite {case.next_index:,}")


# --- Report --------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def busy_warning(when: str) -> float:
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {load:.1f} on {os.cpu_count()} CPUs {when} the runs: other processes "
              "compete for the CPU, the figures are noisy; run again on a quiet machine.")
    return load


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("give positive row counts, e.g. 20000,2000000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                        help="comma-separated table sizes in rows (default: 20000,2000000); ratios are to the "
                             "smallest")
    parser.add_argument("--big", action="store_true",
                        help=f"also {BIG_SIZE:,} rows, if the disk has room (about 3 GB; ~1.5 min more)")
    parser.add_argument("--repeat", type=int, default=5, help="timed cycles per size (default: 5)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (databases, state, Delta)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")

    try:
        import deltalake
        import pyarrow
    except ImportError as exc:
        raise SystemExit(f"The uploader's dependencies are missing ({exc}); run this with "
                         "`python3 -m uv run -s bench/cycle_cost.py`.") from None
    module = load_module(UPLOADER, "_bench_cycle_uploader")

    RESULTS.mkdir(parents=True, exist_ok=True)
    workroot = Path(tempfile.mkdtemp(prefix="cycle-cost-", dir=RESULTS))
    sizes = list(args.sizes)
    skipped = ""
    if args.big and BIG_SIZE not in sizes:
        ok, why = room_for(BIG_SIZE, RESULTS)
        if ok:
            sizes.append(BIG_SIZE)
        else:
            skipped = f"{BIG_SIZE:,} rows skipped: {why}"
    versions = (f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, deltalake "
                f"{deltalake.__version__}, pyarrow {pyarrow.__version__}; {os.cpu_count()} CPUs "
                f"({platform.machine()})")
    print(f"One upload cycle of {NEW_ROWS:,} new rows, default settings (local Delta target, default cursor)")
    print(f"  {versions}")
    print(f"  work directory {workroot}")
    if skipped:
        print(f"  {skipped}")
    load_before = busy_warning("before")

    cases: list[Case] = []
    try:
        print("Tables (cached under bench/results/db) and the initial drain:")
        for rows in sizes:
            case = start_case(module, rows, workroot)
            cases.append(case)
            print(f"  {rows:>12,} rows: drained in {case.drain_seconds:.1f} s "
                  f"({rows / case.drain_seconds:,.0f} rows/s, {case.drain_commits} Delta commits in "
                  f"{case.drain_cycles} cycles; the last, idle, {case.idle_cycle:.3f} s)")
        print(f"Timed cycles ({args.repeat} per size, sizes alternating), seconds:")
        for attempt in range(1, args.repeat + 1):
            line = []
            for case in cases:
                cycle = timed_cycle(case)
                line.append(f"{label(case.rows)} {cycle.wall:.3f}")
            print(f"  round {attempt}: " + ", ".join(line))
    finally:
        for case in cases:
            if case.uploader is not None:
                try:
                    finish_case(case)
                except Exception as exc:  # report, and keep closing the others
                    case.problems.append(f"closing/checking failed: {exc}")
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)

    load_after = busy_warning("after")
    print()
    print(f"Summary: medians of {args.repeat} cycle(s) of {NEW_ROWS:,} new rows ({versions})")
    table = [("rows in table", "cycle median s", "min s", "max s", "stats.seconds", "target check",
              "(Delta)", "planning", "read+write", "(Delta)", "rows/cycle")]
    for case in cases:
        walls = [c.wall for c in case.cycles]
        table.append((
            f"{case.rows:,}", f"{median(walls):.3f}", f"{min(walls):.3f}", f"{max(walls):.3f}",
            f"{median([c.stats_seconds for c in case.cycles]):.3f}",
            *(f"{median([c.phases.get(name, 0.0) for c in case.cycles]):.3f}"
              for name in ("resync", "target.committed", "_plan", "_drain_window", "target.write")),
            "/".join(sorted({f"{c.rows_uploaded:,}" for c in case.cycles})),
        ))
    print_table(table)
    base = cases[0]
    base_median = median([c.wall for c in base.cycles])
    base_plan = median([c.phases.get("_plan", 0.0) for c in base.cycles])
    ratios = {}
    for case in cases[1:]:
        ratio = median([c.wall for c in case.cycles]) / base_median
        plan = median([c.phases.get("_plan", 0.0) for c in case.cycles])
        ratios[f"{label(case.rows)}/{label(base.rows)}"] = ratio
        verdict = "met" if ratio <= RATIO_GOAL else "NOT met"
        print(f"ratio {label(case.rows)}/{label(base.rows)}: {ratio:.2f} (goal <= {RATIO_GOAL}: {verdict}); "
              f"planning alone {plan / base_plan:.1f}x ({plan * 1000:.1f} ms vs {base_plan * 1000:.1f} ms)")
    if skipped:
        print(skipped)

    failures = [f"{case.rows:,} rows: {problem}" for case in cases for problem in case.problems]
    results = {
        "versions": versions, "cpus": os.cpu_count(), "repeat": args.repeat, "new_rows": NEW_ROWS,
        "goal": RATIO_GOAL, "ratios": ratios, "load_average": [load_before, load_after],
        "sizes": {str(case.rows): {
            "drain_seconds": case.drain_seconds, "idle_cycle_seconds": case.idle_cycle,
            "cycles": [{"wall": c.wall, "stats_seconds": c.stats_seconds, "rows_uploaded": c.rows_uploaded,
                        "phases": c.phases} for c in case.cycles]} for case in cases},
        "skipped": skipped, "failures": failures,
    }
    (RESULTS / "cycle_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Figures saved in {RESULTS / 'cycle_cost.json'}.")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
