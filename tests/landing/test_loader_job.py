"""The loader's deployment files: the Asset Bundle and the Jobs API JSON run the script with flags it
accepts, and the SQL-only load statement loads landed files exactly once on the emulator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from dbx_e2e import ROOT, make_sensor_db, query
from landing_e2e import TABLE, Landing, assert_exactly_once

import sqlite_to_databricks_uploader as uploader

DEPLOY = ROOT / "deploy" / "databricks"


def bundle_job() -> dict:
    bundle = yaml.safe_load((DEPLOY / "databricks.yml").read_text())
    return bundle["resources"]["jobs"]["sqlite_landing_loader"]


def check_loader_task(job: dict) -> None:
    assert job["max_concurrent_runs"] == 1, "one loader at a time"
    (task,) = job["tasks"]
    python_file = task["spark_python_task"]["python_file"]
    assert python_file.endswith("/" + uploader.__name__ + ".py")
    values = {"landing_volume": "/Volumes/main/edge/landing", "catalog": "main", "schema": "edge",
              "warehouse_id": "abc123"}
    arguments = [re.sub(r"\$\{var\.(\w+)\}", lambda m: values[m.group(1)], a)
                 for a in task["spark_python_task"]["parameters"]]
    cluster = job["job_clusters"][0]["new_cluster"]
    env = {k: "value" for k in cluster["spark_env_vars"]}
    invocation = uploader.load_settings(arguments, env)
    assert invocation.load_landed and invocation.settings.once
    assert invocation.settings.landing_volume and invocation.settings.databricks_http_path
    assert all(v.startswith(("{{secrets/", "${workspace.", "https://")) for v in cluster["spark_env_vars"].values())
    packages = " ".join(lib["pypi"]["package"] for lib in task["libraries"])
    assert "databricks-sql-connector" in packages and "databricks-sdk" in packages


def test_the_bundle_runs_the_loader_with_flags_the_script_accepts():
    job = bundle_job()
    check_loader_task(job)
    assert (ROOT / "deploy" / "databricks" / job["tasks"][0]["spark_python_task"]["python_file"]).resolve() == \
        (ROOT / (uploader.__name__ + ".py")).resolve()


def test_the_job_json_is_the_bundle_job_with_example_values():
    job = json.loads((DEPLOY / "loader-job.json").read_text())
    check_loader_task(job)
    bundle = bundle_job()
    assert job["schedule"]["quartz_cron_expression"] == "0 0/15 * * * ?"
    assert set(job) == set(bundle)


def test_the_sql_only_load_is_exactly_once(landing: Landing, tmp_path: Path):
    db = make_sensor_db(tmp_path / "n.db", 240)
    landing.land(db, tmp_path / "state", "s1", "--batch-size", "100")
    landing.load()  # creates the table (the SQL statement does not), loads and removes the files
    more = make_sensor_db(tmp_path / "m.db", 90, seed=3)
    landing.land(more, tmp_path / "state-m", "s2", "--batch-size", "50")
    text = (DEPLOY / "load_landed.sql").read_text()
    statement = "\n".join(line for line in text.splitlines() if not line.startswith("--")).strip().rstrip(";")
    # The named parameters, as a SQL task would bind them.
    statement = statement.replace("IDENTIFIER(:table_name)", f"`{landing.schema}`.`{TABLE}`")
    statement = statement.replace(":landing_dir", f"'{landing.volume}/{TABLE}'")
    first = query(landing.emulator, statement)
    second = query(landing.emulator, statement)
    assert first[0]["num_inserted_rows"] == 90 and second[0]["num_inserted_rows"] == 0
    assert assert_exactly_once(landing, {"s1": db, "s2": more}) == 330
