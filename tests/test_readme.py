"""The README is part of the product: its commands must work and its reference must match the code."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from uploader_testkit import ROOT, clean_env, read_delta

import sqlite_to_databricks_uploader as uploader

README = (ROOT / "README.md").read_text(encoding="utf-8")


def marked_block(name: str) -> str:
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README, re.DOTALL)
    assert match, f"README has no {name} block"
    return match.group(1)


def fenced_command(name: str) -> str:
    lines = [line for line in marked_block(name).splitlines() if line.strip() and not line.startswith("```")]
    assert len(lines) == 1, f"the {name} block must hold exactly one command"
    return lines[0]


def test_config_reference_matches_the_code():
    rows = [line for line in marked_block("config-reference").splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        key = cells[0].strip("`")
        documented[key] = (cells[1].strip("`"), re.findall(r"`(--[a-z-]+)`", cells[2]))
    assert set(documented) == {option.key for option in uploader.OPTIONS}
    for option in uploader.OPTIONS:
        env, flags = documented[option.key]
        assert env == option.env, option.key
        assert option.flag in flags, option.key
        for extra in option.flags:
            assert extra in flags, option.key


def test_every_option_is_in_the_example_config():
    example = (ROOT / "databricks-uploader-config.yaml.example").read_text(encoding="utf-8")
    for option in uploader.OPTIONS:
        assert re.search(rf"^#? ?{option.key}:", example, re.MULTILINE), option.key
        assert option.env in example, option.env
    loaded = uploader.load_settings(["--config", str(ROOT / "databricks-uploader-config.yaml.example")], {})
    assert loaded.settings.batch_size == 100_000


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Path:
    """The files a fresh clone has, without anything a previous run generated."""
    copy = tmp_path / "clone"
    copy.mkdir()
    shutil.copy2(ROOT / "sqlite_to_databricks_uploader.py", copy)
    shutil.copytree(ROOT / "examples", copy / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=900)


def test_quick_start_command_drains_then_uploads_only_new_rows(fresh_copy: Path):
    command = fenced_command("run-command")
    first = run_shell(command, fresh_copy)
    assert first.returncode == 0, first.stderr
    database = fresh_copy / "sample" / "sensor_data.db"
    table = fresh_copy / "lakehouse" / "sensor_logs"
    source_ids = sorted(row[0] for row in sqlite3.connect(database).execute("SELECT id FROM sensor_logs"))
    assert sorted(read_delta(table).column("id").to_pylist()) == source_ids

    again = run_shell(command, fresh_copy)
    assert again.returncode == 0, again.stderr
    assert "0 uploaded" in again.stderr
    assert sorted(read_delta(table).column("id").to_pylist()) == source_ids

    # New rows with exactly the last uploaded timestamp, stored the same way, arrive once.
    with sqlite3.connect(database) as connection:
        last = connection.execute("SELECT timestamp FROM sensor_logs ORDER BY id DESC LIMIT 1").fetchone()[0]
        connection.executemany(
            "INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) VALUES (?, ?, 1, 2, 'ok')",
            [("late-a", last), ("late-b", last)])
    third = run_shell(command, fresh_copy)
    assert third.returncode == 0, third.stderr
    landed = read_delta(table).column("id").to_pylist()
    assert sorted(landed) == sorted(row[0] for row in sqlite3.connect(database).execute("SELECT id FROM sensor_logs"))
    assert len(landed) == len(set(landed)) == len(source_ids) + 2
