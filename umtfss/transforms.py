"""Shared image geometry: the test-time resize-and-pad, and tensors from uint8 arrays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from umtfss.episode import IGNORE


def uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 array -> a tensor sharing or copying its memory (PIL-backed arrays are read-only; torch
    wants writable memory)."""
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 HxWx3 tensor -> float 3xHxW in [0, 1], on the tensor's device."""
    return image.permute(2, 0, 1).float().div_(255.0)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [0, 1] (backbones normalise themselves)."""
    return _unit_float(uint8_tensor(image))


def resized_extent(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of an image after resize_pad's resize (longer side -> size), before padding."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_pad_image(image: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 HxWx3 tensor, on any device -> (float 3xSxS in [0, 1], (h, w) valid extent): the image part of
    resize_pad, so that decoded images can travel as uint8 and be resized where the model runs."""
    h, w = image.shape[:2]
    nh, nw = resized_extent(h, w, size)
    img = _unit_float(image)[None]
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    out = img.new_zeros(3, size, size)
    out[:, :nh, :nw] = img
    return out, (nh, nw)


def resize_pad(image: np.ndarray, mask: np.ndarray | None, size: int):
    """Resize so the longer side is `size`, pad bottom/right to size x size (PFENet's test transform).

    Returns (image 3xSxS float, mask SxS long with padding = IGNORE or None, (h, w) valid extent).
    """
    out, (nh, nw) = resize_pad_image(uint8_tensor(image), size)
    m = None
    if mask is not None:
        mt = torch.from_numpy(np.ascontiguousarray(mask)).long()[None, None].float()
        mt = F.interpolate(mt, size=(nh, nw), mode="nearest")[0, 0].long()
        m = torch.full((size, size), IGNORE, dtype=torch.long)
        m[:nh, :nw] = mt
    return out, m, (nh, nw)


def valid_pixels(extents: list[tuple[int, int]], size: int) -> torch.Tensor:
    """[B, size, size] bool: True on the image part (top-left h x w) of each resize_pad canvas, False on padding."""
    valid = torch.zeros(len(extents), size, size, dtype=torch.bool)
    for row, (h, w) in enumerate(extents):
        valid[row, :h, :w] = True
    return valid


def resize_square(image: np.ndarray, mask: np.ndarray | None, size: int):
    """Resize to size x size regardless of aspect (HSNet's test transform)."""
    img = F.interpolate(to_tensor(image)[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    m = None
    if mask is not None:
        mt = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        m = F.interpolate(mt, size=(size, size), mode="nearest")[0, 0].long()
    return img, m, (size, size)


def unpad_to(logits: torch.Tensor, valid_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Crop a padded prediction [C,S,S] to its valid extent and resize it to out_hw (bilinear)."""
    nh, nw = valid_hw
    crop = logits[:, :nh, :nw][None]
    return F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)[0]
