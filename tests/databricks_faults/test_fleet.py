"""Three uploaders on three SQLite databases (distinct NODE_ID values) loading one table at once.

With lineage columns (all three, one node on the INSERT path, all in loop mode while new rows
keep arriving) and without (all `--once`, in parallel). Every row of every source must land
exactly once; with `_node_id` in the table, INFO shows each node's rows.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from .conftest import VALUE_COLUMNS, Job, Source, assert_exactly_once, connector_count, new_schema, wait_until

NODES = ("node-1", "node-2", "node-3")


def fleet(emulator, tmp_path: Path, schema: str, seed: int, rows: int, extra: list[str]) -> list[tuple[Job, Source]]:
    members = []
    for index, node in enumerate(NODES, start=1):
        work = tmp_path / node
        # Ids of different nodes never meet, so rows of all sources can be told apart in one table.
        source = Source(work / "sensors.db", random.Random(seed + index), id_base=index * 1_000_000)
        source.insert(rows)
        members.append((Job(emulator, source.path, work, schema, list(extra), node_id=node), source))
    return members


def total_rows(members: list[tuple[Job, Source]]) -> int:
    return sum(source.count() for _, source in members)


def test_three_loop_uploaders_with_lineage_columns(emulator, tmp_path: Path):
    schema = new_schema("fleetlineage")
    members = fleet(emulator, tmp_path, schema, 61, 30,
                    ["--batch-size", "15", "--interval", "2", "--lineage-columns", "all"])
    members[2][0].extra += ["--staging-volume", "none"]  # one node without volume access: INSERT path
    runs = [job.start(label="loop") for job, _ in members]
    try:
        for more in (0, 12):
            for _, source in members:
                source.insert(more, tie_with_last=True)
            expected_count = total_rows(members)
            landed = wait_until(lambda n=expected_count: connector_count(emulator, schema) == n, timeout=240,
                                interval=2.0, while_alive=runs)
            assert landed, (f"{connector_count(emulator, schema)} of {expected_count} rows landed\n"
                            + "\n".join(run.describe() for run in runs))
        for run in runs:
            assert run.terminate() == 0, run.describe()
    finally:
        for run in runs:
            run.stop_hard()
    columns = ("_node_id", *VALUE_COLUMNS)
    expected: Counter = Counter()
    for job, source in members:
        expected.update({(job.node_id, *row): n for row, n in source.expected().items()})
    assert_exactly_once(emulator, schema, expected, columns=columns)

    info = members[0][0].query("--run-query", "INFO", "--output", "json")
    assert info.returncode == 0, info.stderr
    items = {entry["item"]: entry["value"] for entry in json.loads(info.stdout)}
    assert items.get("rows") == str(total_rows(members)), items
    for job, source in members:
        line = items.get(f"node {job.node_id}", "")
        assert line.startswith(f"{source.count()} rows"), (job.node_id, items)


def test_three_once_uploaders_in_parallel_without_lineage(emulator, tmp_path: Path):
    schema = new_schema("fleetplain")
    members = fleet(emulator, tmp_path, schema, 71, 24, ["--batch-size", "12"])
    runs = [job.start("--once") for job, _ in members]
    try:
        for run in runs:
            assert run.popen.wait(timeout=300) == 0, run.describe()
    finally:
        for run in runs:
            run.stop_hard()
    expected: Counter = Counter()
    for _, source in members:
        expected.update(source.expected())
    assert_exactly_once(emulator, schema, expected)

    info = members[1][0].query("--run-query", "INFO", "--output", "json")
    assert info.returncode == 0, info.stderr
    items = {entry["item"]: entry["value"] for entry in json.loads(info.stdout)}
    assert items.get("rows") == str(total_rows(members)), items
    assert not [item for item in items if item.startswith("node ")], items  # no _node_id column
