# /// script
# requires-python = ">=3.10"
# dependencies = []
# ///
"""Make a realistic sample sensor database for trying the uploader.

    uv run -s examples/make_sample_db.py sample/sensor_data.db [--rows 5000] [--mixed-formats]

The table looks like what edge sensor applications write: several devices, readings
every few seconds, many rows sharing one timestamp (a device batch-inserts a sweep),
and -- with --mixed-formats, the default -- every way SQLite applications store
datetimes: 'YYYY-MM-DD HH:MM:SS', ISO 8601 with 'T', fractions and offsets, INTEGER
unix seconds and milliseconds, and REAL Julian days. A few readings have a NULL
temperature or an 'error' status, so the transforms have something to do.

Only the standard library is used, so the same code serves tests and benchmarks.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

DEVICES = ["sensor-a", "sensor-b", "sensor-c", "sensor-d"]
STATUSES = ["ok", "ok", "ok", "ok", "warn", "error", ""]
START = datetime(2026, 1, 15, 14, 0, 0, tzinfo=timezone.utc)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sensor_logs (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    timestamp DATETIME,
    temperature REAL,
    humidity REAL,
    status TEXT
)
"""


def format_timestamp(moment: datetime, style: int) -> object:
    """Store one instant the way one of many SQLite applications would."""
    if style == 0:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    if style == 1:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if style == 2:
        return moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    if style == 3:
        return int(moment.timestamp())
    if style == 4:
        return int(moment.timestamp() * 1000)
    return moment.timestamp() / 86400.0 + 2440587.5  # Julian day, as julianday() returns


def sample_rows(
    count: int, seed: int = 7, mixed_formats: bool = True, start: datetime = START
) -> Iterator[tuple]:
    """Yield (device_id, timestamp, temperature, humidity, status) rows in time order."""
    rng = random.Random(seed)
    moment = start
    produced = 0
    while produced < count:
        moment += timedelta(seconds=rng.choice([1, 1, 2, 5]))
        # A sweep: several devices report the very same timestamp (ties at batch edges).
        for device in rng.sample(DEVICES, k=rng.randint(1, len(DEVICES))):
            if produced >= count:
                break
            style = rng.randrange(6) if mixed_formats else 0
            temperature = None if rng.random() < 0.01 else round(rng.gauss(21.5, 4.0), 2)
            yield (
                device,
                format_timestamp(moment, style),
                temperature,
                round(rng.uniform(20, 80), 1),
                rng.choice(STATUSES),
            )
            produced += 1


def make_sample_db(
    path: Path, rows: int, seed: int = 7, mixed_formats: bool = True, wal: bool = True
) -> int:
    """Create (or extend) the sample database and return the number of rows added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        with db:  # one transaction
            if wal:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            db.executemany(
                "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status)"
                " VALUES (?, ?, ?, ?, ?)",
                sample_rows(rows, seed=seed, mixed_formats=mixed_formats),
            )
    finally:
        db.close()  # closing checkpoints the WAL now, not whenever the object is collected
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="database file to create or extend")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--single-format", action="store_true", help="only 'YYYY-MM-DD HH:MM:SS' text")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the file exists")
    args = parser.parse_args(argv)
    if args.if_missing and args.path.exists():
        print(f"{args.path} exists; left as it is")
        return 0
    added = make_sample_db(args.path, args.rows, seed=args.seed, mixed_formats=not args.single_format)
    print(f"{args.path}: added {added} rows to table sensor_logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
