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


# Test-time geometry of resize_pad / unpad_to. exact: the longer side becomes `size`, the other is
# rounded, and a prediction's image part is resized back to the label. reference (PFENet / CyCTR /
# UMTFSS test code): both sides are floored to a multiple of 8 (a 500 x 375 image fills 472 x 352 of
# a 473 canvas), and the whole canvas is resized to L x L (L = the label's longer side, bilinear,
# align_corners) and scored against the label padded with ignore, which shifts the prediction by up
# to ~1.5 % of the image against the label, as the published numbers were computed.
GEOMETRIES = ("exact", "reference")


def _check_geometry(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"test geometry '{geometry}' is not allowed; expected one of {', '.join(GEOMETRIES)}")


def resized_extent(height: int, width: int, size: int, geometry: str = "exact") -> tuple[int, int]:
    """(h, w) of an image after resize_pad's resize (longer side -> size), before padding."""
    _check_geometry(geometry)
    scale = size / max(height, width)
    if geometry == "exact":
        return max(1, round(height * scale)), max(1, round(width * scale))
    sides = (size, int(width * scale)) if height >= width else (int(height * scale), size)
    return tuple(side - side % 8 if side >= 8 else max(1, side) for side in sides)


def resize_pad_image(image: torch.Tensor, size: int, geometry: str = "exact") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 HxWx3 tensor, on any device -> (float 3xSxS in [0, 1], (h, w) valid extent): the image part of
    resize_pad, so that decoded images can travel as uint8 and be resized where the model runs."""
    h, w = image.shape[:2]
    nh, nw = resized_extent(h, w, size, geometry)
    img = _unit_float(image)[None]
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    out = img.new_zeros(3, size, size)
    out[:, :nh, :nw] = img
    return out, (nh, nw)


def resize_pad(image: np.ndarray, mask: np.ndarray | None, size: int, geometry: str = "exact"):
    """Resize so the longer side is `size`, pad bottom/right to size x size (PFENet's test transform).

    Returns (image 3xSxS float, mask SxS long with padding = IGNORE or None, (h, w) valid extent).
    """
    out, (nh, nw) = resize_pad_image(uint8_tensor(image), size, geometry)
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


def unpad_to(logits: torch.Tensor, valid_hw: tuple[int, int], out_hw: tuple[int, int],
             geometry: str = "exact") -> torch.Tensor:
    """A padded prediction [C,S,S] at the label's size out_hw (bilinear): its valid extent resized
    (exact), or the whole canvas resized to the longer side's square and cropped (reference)."""
    _check_geometry(geometry)
    if geometry == "reference":
        longer = max(out_hw)
        square = F.interpolate(logits[None], size=(longer, longer), mode="bilinear", align_corners=True)[0]
        return square[:, : out_hw[0], : out_hw[1]]
    nh, nw = valid_hw
    crop = logits[:, :nh, :nw][None]
    return F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)[0]
