"""Tests of clustering.fit_mode minibatch: the reference code's first-group k-means, then running means."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_fit import clustered_store, write_store
from umtfss import cli
from umtfss.clustering import fit
from umtfss.clustering.fit import fit_centroids, sample_pixels, train_kmeans
from umtfss.clustering.minibatch import image_groups, running_means
from umtfss.stores import EmbeddingStore


def image_pixels(feats, valid, images):
    """float64 [m, C] the normalised valid pixels of the given images, in store order."""
    rows = np.concatenate([feats[i, :r, :c].reshape(-1, feats.shape[-1]) for i in images for r, c in [valid[i]]])
    rows = rows.astype(np.float32).astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_loop(feats, valid, centroids, group, spherical=False):
    """The reference loop written out plainly: counts from the first group, then per full group, for each
    cluster hit: count += n_k, rate = n_k / count, c = (1 - rate) c + rate mean_k (squared L2 nearest)."""
    centroids = centroids.astype(np.float64).copy()
    n = len(feats)
    first = min(group, n)
    starts = list(range(first, n - group + 1, group))
    count = np.zeros(len(centroids))
    for index, (start, stop) in enumerate([(0, first)] + [(s, s + group) for s in starts]):
        x = image_pixels(feats, valid, range(start, stop))
        distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        nearest = distances.argmin(1)
        for k in np.unique(nearest):
            members = x[nearest == k]
            count[k] += len(members)
            if index > 0:
                rate = len(members) / count[k]
                centroids[k] = (1 - rate) * centroids[k] + rate * members.mean(0)
                if spherical:
                    centroids[k] /= np.linalg.norm(centroids[k])
    return centroids, count


def random_unit(rows, dim, seed):
    vectors = np.random.default_rng(seed).normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def plan(groups):
    return len(groups.first), len(groups.updates), groups.left_out


def test_image_groups_follow_the_reference_loop():
    assert plan(image_groups(5953, 3200)) == (3200, 0, 2753)  # PASCAL: the first 3,200 images, no update at all
    groups = image_groups(5953, 3200)
    np.testing.assert_array_equal(groups.first, np.arange(3200))  # list order
    assert plan(image_groups(100, 3200)) == (100, 0, 0)  # fewer images than a group: all of them
    assert plan(image_groups(30, 7)) == (7, 3, 2)
    for bad in ({"group_images": 0}, {"group_images": 5, "sample_images": 0}):
        with pytest.raises(ValueError, match="clustering.minibatch"):
            image_groups(10, **bad)


def test_image_groups_draw_a_random_sample_from_a_larger_store():
    """COCO: 20,000 of 82,081 images at random (the reference's --sample_num), then 3,200 + 5 x 3,200."""
    groups = image_groups(82081, 3200, sample_images=20000, seed=3)
    assert plan(groups) == (3200, 5, 800) and groups.sampled == 20000
    drawn = np.concatenate([groups.first, *groups.updates])
    assert len(np.unique(drawn)) == 19200 and drawn.max() < 82081
    assert groups.first.max() > 3200 * 10  # not the head of the list
    assert all(np.all(np.diff(group) > 0) for group in [groups.first, *groups.updates])
    again = image_groups(82081, 3200, sample_images=20000, seed=3)
    np.testing.assert_array_equal(again.first, groups.first)
    assert not np.array_equal(image_groups(82081, 3200, sample_images=20000, seed=4).first, groups.first)
    assert plan(image_groups(82081, 3200, sample_images=None)) == (3200, 24, 2081)  # null: every image, list order


@pytest.mark.parametrize("spherical", [False, True])
def test_running_means_equal_the_reference_loop(tmp_path, spherical):
    path, feats, valid = clustered_store(tmp_path / "e.zarr", n_images=30, centres=4)
    start = random_unit(4, 8, seed=5) * (1.0 if spherical else 0.9)  # euclidean centroids lie inside the sphere
    centroids, meta = running_means(EmbeddingStore(path), start, image_groups(30, 7), spherical=spherical,
                                    progress=False)
    expected, count = reference_loop(feats, valid, start, 7, spherical)
    np.testing.assert_allclose(centroids, expected, atol=2e-5)
    assert not np.allclose(centroids, start, atol=1e-2)  # the updates did move them
    assert meta["pixels_per_cluster"] == count.astype(int).tolist()
    assert sum(meta["pixels_per_cluster"]) == int((valid[:28, 0] * valid[:28, 1]).sum())  # images 28, 29 left out
    assert (meta["first_group_images"], meta["update_groups"], meta["images_left_out"]) == (7, 3, 2)
    assert len(meta["group_objective_mean"]) == 4
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)


def test_group_objective_is_the_mean_distance_to_the_nearest_centroid(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "e.zarr", n_images=6, centres=3)
    start = random_unit(3, 8, seed=1) * 0.8
    _, meta = running_means(EmbeddingStore(path), start, image_groups(6, 6), spherical=False, progress=False)
    x = image_pixels(feats, valid, range(6))
    expected = ((x[:, None, :] - start[None].astype(np.float64)) ** 2).sum(-1).min(1).mean()
    assert meta["group_objective_mean"] == [pytest.approx(expected, abs=1e-5)]


def test_running_means_are_the_same_over_shards(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "one.zarr", n_images=30)
    first = write_store(tmp_path / "a.zarr", feats[:11], valid[:11])
    second = write_store(tmp_path / "b.zarr", feats[11:], valid[11:], first_id=11)
    start = random_unit(4, 8, seed=2) * 0.9
    whole, _ = running_means(EmbeddingStore(path), start, image_groups(30, 7), spherical=False, progress=False)
    split, _ = running_means(EmbeddingStore([first, second]), start, image_groups(30, 7), spherical=False,
                             progress=False)
    np.testing.assert_allclose(split, whole, atol=1e-6)


def test_minibatch_fit_trains_on_the_first_group_and_leaves_the_tail_out(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "e.zarr", n_images=30, centres=4)
    store = EmbeddingStore(path)
    centroids, meta = fit_centroids(store, clusters=4, subset_pixels=10**6, iterations=10, seed=0, device="cpu",
                                    backend="faiss", metric="euclidean", fit_mode="minibatch", minibatch_images=7,
                                    progress=False)
    first_pixels = int((valid[:7, 0] * valid[:7, 1]).sum())
    assert meta["fit_mode"] == "minibatch" and meta["subset_pixels"] == first_pixels  # all of the first group only
    kmeans = train_kmeans(sample_pixels(store, 10**6, 0, images=np.arange(7)), 4, 10, 1, 0, backend="faiss", device="cpu",
                          spherical=False)
    expected, _ = reference_loop(feats, valid, kmeans.centroids, 7)
    np.testing.assert_allclose(centroids, expected, atol=2e-5)
    assert meta["minibatch"]["images_used"] == 28 and meta["minibatch"]["images_left_out"] == 2
    # the two left-out images do not matter; an image of an update group does
    changed = feats.copy()
    changed[28:] = np.roll(changed[28:], 1, axis=-1)
    tail, _ = fit_centroids([write_store(tmp_path / "tail.zarr", changed, valid)], clusters=4, subset_pixels=10**6,
                            iterations=10, seed=0, device="cpu", backend="faiss", metric="euclidean",
                            fit_mode="minibatch", minibatch_images=7, progress=False)
    np.testing.assert_array_equal(tail, centroids)
    changed = feats.copy()
    changed[20] = np.roll(changed[20], 1, axis=-1)
    middle, _ = fit_centroids([write_store(tmp_path / "mid.zarr", changed, valid)], clusters=4, subset_pixels=10**6,
                              iterations=10, seed=0, device="cpu", backend="faiss", metric="euclidean",
                              fit_mode="minibatch", minibatch_images=7, progress=False)
    assert np.abs(middle - centroids).max() > 1e-4


def test_minibatch_fit_on_a_random_draw_of_images(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "e.zarr", n_images=30, centres=4)
    _, meta = fit_centroids([path], clusters=4, subset_pixels=10**6, iterations=5, seed=2, device="cpu",
                            fit_mode="minibatch", minibatch_images=7, minibatch_sample_images=20, progress=False)
    groups = image_groups(30, 7, 20, seed=2)
    used = np.concatenate([groups.first, *groups.updates])
    assert meta["minibatch"]["sampled_images"] == 20 and meta["minibatch"]["images_left_out"] == 6
    assert sum(meta["minibatch"]["pixels_per_cluster"]) == int((valid[used, 0] * valid[used, 1]).sum())
    assert meta["subset_pixels"] == int((valid[groups.first, 0] * valid[groups.first, 1]).sum())
    assert not np.array_equal(used, np.arange(14))


def test_minibatch_first_group_subset_is_drawn_from_the_first_group_only(tmp_path, monkeypatch):
    """With more first-group pixels than subset_pixels, the k-means gets subset_pixels of them, none later."""
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(10, 6, 6, 4))).astype(np.float32)
    feats[:5, ..., 3] = 0  # the first group's pixels have no channel 3
    feats[5:, ..., 3] = 5  # later images are dominated by it
    valid = np.full((10, 2), 6)
    store = EmbeddingStore(write_store(tmp_path / "e.zarr", feats, valid))
    seen = {}
    original = fit.train_kmeans

    def recording(points, *args, **kwargs):
        seen["points"] = points.copy()
        return original(points, *args, **kwargs)

    monkeypatch.setattr(fit, "train_kmeans", recording)
    _, meta = fit_centroids(store, clusters=2, subset_pixels=100, iterations=3, device="cpu", backend="faiss",
                            fit_mode="minibatch", minibatch_images=5, progress=False)
    assert seen["points"].shape == (100, 4) and meta["subset_pixels"] == 100
    assert np.abs(seen["points"][:, 3]).max() == 0


def test_minibatch_errors_and_cli(tmp_path):
    path, _, _ = clustered_store(tmp_path / "e.zarr", n_images=12)
    with pytest.raises(ValueError, match="clustering.fit_mode"):
        fit_centroids([path], clusters=2, subset_pixels=100, device="cpu", fit_mode="online", progress=False)
    # the first group is too small: the message names the key that helps (not subset_pixels)
    with pytest.raises(ValueError, match=r"group \(1 image\(s\)\) has only 9 valid pixels to fit 20 clusters; "
                                         r"raise 'clustering.minibatch_images'"):
        fit_centroids([write_store(tmp_path / "small.zarr", np.ones((3, 3, 3, 8), np.float32), [[3, 3]] * 3)],
                      clusters=20, subset_pixels=100, device="cpu", fit_mode="minibatch", minibatch_images=1,
                      progress=False)
    config = json.dumps({"clustering": {"clusters": 3, "iterations": 4, "fit_mode": "minibatch",
                                        "minibatch_images": 5}})
    out_c, out_m = tmp_path / "k" / "centroids.npy", tmp_path / "k" / "fit.json"
    assert cli.main(["fit", "--config", config, "--embeddings", str(path), "--out-centroids", str(out_c),
                     "--out-meta", str(out_m)]) == 0
    meta = json.loads(out_m.read_text())
    assert meta["fit_mode"] == "minibatch" and meta["minibatch"]["update_groups"] == 1
    assert meta["minibatch"]["images_left_out"] == 2
