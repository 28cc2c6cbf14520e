"""Run the Bacalhau job specs the way a Bacalhau compute node's docker executor would, with podman.

There is no Bacalhau here (no binary, no registry), so `executor_args` translates a job spec as
Bacalhau's docker executor does (pkg/executor/docker/executor.go, at the commit in
vendor/bacalhau_job_model.json): the image's ENTRYPOINT stays unless the spec sets `Entrypoint`,
`Parameters` become the command, every input source is a bind mount (read-only unless
`ReadWrite`), allowed only when the node allow-lists its path; `env:NAME` values are read from the
node's environment when the node's allow-list admits NAME; `Full`/`Host` network is host
networking; CPU and memory become limits. Like Bacalhau it does not add a read-only root
filesystem or a user: the image's own user (uid 10001) runs.

The "node" is this machine: its directories hold the SQLite database and the state, its
environment holds the token, the warehouse emulator stands in for Databricks.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from container_kit import ROOT, Podman, owned_dir, source_ids, state_of, strip_noise, write_sample_rows

GO_BYTES = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def go_bytes(text: str) -> int:
    """go-humanize ParseBytes for the forms the specs use ("1Gb", "512Mb", "1GiB")."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    assert match, text
    return int(float(match.group(1)) * GO_BYTES[(match.group(2) or "b").lower()])


def allowed(path: str, read_write: bool, allow_list: list[str]) -> bool:
    for entry in allow_list:
        pattern, rw = (entry[:-3], True) if entry.endswith(":rw") else (entry.removesuffix(":ro"), False)
        if fnmatch.fnmatch(path, pattern) and (rw or not read_write):
            return True
    return False


def executor_args(job: dict[str, Any], *, name: str, node_env: dict[str, str], allow_paths: list[str],
                  env_allow: list[str], detach: bool = False) -> tuple[list[str], dict[str, str]]:
    """(podman arguments, environment for podman) for the job's task on this node."""
    (task,) = job["Tasks"]
    params = task["Engine"]["Params"]
    args = ["run", "--name", name] + (["--detach"] if detach else [])
    podman_env: dict[str, str] = {}
    for key, value in task.get("Env", {}).items():
        if value.startswith("env:"):
            variable = value.removeprefix("env:")
            if not any(re.search(pattern, variable) for pattern in env_allow):
                raise PermissionError(f"resolve environment variable {key}: {variable} is not allowed")
            podman_env[key] = node_env[variable]
            args += ["--env", key]  # the value stays out of the command line
        else:
            args += ["--env", f"{key}={value}"]
    for item in params.get("EnvironmentVariables", []):
        args += ["--env", item]
    execution = uuid.uuid4().hex
    args += ["--env", f"BACALHAU_EXECUTION_ID=e-{execution}", "--env", f"BACALHAU_JOB_ID=j-{execution}",
             "--env", f"BACALHAU_JOB_TYPE={job['Type']}", "--env", "BACALHAU_PARTITION_INDEX=0",
             "--env", f"BACALHAU_PARTITION_COUNT={job.get('Count', 0) if job['Type'] in ('batch', 'service') else 0}"]
    for source in task.get("InputSources", []):
        spec = source["Source"]["Params"]
        read_write = bool(spec.get("ReadWrite", False))
        if not allowed(spec["SourcePath"], read_write, allow_paths):
            raise PermissionError(f"{spec['SourcePath']} is not allowlisted")
        args += ["--mount", f"type=bind,source={spec['SourcePath']},target={source['Target']}"
                 + ("" if read_write else ",ro=true")]
    network = task.get("Network", {}).get("Type", "Default").lower()
    args += ["--network", {"full": "host", "host": "host", "none": "none"}.get(network, "bridge")]
    resources = task.get("Resources", {})
    if resources.get("CPU"):
        args += ["--cpus", str(float(resources["CPU"].removesuffix("m")) / (1000 if resources["CPU"].endswith("m")
                                                                              else 1))]
    if resources.get("Memory"):
        args += ["--memory", str(go_bytes(resources["Memory"]))]
    if params.get("WorkingDirectory"):
        args += ["--workdir", params["WorkingDirectory"]]
    if params.get("Entrypoint"):
        args += ["--entrypoint", json.dumps(params["Entrypoint"])]
    return [*args, params["Image"], *params.get("Parameters", [])], podman_env


def node_config() -> dict[str, Any]:
    text = (ROOT / "bacalhau" / "README.md").read_text()
    return next(c for c in (yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL))
                if isinstance(c, dict) and "Compute" in c)


def localized(name: str, image: str, emulator, schema: str, data: Path, state: Path) -> dict[str, Any]:
    """The spec with this site's values: the image, the warehouse, the node's directories."""
    job = yaml.safe_load((ROOT / "bacalhau" / name).read_text())
    (task,) = job["Tasks"]
    task["Engine"]["Params"]["Image"] = image
    task["Env"].update(DATABRICKS_HOST=emulator.url, DATABRICKS_HTTP_PATH=emulator.http_path,
                       DATABRICKS_DATABASE=schema, DATABRICKS_RETRY_TIMEOUT="30")
    for source in task["InputSources"]:
        params = source["Source"]["Params"]
        params["SourcePath"] = str(state if params["ReadWrite"] else data)
    return job


@pytest.fixture
def node(tmp_path: Path, emulator) -> dict[str, Any]:
    """This machine as a compute node configured as bacalhau/README.md says (paths moved to tmp)."""
    data = tmp_path / "var-lib-sensor-data"
    write_sample_rows(data / "sensor_data.db", 4000)
    state = owned_dir(tmp_path / "var-lib-sqlite-uploader-state")  # install -d -o 10001 -g 10001
    config = node_config()
    allow = [entry.replace("/var/lib/sensor-data", str(data)).replace("/var/lib/sqlite-uploader/state", str(state))
             for entry in config["Compute"]["AllowListedLocalPaths"]]
    return {"data": data, "state": state, "allow_paths": allow, "env_allow": config["Compute"]["Env"]["AllowList"],
            "env": {"DATABRICKS_TOKEN": emulator.token}}


def test_ops_job_twice_keeps_state_on_the_node(podman: Podman, uploader_image: str, emulator, node):
    schema = "bac_" + uuid.uuid4().hex[:8]
    job = localized("upload-once.yaml", uploader_image, emulator, schema, node["data"], node["state"])
    db = node["data"] / "sensor_data.db"

    def execute() -> None:
        name = "bacalhau-ops-" + uuid.uuid4().hex[:8]
        args, env = executor_args(job, name=name, node_env=node["env"], allow_paths=node["allow_paths"],
                                  env_allow=node["env_allow"])
        proc = podman(*args, env=env, check=False)
        podman("rm", name, check=False)
        assert proc.returncode == 0, strip_noise(proc.stderr)[-4000:]

    execute()
    first = state_of(node["state"])
    assert first["rows_uploaded"] == 4000
    write_sample_rows(db, 700, start=datetime(2026, 4, 1, tzinfo=timezone.utc), seed=5)
    execute()  # a new container: only the state directory remembers
    second = state_of(node["state"])
    assert second["rows_uploaded"] == 4700 and second["batch_seq"] == first["batch_seq"] + 1
    table = job["Tasks"][0]["Env"]["DATABRICKS_TABLE"]
    ids = emulator.read_table_parquet(schema, table).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == source_ids(db)
    # Host networking gives the container the node's host name: one node id for both runs.
    nodes = {row["node_id"] for row in emulator.read_table_parquet(schema, "_sqlite_uploader_batches").to_pylist()}
    assert len(nodes) == 1


def test_a_node_without_the_allow_lists_refuses():
    job = yaml.safe_load((ROOT / "bacalhau" / "upload-once.yaml").read_text())
    compute = node_config()["Compute"]
    paths, names, env = compute["AllowListedLocalPaths"], compute["Env"]["AllowList"], {"DATABRICKS_TOKEN": "t"}
    executor_args(job, name="x", node_env=env, allow_paths=paths, env_allow=names)  # as configured: accepted
    with pytest.raises(PermissionError, match="not allowlisted"):
        executor_args(job, name="x", node_env=env, allow_paths=[], env_allow=names)
    read_only = [entry.removesuffix(":rw") for entry in paths]
    with pytest.raises(PermissionError, match="not allowlisted"):
        executor_args(job, name="x", node_env=env, allow_paths=read_only, env_allow=names)
    with pytest.raises(PermissionError, match="DATABRICKS_TOKEN is not allowed"):
        executor_args(job, name="x", node_env=env, allow_paths=paths, env_allow=[])


def test_daemon_job_runs_until_stopped(podman: Podman, uploader_image: str, emulator, node):
    schema = "bacd_" + uuid.uuid4().hex[:8]
    job = localized("upload-daemon.yaml", uploader_image, emulator, schema, node["data"], node["state"])
    name = "bacalhau-daemon-" + uuid.uuid4().hex[:8]
    args, env = executor_args(job, name=name, node_env=node["env"], allow_paths=node["allow_paths"],
                              env_allow=node["env_allow"], detach=True)
    podman(*args, env=env)
    try:
        heartbeat = node["state"] / "heartbeat.json"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if heartbeat.exists() and json.loads(heartbeat.read_text()).get("phase") == "sleeping":
                break
            time.sleep(1)
        else:
            raise AssertionError("the daemon never finished a cycle:\n" + podman("logs", name).stderr[-3000:])
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        started = time.monotonic()
        podman("stop", "--time", "10", name)
        assert time.monotonic() - started < 10
        assert podman.wait_exit(name, 30) == 0
    finally:
        podman("rm", "--force", name, check=False)
    assert state_of(node["state"])["rows_uploaded"] == 4000
