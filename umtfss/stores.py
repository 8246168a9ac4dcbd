"""Zarr v3 stores shared by embed, fit and assign: store layouts and readers that see several shards as one."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from umtfss.threads import usable_cores

# Snakemake marks directory outputs with a '.snakemake_timestamp' file, which zarr warns about on
# every listing of the group; it is expected in every store the workflow writes.
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")

# zstd level 1: normalised float features compress little (ratio ~1.1-1.7) and level 3 costs 2-4x the time.
COMPRESSION_LEVEL = 1
# attrs a label store copies from its embedding store, so that a label shard says what it came from
EMBEDDING_ATTRS = ("backbone", "layer", "stride", "image_size", "dim", "projected", "dtype", "checkpoint_sha256",
                   "preprocessing", "forward_precision", "shard", "num_shards", "umtfss_version")


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


def create_label_store(path: str | Path, n_images: int, grid: tuple[int, int], attrs: dict,
                       refined_size: int | None = None) -> zarr.Group:
    """Create the label store layout (docs/architecture.md "Label store") at `path`; with `refined_size`
    also the superpixel-refined labels at the embed input resolution (array 'refined')."""
    gh, gw = grid
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("labels", shape=(n_images, gh, gw), chunks=(1, gh, gw), dtype="int16",
                       compressors=_compressor(np.dtype("int16")), fill_value=-1)
    if refined_size is not None:
        size = int(refined_size)
        group.create_array("refined", shape=(n_images, size, size), chunks=(1, size, size), dtype="int16",
                           compressors=_compressor(np.dtype("int16")), fill_value=-1)
    group.attrs.update(attrs)
    return group


ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")  # v3 and v2 metadata files


def damaged_metadata(store: str | Path) -> tuple[Path, str] | None:
    """The first metadata file of a Zarr store that is not valid JSON, with the parser's reason (zarr's
    own error does not name the file). Only node folders (those with a metadata file) are visited, so
    the chunk files are not walked."""
    store = Path(store)
    if not store.is_dir():
        return None
    files = [store / name for name in ZARR_METADATA if (store / name).is_file()]
    for file in files:
        try:
            json.loads(file.read_bytes())
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            return file, str(err)
    for child in sorted(p for p in store.iterdir() if p.is_dir()) if files else []:
        found = damaged_metadata(child)
        if found is not None:
            return found
    return None


def open_store(path: str | Path, arrays: Sequence[str], kind: str) -> zarr.Group:
    """Open a store read-only, with an error naming the path when it is missing or lacks an array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} store '{path}' does not exist")
    try:
        group = zarr.open_group(str(path), mode="r")
        missing = [name for name in arrays if name not in group]  # reads each array's metadata
    except Exception as err:  # zarr raises several types for a folder that is not a group
        bad = damaged_metadata(path)
        if bad is not None:
            raise ValueError(f"'{bad[0]}' is not valid JSON ({bad[1]}): the Zarr metadata of {kind} store '{path}' "
                             "is damaged; rerun the stage that wrote it") from None
        raise ValueError(f"'{path}' is not a Zarr group, expected a {kind} store: {err}") from None
    if missing:
        raise ValueError(f"{kind} store '{path}' lacks array(s) {', '.join(missing)}; expected {', '.join(arrays)}")
    return group


def valid_mask(valid_rows_cols: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """Boolean [gh, gw] mask of the grid cells covered by the image (the rest is padding)."""
    rows, cols = int(valid_rows_cols[0]), int(valid_rows_cols[1])
    mask = np.zeros(grid, dtype=bool)
    mask[:rows, :cols] = True
    return mask


def _direct_chunk_path(array) -> Path | None:
    """The folder of an array whose chunks can be written as files directly, else None.

    That holds for a local store, one image per chunk along axis 0, whole extent on the other axes,
    and the codec chain this module creates (little-endian bytes, then Blosc).
    """
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    codecs = getattr(array.metadata, "codecs", ())
    if not isinstance(array.store, LocalStore) or len(codecs) != 2:
        return None
    if not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    if tuple(array.chunks) != (1, *array.shape[1:]):
        return None
    return Path(array.store.root) / array.path


def _image_chunk_file(array, folder: Path, index: int) -> Path:
    """The file of image `index`'s chunk in an array with one image per chunk (see _direct_chunk_path)."""
    return folder / array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))


_READ_POOL = None  # decoding threads shared by every reader of this process (created on first use)
_READ_POOL_PID = None  # a forked child (DataLoader worker) gets a pool of its own: threads do not survive fork


def _read_pool():
    global _READ_POOL, _READ_POOL_PID
    if _READ_POOL is None or _READ_POOL_PID != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _READ_POOL = ThreadPoolExecutor(min(8, usable_cores()), thread_name_prefix="umtfss-read")
        _READ_POOL_PID = os.getpid()
    return _READ_POOL


def read_images(array, start: int, stop: int) -> np.ndarray:
    """array[start:stop] of a one-image-per-chunk array, its chunks read and decoded in parallel.

    Blosc releases the GIL, so a pool of threads decodes several images at once (about 30 % faster
    than zarr's own read path on 2 cores, which also leaves more time to overlap compute). Arrays of
    any other layout, and big-endian ones, are read through zarr. A missing chunk file is an error:
    the stages write every image's chunk, so one is missing only if the store lost it (a partial copy,
    a network disk), and zarr's fill value would pass for an image of zero features or cluster -1.
    """
    folder = _direct_chunk_path(array)
    endian = getattr(array.metadata.codecs[0], "endian", None) if folder is not None else None
    if folder is None or getattr(endian, "value", endian) not in (None, "little"):
        return np.asarray(array[start:stop])
    codec = array.metadata.codecs[1]._blosc_codec
    dtype = array.dtype.newbyteorder("<")
    chunk_shape = tuple(array.shape[1:])
    out = np.empty((stop - start, *chunk_shape), dtype=array.dtype)

    def decode(row: int) -> None:
        path = _image_chunk_file(array, folder, start + row)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"chunk file '{path}' (image {start + row} of the store) is missing; the store is "
                             "incomplete: rerun the stage that wrote it") from None
        try:
            out[row] = np.frombuffer(codec.decode(raw), dtype=dtype).reshape(chunk_shape)
        except Exception as err:  # blosc's RuntimeError, or a wrong size
            raise ValueError(f"chunk file '{path}' is corrupt: {type(err).__name__}: {err} "
                             f"(expected a Blosc chunk of {chunk_shape} {array.dtype}); rerun the stage that wrote it") from None

    for future in [_read_pool().submit(decode, row) for row in range(stop - start)]:
        future.result()
    return out


class BackgroundWriter:
    """Writes image blocks into a Zarr array on background threads, overlapping the next batch's compute.

    For the stores this module creates, each image's chunk is compressed and written as its file by a
    pool of `threads` (zarr's own write path runs about one chunk at a time: 75 images/s of 60x60x256
    float16 on a 16-core machine); other arrays go through zarr's setitem. At most two blocks wait
    (memory stays bounded); an error is raised by the next put() or by close(), which must be called.
    A block may be a tensor whose copy from the GPU is still under way: put's `ready` waits for it, on
    the writer's thread.
    """

    def __init__(self, array, threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.array = array
        self.folder = _direct_chunk_path(array)
        self.pool = ThreadPoolExecutor(threads or min(8, usable_cores())) if self.folder is not None else None
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _write_chunk(self, index: int, image: np.ndarray) -> None:
        codec = self.array.metadata.codecs[1]._blosc_codec
        data = np.ascontiguousarray(image, dtype=self.array.dtype.newbyteorder("<"))
        path = _image_chunk_file(self.array, self.folder, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(codec.encode(data))

    def _write(self, start: int, block, ready: Callable[[], None] | None = None) -> None:
        if ready is not None:
            ready()
        block = np.asarray(block)  # a CPU tensor shares its memory
        if self.pool is None:
            self.array[start:start + len(block)] = block
            return
        if block.shape[1:] != tuple(self.array.shape[1:]) or start + len(block) > self.array.shape[0]:
            raise ValueError(f"block of shape {block.shape} at {start} does not fit array of shape {self.array.shape}")
        for future in [self.pool.submit(self._write_chunk, start + i, block[i]) for i in range(len(block))]:
            future.result()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as err:  # handed to the main thread
                    self.error = err

    def put(self, start: int, block, ready: Callable[[], None] | None = None) -> None:
        """Queue `block` (an array, or a CPU tensor) for array[start:start + len(block)]; `ready`, if given,
        is called on the writer's thread before the block is read (e.g. to wait for a device copy)."""
        if self.error is not None:
            raise self.error
        self.jobs.put((start, block, ready))

    def close(self) -> None:
        """Wait for every queued block to be written; raise the writer's error if there was one."""
        self.jobs.put(None)
        self.thread.join()
        if self.pool is not None:
            self.pool.shutdown()
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
        if len(set(self.image_ids)) != len(self.image_ids):
            counts = collections.Counter(self.image_ids)
            repeated = [image_id for image_id, count in counts.items() if count > 1]
            raise ValueError(f"{self.kind} stores {', '.join(f'{p}' for p in self.paths[:3])}"
                             f"{' ...' if len(self.paths) > 3 else ''} list {len(repeated)} image(s) more than once "
                             f"(e.g. {repeated[:3]}); expected each image in exactly one shard, each shard given once")

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
    consistent_attrs = ("backbone", "layer", "stride", "image_size", "dim", "dtype", "checkpoint_sha256", "preprocessing")

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
        return read_images(self.groups[shard]["features"], local, local + 1)[0]

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

    def iter_batches(self, images_per_batch: int, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[range, np.ndarray, np.ndarray]]:
        """Yield (global index range, features [b, gh, gw, C], valid [b, 2]) over images [start, stop);
        batches never span two shards."""
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        stop = len(self) if stop is None else min(stop, len(self))
        for group, (shard_start, shard_stop) in zip(self.groups, self.shard_ranges()):
            features = group["features"]
            end = min(shard_stop, stop)
            for first in range(max(shard_start, start), end, images_per_batch):
                last = min(first + images_per_batch, end)
                block = read_images(features, first - shard_start, last - shard_start)
                yield range(first, last), block, self._valid[first:last]


READ_BATCH_IMAGES = 32  # images per Zarr read when fit and the mini-batch fit stream a selection: bounds the transient memory


def iter_selected(store: EmbeddingStore, images: np.ndarray,
                  images_per_batch: int) -> Iterator[tuple[range, np.ndarray, np.ndarray]]:
    """EmbeddingStore.iter_batches over the given sorted, distinct image indices only: each run of
    consecutive indices is read as a range, so a random selection reads only its own chunks."""
    images = np.asarray(images, np.int64)
    if len(images) == 0:
        return
    breaks = np.flatnonzero(np.diff(images) != 1) + 1
    for run in np.split(images, breaks):
        yield from store.iter_batches(images_per_batch, start=int(run[0]), stop=int(run[-1]) + 1)


def embedder_name(attrs: dict) -> str | None:
    """The embedder as artifact paths and score tables name it (backbone, plus -d<dim> when embed projected
    the features), from a store's attributes; None for a store written before they said whether it projected."""
    if not attrs.get("backbone") or "projected" not in attrs:
        return None
    return attrs["backbone"] + (f"-d{attrs['dim']}" if attrs["projected"] else "")


class LabelStore(_ShardedReader):
    """Reader over one or more label shard stores: the cluster id of every grid cell (-1 = padding)."""

    kind = "label"
    arrays = ("labels",)
    consistent_attrs = ("clusters", "centroids_sha256", "backbone", "layer", "image_size")

    def __init__(self, paths):
        super().__init__(paths)
        self.grid = tuple(self.groups[0]["labels"].shape[1:])
        self.clusters = int(self.attrs.get("clusters", 0))
        refined = ["refined" in group for group in self.groups]
        if any(refined) and not all(refined):
            raise ValueError(f"label stores {', '.join(map(str, self.paths))} mix refined and unrefined shards "
                             "(array 'refined'); rerun assign with one clustering.refine setting")
        self.has_refined = all(refined)

    def labels(self, index: int) -> np.ndarray:
        """int16 [gh, gw] cluster ids of one image, -1 on padding."""
        shard, local = self.locate(index)
        return read_images(self.groups[shard]["labels"], local, local + 1)[0]

    def refined(self, index: int) -> np.ndarray:
        """int16 [S, S] superpixel-refined cluster ids at the embed input size S, -1 on padding."""
        if not self.has_refined:
            raise ValueError(f"label store(s) {', '.join(map(str, self.paths))} hold no refined labels "
                             "(written with clustering.refine: none)")
        shard, local = self.locate(index)
        return read_images(self.groups[shard]["refined"], local, local + 1)[0]

    def iter_batches(self, images_per_batch: int) -> Iterator[tuple[range, np.ndarray]]:
        """Yield (global index range, labels [b, gh, gw]); batches never span two shards."""
        for group, (start, stop) in zip(self.groups, self.shard_ranges()):
            for first in range(start, stop, images_per_batch):
                last = min(first + images_per_batch, stop)
                yield range(first, last), read_images(group["labels"], first - start, last - start)
