"""Tests of the torch k-means (the fit stage's GPU path without faiss-gpu), run here on the CPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from umtfss.clustering import fit
from umtfss.clustering.fit import choose_backend, fit_centroids, sample_pixels
from umtfss.clustering.torch_kmeans import TorchKMeans
from umtfss.stores import EmbeddingStore

from test_fit import clustered_store


def blobs(n=6000, dim=16, centres=12, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)) * 3
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def sse(points, centroids):
    distances = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float(distances.min(1).sum())


def test_same_solution_as_faiss_from_the_same_start():
    points = blobs()
    init = points[np.random.default_rng(1).choice(len(points), 8, replace=False)].copy()
    ours = TorchKMeans(16, 8, niter=25, seed=0).train(points, init_centroids=init)
    reference = faiss.Kmeans(16, 8, niter=25, seed=0, max_points_per_centroid=10_000, min_points_per_centroid=1)
    reference.train(points, init_centroids=init)
    np.testing.assert_allclose(np.sort(ours.centroids, axis=0), np.sort(reference.centroids, axis=0), atol=1e-3)
    # obj reports the same quantity as faiss (sum of squared distances of each iteration's assignment)
    assert ours.obj[0] == pytest.approx(reference.obj[0], rel=1e-4)
    assert ours.obj[-1] == pytest.approx(sse(points, ours.centroids), rel=1e-3)


def test_spherical_objective_never_decreases_and_centroids_are_unit():
    points = blobs(dim=8)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    km = TorchKMeans(8, 10, niter=15, spherical=True, seed=3, block_rows=1000).train(points)
    assert km.centroids.shape == (10, 8)
    np.testing.assert_allclose(np.linalg.norm(km.centroids, axis=1), 1.0, atol=1e-5)
    assert all(b >= a - 1e-3 for a, b in zip(km.obj, km.obj[1:]))
    assert km.obj[-1] == pytest.approx(float((points @ km.centroids.T).max(1).sum()), rel=1e-4)


def test_empty_clusters_are_split_off_large_ones():
    points = blobs(n=2000, dim=4, centres=4)
    init = np.repeat(points[:1], 4, axis=0)  # three clusters start empty (ties go to the first)
    km = TorchKMeans(4, 4, niter=20, seed=0).train(points, init_centroids=init)
    labels = ((points[:, None] - km.centroids[None]) ** 2).sum(-1).argmin(1)
    assert len(np.unique(labels)) == 4
    assert len(np.unique(km.centroids.round(4), axis=0)) == 4


def test_restarts_keep_the_best_and_stop_when_assignments_repeat():
    points = blobs(n=3000, dim=8, centres=6)
    km = TorchKMeans(8, 6, niter=50, nredo=3, seed=0).train(points)
    assert len(km.obj) < 3 * 50  # converged restarts stop early
    single = [TorchKMeans(8, 6, niter=50, seed=s).train(points) for s in range(3)]
    restarts = [sse(points, s.centroids) for s in single]
    assert sse(points, km.centroids) == pytest.approx(min(restarts), rel=1e-5)


def test_fit_with_torch_backend(tmp_path):
    path, _, _ = clustered_store(tmp_path / "e.zarr", centres=4)
    centroids, meta = fit_centroids(EmbeddingStore(path), clusters=4, subset_pixels=800, iterations=10, seed=0,
                                    device="cpu", backend="torch", progress=False)
    assert meta["backend"] == "torch" and meta["device"] == "cpu" and meta["gpu"] is False
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 8))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert (means @ centroids.T).max(1).min() > 0.99
    subset = sample_pixels(EmbeddingStore(path), 800, seed=0)
    assert meta["objective_final"] == pytest.approx(float((subset @ centroids.T).max(1).sum()), rel=1e-3)


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(fit.faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto", "auto") == ("faiss", "cpu")
    assert choose_backend("auto", "cpu") == ("faiss", "cpu")
    assert choose_backend("torch", "cpu") == ("torch", "cpu")
    with pytest.raises(ValueError, match="clustering.backend"):
        choose_backend("sklearn", "auto")
    with pytest.raises(ValueError, match="clustering.device"):
        choose_backend("torch", "cuda")
    with pytest.raises(ValueError, match="faiss sees no GPU"):
        choose_backend("faiss", "cuda")
    # a GPU that only torch sees (faiss-cpu on a GPU machine) is used through torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto", "auto") == ("torch", "cuda")
    assert choose_backend("auto", "cuda:1") == ("torch", "cuda:1")
    assert choose_backend("auto", "cpu") == ("faiss", "cpu")
    # and faiss's own GPU indexes when it has them
    monkeypatch.setattr(fit.faiss, "get_num_gpus", lambda: 1)
    assert choose_backend("auto", "auto") == ("faiss", "cuda")
