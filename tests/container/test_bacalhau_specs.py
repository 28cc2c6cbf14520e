"""The Bacalhau job specs conform to Bacalhau's job model and to the deployment rules.

The model (field names, types, enums, submission rules) is vendored from bacalhau-project/bacalhau
in vendor/bacalhau_job_model.json; this file never reaches the internet.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from pathlib import Path

import pytest
import yaml
from bacalhau_model import MODEL, check_job
from container_kit import ROOT

SPECS = {"upload-once.yaml": "ops", "upload-daemon.yaml": "daemon", "land-daemon.yaml": "daemon"}
BACALHAU_README = (ROOT / "bacalhau" / "README.md").read_text()


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "bacalhau" / name).read_text())


def node_config() -> dict:
    """The node configuration block the bacalhau/README.md tells operators to use."""
    blocks = re.findall(r"```yaml\n(.*?)```", BACALHAU_README, re.DOTALL)
    configs = [yaml.safe_load(block) for block in blocks]
    nodes = [c for c in configs if isinstance(c, dict) and "Compute" in c]
    assert len(nodes) == 1, "bacalhau/README.md should show one node configuration"
    return nodes[0]


def mounts(task: dict) -> dict[str, dict]:
    return {source["Target"]: source["Source"]["Params"] for source in task.get("InputSources", [])}


def test_the_vendored_model_names_its_source():
    source = MODEL["source"]
    assert source["repository"] == "bacalhau-project/bacalhau"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert {"batch", "ops", "daemon", "service"} == set(MODEL["job_types"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_conforms_to_the_job_model(name: str):
    assert check_job(load(name)) == []


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_follows_the_deployment_rules(name: str):
    job = load(name)
    assert job["Type"] == SPECS[name]
    assert job.get("Count", 0) <= 1
    (task,) = job["Tasks"]
    params = task["Engine"]["Params"]
    assert "Entrypoint" not in params, "keep the image's entrypoint (the uploader)"
    arguments = params.get("Parameters", [])
    if SPECS[name] == "ops":
        assert "--once" in arguments
    else:
        assert "--once" not in arguments and task["Env"].get("ONCE") is None
        assert "ExecutionTimeout" not in task.get("Timeouts", {}), "a daemon must not time out"
    env = task["Env"]
    # Secrets come from the node, never from the spec.
    assert env["DATABRICKS_TOKEN"] == "env:DATABRICKS_TOKEN"
    for key, value in env.items():
        assert not str(value).startswith("dapi"), f"{key} holds a literal token"
    assert "EnvironmentVariables" not in params
    # State on a writable host directory; the SQLite directory read-only.
    mounted = mounts(task)
    state_dir = env.get("STATE_DIR", "/state")
    assert mounted[state_dir]["ReadWrite"] is True
    data_target = str(Path(env["SQLITE_PATH"]).parent)
    assert mounted[data_target]["ReadWrite"] is False
    for source in task["InputSources"]:
        assert source["Source"]["Type"] in ("localDirectory", "local")
    assert task["Network"]["Type"].lower() in ("full", "host")
    assert task["Resources"]["CPU"] and task["Resources"]["Memory"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_readme_node_configuration_admits_the_spec(name: str):
    """What bacalhau/README.md tells operators to allow is what the spec needs: a node configured
    that way takes the job (allow-listed paths with :rw where written, the token's name)."""
    config = node_config()
    allowed = config["Compute"]["AllowListedLocalPaths"]
    env_allow = config["Compute"]["Env"]["AllowList"]
    (task,) = load(name)["Tasks"]
    for source in task["InputSources"]:
        params = source["Source"]["Params"]
        ok = [entry for entry in allowed
              if fnmatch.fnmatch(params["SourcePath"], entry.removesuffix(":rw").removesuffix(":ro"))
              and (entry.endswith(":rw") or not params["ReadWrite"])]
        assert ok, f"{params['SourcePath']} (ReadWrite={params['ReadWrite']}) is not allowed by {allowed}"
    for value in task["Env"].values():
        if str(value).startswith("env:"):
            variable = value.removeprefix("env:")
            assert any(re.search(pattern, variable) for pattern in env_allow), variable
            # Anchored patterns: ^DATABRICKS_TOKEN$ must not also admit, say, DATABRICKS_TOKEN_OLD.
            assert not any(re.search(pattern, variable + "_OLD") for pattern in env_allow)
    labels = config["Labels"]
    for constraint in load(name)["Constraints"]:
        assert labels.get(constraint["Key"]) in constraint["Values"]


MUTATIONS = [
    # (change, expected message fragment)
    (lambda job: job["Tasks"][0].__setitem__("InputSource", job["Tasks"][0].pop("InputSources")),
     "Job.Tasks[0].InputSource: not a field of models.Task (did you mean InputSources?)"),
    (lambda job: job["Tasks"][0]["InputSources"][1]["Source"]["Params"].__setitem__("Readwrite", True),
     "Params.Readwrite: not a parameter here"),
    (lambda job: job["Tasks"][0]["InputSources"][1]["Source"]["Params"].__setitem__("ReadWrite", "yes"),
     "Params.ReadWrite: expected bool"),
    (lambda job: job.__setitem__("Count", 3), "Job.Count: 3 is not allowed"),
    (lambda job: job.__setitem__("tasks", job.pop("Tasks")), "(Bacalhau spells it Tasks)"),
    (lambda job: job.__setitem__("Type", "Batch"), "Job.Type: 'Batch' is not one of"),
    (lambda job: job["Tasks"][0]["Network"].__setitem__("Type", "internet"), "is not a network type"),
    (lambda job: job["Tasks"][0].__setitem__("Timeouts", {"ExecutionTimeout": "1h"}), "expected an integer"),
    (lambda job: job["Tasks"][0]["Engine"]["Params"].__setitem__("Parameters", "--once"), "expected []string"),
    (lambda job: job["Tasks"][0]["Engine"]["Params"].pop("Image"), "'Image' cannot be empty"),
    (lambda job: job["Tasks"][0]["Env"].__setitem__("databricks_token", "x"), "names are uppercase"),
    (lambda job: job["Tasks"][0]["Env"].__setitem__("BACALHAU_X", "x"), "prefix is reserved"),
    (lambda job: job["Tasks"][0]["InputSources"][0].pop("Target"), "missing a target"),
    (lambda job: job["Tasks"][0]["InputSources"][0]["Source"].__setitem__("Type", "localDir"),
     "Source.Type: 'localDir' is not one of"),
    (lambda job: job["Constraints"][0].__setitem__("Operator", "equals"), "is not one of"),
    (lambda job: job["Tasks"][0].pop("Name"), "missing task name"),
    (lambda job: job.__setitem__("Tasks", []), "a job needs one task"),
]


@pytest.mark.parametrize("mutation,message", MUTATIONS)
def test_the_checker_catches_what_bacalhau_would_ignore_or_refuse(mutation, message):
    job = copy.deepcopy(load("upload-once.yaml"))
    mutation(job)
    errors = check_job(job)
    assert any(message in error for error in errors), errors
