"""Per-source sample streams: shards → (split by rank and worker) → decoded items.

Each DataLoader worker of each rank is one *reader*; there are
`world_size × num_workers` readers. In every epoch the shard list is shuffled with
a seed shared by all readers and then dealt out, so each sample is read by exactly
one reader per epoch. With fewer shards than readers every reader opens every shard
and keeps every `num_readers`-th sample instead, so no reader is ever empty.

Streams are infinite (epoch after epoch) and training is measured in steps, so a
reader whose share is smaller simply starts its next epoch sooner: uneven shard
counts never leave one rank waiting at a collective for a batch that never comes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_scale.config.schema import AugmentConfig
from vla_scale.config.schema_data import StorageConfig
from vla_scale.data.augment import augment_frames, window_rng
from vla_scale.data.format import (
    FormatError,
    Manifest,
    VLSample,
    decode_episode_arrays,
    decode_frame,
    decode_vl,
    load_stats,
)
from vla_scale.data.normalize import Normalizer
from vla_scale.data.read_ahead import ShardFetcher, open_source
from vla_scale.data.reader import BadSamples, DataError, Reader, epoch_assignment
from vla_scale.data.shard_read import SampleReader, check_frame_size, check_robot_dims
from vla_scale.data.window import Window, chunk_actions

WRIST_CAMERA = "rgb_wrist"
FRAME_CACHE_BYTES = 256 * 2**20  # per source and reader; beyond it shared frames are decoded again


@dataclass
class _Episode:
    """A robot sample with its arrays decoded and normalised; frames stay compressed until a window is emitted."""

    raw: dict
    meta: dict
    chunks: np.ndarray  # [L, N, A]
    chunk_mask: np.ndarray  # [L, N]
    state: np.ndarray  # [L, S]
    refs: np.ndarray | None = None  # [L] windows still in the buffer that use frame t (window_size > 1)
    decoded: dict = field(default_factory=dict)  # (camera, t) -> frame, while refs[t] > 0


@dataclass
class _Entry:
    """One shuffle-buffer slot: a robot window (episode + start frame) or a VL sample, still compressed."""

    key: str  # "<shard>:<sample key>[/<start>]", stable across runs
    epoch: int = 0
    episode: _Episode | None = None
    start: int = 0
    raw: dict | None = None  # VL sample


class Replayed:
    """Stand-in item yielded while fast-forwarding to a resume point: the slot is consumed, nothing decoded."""


REPLAYED = Replayed()


class SourceStream:
    """An infinite, shuffled stream of items (robot windows or VL samples) from one dataset for one reader.

    The shuffle buffer holds compressed samples; images are decoded only when an item leaves
    the buffer. So memory stays bounded by compressed bytes, and a resumed run can replay the
    exact sequence of draws up to its checkpoint (`replay = True`) reading shards but decoding
    no image. Windows whose frames failed to decode are remembered in `bad_windows` (saved in
    the checkpoint) so the replay skips the same slots the original run skipped.
    """

    def __init__(
        self,
        folder: str | Path,
        reader: Reader,
        seed: int,
        shuffle_buffer: int,
        shard_shuffle: bool,
        window_size: int,
        chunk: int,
        bad: BadSamples,
        bad_windows: set[str] | None = None,
        augment: AugmentConfig | None = None,
        max_bad_in_a_row: int = 10_000,
        storage: StorageConfig | None = None,
        manifest: Manifest | None = None,
    ):
        self.location, self.opener = open_source(folder, storage)  # a local folder, s3://, http(s):// or pipe:
        self.folder = Path(folder) if self.opener is None else folder
        self.manifest = manifest if manifest is not None else Manifest.load(self.folder)  # given: read already
        if not self.manifest.shards:
            raise DataError(f"{self.folder}/manifest.json lists no shards")
        self.name = self.manifest.name
        self.kind = self.manifest.kind
        self.reader = reader
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.window_size = window_size
        self.chunk = chunk
        self.bad = bad
        self.bad_windows = bad_windows if bad_windows is not None else set()
        self.replay = False
        self.augment = augment if augment is not None else AugmentConfig()
        self.max_bad_in_a_row = max_bad_in_a_row
        robot = self.kind == "robot"
        self.normalizer = Normalizer(load_stats(self.folder), self.manifest.robot_spaces) if robot else None
        self.static_camera = self._static_camera()
        self.epoch = 0
        self.rng = np.random.default_rng([seed, reader.rank, reader.worker, 7919])
        self.cached_bytes = 0  # decoded frames held for overlapping windows (`_frame`)
        self._fetcher: ShardFetcher | None = None  # a remote source's read-ahead, kept from epoch to epoch
        self._fetcher_epoch = -1  # the epoch whose shards `_fetcher` holds first

    def _static_camera(self) -> str | None:
        if self.kind != "robot":
            return None
        cams = [c for c in self.manifest.cameras if c != WRIST_CAMERA]
        if not cams:
            raise DataError(f"{self.folder}: manifest lists no static camera (cameras={self.manifest.cameras})")
        return cams[0]

    def _ingest(self, sample: dict) -> list[_Entry]:
        """Raw sample → buffer entries; robot arrays are checked and normalised here, images are not touched."""
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if self.kind == "vl":
            return [_Entry(key=where, epoch=self.epoch, raw=sample)]
        assert self.normalizer is not None
        meta, action, state = decode_episode_arrays(sample)
        check_robot_dims(
            str(sample.get("__key__")), self.manifest.action_dim, self.manifest.state_dim, action.shape, state.shape
        )
        if self.static_camera not in meta.get("cameras", []):
            raise FormatError(f"sample {sample.get('__key__')}: no camera {self.static_camera!r}")
        chunks, chunk_mask = chunk_actions(self.normalizer.normalize_action(action), self.chunk)
        ep = _Episode(sample, meta, chunks, chunk_mask, self.normalizer.normalize_state(state))
        starts = range(action.shape[0] - self.window_size + 1)
        if self.window_size > 1 and len(starts) > 0:  # frame t is in the windows starting at t-W+1 .. t
            ep.refs = np.convolve(np.ones(len(starts), np.int64), np.ones(self.window_size, np.int64))
        return [_Entry(f"{where}/{t}", self.epoch, ep, t) for t in starts]

    def _frame(self, ep: _Episode, camera: str, t: int) -> np.ndarray:
        """Frame t, decoded once for all the overlapping windows that show it (within `FRAME_CACHE_BYTES`)."""
        if ep.refs is None:
            return decode_frame(ep.raw, ep.meta, camera, t)
        img = ep.decoded.get((camera, t))
        if img is None:
            img = decode_frame(ep.raw, ep.meta, camera, t)
            if self.cached_bytes + img.nbytes <= FRAME_CACHE_BYTES:
                ep.decoded[(camera, t)] = img
                self.cached_bytes += img.nbytes
        return img

    def _frames(self, ep: _Episode, camera: str, frames: range) -> np.ndarray:
        got = [self._frame(ep, camera, t) for t in frames]
        return got[0][None] if len(got) == 1 else np.stack(got)  # one frame is never cached: a view will do

    def _release(self, entry: _Entry) -> None:
        """The window has left the buffer: drop the decoded frames no window still in it needs."""
        ep = entry.episode
        if ep is None or ep.refs is None:
            return
        for t in range(entry.start, entry.start + self.window_size):
            ep.refs[t] -= 1
            if ep.refs[t] == 0:
                for camera in (self.static_camera, WRIST_CAMERA):
                    img = ep.decoded.pop((camera, t), None)
                    self.cached_bytes -= 0 if img is None else img.nbytes

    def _materialize(self, entry: _Entry) -> Window | VLSample:
        if entry.raw is not None:
            return decode_vl(entry.raw)
        ep, sl = entry.episode, slice(entry.start, entry.start + self.window_size)
        assert ep is not None and self.static_camera is not None
        frames = range(entry.start, entry.start + self.window_size)
        key, size = str(ep.raw.get("__key__")), self.manifest.image_size
        sized = self.manifest.cameras[:1]  # the writer measures image_size on the first camera only
        images = self._frames(ep, self.static_camera, frames)
        check_frame_size(key, self.static_camera, size if self.static_camera in sized else [], images.shape)
        wrist = None
        if WRIST_CAMERA in ep.meta.get("cameras", []):
            wrist = self._frames(ep, WRIST_CAMERA, frames)
            check_frame_size(key, WRIST_CAMERA, size if WRIST_CAMERA in sized else [], wrist.shape)
        if self.augment.enabled:
            rng = window_rng(self.seed, entry.epoch, entry.key)  # one draw per camera, shared by the frames
            images = augment_frames(images, self.augment, rng)
            wrist = None if wrist is None else augment_frames(wrist, self.augment, rng)
        return Window(
            key=f"{ep.raw.get('__key__')}/{entry.start}",
            instruction=ep.meta.get("instruction", ""),
            images=images,
            wrist_images=wrist,
            state=ep.state[sl],
            action=ep.chunks[sl],
            action_mask=ep.chunk_mask[sl],
        )

    def _emit(self, entry: _Entry) -> Window | VLSample | Replayed | None:
        """The item for a slot leaving the buffer; None when it is bad (counted, and skipped by the caller)."""
        try:
            return self._item(entry)
        finally:
            self._release(entry)

    def _item(self, entry: _Entry) -> Window | VLSample | Replayed | None:
        if self.replay:
            if entry.key in self.bad_windows:
                self.bad.report(self.name, entry.key, None)
                return None
            return REPLAYED
        try:
            return self._materialize(entry)
        except (FormatError, KeyError, ValueError) as err:
            self.bad_windows.add(entry.key)
            self.bad.report(self.name, entry.key, err)
            return None

    def _listed(self) -> dict[str, int]:
        """Every shard's URL (or path) -> its sample count, in manifest order."""
        return {self.location.url(s.path): s.samples for s in self.manifest.shards}

    def _assignment(self, epoch: int) -> tuple[list[str], int]:
        """(this reader's shards of `epoch` in reading order, its sample stride within them)."""
        return epoch_assignment(list(self._listed()), epoch, self.seed, self.reader, self.shard_shuffle)

    def _epoch_entries(self, fetch_next_epoch: bool = False) -> Iterator[_Entry]:
        """The current epoch's entries in reading order. `fetch_next_epoch` (the endless stream): a remote
        source's read-ahead runs on into the next epoch's first shards, and its fetcher is kept for that epoch."""
        listed = self._listed()
        paths, stride = self._assignment(self.epoch)
        if self._fetcher is not None and self._fetcher_epoch != self.epoch:  # started for another epoch
            self._fetcher.close()
            self._fetcher = None
        fetcher = self._fetcher
        if self.opener is not None and fetcher is None:
            fetcher = self._fetcher = self.opener(paths)  # remote: fetches this epoch's shards ahead
            self._fetcher_epoch = self.epoch
        if fetcher is not None and fetch_next_epoch:
            following, _ = self._assignment(self.epoch + 1)
            fetcher.extend(following)
        finished = False

        def on_bad(where: str, err: Exception, n: int) -> None:
            self.bad.report(self.name, where, err, n)

        reader = SampleReader(stride, self.reader.count, on_bad, fetcher.open if fetcher else None)
        try:
            for path in paths:
                for sample in reader.shard(path, listed[path]):
                    try:
                        yield from self._ingest(sample)
                    except (FormatError, KeyError, ValueError) as err:
                        self.bad.report(self.name, f"{sample.get('__url__')}:{sample.get('__key__')}", err)
            finished = True
        finally:
            if fetcher is not None and not (finished and fetch_next_epoch):
                fetcher.close()
                self._fetcher = None
            elif fetcher is not None:
                self._fetcher_epoch = self.epoch + 1  # kept: it holds the next epoch's shards now

    def start_fetching(self) -> None:
        """A remote source: start fetching the current epoch's first shards now, not at the first item asked for.

        Why: the mixer may draw from a source only several batches in, and its first shard, fetched only then,
        stalls that batch; started here, every source's first shards are fetched together while the loader starts.
        """
        if self.opener is None or self._fetcher is not None:
            return
        self._fetcher, self._fetcher_epoch = self.opener(self._assignment(self.epoch)[0]), self.epoch

    def _epoch_items(self) -> Iterator[Window | VLSample]:
        """The current epoch's usable items in reading order (no shuffle buffer); for tools and tests."""
        for entry in self._epoch_entries():
            item = self._emit(entry)
            if item is not None:
                yield item

    def __iter__(self) -> Iterator[Window | VLSample | Replayed]:
        buffer: list[_Entry] = []
        bad_in_a_row = 0
        while True:
            produced = 0
            for entry in self._epoch_entries(fetch_next_epoch=True):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(entry)
                    continue
                idx = int(self.rng.integers(len(buffer)))
                buffer[idx], entry = entry, buffer[idx]
                item = self._emit(entry)
                if item is not None:
                    bad_in_a_row = 0
                    yield item
                    continue
                bad_in_a_row += 1
                if bad_in_a_row >= self.max_bad_in_a_row:
                    raise DataError(
                        f"source {self.name!r} ({self.folder}) yielded no valid sample in {bad_in_a_row} attempts in "
                        f"a row for reader {self.reader.index}/{self.reader.count} ({self.bad.counts[self.name]} "
                        "samples skipped so far): its shards look unusable; check the bad-sample log above, run "
                        "`python -m data_tools verify` on the dataset, or raise data.max_bad_in_a_row"
                    )
            if produced == 0:
                raise DataError(
                    f"source {self.name!r} ({self.folder}) produced no usable samples in epoch {self.epoch} "
                    f"for reader {self.reader.index}/{self.reader.count}; check the bad-sample log, the "
                    "window size against the episode lengths, and that the dataset has at least as many "
                    "samples as ranks x workers"
                )
            self.epoch += 1
