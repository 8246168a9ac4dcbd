"""Test images that are also unlabeled training images (the same file, a link to it, or a byte-identical copy)."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from umtfss.io import atomic_path

HEAD_BYTES = 1 << 14  # files of one size are told apart by their first 16 KiB before any is read whole


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
    links) or two files with the same bytes. Only files of a size that both sets hold are read: first
    their heads, indexed, then whole where the heads agree; each file at most once."""
    by_inode: dict[tuple[int, int], Path] = {}
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in map(Path, unlabeled):
        stat = path.stat()
        by_inode.setdefault((stat.st_dev, stat.st_ino), path)
        by_size[stat.st_size].append(path)
    by_head: dict[int, dict[str, list[Path]]] = {}  # size -> head digest -> files, built on first use
    wholes: dict[Path, str] = {}

    def whole(path: Path) -> str:
        if path not in wholes:
            wholes[path] = _digest(path, None)
        return wholes[path]

    pairs = []
    for path in map(Path, test):
        stat = path.stat()
        same = by_inode.get((stat.st_dev, stat.st_ino))
        if same is None and stat.st_size in by_size:
            if stat.st_size not in by_head:
                heads: dict[str, list[Path]] = defaultdict(list)
                for other in by_size[stat.st_size]:
                    heads[_digest(other, HEAD_BYTES)].append(other)
                by_head[stat.st_size] = heads
            candidates = by_head[stat.st_size].get(_digest(path, HEAD_BYTES), [])
            same = next((other for other in candidates if whole(other) == whole(path)), None)
        if same is not None:
            pairs.append((path, same))
    return pairs


def files_state(paths: Iterable[Path]) -> str:
    """sha256 of the files' paths, sizes and modification times: it changes when a file is added, removed
    or rewritten."""
    digest = hashlib.sha256()
    for path in sorted(map(str, paths)):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def check_test_images_unseen(config: dict, dataset: str, unlabeled: Iterable[Path] | None = None,
                             memo: Path | None = None) -> None:
    """Stop when a test image of `dataset` (its val split) is in the unlabeled folder: meta-training on
    pseudo tasks of that folder would see it, unlabelled, and the scores would be transductive.

    Checked for a folder source only (a benchmark source uses its train split, disjoint from val). A
    test list that does not exist yet (before the demo is generated or SBD converted) is not checked.
    `unlabeled`: the folder's image files, when the caller has scanned it already. `memo`: a file that
    records the state of both file sets once they passed, so that an unchanged pair is not compared again
    (a folder of uncompressed images of one size has every file's head read).
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
    unlabeled = list(scan_image_folder(unl["folder"]).values() if unlabeled is None else unlabeled)
    state = f"{dataset} {files_state(test)} {files_state(unlabeled)}"
    if memo is not None and memo.is_file() and memo.read_text(encoding="utf-8").strip() == state:
        return
    pairs = shared_images(test, unlabeled)
    if pairs:
        key = "datasets.coco.val_image_dir" if dataset == "coco" else f"datasets.{dataset}.val_list"
        fix = (", or set unlabeled.source to custom (the pseudo tasks then come from its train_list only)"
               if dataset == "custom" else "")
        raise ValueError(f"{len(pairs)} of the {len(test)} test images of {dataset} ({key}) are also in unlabeled.folder "
                         f"'{unl['folder']}', e.g. '{pairs[0][0]}' as '{pairs[0][1]}': meta-training would see the "
                         f"test images (unlabelled, but seen) and inflate the scores; move them out of the folder{fix}")
    if memo is not None:
        with atomic_path(memo) as tmp:
            tmp.write_text(state + "\n", encoding="utf-8")
