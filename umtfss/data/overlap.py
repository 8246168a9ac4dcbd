"""Test images that are also unlabeled training images (the same file, a link to it, or a byte-identical copy)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable

HEAD_BYTES = 1 << 16  # files of one size are told apart by their first 64 KiB before any is read whole


def _digest(path: Path, limit: int | None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if limit is not None:
            digest.update(handle.read(limit))
        else:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def shared_images(test: Iterable[Path], unlabeled: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(test file, unlabeled file) pairs that hold the same image: one file (also through links or hard
    links) or two files with the same bytes. Only files of equal size are read, first their heads."""
    by_size: dict[int, list[tuple[Path, tuple[int, int]]]] = defaultdict(list)
    for path in map(Path, unlabeled):
        stat = path.stat()
        by_size[stat.st_size].append((path, (stat.st_dev, stat.st_ino)))
    heads: dict[Path, str] = {}
    wholes: dict[Path, str] = {}

    def same_bytes(a: Path, b: Path) -> bool:
        for cache, limit in ((heads, HEAD_BYTES), (wholes, None)):
            for path in (a, b):
                if path not in cache:
                    cache[path] = _digest(path, limit)
            if cache[a] != cache[b]:
                return False
        return True

    pairs = []
    for path in map(Path, test):
        stat = path.stat()
        for other, inode in by_size.get(stat.st_size, ()):
            if inode == (stat.st_dev, stat.st_ino) or same_bytes(path, other):
                pairs.append((path, other))
                break
    return pairs


def check_test_images_unseen(config: dict, dataset: str, unlabeled: Iterable[Path] | None = None) -> None:
    """Stop when a test image of `dataset` (its val split) is in the unlabeled folder: meta-training on
    pseudo tasks of that folder would see it, unlabelled, and the scores would be transductive.

    Checked for a folder source only (a benchmark source uses its train split, disjoint from val). A
    test list that does not exist yet (before the demo is generated or SBD converted) is not checked.
    `unlabeled`: the folder's image files, when the caller has scanned it already.
    """
    from umtfss.data.base import open_dataset
    from umtfss.data.folder import scan_image_folder

    unl = config["unlabeled"]
    if unl["source"] != "folder":
        return
    try:
        reader = open_dataset(dataset, config)
        test = [reader.image_path(i, "val") for i in reader.image_ids("val")]
    except FileNotFoundError:
        return
    test = [path for path in test if path.is_file()]  # a missing image is prepare's error, with its key
    pairs = shared_images(test, scan_image_folder(unl["folder"]).values() if unlabeled is None else unlabeled)
    if pairs:
        key = "datasets.coco.val_image_dir" if dataset == "coco" else f"datasets.{dataset}.val_list"
        fix = (", or set unlabeled.source to custom (the pseudo tasks then come from its train_list only)"
               if dataset == "custom" else "")
        raise ValueError(f"{len(pairs)} of the {len(test)} test images of {dataset} ({key}) are also in unlabeled.folder "
                         f"'{unl['folder']}', e.g. '{pairs[0][0]}' as '{pairs[0][1]}': meta-training would see the "
                         f"test images (unlabelled, but seen) and inflate the scores; move them out of the folder{fix}")
