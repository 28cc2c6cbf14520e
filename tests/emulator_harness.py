"""Start the local Databricks SQL warehouse emulator (tools/databricks_emulator.py) for tests.

Usage from any test folder:

    from emulator_harness import emulator_fixture
    emulator = emulator_fixture()            # a session-scoped pytest fixture

    def test_x(emulator):
        with emulator.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

or by hand:  emu = Emulator(); emu.start(); ...; emu.stop()
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output_audit import CANARY_SECRET, CANARY_TOKEN

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATOR_SCRIPT = REPO_ROOT / "tools" / "databricks_emulator.py"
# The run's canary secrets (tests/output_audit.py): whatever the tools print is checked for them.
DEFAULT_TOKEN = CANARY_TOKEN
# The first `uv run` may have to install pyspark; later start-ups take ~10 s.
DEFAULT_STARTUP_TIMEOUT_S = float(os.environ.get("EMULATOR_STARTUP_TIMEOUT", "240"))

# Small retry budget: the connector sleeps at least _retry_delay_max (bounded to >= 5 s) per retry
# of a 429/503, and its defaults (900 s budget) would stall a failing test for many minutes.
FAST_RETRY_KWARGS: dict[str, Any] = {
    "_retry_delay_min": 0.1,
    "_retry_delay_max": 5,
    "_retry_delay_default": 1,
    "_retry_stop_after_attempts_count": 5,
    "_retry_stop_after_attempts_duration": 60,
    "_socket_timeout": 300,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    """One emulator process: a port, a data dir, a token."""

    def __init__(self, data_dir: str | Path | None = None, token: str | None = DEFAULT_TOKEN,
                 port: int | None = None, warehouse_id: str = "emulator",
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="dbx-emulator-"))
        self.token = token
        # A service principal the emulator's /oidc/v1/token accepts (OAuth M2M tests).
        self.client_id, self.client_secret = "emulator-sp", CANARY_SECRET
        self.port = port or free_port()
        self.warehouse_id = warehouse_id
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.emulator.log"

    # ---- addresses ----
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_path(self) -> str:
        return f"/sql/1.0/warehouses/{self.warehouse_id}"

    @property
    def connection_uri(self) -> str:
        return self.url + self.http_path

    # ---- life cycle ----
    def start(self) -> Emulator:
        # `python -m uv` execs the uv binary in place (signals reach it) and works even where
        # pip put uv in a bin directory that is not on PATH.
        cmd = [sys.executable, "-m", "uv", "run", "-q", "-s", str(EMULATOR_SCRIPT), "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.token is not None:
            cmd += ["--token", self.token]
        cmd += ["--client", f"{self.client_id}:{self.client_secret}"]
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT)
        log.close()
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"emulator exited with {self.proc.returncode}; see {self.log_path}:\n"
                                       + self._log_tail()) from None
                continue
            if line.startswith("emulator ready on"):
                return self
        self.stop()
        raise RuntimeError(f"emulator not ready after {self.startup_timeout}s; see {self.log_path}")

    def _log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (uv forwards it to the emulator), then SIGKILL if it does not exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> Emulator:
        """Stop and start again on the same port and data dir (data must survive)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ---- the real connector ----
    def connect(self, **kwargs: Any) -> Any:
        """A real databricks.sql connection to this emulator (kwargs override the defaults)."""
        from databricks import sql

        opts: dict[str, Any] = {
            "server_hostname": "127.0.0.1",
            "http_path": self.http_path,
            "_connection_uri": self.connection_uri,
            "access_token": self.token or "unused",
            "enable_telemetry": False,
            **FAST_RETRY_KWARGS,
        }
        opts.update(kwargs)
        return sql.connect(**opts)

    # ---- admin API ----
    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def set_faults(self, *faults: dict[str, Any], clear: bool = False) -> Any:
        """Add faults, e.g. set_faults({"kind": "unavailable", "count": 2}). Kinds: unavailable (503),
        throttle (429 + Retry-After), drop (close before running), drop_after_execute, delay,
        refuse (connections refused for `seconds`), drop_after_write (Files API: the upload or
        delete is applied, the answer lost); scope "files" with "method"/"path" targets the
        Files API. See tools/README.md."""
        return self._admin("POST", "/admin/faults", {"faults": list(faults), "clear": clear})

    def clear_faults(self) -> Any:
        return self._admin("POST", "/admin/faults", {"faults": [], "clear": True})

    def set_config(self, **config: Any) -> Any:
        """e.g. set_config(result_format="column") or set_config(max_rows_per_fetch=1000)."""
        return self._admin("POST", "/admin/config", config)

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/admin/stats")

    def reset(self) -> Any:
        """Clear faults, config and counters (not data)."""
        return self._admin("POST", "/admin/reset", {})

    def wait_until_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._admin("GET", "/admin/health")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ---- independent view of the persisted data ----
    def table_location(self, schema: str, table: str) -> Path:
        catalog = json.loads((self.data_dir / "catalog.json").read_text())
        for t in catalog["tables"]:
            if t["schema"].lower() == schema.lower() and t["name"].lower() == table.lower():
                return Path(t["location"])
        raise KeyError(f"{schema}.{table} not in {self.data_dir / 'catalog.json'}")

    def read_table_parquet(self, schema: str, table: str) -> pa.Table:
        """Read a table's Parquet files with pyarrow only (no Spark, no emulator code)."""
        location = self.table_location(schema, table)
        files = [p for p in location.rglob("*.parquet")
                 if not any(part.startswith((".", "_")) for part in p.relative_to(location).parts)]
        if not files:
            return pa.table({})
        # Files written before an ALTER TABLE ADD COLUMNS lack the new columns: read with the
        # union of every file's schema, not the first file's.
        import pyarrow.parquet as pq

        names = [str(f) for f in files]
        inferred = pads.dataset(names, format="parquet", partitioning="hive", partition_base_dir=str(location))
        schema = pa.unify_schemas([inferred.schema, *(pq.read_schema(f) for f in files)])
        return pads.dataset(names, schema=schema, format="parquet", partitioning="hive",
                            partition_base_dir=str(location)).to_table()

    def copy_history(self, schema: str, table: str) -> dict[str, Any]:
        path = self.table_location(schema, table) / "_copy_into_log.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def volume_dir(self, catalog: str, schema: str, volume: str) -> Path:
        return self.data_dir / "volumes" / catalog / schema / volume


def emulator_fixture(scope: str = "session", **kwargs: Any) -> Any:
    """A pytest fixture (default session-scoped) yielding a started Emulator; other test folders
    assign it in their conftest.py:  `emulator = emulator_fixture()`."""
    import pytest

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def emulator() -> Any:
        emu = Emulator(**kwargs)
        emu.start()
        try:
            yield emu
        finally:
            emu.cleanup()

    return emulator
