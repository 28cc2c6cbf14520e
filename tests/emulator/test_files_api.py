"""The Databricks Files API of the emulator through the real databricks-sdk (`WorkspaceClient.files`).

Same volumes as SQL's PUT/GET/REMOVE and COPY INTO; same auth and fault machinery as the Thrift
side. The fault tests also pin down the SDK's retry behaviour that the uploader's landing path
relies on (see tools/README.md, "Files API").
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import databricks.sdk as sdk  # tests/requirements.txt: a missing SDK must fail, not skip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from databricks.sdk.core import Config
from databricks.sdk.errors import AlreadyExists, BadRequest, NotFound, PermissionDenied
from emulator_harness import Emulator

NODE_TOKEN = "landing-node-token-write-only"  # not a secret: a token the admin API grants WRITE VOLUME


def client(emulator: Emulator, token: str | None = None, **config: Any) -> Any:
    """A real WorkspaceClient on the emulator; a short retry budget unless a test says otherwise."""
    config.setdefault("retry_timeout_seconds", 30)
    return sdk.WorkspaceClient(config=Config(host=emulator.url, token=token or emulator.token, **config))


@pytest.fixture
def volume(cur: Any, schema: str) -> str:
    cur.execute(f"CREATE VOLUME IF NOT EXISTS main.{schema}.land")
    return f"/Volumes/main/{schema}/land"


@pytest.fixture
def files(emulator: Emulator) -> Any:
    return client(emulator).files


def client_label(token: str) -> str:
    """The per-client key of /admin/stats for requests without an X-Emulator-Client header."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def raw(emulator: Emulator, method: str, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(emulator.url + path, method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


# ---- the API ----
def test_upload_download_metadata_round_trip(emulator: Emulator, files: Any, volume: str, schema: str) -> None:
    payload = bytes(range(256)) * 400
    files.upload(f"{volume}/node-a/batch-1.bin", io.BytesIO(payload), overwrite=False)
    # Same storage as SQL's PUT and COPY INTO; parent directories were made implicitly.
    assert (emulator.volume_dir("main", schema, "land") / "node-a" / "batch-1.bin").read_bytes() == payload
    got = files.download(f"{volume}/node-a/batch-1.bin")
    assert got.contents.read() == payload
    assert got.content_length == len(payload)
    meta = files.get_metadata(f"{volume}/node-a/batch-1.bin")
    assert meta.content_length == len(payload)
    assert meta.content_type == "application/octet-stream"
    assert meta.last_modified.endswith("GMT")
    stats = emulator.stats()
    assert stats["files"] == {"PUT": 1, "GET": 1, "HEAD": 1}
    assert stats["statements_total"] >= 1  # the fixture's CREATE SCHEMA / VOLUME


def test_overwrite_false_conflicts_and_overwrite_replaces(files: Any, volume: str) -> None:
    path = f"{volume}/x.bin"
    files.upload(path, io.BytesIO(b"one"), overwrite=False)
    with pytest.raises(AlreadyExists):
        files.upload(path, io.BytesIO(b"two"), overwrite=False)
    assert files.download(path).contents.read() == b"one"
    files.upload(path, io.BytesIO(b"two"), overwrite=True)
    assert files.download(path).contents.read() == b"two"
    files.upload(path, io.BytesIO(b"three"))  # unspecified: overwrite, as Databricks documents
    assert files.download(path).contents.read() == b"three"


def test_upload_is_atomic(emulator: Emulator, files: Any, volume: str) -> None:
    """While an upload is in flight (its body received, held by a delay), readers see no file, no
    partial file and no temp file; then the whole file at once."""
    emulator.set_faults({"kind": "delay", "delay": 2, "scope": "files", "method": "PUT"})
    payload = b"p" * (8 << 20)
    uploader = threading.Thread(target=files.upload, args=(f"{volume}/atomic/f.bin", io.BytesIO(payload)))
    uploader.start()
    time.sleep(1)
    with pytest.raises(NotFound):
        files.get_metadata(f"{volume}/atomic/f.bin")
    with pytest.raises(NotFound):  # not even the parent directory yet
        list(files.list_directory_contents(f"{volume}/atomic"))
    assert list(files.list_directory_contents(volume)) == []
    uploader.join(30)
    assert files.get_metadata(f"{volume}/atomic/f.bin").content_length == len(payload)


def test_list_directory_pages(emulator: Emulator, files: Any, volume: str) -> None:
    emulator.set_config(files_list_page_size=2)
    for i in range(5):
        files.upload(f"{volume}/d/f{i}.bin", io.BytesIO(b"x" * i))
    files.create_directory(f"{volume}/d/sub")
    entries = list(files.list_directory_contents(f"{volume}/d"))
    assert [e.name for e in entries] == ["f0.bin", "f1.bin", "f2.bin", "f3.bin", "f4.bin", "sub"]
    f3 = entries[3]
    assert (f3.path, f3.is_directory, f3.file_size) == (f"{volume}/d/f3.bin", False, 3)
    assert f3.last_modified > (time.time() - 600) * 1000
    assert (entries[-1].is_directory, entries[-1].path) == (True, f"{volume}/d/sub/")
    # 6 entries at 2 per page: three GETs, each following next_page_token.
    assert emulator.stats()["files"]["GET"] == 3
    status, page = raw(emulator, "GET", f"/api/2.0/fs/directories{volume}/d?page_size=1", emulator.token)
    assert status == 200 and len(page["contents"]) == 1 and page["next_page_token"]


def test_directories_and_delete(files: Any, volume: str) -> None:
    files.create_directory(f"{volume}/a/b")
    files.create_directory(f"{volume}/a/b")  # idempotent, like mkdir -p
    files.get_directory_metadata(f"{volume}/a/b")
    files.upload(f"{volume}/a/b/f.bin", io.BytesIO(b"f"))
    with pytest.raises(BadRequest, match="not empty"):
        files.delete_directory(f"{volume}/a")
    files.delete(f"{volume}/a/b/f.bin")
    files.delete_directory(f"{volume}/a/b")
    files.delete_directory(f"{volume}/a")
    with pytest.raises(NotFound):
        files.get_directory_metadata(f"{volume}/a")


def test_not_found(files: Any, volume: str, schema: str) -> None:
    with pytest.raises(NotFound):
        files.download(f"{volume}/missing.bin").contents.read()
    with pytest.raises(NotFound):
        files.get_metadata(f"{volume}/missing.bin")
    with pytest.raises(NotFound):
        files.delete(f"{volume}/missing.bin")
    with pytest.raises(NotFound):
        list(files.list_directory_contents(f"{volume}/missing"))
    with pytest.raises(NotFound, match="does not exist"):  # the volume must exist (CREATE VOLUME)
        files.upload(f"/Volumes/main/{schema}/no_such_volume/x.bin", io.BytesIO(b"x"))


def test_sql_put_and_sdk_share_the_volume(files: Any, cur: Any, volume: str, tmp_path: Any) -> None:
    cur.execute(f"PUT '__input_stream__' INTO '{volume}/sql/a.txt'", input_stream=io.BytesIO(b"from sql"))
    assert files.download(f"{volume}/sql/a.txt").contents.read() == b"from sql"
    files.upload(f"{volume}/sql/b.txt", io.BytesIO(b"from sdk"))
    cur.execute(f"GET '{volume}/sql/b.txt' TO '{tmp_path / 'b.txt'}'")
    assert (tmp_path / "b.txt").read_bytes() == b"from sdk"


# ---- auth ----
def test_auth_refused(emulator: Emulator, volume: str) -> None:
    with pytest.raises(PermissionDenied, match="Invalid access token"):
        client(emulator, token="wrong-token").files.upload(f"{volume}/x.bin", io.BytesIO(b"x"))
    status, body = raw(emulator, "GET", f"/api/2.0/fs/directories{volume}", None)
    assert status == 401 and body["error_code"] == "UNAUTHENTICATED"
    status, body = raw(emulator, "HEAD", f"/api/2.0/fs/files{volume}/x.bin", "wrong-token")
    assert status == 403


def test_oauth_m2m(emulator: Emulator, volume: str) -> None:
    w = sdk.WorkspaceClient(config=Config(host=emulator.url, client_id=emulator.client_id,
                                          client_secret=emulator.client_secret, retry_timeout_seconds=30))
    w.files.upload(f"{volume}/sp.bin", io.BytesIO(b"sp"))
    assert [e.name for e in w.files.list_directory_contents(volume)] == ["sp.bin"]


def test_write_only_grant(emulator: Emulator, volume: str) -> None:
    emulator.set_config(volume_grants={NODE_TOKEN: ["WRITE VOLUME"]})
    node = client(emulator, token=NODE_TOKEN).files
    node.upload(f"{volume}/node/b1.bin", io.BytesIO(b"b1"), overwrite=False)
    node.create_directory(f"{volume}/node/more")
    for read in (lambda: node.download(f"{volume}/node/b1.bin").contents.read(),
                 lambda: node.get_metadata(f"{volume}/node/b1.bin"),
                 lambda: list(node.list_directory_contents(f"{volume}/node"))):
        with pytest.raises(PermissionDenied):
            read()
    node.delete(f"{volume}/node/b1.bin")
    # The node ran no SQL at all; its file requests are counted under its own label.
    mine = emulator.stats()["clients"][client_label(NODE_TOKEN)]
    assert mine["statements"] == 0 and mine["rpc"] == 0
    assert mine["files"]["PUT"] == 2 and mine["files"]["DELETE"] == 1
    status, body = raw(emulator, "GET", f"/api/2.0/fs/directories{volume}", NODE_TOKEN)
    assert status == 403 and body["error_code"] == "PERMISSION_DENIED" and "READ VOLUME" in body["message"]


def test_stats_per_client_label(emulator: Emulator, volume: str) -> None:
    """A benchmark names its clients in User-Agent: landing nodes (SDK) and the loader (connector)."""
    cfg = Config(host=emulator.url, token=emulator.token, retry_timeout_seconds=30)
    node = sdk.WorkspaceClient(config=cfg.with_user_agent_extra("emulator-client", "node-7")).files
    node.upload(f"{volume}/n7.bin", io.BytesIO(b"7"))
    with emulator.connect(user_agent_entry="emulator-client/loader") as conn, conn.cursor() as c:
        c.execute("SELECT 1")
    clients = emulator.stats()["clients"]
    assert clients["node-7"]["statements"] == 0 and clients["node-7"]["files"] == {"PUT": 1}
    assert clients["loader"]["statements"] == 1 and clients["loader"]["files_total"] == 0


# ---- faults, and what the SDK does about them ----
def test_503_and_429_are_retried(emulator: Emulator, files: Any, volume: str) -> None:
    emulator.set_faults({"kind": "unavailable", "count": 2, "scope": "files", "method": "PUT"},
                        {"kind": "throttle", "count": 1, "scope": "files", "method": "GET", "retry_after": 1})
    files.upload(f"{volume}/r.bin", io.BytesIO(b"r"), overwrite=False)
    assert files.download(f"{volume}/r.bin").contents.read() == b"r"
    stats = emulator.stats()
    assert stats["files"]["PUT"] == 3 and stats["files"]["GET"] == 2
    assert stats["faults_fired"] == {"unavailable": 2, "throttle": 1}


def test_retry_budget_bounds_a_503_storm(emulator: Emulator, volume: str) -> None:
    emulator.set_faults({"kind": "unavailable", "seconds": 30, "scope": "files"})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client(emulator, retry_timeout_seconds=3).files.upload(f"{volume}/storm.bin", io.BytesIO(b"s"))
    assert time.monotonic() - started < 10


def test_delay_and_drop_before_processing(emulator: Emulator, files: Any, volume: str) -> None:
    emulator.set_faults({"kind": "delay", "delay": 1, "scope": "files", "method": "PUT"},
                        {"kind": "drop", "scope": "files", "method": "PUT", "path": "/dropped.bin"})
    started = time.monotonic()
    files.upload(f"{volume}/slow.bin", io.BytesIO(b"s"), overwrite=False)
    assert time.monotonic() - started >= 1
    # Nothing was written before the drop; the SDK re-sends and the first write wins.
    files.upload(f"{volume}/dropped.bin", io.BytesIO(b"d"), overwrite=False)
    assert files.download(f"{volume}/dropped.bin").contents.read() == b"d"
    assert emulator.stats()["http"]["dropped"] == 1


def test_drop_after_write_overwrite_false_retry_gets_409(emulator: Emulator, files: Any, volume: str) -> None:
    """The upload landed, the answer was lost: the SDK re-sends the PUT, which now conflicts. A
    caller using overwrite=False must treat AlreadyExists after a retry as 'maybe mine' and compare."""
    emulator.set_faults({"kind": "drop_after_write", "count": 1})
    with pytest.raises(AlreadyExists):
        files.upload(f"{volume}/once.bin", io.BytesIO(b"batch"), overwrite=False)
    assert files.download(f"{volume}/once.bin").contents.read() == b"batch"
    stats = emulator.stats()
    assert stats["files"]["PUT"] == 2 and stats["faults_fired"]["drop_after_write"] == 1


def test_drop_after_write_overwrite_true_is_silent(emulator: Emulator, files: Any, volume: str) -> None:
    emulator.set_faults({"kind": "drop_after_write", "count": 1, "method": "PUT"})
    files.upload(f"{volume}/twice.bin", io.BytesIO(b"same bytes"), overwrite=True)
    assert files.download(f"{volume}/twice.bin").contents.read() == b"same bytes"
    assert emulator.stats()["files"]["PUT"] == 2


def test_drop_after_delete_retry_gets_404(emulator: Emulator, files: Any, volume: str) -> None:
    files.upload(f"{volume}/gone.bin", io.BytesIO(b"g"))
    emulator.set_faults({"kind": "drop_after_write", "count": 1, "method": "DELETE"})
    with pytest.raises(NotFound):
        files.delete(f"{volume}/gone.bin")
    with pytest.raises(NotFound):
        files.get_metadata(f"{volume}/gone.bin")


def test_refused_connections_are_retried(emulator: Emulator, files: Any, volume: str) -> None:
    # `files` (its client read the host metadata already) exists before the port closes.
    emulator.set_faults({"kind": "refuse", "seconds": 2})
    time.sleep(0.3)
    files.upload(f"{volume}/after-refuse.bin", io.BytesIO(b"a"), overwrite=False)
    emulator.wait_until_up()
    assert files.download(f"{volume}/after-refuse.bin").contents.read() == b"a"


def test_without_endpoints_api_large_uploads_fall_back_to_one_put(emulator: Emulator, files: Any,
                                                                  volume: str) -> None:
    """A workspace that does not serve /api/2.0/fs/endpoints: the SDK tries a multipart upload with
    presigned URLs for >= 50 MiB, is refused the part URLs, and sends one PUT."""
    emulator.set_config(files_endpoints="none")
    big = b"0123456789abcdef" * (4 << 20)  # 64 MiB
    files.upload(f"{volume}/big.bin", io.BytesIO(big), overwrite=True)
    assert files.get_metadata(f"{volume}/big.bin").content_length == len(big)
    stats = emulator.stats()
    # One session started (POST initiate-upload), its part URLs refused, then the one PUT.
    assert stats["files"]["PUT"] == 1 and stats["files"]["POST"] >= 1
    assert stats["http"]["fs_presigned_refused"] >= 1


# ---- landing: files from the SDK, loaded once by COPY INTO through the connector ----
def _parquet(ids: range) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(list(ids), pa.int64())}), buf)
    return buf.getvalue()


def test_copy_into_landed_files_once(emulator: Emulator, files: Any, cur: Any, schema: str, volume: str) -> None:
    files.upload(f"{volume}/node-a/batch-1.parquet", io.BytesIO(_parquet(range(0, 10))), overwrite=False)
    files.upload(f"{volume}/node-b/batch-7.parquet", io.BytesIO(_parquet(range(10, 15))), overwrite=False)
    cur.execute(f"CREATE TABLE main.{schema}.t (id BIGINT)")
    copy = (f"COPY INTO main.{schema}.t FROM '{volume}' FILEFORMAT = PARQUET "
            "FILES = ('node-a/batch-1.parquet', 'node-b/batch-7.parquet')")
    cur.execute(copy)
    assert cur.fetchall()[0].num_inserted_rows == 15
    history = emulator.copy_history(schema, "t")
    assert set(history) == {f"{volume}/node-a/batch-1.parquet", f"{volume}/node-b/batch-7.parquet"}
    # Deleted and uploaded again under the same name (other rows even): still skipped by path.
    files.delete(f"{volume}/node-a/batch-1.parquet")
    files.upload(f"{volume}/node-a/batch-1.parquet", io.BytesIO(_parquet(range(100, 103))), overwrite=False)
    cur.execute(copy)
    assert cur.fetchall()[0].num_inserted_rows == 0
    files.upload(f"{volume}/node-c/batch-2.parquet", io.BytesIO(_parquet(range(20, 24))), overwrite=False)
    cur.execute(f"COPY INTO main.{schema}.t FROM '{volume}' FILEFORMAT = PARQUET PATTERN = '*/batch-*.parquet'")
    assert cur.fetchall()[0].num_inserted_rows == 4
    cur.execute(f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM main.{schema}.t")
    assert tuple(cur.fetchall()[0]) == (19, 19)
