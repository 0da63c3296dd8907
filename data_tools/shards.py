"""Read a dataset's shards back the way training does (webdataset's tar reader), for the checking tools.

The tools must see exactly what the training reader sees, so they read through
`webdataset.tariterators` too, but collect errors instead of skipping them silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import webdataset as wds

from vla_scale.data.format import Manifest


def error_text(exn: Exception) -> str:
    """One readable line from an exception that webdataset has decorated with stream objects."""
    first = str(exn.args[0]) if exn.args else ""
    first = first.split(" @ <", 1)[0]  # webdataset appends " @ <file object>"
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


def iter_shard(path: str | Path, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Raw samples (`__key__` + bytes per member suffix) of one shard; read errors go to `on_error`."""

    def handler(exn: Exception) -> bool:
        on_error(exn)
        return True

    yield from wds.tariterators.tarfile_samples(iter([{"url": str(path)}]), handler=handler)


def iter_dataset(folder: str | Path, manifest: Manifest | None = None) -> Iterator[tuple[str, dict]]:
    """(shard path, raw sample) for every sample of every shard in the manifest; raises on read errors."""
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    for shard in manifest.shards:

        def fail(exn: Exception, path: str = shard.path) -> None:
            raise ValueError(
                f"{folder / path} is unreadable ({error_text(exn)}); run `python -m data_tools verify {folder}`"
            ) from exn

        for sample in iter_shard(folder / shard.path, fail):
            yield shard.path, sample
