"""Lloyd k-means in torch: the fit stage's GPU path when the installed faiss has no GPU support.

PyPI's `faiss-cpu` cannot use a GPU, but torch usually can: this class trains the same model as
`faiss.Kmeans` (random initial points, Lloyd iterations, empty clusters split off the large ones,
centroids re-normalised when spherical, the best of `nredo` restarts) with the same verb and the
same two results, `centroids` and `obj`. The points are scored in blocks of `block_rows` rows, so
the transient memory is block_rows x k, and stay on the device for all iterations.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from umtfss.progress import tqdm

SPLIT_EPS = 1.0 / 1024.0  # relative perturbation that separates a split cluster from its parent


class TorchKMeans:
    """k-means of float32 [n, d] points with torch on `device`; `train` fills `centroids` and `obj`.

    `obj[i]` is the objective of iteration i's assignment, as faiss reports it: the sum of the inner
    products with the nearest centroid when spherical, else the sum of squared distances. A restart
    stops early once no point changes cluster (later iterations would repeat it).
    """

    def __init__(self, d: int, k: int, niter: int = 20, nredo: int = 1, spherical: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", block_rows: int = 65536, progress: bool = False):
        if k < 1 or niter < 1 or nredo < 1 or block_rows < 1:
            raise ValueError(f"k, niter, nredo and block_rows must be >= 1, got {k}, {niter}, {nredo}, {block_rows}")
        self.d, self.k, self.niter, self.nredo = d, k, niter, nredo
        self.spherical, self.seed, self.block_rows = spherical, seed, block_rows
        self.device = torch.device(device)
        self.progress = progress  # a bar over the iterations of all restarts, on stderr
        self.centroids: np.ndarray | None = None
        self.obj: list[float] = []

    def train(self, points: np.ndarray, init_centroids: np.ndarray | None = None) -> "TorchKMeans":
        n, d = points.shape
        if d != self.d:
            raise ValueError(f"points have {d} channels, expected {self.d}")
        if n < self.k:
            raise ValueError(f"{n} points cannot make {self.k} clusters")
        x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(self.device)
        best_objective, self.obj = None, []
        self._bar = tqdm(total=self.niter * self.nredo, desc="k-means iterations", unit="it", file=sys.stderr,
                         disable=not self.progress)
        for restart in range(self.nredo):
            rng = np.random.default_rng(self.seed + restart)
            if init_centroids is not None and restart == 0:
                start = np.ascontiguousarray(init_centroids, dtype=np.float32)
            else:
                start = points[np.sort(rng.choice(n, self.k, replace=False))]
            centroids, history = self._lloyd(x, torch.from_numpy(np.array(start, np.float32)).to(self.device), rng)
            self.obj.extend(history)
            final = history[-1] if self.spherical else -history[-1]  # larger is better
            if best_objective is None or final > best_objective:
                best_objective, self.centroids = final, centroids.cpu().numpy()
            self._bar.update(self.niter * (restart + 1) - self._bar.n)  # a converged restart skips the rest
        self._bar.close()
        return self

    def _lloyd(self, x: torch.Tensor, centroids: torch.Tensor, rng: np.random.Generator):
        n = x.shape[0]
        previous = torch.full((n,), -1, dtype=torch.int32, device=x.device)
        labels = torch.empty_like(previous)
        history = []
        for _ in range(self.niter):
            sums = torch.zeros_like(centroids)
            counts = torch.zeros(self.k, dtype=torch.int64, device=x.device)
            objective = torch.zeros((), dtype=torch.float64, device=x.device)
            # argmax of x.c - |c|^2/2 is the nearest centroid in L2; spherical uses the inner product alone
            bias = None if self.spherical else 0.5 * (centroids * centroids).sum(1)
            transposed = centroids.T.contiguous()
            for start in range(0, n, self.block_rows):
                block = x[start:start + self.block_rows]
                scores = block @ transposed
                if bias is not None:
                    scores -= bias
                best, nearest = scores.max(dim=1)
                if self.spherical:
                    objective += best.double().sum()
                else:  # |x - c|^2 = |x|^2 - 2 (x.c - |c|^2/2)
                    objective += ((block * block).sum(1) - 2 * best).clamp_min(0).double().sum()
                labels[start:start + len(block)] = nearest.to(torch.int32)
                sums.index_add_(0, nearest, block)
                counts += torch.bincount(nearest, minlength=self.k)
            history.append(float(objective))
            self._bar.update(1)
            centroids = self._update(sums, counts, rng)
            if torch.equal(labels, previous):
                break
            previous, labels = labels, previous
        return centroids, history

    def _update(self, sums: torch.Tensor, counts: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Means of the clusters; each empty cluster takes half of a large one (chosen ~ its size - 1)."""
        centroids = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
        sizes = counts.cpu().numpy().astype(np.float64)
        for empty in np.flatnonzero(sizes == 0):
            weights = np.maximum(sizes - 1, 0)
            if weights.sum() == 0:
                break
            parent = int(rng.choice(self.k, p=weights / weights.sum()))
            signs = torch.ones(self.d, dtype=centroids.dtype, device=centroids.device)
            signs[1::2] = -1
            base = centroids[parent].clone()
            centroids[empty] = base * (1 + SPLIT_EPS * signs)
            centroids[parent] = base * (1 - SPLIT_EPS * signs)
            sizes[empty] = sizes[parent] // 2
            sizes[parent] -= sizes[empty]
        if self.spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1, eps=1e-12)
        return centroids
