"""`--run-query "SQL"` (table, json, csv) and `--run-query INFO` against Databricks, on a table two
nodes loaded with lineage columns."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from dbx_e2e import (
    add_sensor_rows,
    base_env,
    expected_sensor_rows,
    iso_z,
    make_sensor_db,
    run,
    sqlite_rows,
    upload,
    uploaded_in,
)
from emulator_harness import Emulator
from make_sample_db import START, make_sample_db

SCHEMA = "e2e_query"
TABLE = "fleet"
NODES = {"edge-7": (120, 7), "edge-9": (80, 9)}  # node -> (rows, seed)


@pytest.fixture(scope="module")
def fleet(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two nodes, each with its own database, load one table with every lineage column."""
    work = tmp_path_factory.mktemp("fleet")
    nodes = {}
    for node, (rows, seed) in NODES.items():
        db = work / node / "sensor.db"
        make_sample_db(db, rows, seed=seed)
        args = ("--databricks-table", TABLE, "--node-id", node, "--lineage-columns", "all")
        result = upload(emulator, db, work / node / "state", SCHEMA, *args)
        assert uploaded_in(result.stderr) == rows
        nodes[node] = {"db": db, "state": work / node / "state", "args": args}
    return nodes


def _query(emulator: Emulator, node: dict, *args: str) -> str:
    result = run("--sqlite", str(node["db"]), "--state-dir", str(node["state"]), "--databricks-database", SCHEMA,
                 *node["args"], *args, env=base_env(emulator))
    assert "Traceback" not in result.stderr
    return result.stdout


def _expected_per_device(fleet: dict) -> dict[str, tuple[int, datetime]]:
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, datetime] = {}
    for node in fleet.values():
        for row in expected_sensor_rows(node["db"]):
            counts[row["device_id"]] += 1
            if row["timestamp"] is not None:
                last[row["device_id"]] = max(last.get(row["device_id"], row["timestamp"]), row["timestamp"])
    return {device: (counts[device], last[device]) for device in counts}


SQL = (f"SELECT device_id, count(*) AS n, max(`timestamp`) AS last FROM {SCHEMA}.{TABLE} "
       "GROUP BY device_id ORDER BY device_id")


def _as_instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def test_sql_as_json(emulator: Emulator, fleet: dict) -> None:
    rows = json.loads(_query(emulator, fleet["edge-7"], "--run-query", SQL, "--output", "json"))
    got = {row["device_id"]: (row["n"], _as_instant(row["last"])) for row in rows}
    assert got == _expected_per_device(fleet)
    assert [row["device_id"] for row in rows] == sorted(got)


def test_sql_as_csv(emulator: Emulator, fleet: dict) -> None:
    rows = list(csv.reader(io.StringIO(_query(emulator, fleet["edge-7"], "--run-query", SQL, "--output", "csv"))))
    assert rows[0] == ["device_id", "n", "last"]
    got = {device: (int(n), _as_instant(last)) for device, n, last in rows[1:]}
    assert got == _expected_per_device(fleet)


def test_sql_as_table(emulator: Emulator, fleet: dict) -> None:
    lines = _query(emulator, fleet["edge-7"], "--run-query", SQL).splitlines()
    assert re.split(r"\s*\|\s*", lines[0].strip()) == ["device_id", "n", "last"]
    expected = _expected_per_device(fleet)
    body = [re.split(r"\s*\|\s*", line.strip()) for line in lines[2:2 + len(expected)]]
    assert {cells[0]: (int(cells[1]), _as_instant(cells[2])) for cells in body} == expected
    assert lines[2 + len(expected)] == f"({len(expected)} rows)"


def _info(emulator: Emulator, node: dict, *args: str) -> dict[str, str]:
    items = json.loads(_query(emulator, node, "--run-query", "INFO", "--output", "json", *args))
    return {item["item"]: item["value"] for item in items}


def test_info(emulator: Emulator, fleet: dict) -> None:
    info = _info(emulator, fleet["edge-7"])
    # The table's full name.
    assert re.search(rf"\b{SCHEMA}\W+{TABLE}\b", info["table"]), info
    # Columns and types, lineage columns included.
    columns = {k.removeprefix("column ").strip(): v.upper() for k, v in info.items() if k.startswith("column ")}
    assert columns == {"id": "BIGINT", "device_id": "STRING", "timestamp": "TIMESTAMP", "temperature": "DOUBLE",
                       "humidity": "DOUBLE", "status": "STRING", "_node_id": "STRING", "_batch_id": "STRING",
                       "_uploaded_at": "TIMESTAMP"}
    # Row count.
    assert info["rows"] == str(sum(len(sqlite_rows(node["db"])) for node in fleet.values()))
    # The last uploaded cursor of this node's uploader.
    last = max(row["timestamp"] for row in expected_sensor_rows(fleet["edge-7"]["db"]) if row["timestamp"])
    assert info["last uploaded timestamp"] == iso_z(last), info
    # Rows and last upload per node.
    for node in NODES:
        rows = len(sqlite_rows(fleet[node]["db"]))
        assert re.fullmatch(rf"{rows} rows, last upload \d{{4}}-\d\d-\d\d.*", info[f"node {node}"]), info


def test_info_as_table(emulator: Emulator, fleet: dict) -> None:
    text = _query(emulator, fleet["edge-9"], "--run-query", "INFO")
    rows = len(sqlite_rows(fleet["edge-9"]["db"]))
    for fragment in (f"{SCHEMA}`.`{TABLE}", "last uploaded timestamp", "node edge-7", "node edge-9"):
        assert fragment in text, text
    assert re.search(rf"node edge-9\s*\|\s*{rows} rows, last upload", text), text
    last = max(row["timestamp"] for row in expected_sensor_rows(fleet["edge-9"]["db"]) if row["timestamp"])
    assert re.search(rf"last uploaded timestamp\s*\|\s*{re.escape(iso_z(last))}", text), text


def test_info_before_anything_was_loaded(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 10)
    out = run("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--databricks-database", schema,
              "--run-query", "INFO", "--output", "json", env=base_env(emulator)).stdout
    info = {item["item"]: item["value"] for item in json.loads(out)}
    assert re.search(rf"\b{schema}\W+sensor_logs\b", info["table"]), info
    assert "does not exist" in info.get("status", ""), info


def test_last_upload_per_node_moves_with_new_uploads(emulator: Emulator, fleet: dict) -> None:
    """A node that uploads again shows its new last upload; the other node's line is unchanged."""
    before = _info(emulator, fleet["edge-9"])
    node = fleet["edge-9"]
    with_more = START + timedelta(days=1)
    add_sensor_rows(node["db"], 5, start=with_more)
    result = upload(emulator, node["db"], node["state"], SCHEMA, *node["args"])
    assert uploaded_in(result.stderr) == 5
    after = _info(emulator, fleet["edge-9"])
    assert after["node edge-7"] == before["node edge-7"]
    assert after["node edge-9"].startswith(f"{len(sqlite_rows(node['db']))} rows, last upload ")
    assert after["node edge-9"] != before["node edge-9"]
    assert after["rows"] == str(int(before["rows"]) + 5)
