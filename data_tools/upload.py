"""`python -m data_tools upload DATASET_DIR DEST`: copy a finished dataset to object storage (or a folder).

Readers take a dataset whose manifest.json they can read as complete, so the upload writes every
shard and stats.json first and manifest.json last: a reader (or a training job started early)
sees either no dataset or a whole one, never a half-written one. An interrupted upload is resumed
by running it again: a file already at DEST with the same size is not sent twice.

DEST is `s3://bucket/prefix` (boto3; credentials from the standard chain, endpoint from
AWS_ENDPOINT_URL or the AWS config file) or a local folder. http(s):// and pipe: locations are
read-only: publish the folder with any static web server instead.

`local_copy(URL)` is the reverse, for the checking tools: it fetches a remote dataset into a
temporary folder (with the readers' retries) so `verify` and `inspect` accept a URL.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vla_scale.data.format import FormatError, Manifest, is_safe_rel
from vla_scale.data.locations import FetchOptions, RemoteFile, S3Location, is_remote, open_location


def dataset_files(folder: Path, manifest: Manifest) -> list[str]:
    """The files a reader needs, manifest.json last: the listed shards, then stats.json when present."""
    files = [s.path for s in manifest.shards]
    if (folder / "stats.json").is_file():
        files.append("stats.json")
    return [*files, "manifest.json"]


def _s3_sizes(dest: S3Location) -> dict[str, int]:
    """Relative name -> size of what is already under the prefix (to skip files an earlier upload sent)."""
    prefix = dest.key("")
    sizes: dict[str, int] = {}
    for page in dest.client().get_paginator("list_objects_v2").paginate(Bucket=dest.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(prefix) :]] = int(obj["Size"])
    return sizes


def upload(src: str | Path, dest: str, workers: int = 8) -> tuple[int, int]:
    """Copy the dataset at `src` to `dest`, manifest.json last; returns (files sent, bytes sent)."""
    folder = Path(src)
    manifest = Manifest.load(folder)  # refuses an unfinished dataset (no manifest.json yet)
    files = dataset_files(folder, manifest)
    if is_remote(dest) and not dest.startswith("s3://"):
        raise ValueError(
            f"{dest}: upload writes to s3://bucket/prefix or a local folder; http(s):// and pipe: are read-only"
        )
    target = open_location(dest)
    existing = _s3_sizes(target) if isinstance(target, S3Location) else {}
    if not isinstance(target, S3Location):
        Path(dest).mkdir(parents=True, exist_ok=True)
        existing = {f: (Path(dest) / f).stat().st_size for f in files if (Path(dest) / f).is_file()}

    def send(rel: str) -> int:
        local = folder / rel
        size = local.stat().st_size
        if rel != "manifest.json" and existing.get(rel) == size:
            return 0
        if isinstance(target, S3Location):
            target.put(local, rel)
        else:
            out = Path(dest) / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.part")
            shutil.copyfile(local, tmp)
            tmp.replace(out)
        return size

    with ThreadPoolExecutor(max(1, workers)) as pool:
        sent = [n for n in pool.map(send, files[:-1]) if n]
    sent.append(send("manifest.json"))  # last, once everything it lists is in place
    return len(sent), sum(sent)


def download(src: str, dest: Path, workers: int = 8, options: FetchOptions | None = None) -> Manifest:
    """Fetch the dataset at the location `src` into the folder `dest` (manifest.json last); returns its manifest."""
    manifest = Manifest.load(src)
    location = open_location(src, options)
    dest.mkdir(parents=True, exist_ok=True)
    files = [s.path for s in manifest.shards]
    if RemoteFile(location, "stats.json").is_file():  # False only when the server says it does not exist (VL)
        files.append("stats.json")  # an unreachable server raises Unreachable naming the URL

    root = dest.resolve()

    def fetch(rel: str) -> None:
        out = dest / rel
        if not is_safe_rel(rel) or not out.resolve().is_relative_to(root):  # Manifest.load checks too
            raise FormatError(f"{location.url(rel)}: refusing to write outside {dest} (shard path {rel!r})")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            location.fetch(rel, f)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(fetch, files))
    manifest.save(dest)
    return manifest


@contextlib.contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """`path` itself when local; a remote dataset fetched into a temporary folder (deleted on exit)."""
    if not is_remote(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="vla_scale_remote_") as tmp:
        download(str(path), Path(tmp))
        yield Path(tmp)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools upload`."""
    p = subparsers.add_parser(
        "upload",
        help="copy a finished dataset to s3://bucket/prefix (or a folder), manifest.json last",
        description="Copy a dataset's shards and stats.json, then manifest.json, so readers never see half of it. "
        "Files already at DEST with the same size are skipped (re-run to resume an interrupted upload).",
    )
    p.add_argument("dataset", metavar="DATASET_DIR", help="local folder with manifest.json")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/prefix or a local folder")
    p.add_argument("--workers", type=int, default=8, help="files sent in parallel (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    n, size = upload(args.dataset, args.dest, args.workers)
    print(f"{args.dest}: {n} file(s), {size / 1e6:.1f} MB sent in {time.perf_counter() - start:.1f} s, manifest last")
    return 0
