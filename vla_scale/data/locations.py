"""Where a dataset lives: a local folder, `s3://bucket/prefix`, `http(s)://base/url` or `pipe:CMD`.

Datasets at the scale vla_scale trains on sit in object storage or behind HTTP, not on every
node's disk. A `Location` reads any file of a dataset by its path relative to the dataset root
(`manifest.json`, `stats.json`, `shard-000000.tar`) with retries and exponential backoff on
transient failures (HTTP 5xx/429, connection reset or dropped mid-body, timeouts, a pipe command
that exits non-zero or is silent for `timeout_s`); a file that stays unreachable raises `Unreachable`, naming
the URL, so the bad-sample policy counts or refuses it like a corrupt local shard.

- `s3://bucket/prefix`: boto3, credentials from the standard chain (env, ~/.aws, instance role);
  endpoint from `AWS_ENDPOINT_URL` or `endpoint_url` in the AWS config file's profile, else AWS.
- `http(s)://host/base`: GET `base/<file>` (stdlib urllib; a retry resumes with a Range request).
- `pipe:CMD`: as webdataset, CMD's stdout is the file; every `{}` in CMD is replaced by the
  shell-quoted relative file name, e.g. `pipe:ssh host cat /data/ds/{}` or `pipe:aws s3 cp s3://b/ds/{} -`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import select
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vla_scale.data.errors import FormatError

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("s3://", "http://", "https://", "pipe:")
_CHUNK = 1 << 20


def is_remote(path: str | Path) -> bool:
    """True for an `s3://`, `http(s)://` or `pipe:` location (a `Path` is always local)."""
    return isinstance(path, str) and path.startswith(REMOTE_PREFIXES)


class Unreachable(FormatError):
    """A file that could not be fetched (missing, or still failing after the retries); the message names its URL."""


class NotFound(Exception):
    """The server says the file does not exist (HTTP 404, S3 NoSuchKey): retrying cannot help."""


class Transient(Exception):
    """A failure worth retrying (HTTP 5xx/429, a dropped connection, a short body, a failed pipe command)."""


@dataclass
class FetchOptions:
    """Retry policy: the values of `data.storage` (these defaults are the config's)."""

    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 60.0


class Location:
    """A dataset root that files are fetched from by relative path."""

    def __init__(self, root: str, options: FetchOptions | None = None):
        self.root = root.rstrip("/")
        self.options = options or FetchOptions()

    def __str__(self) -> str:
        return self.root

    def url(self, rel: str) -> str:
        """The full URL (or path) of `rel`, as it appears in error messages and sample keys."""
        return f"{self.root}/{rel}"

    def rel(self, url: str) -> str:
        """The relative name of a URL this location made with `url` (shard lists are passed around as URLs)."""
        for rel in (url[len(self.root) + 1 :], url.rsplit("/", 1)[-1]):
            if self.url(rel) == url:
                return rel
        raise ValueError(f"{url} is not a file of {self.root}")

    def _copy(self, rel: str, dest: BinaryIO, offset: int, on_size: Callable[[int], None] | None) -> None:
        raise NotImplementedError

    def fetch(self, rel: str, dest: BinaryIO, on_size: Callable[[int], None] | None = None) -> int:
        """Write the whole file `rel` into `dest`; returns its size. `on_size(total)` is called once the size is
        known (before the body is read); an exception it raises aborts the fetch unretried."""
        url, start, opts = self.url(rel), dest.tell(), self.options
        for attempt in range(opts.retries + 1):
            try:
                self._copy(rel, dest, dest.tell() - start, on_size)
                return dest.tell() - start
            except NotFound as err:
                raise Unreachable(f"{url} does not exist ({err})") from None
            except Transient as err:
                if attempt == opts.retries:
                    raise Unreachable(
                        f"cannot fetch {url}: still failing after {attempt + 1} attempts ({err}); check the URL, the "
                        "server and the network, or raise data.storage.retries"
                    ) from None
                delay = opts.backoff_s * 2**attempt
                log.warning("fetching %s failed (%s); retry %d/%d in %.2fs", url, err, attempt + 1, opts.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read_bytes(self, rel: str) -> bytes:
        """A small file (manifest.json, stats.json) in memory."""
        buf = io.BytesIO()
        self.fetch(rel, buf)
        return buf.getvalue()


class HttpLocation(Location):
    """`http(s)://base`: GET `base/<rel>`; a retry after a dropped body resumes with `Range: bytes=<offset>-`."""

    def _copy(self, rel: str, dest: BinaryIO, offset: int, on_size: Callable[[int], None] | None) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            request = urllib.request.Request(self.url(rel), headers=headers)
            resp = urllib.request.urlopen(request, timeout=self.options.timeout_s)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as err:
            if err.code in (404, 410):
                raise NotFound(f"HTTP {err.code}") from None
            if err.code >= 500 or err.code == 429:
                raise Transient(f"HTTP {err.code}") from None
            raise Unreachable(f"cannot fetch {self.url(rel)}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise Transient(f"{type(err).__name__}: {err}") from None
        with resp:
            if offset and resp.status != 206:  # the server ignored the range: start over
                dest.seek(dest.tell() - offset)
                dest.truncate()
                offset = 0
            length = resp.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            if offset == 0 and on_size is not None and expected is not None:
                on_size(expected)
            _copy_body(resp, dest, expected)


def _copy_body(body: BinaryIO, dest: BinaryIO, expected: int | None) -> None:
    """Copy a response body; a connection dropped before `expected` bytes is a Transient failure."""
    got = 0
    try:
        while chunk := body.read(_CHUNK):
            dest.write(chunk)
            got += len(chunk)
    except (OSError, http.client.HTTPException) as err:
        raise Transient(f"connection dropped after {got} bytes ({type(err).__name__}: {err})") from None
    if expected is not None and got < expected:
        raise Transient(f"connection dropped after {got} of {expected} bytes")


class S3Location(Location):
    """`s3://bucket/prefix` through boto3 (its own retries off: this class retries, with backoff, uniformly)."""

    def __init__(self, root: str, options: FetchOptions | None = None):
        super().__init__(root, options)
        self.bucket, _, self.prefix = self.root[len("s3://") :].partition("/")
        if not self.bucket:
            raise FormatError(f"{root}: an S3 location is s3://bucket/prefix")
        self._client, self._pid = None, -1

    def client(self):  # noqa: ANN201 - a boto3 S3 client (boto3 is imported only when S3 is used)
        """The process's client for these settings (a boto3 client must not cross a fork into DataLoader workers)."""
        if self._client is None or self._pid != os.getpid():
            self._client, self._pid = _s3_client(self.options.timeout_s), os.getpid()
        return self._client

    def key(self, rel: str) -> str:
        return f"{self.prefix.rstrip('/')}/{rel}" if self.prefix else rel

    def _copy(self, rel: str, dest: BinaryIO, offset: int, on_size: Callable[[int], None] | None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        args = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.client().get_object(Bucket=self.bucket, Key=self.key(rel), **args)
            if offset == 0 and on_size is not None:
                on_size(int(resp["ContentLength"]))
            _copy_body(resp["Body"], dest, int(resp["ContentLength"]))
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(code or "HTTP 404") from None
            if status >= 500 or status == 429 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
                raise Transient(f"{code} (HTTP {status})") from None
            raise Unreachable(f"cannot fetch {self.url(rel)}: {code} (HTTP {status}): {err}") from None
        except NoCredentialsError as err:
            raise Unreachable(f"cannot fetch {self.url(rel)}: {err} (set AWS credentials)") from None
        except BotoCoreError as err:
            raise Transient(f"{type(err).__name__}: {err}") from None

    def put(self, local: Path, rel: str) -> None:
        """Upload one file (for `data_tools upload`); boto3's transfer manager does multipart for large shards."""
        self.client().upload_file(str(local), self.bucket, self.key(rel))


_S3_CLIENTS: dict[tuple, object] = {}
_S3_CLIENTS_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_S3_CLIENTS={}, _S3_CLIENTS_LOCK=threading.Lock()))


def _s3_client(timeout_s: float):  # noqa: ANN202 - a boto3 S3 client
    """One boto3 client per process, timeout and AWS_* environment, shared by all S3 locations and threads: making
    one costs tens of ms of CPU (botocore loads its service model), and each dataset file read and each reader's
    stream would make its own. Clients are thread-safe; the key holds AWS_* so a changed endpoint is honoured."""
    key = (timeout_s, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _S3_CLIENTS_LOCK:
        if key not in _S3_CLIENTS:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=timeout_s, read_timeout=timeout_s)
            _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=cfg)
        return _S3_CLIENTS[key]


class PipeLocation(Location):
    """`pipe:CMD`: the stdout of CMD with `{}` replaced by the shell-quoted relative name; non-zero exit is retried."""

    def __init__(self, root: str, options: FetchOptions | None = None):
        super().__init__(root, options)
        self.root = root
        self.command = root[len("pipe:") :]
        self._rels: dict[str, str] = {}
        if "{}" not in self.command:
            raise FormatError(
                f"{root}: a pipe: location needs {{}} where the relative file name goes, e.g. pipe:cat /data/ds/{{}}"
            )

    def url(self, rel: str) -> str:
        url = "pipe:" + self.command.replace("{}", shlex.quote(rel))
        self._rels[url] = rel
        return url

    def rel(self, url: str) -> str:
        return self._rels[url]

    def _copy(self, rel: str, dest: BinaryIO, offset: int, on_size: Callable[[int], None] | None) -> None:
        dest.seek(dest.tell() - offset)  # no ranges on a pipe: each attempt starts over
        dest.truncate()
        cmd, timeout = self.url(rel)[len("pipe:") :], self.options.timeout_s
        with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
            # its own process group, so a hung command is killed with everything it started
            with subprocess.Popen(  # noqa: S602
                cmd, shell=True, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
            ) as proc:
                try:
                    _copy_pipe(proc, dest, timeout)
                except BaseException:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    raise
            if proc.returncode != 0:
                stderr.seek(0)
                err = stderr.read().decode(errors="replace").strip()
                raise Transient(f"command exited with status {proc.returncode}: {err[-300:]}")


def _copy_pipe(proc: subprocess.Popen, dest: BinaryIO, timeout: float) -> None:
    """Copy a command's stdout; no output for `timeout` seconds (or no exit after it) is a Transient failure."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        if not select.select([fd], [], [], timeout)[0]:
            raise Transient(f"command hung: no output for {timeout:g} s (data.storage.timeout_s); killed")
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        dest.write(chunk)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Transient(f"command hung: no exit {timeout:g} s after its output ended; killed") from None


class LocalLocation(Location):
    """A local folder: the path as before (shards are opened in place, never copied into the cache)."""

    def url(self, rel: str) -> str:
        return str(Path(self.root) / rel)

    def _copy(self, rel: str, dest: BinaryIO, offset: int, on_size: Callable[[int], None] | None) -> None:
        try:
            with open(self.url(rel), "rb") as f:
                while chunk := f.read(_CHUNK):
                    dest.write(chunk)
        except FileNotFoundError as err:
            raise NotFound(str(err)) from None


def open_location(path: str | Path, options: FetchOptions | None = None) -> Location:
    """The `Location` for a dataset `path` (a local folder unless it starts with s3://, http(s):// or pipe:)."""
    if not is_remote(path):
        return LocalLocation(str(path), options)
    p = str(path)
    if p.startswith("s3://"):
        return S3Location(p, options)
    if p.startswith("pipe:"):
        return PipeLocation(p, options)
    return HttpLocation(p, options)


class RemoteFile:
    """A dataset file at a remote location, with the few `Path` methods `format.py` uses (is_file, read_text).

    Read once and kept: `is_file()` is False only when the server says it does not exist; an unreachable
    server raises `Unreachable` naming the URL instead of passing for a missing file.
    """

    def __init__(self, location: Location, rel: str):
        self.location, self.rel = location, rel
        self._data: bytes | None = None

    def __str__(self) -> str:
        return self.location.url(self.rel)

    def is_file(self) -> bool:
        if self._data is None:
            try:
                self._data = self.location.read_bytes(self.rel)
            except Unreachable as err:
                if "does not exist" in str(err):
                    return False
                raise
        return True

    def read_text(self) -> str:
        if not self.is_file():
            raise Unreachable(f"{self} does not exist")
        assert self._data is not None
        return self._data.decode()


def dataset_file(folder: str | Path, name: str) -> Path | RemoteFile:
    """`folder/name` as a `Path`, or a `RemoteFile` when `folder` is a remote location."""
    if is_remote(folder):
        return RemoteFile(open_location(folder), name)
    return Path(folder) / name
