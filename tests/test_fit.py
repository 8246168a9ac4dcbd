"""Tests of the fit stage: uniform subset of valid pixels, faiss on the whole subset, atomic outputs, CLI."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import zarr

from umtfss import cli
from umtfss.clustering import fit
from umtfss.clustering.fit import fit_centroids, sample_pixels, train_kmeans, write_fit
from umtfss.stores import EmbeddingStore, array_sha256, create_embedding_store


def write_store(path, features, valid, dtype="float32", first_id=0):
    """An embedding store holding the given [n, gh, gw, C] features (padding cells filled with a marker);
    its images are im<first_id>, im<first_id + 1>, ... (shards of one set hold distinct ids)."""
    n, gh, gw, dim = features.shape
    attrs = {"image_ids": [f"im{i}" for i in range(first_id, first_id + n)], "backbone": "synthetic", "layer": "layer4", "stride": 8,
             "image_size": gh * 8, "dim": dim, "dtype": dtype, "checkpoint_sha256": None, "preprocessing": "test",
             "shard": 0, "num_shards": 1, "umtfss_version": "test"}
    group = create_embedding_store(path, n, (gh, gw), dim, dtype, attrs)
    group["features"][:] = features.astype(dtype)
    group["valid"][:] = valid
    group["sizes"][:] = np.asarray(valid) * 8
    return path


def clustered_store(path, n_images=12, grid=(10, 10), dim=8, centres=4, seed=0):
    """Pixels drawn around `centres` unit vectors; padding cells hold a far-away marker vector."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    feats = means[rng.integers(0, centres, (n_images, *grid))] + 0.05 * rng.normal(size=(n_images, *grid, dim))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    valid = np.stack([rng.integers(3, grid[0] + 1, n_images), rng.integers(3, grid[1] + 1, n_images)], axis=1)
    marker = np.zeros(dim)
    marker[0] = 1e3
    for i, (rows, cols) in enumerate(valid):
        feats[i, rows:, :] = marker
        feats[i, :, cols:] = marker
    return write_store(path, feats, valid), feats, valid


def test_subset_is_uniform_over_valid_pixels_only(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "e.zarr")
    store = EmbeddingStore(path)
    total = int((valid[:, 0] * valid[:, 1]).sum())
    subset = sample_pixels(store, 300, seed=1)
    assert subset.shape == (300, 8)
    np.testing.assert_allclose(np.linalg.norm(subset, axis=1), 1.0, atol=1e-5)
    valid_pixels = np.concatenate([feats[i, :r, :c].reshape(-1, 8) for i, (r, c) in enumerate(valid)])
    # every sampled row is a valid pixel (no padding marker), and rows are distinct pixels
    distances = ((subset[:, None, :] - valid_pixels[None].astype(np.float32)) ** 2).sum(-1).min(1)
    assert distances.max() < 1e-8
    assert len(np.unique(subset, axis=0)) == 300
    # seeded: same seed same subset, other seed another; asking for more than exists gives everything
    np.testing.assert_array_equal(subset, sample_pixels(store, 300, seed=1))
    assert not np.array_equal(subset, sample_pixels(store, 300, seed=2))
    assert sample_pixels(store, 10 * total, seed=0).shape[0] == total


def test_subset_is_proportional_to_valid_area(tmp_path):
    """Image 0 has 4x the valid area of image 1: it gets ~4x the pixels."""
    feats = np.zeros((2, 20, 20, 2), np.float32)
    feats[0, ..., 0] = 1
    feats[1, ..., 1] = 1
    store = EmbeddingStore(write_store(tmp_path / "p.zarr", feats, [[20, 20], [10, 10]]))
    subset = sample_pixels(store, 250, seed=0)
    share = (subset[:, 0] > 0.5).mean()
    assert 0.72 < share < 0.88  # expected 0.8 (hypergeometric, sd ~0.01)


class CountingKmeans(faiss.Kmeans):
    """faiss.Kmeans that records how many points faiss was allowed to train on."""

    seen = {}

    def train(self, x, *args, **kwargs):
        CountingKmeans.seen = {"n": x.shape[0], "k": self.k, "max_ppc": self.cp.max_points_per_centroid}
        return super().train(x, *args, **kwargs)


def test_fit_uses_the_whole_subset(tmp_path, monkeypatch):
    path, _, _ = clustered_store(tmp_path / "e.zarr", n_images=30, grid=(14, 14))
    monkeypatch.setattr(fit.faiss, "Kmeans", CountingKmeans)
    subset_size = 1000  # > 2 clusters x 256: faiss's default would silently keep 512 of them
    centroids, meta = fit_centroids([path], clusters=2, subset_pixels=subset_size, iterations=5, seed=3,
                                    device="cpu", progress=False)
    seen = CountingKmeans.seen
    assert meta["subset_pixels"] == subset_size == seen["n"]
    assert seen["k"] * seen["max_ppc"] >= seen["n"]  # faiss subsamples only above k * max_points_per_centroid
    # the final objective is a sum over ALL subset points (a 512-point sample would give about a third)
    subset = sample_pixels(EmbeddingStore(path), subset_size, seed=3)
    all_points_objective = (subset @ centroids.T).max(1).sum()
    assert meta["objective_final"] == pytest.approx(all_points_objective, rel=0.02)
    # the same as a direct faiss run on the full subset
    direct = train_kmeans(subset, 2, 5, 1, 3)
    expected = direct.centroids / np.linalg.norm(direct.centroids, axis=1, keepdims=True)
    np.testing.assert_allclose(centroids, expected, atol=1e-6)


def test_centroids_recover_clusters_and_meta(tmp_path):
    path, feats, valid = clustered_store(tmp_path / "e.zarr", centres=4)
    centroids, meta = fit_centroids(EmbeddingStore(path), clusters=4, subset_pixels=800, iterations=10, redo=2,
                                    seed=0, device="auto", progress=False)
    assert centroids.shape == (4, 8) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    # every true centre is matched by a centroid at cosine > 0.99
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 8))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert (means @ centroids.T).max(1).min() > 0.99
    assert meta["clusters"] == 4 and meta["seed"] == 0 and meta["redo"] == 2 and meta["gpu"] is False
    assert 2 <= len(meta["objective"]) <= 10 * 2  # faiss stops a restart early once the objective stops changing
    assert meta["valid_pixels"] == int((valid[:, 0] * valid[:, 1]).sum())
    assert meta["embedding"]["backbone"] == "synthetic" and meta["faiss_version"] == faiss.__version__
    assert meta["centroids_sha256"] == array_sha256(centroids)


def test_euclidean_metric_keeps_plain_means_as_faiss_l2_kmeans_does(tmp_path):
    """clustering.metric euclidean (Eq. 3, the reference code's IndexFlatL2): the centroids are faiss's
    non-spherical k-means means of the same subset, not re-normalised."""
    path, _, _ = clustered_store(tmp_path / "e.zarr", centres=4)
    store = EmbeddingStore(path)
    centroids, meta = fit_centroids(store, clusters=3, subset_pixels=800, iterations=10, seed=0, device="cpu",
                                    backend="faiss", progress=False, metric="euclidean")
    assert meta["metric"] == "euclidean"
    norms = np.linalg.norm(centroids, axis=1)
    assert norms.min() < 0.99  # a cluster that merges two true centres has a mean inside the sphere
    expected = train_kmeans(sample_pixels(store, 800, 0), 3, 10, 1, 0, backend="faiss", device="cpu", spherical=False)
    np.testing.assert_allclose(centroids, expected.centroids, atol=1e-6)
    spherical, meta = fit_centroids(store, clusters=3, subset_pixels=800, iterations=10, seed=0, device="cpu",
                                    backend="faiss", progress=False)
    assert meta["metric"] == "spherical"
    np.testing.assert_allclose(np.linalg.norm(spherical, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="clustering.metric"):
        fit_centroids(store, clusters=3, subset_pixels=800, progress=False, metric="manhattan")


def test_errors(tmp_path):
    path, _, _ = clustered_store(tmp_path / "e.zarr", n_images=1, grid=(3, 3))
    with pytest.raises(ValueError, match="clusters"):
        fit_centroids([path], clusters=20, subset_pixels=100, device="cpu", progress=False)
    with pytest.raises(ValueError, match="clustering.device"):
        fit_centroids([path], clusters=2, subset_pixels=100, device="tpu", progress=False)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="faiss sees no GPU"):
            fit.faiss_gpu("cuda")


def test_cli_writes_outputs_atomically(tmp_path, monkeypatch, capsys):
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    config = json.dumps({"clustering": {"clusters": 3, "subset_pixels": 200, "iterations": 4, "seed": 7}})
    out_c, out_m = tmp_path / "k" / "centroids.npy", tmp_path / "k" / "fit.json"
    argv = ["fit", "--config", config, "--embeddings", str(path), "--out-centroids", str(out_c), "--out-meta", str(out_m)]
    assert cli.main(argv) == 0
    meta = json.loads(out_m.read_text())
    centroids = np.load(out_c)
    assert centroids.shape == (3, 8) and meta["subset_pixels"] == 200 and meta["seed"] == 7
    assert meta["centroids_sha256"] == array_sha256(centroids)
    # a failing fit leaves the previous outputs untouched and no temporary files
    monkeypatch.setattr(fit, "train_kmeans", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    assert cli.main(argv) == 1
    assert "boom" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out_c), centroids)
    assert sorted(p.name for p in out_c.parent.iterdir()) == ["centroids.npy", "fit.json"]


def test_cli_refuses_one_path_for_both_outputs(tmp_path, capsys):
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    config = json.dumps({"clustering": {"clusters": 3, "subset_pixels": 200, "iterations": 4}})
    same = tmp_path / "c.npy"
    argv = ["fit", "--config", config, "--embeddings", str(path), "--out-centroids", str(same), "--out-meta", str(same)]
    assert cli.main(argv) == 1
    assert "--out-meta" in capsys.readouterr().err and not same.exists()


def test_cli_refuses_outputs_in_the_way_before_fitting(tmp_path, monkeypatch, capsys):
    """An output under a file, or a file output that is a folder, is one error line naming the option,
    before the k-means runs (not FileExistsError's traceback, not after minutes of work)."""
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    config = json.dumps({"clustering": {"clusters": 3, "subset_pixels": 200, "iterations": 4}})
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "a-folder").mkdir()
    monkeypatch.setattr(fit, "fit_centroids", lambda *a, **k: pytest.fail("fit ran before the outputs were checked"))
    for centroids, meta, option, said in [
        (tmp_path / "a-file" / "centroids.npy", tmp_path / "k" / "fit.json", "--out-centroids", "is a file"),
        (tmp_path / "k" / "centroids.npy", tmp_path / "a-file" / "fit.json", "--out-meta", "is a file"),
        (tmp_path / "k" / "centroids.npy", tmp_path / "a-folder", "--out-meta", "is a folder"),
    ]:
        argv = ["fit", "--config", config, "--embeddings", str(path), "--out-centroids", str(centroids),
                "--out-meta", str(meta)]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"umtfss fit: error: {option} ") and said in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "keep" and not (tmp_path / "k").exists()


def test_too_few_pixels_names_the_limit_that_binds(tmp_path):
    path, _, valid = clustered_store(tmp_path / "e.zarr", n_images=2, grid=(4, 4))
    total = int((valid[:, 0] * valid[:, 1]).sum())
    with pytest.raises(ValueError, match=f"stores hold only {total} valid pixels to fit 40 clusters; lower 'clustering.clusters'"):
        fit_centroids([path], clusters=40, subset_pixels=1000, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"'clustering.subset_pixels' is 10, fewer than 'clustering.clusters' \(12\)"):
        fit_centroids([path], clusters=12, subset_pixels=10, device="cpu", progress=False)


def test_a_failed_write_leaves_the_earlier_pair_whole(tmp_path):
    """centroids.npy and fit.json are renamed only when both are written: no new centroids beside an
    older fit.json (which would silently turn off assign's embedding check)."""
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    centroids, meta = fit_centroids([path], clusters=3, subset_pixels=200, iterations=3, device="cpu", progress=False)
    out_c, out_m = tmp_path / "k" / "centroids.npy", tmp_path / "k" / "fit.json"
    write_fit(centroids, meta, out_c, out_m)
    with pytest.raises(TypeError):  # fit.json cannot be written: not JSON
        write_fit(centroids[::-1] * 0.5, {**meta, "bad": object()}, out_c, out_m)
    np.testing.assert_array_equal(np.load(out_c), centroids)
    assert json.loads(out_m.read_text())["centroids_sha256"] == array_sha256(centroids)
    assert sorted(p.name for p in out_c.parent.iterdir()) == ["centroids.npy", "fit.json"]


def test_shards_embedded_otherwise_are_not_fit_together(tmp_path):
    """Shards of another preprocessing must not be clustered together (the store reader refuses them)."""
    first, _, _ = clustered_store(tmp_path / "a.zarr")
    second, _, _ = clustered_store(tmp_path / "b.zarr", seed=1)
    zarr.open_group(second, mode="r+").attrs.update(image_ids=[f"b{i}" for i in range(12)], preprocessing="other")
    with pytest.raises(ValueError, match=r"b\.zarr' has preprocessing='other' but '.*a\.zarr' has 'test'; shards must come from one run"):
        fit_centroids([first, second], clusters=3, subset_pixels=200, device="cpu", progress=False)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_says_what_it_trains_and_torch_shows_its_iterations(tmp_path, capsys, backend):
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    fit_centroids([path], clusters=3, subset_pixels=200, iterations=4, device="cpu", backend=backend, progress=True)
    err = capsys.readouterr().err
    assert f"k-means: 200 points x 8 channels into 3 clusters, up to 4 iteration(s) ({backend} on cpu)" in err
    assert ("k-means iterations" in err) == (backend == "torch")
    fit_centroids([path], clusters=3, subset_pixels=200, iterations=4, device="cpu", backend=backend, progress=False)
    assert capsys.readouterr().err == ""


def test_more_clusters_than_a_label_store_holds_are_refused_before_the_fit(tmp_path, monkeypatch):
    path, _, _ = clustered_store(tmp_path / "e.zarr")
    monkeypatch.setattr(fit, "sample_pixels", lambda *a, **k: pytest.fail("pixels sampled"))
    with pytest.raises(ValueError, match="'clustering.clusters' is 40000, expected at most 32767"):
        fit_centroids([path], clusters=40000, subset_pixels=100, device="cpu", progress=False)


@pytest.mark.parametrize("backend,fit_mode", [("faiss", "subset"), ("torch", "subset"), ("faiss", "minibatch")])
def test_degenerate_features_record_and_warn_about_empty_clusters(tmp_path, capsys, backend, fit_mode):
    """Nearly constant features (one vector repeated, 3 others): more clusters than distinct points give
    near-duplicate centroids that no pixel is nearest to; fit.json counts them and stderr says what to do."""
    rng = np.random.default_rng(0)
    feats = np.tile(rng.normal(size=8), (4, 10, 10, 1))
    feats[0, 0, :3] = rng.normal(size=(3, 8))  # 4 distinct rows in all
    path = write_store(tmp_path / "d.zarr", feats, [[10, 10]] * 4)
    centroids, meta = fit_centroids([path], clusters=10, subset_pixels=400, iterations=5, device="cpu",
                                    backend=backend, progress=False, fit_mode=fit_mode, minibatch_images=2)
    subset = sample_pixels(EmbeddingStore(path), 400, 0, images=np.arange(2) if fit_mode == "minibatch" else None)
    nearest = (subset @ centroids.T).argmax(1)  # the final centroids, as assign sees them
    expected = sorted(set(range(10)) - set(nearest.tolist()))
    assert meta["empty_clusters"] == len(expected) >= 10 - 4 and meta["empty_cluster_ids"] == expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"umtfss fit: warning: {len(expected)} of the 10 clusters")
    assert "'clustering.clusters'" in err and "lower" in err and "embedding" in err
    assert meta["subset_distinct_points"] == 4 and "only 4 distinct points" in err  # image 0 is in either subset


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_a_normal_fit_records_no_empty_cluster_and_warns_nothing(tmp_path, capsys, backend):
    path, _, _ = clustered_store(tmp_path / "e.zarr", centres=4)
    _, meta = fit_centroids([path], clusters=4, subset_pixels=800, iterations=10, device="cpu", backend=backend,
                            progress=False)
    assert meta["empty_clusters"] == 0 and meta["empty_cluster_ids"] == [] and meta["subset_distinct_points"] is None
    assert capsys.readouterr().err == ""


def test_cluster_sizes_go_block_by_block(monkeypatch):
    """The pass over the subset scores a bounded block of rows at a time and counts every point once."""
    monkeypatch.setattr(fit, "SIZE_BLOCK_ELEMENTS", 30)  # 10 rows of 3 clusters per block
    points = np.repeat(np.eye(3, dtype=np.float32), [5, 0, 20], axis=0)
    seen = []
    real = fit.nearest_centroid
    monkeypatch.setattr(fit, "nearest_centroid", lambda rows, c: seen.append(len(rows)) or real(rows, c))
    np.testing.assert_array_equal(fit.cluster_sizes(points, np.eye(3, dtype=np.float32)), [5, 0, 20])
    assert seen == [10, 10, 5]
    assert fit.distinct_rows(points) == 2
