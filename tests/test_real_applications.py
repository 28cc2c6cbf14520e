"""Databases as real edge applications write them (issue 14): Home Assistant's recorder, Telegraf's
SQL output, Django models. Each test runs the script as a subprocess into a real Delta table and
checks the ledger: every row ever written is in the target exactly once, with its values.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from uploader_testkit import read_delta, run_uploader

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def upload(db: Path, tmp: Path, *extra: str):
    return run_uploader("--sqlite", str(db), "--delta-path", str(tmp / "delta"), "--state-dir", str(tmp / "state"),
                        "--once", *extra)


def landed(tmp: Path) -> list[dict]:
    return read_delta(tmp / "delta").to_pylist()


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if " WARNING " in line or " ERROR " in line]


def exactly_once(rows: list[dict], key: str, ledger: list) -> None:
    counts = Counter(row[key] for row in rows)
    missing = [k for k in ledger if counts[k] == 0]
    twice = [k for k, n in counts.items() if n > 1]
    extra = set(counts) - set(ledger)
    assert not missing and not twice and not extra, (f"missing {missing[:10]} ({len(missing)}), "
                                                     f"twice {twice[:10]}, unknown {sorted(extra)[:10]}")


# --- Home Assistant's recorder, after schema upgrades: the legacy DATETIME columns stay, always NULL

HA_STATES = """CREATE TABLE states (
    state_id INTEGER NOT NULL, entity_id CHAR(0), state VARCHAR(255), attributes CHAR(0), event_id SMALLINT,
    last_changed DATETIME, last_changed_ts FLOAT, last_reported_ts FLOAT, last_updated DATETIME,
    last_updated_ts FLOAT, old_state_id INTEGER, attributes_id INTEGER, context_id CHAR(0),
    context_user_id CHAR(0), context_parent_id CHAR(0), origin_idx SMALLINT, context_id_bin BLOB,
    context_user_id_bin BLOB, context_parent_id_bin BLOB, metadata_id INTEGER, created DATETIME,
    PRIMARY KEY (state_id), FOREIGN KEY(old_state_id) REFERENCES states (state_id))"""
HA_EVENTS = """CREATE TABLE events (
    event_id INTEGER NOT NULL, event_type CHAR(0), event_data CHAR(0), origin CHAR(0), origin_idx SMALLINT,
    time_fired DATETIME, time_fired_ts FLOAT, context_id CHAR(0), context_user_id CHAR(0),
    context_parent_id CHAR(0), data_id INTEGER, context_id_bin BLOB, context_user_id_bin BLOB,
    context_parent_id_bin BLOB, event_type_id INTEGER, created DATETIME, PRIMARY KEY (event_id))"""
HA_START = 1_705_329_000.0  # 2024-01-15 14:30:00 UTC


def home_assistant_db(path: Path, states: int, events: int) -> Path:
    connection = sqlite3.connect(path)
    connection.execute(HA_STATES)
    connection.execute(HA_EVENTS)
    rows = []
    for i in range(1, states + 1):
        updated = HA_START + i * 7.25
        changed = None if i % 3 else updated  # HA stores NULL when equal to last_updated_ts
        reported = None if i % 5 else updated + 0.5
        rows.append((i, "on" if i % 2 else "off", changed, reported, updated, i - 1 or None, 1 + i % 4,
                     os.urandom(16), 1 + i % 9))
    connection.executemany(
        "INSERT INTO states (state_id, state, last_changed_ts, last_reported_ts, last_updated_ts, old_state_id, "
        "origin_idx, context_id_bin, metadata_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    connection.executemany(
        "INSERT INTO events (event_id, origin_idx, time_fired_ts, data_id, context_id_bin, event_type_id) "
        "VALUES (?, 0, ?, ?, ?, ?)",
        [(i, HA_START + i * 3.5, i % 7 or None, os.urandom(16), 1 + i % 5) for i in range(1, events + 1)])
    connection.commit()
    connection.close()
    return path


def test_home_assistant_recorder_time_columns_are_the_filled_ones(tmp_path):
    """Point 5: the legacy created / last_updated / time_fired columns are NULL in every row; the
    uploader used to pick `created` and load every state with a NULL time."""
    db = home_assistant_db(tmp_path / "home-assistant_v2.db", states=300, events=200)
    for table, column, step in (("states", "last_updated_ts", 7.25), ("events", "time_fired_ts", 3.5)):
        out = tmp_path / table
        result = upload(db, out, "--table", table)
        assert result.returncode == 0, result.stderr
        assert f"Timestamp column {column!r} picked" in result.stderr, result.stderr
        assert not [w for w in warnings(result) if "timestamp" in w.lower()], warnings(result)
        rows = landed(out)
        key = "state_id" if table == "states" else "event_id"
        exactly_once(rows, key, list(range(1, (300 if table == "states" else 200) + 1)))
        for row in rows:
            assert row[column] == datetime.fromtimestamp(HA_START + row[key] * step, UTC), row


def test_home_assistant_error_names_only_columns_with_values(tmp_path):
    """Point 5: when the choice stays open, the message suggests only columns that hold times."""
    db = tmp_path / "ha.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE statistics (id INTEGER PRIMARY KEY, created DATETIME, created_ts FLOAT, "
                       "start DATETIME, start_ts FLOAT, mean FLOAT)")
    connection.executemany("INSERT INTO statistics (created_ts, start_ts, mean) VALUES (?, ?, ?)",
                           [(HA_START + i * 3600 + 5, HA_START + i * 3600, 20.5) for i in range(10)])
    connection.commit()
    connection.close()
    result = upload(db, tmp_path)
    assert result.returncode == 2, result.stderr
    message = [line for line in result.stderr.splitlines() if "Several columns" in line]
    assert message and "created_ts" in message[0] and "start_ts" in message[0], result.stderr
    assert "created," not in message[0] and "start," not in message[0] and not message[0].endswith("start)"), message


# --- Telegraf's SQL output (outputs.sql, driver sqlite): Go's time.Time.String() as TEXT

TELEGRAF_CPU = ('CREATE TABLE "cpu"("timestamp" TIMESTAMP,"name" TEXT,"host" TEXT,"cpu" TEXT,'
                '"usage_idle" DOUBLE,"usage_user" DOUBLE)')


def test_telegraf_timestamps_are_read_and_unreadable_ones_kept(tmp_path):
    """Point 4: `2024-01-15 14:30:00 +0000 UTC`, with a zone name, nanoseconds, the monotonic reading."""
    db = tmp_path / "telegraf.db"
    connection = sqlite3.connect(db)
    connection.execute(TELEGRAF_CPU)
    forms = [
        ("2024-01-15 14:30:00 +0000 UTC", datetime(2024, 1, 15, 14, 30, tzinfo=UTC)),
        ("2024-01-15 15:30:10.123456789 +0100 CET", datetime(2024, 1, 15, 14, 30, 10, 123456, tzinfo=UTC)),
        ("2024-07-15 16:30:20.5 +0200 CEST", datetime(2024, 7, 15, 14, 30, 20, 500000, tzinfo=UTC)),
        ("2024-01-15 09:30:30 -0500 EST m=+3.000000001", datetime(2024, 1, 15, 14, 30, 30, tzinfo=UTC)),
        ("2024-01-15 14:30:40 +0000 +0000", datetime(2024, 1, 15, 14, 30, 40, tzinfo=UTC)),
        ("2024-01-31 23:59:59.999999999 +0000 UTC", datetime(2024, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("yesterday at noon", None),  # unreadable: loaded NULL, the text kept
    ]
    connection.executemany('INSERT INTO "cpu" VALUES (?, "cpu", "edge-1", "cpu-total", ?, 1.5)',
                           [(text, 90.0 + i) for i, (text, _) in enumerate(forms)])
    connection.commit()
    first = upload(db, tmp_path)
    assert first.returncode == 0, first.stderr
    connection.execute('INSERT INTO "cpu" VALUES ("2024-01-15 14:31:00 +0000 UTC", "cpu", "edge-1", "cpu0", 50, 2)')
    connection.commit()
    connection.close()
    second = upload(db, tmp_path)
    assert second.returncode == 0, second.stderr
    rows = landed(tmp_path)
    exactly_once(rows, "usage_idle", [90.0 + i for i in range(len(forms))] + [50.0])
    by_value = {r["usage_idle"]: r for r in rows}
    for i, (text, when) in enumerate(forms):
        assert by_value[90.0 + i]["timestamp"] == when, (text, by_value[90.0 + i])
        assert by_value[90.0 + i]["timestamp__original"] == (None if when else text)
    assert by_value[50.0]["timestamp"] == datetime(2024, 1, 15, 14, 31, tzinfo=UTC)
    assert any("1 row(s) had a NULL or unreadable timestamp" in w for w in warnings(first)), first.stderr
    assert any("timestamp__original" in w for w in warnings(first)), first.stderr


# --- Django: DecimalField is declared `decimal`; ids and counters beyond 2**53

DJANGO_READINGS = ('CREATE TABLE "meters_reading" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
                   '"created_at" datetime NOT NULL, "energy_wh" decimal NOT NULL, "price" decimal NULL)')
BIG = 2**53 + 1  # 9007199254740993: a double holds 9007199254740992


def test_big_integers_in_numeric_columns_stay_exact(tmp_path):
    """Point 6: a NUMERIC/DECIMAL column of integers beyond 2**53 loads as int64, exactly; one such
    integer in a column of fractions (a double) is loaded NULL with its text kept, never rounded."""
    db = tmp_path / "db.sqlite3"
    connection = sqlite3.connect(db)
    connection.execute(DJANGO_READINGS)
    energy = [BIG + 2 * i for i in range(50)] + [2**63 - 1, -(2**63)]
    prices = [0.25 * i for i in range(len(energy))]
    prices[7] = BIG
    connection.executemany('INSERT INTO "meters_reading" ("created_at", "energy_wh", "price") VALUES (?, ?, ?)',
                           [(f"2024-01-15 14:{i // 60:02d}:{i % 60:02d}", e, p)
                            for i, (e, p) in enumerate(zip(energy, prices))])
    connection.commit()
    connection.close()
    result = upload(db, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = sorted(landed(tmp_path), key=lambda r: r["id"])
    exactly_once(rows, "id", list(range(1, len(energy) + 1)))
    assert [r["energy_wh"] for r in rows] == energy
    assert all(type(r["energy_wh"]) is int for r in rows)
    assert rows[7]["price"] is None and rows[7]["price__original"] == str(BIG), rows[7]
    assert [r["price"] for r in rows if r["id"] != 8] == [p for i, p in enumerate(prices) if i != 7]
    assert any("1 value(s) of column 'price' did not fit its type" in w and "price__original" in w
               for w in warnings(result)), result.stderr


# --- cursor: rowid, the file replaced by a longer one (log rotation)

def sensor_db(path: Path, first: int, count: int) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, device TEXT, value REAL)")
    connection.executemany("INSERT INTO readings (device, value) VALUES (?, ?)",
                           [(f"gen-{first}", float(i)) for i in range(first, first + count)])
    connection.commit()
    connection.close()


def test_rowid_cursor_finds_a_replaced_longer_file(tmp_path):
    """Point 3: 5,000 rows uploaded, the file rotated, the new one already 8,000 rows long: all 8,000
    arrive (not only rowids 5,001-8,000)."""
    db = tmp_path / "node.db"
    sensor_db(db, 0, 5000)
    assert upload(db, tmp_path, "--cursor", "rowid").returncode == 0
    os.replace(db, tmp_path / "node.db.1")
    sensor_db(db, 100_000, 8000)
    result = upload(db, tmp_path, "--cursor", "rowid")
    assert result.returncode == 0, result.stderr
    rows = landed(tmp_path)
    exactly_once(rows, "value", [float(i) for i in range(5000)] + [float(i) for i in range(100_000, 108_000)])
    assert any("replaced" in w for w in warnings(result)), result.stderr


# --- NULL / unreadable timestamps in a WITHOUT ROWID table: no place in the keyset

def test_without_rowid_rows_with_unreadable_timestamps_are_never_lost(tmp_path):
    """Point 2: a row with a NULL or unreadable timestamp whose primary key sorts below the last
    one uploaded used to be skipped (and 'rows behind' said 0). Batches of 4 rows: windows span
    several batches, and the keys of such rows uploaded are remembered across them."""
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
    runs = [upload(db, tmp_path, "--batch-size", "4")]
    write([("a", 1, None, 1.5), ("m", 99, "2024-01-15 14:31:00", 2.5), ("b", 7, "n/a", 3.5)])
    runs.append(upload(db, tmp_path, "--batch-size", "4"))
    write([("a", 0, None, 4.5), ("c", 3, "", 5.5)])
    runs.append(upload(db, tmp_path, "--batch-size", "4"))
    runs.append(upload(db, tmp_path, "--batch-size", "4"))  # nothing new: nothing uploaded twice
    connection.close()
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    rows = landed(tmp_path)
    exactly_once([{"k": (r["device"], r["seq"])} for r in rows], "k", ledger)
    assert {(r["device"], r["seq"]): r["ts__original"] for r in rows if r["ts__original"]} == {("b", 7): "n/a"}
    assert not [w for w in warnings(runs[-1]) if "NOT uploaded" in w], runs[-1].stderr


# --- Smaller: views, a name DataFusion folds, TIME columns, nanosecond epochs

def test_a_view_is_refused_as_a_view_naming_its_tables(tmp_path):
    """Point 7: a view used to be reported as a table that 'does not exist'."""
    db = home_assistant_db(tmp_path / "home-assistant_v2.db", states=5, events=5)
    connection = sqlite3.connect(db)
    connection.execute("CREATE VIEW recent_states AS SELECT state_id, state, last_updated_ts FROM states "
                       "WHERE last_updated_ts > 0")
    connection.close()
    result = upload(db, tmp_path, "--table", "recent_states")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "is a view" in errors[0] and "states" in errors[0], result.stderr
    assert "does not exist" not in errors[0]
    assert not (tmp_path / "delta").exists()


PRISMA_READING = ('CREATE TABLE "Reading" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, '
                  '"createdAt" DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, "value" REAL NOT NULL)')


def test_info_names_forms_of_the_table_that_queries_reach(tmp_path):
    """Point 7: Prisma names tables after models ("Reading"); INFO offered `Reading`, which the
    query engine folds to `reading` and does not find."""
    db = tmp_path / "dev.db"
    connection = sqlite3.connect(db)
    connection.execute(PRISMA_READING)
    connection.executemany('INSERT INTO "Reading" ("createdAt", "value") VALUES (?, ?)',  # Prisma: ms epochs
                           [(1_705_329_000_000 + i * 1000, i / 4) for i in range(20)])
    connection.commit()
    connection.close()
    assert upload(db, tmp_path).returncode == 0
    common = ("--sqlite", str(db), "--delta-path", str(tmp_path / "delta"), "--state-dir", str(tmp_path / "state"))
    info = run_uploader(*common, "--run-query", "INFO", "--output", "json")
    assert info.returncode == 0, info.stderr
    items = {row["item"]: row["value"] for row in json.loads(info.stdout)}
    first, _, rest = items["name"].partition(" (or ")
    for form in (first, rest.removesuffix(")")):
        query = run_uploader(*common, "--run-query", f"SELECT count(*) AS n FROM {form}", "--output", "json")
        assert query.returncode == 0 and json.loads(query.stdout) == [{"n": 20}], (form, query.stderr)


def test_time_of_day_columns_stay_text_and_nanosecond_epochs_are_instants(tmp_path):
    """Point 7: a Django TimeField ('14:30:00') became NULL, as did a Go/OpenTelemetry time.UnixNano()."""
    db = tmp_path / "traces.db"
    connection = sqlite3.connect(db)
    connection.execute('CREATE TABLE "spans" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
                       '"start_time_unix_nano" bigint NOT NULL, "local_time" time NULL, "name" varchar(64) NOT NULL)')
    start = 1_705_329_000_123_456_789
    rows = [(start + i * 1_000_000_007, f"{8 + i % 12:02d}:{i % 60:02d}:30" + (".250000" if i % 2 else ""),
             f"span-{i}") for i in range(30)]
    connection.executemany('INSERT INTO "spans" ("start_time_unix_nano", "local_time", "name") VALUES (?, ?, ?)',
                           rows)
    connection.commit()
    connection.close()
    result = upload(db, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Timestamp column 'start_time_unix_nano' picked" in result.stderr, result.stderr
    assert not warnings(result), warnings(result)
    landed_rows = {r["name"]: r for r in landed(tmp_path)}
    exactly_once(list(landed_rows.values()), "name", [name for _, _, name in rows])
    for nanos, local_time, name in rows:
        row = landed_rows[name]
        assert row["local_time"] == local_time
        assert row["start_time_unix_nano"] == EPOCH + timedelta(microseconds=nanos // 1000), row
