"""Superpixel refinement of pseudo masks: grid cluster labels -> image-resolution labels by Felzenszwalb majority vote."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb

from umtfss.io import read_rgb
from umtfss.pseudo_episodes import resize_nearest
from umtfss.transforms import resize_pad

# the reference code's Felzenszwalb settings (chosen there for ~473 px images)
SUPERPIXEL_SCALE = 100.0
SUPERPIXEL_SIGMA = 0.8
SUPERPIXEL_MIN_SIZE = 200
# how the per-pixel labels that the superpixels vote on come from the grid (clustering.refine_upsample)
UPSAMPLINGS = ("bilinear", "nearest")


def group_majority(groups: np.ndarray, labels: np.ndarray, num_groups: int) -> np.ndarray:
    """The most frequent label of each group (ties -> the lowest label): int [num_groups], -1 for empty groups.

    One bincount over group * K + label, K = the labels present (compacted, so memory is
    num_groups x K however large the cluster ids are), then an argmax per group.
    """
    groups = np.asarray(groups, np.int64).ravel()
    values, compact = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    k = max(len(values), 1)
    counts = np.bincount(groups * k + compact.ravel(), minlength=num_groups * k).reshape(num_groups, k)
    winner = values[counts.argmax(axis=1)] if len(values) else np.zeros(num_groups, np.int64)
    return np.where(counts.sum(axis=1) > 0, winner, -1)


def embedded_view(path: str, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as the embedder saw it: float32 [h, w, 3] in [0, 1] (resize_pad, padding cropped), original (H, W).

    Superpixels must be computed on these pixels so that they line up with the feature grid.
    """
    image = read_rgb(path)
    tensor, _, (nh, nw) = resize_pad(image, None, image_size)
    return tensor[:, :nh, :nw].permute(1, 2, 0).numpy(), image.shape[:2]


def superpixel_majority(labels: np.ndarray, image: np.ndarray, scale: float = SUPERPIXEL_SCALE,
                        sigma: float = SUPERPIXEL_SIGMA, min_size: int = SUPERPIXEL_MIN_SIZE) -> np.ndarray:
    """Every Felzenszwalb superpixel of `image` [h, w, 3] takes the majority of the per-pixel `labels` [h, w]."""
    segments = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
    votes = group_majority(segments, labels, int(segments.max()) + 1)
    return votes[segments].astype(np.int16)


def refine_labels(grid_labels: np.ndarray, image: np.ndarray, scale: float = SUPERPIXEL_SCALE,
                  sigma: float = SUPERPIXEL_SIGMA, min_size: int = SUPERPIXEL_MIN_SIZE) -> np.ndarray:
    """int16 [h, w] refined labels of one image from its valid grid labels [gh, gw] (no padding) and the
    embedded view [h, w, 3]: labels upsampled nearest to (h, w), then the superpixel majority vote."""
    grid_labels = np.asarray(grid_labels)
    if grid_labels.size == 0 or grid_labels.min() < 0:
        raise ValueError("refine_labels needs the valid (unpadded, non-negative) part of a label grid")
    height, width = image.shape[:2]
    if height < grid_labels.shape[0] or width < grid_labels.shape[1]:
        raise ValueError(f"image of {height}x{width} pixels is smaller than its label grid {grid_labels.shape}")
    fine = resize_nearest(grid_labels, (height, width))
    return superpixel_majority(fine, image, scale, sigma, min_size)


def cell_of_pixel(fine_shape: tuple[int, int], grid_shape: tuple[int, int]) -> np.ndarray:
    """int64 [h, w] grid cell (row * gw + col) each pixel came from under resize_nearest (grid -> fine)."""
    (height, width), (gh, gw) = fine_shape, grid_shape
    rows = np.minimum((np.arange(height) * gh) // height, gh - 1)
    cols = np.minimum((np.arange(width) * gw) // width, gw - 1)
    return rows[:, None] * gw + cols[None, :]


def grid_majority(fine_labels: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """int16 [gh, gw] grid labels from refined [h, w] labels: each cell's most frequent label (ties -> lowest).

    A cell's pixels are those resize_nearest maps it to (stride x stride blocks when h = gh * stride),
    so a cell's label is held by at least one of its pixels: every region found on the grid has a
    non-empty refined mask.
    """
    fine_labels = np.asarray(fine_labels)
    if fine_labels.shape[0] < grid_shape[0] or fine_labels.shape[1] < grid_shape[1]:
        raise ValueError(f"refined labels {fine_labels.shape} are smaller than the grid {tuple(grid_shape)}")
    cells = cell_of_pixel(fine_labels.shape, grid_shape)
    return group_majority(cells, fine_labels, grid_shape[0] * grid_shape[1]).reshape(grid_shape).astype(np.int16)
