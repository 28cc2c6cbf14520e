# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "pyspark>=4.0,<5",
#   "databricks-sql-connector>=4.1.2,<5",
#   "pyarrow>=18",
# ]
# ///
"""Local Databricks SQL warehouse emulator.

Speaks the Databricks flavour of the HiveServer2 Thrift protocol over HTTP (the one the real
`databricks-sql-connector` uses), using the connector's own generated `TCLIService.Processor`,
and executes SQL on an in-process local-mode Spark session. Tables persist as Parquet under
--data-dir. See tools/README.md for the layout, the admin/fault API and the known differences.

Run:  uv run -s tools/databricks_emulator.py --port 8765 --data-dir /tmp/dbx [--token TOKEN]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import decimal
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

# Databricks SQL warehouses run in UTC; make the Python side (pyspark converts naive datetimes
# with the process time zone) agree with the JVM side before anything imports time-aware code.
os.environ["TZ"] = "UTC"
if hasattr(time, "tzset"):
    time.tzset()

import pyarrow as pa
import pyarrow.parquet as pq
from databricks.sql.thrift_api.TCLIService import TCLIService
from databricks.sql.thrift_api.TCLIService import ttypes as T
from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

MAX_PARAMETERS = 255  # Databricks documents at most 255 parameter markers per statement
MAX_QUERY_TEXT_BYTES = 16 * 1024 * 1024  # Databricks' documented maximum query text size (16 MiB)
# Volumes are a Unity Catalog feature: the legacy per-workspace metastore has none.
NO_VOLUME_CATALOGS = ("hive_metastore",)
DEFAULT_CATALOGS = ("main", "hive_metastore", "spark_catalog", "workspace")
THRIFT_PATH_RE = re.compile(r"^/sql/(1\.0/warehouses/[^/]+|protocolv1/o/[^/]+/[^/]+)/?$")
STAGING_PREFIX = "/_staging/"
STAGING_HOSTS = ("refuse", "untrusted_tls")  # admin config "staging_host": where presigned URLs point
PRESIGNED_TTL_S = 900
SERVER_PROTOCOL = T.TProtocolVersion.SPARK_CLI_SERVICE_PROTOCOL_V8
# The token each HTTP request came with (simple grants: some tokens may not CREATE anything).
REQUEST = threading.local()

log_lock = threading.Lock()


def log(msg: str) -> None:
    # Diagnostics go to stderr; stdout carries only the single ready line.
    with log_lock:
        print(f"[emulator] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class SqlError(Exception):
    """A statement failure reported to the client as Databricks does (ERROR_STATE + SQLSTATE)."""

    def __init__(self, message: str, sql_state: str = "42000", compile_error: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sql_state = sql_state
        # Recorded warehouse traffic answers a *parse* error with a failed ExecuteStatement
        # (status ERROR_STATUS, no direct results) instead of an operation in ERROR_STATE; the
        # connector then raises DatabaseError, not ServerOperationError. Holds the error text.
        self.compile_error = compile_error


def spark_error_to_sql_error(exc: BaseException) -> SqlError:
    """Turn a (py)Spark exception into the message/SQLSTATE a warehouse would show."""
    sql_state = "XX000"
    with contextlib.suppress(Exception):
        sql_state = exc.getSqlState() or sql_state  # type: ignore[attr-defined]
    text = str(exc).strip()
    # Analysis errors carry the unresolved logical plan after ";\n" - the warehouse does not.
    text = re.split(r";\n'", text, maxsplit=1)[0]
    text = text.split("\n\nJVM stacktrace:", 1)[0].strip()
    if not text:
        text = exc.__class__.__name__
    if exc.__class__.__name__ == "ParseException":
        cls = re.match(r"\[([A-Z_.]+)\]", text)
        prefix = f"[{cls.group(1)}] " if cls else ""
        return SqlError("\n" + text + "\n", sql_state, compile_error=(
            f"Error running query: {prefix}org.apache.spark.sql.catalyst.parser.ParseException: \n{text}\n"))
    return SqlError(text, sql_state)


# --------------------------------------------------------------------------------------------
# Counters and fault injection
# --------------------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.rpc: Counter[str] = Counter()
            self.statements: Counter[str] = Counter()
            self.http: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.conflicts: Counter[str] = Counter()
            self.files: Counter[str] = Counter()  # Files API requests per HTTP method
            # Per client (X-Emulator-Client header, else a digest of the token): a benchmark shows
            # which clients ran SQL and which only moved files.
            self.clients: dict[str, Counter[str]] = {}
            self.rows_inserted = 0

    def bump(self, bucket: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, bucket)[key] += n

    def bump_client(self, client: str, key: str) -> None:
        with self._lock:
            self.clients.setdefault(client, Counter())[key] += 1

    def add_rows(self, n: int) -> None:
        with self._lock:
            self.rows_inserted += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rpc": dict(self.rpc),
                "statements": dict(self.statements),
                "http": dict(self.http),
                "faults_fired": dict(self.faults),
                "conflicts": dict(self.conflicts),
                "files": dict(self.files),
                "files_total": sum(self.files.values()),
                "clients": {c: self._client_view(n) for c, n in self.clients.items()},
                "rows_inserted": self.rows_inserted,
                "rpc_total": sum(self.rpc.values()),
                "statements_total": sum(self.statements.values()),
            }


    @staticmethod
    def _client_view(n: Counter[str]) -> dict[str, Any]:
        files = {k[len("files "):]: v for k, v in n.items() if k.startswith("files ")}
        return {"rpc": n["rpc"], "statements": n["statements"], "files": files,
                "files_total": sum(files.values())}


FAULT_KINDS = ("unavailable", "throttle", "drop_after_execute", "drop_after_write", "drop", "delay", "refuse")
FAULT_SCOPES = ("thrift", "staging", "files", "all")
FILES_WRITE_METHODS = ("PUT", "DELETE", "POST")


@dataclass
class Fault:
    kind: str
    count: int | None = None  # requests left; None = unlimited within the time window
    until: float | None = None  # time.monotonic() deadline; None = until count is used up
    rpc: str | None = None  # only requests of this Thrift RPC (e.g. "ExecuteStatement")
    statement: str | None = None  # only ExecuteStatement whose kind or text matches this
    retry_after: int | None = None
    delay: float = 0.0
    scope: str = "thrift"  # "thrift", "staging", "files" or "all"
    method: str | None = None  # only HTTP requests of this method (Files API, presigned URLs)
    path: str | None = None  # only HTTP requests whose path contains this (Files API)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fault:
        kind = d.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        seconds = d.get("seconds")
        count = d.get("count")
        if count is None and seconds is None and kind != "refuse":
            count = 1
        rpc = d.get("rpc")
        if kind == "drop_after_execute" and rpc is None:
            rpc = "ExecuteStatement"
        # drop_after_write only makes sense for the Files API: its default scope is "files".
        scope = d.get("scope", "files" if kind == "drop_after_write" else "thrift")
        if scope not in FAULT_SCOPES:
            raise ValueError(f"unknown fault scope {scope!r}; expected one of {FAULT_SCOPES}")
        return cls(
            kind=kind,
            count=count,
            until=(time.monotonic() + float(seconds)) if seconds is not None else None,
            rpc=rpc,
            statement=d.get("statement"),
            retry_after=d.get("retry_after"),
            delay=float(d.get("delay", 0.0)),
            scope=scope,
            method=(d.get("method") or "").upper() or None,
            path=d.get("path"),
        )

    def expired(self) -> bool:
        if self.count is not None and self.count <= 0:
            return True
        return self.until is not None and time.monotonic() >= self.until

    def matches(self, scope: str, rpc: str | None, statement: str | None,
                method: str | None = None, path: str | None = None) -> bool:
        if self.scope != "all" and self.scope != scope:
            return False
        if self.rpc and self.rpc != rpc:
            return False
        if self.method and self.method != method:
            return False
        if self.path and (path is None or self.path not in path):
            return False
        if self.statement:
            if statement is None:
                return False
            wanted = self.statement.upper()
            if classify_statement(statement) != wanted and wanted not in statement.upper():
                return False
        return True

    def describe(self) -> dict[str, Any]:
        left = None if self.until is None else max(0.0, self.until - time.monotonic())
        return {"kind": self.kind, "count": self.count, "seconds_left": left, "rpc": self.rpc,
                "statement": self.statement, "retry_after": self.retry_after, "delay": self.delay,
                "scope": self.scope, "method": self.method, "path": self.path}


class Faults:
    def __init__(self, stats: Stats) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._stats = stats
        self.refuse_until = 0.0

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.refuse_until = 0.0

    def take(self, kinds: tuple[str, ...], scope: str, rpc: str | None,
             statement: str | None, method: str | None = None, path: str | None = None) -> Fault | None:
        """Consume one use of the first active fault of these kinds that matches the request."""
        with self._lock:
            self._faults = [f for f in self._faults if not f.expired()]
            for f in self._faults:
                if f.kind in kinds and f.matches(scope, rpc, statement, method, path):
                    if f.count is not None:
                        f.count -= 1
                    self._stats.bump("faults", f.kind)
                    return f
        return None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            self._faults = [f for f in self._faults if not f.expired()]
            return [f.describe() for f in self._faults]


# --------------------------------------------------------------------------------------------
# SQL text helpers: classification, catalog-name rewriting, literal parsing
# --------------------------------------------------------------------------------------------
def strip_sql(sql: str) -> str:
    s = sql.strip()
    while s.endswith(";"):
        s = s[:-1].rstrip()
    return s


def _leading_words(sql: str, n: int) -> list[str]:
    s = re.sub(r"(--[^\n]*\n|/\*.*?\*/)", " ", sql, flags=re.S)
    return re.findall(r"[A-Za-z_]+", s)[:n]


def classify_statement(sql: str) -> str:
    """Statement kind used by the counters: INSERT, COPY INTO, PUT, SELECT, CREATE, ..."""
    words = [w.upper() for w in _leading_words(sql, 2)]
    if not words:
        return "EMPTY"
    first = words[0]
    if first in ("WITH", "VALUES", "FROM", "TABLE"):
        return "SELECT"
    if first == "COPY":
        return "COPY INTO"
    if first == "DESC":
        return "DESCRIBE"
    return first


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def unquote_ident(tok: str) -> str:
    if tok.startswith("`") and tok.endswith("`"):
        return tok[1:-1].replace("``", "`")
    return tok


def sql_string(value: str) -> str:
    """A Spark SQL string literal (backslash escapes are on by default in Spark)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


CREATE_RE = re.compile(
    r"^CREATE\s+(?:OR\s+REPLACE\s+)?(?:EXTERNAL\s+|TEMPORARY\s+|TEMP\s+|MANAGED\s+)?"
    r"(SCHEMA|DATABASE|TABLE|VOLUME|VIEW|CATALOG|FUNCTION)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"((?:`(?:[^`]|``)+`|\w+)(?:\.(?:`(?:[^`]|``)+`|\w+))*)", re.I | re.S)


def refuse_create(sql: str, current_schema: str) -> None:
    """Unity Catalog's answer to a CREATE from a principal without the CREATE privilege. It checks
    the privilege on the parent before it looks whether the object exists (IF NOT EXISTS or not)."""
    sql = strip_sql(sql)
    if classify_statement(sql) != "CREATE":
        return
    m = CREATE_RE.match(sql)
    kind = m.group(1).upper() if m else "object"
    parts = split_name(m.group(2)) if m else []
    if kind in ("SCHEMA", "DATABASE"):
        privilege, on = "CREATE SCHEMA", f"Catalog '{parts[0] if len(parts) > 1 else 'main'}'"
    elif kind == "CATALOG":
        privilege, on = "CREATE CATALOG", "Metastore 'metastore'"
    else:
        parent = parts[:-1] if len(parts) > 1 else [current_schema]
        parent = parent if len(parent) == 2 else ["main", *parent]
        privilege, on = f"CREATE {'TABLE' if kind == 'VIEW' else kind}", f"Schema '{'.'.join(parent)}'"
    raise SqlError(f"[PERMISSION_DENIED] User does not have {privilege} on {on}. SQLSTATE: 42501", "42501")


def no_volumes_in(catalog: str, what: str) -> SqlError | None:
    """Volumes live in Unity Catalog; the legacy hive_metastore catalog cannot hold one."""
    if catalog.lower() not in NO_VOLUME_CATALOGS:
        return None
    return SqlError(f"[UC_COMMAND_NOT_SUPPORTED.WITHOUT_RECOMMENDATION] The command(s): {what} in catalog "
                    f"`{catalog}` are not supported in Unity Catalog. Volumes exist only in Unity Catalog "
                    "catalogs. SQLSTATE: 0AKUC", "0AKUC")


_TOKEN_RE = re.compile(
    r"""(?P<ws>\s+)|(?P<lc>--[^\n]*)|(?P<bc>/\*.*?\*/)|(?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*")"""
    r"""|(?P<bt>`(?:[^`]|``)*`)|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<dot>\.)|(?P<other>.)""",
    re.S,
)
_SCHEMA_WORDS = {"SCHEMA", "SCHEMAS", "DATABASE", "DATABASES", "NAMESPACE", "NAMESPACES", "USE"}


def rewrite_catalogs(sql: str, catalogs: set[str]) -> str:
    """Map Unity Catalog style `catalog.schema.table` names onto Spark's session catalog.

    Only identifier chains whose first part is a known catalog are touched: three-part names
    anywhere, two-part `catalog.schema` only where a schema is expected (CREATE SCHEMA, USE,
    SHOW TABLES IN), a single catalog name only in SHOW SCHEMAS IN <catalog>. Strings,
    comments and backticked names are tokenised so that they are never rewritten by accident.
    """
    toks = [(m.lastgroup, m.group()) for m in _TOKEN_RE.finditer(sql)]
    out: list[str] = []
    recent_words: list[str] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        if kind in ("word", "bt"):
            chain = [i]
            j = i + 1
            while j + 1 < len(toks) and toks[j][0] == "dot" and toks[j + 1][0] in ("word", "bt"):
                chain.append(j + 1)
                j += 2
            parts = [toks[k][1] for k in chain]
            first = unquote_ident(parts[0]).lower()
            is_catalog = first in catalogs
            context = recent_words[-4:]
            rewrite = False
            if is_catalog and len(parts) >= 3:
                rewrite = True
            elif is_catalog and len(parts) == 2:
                rewrite = bool(_SCHEMA_WORDS & set(context)) or (
                    context[-1:] in (["IN"], ["FROM"]) and bool({"TABLES", "VIEWS"} & set(context))
                )
            elif is_catalog and len(parts) == 1 and kind == "word":
                rewrite = context[-1:] in (["IN"], ["FROM"]) and bool(
                    {"SCHEMAS", "DATABASES", "NAMESPACES"} & set(context)
                )
            if rewrite:
                parts[0] = "spark_catalog"
            out.append(".".join(parts))
            if kind == "word" and len(parts) == 1:
                recent_words.append(text.upper())
            else:
                recent_words.append("<ident>")
            i = j
            continue
        out.append(text)
        i += 1
    return "".join(out)


def parse_option_list(text: str) -> dict[str, str]:
    """Parse `('k' = 'v', 'k2' = true)` option lists of COPY INTO."""
    opts: dict[str, str] = {}
    for m in re.finditer(r"'((?:[^'\\]|\\.|'')*)'\s*=\s*('((?:[^'\\]|\\.|'')*)'|[A-Za-z0-9_.+-]+)", text):
        key = m.group(1).replace("''", "'")
        val = m.group(3) if m.group(3) is not None else m.group(2)
        opts[key] = val.replace("''", "'")
    return opts


def parse_string_literal(text: str) -> str:
    return text[1:-1].replace("''", "'").replace("\\'", "'")


# --------------------------------------------------------------------------------------------
# Result data
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    table: pa.Table
    is_staging: bool = False
    num_modified_rows: int | None = None


def empty_result() -> Result:
    return Result(pa.table({"Result": pa.array([], pa.string())}))


def arrow_to_ttype(t: pa.DataType) -> T.TTypeEntry:
    qualifiers = None
    if pa.types.is_boolean(t):
        tid = T.TTypeId.BOOLEAN_TYPE
    elif pa.types.is_int8(t):
        tid = T.TTypeId.TINYINT_TYPE
    elif pa.types.is_int16(t):
        tid = T.TTypeId.SMALLINT_TYPE
    elif pa.types.is_int32(t):
        tid = T.TTypeId.INT_TYPE
    elif pa.types.is_int64(t):
        tid = T.TTypeId.BIGINT_TYPE
    elif pa.types.is_float32(t):
        tid = T.TTypeId.FLOAT_TYPE
    elif pa.types.is_float64(t):
        tid = T.TTypeId.DOUBLE_TYPE
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        tid = T.TTypeId.STRING_TYPE
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        tid = T.TTypeId.BINARY_TYPE
    elif pa.types.is_date(t):
        tid = T.TTypeId.DATE_TYPE
    elif pa.types.is_timestamp(t):
        tid = T.TTypeId.TIMESTAMP_TYPE
    elif pa.types.is_decimal(t):
        tid = T.TTypeId.DECIMAL_TYPE
        qualifiers = T.TTypeQualifiers(qualifiers={
            "precision": T.TTypeQualifierValue(i32Value=t.precision),
            "scale": T.TTypeQualifierValue(i32Value=t.scale),
        })
    elif pa.types.is_map(t):
        tid = T.TTypeId.MAP_TYPE
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        tid = T.TTypeId.ARRAY_TYPE
    elif pa.types.is_struct(t):
        tid = T.TTypeId.STRUCT_TYPE
    elif pa.types.is_null(t):
        tid = T.TTypeId.NULL_TYPE
    elif pa.types.is_interval(t) or pa.types.is_duration(t):
        tid = T.TTypeId.INTERVAL_DAY_TIME_TYPE
    else:
        tid = T.TTypeId.STRING_TYPE
    return T.TTypeEntry(primitiveEntry=T.TPrimitiveTypeEntry(type=tid, typeQualifiers=qualifiers))


def arrow_to_table_schema(schema: pa.Schema) -> T.TTableSchema:
    return T.TTableSchema(columns=[
        T.TColumnDesc(columnName=f.name, typeDesc=T.TTypeDesc(types=[arrow_to_ttype(f.type)]),
                      position=i + 1, comment="")
        for i, f in enumerate(schema)
    ])


def _null_bitmap(arr: pa.Array) -> bytes:
    """HiveServer2 column null bitmap: bit i (LSB first) set when row i is NULL."""
    mask = arr.is_null().to_pylist()
    out = bytearray((len(mask) + 7) // 8)
    for i, is_null in enumerate(mask):
        if is_null:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _to_hive_string(v: Any) -> str:
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f").rstrip("0").rstrip(".")
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def arrow_column_to_tcolumn(arr: pa.ChunkedArray | pa.Array) -> T.TColumn:
    """Column-based (non-Arrow) encoding, as a warehouse sends when Arrow is not negotiated."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    t = arr.type
    nulls = _null_bitmap(arr)
    values = arr.to_pylist()

    def filled(default: Any) -> list[Any]:
        return [default if v is None else v for v in values]

    if pa.types.is_boolean(t):
        return T.TColumn(boolVal=T.TBoolColumn(values=filled(False), nulls=nulls))
    if pa.types.is_int8(t):
        return T.TColumn(byteVal=T.TByteColumn(values=filled(0), nulls=nulls))
    if pa.types.is_int16(t):
        return T.TColumn(i16Val=T.TI16Column(values=filled(0), nulls=nulls))
    if pa.types.is_int32(t):
        return T.TColumn(i32Val=T.TI32Column(values=filled(0), nulls=nulls))
    if pa.types.is_int64(t):
        return T.TColumn(i64Val=T.TI64Column(values=filled(0), nulls=nulls))
    if pa.types.is_floating(t):
        return T.TColumn(doubleVal=T.TDoubleColumn(values=[float(v) for v in filled(0.0)], nulls=nulls))
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return T.TColumn(binaryVal=T.TBinaryColumn(values=filled(b""), nulls=nulls))
    strings = ["" if v is None else _to_hive_string(v) for v in values]
    return T.TColumn(stringVal=T.TStringColumn(values=strings, nulls=nulls))


def slice_for_fetch(table: pa.Table, offset: int, max_rows: int, max_bytes: int) -> pa.Table:
    """Next page of a result: at most max_rows rows and (roughly) max_bytes bytes, >= 1 row."""
    n = max(1, min(max_rows or 10000, table.num_rows - offset))
    chunk = table.slice(offset, n)
    if max_bytes and chunk.num_rows > 1 and chunk.nbytes > max_bytes:
        per_row = max(1, chunk.nbytes // chunk.num_rows)
        n = max(1, min(n, max_bytes // per_row))
        chunk = table.slice(offset, n)
    return chunk


# --------------------------------------------------------------------------------------------
# Storage: data dir layout, catalog snapshot, journals
# --------------------------------------------------------------------------------------------
def atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Storage:
    """Everything under --data-dir.

    DIR/warehouse/<schema>.db/<table>/*.parquet   table data (Spark's managed-table layout)
    DIR/warehouse/<table>/*.parquet               tables of the `default` schema
    DIR/warehouse/.../<table>/_copy_into_log.json COPY INTO load history of that table
    DIR/volumes/<catalog>/<schema>/<volume>/...   files of Unity Catalog volumes
    DIR/catalog.json                              schemas, tables (schema, location) and catalogs
    DIR/_txn/                                     commit journals of COPY INTO (redo log)
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.warehouse = self.root / "warehouse"
        self.volumes = self.root / "volumes"
        self.txn = self.root / "_txn"
        self.catalog_file = self.root / "catalog.json"
        for d in (self.warehouse, self.volumes, self.txn):
            d.mkdir(parents=True, exist_ok=True)

    def load_catalog(self) -> dict[str, Any]:
        if self.catalog_file.exists():
            return json.loads(self.catalog_file.read_text())
        return {"catalogs": list(DEFAULT_CATALOGS), "schemas": ["default"], "tables": []}

    def volume_dir(self, catalog: str, schema: str, volume: str) -> Path:
        return self.volumes / catalog / schema / volume

    def resolve_volume_path(self, vpath: str) -> tuple[Path, Path]:
        """'/Volumes/c/s/v/rest' -> (volume dir, local path). Raises SqlError when invalid."""
        parts = [p for p in vpath.split("/") if p]
        if len(parts) < 4 or parts[0] != "Volumes":
            raise SqlError(f"[INVALID_PARAMETER_VALUE] Invalid volume path: {vpath}. Expected "
                           "/Volumes/<catalog>/<schema>/<volume>/<path>", "22023")
        if any(p in (".", "..") for p in parts):
            raise SqlError(f"[INVALID_PARAMETER_VALUE] Invalid volume path: {vpath}", "22023")
        refused = no_volumes_in(parts[1], f"access to {vpath}")
        if refused:
            raise refused
        vdir = self.volume_dir(parts[1], parts[2], parts[3])
        if not vdir.is_dir():
            raise SqlError(f"[UC_VOLUME_NOT_FOUND] Volume `{parts[1]}`.`{parts[2]}`.`{parts[3]}` "
                           "does not exist.", "42704")
        return vdir, vdir.joinpath(*parts[4:])

    # ---- COPY INTO commit journal: data files and load history become visible together ----
    @staticmethod
    def history_path(location: Path) -> Path:
        return location / "_copy_into_log.json"

    def read_history(self, location: Path) -> dict[str, Any]:
        p = self.history_path(location)
        return json.loads(p.read_text()) if p.exists() else {}

    def commit(self, txid: str, staged: Path, location: Path, files: list[str],
               history: dict[str, Any]) -> None:
        journal = self.txn / f"{txid}.json"
        atomic_write_json(journal, {"staged": str(staged), "location": str(location),
                                    "files": files, "history": history})
        self.apply_journal(journal)

    def apply_journal(self, journal: Path) -> None:
        """Redo a commit. Idempotent, so it is also the crash-recovery path at start-up."""
        j = json.loads(journal.read_text())
        staged, location = Path(j["staged"]), Path(j["location"])
        for rel in j["files"]:
            src, dst = staged / rel, location / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        if j["history"]:
            hist = self.read_history(location)
            hist.update(j["history"])
            atomic_write_json(self.history_path(location), hist)
        journal.unlink()
        shutil.rmtree(staged.parent if staged.name == "data" else staged, ignore_errors=True)

    def recover(self) -> None:
        for journal in sorted(self.txn.glob("*.json")):
            log(f"replaying commit journal {journal.name}")
            self.apply_journal(journal)
        for leftover in self.txn.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Files API (/api/2.0/fs/files, /api/2.0/fs/directories) on the same volume storage as PUT/COPY INTO
# --------------------------------------------------------------------------------------------
FILES_API_RE = re.compile(r"^/api/2\.0/fs/(files|directories)(/.*)$")
FILES_ENDPOINTS_PATH = "/api/2.0/fs/endpoints"
FILES_PRESIGNED_PATHS = ("/api/2.0/fs/create-upload-part-urls", "/api/2.0/fs/create-download-url",
                         "/api/2.0/fs/create-resumable-upload-url", "/api/2.0/fs/create-abort-upload-url")
CLIENT_UA_RE = re.compile(r"\bemulator-client/([A-Za-z0-9._-]+)")  # a client's own label for the stats
FILES_LIST_MAX_PAGE = 1000  # Databricks coerces larger page_size values to 1000
EMULATOR_WORKSPACE_ID = "1000000000000001"  # what /.well-known/databricks-config names this "workspace"
SINGLE_SHOT_MAX_BYTES = 5 * 1024**3  # one PUT of the Files API takes at most 5 GiB


class FilesError(Exception):
    """An answer of the Files API other than success, in Databricks' JSON error shape."""

    def __init__(self, status: int, error_code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message, self.reason = status, error_code, message, reason

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error_code": self.error_code, "message": self.message}
        if self.reason:
            # The reason is what clients (the Databricks CLI) test to tell "not empty" from other 400s.
            out["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": self.reason,
                               "domain": "filesystem.databricks.com"}]
        return out


def http_date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


@dataclass
class FilesAnswer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ctype: str = "application/json"


class FilesApi:
    """The Files API's semantics on Storage: /Volumes/<c>/<s>/<v>/<path> is DIR/volumes/c/s/v/path.

    Uploads land in DIR/_upload_tmp (same file system) and are renamed into place, so a reader (a
    download, a COPY INTO) never sees a partial file and no temp file ever shows up in a listing.
    """

    def __init__(self, storage: Storage, config: dict[str, Any]) -> None:
        self.storage = storage
        self.config = config
        self.tmp_dir = storage.root / "_upload_tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.glob("*.upload"):  # uploads cut short by a crash or kill
            leftover.unlink(missing_ok=True)

    # ---- paths ----
    def resolve(self, vpath: str, is_file: bool) -> tuple[Path, Path]:
        """'/Volumes/c/s/v/rest' -> (volume dir, local path), or a FilesError as Databricks answers."""
        parts = [p for p in vpath.split("/") if p]
        if len(parts) < (5 if is_file else 4) or parts[0] != "Volumes":
            raise FilesError(400, "INVALID_PARAMETER_VALUE", f"Invalid path: {vpath}. Expected "
                             "/Volumes/<catalog>/<schema>/<volume>/<path>")
        try:
            return self.storage.resolve_volume_path(vpath)
        except SqlError as exc:
            if "UC_VOLUME_NOT_FOUND" in str(exc):
                raise FilesError(404, "NOT_FOUND", f"Volume '{'.'.join(parts[1:4])}' does not exist.",
                                 "FILES_API_VOLUME_NOT_FOUND") from exc
            raise FilesError(400, "INVALID_PARAMETER_VALUE", str(exc)) from exc

    @staticmethod
    def _not_found(vpath: str, what: str) -> FilesError:
        reason = "FILES_API_FILE_IS_NOT_FOUND" if what == "file" else "FILES_API_DIRECTORY_IS_NOT_FOUND"
        return FilesError(404, "NOT_FOUND", f"The {what} being accessed is not found. Path: {vpath}", reason)

    def new_temp(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.upload"

    # ---- files ----
    def put_file(self, vpath: str, tmp: Path, overwrite: bool) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=True)
        if target.is_dir():
            raise FilesError(409, "ALREADY_EXISTS", f"A directory already exists at {vpath}.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # parents are created implicitly
        except (FileExistsError, NotADirectoryError) as exc:
            raise FilesError(409, "ALREADY_EXISTS", f"A file exists where a parent directory of {vpath} "
                             "should be.") from exc
        if overwrite:
            os.replace(tmp, target)
            return FilesAnswer(204)
        try:
            # link() creates the name only if it is free, atomically: two racing uploads with
            # overwrite=false cannot both win, and neither sees the other's half-written bytes.
            os.link(tmp, target)
        except FileExistsError as exc:
            raise FilesError(409, "ALREADY_EXISTS", f"The file being created already exists: {vpath}",
                             "FILES_API_FILE_ALREADY_EXISTS") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return FilesAnswer(204)

    def get_file(self, vpath: str, headers: Any, head: bool) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=True)
        if not target.is_file():
            raise self._not_found(vpath, "file")
        st = target.stat()
        meta = {"Last-Modified": http_date(st.st_mtime), "Accept-Ranges": "bytes"}
        unmodified = headers.get("If-Unmodified-Since")
        if unmodified and self._modified_since(st.st_mtime, unmodified):
            raise FilesError(412, "FAILED_PRECONDITION", "The file has been modified since "
                             f"{unmodified}: {vpath}")
        if head:
            return FilesAnswer(200, {**meta, "Content-Length": str(st.st_size)}, b"", "application/octet-stream")
        data = target.read_bytes()
        rng = self._range(headers.get("Range"), len(data))
        if rng is None:
            return FilesAnswer(200, meta, data, "application/octet-stream")
        start, end = rng
        meta["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return FilesAnswer(206, meta, data[start:end + 1], "application/octet-stream")

    @staticmethod
    def _modified_since(mtime: float, value: str) -> bool:
        from email.utils import parsedate_to_datetime

        try:
            return int(mtime) > parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return False

    @staticmethod
    def _range(value: str | None, size: int) -> tuple[int, int] | None:
        """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> inclusive (start, end); None = whole file."""
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value or "")
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if not m.group(1):
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or start > end:
            raise FilesError(416, "INVALID_PARAMETER_VALUE", f"Range {value} is not satisfiable for "
                             f"{size} bytes.")
        return start, end

    def delete_file(self, vpath: str) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=True)
        if not target.is_file():
            raise self._not_found(vpath, "file")
        try:
            target.unlink()
        except FileNotFoundError as exc:  # deleted by a concurrent request
            raise self._not_found(vpath, "file") from exc
        return FilesAnswer(204)

    # ---- directories ----
    def create_directory(self, vpath: str) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=False)
        try:
            target.mkdir(parents=True, exist_ok=True)  # mkdir -p: idempotent
        except (FileExistsError, NotADirectoryError) as exc:
            raise FilesError(409, "ALREADY_EXISTS", f"A file already exists at this path: {vpath}") from exc
        return FilesAnswer(204)

    def directory_metadata(self, vpath: str) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=False)
        if not target.is_dir():
            raise self._not_found(vpath, "directory")
        return FilesAnswer(200)

    def delete_directory(self, vpath: str) -> FilesAnswer:
        vdir, target = self.resolve(vpath, is_file=False)
        if target == vdir:
            raise FilesError(400, "INVALID_PARAMETER_VALUE", f"The volume root cannot be deleted: {vpath}. "
                             "Use DROP VOLUME.")
        if not target.is_dir():
            raise self._not_found(vpath, "directory")
        try:
            target.rmdir()
        except OSError as exc:
            raise FilesError(400, "INVALID_PARAMETER_VALUE", f"The directory is not empty: {vpath}",
                             "FILES_API_DIRECTORY_IS_NOT_EMPTY") from exc
        return FilesAnswer(204)

    def list_directory(self, vpath: str, page_size: str | None, page_token: str | None) -> FilesAnswer:
        _, target = self.resolve(vpath, is_file=False)
        if not target.is_dir():
            raise self._not_found(vpath, "directory")
        size = self._page_size(page_size)
        after = self._decode_token(page_token)
        names = sorted(n for n in os.listdir(target) if after is None or n > after)
        page, more = names[:size], len(names) > size
        base = "/" + "/".join(p for p in vpath.split("/") if p)
        contents = [e for e in (self._entry(base, target / n, n) for n in page) if e is not None]
        out: dict[str, Any] = {"contents": contents}
        if more:
            out["next_page_token"] = self._encode_token(page[-1])
        return FilesAnswer(200, {}, json.dumps(out).encode())

    def _page_size(self, value: str | None) -> int:
        default = int(self.config.get("files_list_page_size") or FILES_LIST_MAX_PAGE)
        try:
            wanted = int(value) if value else default
        except ValueError as exc:
            raise FilesError(400, "INVALID_PARAMETER_VALUE", f"Invalid page_size: {value}") from exc
        # The admin default also caps what a client asks for, so pagination shows with few files.
        return max(1, min(wanted, default, FILES_LIST_MAX_PAGE))

    @staticmethod
    def _encode_token(name: str) -> str:
        import base64

        return base64.urlsafe_b64encode(name.encode()).decode()

    @staticmethod
    def _decode_token(token: str | None) -> str | None:
        import base64

        if not token:
            return None
        try:
            return base64.urlsafe_b64decode(token.encode()).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise FilesError(400, "INVALID_PARAMETER_VALUE", "Invalid page_token.") from exc

    @staticmethod
    def _entry(base: str, local: Path, name: str) -> dict[str, Any] | None:
        try:
            st = local.stat()
        except FileNotFoundError:  # deleted while listing
            return None
        if local.is_dir():
            return {"path": f"{base}/{name}/", "is_directory": True, "name": name}
        return {"path": f"{base}/{name}", "is_directory": False, "file_size": st.st_size,
                "last_modified": int(st.st_mtime * 1000), "name": name}


# --------------------------------------------------------------------------------------------
# Parameters: TSparkParameter -> values accepted by spark.sql(query, args=...)
# --------------------------------------------------------------------------------------------
class ParameterBinder:
    def __init__(self, functions: Any) -> None:
        self.F = functions

    def _literal(self, type_name: str, value: str | None, arguments: list[Any] | None,
                 top_level: bool) -> Any:
        """Spark's parameter binding accepts only literals and array()/map() constructors, so a
        typed SQL literal (`5L`, `TIMESTAMP_NTZ '...'`) is parsed by Spark instead of CAST()."""
        F = self.F
        t = (type_name or "STRING").upper().strip()

        def wrap(v: Any) -> Any:
            return v if top_level else F.lit(v)

        if t in ("VOID", "NULL") or (value is None and not arguments):
            return None if top_level else F.lit(None)
        if t == "ARRAY":
            return F.array(*[self._arg(a) for a in arguments or []])
        if t == "MAP":
            return F.create_map(*[self._arg(a) for a in arguments or []])
        assert value is not None
        try:
            if t == "STRING" or t.startswith(("VARCHAR", "CHAR")):
                return wrap(value)
            if t == "BOOLEAN":
                low = value.strip().lower()
                if low not in ("true", "false"):
                    raise ValueError(value)
                return wrap(low == "true")
            if t in ("INT", "INTEGER"):
                return wrap(int(value))
            if t in ("BIGINT", "LONG"):
                return F.expr(f"{int(value)}L")
            if t in ("SMALLINT", "SHORT"):
                return F.expr(f"{int(value)}S")
            if t in ("TINYINT", "BYTE"):
                return F.expr(f"{int(value)}Y")
            if t == "DOUBLE":
                return wrap(float(value))
            if t in ("FLOAT", "REAL"):
                f = float(value)
                return F.expr(f"{f!r}F") if f == f and abs(f) != float("inf") else wrap(f)
            if t.startswith(("DECIMAL", "NUMERIC")):
                d = decimal.Decimal(value)
                m = re.match(r"\w+\((\d+)\s*,\s*(\d+)\)", t)
                if m:
                    d = d.quantize(decimal.Decimal(1).scaleb(-int(m.group(2))))
                return wrap(d)
            if t == "DATE":
                return F.expr(f"DATE {sql_string(value)}")
            if t == "TIMESTAMP":
                return F.expr(f"TIMESTAMP {sql_string(value)}")
            if t == "TIMESTAMP_NTZ":
                return F.expr(f"TIMESTAMP_NTZ {sql_string(value)}")
            if t == "BINARY":
                return wrap(bytes.fromhex(value))
            if t.startswith("INTERVAL"):
                return F.expr(f"INTERVAL {sql_string(value)} {t[len('INTERVAL'):].strip()}")
        except SqlError:
            raise
        except Exception as exc:
            raise SqlError(f"[INVALID_PARAMETER_VALUE] The value '{value}' cannot be bound as a "
                           f"parameter of type {t}: {exc}", "22023") from exc
        raise SqlError(f"[UNSUPPORTED_DATATYPE] Unsupported parameter type {t}.", "0A000")

    def _arg(self, a: Any) -> Any:
        return self._literal(a.type, a.value, a.arguments, top_level=False)

    def bind(self, params: list[T.TSparkParameter] | None) -> dict[str, Any] | list[Any] | None:
        if not params:
            return None
        if len(params) > MAX_PARAMETERS:
            raise SqlError(
                f"Parameterized query has too many parameters: {len(params)} parameters were given "
                f"but the limit is {MAX_PARAMETERS}.", "54000")
        values = []
        for p in params:
            raw = None
            if p.value is not None:
                raw = p.value.stringValue
                if raw is None and p.value.doubleValue is not None:
                    raw = repr(p.value.doubleValue)
                if raw is None and p.value.booleanValue is not None:
                    raw = str(p.value.booleanValue).lower()
            values.append((p, self._literal(p.type, raw, p.arguments, top_level=True)))
        if all(p.name for p, _ in values):
            return {p.name: v for p, v in values}
        return [v for _, v in values]


# --------------------------------------------------------------------------------------------
# The SQL engine on Spark
# --------------------------------------------------------------------------------------------
PUT_RE = re.compile(r"^PUT\s+('(?:[^']|'')*')\s+INTO\s+('(?:[^']|'')*')(\s+OVERWRITE)?$", re.I | re.S)
GET_RE = re.compile(r"^GET\s+('(?:[^']|'')*')\s+TO\s+('(?:[^']|'')*')$", re.I | re.S)
REMOVE_RE = re.compile(r"^REMOVE\s+('(?:[^']|'')*')$", re.I | re.S)
VOLUME_RE = re.compile(
    r"^(CREATE|DROP)\s+(?:EXTERNAL\s+)?VOLUME\s+(IF\s+(?:NOT\s+)?EXISTS\s+)?([\w`.]+)", re.I | re.S)
SHOW_VOLUMES_RE = re.compile(r"^SHOW\s+VOLUMES(?:\s+(?:IN|FROM)\s+([\w`.]+))?(?:\s+LIKE\s+('(?:[^']|'')*'))?$",
                             re.I | re.S)
CATALOG_RE = re.compile(r"^(?:CREATE\s+CATALOG\s+(?:IF\s+NOT\s+EXISTS\s+)?|USE\s+CATALOG\s+|SET\s+CATALOG\s+)"
                        r"([\w`]+)", re.I | re.S)
COPY_RE = re.compile(
    r"^COPY\s+INTO\s+(?P<table>[\w`.]+)\s+FROM\s+(?P<src>'(?:[^']|'')*'|\()", re.I | re.S)
COPY_FMT_RE = re.compile(r"\bFILEFORMAT\s*=\s*(\w+)", re.I)
REPLACE_TABLE_RE = re.compile(r"^CREATE\s+OR\s+REPLACE\s+TABLE\s+([\w`.]+)", re.I | re.S)
# TRUNCATE TABLE t / DELETE FROM t [WHERE ...]: the table name, then the rest.
TRUNCATE_RE = re.compile(r"^TRUNCATE\s+TABLE\s+((?:`(?:[^`]|``)+`|[\w]+)(?:\.(?:`(?:[^`]|``)+`|[\w]+)){0,2})\s*$",
                         re.I | re.S)
DELETE_RE = re.compile(r"^DELETE\s+FROM\s+((?:`(?:[^`]|``)+`|[\w]+)(?:\.(?:`(?:[^`]|``)+`|[\w]+)){0,2})"
                       r"(?:\s+WHERE\s+(?P<where>.+))?\s*$", re.I | re.S)
_NAME = r"(?:`(?:[^`]|``)+`|\w+)(?:\s*\.\s*(?:`(?:[^`]|``)+`|\w+)){0,2}"
# The table a statement commits to, for the optimistic-concurrency model.
WRITE_TARGET_RE = re.compile(r"^(?:INSERT\s+(?:INTO|OVERWRITE)(?:\s+TABLE)?|COPY\s+INTO|ALTER\s+TABLE|DELETE\s+FROM|"
                             rf"UPDATE|MERGE\s+INTO|TRUNCATE\s+TABLE)\s+({_NAME})", re.I | re.S)
READ_TABLE_RE = re.compile(rf"\b(?:FROM|JOIN|USING)\s+({_NAME})", re.I | re.S)
CONFLICT_SQLSTATE = "2D521"  # Delta's commit conflicts (DELTA_CONCURRENT_*, DELTA_METADATA_CHANGED)


# Delta without column mapping refuses these in column names (Parquet's special characters).
INVALID_COLUMN_CHARS = re.compile(r"[ ,;{}()\n\t=]")
COLUMN_MAPPING_KEY = "delta.columnMapping.mode"


def invalid_column_names_error(names: list[str]) -> SqlError:
    return SqlError(
        "[DELTA_INVALID_CHARACTERS_IN_COLUMN_NAMES] Found invalid character(s) among ' ,;{}()\\n\\t=' in the "
        f"column names of your schema. Invalid column names: {', '.join(names)}. Please use other characters "
        "and try again. Alternatively, enable Column Mapping to keep using these characters.", "42K05")


def split_name(name: str) -> list[str]:
    return [unquote_ident(p) for p in re.findall(r"`(?:[^`]|``)*`|[^.`]+", name)]


@dataclass
class TableWrite:
    """A statement that commits to one table: which, and what Delta would check at its commit."""

    table: tuple[str, str]  # (schema, table), lower case: every catalog maps onto one Spark catalog
    reads: bool  # it reads the table it writes (DELETE, UPDATE, MERGE, INSERT ... SELECT from it)
    metadata: bool  # it changes the table's metadata (ALTER TABLE)


class Engine:
    def __init__(self, storage: Storage, stats: Stats) -> None:
        self.storage = storage
        self.stats = stats
        # One statement at a time: keeps concurrent writers (several uploader processes on one
        # table) from interleaving commits, and makes each INSERT/COPY INTO all-or-nothing.
        self.lock = threading.RLock()
        cat = storage.load_catalog()
        self.catalogs: set[str] = {c.lower() for c in cat.get("catalogs", DEFAULT_CATALOGS)}
        self.spark = self._start_spark()
        from pyspark.sql import functions

        self.F = functions
        self.binder = ParameterBinder(functions)
        self.presigned: dict[str, tuple[str, Path, float]] = {}
        self.base_url = ""
        self.config: dict[str, Any] = {}  # the admin config (Emulator shares its dict)
        # Optimistic concurrency: per table, commits that added or removed rows, metadata
        # changes, and the kind of the last commit (for the message).
        self.versions: dict[tuple[str, str], tuple[int, int, str]] = {}
        # Where presigned URLs point. Databricks hands out URLs of the cloud provider's storage,
        # another host than the workspace; the admin switch "staging_host" moves them here.
        self.staging_base_url: str | None = None
        self.staging_host_after = 0  # presigned URLs still handed out for this server before the switch
        self.storage.recover()
        self._restore_catalog(cat)

    # ---- start-up ----
    def _start_spark(self) -> Any:
        from pyspark.sql import SparkSession

        tmp = self.storage.root / "_spark_tmp"
        tmp.mkdir(exist_ok=True)
        b = (SparkSession.builder.master("local[2]").appName("databricks-emulator")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
             .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
             .config("spark.sql.warehouse.dir", str(self.storage.warehouse))
             .config("spark.sql.catalogImplementation", "in-memory")
             .config("spark.sql.sources.default", "parquet")
             .config("spark.sql.legacy.createHiveTableByDefault", "false")
             .config("spark.sql.shuffle.partitions", "2")
             # Every connector session is its own Spark session with its own relation cache; with
             # caching on, one session's INSERT would stay invisible to another session's SELECT.
             .config("spark.sql.filesourceTableRelationCacheSize", "0")
             .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
             .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
             .config("spark.local.dir", str(tmp))
             .config("spark.driver.memory", os.environ.get("EMULATOR_DRIVER_MEMORY", "2g")))
        spark = b.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        return spark

    def _restore_catalog(self, cat: dict[str, Any]) -> None:
        """Re-register schemas and tables recorded in catalog.json (the in-memory Spark catalog
        forgets them on restart; the Parquet files stay where they are)."""
        spark = self.spark
        for schema in cat.get("schemas", []):
            if schema != "default":
                spark.sql(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        jvm = spark._jvm
        for t in cat.get("tables", []):
            fq = f"{quote_ident(t['schema'])}.{quote_ident(t['name'])}"
            ddl = jvm.org.apache.spark.sql.types.DataType.fromJson(json.dumps(t["schema_json"])).toDDL()
            parts = ""
            if t.get("partition_columns"):
                parts = " PARTITIONED BY (" + ", ".join(quote_ident(c) for c in t["partition_columns"]) + ")"
            if t.get("properties"):
                parts += " TBLPROPERTIES (" + ", ".join(
                    f"{sql_string(k)} = {sql_string(v)}" for k, v in t["properties"].items()) + ")"
            location = Path(t["location"])
            if t.get("type") == "EXTERNAL":
                spark.sql(f"CREATE TABLE {fq} ({ddl}) USING {t.get('provider', 'parquet')}{parts} "
                          f"LOCATION {sql_string(str(location))}")
                continue
            # Spark refuses to create a managed table over an existing directory: move it aside.
            aside = location.with_name(location.name + ".restore-" + uuid.uuid4().hex[:8])
            if location.exists():
                os.replace(location, aside)
            try:
                spark.sql(f"CREATE TABLE {fq} ({ddl}) USING {t.get('provider', 'parquet')}{parts}")
            finally:
                if aside.exists():
                    shutil.rmtree(location, ignore_errors=True)
                    os.replace(aside, location)
            if t.get("partition_columns"):
                spark.sql(f"ALTER TABLE {fq} RECOVER PARTITIONS")
            spark.sql(f"REFRESH TABLE {fq}")
        log(f"restored {len(cat.get('tables', []))} table(s) from {self.storage.catalog_file}")

    def sync_catalog(self) -> None:
        """Snapshot schemas/tables to catalog.json after DDL, so a restart can restore them."""
        spark = self.spark
        schemas = [r.namespace for r in spark.sql("SHOW SCHEMAS").collect()]
        tables = []
        for schema in schemas:
            for r in spark.sql(f"SHOW TABLES IN {quote_ident(schema)}").collect():
                if r.isTemporary:
                    continue
                fq = f"spark_catalog.{quote_ident(schema)}.{quote_ident(r.tableName)}"
                jt = spark._jsparkSession.sessionState().catalog().getTableMetadata(
                    spark._jvm.org.apache.spark.sql.catalyst.TableIdentifier(
                        r.tableName, spark._jvm.scala.Some(schema)))
                if jt.tableType().name() == "VIEW":
                    continue
                provider = jt.provider().get() if jt.provider().isDefined() else "parquet"
                parts = list(spark._jvm.scala.jdk.javaapi.CollectionConverters.asJava(jt.partitionColumnNames()))
                java_props = spark._jvm.scala.jdk.javaapi.CollectionConverters.asJava(jt.properties())
                props = {str(k): str(java_props.get(k)) for k in java_props.keySet() if str(k).startswith("delta.")}
                tables.append({
                    "schema": schema, "name": r.tableName,
                    "schema_json": json.loads(spark.table(fq).schema.json()),
                    "location": urlparse(str(jt.location())).path,
                    "type": jt.tableType().name(), "provider": provider,
                    "partition_columns": parts, "properties": props,
                })
        atomic_write_json(self.storage.catalog_file, {
            "catalogs": sorted(self.catalogs), "schemas": schemas, "tables": tables})

    # ---- sessions ----
    def new_session(self) -> Any:
        return self.spark.newSession()

    # ---- execution ----
    def execute(self, sess: Any, sql: str, params: list[T.TSparkParameter] | None) -> Result:
        if len(sql.encode("utf-8", "surrogatepass")) > MAX_QUERY_TEXT_BYTES:
            raise SqlError(f"[QUERY_TEXT_TOO_LARGE] The statement text is {len(sql.encode('utf-8', 'surrogatepass'))} "
                           f"bytes; the maximum query text size is {MAX_QUERY_TEXT_BYTES} bytes (16 MiB).", "54000")
        sql = strip_sql(sql)
        kind = classify_statement(sql)
        self.stats.bump("statements", kind)
        write = self._table_write(sess, sql, kind) if self.config.get("conflicts") else None
        if write is not None:
            # Delta's optimistic concurrency: the statement reads the table version it starts
            # from, works without any lock, and checks at its commit what others committed since.
            # The work is the configurable window; the statement itself still runs under the lock,
            # which makes its commit atomic.
            with self.lock:
                started = self.versions.get(write.table, (0, 0, ""))
            time.sleep(float(self.config.get("conflict_window", 0.2)))
        with self.lock:
            if write is not None:
                self._check_conflict(write, started)
            try:
                result = self._dispatch(sess, sql, kind, params)
            except SqlError:
                raise
            except Exception as exc:
                if exc.__class__.__module__.startswith(("pyspark", "py4j")):
                    raise spark_error_to_sql_error(exc) from exc
                log("internal error:\n" + traceback.format_exc())
                raise SqlError(f"[INTERNAL_ERROR] {exc.__class__.__name__}: {exc}", "XX000") from exc
            if kind in ("CREATE", "DROP", "ALTER") or (kind == "COPY INTO" and result.num_modified_rows):
                self.sync_catalog()
            if write is not None:
                self._committed(write, kind, result)
            return result

    # ---- optimistic concurrency (admin config "conflicts": true) ----
    def _table_name(self, sess: Any, name: str) -> tuple[str, str]:
        parts = [p.lower() for p in split_name(re.sub(r"\s*\.\s*", ".", name))]
        if len(parts) == 1:
            parts.insert(0, str(sess.catalog.currentDatabase()).lower())
        return parts[-2], parts[-1]

    def _table_write(self, sess: Any, sql: str, kind: str) -> TableWrite | None:
        m = WRITE_TARGET_RE.match(sql)
        if not m:
            return None
        table = self._table_name(sess, m.group(1))
        reads = kind in ("DELETE", "UPDATE", "MERGE", "TRUNCATE") or (kind == "INSERT" and any(
            self._table_name(sess, r) == table for r in READ_TABLE_RE.findall(sql[m.end():])))
        return TableWrite(table, reads=reads, metadata=kind == "ALTER")

    def _check_conflict(self, write: TableWrite, started: tuple[int, int, str]) -> None:
        """Delta's commit check: fail when a concurrent commit invalidated what the statement read."""
        data, metadata, last = self.versions.get(write.table, (0, 0, ""))
        name = ".".join(quote_ident(p) for p in write.table)
        if metadata != started[1]:
            self.stats.bump("conflicts", "DELTA_METADATA_CHANGED")
            raise SqlError("[DELTA_METADATA_CHANGED] MetadataChangedException: The metadata of the Delta table "
                           f"{name} has been changed by a concurrent update. Please try the operation again.",
                           CONFLICT_SQLSTATE)
        if write.reads and data != started[0]:
            self.stats.bump("conflicts", "DELTA_CONCURRENT_APPEND")
            raise SqlError("[DELTA_CONCURRENT_APPEND.WITHOUT_HINT] ConcurrentAppendException: Files were added to "
                           f"the root of the table {name} by a concurrent update ({last}, committed at version "
                           f"{data}). Please try the operation again.", CONFLICT_SQLSTATE)

    def _committed(self, write: TableWrite, kind: str, result: Result) -> None:
        data, metadata, _ = self.versions.get(write.table, (0, 0, ""))
        if write.metadata:
            self.versions[write.table] = (data + 1, metadata + 1, kind)
        elif result.num_modified_rows != 0:  # a commit without files conflicts with no one
            self.versions[write.table] = (data + 1, metadata, kind)

    def _dispatch(self, sess: Any, sql: str, kind: str, params: list[T.TSparkParameter] | None) -> Result:
        if kind in ("PUT", "GET", "REMOVE"):
            if params:
                raise SqlError("[INVALID_PARAMETER_VALUE] Parameters are not supported in PUT, GET "
                               "and REMOVE statements.", "22023")
            return self._staging(sql, kind)
        if kind == "COPY INTO":
            return self._copy_into(sess, sql)
        m = VOLUME_RE.match(sql)
        if m:
            return self._volume_ddl(sess, m)
        m = SHOW_VOLUMES_RE.match(sql)
        if m:
            return self._show_volumes(sess, m)
        m = CATALOG_RE.match(sql)
        if m:
            return self._catalog_stmt(sql, unquote_ident(m.group(1)))
        args = self.binder.bind(params)
        sql = rewrite_catalogs(sql, self.catalogs)
        sql = re.sub(r"\bUSING\s+DELTA\b", "USING PARQUET", sql, flags=re.I)
        m = REPLACE_TABLE_RE.match(sql)
        if m:
            # Spark's session catalog has no REPLACE TABLE for Parquet tables: drop + create.
            sess.sql(f"DROP TABLE IF EXISTS {m.group(1)}")
            sql = re.sub(r"^CREATE\s+OR\s+REPLACE\s+TABLE", "CREATE TABLE", sql, flags=re.I)
        if kind in ("CREATE", "ALTER"):
            self._check_column_names(sess, sql)
        if kind == "INSERT":
            return self._insert(sess, sql, args)
        m = TRUNCATE_RE.match(sql) if kind == "TRUNCATE" else DELETE_RE.match(sql) if kind == "DELETE" else None
        if m:
            return self._remove_rows(sess, m.group(1), m.groupdict().get("where"), args)
        df = sess.sql(sql, args=args) if args is not None else sess.sql(sql)
        table = df.toArrow()
        if table.num_columns == 0:
            # Recorded warehouse answers to DDL carry one empty STRING column named "Result".
            table = pa.table({"Result": pa.array([], pa.string())})
        return Result(self._databricks_column_names(kind, sql, table))

    def _check_column_names(self, sess: Any, sql: str) -> None:
        """Delta refuses column names with Parquet's special characters unless the table uses column
        mapping (TBLPROPERTIES ('delta.columnMapping.mode' = 'name' or 'id')). Spark's Parquet tables
        accept them, so the emulator checks the parsed statement itself."""
        try:
            plan = sess._jsparkSession.sessionState().sqlParser().parsePlan(sql)
        except Exception:
            return  # Spark reports the syntax error when it runs the statement
        kind = plan.getClass().getSimpleName()
        if kind in ("CreateTable", "ReplaceTable"):
            names = list(plan.tableSchema().fieldNames())
            mode = plan.tableSpec().properties().get(COLUMN_MAPPING_KEY)
            mapped = mode.isDefined() and str(mode.get()).lower() in ("name", "id")
        elif kind == "AddColumns":
            columns = plan.columnsToAdd()
            names = [columns.apply(i).name().mkString(".") for i in range(columns.size())]
            parts = plan.table().multipartIdentifier()
            table = ".".join(quote_ident(parts.apply(i)) for i in range(parts.size()))
            mapped = self._column_mapping(sess, table)
        else:
            return
        invalid = [n for n in names if INVALID_COLUMN_CHARS.search(n)]
        if invalid and not mapped:
            raise invalid_column_names_error(invalid)

    @staticmethod
    def _column_mapping(sess: Any, table: str) -> bool:
        """Does the table use Delta column mapping (remembered as a table property)?"""
        try:
            rows = sess.sql(f"SHOW TBLPROPERTIES {table}").collect()
        except Exception:
            return False
        return any(r.key == COLUMN_MAPPING_KEY and str(r.value).lower() in ("name", "id") for r in rows)

    @staticmethod
    def _databricks_column_names(kind: str, sql: str, table: pa.Table) -> pa.Table:
        # Databricks names these columns differently from open-source Spark.
        if kind == "SHOW" and table.num_columns and table.column_names[0] == "namespace":
            words = [w.upper() for w in _leading_words(sql, 2)]
            new = "databaseName" if words[1:2] in (["SCHEMAS"], ["DATABASES"]) else "database"
            return table.rename_columns([new, *table.column_names[1:]])
        return table

    # ---- INSERT: Spark's own INSERT (job commit is all-or-nothing), plus Databricks' counts ----
    def _insert(self, sess: Any, sql: str, args: Any) -> Result:
        df = sess.sql(sql, args=args) if args is not None else sess.sql(sql)
        try:
            n: int | None = self._written_rows(df)
        except Exception as exc:
            # The rows are committed already; never turn a successful INSERT into an error.
            log(f"could not read the written-row metric of an INSERT: {exc}")
            n = None
        self.stats.add_rows(n or 0)
        table = pa.table({"num_affected_rows": pa.array([n], pa.int64()),
                          "num_inserted_rows": pa.array([n], pa.int64())})
        return Result(table, num_modified_rows=n)

    # ---- TRUNCATE / DELETE: rows go, the COPY INTO load history stays (it is in the Delta log) ----
    def _remove_rows(self, sess: Any, table_name: str, where: str | None, args: Any) -> Result:
        if not self.spark.catalog.tableExists(table_name):
            raise SqlError(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view {table_name} cannot be found. "
                           "Verify the spelling and correctness of the schema and catalog.", "42P01")
        location = self._table_location(table_name)
        history = self.storage.read_history(location)
        before = sess.table(table_name)
        kept = None
        removed = before.count()
        if where is not None:
            condition = f"coalesce(({where}), false)"
            if args is not None:  # bind the parameters through a query, then keep its rows
                kept = sess.sql(f"SELECT * FROM {table_name} WHERE NOT {condition}", args=args)
            else:
                kept = before.where(f"NOT {condition}")
            kept = kept.localCheckpoint(eager=True)  # read before the files go
            removed -= kept.count()
        sess.sql(f"TRUNCATE TABLE {table_name}")
        if kept is not None and kept.count():
            kept.write.insertInto(table_name)
        if history:
            atomic_write_json(self.storage.history_path(location), history)
        self.spark.sql(f"REFRESH TABLE {table_name}")
        table = pa.table({"num_affected_rows": pa.array([removed], pa.int64())})
        return Result(table, num_modified_rows=removed)

    @staticmethod
    def _written_rows(df: Any) -> int:
        """Rows written by an eagerly executed INSERT, from the write command's SQL metrics."""
        plan = df._jdf.queryExecution().executedPlan()
        with contextlib.suppress(Exception):
            plan = plan.commandPhysicalPlan()
        with contextlib.suppress(Exception):  # adaptive execution wraps a write that joins (WHERE NOT EXISTS)
            plan = plan.finalPhysicalPlan()
        metrics = plan.metrics()
        if not metrics.contains("numOutputRows"):
            with contextlib.suppress(Exception):
                metrics = plan.cmd().metrics()
        return int(metrics.apply("numOutputRows").value())

    # ---- catalogs and volumes ----
    def _catalog_stmt(self, sql: str, name: str) -> Result:
        if sql.upper().startswith("CREATE"):
            self.catalogs.add(name.lower())
            self.sync_catalog()
        elif name.lower() not in self.catalogs:
            raise SqlError(f"[NO_SUCH_CATALOG_EXCEPTION] Catalog '{name}' was not found.", "42704")
        return empty_result()

    def _schema_exists(self, schema: str) -> bool:
        return bool(self.spark.catalog.databaseExists(schema))

    def _show_volumes(self, sess: Any, m: re.Match[str]) -> Result:
        """SHOW VOLUMES [IN catalog.schema] [LIKE 'pattern'] (`*` any text, `|` alternatives)."""
        parts = split_name(m.group(1)) if m.group(1) else [sess.catalog.currentDatabase()]
        catalog, schema = (parts[0], parts[1]) if len(parts) == 2 else ("main", parts[0])
        refused = no_volumes_in(catalog, "SHOW VOLUMES")
        if refused:
            raise refused
        if not self._schema_exists(schema):
            raise SqlError(f"[SCHEMA_NOT_FOUND] The schema `{catalog}`.`{schema}` cannot be found.", "42704")
        pattern = parse_string_literal(m.group(2)) if m.group(2) else "*"
        matches = re.compile("|".join("(?:" + ".*".join(re.escape(p) for p in alt.strip().split("*")) + ")"
                                      for alt in pattern.split("|")), re.I)
        base = self.storage.volumes / catalog / schema
        names = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        names = [n for n in names if matches.fullmatch(n)]
        return Result(pa.table({"database_name": pa.array([schema] * len(names), pa.string()),
                                "volume_name": pa.array(names, pa.string())}))

    def _volume_ddl(self, sess: Any, m: re.Match[str]) -> Result:
        parts = split_name(m.group(3))
        if len(parts) == 3:
            catalog, schema, volume = parts
        elif len(parts) == 2:
            catalog, (schema, volume) = "main", parts
        else:
            catalog, schema, volume = "main", sess.catalog.currentDatabase(), parts[0]
        refused = no_volumes_in(catalog, f"{m.group(1).upper()} VOLUME")
        if refused:
            raise refused
        vdir = self.storage.volume_dir(catalog, schema, volume)
        if m.group(1).upper() == "CREATE":
            if not self._schema_exists(schema):
                raise SqlError(f"[SCHEMA_NOT_FOUND] The schema `{catalog}`.`{schema}` cannot be found.",
                               "42704")
            if vdir.exists() and not m.group(2):
                raise SqlError(f"[VOLUME_ALREADY_EXISTS] Volume `{catalog}`.`{schema}`.`{volume}` "
                               "already exists.", "42000")
            vdir.mkdir(parents=True, exist_ok=True)
        else:
            if not vdir.exists() and not m.group(2):
                raise SqlError(f"[UC_VOLUME_NOT_FOUND] Volume `{catalog}`.`{schema}`.`{volume}` "
                               "does not exist.", "42704")
            shutil.rmtree(vdir, ignore_errors=True)
        return empty_result()

    # ---- PUT / GET / REMOVE: answer with a presigned URL (this server, or the staging host) ----
    def _staging(self, sql: str, kind: str) -> Result:
        local_file: str | None = None
        if kind == "PUT":
            m = PUT_RE.match(sql)
            if not m:
                raise SqlError("[PARSE_SYNTAX_ERROR] Syntax error in PUT: expected "
                               "PUT '<local file>' INTO '/Volumes/...' [OVERWRITE]", "42601")
            local_file, vpath = parse_string_literal(m.group(1)), parse_string_literal(m.group(2))
            _, target = self.storage.resolve_volume_path(vpath)
            if target.exists() and not m.group(3):
                raise SqlError(f"[FILE_ALREADY_EXISTS] The file {vpath} already exists. Use "
                               "OVERWRITE to replace it.", "42000")
            op = "PUT"
        elif kind == "GET":
            m = GET_RE.match(sql)
            if not m:
                raise SqlError("[PARSE_SYNTAX_ERROR] Syntax error in GET: expected "
                               "GET '/Volumes/...' TO '<local file>'", "42601")
            vpath, local_file = parse_string_literal(m.group(1)), parse_string_literal(m.group(2))
            _, target = self.storage.resolve_volume_path(vpath)
            if not target.is_file():
                raise SqlError(f"[NOT_FOUND] The file {vpath} does not exist.", "42000")
            op = "GET"
        else:
            m = REMOVE_RE.match(sql)
            if not m:
                raise SqlError("[PARSE_SYNTAX_ERROR] Syntax error in REMOVE: expected "
                               "REMOVE '/Volumes/...'", "42601")
            vpath = parse_string_literal(m.group(1))
            _, target = self.storage.resolve_volume_path(vpath)
            if not target.exists():
                raise SqlError(f"[NOT_FOUND] The file {vpath} does not exist.", "42000")
            op = "REMOVE"
        token = secrets.token_urlsafe(24)
        self.presigned[token] = (op, target, time.monotonic() + PRESIGNED_TTL_S)
        base = self.staging_base_url or self.base_url
        if self.staging_host_after > 0:
            self.staging_host_after -= 1
            base = self.base_url
        url = f"{base}{STAGING_PREFIX}{token}"
        row = {"operation": op, "localFile": local_file, "presignedUrl": url, "headers": "{}"}
        table = pa.table({k: pa.array([v], pa.string()) for k, v in row.items()})
        return Result(table, is_staging=True)

    def presigned_target(self, token: str, method: str) -> Path | None:
        entry = self.presigned.get(token)
        if entry is None or entry[2] < time.monotonic():
            return None
        op, target, _ = entry
        allowed = {"PUT": "PUT", "GET": "GET", "REMOVE": "DELETE"}[op]
        return target if method == allowed else None

    # ---- COPY INTO ----
    def _copy_into(self, sess: Any, sql: str) -> Result:
        m = COPY_RE.match(sql)
        if not m or m.group("src") == "(":
            raise SqlError("[NOT_SUPPORTED] The emulator supports COPY INTO <table> FROM '/Volumes/...' "
                           "FILEFORMAT = PARQUET|CSV|JSON [FILES = (...)] [PATTERN = '...'] "
                           "[FORMAT_OPTIONS (...)] [COPY_OPTIONS (...)] only.", "0A000")
        rest = sql[m.end():]
        fmt_m = COPY_FMT_RE.search(rest)
        if not fmt_m:
            raise SqlError("[PARSE_SYNTAX_ERROR] Syntax error at or near end of input: COPY INTO "
                           "requires FILEFORMAT.", "42601")
        fmt = fmt_m.group(1).lower()
        if fmt not in ("parquet", "csv", "json"):
            raise SqlError(f"[NOT_SUPPORTED] FILEFORMAT = {fmt.upper()} is not supported by the "
                           "emulator.", "0A000")
        pattern_m = re.search(r"\bPATTERN\s*=\s*('(?:[^']|'')*')", rest, re.I)
        files_m = re.search(r"\bFILES\s*=\s*\(([^)]*)\)", rest, re.I)
        fo_m = re.search(r"\bFORMAT_OPTIONS\s*\(([^)]*)\)", rest, re.I)
        co_m = re.search(r"\bCOPY_OPTIONS\s*\(([^)]*)\)", rest, re.I)
        format_options = parse_option_list(fo_m.group(1)) if fo_m else {}
        copy_options = {k.lower(): v for k, v in (parse_option_list(co_m.group(1)) if co_m else {}).items()}
        force = copy_options.get("force", "false").lower() == "true"
        merge_schema = copy_options.get("mergeschema", "false").lower() == "true"

        table_name = rewrite_catalogs(m.group("table"), self.catalogs)
        if not self.spark.catalog.tableExists(table_name):
            raise SqlError(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view {m.group('table')} cannot be "
                           "found. Verify the spelling and correctness of the schema and catalog.",
                           "42P01")
        location = self._table_location(table_name)
        src_vpath = parse_string_literal(m.group("src")).rstrip("/")
        _, src = self.storage.resolve_volume_path(src_vpath)
        candidates = self._list_source_files(src, src_vpath, pattern_m, files_m)
        history = self.storage.read_history(location)
        new_files = [(vp, lp) for vp, lp in candidates if force or vp not in history]
        if not new_files:
            return self._copy_result(0)

        reader = sess.read.format(fmt)
        if fmt == "csv":
            reader = reader.option("header", "false")
        rebase = self.config.get("parquet_datetime_rebase_mode")
        if fmt == "parquet" and rebase:
            # Spark 3.x warehouses read Parquet with datetimeRebaseModeInRead = EXCEPTION: a date
            # before 1582-10-15 (or timestamp) in a file that does not say which calendar wrote it
            # (no org.apache.spark.version in its footer) fails the read. Spark 4 reads it as is.
            reader = reader.option("datetimeRebaseMode", str(rebase).upper())
        for k, v in format_options.items():
            reader = reader.option(k, v)
        df = reader.load([str(lp) for _, lp in new_files])
        df = self._align_to_table(sess, df, table_name, merge_schema)

        txid = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        staged = self.storage.txn / txid / "data"
        parts = self._partition_columns(table_name)
        writer = df.write.mode("errorifexists")
        if parts:
            writer = writer.partitionBy(*parts)
        try:
            writer.parquet(str(staged))
        except Exception as exc:
            shutil.rmtree(self.storage.txn / txid, ignore_errors=True)
            if "READ_ANCIENT_DATETIME" in str(exc):  # buried in a task failure: say it as a warehouse does
                raise SqlError(
                    "[INCONSISTENT_BEHAVIOR_CROSS_VERSION.READ_ANCIENT_DATETIME] You may get a different result "
                    "due to the upgrading to Spark >= 3.0: reading dates before 1582-10-15 or timestamps before "
                    "1900-01-01T00:00:00Z from Parquet files can be ambiguous, as the files may be written by "
                    "Spark 2.x or legacy versions of Hive, which uses a legacy hybrid calendar that is different "
                    "from Spark 3.0+'s Proleptic Gregorian calendar. See more details in SPARK-31404. You can set "
                    "the SQL config \"spark.sql.parquet.datetimeRebaseModeInRead\" or the datasource option "
                    "\"datetimeRebaseMode\" to \"LEGACY\" to rebase the datetime values w.r.t. the calendar "
                    "difference during reading. To read the datetime values as it is, set the SQL config or the "
                    "datasource option to \"CORRECTED\".", "42K0B") from exc
            raise
        written = [str(p.relative_to(staged)) for p in staged.rglob("*.parquet")]
        rows = sum(pq.ParquetFile(staged / rel).metadata.num_rows for rel in written)
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        entries = {vp: {"loaded_at": now, "txid": txid, "size": lp.stat().st_size}
                   for vp, lp in new_files}
        self.storage.commit(txid, staged, location, written, entries)
        self.spark.sql(f"REFRESH TABLE {table_name}")
        self.stats.add_rows(rows)
        return self._copy_result(rows)

    @staticmethod
    def _copy_result(rows: int) -> Result:
        table = pa.table({"num_affected_rows": pa.array([rows], pa.int64()),
                          "num_inserted_rows": pa.array([rows], pa.int64()),
                          "num_skipped_corrupt_files": pa.array([0], pa.int64())})
        return Result(table, num_modified_rows=rows)

    def _list_source_files(self, src: Path, src_vpath: str, pattern_m: re.Match[str] | None,
                           files_m: re.Match[str] | None) -> list[tuple[str, Path]]:
        if src.is_file():
            return [(src_vpath, src)]
        if not src.is_dir():
            raise SqlError(f"[PATH_NOT_FOUND] Path does not exist: {src_vpath}.", "42K03")
        if files_m:
            names = [parse_string_literal(s.strip()) for s in re.findall(r"'(?:[^']|'')*'", files_m.group(1))]
            if len(names) > 1000:
                raise SqlError("[COPY_INTO_FILES_LIMIT] FILES can list at most 1000 files.", "54000")
            out = []
            for n in names:
                if any(p in ("", ".", "..") for p in n.split("/")):
                    # FILES name files under the FROM directory, never beside or above it.
                    raise SqlError(f"[INVALID_PARAMETER_VALUE] Invalid file name in FILES: {n}", "22023")
                lp = src / n
                if not lp.is_file():
                    raise SqlError(f"[PATH_NOT_FOUND] Path does not exist: {src_vpath}/{n}.", "42K03")
                out.append((f"{src_vpath}/{n}", lp))
            return out
        pattern = parse_string_literal(pattern_m.group(1)) if pattern_m else None
        out = []
        for lp in sorted(src.rglob("*")):
            rel = lp.relative_to(src).as_posix()
            if not lp.is_file() or any(p.startswith(("_", ".")) for p in rel.split("/")):
                continue
            if pattern and not fnmatch.fnmatchcase(rel, pattern):
                continue
            out.append((f"{src_vpath}/{rel}", lp))
        return out

    def _table_location(self, table_name: str) -> Path:
        rows = self.spark.sql(f"DESCRIBE TABLE EXTENDED {table_name}").collect()
        for r in rows:
            if r.col_name == "Location":
                return Path(urlparse(r.data_type).path)
        raise SqlError(f"[INTERNAL_ERROR] No location for {table_name}", "XX000")

    def _partition_columns(self, table_name: str) -> list[str]:
        parts = table_name.split(".")
        cols = self.spark.catalog.listColumns(unquote_ident(parts[-1]), unquote_ident(parts[-2]))
        return [c.name for c in cols if c.isPartition]

    def _align_to_table(self, sess: Any, df: Any, table_name: str, merge_schema: bool) -> Any:
        """Match source columns to the table by name (case-insensitive), as COPY INTO does."""
        F = self.F
        target = self.spark.table(table_name).schema
        target_names = {f.name.lower() for f in target.fields}
        extra = [f for f in df.schema.fields if f.name.lower() not in target_names]
        self._check_decimal_columns(target, df.schema)
        if extra and not merge_schema:
            raise SqlError(
                "[COPY_INTO_SCHEMA_MISMATCH] A schema mismatch detected when writing to the table: "
                f"the source has column(s) {', '.join(f.name for f in extra)} that the table does not "
                "have. Use COPY_OPTIONS ('mergeSchema' = 'true') to add them.", "42KD9")
        invalid = [f.name for f in extra if INVALID_COLUMN_CHARS.search(f.name)]
        if invalid and not self._column_mapping(sess, table_name):
            raise invalid_column_names_error(invalid)
        if extra:
            cols = ", ".join(f"{quote_ident(f.name)} {f.dataType.simpleString()}" for f in extra)
            self.spark.sql(f"ALTER TABLE {table_name} ADD COLUMNS ({cols})")
            target = self.spark.table(table_name).schema
        source = {f.name.lower(): f.name for f in df.schema.fields}
        exprs = []
        for f in target.fields:
            if f.name.lower() in source:
                exprs.append(F.col(quote_ident(source[f.name.lower()])).cast(f.dataType).alias(f.name))
            else:
                exprs.append(F.lit(None).cast(f.dataType).alias(f.name))
        return df.select(*exprs)

    @staticmethod
    def _check_decimal_columns(target: Any, source: Any) -> None:
        """Delta's schema enforcement merges the file's schema into the table's: a DECIMAL column
        takes only a DECIMAL it can hold without loss (same or smaller scale and integer digits),
        never a DOUBLE, FLOAT or integer. (Spark alone would cast, rounding and overflowing.)"""
        incoming = {f.name.lower(): f for f in source.fields}
        for column in target.fields:
            wanted, found = column.dataType, incoming.get(column.name.lower())
            if found is None or wanted.typeName() != "decimal" or wanted == found.dataType:
                continue
            other = found.dataType
            if other.typeName() == "decimal" and other.scale <= wanted.scale and (
                    other.precision - other.scale <= wanted.precision - wanted.scale):
                continue

            def spark_name(t: Any) -> str:
                return f"DecimalType({t.precision},{t.scale})" if t.typeName() == "decimal" else type(t).__name__

            raise SqlError(
                f"[DELTA_FAILED_TO_MERGE_FIELDS] Failed to merge fields '{column.name}' and '{found.name}'. "
                f"[DELTA_MERGE_INCOMPATIBLE_DATATYPE] Failed to merge incompatible data types "
                f"{spark_name(wanted)} and {spark_name(other)}", "22005")

    # ---- metadata RPCs ----
    def _catalog_ok(self, catalog: str | None) -> bool:
        return not catalog or catalog.lower() in self.catalogs or catalog == "%"

    @staticmethod
    def _like(pattern: str | None) -> Callable[[str], bool]:
        if not pattern or pattern == "%" or pattern == "*":
            return lambda s: True
        rx = re.compile("^" + "".join(
            ".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern) + "$", re.I)
        return lambda s: bool(rx.match(s))

    def meta_catalogs(self) -> Result:
        return Result(pa.table({"TABLE_CAT": pa.array(sorted(self.catalogs), pa.string())}))

    def meta_schemas(self, catalog: str | None, schema: str | None) -> Result:
        with self.lock:
            names = [r.namespace for r in self.spark.sql("SHOW SCHEMAS").collect()]
        rows = [(s, c) for c in self._catalogs_for(catalog) for s in names if self._like(schema)(s)]
        return Result(pa.table({"TABLE_SCHEM": pa.array([r[0] for r in rows], pa.string()),
                                "TABLE_CATALOG": pa.array([r[1] for r in rows], pa.string())}))

    def _catalogs_for(self, catalog: str | None) -> list[str]:
        if not catalog or catalog == "%":
            return ["main"] if "main" in self.catalogs else sorted(self.catalogs)[:1]
        return [catalog] if catalog.lower() in self.catalogs else []

    def _tables(self, catalog: str | None, schema: str | None, table: str | None) -> list[tuple[str, str, str, bool]]:
        out = []
        with self.lock:
            schemas = [r.namespace for r in self.spark.sql("SHOW SCHEMAS").collect()]
            for c in self._catalogs_for(catalog):
                for s in schemas:
                    if not self._like(schema)(s):
                        continue
                    for r in self.spark.sql(f"SHOW TABLES IN {quote_ident(s)}").collect():
                        if not r.isTemporary and self._like(table)(r.tableName):
                            out.append((c, s, r.tableName, False))
        return out

    def meta_tables(self, catalog: str | None, schema: str | None, table: str | None,
                    types: list[str] | None) -> Result:
        rows = [r for r in self._tables(catalog, schema, table)
                if not types or "TABLE" in [t.upper() for t in types]]
        cols: dict[str, list[Any]] = {"TABLE_CAT": [], "TABLE_SCHEM": [], "TABLE_NAME": [], "TABLE_TYPE": [],
                                      "REMARKS": [], "TYPE_CAT": [], "TYPE_SCHEM": [], "TYPE_NAME": [],
                                      "SELF_REFERENCING_COL_NAME": [], "REF_GENERATION": []}
        for c, s, t, _ in rows:
            for k, v in zip(cols, (c, s, t, "TABLE", "", None, None, None, None, None), strict=True):
                cols[k].append(v)
        return Result(pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}))

    def meta_columns(self, catalog: str | None, schema: str | None, table: str | None,
                     column: str | None) -> Result:
        jdbc_types = {"boolean": 16, "byte": -6, "short": 5, "integer": 4, "long": -5, "float": 6,
                      "double": 8, "string": 12, "binary": -2, "date": 91, "timestamp": 93,
                      "timestamp_ntz": 93, "decimal": 3, "array": 2003, "map": 2000, "struct": 2002}
        rows = []
        for c, s, t, _ in self._tables(catalog, schema, table):
            with self.lock:
                fields = self.spark.table(f"spark_catalog.{quote_ident(s)}.{quote_ident(t)}").schema.fields
            for pos, f in enumerate(fields):
                if not self._like(column)(f.name):
                    continue
                type_name = f.dataType.simpleString().upper()
                base = f.dataType.typeName().lower()
                prec = getattr(f.dataType, "precision", None)
                scale = getattr(f.dataType, "scale", None)
                rows.append((c, s, t, f.name, jdbc_types.get(base, 1111), type_name, prec, scale,
                             1 if f.nullable else 0, pos + 1, "YES" if f.nullable else "NO"))
        names = ["TABLE_CAT", "TABLE_SCHEM", "TABLE_NAME", "COLUMN_NAME", "DATA_TYPE", "TYPE_NAME",
                 "COLUMN_SIZE", "DECIMAL_DIGITS", "NULLABLE", "ORDINAL_POSITION", "IS_NULLABLE"]
        types = [pa.string()] * 4 + [pa.int32(), pa.string(), pa.int32(), pa.int32(), pa.int32(),
                                     pa.int32(), pa.string()]
        return Result(pa.table({n: pa.array([r[i] for r in rows], ty)
                                for i, (n, ty) in enumerate(zip(names, types, strict=True))}))

    def cancel(self, group: str) -> None:
        with contextlib.suppress(Exception):
            self.spark.sparkContext.cancelJobGroup(group)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.spark.stop()


# --------------------------------------------------------------------------------------------
# Thrift service (TCLIService.Iface)
# --------------------------------------------------------------------------------------------
def ok_status() -> T.TStatus:
    return T.TStatus(statusCode=T.TStatusCode.SUCCESS_STATUS)


def error_status(msg: str, sql_state: str = "HY000") -> T.TStatus:
    return T.TStatus(statusCode=T.TStatusCode.ERROR_STATUS, errorMessage=msg, sqlState=sql_state,
                     displayMessage=msg)


def new_handle_id() -> T.THandleIdentifier:
    return T.THandleIdentifier(guid=uuid.uuid4().bytes, secret=uuid.uuid4().bytes)


@dataclass
class Operation:
    handle: T.TOperationHandle
    session_guid: bytes
    state: int = T.TOperationState.RUNNING_STATE
    result: Result | None = None
    error: SqlError | None = None
    offset: int = 0
    arrow: bool = True
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Session:
    handle: T.TSessionHandle
    spark: Any
    native_params: bool = True  # False: an older runtime, which ignores the parameters field


class ThriftService:
    """Implements the TCLIService RPCs the Databricks connector uses."""

    def __init__(self, engine: Engine, stats: Stats, config: dict[str, Any]) -> None:
        self.engine = engine
        self.stats = stats
        self.config = config
        self.sessions: dict[bytes, Session] = {}
        self.ops: dict[bytes, Operation] = {}
        self.lock = threading.Lock()

    # ---- helpers ----
    def _session(self, handle: T.TSessionHandle | None) -> Session | None:
        if handle is None or handle.sessionId is None:
            return None
        with self.lock:
            return self.sessions.get(handle.sessionId.guid)

    def _op(self, handle: T.TOperationHandle | None) -> Operation | None:
        if handle is None or handle.operationId is None:
            return None
        with self.lock:
            return self.ops.get(handle.operationId.guid)

    def _new_op(self, session_guid: bytes, op_type: int, arrow: bool) -> Operation:
        handle = T.TOperationHandle(operationId=new_handle_id(), operationType=op_type, hasResultSet=True)
        op = Operation(handle=handle, session_guid=session_guid, arrow=arrow)
        with self.lock:
            self.ops[handle.operationId.guid] = op
        return op

    def _use_arrow(self, can_read_arrow: bool | None) -> bool:
        forced = self.config.get("result_format")
        if forced == "column":
            return False
        if forced == "arrow":
            return True
        return can_read_arrow is not False

    def _status_resp(self, op: Operation) -> T.TGetOperationStatusResp:
        resp = T.TGetOperationStatusResp(status=ok_status(), operationState=op.state,
                                         hasResultSet=op.result is not None)
        if op.error is not None:
            resp.sqlState = op.error.sql_state
            resp.errorMessage = op.error.message
            resp.displayMessage = op.error.message
            resp.errorCode = 0
        if op.result is not None and op.result.num_modified_rows is not None:
            resp.numModifiedRows = op.result.num_modified_rows
        return resp

    def _metadata_resp(self, op: Operation) -> T.TGetResultSetMetadataResp:
        assert op.result is not None
        schema = op.result.table.schema
        return T.TGetResultSetMetadataResp(
            status=ok_status(),
            schema=arrow_to_table_schema(schema),
            resultFormat=T.TSparkRowSetType.ARROW_BASED_SET if op.arrow else T.TSparkRowSetType.COLUMN_BASED_SET,
            lz4Compressed=False,
            arrowSchema=schema.serialize().to_pybytes() if op.arrow else None,
            isStagingOperation=op.result.is_staging,
        )

    def _next_rowset(self, op: Operation, max_rows: int, max_bytes: int) -> tuple[T.TRowSet, bool]:
        """The next page of the result, advancing the server-side cursor."""
        assert op.result is not None
        table = op.result.table
        start = op.offset
        if start >= table.num_rows:
            chunk = table.slice(start, 0)
        else:
            cap = self.config.get("max_rows_per_fetch")
            rows = min(max_rows or 10000, int(cap)) if cap else max_rows
            chunk = slice_for_fetch(table, start, rows, max_bytes)
        op.offset = start + chunk.num_rows
        has_more = op.offset < table.num_rows
        if op.arrow:
            batches = [T.TSparkArrowBatch(batch=rb.serialize().to_pybytes(), rowCount=rb.num_rows)
                       for rb in chunk.to_batches() if rb.num_rows]
            rowset = T.TRowSet(startRowOffset=start, rows=[], arrowBatches=batches)
        else:
            rowset = T.TRowSet(startRowOffset=start, rows=[],
                               columns=[arrow_column_to_tcolumn(c) for c in chunk.columns],
                               columnCount=chunk.num_columns)
        return rowset, has_more

    def _run(self, op: Operation, fn: Callable[[], Result]) -> None:
        try:
            op.result = fn()
            op.state = T.TOperationState.FINISHED_STATE
        except SqlError as e:
            op.error = e
            op.state = T.TOperationState.ERROR_STATE
        except Exception as e:  # never let an emulator bug kill the connection
            log("internal error:\n" + traceback.format_exc())
            op.error = SqlError(f"[INTERNAL_ERROR] {e}", "XX000")
            op.state = T.TOperationState.ERROR_STATE
        finally:
            op.done.set()

    def _direct(self, op: Operation, direct: T.TSparkGetDirectResults | None) -> T.TSparkDirectResults | None:
        if direct is None:
            return None
        res = T.TSparkDirectResults(operationStatus=self._status_resp(op))
        if op.result is None:
            return res
        res.resultSetMetadata = self._metadata_resp(op)
        rowset, has_more = self._next_rowset(op, direct.maxRows, direct.maxBytes)
        res.resultSet = T.TFetchResultsResp(status=ok_status(), hasMoreRows=has_more, results=rowset)
        if not has_more:
            # Everything was delivered inline: close server side, as a warehouse does.
            res.closeOperation = T.TCloseOperationResp(status=ok_status())
            with self.lock:
                self.ops.pop(op.handle.operationId.guid, None)
        return res

    def _metadata_op(self, req: Any, op_type: int, fn: Callable[[], Result]) -> Any:
        sess = self._session(req.sessionHandle)
        if sess is None:
            return None, error_status("Invalid SessionHandle", "HY000")
        op = self._new_op(req.sessionHandle.sessionId.guid, op_type, self._use_arrow(True))
        self._run(op, fn)
        return op, None

    # ---- RPCs ----
    def restricted(self) -> bool:
        """The request came with a token the admin API listed as having no CREATE privileges."""
        tokens = self.config.get("restricted_tokens") or []
        return getattr(REQUEST, "authorization", None) in {f"Bearer {t}" for t in tokens}

    def OpenSession(self, req: T.TOpenSessionReq) -> T.TOpenSessionResp:
        # Clusters before Databricks Runtime 14.2 answer with an older protocol version and know
        # nothing of native parameters; config protocol_version imitates one (e.g. 7).
        version = int(self.config.get("protocol_version") or 0)
        protocol = getattr(T.TProtocolVersion, f"SPARK_CLI_SERVICE_PROTOCOL_V{version}", SERVER_PROTOCOL)
        handle = T.TSessionHandle(sessionId=new_handle_id(), serverProtocolVersion=protocol)
        spark = self.engine.new_session()
        ns = req.initialNamespace
        if ns and ns.schemaName:
            try:
                spark.sql(f"USE {quote_ident(ns.schemaName)}")
            except Exception as exc:
                return T.TOpenSessionResp(status=error_status(spark_error_to_sql_error(exc).message, "42704"),
                                          serverProtocolVersion=protocol)
        native = protocol >= T.TProtocolVersion.SPARK_CLI_SERVICE_PROTOCOL_V8
        with self.lock:
            self.sessions[handle.sessionId.guid] = Session(handle=handle, spark=spark, native_params=native)
        return T.TOpenSessionResp(status=ok_status(), serverProtocolVersion=protocol,
                                  sessionHandle=handle, canUseMultipleCatalogs=True,
                                  initialNamespace=ns, configuration={})

    def CloseSession(self, req: T.TCloseSessionReq) -> T.TCloseSessionResp:
        guid = req.sessionHandle.sessionId.guid if req.sessionHandle and req.sessionHandle.sessionId else None
        with self.lock:
            sess = self.sessions.pop(guid, None) if guid else None
            for k in [k for k, o in self.ops.items() if o.session_guid == guid]:
                self.ops.pop(k, None)
        if sess is None:
            return T.TCloseSessionResp(status=error_status("Invalid SessionHandle"))
        return T.TCloseSessionResp(status=ok_status())

    def ExecuteStatement(self, req: T.TExecuteStatementReq) -> T.TExecuteStatementResp:
        sess = self._session(req.sessionHandle)
        if sess is None:
            return T.TExecuteStatementResp(status=error_status("Invalid SessionHandle"))
        op = self._new_op(req.sessionHandle.sessionId.guid, T.TOperationType.EXECUTE_STATEMENT,
                          self._use_arrow(req.canReadArrowResult))
        group = op.handle.operationId.guid.hex()
        may_create = not self.restricted()  # read here: the token is the request thread's
        params = req.parameters if sess.native_params else None

        def run() -> Result:
            sess.spark.sparkContext.setJobGroup(group, req.statement[:200], True)
            if not may_create:
                refuse_create(req.statement, sess.spark.catalog.currentDatabase())
            return self.engine.execute(sess.spark, req.statement, params)

        if req.getDirectResults is None:
            # Async execution (cursor.execute_async): the client polls GetOperationStatus.
            threading.Thread(target=self._run, args=(op, run), daemon=True).start()
            return T.TExecuteStatementResp(status=ok_status(), operationHandle=op.handle)
        self._run(op, run)
        if op.error is not None and op.error.compile_error:
            with self.lock:
                self.ops.pop(op.handle.operationId.guid, None)
            return T.TExecuteStatementResp(status=T.TStatus(
                statusCode=T.TStatusCode.ERROR_STATUS, sqlState=op.error.sql_state, errorCode=0,
                errorMessage=op.error.compile_error, displayMessage=op.error.message))
        return T.TExecuteStatementResp(status=ok_status(), operationHandle=op.handle,
                                       directResults=self._direct(op, req.getDirectResults))

    def GetOperationStatus(self, req: T.TGetOperationStatusReq) -> T.TGetOperationStatusResp:
        op = self._op(req.operationHandle)
        if op is None:
            return T.TGetOperationStatusResp(status=error_status("Invalid OperationHandle"))
        op.done.wait(timeout=1.0)  # long-poll a little so async clients do not spin
        return self._status_resp(op)

    def GetResultSetMetadata(self, req: T.TGetResultSetMetadataReq) -> T.TGetResultSetMetadataResp:
        op = self._op(req.operationHandle)
        if op is None or op.result is None:
            return T.TGetResultSetMetadataResp(status=error_status("Invalid OperationHandle"))
        return self._metadata_resp(op)

    def FetchResults(self, req: T.TFetchResultsReq) -> T.TFetchResultsResp:
        op = self._op(req.operationHandle)
        if op is None or op.result is None:
            return T.TFetchResultsResp(status=error_status("Invalid OperationHandle"))
        if req.orientation == T.TFetchOrientation.FETCH_FIRST:
            op.offset = 0
        rowset, has_more = self._next_rowset(op, req.maxRows, req.maxBytes or 0)
        resp = T.TFetchResultsResp(status=ok_status(), hasMoreRows=has_more, results=rowset)
        if req.includeResultSetMetadata:
            resp.resultSetMetadata = self._metadata_resp(op)
        return resp

    def CancelOperation(self, req: T.TCancelOperationReq) -> T.TCancelOperationResp:
        op = self._op(req.operationHandle)
        if op is None:
            # Already finished and closed server side (direct results): nothing left to cancel.
            return T.TCancelOperationResp(status=ok_status())
        if not op.done.is_set():
            self.engine.cancel(op.handle.operationId.guid.hex())
            op.state = T.TOperationState.CANCELED_STATE
        return T.TCancelOperationResp(status=ok_status())

    def CloseOperation(self, req: T.TCloseOperationReq) -> T.TCloseOperationResp:
        guid = req.operationHandle.operationId.guid if req.operationHandle else None
        with self.lock:
            self.ops.pop(guid, None)
        return T.TCloseOperationResp(status=ok_status())

    def _meta_resp(self, resp_cls: type, req: Any, op_type: int, fn: Callable[[], Result]) -> Any:
        op, err = self._metadata_op(req, op_type, fn)
        if err is not None:
            return resp_cls(status=err)
        return resp_cls(status=ok_status(), operationHandle=op.handle,
                        directResults=self._direct(op, req.getDirectResults))

    def GetCatalogs(self, req: T.TGetCatalogsReq) -> T.TGetCatalogsResp:
        return self._meta_resp(T.TGetCatalogsResp, req, T.TOperationType.GET_CATALOGS,
                               self.engine.meta_catalogs)

    def GetSchemas(self, req: T.TGetSchemasReq) -> T.TGetSchemasResp:
        return self._meta_resp(T.TGetSchemasResp, req, T.TOperationType.GET_SCHEMAS,
                               lambda: self.engine.meta_schemas(req.catalogName, req.schemaName))

    def GetTables(self, req: T.TGetTablesReq) -> T.TGetTablesResp:
        return self._meta_resp(T.TGetTablesResp, req, T.TOperationType.GET_TABLES,
                               lambda: self.engine.meta_tables(req.catalogName, req.schemaName,
                                                               req.tableName, req.tableTypes))

    def GetColumns(self, req: T.TGetColumnsReq) -> T.TGetColumnsResp:
        return self._meta_resp(T.TGetColumnsResp, req, T.TOperationType.GET_COLUMNS,
                               lambda: self.engine.meta_columns(req.catalogName, req.schemaName,
                                                                req.tableName, req.columnName))

    def GetTableTypes(self, req: T.TGetTableTypesReq) -> T.TGetTableTypesResp:
        return self._meta_resp(T.TGetTableTypesResp, req, T.TOperationType.GET_TABLE_TYPES,
                               lambda: Result(pa.table({"TABLE_TYPE": pa.array(["TABLE", "VIEW"])})))

    def _unsupported(self, resp_cls: type, name: str) -> Any:
        return resp_cls(status=error_status(f"{name} is not supported by the Databricks emulator"))

    def GetInfo(self, req: Any) -> Any:
        return self._unsupported(T.TGetInfoResp, "GetInfo")

    def GetTypeInfo(self, req: Any) -> Any:
        return self._unsupported(T.TGetTypeInfoResp, "GetTypeInfo")

    def GetFunctions(self, req: Any) -> Any:
        return self._unsupported(T.TGetFunctionsResp, "GetFunctions")

    def GetPrimaryKeys(self, req: Any) -> Any:
        return self._unsupported(T.TGetPrimaryKeysResp, "GetPrimaryKeys")

    def GetCrossReference(self, req: Any) -> Any:
        return self._unsupported(T.TGetCrossReferenceResp, "GetCrossReference")

    def GetDelegationToken(self, req: Any) -> Any:
        return self._unsupported(T.TGetDelegationTokenResp, "GetDelegationToken")

    def CancelDelegationToken(self, req: Any) -> Any:
        return self._unsupported(T.TCancelDelegationTokenResp, "CancelDelegationToken")

    def RenewDelegationToken(self, req: Any) -> Any:
        return self._unsupported(T.TRenewDelegationTokenResp, "RenewDelegationToken")


def peek_thrift_call(body: bytes) -> tuple[str | None, str | None]:
    """RPC name (and SQL text for ExecuteStatement) of a Thrift request, for counters/faults."""
    try:
        prot = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(body))
        name, _, _ = prot.readMessageBegin()
        statement = None
        if name == "ExecuteStatement":
            args = TCLIService.ExecuteStatement_args()
            args.read(prot)
            statement = args.req.statement if args.req else None
        return name, statement
    except Exception:
        return None, None


# --------------------------------------------------------------------------------------------
# HTTP front end
# --------------------------------------------------------------------------------------------
class Emulator:
    def __init__(self, port: int, data_dir: Path, token: str | None) -> None:
        self.port = port
        self.token = token
        self.stats = Stats()
        self.clients: dict[str, str] = {}  # service principals for /oidc/v1/token: id -> secret
        self.faults = Faults(self.stats)
        self.config: dict[str, Any] = {}
        self.storage = Storage(data_dir)
        self.engine = Engine(self.storage, self.stats)
        self.engine.config = self.config  # the admin settings reach the SQL engine too
        self.engine.base_url = f"http://127.0.0.1:{port}"
        self.files = FilesApi(self.storage, self.config)
        self.service = ThriftService(self.engine, self.stats, self.config)
        self.processor = TCLIService.Processor(self.service)
        self.server: ThreadingHTTPServer | None = None
        self.server_lock = threading.Lock()
        self.stopping = threading.Event()
        self.refusing_socket: socket.socket | None = None  # staging_host "refuse"
        self.tls_server: ThreadingHTTPServer | None = None  # staging_host "untrusted_tls"
        self.tls_cert_file: Path | None = None

    # ---- listening socket management (refuse-connections fault re-binds the port) ----
    def start_server(self) -> None:
        handler = make_handler(self)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        with self.server_lock:
            self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop_server(self) -> None:
        with self.server_lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def refuse_for(self, seconds: float) -> None:
        """Close the listening socket so connects get ECONNREFUSED, then listen again."""
        self.faults.refuse_until = time.monotonic() + seconds
        self.stats.bump("faults", "refuse")

        def cycle() -> None:
            time.sleep(0.05)  # let the admin response go out first
            self.stop_server()
            remaining = self.faults.refuse_until - time.monotonic()
            if remaining > 0:
                self.stopping.wait(remaining)
            if not self.stopping.is_set():
                for _ in range(50):
                    try:
                        self.start_server()
                        break
                    except OSError:
                        time.sleep(0.1)

        threading.Thread(target=cycle, daemon=True).start()

    # ---- the staging host: where presigned URLs point (cloud storage on Databricks) ----
    def set_staging_host(self, mode: str | None, after: int = 0) -> str | None:
        """Point presigned URLs at another endpoint, as Databricks points them at the cloud provider's
        storage: "refuse" (a port that refuses connections), "untrusted_tls" (HTTPS with a self-signed
        certificate made here, which no client trusts unless told to), None (this server again).
        `after`: the next N presigned URLs still point here (say, a start-up probe), later ones not.
        Endpoints are made on first use and kept. Returns the base URL now handed out."""
        self.engine.staging_host_after = max(0, int(after or 0))
        if mode is None:
            self.engine.staging_base_url = None
            return None
        if mode == "refuse":
            if self.refusing_socket is None:
                # Bound but never listening: the port stays ours, and every connect gets ECONNREFUSED.
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                self.refusing_socket = sock
            url = f"http://127.0.0.1:{self.refusing_socket.getsockname()[1]}"
        elif mode == "untrusted_tls":
            if self.tls_server is None:
                self.tls_server = self._start_tls_server()
            url = f"https://127.0.0.1:{self.tls_server.server_address[1]}"
        else:
            raise ValueError(f"staging_host must be one of {STAGING_HOSTS} or null, not {mode!r}")
        self.engine.staging_base_url = url
        return url

    def _start_tls_server(self) -> ThreadingHTTPServer:
        """An HTTPS listener serving the same presigned URLs, with a fresh self-signed certificate."""
        import ssl

        if shutil.which("openssl") is None:
            raise ValueError("staging_host untrusted_tls needs the openssl command, which is not installed")
        directory = self.storage.root / "_tls"
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "staging-cert.pem", directory / "staging-key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                        "-subj", "/CN=emulator staging storage", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        self.tls_cert_file = cert
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that does not trust the certificate aborts the handshake: expected

        server = QuietServer(("127.0.0.1", 0), make_handler(self))
        server.daemon_threads = True
        # Handshakes happen in the handler threads, so one stuck client cannot block accept().
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return server

    def shutdown(self) -> None:
        self.stopping.set()
        self.stop_server()
        if self.tls_server is not None:
            self.tls_server.shutdown()
            self.tls_server.server_close()
        if self.refusing_socket is not None:
            self.refusing_socket.close()
        self.engine.stop()


def make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    def accepted_authorizations() -> set[str]:
        """The main token, the restricted ones, and those with volume grants (landing nodes)."""
        tokens = [emu.token, *(emu.config.get("restricted_tokens") or []), *(emu.config.get("volume_grants") or {})]
        return {f"Bearer {t}" for t in tokens if t}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "databricks-emulator"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep stderr quiet; counters are available via /admin/stats

        # ---- plumbing ----
        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, code: int, body: bytes = b"", ctype: str = "text/plain",
                   headers: dict[str, str] | None = None) -> None:
            emu.stats.bump("http", str(code))
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            if "Content-Length" not in (headers or {}):  # a HEAD answer states the file's length
                self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, data: Any) -> None:
            self._reply(code, json.dumps(data, default=str).encode(), "application/json")

        def _drop(self) -> None:
            """Close the TCP connection without answering (as a network failure would)."""
            emu.stats.bump("http", "dropped")
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _refusing(self) -> bool:
            if time.monotonic() < emu.faults.refuse_until:
                self._drop()
                return True
            return False

        def _apply_faults(self, scope: str, rpc: str | None, statement: str | None,
                          method: str | None = None, path: str | None = None) -> bool:
            """Pre-processing faults. Returns True when the request has been answered/dropped."""
            f = emu.faults.take(("delay",), scope, rpc, statement, method, path)
            if f is not None:
                time.sleep(f.delay)
            f = emu.faults.take(("unavailable", "throttle", "drop"), scope, rpc, statement, method, path)
            if f is None:
                return False
            if f.kind == "drop":
                self._drop()
            elif scope == "files":
                self._files_fault(f)
            elif f.kind == "unavailable":
                hdrs = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
                hdrs["x-databricks-reason-phrase"] = "Warehouse is starting"
                self._reply(503, b"TEMPORARILY_UNAVAILABLE: the SQL warehouse is starting", headers=hdrs)
            else:
                self._reply(429, b"REQUEST_LIMIT_EXCEEDED: too many requests",
                            headers={"Retry-After": str(f.retry_after if f.retry_after is not None else 1)})
            return True

        def _oauth_token(self, body: bytes) -> None:
            """Databricks' OAuth machine-to-machine endpoint: client credentials in, the token out."""
            import base64

            emu.stats.bump("rpc", "OAuthToken")
            form = parse_qs(body.decode("utf-8", "replace"))
            auth = self.headers.get("Authorization", "")
            client = (None, None)
            if auth.startswith("Basic "):
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    client = tuple(base64.b64decode(auth[6:]).decode().split(":", 1))  # type: ignore[assignment]
            elif "client_id" in form:
                client = (form["client_id"][0], form.get("client_secret", [""])[0])
            known = emu.clients.get(client[0] or "")
            if form.get("grant_type") != ["client_credentials"] or known is None or known != client[1]:
                self._json(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
                return
            self._json(200, {"access_token": emu.token or "emulator-oauth-token", "token_type": "Bearer",
                             "expires_in": 3600, "scope": "all-apis"})

        def _auth_ok(self) -> bool:
            if emu.token is None:
                return True
            auth = self.headers.get("Authorization")
            if not auth:
                self._reply(401, b"Unauthorized: no credentials",
                            headers={"x-databricks-reason-phrase": "Credential was not sent or was of an "
                                     "unsupported type for this API."})
                return False
            if auth not in accepted_authorizations():
                self._reply(403, b"Invalid access token.",
                            headers={"x-databricks-reason-phrase": "Invalid access token."})
                return False
            return True

        # ---- verbs ----
        def do_POST(self) -> None:
            if self._refusing():
                return
            path = urlparse(self.path).path
            if path.startswith("/admin/"):
                self._admin(path, self._body())
            elif path == "/oidc/v1/token":
                self._oauth_token(self._body())
            elif FILES_API_RE.match(path):
                self._files("POST")
            elif path in FILES_PRESIGNED_PATHS:
                self._presigned_disabled()
            elif THRIFT_PATH_RE.match(path):
                self._thrift()
            else:
                self._body()
                self._reply(404, b"Not Found")

        def do_GET(self) -> None:
            if self._refusing():
                return
            path = urlparse(self.path).path
            if path == "/admin/stats":
                self._json(200, {**emu.stats.snapshot(), "faults_active": emu.faults.describe(),
                                 "config": emu.config})
            elif path == "/admin/health":
                self._json(200, {"ok": True})
            elif path.startswith(STAGING_PREFIX):
                self._staging("GET")
            elif FILES_API_RE.match(path):
                self._files("GET")
            elif path == FILES_ENDPOINTS_PATH:
                self._files_endpoints()
            elif path == "/oidc/.well-known/oauth-authorization-server":
                self._oidc_discovery()
            elif path == "/.well-known/databricks-config":
                self._host_metadata()
            else:
                self._reply(404, b"Not Found")

        def do_HEAD(self) -> None:
            if self._refusing():
                return
            if FILES_API_RE.match(urlparse(self.path).path):
                self._files("HEAD")
            else:
                self._reply(404)

        def do_PUT(self) -> None:
            if self._refusing():
                return
            path = urlparse(self.path).path
            if path.startswith(STAGING_PREFIX):
                self._staging("PUT")
            elif FILES_API_RE.match(path):
                self._files("PUT")
            else:
                self._body()
                self._reply(404, b"Not Found")

        def do_DELETE(self) -> None:
            if self._refusing():
                return
            path = urlparse(self.path).path
            if path.startswith(STAGING_PREFIX):
                self._staging("DELETE")
            elif FILES_API_RE.match(path):
                self._files("DELETE")
            else:
                self._reply(404, b"Not Found")

        # ---- Thrift ----
        def _thrift(self) -> None:
            body = self._body()
            if not self._auth_ok():
                return
            REQUEST.authorization = self.headers.get("Authorization")
            rpc, statement = peek_thrift_call(body)
            emu.stats.bump("rpc", rpc or "unknown")
            client = self._client()
            emu.stats.bump_client(client, "rpc")
            if rpc == "ExecuteStatement":
                emu.stats.bump_client(client, "statements")
            if self._apply_faults("thrift", rpc, statement):
                return
            iprot = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(body))
            out = TTransport.TMemoryBuffer()
            oprot = TBinaryProtocol.TBinaryProtocol(out)
            emu.processor.process(iprot, oprot)
            if emu.faults.take(("drop_after_execute",), "thrift", rpc, statement) is not None:
                # The statement ran; the client never hears about it and re-sends.
                self._drop()
                return
            self._reply(200, out.getvalue(), "application/x-thrift")


        # ---- Files API (/api/2.0/fs/files/Volumes/..., /api/2.0/fs/directories/Volumes/...) ----
        def _client(self) -> str:
            """Who sent the request, for per-client counters: a label the client chose, else a
            digest of its token (never the token: stats end up in logs)."""
            import hashlib

            label = self.headers.get("X-Emulator-Client")
            if label:
                return label
            # Neither the SDK nor the connector sends custom headers, but both add to User-Agent:
            # Config().with_user_agent_extra("emulator-client", "node-a") / user_agent_entry=...
            m = CLIENT_UA_RE.search(self.headers.get("User-Agent") or "")
            if m:
                return m.group(1)
            auth = self.headers.get("Authorization") or ""
            if not auth:
                return "anonymous"
            return "token:" + hashlib.sha256(auth.removeprefix("Bearer ").encode()).hexdigest()[:12]

        def _files_error(self, err: FilesError) -> None:
            self._json(err.status, err.body())

        def _files(self, method: str) -> None:
            url = urlparse(self.path)
            kind, vpath = FILES_API_RE.match(url.path).groups()  # type: ignore[union-attr]
            vpath = unquote(vpath)
            tmp = None
            try:
                if method == "PUT" and kind == "files":
                    tmp = self._body_to_file(emu.files.new_temp())
                else:
                    self._body()
                emu.stats.bump("files", method)
                emu.stats.bump_client(self._client(), f"files {method}")
                if not self._files_auth(method, vpath):
                    return
                if self._apply_faults("files", None, None, method, url.path):
                    return
                try:
                    answer = self._files_dispatch(method, kind, vpath, parse_qs(url.query), tmp)
                except FilesError as err:
                    self._files_error(err)
                    return
                if method in ("PUT", "DELETE") and emu.faults.take(
                        ("drop_after_write",), "files", None, None, method, url.path) is not None:
                    # The write happened; the client never hears about it and must find out.
                    self._drop()
                    return
                self._reply(answer.status, answer.body, answer.ctype, answer.headers)
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)

        def _files_dispatch(self, method: str, kind: str, vpath: str, query: dict[str, list[str]],
                            tmp: Path | None) -> FilesAnswer:
            def arg(name: str) -> str | None:
                return query.get(name, [None])[0]

            if kind == "files":
                if method == "PUT":
                    assert tmp is not None
                    # Databricks: "If true or unspecified, an existing file will be overwritten."
                    overwrite = (arg("overwrite") or "true").lower() != "false"
                    return emu.files.put_file(vpath, tmp, overwrite)
                if method in ("GET", "HEAD"):
                    return emu.files.get_file(vpath, self.headers, head=method == "HEAD")
                if method == "DELETE":
                    return emu.files.delete_file(vpath)
                return self._files_multipart(vpath, arg("action"))
            if method == "PUT":
                return emu.files.create_directory(vpath)
            if method == "HEAD":
                return emu.files.directory_metadata(vpath)
            if method == "GET":
                return emu.files.list_directory(vpath, arg("page_size"), arg("page_token"))
            if method == "DELETE":
                return emu.files.delete_directory(vpath)
            raise FilesError(405, "BAD_REQUEST", f"{method} is not allowed on directories.")

        def _files_multipart(self, vpath: str, action: str | None) -> FilesAnswer:
            """Multipart uploads through presigned URLs are not emulated. An SDK that starts one (0.8x
            to 0.14x do for >= 50 MiB; newer ones only when the endpoints API offers it) gets a
            session, then a refusal of the part URLs as from a workspace whose presigned URLs are
            disabled, and falls back to one PUT of the whole file."""
            emu.files.resolve(vpath, is_file=True)
            if action == "initiate-upload":
                body = {"multipart_upload": {"session_token": secrets.token_urlsafe(16)}}
                return FilesAnswer(200, {}, json.dumps(body).encode())
            if action == "abort-upload":
                return FilesAnswer(200, {}, b"{}")
            raise FilesError(400, "INVALID_PARAMETER_VALUE", f"Unsupported action {action!r}.")

        def _presigned_disabled(self) -> None:
            """create-upload-part-urls / -download-url / -resumable-upload-url / -abort-upload-url."""
            self._body()
            emu.stats.bump("http", "fs_presigned_refused")
            self._json(403, FilesError(403, "PERMISSION_DENIED", "Presigned URLs are not enabled for this "
                                       "workspace (emulator).", "FILES_API_API_IS_NOT_ENABLED").body())

        def _files_auth(self, method: str, vpath: str | None) -> bool:
            """Bearer token as on the Thrift side; then the volume grants of least-privilege tokens:
            reading or listing needs READ VOLUME, writing or deleting WRITE VOLUME (Unity Catalog)."""
            auth = self.headers.get("Authorization")
            if emu.token is not None and not auth:
                self._json(401, {"error_code": "UNAUTHENTICATED", "message": "Credential was not sent or "
                                 "was of an unsupported type for this API."})
                return False
            if emu.token is not None and auth not in accepted_authorizations():
                self._json(403, {"error_code": "PERMISSION_DENIED", "message": "Invalid access token."})
                return False
            grants = (emu.config.get("volume_grants") or {}).get((auth or "").removeprefix("Bearer "))
            if grants is None or vpath is None:  # vpath None: no volume involved (endpoint discovery)
                return True
            held = {g.upper().removesuffix(" VOLUME") for g in grants}
            needed = "WRITE" if method in FILES_WRITE_METHODS else "READ"
            if needed in held or "ALL PRIVILEGES" in held:
                return True
            volume = ".".join([p for p in vpath.split("/") if p][1:4])
            self._json(403, {"error_code": "PERMISSION_DENIED",
                             "message": f"User does not have {needed} VOLUME on Volume '{volume}'."})
            return False

        def _files_fault(self, f: Fault) -> None:
            if f.kind == "unavailable":
                hdrs = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
                self._json_with(503, {"error_code": "TEMPORARILY_UNAVAILABLE",
                                      "message": "The service is temporarily unavailable."}, hdrs)
            else:
                hdrs = {"Retry-After": str(f.retry_after if f.retry_after is not None else 1)}
                self._json_with(429, {"error_code": "REQUEST_LIMIT_EXCEEDED",
                                      "message": "Too many requests. Please retry later."}, hdrs)

        def _json_with(self, code: int, data: Any, headers: dict[str, str]) -> None:
            self._reply(code, json.dumps(data).encode(), "application/json", headers)

        def _body_to_file(self, tmp: Path) -> Path:
            """Stream the request body into tmp (Content-Length or chunked), not into memory."""
            with open(tmp, "wb") as out:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()  # the empty line after the last chunk (no trailers)
                            break
                        out.write(self.rfile.read(size))
                        self.rfile.readline()
                else:
                    left = int(self.headers.get("Content-Length") or 0)
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        out.write(chunk)
                        left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            return tmp

        def _files_endpoints(self) -> None:
            """The SDK's endpoint discovery (databricks-sdk >= 0.7x FilesExt): the emulator offers only
            Files API 2.0 on this host without multipart, so every upload is one PUT; a workspace
            can answer the same. With files_endpoints "none" it answers 404, as a workspace that
            does not serve the API yet does, and the SDK falls back to its built-in order."""
            self._body()
            emu.stats.bump("http", "fs_endpoints")
            if not self._files_auth("GET", None):
                return
            if emu.config.get("files_endpoints") == "none":
                self._json(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for "
                                 f"'GET {FILES_ENDPOINTS_PATH}'"})
                return
            host = self.headers.get("Host") or f"127.0.0.1:{emu.port}"
            self._json(200, {"endpoints": [{"api": "FILES_API", "api_version": "2.0", "scheme": "http",
                                            "hostname": host, "multipart_upload_supported": False}]})

        def _host_metadata(self) -> None:
            """databricks-sdk (>= 0.7x) reads this first; OAuth M2M finds its discovery URL here (without
            it the SDK has no token endpoint for an http:// host)."""
            base = f"http://{self.headers.get('Host') or f'127.0.0.1:{emu.port}'}"
            self._json(200, {"oidc_endpoint": f"{base}/oidc", "workspace_id": EMULATOR_WORKSPACE_ID})

        def _oidc_discovery(self) -> None:
            """Where the SDK's OAuth M2M (client_id/client_secret) finds the token endpoint."""
            base = f"http://{self.headers.get('Host') or f'127.0.0.1:{emu.port}'}"
            self._json(200, {"issuer": f"{base}/oidc", "authorization_endpoint": f"{base}/oidc/v1/authorize",
                             "token_endpoint": f"{base}/oidc/v1/token"})

        # ---- presigned URLs of PUT/GET/REMOVE ----
        def _staging(self, method: str) -> None:
            body = self._body() if method == "PUT" else b""
            if self._apply_faults("staging", None, None):
                return
            token = urlparse(self.path).path[len(STAGING_PREFIX):]
            target = emu.engine.presigned_target(token, method)
            if target is None:
                self._reply(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired or the "
                                 b"signature does not match</Message></Error>", "application/xml")
                return
            if method == "PUT":
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.upload")
                tmp.write_bytes(body)
                os.replace(tmp, target)  # readers never see a half-written file
                emu.stats.bump("http", "staging_put")
                self._reply(200)
            elif method == "GET":
                if not target.is_file():
                    self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
                    return
                emu.stats.bump("http", "staging_get")
                self._reply(200, target.read_bytes(), "application/octet-stream")
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                emu.stats.bump("http", "staging_delete")
                self._reply(204)

        # ---- admin ----
        def _admin(self, path: str, body: bytes) -> None:
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                self._json(400, {"error": "body must be JSON"})
                return
            if path == "/admin/faults":
                self._admin_faults(data)
            elif path == "/admin/reset":
                emu.faults.clear()
                emu.stats.reset()
                emu.config.clear()
                emu.set_staging_host(None)
                self._json(200, {"ok": True})
            elif path == "/admin/config":
                if "staging_host" in data:
                    try:
                        url = emu.set_staging_host(data["staging_host"], data.get("staging_host_after") or 0)
                    except (ValueError, TypeError, OSError, subprocess.CalledProcessError) as exc:
                        self._json(400, {"error": str(exc)})
                        return
                    data = {**data, "staging_url": url,
                            "staging_ca_file": str(emu.tls_cert_file) if url and url.startswith("https") else None}
                emu.config.update({k: v for k, v in data.items() if v is not None})
                for k in [k for k, v in data.items() if v is None]:
                    emu.config.pop(k, None)
                self._json(200, {"config": emu.config})
            else:
                self._reply(404, b"Not Found")

        def _admin_faults(self, data: Any) -> None:
            items = data.get("faults", [data]) if isinstance(data, dict) else data
            if isinstance(data, dict) and data.get("clear"):
                emu.faults.clear()
                items = data.get("faults", [])
            try:
                parsed = [Fault.from_json(d) for d in items]
            except (ValueError, TypeError) as exc:
                self._json(400, {"error": str(exc)})
                return
            refuse = [f for f in parsed if f.kind == "refuse"]
            for f in parsed:
                if f.kind != "refuse":
                    emu.faults.add(f)
            self._json(200, {"faults_active": emu.faults.describe()})
            for f in refuse:
                seconds = (f.until - time.monotonic()) if f.until else 1.0
                emu.refuse_for(max(0.0, seconds))

    return Handler


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--token", default=None, help="required Bearer token (default: accept any)")
    p.add_argument("--client", action="append", default=[], metavar="ID:SECRET",
                   help="a service principal accepted by /oidc/v1/token (repeatable); it gets --token")
    p.add_argument("--catalog", action="append", default=[],
                   help="extra catalog name mapped onto Spark's session catalog (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    emu = Emulator(args.port, args.data_dir, args.token)
    emu.clients = dict(pair.split(":", 1) for pair in args.client if ":" in pair)
    emu.engine.catalogs.update(c.lower() for c in args.catalog)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    emu.start_server()
    print(f"emulator ready on http://127.0.0.1:{args.port}", flush=True)
    while not stop.wait(0.5):
        pass
    log("stopping")
    emu.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
