"""`umtfss predict`: segment a query image from K support images and masks with a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from umtfss.episode import IGNORE
from umtfss.transforms import resize_pad, unpad_to


def read_support_mask(path: str | Path) -> np.ndarray:
    """A support mask as uint8 0/1/255: nonzero = foreground, 255 = ignore.

    A 0/255 mask (its only nonzero value is 255, e.g. one written by `umtfss predict`) counts as
    0/1: its 255 is foreground, not ignore. RGB(A) masks are reduced by their brightest channel.
    """
    from umtfss.io import ImageReadError, read_label, read_rgb

    try:
        values = read_label(path)
    except ImageReadError:
        values = read_rgb(path).max(axis=2)  # colour-coded masks: any lit channel is foreground
    nonzero = values[values > 0]
    if nonzero.size and np.all(nonzero == IGNORE):
        return (values > 0).astype(np.uint8)
    mask = ((values > 0) & (values != IGNORE)).astype(np.uint8)
    mask[values == IGNORE] = IGNORE
    return mask


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    return path


def load_supports(pairs: list[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) per --support pair; each mask must have its image's size and some foreground."""
    from umtfss.io import read_rgb

    supports = []
    for image_path, mask_path in pairs:
        image = read_rgb(_check_file(Path(image_path), "support image"))
        mask = read_support_mask(_check_file(Path(mask_path), "support mask"))
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"support mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"'{image_path}' is {image.shape[1]}x{image.shape[0]}; they must have the same size"
            )
        if not (mask == 1).any():
            raise ValueError(f"support mask '{mask_path}' has no foreground pixel (nonzero, not 255)")
        supports.append((image, mask))
    return supports


@torch.no_grad()
def predict_mask(model, query: np.ndarray, supports: list[tuple[np.ndarray, np.ndarray]], size: int,
                 device="cpu") -> np.ndarray:
    """Foreground 0/1 uint8 mask at the query's own size (resize longer side to `size`, pad, unpad back)."""
    query_t, _, valid = resize_pad(query, None, size)
    images, masks = [], []
    for image, mask in supports:
        image_t, mask_t, _ = resize_pad(image, mask, size)
        images.append(image_t)
        masks.append((mask_t == 1).float())
    logits = model(query_t[None].to(device), torch.stack(images)[None].to(device), torch.stack(masks)[None].to(device))
    logits = logits.float()
    if logits.shape[-2:] != (size, size):
        logits = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    full = unpad_to(logits[0].cpu(), valid, query.shape[:2])
    return full.argmax(0).numpy().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the foreground tinted red (for a quick look)."""
    tinted = image.astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    tinted[mask == 1] = (1 - alpha) * tinted[mask == 1] + alpha * red
    return tinted.round().clip(0, 255).astype(np.uint8)


def cli(parser: argparse.ArgumentParser):
    """Arguments of `umtfss predict`."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by umtfss train")
    parser.add_argument("--support", required=True, action="append", nargs=2, metavar=("IMAGE", "MASK"),
                        help="a support image and its mask PNG (nonzero = foreground); repeat for K shots")
    parser.add_argument("--query", required=True, type=Path, help="image to segment")
    parser.add_argument("--out", required=True, type=Path, help="output mask PNG (0/255, the query's size)")
    parser.add_argument("--size", type=int, help="test size (default: evaluation.test_size of the checkpoint's config)")
    parser.add_argument("--overlay", type=Path, help="also write the query with the mask tinted red")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return run


def run(args: argparse.Namespace) -> Path:
    from umtfss.io import read_rgb, write_png
    from umtfss.training.checkpoint import load, load_model
    from umtfss.devices import resolve_device

    checkpoint = _check_file(args.checkpoint, "checkpoint")
    query = read_rgb(_check_file(args.query, "query image"))
    supports = load_supports(args.support)
    size = args.size or int(load(checkpoint)["config"]["evaluation"]["test_size"])
    if size < 32:
        raise ValueError(f"--size is {size}, expected at least 32")
    device = resolve_device(args.device, "--device")
    model = load_model(checkpoint, device)
    mask = predict_mask(model, query, supports, size, device)
    write_png(args.out, (mask * 255).astype(np.uint8))
    if args.overlay is not None:
        write_png(args.overlay, overlay(query, mask))
    return args.out
