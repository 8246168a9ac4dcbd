"""The Python API (umtfss.PixelEmbedder, PixelClusters, FewShotSegmenter) gives what the stages give."""

import json

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
    with pytest.raises(ValueError, match="only 4 pixels to fit 9 clusters"):
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
