"""One export (or compaction) at a time per dataset directory.

* Local directories: ``DIR/_bemi_tt/lock`` held with ``fcntl.flock``; the kernel releases it when the
  process dies, even on SIGKILL, so a crash never leaves a stale lock.
* S3: a lease object ``DIR/_bemi_tt/lock`` created with a conditional PUT (``If-None-Match: *``) and
  renewed (a heartbeat every quarter of ``lease_seconds``, and before every unit) or released with
  ``If-Match: <etag>``; a lease whose holder died expires after ``lease_seconds`` (its holder's clock)
  and is taken over with ``If-Match`` too, so two exporters can never both win.
  Needs ``boto3`` (pyarrow's S3 filesystem cannot make conditional requests).
* Other filesystems have no lock: pass ``lock=False`` and make sure only one export runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from capture.errors import ConfigurationError, SourceError

__all__ = ["DatasetLock", "open_lock"]

LOCK_NAME = "_bemi_tt/lock"
_POLL_SECONDS = 0.2


class DatasetLock:
    """No-op lock, and the interface of the real ones: a context manager with ``renew()``."""

    def acquire(self, wait: float) -> None:
        """Take the lock, waiting up to ``wait`` seconds for another holder to finish."""

    def renew(self) -> None:
        """Prove the lock is still held before more writes (extends an S3 lease)."""

    def release(self) -> None:
        """Give the lock up."""

    def __enter__(self) -> DatasetLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _busy(root: str, holder: str) -> SourceError:
    return SourceError(
        f"another export or compaction is running on {root!r} ({holder}); "
        "wait for it to finish or pass a longer wait"
    )


class _LocalLock(DatasetLock):
    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, *LOCK_NAME.split("/"))
        self.fd: int | None = None

    def acquire(self, wait: float) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown holder"
                    os.close(fd)
                    raise _busy(self.root, holder) from None
                time.sleep(_POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _s3_client_options(directory: str) -> dict[str, Any]:
    query = {k: v[-1] for k, v in parse_qs(urlsplit(directory).query).items()}
    options: dict[str, Any] = {}
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        if "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        options["endpoint_url"] = endpoint
    if "region" in query:
        options["region_name"] = query["region"]
    return options


class _S3Lease(DatasetLock):
    def __init__(self, directory: str, root: str, lease_seconds: float) -> None:
        try:
            import boto3
            from botocore.exceptions import ClientError
        except ImportError as exc:
            raise ConfigurationError(
                "locking an s3:// export directory needs boto3: pip install boto3, "
                "or pass lock=False if only one export ever runs on it"
            ) from exc
        self.client_error = ClientError
        self.client = boto3.client("s3", **_s3_client_options(directory))
        self.bucket, _, prefix = root.partition("/")
        self.key = f"{prefix.strip('/')}/{LOCK_NAME}" if prefix.strip("/") else LOCK_NAME
        self.root = root
        self.lease_seconds = lease_seconds
        self.owner = f"{uuid.uuid4().hex} pid {os.getpid()} on {socket.gethostname()}"
        self.etag: str | None = None
        self.lost: SourceError | None = None
        self.mutex = threading.Lock()
        self.stop = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_seconds}).encode()

    def _code(self, exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _try_acquire(self) -> str | None:
        """Returns None when acquired, else a description of the holder."""
        try:
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*"
            )
            self.etag = reply["ETag"]
            return None
        except self.client_error as exc:
            if self._code(exc) not in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                raise SourceError(
                    f"cannot create the export lock s3://{self.bucket}/{self.key}: {exc}"
                ) from exc
        try:
            current = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client_error as exc:
            if self._code(exc) in {"NoSuchKey", "404"}:
                return "lock released meanwhile"
            raise SourceError(f"cannot read the export lock s3://{self.bucket}/{self.key}: {exc}") from exc
        try:
            holder = json.loads(current["Body"].read())
            expires, owner = float(holder["expires"]), str(holder["owner"])
        except (ValueError, KeyError, TypeError):
            expires, owner = 0.0, "unreadable lease"
        if expires > time.time():
            return f"lease held by {owner} for {expires - time.time():.0f} more s"
        try:  # the holder died: take the expired lease over, unless someone else just did
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=current["ETag"]
            )
            self.etag = reply["ETag"]
            return None
        except self.client_error:
            return f"expired lease of {owner} taken over by another export"

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while (holder := self._try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise _busy(f"s3://{self.root}", holder)
            time.sleep(_POLL_SECONDS)
        self.heartbeat = threading.Thread(target=self._beat, name="bemi_tt_export_lease", daemon=True)
        self.heartbeat.start()

    def _beat(self) -> None:
        """Extend the lease every quarter of its length while the export runs."""
        while not self.stop.wait(max(self.lease_seconds / 4, 0.2)):
            try:
                self._extend()
            except SourceError as exc:
                self.lost = exc
                return

    def _extend(self) -> None:
        with self.mutex:
            try:
                reply = self.client.put_object(
                    Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self.etag
                )
            except self.client_error as exc:
                raise SourceError(
                    f"lost the export lock s3://{self.bucket}/{self.key} (lease expired and taken over); "
                    "rerun the export, it resumes from the dataset's watermark"
                ) from exc
            self.etag = reply["ETag"]

    def renew(self) -> None:
        if self.lost is not None:
            raise self.lost
        self._extend()

    def release(self) -> None:
        self.stop.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
            self.heartbeat = None
        if self.etag is not None:
            with contextlib.suppress(self.client_error):  # taken over after expiry: not ours to delete
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            self.etag = None


def open_lock(
    directory: str,
    filesystem: pafs.FileSystem,
    root: str,
    *,
    enabled: bool = True,
    lease_seconds: float = 60.0,
) -> DatasetLock:
    """The lock implementation for a dataset directory (not yet acquired)."""
    if not enabled:
        return DatasetLock()
    if isinstance(filesystem, pafs.LocalFileSystem):
        return _LocalLock(root)
    if isinstance(filesystem, pafs.S3FileSystem):
        return _S3Lease(directory, root, lease_seconds)
    raise ConfigurationError(
        f"no lock for the {filesystem.type_name!r} filesystem of {directory!r}; pass lock=False "
        "if only one export ever runs on it"
    )
