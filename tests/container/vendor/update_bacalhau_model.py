"""Regenerate bacalhau_job_model.json from a checkout of bacalhau-project/bacalhau (not run by tests).

    git clone https://github.com/bacalhau-project/bacalhau /tmp/bacalhau
    python3 tests/container/vendor/update_bacalhau_model.py /tmp/bacalhau

Takes the job model's definitions from pkg/swagger/swagger.json and the facts the swagger file does
not carry from the Go sources (job types, docker engine params, local input source params,
network names, validation rules), and records the commit they came from. The tests read only the
JSON file: they never reach the internet.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFINITIONS = ["models.Job", "models.Task", "models.SpecConfig", "models.InputSource", "models.ResourcesConfig",
               "models.NetworkConfig", "models.Port", "models.TimeoutConfig", "models.LabelSelectorRequirement",
               "models.ResultPath", "models.Network", "selection.Operator"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def go_struct_fields(source: str, struct: str) -> dict[str, str]:
    """Field name -> Go type of `type <struct> struct { ... }` (exported fields only)."""
    body = re.search(rf"type {struct} struct \{{(.*?)\n\}}", source, re.DOTALL)
    assert body, struct
    fields = {}
    for line in body.group(1).splitlines():
        match = re.match(r"\s*([A-Z]\w*)\s+([\w\[\]\.\*]+)", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def string_constants(source: str, prefix: str) -> dict[str, str]:
    return dict(re.findall(rf"\b({prefix}\w*)\s*=\s*\"([^\"]+)\"", source))


def main(repo_path: str) -> None:
    repo = Path(repo_path)
    commit = git(repo, "rev-parse", "HEAD").strip()
    describe = git(repo, "describe", "--tags", "HEAD").strip()
    swagger = json.loads((repo / "pkg/swagger/swagger.json").read_text())
    definitions = swagger.get("definitions") or swagger["components"]["schemas"]
    constants = (repo / "pkg/models/constants.go").read_text()
    docker_types = (repo / "pkg/executor/docker/models/types.go").read_text()
    local_types = (repo / "pkg/storage/local/types.go").read_text()
    create_strategy = (repo / "pkg/storage/local/create_strategy.go").read_text()
    network = (repo / "pkg/models/network.go").read_text()
    network_names = re.findall(r"^\t(Network\w+)(?: Network = iota)?$", network, re.MULTILINE)

    model = {
        "source": {
            "repository": "bacalhau-project/bacalhau",
            "commit": commit,
            "describe": describe,
            "files": ["pkg/swagger/swagger.json", "pkg/models/constants.go", "pkg/models/job.go",
                      "pkg/models/task.go", "pkg/models/env_var.go", "pkg/models/network.go",
                      "pkg/executor/docker/models/types.go", "pkg/storage/local/types.go",
                      "pkg/storage/local/create_strategy.go", "pkg/compute/env/host_resolver.go"],
        },
        "definitions": {name: definitions[name] for name in DEFINITIONS},
        "job_types": sorted(v for k, v in string_constants(constants, "JobType").items()),
        "engines": sorted(v for k, v in string_constants(constants, "Engine").items()),
        "storage_sources": sorted(v for k, v in string_constants(constants, "StorageSource").items()),
        "env_var_reserved_prefix": string_constants(constants, "EnvVarPrefix")["EnvVarPrefix"],
        # NetworkConfig.Type is marshalled as text (MarshalText/UnmarshalText, case-insensitive).
        "network_types": [name.removeprefix("Network") for name in network_names],
        "docker_engine_params": go_struct_fields(docker_types, "EngineSpec"),
        "local_source_params": go_struct_fields(local_types, "Source"),
        "create_as": re.findall(r'CreateStrategy = "(\w+)"', create_strategy),
        "rules": [
            "Job.Type is one of job_types (ValidateSubmission); Tasks is not empty",
            "Job.Count >= 0; ops and daemon jobs cannot set Count > 1; batch/service default to 1",
            "Task.Name is not blank; Engine.Type is one of engines; docker Params.Image is not empty",
            "docker Params.WorkingDirectory is absolute; EnvironmentVariables may not start with BACALHAU_",
            "Task.Env: names uppercase, start with a letter, letters/digits/_ only, not BACALHAU_*; values "
            "not empty; 'env:NAME' reads the compute node's own environment, allowed by "
            "Compute.Env.AllowList (unanchored regular expressions)",
            "InputSource.Target is not blank; Source.Type is one of storage_sources",
            "local/localDirectory sources need Compute.AllowListedLocalPaths on the node (':rw' suffix "
            "for ReadWrite)",
            "Timeouts are integers (seconds); Resources are strings",
            "LabelSelectorRequirement.Operator is one of selection.Operator's enum",
        ],
    }
    out = HERE / "bacalhau_job_model.json"
    out.write_text(json.dumps(model, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out} from {describe} ({commit})")


if __name__ == "__main__":
    main(sys.argv[1])
