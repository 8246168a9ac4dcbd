"""Benchmark: faiss k-means (as the fit stage runs it) against scikit-learn's Lloyd k-means from the same start.

Both run side by side in one process on the same clustered float32 points, with the same initial
centroids, the same number of Lloyd iterations and the same thread count. faiss runs Euclidean
(non-spherical) here so that both minimise the same objective; the final solutions are scored by one
function (sum of squared distances to the nearest centroid). Targets: faiss >= 5x faster, objective
within 1%.

    python benchmarks/fit_vs_sklearn.py            # 10^6 x 256 points, 50 clusters, 20 iterations
    python benchmarks/fit_vs_sklearn.py --quick    # a small version that runs in seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from umtfss.clustering.fit import train_kmeans


def clustered_points(points: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Gaussian blobs around random centres (the spread varies per blob), float32."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    spread = rng.uniform(0.3, 1.0, size=centres).astype(np.float32)
    which = rng.integers(0, centres, size=points)
    data = rng.standard_normal(size=(points, dim), dtype=np.float32)
    data *= spread[which, None]
    data += means[which]
    return data


def sum_squared_distances(points: np.ndarray, centroids: np.ndarray, block: int = 65536) -> float:
    """Sum over points of the squared distance to the nearest centroid (float64 accumulation, blockwise)."""
    c = centroids.astype(np.float32)
    c_norms = (c.astype(np.float64) ** 2).sum(1)
    total = 0.0
    for start in range(0, len(points), block):
        x = points[start:start + block]
        x_norms = (x.astype(np.float64) ** 2).sum(1)
        dots = (x @ c.T).astype(np.float64)
        total += float(np.maximum(x_norms[:, None] - 2 * dots + c_norms[None], 0).min(1).sum())
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50,000 x 64 points, 20 clusters")
    parser.add_argument("--points", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--clusters", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    points = args.points or (50_000 if args.quick else 1_000_000)
    dim = args.dim or (64 if args.quick else 256)
    clusters = args.clusters or (20 if args.quick else 50)
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"parameters: points={points} dim={dim} clusters={clusters} iterations={args.iterations} "
          f"threads={args.threads} seed={args.seed} faiss={faiss.__version__}")

    data = clustered_points(points, dim, centres=2 * clusters, seed=args.seed)
    init = data[np.random.default_rng(args.seed + 1).choice(points, clusters, replace=False)].copy()
    faiss.omp_set_num_threads(args.threads)

    started = time.perf_counter()
    kmeans = train_kmeans(data, clusters, args.iterations, redo=1, seed=args.seed, gpu=False, spherical=False,
                          init_centroids=init)
    faiss_seconds = time.perf_counter() - started
    with threadpool_limits(args.threads):
        started = time.perf_counter()
        reference = KMeans(clusters, init=init, n_init=1, max_iter=args.iterations, tol=0, algorithm="lloyd",
                           random_state=args.seed).fit(data)
        sklearn_seconds = time.perf_counter() - started

    faiss_sse = sum_squared_distances(data, kmeans.centroids)
    sklearn_sse = sum_squared_distances(data, reference.cluster_centers_)
    difference = (faiss_sse - sklearn_sse) / sklearn_sse
    print(f"faiss   : {faiss_seconds:8.2f} s  ({len(kmeans.obj)} iterations)  SSE {faiss_sse:.6e}")
    print(f"sklearn : {sklearn_seconds:8.2f} s  ({reference.n_iter_} iterations)  SSE {sklearn_sse:.6e}")
    print(f"speed-up faiss vs sklearn: {sklearn_seconds / faiss_seconds:.2f}x (target >= 5x)")
    print(f"objective difference (faiss - sklearn) / sklearn: {100 * difference:+.4f}% (target within 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
