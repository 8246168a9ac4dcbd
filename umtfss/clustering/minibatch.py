"""The reference code's mini-batch k-means fit: k-means on a first group of images, then running means."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from umtfss.clustering.assign import gather_valid_cells, nearest_centroid, normalise_rows
from umtfss.stores import READ_BATCH_IMAGES, EmbeddingStore, iter_selected
from umtfss.progress import tqdm


@dataclass
class ImageGroups:
    """The images of the mini-batch fit: a first group for the k-means, then one group per update."""

    first: np.ndarray  # sorted image indices
    updates: list[np.ndarray]
    sampled: int  # images drawn (all of the store's when it has at most sample_images)
    left_out: int  # of the sampled, in the trailing group that never moves the centroids


def image_groups(images: int, group_images: int, sample_images: int | None = None, seed: int = 0) -> ImageGroups:
    """The groups of the reference loop for a store of `images` images.

    A store with more than `sample_images` images is first cut to a seeded random draw of that many,
    in random order (the reference's --sample_num 20,000 on COCO); otherwise the list order is kept.
    The first group is `group_images` images (all when there are fewer); each further group of
    exactly `group_images` moves the centroids once; a trailing shorter group is never used.
    """
    if group_images < 1:
        raise ValueError(f"config key 'clustering.minibatch_images' is {group_images}, expected an integer >= 1")
    if sample_images is not None and sample_images < 1:
        raise ValueError(f"config key 'clustering.minibatch_sample_images' is {sample_images}, "
                         "expected an integer >= 1 or null")
    order = np.arange(images)
    if sample_images is not None and images > sample_images:
        order = np.random.default_rng([seed, 1]).permutation(images)[:sample_images]  # a stream of its own
    first = min(group_images, len(order))
    count = (len(order) - first) // group_images
    updates = [np.sort(order[first + g * group_images:first + (g + 1) * group_images]) for g in range(count)]
    return ImageGroups(np.sort(order[:first]), updates, len(order), len(order) - first - count * group_images)


def valid_cells(store: EmbeddingStore, images: np.ndarray):
    """Yield (images, float32 [m, C] their valid cells, L2-normalised again) over the given sorted image
    indices, a read batch at a time."""
    for indices, block, valid in iter_selected(store, images, READ_BATCH_IMAGES):
        cells = torch.from_numpy(gather_valid_cells(block, valid)).float().numpy()  # vectorised float16 conversion
        yield len(indices), normalise_rows(cells)


class GroupStatistics:
    """Per-cluster pixel counts and feature sums of one group under fixed centroids (exact, streamed)."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
        self.counts = np.zeros(len(centroids), np.int64)
        self.sums = np.zeros(centroids.shape, np.float64)

    def add(self, cells: np.ndarray) -> None:
        nearest = torch.from_numpy(nearest_centroid(cells, self.centroids).astype(np.int64))
        self.counts += np.bincount(nearest.numpy(), minlength=len(self.counts))
        sums = torch.zeros(self.centroids.shape, dtype=torch.float32).index_add_(0, nearest, torch.from_numpy(cells))
        self.sums += sums.numpy()

    def objective(self, spherical: bool) -> float | None:
        """Mean over the group's pixels of the cosine to (spherical) or squared L2 distance from (euclidean)
        the nearest centroid, from the sums alone: |x - c|^2 = 1 - 2 x.c + |c|^2 for unit x."""
        centroids = self.centroids.numpy().astype(np.float64)
        dots = float((self.sums * centroids).sum())
        pixels = int(self.counts.sum())
        if pixels == 0:
            return None
        if spherical:
            return dots / pixels
        return (pixels - 2 * dots + float((self.counts * (centroids ** 2).sum(axis=1)).sum())) / pixels


def running_mean_update(centroids: np.ndarray, totals: np.ndarray, group: GroupStatistics,
                        spherical: bool) -> np.ndarray:
    """Move each centroid towards its group mean by rate n_k / (all pixels it has had so far); `totals`
    (the reference's data_count) is updated in place. Clusters without a pixel in the group stay put."""
    totals += group.counts
    hit = group.counts > 0
    rate = np.zeros(len(centroids))
    rate[hit] = group.counts[hit] / totals[hit]
    means = np.zeros_like(group.sums)
    means[hit] = group.sums[hit] / group.counts[hit, None]
    moved = (1 - rate[:, None]) * centroids + rate[:, None] * means
    if spherical:
        normalise_rows(moved)
    return moved.astype(np.float32)


def running_means(store: EmbeddingStore, centroids: np.ndarray, groups: ImageGroups, spherical: bool,
                  progress: bool = True) -> tuple[np.ndarray, dict]:
    """(centroids, metadata) after the reference's mini-batch passes over the groups (image_groups).

    `centroids` come from the k-means of the first group; its counts are taken over all of that
    group's valid pixels, as the reference counts the pixels it fitted on. Each further group is
    assigned to the centroids as they stand, then moves them once (running_mean_update); the order
    of the images inside a group does not matter, as the centroids stay fixed within it.
    """
    images = len(groups.first) + sum(len(group) for group in groups.updates)
    bar = tqdm(total=images, desc="mini-batch k-means", unit="img", file=sys.stderr, disable=not progress)
    objectives, totals = [], np.zeros(len(centroids), np.int64)
    for number, group in enumerate([groups.first, *groups.updates]):
        statistics = GroupStatistics(centroids)
        for count, cells in valid_cells(store, group):
            statistics.add(cells)
            bar.update(count)
        objectives.append(statistics.objective(spherical))
        if number == 0:
            totals += statistics.counts
        else:
            centroids = running_mean_update(centroids, totals, statistics, spherical)
    bar.close()
    meta = {
        "sampled_images": groups.sampled,
        "first_group_images": len(groups.first),
        "update_groups": len(groups.updates),
        "images_used": images,
        "images_left_out": groups.left_out,
        # per group, the mean over its pixels under the centroids it was assigned to (the reference's k-means loss)
        "group_objective_mean": [None if value is None else round(value, 6) for value in objectives],
        "pixels_per_cluster": totals.tolist(),
    }
    return centroids, meta
