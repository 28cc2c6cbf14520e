"""Native parameters (named and positional) bound on the server with Spark's parameterised SQL."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest
from databricks.sql.exc import ServerOperationError
from databricks.sql.parameters import (
    BigIntegerParameter,
    FloatParameter,
    SmallIntParameter,
    TimestampNTZParameter,
    TinyIntParameter,
)

UTC = dt.timezone.utc

INFERRED = [
    # value, expected Spark type of the bound literal, value read back
    (True, "boolean", True),
    (7, "int", 7),
    (2**40, "bigint", 2**40),
    ("it's a \\ string", "string", "it's a \\ string"),
    (1.5, "double", 1.5),
    (dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), "timestamp",
     dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)),
    (dt.date(2024, 2, 29), "date", dt.date(2024, 2, 29)),
    (decimal.Decimal("12345.678"), "decimal(8,3)", decimal.Decimal("12345.678")),
    (None, "void", None),
]


@pytest.mark.parametrize(("value", "spark_type", "expected"), INFERRED, ids=[r[1] for r in INFERRED])
def test_inferred_types_named_and_positional(cur: Any, value: Any, spark_type: str, expected: Any) -> None:
    cur.execute("SELECT :v AS v, typeof(:v) AS t", {"v": value})
    row = cur.fetchone()
    assert (row.v, row.t) == (expected, spark_type)
    cur.execute("SELECT ? AS v, typeof(?) AS t", [value, value])
    row = cur.fetchone()
    assert (row.v, row.t) == (expected, spark_type)


def test_array_and_map_parameters(cur: Any) -> None:
    cur.execute("SELECT :a AS a, :m AS m", {"a": [1, 2, 3], "m": {"k": "v", "k2": "w"}})
    row = cur.fetchone()
    assert list(row.a) == [1, 2, 3]
    assert dict(row.m) == {"k": "v", "k2": "w"}


def test_explicit_parameter_types(cur: Any) -> None:
    cur.execute("SELECT typeof(?) AS a, typeof(?) AS b, typeof(?) AS c, typeof(?) AS d, ? AS ntz, typeof(?) AS e",
                [TinyIntParameter(1), SmallIntParameter(2), BigIntegerParameter(3), FloatParameter(1.5),
                 TimestampNTZParameter(dt.datetime(2024, 1, 2, 3, 4, 5)),
                 TimestampNTZParameter(dt.datetime(2024, 1, 2, 3, 4, 5))])
    row = cur.fetchone()
    assert (row.a, row.b, row.c, row.d, row.e) == ("tinyint", "smallint", "bigint", "float", "timestamp_ntz")
    assert row.ntz == dt.datetime(2024, 1, 2, 3, 4, 5)


def test_parameters_in_insert(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.p (id BIGINT, name STRING, ts TIMESTAMP, ntz TIMESTAMP_NTZ, "
                "amount DECIMAL(10,2), ok BOOLEAN, d DATE)")
    cur.execute(f"INSERT INTO main.{schema}.p VALUES (:id, :name, :ts, :ntz, :amount, :ok, :d)", {
        "id": 1, "name": "O'Brien", "ts": dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
        "ntz": dt.datetime(2024, 1, 1, 10), "amount": decimal.Decimal("9.99"),
        "ok": False, "d": dt.date(2024, 1, 1)})
    cur.execute(f"SELECT * FROM main.{schema}.p WHERE name = ?", ["O'Brien"])
    row = cur.fetchone()
    assert row.asDict() == {"id": 1, "name": "O'Brien", "ts": dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
                            "ntz": dt.datetime(2024, 1, 1, 10), "amount": decimal.Decimal("9.99"),
                            "ok": False, "d": dt.date(2024, 1, 1)}


def test_255_markers_ok_256_fail_with_server_message(cur: Any) -> None:
    """Databricks documents at most 255 parameters per statement."""
    cur.execute("SELECT " + " + ".join(["?"] * 255) + " AS s", [1] * 255)
    assert cur.fetchone().s == 255
    with pytest.raises(ServerOperationError, match="too many parameters: 256 parameters were given but the "
                                                   "limit is 255"):
        cur.execute("SELECT " + " + ".join(["?"] * 256), [1] * 256)


def test_injection_is_not_possible(cur: Any) -> None:
    cur.execute("SELECT :v AS v", {"v": "'; DROP TABLE x; --"})
    assert cur.fetchone().v == "'; DROP TABLE x; --"
