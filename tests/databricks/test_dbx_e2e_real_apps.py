"""Issue 14 point 2 on Databricks: a WITHOUT ROWID table's rows whose timestamp is NULL or unreadable,
added later with a primary key below the last one uploaded, are uploaded too (they used to be skipped
without a word), and the text that could not be read is kept in `<column>__original`."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from dbx_e2e import query, upload


def test_without_rowid_rows_with_unreadable_timestamps_reach_databricks_once(emulator, schema: str, tmp_path: Path):
    db = tmp_path / "readings.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE readings (device TEXT NOT NULL, seq INTEGER NOT NULL, ts TEXT, value REAL, "
                       "PRIMARY KEY (device, seq)) WITHOUT ROWID")
    ledger: list[tuple] = []

    def write(rows: list[tuple]) -> None:
        connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", rows)
        connection.commit()
        ledger.extend((device, seq) for device, seq, _, _ in rows)

    write([("m", i, f"2024-01-15 14:30:{i:02d}", float(i)) for i in range(10)] + [("z", 1, None, 0.5)])
    upload(emulator, db, tmp_path / "state", schema)
    write([("a", 1, None, 1.5), ("m", 99, "2024-01-15 14:31:00", 2.5), ("b", 7, "n/a", 3.5), ("a", 0, None, 4.5)])
    upload(emulator, db, tmp_path / "state", schema)
    connection.close()

    rows = query(emulator, f"SELECT * FROM `{schema}`.`readings`")
    counts = Counter((r["device"], r["seq"]) for r in rows)
    twice = [k for k, n in counts.items() if n > 1]
    assert counts == Counter(ledger), f"missing {set(ledger) - set(counts)}, twice {twice}"
    assert {(r["device"], r["seq"]): r["ts__original"] for r in rows if r.get("ts__original")} == {("b", 7): "n/a"}
