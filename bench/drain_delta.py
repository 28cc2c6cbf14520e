# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "deltalake>=1.2,<2",
#     "pyarrow>=18",
#     "pandas>=2.2",
#     "pyyaml>=6",
#     "adbc-driver-sqlite>=1.13",
# ]
# ///
"""Benchmark: drain a SQLite sensor table into the local Delta target, next to plain sqlite3.

    uv run -s bench/drain_delta.py [--rows 1000000,5000000] [--memory-rows 100000,5000000] [--workdir DIR]

In one run it
  1. makes realistic sensor databases with examples/make_sample_db.py (mixed timestamp
     formats, ties); they are cached in the work directory, keyed by size, seed and the
     generator's source, so later runs skip this step;
  2. times plain iteration over each --rows table, twice: in time order (`SELECT * FROM
     sensor_logs ORDER BY julianday(timestamp), rowid`, the baseline) and unordered;
  3. times the uploader draining the same table into a fresh local Delta table, run the way a
     user runs it (`python3 sqlite_to_databricks_uploader.py --sqlite DB --state-dir S
     --delta-path D --once`, default batch_size), as whole-process wall time; steps 2 and 3
     alternate --repeat times and the medians are compared;
  4. drains each --memory-rows table once and reads the uploader's peak RSS (ru_maxrss of
     that very child, from wait4);
  5. checks every drain (exit code 0, the Delta table holds exactly the source's row count)
     and prints one summary table; results.json in the work directory keeps the figures.

The uploader runs with this script's Python (under `uv run -s` that environment has the
uploader's dependencies, which this header repeats). It is a benchmark, not a test: it exits 1
only when a drain fails or loses rows, never because a goal is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPLOADER = REPO / "sqlite_to_databricks_uploader.py"
SAMPLE_DB_SCRIPT = REPO / "examples" / "make_sample_db.py"
TABLE = "sensor_logs"
SEED = 7

SPEED_GOAL = 1.0  # uploader rows/s >= 1.0 x time-ordered plain iteration rows/s, at the smallest --rows
ORDERED_SQL = f"SELECT * FROM {TABLE} ORDER BY julianday(timestamp), rowid"
UNORDERED_SQL = f"SELECT * FROM {TABLE}"
MEMORY_GOAL = 1.3  # peak RSS at the largest size <= 1.3 x peak RSS at the smallest


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- Sample databases --------------------------------------------------------------------

def generator_tag() -> str:
    """Cached databases are valid while make_sample_db.py's source is unchanged."""
    return hashlib.sha256(SAMPLE_DB_SCRIPT.read_bytes()).hexdigest()[:10]


def database_path(workdir: Path, rows: int) -> Path:
    return workdir / "db" / f"sensor_logs-{rows}-seed{SEED}-{generator_tag()}.db"


def count_rows(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]


def finish_db(tmp: Path, final: Path) -> None:
    """Fold the WAL into the main file, close, then publish the file under its cache name."""
    connection = sqlite3.connect(tmp)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    os.replace(tmp, final)


def prepare_databases(workdir: Path, sizes: list[int]) -> dict[int, Path]:
    """One database per size. The largest is made by make_sample_db(); smaller ones are its first
    N rows, which is exactly what make_sample_db(path, N) makes (same seed, same sequence)."""
    sample = load_module(SAMPLE_DB_SCRIPT, "make_sample_db")
    paths = {size: database_path(workdir, size) for size in sizes}
    paths[max(sizes)].parent.mkdir(parents=True, exist_ok=True)
    largest = max(sizes)
    for size in sorted(sizes, reverse=True):
        path = paths[size]
        if path.exists():
            print(f"  {size:>10,} rows: cached {path}")
            continue
        started = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        for stale in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
            stale.unlink(missing_ok=True)
        if size == largest:
            sample.make_sample_db(tmp, size, seed=SEED, mixed_formats=True)
            how = "make_sample_db"
        else:
            connection = sqlite3.connect(tmp)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(sample.SCHEMA)
            connection.execute("ATTACH DATABASE ? AS big", (f"file:{paths[largest]}?mode=ro",))
            connection.execute(f"INSERT INTO main.{TABLE} SELECT * FROM big.{TABLE} ORDER BY id LIMIT ?", (size,))
            connection.commit()
            connection.execute("DETACH DATABASE big")
            connection.close()
            how = f"first {size:,} rows of the {largest:,}-row database"
        finish_db(tmp, path)
        print(f"  {size:>10,} rows: made in {time.perf_counter() - started:.1f} s ({how}) -> {path}")
    for size, path in paths.items():
        actual = count_rows(path)
        if actual != size:
            raise SystemExit(f"{path} holds {actual} rows, expected {size}: delete it and run again")
    return paths


# --- Plain sqlite3 iteration -------------------------------------------------------------

def time_plain_iteration(db: Path, sql: str) -> tuple[float, int]:
    """A baseline: what any Python program pays to see every row once."""
    connection = sqlite3.connect(db)
    try:
        started = time.perf_counter()
        count = 0
        for _row in connection.execute(sql):
            count += 1
        return time.perf_counter() - started, count
    finally:
        connection.close()


# --- The uploader as a subprocess --------------------------------------------------------

@dataclass
class Drain:
    rows: int
    seconds: float  # whole-process wall time
    max_rss_mb: float  # this child's peak resident set size
    user_s: float
    sys_s: float
    exit_code: int
    delta_rows: int  # rows the Delta log says were added
    commits: int
    cycle_seconds: float | None  # the uploader's own "Cycle done ... N s" figure
    log: str
    problems: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def uploader_env_names(uploader: Path) -> set[str]:
    """Environment variables the uploader reads: removed so the caller's shell cannot skew a run."""
    try:
        module = load_module(uploader, "_bench_uploader")
        return {option.env for option in module.OPTIONS}
    except (Exception, SystemExit):  # a broken copy under test: it will fail visibly when run
        return set()


def delta_log_counts(table: Path) -> tuple[int, int]:
    """(rows added, commits that added rows) from the Delta log's add actions (the table's creation,
    before the first batch, is not counted); no table scan, no reader threads."""
    rows = commits = 0
    log_dir = table / "_delta_log"
    if not log_dir.is_dir():
        return 0, 0
    for entry in sorted(log_dir.glob("*.json")):
        added = False
        for line in entry.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
            add = action.get("add")
            if add and add.get("stats"):
                rows += json.loads(add["stats"]).get("numRecords", 0)
                added = True
            remove = action.get("remove")
            if remove:
                rows -= remove.get("numRecords") or 0
        commits += added
    return rows, commits


_CYCLE = re.compile(r"Cycle done: (\d+) read.*?; ([\d.]+) s, ")


def run_drain(python: str, uploader: Path, db: Path, rows: int, run_dir: Path, env: dict[str, str],
              extra: list[str]) -> Drain:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    state_dir, delta_path, log_path = run_dir / "state", run_dir / "delta", run_dir / "uploader.log"
    command = [python, str(uploader), "--sqlite", str(db), "--state-dir", str(state_dir),
               "--delta-path", str(delta_path), "--once", *extra]
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    process.returncode = exit_code = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")
    delta_rows, commits = delta_log_counts(delta_path)
    cycles = [float(m.group(2)) for m in _CYCLE.finditer(text) if int(m.group(1)) > 0]
    drain = Drain(rows=rows, seconds=seconds, max_rss_mb=usage.ru_maxrss / 1024, user_s=usage.ru_utime,
                  sys_s=usage.ru_stime, exit_code=exit_code, delta_rows=delta_rows, commits=commits,
                  cycle_seconds=sum(cycles) if cycles else None, log=str(log_path))
    if exit_code != 0:
        drain.problems.append(f"exit code {exit_code}")
    if delta_rows != rows:
        drain.problems.append(f"Delta table holds {delta_rows} rows, source {rows}")
    return drain


# --- Report ------------------------------------------------------------------------------

def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def library_versions(python: str) -> str:
    code = ("import sqlite3, deltalake, pyarrow, sys; print(f'Python {sys.version.split()[0]}, "
            "SQLite {sqlite3.sqlite_version}, deltalake {deltalake.__version__}, pyarrow {pyarrow.__version__}')")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{python} cannot import the uploader's dependencies (deltalake, pyarrow); "
                         f"run this script with `uv run -s bench/drain_delta.py`.\n{done.stderr.strip()}")
    return done.stdout.strip()


def busy_warning(when: str) -> float:
    """Wall-clock figures mean little on a busy machine: say so (the ratio suffers less than the rates)."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {load:.1f} on {os.cpu_count()} CPUs {when} the runs: other processes "
              "compete for the CPU; compare the CPU seconds, or run again on a quiet machine.")
    return load


def ensure_bytecode(python: str) -> None:
    """Compile the uploader environment's modules once, as any normal install ends up with.

    uv does not compile bytecode when it builds a script's environment, and where
    PYTHONDONTWRITEBYTECODE is set (as on the project's machines) Python never caches it either:
    every uploader run would then compile pandas, pyarrow and deltalake from source, about 1 s of
    CPU that no real installation pays. Up-to-date files are skipped, so later runs cost little.
    """
    code = ("import compileall, sys, sysconfig; paths = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}; "
            "sys.exit(0 if all(compileall.compile_dir(p, quiet=2, workers=0) for p in paths) else 1)")
    started = time.perf_counter()
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        print(f"  note: some modules of {python}'s environment did not compile (they are not imported here)")
    if took > 2:
        print(f"  compiled the bytecode of {python}'s environment in {took:.0f} s (once per environment)")


def parse_speed_sizes(text: str) -> list[int]:
    return parse_sizes(text, least=1)


def parse_sizes(text: str, least: int = 2) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts, got {text!r}") from None
    if len(sizes) < least or min(sizes, default=0) < 1:
        raise argparse.ArgumentTypeError("give at least two positive row counts, e.g. 100000,5000000")
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=parse_speed_sizes, default=[1_000_000, 5_000_000],
                        help="comma-separated sizes for the speed comparison (the goal is judged at the smallest)")
    parser.add_argument("--memory-rows", type=parse_sizes, default=[100_000, 5_000_000],
                        help="comma-separated sizes for the peak-memory comparison (smallest vs largest)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sqlite-uploader-bench",
                        help="databases (cached), Delta tables, logs and results.json (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="speed runs of each kind; medians are compared")
    parser.add_argument("--uploader", type=Path, default=UPLOADER,
                        help="uploader script to run (e.g. a modified copy; default: the repository's)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs the uploader")
    parser.add_argument("--keep", action="store_true", help="keep the Delta tables of every run")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not compile the uploader environment's bytecode first (see ensure_bytecode)")
    parser.add_argument("uploader_args", nargs="*",
                        help="extra uploader arguments after --, e.g. -- --batch-size 50000")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uploader = args.uploader.resolve()
    versions = library_versions(args.python)
    if not args.no_compile:
        ensure_bytecode(args.python)
    env = {k: v for k, v in os.environ.items() if k not in uploader_env_names(uploader)}
    print(f"Benchmark of {uploader} ({versions}; {os.cpu_count()} CPUs, {platform.machine()})")
    print(f"Work directory: {workdir}")
    load_before = busy_warning("before")
    if args.uploader_args:
        print(f"Extra uploader arguments: {' '.join(args.uploader_args)}")

    print("Databases (examples/make_sample_db.py, mixed timestamp formats, seed 7):")
    sizes = sorted({*args.rows, *args.memory_rows})
    databases = prepare_databases(workdir, sizes)

    failed: list[str] = []
    speed: dict[int, dict] = {}
    for rows in args.rows:
        print(f"Speed, {rows:,} rows, {args.repeat} alternating run(s) of each:")
        ordered: list[float] = []
        unordered: list[float] = []
        drains: list[Drain] = []
        for attempt in range(1, args.repeat + 1):
            for sql, into in ((ORDERED_SQL, ordered), (UNORDERED_SQL, unordered)):
                seconds, seen = time_plain_iteration(databases[rows], sql)
                if seen != rows:
                    raise SystemExit(f"plain iteration saw {seen} rows, expected {rows}")
                into.append(seconds)
            run_dir = workdir / "runs" / f"speed-{rows}-{attempt}"
            drain = run_drain(args.python, uploader, databases[rows], rows, run_dir, env, args.uploader_args)
            drains.append(drain)
            failed += [f"speed run {rows}/{attempt}: {p} (log: {drain.log})" for p in drain.problems]
            print(f"  run {attempt}: plain time-ordered {ordered[-1]:.2f} s, unordered {unordered[-1]:.2f} s; "
                  f"uploader {drain.seconds:.2f} s wall ({drain.rows_per_s:,.0f} rows/s, peak RSS "
                  f"{drain.max_rss_mb:.0f} MB, {drain.user_s + drain.sys_s:.2f} s CPU, {drain.commits} commits)"
                  f"{'  FAILED: ' + '; '.join(drain.problems) if drain.problems else ''}")
            if not args.keep:
                shutil.rmtree(run_dir / "delta", ignore_errors=True)
        upload_seconds = statistics.median(d.seconds for d in drains)
        cycle = [d.cycle_seconds for d in drains if d.cycle_seconds]
        speed[rows] = {
            "ordered_seconds": ordered, "unordered_seconds": unordered, "upload_runs": [asdict(d) for d in drains],
            "ordered_rows_per_s": rows / statistics.median(ordered),
            "unordered_rows_per_s": rows / statistics.median(unordered),
            "upload_rows_per_s": rows / upload_seconds, "upload_seconds": upload_seconds,
            "cycle_seconds": statistics.median(cycle) if cycle else None,
            "cpu_seconds": statistics.median(d.user_s + d.sys_s for d in drains),
            "max_rss_mb": max(d.max_rss_mb for d in drains),
        }
        speed[rows]["ratio_ordered"] = speed[rows]["upload_rows_per_s"] / speed[rows]["ordered_rows_per_s"]
        speed[rows]["ratio_unordered"] = speed[rows]["upload_rows_per_s"] / speed[rows]["unordered_rows_per_s"]

    print("Memory, one drain per size (sizes drained above: the largest peak of those runs):")
    memory: dict[int, float] = {}
    for size in args.memory_rows:
        if size in speed:
            memory[size] = speed[size]["max_rss_mb"]
            print(f"  {size:>10,} rows: peak RSS {memory[size]:.0f} MB (speed runs)")
            continue
        run_dir = workdir / "runs" / f"memory-{size}"
        drain = run_drain(args.python, uploader, databases[size], size, run_dir, env, args.uploader_args)
        memory[size] = drain.max_rss_mb
        failed += [f"memory run {size}: {p} (log: {drain.log})" for p in drain.problems]
        print(f"  {size:>10,} rows: peak RSS {drain.max_rss_mb:.0f} MB, {drain.seconds:.2f} s wall, "
              f"{drain.rows_per_s:,.0f} rows/s{'  FAILED: ' + '; '.join(drain.problems) if drain.problems else ''}")
        if not args.keep:
            shutil.rmtree(run_dir / "delta", ignore_errors=True)
    memory_ratio = memory[max(memory)] / memory[min(memory)]

    load_after = busy_warning("after")
    print()
    print(f"Summary ({versions}; medians of {args.repeat} run(s))")
    table = [("measure", "value", "goal", "verdict")]
    for rows, figures in speed.items():
        judged = rows == min(args.rows)
        table += [
            (f"plain iteration in time order, {rows:,} rows", f"{fmt_rate(figures['ordered_rows_per_s'])} rows/s",
             "", ""),
            (f"plain iteration unordered, {rows:,} rows", f"{fmt_rate(figures['unordered_rows_per_s'])} rows/s",
             "", ""),
            (f"uploader drain to Delta, {rows:,} rows (whole process)",
             f"{fmt_rate(figures['upload_rows_per_s'])} rows/s", "", ""),
            ("  ratio uploader / time-ordered iteration", f"{figures['ratio_ordered']:.2f}x",
             f">= {SPEED_GOAL}x" if judged else "",
             ("met" if figures["ratio_ordered"] >= SPEED_GOAL else "NOT met") if judged else ""),
            ("  ratio uploader / unordered iteration", f"{figures['ratio_unordered']:.2f}x", "", ""),
        ]
        if figures["cycle_seconds"]:
            table.append(("  uploader's own cycle time (excl. start-up)",
                          f"{figures['cycle_seconds']:.2f} s of {figures['upload_seconds']:.2f} s", "", ""))
        table.append(("  uploader CPU time (user + sys, all threads)", f"{figures['cpu_seconds']:.2f} s", "", ""))
    for size, rss in memory.items():
        table.append((f"uploader peak RSS, {size:,} rows", f"{rss:.0f} MB", "", ""))
    table.append((f"  memory ratio {max(memory):,} / {min(memory):,} rows", f"{memory_ratio:.2f}x",
                  f"<= {MEMORY_GOAL}x", "met" if memory_ratio <= MEMORY_GOAL else "NOT met"))
    print_table(table)

    results = {
        "versions": versions, "cpus": os.cpu_count(), "uploader": str(uploader),
        "uploader_args": args.uploader_args, "repeat": args.repeat, "speed": {str(k): v for k, v in speed.items()},
        "speed_goal": SPEED_GOAL, "memory_peak_rss_mb": {str(k): v for k, v in memory.items()},
        "memory_ratio": memory_ratio, "memory_goal": MEMORY_GOAL,
        "load_average": [load_before, load_after], "failures": failed,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Figures saved in {workdir / 'results.json'}; uploader logs under {workdir / 'runs'}.")
    if failed:
        print("FAILED drains:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
