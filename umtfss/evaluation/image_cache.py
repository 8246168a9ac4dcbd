"""Test images decoded and brought to test size once per meta-test, reused by every episode, shot and method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from umtfss.evaluation.bounded_store import BoundedStore
from umtfss.transforms import resize_pad, resize_square


@dataclass(frozen=True)
class PreparedImage:
    """One test image as every episode needs it, whatever class the episode is about.

    image: float 3xSxS at test size; extent: its valid (h, w) on the canvas; label: uint8 class ids at
    the original size (the 'original' resolution scores against it); label_at_test_size: uint8 SxS
    class ids, padding = 255. An episode's mask is binary_mask of a label: that commutes with the
    nearest-neighbour resize, so one resize per image serves every class.
    """

    image: torch.Tensor
    extent: tuple[int, int]
    label: np.ndarray
    label_at_test_size: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.image.numel() * self.image.element_size() + self.label.nbytes + self.label_at_test_size.nbytes


def to_test_size(image: np.ndarray, label: np.ndarray, test_size: int, resolution: str,
                 geometry: str = "exact") -> PreparedImage:
    """The image resized and padded (resolution 'original', geometry as configured) or squared ('resized')."""
    if resolution == "original":
        tensor, resized, extent = resize_pad(image, label, test_size, geometry)  # padding = IGNORE (255)
    else:
        tensor, resized, extent = resize_square(image, label, test_size)
    return PreparedImage(tensor, extent, label, resized.numpy().astype(np.uint8))


class ImageCache(BoundedStore):
    """The test images of one evaluate run, least recently used dropped first once `max_mb` is full.

    The meta-test decodes a test image for every episode it is in, as query or support, for every
    method and shot (the demo's fold 0: 9,600 slots over 76 images); with this store, once.
    Valid for one test size, resolution and geometry (one evaluate call).
    """

    def __init__(self, max_mb: float):
        super().__init__(max_mb, "evaluation.image_cache_mb")

    def summary(self) -> str:
        return super().summary("test-image cache", "image decodes")
