"""The cursor, end to end: the CLI drains a SQLite table into the local Delta table.

Every test runs the uploader as a user does (a subprocess with --once) and judges only what
landed in the Delta table, the state file, the exit code and the logs.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import subprocess
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from make_sample_db import format_timestamp
from uploader_testkit import read_delta, run_uploader

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY0 = datetime(2026, 1, 15, 14, 0, 0, tzinfo=UTC)

READINGS = """
CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts DATETIME,
    value REAL
)
"""


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


class Pipeline:
    """One source database, one state directory, one Delta table, and the command between them."""

    def __init__(self, root: Path, schema: str = READINGS, table: str = "readings"):
        self.root = root
        self.db = root / "source" / "sensors.db"
        self.state_dir = root / "state"
        self.lake = root / "lake" / table
        self.table = table
        self.db.parent.mkdir(parents=True)
        with sqlite3.connect(self.db) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(schema)

    def insert(self, rows: list[tuple], columns: str = "device, ts, value") -> None:
        marks = ", ".join("?" for _ in columns.split(","))
        with sqlite3.connect(self.db) as connection:
            connection.executemany(f"INSERT INTO {self.table} ({columns}) VALUES ({marks})", rows)

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        result = run_uploader("--sqlite", str(self.db), "--state-dir", str(self.state_dir),
                              "--delta-path", str(self.lake), "--once", *extra, cwd=self.root, timeout=180)
        assert result.returncode == 0, result.stderr
        return result

    def target(self) -> list[dict]:
        if not (self.lake / "_delta_log").exists():
            return []
        table = read_delta(self.lake)
        rows = table.to_pylist()
        for row, ts in zip(rows, _as_micros(table, "ts")):
            row["ts"] = ts
        return rows

    def target_ids(self, key: str = "id") -> Counter:
        return Counter(row[key] for row in self.target())

    def source_ids(self, key: str = "id") -> Counter:
        with sqlite3.connect(self.db) as connection:
            return Counter(r[0] for r in connection.execute(f"SELECT {key} FROM {self.table}"))

    def version(self) -> int:
        from deltalake import DeltaTable

        return DeltaTable(str(self.lake)).version()

    def state(self) -> dict:
        return json.loads((self.state_dir / "upload_state.json").read_text())

    def assert_exactly_once(self, key: str = "id") -> None:
        target, source = self.target_ids(key), self.source_ids(key)
        duplicates = {k: n for k, n in target.items() if n > 1}
        assert not duplicates, f"uploaded more than once: {duplicates}"
        assert not source - target, f"never uploaded: {sorted(source - target)}"
        assert not target - source, f"not in the source: {sorted(target - source)}"


def _as_micros(table, column: str) -> list:
    import pyarrow as pa

    if column not in table.column_names:
        return [None] * table.num_rows
    values = table.column(column)
    if pa.types.is_timestamp(values.type):
        return values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    return values.to_pylist()


def invalid_count_logged(stderr: str, count: int) -> bool:
    """Some log line counts `count` rows with a NULL/unreadable/invalid timestamp."""
    for line in stderr.splitlines():
        lowered = line.lower()
        if ("timestamp" in lowered and any(w in lowered for w in ("null", "unreadable", "invalid"))
                and re.search(rf"(?<![\d.:-]){count}(?![\d.:-])", line)):
            return True
    return False


@pytest.fixture
def pipe(tmp_path: Path) -> Pipeline:
    return Pipeline(tmp_path)


def sweep(moment: datetime, count: int, first_style: int = 0) -> list[tuple]:
    """`count` devices reporting the same instant, each stored in the next storage style."""
    return [(f"dev-{i}", format_timestamp(moment, (first_style + i) % 6), float(i)) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Ties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 7])
def test_ties_at_batch_edges_arrive_once_with_their_instant(pipe: Pipeline, batch_size: int):
    moments = [DAY0 + timedelta(seconds=s) for s in (0, 0, 1, 3, 3, 3, 4, 9)]
    expected = {}
    next_id = 1
    for n, moment in enumerate(moments):
        rows = sweep(moment, 5, first_style=n)
        pipe.insert(rows)
        for _ in rows:
            expected[next_id] = micros(moment)
            next_id += 1
    pipe.run("--batch-size", str(batch_size))
    pipe.assert_exactly_once()
    assert {row["id"]: row["ts"] for row in pipe.target()} == expected
    assert pipe.state()["last_upload"] == "2026-01-15T14:00:09Z"


def test_ties_at_the_cycle_edge_arrive_on_the_next_run_once(pipe: Pipeline):
    last = DAY0 + timedelta(seconds=30)
    pipe.insert(sweep(DAY0, 4) + sweep(DAY0 + timedelta(seconds=10), 4) + sweep(last, 3))
    pipe.run("--batch-size", "4")
    assert sum(pipe.target_ids().values()) == 11
    # More rows with exactly the last uploaded timestamp, in every storage form.
    pipe.insert(sweep(last, 6, first_style=3))
    pipe.run("--batch-size", "4")
    pipe.assert_exactly_once()
    assert sum(pipe.target_ids().values()) == 17
    # Again, one at a time, each run seeing one new tie.
    for style in range(6):
        pipe.insert([("late", format_timestamp(last, style), 0.0)])
        pipe.run("--batch-size", "1")
    pipe.assert_exactly_once()
    assert sum(pipe.target_ids().values()) == 23
    assert all(row["ts"] in (micros(DAY0), micros(DAY0) + 10_000_000, micros(last)) for row in pipe.target())


def test_rerun_uploads_nothing(pipe: Pipeline):
    pipe.insert(sweep(DAY0, 6) + sweep(DAY0 + timedelta(seconds=1), 6))
    pipe.run("--batch-size", "5")
    version, rows = pipe.version(), pipe.target_ids()
    state = pipe.state()
    pipe.run("--batch-size", "5")
    pipe.run()
    assert pipe.version() == version
    assert pipe.target_ids() == rows
    assert pipe.state()["last_upload"] == state["last_upload"]


def test_sample_database_with_mixed_formats(sample_db: Path, tmp_path: Path):
    """The 3000-row sample (every storage style, sweeps of equal timestamps) arrives once, in order."""
    work = tmp_path / "work"
    work.mkdir()
    lake = work / "lake"
    args = ("--sqlite", str(sample_db), "--state-dir", str(work / "state"), "--delta-path", str(lake), "--once")
    result = run_uploader(*args, "--batch-size", "256", cwd=work)
    assert result.returncode == 0, result.stderr
    table = read_delta(lake)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(1, 3001))
    by_id = dict(zip(ids, _as_micros(table, "timestamp")))
    instants = [by_id[i] for i in range(1, 3001)]
    assert None not in instants
    # The sample's rows are in time order whatever their storage form.
    assert instants == sorted(instants)
    assert instants[0] >= micros(datetime(2026, 1, 15, 14, 0, tzinfo=UTC))
    assert instants[-1] - instants[0] < 3 * 3600 * 10**6
    again = run_uploader(*args, cwd=work)
    assert again.returncode == 0, again.stderr
    assert read_delta(lake).num_rows == 3000


def test_naive_text_in_a_configured_zone(pipe: Pipeline):
    pipe.insert([
        ("a", "2026-07-01 12:00:00", 1.0),  # Berlin summer time: 10:00Z
        ("b", "2026-07-01T12:00:00.250", 2.0),  # 10:00:00.25Z
        ("c", "2026-07-01T12:00:00+02:00", 3.0),  # has an offset: 10:00Z whatever the zone
        ("d", "2026-07-01T10:00:00Z", 4.0),
        ("e", int(datetime(2026, 7, 1, 10, tzinfo=UTC).timestamp()), 5.0),  # unix seconds are UTC
        ("f", "2026-01-10 12:00:00", 6.0),  # winter: 11:00Z
    ])
    pipe.run("--source-timezone", "Europe/Berlin")
    ten = micros(datetime(2026, 7, 1, 10, tzinfo=UTC))
    got = {row["device"]: row["ts"] for row in pipe.target()}
    assert got == {"a": ten, "b": ten + 250_000, "c": ten, "d": ten, "e": ten,
                   "f": micros(datetime(2026, 1, 10, 11, tzinfo=UTC))}


def test_julian_day_at_noon_in_a_datetime_column(pipe: Pipeline):
    """julianday() of exactly 12:00 UTC is a whole number, which a DATETIME column stores as INTEGER."""
    noon = datetime(2026, 1, 16, 12, 0, 0, tzinfo=UTC)
    pipe.insert([("a", format_timestamp(noon - timedelta(seconds=1), 0), 1.0)])
    pipe.run()
    pipe.insert([("b", format_timestamp(noon, 5), 2.0), ("c", format_timestamp(noon, 0), 3.0)])
    with sqlite3.connect(pipe.db) as connection:
        assert connection.execute("SELECT typeof(ts) FROM readings WHERE device = 'b'").fetchone() == ("integer",)
    pipe.run()
    pipe.assert_exactly_once()
    assert {row["device"]: row["ts"] for row in pipe.target()} == {
        "a": micros(noon) - 10**6, "b": micros(noon), "c": micros(noon)}


def test_sub_millisecond_timestamps_in_different_forms_are_not_lost(pipe: Pipeline):
    """Non-decreasing instants must all arrive in timestamp mode, whatever form each is stored in."""
    pipe.insert([("a", "2024-01-01 00:00:00.000600", 1.0)])
    pipe.run()
    pipe.insert([("b", 1704067200000900, 2.0)])  # INTEGER microseconds: 0.3 ms later than 'a'
    pipe.run()
    pipe.assert_exactly_once()
    assert {row["device"]: row["ts"] for row in pipe.target()} == {
        "a": 1704067200000600, "b": 1704067200000900}


# ---------------------------------------------------------------------------------------------
# NULL and unreadable timestamps
# ---------------------------------------------------------------------------------------------

BAD = [None, "garbage", "", "2026-13-45 99:99:99", "n/a"]


def test_null_and_garbage_timestamps_upload_with_null_and_are_counted(pipe: Pipeline):
    rows, expected = [], {}
    for n in range(12):
        moment = DAY0 + timedelta(seconds=n // 3)
        if n % 4 == 1:
            rows.append((f"bad-{n}", BAD[n % len(BAD)], float(n)))
            expected[n + 1] = None
        else:
            rows.append((f"ok-{n}", format_timestamp(moment, n % 6), float(n)))
            expected[n + 1] = micros(moment)
    pipe.insert(rows)
    first = pipe.run("--batch-size", "2")
    pipe.assert_exactly_once()
    assert {row["id"]: row["ts"] for row in pipe.target()} == expected
    assert invalid_count_logged(first.stderr, 3), first.stderr
    # Unreadable rows arriving later, before and after good ones, are not lost either.
    later = DAY0 + timedelta(minutes=5)
    pipe.insert([("bad-late", "garbage", 0.0), ("ok-late", format_timestamp(later, 2), 0.0), ("null-late", None, 0.0)])
    second = pipe.run("--batch-size", "2")
    pipe.assert_exactly_once()
    got = {row["device"]: row["ts"] for row in pipe.target()}
    assert got["bad-late"] is None and got["null-late"] is None and got["ok-late"] == micros(later)
    assert invalid_count_logged(second.stderr, 2), second.stderr
    pipe.run()
    assert sum(pipe.target_ids().values()) == 15


def test_skip_policy_drops_unreadable_rows_without_blocking_later_ones(pipe: Pipeline):
    pipe.insert([
        ("ok-1", format_timestamp(DAY0, 0), 1.0),
        ("bad-1", None, 2.0),
        ("bad-2", "garbage", 3.0),
        ("ok-2", format_timestamp(DAY0 + timedelta(seconds=1), 3), 4.0),
        ("bad-3", "", 5.0),
        ("ok-3", format_timestamp(DAY0 + timedelta(seconds=1), 5), 6.0),
    ])
    first = pipe.run("--invalid-timestamps", "skip", "--batch-size", "2")
    assert sorted(row["device"] for row in pipe.target()) == ["ok-1", "ok-2", "ok-3"]
    assert invalid_count_logged(first.stderr, 3), first.stderr
    pipe.insert([("bad-4", "n/a", 7.0), ("ok-4", format_timestamp(DAY0 + timedelta(seconds=2), 1), 8.0)])
    second = pipe.run("--invalid-timestamps", "skip", "--batch-size", "2")
    assert sorted(row["device"] for row in pipe.target()) == ["ok-1", "ok-2", "ok-3", "ok-4"]
    assert invalid_count_logged(second.stderr, 1), second.stderr
    pipe.run("--invalid-timestamps", "skip")
    assert sum(pipe.target_ids().values()) == 4


# Values the uploader cannot read as a time. Each must be uploaded (with a NULL timestamp) and must
# not stop a newer, readable row from arriving on a later run.
UNREADABLE = [
    pytest.param("garbage", id="text"),
    pytest.param(None, id="null"),
    pytest.param(b"\xff\xfe", id="blob"),
    pytest.param("2026-02-31 10:00:00", id="february-31st"),
    pytest.param(2**63 - 1, id="max-integer-sentinel"),
    pytest.param(21.5, id="small-real"),
]


@pytest.mark.parametrize("bad", UNREADABLE)
def test_an_unreadable_timestamp_is_uploaded_and_never_blocks_newer_rows(pipe: Pipeline, bad):
    pipe.insert([("ok-1", format_timestamp(DAY0, 0), 1.0)])
    pipe.run()
    pipe.insert([("bad", bad, 2.0), ("ok-2", format_timestamp(DAY0 + timedelta(days=1), 0), 3.0)])
    pipe.run()
    pipe.insert([("ok-3", format_timestamp(DAY0 + timedelta(days=2), 0), 4.0)])
    pipe.run()
    pipe.assert_exactly_once()
    got = {row["device"]: row["ts"] for row in pipe.target()}
    assert got.get("bad", "missing") is None, got
    assert got == {"ok-1": micros(DAY0), "bad": None, "ok-2": micros(DAY0 + timedelta(days=1)),
                   "ok-3": micros(DAY0 + timedelta(days=2))}


# ---------------------------------------------------------------------------------------------
# Late rows: both modes find new rows by insertion order, whatever their timestamps
# ---------------------------------------------------------------------------------------------


def _late_rows_scenario(pipe: Pipeline, *mode: str) -> None:
    pipe.insert(sweep(DAY0 + timedelta(hours=1), 4) + sweep(DAY0 + timedelta(hours=2), 4))
    pipe.run("--batch-size", "3", *mode)
    # A device that was offline delivers its backlog: older timestamps, newer rowids.
    pipe.insert([("offline", format_timestamp(DAY0 + timedelta(minutes=m), m % 6), float(m)) for m in range(5)])
    pipe.insert(sweep(DAY0 + timedelta(hours=3), 2))
    pipe.run("--batch-size", "3", *mode)


@pytest.mark.parametrize("mode", [(), ("--cursor", "rowid")], ids=["default", "rowid"])
def test_late_rows_with_older_timestamps_are_uploaded_once(pipe: Pipeline, mode: tuple[str, ...]):
    _late_rows_scenario(pipe, *mode)
    pipe.assert_exactly_once()
    assert sum(1 for row in pipe.target() if row["device"] == "offline") == 5
    result = pipe.run(*mode)
    assert sum(pipe.target_ids().values()) == 15
    assert "not uploaded" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Tables without a plain rowid cursor
# ---------------------------------------------------------------------------------------------

EVENTS = """
CREATE TABLE events (
    event_key TEXT PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    payload TEXT
) WITHOUT ROWID
"""


def _random_key_rows(rng, moments: list[datetime]) -> list[tuple]:
    # Random keys: key order has nothing to do with insertion or time order.
    return [(f"{rng.getrandbits(64):016x}", format_timestamp(m, rng.choice([0, 1, 2])), f"p{n}")
            for n, m in enumerate(moments)]


def test_without_rowid_table_keyed_by_text(tmp_path: Path):
    pipe = Pipeline(tmp_path, EVENTS, table="events")
    rng = random.Random(3)
    last = DAY0 + timedelta(seconds=20)
    moments = [DAY0 + timedelta(seconds=s) for s in (0, 0, 0, 5, 5, 10, 10, 10, 10)] + [last] * 4
    pipe.insert(_random_key_rows(rng, moments), columns="event_key, recorded_at, payload")
    pipe.run("--batch-size", "3")
    pipe.assert_exactly_once("event_key")
    assert sum(pipe.target_ids("event_key").values()) == 13
    # Newer rows with keys anywhere in key order, ties among them, and a tie with the last
    # uploaded timestamp whose key sorts after every key uploaded so far.
    newer = [last + timedelta(seconds=s) for s in (1, 1, 1, 2, 2)]
    pipe.insert([("zzzz-last", format_timestamp(last, 1), "tie"), *_random_key_rows(rng, newer)],
                columns="event_key, recorded_at, payload")
    pipe.run("--batch-size", "2")
    pipe.assert_exactly_once("event_key")
    assert sum(pipe.target_ids("event_key").values()) == 19
    version = pipe.version()
    pipe.run("--batch-size", "2")
    assert pipe.version() == version


def test_without_rowid_table_ties_at_the_cycle_edge_arrive_whatever_their_key(tmp_path: Path):
    """Rows inserted later with exactly the last uploaded timestamp must arrive (acceptance 1),
    also when the table's key (here random hex, like a UUID) sorts them before rows already sent."""
    pipe = Pipeline(tmp_path, EVENTS, table="events")
    rng = random.Random(5)
    last = DAY0 + timedelta(seconds=20)
    pipe.insert(_random_key_rows(rng, [DAY0, DAY0, last, last, last]), columns="event_key, recorded_at, payload")
    pipe.run("--batch-size", "2")
    pipe.insert([("0000-first", format_timestamp(last, 0), "tie"), *_random_key_rows(rng, [last, last])],
                columns="event_key, recorded_at, payload")
    pipe.run("--batch-size", "2")
    pipe.assert_exactly_once("event_key")


def test_integer_primary_key_with_gaps(tmp_path: Path):
    pipe = Pipeline(tmp_path)
    last = DAY0 + timedelta(seconds=7)
    ids = [3, 10, 11, 500, 501, 9000, 9001, 123456, 2**40, 2**40 + 5]
    moments = [DAY0, DAY0, DAY0 + timedelta(seconds=2), DAY0 + timedelta(seconds=2), last, last, last, last, last,
               last]
    pipe.insert([(i, f"d{i}", format_timestamp(m, n % 6), 1.0) for n, (i, m) in enumerate(zip(ids, moments))],
                columns="id, device, ts, value")
    pipe.run("--batch-size", "2")
    pipe.assert_exactly_once()
    assert {row["id"] for row in pipe.target()} == set(ids)
    pipe.insert([(2**41, "tie", format_timestamp(last, 4), 2.0), (2**41 + 1, "tie", format_timestamp(last, 5), 2.0)],
                columns="id, device, ts, value")
    pipe.run("--batch-size", "2")
    pipe.assert_exactly_once()
    assert sum(pipe.target_ids().values()) == 12


# ---------------------------------------------------------------------------------------------
# The state file is a cache; the Delta commit record is the truth
# ---------------------------------------------------------------------------------------------


def test_missing_state_file_resumes_from_the_delta_commit_record(pipe: Pipeline):
    pipe.insert(sweep(DAY0, 6) + sweep(DAY0 + timedelta(seconds=5), 6))
    pipe.run("--batch-size", "5")
    before = pipe.target_ids()
    (pipe.state_dir / "upload_state.json").unlink()
    pipe.run("--batch-size", "5")
    assert pipe.target_ids() == before
    # New rows, including ties with the last timestamp, arrive once after the state was lost again.
    pipe.insert(sweep(DAY0 + timedelta(seconds=5), 3) + sweep(DAY0 + timedelta(seconds=6), 3))
    shutil.rmtree(pipe.state_dir)
    pipe.run("--batch-size", "5")
    pipe.assert_exactly_once()
    assert sum(pipe.target_ids().values()) == 18
    assert pipe.state()["last_upload"] == "2026-01-15T14:00:06Z"
