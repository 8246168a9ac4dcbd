"""Benchmark: the fit stage's k-means (faiss, and torch) against scikit-learn's Lloyd k-means from the same start.

All run side by side in one process on the same clustered float32 points, with the same initial
centroids, the same iteration budget and the same thread count. They run Euclidean (non-spherical)
here so that all minimise the same objective; the final solutions are scored by one function (sum
of squared distances to the nearest centroid). faiss and torch stop a run early once it has
converged and scikit-learn (tol=0) does not always, so the speed-up is reported both per run and
per iteration. The last line is the floor of any exact Lloyd iteration on this device: one bare
float32 matmul + argmax over all points. Targets: >= 5x faster than scikit-learn, objective within 1%.

    python benchmarks/fit_vs_sklearn.py            # 10^6 x 256 points, 50 clusters, 20 iterations
    python benchmarks/fit_vs_sklearn.py --quick    # a small version that runs in seconds
    python benchmarks/fit_vs_sklearn.py --device cuda   # the torch backend on a GPU (faiss and sklearn on CPU)
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from umtfss.clustering.fit import train_kmeans
from umtfss.devices import resolve_device


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
    parser.add_argument("--device", default="auto", help="device of the torch backend (auto: cuda when present)")
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
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    def timed(run):
        started = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - started

    runs = {}
    runs["faiss (cpu)"] = timed(lambda: train_kmeans(data, clusters, args.iterations, redo=1, seed=args.seed,
                                                     spherical=False, init_centroids=init))
    runs[f"torch ({device})"] = timed(lambda: train_kmeans(data, clusters, args.iterations, 1, args.seed,
                                                          spherical=False, init_centroids=init, backend="torch",
                                                          device=str(device)))
    with threadpool_limits(args.threads):
        reference, sklearn_seconds = timed(lambda: KMeans(clusters, init=init, n_init=1, max_iter=args.iterations,
                                                          tol=0, algorithm="lloyd", random_state=args.seed).fit(data))
    sklearn_sse = sum_squared_distances(data, reference.cluster_centers_)
    sklearn_per_iteration = sklearn_seconds / reference.n_iter_
    print(f"{'sklearn (cpu)':14s}: {sklearn_seconds:8.2f} s  {reference.n_iter_:3d} iterations  "
          f"{sklearn_per_iteration:7.3f} s/iteration  SSE {sklearn_sse:.6e}")
    for name, (kmeans, seconds) in runs.items():
        iterations = len(kmeans.obj)
        difference = (sum_squared_distances(data, kmeans.centroids) - sklearn_sse) / sklearn_sse
        print(f"{name:14s}: {seconds:8.2f} s  {iterations:3d} iterations  {seconds / iterations:7.3f} s/iteration  "
              f"speed-up {sklearn_seconds / seconds:5.2f}x per run, {sklearn_per_iteration * iterations / seconds:5.2f}x "
              f"per iteration (target >= 5x)  objective {100 * difference:+.4f}% (target within 1%)")
    x = torch.from_numpy(data).to(device)
    c = torch.from_numpy(init).to(device)
    _, floor = timed(lambda: [(x[i:i + 65536] @ c.T).argmax(1) for i in range(0, points, 65536)])
    print(f"floor on {device}: one float32 matmul + argmax over all points {floor:.3f} s/iteration "
          f"(sklearn is {sklearn_per_iteration / floor:.1f}x that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
