"""Pseudo episodes: region filters, the top-fraction candidate rule, and the sampler's masks and supports."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from umtfss import cli
from umtfss.pseudo_episodes import (
    CANDIDATES_FILE, FEATURES_FILE, REGIONS_FILE, PseudoEpisodes, build_regions, candidates_of,
    compute_candidates, read_metadata, resize_nearest,
)

GRID = 8
DIM = 6


def write_stores(tmp_path, labels, features, valid, image_ids, clusters, name="shard-0-of-1", sizes=None):
    """A label store and an embedding store in the architecture's layout (original images 32x32 unless `sizes`)."""
    n = len(image_ids)
    emb = zarr.open_group(str(tmp_path / f"emb-{name}.zarr"), mode="w")
    emb.create_array("features", data=features.astype(np.float16), chunks=(1, GRID, GRID, DIM))
    emb.create_array("valid", data=np.asarray(valid, np.int32))
    emb.create_array("sizes", data=np.full((n, 2), 32, np.int32) if sizes is None else np.asarray(sizes, np.int32))
    emb.attrs.update({"image_ids": image_ids, "stride": 8, "image_size": 64, "dim": DIM})
    lab = zarr.open_group(str(tmp_path / f"lab-{name}.zarr"), mode="w")
    lab.create_array("labels", data=labels.astype(np.int16), chunks=(1, GRID, GRID))
    lab.attrs.update({"image_ids": image_ids, "clusters": clusters, "image_size": 64})
    return tmp_path / f"lab-{name}.zarr", tmp_path / f"emb-{name}.zarr"


def unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_region_filters_and_masked_average(tmp_path):
    labels = np.full((1, GRID, GRID), -1)
    labels[0, :6, :7] = 3            # valid part 6 x 7, cluster 3 fills what is left
    labels[0, :6, 0] = 0             # spans the full valid height -> background-like
    labels[0, 1, 2:4] = 1            # 2 cells -> below min area 3
    labels[0, 2:4, 3:6] = 2          # 6 cells, 2 x 3 box -> kept
    rng = np.random.default_rng(0)
    features = unit(rng, (1, GRID, GRID, DIM))
    lab, emb = write_stores(tmp_path, labels, features, [[6, 7]], ["img"], clusters=4)

    table, feats = build_regions([lab], [emb], 4, min_region_pixels=3, drop_background_like=True, background_span=0.95,
                                 background_rule="bbox", area_unit="grid")
    # cluster 3 covers 6*7 - 6 - 2 - 6 = 28 cells and spans the full width -> background-like too
    assert table["cluster"].tolist() == [2]
    row = table.iloc[0]
    assert (row.area, row.y0, row.x0, row.y1, row.x1, row.valid_h, row.valid_w) == (6, 2, 3, 4, 6, 6, 7)
    expected = features[0, 2:4, 3:6].astype(np.float16).astype(np.float32).reshape(-1, DIM).mean(0)
    np.testing.assert_allclose(feats[0], expected / np.linalg.norm(expected), atol=2e-3)

    kept = build_regions([lab], [emb], 4, min_region_pixels=3, drop_background_like=False, area_unit="grid")[0]
    assert sorted(kept["cluster"]) == [0, 2, 3]
    assert sorted(build_regions([lab], [emb], 4, min_region_pixels=1, drop_background_like=False)[0]["cluster"]) == [0, 1, 2, 3]


def test_minimum_area_in_original_image_pixels(tmp_path):
    """area_unit image (reference): a cell of an image twice as large (same grid) counts 4x the pixels."""
    labels = np.full((2, GRID, GRID), -1)
    labels[:, :4, :4] = 0
    labels[:, 1, 1:3] = 1            # 2 cells in each image
    features = unit(np.random.default_rng(0), (2, GRID, GRID, DIM))
    # embed image_size 64, stride 8: a cell is (8 * 32/64)^2 = 16 px of a 32 px image, 256 px of a 128 px one
    lab, emb = write_stores(tmp_path, labels, features, [[4, 4], [4, 4]], ["small", "large"], clusters=2,
                            sizes=[[32, 20], [128, 100]])
    table = build_regions([lab], [emb], 2, min_region_pixels=100, drop_background_like=False, progress=False)[0]
    ones = table[table["cluster"] == 1]
    assert ones["image_id"].tolist() == ["large"] and ones["area_pixels"].tolist() == [512]
    grid = build_regions([lab], [emb], 2, min_region_pixels=2, drop_background_like=False, area_unit="grid",
                         progress=False)[0]
    assert sorted(grid.loc[grid["cluster"] == 1, "image_id"]) == ["large", "small"]
    with pytest.raises(ValueError, match="area_unit"):
        build_regions([lab], [emb], 2, area_unit="cells", progress=False)


def test_background_rules_occupancy_and_bbox(tmp_path):
    """occupancy (reference): cells in more than span of the rows/columns; bbox: the box spans them."""
    labels = np.full((1, GRID, GRID), -1)
    labels[0] = 0                    # cluster 0 fills the rest: every row and column
    labels[0, 0:2, 3:5] = 1          # two blobs, top and bottom: the box spans all 8 rows, 4 rows occupied
    labels[0, 6:8, 3:5] = 1
    labels[0, :, 6] = 2              # a column through every row: background-like by either rule
    labels[0, 0:7, 1] = 3            # 7 of 8 rows: background-like only at span 0.85
    features = unit(np.random.default_rng(0), (1, GRID, GRID, DIM))
    lab, emb = write_stores(tmp_path, labels, features, [[GRID, GRID]], ["img"], clusters=4)

    def kept(rule, span):
        table = build_regions([lab], [emb], 4, min_region_pixels=1, background_span=span, background_rule=rule,
                              progress=False)[0]
        return sorted(table["cluster"].tolist())

    assert kept("occupancy", 0.99) == [1, 3]    # reference: 0 spans all rows and columns, 2 all rows
    assert kept("bbox", 0.99) == [3]            # the two blobs' box spans the full height
    assert kept("occupancy", 0.85) == [1]
    with pytest.raises(ValueError, match="background_rule"):
        build_regions([lab], [emb], 4, background_rule="area", progress=False)


def test_refined_label_stores_give_regions_measured_on_the_refined_masks(tmp_path):
    """With superpixel-refined labels, regions, areas, background spans and masked averages come from the
    refined labels (the masks training sees), not from the grid majority."""
    labels = np.zeros((1, GRID, GRID))
    labels[0, 5:7, 0:5] = 2          # 10 cells = 160 px on the grid, 4 px once refined
    labels[0, 0:2, 6:8] = 3          # 4 rows on the grid; its refined pixels run through every row
    labels[0, 2, 6:8] = 3
    labels[0, 3, 6] = 3
    features = unit(np.random.default_rng(1), (1, GRID, GRID, DIM))
    lab, emb = write_stores(tmp_path, labels, features, [[GRID, GRID]], ["img"], clusters=5)
    fine = np.zeros((64, 64), np.int16)  # embed image_size 64: one refined pixel is (32/64)^2 = 0.25 px
    fine[8:40, 8:40] = 1             # 1,024 refined px = 256 px
    fine[44:48, 0:4] = 2             # 16 refined px = 4 px: too small
    fine[:, 52:60] = 3               # every row: background-like
    fine[40:64, 20:40] = 4           # 480 refined px = 120 px, in no grid cell's majority
    grid_only = build_regions([lab], [emb], 5, min_region_pixels=100, background_span=0.99, progress=False)[0]
    assert grid_only["cluster"].tolist() == [2, 3]  # the grid alone keeps 2 and 3 and knows nothing of 1 and 4
    zarr.open_group(str(lab), mode="a").create_array("refined", data=fine[None], chunks=(1, 64, 64))

    table, feats = build_regions([lab], [emb], 5, min_region_pixels=100, background_span=0.99, progress=False)
    assert table["cluster"].tolist() == [1, 4]
    assert table["area_pixels"].tolist() == [256, 120] and table["area"].tolist() == [1024, 480]
    assert table[["y0", "x0", "y1", "x1", "valid_h", "valid_w"]].iloc[0].tolist() == [8, 8, 40, 40, 64, 64]
    cells = torch.from_numpy(features[0].astype(np.float16).astype(np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(cells, size=(64, 64), mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
    for row, cluster in enumerate(table["cluster"]):
        expected = resized[fine == cluster].mean(0)
        np.testing.assert_allclose(feats[row], expected / np.linalg.norm(expected), atol=2e-3)
    cells_unit = build_regions([lab], [emb], 5, min_region_pixels=10, area_unit="grid", progress=False)[0]
    assert cells_unit["cluster"].tolist() == [1]  # 16 cells' worth; 4 has 7.5


def brute_force_candidates(features, clusters, images, query, pool_rows, fraction, cap):
    eligible = [r for r in pool_rows if images[r] != images[query]]
    sims = features[eligible].astype(np.float64) @ features[query].astype(np.float64)
    k = min(cap, math.ceil(fraction * len(eligible)))
    return set(np.asarray(eligible)[np.argsort(-sims)[:k]].tolist())


@pytest.mark.parametrize("fraction,cap,max_pool", [(0.5, 5000, 20000), (0.3, 4, 20000), (0.5, 5000, 17)])
def test_candidates_match_brute_force_top_fraction(fraction, cap, max_pool):
    rng = np.random.default_rng(1)
    n = 90
    features = unit(rng, (n, 16)).astype(np.float16)
    clusters = rng.integers(0, 3, size=n)
    images = rng.integers(0, 40, size=n)  # some images hold several regions of a cluster
    table = compute_candidates(features, clusters, images, fraction, cap, max_pool, seed=3, progress=False)
    for query in range(n):
        pool = np.flatnonzero((clusters == clusters[query]) & table["in_pool"].to_numpy())
        expected = brute_force_candidates(features, clusters, images, query, pool, fraction, cap)
        got = candidates_of(query, features, pool, images, float(table["threshold"][query]))
        assert set(got.tolist()) == expected
        assert table["num_candidates"][query] == len(expected)
        assert query not in expected and all(images[r] != images[query] for r in got)
    sizes = np.bincount(clusters)
    assert table.groupby("cluster")["in_pool"].sum().tolist() == np.minimum(sizes, max_pool).tolist()


def test_small_clusters_offer_every_other_region_when_asked():
    """all_candidates_below (reference 20): a cluster of fewer regions skips the top-fraction ranking, so
    each query's candidates are all regions of other images; larger clusters keep the ranked rule."""
    rng = np.random.default_rng(2)
    clusters = np.repeat([0, 1], [12, 40])
    rng.shuffle(clusters)
    n = len(clusters)
    features = unit(rng, (n, 16)).astype(np.float16)
    images = rng.integers(0, 30, size=n)
    ranked = compute_candidates(features, clusters, images, 0.5, 5000, 20000, progress=False)
    table = compute_candidates(features, clusters, images, 0.5, 5000, 20000, progress=False, all_candidates_below=20)
    for query in range(n):
        pool = np.flatnonzero(clusters == clusters[query])
        got = set(candidates_of(query, features, pool, images, float(table["threshold"][query])).tolist())
        others = {int(r) for r in pool if images[r] != images[query]}
        if clusters[query] == 0:
            assert got == others and table["num_candidates"][query] == len(others)
            assert ranked["num_candidates"][query] == math.ceil(0.5 * len(others)) < len(others)
        else:
            assert got == brute_force_candidates(features, clusters, images, query, pool, 0.5, 5000)
    assert table.loc[clusters == 1].equals(ranked.loc[clusters == 1])


@pytest.mark.parametrize("max_pool", [20000, 23])
def test_ranking_among_all_regions_matches_the_reference_rule(max_pool):
    """rank_among all_regions (reference code): rank the whole pool, the query itself included, keep the
    floor(50 %) most similar, then drop the query's own image; small clusters still take everything."""
    rng = np.random.default_rng(7)
    clusters = np.repeat([0, 1, 2], [40, 31, 9])
    n = len(clusters)
    features = unit(rng, (n, 16)).astype(np.float16)
    images = rng.permutation(n)  # one region per image and cluster, as in the reference
    table = compute_candidates(features, clusters, images, 0.5, 5000, max_pool, seed=1, progress=False,
                               all_candidates_below=10, rank_among="all_regions")
    ranked_other = compute_candidates(features, clusters, images, 0.5, 5000, max_pool, seed=1, progress=False,
                                      all_candidates_below=10)
    differs = 0
    for query in range(n):
        pool = np.flatnonzero((clusters == clusters[query]) & table["in_pool"].to_numpy())
        similarity = features[pool].astype(np.float64) @ features[query].astype(np.float64)
        if clusters[query] == 2:  # 9 regions < 10: every other-image region, unranked
            expected = {int(r) for r in pool if images[r] != images[query]}
        else:
            top = pool[np.argsort(-similarity, kind="stable")[:int(0.5 * len(pool))]]
            expected = {int(r) for r in top if images[r] != images[query]}
        got = set(candidates_of(query, features, pool, images, float(table["threshold"][query])).tolist())
        assert got == expected and table["num_candidates"][query] == len(expected)
        other = set(candidates_of(query, features, pool, images, float(ranked_other["threshold"][query])).tolist())
        differs += got != other
    assert differs > 0  # the own region takes a slot: one fewer candidate than ranking the others
    with pytest.raises(ValueError, match="episodes.rank_among"):
        compute_candidates(features, clusters, images, progress=False, rank_among="nearest")


def write_dataset(tmp_path, n_images=8, clusters=3):
    """Images of varied sizes with label/embedding stores in 2 shards and an images table."""
    rng = np.random.default_rng(5)
    centres = unit(rng, (clusters, DIM))
    rows, paths = [], []
    for shard in range(2):
        ids = [f"im{shard}{i}" for i in range(n_images // 2)]
        labels = np.full((len(ids), GRID, GRID), -1)
        features = np.zeros((len(ids), GRID, GRID, DIM))
        valid = []
        for j, image_id in enumerate(ids):
            vh, vw = (GRID, 6) if j % 2 else (5, GRID)
            cells = np.zeros((vh, vw), int)  # quadrants; quadrants 0 and 3 share a cluster (background-like)
            for q, (ys, xs) in enumerate([(slice(0, vh // 2), slice(0, vw // 2)), (slice(0, vh // 2), slice(vw // 2, vw)),
                                          (slice(vh // 2, vh), slice(0, vw // 2)), (slice(vh // 2, vh), slice(vw // 2, vw))]):
                cells[ys, xs] = (j + shard + q) % clusters
            labels[j, :vh, :vw] = cells
            features[j, :vh, :vw] = unit(rng, (vh, vw, DIM)) * 0.3 + centres[cells]
            features[j] /= np.maximum(np.linalg.norm(features[j], axis=-1, keepdims=True), 1e-9)
            valid.append([vh, vw])
            h, w = (37, 23) if j % 2 else (20, 31)
            path = tmp_path / f"{image_id}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
            rows.append({"image_id": image_id, "split": "train", "image_path": str(path), "label_path": None,
                         "height": h, "width": w})
        paths.append(write_stores(tmp_path, labels, features, valid, ids, clusters, name=f"shard-{shard}-of-2"))
    images = tmp_path / "images.parquet"
    pd.DataFrame(rows).to_parquet(images)
    return [p[0] for p in paths], [p[1] for p in paths], images


def torch_nearest(grid_mask, size):
    return F.interpolate(torch.from_numpy(grid_mask.astype(np.float32))[None, None], size=size, mode="nearest")[0, 0].numpy()


def test_episodes_stage_and_sampler(tmp_path):
    labels, embeddings, images = write_dataset(tmp_path)
    out = tmp_path / "episodes"
    config = '{"episodes": {"min_region_pixels": 2, "area_unit": "grid"}}'
    assert cli.main(["episodes", "--config", config, "--labels", *map(str, labels),
                     "--embeddings", *map(str, embeddings), "--out-dir", str(out)]) == 0
    for name in (REGIONS_FILE, CANDIDATES_FILE, FEATURES_FILE):
        assert (out / name).is_file()
    assert not list(out.glob("*tmp*"))
    meta = read_metadata(out / CANDIDATES_FILE)
    assert meta["parameters"]["min_region_pixels"] == 2 and meta["clusters"] == 3
    assert meta["parameters"]["all_candidates_below"] == 0 and meta["parameters"]["rank_among"] == "other_images"
    # the key reaches the stage: with every cluster "small", each query takes all eligible regions
    unranked = tmp_path / "unranked"
    assert cli.main(["episodes", "--config", config.replace('"grid"', '"grid", "all_candidates_below": 1000'),
                     "--labels", *map(str, labels), "--embeddings", *map(str, embeddings),
                     "--out-dir", str(unranked)]) == 0
    table = pd.read_parquet(unranked / CANDIDATES_FILE)
    assert (table["num_candidates"] == table["eligible"]).all() and table["eligible"].max() > 1
    assert (pd.read_parquet(out / CANDIDATES_FILE)["num_candidates"] < table["num_candidates"]).any()

    episodes = PseudoEpisodes(out, labels, images, sampling="region")
    regions = episodes.regions
    assert len(episodes) == int((pd.read_parquet(out / CANDIDATES_FILE)["num_candidates"] > 0).sum()) > 0
    store = {}
    for path in labels:
        group = zarr.open_group(str(path), mode="r")
        store.update(zip(group.attrs["image_ids"], np.asarray(group["labels"][:])))
    rng = np.random.default_rng(0)
    for index in range(len(episodes)):
        ep = episodes.episode(index, rng, shots=2)
        query = int(episodes.queries[index])
        assert ep.query_id == regions["image_id"][query] and ep.class_id == regions["cluster"][query]
        assert ep.query_image.shape[:2] == ep.query_mask.shape
        grid = store[ep.query_id]
        vh, vw = (grid >= 0).any(1).sum(), (grid >= 0).any(0).sum()
        np.testing.assert_array_equal(ep.query_mask, torch_nearest(grid[:vh, :vw] == ep.class_id, ep.query_mask.shape))
        candidates = set(regions["image_id"][episodes.candidate_rows(query)])
        assert len(ep.support_ids) == 2 and set(ep.support_ids) <= candidates
        assert ep.query_id not in ep.support_ids
        for image, mask, image_id in zip(ep.support_images, ep.support_masks, ep.support_ids):
            assert image.shape[:2] == mask.shape and mask.any()
            sgrid = store[image_id]
            sh, sw = (sgrid >= 0).any(1).sum(), (sgrid >= 0).any(0).sum()
            np.testing.assert_array_equal(mask, resize_nearest((sgrid[:sh, :sw] == ep.class_id).astype(np.uint8), mask.shape))

    # 'fold' setting: queries and supports only from the allowed images
    allowed = ["im00", "im01", "im10", "im11", "im12"]
    restricted = PseudoEpisodes(out, labels, images, image_ids=allowed)
    assert 0 < len(restricted) < len(episodes)
    for index in range(len(restricted)):
        ep = restricted.episode(index, rng, shots=1)
        assert ep.query_id in allowed and set(ep.support_ids) <= set(allowed)
    # ... and ranked among the allowed images' regions alone: the top ceil(50 %) of the fold's regions of
    # the cluster from other images, by brute force, not the fold's share of the top 50 % of all
    features = np.asarray(restricted.features, np.float32)
    image_of = regions["image_id"].to_numpy()
    for query in restricted.queries:
        others = [r for r in range(len(regions)) if image_of[r] in allowed and image_of[r] != image_of[query]
                  and regions["cluster"][r] == regions["cluster"][query]]
        k = math.ceil(0.5 * len(others))
        ranked = sorted(others, key=lambda r: -float(features[r] @ features[query]))
        expected = set(ranked[:k])
        got = set(restricted.candidate_rows(int(query)).tolist())
        tied = {r for r in others if abs(float(features[r] @ features[query]) - float(features[ranked[k - 1]] @ features[query])) < 1e-5}
        assert expected - tied <= got <= expected | tied
    assert set(restricted.queries) == {q for q in np.flatnonzero(np.isin(image_of, allowed))
                                       if any(image_of[r] in allowed and image_of[r] != image_of[q]
                                              and regions["cluster"][r] == regions["cluster"][q]
                                              for r in range(len(regions)))}


def test_image_sampling_is_one_episode_per_image_with_its_region_uniform(tmp_path):
    """Reference code: an epoch passes over the query images; each draws one of its own regions uniformly."""
    labels, embeddings, images = write_dataset(tmp_path, n_images=16, clusters=3)
    out = tmp_path / "episodes"
    assert cli.main(["episodes", "--config", '{"episodes": {"min_region_pixels": 1, "drop_background_like": false}}',
                     "--labels", *map(str, labels), "--embeddings", *map(str, embeddings), "--out-dir", str(out)]) == 0
    by_region = PseudoEpisodes(out, labels, images, sampling="region")
    by_image = PseudoEpisodes(out, labels, images)  # the default
    regions = by_image.regions
    query_images = regions["image_id"].to_numpy()[by_region.queries]
    assert len(by_image) == len(set(query_images)) < len(by_region)
    rng = np.random.default_rng(0)
    seen_images = set()
    for index in range(len(by_image)):
        own = set(by_image.queries_of_image[index].tolist())
        image_id = {regions["image_id"].iat[r] for r in own}
        assert len(image_id) == 1  # all of one image
        seen_images |= image_id
        draws = [by_image.episode(index, rng, shots=1) for _ in range(12 * len(own))]
        assert {ep.query_id for ep in draws} == image_id
        drawn = pd.Series([ep.class_id for ep in draws]).value_counts()
        assert set(drawn.index) == {int(regions["cluster"].iat[r]) for r in own}  # every region of it is drawn
    assert seen_images == set(query_images)
    with pytest.raises(ValueError, match="episode_sampling"):
        PseudoEpisodes(out, labels, images, sampling="cluster")


def test_draws_are_uniform_over_candidates(tmp_path):
    labels, embeddings, images = write_dataset(tmp_path, n_images=16, clusters=2)
    out = tmp_path / "episodes"
    assert cli.main(["episodes", "--config", '{"episodes": {"min_region_pixels": 1, "drop_background_like": false}}',
                     "--labels", *map(str, labels), "--embeddings", *map(str, embeddings), "--out-dir", str(out)]) == 0
    episodes = PseudoEpisodes(out, labels, images)
    query = int(episodes.queries[0])
    candidates = episodes.candidate_rows(query)
    assert candidates.size >= 3
    rng = np.random.default_rng(0)
    draws = np.array([episodes.draw_supports(query, rng, 1)[0] for _ in range(600 * candidates.size // 10)])
    counts = pd.Series(draws).value_counts()
    assert set(counts.index) == set(candidates.tolist())
    assert counts.max() / counts.min() < 2.2


def test_bad_inputs_name_the_problem(tmp_path):
    labels, embeddings, images = write_dataset(tmp_path)
    with pytest.raises(ValueError, match="made with 3 clusters"):
        build_regions(labels, embeddings, 5)
    with pytest.raises(ValueError, match="not in the embedding stores"):
        build_regions(labels, embeddings[:1], 3)
    with pytest.raises(FileNotFoundError, match="umtfss episodes"):
        PseudoEpisodes(tmp_path / "missing", labels, images)


def episodes_cli(labels, embeddings, out, config='{"episodes": {"min_region_pixels": 2, "area_unit": "grid"}}'):
    return cli.main(["episodes", "--config", config, "--labels", *map(str, labels),
                     "--embeddings", *map(str, embeddings), "--out-dir", str(out)])


def test_labels_of_other_embeddings_are_refused(tmp_path):
    """Label stores record their embedding store's attributes; regions averaged from other features
    (same grid and image ids) would be silently wrong."""
    labels, embeddings, _ = write_dataset(tmp_path)
    for path in labels:
        zarr.open_group(str(path), mode="r+").attrs.update(dim=DIM, backbone="a")
    for path in embeddings:
        zarr.open_group(str(path), mode="r+").attrs.update(backbone="a")
    build_regions(labels, embeddings, 3, progress=False)  # the same: fine
    zarr.open_group(str(labels[1]), mode="r+").attrs.update(dim=DIM * 2)
    with pytest.raises(ValueError, match=r"label store '.*lab-shard-1-of-2.zarr' was assigned on other embeddings .* "
                                         rf"dim: {DIM * 2} \(labels\) vs {DIM} \(embeddings\)"):
        build_regions(labels, embeddings, 3, progress=False)


def test_outputs_in_the_way_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import umtfss.pseudo_episodes as episodes_module

    labels, embeddings, _ = write_dataset(tmp_path)
    monkeypatch.setattr(episodes_module, "build_regions", lambda *a, **k: pytest.fail("regions built"))
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "odd" / REGIONS_FILE).mkdir(parents=True)
    for out, said in [(tmp_path / "a-file", f"'{tmp_path / 'a-file'}' is a file"),
                      (tmp_path / "a-file" / "sub", f"'{tmp_path / 'a-file'}' is a file"),
                      (tmp_path / "odd", f"'{tmp_path / 'odd' / REGIONS_FILE}' is a folder"),
                      (labels[0], "is also a label store (--labels)")]:
        assert episodes_cli(labels, embeddings, out) == 1
        err = capsys.readouterr().err
        assert err.startswith("umtfss episodes: error: ") and said in err and "Traceback" not in err
    assert sorted(p.name for p in labels[0].iterdir()) == ["labels", "zarr.json"]


def test_nothing_usable_is_an_error_that_says_why(tmp_path, capsys):
    labels, embeddings, _ = write_dataset(tmp_path)
    out = tmp_path / "ep"
    assert episodes_cli(labels, embeddings, out, '{"episodes": {"min_region_pixels": 1000, "area_unit": "grid"}}') == 1
    err = capsys.readouterr().err
    assert "no region survived the filters" in err and "in 8 images" in err and "have fewer than min_region_pixels=1000 grid cells" in err
    # regions all of one image: no query has a candidate from another image; nothing is written
    assert episodes_cli(labels[:1], embeddings, out, '{"episodes": {"min_region_pixels": 1, "rank_among": "all_regions", '
                                                     '"top_fraction": 0.01, "drop_background_like": false}}') == 1
    assert "has a support candidate" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    # a label store of no image
    empty = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    empty.create_array("labels", shape=(0, GRID, GRID), dtype="int16", chunks=(1, GRID, GRID))
    empty.attrs.update({"image_ids": [], "clusters": 3, "image_size": 64})
    assert episodes_cli([tmp_path / "empty.zarr"], embeddings, out) == 1
    assert "hold no image" in capsys.readouterr().err


def test_a_run_killed_while_writing_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    """The three files are renamed together at the end: a run that dies writing the last one leaves the
    earlier run's set, not new regions beside old candidates; its temporaries go at the next run."""
    import subprocess
    import sys

    import umtfss.pseudo_episodes as episodes_module

    labels, embeddings, images = write_dataset(tmp_path)
    out = tmp_path / "ep"
    assert episodes_cli(labels, embeddings, out) == 0
    before = {name: (out / name).read_bytes() for name in (REGIONS_FILE, CANDIDATES_FILE, FEATURES_FILE)}
    real = episodes_module.pq.write_table

    def dies_on_candidates(table, path, **kwargs):
        if Path(path).name.startswith("candidates"):
            raise KeyboardInterrupt("simulated kill")
        real(table, path, **kwargs)

    monkeypatch.setattr(episodes_module.pq, "write_table", dies_on_candidates)
    assert episodes_cli(labels, embeddings, out, '{"episodes": {"min_region_pixels": 2, "area_unit": "grid", '
                                                 '"top_fraction": 0.2}}') == 130  # the CLI's "interrupted"
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a SIGKILLed run's temporary: its process is gone
    (out / f"regions.tmp-{dead.pid}-0123abcd.parquet").write_bytes(b"half")
    assert episodes_cli(labels, embeddings, out) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    PseudoEpisodes(out, labels, images)


def test_the_sampler_refuses_files_of_two_runs(tmp_path):
    labels, embeddings, images = write_dataset(tmp_path)
    first, second = tmp_path / "a", tmp_path / "b"
    assert episodes_cli(labels, embeddings, first) == 0
    assert episodes_cli(labels, embeddings, second, '{"episodes": {"min_region_pixels": 2, "area_unit": "grid", '
                                                    '"top_fraction": 0.2}}') == 0
    (first / CANDIDATES_FILE).write_bytes((second / CANDIDATES_FILE).read_bytes())  # equal row counts
    with pytest.raises(ValueError, match=r"were written by different runs of `umtfss episodes` \(they record different parameters\)"):
        PseudoEpisodes(first, labels, images)
    PseudoEpisodes(second, labels, images)


def test_clusters_without_regions_are_warned_about(tmp_path, capsys):
    """Label stores of 5 clusters whose cells use only 0-2 (assign left 3 and 4 empty): the stage says how
    many clusters the episodes can use and warns about the others, naming the key; metadata counts them."""
    labels, embeddings, _ = write_dataset(tmp_path)
    assert episodes_cli(labels, embeddings, tmp_path / "all") == 0
    err = capsys.readouterr().err
    assert "umtfss episodes: 3 of the 3 clusters have a region, 3 a region with a support candidate" in err
    assert "warning" not in err
    for path in labels:
        zarr.open_group(str(path), mode="r+").attrs.update(clusters=5)
    out = tmp_path / "ep"
    assert episodes_cli(labels, embeddings, out) == 0
    err = capsys.readouterr().err
    assert "umtfss episodes: 3 of the 5 clusters have a region, 3 a region with a support candidate" in err
    assert ("umtfss episodes: warning: 2 of the 5 clusters have no region (ids 3, 4): 2 hold no cell at all" in err
            and "'clustering.clusters'" in err and "empty_clusters" in err and "min_region_pixels" not in err)
    meta = read_metadata(out / REGIONS_FILE)
    assert meta["clusters"] == 5 and meta["clusters_with_regions"] == 3 and meta["clusters_with_queries"] == 3


def test_cluster_coverage_names_filters_and_single_class_episodes():
    from umtfss.pseudo_episodes import cluster_coverage

    lines = cluster_coverage(np.array([4, 0, 2, 3]), np.array([0]), np.array([0]), verbose=False)
    assert lines[0] == "umtfss episodes: 1 of the 4 clusters have a region, 1 a region with a support candidate"
    assert "3 of the 4 clusters have no region (ids 1, 2, 3): 1 hold no cell at all" in lines[1]
    assert "2 lost every region to the filters (lower config key 'episodes.min_region_pixels'" in lines[1]
    assert lines[2].startswith("umtfss episodes: warning: only 1 cluster(s) have a region with a support candidate")
    assert cluster_coverage(np.array([4, 1]), np.array([0, 1]), np.array([0, 1]), verbose=False) == []
