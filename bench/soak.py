# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "databricks-sql-connector[pyarrow]>=4.4.0,<5",
#     "deltalake>=1.2,<2",
#     "pyarrow>=18",
#     "pandas>=2.2",
#     "pyyaml>=6",
#     "psutil>=5.9",
#     "uv>=0.5",
# ]
# ///
"""Soak test: a sensor application writes, the uploader runs in loop mode, chaos strikes; nothing is lost.

    python3 -m uv run -s bench/soak.py --target databricks|delta --minutes N [--rate 1000] [--seed S]
                                       [--interval S] [--cursor timestamp|rowid] [--json summary.json]

For N minutes three things run at once:

- a *writer* process (its own process, plain sqlite3, WAL) inserts sensor rows into SQLite at --rate
  rows/s in small transactions: sweeps that share one timestamp, every datetime storage style of
  examples/make_sample_db.py, occasional NULL and unreadable timestamps, surges (several times the
  rate for a few seconds) and buffered flushes (thousands of rows in one transaction);
- the *uploader*, the repository's script run the way a user runs it, in loop mode, against the
  local Databricks SQL warehouse emulator (tools/databricks_emulator.py) or a local Delta table;
- a *chaos driver* that, at random moments, SIGKILLs and restarts the uploader, stops it gracefully,
  freezes it, deletes its state file, and -- Databricks target -- turns emulator faults on and off
  (503 storms, dropped answers after a statement ran, refused connections, slow answers) and restarts
  the emulator, cleanly or by crashing it. Faults come one at a time: after each one the driver waits
  until the uploader has caught up (see "lag" below) before the next.

Then the writer stops, the uploader drains, is stopped with SIGTERM, and the target is compared with
the source row by row (every row carries a unique id). One summary is printed (and written as JSON
with --json); the exit code is 0 when no row was lost, duplicated or altered, every fault was
recovered from, and the uploader never exited on its own. bench/README.md explains every figure.

Lag: at a moment t, the age of the oldest source row that is not yet in the target (t minus the time
the writer committed it); 0 when every committed row is in the target. A fault is *recovered* at the
first moment after its end at which rows committed after the end have landed in the target and the
lag is below one interval.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
UPLOADER = REPO / "sqlite_to_databricks_uploader.py"
for _path in (REPO / "tests", REPO / "examples"):  # emulator_harness; make_sample_db
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from make_sample_db import DEVICES, SCHEMA, STATUSES, format_timestamp  # noqa: E402

TABLE = "sensor_logs"
SCHEMA_NAME = "soak"  # Databricks schema of the target table
VALUE_COLUMNS = ("id", "device_id", "timestamp", "temperature", "humidity", "status")
# Values the uploader cannot read as a datetime (README, "Unreadable timestamps"): uploaded as NULL.
UNREADABLE = ("n/a", "", "sensor offline", "2026-02-30 10:00:00", "24:00", "9223372036854775807")

# Settings a developer's shell may carry that would change what the uploader does: every variable
# the script reads (its own option table), and the one naming its config file.
def uploader_variables() -> set[str]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import sqlite_to_databricks_uploader as uploader  # no side effects on import

    return {option.env for option in uploader.OPTIONS} | {"UPLOADER_CONFIG"}

# The chaos decks: each kind once (kills twice) per round, shuffled; a new round when one is used up.
UPLOADER_FAULTS = ("kill", "kill", "term", "freeze", "state_loss")
DECKS = {
    "databricks": (*UPLOADER_FAULTS, "unavailable", "drop_after_execute", "refuse", "delay", "emulator_restart"),
    "delta": (*UPLOADER_FAULTS, "flush"),
}
ALL_KINDS = sorted({kind for deck in DECKS.values() for kind in deck})
MIN_MICROS = -62135596800 * 1_000_000  # 0001-01-01T00:00:00Z
MAX_MICROS = 253402300800 * 1_000_000 - 1  # 9999-12-31T23:59:59.999999Z


def now() -> float:
    return time.time()


# =====================================================================================
# The writer: a sensor application, in its own process
# =====================================================================================


def writer_main(argv: list[str]) -> int:
    """Insert rows at `rate` rows/s until SIGTERM; report every commit on stdout.

    Each commit prints `C <first id> <last id> <unix time>`; the last line is `END <json stats>`.
    SIGUSR1 asks for a buffered flush at once (the chaos driver's `flush`).
    """
    parser = argparse.ArgumentParser(prog="soak.py _writer")
    parser.add_argument("db")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--cursor", choices=("timestamp", "rowid"), required=True)
    parser.add_argument("--null-share", type=float, default=0.005)
    parser.add_argument("--unreadable-share", type=float, default=0.001)
    parser.add_argument("--no-bursts", action="store_true")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    stop = threading.Event()
    flush_now = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: flush_now.set())

    # What a typical application does: its own connection, a busy timeout, short transactions.
    connection = sqlite3.connect(args.db, timeout=30.0, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    out = sys.stdout
    stats: Counter = Counter()
    last_moment: datetime | None = None

    def clock() -> datetime:
        """Now, never going backwards. Whole seconds under the timestamp cursor: the uploader compares
        instants, and a style that drops the fraction ('%Y-%m-%d %H:%M:%S', unix seconds) would
        otherwise make a later row look older than an earlier one -- a late row, skipped by design."""
        nonlocal last_moment
        moment = datetime.now(timezone.utc)
        if args.cursor == "timestamp":
            moment = moment.replace(microsecond=0)
        if last_moment is not None and moment < last_moment:
            moment = last_moment
        last_moment = moment
        return moment

    def stamp(moment: datetime) -> Any:
        draw = rng.random()
        if draw < args.null_share:
            stats["null timestamps"] += 1
            return None
        if draw < args.null_share + args.unreadable_share:
            stats["unreadable timestamps"] += 1
            return rng.choice(UNREADABLE)
        return format_timestamp(moment, rng.randrange(6))

    def reading(moment: datetime, device: str | None = None) -> tuple:
        temperature = None if rng.random() < 0.01 else round(rng.gauss(21.5, 4.0), 2)
        return (device or rng.choice(DEVICES), stamp(moment), temperature, round(rng.uniform(20, 80), 1),
                rng.choice(STATUSES))

    def commit(rows: list[tuple]) -> None:
        for attempt in range(100):
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(
                    f"INSERT INTO {TABLE} (device_id, timestamp, temperature, humidity, status) "
                    "VALUES (?, ?, ?, ?, ?)", rows)
                last = connection.execute("SELECT last_insert_rowid()").fetchone()[0]
                connection.execute("COMMIT")
                break
            except sqlite3.Error as exc:  # 'database is locked' must not happen: counted, retried
                stats[f"error: {exc}"] += 1
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                time.sleep(0.05 * (attempt + 1))
        else:
            raise SystemExit("writer: 100 failed attempts to commit")
        # One writer, no AUTOINCREMENT gaps inside a transaction: its ids are last-n+1 .. last.
        out.write(f"C {last - len(rows) + 1} {last} {now():.6f}\n")
        out.flush()
        stats["rows"] += len(rows)
        stats["transactions"] += 1
        stats["largest transaction"] = max(stats["largest transaction"], len(rows))

    started = time.monotonic()
    last_tick = started
    quota = 0.0
    surge_until, surge_factor = 0.0, 1.0
    next_burst = started + rng.uniform(10, 40)
    while not stop.is_set():
        tick = time.monotonic()
        surging = tick < surge_until
        quota = min(quota + (tick - last_tick) * args.rate * (surge_factor if surging else 1.0), 2 * args.rate)
        last_tick = tick
        if flush_now.is_set() or (not args.no_bursts and tick >= next_burst):
            if flush_now.is_set() or rng.random() < 0.5:
                flush_now.clear()
                # A device comes back and flushes its buffer in one transaction. Under the rowid
                # cursor its readings carry their own, older times (late rows); under the timestamp
                # cursor they would be skipped by design, so they get the current time (one big tie).
                count = rng.randint(2, 10) * int(args.rate)
                moment = clock()
                device = rng.choice(DEVICES)
                if args.cursor == "rowid":
                    oldest = moment - timedelta(seconds=rng.uniform(5, 600))
                    step = (moment - oldest) / count
                    rows = [reading(oldest + step * i, device) for i in range(count)]
                else:
                    rows = [reading(moment, device) for _ in range(count)]
                for start in range(0, count, 5000):
                    commit(rows[start:start + 5000])
                stats["flushes"] += 1
            else:
                surge_until, surge_factor = tick + rng.uniform(2, 6), rng.uniform(3, 8)
                stats["surges"] += 1
            next_burst = tick + rng.uniform(15, 60)
            continue
        # A sweep: several readings taken at one moment, one transaction (they tie on the timestamp).
        size = rng.randint(20, 200) if surging else rng.randint(1, 20)
        if quota < size:
            stop.wait(min(0.05, (size - quota) / (args.rate * (surge_factor if surging else 1.0))))
            continue
        moment = clock()
        commit([reading(moment) for _ in range(size)])
        quota -= size
    connection.close()
    stats["seconds"] = round(time.monotonic() - started, 3)
    out.write("END " + json.dumps(dict(stats)) + "\n")
    out.flush()
    return 0


class Writer:
    """The writer subprocess, and what it reported: (last id, commit time) of every transaction."""

    def __init__(self, python: str, db: Path, rate: float, seed: int, cursor: str, log_path: Path,
                 bursts: bool = True):
        command = [python, str(Path(__file__).resolve()), "_writer", str(db), "--rate", str(rate),
                   "--seed", str(seed), "--cursor", cursor]
        if not bursts:
            command.append("--no-bursts")
        self.log = open(log_path, "w")  # noqa: SIM115 - the child's stderr
        self.popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.last_ids: list[int] = []
        self.times: list[float] = []
        self.stats: dict[str, Any] | None = None
        self.started = now()
        self.stopped: float | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("C "):
                _, _first, last, moment = line.split()
                with self.lock:
                    self.last_ids.append(int(last))
                    self.times.append(float(moment))
            elif line.startswith("END "):
                self.stats = json.loads(line[4:])

    @property
    def max_id(self) -> int:
        with self.lock:
            return self.last_ids[-1] if self.last_ids else 0

    def committed_at(self, row_id: int) -> float | None:
        """When the transaction that wrote this id committed (None if not reported yet)."""
        with self.lock:
            index = bisect.bisect_left(self.last_ids, row_id)
            return self.times[index] if index < len(self.times) else None

    def flush(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.thread.join(timeout=10)
        self.stopped = now()
        self.log.close()


# =====================================================================================
# The uploader under test
# =====================================================================================


def read_vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process (Linux VmHWM), in bytes; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Incarnation:
    number: int
    pid: int
    started: float
    log: str
    ended: float | None = None
    how: str = ""  # kill, term, state_loss, exited (on its own), final
    exit_code: int | None = None
    peak_rss: int = 0


class UploaderProcess:
    """The uploader script, run as a user runs it; restarted after every kill."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log_dir: Path):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.popen: subprocess.Popen | None = None
        self.incarnations: list[Incarnation] = []
        self.lock = threading.RLock()  # held while the chaos driver stops / starts it
        self.frozen = False

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None

    def start(self) -> None:
        with self.lock:
            number = len(self.incarnations) + 1
            log_path = self.log_dir / f"uploader-{number:03d}.log"
            with open(log_path, "w") as log:
                self.popen = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                              stderr=subprocess.STDOUT)
            self.incarnations.append(Incarnation(number, self.popen.pid, now(), str(log_path)))

    def _ended(self, how: str) -> None:
        assert self.popen is not None and self.current is not None
        self.current.ended = now()
        self.current.how = how
        self.current.exit_code = self.popen.returncode
        self.popen = None

    def sample_memory(self) -> None:
        with self.lock:
            if self.popen is None or self.current is None:
                return
            peak = read_vm_hwm(self.popen.pid)
            with contextlib.suppress(Exception):
                import psutil

                process = psutil.Process(self.popen.pid)
                peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
            self.current.peak_rss = max(self.current.peak_rss, peak)

    def kill(self, how: str = "kill") -> None:
        with self.lock:
            if self.popen is None:
                return
            self.sample_memory()
            if self.frozen:
                self.thaw()
            self.popen.kill()
            self.popen.wait(timeout=60)
            self._ended(how)

    def terminate(self, timeout: float = 180) -> int | None:
        """SIGTERM: it finishes the batch in flight and exits 0. None when it had to be killed."""
        with self.lock:
            if self.popen is None:
                return None
            self.sample_memory()
            if self.frozen:
                self.thaw()
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=60)
                self._ended("term (killed after timeout)")
                return None
            code = self.popen.returncode
            self._ended("term")
            return code

    def freeze(self) -> None:
        with self.lock:
            if self.popen is not None:
                self.popen.send_signal(signal.SIGSTOP)
                self.frozen = True

    def thaw(self) -> None:
        with self.lock:
            if self.popen is not None:
                self.popen.send_signal(signal.SIGCONT)
            self.frozen = False

    def check_alive(self) -> Incarnation | None:
        """If the uploader exited on its own (it must not, in loop mode), record it and return it."""
        with self.lock:
            if self.popen is None or self.popen.poll() is None:
                return None
            self._ended("exited")
            return self.incarnations[-1]

    def log_tail(self, incarnation: Incarnation, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(incarnation.log).read_text(errors="replace").splitlines()[-lines:])
        return ""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in uploader_variables()}
    env.update(extra)
    return env


# =====================================================================================
# Reading the target: which ids have landed (incrementally, while the soak runs)
# =====================================================================================


class DeltaIds:
    """Ids in a Delta table, from its log: every committed `add` action, read once."""

    def __init__(self, path: Path):
        self.path = path
        self.version = 0
        self.removed = 0  # rows of files a commit removed (an append-only target never does)
        self.ids_by_file: dict[str, Any] = {}

    def new_ids(self) -> list[Any]:
        import pyarrow.parquet as pq

        found = []
        log = self.path / "_delta_log"
        while True:
            commit = log / f"{self.version:020d}.json"
            try:
                text = commit.read_text()
            except FileNotFoundError:
                return found
            actions = [json.loads(line) for line in text.splitlines() if line.strip()]
            for action in actions:
                if "add" in action:
                    relative = unquote(action["add"]["path"])
                    ids = pq.read_table(self.path / relative, columns=["id"]).column("id").to_numpy()
                    self.ids_by_file[relative] = ids
                    found.append(ids)
                elif "remove" in action:
                    ids = self.ids_by_file.pop(unquote(action["remove"]["path"]), None)
                    self.removed += 0 if ids is None else len(ids)
            self.version += 1


class EmulatorIds:
    """Ids in the emulator's table, from its Parquet files (files are only ever added)."""

    def __init__(self, emulator: Any, schema: str, table: str):
        self.emulator = emulator
        self.schema = schema
        self.table = table
        self.seen: set[str] = set()
        self.removed = 0

    def new_ids(self) -> list[Any]:
        import pyarrow.parquet as pq

        try:
            location = self.emulator.table_location(self.schema, self.table)
        except (KeyError, OSError, ValueError):
            return []  # not created yet (or catalog.json being rewritten)
        found = []
        for path in sorted(location.rglob("*.parquet")):
            key = str(path)
            if key in self.seen or any(p.startswith((".", "_")) for p in path.relative_to(location).parts):
                continue
            try:
                ids = pq.read_table(path, columns=["id"]).column("id").to_numpy()
            except Exception:  # a file being moved in: read it next time
                continue
            self.seen.add(key)
            found.append(ids)
        return found


# =====================================================================================
# The monitor: lag, memory, WAL size, unexpected exits
# =====================================================================================


class Monitor:
    """Polls the target every `poll` seconds and keeps the lag, the live duplicate count and samples."""

    def __init__(self, reader: Any, writer: Writer, uploader: UploaderProcess, interval: float, db: Path,
                 poll: float = 1.0):
        import numpy as np

        self.np = np
        self.reader = reader
        self.writer = writer
        self.uploader = uploader
        self.interval = interval
        self.db = db
        self.poll = poll
        self.present = np.zeros(1 << 16, dtype=np.uint16)
        self.frontier = 1  # smallest id not (yet) in the target
        self.rows_in_target = 0
        self.live_duplicates = 0
        self.lag = 0.0
        self.max_lag = 0.0
        self.max_lag_at = 0.0
        self.samples: list[tuple[float, float, int]] = []  # (time, lag, rows in target)
        self.reads: list[tuple[float, int, float]] = []  # (time the read began, rows in target, lag)
        self.max_wal = 0
        self.unexpected_exits: list[dict[str, Any]] = []
        self.errors: Counter = Counter()
        self.sample_lock = threading.Lock()
        self.verbose = False
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._target_loop, daemon=True),
                        threading.Thread(target=self._process_loop, daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _absorb(self, ids: Any) -> None:
        np = self.np
        if ids.size == 0:
            return
        top = int(ids.max())
        if top >= self.present.size:
            grown = np.zeros(max(top + 1, 2 * self.present.size), dtype=np.uint16)
            grown[: self.present.size] = self.present
            self.present = grown
        before = int(np.count_nonzero(self.present[ids]))
        np.add.at(self.present, ids, 1)
        self.live_duplicates += before + (ids.size - np.unique(ids).size)
        self.rows_in_target += ids.size

    def sample(self) -> None:
        with self.sample_lock:
            self._sample()

    def _sample(self) -> None:
        """Read what landed since the last poll and compute the lag."""
        read_from = now()
        try:
            batches = self.reader.new_ids()
        except Exception as exc:  # a torn read: try again at the next poll
            self.errors[f"reading the target: {type(exc).__name__}: {exc}"[:200]] += 1
            batches = []
        moment = now()
        for ids in batches:
            self._absorb(ids)
        present = self.present
        while self.frontier < present.size and present[self.frontier]:
            self.frontier += 1
        written = self.writer.max_id
        if self.frontier > written:
            lag = 0.0
        else:
            committed = self.writer.committed_at(self.frontier)
            lag = 0.0 if committed is None else max(0.0, moment - committed)
        self.lag = lag
        if lag > self.max_lag:
            self.max_lag, self.max_lag_at = lag, moment
        self.samples.append((moment, lag, self.rows_in_target))
        self.reads.append((read_from, self.rows_in_target, lag))

    def caught_up(self) -> bool:
        return self.frontier > self.writer.max_id

    def _target_loop(self) -> None:
        next_report = now() + 60
        while not self.stop_event.wait(self.poll):
            self.sample()
            if self.verbose and now() >= next_report:
                next_report += 60
                print(f"  t+{now() - self.writer.started:5.0f}s  written {self.writer.max_id:,}, in the target "
                      f"{self.rows_in_target:,}, lag {self.lag:.1f} s (max {self.max_lag:.1f} s)", flush=True)

    def _process_loop(self) -> None:
        while not self.stop_event.wait(0.25):
            self.uploader.sample_memory()
            with contextlib.suppress(OSError):
                self.max_wal = max(self.max_wal, os.path.getsize(f"{self.db}-wal"))
            ended = self.uploader.check_alive()
            if ended is not None:
                # In loop mode the uploader must never exit on its own: a crash. Record and restart.
                self.unexpected_exits.append({"incarnation": ended.number, "exit_code": ended.exit_code,
                                              "at": ended.ended, "log": ended.log,
                                              "tail": self.uploader.log_tail(ended)})
                self.uploader.start()

    def wait_recovered(self, since: float, deadline: float) -> float | None:
        """The first moment after `since` at which rows landed that were committed after `since`, and the
        lag is below one interval. A read that began after `since` sees everything committed before it:
        rows counted only by a later read were committed after `since`."""
        baseline: int | None = None
        seen = 0
        while now() < deadline:
            reads = self.reads[seen:]
            seen += len(reads)
            for began, rows, lag in reads:
                if began <= since:
                    continue
                if baseline is None:
                    baseline = rows
                    continue
                drained = self.writer.popen.poll() is not None and self.caught_up()
                if (rows > baseline or drained) and lag < self.interval:
                    return now()
            time.sleep(0.2)
        return None


# =====================================================================================
# The Databricks emulator and its fault counters
# =====================================================================================


class EmulatorFaults:
    """faults_fired of the emulator, summed over its restarts (a restart zeroes its counters)."""

    def __init__(self, emulator: Any):
        self.emulator = emulator
        self.base: Counter = Counter()
        self.last: Counter = Counter()
        self.stats: dict[str, Any] = {}

    def refresh(self) -> Counter:
        with contextlib.suppress(Exception):
            self.stats = self.emulator.stats()
            self.last = Counter(self.stats.get("faults_fired", {}))
        return self.base + self.last

    def before_restart(self) -> None:
        self.refresh()
        self.base += self.last
        self.last = Counter()

    def total(self) -> dict[str, int]:
        return dict(self.base + self.last)


# =====================================================================================
# The chaos driver
# =====================================================================================


@dataclass
class Episode:
    kind: str
    started: float
    ended: float = 0.0
    detail: str = ""
    recovered: float | None = None  # seconds from the end to recovery; None = not recovered
    peak_lag: float = 0.0
    ok: bool = True


class Chaos:
    def __init__(self, args: argparse.Namespace, rng: random.Random, uploader: UploaderProcess, writer: Writer,
                 monitor: Monitor, state_file: Path, emulator: Any = None, faults: EmulatorFaults | None = None):
        self.args = args
        self.rng = rng
        self.uploader = uploader
        self.writer = writer
        self.monitor = monitor
        self.state_file = state_file
        self.emulator = emulator
        self.faults = faults
        self.deck: list[str] = []
        self.episodes: list[Episode] = []
        self.failures: list[str] = []
        self.emulator_restarts = 0
        self.emulator_crashes = 0
        self.kills_during_faults = 0
        self.warmed_up: float | None = None

    def draw(self) -> str:
        if not self.deck:
            kinds = [k for k in DECKS[self.args.target] if not self.args.faults or k in self.args.faults]
            self.deck = kinds
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def seconds(self) -> float:
        low, high = self.args.fault_seconds
        return self.rng.uniform(low, high)

    def hold(self, seconds: float, episode: Episode) -> None:
        """Let a warehouse fault last `seconds`; in about a third of them, SIGKILL and restart the
        uploader in the middle (it then starts while the warehouse is unavailable, slow or down)."""
        if self.rng.random() < 0.35:
            first = self.rng.uniform(0, seconds)
            time.sleep(first)
            self.uploader.kill()
            self.uploader.start()
            self.kills_during_faults += 1
            episode.detail += f"; uploader SIGKILLed and restarted {first:.1f} s in"
            time.sleep(max(0.0, seconds - first))
        else:
            time.sleep(seconds)

    # -- the faults ------------------------------------------------------------------------
    def aim(self) -> str:
        """Most kills are aimed inside a cycle (between its statements / commits), the rest land anywhere:
        wait for the uploader's heartbeat to say a cycle began, then a random part of a typical cycle."""
        if self.rng.random() < 0.4:
            return "at a random moment"
        heartbeat = self.state_file.with_name("heartbeat.json")
        since = now()
        deadline = since + 3 * self.args.interval + 30
        while now() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                beat = json.loads(heartbeat.read_text())
                if beat["phase"] == "cycle" and float(beat["time"]) > since:
                    into = self.rng.uniform(0, 6.0 if self.args.target == "databricks" else 0.3)
                    time.sleep(into)
                    return f"{into:.1f} s into a cycle"
            time.sleep(0.05)
        return "no cycle began in time: at a random moment"

    def do_kill(self, episode: Episode) -> None:
        where = self.aim()
        self.uploader.kill()
        pause = self.rng.uniform(0, 3)
        time.sleep(pause)
        self.uploader.start()
        episode.detail = f"SIGKILL {where}, restarted after {pause:.1f} s"

    def do_term(self, episode: Episode) -> None:
        where = self.aim()
        took = time.monotonic()
        code = self.uploader.terminate()
        took = time.monotonic() - took
        self.uploader.start()
        episode.detail = f"SIGTERM {where}: exit code {code} after {took:.1f} s, restarted"
        if code != 0:
            episode.ok = False
            self.failures.append(f"SIGTERM at {self.rel(episode.started)}: exit code {code} (expected 0); "
                                 f"log {self.uploader.incarnations[-2].log}")

    def do_freeze(self, episode: Episode) -> None:
        seconds = self.seconds()
        self.uploader.freeze()
        time.sleep(seconds)
        self.uploader.thaw()
        episode.detail = f"SIGSTOP for {seconds:.1f} s, then SIGCONT"

    def do_state_loss(self, episode: Episode) -> None:
        where = self.aim()
        self.uploader.kill("state_loss")
        self.state_file.unlink(missing_ok=True)
        self.uploader.start()
        episode.detail = f"SIGKILL {where}, state file deleted, restarted"

    def do_flush(self, episode: Episode) -> None:
        rows_before = self.writer.max_id
        self.writer.flush()
        deadline = time.monotonic() + 30
        while self.writer.max_id == rows_before and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        episode.detail = f"buffered flush of ~{self.writer.max_id - rows_before} rows in one go"

    def do_unavailable(self, episode: Episode) -> None:
        seconds = self.seconds()
        self.emulator.set_faults({"kind": "unavailable", "seconds": seconds, "scope": "all"})
        episode.detail = f"HTTP 503 to every request for {seconds:.1f} s"
        self.hold(seconds, episode)

    def do_refuse(self, episode: Episode) -> None:
        seconds = self.seconds()
        self.emulator.set_faults({"kind": "refuse", "seconds": seconds})
        episode.detail = f"connections refused for {seconds:.1f} s"
        self.hold(seconds, episode)
        self.emulator.wait_until_up(timeout=60)

    def do_delay(self, episode: Episode) -> None:
        seconds, delay = self.seconds(), round(self.rng.uniform(0.5, 4.0), 1)
        self.emulator.set_faults({"kind": "delay", "delay": delay, "seconds": seconds, "scope": "all"})
        episode.detail = f"every answer {delay} s late for {seconds:.1f} s"
        self.hold(seconds, episode)

    def do_drop_after_execute(self, episode: Episode) -> None:
        statement = self.rng.choice(["COPY INTO", "INSERT", "PUT", "REMOVE", None])
        fault: dict[str, Any] = {"kind": "drop_after_execute", "count": 1}
        if statement:
            fault["statement"] = statement
        before = self.faults.refresh().get("drop_after_execute", 0)
        self.emulator.set_faults(fault)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.faults.refresh().get("drop_after_execute", 0) > before:
                episode.detail = f"{statement or 'any statement'}: ran, answer dropped"
                return
            time.sleep(0.2)
        self.emulator.clear_faults()
        episode.detail = f"{statement or 'any statement'}: never met within 90 s (cleared)"

    def do_emulator_restart(self, episode: Episode) -> None:
        """Half of the restarts are clean (SIGTERM), half are crashes: SIGKILL of the whole process tree
        (uv, the emulator, its Spark JVM), e.g. in the middle of a COPY INTO."""
        self.faults.before_restart()
        if self.rng.random() < 0.5:
            self.emulator.stop()
            how = "stopped (SIGTERM)"
        else:
            self.crash_emulator()
            how = "crashed (SIGKILL of its process tree)"
            self.emulator_crashes += 1
        down = self.rng.uniform(0, 5)
        episode.detail = f"{how}, down {down:.1f} s + start-up"
        self.hold(down, episode)
        self.emulator.start()
        self.emulator_restarts += 1

    def crash_emulator(self) -> None:
        import psutil

        popen = self.emulator.proc
        if popen is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(popen.pid)
            tree = [*root.children(recursive=True), root]
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(tree, timeout=30)
        popen.wait(timeout=30)
        self.emulator.proc = None

    # -- the loop --------------------------------------------------------------------------
    def rel(self, moment: float) -> str:
        return f"t+{moment - self.writer.started:.0f}s"

    def run(self, end: float) -> None:
        """Faults one at a time until `end`; after each, wait for recovery."""
        # Warm-up: the first cycles (table creation, first batches) before any fault.
        warm = self.monitor.wait_recovered(self.writer.started, min(end, now() + self.args.recovery_timeout))
        self.warmed_up = warm
        if warm is None:
            self.failures.append(f"the uploader never caught up with the writer in the first "
                                 f"{self.args.recovery_timeout:.0f} s (lag {self.monitor.lag:.1f} s)")
            return
        while True:
            gap = self.rng.uniform(*self.args.gap)
            if now() + gap + self.args.quiet_end > end:
                return
            time.sleep(gap)
            kind = self.draw()
            episode = Episode(kind, now())
            try:
                getattr(self, f"do_{kind}")(episode)
            except Exception as exc:  # the driver itself failed: say so, go on
                episode.ok = False
                episode.detail += f" driver error: {type(exc).__name__}: {exc}"
                self.failures.append(f"{kind} at {self.rel(episode.started)}: {episode.detail}")
            episode.ended = now()
            self.episodes.append(episode)
            if self.faults is not None:
                self.faults.refresh()
            recovered = self.monitor.wait_recovered(episode.ended, episode.ended + self.args.recovery_timeout)
            episode.peak_lag = max((lag for t, lag, _ in self.monitor.samples if t >= episode.started), default=0.0)
            if recovered is None:
                episode.ok = False
                self.failures.append(
                    f"{kind} at {self.rel(episode.started)} ({episode.detail}): lag not back under "
                    f"{self.args.interval:g} s within {self.args.recovery_timeout:.0f} s of its end "
                    f"(lag now {self.monitor.lag:.1f} s)")
            else:
                episode.recovered = recovered - episode.ended
            if self.args.verbose:
                recovery = "never" if episode.recovered is None else f"{episode.recovered:.1f} s"
                print(f"  {self.rel(episode.started):>8} {kind:<18} {episode.detail}; recovered after {recovery}, "
                      f"peak lag {episode.peak_lag:.1f} s", flush=True)


# =====================================================================================
# Final comparison, row by row
# =====================================================================================


def expected_micros(value: Any) -> tuple[int | None, int]:
    """The instant the uploader should upload for a stored value, and the tolerance in microseconds.

    Written independently of the uploader, for the forms the writer uses (examples/make_sample_db.py
    format_timestamp): naive text is UTC; REAL below 1e7 is a Julian day, read to the millisecond.
    """
    if value is None or (isinstance(value, str) and value in UNREADABLE):
        return None, 0
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds, 0
    if isinstance(value, int):  # the DATETIME column's affinity turns numeric text into numbers too
        micros = value * 1_000_000 if abs(value) < 10**11 else value * 1000 if abs(value) < 10**14 else value
        return (micros, 0) if MIN_MICROS <= micros <= MAX_MICROS else (None, 0)
    if isinstance(value, float) and value < 1e7:
        return round((value - 2440587.5) * 86400_000) * 1000, 1000
    raise ValueError(f"unexpected stored timestamp {value!r}")


def same_float(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b or (math.isnan(a) and math.isnan(b))


def read_target_rows(target: str, location: Any) -> Any:
    """The whole target table as a pyarrow table (the uploader's view: Delta log / emulator files)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if target == "delta":
        from deltalake import DeltaTable
        from pyarrow.fs import LocalFileSystem

        table = DeltaTable(str(location))
        files = [uri.removeprefix("file://") for uri in table.file_uris()]
        schema = pa.schema(table.schema().to_arrow())
        # An explicit pyarrow filesystem: avoids the delta-rs abort at exit (README, Known library issue).
        return ds.dataset(files, schema=schema, format="parquet", filesystem=LocalFileSystem()).to_table()
    emulator, schema_name = location
    return emulator.read_table_parquet(schema_name, TABLE)


def compare(db: Path, target_rows: Any, limit: int = 10) -> dict[str, Any]:
    """Source vs target by id: lost, duplicated, not in the source, values that differ."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        source = {row[0]: row[1:] for row in connection.execute(
            f"SELECT id, device_id, timestamp, temperature, humidity, status FROM {TABLE}")}
    connection.close()
    result: dict[str, Any] = {"source_rows": len(source), "target_rows": target_rows.num_rows}
    if target_rows.num_rows == 0:
        result.update(lost=len(source), duplicated=0, unexpected=0, mismatched=0,
                      examples={"lost": sorted(source)[:limit]})
        return result
    by_lower = {name.lower(): name for name in target_rows.column_names}
    column = {c: target_rows.column(by_lower[c]) for c in VALUE_COLUMNS}
    stamps = column["timestamp"]
    if pa.types.is_timestamp(stamps.type):
        stamps = pc.cast(pc.cast(stamps, pa.timestamp("us", tz="UTC")), pa.int64())
    lists = [column["id"].to_pylist(), column["device_id"].to_pylist(), stamps.to_pylist(),
             column["temperature"].to_pylist(), column["humidity"].to_pylist(), column["status"].to_pylist()]
    seen: Counter = Counter()
    mismatches: list[str] = []
    unexpected: list[int] = []
    for row_id, device, micros, temperature, humidity, status in zip(*lists):
        seen[row_id] += 1
        if seen[row_id] > 1:
            continue
        expected = source.get(row_id)
        if expected is None:
            unexpected.append(row_id)
            continue
        want_device, stored, want_temperature, want_humidity, want_status = expected
        want_micros, tolerance = expected_micros(stored)
        differs = []
        if device != want_device:
            differs.append(f"device_id {device!r} != {want_device!r}")
        if (micros is None) != (want_micros is None) or (
                micros is not None and abs(micros - want_micros) > tolerance):
            differs.append(f"timestamp {micros} != {want_micros} (stored {stored!r})")
        if not same_float(temperature, want_temperature) or not same_float(humidity, want_humidity):
            differs.append(f"temperature/humidity {temperature}/{humidity} != {want_temperature}/{want_humidity}")
        if status != want_status:
            differs.append(f"status {status!r} != {want_status!r}")
        if differs:
            mismatches.append(f"id {row_id}: " + "; ".join(differs))
    lost = sorted(set(source) - set(seen))
    duplicated = {k: n for k, n in seen.items() if n > 1}
    result.update(
        lost=len(lost), duplicated=sum(n - 1 for n in duplicated.values()), duplicated_ids=len(duplicated),
        unexpected=len(unexpected), mismatched=len(mismatches), distinct_ids=len(seen),
        examples={"lost": lost[:limit], "duplicated": sorted(duplicated.items())[:limit],
                  "unexpected": unexpected[:limit], "mismatched": mismatches[:limit]})
    return result


# =====================================================================================
# Logs of the uploader
# =====================================================================================


LOG_PATTERNS = {
    "cycles": r" INFO Cycle done: ",
    "failed cycles": r" ERROR Cycle failed",
    "batches committed": r" INFO Batch \d+ committed",
    "batches replayed": r"recorded but not confirmed",
    "resumed from the target": r"No state file; resuming|the state file was not updated",
    "tracebacks": r"^Traceback ",
    "errors other than failed cycles": r" ERROR (?!Cycle failed)",
}
CYCLE_LINE = re.compile(r"Cycle done: (\d+) read.*?; ([\d.]+) s, ")


def scan_logs(incarnations: list[Incarnation]) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    counts: Counter = Counter()
    durations: list[float] = []
    odd: list[str] = []
    for incarnation in incarnations:
        with contextlib.suppress(OSError):
            text = Path(incarnation.log).read_text(errors="replace")
            for name, pattern in LOG_PATTERNS.items():
                counts[name] += len(re.findall(pattern, text, flags=re.MULTILINE))
            durations += [float(m.group(2)) for m in CYCLE_LINE.finditer(text) if int(m.group(1))]
            odd += [f"{Path(incarnation.log).name}: {line}" for line in text.splitlines()
                    if (" ERROR " in line and "Cycle failed" not in line) or line.startswith("Traceback")][:3]
    durations.sort()
    cycle = {}
    if durations:
        cycle = {"median_s": round(durations[len(durations) // 2], 2),
                 "p95_s": round(durations[int(len(durations) * 0.95)], 2), "max_s": round(durations[-1], 2)}
    return {name: counts[name] for name in LOG_PATTERNS}, cycle, odd


# =====================================================================================
# Main
# =====================================================================================


def parse_pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("databricks", "delta"), required=True)
    parser.add_argument("--minutes", type=float, required=True, help="how long the writer writes (and chaos runs)")
    parser.add_argument("--rate", type=float, default=1000, help="writer rows/s outside bursts (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--interval", type=float, default=None,
                        help="the uploader's interval in seconds (default 5 for delta, 10 for databricks)")
    parser.add_argument("--cursor", choices=("timestamp", "rowid"), default="timestamp",
                        help="the uploader's cursor mode (default timestamp, the uploader's default)")
    parser.add_argument("--batch-size", type=int, default=None, help="the uploader's batch_size (default: its own)")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated fault kinds (default: all of the target's; {', '.join(ALL_KINDS)})")
    parser.add_argument("--fault-seconds", type=parse_pair, default=(5.0, 20.0), metavar="MIN,MAX",
                        help="duration of timed faults: freeze, 503 storm, refusal, slow answers (default 5,20)")
    parser.add_argument("--gap", type=parse_pair, default=(2.0, 15.0), metavar="MIN,MAX",
                        help="quiet seconds between a recovery and the next fault (default 2,15)")
    parser.add_argument("--quiet-end", type=float, default=10.0,
                        help="no fault starts in the last S seconds of the run (default 10)")
    parser.add_argument("--recovery-timeout", type=float, default=180.0,
                        help="seconds after a fault's end within which the lag must be back under one interval")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds the uploader gets to upload the last rows after the writer stops")
    parser.add_argument("--no-bursts", action="store_true", help="the writer keeps a steady rate (no surges, flushes)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even when the run passes")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here, as JSON")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the uploader and the writer")
    parser.add_argument("--uploader", type=Path, default=UPLOADER, help="the uploader script to soak")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each fault as it happens")
    return parser


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (and SIGINT, which background jobs ignore) stop the run with the usual clean-up: the
    # writer, the uploader and the emulator are stopped, the work directory is kept.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    if args.interval is None:
        args.interval = 10.0 if args.target == "databricks" else 5.0
    if args.faults:
        args.faults = [k.strip() for k in args.faults.split(",") if k.strip()]
        unknown = [k for k in args.faults if k not in DECKS[args.target]]
        if unknown:
            raise SystemExit(f"fault kind(s) {unknown} do not apply to --target {args.target}; "
                             f"choose from {sorted(set(DECKS[args.target]))}")
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"soak-{args.target}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: target {args.target}, {args.minutes:g} min, {args.rate:g} rows/s, seed {args.seed}, "
          f"interval {args.interval:g} s, cursor {args.cursor}; work dir {workdir}", flush=True)

    db = workdir / "sensors.db"
    state_dir = workdir / "state"
    log_dir = workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(SCHEMA)
    connection.close()

    command = [args.python, str(args.uploader), "--sqlite", str(db), "--state-dir", str(state_dir),
               "--timestamp-col", "timestamp", "--cursor", args.cursor, "--interval", str(args.interval),
               "--invalid-timestamps", "upload"]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    emulator = faults = None
    if args.target == "databricks":
        from emulator_harness import Emulator

        emulator = Emulator(data_dir=workdir / "emulator")
        print("soak: starting the warehouse emulator", flush=True)
        try:
            emulator.start()
        except BaseException:
            emulator.stop()
            raise
        faults = EmulatorFaults(emulator)
        command += ["--target", "databricks", "--databricks-host", emulator.url, "--databricks-http-path",
                    emulator.http_path, "--databricks-database", SCHEMA_NAME, "--node-id", "soak-node"]
        env = clean_env(DATABRICKS_TOKEN=emulator.token or "unused")
        reader: Any = EmulatorIds(emulator, SCHEMA_NAME, TABLE)
        location: Any = (emulator, SCHEMA_NAME)
    else:
        lake = workdir / "lake" / TABLE
        command += ["--target", "delta", "--delta-path", str(lake)]
        env = clean_env()
        env = {k: v for k, v in env.items() if not k.startswith("DATABRICKS_")}
        reader = DeltaIds(lake)
        location = lake

    uploader = UploaderProcess(command, env, workdir, log_dir)
    summary: dict[str, Any] = {}
    failures: list[str] = []
    writer: Writer | None = None
    stopper: threading.Timer | None = None
    try:
        writer = Writer(args.python, db, args.rate, args.seed, args.cursor, log_dir / "writer.log",
                        bursts=not args.no_bursts)
        uploader.start()
        monitor = Monitor(reader, writer, uploader, args.interval, db)
        monitor.verbose = args.verbose
        monitor.start()
        chaos = Chaos(args, rng, uploader, writer, monitor, state_dir / "upload_state.json", emulator, faults)
        end = writer.started + args.minutes * 60
        stopper = threading.Timer(max(0.0, end - now()), writer.stop)
        stopper.daemon = True
        stopper.start()
        chaos.run(end)
        stopper.join()  # the writer stops at `end`, whatever the chaos driver is doing
        failures += chaos.failures
        if writer.popen.returncode != 0 or writer.stats is None:
            failures.append(f"the writer failed (exit code {writer.popen.returncode}); see {log_dir / 'writer.log'}")
        elif any(k.startswith("error") for k in writer.stats):
            errors = {k: v for k, v in writer.stats.items() if k.startswith("error")}
            failures.append(f"the writer met SQLite errors: {errors}")

        # Drain: every row the writer committed must reach the target.
        drain_started = now()
        while not monitor.caught_up() and now() - drain_started < args.drain_timeout:
            time.sleep(0.5)
        drained = monitor.caught_up()
        drain_seconds = now() - drain_started
        if not drained:
            failures.append(f"the uploader did not drain within {args.drain_timeout:.0f} s after the writer "
                            f"stopped (lag {monitor.lag:.0f} s)")
        time.sleep(min(2.0, args.interval))  # a duplicate committed right after the last row would show too
        monitor.sample()
        final_code = uploader.terminate()
        if uploader.current is not None:
            uploader.current.how = "final"
        monitor.stop()
        if final_code != 0:
            failures.append(f"the final SIGTERM: exit code {final_code} (expected 0); log {uploader.current.log}")
        for exit_ in monitor.unexpected_exits:
            failures.append(f"the uploader exited on its own with code {exit_['exit_code']} "
                            f"(incarnation {exit_['incarnation']}, log {exit_['log']}):\n{exit_['tail']}")

        result = compare(db, read_target_rows(args.target, location))
        if result["lost"]:
            failures.append(f"{result['lost']} row(s) lost, e.g. ids {result['examples']['lost']}")
        if result["duplicated"]:
            failures.append(f"{result['duplicated']} duplicate row(s), e.g. (id, copies) "
                            f"{result['examples']['duplicated']}")
        if result["unexpected"]:
            failures.append(f"{result['unexpected']} row(s) not in the source, e.g. {result['examples']['unexpected']}")
        if result["mismatched"]:
            failures.append(f"{result['mismatched']} row(s) with other values than the source, e.g. "
                            f"{result['examples']['mismatched'][:3]}")
        cross_check = None
        if emulator is not None:
            with contextlib.suppress(Exception), emulator.connect() as connection, connection.cursor() as cursor:
                cursor.execute(f"SELECT count(*), count(DISTINCT id) FROM {SCHEMA_NAME}.{TABLE}")
                rows, distinct = cursor.fetchall()[0]
                cross_check = {"rows": int(rows), "distinct_ids": int(distinct)}
            if cross_check and cross_check["rows"] != result["target_rows"]:
                failures.append(f"the warehouse counts {cross_check['rows']} rows, its files hold "
                                f"{result['target_rows']}")

        if faults is not None:
            faults.refresh()
        log_counts, cycle_seconds, odd_lines = scan_logs(uploader.incarnations)
        if log_counts["tracebacks"]:
            failures.append(f"{log_counts['tracebacks']} traceback(s) in the uploader's logs: {odd_lines}")
        kinds = Counter(e.kind for e in chaos.episodes)
        writer_stats = writer.stats or {}
        written_seconds = (writer.stopped or now()) - writer.started
        recoveries = [e.recovered for e in chaos.episodes if e.recovered is not None]
        steady = [lag for t, lag, _ in monitor.samples if chaos.warmed_up and t > chaos.warmed_up
                  and not any(e.started - 1 <= t <= e.ended + (e.recovered or 0) + 1 for e in chaos.episodes)]
        summary = {
            "target": args.target, "cursor": args.cursor, "seed": args.seed, "interval_s": args.interval,
            "minutes": round(written_seconds / 60, 2), "rate_rows_s": args.rate,
            "rows_written": writer.max_id,
            "rows_written_by_writer": writer_stats.get("rows"),
            "rows_in_target": result["target_rows"],
            "lost": result["lost"], "duplicated": result["duplicated"], "unexpected": result["unexpected"],
            "mismatched": result["mismatched"],
            "kills": kinds["kill"] + kinds["state_loss"] + chaos.kills_during_faults,
            "kills_during_warehouse_faults": chaos.kills_during_faults,
            "warm_up_s": round(chaos.warmed_up - writer.started, 1) if chaos.warmed_up else None,
            "faults": {kind: kinds[kind] for kind in sorted(kinds)},
            "faults_fired_by_emulator": faults.total() if faults else {},
            "emulator_restarts": chaos.emulator_restarts,
            "emulator_crashes": chaos.emulator_crashes,
            "uploader_restarts": len(uploader.incarnations) - 1,
            "unexpected_uploader_exits": len(monitor.unexpected_exits),
            "max_lag_s": round(monitor.max_lag, 1),
            "max_lag_at_s": round(monitor.max_lag_at - writer.started, 1) if monitor.max_lag else None,
            "max_lag_between_faults_s": round(max(steady, default=0.0), 1),
            "max_recovery_s": round(max(recoveries), 1) if recoveries else None,
            "faults_not_recovered": sum(1 for e in chaos.episodes if e.recovered is None),
            "peak_uploader_rss_mb": round(max((i.peak_rss for i in uploader.incarnations), default=0) / 2**20, 1),
            "drain_s": round(drain_seconds, 1),
            "final_exit_code": final_code,
            "max_wal_mb": round(monitor.max_wal / 2**20, 1),
            "writer": writer_stats,
            "uploader_log": {**log_counts, "cycle_seconds": cycle_seconds},
            "warehouse_cross_check": cross_check,
            "target_read_errors": dict(monitor.errors),
            "episodes": [{**asdict(e), "started": round(e.started - writer.started, 1),
                          "ended": round(e.ended - writer.started, 1),
                          "recovered": None if e.recovered is None else round(e.recovered, 1),
                          "peak_lag": round(e.peak_lag, 1)} for e in chaos.episodes],
            "examples": result.get("examples", {}),
            "failures": failures,
            "passed": not failures,
            "workdir": str(workdir),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"load average {os.getloadavg()[0]:.1f}",
        }
    except KeyboardInterrupt:
        print(f"soak: interrupted; work dir kept: {workdir}", flush=True)
        return 130
    finally:
        if stopper is not None:
            stopper.cancel()
        with contextlib.suppress(Exception):
            uploader.kill("final")
        with contextlib.suppress(Exception):
            if writer is not None and writer.popen.poll() is None:
                writer.stop()
        if emulator is not None:
            emulator.stop()
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary.get("passed") and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary.get("passed") else 1


def print_summary(s: dict[str, Any]) -> None:
    if not s:
        print("soak: no summary (the run failed before the end)")
        return
    fired = s["faults_fired_by_emulator"]
    faults = ", ".join(f"{k} {v}" for k, v in s["faults"].items()) or "none"
    cycles = s["uploader_log"].get("cycle_seconds") or {}
    lines = [
        f"soak summary: target {s['target']} ({s['cursor']} cursor, interval {s['interval_s']:g} s), "
        f"seed {s['seed']}",
        f"  minutes                 {s['minutes']:.1f}",
        f"  rows written            {s['rows_written']:,} ({s['rows_written'] / max(1.0, s['minutes'] * 60):,.0f}/s; "
        f"{s['writer'].get('transactions', 0):,} transactions, {s['writer'].get('surges', 0)} surges, "
        f"{s['writer'].get('flushes', 0)} flushes, {s['writer'].get('null timestamps', 0)} NULL and "
        f"{s['writer'].get('unreadable timestamps', 0)} unreadable timestamps)",
        f"  rows in the target      {s['rows_in_target']:,}",
        f"  lost                    {s['lost']}",
        f"  duplicated              {s['duplicated']}",
        f"  not in source / altered {s['unexpected']} / {s['mismatched']}",
        f"  kills                   {s['kills']} (SIGKILL; {s['faults'].get('state_loss', 0)} with the state file "
        f"deleted, {s['kills_during_warehouse_faults']} during a warehouse fault)",
        f"  faults                  {faults}",
    ]
    if fired:
        lines.append(f"  fired by the emulator   {', '.join(f'{k} {v}' for k, v in sorted(fired.items()))}")
    lines += [
        f"  restarts                uploader {s['uploader_restarts']}, emulator {s['emulator_restarts']} "
        f"({s['emulator_crashes']} after a crash); "
        f"uploader exits on its own: {s['unexpected_uploader_exits']}",
        f"  max lag                 {s['max_lag_s']:.1f} s (at t+{s['max_lag_at_s'] or 0:.0f} s); between faults "
        f"{s['max_lag_between_faults_s']:.1f} s; first catch-up at t+{s['warm_up_s']} s",
        f"  recovery after a fault  max {s['max_recovery_s'] if s['max_recovery_s'] is not None else '-'} s; "
        f"not recovered: {s['faults_not_recovered']}",
        f"  peak memory (uploader)  {s['peak_uploader_rss_mb']:.0f} MB RSS",
        f"  uploader                {s['uploader_log']['cycles']} cycles ({s['uploader_log']['failed cycles']} "
        f"failed), {s['uploader_log']['batches committed']} batches; after kills: "
        f"{s['uploader_log']['batches replayed']} batch(es) replayed, "
        f"{s['uploader_log']['resumed from the target']} resumed from the target's record",
        f"  cycle time              median {cycles.get('median_s', '-')} s, p95 {cycles.get('p95_s', '-')} s, "
        f"max {cycles.get('max_s', '-')} s (cycles that uploaded rows)",
        f"  drain                   {s['drain_s']:.1f} s; final exit code {s['final_exit_code']}; max WAL "
        f"{s['max_wal_mb']:.1f} MB",
        f"  machine                 {s['machine']}",
        f"  result                  {'PASS' if s['passed'] else 'FAIL'}",
    ]
    print("\n".join(lines))
    for failure in s["failures"]:
        print(f"  FAILURE: {failure}")
    if not s["passed"]:
        print(f"  work dir kept: {s['workdir']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_writer"]:
        sys.exit(writer_main(sys.argv[2:]))
    sys.exit(main())
