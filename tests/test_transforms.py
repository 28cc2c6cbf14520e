"""Transforms: sanitize -> filter -> aggregate on Arrow batches, their start-up validation, properties
against plain-Python references, and an end-to-end run showing removed rows still advance the cursor.
"""

from __future__ import annotations

import json
import operator
import sqlite3
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from uploader_testkit import clean_env, read_delta, run_uploader, sqlite_rows

import sqlite_to_databricks_uploader as uploader

UTC = timezone.utc
T0 = datetime(2026, 1, 15, 14, 0, 0, tzinfo=UTC)

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("device_id", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("temperature", pa.float64()),
    ("humidity", pa.float64()),
    ("status", pa.string()),
])

# id, device, seconds after T0, temperature, humidity, status
RAW_ROWS = [
    (1, "a", 0, 20.0, 40.0, "ok"),
    (2, "b", 0, 21.5, None, "ok"),
    (3, "a", 30, None, 41.0, "error"),
    (4, "b", 59, -60.0, 42.0, ""),
    (5, "a", 60, 22.0, 43.0, "warn"),
    (6, "c", 61, 160.0, 44.0, None),
    (7, "a", 119, 23.0, None, "ok"),
    (8, "b", 3599, 24.5, 45.0, "error"),
    (9, "a", 3600, 25.0, 46.0, "ok"),
    (10, "c", 3660, None, None, ""),
    (11, "a", 86400, 26.0, 47.0, "ok"),
    (12, None, 86401, 27.0, 48.0, "ok"),
]
ROWS = [
    {"id": i, "device_id": d, "timestamp": T0 + timedelta(seconds=s), "temperature": t, "humidity": h,
     "status": st_}
    for i, d, s, t, h, st_ in RAW_ROWS
]
TABLE = pa.Table.from_pylist(ROWS, schema=SCHEMA)
TYPES = {f.name: f.type for f in SCHEMA}


def make_settings(transform: str, config: dict, environ: dict | None = None):
    argv = [f"--enable-{transform}", f"--{transform}-config", json.dumps(config)]
    return uploader.load_settings(argv, dict(environ or {})).settings


def plan_for(transform: str, config: dict, table: pa.Table = TABLE, environ: dict | None = None,
             timestamp_col: str | None = "timestamp"):
    types = {f.name: f.type for f in table.schema}
    return uploader.build_transform_plan(make_settings(transform, config, environ), table.column_names, types,
                                         timestamp_col)


def transform(kind: str, config: dict, table: pa.Table = TABLE, environ: dict | None = None):
    counts = uploader.TransformCounts()
    result = uploader.apply_transforms(table, plan_for(kind, config, table, environ), counts)
    return result.to_pylist(), counts


def ids(rows: list[dict]) -> list[int]:
    return [row["id"] for row in rows]


# -------------------------------------------------------------------------------------------
# Sanitize
# -------------------------------------------------------------------------------------------

def test_remove_nulls_one_column():
    rows, counts = transform("sanitize", {"remove_nulls": ["temperature"]})
    assert ids(rows) == [r["id"] for r in ROWS if r["temperature"] is not None]
    assert counts.sanitize == 2


def test_remove_nulls_several_columns_drops_a_row_with_any_of_them_null():
    rows, counts = transform("sanitize", {"remove_nulls": ["temperature", "humidity"]})
    assert ids(rows) == [r["id"] for r in ROWS if r["temperature"] is not None and r["humidity"] is not None]
    assert counts.sanitize == len(ROWS) - len(rows)


def test_replace_values_including_the_empty_string_key():
    rows, counts = transform("sanitize", {"replace_values": {"status": {"error": "unknown", "": "unknown"}}})
    expected = [{"error": "unknown", "": "unknown"}.get(r["status"], r["status"]) if r["status"] is not None
                else None for r in ROWS]
    assert [r["status"] for r in rows] == expected
    assert counts.sanitize == 0
    # Other columns are untouched.
    assert [r["temperature"] for r in rows] == [r["temperature"] for r in ROWS]


def test_replace_values_numeric_sentinel_from_yaml(tmp_path):
    table = pa.Table.from_pylist([{**ROWS[0], "temperature": -999.0}, ROWS[1]], schema=SCHEMA)
    config = tmp_path / "c.yaml"
    config.write_text("enable_sanitize: true\nsanitize_config:\n  replace_values:\n    temperature: {-999: null}\n")
    settings = uploader.load_settings(["--config", str(config)], {}).settings
    plan = uploader.build_transform_plan(settings, table.column_names, TYPES, "timestamp")
    result = uploader.apply_transforms(table, plan, uploader.TransformCounts())
    assert result.column("temperature").to_pylist() == [None, 21.5]
    assert result.schema.field("temperature").type == pa.float64()


def test_replace_values_keeps_nulls_null(tmp_path):
    """NULLs in a column with replace_values stay NULL (not NaN, not the text 'nan')."""
    table = pa.Table.from_pylist([{**ROWS[0], "temperature": None, "status": None},
                                  {**ROWS[1], "temperature": -999.0, "status": "error"},
                                  {**ROWS[2], "temperature": 20.0, "status": "ok"}], schema=SCHEMA)
    config = tmp_path / "c.yaml"
    config.write_text("enable_sanitize: true\nsanitize_config:\n  replace_values:\n"
                      "    temperature: {-999: -1.5}\n    status: {error: unknown}\n")
    settings = uploader.load_settings(["--config", str(config)], {}).settings
    plan = uploader.build_transform_plan(settings, table.column_names, TYPES, "timestamp")
    result = uploader.apply_transforms(table, plan, uploader.TransformCounts())
    assert result.column("temperature").to_pylist() == [None, -1.5, 20.0]
    assert result.column("temperature").null_count == 1
    assert result.column("status").to_pylist() == [None, "unknown", "ok"]
    assert result.schema.field("temperature").type == pa.float64()


def test_sanitize_remove_and_replace_together():
    rows, counts = transform("sanitize", {"remove_nulls": ["status"], "replace_values": {"status": {"": "none"}}})
    assert [r["status"] for r in rows] == [
        "none" if r["status"] == "" else r["status"] for r in ROWS if r["status"] is not None]
    assert counts.sanitize == 1


def test_disabled_sanitize_config_is_not_applied():
    settings = uploader.load_settings(["--sanitize-config", '{"remove_nulls": ["temperature"]}'], {}).settings
    plan = uploader.build_transform_plan(settings, TABLE.column_names, TYPES, "timestamp")
    assert uploader.apply_transforms(TABLE, plan, uploader.TransformCounts()).num_rows == len(ROWS)


# -------------------------------------------------------------------------------------------
# Filter
# -------------------------------------------------------------------------------------------

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
       "!=": operator.ne, "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b}


def reference_filter(rows: list[dict], config: dict) -> list[dict]:
    """SQL-like semantics: a comparison with NULL is never true, so a NULL value never passes."""
    def passes(row: dict) -> bool:
        for column, rule in config.items():
            for op, value in (rule.items() if isinstance(rule, dict) else [("==", rule)]):
                if row[column] is None or not OPS[op](row[column], value):
                    return False
        return True

    return [row for row in rows if passes(row)]


@pytest.mark.parametrize(("op", "value"), [
    (">", 22.0), (">=", 22.0), ("<", 22.0), ("<=", 22.0), ("==", 22.0), ("!=", 22.0),
    ("in", [20.0, 22.0, 160.0]), ("not_in", [20.0, 22.0, 160.0]), (">", 22), ("<=", -60),
])
def test_every_operator_on_a_numeric_column(op, value):
    config = {"temperature": {op: value}}
    rows, counts = transform("filter", config)
    expected = reference_filter(ROWS, config)
    assert ids(rows) == ids(expected)
    assert counts.filter == len(ROWS) - len(expected)
    assert all(r["temperature"] is not None for r in rows), "a NULL never passes a comparison"


@pytest.mark.parametrize(("op", "value"), [
    ("==", "ok"), ("!=", "ok"), ("in", ["ok", ""]), ("not_in", ["ok", ""]), (">", "ok"), ("<=", "error"),
])
def test_every_operator_on_a_text_column(op, value):
    config = {"status": {op: value}}
    rows, _ = transform("filter", config)
    assert ids(rows) == ids(reference_filter(ROWS, config))
    assert all(r["status"] is not None for r in rows)


def test_scalar_value_means_equality():
    rows, counts = transform("filter", {"status": "ok"})
    assert ids(rows) == [r["id"] for r in ROWS if r["status"] == "ok"]
    assert counts.filter == len(ROWS) - len(rows)


def test_scalar_equality_on_numbers_and_empty_string():
    assert ids(transform("filter", {"humidity": 45})[0]) == [8]
    assert ids(transform("filter", {"status": ""})[0]) == [4, 10]


def test_range_on_one_column_and_several_columns_combine_with_and():
    config = {"temperature": {">": -50, "<": 150}, "device_id": {"in": ["a", "b"]}, "status": {"!=": "error"}}
    rows, counts = transform("filter", config)
    expected = reference_filter(ROWS, config)
    assert ids(rows) == ids(expected) == [1, 2, 5, 7, 9, 11]
    assert counts.filter == len(ROWS) - len(expected)


def test_not_equal_and_not_in_drop_null_values():
    assert 6 not in ids(transform("filter", {"status": {"!=": "ok"}})[0])
    assert 12 not in ids(transform("filter", {"device_id": {"not_in": ["a"]}})[0])
    assert 10 not in ids(transform("filter", {"temperature": {"not_in": [1.0]}})[0])


def test_in_with_empty_list_keeps_nothing_and_not_in_empty_keeps_all_non_null():
    assert transform("filter", {"status": {"in": []}})[0] == []
    assert ids(transform("filter", {"status": {"not_in": []}})[0]) == [r["id"] for r in ROWS if r["status"] is not None]


@pytest.mark.parametrize("moment", [
    "2026-01-15 14:01:00", "2026-01-15T14:01:00", "2026-01-15T14:01:00Z", "2026-01-15T14:01:00.000000Z",
    "2026-01-15T16:01:00+02:00", "2026-01-15 09:01:00-05:00",
])
@pytest.mark.parametrize("op", [">", ">=", "<", "<=", "==", "!="])
def test_timestamp_column_compared_with_date_strings(moment, op):
    boundary = T0 + timedelta(seconds=60)
    rows, _ = transform("filter", {"timestamp": {op: moment}})
    assert ids(rows) == [r["id"] for r in ROWS if OPS[op](r["timestamp"], boundary)]


def test_timestamp_column_compared_with_a_plain_date_and_a_range():
    rows, _ = transform("filter", {"timestamp": {">=": "2026-01-15", "<": "2026-01-16"}})
    assert ids(rows) == [r["id"] for r in ROWS if r["timestamp"] < datetime(2026, 1, 16, tzinfo=UTC)]
    rows, _ = transform("filter", {"timestamp": {"in": ["2026-01-15 14:00:00", "2026-01-15T15:00:00Z"]}})
    assert ids(rows) == [1, 2, 9]


def test_naive_filter_dates_follow_source_timezone():
    """Naive timestamps mean UTC unless source_timezone is set; a filter's date text follows the same rule."""
    rows, _ = transform("filter", {"timestamp": {">=": "2026-01-15 15:01:00"}},
                        environ={"SOURCE_TIMEZONE": "Europe/Berlin"})  # = 14:01 UTC in January
    assert ids(rows) == [r["id"] for r in ROWS if r["timestamp"] >= T0 + timedelta(seconds=60)]


def test_filter_and_sanitize_apply_in_order_sanitize_first(tmp_path):
    """replace_values runs before the filter, so a filter sees the replaced values."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "enable_sanitize": True, "sanitize_config": {"replace_values": {"status": {"": "unknown"}}},
        "enable_filter": True, "filter_config": {"status": "unknown"},
    }))
    settings = uploader.load_settings(["--config", str(config)], {}).settings
    plan = uploader.build_transform_plan(settings, TABLE.column_names, TYPES, "timestamp")
    counts = uploader.TransformCounts()
    result = uploader.apply_transforms(TABLE, plan, counts)
    assert result.column("id").to_pylist() == [4, 10]
    assert (counts.sanitize, counts.filter) == (0, len(ROWS) - 2)


# -------------------------------------------------------------------------------------------
# Aggregate
# -------------------------------------------------------------------------------------------

def floor(moment: datetime, bucket: str) -> datetime:
    if bucket == "minute":
        return moment.replace(second=0, microsecond=0)
    if bucket == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def by_key(rows: list[dict], keys: list[str]) -> dict[tuple, dict]:
    out = {tuple(row[k] for k in keys): row for row in rows}
    assert len(out) == len(rows), "one output row per group"
    return out


def test_group_by_column_with_avg_max_and_row_count():
    config = {"group_by": ["device_id"],
              "aggregations": {"temperature": "avg", "humidity": "max", "readings": "count"}}
    rows, counts = transform("aggregate", config)
    groups = by_key(rows, ["device_id"])
    assert set(groups) == {("a",), ("b",), ("c",), (None,)}
    for device, group in groups.items():
        members = [r for r in ROWS if r["device_id"] == device[0]]
        temps = [r["temperature"] for r in members if r["temperature"] is not None]
        hums = [r["humidity"] for r in members if r["humidity"] is not None]
        if temps:
            assert group["temperature"] == pytest.approx(sum(temps) / len(temps))
        else:
            assert group["temperature"] is None
        assert group["humidity"] == (max(hums) if hums else None)
        assert group["readings"] == len(members)
    assert counts.aggregate == len(ROWS) - len(rows)
    assert set(rows[0]) == {"device_id", "temperature", "humidity", "readings"}


@pytest.mark.parametrize("bucket", ["minute", "hour", "day"])
def test_time_buckets_derived_from_the_timestamp_column(bucket):
    config = {"group_by": ["device_id", bucket], "aggregations": {"readings": "count", "id": "sum"}}
    rows, _ = transform("aggregate", config)
    expected: dict[tuple, list[dict]] = defaultdict(list)
    for row in ROWS:
        expected[(row["device_id"], floor(row["timestamp"], bucket))].append(row)
    groups = by_key(rows, ["device_id", bucket])
    assert set(groups) == set(expected)
    for key, members in expected.items():
        assert groups[key]["readings"] == len(members)
        assert groups[key]["id"] == sum(r["id"] for r in members)


def test_time_bucket_alone():
    rows, _ = transform("aggregate", {"group_by": ["hour"], "aggregations": {"readings": "count"}})
    assert {(r["hour"], r["readings"]) for r in rows} == {
        (T0, 8), (T0 + timedelta(hours=1), 2), (T0 + timedelta(days=1), 2)}


def test_every_aggregation_function():
    table = pa.Table.from_pylist([r for r in ROWS if r["device_id"] and r["temperature"] is not None
                                  and r["humidity"] is not None], schema=SCHEMA)
    source = table.to_pylist()
    functions = ["avg", "min", "max", "sum", "count", "first", "last"]
    for function in functions:
        rows, _ = transform("aggregate", {"group_by": ["device_id"], "aggregations": {"temperature": function}},
                            table=table)
        for device, group in by_key(rows, ["device_id"]).items():
            values = [r["temperature"] for r in source if r["device_id"] == device[0]]
            want = {"avg": sum(values) / len(values), "min": min(values), "max": max(values), "sum": sum(values),
                    "count": len(values), "first": values[0], "last": values[-1]}[function]
            assert group["temperature"] == pytest.approx(want), (function, device)


def test_count_and_avg_skip_nulls():
    rows, _ = transform("aggregate", {"group_by": ["device_id"], "aggregations": {"temperature": "count"}})
    groups = by_key(rows, ["device_id"])
    assert groups[("c",)]["temperature"] == 1  # one NULL temperature among two rows
    assert groups[("a",)]["temperature"] == 5


def test_aggregate_without_group_by_gives_one_row():
    rows, counts = transform("aggregate", {"aggregations": {"readings": "count", "humidity": "max", "id": "min"}})
    assert rows == [{"readings": len(ROWS), "humidity": 48.0, "id": 1}]
    assert counts.aggregate == len(ROWS) - 1


def test_min_max_first_last_on_text_and_timestamps():
    rows, _ = transform("aggregate", {"group_by": ["device_id"],
                                      "aggregations": {"status": "max", "timestamp": "last"}})
    groups = by_key(rows, ["device_id"])
    assert groups[("b",)]["status"] == "ok"
    assert groups[("b",)]["timestamp"] == T0 + timedelta(seconds=3599)


def test_several_functions_on_one_column_get_suffixed_names():
    rows, _ = transform("aggregate", {"group_by": ["device_id"],
                                      "aggregations": {"humidity": ["min", "max"], "readings": "count"}})
    group = by_key(rows, ["device_id"])[("a",)]
    assert (group["humidity_min"], group["humidity_max"], group["readings"]) == (40.0, 47.0, 6)


def test_second_bucket_and_a_real_column_named_like_a_bucket():
    rows, _ = transform("aggregate", {"group_by": ["second"], "aggregations": {"readings": "count"}})
    assert sum(r["readings"] for r in rows) == len(ROWS)
    assert len(rows) == len({r["timestamp"] for r in ROWS})
    # A table with its own 'hour' column groups by that column, not by a derived bucket.
    table = TABLE.append_column("hour", pa.array([r["id"] % 2 for r in ROWS], pa.int64()))
    rows, _ = transform("aggregate", {"group_by": ["hour"], "aggregations": {"readings": "count"}}, table=table)
    assert sorted((r["hour"], r["readings"]) for r in rows) == [(0, 6), (1, 6)]


# -------------------------------------------------------------------------------------------
# Start-up validation
# -------------------------------------------------------------------------------------------

BAD_TRANSFORMS = [
    ("sanitize", {"remove_nulls": ["pressure"]}, ["pressure"]),
    ("sanitize", {"replace_values": {"state": {"x": "y"}}}, ["state"]),
    ("sanitize", {"remove_nulls": 5}, ["remove_nulls"]),
    ("sanitize", {"replace_values": {"status": "unknown"}}, ["replace_values"]),
    ("sanitize", {"drop_nulls": ["temperature"]}, ["drop_nulls"]),
    ("filter", {"pressure": {">": 1}}, ["pressure"]),
    ("filter", {"temperature": {"=>": 5}}, ["=>", "temperature"]),
    ("filter", {"temperature": {"between": [1, 2]}}, ["between"]),
    ("filter", {"temperature": {"in": 5}}, ["in", "temperature"]),
    ("filter", {"temperature": {">": [1, 2]}}, [">", "temperature"]),
    ("filter", {"temperature": {">": True}}, [">", "temperature"]),
    ("filter", {"temperature": {}}, ["temperature"]),
    ("filter", {"timestamp": {">=": "yesterday"}}, ["yesterday", "timestamp"]),
    ("aggregate", {"group_by": ["site"], "aggregations": {"temperature": "avg"}}, ["site"]),
    ("aggregate", {"group_by": ["device_id"], "aggregations": {"pressure": "avg"}}, ["pressure"]),
    ("aggregate", {"group_by": ["device_id"], "aggregations": {"temperature": "median"}}, ["median"]),
    ("aggregate", {"group_by": ["device_id"], "aggregations": {"status": "avg"}}, ["status", "avg"]),
    ("aggregate", {"group_by": ["device_id"], "aggregations": {"device_id": "sum"}}, ["device_id"]),
    ("aggregate", {"group_by": ["device_id"]}, ["aggregations"]),
    ("aggregate", {"group_by": ["device_id"], "aggregations": "avg"}, ["aggregations"]),
    ("aggregate", {"group_by": "device_id, hour", "aggregations": {"temperature": "avg"}}, ["device_id, hour"]),
    ("aggregate", {"group_by": ["week"], "aggregations": {"temperature": "avg"}}, ["week"]),
    ("aggregate", {"groupby": ["device_id"], "aggregations": {"temperature": "avg"}}, ["groupby"]),
]


@pytest.mark.parametrize(("kind", "config", "words"), BAD_TRANSFORMS,
                         ids=[f"{k}-{json.dumps(c)[:40]}" for k, c, _ in BAD_TRANSFORMS])
def test_bad_transform_config_is_refused_at_start_up(kind, config, words):
    with pytest.raises(uploader.ConfigError) as error:
        plan_for(kind, config)
    assert error.value.exit_code == 2
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    assert f"--{kind}-config" in message, f"the source of the setting is not named: {message!r}"


def test_bad_transform_named_by_environment_variable():
    with pytest.raises(uploader.ConfigError) as error:
        settings = uploader.load_settings([], {"ENABLE_FILTER": "true",
                                               "FILTER_CONFIG": '{"pressure": {">": 1}}'}).settings
        uploader.build_transform_plan(settings, TABLE.column_names, TYPES, "timestamp")
    assert "FILTER_CONFIG" in str(error.value)
    assert "pressure" in str(error.value)


def test_time_bucket_without_timestamp_column_is_refused():
    with pytest.raises(uploader.ConfigError) as error:
        plan_for("aggregate", {"group_by": ["hour"], "aggregations": {"readings": "count"}}, timestamp_col=None)
    assert "hour" in str(error.value)


def test_disabled_transforms_are_not_validated():
    settings = uploader.load_settings(["--filter-config", '{"pressure": {"=>": 1}}'], {}).settings
    plan = uploader.build_transform_plan(settings, TABLE.column_names, TYPES, "timestamp")
    assert uploader.apply_transforms(TABLE, plan, uploader.TransformCounts()).num_rows == len(ROWS)


# -------------------------------------------------------------------------------------------
# Properties against plain-Python references
# -------------------------------------------------------------------------------------------

PROP_SCHEMA = pa.schema([("id", pa.int64()), ("device_id", pa.string()), ("timestamp", pa.timestamp("us", tz="UTC")),
                         ("level", pa.int64()), ("reading", pa.float64()), ("status", pa.string())])

numbers = st.integers(-5, 5)
statuses = st.sampled_from(["ok", "warn", "error", "", "OK"])


@st.composite
def prop_rows(draw, max_size=40):
    count = draw(st.integers(0, max_size))
    rows = []
    for i in range(count):
        rows.append({
            "id": i,
            "device_id": draw(st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))),
            "timestamp": T0 + timedelta(seconds=draw(st.integers(0, 3 * 86400)), microseconds=draw(
                st.sampled_from([0, 1, 999_999]))),
            "level": draw(st.one_of(st.none(), numbers)),
            "reading": draw(st.one_of(st.none(), numbers.map(lambda n: n / 2))),
            "status": draw(st.one_of(st.none(), statuses)),
        })
    return rows


def rule_for(column: str):
    scalar = statuses if column == "status" else (numbers if column == "level" else numbers.map(lambda n: n / 2))
    single = st.tuples(st.sampled_from([">", ">=", "<", "<=", "==", "!="]), scalar)
    listed = st.tuples(st.sampled_from(["in", "not_in"]), st.lists(scalar, max_size=4))
    return st.one_of(
        scalar,  # scalar equality
        st.lists(st.one_of(single, listed), min_size=1, max_size=3).map(dict),
    )


filter_configs = st.fixed_dictionaries({}, optional={c: rule_for(c) for c in ("level", "reading", "status")}).filter(
    bool)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prop_rows(), config=filter_configs)
def test_filter_matches_python_reference(rows, config):
    table = pa.Table.from_pylist(rows, schema=PROP_SCHEMA)
    counts = uploader.TransformCounts()
    result = uploader.apply_transforms(table, plan_for("filter", config, table), counts)
    expected = reference_filter(rows, config)
    assert result.to_pylist() == expected
    assert counts.filter == len(rows) - len(expected)


group_choices = st.lists(st.sampled_from(["device_id", "status", "minute", "hour", "day"]), unique=True,
                         max_size=3)


@hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prop_rows(), group_by=group_choices)
def test_aggregate_matches_python_reference_and_preserves_totals(rows, group_by):
    table = pa.Table.from_pylist(rows, schema=PROP_SCHEMA)
    config = {"group_by": group_by,
              "aggregations": {"id": "sum", "readings": "count", "level": "max", "reading": "sum"}}
    counts = uploader.TransformCounts()
    result = uploader.apply_transforms(table, plan_for("aggregate", config, table), counts).to_pylist()
    if not rows:
        assert result == []
        return

    def key(row):
        return tuple(floor(row["timestamp"], g) if g in ("minute", "hour", "day") else row[g] for g in group_by)

    expected: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        expected[key(row)].append(row)
    got = by_key(result, group_by)
    assert set(got) == set(expected)
    for group_key, members in expected.items():
        row = got[group_key]
        assert row["id"] == sum(m["id"] for m in members)
        assert row["readings"] == len(members)
        levels = [m["level"] for m in members if m["level"] is not None]
        assert row["level"] == (max(levels) if levels else None)
        readings = [m["reading"] for m in members if m["reading"] is not None]
        if readings:
            assert row["reading"] == pytest.approx(sum(readings))
        else:
            assert row["reading"] in (None, 0)  # SQL says NULL, pandas says 0: either is fair
    # Totals are preserved however the rows are grouped.
    assert sum(r["readings"] for r in result) == len(rows)
    assert sum(r["id"] for r in result) == sum(r["id"] for r in rows)
    assert counts.aggregate == len(rows) - len(result)


# -------------------------------------------------------------------------------------------
# End to end: all three transforms from YAML; removed rows still advance the cursor
# -------------------------------------------------------------------------------------------

def insert_rows(db: Path, rows: list[tuple]) -> None:
    with sqlite3.connect(db) as connection:
        connection.executemany("INSERT INTO sensor_logs (device_id, timestamp, temperature, humidity, status) "
                               "VALUES (?, ?, ?, ?, ?)", rows)
    connection.close()


def passing(rows: list[tuple]) -> list[tuple]:
    """Python version of the YAML below: sanitize, then filter."""
    out = []
    for device, temperature, humidity, status in rows:
        if temperature is None:
            continue
        status = "unknown" if status == "" else status
        if -50 < temperature < 150 and status != "error":
            out.append((device, temperature, humidity, status))
    return out


def delta_version(path: Path) -> int:
    return len(list((path / "_delta_log").glob("*.json"))) - 1


def test_all_transforms_end_to_end_removed_rows_advance_the_cursor(tmp_path, sample_db):
    lake = tmp_path / "lake"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "sqlite": str(sample_db), "state_dir": str(tmp_path / "state"), "target": "delta",
        "delta_path": str(lake), "once": True, "batch_size": 700,
        "enable_sanitize": True,
        "sanitize_config": {"remove_nulls": ["temperature"], "replace_values": {"status": {"": "unknown"}}},
        "enable_filter": True,
        "filter_config": {"temperature": {">": -50, "<": 150}, "status": {"not_in": ["error"]}},
        "enable_aggregate": True,
        "aggregate_config": {"group_by": ["device_id", "minute"],
                             "aggregations": {"temperature": "avg", "humidity": "max", "readings": "count"}},
    }))
    # The newest rows of the backlog are all removed: NULL temperatures, then errors.
    insert_rows(sample_db, [("sensor-a", "2026-01-15 15:00:00", None, 50.0, "ok")] * 5
                + [("sensor-b", "2026-01-15 15:00:01", 20.0, 50.0, "error")] * 5)
    source = sqlite_rows(sample_db, columns="device_id, temperature, humidity, status")

    first = run_uploader("--config", str(config), cwd=tmp_path, env=clean_env())
    assert first.returncode == 0, first.stderr
    table = read_delta(lake).to_pylist()
    kept = passing(source)
    assert sum(r["readings"] for r in table) == len(kept)
    for device in {d for d, *_ in kept}:
        assert max(r["humidity"] for r in table if r["device_id"] == device) == max(
            h for d, _, h, _ in kept if d == device)
    assert {r["minute"].second for r in table} == {0}
    version = delta_version(lake)
    state = (tmp_path / "state" / "upload_state.json").read_bytes()
    assert json.loads(state)["last_upload"]

    # Nothing new: a second run commits nothing, although the last rows were never uploaded.
    second = run_uploader("--config", str(config), cwd=tmp_path, env=clean_env())
    assert second.returncode == 0, second.stderr
    assert delta_version(lake) == version
    assert read_delta(lake).num_rows == len(table)

    # Later rows arrive, and only they.
    later = [("sensor-c", "2026-01-15 15:10:00", 30.0, 60.0, "ok")] * 4 + [
        ("sensor-c", "2026-01-15T15:10:30Z", 31.0, 61.0, "error")] * 3 + [
        ("sensor-d", "2026-01-15 15:11:00", 32.0, 62.0, "")] * 2
    insert_rows(sample_db, later)
    third = run_uploader("--config", str(config), cwd=tmp_path, env=clean_env())
    assert third.returncode == 0, third.stderr
    after = read_delta(lake).to_pylist()
    assert sum(r["readings"] for r in after) == len(kept) + 6
    new = sorted((r["device_id"], r["minute"].isoformat(), r["readings"], r["temperature"], r["humidity"])
                 for r in after if r["minute"] >= datetime(2026, 1, 15, 15, 10, tzinfo=UTC))
    assert new == [("sensor-c", "2026-01-15T15:10:00+00:00", 4, 30.0, 60.0),
                   ("sensor-d", "2026-01-15T15:11:00+00:00", 2, 32.0, 62.0)]


def test_filtered_rows_are_not_uploaded_when_the_filter_is_switched_off_later(tmp_path, sample_db):
    """Rows a filter removed are consumed: turning the filter off does not send them afterwards."""
    lake = tmp_path / "lake"
    common = ["--sqlite", str(sample_db), "--state-dir", str(tmp_path / "state"), "--target", "delta",
              "--delta-path", str(lake), "--once", "--batch-size", "1000",
              "--filter-config", json.dumps({"device_id": "sensor-a"})]
    first = run_uploader(*common, "--enable-filter", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    devices = [d for (d,) in sqlite_rows(sample_db, columns="device_id")]
    assert read_delta(lake).num_rows == devices.count("sensor-a")
    version = delta_version(lake)

    second = run_uploader(*common, cwd=tmp_path, env=clean_env(ENABLE_FILTER="false"))
    assert second.returncode == 0, second.stderr
    assert delta_version(lake) == version
    assert read_delta(lake).num_rows == devices.count("sensor-a")

    insert_rows(sample_db, [("sensor-b", "2026-01-15 16:00:00", 20.0, 50.0, "ok")] * 3)
    third = run_uploader(*common, cwd=tmp_path, env=clean_env(ENABLE_FILTER="false"))
    assert third.returncode == 0, third.stderr
    table = read_delta(lake)
    assert table.num_rows == devices.count("sensor-a") + 3
    assert table.column("device_id").to_pylist().count("sensor-b") == 3


def test_replace_then_filter_on_a_column_holding_nulls_end_to_end(tmp_path, sample_db):
    """A NULL status must not break sanitize + filter on that column (the sample has no NULL status)."""
    with sqlite3.connect(sample_db) as connection:
        connection.execute("UPDATE sensor_logs SET status = NULL WHERE id IN (5, 6)")
    connection.close()
    source = sqlite_rows(sample_db, columns="status")
    lake = tmp_path / "lake"
    result = run_uploader(
        "--sqlite", str(sample_db), "--state-dir", str(tmp_path / "state"), "--target", "delta",
        "--delta-path", str(lake), "--once", "--enable-sanitize",
        "--sanitize-config", json.dumps({"replace_values": {"status": {"": "unknown"}}}),
        "--enable-filter", "--filter-config", json.dumps({"status": {"!=": "error"}}), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    statuses = read_delta(lake).column("status").to_pylist()
    assert len(statuses) == sum(1 for (s,) in source if s is not None and s != "error")
    assert "" not in statuses and "error" not in statuses and None not in statuses
