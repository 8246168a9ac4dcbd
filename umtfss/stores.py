"""Zarr v3 stores shared by embed, fit and assign: store layouts and readers that see several shards as one."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

# zstd at a low level: pixel features compress little, and speed matters more than the last percent.
COMPRESSION_LEVEL = 3
# attrs a label store copies from its embedding store, so that a label shard says what it came from
EMBEDDING_ATTRS = ("backbone", "layer", "stride", "image_size", "dim", "dtype", "checkpoint_sha256",
                   "preprocessing", "shard", "num_shards", "umtfss_version")


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of a float32 matrix's row-major bytes: the identity of a centroid set in fit.json and label stores."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------

def _compressor(dtype: np.dtype) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=COMPRESSION_LEVEL, shuffle=BloscShuffle.shuffle,
                      typesize=np.dtype(dtype).itemsize)


def create_embedding_store(path: str | Path, n_images: int, grid: tuple[int, int], dim: int,
                           dtype: str, attrs: dict) -> zarr.Group:
    """Create the embedding store layout (docs/architecture.md "Embedding store") at `path`."""
    gh, gw = grid
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("features", shape=(n_images, gh, gw, dim), chunks=(1, gh, gw, dim), dtype=dtype,
                       compressors=_compressor(np.dtype(dtype)), fill_value=0)
    for name in ("valid", "sizes"):
        group.create_array(name, shape=(n_images, 2), chunks=(max(n_images, 1), 2), dtype="int32",
                           compressors=None, fill_value=0)
    group.attrs.update(attrs)
    return group


def create_label_store(path: str | Path, n_images: int, grid: tuple[int, int], attrs: dict) -> zarr.Group:
    """Create the label store layout (docs/architecture.md "Label store") at `path`."""
    gh, gw = grid
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("labels", shape=(n_images, gh, gw), chunks=(1, gh, gw), dtype="int16",
                       compressors=_compressor(np.dtype("int16")), fill_value=-1)
    group.attrs.update(attrs)
    return group


def open_store(path: str | Path, arrays: Sequence[str], kind: str) -> zarr.Group:
    """Open a store read-only, with an error naming the path when it is missing or lacks an array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} store '{path}' does not exist")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a folder that is not a group
        raise ValueError(f"'{path}' is not a Zarr group, expected a {kind} store: {err}") from None
    missing = [name for name in arrays if name not in group]
    if missing:
        raise ValueError(f"{kind} store '{path}' lacks array(s) {', '.join(missing)}; expected {', '.join(arrays)}")
    return group


def valid_mask(valid_rows_cols: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """Boolean [gh, gw] mask of the grid cells covered by the image (the rest is padding)."""
    rows, cols = int(valid_rows_cols[0]), int(valid_rows_cols[1])
    mask = np.zeros(grid, dtype=bool)
    mask[:rows, :cols] = True
    return mask


class BackgroundWriter:
    """Writes blocks into a Zarr array on a thread, so compression and file creation overlap the next batch.

    At most two blocks wait in the queue (memory stays bounded); an error in the thread is raised by
    the next put() or by close(), which must always be called (it joins the thread).
    """

    def __init__(self, array):
        self.array = array
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            start, block = job
            if self.error is None:
                try:
                    self.array[start:start + len(block)] = block
                except BaseException as err:  # handed to the main thread
                    self.error = err

    def put(self, start: int, block: np.ndarray) -> None:
        """Queue `block` for array[start:start + len(block)]."""
        if self.error is not None:
            raise self.error
        self.jobs.put((start, block))

    def close(self) -> None:
        """Wait for every queued block to be written; raise the writer's error if there was one."""
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def prefetch(batches: Iterator, depth: int = 1) -> Iterator:
    """Iterate `batches` on a thread, `depth` items ahead, so reading overlaps the caller's compute.

    Memory: at most depth + 2 batches alive. An error in the reader is raised at the caller's next step.
    """
    done = object()
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read():
        try:
            for item in batches:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as err:  # handed to the consumer
            items.put(("__error__", err))
            return
        items.put(done)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
                raise item[1]
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------

class _ShardedReader:
    """Several shard stores read as one sequence of images, in shard order."""

    kind = "store"
    arrays: tuple[str, ...] = ()
    consistent_attrs: tuple[str, ...] = ()

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise ValueError(f"no {self.kind} store given")
        self.paths = [Path(p) for p in paths]
        self.groups = [open_store(p, self.arrays, self.kind) for p in self.paths]
        self.attrs = dict(self.groups[0].attrs)
        for path, group in zip(self.paths[1:], self.groups[1:]):
            for key in self.consistent_attrs:
                if group.attrs.get(key) != self.attrs.get(key):
                    raise ValueError(f"{self.kind} store '{path}' has {key}={group.attrs.get(key)!r} but "
                                     f"'{self.paths[0]}' has {self.attrs.get(key)!r}; shards must come from one run")
        self.image_ids: list[str] = []
        self._offsets = [0]
        for path, group in zip(self.paths, self.groups):
            ids = list(group.attrs.get("image_ids", []))
            n = group[self.arrays[0]].shape[0]
            if len(ids) != n:
                raise ValueError(f"{self.kind} store '{path}' lists {len(ids)} image_ids for {n} images")
            self.image_ids.extend(ids)
            self._offsets.append(self._offsets[-1] + n)

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index within that shard) of a global image index."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - self._offsets[shard]

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) global index range of each shard."""
        return list(zip(self._offsets[:-1], self._offsets[1:]))


class EmbeddingStore(_ShardedReader):
    """Reader over one or more embedding shard stores: features, valid extents and sizes per image."""

    kind = "embedding"
    arrays = ("features", "valid", "sizes")
    consistent_attrs = ("backbone", "layer", "stride", "image_size", "dim", "dtype", "checkpoint_sha256")

    def __init__(self, paths):
        super().__init__(paths)
        shapes = {tuple(g["features"].shape[1:]) for g in self.groups}
        if len(shapes) != 1:
            raise ValueError(f"embedding stores {', '.join(map(str, self.paths))} have different feature shapes {sorted(shapes)}")
        gh, gw, dim = shapes.pop()
        self.grid = (gh, gw)
        self.dim = dim
        self.dtype = self.groups[0]["features"].dtype
        self._valid = np.concatenate([np.asarray(g["valid"][:]) for g in self.groups]) if len(self) else np.zeros((0, 2), np.int32)
        self._sizes = np.concatenate([np.asarray(g["sizes"][:]) for g in self.groups]) if len(self) else np.zeros((0, 2), np.int32)

    def features(self, index: int) -> np.ndarray:
        """[gh, gw, C] features of one image, in the stored dtype (padding cells included)."""
        shard, local = self.locate(index)
        return np.asarray(self.groups[shard]["features"][local])

    def valid(self, index: int) -> tuple[int, int]:
        """(rows, cols) of the grid covered by the image."""
        rows, cols = self._valid[index]
        return int(rows), int(cols)

    def size(self, index: int) -> tuple[int, int]:
        """Original (height, width) of the image."""
        h, w = self._sizes[index]
        return int(h), int(w)

    @property
    def valid_all(self) -> np.ndarray:
        """int32 [n_images, 2] valid extents of every image (small; held in memory)."""
        return self._valid

    @property
    def projection(self) -> np.ndarray | None:
        """The [C_in, dim] projection applied before normalisation, or None when all channels were kept."""
        group = self.groups[0]
        return np.asarray(group["projection"][:]) if "projection" in group else None

    def iter_batches(self, images_per_batch: int) -> Iterator[tuple[range, np.ndarray, np.ndarray]]:
        """Yield (global index range, features [b, gh, gw, C], valid [b, 2]); batches never span two shards."""
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        for group, (start, stop) in zip(self.groups, self.shard_ranges()):
            features = group["features"]
            for first in range(start, stop, images_per_batch):
                last = min(first + images_per_batch, stop)
                block = np.asarray(features[first - start:last - start])
                yield range(first, last), block, self._valid[first:last]


class LabelStore(_ShardedReader):
    """Reader over one or more label shard stores: the cluster id of every grid cell (-1 = padding)."""

    kind = "label"
    arrays = ("labels",)
    consistent_attrs = ("clusters", "centroids_sha256", "backbone", "layer", "image_size")

    def __init__(self, paths):
        super().__init__(paths)
        self.grid = tuple(self.groups[0]["labels"].shape[1:])
        self.clusters = int(self.attrs.get("clusters", 0))

    def labels(self, index: int) -> np.ndarray:
        """int16 [gh, gw] cluster ids of one image, -1 on padding."""
        shard, local = self.locate(index)
        return np.asarray(self.groups[shard]["labels"][local])

    def iter_batches(self, images_per_batch: int) -> Iterator[tuple[range, np.ndarray]]:
        """Yield (global index range, labels [b, gh, gw]); batches never span two shards."""
        for group, (start, stop) in zip(self.groups, self.shard_ranges()):
            for first in range(start, stop, images_per_batch):
                last = min(first + images_per_batch, stop)
                yield range(first, last), np.asarray(group["labels"][first - start:last - start])
