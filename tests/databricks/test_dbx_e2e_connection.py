"""Connection settings end to end: OAuth M2M, missing credentials, plain-HTTP warning, Unity Catalog
names, and secrets that never reach the output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dbx_e2e import base_env, expected_sensor_rows, make_sensor_db, query, run, upload, uploaded_in
from emulator_harness import Emulator


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_oauth_service_principal_loads(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 25)
    env = base_env(emulator, token=False, DATABRICKS_CLIENT_ID=emulator.client_id,
                   DATABRICKS_CLIENT_SECRET=emulator.client_secret)
    result = upload(emulator, db, tmp_path / "state", schema, "--log-level", "DEBUG", env=env,
                    secrets=[emulator.client_secret])
    assert uploaded_in(result.stderr) == 25
    assert query(emulator, f"SELECT count(*) AS n FROM `{schema}`.`sensor_logs`") == [{"n": 25}]


def test_oauth_wrong_secret_is_a_clear_error(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 5)
    wrong = "wrong-secret-canary-93b1f0"
    env = base_env(emulator, token=False, DATABRICKS_CLIENT_ID=emulator.client_id,
                   DATABRICKS_CLIENT_SECRET=wrong)
    result = upload(emulator, db, tmp_path / "state", schema, env=env, expect=None, secrets=[wrong])
    assert result.returncode in (1, 2), result.stderr
    errors = _errors(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "service principal was refused" in errors[0] and "DATABRICKS_CLIENT_SECRET" in errors[0]
    assert "Traceback" not in result.stderr
    schemas = {str(next(iter(row.values()))).lower() for row in query(emulator, "SHOW SCHEMAS")}
    assert schema.lower() not in schemas


@pytest.mark.parametrize("given", [{}, {"DATABRICKS_CLIENT_ID": "some-client"},
                                   {"DATABRICKS_CLIENT_SECRET": "some-secret-value"}],
                         ids=["nothing", "client id only", "client secret only"])
def test_no_credentials_is_one_clear_error(emulator: Emulator, tmp_path: Path, given: dict) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 5)
    env = base_env(emulator, token=False, **given)
    result = upload(emulator, db, tmp_path / "state", "e2e_nocred", env=env, expect=2,
                    secrets=[value for key, value in given.items() if "SECRET" in key])
    errors = _errors(result.stderr)
    assert len(errors) == 1 and "No Databricks credentials" in errors[0], result.stderr
    assert "DATABRICKS_TOKEN" in errors[0] and "DATABRICKS_CLIENT_ID" in errors[0]
    assert "Traceback" not in result.stderr


def test_plain_http_host_warns_that_credentials_travel_in_clear(emulator: Emulator, tmp_path: Path) -> None:
    result = run("--run-query", "SELECT 1 AS one", "--output", "json", "--state-dir", str(tmp_path),
                 "--databricks-table", "any", env=base_env(emulator))
    assert json.loads(result.stdout) == [{"one": 1}]
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "http://" in warnings[0] and "unencrypted" in warnings[0], result.stderr


def test_sql_query_needs_no_source_table(emulator: Emulator, tmp_path: Path) -> None:
    """`--run-query "SQL"` runs any SQL on the warehouse: only the connection settings are needed
    (an analyst's laptop has no SQLite database, and the statement names its own tables)."""
    result = run("--run-query", "SELECT 40 + 2 AS answer", "--output", "json", "--state-dir", str(tmp_path),
                 env=base_env(emulator), expect=None)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"answer": 42}]


@pytest.mark.parametrize("catalog", ["spark_catalog", "main"])
def test_catalog_gives_three_level_names(emulator: Emulator, schema: str, tmp_path: Path, catalog: str) -> None:
    db = make_sensor_db(tmp_path / "sensor.db", 30)
    env = base_env(emulator, DATABRICKS_CATALOG=catalog)
    result = upload(emulator, db, tmp_path / "state", schema, env=env)
    assert uploaded_in(result.stderr) == 30
    three_level = rf"`?{catalog}`?\.`?{schema}`?\.`?sensor_logs`?"
    assert re.search(three_level, result.stderr), result.stderr
    assert query(emulator, f"SELECT count(*) AS n FROM {catalog}.{schema}.sensor_logs") == [{"n": 30}]

    info = run("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--databricks-database", schema,
               "--run-query", "INFO", "--output", "json", env=env)
    table = {item["item"]: item["value"] for item in json.loads(info.stdout)}["table"]
    assert re.fullmatch(three_level, table), table
    rows = json.loads(run("--sqlite", str(db), "--state-dir", str(tmp_path / "state"), "--output", "json",
                          "--run-query", f"SELECT id FROM {catalog}.{schema}.sensor_logs ORDER BY id",
                          env=env).stdout)
    assert [row["id"] for row in rows] == [row["id"] for row in expected_sensor_rows(db)]


def test_token_never_appears_in_any_output(emulator: Emulator, schema: str, tmp_path: Path) -> None:
    """The canary token is checked against every run of this folder; here it also goes through a flag,
    DEBUG logging (effective settings), query mode, and a wrong token that the server refuses."""
    db, state = make_sensor_db(tmp_path / "sensor.db", 20), tmp_path / "state"
    env = base_env(emulator, token=False)
    flag = ("--databricks-token", emulator.token, "--log-level", "DEBUG")
    loaded = upload(emulator, db, state, schema, *flag, env=env)
    assert uploaded_in(loaded.stderr) == 20
    assert "given as a flag" in loaded.stderr  # told to prefer the environment variable
    run("--sqlite", str(db), "--state-dir", str(state), "--databricks-database", schema, *flag,
        "--run-query", "INFO", env=env)
    run("--sqlite", str(db), "--state-dir", str(state), "--databricks-database", schema, *flag,
        "--run-query", f"SELECT * FROM `{schema}`.`sensor_logs`", "--output", "csv", env=env)
    # And the upload job's own logs in JSON, with the token from the environment.
    upload(emulator, db, state, schema, "--log-format", "json", "--log-level", "DEBUG", env=base_env(emulator))

    wrong = "dapi-wrong-canary-0c7e41d9a2"
    refused = upload(emulator, db, tmp_path / "state_wrong", schema, "--log-level", "DEBUG",
                     env=base_env(emulator, DATABRICKS_TOKEN=wrong), expect=None, secrets=[wrong])
    assert refused.returncode != 0
    errors = _errors(refused.stderr)
    assert errors and "refused the credentials" in errors[-1], refused.stderr
