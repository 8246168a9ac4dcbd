"""The Python API (umtfss.PixelEmbedder, PixelClusters, FewShotSegmenter) gives what the stages give."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from umtfss import FewShotSegmenter, PixelClusters, PixelEmbedder
from umtfss.backbones import build_backbone
from umtfss.clustering.assign import assign_shard
from umtfss.clustering.fit import fit_centroids
from umtfss.config import load
from umtfss.embedding import embed_shard
from umtfss.io import write_png
from umtfss.stores import EmbeddingStore, LabelStore
from umtfss.training import checkpoint as ckpt

torch.set_num_threads(1)

SIZES = [(40, 64), (64, 30), (50, 50), (24, 60)]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Four images of varied shapes, their table and their float32 demo-colortexture store at 64 px."""
    root = tmp_path_factory.mktemp("api")
    rng = np.random.default_rng(0)
    rows = []
    for number, (h, w) in enumerate(SIZES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2, : w // 2] = (220, 30, 30)  # a region of its own colour, so that clusters differ
        path = root / f"img{number}.png"
        Image.fromarray(image).save(path)
        rows.append({"image_id": f"img{number}", "split": "train", "image_path": str(path), "height": h, "width": w})
    pd.DataFrame(rows).to_parquet(root / "images.parquet")
    store = root / "shard-0-of-1.zarr"
    embed_shard(root / "images.parquet", 0, 1, store, build_backbone("demo-colortexture"), image_size=64,
                dtype="float32", batch_size=2, device="cpu", workers=0, progress=False)
    return root, store


def test_embedder_gives_the_stores_cells_of_each_image(embedded):
    root, store_path = embedded
    store = EmbeddingStore(store_path)
    embedder = PixelEmbedder("demo-colortexture", image_size=64, device="cpu")
    for index in range(len(SIZES)):
        rows, cols = store.valid(index)
        features = embedder.embed(root / f"img{index}.png")
        assert features.shape == (rows, cols, store.dim) and features.dtype == np.float32
        assert features.flags.c_contiguous  # a cut of the padded grid, copied: ready for faiss or a reshape view
        np.testing.assert_allclose(features, store.features(index)[:rows, :cols], atol=1e-5)
    image = np.asarray(Image.open(root / "img0.png").convert("RGB"))
    np.testing.assert_array_equal(embedder.embed(image), embedder.embed(root / "img0.png"))
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*uint8 HxWx3"):
        embedder.embed(np.zeros((4, 4), np.uint8))


def test_clusters_train_and_search_as_fit_and_assign_do(embedded, tmp_path):
    _, store_path = embedded
    clusters = PixelClusters(5, subset_pixels=100, iterations=5, seed=3, device="cpu", backend="faiss")
    assert clusters.train(store_path, progress=False) is clusters
    expected, _ = fit_centroids([store_path], 5, 100, 5, seed=3, device="cpu", backend="faiss", progress=False)
    np.testing.assert_array_equal(clusters.centroids, expected)
    assert clusters.meta["subset_pixels"] == 100 and clusters.meta["clusters"] == 5
    # search = the brute-force largest cosine; assign = the assign stage's store
    store = EmbeddingStore(store_path)
    cells = store.features(1)
    np.testing.assert_array_equal(clusters.search(cells), (cells @ expected.T).argmax(-1))
    assert clusters.search(cells).dtype == np.int16
    ours = clusters.assign(store_path, tmp_path / "ours.zarr", progress=False)
    stage = assign_shard(store_path, expected, tmp_path / "stage.zarr", device="cpu", progress=False)
    np.testing.assert_array_equal(LabelStore([ours]).labels(2), LabelStore([stage]).labels(2))
    # save / load round trip, fit.json beside the centroids
    clusters.save(tmp_path / "fit" / "centroids.npy")
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["subset_pixels"] == 100
    again = PixelClusters.load(tmp_path / "fit" / "centroids.npy", device="cpu")
    np.testing.assert_array_equal(again.search(cells), clusters.search(cells))
    assert (again.clusters, again.metric) == (5, "spherical")


def test_clusters_on_an_array_of_points_recover_its_blobs():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8) * 5
    truth = rng.integers(0, 4, 400)
    points = (centres[truth] + rng.normal(scale=0.1, size=(400, 8))).astype(np.float32)
    clusters = PixelClusters(4, iterations=10, metric="euclidean", device="cpu", backend="torch").train(points)
    found = clusters.search(points)
    # each blob is one cluster, each cluster one blob
    assert len({(t, f) for t, f in zip(truth, found)}) == 4 and len(set(found.tolist())) == 4
    assert clusters.meta["subset_pixels"] == 400 and clusters.meta["metric"] == "euclidean"
    norms = np.linalg.norm(clusters.centroids, axis=1)
    assert not np.allclose(norms, 1.0)  # plain means, searched by L2 distance


def test_clusters_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"no centroids yet.*train\(\)"):
        PixelClusters(3).search(np.zeros((2, 4), np.float32))
    clusters = PixelClusters(2, device="cpu", backend="torch").train(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="features have 5 channels, the centroids 4"):
        clusters.search(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"points have 4 rows, fewer than clusters \(9\)"):
        PixelClusters(9, device="cpu", backend="torch").train(np.eye(4, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="centroids file .*nope.npy"):
        PixelClusters.load(tmp_path / "nope.npy")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenter")
    config = load({"model": {"backbone": "demo-colortexture", "dim": 16, "heads": 2, "layers": 1,
                             "prototypes_fg": 4, "prototypes_bg": 8, "hash_bits": 8, "hash_iterations": 2},
                   "evaluation": {"test_size": 64}})
    torch.manual_seed(0)
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(root / "model.pt", config=config, config_sections=["evaluation", "model"], method="unsup",
              model=ckpt.trainable_state(model, backbone),
              epoch=0, step=0)
    return root / "model.pt"


def test_segmenter_predicts_what_umtfss_predict_writes(checkpoint, tmp_path):
    from umtfss.cli import main

    rng = np.random.default_rng(1)
    query = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    support = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[5:20, 10:30] = 255
    for name, array in {"query.png": query, "support.png": support, "mask.png": mask}.items():
        write_png(tmp_path / name, array)
    assert main(["predict", "--checkpoint", str(checkpoint), "--support", str(tmp_path / "support.png"),
                 str(tmp_path / "mask.png"), "--query", str(tmp_path / "query.png"), "--out",
                 str(tmp_path / "out.png"), "--device", "cpu"]) == 0
    written = np.asarray(Image.open(tmp_path / "out.png")) // 255
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu")
    assert segmenter.size == 64
    from_arrays = segmenter.segment(query, [(support, mask)])
    assert from_arrays.shape == (37, 53) and from_arrays.dtype == np.uint8
    np.testing.assert_array_equal(from_arrays, written)
    np.testing.assert_array_equal(segmenter.segment(query, [(support, mask // 255)]), written)  # 0/1 mask alike
    from_files = segmenter.segment_many([tmp_path / "query.png"] * 2, [(tmp_path / "support.png", tmp_path / "mask.png")])
    assert len(from_files) == 2 and all(np.array_equal(m, written) for m in from_files)
    with pytest.raises(ValueError, match=r"support mask #0 is 20x10 \(WxH\) but its image #0 is 44x30"):
        segmenter.segment(query, [(support, mask[:10, :20])])
    with pytest.raises(ValueError, match="support mask #0 has no foreground"):
        segmenter.segment(query, [(support, np.zeros_like(mask))])
    with pytest.raises(ValueError, match="no support"):
        segmenter.segment(query, [])
    with pytest.raises(ValueError, match="size is 100000, expected 32 to 4096"):
        FewShotSegmenter.load(checkpoint, size=100000, device="cpu")
    classes = np.where(mask > 0, 3, 1).astype(np.uint8)  # a class-index mask: class 3 where the 0/255 mask is lit
    np.testing.assert_array_equal(segmenter.segment(query, [(support, classes)], support_class=3), written)


def test_embedder_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="image_size is 0, expected at least 32"):
        PixelEmbedder("demo-colortexture", image_size=0, device="cpu")
    with pytest.raises(ValueError, match="image_size is 64.5, expected an integer"):
        PixelEmbedder("demo-colortexture", image_size=64.5, device="cpu")
    with pytest.raises(ValueError, match=r"dim is 0, expected 1 to 16 \(layer 'features' has 16 channels\)"):
        PixelEmbedder("demo-colortexture", image_size=64, dim=0, device="cpu")
    with pytest.raises(ValueError, match="dtype is 'float64', expected float16 or float32"):
        PixelEmbedder("demo-colortexture", image_size=64, dtype="float64", device="cpu")
    with pytest.raises(ValueError, match="^'cpu_precision' is 'fp8', expected one of float32, bfloat16"):
        PixelEmbedder("demo-colortexture", image_size=64, cpu_precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="already built"):  # weights that would be silently ignored
        PixelEmbedder(build_backbone("demo-colortexture"), checkpoint="weights.pt", device="cpu")
    embedder = PixelEmbedder("demo-colortexture", image_size=64, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(0, 5, 3\), expected at least one pixel"):
        embedder.embed(np.zeros((0, 5, 3), np.uint8))


def test_embedder_float16_gives_a_float16_stores_cells_exactly(embedded, tmp_path):
    root, _ = embedded
    store_path = tmp_path / "half.zarr"
    embed_shard(root / "images.parquet", 0, 1, store_path, build_backbone("demo-colortexture"), image_size=64,
                dtype="float16", batch_size=2, device="cpu", workers=0, progress=False)
    store = EmbeddingStore(store_path)
    embedder = PixelEmbedder("demo-colortexture", image_size=64, device="cpu", dtype="float16")
    for index in range(len(SIZES)):
        rows, cols = store.valid(index)
        features = embedder.embed(root / f"img{index}.png")
        assert features.dtype == np.float16
        np.testing.assert_array_equal(features, store.features(index)[:rows, :cols])


def test_clusters_on_all_of_a_stores_cells_fit_what_the_stage_fits(embedded, tmp_path):
    root, _ = embedded
    store_path = tmp_path / "half.zarr"  # float16: its rounding is what the fit stage normalises away
    embed_shard(root / "images.parquet", 0, 1, store_path, build_backbone("demo-colortexture"), image_size=64,
                dtype="float16", batch_size=2, device="cpu", workers=0, progress=False)
    store = EmbeddingStore(store_path)
    cells = np.concatenate([store.features(i)[:store.valid(i)[0], :store.valid(i)[1]].reshape(-1, store.dim)
                            for i in range(len(store))])
    given = cells.copy()
    for backend in ("faiss", "torch"):
        expected, _ = fit_centroids([store_path], 5, 10**6, 5, seed=3, device="cpu", backend=backend, progress=False)
        clusters = PixelClusters(5, iterations=5, seed=3, device="cpu", backend=backend).train(cells)
        np.testing.assert_array_equal(clusters.centroids, expected)
    np.testing.assert_array_equal(cells, given)  # the caller's points are not normalised in place
    points = np.eye(4, dtype=np.float32) * 3
    in_place = points.copy()
    PixelClusters(2, device="cpu", backend="torch").train(in_place)
    np.testing.assert_array_equal(in_place, points)


def test_clusters_refuse_bad_knobs_and_values_by_name():
    for knobs, message in [({"clusters": 0}, "clusters is 0, expected 1 to 32767"),
                           ({"clusters": 2.5}, "clusters is 2.5, expected an integer"),
                           ({"clusters": 40000}, "clusters is 40000, expected 1 to 32767"),  # int16 labels
                           ({"clusters": 3, "iterations": 0}, "iterations is 0, expected at least 1"),
                           ({"clusters": 3, "redo": 0}, "redo is 0, expected at least 1"),
                           ({"clusters": 3, "subset_pixels": 0}, "subset_pixels is 0, expected at least 1"),
                           ({"clusters": 3, "backend": "sklearn"}, "backend is 'sklearn', expected auto, faiss"),
                           ({"clusters": 3, "metric": "cosine"}, "metric is 'cosine', expected one of spherical"),
                           ({"clusters": 3, "device": "gpu0"}, "^device = 'gpu0' is not a valid device")]:
        with pytest.raises(ValueError, match=message):
            PixelClusters(**knobs)
    points = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    for backend in ("faiss", "torch"):  # faiss stops deep in C++, torch gives NaN centroids
        with pytest.raises(ValueError, match=r"points hold non-finite values \(NaN or inf\)"):
            PixelClusters(3, device="cpu", backend=backend).train(np.where(points > 1, np.nan, points))
    with pytest.raises(ValueError, match=r"points have shape \(50, 0\), expected \[n, channels\]"):
        PixelClusters(3, device="cpu", backend="torch").train(points[:, :0])
    clusters = PixelClusters(3, device="cpu", backend="torch").train(points)
    with pytest.raises(ValueError, match=r"features hold non-finite values"):
        clusters.search(np.full((2, 4), np.nan, np.float32))  # else label 0, silently
    with pytest.raises(ValueError, match=r"features have shape \(\), expected \[\.\.\., channels\]"):
        clusters.search(np.float32(1))
    with pytest.raises(ValueError, match="features have dtype object, expected a float array"):
        clusters.search(points.astype(object))


def test_clusters_take_points_as_a_tensor_or_nested_lists():
    points = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    expected = PixelClusters(2, device="cpu", backend="torch").train(points).centroids
    for given in (torch.from_numpy(points), points.tolist()):
        np.testing.assert_array_equal(PixelClusters(2, device="cpu", backend="torch").train(given).centroids, expected)


def test_clusters_load_reads_only_a_fit_json_of_these_centroids(tmp_path):
    points = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    fitted = PixelClusters(3, iterations=7, redo=2, seed=5, device="cpu", backend="torch").train(points)
    fitted.save(tmp_path / "centroids.npy")
    again = PixelClusters.load(tmp_path / "centroids.npy", device="cpu")
    assert again.meta == json.loads((tmp_path / "fit.json").read_text())
    assert (again.iterations, again.redo, again.seed) == (7, 2, 5)  # the fit's knobs, for train() again
    np.save(tmp_path / "centroids.npy", fitted.centroids[::-1].copy())  # replaced: fit.json now describes others
    assert PixelClusters.load(tmp_path / "centroids.npy", device="cpu").meta == {}
    (tmp_path / "fit.json").write_text("{not json")
    assert PixelClusters.load(tmp_path / "centroids.npy", device="cpu").meta == {}
    np.save(tmp_path / "many.npy", np.eye(32768, 2, dtype=np.float32))
    with pytest.raises(ValueError, match="32768 centroids, more than the 32767 int16 labels hold"):
        PixelClusters.load(tmp_path / "many.npy", device="cpu")


def _pair(rng):
    support = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[5:20, 10:30] = 1
    return rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), support, mask


def test_segmenter_refuses_bad_supports_queries_and_sizes_by_name(checkpoint, tmp_path):
    query, support, mask = _pair(np.random.default_rng(2))
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"support #0 is a ndarray, expected an \(image, mask\) pair"):
        segmenter.segment(query, (support, mask))  # one pair, not a list of pairs
    with pytest.raises(ValueError, match=r"support mask #0 has shape \(30, 44, 3\), expected an HxW array"):
        segmenter.segment(query, [(support, np.dstack([mask] * 3))])
    with pytest.raises(ValueError, match="support mask #0 holds fractional values"):
        segmenter.segment(query, [(support, mask * 0.5)])  # a soft mask: > 0 would make it all foreground
    for value, message in [("3", "support_class is '3', expected an integer"),
                           (3.0, "support_class is 3.0, expected an integer"),
                           (True, "support_class is True, expected an integer")]:
        with pytest.raises(ValueError, match=message):
            segmenter.segment(query, [(support, mask * 3)], support_class=value)
    with pytest.raises(ValueError, match="queries is one image"):
        segmenter.segment_many(tmp_path / "query.png", [(support, mask)])  # not its characters one by one
    with pytest.raises(ValueError, match="no query"):
        segmenter.segment_many([], [(support, mask)])
    with pytest.raises(ValueError, match=r"size is 0, expected 32 to 4096 \(pixels of the longer side\)"):
        FewShotSegmenter.load(checkpoint, size=0, device="cpu")  # not the checkpoint's size
    with pytest.raises(ValueError, match="size is 64.5, expected an integer"):
        FewShotSegmenter.load(checkpoint, size=64.5, device="cpu")


def test_segmenter_notes_class_indices_merged_as_predict_does(checkpoint):
    query, support, mask = _pair(np.random.default_rng(3))
    classes = mask.copy()
    classes[25:, :] = 7  # two classes besides the background
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu")
    with pytest.warns(UserWarning, match=r"holds the values 0, 1, 7.*support_class=K"):
        segmenter.segment(query, [(support, classes)])


def test_segmenter_leaves_the_global_torch_rng_alone(checkpoint):
    query, support, mask = _pair(np.random.default_rng(4))
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = segmenter.segment(query, [(support, mask)])
    np.testing.assert_array_equal(torch.rand(3), expected)
    np.testing.assert_array_equal(segmenter.segment(query, [(support, mask)]), first)  # still seeded per call


def test_segmenter_gives_the_backbone_its_bfloat16_layout_as_predict_does(checkpoint):
    query, support, mask = _pair(np.random.default_rng(5))
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu", cpu_precision="bfloat16")
    layouts = []
    backbone = segmenter.model.backbone
    forward = backbone.forward
    backbone.forward = lambda images: layouts.append(images.is_contiguous(memory_format=torch.channels_last)) \
        or forward(images)
    segmenter.segment(query, [(support, mask)])
    assert layouts and all(layouts)  # supports too: predict lays them out channels-last before their forward


def test_clusters_refuse_to_write_over_their_inputs(embedded, tmp_path):
    _, store_path = embedded
    copy = tmp_path / "shard.zarr"
    shutil.copytree(store_path, copy)
    clusters = PixelClusters(3, subset_pixels=100, iterations=2, device="cpu", backend="torch").train(copy,
                                                                                                     progress=False)
    with pytest.raises(ValueError, match="out '.*shard.zarr' is also embedding_shard"):
        clusters.assign(copy, copy, progress=False)  # the rename would replace the embeddings by the labels
    assert len(EmbeddingStore(copy)) == len(SIZES)
    with pytest.raises(ValueError, match="meta_path '.*c.npy' is also centroids_path"):
        clusters.save(tmp_path / "c.npy", tmp_path / "c.npy")  # fit.json would land on the centroids
    assert not (tmp_path / "c.npy").exists()


def test_segment_many_runs_the_queries_in_batches_as_predict_does(checkpoint, monkeypatch):
    """Memory is bounded by `batch` queries, not by how many are given; the masks do not depend on it."""
    import umtfss.predict

    rng = np.random.default_rng(4)
    queries = [rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8) for i in range(5)]
    support = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[5:20, 10:30] = 1
    segmenter = FewShotSegmenter.load(checkpoint, device="cpu")
    sizes = []
    real = umtfss.predict.predict_masks
    monkeypatch.setattr(umtfss.predict, "predict_masks", lambda m, q, *a: sizes.append(len(q)) or real(m, q, *a))
    in_twos = segmenter.segment_many(queries, [(support, mask)], batch=2)
    assert sizes == [2, 2, 1]
    at_once = segmenter.segment_many(queries, [(support, mask)], batch=8)
    assert sizes[3:] == [5] and all(np.array_equal(a, b) for a, b in zip(in_twos, at_once))
    with pytest.raises(ValueError, match="batch is 0, expected at least 1"):
        segmenter.segment_many(queries, [(support, mask)], batch=0)
