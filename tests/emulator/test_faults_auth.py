"""Fault injection (each kind), counters, and Bearer auth like Databricks (401/403)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from databricks.sql.exc import Error as DatabricksError
from databricks.sql.exc import RequestError
from emulator_harness import Emulator
from urllib3.exceptions import MaxRetryError


def test_wrong_token_is_403_request_error(emulator: Emulator) -> None:
    with pytest.raises(RequestError, match="Invalid access token"):
        emulator.connect(access_token="wrong")
    assert emulator.stats()["http"].get("403", 0) >= 1


def test_missing_token_is_401(emulator: Emulator) -> None:
    req = urllib.request.Request(emulator.connection_uri, data=b"\x80\x01\x00\x01", method="POST",
                                 headers={"Content-Type": "application/x-thrift"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 401


def test_503_then_success(emulator: Emulator, cur: Any) -> None:
    emulator.set_faults({"kind": "unavailable", "count": 1, "rpc": "ExecuteStatement"})
    cur.execute("SELECT 1 AS one")
    assert cur.fetchone().one == 1
    stats = emulator.stats()
    assert stats["http"]["503"] == 1 and stats["faults_fired"]["unavailable"] == 1


def test_503_for_seconds_exhausts_a_small_retry_budget(emulator: Emulator) -> None:
    emulator.set_faults({"kind": "unavailable", "seconds": 30})
    with pytest.raises((RequestError, MaxRetryError, DatabricksError)):
        emulator.connect(_retry_stop_after_attempts_count=2, _retry_stop_after_attempts_duration=8)
    emulator.clear_faults()


def test_429_with_retry_after(emulator: Emulator, cur: Any) -> None:
    emulator.set_faults({"kind": "throttle", "count": 1, "retry_after": 1})
    cur.execute("SELECT 2 AS two")
    assert cur.fetchone().two == 2
    assert emulator.stats()["http"]["429"] == 1


def test_drop_after_execute_runs_statement_twice(emulator: Emulator, cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.dup (id INT)")
    emulator.set_faults({"kind": "drop_after_execute", "count": 1, "statement": "INSERT"})
    cur.execute(f"INSERT INTO main.{schema}.dup VALUES (1)")
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.dup")
    # The first attempt committed, its answer was lost, the connector re-sent: two rows.
    assert cur.fetchone().n == 2
    stats = emulator.stats()
    assert stats["faults_fired"]["drop_after_execute"] == 1 and stats["http"]["dropped"] == 1


def test_drop_before_execute_runs_once(emulator: Emulator, cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.once (id INT)")
    emulator.set_faults({"kind": "drop", "count": 1, "statement": "INSERT"})
    cur.execute(f"INSERT INTO main.{schema}.once VALUES (1)")
    cur.execute(f"SELECT count(*) AS n FROM main.{schema}.once")
    assert cur.fetchone().n == 1


def test_delay(emulator: Emulator, cur: Any) -> None:
    emulator.set_faults({"kind": "delay", "count": 1, "delay": 0.5})
    cur.execute("SELECT 3 AS three")
    assert cur.fetchone().three == 3
    assert emulator.stats()["faults_fired"]["delay"] == 1


def test_refuse_connections_then_recover(emulator: Emulator) -> None:
    emulator.set_faults({"kind": "refuse", "seconds": 2})
    time.sleep(0.3)
    with pytest.raises(OSError):
        urllib.request.urlopen(emulator.url + "/admin/health", timeout=5)
    emulator.wait_until_up(timeout=30)
    with emulator.connect() as c, c.cursor() as cur:
        cur.execute("SELECT 4 AS four")
        assert cur.fetchone().four == 4


def test_refuse_during_a_connect_is_retried(emulator: Emulator) -> None:
    emulator.set_faults({"kind": "refuse", "seconds": 1.5})
    time.sleep(0.3)
    with emulator.connect() as c, c.cursor() as cur:
        cur.execute("SELECT 5 AS five")
        assert cur.fetchone().five == 5


def test_counters_by_statement_kind(emulator: Emulator, cur: Any, schema: str) -> None:
    emulator.reset()
    cur.execute(f"CREATE TABLE main.{schema}.k (id INT)")
    cur.execute(f"INSERT INTO main.{schema}.k VALUES (1)")
    cur.execute(f"INSERT INTO main.{schema}.k VALUES (2)")
    cur.execute(f"SELECT * FROM main.{schema}.k")
    cur.fetchall()
    stats = emulator.stats()
    assert stats["statements"] == {"CREATE": 1, "INSERT": 2, "SELECT": 1}
    assert stats["rpc"]["ExecuteStatement"] == 4
    assert stats["rows_inserted"] == 2


def test_concurrent_writers_lose_nothing(emulator: Emulator, cur: Any, schema: str) -> None:
    table = f"main.{schema}.conc"
    cur.execute(f"CREATE TABLE {table} (writer STRING, seq INT)")
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            with emulator.connect() as c, c.cursor() as wc:
                for i in range(8):
                    wc.execute(f"INSERT INTO {table} VALUES " + ", ".join(f"('{name}', {i * 10 + j})"
                                                                          for j in range(10)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(uuid.uuid4().hex[:6],)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cur.execute(f"SELECT count(*) AS n, count(DISTINCT writer, seq) AS d FROM {table}")
    row = cur.fetchone()
    assert (row.n, row.d) == (240, 240)
