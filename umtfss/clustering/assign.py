"""The assign stage: every pixel of a shard gets its nearest centroid by cosine similarity (paper Eq. 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from umtfss.devices import resolve_device
from umtfss.io import atomic_path
from umtfss.stores import EMBEDDING_ATTRS, BackgroundWriter, EmbeddingStore, array_sha256, create_label_store, prefetch


def load_centroids(centroids: str | Path | np.ndarray) -> np.ndarray:
    """float32 [N, C] centroids from an array or a .npy path, checked for shape."""
    if not isinstance(centroids, np.ndarray):
        path = Path(centroids)
        if not path.is_file():
            raise FileNotFoundError(f"centroids file '{path}' does not exist (expected the fit stage's centroids.npy)")
        try:
            centroids = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"centroids file '{path}' is not a .npy array: {err}") from None
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise ValueError(f"centroids have shape {centroids.shape}, expected [clusters, channels]")
    return np.ascontiguousarray(centroids, dtype=np.float32)


ROWS_PER_BLOCK = 4096  # pixels converted to float32 and multiplied at once on CPU: stays in cache


def nearest_centroid(features: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    """[..., C] features -> int16 [...] index of the centroid of largest inner product (first on ties).

    A matmul + argmax: on CPU in blocks of ROWS_PER_BLOCK pixels (float16 -> float32 conversion and
    product stay in cache; as fast as faiss IndexFlatIP, see benchmarks/assign_throughput.py); on GPU
    the whole batch at once, in the centroids' precision (half for float16 stores).
    """
    shape = features.shape[:-1]
    flat = np.ascontiguousarray(features.reshape(-1, features.shape[-1]))
    with torch.inference_mode():
        if centroids.device.type == "cuda":
            batch = torch.from_numpy(flat).to(centroids.device, non_blocking=True).to(centroids.dtype)
            labels = (batch @ centroids.T).argmax(dim=1).to(torch.int16).cpu().numpy()
        else:
            transposed = centroids.T.contiguous()
            labels = np.empty(len(flat), np.int16)
            for start in range(0, len(flat), ROWS_PER_BLOCK):
                # torch's float16 -> float32 conversion is vectorised; numpy's astype is ~8x slower
                block = torch.from_numpy(flat[start:start + ROWS_PER_BLOCK]).float()
                labels[start:start + ROWS_PER_BLOCK] = (block @ transposed).argmax(dim=1).numpy()
    return labels.reshape(shape)


def assign_shard(embedding_shard_path: str | Path, centroids: str | Path | np.ndarray, out: str | Path,
                 batch_images: int = 32, device: str = "auto", refine: str = "none",
                 progress: bool = True) -> Path:
    """Write the label store of one embedding shard: nearest centroid per grid cell, -1 on padding.

    Streams `batch_images` images at a time (reading the next batch while this one is assigned and the
    previous one written: memory bounded by a few batches); the store is written into a
    temporary sibling and renamed at the end. Returns `out`.
    """
    if refine != "none":
        raise ValueError(f"config key 'clustering.refine' is '{refine}': superpixel refinement is not available "
                         "yet; use 'none'")
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    store = EmbeddingStore([embedding_shard_path])
    matrix = load_centroids(centroids)
    if matrix.shape[1] != store.dim:
        raise ValueError(f"centroids have {matrix.shape[1]} channels but embedding store '{embedding_shard_path}' "
                         f"has {store.dim}; fit and assign must use the same embeddings")
    if matrix.shape[0] > np.iinfo(np.int16).max:
        raise ValueError(f"{matrix.shape[0]} clusters do not fit the int16 label store (max 32767)")
    torch_device = resolve_device(device, "clustering.device")
    centroid_tensor = torch.from_numpy(matrix).to(torch_device)
    if torch_device.type == "cuda" and store.dtype == np.float16:
        centroid_tensor = centroid_tensor.half()
    attrs = {key: store.attrs.get(key) for key in EMBEDDING_ATTRS}
    attrs.update(image_ids=store.image_ids, clusters=int(matrix.shape[0]), centroids_sha256=array_sha256(matrix),
                 grid=list(store.grid), embeddings=str(embedding_shard_path))
    with atomic_path(out) as temp:
        writer = BackgroundWriter(create_label_store(temp, len(store), store.grid, attrs)["labels"])
        try:
            bar = tqdm(total=len(store), desc="assign", unit="img", file=sys.stderr, disable=not progress)
            for indices, block, valid in prefetch(store.iter_batches(batch_images)):
                labels = nearest_centroid(block, centroid_tensor)
                for row, (rows, cols) in enumerate(valid):
                    labels[row, rows:, :] = -1
                    labels[row, :, cols:] = -1
                writer.put(indices.start, labels)
                bar.update(len(indices))
            bar.close()
        finally:
            writer.close()
    return Path(out)


def cli(parser):
    """`umtfss assign`: the label store of one embedding shard."""
    parser.add_argument("--config", required=True, help="YAML path or inline JSON (section 'clustering')")
    parser.add_argument("--embeddings", required=True, help="one embedding shard store")
    parser.add_argument("--centroids", required=True, help="centroids.npy from the fit stage")
    parser.add_argument("--out", required=True, help="output label store, e.g. labels/shard-0-of-8.zarr")
    parser.add_argument("--batch-images", type=int, default=32, help="images per read/assign batch")

    def run(args):
        from umtfss.config import load

        cfg = load(args.config)["clustering"]
        assign_shard(args.embeddings, args.centroids, args.out, batch_images=args.batch_images,
                     device=cfg["device"], refine=cfg["refine"])

    return run
