"""Fuzzed configuration: every YAML key, environment variable and flag gets random strings and
types (hypothesis), and transform configurations get plausible shapes with wrong types.

The outcome a user must get is either "accepted" or one clear error -- a ConfigError (exit 2, one
line naming the setting and where it came from), never a traceback. A transform configuration
accepted at start-up must then work on real rows: a mistake found only by the first batch is an
exit 1 that loop mode retries for ever. In-process for speed (load_settings, make_target,
build_transform_plan, apply_transforms: what start-up runs before touching a file); the cases
hypothesis found, and a few more, through the real command line.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sqlite_to_databricks_uploader as uploader

from .kit import UTC, Place, assert_refused, clean_env, make_db, read_delta_rows, uploader_command

OPTIONS = uploader.OPTIONS
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="hostile-config-"))
atexit.register(shutil.rmtree, WORK, True)

# Text as it can reach a program: no NUL (environment and argv cannot hold one), no lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
YAML_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
# Words the settings' parsers treat specially, mixed into the random text.
SPECIAL_TEXT = TEXT | st.sampled_from([
    "", " ", "0", "-1", "1e309", "nan", "inf", "-inf", "1_000", "0x10", "true", "yes", "all", "none", "auto",
    "{}", "[]", "[1", "{\"a\":", "null", "UTC", "+99:99", "-24:00", "+23:59", "Europe/Nowhere", "../../etc/passwd",
    "http://", "https://[broken", "http://host:99999", "http://h:0", "/Volumes/a/b", "/Volumes/a/b/c/../d",
    "s3://", "file:///x", "99999999999999999999999", "1e300", "4.9e-324", "node_id,batch_id", "ALL", "Batch_Id",
])


def yaml_file(values: Any) -> str:
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=WORK, delete=False, encoding="utf-8")  # noqa: SIM115
    with handle:
        yaml.safe_dump(values, handle, allow_unicode=True)
    return handle.name


# The sample table's columns and types, as start-up derives them.
COLUMNS = ["id", "device_id", "timestamp", "temperature", "humidity", "status"]


def column_types() -> dict[str, Any]:
    import pyarrow as pa

    return {"id": pa.int64(), "device_id": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"),
            "temperature": pa.float64(), "humidity": pa.float64(), "status": pa.string()}


def sample_batch() -> Any:
    import pyarrow as pa

    types = column_types()
    data = {
        "id": [1, 2, 3, 4],
        "device_id": ["sensor-a", "sensor-b", None, "sensor-a"],
        "timestamp": [datetime(2024, 1, 15, 14, 30, s, tzinfo=UTC) for s in range(3)] + [None],
        "temperature": [21.5, None, -999.0, 30.25],
        "humidity": [50.0, 51.0, None, 49.5],
        "status": ["ok", "error", "", None],
    }
    return pa.table({name: pa.array(values, types[name]) for name, values in data.items()})


def judge(argv: list[str], environ: dict[str, str], names: list[str]) -> uploader.Settings | None:
    """load_settings, then what start-up builds from the settings alone. Accepted, or ConfigError
    (exit 2, one line, naming one of `names`). Anything else fails the test."""
    try:
        settings_ = uploader.load_settings(argv, environ).settings
    except uploader.ConfigError as exc:
        message = str(exc)
        assert exc.exit_code == 2
        assert "\n" not in message, f"a multi-line error: {message!r}"
        assert any(name.lower() in message.lower() for name in names), f"{names} not named in {message!r}"
        return None
    except SystemExit as exc:  # argparse's own usage error (a flag without its value...): exit 2
        assert exc.code == 2
        return None
    try:
        uploader.make_target(settings_, "readings")
    except uploader.ConfigError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
    return settings_


def names_of(option: uploader.Option) -> list[str]:
    return [option.key, option.env, option.flag, *option.flags]


# ---------------------------------------------------------------------------------------------
# Every setting, from each of the three places
# ---------------------------------------------------------------------------------------------

@FUZZ
@given(option=st.sampled_from(OPTIONS), value=YAML_VALUES | SPECIAL_TEXT)
def test_fuzzed_yaml_value(option, value):
    judge(["--config", yaml_file({option.key: value})], {}, [*names_of(option), "config file"])


@FUZZ
@given(option=st.sampled_from(OPTIONS), value=SPECIAL_TEXT)
def test_fuzzed_environment_value(option, value):
    judge([], {option.env: value}, names_of(option))


@FUZZ
@given(option=st.sampled_from(OPTIONS), value=SPECIAL_TEXT, form=st.sampled_from(["=", " "]))
def test_fuzzed_flag_value(option, value, form):
    if option.kind == "bool":
        argv = [f"{option.flag}={value}"] if form == "=" else [option.flag]
    else:
        argv = [f"{option.flag}={value}"] if form == "=" else [option.flag, value]
    judge(argv, {}, names_of(option))


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.key)
def test_value_with_a_newline_gives_a_one_line_error(option):
    """Found by the flag fuzz: a bad value echoed into the error split it over two lines."""
    value = "0\nforged: line" if option.kind != "bool" else "yes\nno"
    judge([f"{option.flag}={value}"], {}, names_of(option))
    judge([], {option.env: value}, names_of(option))


@FUZZ
@given(environ=st.dictionaries(st.sampled_from([o.env for o in OPTIONS]), SPECIAL_TEXT, max_size=6))
def test_fuzzed_environment_all_at_once(environ):
    judge([], environ, list(environ))


@FUZZ
@given(text=TEXT | st.binary(max_size=60).map(lambda b: b"sqlite: /data/x.db\n" + b))
def test_fuzzed_config_file_content(text):
    """Any file handed to --config: valid settings, or one clear error naming the file."""
    path = WORK / "fuzzed.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    judge(["--config", str(path)], {}, [str(path)])


@pytest.mark.parametrize("option", OPTIONS, ids=[o.key for o in OPTIONS])
def test_key_left_empty_in_yaml(tmp_path, option):
    """`batch_size:` with nothing after it (YAML null) -- a key of the example config blanked by a
    user -- means "not set" (the default), or is refused naming the key; it is never None where a
    value is needed (None as batch_size, state_dir, log_level, interval... fails later or hangs)."""
    path = tmp_path / "blank.yaml"
    path.write_text(f"{option.key}:\n", encoding="utf-8")
    try:
        settings_ = uploader.load_settings(["--config", str(path)], {}).settings
    except uploader.ConfigError as exc:
        assert option.key in str(exc), str(exc)
        return
    if option.key == "node_id":
        assert settings_.node_id, "node_id falls back to the host name"
        return
    assert getattr(settings_, option.key) == option.default


def test_example_config_with_every_value_blanked(tmp_path):
    """The whole command line run on a YAML file whose keys are all present and empty."""
    from make_sample_db import make_sample_db

    db = tmp_path / "sensors.db"
    make_sample_db(db, rows=50)
    given_keys = {"sqlite": str(db), "state_dir": str(tmp_path / "state"), "delta_path": str(tmp_path / "lake"),
                  "target": "delta", "once": True}
    lines = [f"{o.key}: {json.dumps(given_keys[o.key])}" if o.key in given_keys else f"{o.key}:" for o in OPTIONS]
    config = tmp_path / "blank.yaml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(uploader_command("--config", str(config)), cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 2:
        assert_refused(result, "blank.yaml")
        return
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(read_delta_rows(tmp_path / "lake")) == 50


# ---------------------------------------------------------------------------------------------
# Transform configurations: plausible shapes, wrong types
# ---------------------------------------------------------------------------------------------

NAMES = st.sampled_from([*COLUMNS, "hour", "minute", "day", "readings", "pressure", ""])
VALUE = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False) | TEXT \
    | st.sampled_from(["2024-01-15 14:30:00", "ok", "sensor-a", "21.5", "-999"])
OPERAND = VALUE | st.lists(VALUE, max_size=3) | st.lists(st.lists(VALUE, max_size=2), max_size=2) \
    | st.dictionaries(TEXT, VALUE, max_size=2)
OPERATORS = st.sampled_from([*uploader.FILTER_OPERATORS, "=", "=>", "IN", "contains", ""])
FILTERS = st.dictionaries(NAMES, VALUE | st.dictionaries(OPERATORS, OPERAND, max_size=2), max_size=3)
SANITIZE = st.fixed_dictionaries({}, optional={
    "remove_nulls": st.lists(NAMES | st.integers(), max_size=3) | NAMES,
    "replace_values": st.dictionaries(NAMES, st.dictionaries(TEXT | st.sampled_from(["ok", "error", "-999", ""]),
                                                             OPERAND, max_size=2), max_size=2),
})
FUNCTIONS = st.sampled_from([*uploader.AGGREGATIONS, "AVG", "median", "", "count "]) | st.integers()
AGGREGATE = st.fixed_dictionaries({}, optional={
    "group_by": st.lists(NAMES, max_size=3) | NAMES | st.integers(),
    "aggregations": st.dictionaries(NAMES, FUNCTIONS | st.lists(FUNCTIONS, max_size=3), max_size=3),
})


@FUZZ
@given(kind=st.sampled_from(["sanitize", "filter", "aggregate"]), data=st.data())
def test_fuzzed_transform_config_is_refused_at_start_up_or_works(kind, data):
    config = data.draw({"sanitize": SANITIZE, "filter": FILTERS, "aggregate": AGGREGATE}[kind], label="config")
    where = yaml_file({f"enable_{kind}": True, f"{kind}_config": config})
    settings_ = judge(["--config", where], {}, [f"{kind}_config"])
    if settings_ is None:
        return
    try:
        plan = uploader.build_transform_plan(settings_, COLUMNS, column_types(), "timestamp")
    except uploader.ConfigError as exc:
        assert "\n" not in str(exc) and f"{kind}_config" in str(exc), str(exc)
        return
    try:
        uploader.apply_transforms(sample_batch(), plan, uploader.TransformCounts())
    except Exception as exc:
        raise AssertionError(f"{kind}_config {json.dumps(config, default=str)} was accepted at start-up but the "
                             f"first batch fails: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Through the real command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_sample_db import make_sample_db

    path = tmp_path_factory.mktemp("config") / "sensors.db"
    make_sample_db(path, rows=200)
    return path


def run_cli(tmp_path: Path, db: Path, *args: str, env: dict[str, str] | None = None,
            target: str = "delta") -> tuple[subprocess.CompletedProcess, Place]:
    place = Place(tmp_path, db, table="sensor_logs")
    command = ["--sqlite", str(db), "--state-dir", str(place.state_dir), "--once", "--target", target,
               "--delta-path", str(place.lake)]
    result = subprocess.run(uploader_command(*command, *args), cwd=tmp_path, env=env or clean_env(),
                            capture_output=True, text=True, timeout=300)
    return result, place


BAD_SETTINGS = [
    # (id, flags, environment, words the one ERROR line must hold)
    ("timezone-offset-out-of-range", [], {"SOURCE_TIMEZONE": "+99:99"}, ["SOURCE_TIMEZONE", "+99:99"]),
    ("batch-size-beyond-int64", ["--batch-size", "100000000000000000000000000000"], {}, ["--batch-size"]),
    ("host-broken-ipv6", ["--databricks-host", "https://[broken", "--databricks-http-path", "/sql/1.0/x"],
     {"DATABRICKS_TOKEN": "dapi-test"}, ["databricks_host"]),
    ("host-port-out-of-range", ["--databricks-host", "http://127.0.0.1:99999", "--databricks-http-path", "/x"],
     {"DATABRICKS_TOKEN": "dapi-test"}, ["databricks_host"]),
    ("retry-timeout-beyond-any-clock", ["--databricks-host", "http://127.0.0.1:9", "--databricks-http-path", "/x",
                                        "--databricks-retry-timeout", "1e300"],
     {"DATABRICKS_TOKEN": "dapi-test"}, ["--databricks-retry-timeout"]),
]


@pytest.mark.parametrize(("flags", "environ", "words"), [c[1:] for c in BAD_SETTINGS],
                         ids=[c[0] for c in BAD_SETTINGS])
def test_bad_setting_is_one_clear_error(tmp_path, sensors, flags, environ, words):
    result, place = run_cli(tmp_path, sensors, *flags, env=clean_env(**environ), target="auto")
    assert_refused(result, *words)
    assert not place.state_file.exists()
    assert not place.lake.exists()


def test_config_file_in_another_encoding(tmp_path, sensors):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"# Konfiguration f\xfcr den Sensor\nbatch_size: 100\n")
    result, place = run_cli(tmp_path, sensors, "--config", str(config))
    assert_refused(result, "latin1.yaml")
    assert not place.lake.exists()


EXTREME_BUT_VALID = [
    ("busy-timeout-huge", ["--sqlite-busy-timeout", "1e300"]),
    ("busy-timeout-zero", ["--sqlite-busy-timeout", "0"]),
    ("batch-size-one", ["--batch-size", "1"]),
    ("batch-size-int64-max", ["--batch-size", str(2**63 - 1)]),
    ("interval-zero", ["--interval", "0"]),
]


@pytest.mark.parametrize("flags", [c[1] for c in EXTREME_BUT_VALID], ids=[c[0] for c in EXTREME_BUT_VALID])
def test_extreme_but_valid_settings_work(tmp_path, sensors, flags):
    result, place = run_cli(tmp_path, sensors, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(place.rows()) == 200


def test_huge_interval_in_loop_mode_keeps_running(tmp_path, sensors):
    (tmp_path / "refused").mkdir()
    result, _ = run_cli(tmp_path / "refused", sensors, "--interval", "1e300")
    assert result.returncode == 2 and "--interval" in result.stderr and "at most" in result.stderr, result.stderr
    place = Place(tmp_path, sensors, table="sensor_logs")
    loop = place.start("--interval", str(31 * 86_400))  # the longest interval accepted
    try:
        loop.wait_for(lambda: "Cycle done" in loop.log, "the first cycle")
        time.sleep(3)  # now sleeping for "ever": it must still be there, and stop on SIGTERM
        assert loop.alive(), loop.log[-4000:]
    finally:
        code = loop.stop()
    assert code == 0, loop.log[-4000:]
    assert "Traceback" not in loop.log


# Transform settings whose values do not fit the columns' types: known at start-up (the types are),
# so refused there with exit 2 -- not a failure of every batch (exit 1, retried for ever), not a
# traceback, and not every row silently filtered away.
WRONG_TYPES = [
    ("number-column-compared-with-text", ["--enable-filter", "--filter-config", '{"temperature": {">": "hot"}}'],
     ["temperature", "hot"]),
    ("text-column-compared-with-number", ["--enable-filter", "--filter-config", '{"device_id": {">": 5}}'],
     ["device_id"]),
    ("number-column-equal-to-text", ["--enable-filter", "--filter-config", '{"temperature": "hot"}'],
     ["temperature", "hot"]),
    ("in-list-mixing-types", ["--enable-filter", "--filter-config", '{"temperature": {"in": ["hot", 1]}}'],
     ["temperature"]),
    ("in-list-of-lists", ["--enable-filter", "--filter-config", '{"status": {"in": [["ok"]]}}'], ["status"]),
    ("replacement-is-a-list", ["--enable-sanitize", "--sanitize-config",
                               '{"replace_values": {"status": {"error": ["x"]}}}'], ["status"]),
    ("replacement-is-a-mapping", ["--enable-sanitize", "--sanitize-config",
                                  '{"replace_values": {"status": {"error": {"a": 1}}}}'], ["status"]),
    ("group-by-twice", ["--enable-aggregate", "--aggregate-config",
                        '{"group_by": ["device_id", "device_id"], "aggregations": {"temperature": "avg"}}'],
     ["device_id"]),
    ("time-bucket-twice", ["--enable-aggregate", "--aggregate-config",
                           '{"group_by": ["hour", "hour"], "aggregations": {"temperature": "avg"}}'], ["hour"]),
    ("not-in-list-of-lists", ["--enable-filter", "--filter-config", '{"humidity": {"not_in": [[]]}}'],
     ["humidity"]),
    ("replacement-of-another-type", ["--enable-sanitize", "--sanitize-config",
                                     '{"replace_values": {"status": {"error": false}}}'], ["status"]),
    ("text-replacement-in-a-number-column", ["--enable-sanitize", "--sanitize-config",
                                             '{"replace_values": {"temperature": {"-999": "n/a"}}}'],
     ["temperature"]),
    ("no-aggregation-function", ["--enable-aggregate", "--aggregate-config",
                                 '{"group_by": ["device_id"], "aggregations": {"readings": []}}'], ["readings"]),
]


@pytest.mark.parametrize(("flags", "words"), [c[1:] for c in WRONG_TYPES], ids=[c[0] for c in WRONG_TYPES])
def test_transform_config_with_wrong_types_is_refused_at_start_up(tmp_path, sensors, flags, words):
    result, place = run_cli(tmp_path, sensors, *flags)
    message = assert_refused(result, *words)
    assert any(k in message for k in ("filter_config", "sanitize_config", "aggregate_config")), message
    assert not place.lake.exists()
    assert not place.state_file.exists()


def test_numeric_sentinel_replaced_from_a_json_setting(tmp_path):
    """JSON object keys are always strings: {"-999": null} given in the environment must still
    replace the number -999 in a REAL column (as the same mapping does from YAML)."""
    db = make_db(tmp_path / "src" / "s.db", "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts TEXT, t REAL)",
                 rows=[(1, "2024-01-01 00:00:00", 21.5), (2, "2024-01-01 00:00:01", -999.0)],
                 insert_sql="INSERT INTO readings VALUES (?, ?, ?)")
    place = Place(tmp_path, db)
    env = clean_env(ENABLE_SANITIZE="true", SANITIZE_CONFIG='{"replace_values": {"t": {"-999": null}}}')
    result = place.run(env=env)
    assert result.returncode == 0, result.stderr
    assert [(r["id"], r["t"]) for r in read_delta_rows(place.lake)] == [(1, 21.5), (2, None)]
