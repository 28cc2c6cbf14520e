"""An edge database's everyday life, for tests: a sensor application that appends rows while its
clock may step back (a board without a real-time clock, corrected by NTP later), deletes its oldest
rows (retention) and VACUUMs the file.

The table has no INTEGER PRIMARY KEY, as many applications' tables do not: VACUUM renumbers its
rowids. Every row carries a unique `uid`, and the device keeps a ledger of every row it ever wrote
(including the ones retention deleted later): the target must hold each of them exactly once.

A plain module (not conftest.py) so that test folders with their own conftest can import it.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from make_sample_db import format_timestamp

TABLE = "readings"
SCHEMA = f"CREATE TABLE {TABLE} (uid TEXT NOT NULL, timestamp TEXT, sensor TEXT, value REAL)"
CLOCK_START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


class Device:
    """The application side: writes rows, keeps the ledger, ages its data."""

    def __init__(self, path: Path, rng: random.Random | None = None, journal: str = "WAL"):
        self.path = path
        self.rng = rng or random.Random(7)
        self.clock = CLOCK_START
        self.newest = CLOCK_START  # the latest timestamp written so far
        self.ledger: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute(f"PRAGMA journal_mode={journal}")
            connection.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def append(self, count: int, ties: bool = False) -> list[str]:
        """`count` new rows; with ties, several rows share each timestamp (sensor sweeps)."""
        rows = []
        for index in range(count):
            if not ties or index % 3 == 0:
                self.clock += timedelta(seconds=self.rng.choice([1, 2, 5]))
                self.newest = max(self.newest, self.clock)
            uid = uuid.uuid4().hex
            style = self.rng.randrange(6)  # every way applications store datetimes
            rows.append((uid, format_timestamp(self.clock, style), f"s{self.rng.randrange(4)}",
                         round(self.rng.gauss(20, 5), 3)))
        with self._connect() as connection:
            connection.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", rows)
        connection.close()
        self.ledger += [row[0] for row in rows]
        return [row[0] for row in rows]

    def insert_low(self, count: int) -> int:
        """Rows with explicit rowids in free places below the highest rowid (an application that
        writes its own ids), dated after every row written so far. Returns how many fitted."""
        with self._connect() as connection:
            used = {row[0] for row in connection.execute(f"SELECT rowid FROM {TABLE}")}
            low = min(used, default=1)
            free = [rowid for rowid in range(low, max(used, default=0)) if rowid not in used][:count]
            free += list(range(low - 1, low - 1 - (count - len(free)), -1))  # or below the lowest rowid
            rows = []
            for rowid in free:
                self.newest += timedelta(seconds=1)
                rows.append((rowid, uuid.uuid4().hex, format_timestamp(self.newest, 0), "low", 0.0))
            connection.executemany(f"INSERT INTO {TABLE} (rowid, uid, timestamp, sensor, value) "
                                   "VALUES (?, ?, ?, ?, ?)", rows)
        connection.close()
        self.ledger += [row[1] for row in rows]
        return len(rows)

    def step_back(self, seconds: float) -> None:
        """A reboot without a real-time clock: the next rows carry older timestamps."""
        self.clock -= timedelta(seconds=seconds)

    def retention(self, count: int, uploaded: Iterable[str] | None = None) -> int:
        """Delete the oldest `count` rows (by insertion), only among rows already uploaded when
        `uploaded` is given (a row deleted before any upload could not be in any target)."""
        with self._connect() as connection:
            rows = connection.execute(f"SELECT rowid, uid FROM {TABLE} ORDER BY rowid").fetchall()
            allowed = set(uploaded) if uploaded is not None else None
            doomed = [(rowid,) for rowid, uid in rows if allowed is None or uid in allowed][:count]
            connection.executemany(f"DELETE FROM {TABLE} WHERE rowid = ?", doomed)
        connection.close()
        return len(doomed)

    def vacuum(self) -> None:
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            connection.execute("VACUUM")
        finally:
            connection.close()

    def rowids_renumbered_by_vacuum(self) -> bool:
        """True when the table's rowids are 1..n (what VACUUM leaves after deletes)."""
        with self._connect() as connection:
            low, high, count = connection.execute(f"SELECT min(rowid), max(rowid), count(*) FROM {TABLE}").fetchone()
        connection.close()
        return count == 0 or (low == 1 and high == count)


def ledger_report(found: Counter, ledger: Iterable[str]) -> list[str]:
    """What is wrong between the target's uids and the ledger (empty when exactly once)."""
    expected = Counter(ledger)
    problems = []
    duplicates = {uid: n for uid, n in found.items() if n > 1}
    if duplicates:
        problems.append(f"{len(duplicates)} uid(s) uploaded more than once, e.g. {sorted(duplicates)[:3]}")
    missing = expected - found
    if missing:
        problems.append(f"{sum(missing.values())} row(s) never uploaded, e.g. {sorted(missing)[:3]}")
    extra = set(found) - set(expected)
    if extra:
        problems.append(f"{len(extra)} uid(s) not in the ledger, e.g. {sorted(extra)[:3]}")
    return problems
