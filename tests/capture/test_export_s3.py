"""The export to S3 (``s3://bucket/prefix``), against moto's S3 server started by the test."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import boto3
import psycopg
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from conftest import drop_database
from export_rows import changes_rows, dataset_rows, fill, more, run_and_kill
from moto.server import ThreadedMotoServer
from psycopg import sql

from capture.errors import ConfigurationError, SourceError
from capture.export import export_parquet
from capture.export.dataset import list_dataset_files, read_dataset, read_dataset_state, resolve_directory
from capture.export.lock import open_lock

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}")
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)
    client.close()


def _uri(endpoint: str, bucket: str) -> str:
    return f"s3://{bucket}/exports/bemi?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _keys(endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    try:
        return [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        client.close()


def test_export_to_s3_is_incremental_exact_and_compactable(dsn: str, s3_endpoint: str, bucket: str) -> None:
    uri = _uri(s3_endpoint, bucket)
    rows = fill(dsn, 900)
    assert export_parquet(dsn, uri, batch_rows=300, progress=False).changes == 900
    more(dsn, rows, 250)
    stats = export_parquet(dsn, uri, batch_rows=300, compact=True, progress=False)
    assert (stats.changes, stats.compacted_files > 0) == (250, True)
    assert dataset_rows(read_dataset(uri)) == changes_rows(dsn)

    filesystem, paths = list_dataset_files(uri)
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert pads.dataset(paths, filesystem=filesystem, format="parquet").count_rows() == 1150


def test_s3_holds_only_whole_data_objects_and_no_directory_markers_or_lock(
    dsn: str, s3_endpoint: str, bucket: str
) -> None:
    fill(dsn, 300)
    export_parquet(dsn, _uri(s3_endpoint, bucket), batch_rows=100, progress=False)
    keys = _keys(s3_endpoint, bucket)
    meta = {"exports/bemi/_bemi_tt/schemas.pq", "exports/bemi/_bemi_tt/dataset.json"}
    assert meta <= set(keys)
    data = [k for k in keys if k not in meta]
    assert data
    assert all(k.startswith("exports/bemi/relation=") and k.endswith(".parquet") for k in data)


def test_an_s3_lease_makes_a_second_export_fail_clearly(dsn: str, s3_endpoint: str, bucket: str) -> None:
    uri = _uri(s3_endpoint, bucket)
    fill(dsn, 10)
    filesystem, root = resolve_directory(uri)
    with open_lock(uri, filesystem, root) as held:
        held.acquire(0)
        with pytest.raises(
            SourceError, match=r"another export or compaction is running on .s3://.*lease held by"
        ):
            export_parquet(dsn, uri, progress=False)
    assert export_parquet(dsn, uri, progress=False).changes == 10


def test_an_expired_s3_lease_is_taken_over_and_its_old_holder_cannot_renew(
    dsn: str, s3_endpoint: str, bucket: str
) -> None:
    uri = _uri(s3_endpoint, bucket)
    fill(dsn, 10)
    filesystem, root = resolve_directory(uri)
    stale = open_lock(uri, filesystem, root, lease_seconds=0.0)
    stale.acquire(0)  # a holder that died: its lease is already over
    time.sleep(0.01)
    assert export_parquet(dsn, uri, progress=False).changes == 10
    with pytest.raises(SourceError, match="lost the export lock"):
        stale.renew()
    stale.release()


def test_an_unreadable_s3_lease_counts_as_expired(dsn: str, s3_endpoint: str, bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}")
    client.put_object(Bucket=bucket, Key="exports/bemi/_bemi_tt/lock", Body=json.dumps({"owner": 1}).encode())
    client.close()
    fill(dsn, 5)
    assert export_parquet(dsn, _uri(s3_endpoint, bucket), progress=False).changes == 5


def test_a_kill_during_an_s3_export_then_a_rerun_gives_exactly_the_changes(
    dsn: str, s3_endpoint: str, bucket: str
) -> None:
    uri = _uri(s3_endpoint, bucket)
    fill(dsn, 1200)
    code = f"import capture.export as e; e.export_parquet({dsn!r}, {uri!r}, batch_rows=300, lease_seconds=1)"

    def mid_unit() -> bool:
        state = read_dataset_state(*resolve_directory(uri))
        return state.watermark is not None and state.incomplete is not None

    run_and_kill(code, mid_unit)
    expected = changes_rows(dsn)
    assert "exports/bemi/_bemi_tt/lock" in _keys(s3_endpoint, bucket)  # the dead exporter's lease
    before = dataset_rows(read_dataset(uri))
    assert before == expected[: len(before)]

    stats = export_parquet(dsn, uri, progress=False, wait=60)  # waits the lease out, then takes it over
    assert stats.changes == len(expected) - len(before)
    assert dataset_rows(read_dataset(uri)) == expected
    assert read_dataset_state(*resolve_directory(uri)).incomplete is None


def test_a_running_exports_lease_is_kept_alive_past_its_length_by_the_heartbeat(
    s3_endpoint: str, bucket: str
) -> None:
    uri = _uri(s3_endpoint, bucket)
    filesystem, root = resolve_directory(uri)
    with open_lock(uri, filesystem, root, lease_seconds=2.0) as held:
        held.acquire(0)
        time.sleep(3.0)  # longer than the lease: only the heartbeat keeps it
        with pytest.raises(SourceError, match="lease held by"):
            open_lock(uri, filesystem, root).acquire(0)
        held.renew()
    assert "exports/bemi/_bemi_tt/lock" not in _keys(s3_endpoint, bucket)


def test_an_s3_export_refuses_another_databases_prefix_and_foreign_objects(
    dsn: str, database: str, pg_server, s3_endpoint: str, bucket: str  # type: ignore[no-untyped-def]
) -> None:
    uri = _uri(s3_endpoint, bucket)
    fill(dsn, 100)
    export_parquet(dsn, uri, progress=False)
    other = f"{database}_s3other"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        fill(pg_server.dsn(other), 100, seed=5)
        before = _keys(s3_endpoint, bucket)
        with pytest.raises(ConfigurationError, match=rf"holds the export of table public.changes of database "
                           rf"'{database}'.*not of table public.changes of database '{other}'"):
            export_parquet(pg_server.dsn(other), uri, progress=False)
        assert _keys(s3_endpoint, bucket) == before
    finally:
        drop_database(pg_server, other)

    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}")
    client.put_object(Bucket=bucket, Key="exports/bemi/other/part-0.parquet", Body=b"x")
    client.close()
    with pytest.raises(ConfigurationError, match=r"holds 1 files that are not part of a bemi_tt export "
                       r"\('other/part-0.parquet'\)"):
        export_parquet(dsn, uri, progress=False)
