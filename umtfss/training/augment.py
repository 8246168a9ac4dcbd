"""Training augmentation (PFENet style): random scale, rotation, Gaussian blur, flip, then pad and a random crop that keeps the object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from umtfss.episode import IGNORE
from umtfss.transforms import to_tensor


# Padding of rotated / scaled-down training images: the ImageNet mean (reference code; 0 after the
# backbone's normalisation) or black.
PAD_FILLS = {"mean": (0.485, 0.456, 0.406), "zero": (0.0, 0.0, 0.0)}
BLUR_KERNEL, BLUR_SIGMA = 5, 1.1  # the reference's cv2.GaussianBlur((5, 5), 0): sigma 0.3*((5-1)/2-1)+0.8


@dataclass(frozen=True)
class Augmentation:
    """Parameters of the training transform; `from_config` reads them from config['training']."""

    crop_size: int
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotation: float = 10.0
    rotation_p: float = 0.5
    flip: bool = True
    blur: bool = True
    pad_fill: str = "mean"
    crop_foreground: float = 0.85
    crop_redraws: int = 31

    @classmethod
    def from_config(cls, training_cfg: dict) -> "Augmentation":
        return cls(
            crop_size=int(training_cfg["crop_size"]),
            scale_min=float(training_cfg["scale_min"]),
            scale_max=float(training_cfg["scale_max"]),
            rotation=float(training_cfg["rotation"]),
            rotation_p=float(training_cfg["rotation_p"]),
            flip=bool(training_cfg["flip"]),
            blur=bool(training_cfg["blur"]),
            pad_fill=str(training_cfg["pad_fill"]),
            crop_foreground=float(training_cfg["crop_foreground"]),
            crop_redraws=int(training_cfg["crop_redraws"]),
        )

    def __post_init__(self):
        if self.pad_fill not in PAD_FILLS:
            raise ValueError(f"config key 'training.pad_fill' is '{self.pad_fill}', expected one of {', '.join(PAD_FILLS)}")

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """uint8 HxWx3 image + uint8 HxW mask -> (float 3xSxS in [0,1], long SxS with 255 outside,
        bool SxS valid: True where the pixel comes from the image)."""
        return augment_pair(image, mask, rng, self)


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, aug: Augmentation):
    """Apply scale, rotation, flip, pad and crop with parameters drawn from `rng` (same for both).

    Returns (image, mask, valid). `valid` marks the pixels that come from the image, so that the
    model is told only where the padding is, as at test time; the mask's own 255 pixels (VOC's
    boundary band) stay valid input: they are the answer, not a property of the image.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    img = to_tensor(image)
    label = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.uint8)
    msk = torch.stack([label, torch.ones_like(label)])  # channel 1: 1 on image pixels, 0 on fill
    fill = PAD_FILLS[aug.pad_fill]
    img, msk = _random_scale(img, msk, rng, aug.scale_min, aug.scale_max)
    if aug.rotation_p >= 1 or rng.random() < aug.rotation_p:  # p 1 draws nothing: the stream of before the key
        img, msk = _random_rotate(img, msk, rng, aug.rotation, fill)
    if aug.blur and rng.random() < 0.5:
        img = TF.gaussian_blur(img, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[BLUR_SIGMA, BLUR_SIGMA])
    if aug.flip and rng.random() < 0.5:
        img, msk = img.flip(-1), msk.flip(-1)
    img, msk = _pad_to(img, msk, aug.crop_size, fill)
    img, msk = _random_crop(img, msk, rng, aug.crop_size, aug.crop_foreground, aug.crop_redraws)
    return img.contiguous(), msk[0].long().contiguous(), msk[1].bool().contiguous()


def _random_scale(img, msk, rng, scale_min, scale_max):
    scale = float(rng.uniform(scale_min, scale_max)) if scale_max > scale_min else float(scale_min)
    h, w = img.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return img, msk
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    msk = F.interpolate(msk[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
    return img, msk


def _random_rotate(img, msk, rng, max_degrees, fill=(0.0, 0.0, 0.0)):
    """Rotate about the centre keeping the size; pixels from outside become `fill` (image), 255 (mask)
    and 0 (validity)."""
    if max_degrees <= 0:
        return img, msk
    angle = float(rng.uniform(-max_degrees, max_degrees))
    img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=list(fill))
    msk = TF.rotate(msk, angle, interpolation=InterpolationMode.NEAREST, fill=[IGNORE, 0])
    return img, msk


def _pad_to(img, msk, size, fill=(0.0, 0.0, 0.0)):
    """Pad evenly on both sides up to size x size: image with `fill` per channel, mask with 255,
    validity with 0."""
    h, w = img.shape[-2:]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if not (pad_h or pad_w):
        return img, msk
    borders = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    img = torch.stack([F.pad(channel, borders, value=float(v)) for channel, v in zip(img, fill)])
    msk = torch.stack([F.pad(msk[0], borders, value=IGNORE), F.pad(msk[1], borders, value=0)])
    return img, msk


def _random_crop(img, msk, rng, size, keep_foreground: float = 0.0, redraws: int = 0):
    """A random size x size window; while it holds less than `keep_foreground` of the mask's foreground
    (label 1) pixels, drawn again, at most `redraws` times (the reference's Crop: 0.85, while crop_cnt <= 30,
    the last draw kept), so that a crop rarely cuts the episode's object away."""
    h, w = img.shape[-2:]

    def window():
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        return slice(top, top + size), slice(left, left + size)

    rows, cols = window()
    if keep_foreground > 0 and (h > size or w > size):
        foreground = msk[0] == 1
        total = int(foreground.sum())
        for _ in range(redraws):
            if int(foreground[rows, cols].sum()) >= keep_foreground * total:
                break
            rows, cols = window()
    return img[:, rows, cols], msk[:, rows, cols]
