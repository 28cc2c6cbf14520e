"""docker-compose.yml: valid for today's Compose (the Compose Specification's JSON schema, vendored,
no deprecated keys), and it works: brought up with podman-compose against the warehouse emulator.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from container_kit import ROOT, Podman, need, source_ids, strip_noise, tool_path, write_sample_rows

COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = json.loads((Path(__file__).resolve().parent / "vendor" / "compose-spec.json").read_text())
SERVICE = "databricks-uploader"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def deprecated_keys(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `value` that the Compose Specification marks deprecated (following $ref)."""
    while "$ref" in schema:
        schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        for key, item in value.items():
            sub = properties.get(key) or next(iter(patterns.values()), None) or {}
            if sub.get("deprecated"):
                found.append(f"{path}/{key}")
            for option in [sub, *sub.get("oneOf", []), *sub.get("anyOf", [])]:
                if isinstance(option, dict):
                    found += deprecated_keys(item, option, f"{path}/{key}")
    return sorted(set(found))


def test_compose_file_matches_the_compose_specification():
    document = compose()
    jsonschema.Draft7Validator(SCHEMA).validate(document)
    assert "version" not in document, "the top-level version key is obsolete"
    assert deprecated_keys(document, SCHEMA) == []


def test_compose_service_settings():
    service = compose()["services"][SERVICE]
    assert service["restart"] in ("unless-stopped", "always")
    assert service["healthcheck"]["test"][-1] == "--healthcheck"
    assert service["read_only"] is True
    environment = service["environment"]
    assert environment["DATABRICKS_TOKEN"].startswith("${DATABRICKS_TOKEN"), "the token comes from the environment"
    volumes = service["volumes"]
    assert any(v.endswith(":/data:ro") for v in volumes), "the SQLite directory is mounted read-only"
    state = [v for v in volumes if v.split(":")[1] == "/state"]
    assert state and state[0].split(":")[0] in compose()["volumes"], "state lives on a named volume"
    assert service["command"] == ["--config", "/config.yaml"]


LANDING_COMPOSE_FILE = ROOT / "docker-compose.landing.yml"


def test_landing_compose_file_matches_the_specification_and_the_script():
    """The landing fleet's Compose file: valid, hardened like the main one, a node without a SQL
    warehouse and a loader with one, each with arguments the script accepts."""
    import sqlite_to_databricks_uploader as uploader

    document = yaml.safe_load(LANDING_COMPOSE_FILE.read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(document)
    assert deprecated_keys(document, SCHEMA) == []
    node, loader = document["services"]["landing-node"], document["services"]["landing-loader"]
    for service in (node, loader):
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert service["healthcheck"]["test"][-1] == "--healthcheck"
        assert service["environment"]["DATABRICKS_TOKEN"].startswith("${")
    assert node["environment"]["LOAD_MODE"] == "landing"
    assert "DATABRICKS_HTTP_PATH" not in node["environment"], "a landing node needs no warehouse"
    assert "DATABRICKS_HTTP_PATH" in loader["environment"]
    env = {"LANDING_VOLUME": "/Volumes/main/edge/landing", "DATABRICKS_HOST": "example.cloud.databricks.com"}
    invocation = uploader.load_settings(loader["command"], env)
    assert invocation.load_landed and not invocation.settings.once
    assert uploader.load_settings(node["command"][:0], {**env, "LOAD_MODE": "landing"}).settings.load_mode == "landing"


@pytest.fixture
def compose_env(podman: Podman) -> dict[str, str]:
    need("podman-compose")
    return podman.env


def test_compose_up_uploads_restarts_and_stops_cleanly(podman: Podman, uploader_image: str, emulator,
                                                       tmp_path: Path, compose_env: dict[str, str]):
    """`compose up -d` as README says, with the image, data directory and config given through the
    file's variables, plus an override file with host networking (the emulator listens on the
    host's 127.0.0.1). Then: healthy, new rows after a restart uploaded once, `down` exits 0."""
    project = "c" + uuid.uuid4().hex[:8]
    schema = "compose_" + uuid.uuid4().hex[:6]
    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copy(COMPOSE_FILE, work / "docker-compose.yml")
    (work / "compose.host-network.yml").write_text(f"services:\n  {SERVICE}:\n    network_mode: host\n")
    (work / "databricks-uploader-config.yaml").write_text(
        "sqlite: /data/sensor_data.db\n"
        f"databricks_host: {emulator.url}\n"
        f"databricks_http_path: {emulator.http_path}\n"
        f"databricks_database: {schema}\n"
        "databricks_retry_timeout: 30\n"
        "state_dir: ./state\n"
        "interval: 3600\n")
    data = tmp_path / "data"
    write_sample_rows(data / "sensor_data.db", 2500)
    env = {**compose_env, "UPLOADER_IMAGE": uploader_image, "SQLITE_DIR": str(data),
           "DATABRICKS_TOKEN": emulator.token, "NODE_ID": "compose-node-1"}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([tool_path("podman-compose"), "-p", project, "-f", "docker-compose.yml", "-f",
                               "compose.host-network.yml", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"compose {args}: {proc.stdout[-2000:]}\n{strip_noise(proc.stderr)[-3000:]}"
        return proc

    def uploaded() -> list[int]:
        try:
            return emulator.read_table_parquet(schema, "sensor_logs").column("id").to_pylist()
        except (KeyError, FileNotFoundError):
            return []

    def wait_for(count: int) -> list[int]:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ids = uploaded()
            if len(ids) >= count:
                return ids
            time.sleep(1)
        logs = run("logs", check=False).stdout[-3000:]
        raise AssertionError(f"{len(uploaded())} of {count} rows after 240 s:\n{logs}")

    container = f"{project}_{SERVICE}_1"
    try:
        run("up", "-d")
        wait_for(2500)
        deadline = time.monotonic() + 60
        while podman("healthcheck", "run", container, check=False).returncode != 0:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(1)

        write_sample_rows(data / "sensor_data.db", 400, start=datetime(2026, 3, 1, tzinfo=timezone.utc), seed=3)
        started = time.monotonic()
        run("down")
        stopped = time.monotonic() - started
        assert stopped < 10, f"compose down took {stopped:.1f} s"
        run("up", "-d")
        ids = wait_for(2900)
        time.sleep(2)
        ids = uploaded()
        assert len(ids) == len(set(ids)) and sorted(ids) == source_ids(data / "sensor_data.db")
        run("stop")
        # (--format: the full inspect output holds the container's environment, token included)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip() == "0"
        state_volume = podman("volume", "inspect", f"{project}_uploader-state").stdout
        mountpoint = Path(json.loads(state_volume)[0]["Mountpoint"])
        recorded = json.loads((mountpoint / "upload_state.json").read_text())
        assert recorded["rows_uploaded"] == 2900
    finally:
        run("down", "-v", check=False)
