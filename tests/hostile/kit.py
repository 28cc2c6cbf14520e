"""Helpers of the hostile-input corpus: run the uploader as a user does, read both targets back,
and check the outcome a user expects (exact rows, or a clear refusal with nothing touched).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

TESTS = Path(__file__).resolve().parent.parent
for _path in (TESTS, TESTS / "databricks"):  # uploader_testkit, emulator_harness; dbx_e2e
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from dbx_e2e import CANARY_TOKEN, assert_same_rows, base_env, both_views, normalize, query  # noqa: E402
from dbx_e2e import run as dbx_run  # noqa: E402
from emulator_harness import Emulator, emulator_fixture  # noqa: E402
from uploader_testkit import ROOT, SCRIPT, clean_env, uploader_command  # noqa: E402

__all__ = [
    "CANARY_TOKEN", "ROOT", "SCRIPT", "UTC", "Emulator", "LoopRun", "Place", "assert_failed_cleanly",
    "assert_refused", "assert_same_rows", "base_env", "bind_read_only", "both_views", "clean_env", "dbx_upload",
    "delta_columns", "delta_exists", "delta_versions", "emulator_fixture", "error_lines", "make_db", "mount_tmpfs",
    "normalize", "query", "quote", "read_delta_rows", "schema_tables", "sqlite_dicts", "temp_debris", "unmount",
    "uploader_command", "warning_lines",
]

UTC = timezone.utc
RUN_TIMEOUT = 420  # generous: other suites load this 2-core machine at the same time


# ---------------------------------------------------------------------------------------------
# SQLite sources
# ---------------------------------------------------------------------------------------------

def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def make_db(path: Path, *statements: str, rows: Iterable[tuple] = (), insert_sql: str | None = None,
            wal: bool = False) -> Path:
    """A database made by the statements, then `rows` inserted with `insert_sql`; every handle closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    try:
        if wal:
            connection.execute("PRAGMA journal_mode=WAL")
        for statement in statements:
            connection.execute(statement)
        if insert_sql is not None:
            connection.executemany(insert_sql, list(rows))
        connection.commit()
    finally:
        connection.close()
    return path


def sqlite_dicts(db: Path, table: str, order: str = "rowid") -> list[dict[str, Any]]:
    connection = sqlite3.connect(db)
    try:
        connection.row_factory = sqlite3.Row
        connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
        return [dict(r) for r in connection.execute(f"SELECT * FROM {quote(table)} ORDER BY {order}")]
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------
# The Delta target, read back with pyarrow only
# ---------------------------------------------------------------------------------------------

def delta_exists(path: Path) -> bool:
    return any((path / "_delta_log").glob("*.json"))


def delta_versions(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "_delta_log").glob("*.json")) if path.exists() else []


def _delta_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds
    from deltalake import DeltaTable
    from pyarrow.fs import LocalFileSystem

    table = DeltaTable(str(path))
    # file_uris() are URIs: a table directory with a space or '#' in its name is percent-encoded.
    files = [unquote(uri.removeprefix("file://")) for uri in table.file_uris()]
    schema = pa.schema(table.schema().to_arrow())
    if not files:
        return schema.empty_table()
    # An explicit filesystem avoids the delta-rs/pyarrow abort at interpreter exit (README).
    return ds.dataset(files, schema=schema, format="parquet", filesystem=LocalFileSystem()).to_table()


def delta_columns(path: Path) -> list[str]:
    return _delta_table(path).column_names


def read_delta_rows(path: Path, order: str = "id") -> list[dict[str, Any]]:
    """Every row of the Delta table, timestamps as aware UTC datetimes, sorted by `order`."""
    rows = [normalize(r) for r in _delta_table(path).to_pylist()]
    return sorted(rows, key=lambda r: (r.get(order) is None, r.get(order)))


# ---------------------------------------------------------------------------------------------
# Runs and their outcome
# ---------------------------------------------------------------------------------------------

def error_lines(result: subprocess.CompletedProcess | str) -> list[str]:
    text = result if isinstance(result, str) else result.stderr
    return [line for line in text.splitlines() if " ERROR " in line]


def warning_lines(result: subprocess.CompletedProcess | str) -> list[str]:
    text = result if isinstance(result, str) else result.stderr
    return [line for line in text.splitlines() if " WARNING " in line]


def _check_words(message: str, words: Sequence[str]) -> None:
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, one ERROR line naming the problem (every word in it). Returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}, expected 2 (bad input)\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    errors = error_lines(result)
    assert errors, f"no ERROR line in:\n{result.stderr[-6000:]}"
    _check_words("\n".join(errors), words)
    return "\n".join(errors)


def assert_failed_cleanly(result: subprocess.CompletedProcess, *words: str, code: int = 1) -> str:
    """A run-time failure: the expected exit code, no traceback, an ERROR line with every word."""
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    errors = error_lines(result)
    assert errors, f"no ERROR line in:\n{result.stderr[-6000:]}"
    _check_words("\n".join(errors), words)
    return "\n".join(errors)


def temp_debris(directory: Path) -> list[str]:
    """Temporary files a write left behind (the state file's and the heartbeat's)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".probe-"))


class Place:
    """One source database, one state directory and one Delta table, under one directory."""

    def __init__(self, root: Path, db: Path, table: str = "readings"):
        self.root = root
        self.db = db
        self.table = table
        self.state_dir = root / "state"
        self.lake = root / "lake" / table

    @property
    def state_file(self) -> Path:
        return self.state_dir / "upload_state.json"

    def args(self, *extra: str, once: bool = True) -> list[str]:
        return ["--sqlite", str(self.db), "--state-dir", str(self.state_dir), "--target", "delta",
                "--delta-path", str(self.lake), *(["--once"] if once else []), *extra]

    def run(self, *extra: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(uploader_command(*self.args(*extra)), cwd=cwd or self.root,
                              env=env if env is not None else clean_env(), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> LoopRun:
        """The uploader in loop mode (no --once), as a service runs it."""
        return LoopRun(uploader_command(*self.args(*extra, once=False)), self.root / "loop.log", self.root,
                       env if env is not None else clean_env())

    def rows(self, order: str = "id") -> list[dict[str, Any]]:
        return read_delta_rows(self.lake, order) if delta_exists(self.lake) else []

    def ids(self, column: str = "id") -> list[Any]:
        return sorted(r[column] for r in self.rows())

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text(encoding="utf-8"))

    def snapshot(self) -> tuple:
        """What a refused run must leave alone: Delta commits, state file bytes, state dir listing."""
        state = self.state_file.read_bytes() if self.state_file.exists() else None
        own = ("heartbeat.json", "uploader.lock")  # the running process's, not the progress it records
        listing = sorted(p.name for p in self.state_dir.iterdir() if p.name not in own) \
            if self.state_dir.is_dir() else None
        return delta_versions(self.lake), state, listing


class LoopRun:
    """A loop-mode uploader process; its log goes to a file (a pipe could fill up and block it)."""

    def __init__(self, command: list[str], log: Path, cwd: Path, env: dict[str, str]):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                     text=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Poll until `condition()` holds; fail if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (OSError, ValueError, KeyError):
                pass  # a file being written: look again
            if not self.alive():
                raise AssertionError(f"the uploader exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.log[-6000:]}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log[-6000:]}")

    def stop(self, timeout: float = 180) -> int:
        """SIGTERM (finish the batch in flight, then exit 0), as docker stop does."""
        try:
            if self.alive():
                self.proc.terminate()
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"the uploader did not stop on SIGTERM:\n{self.log[-6000:]}") from None
        finally:
            self._log.close()


# ---------------------------------------------------------------------------------------------
# The Databricks target (the local emulator)
# ---------------------------------------------------------------------------------------------

def dbx_upload(emulator: Emulator, db: Path, state_dir: Path, schema: str, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One `--once` drain into `schema` on the emulator; the caller judges the exit code."""
    return dbx_run("--sqlite", str(db), "--state-dir", str(state_dir), "--once", "--databricks-database", schema,
                   *args, env=env if env is not None else base_env(emulator), expect=None)


def schema_tables(emulator: Emulator, schema: str) -> set[str]:
    try:
        return {row["tableName"].lower() for row in query(emulator, f"SHOW TABLES IN `{schema}`")}
    except Exception:  # the schema does not exist
        return set()


# ---------------------------------------------------------------------------------------------
# Mounts (the tests run as root in CI; each use skips with the reason when mounting is refused)
# ---------------------------------------------------------------------------------------------

def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def mount_tmpfs(path: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `path`: a disk that really fills up."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def bind_read_only(source: Path, target: Path) -> None:
    """`source` seen through a read-only bind mount at `target` (EROFS binds root too)."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    result = _mount("--bind", str(source), str(target))
    if result.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {result.stderr.strip()}")
    result = _mount("-o", "remount,ro,bind", str(target))
    if result.returncode != 0:
        unmount(target)
        pytest.skip(f"cannot remount read-only here: {result.stderr.strip()}")


def unmount(path: Path) -> None:
    for _ in range(20):
        result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if result.returncode == 0 or "not mounted" in result.stderr:
            return
        time.sleep(0.5)  # a child that has just exited may still hold it
    subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


def no_progress_recorded(state_dir: Path) -> bool:
    """A refused run records no progress: no state file, or a fresh one that counts no batch."""
    path = state_dir / "upload_state.json"
    return not path.exists() or json.loads(path.read_text())["batch_seq"] == 0


# The readings table of the file and state cases: a unique uid per row, compared exactly.
SCHEMA = "CREATE TABLE readings (id INTEGER PRIMARY KEY, uid TEXT, ts TEXT, v REAL)"
INSERT = "INSERT INTO readings (uid, ts, v) VALUES (?, ?, ?)"


def add(db: Path, new_rows: list[tuple]) -> None:
    """Insert rows the way the application does (its own connection, one transaction)."""
    connection = sqlite3.connect(db)
    try:
        connection.executemany(INSERT, new_rows)
        connection.commit()
    finally:
        connection.close()
