"""Benchmark: the assign stage against merely reading the same embedding store, and its peak memory at two sizes.

Side by side in one run, on a synthetic store of unit-norm float16 features (random, so they compress
as poorly as real ones): (1) images/s of reading every batch of the store (the I/O floor) and of
assign_shard on it, target assign within 2x of the floor; (2) peak RSS (ru_maxrss) of assign_shard
run in a fresh subprocess on a store and on one 4x larger, target the same (memory bounded by a batch).

    python benchmarks/assign_throughput.py            # 60x60x256 grids, 50 and 200 images
    python benchmarks/assign_throughput.py --images 200   # 200 and 800 (about a PASCAL shard: start-up amortised)
    python benchmarks/assign_throughput.py --quick    # 20x20x64 grids, 8 and 32 images
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, images: int, grid: int, dim: int, seed: int = 0) -> Path:
    """A synthetic embedding store written image batch by image batch (bounded memory)."""
    from umtfss.stores import create_embedding_store

    attrs = {"image_ids": [f"im{i:06d}" for i in range(images)], "backbone": "synthetic", "layer": "layer4",
             "stride": 8, "image_size": grid * 8, "dim": dim, "dtype": "float16", "checkpoint_sha256": None,
             "preprocessing": "benchmark", "shard": 0, "num_shards": 1, "umtfss_version": "benchmark"}
    group = create_embedding_store(path, images, (grid, grid), dim, "float16", attrs)
    rng = np.random.default_rng(seed)
    for start in range(0, images, 16):
        count = min(16, images - start)
        block = rng.standard_normal((count, grid, grid, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=-1, keepdims=True)
        group["features"][start:start + count] = block.astype(np.float16)
    valid = np.stack([rng.integers(grid // 2, grid + 1, images), rng.integers(grid // 2, grid + 1, images)], 1)
    group["valid"][:] = valid
    group["sizes"][:] = valid * 8
    return path


def read_floor(path: Path, batch: int) -> float:
    """Seconds to read (and decompress) every feature batch of the store once."""
    from umtfss.stores import EmbeddingStore

    store = EmbeddingStore(path)
    started = time.perf_counter()
    checksum = 0.0
    for _, block, _ in store.iter_batches(batch):
        checksum += float(block[:, 0, 0, 0].astype(np.float32).sum())  # touch the data
    return time.perf_counter() - started


def child_assign(store: str, centroids: str, out: str, batch: int, threads: int) -> None:
    """Run assign in this (fresh) process and print its seconds and peak RSS as JSON."""
    import torch

    torch.set_num_threads(threads)
    from umtfss.clustering.assign import assign_shard

    started = time.perf_counter()
    assign_shard(store, centroids, out, batch_images=batch, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024}))


def run_child(store: Path, centroids: Path, out: Path, batch: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(store), str(centroids), str(out), str(batch), str(threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        store, centroids, out, batch, threads = sys.argv[2:7]
        child_assign(store, centroids, out, int(batch), int(threads))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None, help="images in the small store (the large has 4x)")
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="images per assign batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved read / assign measurements")
    parser.add_argument("--device", default="cpu", help="device of the nearest-centroid search (cpu, cuda, auto)")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args(argv)
    images = args.images or (8 if args.quick else 50)
    grid = args.grid or (20 if args.quick else 60)
    dim = args.dim or (64 if args.quick else 256)
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"parameters: images={images} and {4 * images} grid={grid}x{grid} dim={dim} float16 clusters={args.clusters} "
          f"batch={args.batch} threads={args.threads} device={args.device}")

    import torch

    torch.set_num_threads(args.threads)
    from umtfss.clustering.assign import assign_shard

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        small = make_store(work / "small.zarr", images, grid, dim, seed=0)
        large = make_store(work / "large.zarr", 4 * images, grid, dim, seed=1)
        centroids = np.random.default_rng(2).standard_normal((args.clusters, dim)).astype(np.float32)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        np.save(work / "centroids.npy", centroids)

        read_floor(small, args.batch)  # warm the page cache for both measurements
        reads, assigns = [], []
        for repeat in range(args.repeats):  # interleaved, so that a noisy neighbour hits both alike
            reads.append(read_floor(large, args.batch))
            started = time.perf_counter()
            assign_shard(large, work / "centroids.npy", work / f"labels-{repeat}.zarr", batch_images=args.batch,
                         device=args.device, progress=False)
            assigns.append(time.perf_counter() - started)
        read_seconds, assign_seconds = float(np.median(reads)), float(np.median(assigns))
        n = 4 * images
        print(f"read only : {read_seconds:7.2f} s  {n / read_seconds:8.1f} images/s  (median of {args.repeats})")
        print(f"assign    : {assign_seconds:7.2f} s  {n / assign_seconds:8.1f} images/s  (median of {args.repeats})")
        print(f"assign time / read time: {assign_seconds / read_seconds:.2f}x (target <= 2x); per repeat: "
              + ", ".join(f"{a / r:.2f}" for a, r in zip(assigns, reads)))

        small_run = run_child(small, work / "centroids.npy", work / "l_small.zarr", args.batch, args.threads)
        large_run = run_child(large, work / "centroids.npy", work / "l_large.zarr", args.batch, args.threads)
        print(f"peak RSS, {images:5d} images: {small_run['peak_rss_mib']:8.1f} MiB")
        print(f"peak RSS, {4 * images:5d} images: {large_run['peak_rss_mib']:8.1f} MiB")
        print(f"peak RSS ratio (4x data): {large_run['peak_rss_mib'] / small_run['peak_rss_mib']:.3f} (target ~1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
