"""Benchmark: `umtfss inspect`'s cluster-size count of a label store, batched through the stores' parallel
chunk reader, against reading it image by image through zarr (what it did before), side by side.

    python benchmarks/inspect_cluster_sizes.py                 # 10,000 images of 8x8 cells, N = 50
    python benchmarks/inspect_cluster_sizes.py --images 2000 --grid 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from umtfss.inspect import cluster_sizes
    from umtfss.stores import create_label_store

    with tempfile.TemporaryDirectory() as tmp:
        store = create_label_store(Path(tmp) / "labels.zarr", args.images, (args.grid, args.grid), attrs={})
        rng = np.random.default_rng(0)
        for start in range(0, args.images, 1000):
            stop = min(start + 1000, args.images)
            store["labels"][start:stop] = rng.integers(0, args.clusters, (stop - start, args.grid, args.grid), np.int16)
        labels = store["labels"]
        for repeat in range(args.repeats):
            tick = time.perf_counter()
            batched, _ = cluster_sizes(labels)
            batched_s = time.perf_counter() - tick
            tick = time.perf_counter()
            total = np.zeros(args.clusters, np.int64)
            for index in range(args.images):
                total += np.bincount(np.asarray(labels[index]).ravel(), minlength=args.clusters)
            single_s = time.perf_counter() - tick
            assert batched == {k: int(v) for k, v in enumerate(total)}
            print(f"repeat {repeat + 1}: batched {batched_s:.2f} s, image by image {single_s:.2f} s "
                  f"({single_s / batched_s:.1f}x), {args.images} images of {args.grid}x{args.grid}")


if __name__ == "__main__":
    main()
