"""One few-shot episode: the unit that training, evaluation and every predictor exchange."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255  # label value excluded from losses and scores


@dataclass
class Episode:
    """A query image and K support images with binary masks of one (pseudo) class.

    Images are uint8 HxWx3 RGB at their original size; masks are uint8 HxW with
    1 = the class, 0 = not, 255 = ignore. `class_id` is a benchmark class (1-based) or a cluster id.
    """

    query_image: np.ndarray
    query_mask: np.ndarray
    support_images: list[np.ndarray]
    support_masks: list[np.ndarray]
    class_id: int = -1
    query_id: str = ""
    support_ids: list[str] = field(default_factory=list)

    @property
    def shots(self) -> int:
        return len(self.support_images)


def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """Episode mask of one class from a class-id label: class -> 1, any other class -> 0, 255 stays 255."""
    mask = (label == class_id).astype(np.uint8)
    mask[label == IGNORE] = IGNORE
    return mask
