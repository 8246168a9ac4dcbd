"""Small generated data set trees (VOC and COCO layouts) for tests; fast, seeded, no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Side of the large object: 46*46 = 2,116 >= 2,048 pixels (present); the small one, 10*10 = 100, is not.
LARGE_SIDE = 46
SMALL_SIDE = 10


def _draw_objects(size: int, class_ids: tuple[int, int], rng: np.random.Generator):
    """An RGB image and its class mask: one large and one small rectangle, 255 band around the large one."""
    if size < LARGE_SIDE + 4:
        raise ValueError(f"size {size} is too small, expected >= {LARGE_SIDE + 4}")
    image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    large, small = class_ids
    top, left = (int(v) for v in rng.integers(1, size - LARGE_SIDE, size=2))
    label[top - 1:top + LARGE_SIDE + 1, left - 1:left + LARGE_SIDE + 1] = 255
    label[top:top + LARGE_SIDE, left:left + LARGE_SIDE] = large
    image[top:top + LARGE_SIDE, left:left + LARGE_SIDE] = (40 * large) % 256
    free = np.argwhere(label[: size - SMALL_SIDE, : size - SMALL_SIDE] == 0)
    row, col = free[rng.integers(len(free))]
    patch = label[row:row + SMALL_SIDE, col:col + SMALL_SIDE]
    patch[patch == 0] = small
    image[row:row + SMALL_SIDE, col:col + SMALL_SIDE][patch == small] = (70 * small) % 256
    return image, label


def make_voc_tree(root, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A PASCAL VOC2012-like root: JPEGImages/, SegmentationClassAug/, lists/train_aug.txt, lists/val.txt.

    Each image holds a large object (>= 2,048 px, 255 border) of one class and a small one (100 px)
    of another, classes drawn from 1..20. Ids look like VOC's ('2008_000001').
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    lists = {"train_aug": [], "val": []}
    for index in range(n_train + n_val):
        split = "train_aug" if index < n_train else "val"
        image_id = f"{2008 + index % 4}_{index:06d}"
        classes = tuple(int(c) for c in rng.choice(np.arange(1, 21), size=2, replace=False))
        image, label = _draw_objects(size, classes, rng)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
        lists[split].append(image_id)
    for name, ids in lists.items():
        (root / "lists" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_coco_tree(root, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A COCO2014-like root: train2014/, val2014/ (jpg) and annotations/{train,val}2014/ class-mask PNGs.

    Class ids 1..80; each image has a large (present) and a small (not present) object.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for index in range(n_train + n_val):
        split = "train" if index < n_train else "val"
        stem = f"COCO_{split}2014_{index:012d}"
        image_dir, label_dir = root / f"{split}2014", root / "annotations" / f"{split}2014"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        classes = tuple(int(c) for c in rng.choice(np.arange(1, 81), size=2, replace=False))
        image, label = _draw_objects(size, classes, rng)
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=90)
        Image.fromarray(label).save(label_dir / f"{stem}.png")
    return root


def make_custom_tree(root, n_train: int = 8, n_val: int = 4, size: int = 64, classes: int = 4, seed: int = 0) -> Path:
    """A user's labelled folder: images/<group>/<id>.png (and one .JPG), masks/<group>/<id>.png, train.txt, val.txt.

    Ids sit in two subfolders ('a/img00', 'b/img01', ...); the val list gives ids with their suffix and a
    comment line. Image i holds a large (present) object of class 1 + i % classes and a small (not present) one.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    lists = {"train": [], "val": []}
    for index in range(n_train + n_val):
        split = "train" if index < n_train else "val"
        image_id = f"{'ab'[index % 2]}/img{index:02d}"
        suffix = ".JPG" if index == 1 else ".png"
        for folder in ("images", "masks"):
            (root / folder / image_id).parent.mkdir(parents=True, exist_ok=True)
        large = 1 + index % classes  # so that every run of `classes` images holds each class once, present
        pair = (large, int(rng.choice([c for c in range(1, classes + 1) if c != large])))
        image, label = _draw_objects(size, pair, rng)
        Image.fromarray(image).save(root / "images" / f"{image_id}{suffix}", format="JPEG" if suffix == ".JPG" else None)
        Image.fromarray(label).save(root / "masks" / f"{image_id}.png")
        lists[split].append(image_id if split == "train" else f"{image_id}{suffix}")
    (root / "train.txt").write_text("".join(f"{i}\n" for i in lists["train"]))
    (root / "val.txt").write_text("# test images\n" + "".join(f"{i}\n" for i in lists["val"]))
    return root


def write_instances_json(path, images: list[dict], annotations: list[dict], category_ids: list[int]) -> Path:
    """A minimal COCO instances JSON (images, annotations, categories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    categories = [{"id": c, "name": f"category-{c}", "supercategory": "thing"} for c in category_ids]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
