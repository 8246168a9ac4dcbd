"""Pseudo episodes (paper "Task constructing"): regions of cluster labels, support candidates, and the sampler.

A *region* is the set of grid cells of one image assigned to one cluster (so an image has at most one
region per cluster). Its *masked-average feature* is the mean of the region's pixel embeddings,
L2-normalised. A query region's *support candidates* are the most cosine-similar regions of the same
cluster (paper: "only top 50 percent nearest regions are used for randomly K-shot support set
selection"); the reference code's conventions are config keys (section `episodes`):

- regions: `area >= min_region_pixels`, counted (`area_unit` image, reference) in pixels of the original
  image: a grid cell stands for (stride * longer side / embed image_size)^2 of them, so 2,048 px is
  32 cells of a 473 px image and 18 of a 640 px one; or (`area_unit` grid) in feature-grid cells;
  with `drop_background_like`, clusters stretching over (nearly) the whole image height or width are
  background-like and dropped. `background_rule` occupancy (reference code): the region has cells in
  more than `background_span * valid_h` of the rows or `background_span * valid_w` of the columns;
  bbox: its bounding box spans `y1 - y0 >= background_span * valid_h` OR
  `x1 - x0 >= background_span * valid_w` (grid cells with exclusive ends; valid_h x valid_w = the
  grid cells the image covers, padding excluded).
  With superpixel-refined label stores (`clustering.refine`) all of this is measured on the refined
  labels, the masks that training sees, as the reference code does: a region is a cluster's refined
  pixels, its area counts them (one is (longer side / embed image_size)^2 original pixels, or
  1 / stride^2 of a cell for `area_unit` grid), the background rule uses refined rows and columns,
  and the masked-average feature is the mean over the region's pixels of the cell features resized
  bilinearly with aligned corners to the refined extent (the reference's get_mask_embedding).
- candidates of query q in cluster c: the pool is the cluster's regions, first subsampled to
  `max_pool` at random (seeded per cluster) when larger; the eligible regions are the pool minus
  every region of q's own image (q itself included); q gets the
  `k = min(max_candidates, ceil(top_fraction * eligible))` eligible regions most similar to it, or all
  of them (k = eligible) in a cluster of fewer than `all_candidates_below` regions (reference: 20).
  `rank_among` all_regions (reference) ranks the whole pool instead, q's own image included, keeps
  the top floor(top_fraction * pool) and leaves out q's image from those.
  Every region is a query (also those outside a subsampled pool); queries with k = 0 are unused.
- similarity = dot product of the stored float16 masked-average features computed in float32 (they
  are unit vectors up to float16 rounding), the same number at build and at draw time.

Storage of the candidate sets, analysed at COCO scale (N = 8*10^5 regions, 50 clusters of ~1.6*10^4,
d = 256, k = min(0.5 * 1.6*10^4, 5,000) = 5,000 per query):

| storage | bytes | draw |
|---|---|---|
| explicit int32 lists (parquet list column) | N*k*4 = 16 GB (~1.5 GB delta-packed, 16 GB in RAM) | O(1) |
| bitmap over the pool per query | N*n_c/8 = 1.6 GB | O(1) expected (rejection) |
| **threshold per query + features (chosen)** | 10 MB thresholds + N*d*2 = 410 MB float16 features | O(1) expected |

Chosen: candidates.parquet stores, per query, the similarity of its k-th candidate (`threshold`), k
(`num_candidates`) and the eligible count; region_features.npy (float16 [N, d], memory-mapped by the
sampler, shared by data-loader workers through the page cache) holds the features that regions need
anyway. The candidate set of q is exactly {r in pool(c), image(r) != image(q), sim(q, r) >= threshold
- SIMILARITY_TOLERANCE} (the tolerance, 1e-5, absorbs float32 summation-order differences between the
blocked build and a single dot product). A support is drawn uniformly from it by rejection sampling:
pick a uniform pool member, accept it if it qualifies; expected trials = eligible / k <= 1 / top_fraction
when the cap is inactive and <= max_pool / max_candidates = 4 at the defaults, each trial one d-dim dot
product, independent of N. After MAX_DRAW_TRIALS rejections the exact set is materialised (O(n_c d)).
Build: per cluster, blocked [block x pool] float32 matrix products (torch) and a per-row k-th value
selection (numpy partition), never an n_c x n_c matrix: sum_c n_c * pool_c * 2d = 6.6 TFLOP at COCO scale
(benchmarks/episodes_scale.py measures time and bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from umtfss.episode import Episode
from umtfss.io import atomic_path, check_output_paths, check_outputs_apart, read_rgb, resolve_table_paths
from umtfss.stores import EmbeddingStore, LabelStore
from umtfss.progress import tqdm

REGIONS_FILE = "regions.parquet"
FEATURES_FILE = "region_features.npy"
CANDIDATES_FILE = "candidates.parquet"
METADATA_KEY = b"umtfss"
SIMILARITY_TOLERANCE = 1e-5
MAX_DRAW_TRIALS = 256
QUERY_BLOCK = 1024  # query rows per similarity block: block x pool x 4 bytes (80 MB at pool 20,000)


# --------------------------------------------------------------------------------------------
# grid geometry (shared with quality and inspect)
# --------------------------------------------------------------------------------------------

def valid_extent(labels: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of a label grid covered by the image: padding cells are -1 at the bottom/right."""
    covered = labels >= 0
    rows = np.flatnonzero(covered.any(axis=1))
    cols = np.flatnonzero(covered.any(axis=0))
    if rows.size == 0:
        return 0, 0
    return int(rows[-1]) + 1, int(cols[-1]) + 1


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to (h, w): source index floor(i * src / dst), as torch 'nearest'."""
    src_h, src_w = array.shape[:2]
    h, w = size
    rows = np.minimum((np.arange(h) * src_h) // h, src_h - 1)
    cols = np.minimum((np.arange(w) * src_w) // w, src_w - 1)
    return array[rows[:, None], cols[None, :]]


def cluster_mask(labels: np.ndarray, cluster: int, image_size: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask of `cluster` at image size: crop the grid's valid part, resize it nearest to (H, W)."""
    vh, vw = valid_extent(labels)
    if vh == 0:
        return np.zeros(image_size, np.uint8)
    cropped = (labels[:vh, :vw] == cluster).astype(np.uint8)
    return resize_nearest(cropped, image_size)


# --------------------------------------------------------------------------------------------
# regions
# --------------------------------------------------------------------------------------------

@dataclass
class _ImageRegions:
    clusters: np.ndarray
    area: np.ndarray
    bbox: np.ndarray  # [r, 4] y0, x0, y1, x1 (exclusive ends)
    features: np.ndarray  # [r, d] float32, L2-normalised
    occupied: np.ndarray  # [r, 2] number of grid rows, columns holding at least one cell of the region


def _region_geometry(labels: np.ndarray):
    """Per label >= 0 of a 2-D label array (small non-negative ids): ids, pixel counts, bbox, occupied
    rows/columns, and each pixel's region index (-1 outside every region), by bincounts."""
    h, w = labels.shape
    flat = labels.reshape(-1).astype(np.int64)
    inside = flat >= 0
    per_id = np.bincount(flat[inside])
    ids = np.flatnonzero(per_id)
    lookup = np.full(per_id.size, -1, np.int64)
    lookup[ids] = np.arange(ids.size)
    region = np.full(flat.size, -1, np.int64)
    region[inside] = lookup[flat[inside]]
    ys, xs = np.divmod(np.flatnonzero(inside), w)
    rows = np.bincount(region[inside] * h + ys, minlength=ids.size * h).reshape(ids.size, h) > 0
    cols = np.bincount(region[inside] * w + xs, minlength=ids.size * w).reshape(ids.size, w) > 0
    bbox = np.stack([rows.argmax(1), cols.argmax(1), h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)], axis=1)
    occupied = np.stack([rows.sum(1), cols.sum(1)], axis=1)
    return ids, per_id[ids], bbox.astype(np.int64), occupied.astype(np.int64), region


def _unit_rows(sums: np.ndarray) -> np.ndarray:
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def image_regions(cells: np.ndarray, features: np.ndarray) -> _ImageRegions:
    """Every cluster's region in one image's valid grid `cells` [h, w] with pixel `features` [h, w, d]."""
    ids, counts, bbox, occupied, region = _region_geometry(cells)
    if ids.size == 0:
        return _ImageRegions(ids, counts, bbox, np.zeros((0, features.shape[-1]), np.float32), occupied)
    order = np.argsort(region, kind="stable")[np.count_nonzero(region < 0):]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pixel_features = features.reshape(cells.size, -1)[order].astype(np.float32)
    return _ImageRegions(ids, counts, bbox, _unit_rows(np.add.reduceat(pixel_features, starts, axis=0)), occupied)


def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, t) per output position of a 1-D bilinear resize source -> target with aligned corners
    (torch's align_corners=True): output i = (1 - t) * in[lo] + t * in[hi]."""
    position = np.arange(target) * ((source - 1) / (target - 1)) if target > 1 else np.zeros(1)
    lo = np.minimum(np.floor(position).astype(np.int64), source - 1)
    return lo, np.minimum(lo + 1, source - 1), position - lo


def refined_image_regions(fine: np.ndarray, features: np.ndarray) -> _ImageRegions:
    """Every cluster's region in one image's superpixel-refined labels `fine` [h, w] (valid part), with the
    valid cell `features` [gh, gw, d]: area, bbox and occupancy in refined pixels, and as masked-average
    feature the mean over the region's pixels of the features resized bilinearly (aligned corners) to
    (h, w), as the reference code averages them. The resized map is never built: the mean is a weighted
    sum of cells, each pixel giving its four bilinear taps to its region's cell weights."""
    ids, counts, bbox, occupied, region = _region_geometry(fine)
    gh, gw, d = features.shape
    if ids.size == 0:
        return _ImageRegions(ids, counts, bbox, np.zeros((0, d), np.float32), occupied)
    h, w = fine.shape
    valid = region >= 0
    region = region[valid]
    row_lo, row_hi, row_t = (np.repeat(a, w)[valid] for a in bilinear_taps(gh, h))
    col_lo, col_hi, col_t = (np.tile(a, h)[valid] for a in bilinear_taps(gw, w))
    weights = np.zeros(ids.size * gh * gw)
    for rows, row_weight in ((row_lo, 1 - row_t), (row_hi, row_t)):
        for cols, col_weight in ((col_lo, 1 - col_t), (col_hi, col_t)):
            weights += np.bincount((region * gh + rows) * gw + cols, row_weight * col_weight, minlength=weights.size)
    sums = weights.reshape(ids.size, gh * gw).astype(np.float32) @ features.reshape(gh * gw, d).astype(np.float32)
    return _ImageRegions(ids, counts, bbox, _unit_rows(sums), occupied)


BACKGROUND_RULES = ("occupancy", "bbox")


AREA_UNITS = ("image", "grid")


def pixels_per_cell(image_size_hw: tuple[int, int], embed_size: int, stride: int) -> float:
    """Original-image pixels one feature-grid cell stands for: the embedder resized the longer side to embed_size."""
    return (stride * max(image_size_hw) / embed_size) ** 2


def region_filter(regions: _ImageRegions, valid: tuple[int, int], min_region_pixels: float,
                  drop_background_like: bool, background_span: float, background_rule: str = "occupancy",
                  pixels_per_cell: float = 1.0) -> np.ndarray:
    """Boolean keep-mask: area * pixels_per_cell >= min_region_pixels and, optionally, not background-like
    (module docstring); pixels_per_cell 1 counts grid cells."""
    if background_rule not in BACKGROUND_RULES:
        raise ValueError(f"config key 'episodes.background_rule' is '{background_rule}', expected occupancy or bbox")
    keep = regions.area * pixels_per_cell >= min_region_pixels
    if drop_background_like:
        vh, vw = valid
        if background_rule == "occupancy":  # reference: fewer than (1 - span) of the rows or columns free of it
            rows, cols = regions.occupied[:, 0], regions.occupied[:, 1]
            keep &= ~((rows > background_span * vh) | (cols > background_span * vw))
        else:
            span_h = regions.bbox[:, 2] - regions.bbox[:, 0]
            span_w = regions.bbox[:, 3] - regions.bbox[:, 1]
            keep &= ~((span_h >= background_span * vh) | (span_w >= background_span * vw))
    return keep


def build_regions(label_paths: Sequence[str | Path], embedding_paths: Sequence[str | Path],
                  clusters: int | None = None, min_region_pixels: int = 2048, drop_background_like: bool = True,
                  background_span: float = 0.99, progress: bool = True, background_rule: str = "occupancy",
                  area_unit: str = "image", stats: dict | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Regions of every image of the label stores, streamed shard by shard, image by image.

    Returns (table, features): the table has one row per kept region, sorted by cluster, with
    region_id (= row), image_id, cluster, area, area_pixels (original-image pixels), y0, x0, y1, x1
    (exclusive ends), valid_h, valid_w; `features` is float16 [rows, d], the masked-average features.
    Geometry is in grid cells, or, when the label stores hold superpixel-refined labels, in refined
    pixels (the embed input resolution): regions are then the refined labels' (the masks that
    training sees), filtered on them, with features averaged as refined_image_regions does.
    `stats`, when given, is filled with the counts an empty result is explained by: images, regions
    found, and of those the ones under min_region_pixels; and with the regions found per cluster.
    """
    if area_unit not in AREA_UNITS:
        raise ValueError(f"config key 'episodes.area_unit' is '{area_unit}', expected image or grid")
    labels = LabelStore(label_paths)
    embeddings = EmbeddingStore(embedding_paths)
    clusters = _check_cluster_count(labels, clusters)
    embed_size, stride = embeddings.attrs.get("image_size"), embeddings.attrs.get("stride")
    if not all(isinstance(v, int) and v > 0 for v in (embed_size, stride)):
        raise ValueError(f"embedding store(s) {_names(embedding_paths)} have image_size={embed_size!r}, "
                         f"stride={stride!r}; expected positive ints (rerun embed)")
    if tuple(labels.grid) != tuple(embeddings.grid):
        raise ValueError(f"label stores have grid {tuple(labels.grid)} but embedding stores have "
                         f"{tuple(embeddings.grid)}; expected the labels of these embeddings")
    _check_labels_of_embeddings(labels, embeddings)
    embedding_row = _unique_index(embeddings.image_ids, "embedding stores", embedding_paths)
    _unique_index(labels.image_ids, "label stores", label_paths)
    refined = labels.has_refined

    columns: dict[str, list] = {k: [] for k in ("image_id", "cluster", "area", "area_pixels", "bbox", "valid")}
    feature_blocks: list[np.ndarray] = []
    counts = {"images": len(labels), "found": 0, "too_small": 0}
    found_per_cluster = np.zeros(clusters, np.int64)  # before the filters: 0 = a cluster assign left empty
    bar = tqdm(total=len(labels), desc="regions", unit="img", disable=not progress)
    for index_range, block in labels.iter_batches(16):
        for offset, index in enumerate(index_range):
            image_id = labels.image_ids[index]
            if image_id not in embedding_row:
                raise ValueError(f"image '{image_id}' of label store(s) {_names(label_paths)} is not in the "
                                 f"embedding stores {_names(embedding_paths)}")
            cells = block[offset]
            vh, vw = valid_extent(cells)
            cells = cells[:vh, :vw]
            if cells.size and (cells.min() < 0 or cells.max() >= clusters):
                raise ValueError(f"image '{image_id}' has cluster ids in [{cells.min()}, {cells.max()}] inside its "
                                 f"valid grid, expected 0..{clusters - 1}")
            features = embeddings.features(embedding_row[image_id])[:vh, :vw]
            per_cell = pixels_per_cell(embeddings.size(embedding_row[image_id]), embed_size, stride)
            if refined:  # the masks training will see: regions, areas and spans measured on them
                fine = labels.refined(index)
                vh, vw = valid_extent(fine)
                fine = fine[:vh, :vw]
                if fine.size and (fine.min() < 0 or fine.max() >= clusters):
                    raise ValueError(f"image '{image_id}' has refined cluster ids in [{fine.min()}, {fine.max()}] "
                                     f"inside its valid extent, expected 0..{clusters - 1}")
                found = refined_image_regions(fine, features)
                per_unit = per_cell / stride ** 2  # original-image pixels per refined pixel
                grid_units = 1 / stride ** 2
            else:
                found = image_regions(cells, features)
                per_unit, grid_units = per_cell, 1.0
            unit = per_unit if area_unit == "image" else grid_units
            keep = region_filter(found, (vh, vw), min_region_pixels, drop_background_like, background_span,
                                 background_rule, unit)
            counts["found"] += int(found.area.size)
            found_per_cluster[found.clusters] += 1  # an image has at most one region per cluster
            counts["too_small"] += int((found.area * unit < min_region_pixels).sum())
            n = int(keep.sum())
            columns["image_id"].extend([image_id] * n)
            columns["cluster"].append(found.clusters[keep])
            columns["area"].append(found.area[keep])
            columns["area_pixels"].append(np.round(found.area[keep] * per_unit))
            columns["bbox"].append(found.bbox[keep])
            columns["valid"].append(np.tile([vh, vw], (n, 1)))
            feature_blocks.append(found.features[keep].astype(np.float16))
            bar.update(1)
    bar.close()
    if stats is not None:
        stats.update(counts, found_per_cluster=found_per_cluster)
    return _region_table(columns, feature_blocks, embeddings.dim)


def _check_labels_of_embeddings(labels: LabelStore, embeddings: EmbeddingStore) -> None:
    """Refuse label stores assigned on other embeddings than these (a label store copies its embedding
    store's attributes): the regions' masked-average features would silently mix two feature spaces."""
    from umtfss.clustering.assign import SAME_EMBEDDING_KEYS  # assign imports this module

    for path, group in zip(labels.paths, labels.groups):
        differ = [f"{key}: {group.attrs[key]!r} (labels) vs {embeddings.attrs.get(key)!r} (embeddings)"
                  for key in SAME_EMBEDDING_KEYS if key in group.attrs and group.attrs[key] != embeddings.attrs.get(key)]
        if differ:
            raise ValueError(f"label store '{path}' was assigned on other embeddings than embedding store(s) "
                             f"{_names(embeddings.paths)} hold: {'; '.join(differ)}; expected the embeddings "
                             "the labels were assigned on")


def _region_table(columns: dict, feature_blocks: list[np.ndarray], dim: int) -> tuple[pd.DataFrame, np.ndarray]:
    def cat(name, shape):
        return np.concatenate(columns[name]) if columns[name] else np.zeros(shape, np.int64)

    cluster = cat("cluster", (0,))
    order = np.argsort(cluster, kind="stable")
    bbox, valid = cat("bbox", (0, 4))[order], cat("valid", (0, 2))[order]
    table = pd.DataFrame({
        "region_id": np.arange(order.size, dtype=np.int32),
        "image_id": np.asarray(columns["image_id"], dtype=object)[order] if order.size else np.zeros(0, object),
        "cluster": cluster[order].astype(np.int16),
        "area": cat("area", (0,))[order].astype(np.int32),
        "area_pixels": cat("area_pixels", (0,))[order].astype(np.int64),
        "y0": bbox[:, 0].astype(np.int16), "x0": bbox[:, 1].astype(np.int16),
        "y1": bbox[:, 2].astype(np.int16), "x1": bbox[:, 3].astype(np.int16),
        "valid_h": valid[:, 0].astype(np.int16), "valid_w": valid[:, 1].astype(np.int16),
    })
    features = np.concatenate(feature_blocks)[order] if feature_blocks else np.zeros((0, dim), np.float16)
    return table, np.ascontiguousarray(features)


def _check_cluster_count(labels: LabelStore, clusters: int | None) -> int:
    stored = labels.clusters or None
    if clusters is None and stored is None:
        raise ValueError(f"label store(s) {_names(labels.paths)} have no 'clusters' attribute; pass the number of clusters")
    if clusters is not None and stored is not None and int(clusters) != stored:
        raise ValueError(f"label store(s) {_names(labels.paths)} were made with {stored} clusters, but {clusters} were requested")
    return int(clusters if clusters is not None else stored)


def _unique_index(image_ids: list[str], what: str, paths) -> dict[str, int]:
    index = {image_id: row for row, image_id in enumerate(image_ids)}
    if len(index) != len(image_ids):
        seen, duplicates = set(), []
        for image_id in image_ids:
            if image_id in seen:
                duplicates.append(image_id)
            seen.add(image_id)
        raise ValueError(f"{what} {_names(paths)} list image(s) more than once: {duplicates[:5]}; "
                         f"expected each image in exactly one shard")
    return index


def _names(paths) -> str:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    shown = ", ".join(f"'{p}'" for p in paths[:3])
    return shown + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")


# --------------------------------------------------------------------------------------------
# support candidates
# --------------------------------------------------------------------------------------------

def candidate_count(eligible: np.ndarray, top_fraction: float, max_candidates: int) -> np.ndarray:
    """k = min(max_candidates, ceil(top_fraction * eligible)); 0 when nothing is eligible."""
    eligible = np.asarray(eligible, dtype=np.int64)
    top = np.ceil(top_fraction * eligible - 1e-9).astype(np.int64)
    return np.minimum(top, max_candidates).clip(min=0)


def pool_members(rows: np.ndarray, max_pool: int, seed: int, cluster: int) -> np.ndarray:
    """The cluster's candidate pool: all its rows, or max_pool of them at random (seeded per cluster), sorted."""
    if rows.size <= max_pool:
        return rows
    rng = np.random.default_rng([seed, int(cluster)])
    return np.sort(rng.choice(rows, size=max_pool, replace=False))


RANKINGS = ("other_images", "all_regions")


def compute_candidates(features: np.ndarray, clusters: np.ndarray, image_codes: np.ndarray,
                       top_fraction: float = 0.5, max_candidates: int = 5000, max_pool: int = 20000,
                       seed: int = 0, progress: bool = True, all_candidates_below: int = 0,
                       rank_among: str = "other_images") -> pd.DataFrame:
    """Per region: in_pool, eligible, num_candidates (k) and threshold (similarity of the k-th candidate).

    features [N, d] (the stored float16 values), clusters [N], image_codes [N] (int per image).
    In a cluster of fewer than `all_candidates_below` regions every eligible region is a candidate
    (k = eligible, the reference code's rule below 20 regions). `rank_among` 'all_regions' ranks the
    whole pool, the query's own image included, keeps the top floor(top_fraction * pool) and then
    drops the own image's regions (the reference code); k counts what is left. Thresholds of queries
    with k = 0 are NaN.
    """
    if rank_among not in RANKINGS:
        raise ValueError(f"config key 'episodes.rank_among' is '{rank_among}', expected one of {', '.join(RANKINGS)}")
    n = len(clusters)
    in_pool = np.zeros(n, bool)
    eligible = np.zeros(n, np.int32)
    num_candidates = np.zeros(n, np.int32)
    threshold = np.full(n, np.nan, np.float32)
    clusters = np.asarray(clusters)
    image_codes = np.asarray(image_codes, dtype=np.int64)
    by_cluster = _rows_by_cluster(clusters)
    bar = tqdm(total=n, desc="candidates", unit="region", disable=not progress)
    for cluster, rows in by_cluster.items():
        pool = pool_members(rows, max_pool, seed, cluster)
        in_pool[pool] = True
        pool_features = torch.from_numpy(np.asarray(features[pool], dtype=np.float32))
        pool_images = torch.from_numpy(image_codes[pool])
        take_all = rows.size < all_candidates_below
        for start in range(0, rows.size, QUERY_BLOCK):
            queries = rows[start:start + QUERY_BLOCK]
            block_eligible, block_k, block_threshold = _block_thresholds(
                torch.from_numpy(np.asarray(features[queries], dtype=np.float32)),
                torch.from_numpy(image_codes[queries]), pool_features, pool_images,
                1.0 if take_all else top_fraction, rows.size if take_all else max_candidates,
                rank_among == "all_regions" and not take_all)
            eligible[queries] = block_eligible
            num_candidates[queries] = block_k
            threshold[queries] = block_threshold
            bar.update(queries.size)
    bar.close()
    return pd.DataFrame({
        "region_id": np.arange(n, dtype=np.int32),
        "cluster": clusters.astype(np.int16),
        "in_pool": in_pool,
        "eligible": eligible,
        "num_candidates": num_candidates,
        "threshold": threshold,
    })


def candidates_of(query: int, features: np.ndarray, pool: np.ndarray, image_codes: np.ndarray,
                  threshold: float) -> np.ndarray:
    """Materialise a query's candidate set: pool rows of other images with similarity >= threshold - tolerance."""
    if pool.size == 0 or not np.isfinite(threshold):
        return np.zeros(0, np.int64)
    similarity = np.asarray(features[pool], np.float32) @ np.asarray(features[query], np.float32)
    ok = (similarity >= threshold - SIMILARITY_TOLERANCE) & (image_codes[pool] != image_codes[query])
    return pool[ok]


def _rows_by_cluster(clusters: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(clusters, kind="stable")
    ids, starts = np.unique(clusters[order], return_index=True)
    ends = list(starts[1:]) + [order.size]
    return {int(c): np.sort(order[s:e]) for c, s, e in zip(ids, starts, ends)}


def _block_thresholds(queries: torch.Tensor, query_images: torch.Tensor, pool: torch.Tensor,
                      pool_images: torch.Tensor, top_fraction: float, max_candidates: int,
                      rank_all_regions: bool = False):
    """Eligible counts, k and the k-th largest similarity of a block of queries against a pool."""
    similarity = queries @ pool.T
    same_image = query_images[:, None] == pool_images[None, :]
    eligible = (pool.shape[0] - same_image.sum(dim=1)).numpy()
    if rank_all_regions:
        return (eligible, *_thresholds_ranking_all(similarity.numpy(), same_image.numpy(), top_fraction,
                                                   max_candidates))
    similarity.masked_fill_(same_image, -math.inf)
    k = candidate_count(eligible, top_fraction, max_candidates)
    threshold = np.full(len(k), np.nan, np.float32)
    has_candidates = k > 0
    if has_candidates.any():
        # the k-th largest of a row of m values sits at ascending position m - k; -inf entries sort first
        position = pool.shape[0] - k[has_candidates]
        rows = similarity.numpy() if has_candidates.all() else similarity.numpy()[has_candidates]
        rows.partition(np.unique(position), axis=1)
        threshold[has_candidates] = rows[np.arange(len(rows)), position]
    return eligible, k, threshold


def _thresholds_ranking_all(similarity: np.ndarray, same_image: np.ndarray, top_fraction: float,
                            max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, threshold) of the reference's rule: the floor(top_fraction * pool) most similar pool regions,
    own image included, then only those of other images; k counts them as the sampler will find them
    (similarity >= threshold - SIMILARITY_TOLERANCE), 0 (threshold NaN) when none is left."""
    ranked = min(max_candidates, int(top_fraction * similarity.shape[1]))
    threshold = np.full(len(similarity), np.nan, np.float32)
    k = np.zeros(len(similarity), np.int64)
    if ranked == 0:
        return k, threshold
    position = similarity.shape[1] - ranked
    kth = np.partition(similarity, position, axis=1)[:, position]
    k = ((similarity >= kth[:, None] - SIMILARITY_TOLERANCE) & ~same_image).sum(axis=1)
    threshold[k > 0] = kth[k > 0]
    return k, threshold


# --------------------------------------------------------------------------------------------
# the episodes stage
# --------------------------------------------------------------------------------------------

def build_episodes(label_paths: Sequence[str | Path], embedding_paths: Sequence[str | Path],
                   out_dir: str | Path, episodes_config: dict, clusters: int | None = None,
                   progress: bool = True) -> dict[str, Path]:
    """Write regions.parquet, region_features.npy and candidates.parquet into out_dir (each atomically).

    The three are written to temporaries and renamed together at the end, after every check, so a
    killed run leaves neither a mix of two runs' files nor a half-written one under the final names
    (the sampler also refuses regions and candidates of two runs). Outputs in the way are refused
    before any work; temporaries of killed runs are deleted.
    `episodes_config` is the config's episodes section; a key it lacks that came later takes its
    schema default (all_candidates_below 0, rank_among other_images), so callers of the library keep working.
    """
    cfg = {"all_candidates_below": 0, "rank_among": "other_images", **episodes_config}
    out_dir = Path(out_dir)
    paths = {"features": out_dir / FEATURES_FILE, "regions": out_dir / REGIONS_FILE,
             "candidates": out_dir / CANDIDATES_FILE}
    check_output_paths({"output folder (--out-dir)": paths["regions"]})
    check_outputs_apart({"output folder (--out-dir)": out_dir},
                        {"a label store (--labels)": label_paths, "an embedding store (--embeddings)": embedding_paths})
    with contextlib.ExitStack() as stack:
        temps = {name: stack.enter_context(atomic_path(path, sweep=True)) for name, path in paths.items()}
        table, features, metadata, candidates = _episode_tables(label_paths, embedding_paths, cfg, clusters, progress)
        with open(temps["features"], "wb") as handle:
            np.save(handle, features)
        _write_parquet_file(table, temps["regions"], metadata)
        _write_parquet_file(candidates, temps["candidates"], metadata)
    return paths


def _episode_tables(label_paths, embedding_paths, cfg: dict, clusters: int | None, progress: bool):
    """(regions table, features, metadata, candidates table) of build_episodes, or a ValueError saying
    why nothing would be usable."""
    stats: dict = {}
    table, features = build_regions(label_paths, embedding_paths, clusters, cfg["min_region_pixels"],
                                    cfg["drop_background_like"], cfg["background_span"], progress,
                                    cfg["background_rule"], cfg["area_unit"], stats=stats)
    if stats["images"] == 0:
        raise ValueError(f"label store(s) {_names(label_paths)} hold no image; expected the labels of embedded images")
    if table.empty:
        unit = "image pixels" if cfg["area_unit"] == "image" else "grid cells"
        raise ValueError(f"no region survived the filters in label store(s) {_names(label_paths)}: of "
                         f"{stats['found']} regions in {stats['images']} images, {stats['too_small']} have fewer than "
                         f"min_region_pixels={cfg['min_region_pixels']} {unit} (area_unit {cfg['area_unit']}) and "
                         f"{stats['found'] - stats['too_small']} are background-like (drop_background_like={cfg['drop_background_like']}, "
                         f"background_rule={cfg['background_rule']}, background_span={cfg['background_span']}); "
                         "lower config key 'episodes.min_region_pixels' or adjust the background keys")
    image_codes, _ = pd.factorize(table["image_id"])
    candidates = compute_candidates(features, table["cluster"].to_numpy(), image_codes, cfg["top_fraction"],
                                    cfg["max_candidates"], cfg["max_pool"], cfg["seed"], progress,
                                    cfg["all_candidates_below"], cfg["rank_among"])
    if not (candidates["num_candidates"] > 0).any():
        raise ValueError(f"none of the {len(table)} regions ({table['image_id'].nunique()} images, "
                         f"{table['cluster'].nunique()} clusters) has a support candidate: a query needs a region of "
                         "its cluster in another image"
                         + (f" among the top episodes.top_fraction={cfg['top_fraction']} of its cluster "
                            "(rank_among all_regions rounds down)" if cfg["rank_among"] == "all_regions" else "")
                         + "; use more images or lower config key 'episodes.min_region_pixels'")
    with_regions = np.unique(table["cluster"].to_numpy())
    with_queries = np.unique(table["cluster"].to_numpy()[candidates["num_candidates"].to_numpy() > 0])
    for line in cluster_coverage(stats["found_per_cluster"], with_regions, with_queries, verbose=progress):
        print(line, file=sys.stderr, flush=True)
    labels = LabelStore(label_paths)
    metadata = {
        "parameters": {k: cfg[k] for k in ("min_region_pixels", "area_unit", "drop_background_like", "background_rule",
                                           "background_span", "top_fraction", "max_candidates", "max_pool",
                                           "all_candidates_below", "rank_among", "seed")},
        "clusters": int(clusters if clusters is not None else labels.clusters),
        "centroids_sha256": labels.attrs.get("centroids_sha256"),
        "label_stores": [str(p) for p in label_paths],
        "embedding_stores": [str(p) for p in embedding_paths],
        "regions": int(len(table)),
        "images": int(table["image_id"].nunique()),
        "feature_dim": int(features.shape[1]),
        "region_labels": "refined" if labels.has_refined else "grid",  # the unit of area, y0..x1, valid_h/w
        "clusters_with_regions": int(with_regions.size),
        "clusters_with_queries": int(with_queries.size),  # a region with a support candidate: episodes of it
        "similarity_tolerance": SIMILARITY_TOLERANCE,
    }
    return table, features, metadata, candidates


def cluster_coverage(found_per_cluster: np.ndarray, with_regions: np.ndarray, with_queries: np.ndarray,
                     verbose: bool = True) -> list[str]:
    """Stderr lines on how many of the N clusters the episodes can use: a count (when `verbose` or warning)
    and a warning when some cluster has no region or fewer than 2 make an episode, naming the key to change.

    A cluster without regions was either left empty by assign (near-duplicate centroids, fit.json's
    empty_clusters) or lost all its regions to the filters; the episodes then have fewer classes than
    clustering.clusters asked for, which would otherwise pass unnoticed.
    """
    clusters = len(found_per_cluster)
    missing = np.setdiff1d(np.arange(clusters), with_regions)
    warnings = []
    if missing.size:
        never = missing[found_per_cluster[missing] == 0]
        shown = ", ".join(map(str, missing[:10])) + (", ..." if missing.size > 10 else "")
        causes = []
        if never.size:
            causes.append(f"{never.size} hold no cell at all (empty clusters: features nearly constant or fewer "
                          "distinct than clusters, see fit.json's empty_clusters; lower config key "
                          "'clustering.clusters' or check the embedding)")
        if missing.size > never.size:
            causes.append(f"{missing.size - never.size} lost every region to the filters (lower config key "
                          "'episodes.min_region_pixels' or adjust the background keys)")
        warnings.append(f"umtfss episodes: warning: {missing.size} of the {clusters} clusters have no region "
                        f"(ids {shown}): {'; '.join(causes)}")
    if with_queries.size < 2:
        warnings.append(f"umtfss episodes: warning: only {with_queries.size} cluster(s) have a region with a support "
                        "candidate, so every episode is of one class; use more images, lower config key "
                        "'episodes.min_region_pixels' or set 'episodes.drop_background_like' false, and check "
                        "the embedding (fit.json's empty_clusters)")
    count = (f"umtfss episodes: {with_regions.size} of the {clusters} clusters have a region, "
             f"{with_queries.size} a region with a support candidate")
    return [count, *warnings] if verbose or warnings else []


def write_parquet(frame: pd.DataFrame, path: Path, metadata: dict) -> None:
    """Write a table atomically (zstd) with `metadata` as JSON under the schema key b"umtfss"."""
    with atomic_path(path) as temp:
        _write_parquet_file(frame, temp, metadata)


def _write_parquet_file(frame: pd.DataFrame, path: Path, metadata: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()})
    pq.write_table(table, path, compression="zstd")


def read_metadata(path: str | Path) -> dict:
    """The umtfss parameters recorded in a regions/candidates parquet file ({} when absent)."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def cli(parser: argparse.ArgumentParser):
    """`umtfss episodes`: regions and support candidates from label and embedding stores."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON (section 'episodes')")
    parser.add_argument("--labels", nargs="+", required=True, help="label store shards (*.zarr)")
    parser.add_argument("--embeddings", nargs="+", required=True, help="embedding store shards (*.zarr)")
    parser.add_argument("--out-dir", required=True, help="folder for regions.parquet, region_features.npy, candidates.parquet")

    def run(args: argparse.Namespace) -> None:
        from umtfss.config import load

        config = load(args.config)
        paths = build_episodes(args.labels, args.embeddings, args.out_dir, config["episodes"])
        candidates = pd.read_parquet(paths["candidates"], columns=["num_candidates"])["num_candidates"]
        usable = int((candidates > 0).sum())
        print(f"{len(candidates)} regions, {usable} usable as queries (>= 1 candidate), "
              f"median {int(candidates.median()) if len(candidates) else 0} candidates; written to {args.out_dir}")

    return run


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------

def _check_one_run(directory: Path, features_shape: tuple) -> None:
    """Refuse regions and candidates written by two runs of the episodes stage (their metadata differ, e.g.
    files copied from two folders, or left by a run killed between renames), or features of another shape
    than they record: equal row counts alone would let such a mix pass."""
    regions_meta, candidates_meta = (read_metadata(directory / name) for name in (REGIONS_FILE, CANDIDATES_FILE))
    if regions_meta and candidates_meta and regions_meta != candidates_meta:
        differ = sorted(k for k in set(regions_meta) | set(candidates_meta) if regions_meta.get(k) != candidates_meta.get(k))
        raise ValueError(f"'{directory / REGIONS_FILE}' and '{directory / CANDIDATES_FILE}' were written by different "
                         f"runs of `umtfss episodes` (they record different {', '.join(differ)}); rerun it")
    recorded = (regions_meta.get("regions"), regions_meta.get("feature_dim"))
    if None not in recorded and tuple(recorded) != tuple(features_shape):
        raise ValueError(f"'{directory / FEATURES_FILE}' holds {features_shape[0]} x {features_shape[1]} features but "
                         f"'{directory / REGIONS_FILE}' records {recorded[0]} x {recorded[1]}; rerun `umtfss episodes`")


def _image_paths(images_table) -> dict[str, str]:
    if isinstance(images_table, (str, Path)):
        if not Path(images_table).is_file():
            raise FileNotFoundError(f"images table '{images_table}' does not exist")
        images_table = resolve_table_paths(pd.read_parquet(images_table, columns=["image_id", "image_path"]), images_table)
    missing = {"image_id", "image_path"} - set(images_table.columns)
    if missing:
        raise ValueError(f"images table lacks column(s) {sorted(missing)}; expected image_id, image_path")
    table = images_table.drop_duplicates("image_id")
    return dict(zip(table["image_id"].astype(str), table["image_path"].astype(str)))


class PseudoEpisodes:
    """Training episodes from the episodes stage: a query region, K supports drawn among its candidates.

    `sampling` 'image' (reference code): episode i is query image i, its query region drawn
    uniformly among the image's query regions, so an epoch is one pass over the images; 'region':
    episode i is query region i. `image_ids` restricts queries AND supports to those images (the
    paper's 'fold' setting, where U_train is the fold's images): the candidates are then ranked again
    among those images' regions alone, with the parameters the episodes were built with, as if the
    episodes stage had seen only them (top 50 % of the fold's regions of the cluster, its own pool).
    """

    def __init__(self, episodes_dir: str | Path, label_paths: Sequence[str | Path], images_table,
                 image_ids: Sequence[str] | None = None, sampling: str = "image"):
        if sampling not in ("image", "region"):
            raise ValueError(f"config key 'training.episode_sampling' is '{sampling}', expected image or region")
        self.sampling = sampling
        directory = Path(episodes_dir)
        for name in (REGIONS_FILE, FEATURES_FILE, CANDIDATES_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"'{directory / name}' does not exist; run `umtfss episodes` first")
        self.regions = pd.read_parquet(directory / REGIONS_FILE)
        candidates = pd.read_parquet(directory / CANDIDATES_FILE)
        self.features = np.load(directory / FEATURES_FILE, mmap_mode="r")
        if not (len(self.regions) == len(candidates) == self.features.shape[0]):
            raise ValueError(f"'{directory}' holds {len(self.regions)} regions, {len(candidates)} candidate rows and "
                             f"{self.features.shape[0]} features; expected equal counts (rerun `umtfss episodes`)")
        _check_one_run(directory, self.features.shape)
        self.labels = LabelStore(label_paths)
        self._label_index = {image_id: i for i, image_id in enumerate(self.labels.image_ids)}
        self._image_path = _image_paths(images_table)
        self._check_images()
        self.image_codes, self._image_names = pd.factorize(self.regions["image_id"])
        self.cluster = self.regions["cluster"].to_numpy()
        self.allowed = self._allowed_images(image_ids)
        if image_ids is not None:
            candidates = self._candidates_among_allowed(read_metadata(directory / CANDIDATES_FILE))
        self.threshold = candidates["threshold"].to_numpy(np.float32)
        self.num_candidates = candidates["num_candidates"].to_numpy()
        in_pool = candidates["in_pool"].to_numpy() & self.allowed[self.image_codes]
        self.pool = {c: rows[in_pool[rows]] for c, rows in _rows_by_cluster(self.cluster).items()}
        self.queries = np.flatnonzero((self.num_candidates > 0) & self.allowed[self.image_codes])
        codes = self.image_codes[self.queries]
        order = np.argsort(codes, kind="stable")
        _, starts = np.unique(codes[order], return_index=True)
        self.queries_of_image = np.split(self.queries[order], starts[1:]) if self.queries.size else []

    def __len__(self) -> int:
        return len(self.queries_of_image) if self.sampling == "image" else int(self.queries.size)

    def _check_images(self) -> None:
        ids = self.regions["image_id"].unique()
        for what, known in (("label stores", self._label_index), ("images table", self._image_path)):
            missing = [i for i in ids if i not in known]
            if missing:
                raise ValueError(f"{len(missing)} region image(s) are not in the {what}, e.g. {missing[:3]}; "
                                 f"expected the stores the episodes were built from")

    def _allowed_images(self, image_ids) -> np.ndarray:
        if image_ids is None:
            return np.ones(len(self._image_names), bool)
        allowed = set(map(str, image_ids))
        return np.array([name in allowed for name in self._image_names], bool)

    def _candidates_among_allowed(self, metadata: dict) -> pd.DataFrame:
        """compute_candidates over the allowed images' regions, laid out over all regions (others: none)."""
        params = {"top_fraction": 0.5, "max_candidates": 5000, "max_pool": 20000, "seed": 0,
                  "all_candidates_below": 0, "rank_among": "other_images", **metadata.get("parameters", {})}
        rows = np.flatnonzero(self.allowed[self.image_codes])
        print(f"pseudo episodes: ranking the candidates among the {rows.size} regions of {int(self.allowed.sum())} "
              "allowed images ('fold' setting)", file=sys.stderr)
        subset = compute_candidates(self.features[rows], self.cluster[rows], self.image_codes[rows],
                                    params["top_fraction"], params["max_candidates"], params["max_pool"],
                                    params["seed"], all_candidates_below=params["all_candidates_below"],
                                    rank_among=params["rank_among"])
        table = pd.DataFrame({"in_pool": np.zeros(len(self.cluster), bool),
                              "num_candidates": np.zeros(len(self.cluster), np.int32),
                              "threshold": np.full(len(self.cluster), np.nan, np.float32)})
        for column in table.columns:
            table.loc[rows, column] = subset[column].to_numpy()
        return table

    def _similarity(self, a: int, b: int) -> float:
        return float(np.dot(np.asarray(self.features[a], np.float32), np.asarray(self.features[b], np.float32)))

    def candidate_rows(self, region: int) -> np.ndarray:
        """The exact candidate set of a region (region rows), restricted to allowed images."""
        if self.num_candidates[region] == 0:
            return np.zeros(0, np.int64)
        pool = self.pool.get(int(self.cluster[region]), np.zeros(0, np.int64))
        return candidates_of(region, self.features, pool, self.image_codes, float(self.threshold[region]))

    def draw_supports(self, region: int, rng: np.random.Generator, shots: int) -> list[int]:
        """`shots` support regions drawn uniformly from the candidates (distinct when there are enough)."""
        pool = self.pool[int(self.cluster[region])]
        distinct = self.num_candidates[region] >= shots
        chosen: list[int] = []
        for _ in range(MAX_DRAW_TRIALS * shots if pool.size else 0):
            if len(chosen) == shots:
                return chosen
            row = int(pool[rng.integers(pool.size)])
            if (self.image_codes[row] == self.image_codes[region] or (distinct and row in chosen)
                    or self._similarity(region, row) < self.threshold[region] - SIMILARITY_TOLERANCE):
                continue
            chosen.append(row)
        exact = self.candidate_rows(region)
        if exact.size == 0:
            raise ValueError(f"region {region} (image '{self.regions['image_id'].iat[region]}') has no allowed candidate")
        needed = shots - len(chosen)
        unused = np.setdiff1d(exact, chosen)
        if distinct and unused.size >= needed:
            extra = rng.choice(unused, size=needed, replace=False)
        else:
            extra = rng.choice(exact, size=needed, replace=True)
        return chosen + [int(r) for r in extra]

    def region_mask(self, region: int, image_size: tuple[int, int]) -> np.ndarray:
        """uint8 0/1 mask of a region at image size: the valid part of the superpixel-refined labels when
        the label store has them, else of the grid labels, resized nearest."""
        image_id = self.regions["image_id"].iat[region]
        index, cluster = self._label_index[image_id], int(self.cluster[region])
        if self.labels.has_refined:
            mask = cluster_mask(self.labels.refined(index), cluster, image_size)
            if mask.any():  # a few refined pixels can vanish when the image is smaller than the embed input
                return mask
        return cluster_mask(self.labels.labels(index), cluster, image_size)

    def _image_and_mask(self, region: int) -> tuple[np.ndarray, np.ndarray, str]:
        image_id = self.regions["image_id"].iat[region]
        image = read_rgb(self._image_path[image_id])
        return image, self.region_mask(region, image.shape[:2]), image_id

    def episode(self, index: int, rng: np.random.Generator | int | None, shots: int) -> Episode:
        """Episode `index` (0 <= index < len): its query region (of query image `index` when sampling
        by image) and `shots` supports, drawn with rng."""
        if not 0 <= index < len(self):
            raise IndexError(f"episode index {index} out of range for {len(self)} query {self.sampling}s")
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if self.sampling == "image":
            regions = self.queries_of_image[index]
            query = int(regions[rng.integers(regions.size)])
        else:
            query = int(self.queries[index])
        query_image, query_mask, query_id = self._image_and_mask(query)
        support_images, support_masks, support_ids = [], [], []
        for row in self.draw_supports(query, rng, shots):
            image, mask, image_id = self._image_and_mask(row)
            support_images.append(image)
            support_masks.append(mask)
            support_ids.append(image_id)
        return Episode(query_image, query_mask, support_images, support_masks, class_id=int(self.cluster[query]),
                       query_id=query_id, support_ids=support_ids)
