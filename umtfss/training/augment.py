"""Training augmentation (PFENet style): random scale, rotation, flip, then pad and random crop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from umtfss.episode import IGNORE
from umtfss.transforms import to_tensor


@dataclass(frozen=True)
class Augmentation:
    """Parameters of the training transform; `from_config` reads them from config['training']."""

    crop_size: int
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotation: float = 10.0
    flip: bool = True

    @classmethod
    def from_config(cls, training_cfg: dict) -> "Augmentation":
        return cls(
            crop_size=int(training_cfg["crop_size"]),
            scale_min=float(training_cfg["scale_min"]),
            scale_max=float(training_cfg["scale_max"]),
            rotation=float(training_cfg["rotation"]),
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """uint8 HxWx3 image + uint8 HxW mask -> (float 3xSxS in [0,1], long SxS with 255 outside)."""
        return augment_pair(image, mask, rng, self)


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, aug: Augmentation):
    """Apply scale, rotation, flip, pad and crop with parameters drawn from `rng` (same for both)."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    img = to_tensor(image)
    msk = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.uint8)[None]
    img, msk = _random_scale(img, msk, rng, aug.scale_min, aug.scale_max)
    img, msk = _random_rotate(img, msk, rng, aug.rotation)
    if aug.flip and rng.random() < 0.5:
        img, msk = img.flip(-1), msk.flip(-1)
    img, msk = _pad_to(img, msk, aug.crop_size)
    img, msk = _random_crop(img, msk, rng, aug.crop_size)
    return img.contiguous(), msk[0].long().contiguous()


def _random_scale(img, msk, rng, scale_min, scale_max):
    scale = float(rng.uniform(scale_min, scale_max)) if scale_max > scale_min else float(scale_min)
    h, w = img.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return img, msk
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    msk = F.interpolate(msk[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
    return img, msk


def _random_rotate(img, msk, rng, max_degrees):
    """Rotate about the centre keeping the size; pixels from outside become 0 (image) and 255 (mask)."""
    if max_degrees <= 0:
        return img, msk
    angle = float(rng.uniform(-max_degrees, max_degrees))
    img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    msk = TF.rotate(msk, angle, interpolation=InterpolationMode.NEAREST, fill=IGNORE)
    return img, msk


def _pad_to(img, msk, size):
    """Pad evenly on both sides up to size x size: image with 0, mask with 255."""
    h, w = img.shape[-2:]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if not (pad_h or pad_w):
        return img, msk
    borders = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    img = F.pad(img, borders, value=0.0)
    msk = F.pad(msk, borders, value=IGNORE)
    return img, msk


def _random_crop(img, msk, rng, size):
    h, w = img.shape[-2:]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img[:, top : top + size, left : left + size], msk[:, top : top + size, left : left + size]
