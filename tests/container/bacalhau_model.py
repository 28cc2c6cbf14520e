"""Check a Bacalhau job spec against Bacalhau's job model (vendor/bacalhau_job_model.json).

Bacalhau itself rejects only unknown *top-level* keys and ignores a misspelt field deeper down
(key matching is case-insensitive), so a typo such as `InputSource:` or `Readwrite:` would make a
job silently run without its state mount. This checker is stricter: every field name must be one
the model defines, spelt as the model spells it, with the model's type, plus the submission rules
Bacalhau applies (pkg/models/job.go ValidateSubmission, task.go, env_var.go, the docker engine's
and local input source's own params).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

MODEL = json.loads((Path(__file__).resolve().parent / "vendor" / "bacalhau_job_model.json").read_text())
DEFINITIONS: dict[str, Any] = MODEL["definitions"]
GO_TYPES = {"string": str, "bool": bool, "[]string": list, "CreateStrategy": str}


def _ref(schema: dict[str, Any]) -> str | None:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    for part in schema.get("allOf", []):
        if "$ref" in part:
            return part["$ref"].rsplit("/", 1)[1]
    return None


def _check_value(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    name = _ref(schema)
    if name == "models.Network":
        # Marshalled as text (MarshalText), matched case-insensitively; swagger says integer.
        if not isinstance(value, str) or value.lower() not in {n.lower() for n in MODEL["network_types"]}:
            errors.append(f"{path}: {value!r} is not a network type ({', '.join(MODEL['network_types'])})")
        return
    if name is not None:
        definition = DEFINITIONS[name]
        if "enum" in definition:
            if value not in definition["enum"]:
                errors.append(f"{path}: {value!r} is not one of {definition['enum']}")
            return
        _check_object(value, name, path, errors)
        return
    kind = schema.get("type")
    if kind == "string" and not isinstance(value, str):
        errors.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
    elif kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        errors.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
    elif kind == "array":
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
        else:
            for i, item in enumerate(value):
                _check_value(item, schema.get("items", {}), f"{path}[{i}]", errors)
    elif kind == "object":
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                _check_value(item, extra, f"{path}.{key}", errors)


def _check_object(value: Any, definition: str, path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping ({definition}), got {type(value).__name__}")
        return
    properties = DEFINITIONS[definition].get("properties", {})
    for key, item in value.items():
        if key not in properties:
            same = [p for p in properties if p.lower() == str(key).lower()]
            close = difflib.get_close_matches(str(key), list(properties), n=1)
            if same:
                hint = f" (Bacalhau spells it {same[0]})"
            elif close:
                hint = f" (did you mean {close[0]}?)"
            else:
                hint = f" (fields: {', '.join(sorted(properties))})"
            errors.append(f"{path}.{key}: not a field of {definition}{hint}")
            continue
        _check_value(item, properties[key], f"{path}.{key}", errors)


def _check_params(params: Any, fields: dict[str, str], path: str, errors: list[str]) -> None:
    if not isinstance(params, dict):
        errors.append(f"{path}: expected a mapping")
        return
    for key, item in params.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a parameter here (parameters: {', '.join(fields)})")
            continue
        expected = GO_TYPES[fields[key]]
        if not isinstance(item, expected):
            errors.append(f"{path}.{key}: expected {fields[key]}, got {type(item).__name__} {item!r}")
        elif expected is list and not all(isinstance(x, str) for x in item):
            errors.append(f"{path}.{key}: expected a list of strings")


ENV_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_job(job: Any) -> list[str]:
    """Every way `job` departs from Bacalhau's job model; empty when it conforms."""
    errors: list[str] = []
    _check_object(job, "models.Job", "Job", errors)
    if not isinstance(job, dict):
        return errors
    job_type = job.get("Type")
    if job_type not in MODEL["job_types"]:
        errors.append(f"Job.Type: {job_type!r} is not one of {MODEL['job_types']} (lowercase)")
    count = job.get("Count")
    if isinstance(count, int) and (count < 0 or (count > 1 and job_type in ("ops", "daemon"))):
        errors.append(f"Job.Count: {count} is not allowed for a {job_type} job")
    tasks = job.get("Tasks")
    if not isinstance(tasks, list) or not tasks:
        errors.append("Job.Tasks: a job needs one task")
        return errors
    for index, task in enumerate(tasks):
        where = f"Job.Tasks[{index}]"
        if not isinstance(task, dict):
            continue
        if not str(task.get("Name") or "").strip():
            errors.append(f"{where}.Name: missing task name")
        engine = task.get("Engine") or {}
        if engine.get("Type") not in MODEL["engines"]:
            errors.append(f"{where}.Engine.Type: {engine.get('Type')!r} is not one of {MODEL['engines']}")
        if engine.get("Type") == "docker":
            params = engine.get("Params")
            _check_params(params, MODEL["docker_engine_params"], f"{where}.Engine.Params", errors)
            if isinstance(params, dict):
                if not params.get("Image"):
                    errors.append(f"{where}.Engine.Params.Image: 'Image' cannot be empty")
                workdir = params.get("WorkingDirectory")
                if workdir and not str(workdir).startswith("/"):
                    errors.append(f"{where}.Engine.Params.WorkingDirectory: must be absolute")
                for item in params.get("EnvironmentVariables") or []:
                    if str(item).upper().startswith(MODEL["env_var_reserved_prefix"]):
                        errors.append(f"{where}.Engine.Params.EnvironmentVariables: {item!r} is reserved")
        for name, value in (task.get("Env") or {}).items():
            if not ENV_NAME.match(name) or name != name.upper():
                errors.append(f"{where}.Env.{name}: names are uppercase letters, digits and _, starting with a letter")
            if name.upper().startswith(MODEL["env_var_reserved_prefix"]):
                errors.append(f"{where}.Env.{name}: the BACALHAU_ prefix is reserved")
            if value in ("", None):
                errors.append(f"{where}.Env.{name}: empty value")
        for position, source in enumerate(task.get("InputSources") or []):
            at = f"{where}.InputSources[{position}]"
            if not isinstance(source, dict):
                continue
            if not str(source.get("Target") or "").strip():
                errors.append(f"{at}.Target: input source is missing a target")
            spec = source.get("Source") or {}
            if spec.get("Type") not in MODEL["storage_sources"]:
                errors.append(f"{at}.Source.Type: {spec.get('Type')!r} is not one of {MODEL['storage_sources']}")
            if spec.get("Type") in ("local", "localDirectory"):
                params = spec.get("Params")
                _check_params(params, MODEL["local_source_params"], f"{at}.Source.Params", errors)
                if isinstance(params, dict):
                    if not str(params.get("SourcePath", "")).startswith("/"):
                        errors.append(f"{at}.Source.Params.SourcePath: an absolute host path is needed")
                    create = params.get("CreateAs")
                    if create is not None and str(create).lower() not in {c.lower() for c in MODEL["create_as"]}:
                        errors.append(f"{at}.Source.Params.CreateAs: {create!r} is not one of {MODEL['create_as']}")
    return errors
