"""Simple grants, hive_metastore without volumes, and an older protocol version (issue 11)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from databricks.sql.exc import ServerOperationError
from emulator_harness import Emulator


@pytest.fixture
def restricted(emulator: Emulator) -> Iterator[Any]:
    """A connection whose token may not CREATE anything (cleared by the autouse reset)."""
    token = "no-create-" + uuid.uuid4().hex
    emulator.set_config(restricted_tokens=[token])
    connection = emulator.connect(access_token=token)
    try:
        yield connection
    finally:
        connection.close()


def test_a_restricted_token_may_write_but_never_create(cur: Any, restricted: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE main.{schema}.t (a INT)")
    with restricted.cursor() as weak:
        for statement, denied in [
            (f"CREATE SCHEMA IF NOT EXISTS main.{schema}", "CREATE SCHEMA on Catalog 'main'"),
            (f"CREATE TABLE IF NOT EXISTS main.{schema}.t (a INT)", f"CREATE TABLE on Schema 'main.{schema}'"),
            (f"CREATE VOLUME IF NOT EXISTS main.{schema}.v", f"CREATE VOLUME on Schema 'main.{schema}'"),
        ]:
            with pytest.raises(ServerOperationError, match=rf"\[PERMISSION_DENIED\] User does not have {denied}"):
                weak.execute(statement)
        weak.execute(f"INSERT INTO main.{schema}.t VALUES (1)")
        weak.execute(f"SELECT a FROM main.{schema}.t WHERE a = :a", {"a": 1})
        assert [tuple(r) for r in weak.fetchall()] == [(1,)]


def test_show_volumes_and_no_volumes_in_hive_metastore(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE VOLUME main.{schema}.staging")
    cur.execute(f"SHOW VOLUMES IN main.{schema}")
    assert [r.asDict() for r in cur.fetchall()] == [{"database_name": schema, "volume_name": "staging"}]
    cur.execute(f"SHOW VOLUMES IN main.{schema} LIKE 'other*'")
    assert cur.fetchall() == []
    for statement in (f"CREATE VOLUME hive_metastore.{schema}.staging", f"SHOW VOLUMES IN hive_metastore.{schema}",
                      f"REMOVE '/Volumes/hive_metastore/{schema}/staging/x'"):
        with pytest.raises(ServerOperationError, match="UC_COMMAND_NOT_SUPPORTED"):
            cur.execute(statement)


def test_an_older_protocol_version_has_no_native_parameters(emulator: Emulator) -> None:
    emulator.set_config(protocol_version=7)
    with emulator.connect() as connection, connection.cursor() as cur:
        assert not connection.server_parameterized_queries_enabled(connection.protocol_version)
        with pytest.raises(ServerOperationError, match="UNBOUND_SQL_PARAMETER"):
            cur.execute("SELECT :v AS v", {"v": 1})
