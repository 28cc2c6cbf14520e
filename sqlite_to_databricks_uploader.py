# /// script
# requires-python = ">=3.10"
# dependencies = [
#     # 4.4.0: older versions refuse REMOVE unless staging_allowed_local_path is set, and that
#     # option would let the server name local files for the connector to read or write.
#     "databricks-sql-connector[pyarrow]>=4.4.0,<5",
#     "deltalake>=1.2,<2",
#     "pyarrow>=18",
#     "pandas>=2.2",
#     "pyyaml>=6",
#     # The landing path: the Files API client. 0.80: earlier versions do not re-send an upload
#     # whose answer was lost.
#     "databricks-sdk>=0.80,<1",
#     # Batches read straight from SQLite into Arrow (sqlite_reader: native).
#     "adbc-driver-sqlite>=1.13",
# ]
# ///
"""Ship new rows from a SQLite table into a Delta / Databricks table, exactly once.

Map of this file, in the order data flows:

1. Configuration  -- OPTIONS (every YAML key / environment variable / flag), load_settings()
2. Source         -- open SQLite read-only, detect table and timestamp column, timestamp parsing
3. Cursor         -- insertion order guarded by a fingerprint (rowid tables) or a (timestamp, key)
                     keyset (WITHOUT ROWID); window planning, batch reading (Python's sqlite3, and
                     the NativeReader: adbc-driver-sqlite into Arrow where exact)
4. Transforms     -- sanitize -> filter -> aggregate (pandas), validated at start-up
5. Targets        -- the Target interface; DeltaTarget (embedded default); DatabricksTarget, made of
                     DatabricksSession -> DatabricksTable -> ProgressTable -> CopyLoad / InsertLoad;
                     the landing path: LandingTarget (a node: Files API only) and LandedLoader
6. State          -- the JSON state file, atomic writes, reconciliation with the target, the heartbeat,
                     the state directory's lock (one process per state_dir)
7. Run loop / CLI -- cycles, backoff, signals (and a uv parent's death), logging, the loader's loop,
                     --run-query, main()

Exit codes: 0 success, 1 a run-time failure (upload or I/O failed; retried in loop mode),
2 bad configuration or input (nothing will fix itself), 130/143 stopped by a second signal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import decimal
import errno
import gc
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

TOOL_NAME = "sqlite_to_databricks_uploader"
TOOL_VERSION = "1.0.0"
STATE_FORMAT = 2  # 2: the cursor's insertion order (fields order, tail, below)
LOG = logging.getLogger(TOOL_NAME)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Control characters shown escaped (a newline as \\n), so that a value echoed into a message
    cannot split a log line or fake a second one."""
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


class UploaderError(Exception):
    """A failure with a message meant for the user; exit_code says what kind. The message is always
    one line."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ConfigError(UploaderError):
    """Bad configuration or input: retrying will not help."""

    exit_code = EXIT_BAD_INPUT


class TransientError(UploaderError):
    """A failure that a later attempt may not meet (network, locks, a busy target)."""


# =====================================================================================
# 1. Configuration
# =====================================================================================

SECRET_MASK = "********"


@dataclass(frozen=True)
class Option:
    """One setting, reachable as a YAML key, an environment variable and a flag."""

    key: str
    env: str
    kind: str  # str | int | float | bool | json | choice
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    secret: bool = False
    minimum: float | None = None
    maximum: float | None = None
    flags: tuple[str, ...] = ()  # extra flag spellings; the first flag is always --key-with-dashes

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    # --- SQLite source
    Option("sqlite", "SQLITE_PATH", "str", None, "Path of the SQLite database to read (opened read-only)."),
    Option("sqlite_table_name", "SQLITE_TABLE_NAME", "str", None,
           "Table to upload. Default: the database's only table.", flags=("--table",)),
    Option("timestamp_col", "TIMESTAMP_COL", "str", None,
           "Column holding each row's time. Default: detected from declared types, names and values."),
    Option("cursor", "CURSOR", "choice", "timestamp",
           "Both find new rows by insertion order in rowid tables, whatever their timestamps. 'timestamp' also "
           "uploads rows inserted below the cursor's rowid when they are newer than every uploaded row, and is "
           "the only choice for WITHOUT ROWID tables ((timestamp, key) keyset); 'rowid' needs no timestamp.",
           choices=("timestamp", "rowid")),
    Option("source_timezone", "SOURCE_TIMEZONE", "str", "UTC",
           "Time zone of timestamps stored without an offset (IANA name such as Europe/Berlin)."),
    Option("invalid_timestamps", "INVALID_TIMESTAMPS", "choice", "upload",
           "Rows whose timestamp is NULL or unreadable: 'upload' them with a NULL timestamp, or 'skip' "
           "them. Either way they are counted in the logs and never block newer rows.",
           choices=("upload", "skip")),
    Option("batch_size", "BATCH_SIZE", "int", 100_000,
           "Rows per batch: one read of SQLite, one commit to the target. Bounds memory.", minimum=1,
           maximum=2**63 - 1),
    Option("sqlite_busy_timeout", "SQLITE_BUSY_TIMEOUT", "float", 30.0,
           "Seconds to wait for a writer's lock before a read gives up.", minimum=0),
    Option("sqlite_reader", "SQLITE_READER", "choice", "native",
           "'native': batches read straight into Arrow (adbc-driver-sqlite) where that is exact, the other "
           "columns through Python's sqlite3; 'python': every value through Python's sqlite3 (slower, the same "
           "values).", choices=("native", "python")),
    # --- Target selection and the local Delta target
    Option("target", "UPLOAD_TARGET", "choice", "auto",
           "Where rows go: 'delta' (a local or object-store Delta table), 'databricks', or 'auto' "
           "(databricks when any Databricks connection setting is given, otherwise delta).",
           choices=("auto", "delta", "databricks")),
    Option("delta_path", "DELTA_PATH", "str", None,
           "Delta table location: a directory or an s3://, abfss://, gs:// URI. "
           "Default: ./lakehouse/<table name>."),
    # --- Databricks
    Option("databricks_host", "DATABRICKS_HOST", "str", None,
           "Workspace host name, e.g. adb-123.azuredatabricks.net."),
    Option("databricks_http_path", "DATABRICKS_HTTP_PATH", "str", None,
           "HTTP path of the SQL warehouse or cluster, e.g. /sql/1.0/warehouses/abc123."),
    Option("databricks_token", "DATABRICKS_TOKEN", "str", None,
           "Personal access token. Prefer the environment variable: flags are visible to other processes.",
           secret=True),
    Option("databricks_client_id", "DATABRICKS_CLIENT_ID", "str", None,
           "OAuth client (application) id of a service principal: the recommended credentials for fleets."),
    Option("databricks_client_secret", "DATABRICKS_CLIENT_SECRET", "str", None,
           "OAuth secret of that service principal. Prefer the environment variable.", secret=True),
    Option("databricks_catalog", "DATABRICKS_CATALOG", "str", None,
           "Unity Catalog catalog of the target table. Default: the workspace's default catalog."),
    Option("databricks_database", "DATABRICKS_DATABASE", "str", "default",
           "Schema (database) of the target table."),
    Option("databricks_table", "DATABRICKS_TABLE", "str", None,
           "Target table name. Default: the SQLite table's name."),
    Option("staging_volume", "STAGING_VOLUME", "str", "auto",
           "Unity Catalog volume for bulk loads, /Volumes/<catalog>/<schema>/<volume>[/dir]; 'auto' = "
           "/Volumes/<catalog>/<schema>/sqlite_uploader_staging (created if allowed); 'none' = INSERT only."),
    Option("load_mode", "LOAD_MODE", "choice", "direct",
           "How rows reach Databricks: 'direct' (this node runs SQL on a warehouse: COPY INTO through "
           "staging_volume, or INSERT) or 'landing' (this node only uploads Parquet files into landing_volume "
           "through the Files API, no warehouse; a loader run with --load-landed loads them).",
           choices=("direct", "landing")),
    Option("landing_volume", "LANDING_VOLUME", "str", None,
           "Unity Catalog volume of the landing path, /Volumes/<catalog>/<schema>/<volume>[/dir]: nodes put "
           "each batch under <table>/<node>/ there; --load-landed loads every table found there."),
    Option("create_table", "CREATE_TABLE", "bool", True,
           "Create a missing schema, table, progress table and volume, and add new source columns."),
    Option("node_id", "NODE_ID", "str", None,
           "Name of this edge node in lineage and progress records. Default: the host name."),
    Option("lineage_columns", "LINEAGE_COLUMNS", "list", [],
           "Lineage columns to add to each row: any of node_id, batch_id, uploaded_at (as _node_id, "
           "_batch_id, _uploaded_at), comma-separated, or 'all'.",
           choices=("node_id", "batch_id", "uploaded_at")),
    Option("databricks_retry_timeout", "DATABRICKS_RETRY_TIMEOUT", "float", 120.0,
           "Seconds the connector keeps retrying one request (network down, HTTP 503/429) before the "
           "cycle fails and is retried with backoff.", minimum=1, maximum=86_400),
    # --- Processing
    Option("enable_sanitize", "ENABLE_SANITIZE", "bool", False, "Apply sanitize_config to each batch."),
    Option("sanitize_config", "SANITIZE_CONFIG", "json", {},
           "JSON/YAML mapping: remove_nulls (list of columns), replace_values ({column: {old: new}})."),
    Option("enable_filter", "ENABLE_FILTER", "bool", False, "Apply filter_config to each batch."),
    Option("filter_config", "FILTER_CONFIG", "json", {},
           "JSON/YAML mapping {column: value | {operator: value}}; operators > >= < <= == != in not_in."),
    Option("enable_aggregate", "ENABLE_AGGREGATE", "bool", False, "Apply aggregate_config to each batch."),
    Option("aggregate_config", "AGGREGATE_CONFIG", "json", {},
           "JSON/YAML mapping: group_by (columns or time buckets minute/hour/day), "
           "aggregations ({column: avg|min|max|sum|count|first|last})."),
    # --- Operation
    Option("state_dir", "STATE_DIR", "str", "/state", "Directory of the state file (upload_state.json)."),
    Option("interval", "UPLOAD_INTERVAL", "float", 300.0, "Seconds between upload cycles.", minimum=0,
           maximum=31 * 86_400),
    Option("once", "ONCE", "bool", False, "Drain the backlog once, then exit (for batch jobs)."),
    Option("log_level", "LOG_LEVEL", "choice", "INFO", "DEBUG, INFO, WARNING or ERROR.",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_format", "LOG_FORMAT", "choice", "text", "'text' or 'json' (one JSON object per line).",
           choices=("text", "json")),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Field names are the YAML keys."""

    sqlite: str | None = None
    sqlite_table_name: str | None = None
    timestamp_col: str | None = None
    cursor: str = "timestamp"
    source_timezone: str = "UTC"
    invalid_timestamps: str = "upload"
    batch_size: int = 100_000
    sqlite_busy_timeout: float = 30.0
    sqlite_reader: str = "native"
    target: str = "auto"
    delta_path: str | None = None
    databricks_host: str | None = None
    databricks_http_path: str | None = None
    databricks_token: str | None = None
    databricks_client_id: str | None = None
    databricks_client_secret: str | None = None
    databricks_catalog: str | None = None
    databricks_database: str = "default"
    databricks_table: str | None = None
    staging_volume: str = "auto"
    load_mode: str = "direct"
    landing_volume: str | None = None
    create_table: bool = True
    node_id: str | None = None
    lineage_columns: list = field(default_factory=list)
    databricks_retry_timeout: float = 120.0
    enable_sanitize: bool = False
    sanitize_config: dict = field(default_factory=dict)
    enable_filter: bool = False
    filter_config: dict = field(default_factory=dict)
    enable_aggregate: bool = False
    aggregate_config: dict = field(default_factory=dict)
    state_dir: str = "/state"
    interval: float = 300.0
    once: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    # Where each value came from ("default", "config file x.yaml", "environment", "flag").
    sources: dict = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # never show the token, whatever prints this object
        shown = {k: v for k, v in self.masked().items() if k != "sources"}
        return f"Settings({shown})"

    __str__ = __repr__

    def masked(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for option in OPTIONS:
            if option.secret and values.get(option.key):
                values[option.key] = SECRET_MASK
        return values


@dataclass(frozen=True)
class Invocation:
    """What the command line asks for besides settings: an action and its output format."""

    settings: Settings
    run_query: str | None = None
    output: str = "table"
    config_path: str | None = None
    healthcheck: bool = False
    load_landed: bool = False


TRUE_WORDS = {"true", "1", "yes", "on", "y"}
FALSE_WORDS = {"false", "0", "no", "off", "n", ""}


def parse_bool(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return raw.strip().lower() in TRUE_WORDS
    raise ConfigError(f"{where}: expected true or false (also 1/0, yes/no), got {raw!r}.")


def convert_value(option: Option, raw: Any, where: str) -> Any:
    """Turn a raw value from YAML, the environment or a flag into the option's type."""
    if raw is None:
        return None
    kind = option.kind
    if kind == "bool":
        return parse_bool(raw, where)
    if kind == "json":
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc.msg} at position {exc.pos}).") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (JSON object), got {type(value).__name__}.")
        return value
    if kind in ("int", "float"):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a number, got {raw!r}.")
        try:
            number = int(str(raw).strip()) if kind == "int" else float(str(raw).strip())
        except ValueError:
            wanted = "a whole number" if kind == "int" else "a number"
            raise ConfigError(f"{where}: expected {wanted}, got {raw!r}.") from None
        if kind == "float" and not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {raw!r}.")
        if option.minimum is not None and number < option.minimum:
            raise ConfigError(f"{where}: must be at least {option.minimum:g}, got {raw!r}.")
        if option.maximum is not None and number > option.maximum:
            raise ConfigError(f"{where}: must be at most {option.maximum:,.0f}, got {raw!r}.")
        return number
    if kind == "list":
        return convert_list(option, raw, where)
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got a {type(raw).__name__}.")
    text = str(raw)
    if kind == "choice":
        match = {c.lower(): c for c in option.choices}.get(text.strip().lower())
        if match is None:
            raise ConfigError(f"{where}: must be one of {', '.join(option.choices)}; got {raw!r}.")
        return match
    return text


def convert_list(option: Option, raw: Any, where: str) -> list[str]:
    """A list from YAML, a JSON list, or comma-separated words; 'all' means every choice."""
    items = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not a valid JSON list ({exc.msg}).") from None
        else:
            items = [word.strip() for word in text.split(",") if word.strip()]
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{where}: expected a list of names, got {raw!r}.")
    if [item.lower() for item in items] == ["all"]:
        return list(option.choices)
    unknown = [item for item in items if item not in option.choices]
    if unknown:
        raise ConfigError(f"{where}: unknown value(s) {', '.join(map(repr, unknown))}; "
                          f"use {', '.join(option.choices)} or all.")
    return list(dict.fromkeys(items))


def read_yaml_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist. Check --config.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"Config file {path} is not valid YAML{at}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must be a mapping of keys to values, not {type(data).__name__}.")
    unknown = sorted(str(k) for k in data if k not in OPTIONS_BY_KEY)
    if unknown:
        raise ConfigError(
            f"Config file {path}: unknown key(s) {', '.join(unknown)}. "
            "See databricks-uploader-config.yaml.example for the valid keys."
        )
    return data


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlite_to_databricks_uploader.py",
        description="Upload new rows of a SQLite table to a Databricks (or local Delta) table, exactly once.",
        epilog="Every setting can also come from the YAML file (--config) or an environment variable; "
        "precedence is flags > environment > YAML > defaults. Exit codes: 0 ok, 1 run-time failure, "
        "2 bad configuration or input.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML configuration file [env UPLOADER_CONFIG].")
    parser.add_argument("--run-query", metavar="SQL",
                        help="Run SQL against the target and print the result, or INFO for a summary.")
    parser.add_argument("--output", choices=("table", "json", "csv"), help="Output of --run-query (table).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {TOOL_VERSION}")
    parser.add_argument("--healthcheck", action="store_true",
                        help="Exit 0 if the upload loop using this state_dir is alive (its heartbeat is fresh), "
                        "else 1. For container health checks.")
    parser.add_argument("--load-landed", action="store_true",
                        help="Run the loader of the landing path: load every file that nodes landed in "
                        "landing_volume into its table with COPY INTO, exactly once, then remove them. "
                        "Repeats every interval; with --once, one pass (for a scheduled job).")
    for option in OPTIONS:
        env_note = f" [env {option.env}; default {option.default!r}]"
        flags = (option.flag, *option.flags)
        if option.kind == "bool":
            parser.add_argument(*flags, dest=option.key, action=argparse.BooleanOptionalAction,
                                help=option.help + env_note)
        else:
            parser.add_argument(*flags, dest=option.key, metavar=option.key.upper(),
                                help=option.help + env_note)
    return parser


def warn_if_secrets_exposed(path: str, yaml_values: dict[str, Any]) -> None:
    """A token in a file that other users can read is a token they have."""
    secrets = [o.key for o in OPTIONS if o.secret and yaml_values.get(o.key)]
    if not secrets:
        return
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & 0o077:
            LOG.warning("Config file %s holds %s and can be read by other users (mode %s). Restrict it "
                        "(chmod 600 %s) or pass the secret in the environment instead.", path,
                        " and ".join(secrets), oct(mode & 0o777), path)


def load_settings(argv: Sequence[str] | None, environ: dict[str, str] | None = None) -> Invocation:
    """Merge defaults < YAML < environment < flags, converting and checking each value."""
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_arg_parser().parse_args(argv))
    # UPLOADER_CONFIG names the file for every invocation in a container (the health check too).
    config_path = args.pop("config", None) or environ.get("UPLOADER_CONFIG") or None
    yaml_values = read_yaml_config(config_path) if config_path else {}
    if config_path:
        warn_if_secrets_exposed(config_path, yaml_values)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        value, source = option.default, "default"
        if yaml_values.get(option.key) is not None:  # `key:` left empty means "not set"
            where = f"config file {config_path}, key '{option.key}'"
            value, source = convert_value(option, yaml_values[option.key], where), where
        if option.env in environ:
            where = f"environment variable {option.env}"
            value, source = convert_value(option, environ[option.env], where), where
        if option.key in args:
            where = f"flag {option.flag}"
            value, source = convert_value(option, args[option.key], where), where
            if option.secret:
                LOG.warning("%s was given as a flag (%s): other users of this machine can see it in the "
                            "process list. Prefer the %s environment variable.", option.key, option.flag, option.env)
        values[option.key] = value
        sources[option.key] = source
    if not values["node_id"]:
        values["node_id"] = socket.gethostname() or "node"
    settings = Settings(**values, sources=sources)
    validate_settings(settings)
    return Invocation(settings=settings, run_query=args.get("run_query"),
                      output=args.get("output", "table"), config_path=config_path,
                      healthcheck=args.get("healthcheck", False), load_landed=args.get("load_landed", False))


def validate_settings(settings: Settings) -> None:
    """Cross-field checks that need no database."""
    if settings.staging_volume.strip().lower() not in ("auto", "none"):
        parse_volume(settings.staging_volume)
    if settings.landing_volume:
        parse_volume(settings.landing_volume, "landing_volume")
    try:
        timezone_from_name(settings.source_timezone)
    except ConfigError as exc:
        raise ConfigError(f"{settings.sources.get('source_timezone', 'source_timezone')}: {exc}") from None
    for flag, config in (("enable_sanitize", "sanitize_config"), ("enable_filter", "filter_config"),
                         ("enable_aggregate", "aggregate_config")):
        if getattr(settings, config) and not getattr(settings, flag):
            LOG.info("%s is set but %s is off: it is not applied.", config, flag)


def timezone_from_name(name: str) -> timezone | Any:
    if name.strip().upper() in ("UTC", "Z", "GMT", "ETC/UTC"):
        return timezone.utc
    offset = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", name.strip())
    if offset:
        sign = 1 if offset.group(1) == "+" else -1
        if int(offset.group(2)) > 23 or int(offset.group(3)) > 59:
            raise ConfigError(f"offset {name!r} is out of range; offsets run from -23:59 to +23:59.")
        return timezone(sign * timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3))))
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(name.strip())
    except Exception:
        raise ConfigError(f"unknown time zone {name!r}; use an IANA name (Europe/Berlin), UTC or +02:00.") from None


def uses_databricks(settings: Settings) -> bool:
    if settings.load_mode == "landing":
        return True
    if settings.target != "auto":
        return settings.target == "databricks"
    return any((settings.databricks_host, settings.databricks_http_path, settings.databricks_token,
                settings.databricks_client_id))


# =====================================================================================
# 2. Source: SQLite, read-only, writer-friendly
# =====================================================================================

TIMESTAMP_NAMES = (
    "timestamp", "ts", "time", "event_time", "event_timestamp", "created_at", "created", "datetime",
    "date_time", "recorded_at", "reading_time", "measured_at", "time_stamp", "timestamp_utc", "logged_at",
    "inserted_at", "updated_at", "date",
)
TIMESTAMP_DECLARED = re.compile(r"DATE|TIME", re.IGNORECASE)


@dataclass(frozen=True)
class Column:
    name: str
    declared_type: str


@dataclass(frozen=True)
class SourceTable:
    """A SQLite table as the uploader sees it."""

    name: str
    columns: tuple[Column, ...]
    locator: tuple[str, ...]  # ("rowid",) or the primary key of a WITHOUT ROWID table
    timestamp_col: str | None
    rowid_alias: bool = False  # an INTEGER PRIMARY KEY: rowids survive VACUUM

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def quote_ident(name: str) -> str:
    """Quote an identifier for SQLite (double quotes, doubled inside)."""
    return '"' + name.replace('"', '""') + '"'


def sqlite_locked(exc: Exception) -> bool:
    """A writer holds the lock: worth waiting for, unlike other SQLite errors."""
    return "locked" in str(exc) or "busy" in str(exc)


def sqlite_corrupt(exc: Exception) -> bool:
    return "malformed" in str(exc) or "not a database" in str(exc)


def open_sqlite(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the database read-only; autocommit so every statement is its own short read transaction."""
    if not os.path.exists(path):
        raise ConfigError(f"SQLite database {path} does not exist. Check sqlite / SQLITE_PATH / --sqlite.")
    if os.path.isdir(path):
        raise ConfigError(f"SQLite path {path} is a directory, not a database file.")
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None,
                                     check_same_thread=False)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if sqlite_corrupt(exc):
            raise ConfigError(f"{path} is not a SQLite database (or it is corrupt): {exc}.") from None
        read_only_place = "unable to open" in str(exc) or "readonly" in str(exc).replace("-", "").replace(" ", "")
        if read_only_place and not os.path.exists(path + "-wal"):
            # A WAL database on a read-only mount with no writer: SQLite cannot create the -shm
            # file. With no -wal file there is nothing uncommitted, so 'immutable' reads are exact.
            LOG.info("Opening %s as immutable: its directory is read-only and no writer is active.", path)
            connection = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=busy_timeout,
                                         isolation_level=None, check_same_thread=False)
        elif sqlite_locked(exc):
            raise TransientError(f"SQLite database {path} is locked by a writer: {exc}.") from None
        elif read_only_place:
            raise ConfigError(f"SQLite database {path} cannot be opened: its directory is read-only and it has a "
                              "-wal file without the -shm index SQLite needs to read it; reading the main file "
                              "alone would miss committed rows. Mount the directory writable (the uploader "
                              "still only reads), or checkpoint the database before copying it.") from None
        else:
            raise ConfigError(f"SQLite database {path} cannot be opened: {exc}.") from None
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    with contextlib.suppress(sqlite3.DatabaseError):
        connection.execute("PRAGMA query_only = 1")
    return connection


def list_tables(connection: sqlite3.Connection) -> list[str]:
    rows = connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "ORDER BY name"
    ).fetchall()
    return [row[0] for row in rows]


def choose_table(connection: sqlite3.Connection, wanted: str | None, path: str) -> str:
    tables = list_tables(connection)
    if wanted:
        if wanted in tables:
            return wanted
        folded = [t for t in tables if t.lower() == wanted.lower()]
        if len(folded) == 1:
            return folded[0]
        view = connection.execute("SELECT name FROM sqlite_master WHERE type = 'view' AND lower(name) = lower(?)",
                                  [wanted]).fetchone()
        if view:
            raise ConfigError(f"{view[0]!r} in {path} is a view; the uploader reads tables only (it finds new rows "
                              "by rowid or primary key, which a view does not have). Set sqlite_table_name to the "
                              "view's base table (tables: " + (", ".join(tables) or "none") + "); filter_config "
                              "and aggregate_config can do what the view's WHERE or GROUP BY did.")
        listing = ", ".join(tables) or "none"
        raise ConfigError(f"Table {wanted!r} does not exist in {path} (tables: {listing}). "
                          "Check sqlite_table_name.")
    if not tables:
        raise ConfigError(f"{path} has no tables yet. Point sqlite at the sensor database, or wait until "
                          "the application has created its table.")
    if len(tables) > 1:
        raise ConfigError(f"{path} has several tables ({', '.join(tables)}); set sqlite_table_name "
                          "(SQLITE_TABLE_NAME, --sqlite-table-name) to the one to upload.")
    LOG.info("Table %r picked: it is the only table in %s.", tables[0], path)
    return tables[0]


def read_columns(connection: sqlite3.Connection, table: str) -> tuple[tuple[Column, ...], list[str]]:
    """The table's columns and its primary key columns (in key order)."""
    rows = connection.execute(f"PRAGMA table_xinfo({quote_ident(table)})").fetchall()
    # table_xinfo: cid, name, type, notnull, dflt_value, pk, hidden; hidden 1 = virtual-table column.
    columns = tuple(Column(r[1], r[2] or "") for r in rows if r[6] in (0, 2, 3))
    primary_key = [r[1] for r in sorted(rows, key=lambda r: r[5]) if r[5] > 0]
    return columns, primary_key


def table_locator(connection: sqlite3.Connection, table: str, columns: Sequence[Column],
                  primary_key: list[str]) -> tuple[str, ...]:
    """What orders rows of equal timestamp: the rowid, or the primary key of a WITHOUT ROWID table."""
    names = {c.name.lower() for c in columns}
    for alias in ("rowid", "_rowid_", "oid"):
        if alias in names:
            continue  # shadowed by a real column of that name
        try:
            connection.execute(f"SELECT {alias} FROM {quote_ident(table)} LIMIT 0")
            return (alias,)
        except sqlite3.OperationalError:
            break
    if primary_key:
        return tuple(primary_key)
    raise ConfigError(f"Table {table!r} has neither a rowid nor a primary key, so rows with equal "
                      "timestamps cannot be told apart. Add a primary key.")


def sample_values(connection: sqlite3.Connection, table: str, column: str, limit: int = 200) -> list:
    return [r[0] for r in connection.execute(
        f"SELECT {quote_ident(column)} FROM {quote_ident(table)} "
        f"WHERE {quote_ident(column)} IS NOT NULL LIMIT {int(limit)}")]


def looks_like_timestamps(values: list, tz: Any = timezone.utc) -> bool:
    """True when most sampled values read as plausible datetimes (years 1990-2200)."""
    if not values:
        return False
    low, high = 631152000 * 10**6, 7258118400 * 10**6
    good = 0
    for value in values:
        micros = timestamp_to_micros(value, tz)
        good += micros is not None and low <= micros <= high
    return good >= 0.9 * len(values)


def detect_timestamp_column(connection: sqlite3.Connection, table: str, columns: Sequence[Column]) -> str:
    """Pick the time column: declared type first, then well-known names, then the stored values.

    Columns that hold rows but no readable time are left out (Home Assistant keeps its legacy
    DATETIME columns, NULL since a schema upgrade, beside the *_ts columns it fills).
    """
    empty = connection.execute(f"SELECT 1 FROM {quote_ident(table)} LIMIT 1").fetchone() is None
    likely = {c.name for c in columns
              if TIMESTAMP_DECLARED.search(c.declared_type) or c.name.lower() in TIMESTAMP_NAMES}
    unused = set() if empty else {name for name in likely if not any(
        timestamp_to_micros(v) is not None for v in sample_values(connection, table, name))}
    declared_unused = sorted(unused & {c.name for c in columns if TIMESTAMP_DECLARED.search(c.declared_type)})
    if declared_unused:
        LOG.info("Date/time column(s) without a readable value are not considered for the timestamp: %s.",
                 ", ".join(declared_unused))
    every_name = ", ".join(c.name for c in columns)
    columns = [c for c in columns if c.name not in unused]
    by_type = [c.name for c in columns if TIMESTAMP_DECLARED.search(c.declared_type)]
    if len(by_type) == 1:
        LOG.info("Timestamp column %r picked: its declared type is %s.", by_type[0],
                 next(c.declared_type for c in columns if c.name == by_type[0]))
        return by_type[0]
    pool = by_type or [c.name for c in columns]
    named = sorted((TIMESTAMP_NAMES.index(c.lower()), c) for c in pool if c.lower() in TIMESTAMP_NAMES)
    if named and (len(named) == 1 or named[0][0] != named[1][0]):
        LOG.info("Timestamp column %r picked: its name is a usual one for timestamps%s.", named[0][1],
                 " (several columns have date/time types)" if by_type else "")
        return named[0][1]
    by_values = [c for c in pool if looks_like_timestamps(sample_values(connection, table, c))]
    if len(by_values) == 1:
        LOG.info("Timestamp column %r picked: its stored values read as datetimes.", by_values[0])
        return by_values[0]
    always_set = [c for c in by_values if connection.execute(
        f"SELECT count(*) FROM (SELECT {quote_ident(c)} AS v FROM {quote_ident(table)} LIMIT 1000) "
        "WHERE v IS NULL").fetchone()[0] == 0]
    if len(always_set) == 1:  # Home Assistant's last_updated_ts beside last_changed_ts (NULL when equal)
        LOG.info("Timestamp column %r picked: its stored values read as datetimes, and it is the only such "
                 "column never NULL (%s).", always_set[0], ", ".join(by_values))
        return always_set[0]
    if len(by_values) > 1 or len(by_type) > 1:
        candidates = by_values if len(by_values) > 1 else by_type
        raise ConfigError(f"Several columns of {table!r} could be the timestamp ({', '.join(candidates)}); "
                          "set timestamp_col (TIMESTAMP_COL, --timestamp-col).")
    raise ConfigError(f"No timestamp column found in {table!r} (columns: {every_name}). "
                      "Set timestamp_col, or use cursor: rowid for tables without one.")


def check_column_names(table: str, names: Sequence[str]) -> None:
    """Delta and Databricks match column names without case; SQLite folds only ASCII letters."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ConfigError(f"Table {table!r} has columns {other!r} and {name!r}, which differ only in case; "
                              "Delta and Databricks tables cannot hold both. Rename one of them in SQLite.")


def describe_source(settings: Settings) -> SourceTable:
    """Open the database once at start-up and work out table, columns, locator and timestamp column."""
    path = settings.sqlite
    if not path:
        raise ConfigError("No SQLite database given: set sqlite in the config, SQLITE_PATH or --sqlite.")
    connection = open_sqlite(path, settings.sqlite_busy_timeout)
    try:
        table = choose_table(connection, settings.sqlite_table_name, path)
        columns, primary_key = read_columns(connection, table)
        check_column_names(table, [c.name for c in columns])
        locator = table_locator(connection, table, columns, primary_key)
        if settings.cursor == "rowid" and locator[0] not in ("rowid", "_rowid_", "oid"):
            raise ConfigError(f"cursor: rowid needs a table with rowids, but {table!r} is a WITHOUT ROWID "
                              "table (its primary key does not follow insertion order). Use cursor: timestamp.")
        timestamp_col = settings.timestamp_col
        if timestamp_col:
            matches = [c.name for c in columns if c.name.lower() == timestamp_col.lower()]
            if not matches:
                raise ConfigError(f"timestamp_col {timestamp_col!r} is not a column of {table!r} "
                                  f"(columns: {', '.join(c.name for c in columns)}).")
            timestamp_col = matches[0] if timestamp_col not in matches else timestamp_col
        elif settings.cursor == "timestamp":
            timestamp_col = detect_timestamp_column(connection, table, columns)
        else:
            with contextlib.suppress(ConfigError):
                timestamp_col = detect_timestamp_column(connection, table, columns)
    except sqlite3.DatabaseError as exc:
        if sqlite_locked(exc):
            raise TransientError(f"SQLite database {path} is locked by a writer: {exc}.") from None
        raise ConfigError(f"Cannot read the schema of {path}: {exc}.") from None
    finally:
        connection.close()
    alias = (locator[0] in ("rowid", "_rowid_", "oid") and len(primary_key) == 1
             and any(c.name == primary_key[0] and c.declared_type.strip().upper() == "INTEGER" for c in columns))
    return SourceTable(table, columns, locator, timestamp_col, alias)


# --- Timestamps: SQLite keeps them as TEXT, INTEGER (unix s/ms/us) or REAL (Julian day or unix s)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
JULIAN_UNIX_EPOCH = 2440587.5
# Valid instants: years 0001-9999, what Arrow, Delta and Spark timestamps hold.
MIN_MICROS, MAX_MICROS = -62135596800_000_000, 253402300799_999_999
MIN_JULIAN, MAX_JULIAN = 1721425.5, 5373484.5  # Julian days of 0001-01-01 and 10000-01-01
_ISO_FIX = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?)?\s*(Z|[+-]\d{2}:?\d{2})?$",
                      re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
# Go's time.Time.String(), which Telegraf's SQL output writes: '2024-01-15 14:30:00.123456789 +0100 CET',
# sometimes with the monotonic clock reading ' m=+0.000012'. The numeric offset is the instant's;
# the zone name only repeats it.
_GO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?) ([+-]\d{4})"
                      r"(?: [A-Za-z0-9_/+-]+)?(?: m=[+-]\d+(?:\.\d+)?)?$")


def integer_epoch_to_micros(value: int) -> int:
    """Unix time in seconds, milliseconds, microseconds or (from 1e18) nanoseconds, told apart by magnitude.

    Below 1e7 the number is a Julian day: a column declared DATETIME has NUMERIC affinity, so
    SQLite stores a whole Julian day written as REAL (2461061.0) as an INTEGER.
    """
    magnitude = abs(value)
    if magnitude < 10_000_000:
        return julian_day_to_micros(float(value))
    if magnitude < 100_000_000_000:  # < 1e11: seconds (up to year 5138)
        return value * 1_000_000
    if magnitude < 100_000_000_000_000:  # < 1e14: milliseconds
        return value * 1_000
    if value >= 1_000_000_000_000_000_000:  # >= 1e18: nanoseconds (2001-2262; as microseconds, past 9999)
        return value // 1_000 if value < 2**63 - 1 else MAX_MICROS + 1  # 2**63-1: a sentinel, unreadable
    return value


def julian_day_to_micros(value: float) -> int:
    # A double holds a Julian day to ~40 us; SQLite itself resolves them to milliseconds.
    return round((value - JULIAN_UNIX_EPOCH) * 86_400_000) * 1_000


def real_to_micros(value: float) -> int | None:
    """REAL values below 1e7 are Julian days (SQLite's julianday()); larger ones unix seconds."""
    if not math.isfinite(value):
        return None
    if abs(value) < 10_000_000:
        return julian_day_to_micros(value)
    if abs(value) < 100_000_000_000:
        return round(value * 1_000_000)
    return integer_epoch_to_micros(round(value))


def text_to_micros(text: str, naive_tz: Any) -> int | None:
    stripped = text.strip()
    if not stripped:
        return None
    if _NUMBER.match(stripped):
        return real_to_micros(float(stripped)) if "." in stripped else integer_epoch_to_micros(int(stripped))
    go_time = _GO_TIME.match(stripped)
    if go_time:
        stripped = go_time[1] + go_time[2]
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        match = _ISO_FIX.match(stripped)  # Python 3.10 and forms fromisoformat refuses
        if not match:
            return None
        day, clock, fraction, offset = match.groups()
        normal = day + (" " + clock if clock else "")
        if clock and clock.count(":") == 1:
            normal += ":00"
        if fraction:
            normal += "." + fraction[:6].ljust(6, "0")
        if offset:
            offset = "+00:00" if offset.upper() == "Z" else offset
            normal += offset if ":" in offset else offset[:3] + ":" + offset[3:]
        try:
            moment = datetime.fromisoformat(normal)
        except ValueError:
            return None
    if moment.tzinfo is None:
        # zoneinfo settles ambiguous or skipped wall-clock times with fold=0, the usual convention.
        moment = moment.replace(tzinfo=naive_tz)
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def timestamp_to_micros(value: Any, naive_tz: Any = timezone.utc) -> int | None:
    """Microseconds since 1970-01-01 UTC for any SQLite timestamp form, None when unreadable."""
    try:
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, int):
            micros = integer_epoch_to_micros(value)
        elif isinstance(value, float):
            micros = real_to_micros(value)
        elif isinstance(value, str):
            micros = text_to_micros(value, naive_tz)
        elif isinstance(value, bytes):
            micros = text_to_micros(value.decode("utf-8"), naive_tz)
        else:
            return None
    except (ValueError, OverflowError, UnicodeDecodeError):
        return None
    if micros is None or not MIN_MICROS <= micros <= MAX_MICROS:
        return None
    return micros


def micros_to_iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    moment = EPOCH + timedelta(microseconds=micros)
    text = f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def cursor_key_udf(naive_tz: Any) -> Callable[[Any], int | None]:
    """The Python side of the cursor key, for values SQLite's date functions cannot read."""

    def key(value: Any) -> int | None:
        micros = timestamp_to_micros(value, naive_tz)
        return None if micros is None else (micros + 500) // 1000

    return key


def cursor_key_sql(column: str, python_for_text: bool) -> str:
    """SQL for a row's cursor key: integer milliseconds since 1970 UTC, NULL when unreadable.

    It is computed inside SQLite so that windows and batches are planned without moving rows
    into Python. It follows timestamp_to_micros() rule for rule, rounded to the millisecond:
    every branch checks the years 0001-9999, so a sentinel such as 2**63-1 or a stray 21.5 is
    *unreadable* (NULL: uploaded, never blocking newer rows) rather than a far-future or
    far-past key. Date-like text goes through julianday() (milliseconds, exact when rounded);
    the '-' test keeps julianday('now') and numbers-as-text out, and the day test sends dates
    SQLite would roll over (Feb 30, 24:00) -- checked only past the 28th or at hour 24, where
    they can occur -- to the registered Python function upl_key(), as it does every form SQLite does not know and
    naive text in a non-UTC zone. The key only has to be deterministic and ordered like the
    instants; the uploaded value keeps microseconds.
    """
    c = quote_ident(column)
    julian = f"CAST(round(({c} - {JULIAN_UNIX_EPOCH}) * 86400000.0) AS INTEGER)"
    text_branch = (
        f"upl_key({c})" if python_for_text else
        f"coalesce(CASE WHEN substr({c}, 5, 1) = '-' AND substr({c}, 1, 4) <> '0000' "
        f"AND (substr({c}, 9, 2) <= '28' AND substr({c}, 12, 2) < '24' "
        f"OR date(julianday({c})) = substr({c}, 1, 10)) "
        f"THEN CAST(round((julianday({c}) - {JULIAN_UNIX_EPOCH}) * 86400000.0) AS INTEGER) END, upl_key({c}))"
    )
    min_s, max_us = MIN_MICROS // 1_000_000, MAX_MICROS
    return (
        f"(CASE typeof({c}) "
        f"WHEN 'integer' THEN CASE "
        f"WHEN abs({c}) < 10000000 THEN CASE WHEN {c} >= {MIN_JULIAN} AND {c} < {MAX_JULIAN} THEN {julian} END "
        f"WHEN abs({c}) < 100000000000 THEN CASE WHEN {c} >= {min_s} THEN {c} * 1000 END "
        f"WHEN abs({c}) < 100000000000000 THEN CASE WHEN {c} >= {min_s * 1000} THEN {c} END "
        f"WHEN {c} >= 1000000000000000000 THEN CASE WHEN {c} < {2**63 - 1} THEN ({c} / 1000 + 500) / 1000 END "
        f"WHEN {c} > 0 THEN CASE WHEN {c} <= {max_us} THEN ({c} + 500) / 1000 END "
        f"ELSE CASE WHEN {c} >= {MIN_MICROS} THEN -((-{c} + 499) / 1000) END END "
        f"WHEN 'real' THEN CASE "
        f"WHEN abs({c}) < 10000000.0 THEN CASE WHEN {c} >= {MIN_JULIAN} AND {c} < {MAX_JULIAN} THEN {julian} END "
        f"WHEN abs({c}) < 100000000000.0 THEN CASE WHEN {c} >= {min_s} "
        f"THEN CAST(round({c} * 1000.0) AS INTEGER) END "
        f"ELSE upl_key({c}) END "
        f"WHEN 'text' THEN {text_branch} "
        f"WHEN 'blob' THEN upl_key({c}) END)"
    )


# =====================================================================================
# 3. Cursor: which rows are new, read window by window
# =====================================================================================
#
# Two orders, one per kind of table:
#
# * Insertion order (every table with a rowid, whatever `cursor` says). SQLite gives a new row
#   a rowid above every existing one, so the rows that are new are the rows above the
#   *frontier* -- the rowid of the last row read -- whatever their timestamps: a clock that
#   stepped back does not hide them. Planning a window costs an index seek and a count of
#   the new rows, not a scan of the table. Three guards keep that true through the life of
#   an edge database:
#     - the *tail*: a fingerprint of the last TAIL_ROWS rows up to the frontier (rowid and a
#       hash of each row). Checked in O(1) before every plan and inside every batch read. A
#       table whose rowids were renumbered (retention delete + VACUUM of a table without an
#       INTEGER PRIMARY KEY), emptied, recreated or replaced fails it; one scan then finds
#       where the fingerprinted rows went (or that none is left: every row is new).
#     - *below*: the number of rows at or below the frontier. If it grew, rows were inserted
#       with explicit rowids under the frontier: in timestamp mode one filtered scan uploads
#       those whose timestamp is newer than every uploaded one; what cannot be told from
#       uploaded rows is reported.
#     - the timestamp watermark `key` (the newest uploaded timestamp) serves that scan and
#       `last_upload`, the specification's field.
# * Key order (WITHOUT ROWID tables: their primary key does not follow insertion): a
#   (timestamp, primary key) keyset. Planning scans the table inside SQLite to find the rows
#   above the watermark; ties at the watermark's timestamp are remembered by key. A row added
#   later with an older timestamp cannot be told from an uploaded one: it is reported.
#
# A cycle plans a *window* (the rows pending now, up to the highest locator), then reads it
# in locator order, batch_size rows per read, each read its own short read transaction, so
# no snapshot is held while a batch uploads. Rows written meanwhile belong to the next window.

TAIL_ROWS = 16  # rows fingerprinted at the frontier
# Counting a table's rows reads all its pages (about 11 ns a row): every cycle while that is
# cheap, then once an hour (or when the clock jumps), so that a cycle's cost follows its new rows.
COUNT_EVERY_CYCLE_BELOW = 200_000
COUNT_EVERY = 3600.0
RELOCATE_CHUNK = 20_000  # rows per read while looking for the fingerprinted rows
FINGERPRINT_BYTES = 256  # of a long TEXT or BLOB value, hashed with its length
MAX_CANDIDATES = 1000  # rows sharing the tail's timestamps, checked one by one; more: hash every row


def probe_value(kind: bytes | str | None, value: Any) -> Any:
    """A stored timestamp as Python gets it back from SQLite with text as str (None: unusable)."""
    if value is None:
        return None
    if isinstance(value, bytes) and kind in (b"text", "text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


@dataclass
class Relocation:
    """The search for the fingerprinted rows: the best candidate so far (see SourceReader.relocate)."""

    tail: list
    best: tuple[int, int, int] | None = None  # (score, tail index matched, -rowid)
    rank: int | None = None  # rows at or below the best candidate, when the scan counted them
    ambiguous: bool = False
    positions: dict = field(default_factory=dict)  # row hash -> its indexes in the tail

    def __post_init__(self) -> None:
        for index, row in enumerate(self.tail):
            self.positions.setdefault(row[1], []).append(index)

    def consider(self, rowid: int, recent: Sequence[str], rank: int | None) -> None:
        """`recent`: the hashes of the rows up to this one, in rowid order (this one last). Its
        score for tail row j: the longest run of tail rows up to j found in `recent` in order
        (rows deleted or inserted among them do not break it)."""
        wanted = [row[1] for row in self.tail]
        for index in self.positions.get(recent[-1] if recent else None, ()):
            candidate = (common_subsequence(recent, wanted[:index + 1]), index, -rowid)
            if self.best is not None and candidate[:2] == self.best[:2] and rowid != -self.best[2]:
                self.ambiguous = True
            if self.best is None or candidate > self.best:
                if self.best is not None and candidate[:2] > self.best[:2]:
                    self.ambiguous = False
                self.best, self.rank = candidate, rank


def common_subsequence(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (both at most TAIL_ROWS long)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


class FrontierMoved(Exception):
    """The rows at the frontier are not where the cursor left them (renumbered or replaced)."""


@dataclass
class Window:
    """A cycle's fixed slice of the table, read batch by batch."""

    top: list  # highest locator at planning time; rows above it wait for the next cycle
    top_key: int | None  # highest pending cursor key at planning time
    start: list | None  # first pending locator (single-column locators), read inclusively
    done: list | None  # rows at or below this locator inside the window are uploaded
    filtered: bool  # True when the window holds rows that are not pending: batches test the key
    rows: int  # pending rows at planning time
    rows_done: int = 0
    ties: list | None = None  # primary keys read so far with key == top_key (WITHOUT ROWID tables)
    tail: list | None = None  # insertion order: fingerprint of the rows up to `done`
    tail_cols: list | None = None  # the columns that fingerprint hashed
    # Rows at or below the frontier when planned (insertion order); rows at or below `top`
    # (key order: the settled count expected once the window is read).
    below: int | None = None
    read_above: int = 0  # insertion order: rows read so far above the frontier
    key_read: int | None = None  # the highest cursor key read so far (filtered reads)
    nulls: list | None = None  # key order: primary keys of the unreadable-timestamp rows read so far


@dataclass
class Watermark:
    """Everything the cursor needs; stored in the state file and in the target's commit record."""

    mode: str = "timestamp"
    key: int | None = None  # cursor key (ms since 1970 UTC) of the last finished window
    loc: list | None = None  # locator at the top of the last finished window
    null_loc: list | None = None  # unreadable-timestamp rows are done up to this locator
    last_upload: int | None = None  # highest uploaded timestamp, microseconds (for people)
    window: Window | None = None
    # WITHOUT ROWID tables: primary keys already uploaded with exactly `key`. Their keys are not
    # increasing like rowids, so a row added later with the same timestamp can sort below `loc`;
    # it is new when its key is not in this set. None: ties are ordered by `loc` (rowid tables).
    ties: list | None = None
    # "insertion" (rowid tables: rows above the frontier `loc` are new) or "key" (the keyset).
    order: str = "key"
    tail: list | None = None  # [[rowid, row hash, stored timestamp], ...] of the last rows up to `loc`
    tail_cols: list | None = None  # the columns `tail` hashed, in table order
    below: int | None = None  # rows at or below `loc`: counted, plus the rows read since
    counted_at: float | None = None  # when `below` was last counted (unix seconds)
    # Key order: primary keys of the rows with an unreadable timestamp already uploaded (at most
    # MAX_TIES). Such a row has no place in the keyset, and one added later may sort anywhere;
    # it is new when its key is not here. None: they are done up to `null_loc` (older cursors).
    nulls: list | None = None

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        # Unused, these fields stay out: the state of a rowid table reads as before in older versions.
        if data["nulls"] is None:
            del data["nulls"]
        if data["window"] is not None and data["window"]["nulls"] is None:
            del data["window"]["nulls"]
        return json_safe(data)

    @classmethod
    def from_json(cls, data: dict) -> Watermark:
        data = json_restore(dict(data))
        # Cursors written before insertion order existed: rowid mode already meant it.
        data.setdefault("order", "insertion" if data.get("mode") == "rowid" else "key")
        window = data.pop("window", None)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown cursor fields {sorted(unknown)}")
        return cls(**data, window=Window(**window) if window else None)

    @property
    def frontier(self) -> tuple[int | None, list | None, list | None]:
        """Insertion order: the last row read, and the fingerprint of the rows up to it."""
        window = self.window
        # A filtered window reads rows below the frontier first: its own position counts once above it.
        if window is not None and window.done is not None and (not self.loc or window.done[0] > self.loc[0]):
            return window.done[0], window.tail, window.tail_cols
        return (self.loc[0] if self.loc else None), self.tail, self.tail_cols


def highest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def row_hash(values: Sequence) -> str:
    """A short digest of one row's stored values (TEXT read as bytes), stable across versions."""
    digest = hashlib.blake2b(digest_size=8)
    for value in values:
        if value is None:
            digest.update(b"n;")
        elif isinstance(value, int):
            digest.update(b"i%d;" % value)
        elif isinstance(value, float):
            digest.update(b"f" + repr(value).encode() + b";")
        else:
            raw = bytes(value)
            digest.update(b"b%d:" % len(raw) + raw)
    return digest.hexdigest()


@contextlib.contextmanager
def read_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Several statements that must see one snapshot (a check and the read it vouches for)."""
    connection.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def json_safe(value: Any) -> Any:
    """Locators may be BLOB primary keys; keep them exact in JSON."""
    if isinstance(value, bytes):
        return {"$hex": value.hex()}
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_restore(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$hex"}:
            return bytes.fromhex(value["$hex"])
        return {k: json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_restore(v) for v in value]
    return value


def file_identity(path: str) -> tuple[int, int] | None:
    """Which file a path names now (device, inode); None when it cannot be seen."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SourceReader:
    """Reads pending rows of one table; knows the SQL of the cursor."""

    KEY = "__upl_key"

    def __init__(self, settings: Settings, table: SourceTable):
        self.settings = settings
        self.table = table
        self.path = settings.sqlite or ""
        self.naive_tz = timezone_from_name(settings.source_timezone)
        python_for_text = self.naive_tz is not timezone.utc
        self.key_sql = cursor_key_sql(table.timestamp_col, python_for_text) if table.timestamp_col else "NULL"
        self.loc_sql = ", ".join(self._loc_term(c) for c in table.locator)
        self.loc_row = f"({self.loc_sql})"
        self.from_sql = quote_ident(table.name)
        self.has_rowid = table.locator[0] in ("rowid", "_rowid_", "oid")
        self.columns_sql = ", ".join(quote_ident(c) for c in table.column_names)
        self.top_key: Future | None = None  # the window last planned in insertion order: its top_key
        self.identity: tuple[int, int] | None = None  # the file this cycle reads (open_for_cycle)
        self.scans: list[tuple[threading.Thread, threading.Event]] = []  # planning scans of this cycle

    @staticmethod
    def _loc_term(column: str) -> str:
        return column if column in ("rowid", "_rowid_", "oid") else quote_ident(column)

    def connect(self) -> sqlite3.Connection:
        connection = open_sqlite(self.path, self.settings.sqlite_busy_timeout)
        connection.create_function("upl_key", 1, cursor_key_udf(self.naive_tz), deterministic=True)
        return connection

    def open_for_cycle(self) -> sqlite3.Connection:
        """The cycle's main connection. Other connections of the cycle (the native reader's, the
        planning scan's) open the file by its path again: check_same_file() makes sure they all
        read the file this one reads, and not a new one rotated into its place meanwhile."""
        self.identity = file_identity(self.path)
        return self.connect()

    def check_same_file(self, doing: str) -> None:
        if self.identity is not None and file_identity(self.path) != self.identity:
            raise TransientError(f"{self.path} was replaced by another file while {doing}; reading it again "
                                 "from the start of the next cycle.")

    def end_scans(self) -> None:
        """At the end of a cycle, after the native reader is closed: the planning scans end and
        close their connections. Closing a file drops every POSIX lock this process holds on it,
        including those of the native driver's own copy of SQLite, so no scan closes its
        connection while a native read may run."""
        for thread, release in self.scans:
            release.set()
            thread.join()
        self.scans.clear()

    # -- SQL fragments -----------------------------------------------------------------
    def _marks(self, values: Sequence) -> str:
        return "(" + ", ".join("?" for _ in values) + ")"

    def pending_sql(self, mark: Watermark, key: str, locs: Sequence[str]) -> tuple[str, list]:
        """Rows above the watermark. `key` and `locs` are the SQL (or aliases) of key and locator."""
        loc_list = ", ".join(locs)
        if mark.order == "insertion":
            # Above the frontier; below it only rows newer than every uploaded row (rows
            # inserted with explicit low rowids: this predicate is used only after they were seen).
            if mark.loc is None:
                return "1", []
            newer = f"{key} IS NOT NULL" if mark.key is None else f"{key} > ?"
            return f"({loc_list} > ? OR {newer})", [mark.loc[0], *([] if mark.key is None else [mark.key])]
        params: list = []
        if mark.key is None:
            keyed = f"{key} IS NOT NULL"
        elif mark.ties is not None:
            matches = " AND ".join(f"json_extract(t.value, '$[{i}]') = {loc}" for i, loc in enumerate(locs))
            keyed = (f"({key} > ? OR ({key} = ? AND NOT EXISTS (SELECT 1 FROM json_each(?) AS t "
                     f"WHERE {matches})))")
            params += [mark.key, mark.key, json.dumps(mark.ties)]
        else:
            keyed = f"({key}, {loc_list}) > (?, {', '.join('?' for _ in mark.loc)})"
            params += [mark.key, *mark.loc]
        if mark.nulls is not None:
            matches = " AND ".join(f"json_extract(t.value, '$[{i}]') = {loc}" for i, loc in enumerate(locs))
            unkeyed = f"({key} IS NULL AND NOT EXISTS (SELECT 1 FROM json_each(?) AS t WHERE {matches}))"
            params.append(json.dumps(mark.nulls))
        elif mark.null_loc is None:
            unkeyed = f"{key} IS NULL"
        else:
            unkeyed = f"({key} IS NULL AND ({loc_list}) > {self._marks(mark.null_loc)})"
            params += list(mark.null_loc)
        return f"({keyed} OR {unkeyed})", params

    # -- planning ------------------------------------------------------------------------
    def plan_window(self, connection: sqlite3.Connection, mark: Watermark) -> tuple[Window | None, int]:
        """Key order: fix this cycle's window with one scan. Returns the window (None when nothing
        is pending) and how many rows are settled (at or below the watermark) now."""
        order_desc = ", ".join(f"{t} DESC" for t in self._loc_terms())
        top_row = connection.execute(
            f"SELECT {self.loc_sql} FROM {self.from_sql} ORDER BY {order_desc} LIMIT 1").fetchone()
        if top_row is None:
            return None, 0
        top = list(top_row)
        single = len(top) == 1
        aliases = [f"l{i}" for i in range(len(top))]
        pending, params = self.pending_sql(mark, "k", aliases)
        inner = (f"SELECT {self.key_sql} AS k, "
                 + ", ".join(f"{t} AS {a}" for t, a in zip(self._loc_terms(), aliases))
                 + f" FROM {self.from_sql} WHERE {self.loc_row} <= {self._marks(top)}")
        # One scan (LIMIT -1 stops SQLite from inlining the key expression into every
        # aggregate, which would evaluate it four times per row). Besides the count and the
        # highest pending key it finds the first pending locator and the last locator that is
        # *not* pending: when nothing settled follows the first pending row (the usual
        # append-only case), batches are read by locator range alone, without the key.
        extra = (f", min(l0) FILTER (WHERE {pending}), max(l0) FILTER (WHERE NOT {pending})"
                 if single else ", NULL, NULL")
        repeats = 4 if single else 2
        total, count, top_key, first_loc, last_settled = connection.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {pending}), max(k) FILTER (WHERE {pending}){extra} "
            f"FROM ({inner} LIMIT -1)", [*(params * repeats), *top]).fetchone()
        settled = total - count
        if not count:
            return None, settled
        # WITHOUT ROWID tables always read with the key: it tells which rows tie at the top.
        filtered = not single or not self.has_rowid or settled_after(last_settled, first_loc)
        return Window(top=top, top_key=top_key, start=[first_loc] if single else None, done=None,
                      filtered=filtered, rows=count, below=total), settled

    def _loc_terms(self) -> list[str]:
        return [self._loc_term(c) for c in self.table.locator]

    # -- insertion order: planning, and the fingerprint at the frontier ------------------
    def plan_insertion_window(self, connection: sqlite3.Connection, mark: Watermark
                              ) -> tuple[Window | None, int, int, bool]:
        """The rows above the frontier, at the cost of the new rows: (window, rows at or below the
        frontier now, rows that appeared below it since the last count, whether rows were counted).

        When rows appeared below the frontier, timestamp mode widens the window to those newer
        than every uploaded row (one filtered scan); the caller reports the rest.
        """
        rid = self.loc_sql
        loc = mark.loc[0] if mark.loc else None
        above, params = (f"WHERE {rid} > ?", [loc]) if loc is not None else ("", [])
        count_now = mark.below is None or mark.below < COUNT_EVERY_CYCLE_BELOW or mark.counted_at is None or \
            abs(time.time() - mark.counted_at) >= COUNT_EVERY
        counted: Future = Future()
        key: Future = Future()
        self.top_key = key

        release = threading.Event()

        def scan() -> None:
            """One read transaction, as one snapshot: the counts first, published at once, then the
            highest cursor key of the new rows (the costly part: it overlaps the first batch's read)."""
            try:
                try:
                    own = self.connect()
                except ConfigError as exc:  # opened a moment ago on the main connection: mid-rotation?
                    raise TransientError(str(exc)) from None
                try:
                    self.check_same_file("planning")
                    with read_transaction(own):
                        total = own.execute(f"SELECT count(*) FROM {self.from_sql}").fetchone()[0] if count_now \
                            else None
                        # Each min() and max() in a query of its own: SQLite answers a lone one with
                        # a seek, but scans the rows for max() and min() side by side.
                        top_sql = f"(SELECT max({rid}) FROM {self.from_sql} {above})"
                        first_sql = f"(SELECT min({rid}) FROM {self.from_sql} {above})"
                        if loc is None and total is not None:  # every row is new: the ends are two seeks
                            top, first = own.execute(f"SELECT {top_sql}, {first_sql}").fetchone()
                            counted.set_result((total, top, total, first))
                        else:
                            counted.set_result((total, *own.execute(
                                f"SELECT {top_sql}, (SELECT count(*) FROM {self.from_sql} {above}), {first_sql}",
                                params * 3).fetchone()))
                        key.set_result(own.execute(
                            f"SELECT max(k) FROM (SELECT {self.key_sql} AS k FROM {self.from_sql} {above} LIMIT -1)",
                            params).fetchone()[0])
                finally:
                    release.wait()  # closed when the cycle ends (end_scans)
                    own.close()
            except BaseException as exc:
                if counted.done() and key.done():
                    LOG.debug("The planning scan ended with %s.", one_line(str(exc)))
                for future in (counted, key):
                    if not future.done():
                        future.set_exception(exc)

        thread = threading.Thread(target=scan, name="plan", daemon=True)
        self.scans.append((thread, release))
        thread.start()
        total, top, rows, first = counted.result()
        top_key = None  # in self.top_key once the scan is through (Uploader._next_batch waits for it)
        if total is None:  # between counts: what the windows read since the last one
            total = (mark.below or 0) + rows
        below = total - rows
        appeared = below - mark.below if loc is not None and mark.below is not None and below > mark.below else 0
        late = late_key = None
        if appeared and mark.mode == "timestamp" and self.table.timestamp_col:
            pending, pending_params = self.pending_sql(mark, "k", [rid])
            late, late_key = connection.execute(
                f"SELECT count(*), max(k) FROM (SELECT {rid}, {self.key_sql} AS k FROM {self.from_sql} "
                f"WHERE {rid} <= ? LIMIT -1) WHERE {pending}", [loc, *pending_params]).fetchone()
        if late:
            keys = [k for k in (self.top_key.result(), late_key) if k is not None]
            window = Window(top=[max(top or loc, loc)], top_key=max(keys) if keys else None, start=None,
                            done=None, filtered=True, rows=rows + late, below=below)
            return window, below, appeared, count_now
        if not rows:
            return None, below, appeared, count_now
        return Window(top=[top], top_key=top_key, start=[first], done=None, filtered=False, rows=rows,
                      below=below), below, appeared, count_now

    def fingerprint_rows(self, connection: sqlite3.Connection, columns: Sequence[str], where: str,
                         params: Sequence, order: str = "", limit: int | None = None) -> list[list]:
        """[[rowid, row hash, probe], ...] of the rows `where` selects. A long TEXT or BLOB value is
        hashed by its first FINGERPRINT_BYTES and its length: a fingerprint of 16 rows of images
        stays small. The probe is the row's timestamp as stored (None without one): it lets
        SQLite find a fingerprinted row again without hashing the whole table."""
        selected = ", ".join(
            f"CASE WHEN typeof({q}) IN ('text', 'blob') AND length({q}) > {FINGERPRINT_BYTES} "
            f"THEN substr({q}, 1, {FINGERPRINT_BYTES}) || '...' || length({q}) ELSE {q} END"
            for q in map(quote_ident, columns)) or "NULL"
        ts = self.table.timestamp_col
        probe = f"typeof({quote_ident(ts)}), {quote_ident(ts)}" if ts in columns else "NULL, NULL"
        sql = (f"SELECT {self.loc_sql}, {probe}, {selected} FROM {self.from_sql} WHERE {where} "
               f"ORDER BY {self.loc_sql} {order}" + (f" LIMIT {int(limit)}" if limit else ""))
        previous = connection.text_factory
        connection.text_factory = bytes  # a hash of the stored bytes: invalid UTF-8 is fine here
        try:
            rows = connection.execute(sql, list(params)).fetchall()
        finally:
            connection.text_factory = previous
        return [[row[0], row_hash(row[3:]), probe_value(row[1], row[2])] for row in rows]

    def tail_at(self, connection: sqlite3.Connection, loc: int) -> tuple[list, list]:
        """Fingerprint of the last TAIL_ROWS rows up to `loc`, and the columns it hashed."""
        columns = self.table.column_names
        rows = self.fingerprint_rows(connection, columns, f"{self.loc_sql} <= ?", [loc], "DESC", TAIL_ROWS)
        return rows[::-1], columns

    def check_frontier(self, connection: sqlite3.Connection, loc: int | None, tail: list | None,
                       columns: list | None) -> int | None:
        """O(1) check that the fingerprinted rows are where the cursor left them: the rows at
        the tail's rowids are read again.

        Returns the frontier to use: the same; lower when the newest uploaded rows were deleted
        (nothing moved: a later insert reusing their rowids counts as new); the row before it when
        only the frontier row changed in a table whose rowids VACUUM renumbers (it may be the next
        row moved down: uploaded, never skipped). Raises FrontierMoved when rows moved.
        """
        if loc is None or not tail or columns is None:
            return loc
        if not set(columns) <= set(self.table.column_names):
            LOG.warning("Columns of %r were dropped; the check of the rows at the cursor is skipped once.",
                        self.table.name)
            return loc
        rowids = [row[0] for row in tail]
        marks = ", ".join("?" for _ in rowids)
        now = {row[0]: row for row in self.fingerprint_rows(connection, columns, f"{self.loc_sql} IN ({marks})",
                                                             rowids)}
        same = [row for row in tail if now.get(row[0]) == row]
        changed = [row for row in tail if row[0] in now and now[row[0]] != row]
        if same and not changed:  # nothing moved; some rows may be gone
            if same[-1][0] != loc:
                LOG.info("The newest uploaded row(s) of %r were deleted; the cursor moves back to rowid %s.",
                         self.table.name, same[-1][0])
            return same[-1][0]
        contiguous = all(b[0] - a[0] == 1 for a, b in itertools.pairwise(tail))
        if same and changed == [tail[-1]] and contiguous and len(same) == len(tail) - 1:
            if self.table.rowid_alias:
                LOG.info("The row at the cursor (rowid %s) was changed in place; updates are not uploaded.", loc)
                return loc
            LOG.info("The row at the cursor (rowid %s) changed: updated in place, or the next row moved there "
                     "(VACUUM). It is uploaded.", loc)
            return same[-1][0]
        raise FrontierMoved(loc)

    def relocate(self, connection: sqlite3.Connection, loc: int, tail: list, columns: list
                 ) -> tuple[int | None, int]:
        """Find where the fingerprinted rows went. Returns (new frontier, or None if none of them
        is left; rows at or below it).

        Every row equal to a tail row is a candidate for the last surviving one; its score is
        how many of the tail rows up to that one precede it, in order. The best score wins, then
        the later tail row; among equals (identical rows) the lowest rowid, so that doubt
        uploads a row twice rather than never. Candidates come from SQLite by the rows' timestamps when every tail
        row has one; otherwise one scan in rowid order hashes every row (chunked, so no read
        transaction is held).
        """
        columns = [c for c in columns if c in self.table.column_names]
        search = Relocation(tail)
        probes = {row[2] for row in tail} if all(row[2] is not None for row in tail) else set()
        ts = self.table.timestamp_col
        if probes and ts in columns:
            marks = ", ".join("?" for _ in probes)
            candidates = [row[0] for row in connection.execute(
                f"SELECT {self.loc_sql} FROM {self.from_sql} WHERE {quote_ident(ts)} IN ({marks}) "
                f"ORDER BY {self.loc_sql} LIMIT {MAX_CANDIDATES + 1}", list(probes))]
            if len(candidates) <= MAX_CANDIDATES:
                for rowid in candidates:
                    rows = self.fingerprint_rows(connection, columns, f"{self.loc_sql} <= ?", [rowid], "DESC",
                                                 len(tail))
                    search.consider(rowid, [row[1] for row in rows[::-1]], rank=None)
                return self._relocation_result(connection, search)
        recent: list[str] = []
        rank = 0
        last = None
        while True:
            where, params = (f"{self.loc_sql} > ?", [last]) if last is not None else ("1", [])
            rows = self.fingerprint_rows(connection, columns, where, params, "", RELOCATE_CHUNK)
            for rowid, digest, _ in rows:
                rank += 1
                recent.append(digest)
                if len(recent) > len(tail):
                    del recent[0]
                if digest in search.positions:
                    search.consider(rowid, recent, rank)
            if len(rows) < RELOCATE_CHUNK:
                break
            last = rows[-1][0]
        return self._relocation_result(connection, search)

    def _relocation_result(self, connection: sqlite3.Connection, search: Relocation) -> tuple[int | None, int]:
        if search.best is None:
            return None, 0
        found = -search.best[2]
        if search.ambiguous:
            LOG.warning("The rows at the cursor match more than one place in %r (identical rows); the lowest "
                        "(rowid %s) is taken: rows after it are uploaded, even if some were before.",
                        self.table.name, found)
        rank = search.rank
        if rank is None:
            rank = connection.execute(f"SELECT count(*) FROM {self.from_sql} WHERE {self.loc_sql} <= ?",
                                      [found]).fetchone()[0]
        return found, rank

    # -- reading -------------------------------------------------------------------------
    def _bounds(self, window: Window, upper: list | None) -> tuple[list[str], list]:
        """The locator range of the window's next read."""
        bounds = [f"{self.loc_row} <= {self._marks(window.top)}"]
        params: list = list(window.top)
        if upper is not None:
            bounds.append(f"{self.loc_row} <= {self._marks(upper)}")
            params += upper
        if window.done is not None:
            bounds.append(f"{self.loc_row} > {self._marks(window.done)}")
            params += window.done
        elif window.start is not None:
            bounds.append(f"{self.loc_row} >= {self._marks(window.start)}")
            params += window.start
        return bounds, params

    def range_sql(self, window: Window, limit: int, upper: list | None, selected: str) -> tuple[str, list]:
        """An unfiltered read of the window's next rows: rowid as __l0, then `selected`."""
        bounds, params = self._bounds(window, upper)
        return (f"SELECT {self.loc_sql} AS __l0, {selected} FROM {self.from_sql} WHERE {' AND '.join(bounds)} "
                f"ORDER BY __l0 LIMIT {int(limit)}"), params

    def read_batch(self, connection: sqlite3.Connection, mark: Watermark, window: Window,
                   limit: int, upper: list | None = None,
                   convert: Callable[[Sequence[tuple]], Any] | None = None) -> RawBatch:
        """The next rows of the window in locator order, in one short read transaction.

        Rows are fetched a few thousand at a time and each chunk is handed to `convert` (its
        columns, in table order) at once, so the batch is kept as compact Arrow arrays rather
        than as Python tuples. `upper` (inclusive) re-reads exactly an earlier batch, for a
        replay after a crash.
        """
        bounds, params = self._bounds(window, upper)
        width = len(self.table.locator)
        loc_aliases = ", ".join(f"__l{i}" for i in range(width))
        order = ", ".join(f"__l{i}" for i in range(width))
        select = (f"SELECT {', '.join(f'{t} AS __l{i}' for i, t in enumerate(self._loc_terms()))}, "
                  f"{self.columns_sql} FROM {self.from_sql} WHERE {' AND '.join(bounds)}")
        if window.filtered:
            pending, pending_params = self.pending_sql(mark, self.KEY, loc_aliases.split(", "))
            sql = (f"SELECT * FROM (SELECT {self.key_sql} AS {self.KEY}, {select.removeprefix('SELECT ')} "
                   f"LIMIT -1) WHERE {pending} ORDER BY {order} LIMIT {int(limit)}")
            params += pending_params
        else:
            sql = f"{select} ORDER BY {order} LIMIT {int(limit)}"
        skip = 1 if window.filtered else 0
        track_ties = window.filtered and window.top_key is not None and not self.has_rowid
        above = mark.loc[0] if window.filtered and mark.order == "insertion" and mark.loc else None
        shape = ChunkShape(skip, width, track_ties, window.top_key, convert or (lambda columns: columns), above,
                           track_nulls=window.filtered and mark.order == "key" and mark.nulls is not None)
        try:
            raw = fetch_chunks(connection, sql, params, shape)
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc).lower():
                raise
            LOG.warning("Some TEXT values are not valid UTF-8; they are uploaded with the bad bytes "
                        "replaced by U+FFFD.")
            connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
            try:
                raw = fetch_chunks(connection, sql, params, shape)
            finally:
                connection.text_factory = str
        return raw


@dataclass(frozen=True)
class ChunkShape:
    """How to take apart the rows of a batch read: [key], locator..., columns..."""

    skip: int  # 1 when the cursor key leads each row
    width: int  # locator columns
    track_ties: bool
    top_key: int | None
    convert: Callable[[Sequence[tuple]], Any]
    above: int | None = None  # count the rows whose (single) locator is above this; None: count all
    track_nulls: bool = False  # collect the locators of rows whose key is NULL


FETCH_ROWS = 4096  # rows per fetchmany: small enough to stay in the CPU caches


def fetch_chunks(connection: sqlite3.Connection, sql: str, params: Sequence, shape: ChunkShape) -> RawBatch:
    """Run one read and drain it at once: the statement (and its snapshot) ends here."""
    raw = RawBatch(chunks=[], last_loc=None, count=0, ties=[] if shape.track_ties else None,
                   nulls=[] if shape.track_nulls else None)
    first = shape.skip + shape.width
    with gc_paused():
        cursor = connection.execute(sql, params)
        try:
            while rows := cursor.fetchmany(FETCH_ROWS):
                raw.count += len(rows)
                raw.last_loc = list(rows[-1][shape.skip:first])
                threshold = shape.above
                raw.above += len(rows) if threshold is None else sum(row[shape.skip] > threshold for row in rows)
                if shape.skip:
                    keys = [row[0] for row in rows if row[0] is not None]
                    if keys:
                        raw.max_key = max(keys) if raw.max_key is None else max(raw.max_key, *keys)
                if raw.ties is not None:
                    raw.ties += [list(row[1:first]) for row in rows if row[0] == shape.top_key]
                if raw.nulls is not None:
                    raw.nulls += [list(row[1:first]) for row in rows if row[0] is None]
                raw.chunks.append(shape.convert(list(zip(*rows))[first:]))
        finally:
            cursor.close()
    return raw


def settled_after(last_settled: Any, first_pending: Any) -> bool:
    """True when a row that is not pending sits after the first pending one (in locator order)."""
    if last_settled is None:
        return False
    try:
        return bool(last_settled > first_pending)
    except TypeError:  # mixed storage classes in the key column: SQLite's order is not Python's
        return True


MAX_TIES = 1000  # primary keys remembered at the cursor's timestamp (WITHOUT ROWID tables)


@dataclass
class RawBatch:
    """One read: its chunks (as `convert` made them), the last locator read, the row count."""

    chunks: list
    last_loc: list | None
    count: int
    ties: list | None = None  # locators of rows whose key equals the window's top key
    tail: list | None = None  # insertion order: fingerprint of the rows up to last_loc
    tail_cols: list | None = None
    above: int = 0  # rows read with a locator above ChunkShape.above
    max_key: int | None = None  # the highest cursor key read (reads with the key only)
    nulls: list | None = None  # locators read whose key is NULL (key order, see Watermark.nulls)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Building many small tuples triggers the cyclic GC constantly; it finds nothing here."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- From SQLite values to typed Arrow columns

TIME_OF_DAY = re.compile(r"TIME\s*(\(\s*\d+\s*\))?(\s+WITH(OUT)?\s+TIME\s+ZONE)?")


def arrow_type_for_declared(declared: str, is_cursor_column: bool) -> Any:
    """SQLite's type-affinity rules, extended with the date/time and boolean names people use."""
    import pyarrow as pa

    upper = declared.upper()
    if not is_cursor_column and TIME_OF_DAY.fullmatch(upper.strip()):
        return pa.string()  # a time of day ('14:30:00') is no instant: kept as written
    if is_cursor_column or "TIMESTAMP" in upper or "DATETIME" in upper or upper.endswith("TIME"):
        return pa.timestamp("us", tz="UTC")
    if upper == "DATE":
        return pa.date32()
    if "BOOL" in upper:
        return pa.bool_()
    if "INT" in upper:
        return pa.int64()
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return pa.string()
    if "BLOB" in upper:
        return pa.binary()
    if any(word in upper for word in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL", "NUM")):
        return pa.float64()
    return None  # no declared type: decided from the values


def arrow_type_from_values(values: Sequence) -> Any:
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.string()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    if kinds <= {bytes}:
        return pa.binary()
    return pa.string()


def plan_column_types(table: SourceTable, connection: sqlite3.Connection) -> dict[str, Any]:
    """Arrow type per source column, from declared types or, without one, a sample of values."""
    types: dict[str, Any] = {}
    for column in table.columns:
        arrow_type = arrow_type_for_declared(column.declared_type, column.name == table.timestamp_col)
        if arrow_type is None:
            arrow_type = arrow_type_from_values(sample_values(connection, table.name, column.name, 1000))
        elif numeric_holds_big_integers(column.declared_type, connection, table.name, column.name):
            import pyarrow as pa

            arrow_type = pa.int64()  # exact
        types[column.name] = arrow_type
    return types


def numeric_holds_big_integers(declared: str, connection: sqlite3.Connection, table: str, column: str) -> bool:
    """A NUMERIC / DECIMAL column (a double, usually) that holds only integers, some beyond 2**53 (ids,
    nanosecond times): int64 keeps them exact, where a double would round them. A later value that
    fits neither is NULL, counted, and kept as text (ORIGINAL_SUFFIX)."""
    upper = declared.upper()
    if not ("NUM" in upper or "DEC" in upper) or any(w in upper for w in ("REAL", "FLOA", "DOUB", "INT")):
        return False
    kinds, big = connection.execute(
        f"SELECT group_concat(DISTINCT typeof(v)), max(v > {2**53} OR v < {-2**53}) FROM "
        f"(SELECT {quote_ident(column)} AS v FROM {quote_ident(table)} WHERE {quote_ident(column)} IS NOT NULL "
        "LIMIT 100000)").fetchone()
    return kinds == "integer" and bool(big)


@dataclass
class ConversionReport:
    """Values that could not be kept in their column's type (uploaded as NULL)."""

    nulled: dict[str, int] = field(default_factory=dict)
    invalid_timestamps: int = 0
    # The stored values behind those NULLs, as text, per column of the chunk being converted
    # (kept: see ORIGINAL_SUFFIX); `chunks` collects them chunk by chunk.
    kept: dict[str, Any] = field(default_factory=dict)
    chunks: list[dict[str, Any]] = field(default_factory=list)

    def misfits(self, name: str, values: list, converted: Sequence) -> None:
        """Count the values that became NULL and keep their stored text."""
        import pyarrow as pa

        bad = sum(1 for v, c in zip(values, converted) if c is None and v is not None)
        if bad:
            self.nulled[name] = self.nulled.get(name, 0) + bad
            texts = [None if v is None or c is not None else original_text(v) for v, c in zip(values, converted)]
            self.kept[name] = pa.array(texts, pa.string())

    def end_chunk(self) -> None:
        self.chunks.append(self.kept)
        self.kept = {}


# A value the uploader cannot hold in its column's type (an unreadable timestamp, 'abc' in an
# INTEGER column, an integer a double cannot hold) is loaded as NULL, and its stored value is kept
# as text in the column <name>__original, added to the target the first time it is needed.
ORIGINAL_SUFFIX = "__original"


def original_text(value: Any) -> str:
    """A stored value as text, exactly: BLOBs that are not UTF-8 as SQLite's X'..' literal."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "X'" + value.hex().upper() + "'"
    return repr(value) if isinstance(value, float) else str(value)


def to_arrow_column(values: list, arrow_type: Any, naive_tz: Any, name: str,
                    report: ConversionReport) -> Any:
    """Build one typed Arrow column; a value that does not fit becomes NULL and is counted."""
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type) or pa.types.is_date32(arrow_type):
        micros = timestamps_to_micros(values, naive_tz)
        report.misfits(name, values, micros)
        if pa.types.is_date32(arrow_type):
            return pa.array([None if m is None else m // 86_400_000_000 for m in micros], pa.date32())
        return pa.array(micros, pa.timestamp("us", tz=arrow_type.tz))
    if pa.types.is_decimal(arrow_type):
        return to_decimal_column(values, arrow_type, name, report)
    try:
        return pa.array(values, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        pass
    coerce = COERCIONS.get(str(arrow_type), lambda v: v)
    fixed = []
    for value in values:
        try:
            converted = None if value is None else coerce(value)
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
            converted = None
        fixed.append(converted)
    report.misfits(name, values, fixed)
    return pa.array(fixed, type=arrow_type)


def to_decimal_column(values: list, arrow_type: Any, name: str, report: ConversionReport) -> Any:
    """Numbers for a DECIMAL(p,s) column, rounded half up to s digits as Databricks' CAST does.

    A number with more integer digits than the column holds stops the upload (ConfigError): it
    is not a stray value but a column too narrow for the data, and a NULL would lose it silently.
    Text that is no number becomes NULL and is counted, as in every other column.
    """
    import pyarrow as pa

    step = decimal.Decimal(1).scaleb(-arrow_type.scale)
    whole = arrow_type.precision - arrow_type.scale  # digits allowed before the point
    limit = decimal.Decimal(10) ** whole
    context = decimal.Context(prec=arrow_type.precision + 2, rounding=decimal.ROUND_HALF_UP)
    fixed: list[decimal.Decimal | None] = []
    for value in values:
        if value is None:
            fixed.append(None)
            continue
        try:
            number = decimal.Decimal(value.decode() if isinstance(value, bytes) else str(value).strip())
            if not number.is_finite():
                raise ValueError(value)
        except (ValueError, ArithmeticError, UnicodeDecodeError):
            fixed.append(None)
            continue
        too_big = bool(number) and number.adjusted() >= whole
        if not too_big:
            number = number.quantize(step, context=context)
            too_big = abs(number) >= limit  # 99.995 rounds to 100.00
        if too_big:
            raise ConfigError(
                f"Column {name!r} holds {value!r}, which does not fit the target column's type "
                f"DECIMAL({arrow_type.precision},{arrow_type.scale}) (at most {whole} digits before the point). "
                "Nothing of this batch was loaded. Widen the column in Databricks (or load into another table), "
                "then run again.")
        fixed.append(number)
    report.misfits(name, values, fixed)
    return pa.array(fixed, type=arrow_type)


def timestamps_to_micros(values: list, naive_tz: Any) -> list[int | None]:
    """timestamp_to_micros() over a column, with the common cases inlined (this is the hot loop)."""
    out: list[int | None] = []
    append = out.append
    from_iso = datetime.fromisoformat
    utc_naive = naive_tz is timezone.utc
    epoch_naive = EPOCH.replace(tzinfo=None)
    low, high = MIN_MICROS, MAX_MICROS
    for value in values:
        kind = type(value)
        if kind is str and value[4:5] == "-":
            try:
                moment = from_iso(value)
            except ValueError:
                append(timestamp_to_micros(value, naive_tz))
                continue
            offset = moment.utcoffset()
            if offset is None:
                if not utc_naive:
                    append(timestamp_to_micros(value, naive_tz))
                    continue
                delta = moment - epoch_naive
            else:
                delta = moment - EPOCH
            micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            append(micros if low <= micros <= high else None)
        elif kind is int and 100_000_000_000 <= value < 100_000_000_000_000:
            append(value * 1_000)
        elif kind is int and 10_000_000 <= value < 100_000_000_000:
            append(value * 1_000_000)
        elif kind is float and MIN_JULIAN <= value < MAX_JULIAN:
            append(round((value - JULIAN_UNIX_EPOCH) * 86_400_000) * 1_000)
        else:
            append(timestamp_to_micros(value, naive_tz))
    return out


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("fraction")
        number = int(value)
    elif isinstance(value, bytes):
        raise ValueError("bytes")
    else:
        number = int(str(value).strip())
    if not INT64_MIN <= number <= INT64_MAX:  # SQLite keeps such "integers" as REAL
        raise OverflowError("beyond 64 bits")
    return number


def _to_float(value: Any) -> float:
    if isinstance(value, bytes):
        raise ValueError("bytes")
    number = float(value)
    if isinstance(value, int) and int(number) != value:  # beyond 2**53: a double would change it
        raise OverflowError("not exact as a double")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return bool(value)
        raise ValueError("not 0/1")
    word = str(value).strip().lower()
    if word in TRUE_WORDS - {""}:
        return True
    if word in FALSE_WORDS - {""}:
        return False
    raise ValueError("not a boolean")


def _to_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # binary that is not text: NULL, and counted
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


def _to_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


COERCIONS: dict[str, Callable[[Any], Any]] = {
    "int64": _to_int, "double": _to_float, "bool": _to_bool, "string": _to_str, "large_string": _to_str,
    "binary": _to_bytes, "large_binary": _to_bytes,
}


# --- The native reader: a batch straight from SQLite into Arrow, where that is exact
#
# Python's sqlite3 makes a Python object of every value; adbc-driver-sqlite fills Arrow arrays in
# C. It infers one type per result column from its first rows, widens it when they mix storage
# classes (numbers become text, or doubles) and stops with an error when a later row does not fit.
# So a column is read natively only where its Arrow type proves its values exact:
#   - INTEGER target: the driver typed it int64 (every value an integer);
#   - REAL target: int64 or double, every magnitude below 2**53 (an integer the driver turned
#     into a double is then that double, as in Python);
#   - TEXT target of a column with TEXT affinity (SQLite stores every number in it as text):
#     string, valid UTF-8;
#   - timestamps: read as two parts, numbers and text (CASE on typeof()), each checked as above;
#     Arrow compute converts the plain forms, timestamps_to_micros() every other value.
# Any other column, or one that fails its check, is read through Python's sqlite3 for that
# batch and converted by to_arrow_column(): the Python functions stay the one definition of what
# a value means.

# Rows per Arrow batch from the driver (it infers types from the first). A whole batch in one
# piece needs no copy to make it contiguous; a replay's read (no row limit) comes in pieces.
NATIVE_BATCH_ROWS = 65_536
NATIVE_ONE_PIECE_MAX = 1_000_000
FLOAT_EXACT = 2**53  # integers below this magnitude are exact as doubles
# What Arrow and Python read alike. Not the year 0000: Arrow reads it, Python does not.
_ISO_NATIVE = r"^(?:[1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?"


class NativeUnavailable(Exception):
    """The native reader cannot read this batch exactly: the Python reader reads it."""


def sqlite_affinity(declared: str) -> str:
    """SQLite's column affinity rules (section 3.1 of its datatype documentation)."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def native_parts(arrow_type: Any, affinity: str, q: str) -> dict[str, str]:
    """The SQL of each part read natively for a column; {} reads it through Python."""
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type) or pa.types.is_date32(arrow_type):
        if affinity == "TEXT":
            return {"text": q}
        return {"number": f"CASE WHEN typeof({q}) IN ('integer', 'real') THEN {q} END",
                "text": f"CASE WHEN typeof({q}) IN ('text', 'blob') THEN {q} END"}
    if arrow_type in (pa.int64(), pa.float64()) or (arrow_type == pa.string() and affinity == "TEXT"):
        return {"value": q}
    return {}


@dataclass
class NativeRead:
    """A batch as the driver read it, before the Python connection's snapshot vouches for it."""

    table: Any  # __l0 (rowid), then __p{i}_{part} for the parts of column i
    parts: dict[int, list[str]]  # the columns read natively, and their parts


def pandas_needed(settings: Settings, transforms: TransformPlan) -> bool:
    """Transforms run on pandas; the SQL connector hands results to and from pandas."""
    return bool(transforms.sanitizes or transforms.filters or transforms.aggregates) or \
        (uses_databricks(settings) and settings.load_mode != "landing")


def skip_pandas_probe() -> bool:
    """pyarrow's first conversion of a Python value imports pandas (0.2 s of CPU and ~35 MB on a
    small node) only to ask whether the value is a pandas object. Where none can be, that probe is
    answered "no pandas" once, and pyarrow remembers the answer; a real use of pandas (to_pandas,
    `import pandas`) still imports it. True when the probe is answered."""
    if "pandas" in sys.modules:
        return False
    import pyarrow as pa

    class NoPandas:
        @staticmethod
        def find_spec(name: str, path: Any = None, target: Any = None) -> None:
            if name == "pandas" or name.startswith("pandas."):
                raise ImportError("pandas is not imported for pyarrow's probe")

    sys.meta_path.insert(0, NoPandas)  # type: ignore[arg-type]
    try:
        pa.array([0])
    except ImportError:  # a pyarrow that does not take "no pandas" for an answer: import it as usual
        return False
    finally:
        sys.meta_path.remove(NoPandas)  # type: ignore[arg-type]
    return "pandas" not in sys.modules


def start_pandas_import() -> threading.Thread:
    """Import pandas in a thread, for a run that uses it. pyarrow imports it the first time it
    converts a Python value (0.15-0.2 s of Python, holding the GIL); started before the planning
    scan, which runs inside SQLite without the GIL, that import costs a drain no time. Joined
    before a batch is converted; a conversion made meanwhile (the driver's query parameters)
    waits for the import under pyarrow's own lock (pyarrow >= 15, apache/arrow#39314)."""
    import pyarrow.compute  # noqa: F401 -- what the conversion imports, imported here first

    def warm() -> None:
        with contextlib.suppress(Exception):
            import pyarrow as pa

            pa.scalar(0)  # pyarrow's own lazy import, under its lock

    thread = threading.Thread(target=warm, name="warm-up", daemon=True)
    thread.start()
    return thread


class NativeReader:
    """Reads unfiltered insertion-order batches of rowid tables (the drain of a backlog).

    It uses the driver's low-level API: its DB-API module imports pyarrow.dataset and with it
    pandas, 0.2 s of start-up a drain does not need. The driver reads with the GIL released, so
    the next batch's read can run in a thread (prefetch()) while this one is converted; it is
    vouched for like any other read, by finish() inside the Python connection's snapshot."""

    def __init__(self, path: str):
        import adbc_driver_manager
        import adbc_driver_sqlite

        self._database = adbc_driver_sqlite.connect(f"file:{quote(os.path.abspath(path))}?mode=ro")
        try:
            # ADBC connections autocommit: every read is its own short transaction, as on the
            # Python connection.
            self.connection = adbc_driver_manager.AdbcConnection(self._database)
        except BaseException:
            self._database.close()
            raise
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple, Future, Any] | None = None  # (what it reads, its read, data_version)

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for handle in (self.connection, self._database):
            with contextlib.suppress(Exception):
                handle.close()

    @staticmethod
    def _request(window: Window, limit: int, upper: list | None, types: Sequence[Any]) -> tuple:
        return (tuple(window.top), tuple(window.done or ()), tuple(window.start or ()), limit,
                tuple(upper or ()), tuple(str(kind) for kind in types))

    def prefetch(self, reader: SourceReader, window: Window, limit: int, types: Sequence[Any], version: Any) -> None:
        """Start reading the window's next batch in a thread. `version` is the Python connection's
        data_version taken before this call, as fetch() callers take it before theirs."""
        self._drop_ahead()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="native-read")
        future = self._pool.submit(self._fetch, reader, window, limit, None, types)
        self._ahead = (self._request(window, limit, None, types), future, version)

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                self._ahead[1].result()  # one statement at a time on the driver's connection
            self._ahead = None

    def fetch(self, reader: SourceReader, window: Window, limit: int, upper: list | None,
              types: Sequence[Any], version: Any) -> tuple[NativeRead, Any]:
        """The batch and the data_version to check it against: the prefetched read when it is
        this one (with the version taken before it began), else a read now (with `version`)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            request, future, ahead_version = ahead
            if request == self._request(window, limit, upper, types):
                return future.result(), ahead_version
            with contextlib.suppress(Exception):
                future.result()
        return self._fetch(reader, window, limit, upper, types), version

    def _fetch(self, reader: SourceReader, window: Window, limit: int, upper: list | None,
               types: Sequence[Any]) -> NativeRead:
        import adbc_driver_manager
        import pyarrow as pa

        selected, parts = [], {}
        for i, (column, kind) in enumerate(zip(reader.table.columns, types)):
            sql = native_parts(kind, sqlite_affinity(column.declared_type), quote_ident(column.name))
            if sql:
                parts[i] = list(sql)
                selected += [f"{expression} AS __p{i}_{part}" for part, expression in sql.items()]
        if not selected:
            raise NativeUnavailable("no column of a type the native reader reads")
        sql, params = reader.range_sql(window, limit, upper, ", ".join(selected))
        statement = adbc_driver_manager.AdbcStatement(self.connection)
        try:
            piece = limit if limit <= NATIVE_ONE_PIECE_MAX else NATIVE_BATCH_ROWS
            statement.set_options(**{"adbc.sqlite.query.batch_rows": str(piece)})
            statement.set_sql_query(sql)
            statement.prepare()
            statement.bind(pa.record_batch([[value] for value in params], names=[str(i) for i in range(len(params))]))
            handle, _ = statement.execute_query()
            table = pa.RecordBatchReader._import_from_c(handle.address).read_all()
        except Exception as exc:  # a row that does not fit its column's type, a writer's lock, ...
            raise NativeUnavailable(f"the driver stopped: {one_line(str(exc))[:200]}") from exc
        finally:
            with contextlib.suppress(Exception):
                statement.close()
        return NativeRead(table.combine_chunks(), parts)

    @staticmethod
    def finish(connection: sqlite3.Connection, read: NativeRead, same_snapshot: bool, reader: SourceReader,
               window: Window, limit: int, upper: list | None, types: Sequence[Any], schema: Any,
               report: ConversionReport) -> RawBatch:
        """Inside the Python connection's read transaction: the batch of that snapshot, as Arrow.

        Columns the driver could not read exactly are read again here, through Python. When
        another connection committed since the driver's read began, the batch is kept only if
        it holds the same rows and no column needs Python; otherwise Python reads it all."""
        import pyarrow as pa

        table, names = read.table, reader.table.column_names
        rowids = table.column("__l0")
        parts: dict[int, dict[str, Any]] = {}
        to_python = [i for i in range(len(names)) if i not in read.parts]
        for i, part_names in read.parts.items():
            found = {part: exact_part(table.column(f"__p{i}_{part}"), part, types[i]) for part in part_names}
            if any(array is None for array in found.values()):
                to_python.append(i)
            else:
                parts[i] = found
        native: dict[int, tuple[Any, Any]] = {}
        for i in sorted(parts):
            converted = native_column(parts[i], types[i], reader.naive_tz)
            if converted is None:  # a misfit whose stored text the driver's types do not tell
                to_python.append(i)
            else:
                native[i] = converted
        to_python.sort()
        if to_python and not same_snapshot:  # a row must not mix columns of two versions of itself
            raise NativeUnavailable("the database changed between the two reads")
        fallback: dict[int, Any] = {}
        if to_python or not same_snapshot:
            LOG.debug("Native read of %d row(s): %s through Python%s.", table.num_rows,
                      ", ".join(names[i] for i in to_python) or "no column",
                      "" if same_snapshot else "; rowids checked (the database changed meanwhile)")
            selected = ", ".join(quote_ident(names[i]) for i in to_python) or "NULL"
            sql, params = reader.range_sql(window, limit, upper, selected)
            try:
                rows = connection.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:  # TEXT that is not UTF-8: the Python reader's way
                raise NativeUnavailable(str(exc)) from exc
            if [row[0] for row in rows] != rowids.to_pylist():
                raise NativeUnavailable("rows changed between the driver's read and this snapshot")
            fallback = dict(zip(to_python, list(zip(*rows))[1:] if rows else [() for _ in to_python]))
        raw = RawBatch(chunks=[], last_loc=None, count=table.num_rows)
        if not table.num_rows:
            return raw
        arrays = []
        for i, name in enumerate(names):  # in table order, as the Python reader counts the misfits
            if i in fallback:
                arrays.append(to_arrow_column(list(fallback[i]), types[i], reader.naive_tz, name, report))
                continue
            array, kept = native[i]
            arrays.append(array)
            if kept is not None:
                report.nulled[name] = report.nulled.get(name, 0) + len(kept) - kept.null_count
                report.kept[name] = kept
        report.end_chunk()
        raw.chunks = [pa.RecordBatch.from_arrays(arrays, schema=schema)]
        raw.last_loc = [rowids[-1].as_py()]
        raw.above = raw.count
        return raw


def exact_part(column: Any, part: str, arrow_type: Any) -> Any:
    """A part as the driver typed it, when that type proves its values exact (see above); None
    sends the column through Python. A part of NULLs only is typed int64 by the driver."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    textual = part == "text" or arrow_type == pa.string()
    if array.null_count == len(array):
        return pa.nulls(len(array), pa.string() if textual else array.type)
    if textual:
        if array.type != pa.string():
            return None
        try:
            array.validate(full=True)  # TEXT that is not UTF-8: Python's reader replaces bad bytes
        except pa.ArrowInvalid:
            return None
        return array
    if array.type == pa.int64():
        if arrow_type == pa.float64():
            bounds = pc.min_max(array)
            if bounds["min"].as_py() <= -FLOAT_EXACT or bounds["max"].as_py() >= FLOAT_EXACT:
                return None
        return array
    if array.type == pa.float64() and arrow_type != pa.int64():
        largest = pc.max(pc.abs(array)).as_py()
        return array if largest < FLOAT_EXACT else None  # an integer beyond 2**53 may hide there
    return None


def native_column(parts: dict[str, Any], arrow_type: Any, naive_tz: Any) -> tuple[Any, Any] | None:
    """to_arrow_column() for a natively read column: the same values, computed by Arrow, and the
    stored text of the values that became NULL (None when there are none; see ORIGINAL_SUFFIX).
    None when that text is not known: a whole double among the numbers may have been stored as
    an INTEGER (the driver widens a column that mixes them), and '5' is not '5.0'."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_timestamp(arrow_type) or pa.types.is_date32(arrow_type)):
        return parts["value"].cast(arrow_type), None  # int64 or float64 to float64 (exact, checked)
    numbers, texts = parts.get("number"), parts["text"]
    micros, present = native_timestamps(numbers, texts, naive_tz)
    misfit = pc.and_(present, pc.is_null(micros))
    kept = None
    if pc.any(misfit).as_py():
        index = pc.indices_nonzero(misfit)
        stored = pc.take(texts, index).to_pylist()
        if numbers is not None:
            stored = [t if n is None else n for n, t in zip(pc.take(numbers, index).to_pylist(), stored)]
        if numbers is not None and pa.types.is_floating(numbers.type) and any(
                isinstance(v, float) and v.is_integer() for v in stored):
            return None
        kept = pc.replace_with_mask(pa.nulls(len(micros), pa.string()), misfit,
                                    pa.array([original_text(v) for v in stored], pa.string()))
    if pa.types.is_date32(arrow_type):
        day = 86_400_000_000
        days = pc.divide(micros, day)  # truncates; Python's // floors
        days = pc.if_else(pc.and_(pc.less(micros, 0), pc.not_equal(pc.multiply(days, day), micros)),
                          pc.subtract(days, 1), days)
        return days.cast(pa.int32()).cast(pa.date32()), kept
    return micros.cast(pa.timestamp("us", tz=arrow_type.tz)), kept


def native_timestamps(numbers: Any, texts: Any, naive_tz: Any) -> tuple[Any, Any]:
    """timestamps_to_micros() with Arrow compute for the plain forms (unix seconds, milliseconds
    and microseconds, Julian days, ISO text) in the same arithmetic; every other value goes
    through timestamps_to_micros() itself. `numbers` holds the INTEGER and REAL values (int64, or
    double below 2**53, where an integer means what the same REAL means), `texts` the TEXT ones.
    Returns the microseconds and where a value was stored."""
    import pyarrow as pa
    import pyarrow.compute as pc

    i64 = pa.int64()
    if numbers is None:
        numbers = pa.nulls(len(texts), i64)

    def within(values: Any, low: float, high: float) -> Any:  # low <= v < high
        return pc.and_(pc.greater_equal(values, low), pc.less(values, high))

    def magnitude(values: Any, low: float, high: float) -> Any:  # low <= |v| < high, without abs()
        return pc.or_(within(values, low, high), pc.and_(pc.greater(values, -high), pc.less_equal(values, -low)))

    def surely(where: Any) -> Any:  # NULL taken for false (as fill_null(False), which costs ~50x more)
        return pc.and_kleene(where, pc.is_valid(where))

    def keep(where: Any, values: Any) -> Any:  # values where `where`, NULL elsewhere (no overflow there)
        return pc.if_else(where, values, pa.scalar(None, values.type))

    def julian(days: Any) -> Any:  # julian_day_to_micros(): the same double arithmetic, rounded half to even
        return pc.multiply(pc.round(pc.multiply(pc.subtract(days, JULIAN_UNIX_EPOCH), 86_400_000.0),
                                    round_mode="half_to_even").cast(i64), 1_000)

    def rounded(values: Any, factor: float) -> Any:  # Python's round(v * factor)
        return pc.round(pc.multiply(values, factor), round_mode="half_to_even").cast(i64)

    if numbers.type == i64:  # integer_epoch_to_micros()
        forms = [
            (numbers, magnitude(numbers, 10**7, 10**11), lambda v: pc.multiply(v, 1_000_000)),
            (numbers, magnitude(numbers, 10**11, 10**14), lambda v: pc.multiply(v, 1_000)),
            (numbers, pc.or_(within(numbers, 10**14, 10**18), pc.less_equal(numbers, -(10**14))), lambda v: v),
            # nanoseconds (positive: truncation is Python's floor); 2**63-1, a sentinel, goes through Python
            (numbers, within(numbers, 10**18, 2**63 - 1), lambda v: pc.divide(v, 1_000)),
            (numbers, within(numbers, math.ceil(MIN_JULIAN), math.ceil(MAX_JULIAN)),
             lambda v: julian(v.cast(pa.float64()))),
        ]
    else:  # real_to_micros(), for magnitudes below 2**53; the edges of its cases go through Python
        forms = [
            (numbers, within(numbers, MIN_JULIAN, MAX_JULIAN - 1), julian),
            (numbers, magnitude(numbers, 1e7, 1e11), lambda v: rounded(v, 1e6)),
            (numbers, magnitude(numbers, 1e11, 1e14 - 1), lambda v: pc.multiply(rounded(v, 1.0), 1_000)),
            (numbers, magnitude(numbers, 1e14, FLOAT_EXACT), lambda v: rounded(v, 1.0)),
        ]
    texts_forms = [(_ISO_NATIVE + r"(Z|[+-]\d{2}:?\d{2})$", pa.timestamp("us", tz="UTC"))]
    if naive_tz is timezone.utc:
        texts_forms.append((_ISO_NATIVE + "$", pa.timestamp("us")))

    def parse(texts: Any, where: Any, kind: Any) -> tuple[Any, Any]:
        """The texts `where` says, parsed; where Arrow refuses a value (Feb 30, 24:00, as Python
        does) the halves are parsed apart, so that only refused values go through Python."""
        try:
            return keep(where, texts).cast(kind).cast(i64), where
        except pa.ArrowInvalid:
            if len(texts) == 1:
                return pa.nulls(1, i64), pa.array([False])
            mid = len(texts) // 2
            (a, a_ok), (b, b_ok) = (parse(texts.slice(0, mid), where.slice(0, mid), kind),
                                    parse(texts.slice(mid), where.slice(mid), kind))
            return pa.concat_arrays([a, b]), pa.concat_arrays([a_ok, b_ok])

    for pattern, kind in texts_forms if texts.null_count < len(texts) else ():
        where = surely(pc.match_substring_regex(texts, pattern))
        if pc.any(where).as_py():
            parsed, where = parse(texts, where, kind)
            forms.append((texts, where, lambda _v, parsed=parsed: parsed))
    micros = pa.nulls(len(texts), i64)
    handled = pc.is_valid(micros)  # all False
    for values, where, convert in forms:
        where = surely(where)
        if pc.any(where).as_py():
            micros = pc.if_else(where, convert(keep(where, values)), micros)
            handled = pc.or_(handled, where)
    micros = pc.if_else(surely(within(micros, MIN_MICROS, MAX_MICROS + 1)), micros, pa.scalar(None, i64))
    present = pc.or_(pc.is_valid(numbers), pc.is_valid(texts))
    todo = pc.and_(present, pc.invert(handled))
    if pc.any(todo).as_py():
        index = pc.indices_nonzero(todo)
        values = [t if n is None else n for n, t in zip(pc.take(numbers, index).to_pylist(),
                                                       pc.take(texts, index).to_pylist())]
        micros = pc.replace_with_mask(micros, todo, pa.array(timestamps_to_micros(values, naive_tz), i64))
    return micros, present


# =====================================================================================
# 4. Transforms: sanitize -> filter -> aggregate, on each batch (pandas)
# =====================================================================================

FILTER_OPERATORS = (">", ">=", "<", "<=", "==", "!=", "in", "not_in")
AGGREGATIONS = {"avg": "mean", "mean": "mean", "min": "min", "max": "max", "sum": "sum",
                "count": "count", "first": "first", "last": "last"}
NUMERIC_ONLY = {"avg", "mean", "sum"}
TIME_BUCKETS = {"second": "s", "minute": "min", "hour": "h", "day": "D"}


@dataclass(frozen=True)
class TransformPlan:
    """Validated transform settings; empty parts are skipped."""

    remove_nulls: tuple[str, ...] = ()
    replace_values: dict = field(default_factory=dict)
    filters: tuple[tuple[str, str, Any], ...] = ()
    group_by: tuple[str, ...] = ()
    buckets: dict = field(default_factory=dict)  # derived group column -> pandas frequency
    aggregations: dict = field(default_factory=dict)  # output column -> (input column | None, function)
    timestamp_col: str | None = None

    @property
    def sanitizes(self) -> bool:
        return bool(self.remove_nulls or self.replace_values)

    @property
    def aggregates(self) -> bool:
        return bool(self.aggregations or self.group_by)


def _where(settings: Settings, key: str) -> str:
    """Where a setting came from, naming the setting itself too (a flag or variable spells it differently)."""
    source = settings.sources.get(key, key)
    return source if key in source else f"{source} ({key})"


def _transform_config(settings: Settings, key: str, allowed: tuple[str, ...]) -> tuple[str, dict]:
    """The setting's source (for messages) and its mapping, refusing options it does not have."""
    where = _where(settings, key)
    config = dict(getattr(settings, key))
    unknown = set(config) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"use {' and '.join(allowed)}.")
    return where, config


def _name_list(config: dict, key: str, where: str, what: str) -> list:
    names = config.get(key, [])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list):
        raise ConfigError(f"{where}: {key} must be a list of {what}.")
    return names


def _columns_check(names: Sequence[str], columns: Sequence[str], where: str, what: str) -> list[str]:
    resolved = []
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: {what} must name columns, got {name!r}.")
        if name not in columns:
            raise ConfigError(f"{where}: {what} names column {name!r}, which the table does not have "
                              f"(columns: {', '.join(columns)}).")
        resolved.append(name)
    return resolved


def build_transform_plan(settings: Settings, columns: Sequence[str], types: dict[str, Any],
                         timestamp_col: str | None) -> TransformPlan:
    """Check every transform setting against the real columns, at start-up."""
    import pyarrow as pa

    plan: dict[str, Any] = {"timestamp_col": timestamp_col}
    if settings.enable_sanitize:
        where, config = _transform_config(settings, "sanitize_config", ("remove_nulls", "replace_values"))
        nulls = _name_list(config, "remove_nulls", where, "column names")
        plan["remove_nulls"] = tuple(_columns_check(nulls, columns, where, "remove_nulls"))
        replace = config.get("replace_values", {})
        if not isinstance(replace, dict) or not all(isinstance(v, dict) for v in replace.values()):
            raise ConfigError(f"{where}: replace_values must map each column to {{old value: new value}}.")
        _columns_check(list(replace), columns, where, "replace_values")
        plan["replace_values"] = {column: _replacements(mapping, types.get(column), where, column)
                                  for column, mapping in replace.items()}
    if settings.enable_filter:
        plan["filters"] = tuple(_filter_terms(settings, columns, types))
    if settings.enable_aggregate:
        plan.update(_aggregate_terms(settings, columns, types, timestamp_col, pa))
    return TransformPlan(**plan)


def _filter_terms(settings: Settings, columns: Sequence[str], types: dict[str, Any]) -> Iterator[tuple]:
    where = _where(settings, "filter_config")
    for column, rule in settings.filter_config.items():
        _columns_check([column], columns, where, "a filter")
        pairs = rule.items() if isinstance(rule, dict) else [("==", rule)]
        if isinstance(rule, dict) and not rule:
            raise ConfigError(f"{where}: the filter on {column!r} has no operator.")
        for operator, value in pairs:
            if operator not in FILTER_OPERATORS:
                raise ConfigError(f"{where}: unknown operator {operator!r} for column {column!r}; "
                                  f"use one of {' '.join(FILTER_OPERATORS)}.")
            if operator in ("in", "not_in"):
                if not isinstance(value, list):
                    raise ConfigError(f"{where}: operator {operator!r} on {column!r} needs a list of values.")
            elif isinstance(value, (list, dict)):
                raise ConfigError(f"{where}: operator {operator!r} on {column!r} needs a single value, "
                                  f"got {type(value).__name__}.")
            elif operator in (">", ">=", "<", "<=") and (value is None or isinstance(value, bool)):
                raise ConfigError(f"{where}: operator {operator!r} on {column!r} needs a number, text "
                                  f"or date, got {value!r}.")
            for item in value if isinstance(value, list) else [value]:
                problem = _value_misfit(item, types.get(column))
                if problem:
                    raise ConfigError(f"{where}: the filter on {column!r} compares it with {item!r}, but {problem}.")
            yield column, operator, _filter_value(value, types.get(column), where, column,
                                                  timezone_from_name(settings.source_timezone))


def _value_misfit(value: Any, arrow_type: Any) -> str | None:
    """Why a configured value cannot be compared with (or stored in) a column of this type."""
    import pyarrow as pa

    if value is None or arrow_type is None or pa.types.is_timestamp(arrow_type):
        return None  # timestamps are checked by _filter_value, which parses them
    if isinstance(value, (list, dict)):
        return f"a single value is needed, not a {type(value).__name__}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)) and not number:
        return f"the column holds numbers ({arrow_type})"
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return "the column holds text: quote the value"
    if pa.types.is_binary(arrow_type):
        return "the column holds binary data, which a configured value cannot match"
    return None


def _replacements(mapping: dict, arrow_type: Any, where: str, column: str) -> dict:
    """replace_values for one column, with keys in the column's type (JSON keys are always text)."""
    import pyarrow as pa

    numeric = arrow_type is not None and (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type))
    converted = {}
    for old, new in mapping.items():
        if numeric and isinstance(old, str):
            try:
                old = float(old)
            except ValueError:
                raise ConfigError(f"{where}: replace_values for {column!r} replaces {old!r}, but the column "
                                  f"holds numbers ({arrow_type}).") from None
        problem = _value_misfit(new, arrow_type) or _value_misfit(old, arrow_type)
        if problem:
            raise ConfigError(f"{where}: replace_values for {column!r}: {old!r} -> {new!r} cannot be "
                              f"applied: {problem}.")
        converted[old] = new
    return converted


def _filter_value(value: Any, arrow_type: Any, where: str, column: str, naive_tz: Any) -> Any:
    import pyarrow as pa

    if arrow_type is None or not pa.types.is_timestamp(arrow_type) or value is None:
        return value
    values = value if isinstance(value, list) else [value]
    converted = []
    for item in values:
        micros = timestamp_to_micros(item, naive_tz)
        if micros is None:
            raise ConfigError(f"{where}: {item!r} is not a date/time, but {column!r} holds timestamps.")
        converted.append(micros)
    return converted if isinstance(value, list) else converted[0]


def _aggregate_terms(settings: Settings, columns: Sequence[str], types: dict[str, Any],
                     timestamp_col: str | None, pa: Any) -> dict[str, Any]:
    where, config = _transform_config(settings, "aggregate_config", ("group_by", "aggregations"))
    group_by = _name_list(config, "group_by", where, "columns or time buckets")
    repeated = sorted({str(n) for n in group_by if group_by.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: group_by lists {', '.join(repeated)} more than once.")
    buckets = {}
    for name in group_by:
        if isinstance(name, str) and name not in columns and name in TIME_BUCKETS:
            if not timestamp_col:
                raise ConfigError(f"{where}: group_by {name!r} needs a timestamp column; set timestamp_col.")
            buckets[name] = TIME_BUCKETS[name]
        else:
            _columns_check([name], columns, where, "group_by")
    aggregations = config.get("aggregations", {})
    if not isinstance(aggregations, dict) or not aggregations:
        raise ConfigError(f"{where}: aggregations must map columns to functions "
                          f"({', '.join(AGGREGATIONS)}), e.g. {{temperature: avg}}.")
    outputs: dict[str, tuple[str | None, str]] = {}
    for column, functions in aggregations.items():
        names = functions if isinstance(functions, list) else [functions]
        if not names:
            raise ConfigError(f"{where}: aggregations gives no function for {column!r}; "
                              f"use one of {', '.join(AGGREGATIONS)}.")
        for function in names:
            if not isinstance(function, str) or function.lower() not in AGGREGATIONS:
                raise ConfigError(f"{where}: unknown aggregation {function!r} for {column!r}; "
                                  f"use one of {', '.join(AGGREGATIONS)}.")
            function = function.lower()
            source: str | None = column
            if column not in columns:
                if function != "count":
                    raise ConfigError(f"{where}: aggregations names column {column!r}, which the table "
                                      f"does not have (columns: {', '.join(columns)}).")
                source = None  # 'readings: count' counts the rows of each group
            elif function in NUMERIC_ONLY:
                arrow_type = types.get(column)
                if arrow_type is not None and not (pa.types.is_integer(arrow_type)
                                                   or pa.types.is_floating(arrow_type)):
                    raise ConfigError(f"{where}: {function} of {column!r} needs numbers, but the column "
                                      f"holds {arrow_type}.")
            output = column if len(names) == 1 else f"{column}_{function}"
            if output in group_by or output in buckets:
                raise ConfigError(f"{where}: {column!r} is both grouped by and aggregated.")
            outputs[output] = (source, AGGREGATIONS[function])
    return {"group_by": tuple(group_by), "buckets": buckets, "aggregations": outputs}


@dataclass
class TransformCounts:
    sanitize: int = 0
    filter: int = 0
    aggregate: int = 0


def apply_transforms(table: Any, plan: TransformPlan, counts: TransformCounts) -> Any:
    """Run the enabled transforms on one batch; counts rows each one removed."""
    if not (plan.sanitizes or plan.filters or plan.aggregates) or table.num_rows == 0:
        return table
    import pandas as pd
    import pyarrow as pa

    frame = table.to_pandas(types_mapper=pd.ArrowDtype)  # Arrow-backed: exact ints, real NULLs
    before = len(frame)
    if plan.remove_nulls:
        frame = frame.dropna(subset=list(plan.remove_nulls))
    for column, mapping in plan.replace_values.items():
        frame[column] = _replace(frame[column], mapping, pd, pa)
    counts.sanitize += before - len(frame)
    before = len(frame)
    if plan.filters:
        keep = pd.Series(True, index=frame.index)
        for column, operator, value in plan.filters:
            keep &= _filter_mask(frame[column], operator, value, pd)
        frame = frame[keep]
    counts.filter += before - len(frame)
    before = len(frame)
    if plan.aggregates:
        frame = _aggregate(frame, plan, pd)
        counts.aggregate += before - len(frame)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _replace(series: Any, mapping: dict, pd: Any, pa: Any) -> Any:
    """Map old -> new values; NULLs stay NULL; the column keeps an Arrow type."""
    values = [None if pd.isna(v) else mapping.get(v, v) if isinstance(v, (str, int, float)) else v
              for v in series.tolist()]
    try:
        array = pa.array(values, type=series.dtype.pyarrow_dtype)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        array = pa.array(values)  # a replacement of another type: let Arrow find the common one
    return pd.Series(array, index=series.index, dtype=pd.ArrowDtype(array.type))


def _filter_mask(series: Any, operator: str, value: Any, pd: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_timestamp(series.dtype.pyarrow_dtype) and value is not None:
        to_ts = lambda m: pd.Timestamp(m, unit="us", tz="UTC")  # noqa: E731
        value = [to_ts(v) for v in value] if isinstance(value, list) else to_ts(value)
    if operator in ("in", "not_in"):
        mask = series.isin(value)
        mask = ~mask if operator == "not_in" else mask
        return mask.fillna(False).astype(bool) & (series.notna() if operator == "not_in" else True)
    if value is None:
        return series.isna() if operator == "==" else series.notna()
    compare = {">": series.gt, ">=": series.ge, "<": series.lt, "<=": series.le, "==": series.eq,
               "!=": series.ne}[operator]
    try:
        return compare(value).fillna(False).astype(bool)
    except (TypeError, pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise UploaderError(f"filter_config: cannot compare column {series.name!r} "
                            f"({series.dtype}) with {value!r}.") from None


def _aggregate(frame: Any, plan: TransformPlan, pd: Any) -> Any:
    keys = list(plan.group_by)
    for bucket, frequency in plan.buckets.items():
        frame = frame.assign(**{bucket: frame[plan.timestamp_col].dt.floor(frequency)})
    named = {}
    for output, (source, function) in plan.aggregations.items():
        if source is None:
            named[output] = pd.NamedAgg(column=keys[0] if keys else frame.columns[0], aggfunc="size")
        else:
            named[output] = pd.NamedAgg(column=source, aggfunc=function)
    if not keys:
        frame = frame.assign(__all=0)
        result = frame.groupby("__all", dropna=False).agg(**named).reset_index(drop=True)
    else:
        result = frame.groupby(keys, dropna=False, sort=True).agg(**named).reset_index()
    for output, (_source, function) in plan.aggregations.items():
        if function in ("count", "size") or _source is None:
            result[output] = result[output].astype("int64[pyarrow]")
    return result


# =====================================================================================
# 5. Targets
# =====================================================================================


@dataclass
class Batch:
    """One unit of upload: rows plus the watermark that is true once they are committed."""

    seq: int
    rows: Any  # pyarrow.Table
    app_id: str
    watermark: Watermark
    rows_read: int
    before: Watermark  # the watermark the batch was read from (with its window)
    last_loc: list | None  # the last locator the batch read: with `before`, the batch's exact rows
    first_ts: int | None = None
    last_ts: int | None = None
    replay_method: str | None = None  # a replayed batch: how the target first tried to load it
    staged_file: str | None = None  # a replayed batch: the staged file its record names


@dataclass(frozen=True)
class CommitRecord:
    """What the target says this uploader committed last (the source of truth after a crash).

    complete=False means the record was written before the batch's rows (Databricks): the rows
    may or may not have landed, so the uploader replays that batch -- an idempotent load -- before
    going on. `before` and `last_loc` say exactly which rows it held.
    """

    seq: int
    watermark: Watermark
    complete: bool = True
    before: Watermark | None = None
    last_loc: list | None = None
    method: str | None = None  # how the target loaded (or began to load) the batch
    staged_file: str | None = None  # Databricks bulk path: the file name the batch was staged under


class Target(Protocol):
    """Where batches go. Every write must be idempotent per (app_id, seq)."""

    kind: str

    def describe(self) -> str: ...

    def prepare(self, schema: Any) -> Any: ...

    def committed(self, app_id: str) -> CommitRecord | None: ...

    def write(self, batch: Batch) -> None: ...

    def run_query(self, sql: str) -> Any: ...

    def info(self, app_id: str | None) -> list[tuple[str, str]]: ...

    def close(self) -> None: ...


class AnotherWriter(TransientError):
    """Another process committed this uploader's next batch number first: nothing was written; the
    next attempt resumes from the target's record instead of loading the rows again."""


def another_writer_message(batch: Batch, target: str, committed: int | None = None) -> str:
    return (f"Batch {batch.seq} was not written: {target} already holds batch {committed or batch.seq} of this "
            "uploader, committed by another process that reads the same database and table (with another "
            "state_dir, or on a filesystem whose locks do not work). Stop that process. Nothing is uploaded twice: "
            "this one resumes from the target's record.")


META_APP = "uploader.app_id"
META_SEQ = "uploader.seq"
META_WATERMARK = "uploader.watermark"


def default_table_name(settings: Settings, source_table: str | None) -> str:
    name = settings.databricks_table or source_table
    if not name:
        raise ConfigError("No table name: set databricks_table, sqlite_table_name or sqlite.")
    return name


class DeltaTarget:
    """A Delta Lake table written by delta-rs: the embedded default, no workspace needed.

    Exactly-once: each batch is committed with a Delta application transaction
    (app id, batch sequence number) and the batch's watermark in the commit's metadata, all
    in the same atomic commit. After a crash the table itself says which batch committed last.
    """

    kind = "delta"

    def __init__(self, settings: Settings, table_name: str):
        self.database = settings.databricks_database or "default"
        self.table_name = table_name
        self.location = settings.delta_path or os.path.join("lakehouse", safe_path_part(table_name))
        if "://" not in self.location:
            self.location = os.path.abspath(self.location)
        self.schema: Any = None

    def describe(self) -> str:
        return f"delta:{self.location}"

    def _open(self) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.location)
        except TableNotFoundError:
            return None
        except Exception as exc:
            raise TransientError(f"Cannot open the Delta table at {self.location}: {exc}") from None

    def prepare(self, schema: Any) -> Any:
        """Return the schema batches must have: the table's types for its columns, plus new ones."""
        import pyarrow as pa

        table = self._open()
        if table is None:
            self.schema = schema
            return schema
        existing = pa.schema(table.schema().to_arrow())
        fields = list(existing)
        known = {f.name.lower() for f in fields}
        added = [f for f in schema if f.name.lower() not in known]
        if added:
            LOG.info("New source column(s) %s will be added to the Delta table.",
                     ", ".join(f.name for f in added))
        self.schema = pa.schema(fields + added)
        return self.schema

    def committed(self, app_id: str) -> CommitRecord | None:
        table = self._open()
        if table is None:
            return None
        seq = table.transaction_version(app_id)
        if seq is None:
            return None
        for limit in (50, None):
            for entry in table.history(limit):
                if entry.get(META_APP) == app_id and str(entry.get(META_SEQ)) == str(seq):
                    return CommitRecord(int(seq), Watermark.from_json(json.loads(entry[META_WATERMARK])))
        raise UploaderError(f"The Delta table at {self.location} records batch {seq} of this uploader but "
                            "not its commit metadata (history truncated?). Cannot tell where to resume.")

    def write(self, batch: Batch) -> None:
        from deltalake import CommitProperties, Transaction, write_deltalake

        properties = CommitProperties(
            app_transactions=[Transaction(batch.app_id, batch.seq)],
            custom_metadata={META_APP: batch.app_id, META_SEQ: str(batch.seq),
                             META_WATERMARK: json.dumps(batch.watermark.to_json())},
        )
        rows = batch.rows
        if self.schema is not None:  # the table's spelling of each name (it may differ in case)
            spelling = {f.name.lower(): f.name for f in self.schema}
            rows = rows.rename_columns([spelling.get(n.lower(), n) for n in rows.column_names])
        # Right before the commit: has another process committed this batch number (or a later one)
        # for this app id? The commit is made on the very version checked, so one that commits in
        # between also fails -- delta-rs refuses a commit whose application transaction a
        # concurrent commit also carries ("Concurrent transaction failed").
        table = self._open() or self._create(rows.schema)
        self._check_not_committed(table, batch)
        try:
            write_deltalake(table, rows, mode="append", schema_mode="merge", commit_properties=properties,
                            name=f"{self.database}.{self.table_name}")
        except OSError as exc:
            raise TransientError(f"Writing to the Delta table at {self.location} failed: {exc}") from exc
        except Exception as exc:
            if "concurrent transaction" in str(exc).lower():
                raise AnotherWriter(another_writer_message(batch, self.location)) from exc
            raise TransientError(f"Writing to the Delta table at {self.location} failed: {exc}") from exc

    def _create(self, schema: Any) -> Any:
        """The table, created empty before its first batch: of two processes that find no table,
        only one can create it, and both then commit on a version they checked. (A write that
        creates the table is checked against nothing: two such writes both committed batch 1.)"""
        from deltalake import DeltaTable

        try:
            return DeltaTable.create(self.location, schema, mode="error", name=f"{self.database}.{self.table_name}")
        except Exception as exc:  # created meanwhile by another process (or a real failure: see below)
            table = self._open()
            if table is None:
                raise TransientError(f"Cannot create the Delta table at {self.location}: {exc}") from exc
            return table

    def _check_not_committed(self, table: Any, batch: Batch) -> None:
        committed = table.transaction_version(batch.app_id)
        if committed is not None and committed >= batch.seq:
            raise AnotherWriter(another_writer_message(batch, self.location, committed))

    @property
    def query_alias(self) -> str:
        """The name the table gets in queries: a name DataFusion could misread (dots, quotes) gets a plain one."""
        bare = self.table_name
        return bare if re.fullmatch(r"[a-z_][a-z0-9_]*", bare) else "uploaded_table"

    def run_query(self, sql: str, rewrite: bool = True) -> Any:
        import pyarrow as pa
        from deltalake import QueryBuilder

        table = self._open()
        if table is None:
            raise ConfigError(f"There is no Delta table at {self.location} yet: nothing has been uploaded.")
        alias = self.query_alias
        rewritten = qualified_name_pattern(self.database, self.table_name).sub(alias, sql) if rewrite else sql
        try:
            return pa.table(QueryBuilder().register(alias, table).execute(rewritten))
        except Exception as exc:
            raise ConfigError(f"Query failed: {exc}") from None

    def info(self, app_id: str | None) -> list[tuple[str, str]]:
        table = self._open()
        alias = self.query_alias
        name = (f"{self.database}.{self.table_name} (or {self.table_name})" if alias == self.table_name else
                f"{self.database}.`{self.table_name}` (or {alias})")  # DataFusion would not find the bare name
        lines = [("target", "local Delta table (delta-rs)"), ("location", self.location), ("name", name)]
        if table is None:
            return [*lines, ("status", "not created yet: nothing uploaded")]
        count = self.run_query(f"SELECT count(*) AS n FROM {self.query_alias}", rewrite=False).column(0)[0]
        import pyarrow as pa

        schema = pa.schema(table.schema().to_arrow())
        lines += [("version", str(table.version())), ("rows", str(count.as_py()))]
        lines += [("column " + f.name, str(f.type)) for f in schema]
        for entry in table.history(50):
            if META_WATERMARK in entry and (app_id is None or entry.get(META_APP) == app_id):
                mark = Watermark.from_json(json.loads(entry[META_WATERMARK]))
                lines += [("last batch", f"{entry.get(META_SEQ)} (app {entry.get(META_APP)})"),
                          ("last uploaded timestamp", micros_to_iso(mark.last_upload) or "-"),
                          ("cursor", json.dumps(mark.to_json()))]
                break
        return lines

    def close(self) -> None:
        return None


def safe_path_part(name: str) -> str:
    """A table name as one directory name: never a path of its own (.., /) or a URL (#, ?)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "table"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def datafusion_ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def qualified_name_pattern(database: str, table: str) -> re.Pattern:
    """`catalog.db.table`, `db.table`, with or without backticks/quotes, as Databricks users write it."""

    def part(name: str) -> str:
        escaped = re.escape(name)
        return rf"(?:`{escaped}`|\"{escaped}\"|{escaped}\b)"

    return re.compile(rf"(?<![\w.`\"])(?:(?:`[^`]+`|\"[^\"]+\"|\w+)\.)?{part(database)}\.{part(table)}",
                      re.IGNORECASE)


# --- Databricks SQL (through databricks-sql-connector)

PROGRESS_TABLE = "_sqlite_uploader_batches"
LINEAGE_CHOICES = {"node_id": "_node_id", "batch_id": "_batch_id", "uploaded_at": "_uploaded_at"}
STRING_LITERAL_SAFE = re.compile(r"[A-Za-z0-9 _.:,;+\-/@#=()\[\]{}]*")


def quote_db_ident(name: str) -> str:
    """Backtick-quote a Databricks identifier (a backtick inside is doubled)."""
    return "`" + name.replace("`", "``") + "`"


def databricks_type(arrow_type: Any) -> str:
    """The column type a table gets for an Arrow type (documented in the README)."""
    import pyarrow as pa

    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN"
    if pa.types.is_integer(arrow_type):
        return "BIGINT"
    if pa.types.is_floating(arrow_type):
        return "DOUBLE"
    if pa.types.is_decimal(arrow_type):
        return f"DECIMAL({arrow_type.precision},{arrow_type.scale})"
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP" if arrow_type.tz else "TIMESTAMP_NTZ"
    if pa.types.is_date(arrow_type):
        return "DATE"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "BINARY"
    return "STRING"


def arrow_type_for_databricks(type_name: str) -> Any:
    """The Arrow type batches are converted to for an existing Databricks column."""
    import pyarrow as pa

    upper = type_name.strip().upper()
    base = upper.split("(")[0]
    if base in ("DECIMAL", "NUMERIC", "DEC"):
        # Batches carry the column's own DECIMAL(p,s): Delta refuses a Parquet DOUBLE in it.
        digits = re.findall(r"\d+", upper)
        precision = int(digits[0]) if digits else 10
        return pa.decimal128(precision, int(digits[1]) if len(digits) > 1 else 0)
    return {
        "BOOLEAN": pa.bool_(), "TINYINT": pa.int8(), "BYTE": pa.int8(), "SMALLINT": pa.int16(),
        "SHORT": pa.int16(), "INT": pa.int32(), "INTEGER": pa.int32(), "BIGINT": pa.int64(),
        "LONG": pa.int64(), "FLOAT": pa.float32(), "REAL": pa.float32(), "DOUBLE": pa.float64(),
        "STRING": pa.string(), "VARCHAR": pa.string(), "CHAR": pa.string(), "BINARY": pa.binary(),
        "DATE": pa.date32(), "TIMESTAMP": pa.timestamp("us", tz="UTC"),
        "TIMESTAMP_LTZ": pa.timestamp("us", tz="UTC"), "TIMESTAMP_NTZ": pa.timestamp("us"),
    }.get(base)


def compatible(source: Any, target: Any) -> bool:
    """Can values of the source type be stored in the target column without surprise?"""
    import pyarrow as pa

    if target is None:
        return False
    if source == target or pa.types.is_string(target):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
    if any(f(source) for f in numeric) and any(f(target) for f in numeric):
        return True
    if pa.types.is_timestamp(source) and pa.types.is_timestamp(target):
        return True
    return (pa.types.is_date(source) and pa.types.is_timestamp(target)) or (
        pa.types.is_timestamp(source) and pa.types.is_date(target))


def sql_literal(value: Any) -> str:
    """Render one value as a Databricks SQL literal that cannot break out of its place.

    Text that is not plainly safe goes as CAST(X'<utf-8 hex>' AS STRING): no quoting or
    escaping rule (backslashes, quotes, NUL, newlines) can be got wrong that way.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return f"{value}L"
    if isinstance(value, float):
        if math.isnan(value):
            return "double('NaN')"
        if math.isinf(value):
            return "double('Infinity')" if value > 0 else "double('-Infinity')"
        return f"{value!r}D"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return f"TIMESTAMP_NTZ'{value.isoformat(sep=' ')}'"
        return f"TIMESTAMP'{value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=' ')}+00:00'"
    if isinstance(value, date):
        return f"DATE'{value.isoformat()}'"
    if isinstance(value, (bytes, bytearray)):
        return f"X'{bytes(value).hex()}'"
    if isinstance(value, decimal.Decimal):
        return f"{value:f}BD"
    text = str(value)
    if STRING_LITERAL_SAFE.fullmatch(text):
        return "'" + text + "'"
    return f"CAST(X'{text.encode('utf-8', 'surrogatepass').hex()}' AS STRING)"


@dataclass(frozen=True)
class DatabricksEndpoint:
    """Where and how to connect, derived from databricks_host / databricks_http_path."""

    host: str
    http_path: str
    port: int | None
    plain_http: bool

    @property
    def local(self) -> bool:
        return self.plain_http or self.host in ("localhost", "127.0.0.1", "::1")

    def connection_uri(self) -> str | None:
        if not self.plain_http:
            return None
        port = f":{self.port}" if self.port else ""
        return f"http://{self.host}{port}{self.http_path}"

    def base_url(self) -> str:
        """The workspace's URL, for its REST APIs (the Files API, OAuth)."""
        port = f":{self.port}" if self.port else ""
        return f"{'http' if self.plain_http else 'https'}://{self.host}{port}"

    def token_url(self) -> str:
        return f"{self.base_url()}/oidc/v1/token"


# Domains of Databricks workspaces: never reached without TLS.
DATABRICKS_DOMAINS = (".databricks.com", ".azuredatabricks.net", ".databricks.us", ".databricks.mil",
                      ".databricks.cn", ".gcp.databricks.com")


def parse_databricks_host(host: str, http_path: str, need_path: bool = True) -> DatabricksEndpoint:
    """Accept a bare host, an https:// URL or http://host:port (a local emulator)."""
    from urllib.parse import urlsplit

    text = host.strip()
    if "://" not in text:
        text = "https://" + text
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises for a port out of range
    except ValueError as exc:
        raise ConfigError(f"databricks_host {host!r} is not a valid host name or URL ({exc}).") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"databricks_host {host!r} is not a host name or an http(s) URL.")
    path = http_path.strip() if http_path else ""
    if not path and need_path:
        raise ConfigError("databricks_http_path is not set (DATABRICKS_HTTP_PATH, --databricks-http-path): "
                          "copy it from the warehouse's Connection details, e.g. /sql/1.0/warehouses/abc123.")
    if path and not path.startswith("/"):
        path = "/" + path
    if parts.scheme == "http" and parts.hostname.lower().endswith(DATABRICKS_DOMAINS):
        raise ConfigError(f"databricks_host {host!r} asks for plain http://, which would send the token "
                          "unencrypted; Databricks workspaces only speak HTTPS. Drop the http:// prefix.")
    return DatabricksEndpoint(parts.hostname, path, parts.port, parts.scheme == "http")


def parse_volume(path: str, key: str = "staging_volume") -> tuple[str, str, str, str]:
    """'/Volumes/catalog/schema/volume[/dir]' -> (catalog, schema, volume, dir)."""
    parts = [p for p in path.strip().split("/") if p]
    if len(parts) < 4 or parts[0] != "Volumes":
        raise ConfigError(f"{key} {path!r} must look like /Volumes/<catalog>/<schema>/<volume>[/dir].")
    if not volume_path_is_safe(parts) or any(p in (".", "..") for p in parts):
        other = ", or staging_volume: none" if key == "staging_volume" else ""
        raise ConfigError(f"{key} {path!r} contains a quote, backslash, control character or '..'; such paths "
                          f"cannot be used safely. Choose another volume{other}.")
    return parts[1], parts[2], parts[3], "/".join(parts[4:])


def volume_path_is_safe(parts: Sequence[str]) -> bool:
    """Volume paths go into PUT/COPY INTO/REMOVE as string literals: refuse anything that could end one."""
    return not any(re.search(r"['\\\x00-\x1f\x7f]", part) for part in parts)


NO_CREDENTIALS = ("No Databricks credentials: set DATABRICKS_TOKEN (a personal access token), or "
                  "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (a service principal, recommended for fleets).")


def mask_secrets(text: str, settings: Settings) -> str:
    """The text with the token and client secret masked, for error messages."""
    for secret in (settings.databricks_token, settings.databricks_client_secret):
        if secret:
            text = text.replace(secret, SECRET_MASK)
    return text


def certificate_problem(host: str, port: int, timeout: float = 10.0) -> str | None:
    """Why the host's certificate fails verification, or None (it verifies, or cannot be reached)."""
    import ssl

    context = ssl.create_default_context()  # the same trust store the connector uses, SSL_CERT_FILE included
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message or str(exc)
    except (OSError, ValueError):
        return None


class ServicePrincipalAuth:
    """OAuth machine-to-machine for a service principal, as the connector's credentials_provider.

    Fetches a token from the workspace's /oidc/v1/token with the client-credentials grant and
    renews it a minute before it expires. Only the standard library is needed.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str):
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> Callable[[], dict[str, str]]:  # the connector calls the provider once
        return self.headers

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def token(self) -> str:
        import base64
        import urllib.error
        import urllib.parse
        import urllib.request

        with self._lock:
            if self._token and time.monotonic() < self._expires - 60:
                return self._token
            body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "all-apis"}).encode()
            basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
            request = urllib.request.Request(self.token_url, data=body, method="POST", headers={
                "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code in (400, 401, 403):
                    raise ConfigError(f"The service principal was refused by {self.token_url} (HTTP {exc.code}): "
                                      "check DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET. The secret must be a "
                                      "Databricks OAuth secret of the principal: an Azure Entra ID client secret is "
                                      "not accepted here (README: Credentials).") from None
                raise TransientError(f"OAuth token request failed (HTTP {exc.code}).") from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise TransientError(f"OAuth token request to {self.token_url} failed: {exc}") from None
            self._token = str(answer["access_token"])
            self._expires = time.monotonic() + float(answer.get("expires_in", 3600))
            return self._token


def connector_version() -> str:
    """'databricks-sql-connector X.Y.Z', for DEBUG logs and bug reports."""
    return package_version("databricks-sql-connector")


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"{name} (version unknown)"


class DatabricksSession:
    """One connection to a SQL warehouse: connects lazily, runs statements, and turns the
    connector's failures into the uploader's two kinds (retry later, or stop with a message)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoint = parse_databricks_host(settings.databricks_host or "", settings.databricks_http_path or "")
        self.connection: Any = None
        self.inline_told = False  # said once that this cluster has no native parameters
        self.statements = 0  # statements sent, for the loader's report
        self.auth = self._auth()
        if self.endpoint.plain_http:
            LOG.warning("databricks_host uses plain http://: the token travels unencrypted. Use this only "
                        "for a local emulator.")

    def _auth(self) -> dict[str, Any]:
        settings = self.settings
        if settings.databricks_token:
            return {"access_token": settings.databricks_token}
        if settings.databricks_client_id and settings.databricks_client_secret:
            return {"credentials_provider": ServicePrincipalAuth(
                self.endpoint.token_url(), settings.databricks_client_id, settings.databricks_client_secret)}
        raise ConfigError(NO_CREDENTIALS)

    def describe(self) -> str:
        return self.endpoint.connection_uri() or f"https://{self.endpoint.host}{self.endpoint.http_path}"

    def connect(self) -> Any:
        if self.connection is not None:
            return self.connection
        from databricks import sql

        kwargs: dict[str, Any] = {
            "server_hostname": self.endpoint.host,
            "http_path": self.endpoint.http_path,
            # Bounded retries: a dead network must fail a cycle in minutes, not the
            # connector's default 15; the run loop then backs off and tries again.
            "_retry_stop_after_attempts_duration": self.settings.databricks_retry_timeout,
            "_retry_stop_after_attempts_count": 30,
            "_retry_delay_min": 1.0,
            "_retry_delay_max": 10.0,
            "_socket_timeout": max(30.0, self.settings.databricks_retry_timeout),
            **self.auth,
        }
        if self.endpoint.port and not self.endpoint.plain_http:
            kwargs["_port"] = self.endpoint.port
        if self.endpoint.plain_http:
            kwargs["_connection_uri"] = self.endpoint.connection_uri()
        if self.endpoint.local:
            kwargs["enable_telemetry"] = False  # its side calls to a local address only time out
        try:
            self.connection = sql.connect(**kwargs)
        except Exception as exc:
            error = self.classify(exc, "connecting")
            if isinstance(error, TransientError) and not self.endpoint.plain_http:
                # The connector retries TLS failures like network ones and then reports only
                # that it ran out of time; ask the endpoint directly whether its certificate is the cause.
                problem = certificate_problem(self.endpoint.host, self.endpoint.port or 443)
                if problem:
                    error = UploaderError(
                        f"The TLS certificate of {self.endpoint.host} could not be verified ({problem}). "
                        "Verification is never turned off. If a proxy re-signs TLS traffic or the workspace "
                        "uses a private CA, point SSL_CERT_FILE at a PEM bundle that includes that CA.")
            raise error from None
        LOG.debug("Connected to %s with %s", self.endpoint.host, connector_version())
        return self.connection

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _native_parameters(self) -> bool:
        """Native query parameters need a server protocol of Databricks Runtime 14.2 or later; SQL
        warehouses have it, older all-purpose clusters do not (they would ignore the values)."""
        connection = self.connection
        version = getattr(connection, "protocol_version", None)
        supported = getattr(connection, "server_parameterized_queries_enabled", None)
        native = bool(supported(version)) if callable(supported) and version is not None else True
        if not native and not self.inline_told:
            self.inline_told = True
            LOG.info("The cluster's runtime predates native query parameters (Databricks Runtime 14.2, protocol "
                     "version %s): the uploader sends its few values as SQL literals instead.", version)
        return native

    def classify(self, exc: Exception, doing: str) -> UploaderError:
        """Turn connector and transport errors into the uploader's two kinds, with a clear message."""
        text = mask_secrets(str(exc) or type(exc).__name__, self.settings)
        lowered = text.lower()
        if isinstance(exc, UploaderError):
            return exc
        status = http_status(exc)
        if status in (401, 403) or (status is None and AUTH_FAILURE.search(text)):
            return UploaderError(f"Databricks refused the credentials while {doing} ({text}). Check the token "
                                 "or service principal and its grants (see README, Security).")
        if "max retry duration" in lowered or "retry request would exceed" in lowered:
            return TransientError(
                f"Databricks at {self.endpoint.host} gave no successful answer within databricks_retry_timeout "
                f"({self.settings.databricks_retry_timeout:g} s) while {doing}: the SQL warehouse is starting "
                "(HTTP 503), throttling (429) or unreachable. Retrying with backoff.")
        if "invalid sessionhandle" in lowered:
            return TransientError(f"The SQL warehouse lost this session while {doing} (restarted?); "
                                  "reconnecting.")
        if status in (429, 503) or (status is None and UNAVAILABLE.search(text)):
            return TransientError(f"The SQL warehouse is starting or unavailable (HTTP 503) while {doing}; "
                                  "waiting and retrying.")
        from databricks.sql import exc as dbx_exc

        if "INVALID_SCHEMA_OR_RELATION_NAME" in text or "INVALID_IDENTIFIER" in text:
            return ConfigError(f"Databricks does not accept a name while {doing} ({text}). Set databricks_table "
                               "/ databricks_database to names it accepts (letters, digits, underscores).")
        if isinstance(exc, dbx_exc.ServerOperationError):
            for error_class, advice in PERMANENT_DATA_ERRORS.items():
                if error_class in text and doing != QUERY_DOING:  # a user's --run-query is no batch
                    return ConfigError(f"Databricks refused the data while {doing}: {advice}. Retrying the same "
                                       f"rows cannot help; fix this, then run again. ({text.strip()})")
            return UploaderError(f"Databricks rejected a statement while {doing}: {text}")
        return TransientError(f"Cannot reach Databricks at {self.endpoint.host} while {doing}: {text}")

    def execute(self, statement: str, parameters: Any = None, fetch: bool = False,
                input_stream: Any = None, doing: str = "running a statement") -> list:
        """One statement on the shared connection; returns its rows when `fetch`. A statement that
        lost a Delta write conflict committed nothing: it runs again, a bounded number of times."""

        def run(cursor: Any) -> list:
            if input_stream is not None:
                input_stream.seek(0)
                cursor.execute(statement, input_stream=input_stream)
            elif parameters and not self._native_parameters():
                cursor.execute(inline_parameters(statement, parameters))
            else:
                cursor.execute(statement, parameters)
            return cursor.fetchall() if fetch else []

        for attempt in itertools.count(1):
            self.statements += 1
            try:
                return self._with_cursor(run, doing)
            except WriteConflict as exc:
                if attempt >= CONFLICT_ATTEMPTS:
                    raise TransientError(f"{exc} It still conflicted after {attempt} attempts: other writers keep "
                                         "changing the table; the batch is tried again later.") from None
                delay = conflict_delay(attempt)
                LOG.info("Write conflict while %s (another writer committed first); running it again in %.1f s "
                         "(attempt %d of %d).", doing, delay, attempt + 1, CONFLICT_ATTEMPTS)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def execute_arrow(self, statement: str) -> Any:
        """A query's whole result as an Arrow table (a statement without one gives 'OK')."""
        import pyarrow as pa

        def run(cursor: Any) -> Any:
            cursor.execute(statement)
            return pa.table({"result": ["OK"]}) if cursor.description is None else cursor.fetchall_arrow()

        return self._with_cursor(run, QUERY_DOING)

    def _with_cursor(self, work: Callable[[Any], Any], doing: str) -> Any:
        """Run `work` on a cursor of the shared connection; transport failures drop it for a reconnect."""
        connection = self.connect()
        storage: StagingStorageError | None = None
        try:
            with connection.cursor() as cursor:
                try:
                    return work(cursor)
                except Exception as exc:
                    # Looked at before the cursor closes, which forgets the statement's answer.
                    storage = staging_storage_failure(cursor, exc, doing)
                    raise
        except Exception as exc:
            if write_conflict(exc):  # the session is fine; only this statement's commit was refused
                raise WriteConflict(str(self.classify(exc, doing))) from None
            if storage is not None:  # the workspace answered: its session is fine
                raise storage from None
            # Any failure drops the connection: after a warehouse restart the first error may be
            # an internal one, and the old session would fail every later statement.
            self.close()
            raise self.classify(exc, doing) from None

    def current_catalog(self) -> str:
        rows = self.execute("SELECT current_catalog()", fetch=True, doing="finding the current catalog")
        return str(rows[0][0])

    def create(self, statement: str, what: str, grant: str) -> None:
        """Create a missing object; without the privilege, say what an admin has to do."""
        try:
            self.execute(statement, doing=f"creating {what}")
        except UploaderError as exc:
            raise permission_denied(exc, what, grant, statement) from None


def permission_denied(exc: UploaderError, what: str, grant: str, statement: str | None = None) -> UploaderError:
    """A refused CREATE as one message naming the object, the privilege and the fix; other errors as they are."""
    if isinstance(exc, TransientError) or "PERMISSION_DENIED" not in str(exc):
        return exc
    said = re.search(r"PERMISSION_DENIED\]?:?\s*([^.\n]*)", str(exc))
    fix = f"Have an admin run `{statement}`" if statement else "Have an admin create it (README: Tables and types)"
    return ConfigError(f"{what[0].upper()}{what[1:]} does not exist, and these credentials may not create it "
                       f"(Databricks: {said.group(1) if said else 'PERMISSION_DENIED'}). {fix}, or grant "
                       f"`{grant} TO <this principal>` (README: Databricks privileges).")


class DatabricksTable:
    """The target table's names and columns: looked at before anything is created, created from the
    first batch's schema, widened by new source columns, and checked against each batch's types."""

    def __init__(self, session: DatabricksSession, settings: Settings, table_name: str):
        self.session = session
        self.settings = settings
        self.catalog = settings.databricks_catalog
        self.schema_name = settings.databricks_database or "default"
        self.table_name = table_name
        self.columns: dict[str, str] | None = None  # target column -> Databricks type, once looked at
        if table_name.lower() == PROGRESS_TABLE:
            raise ConfigError(f"The target table cannot be named {PROGRESS_TABLE}: the uploader keeps its progress "
                              "records there. Set databricks_table to another name.")

    def qualified(self, name: str) -> str:
        parts = [self.catalog, self.schema_name, name] if self.catalog else [self.schema_name, name]
        return ".".join(quote_db_ident(p) for p in parts)

    @property
    def full_name(self) -> str:
        return self.qualified(self.table_name)

    @property
    def schema_ref(self) -> str:
        return (f"{quote_db_ident(self.catalog)}.{quote_db_ident(self.schema_name)}"
                if self.catalog else quote_db_ident(self.schema_name))

    def describe_columns(self, name: str) -> dict[str, str] | None:
        """Column -> type of an existing table, None when it does not exist."""
        try:
            rows = self.session.execute(f"DESCRIBE TABLE {self.qualified(name)}", fetch=True,
                                        doing=f"describing {name}")
        except UploaderError as exc:
            text = str(exc)
            if "TABLE_OR_VIEW_NOT_FOUND" in text or "not found" in text.lower() or "SCHEMA_NOT_FOUND" in text:
                return None
            raise
        columns: dict[str, str] = {}
        for row in rows:
            column, data_type = row[0], row[1]
            if not data_type:
                break  # an empty line, then partition / detail sections
            columns[column] = data_type
        return columns

    def ensure_schema(self) -> None:
        """The schema, created only when missing: Unity Catalog checks the CREATE privilege even for
        CREATE ... IF NOT EXISTS of an existing object, and a least-privilege principal has none."""
        if self._schema_exists():
            return
        catalog = quote_db_ident(self.catalog or self.session.current_catalog())
        self.session.create(f"CREATE SCHEMA IF NOT EXISTS {self.schema_ref}", f"the schema {self.schema_ref}",
                            f"CREATE SCHEMA ON CATALOG {catalog}")

    def _schema_exists(self) -> bool:
        try:
            self.session.execute(f"DESCRIBE SCHEMA {self.schema_ref}", fetch=True, doing="looking for the schema")
        except UploaderError as exc:
            if "SCHEMA_NOT_FOUND" in str(exc) or "NO_SUCH_CATALOG" in str(exc):
                return False
            raise
        return True

    def conform(self, wanted: Any) -> Any:
        """Create the table or add missing columns for `wanted` (an Arrow schema); return the schema
        batches must be cast to: the table's spelling of each name and its types."""
        import pyarrow as pa

        if self.columns is None:
            self.columns = self.describe_columns(self.table_name)
            if self.columns is None:
                try:
                    self._create_table(wanted)
                except UploaderError as exc:
                    raise permission_denied(exc, f"the table {self.full_name}",
                                            f"CREATE TABLE ON SCHEMA {self.schema_ref}") from None
        existing = {name.lower(): (name, kind) for name, kind in self.columns.items()}
        fields, missing, clashes = [], [], []
        for source_field in wanted:
            match = existing.get(source_field.name.lower())
            if match is None:
                missing.append(source_field)
                fields.append(source_field)
                continue
            target_type = arrow_type_for_databricks(match[1])
            if not compatible(source_field.type, target_type):
                clashes.append(f"{source_field.name} ({databricks_type(source_field.type)} in the source, "
                               f"{match[1]} in {self.full_name})")
            fields.append(pa.field(match[0], target_type or source_field.type))
        if clashes:
            raise ConfigError("Source and target columns do not match: " + "; ".join(clashes) +
                              ". Change the target column types, or load into another table.")
        if missing:
            self._check_new_column_names(missing)
            self._add_columns(missing)
        return pa.schema(fields)

    def _check_new_column_names(self, fields: list) -> None:
        """Names Delta refuses without column mapping, for a table made without it: say so before
        the ALTER fails, and how to fix it. Turning mapping on is the owner's choice: it cannot be undone."""
        invalid = [f.name for f in fields if DELTA_INVALID_NAME_CHARS.search(f.name)]
        if not invalid or self._uses_column_mapping():
            return
        raise ConfigError(
            f"Source column(s) {', '.join(map(repr, invalid))} hold a space or one of , ; {{ }} ( ) = (or a tab or "
            f"newline), which Delta accepts in column names only with column mapping, and {self.full_name} does not "
            f"use it. Either enable it once: ALTER TABLE {self.full_name} SET TBLPROPERTIES "
            f"('{COLUMN_MAPPING_MODE}' = 'name') (it cannot be turned off; readers need Databricks Runtime 10.4+), "
            "or rename the column in SQLite. Then run again.")

    def _uses_column_mapping(self) -> bool:
        rows = self.session.execute(f"SHOW TBLPROPERTIES {self.full_name}", fetch=True,
                                    doing="reading the table properties")
        return any(str(row[0]) == COLUMN_MAPPING_MODE and str(row[1]).lower() in ("name", "id") for row in rows)

    def _create_table(self, schema: Any) -> None:
        if not self.settings.create_table:
            raise ConfigError(f"Table {self.full_name} does not exist and create_table is off. Create it "
                              "(README: Databricks table setup) or set create_table: true.")
        columns = ", ".join(f"{quote_db_ident(f.name)} {databricks_type(f.type)}" for f in schema)
        mapped = [f.name for f in schema if DELTA_INVALID_NAME_CHARS.search(f.name)]
        # Delta takes a space or one of ,;{}()= in a column name only with column mapping;
        # setting the mode upgrades the table's protocol (readers need Databricks Runtime 10.4+).
        properties = f" TBLPROPERTIES ('{COLUMN_MAPPING_MODE}' = 'name')" if mapped else ""
        self.session.execute(f"CREATE TABLE IF NOT EXISTS {self.full_name} ({columns}){properties}",
                             doing="creating the table")
        LOG.info("Created table %s (%s)%s.", self.full_name, columns,
                 f" with column mapping, for the column name(s) {', '.join(map(repr, mapped))}" if mapped else "")
        self.columns = {f.name: databricks_type(f.type) for f in schema}

    def _add_columns(self, fields: list) -> None:
        assert self.columns is not None
        if not self.settings.create_table:
            raise ConfigError(f"Source column(s) {', '.join(f.name for f in fields)} are not in "
                              f"{self.full_name} and create_table is off: add them to the table.")
        columns = ", ".join(f"{quote_db_ident(f.name)} {databricks_type(f.type)}" for f in fields)
        try:
            self.session.execute(f"ALTER TABLE {self.full_name} ADD COLUMNS ({columns})", doing="adding columns")
        except UploaderError as exc:
            # A re-sent ALTER (answer lost, connector retried) or another node was first: the
            # columns are there now. Anything else: look at the table afresh next time.
            self.columns = None
            if not already_exists(exc):
                raise
            self.columns = self.describe_columns(self.table_name)
            if self.columns is None or any(f.name.lower() not in {c.lower() for c in self.columns} for f in fields):
                raise
            return
        LOG.info("Added column(s) %s to %s.", columns, self.full_name)
        self.columns.update({f.name: databricks_type(f.type) for f in fields})

    def info(self) -> list[tuple[str, str]]:
        """Row count, columns and rows per node, for --run-query INFO."""
        columns = self.describe_columns(self.table_name)
        if columns is None:
            return [("status", "table does not exist yet: nothing uploaded")]
        count = self.session.execute(f"SELECT count(*) FROM {self.full_name}", fetch=True,
                                     doing="counting rows")[0][0]
        lines = [("rows", str(count))] + [("column " + name, kind) for name, kind in columns.items()]
        lower = {c.lower() for c in columns}
        if "_node_id" in lower:
            last = "max(`_uploaded_at`)" if "_uploaded_at" in lower else "NULL"
            for node, rows_per_node, last_upload in self.session.execute(
                    f"SELECT `_node_id`, count(*), {last} FROM {self.full_name} GROUP BY `_node_id` ORDER BY 1",
                    fetch=True, doing="counting rows per node"):
                lines.append((f"node {node}", f"{rows_per_node} rows, last upload {last_upload}"))
        return lines


class ProgressTable:
    """The uploaders' progress records (one row per batch, written before the batch's rows): what a
    restart must replay, and how. One table per schema, shared by every node and target table."""

    def __init__(self, session: DatabricksSession, table: DatabricksTable, node_id: str):
        self.session = session
        self.table = table
        self.node_id = node_id
        self.name = table.qualified(PROGRESS_TABLE)
        self.exists = False
        self.records_files = True  # the progress table has its staged_file column

    def ensure(self, create: bool) -> None:
        columns = self.table.describe_columns(PROGRESS_TABLE)
        if columns is None and create:
            self.table.ensure_schema()
            self.session.create(
                f"CREATE TABLE IF NOT EXISTS {self.name} (app_id STRING, seq BIGINT, node_id STRING, watermark "
                "STRING, before STRING, last_loc STRING, row_count BIGINT, recorded_at TIMESTAMP, load_method "
                "STRING, staged_file STRING)",
                f"the progress table {self.name}", f"CREATE TABLE ON SCHEMA {self.table.schema_ref}")
            columns = self.table.describe_columns(PROGRESS_TABLE)
        if columns is None:
            raise ConfigError(f"The progress table {self.name} does not exist and create_table is off. Create it "
                              "(see README) or allow create_table.")
        self.exists = True
        self._ensure_staged_file_column(columns, create)

    def _ensure_staged_file_column(self, columns: dict[str, str], create: bool) -> None:
        """Progress tables made before staged files were named per attempt lack the column."""
        if "staged_file" in {c.lower() for c in columns}:
            return
        if not create:
            self.records_files = False
            LOG.warning("The progress table %s has no staged_file column and create_table is off: staged files are "
                        "named by batch number alone, and a batch number used again after a reset would be skipped "
                        "by COPY INTO. Add it: ALTER TABLE %s ADD COLUMNS (staged_file STRING).",
                        self.name, self.name)
            return
        try:
            self.session.execute(f"ALTER TABLE {self.name} ADD COLUMNS (staged_file STRING)",
                                 doing="adding staged_file to the progress table")
        except UploaderError as exc:  # another node was first, or a re-sent ALTER
            if not already_exists(exc):
                raise

    def last(self, app_id: str) -> CommitRecord | None:
        """This uploader's last recorded batch (its rows may or may not have landed)."""
        if not self.exists and self.table.describe_columns(PROGRESS_TABLE) is None:
            return None
        staged = "staged_file" if self.records_files else "NULL"
        rows = self.session.execute(
            f"SELECT seq, watermark, before, last_loc, load_method, {staged} FROM {self.name} "
            "WHERE app_id = :app ORDER BY seq DESC, CASE WHEN load_method = 'insert' THEN 0 ELSE 1 END LIMIT 1",
            {"app": app_id}, fetch=True, doing="reading the progress table")
        if not rows:
            return None
        seq, watermark, before, last_loc, method, staged_file = rows[0]
        return CommitRecord(int(seq), Watermark.from_json(json.loads(watermark)), complete=False,
                            before=Watermark.from_json(json.loads(before)),
                            last_loc=json_restore(json.loads(last_loc)), method=method, staged_file=staged_file)

    def record(self, batch: Batch, method: str, staged_file: str | None = None) -> None:
        """The batch's record, written before its rows: what a restart must replay, and how.

        Written only while no record of this app id has this batch number or a later one (a
        replay: a later one). Another process that took the number first -- a second uploader
        with another state_dir -- stops this one before it loads anything. The INSERT reads the
        table it appends to, so two racing records conflict in Delta and one runs again and finds
        the other."""
        staged = (", staged_file", ", :staged") if self.records_files else ("", "")
        values = {"app": batch.app_id, "seq": batch.seq, "node": self.node_id,
                  "mark": json.dumps(batch.watermark.to_json()), "before": json.dumps(batch.before.to_json()),
                  "last": json.dumps(json_safe(batch.last_loc)), "rows": batch.rows.num_rows, "method": method,
                  **({"staged": staged_file} if self.records_files else {})}
        taken = ">" if batch.replay_method is not None else ">="
        result = self.session.execute(
            f"INSERT INTO {self.name} (app_id, seq, node_id, watermark, before, last_loc, row_count, recorded_at, "
            f"load_method{staged[0]}) SELECT :app, :seq, :node, :mark, :before, :last, :rows, current_timestamp(), "
            f":method{staged[1]} WHERE NOT EXISTS (SELECT 1 FROM {self.name} WHERE app_id = :app AND seq {taken} "
            ":seq)", values, fetch=True, doing=f"recording batch {batch.seq}")
        if copy_inserted_rows(result) != 1 and not self._recorded(values):
            raise AnotherWriter(another_writer_message(batch, self.table.full_name))

    def _recorded(self, values: dict) -> bool:
        """Whether this very record is there: the connector re-sent the INSERT after its answer was
        lost and the first one had written it, or the server does not say how many rows it inserted."""
        staged = " AND staged_file <=> :staged" if self.records_files else ""
        rows = self.session.execute(
            f"SELECT count(*) FROM {self.name} WHERE app_id = :app AND seq = :seq AND node_id = :node AND "
            f"watermark = :mark AND before = :before AND last_loc = :last AND load_method = :method{staged}",
            {k: v for k, v in values.items() if k != "rows"}, fetch=True,
            doing=f"checking the record of batch {values['seq']}")
        return bool(rows and rows[0][0])

    def info(self, app_id: str | None) -> list[tuple[str, str]]:
        if self.table.describe_columns(PROGRESS_TABLE) is None:
            return []
        where, params = ("WHERE app_id = :app", {"app": app_id}) if app_id else ("", None)
        rows = self.session.execute(
            f"SELECT app_id, seq, node_id, watermark, recorded_at FROM {self.name} {where} "
            "ORDER BY recorded_at DESC, seq DESC LIMIT 1", params, fetch=True, doing="reading the progress table")
        if not rows:
            return []
        app, seq, node, mark_json, recorded = rows[0]
        mark = Watermark.from_json(json.loads(mark_json))
        return [("last batch", f"{seq} from node {node} at {recorded} (app {app})"),
                ("last uploaded timestamp", micros_to_iso(mark.last_upload) or "-"),
                ("cursor", json.dumps(mark.to_json()))]


class CopyLoad:
    """The bulk path, 4 statements per batch whatever its size: the record; PUT the batch as
    Parquet into the staging volume; COPY INTO from that one file; REMOVE it. COPY INTO never
    loads a file name twice into a table, and the record names the file before the PUT, so a
    replay -- after a crash, or a statement re-sent after a lost answer -- loads nothing twice."""

    def __init__(self, session: DatabricksSession, table: DatabricksTable, progress: ProgressTable):
        self.session = session
        self.table = table
        self.progress = progress
        self.volume: tuple[str, str, str, str] | None = None

    def choose_volume(self, setting: str) -> str | None:
        """The staging volume to use, or None (with the reason logged) for INSERT statements."""
        session, table = self.session, self.table
        if setting.lower() == "auto":
            catalog = table.catalog or session.current_catalog()
            if catalog.lower() in NO_VOLUME_CATALOGS:
                LOG.info("The catalog %s cannot hold volumes (they exist only in Unity Catalog): loading with "
                         "INSERT statements.", catalog)
                return None
            self.volume = (catalog, table.schema_name, "sqlite_uploader_staging", "")
            if not volume_path_is_safe(self.volume):
                LOG.warning("The schema or catalog name holds a quote, backslash or control character, which "
                            "a staging path cannot carry safely; loading with INSERT statements instead.")
                return None
        else:
            self.volume = parse_volume(setting)
            if self.volume[0].lower() in NO_VOLUME_CATALOGS:
                raise ConfigError(f"staging_volume {setting} is in the catalog {self.volume[0]}, which cannot hold "
                                  "volumes (they exist only in Unity Catalog). Name a volume in a Unity Catalog "
                                  "catalog, or set staging_volume to none (or auto) to load with INSERT statements.")
        return ".".join(quote_db_ident(p) for p in self.volume[:3])

    def probe(self, name: str, create: bool) -> None:
        """Create the volume if missing and allowed, then write and remove a file in it."""
        assert self.volume is not None
        catalog, schema, volume, _ = self.volume
        if create and not self._volume_exists(catalog, schema, volume):
            self.session.create(f"CREATE VOLUME IF NOT EXISTS {name}", f"the staging volume {name}",
                                f"CREATE VOLUME ON SCHEMA {quote_db_ident(catalog)}.{quote_db_ident(schema)}")
        probe = f"{self.volume_dir(None)}/.probe-{uuid.uuid4().hex}"  # pids repeat across containers
        self.session.execute(f"PUT '__input_stream__' INTO '{probe}' OVERWRITE", input_stream=io.BytesIO(b"ok"),
                             doing="writing to the staging volume")
        self.session.execute(f"REMOVE '{probe}'", doing="cleaning the staging volume")

    def _volume_exists(self, catalog: str, schema: str, volume: str) -> bool:
        rows = self.session.execute(f"SHOW VOLUMES IN {quote_db_ident(catalog)}.{quote_db_ident(schema)}",
                                    fetch=True, doing="looking for the staging volume")
        names = {str(row.asDict().get("volume_name", row[-1]) if hasattr(row, "asDict") else row[-1]).lower()
                 for row in rows}
        return volume.lower() in names

    def volume_dir(self, app_id: str | None) -> str:
        assert self.volume is not None
        catalog, schema, volume, directory = self.volume
        base = f"/Volumes/{catalog}/{schema}/{volume}" + (f"/{directory}" if directory else "")
        return base if app_id is None else f"{base}/{safe_file_part(app_id)}"

    def write(self, batch: Batch, rows: Any) -> None:
        buffer = parquet_stream(rows)
        directory = self.volume_dir(batch.app_id)
        # COPY INTO skips a file name it loaded before, even with other content, and its load
        # history outlives TRUNCATE and DELETE: a name is never used for two attempts. The
        # record names the file first, so a replay stages the same rows under the same name.
        if batch.replay_method is not None:
            file_name = batch.staged_file or f"batch-{batch.seq:012d}.parquet"  # records from before names
        elif self.progress.records_files:
            file_name = f"batch-{batch.seq:012d}-{uuid.uuid4().hex[:16]}.parquet"
        else:
            file_name = f"batch-{batch.seq:012d}.parquet"
        self.progress.record(batch, "copy", file_name)
        self.session.execute(f"PUT '__input_stream__' INTO '{directory}/{file_name}' OVERWRITE",
                             input_stream=buffer, doing=f"staging batch {batch.seq}")
        result = self.session.execute(copy_into_statement(self.table.full_name, directory, [file_name]),
                                      fetch=True, doing=f"loading batch {batch.seq}")
        LOG.debug("COPY INTO batch %d: %s", batch.seq, result)
        self._check_copied(batch, rows.num_rows, result, f"{directory}/{file_name}")
        try:
            self.session.execute(f"REMOVE '{directory}/{file_name}'", doing=f"removing staged batch {batch.seq}")
        except StagingStorageError as exc:  # the rows are in; a file left behind costs only space
            LOG.warning("%s Batch %d is loaded; its staged file %s/%s stays in the volume.", exc, batch.seq,
                        directory, file_name)

    @staticmethod
    def _check_copied(batch: Batch, expected: int, result: list, path: str) -> None:
        """COPY INTO loads all of the file or nothing: nothing when it loaded it before (a replay, or
        a statement the connector sent again after a lost answer). Anything else is not exactly-once."""
        inserted = copy_inserted_rows(result)
        if inserted is None or inserted == expected:
            return
        if inserted == 0:
            LOG.info("Batch %d was already loaded (%s); COPY INTO skipped it.",
                     batch.seq, "a replay" if batch.replay_method else "the statement was sent again")
            return
        raise ConfigError(f"COPY INTO loaded {inserted} of the {expected} rows of batch {batch.seq} from {path}: the "
                          "table or its load history does not match what the uploader staged (was the file changed, "
                          "or the table altered while loading?). Nothing more is loaded; check the table's rows of "
                          "this batch, then run again.")


class InsertLoad:
    """The fallback without a usable volume: the record, then multi-row INSERTs of literal values,
    each guarded by NOT EXISTS on its own _batch_id value, so a re-sent INSERT inserts nothing."""

    def __init__(self, session: DatabricksSession, table: DatabricksTable, progress: ProgressTable):
        self.session = session
        self.table = table
        self.progress = progress

    def write(self, batch: Batch, rows: Any) -> None:
        try:
            chunks = list(literal_chunks(rows, MAX_STATEMENT_BYTES, MAX_ROW_STATEMENT_BYTES))
        except RowTooLarge as exc:
            # Checked before the batch is recorded: nothing of it is loaded, and a staging volume
            # can still take it as Parquet on the next run.
            raise ConfigError(f"Row {exc.index + 1} of batch {batch.seq} ({exc.names}) needs {exc.size:,} bytes "
                              f"as SQL text, more than a Databricks statement can carry ({MAX_ROW_STATEMENT_BYTES:,}). "
                              "Nothing of this batch was loaded. Load through a staging volume (staging_volume: "
                              "auto or a /Volumes path, with READ VOLUME and WRITE VOLUME), which takes rows of "
                              "any size as Parquet.") from None
        self.progress.record(batch, "insert")
        names = [f.name for f in rows.schema]
        guard = "_batch_id"
        full_name = self.table.full_name
        column_list = ", ".join(quote_db_ident(n) for n in names)
        aliases = ", ".join(f"c{i}" for i in range(len(names)))
        batch_index = names.index(guard)
        for part, chunk in enumerate(chunks):
            part_id = f"{batch.app_id}:{batch.seq}.{part}"
            values = ", ".join("(" + ", ".join(
                sql_literal(part_id) if i == batch_index else literal for i, literal in enumerate(row)) + ")"
                for row in chunk)
            self.session.execute(
                f"INSERT INTO {full_name} ({column_list}) SELECT * FROM VALUES {values} AS v({aliases}) "
                f"WHERE NOT EXISTS (SELECT 1 FROM {full_name} WHERE {quote_db_ident(guard)} = "
                f"{sql_literal(part_id)})", doing=f"inserting batch {batch.seq} part {part}")

    def landed(self, batch: Batch) -> bool:
        """Whether any row of the batch is in the table (a COPY INTO is all or nothing)."""
        rows = self.session.execute(
            f"SELECT count(*) FROM {self.table.full_name} WHERE `_batch_id` = :batch",
            {"batch": f"{batch.app_id}:{batch.seq}"}, fetch=True, doing=f"checking batch {batch.seq}")
        return bool(rows and rows[0][0])


class DatabricksTarget:
    """A Databricks table loaded through databricks-sql-connector: the session, the table, the
    progress records and the two load paths (CopyLoad through a staging volume, InsertLoad
    without one), chosen once per run behind the one Target interface."""

    kind = "databricks"

    def __init__(self, settings: Settings, table_name: str):
        self.settings = settings
        self.node_id = settings.node_id
        self.lineage = [LINEAGE_CHOICES[c] for c in settings.lineage_columns]
        self.session = DatabricksSession(settings)
        self.table = DatabricksTable(self.session, settings, table_name)
        self.progress = ProgressTable(self.session, self.table, settings.node_id)
        self.copy = CopyLoad(self.session, self.table, self.progress)
        self.insert = InsertLoad(self.session, self.table, self.progress)
        self.arrow_schema: Any = None
        self.method: str | None = None  # "copy" or "insert", decided once per run
        self.storage_failed = False  # staging's cloud-storage leg failed: INSERT until the process restarts

    @property
    def full_name(self) -> str:
        return self.table.full_name

    def describe(self) -> str:
        table = self.table
        return f"databricks:{self.session.describe()}#" + ".".join(
            p for p in (table.catalog, table.schema_name, table.table_name) if p)

    def prepare(self, schema: Any) -> Any:
        """Create or check the table once per run; return the schema batches must have."""
        import pyarrow as pa

        clashing = sorted(f.name for f in schema if f.name.lower() in {c.lower() for c in self.lineage})
        if clashing:
            raise ConfigError(f"Source column(s) {', '.join(clashing)} have the name of a lineage column; leave "
                              "that lineage column out of lineage_columns, or rename the source column.")
        if self.method is None:
            self.progress.ensure(self.settings.create_table)
            self.method = self._choose_method()
            if self.method == "insert" and "_batch_id" not in self.lineage:
                raise ConfigError("Loading with INSERT statements needs the _batch_id lineage column to stay "
                                  "exactly-once: add batch_id to lineage_columns (LINEAGE_COLUMNS=batch_id), or "
                                  "give the uploader a usable staging volume.")
        self.arrow_schema = self.table.conform(pa.schema(list(schema) + [lineage_field(c) for c in self.lineage]))
        return self.arrow_schema

    def _choose_method(self) -> str:
        setting = (self.settings.staging_volume or "auto").strip()
        if setting.lower() == "none":
            LOG.info("Loading with INSERT statements (staging_volume: none).")
            return "insert"
        if self.storage_failed:
            return "insert"  # cloud storage failed earlier in this process: not tried again until a restart
        name = self.copy.choose_volume(setting)
        if name is None:
            return "insert"
        try:
            self.copy.probe(name, self.settings.create_table)
        except StagingStorageError as exc:
            self._storage_fallback(exc)
            return "insert"
        except TransientError:
            raise
        except UploaderError as exc:
            LOG.warning("The staging volume %s cannot be used (%s); loading with INSERT statements instead, "
                        "which is slower. Grant READ VOLUME and WRITE VOLUME (see README).", name, exc)
            return "insert"
        LOG.info("Loading through the staging volume %s with COPY INTO.", self.copy.volume_dir(None))
        return "copy"

    def _storage_fallback(self, exc: StagingStorageError) -> None:
        """Cloud storage cannot be used: go on with INSERT statements when that path is exactly-once
        (it needs _batch_id) and retrying will not help; otherwise stop with the storage's message."""
        if not exc.lasting:
            raise exc
        if "_batch_id" not in self.lineage:
            error = ConfigError if exc.permanent else TransientError
            raise error(f"{exc} Loading with INSERT statements instead would need the batch_id lineage column "
                        "(lineage_columns: batch_id).")
        self.storage_failed = True
        self.method = "insert"
        LOG.warning("%s Loading with INSERT statements instead until the uploader restarts (slower, still exactly "
                    "once); restart it once the storage can be reached to go back to COPY INTO.", exc)

    def committed(self, app_id: str) -> CommitRecord | None:
        return self.progress.last(app_id)

    def write(self, batch: Batch) -> None:
        rows = cast_to_table(with_lineage(batch, self.lineage, self.node_id), self.arrow_schema)
        method = self.method
        if batch.replay_method == "insert":
            # Some of its INSERT parts may have landed: only the same parts, with the same
            # guards, can finish it without duplicates.
            method = "insert"
        elif batch.replay_method == "copy" and method == "insert" and self.insert.landed(batch):
            return  # begun as a COPY INTO (all or nothing), and it landed
        if method == "insert" and "_batch_id" not in self.lineage:
            raise ConfigError(f"Batch {batch.seq} was begun with INSERT statements; finishing it needs the "
                              "_batch_id lineage column (lineage_columns: batch_id).")
        if method != "copy":
            self.insert.write(batch, rows)
            return
        try:
            self.copy.write(batch, rows)
            return
        except StagingStorageError as exc:
            self._storage_fallback(exc)  # raises unless INSERT statements can take over
        # Its record says COPY, and an earlier attempt may have loaded it: finish it as the replay
        # of a COPY batch, which looks first.
        self.write(dataclasses.replace(batch, replay_method="copy"))

    # -- query mode ----------------------------------------------------------------------
    def run_query(self, sql: str) -> Any:
        return self.session.execute_arrow(sql)

    def info(self, app_id: str | None) -> list[tuple[str, str]]:
        lines = [("target", "Databricks SQL"), ("table", self.full_name), ("endpoint", self.session.describe())]
        table_lines = self.table.info()
        if table_lines and table_lines[0][0] == "status":
            return lines + table_lines
        rows, columns = table_lines[:1], [line for line in table_lines[1:] if line[0].startswith("column ")]
        nodes = [line for line in table_lines[1:] if line[0].startswith("node ")]
        return lines + rows + columns + self.progress.info(app_id) + nodes

    def close(self) -> None:
        self.session.close()


def lineage_field(column: str) -> Any:
    import pyarrow as pa

    return pa.field(column, pa.timestamp("us", tz="UTC") if column == "_uploaded_at" else pa.string())


def with_lineage(batch: Batch, lineage: Sequence[str], node_id: str) -> Any:
    """The batch's rows with the chosen lineage columns appended."""
    import pyarrow as pa

    rows = batch.rows
    values = {"_node_id": node_id, "_batch_id": f"{batch.app_id}:{batch.seq}",
              "_uploaded_at": datetime.now(timezone.utc)}
    for column in lineage:
        rows = rows.append_column(column, pa.array([values[column]] * rows.num_rows, type=lineage_field(column).type))
    return rows


def cast_to_table(rows: Any, schema: Any) -> Any:
    """Rows with the table's spelling of each name (it may differ in case), then its types.
    Aggregated numbers for a DECIMAL column are rounded (and checked) as source values are."""
    import pyarrow as pa

    if schema is None:
        return rows
    rows = rows.rename_columns(schema.names)
    for index, wanted in enumerate(schema):
        if pa.types.is_decimal(wanted.type) and not pa.types.is_decimal(rows.schema.field(index).type):
            numbers = to_decimal_column(rows.column(index).to_pylist(), wanted.type, wanted.name, ConversionReport())
            rows = rows.set_column(index, wanted.name, numbers)
    return rows.cast(schema)


def parquet_stream(rows: Any, metadata: dict[bytes, bytes] | None = None) -> Any:
    """The rows as a Parquet file in memory, for a staging or landing upload."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    # Spark 3.x reads a Parquet date before 1582-10-15 (or such a timestamp) from a file that
    # does not name its Spark version as an error (datetimeRebaseModeInRead = EXCEPTION), or
    # (LEGACY) shifts it as if it were Julian. A file naming a Spark >= 3.0 writer, without the
    # org.apache.spark.legacyDateTime key, is read as written: proleptic Gregorian, as pyarrow writes.
    rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}), **SPARK_CALENDAR_METADATA,
                                         **(metadata or {})})
    pq.write_table(rows, buffer, compression="zstd")
    buffer.seek(0)
    return buffer


def copy_into_statement(table: str, directory: str, files: Sequence[str]) -> str:
    """COPY INTO of named files (relative to `directory`); new columns in them are added."""
    names = ", ".join(sql_literal(name) for name in files)
    return (f"COPY INTO {table} FROM '{directory}' FILEFORMAT = PARQUET FILES = ({names}) "
            "COPY_OPTIONS ('mergeSchema' = 'true')")


MAX_STATEMENT_BYTES = 900_000  # Databricks accepts statements up to 1 MB of text per parameter set
# A row larger than that budget goes alone in its statement, up to the maximum query text size
# Databricks documents (16 MiB), less room for the statement around the row.
MAX_ROW_STATEMENT_BYTES = 16 * 1024 * 1024 - 64 * 1024
NO_VOLUME_CATALOGS = ("hive_metastore",)  # the pre-Unity Catalog metastore: tables, but no volumes

# Column names Delta refuses unless the table uses column mapping (Parquet's special characters).
DELTA_INVALID_NAME_CHARS = re.compile(r"[ ,;{}()\n\t=]")
COLUMN_MAPPING_MODE = "delta.columnMapping.mode"
# Footer key-value metadata naming a Spark 3 writer: Spark then reads dates and timestamps as
# proleptic Gregorian, whatever its datetimeRebaseModeInRead (DataSourceUtils.datetimeRebaseSpec).
SPARK_CALENDAR_METADATA = {b"org.apache.spark.version": b"3.0.0"}

QUERY_DOING = "running the query"

# Statements Databricks refuses for what the data is, not for a passing condition: retrying the
# same batch fails the same way, and every batch behind it waits. Error class -> what to do.
PERMANENT_DATA_ERRORS = {
    "DELTA_INVALID_CHARACTERS_IN_COLUMN_NAME": "a column name holds a space or one of , ; { } ( ) =, which Delta "
    "accepts only with column mapping: ALTER TABLE ... SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name'), "
    "or rename the column in SQLite",
    "READ_ANCIENT_DATETIME": "the batch holds a date before 1582-10-15 that the warehouse will not read from "
    "Parquet; load with INSERT statements (staging_volume: none) or correct the date in SQLite",
    "DELTA_FAILED_TO_MERGE_FIELDS": "a batch column's type does not match the table's; change the table column's "
    "type or load into another table",
    "CAST_OVERFLOW_IN_TABLE_INSERT": "a value does not fit its column's type; widen the column or load into "
    "another table",
    "NUMERIC_VALUE_OUT_OF_RANGE": "a value does not fit its column's type; widen the column or load into "
    "another table",
}


# Error texts, when the connector gives no HTTP status: whole words only, since file names and
# request ids are full of digits ("batch-000000000401", a query id with 503 in it).
AUTH_FAILURE = re.compile(r"\b(?:HTTP|status|code|error)[ :=]*40[13]\b|\bunauthori[sz]ed\b|\bforbidden\b|"
                          r"invalid access token|PERMISSION_DENIED|UNAUTHENTICATED", re.IGNORECASE)
UNAVAILABLE = re.compile(r"\b(?:HTTP|status|code|error)[ :=]*(?:503|429)\b|temporarily[ _]unavailable|"
                         r"warehouse is starting|too many requests", re.IGNORECASE)


# Delta's optimistic concurrency: a statement whose commit conflicts with one committed while it ran
# (a concurrent append to a table it read, a concurrent metadata change such as ALTER TABLE ADD
# COLUMNS) fails whole with one of these error classes (SQLSTATE 2D521), and committed nothing.
WRITE_CONFLICT = re.compile(r"\[(?:DELTA_CONCURRENT_[A-Z_]+|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED)[\].]|"
                            r"\b(?:Concurrent(?:Append|DeleteRead|DeleteDelete|Transaction|Write)|MetadataChanged|"
                            r"ProtocolChanged)Exception\b")
CONFLICT_ATTEMPTS = 8  # runs of one statement; the backoff between them grows to 8 s (about 30 s in all)


class WriteConflict(TransientError):
    """A Delta write conflict: the statement committed nothing and may simply run again."""


def write_conflict(exc: Exception) -> bool:
    from databricks.sql import exc as dbx_exc

    return isinstance(exc, dbx_exc.DatabaseError) and bool(WRITE_CONFLICT.search(str(exc)))


def conflict_delay(attempt: int) -> float:
    """Exponential from 0.5 s, capped at 8 s, half of it random: writers that collided spread out."""
    cap = min(8.0, 0.5 * 2 ** (attempt - 1))
    return cap / 2 + random.uniform(0, cap / 2)


def already_exists(exc: Exception) -> bool:
    """An ALTER TABLE ADD COLUMNS that another node (or a re-sent statement) already made."""
    return "already exists" in str(exc).lower() or "ALREADY_EXISTS" in str(exc).upper()


def exception_chain(exc: BaseException, limit: int = 10) -> Iterator[BaseException]:
    """An error, then what caused it (raised from, or while handling), up to `limit` deep."""
    current: BaseException | None = exc
    for _ in range(limit):
        if current is None:
            return
        yield current
        current = current.__cause__ or current.__context__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request, from the connector's error context or the cause chain."""
    for current in exception_chain(exc, limit=8):
        context = getattr(current, "context", None)
        if isinstance(context, dict) and isinstance(context.get("http-code"), int):
            return context["http-code"]
        response = getattr(current, "response", None)
        if isinstance(getattr(response, "status", None), int):
            return response.status
    return None


def copy_inserted_rows(result: list) -> int | None:
    """num_inserted_rows of a COPY INTO or INSERT result (None when the answer does not say)."""
    if not result:
        return None
    row = result[0]
    values = row.asDict() if hasattr(row, "asDict") else {}
    value = values.get("num_inserted_rows")
    return int(value) if value is not None else None


class StagingStorageError(TransientError):
    """A staging transfer failed on its cloud-storage leg. PUT/GET/REMOVE of a volume file take two
    legs: the statement goes to the workspace, which answers with a presigned URL on the cloud
    provider's storage (S3, ADLS, GCS: another host), and the connector sends the file there itself.
    `lasting`: the failure outlasted the connector's retries (connection refused, DNS, timeout, TLS)
    or was refused outright (HTTP 4xx); `permanent`: only the user can fix it (TLS trust, HTTP 4xx)."""

    def __init__(self, message: str, where: str, lasting: bool, permanent: bool) -> None:
        super().__init__(message)
        self.where = where
        self.lasting = lasting
        self.permanent = permanent


def staging_storage_failure(cursor: Any, exc: Exception, doing: str) -> StagingStorageError | None:
    """The error of a statement whose workspace leg succeeded -- the cursor holds the warehouse's
    staging answer -- and whose transfer to cloud storage did not; None for anything else."""
    from databricks.sql import exc as dbx_exc

    answer = getattr(cursor, "active_result_set", None)
    if not getattr(answer, "is_staging_operation", False) or not isinstance(exc, dbx_exc.OperationalError):
        return None  # the workspace failed, or the connector refused before any transfer (ProgrammingError)
    where = storage_endpoint(exc)
    status = None if isinstance(exc, dbx_exc.RequestError) else staging_http_status(exc)
    if status is not None:  # the storage answered, with an error
        permanent = 400 <= status < 500 and status not in (408, 429)
        reason, advice = f"it answered HTTP {status}", ("A firewall or network rule on the storage account may refuse "
                                                        "this machine." if permanent else "Retrying.")
        lasting = permanent
    else:
        reason, permanent = transfer_failure_reason(exc)
        lasting = True  # the connector retried it for databricks_retry_timeout already
        advice = ("If a proxy re-signs TLS traffic, point SSL_CERT_FILE at a PEM bundle that includes its CA "
                  "(verification is never turned off)." if permanent else
                  f"Allow outbound HTTPS from this machine to {where} (firewall, egress rules, proxy).")
    return StagingStorageError(
        f"Cannot use cloud storage at {where} while {doing}: {reason}. The workspace answered; the staged file "
        f"goes to a presigned URL on the cloud provider's storage, another host this machine must reach. {advice}",
        where, lasting, permanent)


def storage_endpoint(exc: BaseException) -> str:
    """host:port of a failed staging transfer, never the whole URL (it carries a signature).

    The connector's error does not name the host (a TLS failure mentions none at all), so it is
    read from the presigned URL its staging handler was called with, else from urllib3's errors."""
    from urllib.parse import urlsplit

    traceback = exc.__traceback__
    while traceback is not None:
        url = traceback.tb_frame.f_locals.get("presigned_url")
        if isinstance(url, str):
            parts = urlsplit(url)
            if parts.hostname:
                default = 443 if parts.scheme == "https" else 80
                return f"{parts.hostname}:{parts.port or default}"
        traceback = traceback.tb_next
    for error in exception_chain(exc):
        connection = getattr(error, "conn", None)
        if isinstance(getattr(connection, "host", None), str):
            return f"{connection.host}:{connection.port}"
    return "its presigned URL"


def transfer_failure_reason(exc: BaseException) -> tuple[str, bool]:
    """What failed in a transfer that got no answer, from the standard exceptions urllib3 wraps;
    and whether only the user can fix it (an untrusted certificate)."""
    import ssl

    chain = list(exception_chain(exc))
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted ({error.verify_message or error})", True
    for error in chain:
        if isinstance(error, socket.gaierror):
            return "its host name does not resolve (DNS)", False
        if isinstance(error, ConnectionRefusedError):
            return "the connection was refused", False
        if isinstance(error, TimeoutError):
            return "the connection timed out", False
        if isinstance(error, ssl.SSLError):
            return f"the TLS handshake failed ({error})", False
    causes = [e for e in chain if isinstance(e, OSError)]
    return f"the transfer failed ({causes[-1] if causes else exc})", False


def staging_http_status(exc: BaseException) -> int | None:
    """The status in the connector's 'Staging operation over HTTP was unsuccessful: 403-...' error."""
    match = re.search(r"unsuccessful: (\d{3})-", str(exc))
    return int(match.group(1)) if match else None


def safe_file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def inline_parameters(statement: str, parameters: dict[str, Any]) -> str:
    """`:name` markers replaced by SQL literals, for servers without native parameters. The
    uploader's own statements carry no string that could hold a marker."""
    for name in sorted(parameters, key=len, reverse=True):
        statement = re.sub(rf":{re.escape(name)}\b", lambda _m, n=name: sql_literal(parameters[n]), statement)
    return statement


class RowTooLarge(ValueError):
    """One row whose literals alone exceed the statement budget."""

    def __init__(self, index: int, size: int, names: str):
        super().__init__(f"row {index} is {size} bytes")
        self.index, self.size, self.names = index, size, names


def literal_chunks(rows: Any, limit: int, row_limit: int) -> Iterator[list[list[str]]]:
    """Rows rendered as SQL literals, grouped so each INSERT stays under `limit` bytes; a larger
    row goes alone, and one over `row_limit` raises RowTooLarge."""
    chunk: list[list[str]] = []
    size = 0
    for index, record in enumerate(rows.to_pylist()):
        literals = [sql_literal(v) for v in record.values()]
        length = sum(len(x) + 2 for x in literals) + 4
        if length > row_limit:
            shown = [f"{k} = {v!r}" for k, v in record.items() if not isinstance(v, (str, bytes)) or len(v) <= 40]
            raise RowTooLarge(index, length, ", ".join(shown[:3]) or "no short column to name it by")
        if chunk and size + length > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(literals)
        size += length
    if chunk:
        yield chunk


# --- The landing path: nodes put files into a volume through the Files API; one loader loads them.
#
# Layout in landing_volume:  <table>/<node>.<source digest>/batch-<seq>-<uuid>.parquet
#                            <table>/<node>.<source digest>/_manifest/batch-<seq>.json
# A data file appears whole or not at all (a Files API upload is atomic) and its name is never
# used for other rows: the node's journal names it before the upload, so a retry or a replay
# after a crash sends the same rows under the same name. The manifest, written after the data
# file, is the node's proof of what it landed; the loader loads a file only once its manifest is
# there, and COPY INTO's load history skips a name it loaded before.

LANDING_FORMAT = 1
MANIFEST_DIR = "_manifest"
JOURNAL_FILE_NAME = "landing_journal.json"
MANIFEST_NAME = re.compile(r"batch-(\d{12})\.json")
LANDED_FILE = re.compile(r"batch-(\d{12})-[0-9a-f]{16}\.parquet")
COPY_FILES_LIMIT = 1000  # COPY INTO takes at most 1,000 names in FILES = (...)


class LandingFileMissing(Exception):
    """The file or directory does not exist (HTTP 404)."""


class VolumePrivilegeMissing(ConfigError):
    """The principal lacks READ VOLUME or WRITE VOLUME for what it asked (HTTP 403)."""


class LandingVolume:
    """Files in a Unity Catalog volume through the Databricks Files API (databricks-sdk), with the
    uploader's credentials: no SQL warehouse involved. Failures become the uploader's two kinds."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoint = parse_databricks_host(settings.databricks_host or "", settings.databricks_http_path or "",
                                              need_path=False)
        self.catalog, self.schema, self.volume, directory = parse_volume(settings.landing_volume or "",
                                                                          "landing_volume")
        self.root = f"/Volumes/{self.catalog}/{self.schema}/{self.volume}" + (f"/{directory}" if directory else "")
        self._files: Any = None

    def files(self) -> Any:
        if self._files is None:
            from databricks.sdk import WorkspaceClient
            from databricks.sdk.config import Config

            settings = self.settings
            if settings.databricks_token:
                auth: dict[str, Any] = {"auth_type": "pat", "token": settings.databricks_token}
            elif settings.databricks_client_id and settings.databricks_client_secret:
                auth = {"auth_type": "oauth-m2m", "client_id": settings.databricks_client_id,
                        "client_secret": settings.databricks_client_secret}
            else:
                raise ConfigError(NO_CREDENTIALS)
            # Bounded like the SQL path: a dead network fails a cycle, which is then retried with backoff.
            # The plain Files API client: one PUT per file (batches are far below its 5 GiB), no
            # presigned cloud URLs, so a node needs to reach the workspace only.
            config = Config(host=self.endpoint.base_url(), retry_timeout_seconds=int(settings.databricks_retry_timeout),
                            disable_experimental_files_api_client=True, **auth)
            self._files = WorkspaceClient(config=config).files
            LOG.debug("Files API at %s with %s", self.endpoint.host, package_version("databricks-sdk"))
        return self._files

    def _call(self, doing: str, work: Callable[[], Any]) -> Any:
        from databricks.sdk import errors

        try:
            return work()
        except (errors.NotFound, errors.ResourceDoesNotExist) as exc:
            raise LandingFileMissing(str(exc)) from None
        except errors.PermissionDenied as exc:
            if "access token" in str(exc).lower():
                raise ConfigError(f"Databricks refused the credentials while {doing} ({exc}). Check "
                                  "DATABRICKS_TOKEN or DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET.") from None
            raise VolumePrivilegeMissing(f"Databricks refused {doing} ({mask_secrets(str(exc), self.settings)}): these "
                              f"credentials lack a privilege on the volume {self.catalog}.{self.schema}.{self.volume}. "
                              "Landing nodes need WRITE VOLUME (and READ VOLUME to rebuild a lost state_dir); the "
                              "loader needs READ VOLUME and WRITE VOLUME (README: The landing path).") from None
        except errors.Unauthenticated as exc:
            raise ConfigError(f"Databricks refused the credentials while {doing} "
                              f"({mask_secrets(str(exc), self.settings)}). Check DATABRICKS_TOKEN or the service "
                              "principal's DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET.") from None
        except (errors.TooManyRequests, errors.TemporarilyUnavailable, errors.InternalError,
                errors.DeadlineExceeded, errors.RequestLimitExceeded, errors.ResourceExhausted,
                TimeoutError, OSError) as exc:
            raise TransientError(f"The Files API at {self.endpoint.host} gave no successful answer while {doing} "
                                 f"within databricks_retry_timeout ({self.settings.databricks_retry_timeout:g} s): "
                                 f"{mask_secrets(str(exc), self.settings)}. Retrying with backoff.") from None
        except errors.DatabricksError as exc:
            text = mask_secrets(str(exc), self.settings)
            if http_status(exc) in (429, 500, 502, 503, 504) or UNAVAILABLE.search(text):
                raise TransientError(f"The Files API is unavailable while {doing} ({text}); retrying.") from None
            raise UploaderError(f"The Files API refused {doing}: {text}") from None
        except Exception as exc:  # requests' errors: the network
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise TransientError(f"Cannot reach the Files API at {self.endpoint.host} while {doing}: "
                                     f"{mask_secrets(str(exc), self.settings)}. Retrying with backoff.") from None
            raise

    def upload(self, path: str, data: Any) -> None:
        """Put a file (a seekable stream), replacing one of the same name: a name only ever carries
        one batch's rows, so a re-sent upload writes the same rows again."""
        def put() -> None:
            data.seek(0)
            self.files().upload(path, data, overwrite=True)

        try:
            self._call(f"uploading {path}", put)
        except LandingFileMissing:
            raise ConfigError(f"The landing volume {self.catalog}.{self.schema}.{self.volume} does not exist. Have "
                              f"an admin create it: CREATE VOLUME {self.catalog}.{self.schema}.{self.volume} "
                              "(README: The landing path).") from None

    def download(self, path: str) -> bytes:
        return self._call(f"reading {path}", lambda: self.files().download(path).contents.read())

    def list(self, directory: str) -> list[Any]:
        """Entries (name, path, is_directory, file_size) of a directory; [] when it does not exist."""
        try:
            return list(self._call(f"listing {directory}", lambda: list(self.files().list_directory_contents(
                directory))))
        except LandingFileMissing:
            return []

    def delete(self, path: str) -> None:
        with contextlib.suppress(LandingFileMissing):  # gone already (a re-sent delete)
            self._call(f"removing {path}", lambda: self.files().delete(path))


def landing_node_dir(app_id: str, node_id: str) -> str:
    """A node's directory under its table's: readable (the node id) and unique per source."""
    return f"{safe_file_part(node_id)[:64]}.{app_id.rsplit(':', 1)[-1]}"


@dataclass(frozen=True)
class LandingEntry:
    """One batch a node landed (its manifest), or means to land (the journal before the upload)."""

    seq: int
    file: str
    rows: int
    watermark: dict
    before: dict
    last_loc: Any
    columns: list  # [column, Databricks type] pairs, in the table's order
    app_id: str
    node_id: str
    table: str
    landed: bool = True

    def to_json(self) -> dict:
        return {"format": LANDING_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> LandingEntry:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def record(self) -> CommitRecord:
        return CommitRecord(self.seq, Watermark.from_json(self.watermark), complete=self.landed,
                            before=Watermark.from_json(self.before), last_loc=json_restore(self.last_loc),
                            method="landing", staged_file=self.file)


class LandingTarget:
    """The node side of the landing path: each batch becomes one Parquet file plus its manifest in
    the landing volume, and nothing else -- no SQL warehouse runs for a node.

    The journal in state_dir names a batch's file before the upload (so a crash or a lost answer
    sends the same rows under the same name again) and says when both files are in."""

    kind = "landing"

    def __init__(self, settings: Settings, table_name: str):
        if settings.target == "delta":
            raise ConfigError("load_mode: landing puts files into a Databricks volume, but target is delta. Set "
                              "target to databricks (or auto), or load_mode to direct.")
        if not settings.landing_volume:
            raise ConfigError("load_mode: landing needs landing_volume (LANDING_VOLUME, --landing-volume): the Unity "
                              "Catalog volume the loader reads, /Volumes/<catalog>/<schema>/<volume>.")
        self.settings = settings
        self.table_name = table_name
        self.node_id = settings.node_id or ""
        self.lineage = [LINEAGE_CHOICES[c] for c in settings.lineage_columns]
        self.volume = LandingVolume(settings)
        self.journal = Path(settings.state_dir) / JOURNAL_FILE_NAME
        self.schema: Any = None
        self.told_unreadable = False

    def describe(self) -> str:
        return f"landing:{self.volume.endpoint.base_url()}{self.table_dir()}"

    def table_dir(self) -> str:
        return f"{self.volume.root}/{safe_file_part(self.table_name)}"

    def node_dir(self, app_id: str) -> str:
        return f"{self.table_dir()}/{landing_node_dir(app_id, self.node_id)}"

    def prepare(self, schema: Any) -> Any:
        import pyarrow as pa

        clashing = sorted(f.name for f in schema if f.name.lower() in {c.lower() for c in self.lineage})
        if clashing:
            raise ConfigError(f"Source column(s) {', '.join(clashing)} have the name of a lineage column; leave "
                              "that lineage column out of lineage_columns, or rename the source column.")
        self.schema = pa.schema(list(schema) + [lineage_field(c) for c in self.lineage])
        return self.schema

    # -- what this node landed -------------------------------------------------------------
    def committed(self, app_id: str) -> CommitRecord | None:
        entry = self._journal_entry(app_id) or self._last_manifest(app_id)
        return entry.record() if entry else None

    def _journal_entry(self, app_id: str) -> LandingEntry | None:
        try:
            data = json.loads(self.journal.read_text(encoding="utf-8"))
            entry = LandingEntry.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"The landing journal {self.journal} cannot be read ({exc}). It was not changed. Move "
                              "it away to resume from the manifests in the landing volume (READ VOLUME).") from None
        return entry if entry.app_id == app_id else None

    def _last_manifest(self, app_id: str) -> LandingEntry | None:
        """The newest manifest in this node's directory: its proof after the state_dir was lost.
        Reading needs READ VOLUME; a node with WRITE VOLUME alone trusts its state_dir."""
        directory = f"{self.node_dir(app_id)}/{MANIFEST_DIR}"
        try:
            names = [e.name for e in self.volume.list(directory) if MANIFEST_NAME.fullmatch(e.name or "")]
            if not names:
                return None
            data = json.loads(self.volume.download(f"{directory}/{max(names)}"))
        except VolumePrivilegeMissing:
            if not self.told_unreadable:
                self.told_unreadable = True
                LOG.warning("Cannot read this node's manifests in %s (no READ VOLUME): its state_dir is the only "
                            "record of what it landed, so keep state_dir on persistent storage.", directory)
            return None
        except (LandingFileMissing, ValueError) as exc:
            raise TransientError(f"The manifest in {directory} could not be read ({exc}); retrying.") from None
        return LandingEntry.from_json(data)

    # -- landing a batch ---------------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        rows = cast_to_table(with_lineage(batch, self.lineage, self.node_id), self.schema)
        name = batch.staged_file if batch.replay_method == "landing" and batch.staged_file else \
            f"batch-{batch.seq:012d}-{uuid.uuid4().hex[:16]}.parquet"
        entry = LandingEntry(batch.seq, name, rows.num_rows, batch.watermark.to_json(), batch.before.to_json(),
                             json_safe(batch.last_loc), [[f.name, databricks_type(f.type)] for f in rows.schema],
                             batch.app_id, self.node_id, self.table_name, landed=False)
        self._save_journal(entry)  # the name first: a replay sends these rows under it again
        directory = self.node_dir(batch.app_id)
        self.volume.upload(f"{directory}/{name}", parquet_stream(rows))
        manifest = json.dumps(dataclasses.replace(entry, landed=True).to_json(), sort_keys=True).encode()
        self.volume.upload(f"{directory}/{MANIFEST_DIR}/batch-{batch.seq:012d}.json", io.BytesIO(manifest))
        self._save_journal(dataclasses.replace(entry, landed=True))
        LOG.debug("Landed batch %d as %s/%s (%d rows).", batch.seq, directory, name, rows.num_rows)

    def _save_journal(self, entry: LandingEntry) -> None:
        try:
            write_file_atomically(self.journal, json.dumps(entry.to_json(), sort_keys=True) + "\n")
        except OSError as exc:
            raise TransientError(f"Cannot write the landing journal {self.journal}: {exc.strerror or exc}. Nothing "
                                 "of this batch was landed; free space or fix the permissions of state_dir.") from None

    # -- query mode ----------------------------------------------------------------------------
    def run_query(self, sql: str) -> Any:
        raise ConfigError("A landing node runs no SQL. Run --run-query where the loader runs (with "
                          "DATABRICKS_HTTP_PATH and load_mode: direct), or --run-query INFO here.")

    def info(self, app_id: str | None) -> list[tuple[str, str]]:
        lines = [("target", "landing (Databricks Files API)"), ("landing directory", self.table_dir())]
        if app_id is None:
            return lines
        lines.append(("node directory", self.node_dir(app_id)))
        entry = self._journal_entry(app_id) or self._last_manifest(app_id)
        if entry is None:
            return [*lines, ("status", "nothing landed yet")]
        mark = Watermark.from_json(entry.watermark)
        lines += [("last batch", f"{entry.seq} ({entry.rows} rows, {entry.file}, "
                                 f"{'landed' if entry.landed else 'landing interrupted, replayed on the next run'})"),
                  ("last landed timestamp", micros_to_iso(mark.last_upload) or "-")]
        with contextlib.suppress(ConfigError):
            waiting = [e for e in self.volume.list(self.node_dir(app_id)) if LANDED_FILE.fullmatch(e.name or "")]
            lines.append(("files waiting for the loader", str(len(waiting))))
        return lines

    def close(self) -> None:
        pass


@dataclass
class LoadStats:
    tables: int = 0
    nodes: int = 0
    files: int = 0
    rows: int = 0
    skipped_rows: int = 0  # rows of files COPY INTO had loaded before (an interrupted loader run)
    waiting: int = 0  # data files whose manifest is not there yet (a node is landing them)
    removed: int = 0
    statements: int = 0


class LandedLoader:
    """The central half of the landing path: every file that nodes landed, loaded into its table
    with COPY INTO (up to 1,000 files per statement), then removed. A file is loaded once its
    manifest is there; COPY INTO's load history skips a file it loaded before, so a loader run
    that is killed after a COPY and before the removals loads nothing twice when it runs again.
    The newest manifest of each node stays: it is the node's proof of what it landed."""

    def __init__(self, settings: Settings):
        if not settings.landing_volume:
            raise ConfigError("--load-landed needs landing_volume (LANDING_VOLUME, --landing-volume): the volume "
                              "the nodes land into, /Volumes/<catalog>/<schema>/<volume>.")
        self.settings = settings
        self.volume = LandingVolume(settings)
        self.session = DatabricksSession(settings)
        self.tables: dict[str, DatabricksTable] = {}
        self.told_unloadable: set[str] = set()  # files without a manifest below their node's newest

    def describe(self) -> str:
        return f"{self.volume.root} -> {self.session.describe()}"

    def run_once(self, stop: threading.Event) -> LoadStats:
        stats = LoadStats()
        before = self.session.statements
        for table_dir in self._table_dirs():
            if stop.is_set():
                break
            self._load_table(table_dir, stats, stop)
        stats.statements = self.session.statements - before
        return stats

    def _table_dirs(self) -> list[str]:
        found = sorted(e.name for e in self.volume.list(self.volume.root) if e.is_directory)
        wanted = self.settings.databricks_table
        return [d for d in found if d == safe_file_part(wanted)] if wanted else found

    def _load_table(self, table_dir: str, stats: LoadStats, stop: threading.Event) -> None:
        root = f"{self.volume.root}/{table_dir}"
        ready: list[tuple[str, LandingEntry]] = []  # (path relative to root, its manifest)
        spent: list[str] = []  # manifests older than their node's newest: their files are loaded by the end
        for node in (e.name for e in self.volume.list(root) if e.is_directory):
            node_ready, node_spent, waiting = self._node_files(root, node)
            ready += node_ready
            spent += node_spent
            stats.waiting += waiting
            stats.nodes += bool(node_ready)
        if ready:
            table = self._table(ready[-1][1].table, ready)
            for start in range(0, len(ready), COPY_FILES_LIMIT):
                chunk = ready[start:start + COPY_FILES_LIMIT]
                self._copy(table, root, chunk, stats)
                for path, _entry in chunk:  # only after the COPY committed
                    self.volume.delete(f"{root}/{path}")
                    stats.removed += 1
                if stop.is_set():
                    return
            stats.tables += 1
        for path in spent:
            self.volume.delete(path)

    def _node_files(self, root: str, node: str) -> tuple[list[tuple[str, LandingEntry]], list[str], int]:
        """A node's files that can be loaded, its manifests that are spent, and files not ready yet."""
        directory = f"{root}/{node}"
        # Manifests before data files: a node uploads a batch's data file before its manifest, so every
        # manifest listed here has its data file in the second listing unless that file was loaded and
        # removed already. Listed the other way round, a batch landing between the two listings would
        # have its manifest taken for a spent one and removed, and its file would never be loaded.
        manifests = sorted(e.name for e in self.volume.list(f"{directory}/{MANIFEST_DIR}")
                           if MANIFEST_NAME.fullmatch(e.name or ""))
        data = {e.name for e in self.volume.list(directory) if LANDED_FILE.fullmatch(e.name or "")}
        by_seq = {int(MANIFEST_NAME.fullmatch(name).group(1)): name for name in manifests}  # type: ignore[union-attr]
        ready, waiting = [], 0
        for name in sorted(data):
            seq = int(LANDED_FILE.fullmatch(name).group(1))  # type: ignore[union-attr]
            if seq not in by_seq:
                waiting += 1  # its node is landing it, or will land it again after a crash
                if by_seq and seq < max(by_seq) and name not in self.told_unloadable:  # its manifest is gone
                    self.told_unloadable.add(name)
                    LOG.warning("%s/%s has no manifest although its node has landed later batches, so it is not "
                                "loaded. If its rows are missing from the table, load it by hand (README: The "
                                "landing path).", directory, name)
                continue
            entry = LandingEntry.from_json(json.loads(self.volume.download(f"{directory}/{MANIFEST_DIR}/"
                                                                            f"{by_seq[seq]}")))
            if entry.file != name:
                # An attempt whose journal was lost with its state_dir; the node landed that batch
                # again under the name its manifest gives. Never loaded.
                LOG.warning("Removing %s/%s: batch %d of this node landed as %s.", directory, name, seq, entry.file)
                self.volume.delete(f"{directory}/{name}")
                continue
            ready.append((f"{node}/{name}", entry))
        spent = [f"{directory}/{MANIFEST_DIR}/{name}" for seq, name in by_seq.items() if seq < max(by_seq)]
        return ready, spent, waiting

    def _table(self, name: str, ready: list[tuple[str, LandingEntry]]) -> DatabricksTable:
        """The target table, created or widened for every column the files carry."""
        import pyarrow as pa

        table = self.tables.get(name)
        if table is None:
            table = self.tables[name] = DatabricksTable(self.session, self.settings, name)
            table.columns = table.describe_columns(name)
            if table.columns is None and self.settings.create_table:
                table.ensure_schema()
        fields: dict[str, Any] = {}
        for _path, entry in ready:
            for column, kind in entry.columns:
                fields.setdefault(column.lower(), pa.field(column, arrow_type_for_databricks(kind) or pa.string()))
        table.conform(pa.schema(list(fields.values())))
        return table

    def _copy(self, table: DatabricksTable, root: str, chunk: list[tuple[str, LandingEntry]],
              stats: LoadStats) -> None:
        expected = sum(entry.rows for _path, entry in chunk)
        result = self.session.execute(copy_into_statement(table.full_name, root, [path for path, _ in chunk]),
                                      fetch=True, doing=f"loading {len(chunk)} landed file(s) into {table.full_name}")
        inserted = copy_inserted_rows(result)
        if inserted is not None and inserted > expected:
            raise ConfigError(f"COPY INTO loaded {inserted} rows into {table.full_name} from {len(chunk)} landed "
                              f"file(s) whose manifests say {expected}: the files were changed after they landed. "
                              "Nothing was removed; check the landing directory.")
        loaded = expected if inserted is None else inserted
        if loaded < expected:
            LOG.info("%d row(s) of these files were loaded by an earlier, interrupted run; COPY INTO skipped them.",
                     expected - loaded)
        stats.files += len(chunk)
        stats.rows += loaded
        stats.skipped_rows += expected - loaded

    def close(self) -> None:
        self.session.close()


def make_target(settings: Settings, table_name: str) -> Target:
    if settings.load_mode == "landing":
        return LandingTarget(settings, table_name)
    if uses_databricks(settings):
        return DatabricksTarget(settings, table_name)
    return DeltaTarget(settings, table_name)


# =====================================================================================
# 6. State: a JSON file, written atomically, bound to its source and target
# =====================================================================================

STATE_FILE_NAME = "upload_state.json"


@dataclass
class State:
    """Progress as the state file records it. The target's commit record wins after a crash."""

    app_id: str
    source: dict
    target: str
    batch_seq: int = 0
    watermark: Watermark = field(default_factory=Watermark)
    rows_uploaded: int = 0
    node_id: str = ""

    def to_json(self) -> dict:
        return {
            "node_id": self.node_id,
            "last_upload": micros_to_iso(self.watermark.last_upload),
            "format": STATE_FORMAT,
            "tool": f"{TOOL_NAME} {TOOL_VERSION}",
            "app_id": self.app_id,
            "source": self.source,
            "target": self.target,
            "batch_seq": self.batch_seq,
            "rows_uploaded": self.rows_uploaded,
            "cursor": self.watermark.to_json(),
            "updated_at": micros_to_iso(int(time.time() * 1_000_000)),
        }


class StateFile:
    def __init__(self, state_dir: str):
        self.directory = Path(state_dir)
        self.path = self.directory / STATE_FILE_NAME

    def check_writable(self) -> None:
        """Fail at start-up, before anything is uploaded, when progress could not be recorded."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-"):
                pass
        except OSError as exc:
            raise ConfigError(f"State directory {self.directory} is not writable ({exc.strerror or exc}). "
                              "Set state_dir (STATE_DIR, --state-dir) to a writable directory.") from None

    def load(self) -> dict | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"State file {self.path} cannot be read: {exc.strerror}.") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ConfigError(f"State file {self.path} is corrupt ({exc}). It was not changed. Move it away "
                              "to resume from the target's own record of what was uploaded.") from None
        version = data.get("format", 0)
        if isinstance(version, int) and version > STATE_FORMAT:
            raise ConfigError(f"State file {self.path} was written by a newer version of this tool "
                              f"(format {version}); upgrade the uploader.")
        return data

    def save(self, state: State) -> None:
        """Write to a temporary file, fsync it, rename over the old one, fsync the directory."""
        data = state.to_json()
        data["checksum"] = state_checksum(data)
        payload = json.dumps(data, indent=2, sort_keys=True) + "\n"
        try:
            self._write(payload)
        except OSError as exc:
            raise TransientError(f"Cannot write the state file {self.path}: {exc.strerror or exc}. The target "
                                 "keeps its own record, so nothing is lost or uploaded twice; free space or "
                                 "fix the permissions of state_dir.") from None

    def _write(self, payload: str) -> None:
        write_file_atomically(self.path, payload)


def write_file_atomically(path: Path, payload: str) -> None:
    """Write to a temporary file, fsync it, rename it over `path`, fsync the directory: after a
    crash the file is the old one or the new one, never a mix."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def state_checksum(data: dict) -> str:
    """A digest of the state's content: a hand edit or a damaged write no longer matches it."""
    content = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def state_checksum_matches(data: dict) -> bool:
    """Files written before checksums existed have none and are read as they are."""
    return "checksum" not in data or data["checksum"] == state_checksum(data)


def parse_state(data: dict, path: Path) -> State:
    try:
        return State(
            app_id=str(data["app_id"]),
            source=dict(data["source"]),
            target=str(data["target"]),
            batch_seq=int(data["batch_seq"]),
            watermark=Watermark.from_json(data["cursor"]),
            rows_uploaded=int(data.get("rows_uploaded", 0)),
            node_id=str(data.get("node_id") or ""),
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ConfigError(f"State file {path} is not an uploader state file or is damaged ({exc}). It was "
                          "not changed. Move it away to resume from the target's record.") from None


def app_id_for(source_path: str, table: str, scope: str | None = None) -> str:
    """Names this uploader in the target's commit records: stable for one database and table.

    A Delta table keeps its own records, so the source is enough. On Databricks the progress
    table serves a whole schema and a fleet shares the target table, so the scope adds the
    node id (every node has the same /data/sensor.db inside its container) and the target
    table's name.
    """
    identity = f"{os.path.abspath(source_path)}\0{table}" + (f"\0{scope}" if scope else "")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{TOOL_NAME}:{digest}"


def app_scope(settings: Settings, target_table: str) -> str | None:
    if not uses_databricks(settings):
        return None
    names = (settings.databricks_catalog or "", settings.databricks_database or "", target_table)
    return f"{settings.node_id}\0" + ".".join(names).lower()


def check_binding(stored: State | None, fresh: State, state_path: Path) -> None:
    """A state file only ever describes one source table going to one target."""
    if stored is not None and (stored.source != fresh.source or stored.target != fresh.target):
        raise ConfigError(
            f"State file {state_path} belongs to another source or target "
            f"({stored.source.get('database')} table {stored.source.get('table')} -> {stored.target}); "
            f"this run reads {fresh.source['database']} table {fresh.source['table']} -> {fresh.target}. "
            "Use a separate state_dir per source/target, or move the file away to start over.")


def reconcile(stored: State | None, record: CommitRecord | None, fresh: State, state_path: Path,
              target: str) -> State:
    """Decide where to resume from the state file and the target's own commit record."""
    check_binding(stored, fresh, state_path)
    if record is None:
        if stored is not None and stored.batch_seq > 0:
            raise ConfigError(
                f"State file {state_path} says {stored.batch_seq} batches were committed to {target}, "
                "but the target has no record of them (was the table deleted or recreated?). To upload "
                "everything again into it, move the state file away.")
        return stored or fresh
    if stored is None:
        LOG.warning("No state file; resuming after batch %d, which the target recorded.", record.seq)
        return dataclasses.replace(fresh, batch_seq=record.seq, watermark=record.watermark)
    if record.seq > stored.batch_seq:
        LOG.warning("Batch %d reached the target but the state file was not updated (interrupted?); "
                    "resuming after it, nothing is uploaded twice.", record.seq)
        return dataclasses.replace(stored, batch_seq=record.seq, watermark=record.watermark)
    if record.seq < stored.batch_seq:
        raise ConfigError(
            f"The target {target} has batches up to {record.seq} but the state file {state_path} says "
            f"{stored.batch_seq} (was the table restored to an older version?). Move the state file away "
            "to resume from what the target holds.")
    return stored


HEARTBEAT_FILE_NAME = "heartbeat.json"
HEARTBEAT_EVERY = 30.0  # seconds between beats while the loop sleeps or backs off


class Heartbeat:
    """Proof that the upload loop is alive, for container health checks (--healthcheck).

    Beaten by the loop itself (never by a helper thread), so a loop stuck anywhere stops beating.
    It says nothing about whether uploads succeed: a warehouse that is down is not cured by
    restarting the container, so failures are reported in it but do not make it stale.
    """

    def __init__(self, state_dir: str, stale_after: float):
        self.path = Path(state_dir) / HEARTBEAT_FILE_NAME
        self.stale_after = stale_after
        self.last_success: str | None = None
        self.failures = 0

    def beat(self, phase: str) -> None:
        payload = {"time": time.time(), "phase": phase, "pid": os.getpid(), "stale_after": self.stale_after,
                   "last_success": self.last_success, "consecutive_failures": self.failures}
        temp = self.path.with_name(f".{HEARTBEAT_FILE_NAME}.{os.getpid()}.tmp")
        try:
            temp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
            os.replace(temp, self.path)
        except OSError as exc:  # the health check will say so; uploading goes on
            LOG.debug("Heartbeat not written: %s", exc)
            with contextlib.suppress(OSError):
                temp.unlink()

    def succeeded(self) -> None:
        self.last_success = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1


def heartbeat_stale_after(settings: Settings) -> float:
    """Longest a healthy loop goes without beating: one batch, whose statements may each wait
    out the connector's retry budget, plus slack for a slow disk."""
    return max(300.0, 5 * settings.databricks_retry_timeout)


def check_health(state_dir: str, now: float | None = None) -> tuple[bool, str]:
    path = Path(state_dir) / HEARTBEAT_FILE_NAME
    try:
        beat = json.loads(path.read_text(encoding="utf-8"))
        age = (time.time() if now is None else now) - float(beat["time"])
        stale_after = float(beat.get("stale_after", 300.0))
    except FileNotFoundError:
        return False, f"unhealthy: no heartbeat at {path} (the upload loop has not started, or state_dir differs)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unhealthy: heartbeat {path} unreadable ({exc})"
    detail = (f"last beat {age:.0f} s ago ({beat.get('phase')}), last successful cycle "
              f"{beat.get('last_success') or 'none yet'}, {beat.get('consecutive_failures', 0)} failure(s) since")
    if age > stale_after:
        return False, f"unhealthy: {detail}; stale after {stale_after:.0f} s"
    return True, f"healthy: {detail}"


# --- One process per state directory
#
# Two uploaders on one state file both plan the same window and commit it under their own batch
# numbers: duplicates. A lock on the state directory, held for the life of the process, lets only
# one in. flock() (not fcntl's record locks) because closing any other descriptor of the file
# would silently drop a record lock; the kernel releases it when the process ends, however it ends.
# --healthcheck and --run-query take no lock: they only read.

LOCK_FILE_NAME = "uploader.lock"
LOCK_RETRY_EVERY = 5.0  # seconds between attempts while loop mode waits for the lock


class StateDirLocked(TransientError):
    """Another process holds the state directory: --once stops (exit 1), loop mode waits."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


LOCK_UNLABELLED_WAIT = 1.0  # seconds a lock without its holder's label is looked at again


@dataclass
class StateDirLock:
    path: Path
    fd: int | None = None
    UNKNOWN: ClassVar[str] = "holder unknown: {path} names none yet"

    @classmethod
    def for_dir(cls, state_dir: str) -> StateDirLock:
        return cls(Path(state_dir) / LOCK_FILE_NAME)

    def acquire(self, role: str) -> None:
        """Take the lock without waiting (but for a holder that is taking or releasing it) and write
        who holds it into the file, or raise StateDirLocked naming the holder."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock (the target's commit check still stands)
            return
        try:
            # Read-only: an open writable file would stop the directory from being remounted
            # read-only, and flock() needs no write access.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"State directory {self.path.parent} is not writable ({exc.strerror or exc}): cannot "
                              "create its lock file. Set state_dir (STATE_DIR, --state-dir) to a writable "
                              "directory.") from None
        # A lock without its label is being taken or released (the holder writes it just after
        # taking the lock and clears it just before letting go): look again for a moment.
        deadline = time.monotonic() + LOCK_UNLABELLED_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise ConfigError(f"Cannot lock {self.path} ({exc.strerror or exc}): the filesystem of state_dir "
                                      "does not support file locks. Put state_dir (STATE_DIR, --state-dir) on a local "
                                      "filesystem.") from None
                holder = self.holder()
                if holder == self.UNKNOWN.format(path=self.path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            os.close(fd)
            raise StateDirLocked(
                f"The state directory {self.path.parent} is in use by another process ({holder}). Only one "
                "uploader may use a state directory at a time: stop the other one (or wait for it to end), or give "
                "this one its own state_dir if it uploads something else.", holder) from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "role": role,
                  "tool": f"{TOOL_NAME} {TOOL_VERSION}"}
        self._label(json.dumps(record) + "\n")
        self.fd = fd

    def _label(self, text: str) -> None:
        """Written in place: a renamed file would be another inode, which a second process could lock."""
        with contextlib.suppress(OSError), open(self.path, "r+", encoding="utf-8") as handle:
            handle.truncate(0)  # the lock holds without its label
            handle.write(text)

    def holder(self) -> str:
        """Who holds the lock, from what the holder wrote into the file."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"{data.get('role', 'uploader')} pid {data['pid']} on host {data['host']}, "
                    f"since {data['since']}")
        except (OSError, ValueError, KeyError, TypeError):
            return self.UNKNOWN.format(path=self.path)

    def release(self) -> None:
        if self.fd is not None:
            self._label("")
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def lock_state_dir(settings: Settings, role: str, stop: threading.Event) -> StateDirLock | None:
    """Take the state directory's lock. --once gives up at once (exit 1, naming the holder). Loop
    mode waits for it -- a supervisor may start a new uploader while the old one is still
    finishing its batch -- saying once who holds it; None when stopped while waiting."""
    StateFile(settings.state_dir).check_writable()
    lock = StateDirLock.for_dir(settings.state_dir)
    said = None
    while True:
        try:
            lock.acquire(role)
        except StateDirLocked as exc:
            if settings.once:
                raise
            if exc.holder != said:
                LOG.warning("%s Waiting for it (retrying every %.0f s).", exc, LOCK_RETRY_EVERY)
                said = exc.holder
            if stop.wait(LOCK_RETRY_EVERY):
                return None
            continue
        if said is not None:
            LOG.info("The state directory %s is free now; starting.", settings.state_dir)
        return lock


# =====================================================================================
# 7. Run loop and command line
# =====================================================================================


@dataclass
class CycleStats:
    rows_read: int = 0
    rows_uploaded: int = 0
    batches: int = 0
    invalid_timestamps: int = 0
    skipped_invalid: int = 0
    removed: TransformCounts = field(default_factory=TransformCounts)
    nulled: dict = field(default_factory=dict)
    first_ts: int | None = None
    last_ts: int | None = None
    behind: int = 0
    seconds: float = 0.0
    resumed: bool = False  # the cycle finished a window an earlier run had started


class Uploader:
    """One source table into one target, batch by batch, exactly once."""

    def __init__(self, settings: Settings, source: SourceTable, target: Target, stop: threading.Event):
        self.settings = settings
        self.source = source
        self.target = target
        self.stop = stop
        self.reader = SourceReader(settings, source)
        self.state_file = StateFile(settings.state_dir)
        self.app_id = app_id_for(settings.sqlite or "", source.name,
                                 app_scope(settings, default_table_name(settings, source.name)))
        self.column_types: dict[str, Any] = {}
        self.schema: Any = None
        self.transforms = TransformPlan()
        self.state: State | None = None
        self.stored: State | None = None
        self.heartbeat: Heartbeat | None = None
        self.state_unsaved = False  # the state file lags what the target holds (disk full, read-only)
        self.native: NativeReader | None = None  # open during a cycle (sqlite_reader: native)
        self.window_key: Future | None = None  # the planned window's top_key, while its scan runs
        self.pyarrow_ready: threading.Thread | bool = False  # see _ready_pyarrow

    # -- start-up ------------------------------------------------------------------------
    def fresh_state(self) -> State:
        source = {"database": os.path.abspath(self.settings.sqlite or ""), "table": self.source.name,
                  "timestamp_col": self.source.timestamp_col, "cursor": self.settings.cursor,
                  "locator": list(self.source.locator)}
        return State(app_id=self.app_id, source=source, target=self.target.describe(),
                     watermark=Watermark(mode=self.settings.cursor,
                                         order="insertion" if self.reader.has_rowid else "key",
                                         nulls=None if self.reader.has_rowid else []),
                     node_id=self.settings.node_id)

    def prepare(self) -> None:
        self.state_file.check_writable()
        connection = self.reader.connect()
        try:
            self._plan_columns(connection)
        finally:
            connection.close()
        raw = self.state_file.load()
        if raw is not None and not state_checksum_matches(raw):
            raise ConfigError(f"State file {self.state_file.path} was changed by hand or damaged (its checksum "
                              "does not match its content). It was not changed. Move it away to resume from "
                              "the target's own record, without duplicates.")
        self.stored = parse_state(raw, self.state_file.path) if raw is not None else None
        fresh = self.fresh_state()
        if self.stored is not None and self.stored.batch_seq == 0 and (
                self.stored.source != fresh.source or self.stored.target != fresh.target):
            LOG.info("The state file describes another source or target but records no upload; starting afresh.")
            self.stored = None
        check_binding(self.stored, fresh, self.state_file.path)

    def _follow_schema(self, connection: sqlite3.Connection) -> None:
        """Pick up columns the application added to its table while we run."""
        try:
            columns, _ = read_columns(connection, self.source.name)
        except sqlite3.DatabaseError as exc:
            raise TransientError(f"Cannot read the columns of {self.source.name!r}: {exc}") from None
        if not columns:
            raise TransientError(f"Table {self.source.name!r} is gone from {self.settings.sqlite} "
                                 "(being recreated?); retrying.")
        if columns == self.source.columns:
            return
        check_column_names(self.source.name, [c.name for c in columns])
        names = {c.name for c in columns}
        if self.source.timestamp_col and self.source.timestamp_col not in names:
            raise ConfigError(f"The timestamp column {self.source.timestamp_col!r} is gone from table "
                              f"{self.source.name!r}. Set timestamp_col to the new column.")
        added = [c.name for c in columns if c not in self.source.columns]
        LOG.info("The source table's columns changed%s; the target follows.",
                 f" (new: {', '.join(added)})" if added else "")
        self.source = dataclasses.replace(self.source, columns=columns)
        identity = self.reader.identity
        self.reader = SourceReader(self.settings, self.source)
        self.reader.identity = identity  # the same file, this cycle (no scan has begun yet)
        self._plan_columns(connection)
        self.schema = None

    def _plan_columns(self, connection: sqlite3.Connection) -> None:
        """Arrow types of the source columns, and the transforms checked against them."""
        self.column_types = plan_column_types(self.source, connection)
        self.transforms = build_transform_plan(self.settings, self.source.column_names, self.column_types,
                                               self.source.timestamp_col)

    def resync(self) -> None:
        """Agree with the target on where we are; run at start and after every failure."""
        record = self.target.committed(self.app_id)
        stored = self.state if self.state is not None else self.stored
        state = reconcile(stored, record, self.fresh_state(), self.state_file.path, self.target.describe())
        if record is not None and not record.complete and (stored is None or record.seq > stored.batch_seq):
            self.replay(record)
        self.state = state
        if state is not stored or self.state_unsaved:
            self._save_state(state)

    def _save_state(self, state: State) -> None:
        """A state file that cannot be written does not stop uploads: the target's own record
        keeps them exactly-once. The file is written again as soon as it can be."""
        try:
            self.state_file.save(state)
        except TransientError as exc:
            if not self.state_unsaved:
                LOG.error("%s", exc)
            self.state_unsaved = True
            return
        if self.state_unsaved:
            LOG.info("State file %s is up to date again.", self.state_file.path)
        self.state_unsaved = False

    def replay(self, record: CommitRecord) -> None:
        """Load the recorded batch again -- the same rows under the same identity, so a load that
        already happened is skipped by the target and one that did not happen happens now."""
        before = record.before
        if before is None or before.window is None or record.last_loc is None:
            raise UploaderError(f"The target's record of batch {record.seq} does not say which rows it held.")
        LOG.warning("Batch %d was recorded but not confirmed (interrupted?); loading it again, which the "
                    "target makes a no-op if it already landed.", record.seq)
        connection = self.reader.connect()
        upper = record.last_loc
        try:
            end = record.watermark.frontier if before.order == "insertion" else None
            try:
                raw, report = self._read(connection, before, before.window, 2**62, upper=upper, check_end=end)
            except FrontierMoved:
                moved = self._relocate_batch(connection, before, record)
                if moved is None:
                    return
                before, upper = moved
                raw, report = self._read(connection, before, before.window, 2**62, upper=upper)
        finally:
            connection.close()
        rows, first_ts, last_ts = self._convert(raw, report, TransformCounts())
        if rows is None or rows.num_rows == 0:
            return
        self.target.write(Batch(record.seq, rows, self.app_id, record.watermark, raw.count, before,
                                record.last_loc, first_ts, last_ts, replay_method=record.method,
                                staged_file=record.staged_file))

    def _relocate_batch(self, connection: sqlite3.Connection, before: Watermark, record: CommitRecord
                        ) -> tuple[Watermark, list] | None:
        """A batch to replay whose rows were renumbered since: find both of its ends again."""
        assert before.window is not None
        start, start_tail, start_columns = before.frontier
        end, end_tail, end_columns = record.watermark.frontier
        first = None
        if start is not None and start_tail:
            first, _ = self.reader.relocate(connection, start, start_tail, start_columns or [])
        last = self.reader.relocate(connection, end, end_tail, end_columns or [])[0] if end and end_tail else None
        if last is None:
            LOG.error("The rows of batch %d were deleted before it could be confirmed; if its first load did not "
                      "land, they are not in the target.", record.seq)
            return None
        tail = columns = None
        if first is not None:
            with read_transaction(connection):
                tail, columns = self.reader.tail_at(connection, first)
        window = dataclasses.replace(before.window, top=[max(last, first or last)], start=None,
                                     done=[first] if first is not None else None, tail=tail, tail_cols=columns)
        marked = dataclasses.replace(before, window=window, loc=[first] if first is not None else None,
                                     tail=tail, tail_cols=columns)
        LOG.warning("The rows of batch %d were renumbered since; it is read again at rowids %s..%s.", record.seq,
                    (first or 0) + 1, last)
        return marked, [last]

    # -- one cycle -----------------------------------------------------------------------
    def run_cycle(self) -> CycleStats:
        started = time.monotonic()
        stats = CycleStats()
        self.resync()
        assert self.state is not None
        stats.resumed = self.state.watermark.window is not None
        self.window_key = None  # set by _plan for the window it plans
        try:
            connection = self.reader.open_for_cycle()
        except ConfigError as exc:  # the file may be mid-rotation: try again next cycle
            raise TransientError(str(exc)) from None
        self.native = self._open_native()
        if self.native is not None:
            self._ready_pyarrow()
        try:
            self.reader.check_same_file("opening it")
            self._follow_schema(connection)
            # A window ends early when the rows at the frontier moved under it (renumbered):
            # the rest is planned again at once, from where those rows are now.
            for _ in range(3):
                mark = self.state.watermark
                if mark.window is None:
                    window = self._plan(connection)
                    if window is None:
                        break
                    mark = dataclasses.replace(self.state.watermark, window=window)
                    LOG.info("Window planned: %d pending row(s) up to locator %s%s.", window.rows, window.top,
                             "" if not window.filtered else " (interleaved rows: reading with the key filter)")
                if not self._drain_window(connection, mark, stats):
                    break
            stats.behind = self._rows_after(connection, self.state.watermark)
        except sqlite3.DatabaseError as exc:
            if sqlite_corrupt(exc):
                raise ConfigError(f"SQLite database {self.settings.sqlite} is corrupt ({exc}). Everything up to the "
                                  "last committed batch is in the target; restore the file or point sqlite at "
                                  "a good copy.") from None
            raise
        finally:
            if self.native is not None:
                self.native.close()
                self.native = None
            self.reader.end_scans()
            connection.close()
        stats.seconds = time.monotonic() - started
        return stats

    def _open_native(self) -> NativeReader | None:
        if self.settings.sqlite_reader != "native":
            return None
        try:
            return NativeReader(self.settings.sqlite or "")
        except ImportError as exc:
            LOG.warning("sqlite_reader is native, but adbc-driver-sqlite cannot be imported (%s); reading "
                        "through Python's sqlite3, which is slower.", exc)
            self.settings = dataclasses.replace(self.settings, sqlite_reader="python")
        except Exception as exc:  # any failure leaves the Python reader, which is exact
            LOG.debug("The native reader cannot open %s (%s); reading through Python's sqlite3.",
                      self.settings.sqlite, one_line(str(exc)))
        return None

    def _set_mark(self, mark: Watermark) -> None:
        """A cursor change that uploads nothing (a check, a relocation): kept in the state file."""
        assert self.state is not None
        if mark != self.state.watermark:
            self.state = dataclasses.replace(self.state, watermark=mark)
            self._save_state(self.state)

    def _plan(self, connection: sqlite3.Connection) -> Window | None:
        """The next window, after the checks its order needs; None when nothing is pending."""
        assert self.state is not None
        mark = self.state.watermark
        if mark.order == "key" and self.reader.has_rowid:
            # A cursor from before insertion order: every row up to its locator is settled.
            # Rows with unreadable timestamps were done up to null_loc, the others up to loc.
            done = max((m[0] for m in (mark.loc, mark.null_loc) if m), default=None)
            LOG.info("Cursor converted to insertion order (rows above rowid %s are new).", done)
            mark = dataclasses.replace(mark, order="insertion", loc=[done] if done is not None else None,
                                       null_loc=None, ties=None, nulls=None)
        if mark.order == "key":
            window, settled = self.reader.plan_window(connection, mark)
            if mark.below is not None and settled > mark.below:
                self._report_late_keys(settled - mark.below, mark)
            self._set_mark(dataclasses.replace(mark, below=settled))
            return window
        mark = self._check_frontier(connection, mark)
        window, below, appeared, counted = self.reader.plan_insertion_window(connection, mark)
        # An unfiltered window's top_key comes from the planning scan, still running: the first
        # batch is read meanwhile, and waits for it before its watermark is made.
        self.window_key = self.reader.top_key if window is not None and not window.filtered else None
        if appeared:
            self._report_low_inserts(appeared, window, mark)
        if counted and below >= COUNT_EVERY_CYCLE_BELOW:
            mark = dataclasses.replace(mark, counted_at=time.time())
        if not (window is not None and window.filtered):
            # The new count stands now, except while rows below the frontier wait to be read: then
            # it lands with the window, and a run killed before that counts them again.
            mark = dataclasses.replace(mark, below=below)
        self._set_mark(mark)
        return window

    def _check_frontier(self, connection: sqlite3.Connection, mark: Watermark) -> Watermark:
        """Insertion order: are the rows at the frontier still there? If not, find them."""
        loc, tail, columns = mark.frontier
        try:
            with read_transaction(connection):
                checked = self.reader.check_frontier(connection, loc, tail, columns)
                if loc is not None and not tail:  # a cursor without fingerprint yet (older state file)
                    tail, columns = self.reader.tail_at(connection, loc)
                    checked = tail[-1][0] if tail else None
        except FrontierMoved:
            return self._relocated(connection, mark)
        if checked != loc:
            if checked is None:
                return dataclasses.replace(mark, loc=None, tail=None, tail_cols=None, below=0)
            tail, columns = self.reader.tail_at(connection, checked)
            return dataclasses.replace(mark, loc=[checked], tail=tail, tail_cols=columns)
        return dataclasses.replace(mark, tail=tail, tail_cols=columns)

    def _relocated(self, connection: sqlite3.Connection, mark: Watermark) -> Watermark:
        """The cursor after the rows at its frontier moved: at their new place, or at the start
        of the table when none of them is left. Any window in progress ends there."""
        loc, tail, columns = mark.frontier
        assert loc is not None and tail and columns is not None
        hashes = {row[1] for row in tail}
        for _ in range(3):
            found, rank = self.reader.relocate(connection, loc, tail, columns)
            if found is None:
                LOG.warning("None of the rows uploaded last is in %r any more (rowid %s and before): the table was "
                            "emptied, recreated or replaced, or every uploaded row was deleted. Every row it holds "
                            "now is new: uploading from its first row.", self.source.name, loc)
                return dataclasses.replace(mark, loc=None, null_loc=None, tail=None, tail_cols=None, below=0,
                                           window=None)
            with read_transaction(connection):  # the search reads in chunks: is the row still there?
                new_tail, new_columns = self.reader.tail_at(connection, found)
                there = self.reader.fingerprint_rows(connection, columns, f"{self.reader.loc_sql} = ?", [found])
            if there and there[0][1] in hashes:
                break
        else:
            raise TransientError(f"The rows of {self.source.name!r} keep moving while the uploader looks for the last "
                                 "uploaded one (VACUUM running?); trying again.")
        if found == loc:
            LOG.info("The last uploaded rows of %r are at their place (rowid %s); some rows near them changed.",
                     self.source.name, loc)
        else:
            LOG.warning("The rows of %r were renumbered (VACUUM after deletes?): the last uploaded row, rowid %s, is "
                        "now rowid %s. Continuing after it; nothing is uploaded twice or skipped.", self.source.name,
                        loc, found)
        return dataclasses.replace(mark, loc=[found], null_loc=None, tail=new_tail, tail_cols=new_columns,
                                   below=rank, window=None)

    def _report_low_inserts(self, appeared: int, window: Window | None, mark: Watermark) -> None:
        """More rows at or below the frontier than last counted: rows inserted with explicit low rowids."""
        frontier = mark.loc[0] if mark.loc else None
        seen = (f"The table has {appeared} more row(s) at rowids at or below {frontier} than at the last cycle: rows "
                "were inserted there with explicit rowids")
        if window is not None and window.filtered:
            LOG.warning("%s. The table is scanned once for them: those with a timestamp newer than every uploaded "
                        "row are uploaded; older ones cannot be told from rows already uploaded.", seen)
            return
        why = ("cursor: rowid cannot tell them from rows already uploaded" if mark.mode == "rowid" else
               "none has a timestamp newer than every uploaded row, so they cannot be told from rows already "
               "uploaded")
        LOG.warning("%s, and they are NOT uploaded: %s. Let SQLite choose the rowids of new rows (leave the rowid / "
                    "INTEGER PRIMARY KEY out of the INSERT)%s.", seen, why,
                    ", or use cursor: timestamp, which uploads such rows when they are newer than the upload"
                    if mark.mode == "rowid" else "")

    def _report_late_keys(self, late: int, mark: Watermark) -> None:
        LOG.warning("%d row(s) were added to the WITHOUT ROWID table %r with a timestamp at or before the cursor "
                    "(%s) and are NOT uploaded: its rows are found by (timestamp, primary key), and these cannot "
                    "be told from rows already uploaded (a clock that stepped back?). Give the table a rowid "
                    "(recreate it without WITHOUT ROWID) so that new rows are found by insertion order.", late,
                    self.source.name, micros_to_iso(mark.last_upload) or mark.key)

    def _rows_after(self, connection: sqlite3.Connection, mark: Watermark) -> int:
        if mark.loc is None or mark.window is not None:
            return mark.window.rows - mark.window.rows_done if mark.window else 0
        return connection.execute(
            f"SELECT count(*) FROM {self.reader.from_sql} WHERE {self.reader.loc_row} > "
            f"{self.reader._marks(mark.loc)}", mark.loc).fetchone()[0]

    def _drain_window(self, connection: sqlite3.Connection, mark: Watermark, stats: CycleStats) -> bool:
        """Read the window batch by batch; each batch's commit overlaps the next read. True when
        the window ended early because the rows at its frontier moved (plan again)."""
        assert self.state is not None
        relocated = False
        seq = self.state.batch_seq
        in_flight: tuple[Future, Batch | None, Watermark] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload") as pool:
            try:
                while mark.window is not None and not self.stop.is_set():
                    try:
                        batch, mark = self._next_batch(connection, mark, seq + 1, stats)
                    except FrontierMoved:
                        batch, mark, relocated = None, self._relocated(connection, mark), True
                    if in_flight is not None:
                        self._finish(in_flight, stats)
                    if batch is None:
                        in_flight = (_done_future(), None, mark)
                    else:
                        seq += 1
                        in_flight = (pool.submit(self.target.write, batch), batch, mark)
                if in_flight is not None:
                    self._finish(in_flight, stats)
                    in_flight = None
            finally:
                if in_flight is not None:  # a read failed: let the commit in flight end first
                    with contextlib.suppress(Exception):
                        self._finish(in_flight, stats)
        return relocated

    def _finish(self, in_flight: tuple[Future, Batch | None, Watermark], stats: CycleStats) -> None:
        future, batch, mark = in_flight
        future.result()  # raises if the commit failed: the state keeps the last good batch
        assert self.state is not None
        seq = batch.seq if batch is not None else self.state.batch_seq
        uploaded = batch.rows.num_rows if batch is not None else 0
        state = dataclasses.replace(self.state, batch_seq=seq, watermark=mark,
                                    rows_uploaded=self.state.rows_uploaded + uploaded)
        self.state = state
        self._save_state(state)
        if self.heartbeat is not None:
            self.heartbeat.beat("uploading")
        if batch is not None:
            stats.batches += 1
            stats.rows_uploaded += uploaded
            stats.first_ts = min(filter(None, (stats.first_ts, batch.first_ts)), default=None)
            stats.last_ts = max(filter(None, (stats.last_ts, batch.last_ts)), default=None)
            LOG.info("Batch %d committed: %d row(s) from %d read, timestamps %s .. %s; %s.", batch.seq,
                     uploaded, batch.rows_read, micros_to_iso(batch.first_ts) or "-",
                     micros_to_iso(batch.last_ts) or "-",
                     f"{mark.window.rows - mark.window.rows_done} row(s) left in this window"
                     if mark.window else "window finished")

    def _next_batch(self, connection: sqlite3.Connection, mark: Watermark, seq: int,
                    stats: CycleStats) -> tuple[Batch | None, Watermark]:
        """Read and convert the next batch; return it with the watermark true after it commits."""
        before = mark
        window = mark.window
        assert window is not None
        raw, report = self._read(connection, mark, window, self.settings.batch_size)
        if self.window_key is not None:  # the window's first batch: the planning snapshot's top_key
            window = dataclasses.replace(window, top_key=self.window_key.result())
            self.window_key = None
            before = mark = dataclasses.replace(mark, window=window)
        stats.rows_read += raw.count
        finished = raw.count < self.settings.batch_size or raw.last_loc == window.top
        rows, first_ts, last_ts = self._convert(raw, report, stats.removed)
        stats.invalid_timestamps += report.invalid_timestamps
        if self.settings.invalid_timestamps == "skip":
            stats.skipped_invalid += report.invalid_timestamps
        for name, count in report.nulled.items():
            stats.nulled[name] = stats.nulled.get(name, 0) + count
        last_upload = max(filter(None, (mark.last_upload, last_ts)), default=None)
        ties = None
        if window.ties is not None or raw.ties is not None:
            ties = (window.ties or []) + (raw.ties or [])
        if finished and mark.order == "insertion":
            mark = self._insertion_mark_after(mark, window, raw, last_upload)
        elif finished:  # key order: timestamp mode (WITHOUT ROWID tables, or a window begun before)
            key = window.top_key if window.top_key is not None else mark.key
            loc = window.top if window.top_key is not None else mark.loc
            nulls = self._final_nulls(mark, (window.nulls or []) + (raw.nulls or []))
            mark = Watermark("timestamp", key, loc, list(window.top) if nulls is None else None, last_upload, None,
                             self._final_ties(mark, window, ties), below=window.below, nulls=nulls)
        else:
            progressed = dataclasses.replace(window, done=raw.last_loc, rows_done=window.rows_done + raw.count,
                                             ties=ties, tail=raw.tail, tail_cols=raw.tail_cols,
                                             read_above=window.read_above + raw.above,
                                             key_read=highest(window.key_read, raw.max_key),
                                             nulls=None if raw.nulls is None else (window.nulls or []) + raw.nulls)
            mark = dataclasses.replace(mark, last_upload=last_upload, window=progressed)
        if rows is None or rows.num_rows == 0:
            return None, mark
        return Batch(seq, rows, self.app_id, mark, raw.count, before, raw.last_loc, first_ts, last_ts), mark

    @staticmethod
    def _insertion_mark_after(mark: Watermark, window: Window, raw: RawBatch, last_upload: int | None
                              ) -> Watermark:
        """Insertion order, window finished: the frontier is the last row read (a row deleted
        above it since planning leaves its rowid free for a new row, which must count as new),
        never below the frontier the window started from (a filtered window reads rows below it)."""
        if raw.last_loc is not None:
            loc, tail, columns = raw.last_loc[0], raw.tail, raw.tail_cols
        else:
            loc, tail, columns = mark.frontier
        if mark.loc and (loc is None or loc < mark.loc[0]):
            loc, tail, columns = mark.loc[0], mark.tail, mark.tail_cols
        # Rows read that the plan did not know (inserted below the frontier meanwhile) count too.
        keys = [k for k in (mark.key, window.top_key, window.key_read, raw.max_key) if k is not None]
        below = None if window.below is None else window.below + window.read_above + raw.above
        return Watermark(mark.mode, max(keys) if keys else None, [loc] if loc is not None else None, None,
                         last_upload, None, None, order="insertion", tail=tail, tail_cols=columns, below=below,
                         counted_at=mark.counted_at)

    def _final_nulls(self, mark: Watermark, read: list) -> list | None:
        """The keys of unreadable-timestamp rows uploaded so far (key order); None when there are too
        many to remember (or BLOB keys): from then on they are done up to the window's top."""
        if mark.nulls is None:
            return None
        nulls = mark.nulls + read
        if len(nulls) > MAX_TIES or any(isinstance(v, bytes) for loc in nulls for v in loc):
            LOG.warning("%d rows of %r with an unreadable timestamp were uploaded; more than the cursor remembers "
                        "by key (%d): a row added later with an unreadable timestamp and a primary key below the "
                        "highest one is missed. Fix the writer's timestamps, or give the table a rowid.",
                        len(nulls), self.source.name, MAX_TIES)
            return None
        return nulls

    def _final_ties(self, mark: Watermark, window: Window, ties: list | None) -> list | None:
        """Primary keys already uploaded at the new watermark's timestamp (WITHOUT ROWID tables)."""
        if self.reader.has_rowid or window.top_key is None:
            return None
        ties = list(ties or [])
        if mark.ties is not None and mark.key == window.top_key:
            ties = mark.ties + ties
        if len(ties) > MAX_TIES:
            LOG.warning("%d rows share the timestamp at the cursor; a row added later with exactly that "
                        "timestamp and a smaller primary key than the last one sent will be missed.", len(ties))
            return None
        return ties

    def _read(self, connection: sqlite3.Connection, mark: Watermark, window: Window, limit: int,
              upper: list | None = None, check_end: tuple | None = None) -> tuple[RawBatch, ConversionReport]:
        """Read rows and turn each fetched chunk into an Arrow record batch of the target's types."""
        import pyarrow as pa

        if self.schema is None:
            proposed = pa.schema([(name, self.column_types[name]) for name in self.source.column_names])
            self.schema = self.target.prepare(proposed) if not self.transforms.aggregates else proposed
        names = self.source.column_names
        types = [self._target_type(name) for name in names]
        schema = pa.schema(list(zip(names, types)))
        report = ConversionReport()
        naive_tz = self.reader.naive_tz

        def convert(columns: Sequence[tuple]) -> Any:
            arrays = [to_arrow_column(values, kind, naive_tz, name, report)
                      for values, kind, name in zip(columns, types, names)]
            report.end_chunk()
            return pa.RecordBatch.from_arrays(arrays, schema=schema)

        if mark.order != "insertion":
            self._warmed_up()
            return self.reader.read_batch(connection, mark, window, limit, upper=upper, convert=convert), report
        native, version = None, None
        if self.native is not None and not window.filtered:
            # The driver reads on its own connection, before the snapshot below; data_version
            # tells whether anything was committed in between (then finish() compares rowids).
            version = connection.execute("PRAGMA data_version").fetchone()[0]
            try:
                native, version = self.native.fetch(self.reader, window, limit, upper, types, version)
            except NativeUnavailable as exc:
                LOG.debug("Batch read through Python: %s.", exc)
            if native is not None and upper is None:
                self._prefetch(connection, window, native, limit, types)
        # The check of the frontier, the read and the new fingerprint see one snapshot: rows
        # renumbered in between cannot slip into a batch.
        frontier, tail, columns = mark.frontier
        self._warmed_up()
        with read_transaction(connection):
            if self.reader.check_frontier(connection, frontier, tail, columns) != frontier:
                raise FrontierMoved(frontier)  # its row was deleted: plan again from below it
            if check_end is not None and upper is not None:
                end, end_tail, end_columns = check_end
                if self.reader.check_frontier(connection, end, end_tail, end_columns) != end:
                    raise FrontierMoved(end)
            raw = None
            if native is not None:
                same = connection.execute("PRAGMA data_version").fetchone()[0] == version
                native_report = ConversionReport()
                try:
                    raw = NativeReader.finish(connection, native, same, self.reader, window, limit, upper, types,
                                              schema, native_report)
                    report = native_report
                except NativeUnavailable as exc:
                    LOG.debug("Batch read through Python: %s.", exc)
            if raw is None:
                raw = self.reader.read_batch(connection, mark, window, limit, upper=upper, convert=convert)
            if raw.last_loc is not None:
                raw.tail, raw.tail_cols = self.reader.tail_at(connection, raw.last_loc[0])
        return raw, report

    def _ready_pyarrow(self) -> None:
        """Once, before the first planning scan: pyarrow's pandas probe answered without pandas
        where no pandas object can occur, else pandas imported in a thread meanwhile."""
        if self.pyarrow_ready is False:
            needed = pandas_needed(self.settings, self.transforms)
            self.pyarrow_ready = (not needed and skip_pandas_probe()) or start_pandas_import()

    def _warmed_up(self) -> None:
        if isinstance(self.pyarrow_ready, threading.Thread):
            self.pyarrow_ready.join()

    def _prefetch(self, connection: sqlite3.Connection, window: Window, native: NativeRead, limit: int,
                  types: Sequence[Any]) -> None:
        """Start the driver's read of the batch after this one, when the window goes on: it overlaps
        this batch's conversion and commit. If this batch ends elsewhere (read through Python,
        the frontier moved), the next read does not match and is made again."""
        assert self.native is not None
        rowids = native.table.column("__l0")
        if native.table.num_rows < limit or [rowids[-1].as_py()] == window.top:
            return
        version = connection.execute("PRAGMA data_version").fetchone()[0]  # before the read begins
        self.native.prefetch(self.reader, dataclasses.replace(window, done=[rowids[-1].as_py()]), limit, types,
                             version)

    def _convert(self, raw: RawBatch, report: ConversionReport, removed: TransformCounts
                 ) -> tuple[Any, int | None, int | None]:
        """The batch as one table: unreadable timestamps counted (and skipped), transforms applied."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if raw.count == 0:
            return None, None, None
        rows = pa.Table.from_batches(raw.chunks)
        if not self.transforms.aggregates:
            rows = self._with_originals(rows, raw, report)
        first_ts = last_ts = None
        ts_col = self.source.timestamp_col
        if ts_col:
            column = rows.column(ts_col)
            invalid = column.null_count
            report.invalid_timestamps = invalid
            if self.settings.invalid_timestamps == "skip":  # counted with the NULLs; their text is left out
                report.nulled.pop(ts_col, None)
                if rows.num_rows and ts_col + ORIGINAL_SUFFIX in rows.column_names:
                    rows = rows.set_column(rows.column_names.index(ts_col + ORIGINAL_SUFFIX),
                                           ts_col + ORIGINAL_SUFFIX, pa.nulls(rows.num_rows, pa.string()))
            if invalid and self.settings.invalid_timestamps == "skip":
                rows = rows.filter(pc.is_valid(column))
            if rows.num_rows:
                bounds = pc.min_max(rows.column(ts_col).cast(pa.int64()))
                first_ts, last_ts = bounds["min"].as_py(), bounds["max"].as_py()
        rows = apply_transforms(rows, self.transforms, removed)
        if self.transforms.aggregates and rows.num_rows:
            self.schema = self.target.prepare(rows.schema)
        return rows, first_ts, last_ts

    def _with_originals(self, rows: Any, raw: RawBatch, report: ConversionReport) -> Any:
        """Add <column>__original (text) for the columns whose values this batch could not hold, and
        for those that already have one in the target (every batch carries the target's columns)."""
        import pyarrow as pa

        chunks = report.chunks[len(report.chunks) - len(raw.chunks):]  # a read retried: its last chunks
        known = {n.lower() for n in self.schema.names} if self.schema is not None else set()
        skipped = self.source.timestamp_col if self.settings.invalid_timestamps == "skip" else None
        wanted = [name for name in self.source.column_names
                  if (any(name in kept for kept in chunks) and name != skipped)
                  or (name + ORIGINAL_SUFFIX).lower() in known]
        taken = {n.lower() for n in self.source.column_names}
        for name in wanted:
            column = name + ORIGINAL_SUFFIX
            if column.lower() in taken:
                continue  # the source has a column of that name: it is uploaded as it is
            pieces = [kept.get(name, pa.nulls(chunk.num_rows, pa.string()))
                      for kept, chunk in zip(chunks, raw.chunks)]
            rows = rows.append_column(pa.field(column, pa.string()), pa.chunked_array(pieces, pa.string()))
        if self.schema is not None and not {n.lower() for n in rows.column_names} <= known:
            self.schema = self.target.prepare(rows.schema)
        if self.schema is not None:  # in the target's order: a Databricks batch is matched by position
            place = {n.lower(): i for i, n in enumerate(self.schema.names)}
            rows = rows.select(sorted(rows.column_names, key=lambda n: place.get(n.lower(), len(place))))
        return rows

    def _target_type(self, name: str) -> Any:
        if self.schema is not None and not self.transforms.aggregates:
            for schema_field in self.schema:
                if schema_field.name.lower() == name.lower():
                    return schema_field.type
        return self.column_types[name]


def _done_future() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


def log_cycle(stats: CycleStats, mark: Watermark) -> None:
    rate = stats.rows_read / stats.seconds if stats.seconds > 0 else 0.0
    removed = stats.removed
    LOG.info(
        "Cycle done: %d read, %d uploaded in %d batch(es); removed by sanitize %d, filter %d, aggregate %d; "
        "timestamps %s .. %s; cursor at %s; %.2f s, %.0f rows/s; %d row(s) behind.",
        stats.rows_read, stats.rows_uploaded, stats.batches, removed.sanitize, removed.filter,
        removed.aggregate, micros_to_iso(stats.first_ts) or "-", micros_to_iso(stats.last_ts) or "-",
        micros_to_iso(mark.last_upload) or "start", stats.seconds, rate, stats.behind,
    )
    if stats.invalid_timestamps:
        LOG.warning("%d row(s) had a NULL or unreadable timestamp; they were %s.", stats.invalid_timestamps,
                    "skipped (invalid_timestamps: skip)" if stats.skipped_invalid else
                    "uploaded with a NULL timestamp (invalid_timestamps: upload)")
    for name, count in stats.nulled.items():
        LOG.warning("%d value(s) of column %r did not fit its type and were uploaded as NULL; the stored "
                    "values are kept as text in column %r.", count, name, name + ORIGINAL_SUFFIX)


def backoff_delay(failures: int, interval: float) -> float:
    """Exponential from 2 s, capped at the interval (at least 30 s), with full jitter."""
    cap = max(interval, 30.0)
    return random.uniform(0.5, 1.0) * min(cap, 2.0 * 2 ** (failures - 1))


def keep_node_id(settings: Settings) -> Settings:
    """Without NODE_ID the node is named by its host name, which a re-created container changes;
    the name this state file was written under is kept, so the node keeps its identity."""
    if settings.sources.get("node_id", "default") != "default":
        return settings
    with contextlib.suppress(ConfigError, OSError, AttributeError):
        stored = (StateFile(settings.state_dir).load() or {}).get("node_id")
        if isinstance(stored, str) and stored and stored != settings.node_id:
            LOG.info("Keeping node id %r from the state file (the host name is now %r); set NODE_ID to choose "
                     "one.", stored, settings.node_id)
            return dataclasses.replace(settings, node_id=stored)
    return settings


def start_uploader(settings: Settings, stop: threading.Event) -> Uploader:
    source = describe_source(settings)
    target = make_target(settings, default_table_name(settings, source.name))
    LOG.info("Uploading %s table %r (%s cursor%s) to %s.", settings.sqlite, source.name, settings.cursor,
             f" on {source.timestamp_col!r}" if settings.cursor == "timestamp" else "", target.describe())
    uploader = Uploader(settings, source, target, stop)
    try:
        uploader.prepare()
    except sqlite3.OperationalError as exc:
        target.close()
        if sqlite_locked(exc):
            raise TransientError(f"SQLite database {settings.sqlite} is locked by a writer: {exc}.") from None
        raise
    except BaseException:
        target.close()
        raise
    return uploader


def run_uploader(settings: Settings, stop: threading.Event) -> int:
    lock = lock_state_dir(settings, "uploader", stop)
    if lock is None:
        return EXIT_OK
    try:
        return upload_loop(settings, stop)
    finally:
        lock.release()


def upload_loop(settings: Settings, stop: threading.Event) -> int:
    settings = keep_node_id(settings)
    heartbeat = Heartbeat(settings.state_dir, heartbeat_stale_after(settings))
    failures = 0
    while True:  # start-up; in loop mode a lock or an unreachable target is waited out
        heartbeat.beat("starting")
        try:
            uploader = start_uploader(settings, stop)
            break
        except TransientError as exc:
            if settings.once:
                raise
            failures += 1
            heartbeat.failed()
            delay = backoff_delay(failures, settings.interval)
            LOG.error("Start-up failed (%s); retrying in %.0f s (attempt %d).", exc, delay, failures)
            pause(stop, delay, heartbeat, "backing off")
            if stop.is_set():
                return EXIT_OK
    target = uploader.target
    uploader.heartbeat = heartbeat
    failures = 0
    try:
        while not stop.is_set():
            heartbeat.beat("cycle")
            try:
                stats = uploader.run_cycle()
            except ConfigError:
                raise
            except (UploaderError, sqlite3.Error, OSError) as exc:
                failures += 1
                back_off(exc, failures, settings, heartbeat, stop, "Upload", "Cycle")
                continue
            failures = 0
            heartbeat.succeeded()
            assert uploader.state is not None
            log_cycle(stats, uploader.state.watermark)
            if settings.once:
                # Done when a window planned by this run is finished; a window resumed from an
                # interrupted run leaves newer rows behind it, so plan another.
                if (uploader.state.watermark.window is None and not stats.resumed) or stop.is_set():
                    if uploader.state_unsaved:
                        raise TransientError(f"Rows were uploaded, but the state file {uploader.state_file.path} "
                                             "could not be written (see above). The next run resumes from the "
                                             "target's record, without duplicates.")
                    break
                continue
            if uploader.state.watermark.window is None:
                pause(stop, settings.interval, heartbeat, "sleeping")
    finally:
        target.close()
    return EXIT_OK


def back_off(exc: BaseException, failures: int, settings: Settings, heartbeat: Heartbeat, stop: threading.Event,
             once_what: str, loop_what: str) -> None:
    """A failed cycle: a --once run stops with the error; loop mode waits (longer each time) and goes on."""
    heartbeat.failed()
    if settings.once:
        raise UploaderError(f"{once_what} failed: {exc}") from exc
    delay = backoff_delay(failures, settings.interval)
    LOG.error("%s failed (%s); retrying in %.0f s (attempt %d).", loop_what, exc, delay, failures)
    pause(stop, delay, heartbeat, "backing off")


def pause(stop: threading.Event, seconds: float, heartbeat: Heartbeat, phase: str) -> None:
    """Wait (ending early on a stop signal), beating the heartbeat as the wait goes on."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        heartbeat.beat(phase)
        left = deadline - time.monotonic()
        if left <= 0 or stop.wait(min(left, HEARTBEAT_EVERY)):
            return


# --- The loader of the landing path

def run_loader(settings: Settings, stop: threading.Event) -> int:
    """--load-landed: load what the nodes landed, every interval (or once), until stopped."""
    loader = LandedLoader(settings)
    # The same lock as an uploader's: heartbeat.json is one process's, so one process per state_dir.
    try:
        lock = lock_state_dir(settings, "loader", stop)
    except BaseException:
        loader.close()
        raise
    if lock is None:
        loader.close()
        return EXIT_OK
    heartbeat = Heartbeat(settings.state_dir, heartbeat_stale_after(settings))
    LOG.info("Loading landed files: %s.", loader.describe())
    failures = 0
    try:
        while not stop.is_set():
            heartbeat.beat("loading")
            try:
                stats = loader.run_once(stop)
            except ConfigError:
                raise
            except (UploaderError, OSError) as exc:
                failures += 1
                back_off(exc, failures, settings, heartbeat, stop, "Loading", "Loading")
                continue
            failures = 0
            heartbeat.succeeded()
            log_load(stats)
            if settings.once:
                break
            pause(stop, settings.interval, heartbeat, "sleeping")
    finally:
        loader.close()
        lock.release()
    return EXIT_OK


def log_load(stats: LoadStats) -> None:
    if not stats.files:
        LOG.info("Nothing to load%s.", f" ({stats.waiting} file(s) still landing)" if stats.waiting else "")
        return
    skipped = f", {stats.skipped_rows} already loaded by an interrupted run" if stats.skipped_rows else ""
    waiting = f"; {stats.waiting} file(s) still landing" if stats.waiting else ""
    LOG.info("Loaded %d file(s) from %d node(s) into %d table(s): %d row(s)%s, with %d SQL statement(s); removed "
             "%d file(s)%s.", stats.files, stats.nodes, stats.tables, stats.rows, skipped, stats.statements,
             stats.removed, waiting)


# --- Query mode

def run_query_mode(invocation: Invocation) -> int:
    settings = keep_node_id(invocation.settings)
    source_table = settings.sqlite_table_name
    app_id = None
    if settings.sqlite and os.path.exists(settings.sqlite):
        with contextlib.suppress(ConfigError):
            source_table = describe_source(settings).name
            app_id = app_id_for(settings.sqlite, source_table,
                                app_scope(settings, default_table_name(settings, source_table)))
    info = invocation.run_query.strip().upper() == "INFO"
    if settings.load_mode == "landing" and not info and settings.databricks_http_path:
        settings = dataclasses.replace(settings, load_mode="direct")  # SQL goes to the warehouse the loader uses
    if uses_databricks(settings) and not info and not (settings.databricks_table or source_table):
        table_name = ""  # plain SQL on Databricks names its own tables
    else:
        table_name = default_table_name(settings, source_table)
    target = make_target(settings, table_name)
    try:
        if info:
            lines = target.info(app_id)
            state = StateFile(settings.state_dir)
            with contextlib.suppress(ConfigError):
                data = state.load()
                if data:
                    lines.append(("state file", f"{state.path} (last_upload {data.get('last_upload')}, "
                                                f"batch {data.get('batch_seq')})"))
            print_rows([{"item": k, "value": v} for k, v in lines], invocation.output)
        else:
            table = target.run_query(invocation.run_query)
            print_rows(table.to_pylist(), invocation.output, [f.name for f in table.schema])
    finally:
        target.close()
    return EXIT_OK


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def print_rows(rows: list[dict], output: str, columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    out = sys.stdout
    if output == "json":
        json.dump(rows, out, default=_json_default, indent=2)
        out.write("\n")
    elif output == "csv":
        import csv

        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else _cell(row[c]) for c in columns])
    else:
        cells = [[_cell(row[c]) for c in columns] for row in rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        def line(values: list[str]) -> str:
            return " | ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip() + "\n"

        out.write(line(columns))
        out.write("-+-".join("-" * w for w in widths) + "\n")
        for row_cells in cells:
            out.write(line(row_cells))
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
    out.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "as_py"):
        return value.as_py()
    return str(value)


# --- Logging, signals, main

class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class SecretFilter(logging.Filter):
    """Last line of defence: a secret that reaches a log message is masked."""

    def __init__(self, secrets: Sequence[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, SECRET_MASK)
                record.msg, record.args = message, None
        return True


class RetryStatusHandler(logging.Handler):
    """Turns the connector's 'Received status code 503' notes into one clear line per minute."""

    MESSAGES: ClassVar[dict[str, str]] = {
        "503": "Databricks answered HTTP 503: the SQL warehouse is starting or unavailable. The connector "
               "waits and retries (up to databricks_retry_timeout); nothing is lost meanwhile.",
        "429": "Databricks answered HTTP 429 (too many requests): the connector waits as asked and retries.",
    }

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"Received status code (\d{3})", record.getMessage())
        if not match or match.group(1) not in self.MESSAGES:
            return
        code, now = match.group(1), time.monotonic()
        if now - self.last.get(code, -1e9) >= 60:
            self.last[code] = now
            LOG.warning(self.MESSAGES[code])


def configure_logging(level: str = "INFO", fmt: str = "text", secrets: Sequence[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(SecretFilter(secrets))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
    # The connector and urllib3 log their own retries and failures; the uploader reports the
    # outcome itself, so theirs are shown (through the same masking handler) only when debugging.
    for name in ("databricks", "urllib3", "thrift"):
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(logging.WARNING if level == "DEBUG" else logging.CRITICAL)
        library.propagate = False
    # ...except the one thing worth saying while the connector waits: why it waits.
    retries = logging.getLogger("databricks.sql.auth.retry")
    retries.handlers[:] = [RetryStatusHandler()]
    retries.setLevel(logging.INFO)
    retries.propagate = False


def install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():  # second signal: the user insists
            os._exit(128 + signum)
        LOG.info("Received %s: finishing the batch in flight, then stopping.", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)


# `uv run -s` runs the script as its child and forwards SIGTERM/SIGINT to it, but a SIGKILL of uv
# leaves the child running, and a supervisor then starts a second uploader beside it. The child
# watches its parent and takes the parent's death for a SIGTERM (a second one, after a SIGTERM
# forwarded first, ends it at once). Polling getppid() rather than prctl(PR_SET_PDEATHSIG): that
# fires when the parent *thread* that started us ends, and uv is multi-threaded. Only under uv: a
# script started by a shell with nohup or & must outlive that shell.
PARENT_POLL_EVERY = 1.0


def parent_is_uv(parent: int) -> bool:
    try:
        name = Path(f"/proc/{parent}/comm").read_text(encoding="utf-8").strip()
    except OSError:  # no /proc (macOS): uv marks the processes it runs
        return "UV_RUN_RECURSION_DEPTH" in os.environ
    return name in ("uv", "uvx")


def follow_uv_parent() -> None:
    parent = os.getppid()
    if parent <= 1 or not parent_is_uv(parent):
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_EVERY)
        LOG.warning("The uv process that ran this script (pid %d) is gone; stopping as on SIGTERM.", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# A batch's column buffers are megabytes each, and are freed once it commits. glibc maps blocks
# that large on their own (unmapped when freed) only until the first one is freed: then it raises
# its threshold, up to 32 MiB, and serves them from the heap, where the buffers of the batches in
# flight (read ahead, converting, committing) fragment it and stay resident: draining 1M or 5M
# rows peaked 10-13 MB higher that way (bench/drain_delta.py). The page faults of fresh mappings
# cost about 1% of a drain's CPU time. Python's own small objects are not affected.
LARGE_BLOCK_BYTES = 64 * 1024
M_MMAP_THRESHOLD = -3  # mallopt()'s parameter number, from glibc's malloc.h


def keep_large_blocks_mapped() -> bool:
    """Fix glibc's threshold for mapping a block on its own at LARGE_BLOCK_BYTES. Not on other C
    libraries (musl unmaps large blocks already; macOS has no mallopt), and not when the
    environment sets MALLOC_MMAP_THRESHOLD_: that is the user's own tuning. True when set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        import ctypes

        return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc symbol
        return False


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    keep_large_blocks_mapped()
    try:
        invocation = load_settings(argv)
        settings = invocation.settings
        configure_logging(settings.log_level, settings.log_format,
                          [settings.databricks_token or "", settings.databricks_client_secret or ""])
        LOG.debug("Settings: %s", settings)
        if invocation.healthcheck:
            healthy, message = check_health(settings.state_dir)
            print(message)
            return EXIT_OK if healthy else EXIT_FAILURE
        if invocation.run_query is not None:
            return run_query_mode(invocation)
        stop = threading.Event()
        install_signal_handlers(stop)
        follow_uv_parent()
        if invocation.load_landed:
            return run_loader(settings, stop)
        return run_uploader(settings, stop)
    except UploaderError as exc:
        LOG.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    code = main()
    # delta-rs / pyarrow IO threads can abort the interpreter at exit (see the README);
    # everything is flushed and committed by now, so leave without finalisers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
