"""Configuration: precedence flags > environment > YAML > defaults for every kind of setting,
clear errors for bad values (exit 2, key and source named, no traceback), and the token's secrecy.

Most checks call `load_settings(argv, environ)` in-process; the end-to-end ones run the script as a
user would and look at what reached the Delta table.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml
from uploader_testkit import ROOT, clean_env, read_delta, run_uploader, sqlite_rows

import sqlite_to_databricks_uploader as uploader

EXAMPLE_CONFIG = ROOT / "databricks-uploader-config.yaml.example"
TOKEN_CANARY = "dapi0c0ffee5ca1ab1e5ecret7e57canary"


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None,
         yaml_values: dict | None = None, tmp_path: Path | None = None):
    """Effective settings for a YAML mapping (optional), an environment and flags."""
    argv = list(argv or [])
    if yaml_values is not None:
        assert tmp_path is not None
        argv = ["--config", str(write_yaml(tmp_path / "config.yaml", yaml_values)), *argv]
    return uploader.load_settings(argv, dict(environ or {})).settings


# -------------------------------------------------------------------------------------------
# Precedence, one setting of each kind, every combination of the three explicit levels
# -------------------------------------------------------------------------------------------

# key, env variable, YAML value, environment value, flag arguments, expected (yaml, env, flag).
# Each level's value differs from the level below so that a wrong winner is always visible.
PRECEDENCE_CASES = [
    # strings
    ("sqlite_table_name", "SQLITE_TABLE_NAME", "yaml_table", "env_table",
     ["--sqlite-table-name", "flag_table"], ("yaml_table", "env_table", "flag_table")),
    ("timestamp_col", "TIMESTAMP_COL", "ts_yaml", "ts_env", ["--timestamp-col", "ts_flag"],
     ("ts_yaml", "ts_env", "ts_flag")),
    ("state_dir", "STATE_DIR", "./state-yaml", "/state-env", ["--state-dir", "/state-flag"],
     ("./state-yaml", "/state-env", "/state-flag")),
    ("databricks_database", "DATABRICKS_DATABASE", "db_yaml", "db_env", ["--databricks-database", "db_flag"],
     ("db_yaml", "db_env", "db_flag")),
    # int
    ("batch_size", "BATCH_SIZE", 111, "222", ["--batch-size", "333"], (111, 222, 333)),
    # floats
    ("interval", "UPLOAD_INTERVAL", 1.5, "2.5", ["--interval", "3.5"], (1.5, 2.5, 3.5)),
    ("sqlite_busy_timeout", "SQLITE_BUSY_TIMEOUT", 4, "5.25", ["--sqlite-busy-timeout", "0"], (4.0, 5.25, 0.0)),
    # booleans (default False): YAML turns on, the environment off, the flag on again
    ("enable_sanitize", "ENABLE_SANITIZE", True, "false", ["--enable-sanitize"], (True, False, True)),
    ("enable_filter", "ENABLE_FILTER", True, "0", ["--enable-filter"], (True, False, True)),
    ("enable_aggregate", "ENABLE_AGGREGATE", True, "no", ["--enable-aggregate"], (True, False, True)),
    ("once", "ONCE", True, "false", ["--once"], (True, False, True)),
    ("once", "ONCE", False, "true", ["--no-once"], (False, True, False)),
    # JSON mappings
    ("sanitize_config", "SANITIZE_CONFIG", {"remove_nulls": ["a"]}, '{"remove_nulls": ["b"]}',
     ["--sanitize-config", '{"remove_nulls": ["c"]}'],
     ({"remove_nulls": ["a"]}, {"remove_nulls": ["b"]}, {"remove_nulls": ["c"]})),
    ("filter_config", "FILTER_CONFIG", {"temperature": {">": -50}}, '{"temperature": {"<": 150}}',
     ["--filter-config", '{"status": "ok"}'],
     ({"temperature": {">": -50}}, {"temperature": {"<": 150}}, {"status": "ok"})),
    ("aggregate_config", "AGGREGATE_CONFIG", {"group_by": ["device_id"], "aggregations": {"t": "avg"}},
     '{"group_by": ["hour"], "aggregations": {"t": "max"}}',
     ["--aggregate-config", '{"aggregations": {"readings": "count"}}'],
     ({"group_by": ["device_id"], "aggregations": {"t": "avg"}},
      {"group_by": ["hour"], "aggregations": {"t": "max"}},
      {"aggregations": {"readings": "count"}})),
    # choices
    ("cursor", "CURSOR", "rowid", "timestamp", ["--cursor", "rowid"], ("rowid", "timestamp", "rowid")),
    ("target", "UPLOAD_TARGET", "delta", "databricks", ["--target", "delta"], ("delta", "databricks", "delta")),
    ("invalid_timestamps", "INVALID_TIMESTAMPS", "skip", "upload", ["--invalid-timestamps", "skip"],
     ("skip", "upload", "skip")),
    ("log_level", "LOG_LEVEL", "DEBUG", "WARNING", ["--log-level", "ERROR"], ("DEBUG", "WARNING", "ERROR")),
    ("log_format", "LOG_FORMAT", "json", "text", ["--log-format", "json"], ("json", "text", "json")),
]


@pytest.mark.parametrize(("key", "env", "yaml_value", "env_value", "flag_args", "expected"), PRECEDENCE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PRECEDENCE_CASES)])
def test_precedence_across_all_four_levels(tmp_path, key, env, yaml_value, env_value, flag_args, expected):
    default = uploader.OPTIONS_BY_KEY[key].default
    for use_yaml, use_env, use_flag in itertools.product((False, True), repeat=3):
        settings = load(
            argv=flag_args if use_flag else [],
            environ={env: env_value} if use_env else {},
            yaml_values={key: yaml_value} if use_yaml else None,
            tmp_path=tmp_path,
        )
        if use_flag:
            want = expected[2]
        elif use_env:
            want = expected[1]
        elif use_yaml:
            want = expected[0]
        else:
            want = default
        got = getattr(settings, key)
        assert got == want, f"{key}: yaml={use_yaml} env={use_env} flag={use_flag}: got {got!r}, want {want!r}"
        assert type(got) is type(want) or want is None, f"{key}: {got!r} has the wrong type"


def sample_value(option) -> tuple[object, str]:
    """A valid non-default value of the option's kind: (as YAML, as text for env and flag)."""
    if option.key == "source_timezone":
        return "Europe/Berlin", "Europe/Berlin"
    if option.key in ("staging_volume", "landing_volume"):
        return "/Volumes/main/s/v", "/Volumes/main/s/v"
    if option.kind == "int":
        return 7, "7"
    if option.kind == "float":
        return 2.5, "2.5"
    if option.kind == "bool":
        return (not option.default), "false" if option.default else "true"
    if option.kind == "json":
        return {"remove_nulls": ["x"]}, '{"remove_nulls": ["x"]}'
    if option.kind == "choice":
        choice = next(c for c in option.choices if c != option.default)
        return choice, choice
    if option.kind == "list":
        return list(option.choices[:2]), ",".join(option.choices[:2])
    return f"{option.key}-value", f"{option.key}-value"


@pytest.mark.parametrize("option", uploader.OPTIONS, ids=[o.key for o in uploader.OPTIONS])
def test_every_option_reachable_from_yaml_env_and_flag(tmp_path, option):
    as_yaml, as_text = sample_value(option)
    expected = load(yaml_values={option.key: as_yaml}, tmp_path=tmp_path)
    assert getattr(expected, option.key) == as_yaml
    assert getattr(load(environ={option.env: as_text}), option.key) == as_yaml
    if option.kind == "bool":
        flag_args = [option.flag if as_yaml else "--no-" + option.flag[2:]]
    else:
        flag_args = [option.flag, as_text]
    assert getattr(load(argv=flag_args), option.key) == as_yaml


@pytest.mark.parametrize(("word", "value"), [
    ("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False),
    ("TRUE", True), ("False", False), ("Yes", True), (" no ", False), ("on", True), ("off", False),
])
@pytest.mark.parametrize("env", ["ENABLE_SANITIZE", "ENABLE_FILTER", "ENABLE_AGGREGATE", "ONCE"])
def test_booleans_from_the_environment(env, word, value):
    key = next(o.key for o in uploader.OPTIONS if o.env == env)
    assert getattr(load(environ={env: word}), key) is value


@pytest.mark.parametrize("env_value", ["maybe", "2", "enabled"])
def test_unreadable_boolean_in_environment_is_refused(env_value):
    with pytest.raises(uploader.ConfigError) as error:
        load(environ={"ENABLE_SANITIZE": env_value})
    assert error.value.exit_code == 2
    assert "ENABLE_SANITIZE" in str(error.value)


# -------------------------------------------------------------------------------------------
# Explicit empty-ish values at a higher level win
# -------------------------------------------------------------------------------------------

def test_empty_json_flag_overrides_yaml_mapping(tmp_path):
    base = {"enable_sanitize": True, "sanitize_config": {"remove_nulls": ["temperature"]}}
    assert load(yaml_values=base, tmp_path=tmp_path).sanitize_config == {"remove_nulls": ["temperature"]}
    settings = load(argv=["--sanitize-config", "{}"], yaml_values=base, tmp_path=tmp_path)
    assert settings.sanitize_config == {}
    assert settings.enable_sanitize is True


def test_empty_json_env_overrides_yaml_mapping(tmp_path):
    base = {"filter_config": {"status": "ok"}}
    settings = load(environ={"FILTER_CONFIG": "{}"}, yaml_values=base, tmp_path=tmp_path)
    assert settings.filter_config == {}


def test_false_env_overrides_yaml_true(tmp_path):
    base = {"enable_filter": True, "filter_config": {"status": "ok"}}
    assert load(yaml_values=base, tmp_path=tmp_path).enable_filter is True
    settings = load(environ={"ENABLE_FILTER": "false"}, yaml_values=base, tmp_path=tmp_path)
    assert settings.enable_filter is False
    assert settings.filter_config == {"status": "ok"}


def test_negated_flag_overrides_env_true():
    assert load(argv=["--no-enable-aggregate"], environ={"ENABLE_AGGREGATE": "true"}).enable_aggregate is False


def test_zero_flag_overrides_nonzero_yaml(tmp_path):
    assert load(argv=["--interval", "0"], yaml_values={"interval": 60}, tmp_path=tmp_path).interval == 0.0


def test_yaml_false_overrides_default_and_env_overrides_yaml_empty_mapping(tmp_path):
    assert load(yaml_values={"once": False}, tmp_path=tmp_path).once is False
    settings = load(environ={"SANITIZE_CONFIG": '{"remove_nulls": ["t"]}'},
                    yaml_values={"sanitize_config": {}}, tmp_path=tmp_path)
    assert settings.sanitize_config == {"remove_nulls": ["t"]}


def test_config_is_optional():
    settings = load(environ={"SQLITE_PATH": "/data/x.db", "ONCE": "true"})
    assert settings.sqlite == "/data/x.db"
    assert settings.once is True
    assert settings.batch_size == uploader.OPTIONS_BY_KEY["batch_size"].default


# -------------------------------------------------------------------------------------------
# Bad configuration: exit 2, one clear message naming the key and where it came from
# -------------------------------------------------------------------------------------------

# name, YAML text (or None), environment, flags, words the message must contain
BAD_CONFIG_CASES = [
    ("unknown-yaml-key", "sqlite_path: /data/x.db\n", {}, [], ["sqlite_path", "bad.yaml"]),
    ("yaml-int-wrong-type", "batch_size: lots\n", {}, [], ["batch_size", "bad.yaml"]),
    ("yaml-int-is-a-list", "batch_size: [1, 2]\n", {}, [], ["batch_size", "bad.yaml"]),
    ("yaml-bool-wrong-type", "enable_sanitize: maybe\n", {}, [], ["enable_sanitize", "bad.yaml"]),
    ("yaml-json-wrong-type", "sanitize_config: [temperature]\n", {}, [], ["sanitize_config", "bad.yaml"]),
    ("yaml-str-is-a-mapping", "sqlite_table_name: {a: 1}\n", {}, [], ["sqlite_table_name", "bad.yaml"]),
    ("yaml-bad-choice", "log_level: LOUD\n", {}, [], ["log_level", "bad.yaml"]),
    ("yaml-batch-size-zero", "batch_size: 0\n", {}, [], ["batch_size", "bad.yaml"]),
    ("yaml-negative-interval", "interval: -5\n", {}, [], ["interval", "bad.yaml"]),
    ("env-bad-json", None, {"FILTER_CONFIG": '{"temperature": {">": -50'}, [], ["FILTER_CONFIG", "environment"]),
    ("env-json-not-mapping", None, {"AGGREGATE_CONFIG": '["device_id"]'}, [], ["AGGREGATE_CONFIG", "environment"]),
    ("env-int-wrong-type", None, {"BATCH_SIZE": "1e3x"}, [], ["BATCH_SIZE", "environment"]),
    ("env-negative-interval", None, {"UPLOAD_INTERVAL": "-1"}, [], ["UPLOAD_INTERVAL", "environment"]),
    ("env-bad-bool", None, {"ONCE": "sometimes"}, [], ["ONCE", "environment"]),
    ("env-bad-choice", None, {"CURSOR": "sideways"}, [], ["CURSOR", "environment"]),
    ("env-bad-timezone", None, {"SOURCE_TIMEZONE": "Mars/Olympus"}, [], ["SOURCE_TIMEZONE", "Mars/Olympus"]),
    ("flag-batch-size-zero", None, {}, ["--batch-size", "0"], ["--batch-size", "flag"]),
    ("flag-batch-size-negative", None, {}, ["--batch-size=-10"], ["--batch-size", "flag"]),
    ("flag-bad-choice", None, {}, ["--target", "nowhere"], ["--target", "flag"]),
    ("flag-bad-json", None, {}, ["--sanitize-config", "{remove_nulls: [x]"], ["--sanitize-config", "flag"]),
    ("flag-float-not-a-number", None, {}, ["--interval", "soon"], ["--interval", "flag"]),
    ("flag-float-infinite", None, {}, ["--interval", "inf"], ["--interval", "flag"]),
]


@pytest.mark.parametrize(("name", "yaml_text", "environ", "flags", "words"), BAD_CONFIG_CASES,
                         ids=[c[0] for c in BAD_CONFIG_CASES])
def test_bad_config_in_process(tmp_path, name, yaml_text, environ, flags, words):
    argv = list(flags)
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text, encoding="utf-8")
        argv = ["--config", str(tmp_path / "bad.yaml"), *argv]
    with pytest.raises(uploader.ConfigError) as error:
        uploader.load_settings(argv, environ)
    assert error.value.exit_code == 2
    message = str(error.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} missing from {message!r}"


@pytest.fixture
def small_db(tmp_path: Path) -> Path:
    from make_sample_db import make_sample_db

    path = tmp_path / "data" / "sensor_data.db"
    make_sample_db(path, rows=300)
    return path


# The same mistakes through the real command line: one ERROR line, exit 2, nothing uploaded.
CLI_CASES = [c for c in BAD_CONFIG_CASES if c[0] in {
    "unknown-yaml-key", "yaml-int-wrong-type", "yaml-bool-wrong-type", "yaml-json-wrong-type", "env-bad-json",
    "env-negative-interval", "env-bad-choice", "flag-batch-size-zero", "flag-bad-choice"}]


@pytest.mark.parametrize(("name", "yaml_text", "environ", "flags", "words"), CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])
def test_bad_config_from_the_command_line(tmp_path, small_db, name, yaml_text, environ, flags, words):
    argv = ["--sqlite", str(small_db), "--state-dir", str(tmp_path / "state"), "--target", "delta",
            "--delta-path", str(tmp_path / "lake"), "--once", *flags]
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text, encoding="utf-8")
        argv = ["--config", str(tmp_path / "bad.yaml"), *argv]
    result = run_uploader(*argv, cwd=tmp_path, env=clean_env(**environ))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} missing from {errors[0]!r}"
    assert not (tmp_path / "lake").exists()
    assert not (tmp_path / "state" / "upload_state.json").exists()


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_uploader("--config", str(tmp_path / "nope.yaml"), "--once", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------------------------------------
# End to end: the effective value is the one actually used
# -------------------------------------------------------------------------------------------

def delta_commits(path: Path) -> int:
    """Commits that added rows: the batches (a new table's creation comes before them)."""
    return sum('"add"' in entry.read_text() for entry in (path / "_delta_log").glob("*.json"))


def test_batch_size_from_each_level_decides_the_number_of_commits(tmp_path, sample_db):
    """3000 rows: YAML 1000 (3 commits) < env 500 (6) < flag 750 (4)."""
    config = write_yaml(tmp_path / "c.yaml", {"sqlite": str(sample_db), "batch_size": 1000, "once": True,
                                               "target": "delta"})
    expected = {"yaml": 3, "env": 6, "flag": 4}
    for level, commits in expected.items():
        lake = tmp_path / f"lake-{level}"
        env = clean_env(DELTA_PATH=str(lake), STATE_DIR=str(tmp_path / f"state-{level}"))
        argv = ["--config", str(config)]
        if level in ("env", "flag"):
            env["BATCH_SIZE"] = "500"
        if level == "flag":
            argv += ["--batch-size", "750"]
        result = run_uploader(*argv, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert delta_commits(lake) == commits, level
        assert read_delta(lake).num_rows == 3000


def test_enable_sanitize_false_in_env_disables_yaml_sanitizing(tmp_path, sample_db):
    nulls = sum(1 for (t,) in sqlite_rows(sample_db, columns="temperature") if t is None)
    assert nulls > 0, "the sample database should hold NULL temperatures"
    config = write_yaml(tmp_path / "c.yaml", {
        "sqlite": str(sample_db), "once": True, "target": "delta",
        "enable_sanitize": True, "sanitize_config": {"remove_nulls": ["temperature"]},
    })
    on = run_uploader("--config", str(config), cwd=tmp_path,
                      env=clean_env(DELTA_PATH=str(tmp_path / "on"), STATE_DIR=str(tmp_path / "s-on")))
    assert on.returncode == 0, on.stderr
    assert read_delta(tmp_path / "on").num_rows == 3000 - nulls

    off = run_uploader("--config", str(config), cwd=tmp_path,
                       env=clean_env(DELTA_PATH=str(tmp_path / "off"), STATE_DIR=str(tmp_path / "s-off"),
                                     ENABLE_SANITIZE="false"))
    assert off.returncode == 0, off.stderr
    assert read_delta(tmp_path / "off").num_rows == 3000


def test_everything_from_the_environment_without_config(tmp_path, sample_db):
    env = clean_env(SQLITE_PATH=str(sample_db), STATE_DIR=str(tmp_path / "state"), ONCE="true",
                    UPLOAD_TARGET="delta", DELTA_PATH=str(tmp_path / "lake"), BATCH_SIZE="1000",
                    ENABLE_FILTER="yes", FILTER_CONFIG='{"device_id": "sensor-a"}')
    result = run_uploader(cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    expected = sum(1 for (d,) in sqlite_rows(sample_db, columns="device_id") if d == "sensor-a")
    table = read_delta(tmp_path / "lake")
    assert table.num_rows == expected
    assert set(table.column("device_id").to_pylist()) == {"sensor-a"}
    state = json.loads((tmp_path / "state" / "upload_state.json").read_text())
    assert state["last_upload"]


def test_empty_sanitize_flag_beats_yaml_end_to_end(tmp_path, sample_db):
    config = write_yaml(tmp_path / "c.yaml", {
        "sqlite": str(sample_db), "once": True, "target": "delta", "delta_path": str(tmp_path / "lake"),
        "state_dir": str(tmp_path / "state"),
        "enable_sanitize": True, "sanitize_config": {"remove_nulls": ["temperature"]},
    })
    result = run_uploader("--config", str(config), "--sanitize-config", "{}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_delta(tmp_path / "lake").num_rows == 3000


# -------------------------------------------------------------------------------------------
# The token
# -------------------------------------------------------------------------------------------

def test_settings_repr_masks_the_token():
    settings = load(environ={"DATABRICKS_TOKEN": TOKEN_CANARY})
    assert settings.databricks_token == TOKEN_CANARY
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert TOKEN_CANARY not in text
        assert "databricks_token" in text


def test_token_never_printed_at_debug(tmp_path, sample_db):
    env = clean_env(DATABRICKS_TOKEN=TOKEN_CANARY)
    common = ["--sqlite", str(sample_db), "--target", "delta", "--delta-path", str(tmp_path / "lake"),
              "--state-dir", str(tmp_path / "state"), "--log-level", "DEBUG"]
    result = run_uploader(*common, "--once", "--batch-size", "1000", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "DEBUG" in result.stderr, "the run should log at DEBUG"
    assert TOKEN_CANARY not in result.stdout + result.stderr
    assert read_delta(tmp_path / "lake").num_rows == 3000
    for query in ("INFO", "SELECT count(*) AS n FROM default.sensor_logs"):
        shown = run_uploader(*common, "--run-query", query, cwd=tmp_path, env=env)
        assert shown.returncode == 0, shown.stderr
        assert TOKEN_CANARY not in shown.stdout + shown.stderr
    # A bad setting elsewhere must not dump the token in its error either.
    broken = run_uploader(*common, "--once", "--batch-size", "0", cwd=tmp_path, env=env)
    assert broken.returncode == 2
    assert TOKEN_CANARY not in broken.stdout + broken.stderr


def test_token_as_flag_works_but_warns(tmp_path, sample_db):
    assert load(argv=["--databricks-token", TOKEN_CANARY]).databricks_token == TOKEN_CANARY
    result = run_uploader("--sqlite", str(sample_db), "--target", "delta", "--delta-path", str(tmp_path / "lake"),
                          "--state-dir", str(tmp_path / "state"), "--log-level", "DEBUG", "--once",
                          "--databricks-token", TOKEN_CANARY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "token" in line.lower()]
    assert warnings, result.stderr
    assert "DATABRICKS_TOKEN" in warnings[0]
    assert TOKEN_CANARY not in result.stdout + result.stderr


# -------------------------------------------------------------------------------------------
# Every option is documented: --help and the example config
# -------------------------------------------------------------------------------------------

def test_help_lists_every_flag_and_variable():
    result = run_uploader("--help", env=clean_env(COLUMNS="200"))
    assert result.returncode == 0
    for option in uploader.OPTIONS:
        assert option.flag in result.stdout, option.key
        assert option.env in result.stdout, option.key
    assert "--config" in result.stdout
    assert "--run-query" in result.stdout


def test_example_config_covers_every_key(tmp_path):
    if not EXAMPLE_CONFIG.exists():
        pytest.skip(f"{EXAMPLE_CONFIG.name} is not written yet")
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    for option in uploader.OPTIONS:
        # Set or shown commented out, as a key at the start of a line.
        assert re.search(rf"^\s*#?\s*{re.escape(option.key)}\s*:", text, re.MULTILINE), option.key
    # The example as shipped is a valid configuration...
    uploader.load_settings(["--config", str(EXAMPLE_CONFIG)], {})
    # ... and so is every commented-out key once uncommented (a user's first edit).
    uncommented = re.sub(r"^(\s*)#\s?(?=[a-z_]+\s*:)", r"\1", text, flags=re.MULTILINE)
    try:
        data = yaml.safe_load(uncommented)
    except yaml.YAMLError:
        return  # commented blocks that are not standalone YAML: the check above is what matters
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k in uploader.OPTIONS_BY_KEY}
        (tmp_path / "uncommented.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        uploader.load_settings(["--config", str(tmp_path / "uncommented.yaml")], {})


def test_sqlite_connection_is_not_needed_for_config_errors(tmp_path):
    """A config error is reported even when the database is missing too: config first."""
    result = run_uploader("--sqlite", str(tmp_path / "absent.db"), "--batch-size", "0", "--once", cwd=tmp_path)
    assert result.returncode == 2
    assert "--batch-size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "absent.db").exists()
