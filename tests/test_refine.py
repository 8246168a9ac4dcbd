"""Superpixel refinement: majority votes against brute force, the refined label store, masks and quality at input size."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image
from skimage.segmentation import felzenszwalb

from umtfss import cli
from umtfss.clustering.assign import assign_shard
from umtfss.clustering.quality import confusion_matrix
from umtfss.clustering.refine import (
    cell_of_pixel, embedded_view, grid_majority, group_majority, refine_labels, superpixel_majority,
)
from umtfss.pseudo_episodes import PseudoEpisodes, cluster_mask, read_metadata, resize_nearest
from umtfss.stores import LabelStore, create_embedding_store
from umtfss.transforms import resized_extent

SIZE, STRIDE, DIM = 32, 8, 4
SHAPES = [(24, 32), (40, 22), (30, 30), (17, 40)]  # original image sizes: every padding case
SUPERPIXELS = {"superpixel_scale": 50.0, "superpixel_sigma": 0.5, "superpixel_min_size": 10}


def brute_majority(groups, labels):
    """{group: most frequent label, lowest on ties} by a python loop."""
    counts: dict[int, Counter] = {}
    for g, label in zip(groups.ravel().tolist(), labels.ravel().tolist()):
        counts.setdefault(g, Counter())[label] += 1
    return {g: min(c, key=lambda label: (-c[label], label)) for g, c in counts.items()}


def test_majority_votes_equal_a_python_loop():
    rng = np.random.default_rng(0)
    segments = rng.integers(0, 30, (23, 19))
    labels = rng.choice([0, 3, 7, 40, 1200], size=(23, 19)).astype(np.int16)  # sparse ids, many ties
    expected = brute_majority(segments, labels)
    votes = group_majority(segments, labels, 32)
    assert [votes[g] for g in sorted(expected)] == [expected[g] for g in sorted(expected)]
    assert votes[30] == votes[31] == -1  # empty groups

    image = rng.random((23, 19, 3))
    refined = superpixel_majority(labels, image, scale=20, sigma=0.5, min_size=5)
    segments = felzenszwalb(image, scale=20, sigma=0.5, min_size=5, channel_axis=-1)
    expected = brute_majority(segments, labels)
    assert refined.dtype == np.int16 and refined.tolist() == [[expected[s] for s in row] for row in segments.tolist()]

    fine = rng.integers(0, 6, (37, 29))
    grid = grid_majority(fine, (5, 4))
    cells = cell_of_pixel((37, 29), (5, 4))
    expected = brute_majority(cells, fine)
    assert grid.tolist() == [[expected[r * 4 + c] for c in range(4)] for r in range(5)]
    # the pixels of a cell are the ones resize_nearest fills from it
    np.testing.assert_array_equal(resize_nearest(np.arange(20).reshape(5, 4), (37, 29)), cells)


def test_refinement_follows_image_edges_and_keeps_every_grid_region():
    image = np.zeros((32, 32, 3), np.float32)
    image[:, :12] = [1, 0, 0]  # colour edge inside grid column 1 (pixels 8..15)
    image[:, 12:] = [0, 0, 1]
    grid = np.zeros((4, 4), np.int16)
    grid[:, 2:] = 1
    refined = refine_labels(grid, image, scale=100, sigma=0, min_size=20)
    np.testing.assert_array_equal(refined, np.broadcast_to(np.arange(32) >= 12, (32, 32)))

    rng = np.random.default_rng(1)
    for trial in range(20):
        grid = rng.integers(0, 9, (5, 4)).astype(np.int16)
        refined = refine_labels(grid, rng.random((37, 29, 3)), scale=300, sigma=0.8, min_size=60)
        cells = grid_majority(refined, grid.shape)
        for cluster in np.unique(cells):  # a region found on the grid has a non-empty refined mask
            assert (refined == cluster).any()
            assert cluster_mask(refined, int(cluster), (37, 29)).any()


def write_refine_inputs(tmp_path):
    """Images of several aspect ratios, their table, and an embedding store shaped as embed writes it."""
    rng = np.random.default_rng(2)
    rows = []
    grid = (math.ceil(SIZE / STRIDE),) * 2
    valid = []
    for i, (h, w) in enumerate(SHAPES):
        picture = np.zeros((h, w, 3), np.uint8)
        picture[:, : w // 3] = [220, 30, 30]
        picture[h // 2:, w // 3:] = [30, 30, 220]
        picture = np.clip(picture + rng.integers(0, 25, picture.shape), 0, 255).astype(np.uint8)
        Image.fromarray(picture).save(tmp_path / f"im{i}.png")
        rows.append({"image_id": f"im{i}", "split": "train", "image_path": str(tmp_path / f"im{i}.png"),
                     "label_path": None, "height": h, "width": w})
        nh, nw = resized_extent(h, w, SIZE)
        valid.append([math.ceil(nh / STRIDE), math.ceil(nw / STRIDE)])
    table = pd.DataFrame(rows)
    table.to_parquet(tmp_path / "images.parquet")
    attrs = {"image_ids": list(table["image_id"]), "backbone": "synthetic", "layer": "x", "stride": STRIDE,
             "image_size": SIZE, "dim": DIM, "dtype": "float16", "checkpoint_sha256": None, "preprocessing": "test",
             "shard": 0, "num_shards": 1, "umtfss_version": "test"}
    group = create_embedding_store(tmp_path / "emb.zarr", len(rows), grid, DIM, "float16", attrs)
    features = rng.normal(size=(len(rows), *grid, DIM))
    group["features"][:] = (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float16)
    group["valid"][:] = np.array(valid, np.int32)
    group["sizes"][:] = np.array(SHAPES, np.int32)
    centroids = rng.normal(size=(5, DIM)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    return tmp_path / "emb.zarr", tmp_path / "centroids.npy", tmp_path / "images.parquet"


@pytest.fixture(scope="module")
def refined_stores(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("refine")
    emb, centroids, images = write_refine_inputs(tmp_path)
    plain = assign_shard(emb, centroids, tmp_path / "plain.zarr", device="cpu", progress=False)
    refined = assign_shard(emb, centroids, tmp_path / "refined.zarr", batch_images=3, device="cpu", progress=False,
                           refine="superpixel", images=images, upsample="nearest", **SUPERPIXELS)
    return tmp_path, emb, images, plain, refined


def test_bilinear_labels_equal_torch_interpolation_of_the_scores(monkeypatch):
    """The separable, strip-wise bilinear_labels = argmax of F.interpolate(scores, align_corners=True),
    for unit (cosine) and non-unit (L2) centroids, odd sizes and a one-cell-wide grid."""
    import torch
    import torch.nn.functional as F

    from umtfss.clustering import assign
    from umtfss.clustering.assign import bilinear_labels, l2_offsets

    monkeypatch.setattr(assign, "BILINEAR_STRIP_ROWS", 7)  # several strips, the last one short
    rng = np.random.default_rng(4)
    for (rows, cols), size, unit_centroids in [((5, 4), (37, 29), True), ((6, 3), (45, 22), False),
                                               ((1, 4), (9, 31), True), ((3, 3), (3, 3), False)]:
        cells = rng.normal(size=(rows, cols, 8)).astype(np.float16)
        centroids = torch.from_numpy(rng.normal(size=(6, 8)).astype(np.float32))
        if unit_centroids:
            centroids = centroids / centroids.norm(dim=1, keepdim=True)
        scores = torch.from_numpy(cells).float() @ centroids.T
        if not unit_centroids:
            scores = scores - l2_offsets(centroids)
        expected = F.interpolate(scores.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=True)[0]
        got = bilinear_labels(cells, centroids, size)
        assert got.shape == size and got.dtype == np.int16
        top2 = expected.topk(2, dim=0).values
        clear = (top2[0] - top2[1]).numpy() > 1e-5  # pixels without a near tie
        np.testing.assert_array_equal(got[clear], expected.argmax(0).numpy()[clear])
        assert clear.mean() > 0.95


def test_bilinear_refinement_votes_on_interpolated_scores(refined_stores):
    """refine_upsample bilinear (reference, default): superpixels vote on the per-pixel labels of the
    interpolated centroid scores; that differs from voting on nearest-resized grid labels."""
    import torch

    from umtfss.clustering.assign import bilinear_labels

    tmp_path, emb, images, plain, nearest = refined_stores
    centroids = np.load(tmp_path / "centroids.npy")
    out = assign_shard(emb, centroids, tmp_path / "bilinear.zarr", batch_images=2, device="cpu", progress=False,
                       refine="superpixel", images=images, **SUPERPIXELS)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["refine_upsample"] == "bilinear"
    assert zarr.open_group(str(nearest), mode="r").attrs["refine_upsample"] == "nearest"
    fine, labels = np.asarray(group["refined"][:]), np.asarray(group["labels"][:])
    features = np.asarray(zarr.open_group(str(emb), mode="r")["features"][:])
    table = pd.read_parquet(images)
    settings = {k.split("_", 1)[1]: v for k, v in SUPERPIXELS.items()}
    for i, (h, w) in enumerate(SHAPES):
        nh, nw = resized_extent(h, w, SIZE)
        vh, vw = math.ceil(nh / STRIDE), math.ceil(nw / STRIDE)
        view, _ = embedded_view(table["image_path"][i], SIZE)
        pixels = bilinear_labels(features[i, :vh, :vw], torch.from_numpy(centroids), (nh, nw))
        expected = superpixel_majority(pixels, view, **settings)
        np.testing.assert_array_equal(fine[i, :nh, :nw], expected)
        np.testing.assert_array_equal(labels[i, :vh, :vw], grid_majority(expected, (vh, vw)))
        assert (fine[i, nh:] == -1).all() and (fine[i, :, nw:] == -1).all()
    assert (fine != np.asarray(zarr.open_group(str(nearest), mode="r")["refined"][:])).any()
    with pytest.raises(ValueError, match="clustering.refine_upsample"):
        assign_shard(emb, centroids, tmp_path / "x.zarr", device="cpu", refine="superpixel", images=images,
                     upsample="bicubic", progress=False)


def test_assign_writes_refined_labels_with_padding_and_attributes(refined_stores):
    tmp_path, emb, images, plain, refined = refined_stores
    group = zarr.open_group(str(refined), mode="r")
    unrefined = np.asarray(zarr.open_group(str(plain), mode="r")["labels"][:])
    fine, labels = np.asarray(group["refined"][:]), np.asarray(group["labels"][:])
    assert group["refined"].dtype == np.int16 and fine.shape == (len(SHAPES), SIZE, SIZE)
    assert group["refined"].chunks == (1, SIZE, SIZE)
    assert group["refined"].metadata.codecs[1] == group["labels"].metadata.codecs[1]  # compressed like labels
    attrs = dict(group.attrs)
    assert attrs["refine"] == "superpixel" and attrs["superpixel_min_size"] == 10
    assert attrs["superpixel_scale"] == 50.0 and attrs["superpixel_sigma"] == 0.5
    assert zarr.open_group(str(plain), mode="r").attrs["refine"] == "none" and "refined" not in zarr.open_group(str(plain), mode="r")
    table = pd.read_parquet(images)
    changed = 0
    for i, (h, w) in enumerate(SHAPES):
        nh, nw = resized_extent(h, w, SIZE)
        vh, vw = math.ceil(nh / STRIDE), math.ceil(nw / STRIDE)
        assert (fine[i, :nh, :nw] >= 0).all() and (fine[i, nh:] == -1).all() and (fine[i, :, nw:] == -1).all()
        view, size = embedded_view(table["image_path"][i], SIZE)
        assert size == (h, w) and view.shape == (nh, nw, 3)
        expected = refine_labels(unrefined[i, :vh, :vw], view, **{k.split("_", 1)[1]: v for k, v in SUPERPIXELS.items()})
        np.testing.assert_array_equal(fine[i, :nh, :nw], expected)
        np.testing.assert_array_equal(labels[i, :vh, :vw], grid_majority(expected, (vh, vw)))
        assert (labels[i, vh:] == -1).all() and (labels[i, :, vw:] == -1).all()
        changed += int((labels[i] != unrefined[i]).sum())
    assert changed > 0  # refinement moved some grid labels
    store = LabelStore([refined])
    assert store.has_refined and not LabelStore([plain]).has_refined
    np.testing.assert_array_equal(store.refined(2), fine[2])


def test_refining_needs_the_images_and_names_what_is_wrong(tmp_path):
    emb, centroids, images = write_refine_inputs(tmp_path)
    out = tmp_path / "labels" / "shard-0-of-1.zarr"
    with pytest.raises(ValueError, match="clustering.refine"):
        assign_shard(emb, centroids, out, device="cpu", refine="superpixel", progress=False)
    table = pd.read_parquet(images)
    with pytest.raises(ValueError, match="im3"):
        assign_shard(emb, centroids, out, device="cpu", refine="superpixel", images=table.iloc[:3], progress=False)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(table["image_path"][1])  # not the embedded image
    with pytest.raises(ValueError, match=r"im1\.png.*10x10"):
        assign_shard(emb, centroids, out, device="cpu", refine="superpixel", images=images, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []
    base = ["assign", "--embeddings", str(emb), "--centroids", str(centroids), "--out", str(out)]
    config = json.dumps({"clustering": {"device": "cpu", "refine": "superpixel"}})
    assert cli.main(base + ["--config", config]) == 1


def test_region_masks_come_from_the_refined_labels(refined_stores):
    tmp_path, emb, images, plain, refined = refined_stores
    config = json.dumps({"episodes": {"min_region_pixels": 1, "drop_background_like": False}})
    assert cli.main(["episodes", "--config", config, "--labels", str(refined), "--embeddings", str(emb),
                     "--out-dir", str(tmp_path / "episodes")]) == 0
    episodes = PseudoEpisodes(tmp_path / "episodes", [refined], images)
    assert read_metadata(tmp_path / "episodes" / "regions.parquet")["region_labels"] == "refined"
    store = LabelStore([refined])
    differs = 0
    for region in range(len(episodes.regions)):
        index = store.image_ids.index(episodes.regions["image_id"].iat[region])
        shape = SHAPES[index]
        cluster = int(episodes.cluster[region])
        mask = episodes.region_mask(region, shape)
        assert mask.any()
        np.testing.assert_array_equal(mask, cluster_mask(store.refined(index), cluster, shape))
        differs += int((mask != cluster_mask(store.labels(index), cluster, shape)).any())
    assert differs > 0


def test_overlay_draws_refined_labels(refined_stores, monkeypatch):
    from umtfss import inspect

    tmp_path, emb, images, plain, refined = refined_stores
    drawn = []
    real = inspect.overlay_image
    monkeypatch.setattr(inspect, "overlay_image", lambda image, labels, colours: drawn.append(labels.shape) or real(image, labels, colours))
    inspect.write_overlay(refined, images, tmp_path / "overlay.png", n=2)
    assert drawn == [(SIZE, SIZE)] * 2
    assert "array 'refined': shape (4, 32, 32)" in inspect.summarise(refined)


def write_quality_case(tmp_path, refined: bool):
    """Ground truth 40x30 (input size 20 -> 20x15 px, 4x3 grid of 5-px cells) whose class-1 edge is inside a cell."""
    labels = np.full((1, 4, 4), -1, np.int16)
    labels[0, :4, :3] = [[0, 0, 1]] * 4         # cluster 1 = grid column 2 = input columns 10..14
    group = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    group.create_array("labels", data=labels, chunks=(1, 4, 4))
    group.attrs.update({"image_ids": ["a"], "clusters": 2, "image_size": 20})
    truth = np.zeros((40, 30), np.uint8)
    truth[:, 16:] = 1                           # class 1 from input column 8
    truth[0, 0] = 255                           # ignored
    if refined:
        fine = np.full((1, 20, 20), -1, np.int16)
        fine[0, :20, :15] = 0
        fine[0, :20, 8:15] = 1                  # refined labels follow the edge
        group.create_array("refined", data=fine, chunks=(1, 20, 20))
    Image.fromarray(truth).save(tmp_path / "a.png")
    pd.DataFrame([{"image_id": "a", "image_path": "x", "label_path": str(tmp_path / "a.png")}]).to_parquet(tmp_path / "images.parquet")
    return tmp_path / "labels.zarr", tmp_path / "images.parquet"


def test_quality_at_the_input_resolution(tmp_path):
    labels, images = write_quality_case(tmp_path, refined=False)
    grid, _ = confusion_matrix([labels], images, progress=False)
    assert grid[:, :2].tolist() == [[7, 0], [0, 4]]  # the grid cannot see the edge inside a cell
    fine, _ = confusion_matrix([labels], images, progress=False, resolution="input")
    assert fine[:, :2].tolist() == [[159, 40], [0, 100]] and fine[:, 255].sum() == 1

    refined_dir = tmp_path / "refined"
    refined_dir.mkdir()
    labels, images = write_quality_case(refined_dir, refined=True)
    fine, _ = confusion_matrix([labels], images, progress=False)  # auto: refined stores at input resolution
    assert fine[:, :2].tolist() == [[159, 0], [0, 140]]
    out = refined_dir / "quality.csv"
    assert cli.main(["quality", "--config", "{}", "--labels", str(labels), "--images", str(images), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table["resolution"]) == {"input"}
    assert table.set_index("metric")["value"]["hungarian_miou"] == pytest.approx(1.0)
    pd.DataFrame([{"image_id": "a", "label_path": str(tmp_path / "b.png")}]).to_parquet(refined_dir / "other.parquet")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "b.png")  # not the image the store was built from
    with pytest.raises(ValueError, match="refined labels cover"):
        confusion_matrix([labels], refined_dir / "other.parquet", progress=False)
