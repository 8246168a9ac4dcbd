"""Your own labelled images as a benchmark: class-id PNG masks, your class names, your fold split."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from umtfss.data.base import FOLDS, SegmentationDataset, existing_root, resolve_under
from umtfss.data.folder import scan_image_folder
from umtfss.io import IMAGE_SUFFIXES

KEY = "datasets.custom"
MAX_CLASSES = 254  # mask values 1..254: 0 is background, 255 ignore


def custom_folds(cfg: dict) -> list[list[int]]:
    """The fold split of `datasets.custom`: its `folds`, checked, or the classes cut into 4 contiguous groups.

    Raises a ValueError naming the key when the classes or the folds cannot make a split.
    """
    names = cfg.get("classes") or []
    if not names:
        raise ValueError(f"config key '{KEY}.classes' is empty; expected the names of the mask values 1..C "
                         "(0 is background, 255 ignore)")
    blank = [i for i, name in enumerate(names) if not str(name).strip()]
    if blank:
        raise ValueError(f"config key '{KEY}.classes[{blank[0]}]' is blank; expected a class name")
    stripped = [str(n).strip() for n in names]
    repeated = sorted({n for n in stripped if stripped.count(n) > 1})
    if repeated:
        raise ValueError(f"config key '{KEY}.classes' names {repeated} more than once; expected one name per class")
    count = len(names)
    if count > MAX_CLASSES:
        raise ValueError(f"config key '{KEY}.classes' names {count} classes; expected at most {MAX_CLASSES}, the mask "
                         f"values 1..{MAX_CLASSES} of an 8-bit PNG (0 is background, 255 ignore)")
    folds = cfg.get("folds")
    if folds is None:
        if count < FOLDS:
            raise ValueError(f"config key '{KEY}.classes' names {count} classes, too few to cut into {FOLDS} folds; "
                             f"set '{KEY}.folds', e.g. [[1], [2]] for two folds of one class each")
        return [[int(c) for c in group] for group in np.array_split(np.arange(1, count + 1), FOLDS)]
    seen: dict[int, int] = {}
    for f, fold in enumerate(folds):
        for c in fold:
            if not 1 <= c <= count:
                raise ValueError(f"config key '{KEY}.folds[{f}]' holds class {c}, but '{KEY}.classes' names {count} "
                                 f"classes; expected class ids 1..{count}")
            if c in seen:
                raise ValueError(f"config key '{KEY}.folds' puts class {c} in folds {seen[c]} and {f}; expected each "
                                 "class in one fold")
            seen[c] = f
    return [[int(c) for c in fold] for fold in folds]


def read_custom_list(path: Path, key: str) -> list[str]:
    """Image ids from a list file: one per line, a path relative to image_dir with or without its suffix.

    The whole line is the id (file names hold spaces), less the spaces around it; blank lines and
    lines starting with '#' are skipped; a repeated id keeps its first place. A byte-order mark (Windows
    editors write one) is dropped.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image list '{path}' does not exist (config key {key})")
    ids, seen = [], set()
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        image_id = line.strip()
        if not image_id or image_id.startswith("#"):
            continue
        if Path(image_id).suffix.lower() in IMAGE_SUFFIXES:
            image_id = Path(image_id).with_suffix("").as_posix()
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    if not ids:
        raise ValueError(f"image list '{path}' (config key {key}) holds no image id; expected one per line")
    return ids


def _why_missing(image_id: str, paths: dict[str, Path]) -> str:
    """A hint for a list id no image file has, when the likely cause is visible in the id itself."""
    if "\\" in image_id:
        return "; list ids separate folders with '/', not '\\'"
    suffix = Path(image_id).suffix.lower()
    if suffix and 2 <= len(suffix) <= 5 and suffix[1:].isalpha():
        candidate = Path(image_id).with_suffix("").as_posix()
        if candidate not in paths:
            return (f"; if '{suffix}' is its suffix: umtfss reads "
                    f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images")
    same = [key for key in paths if unicodedata.normalize("NFC", key) == unicodedata.normalize("NFC", image_id)]
    if same:
        return (f"; the file '{paths[same[0]]}' has this name in other Unicode code points (macOS writes accented "
                "letters decomposed): rename the file or retype the list entry")
    return ""


class CustomDataset(SegmentationDataset):
    """Reads `root/<image_dir>/<id>.<jpg|png|...>` and `root/<label_dir>/<id>.png`; splits from the two lists."""

    name = "custom"
    config_key = KEY

    def __init__(self, cfg: dict):
        if not cfg.get("root"):
            raise ValueError(f"config key '{KEY}.root' is null; expected the folder holding your images, masks and "
                             "lists (README 'Your own labelled images')")
        self.cfg = cfg
        self.root = existing_root(cfg["root"], f"{KEY}.root")
        self.image_dir = resolve_under(self.root, cfg["image_dir"])
        self.label_dir = resolve_under(self.root, cfg["label_dir"])
        if self.image_dir.resolve() == self.label_dir.resolve():
            raise ValueError(f"config keys '{KEY}.image_dir' and '{KEY}.label_dir' name the same folder "
                             f"'{self.image_dir}'; expected the masks in a folder of their own (an id is a file name "
                             "without its suffix, so x.jpg and its mask x.png would share it)")
        self.class_names = [str(n) for n in cfg["classes"]]
        self._folds = custom_folds(cfg)
        self.num_folds = len(self._folds)
        self._image_paths: dict[str, Path] | None = None

    def _fold_class_ids(self, fold: int) -> list[int]:
        return list(self._folds[fold])

    def _list_ids(self, split: str) -> list[str]:
        key = f"{split}_list"
        if self.cfg[key] is None:
            return []
        ids = read_custom_list(resolve_under(self.root, self.cfg[key]), f"{KEY}.{key}")
        if split == "val" and self.cfg["train_list"] is not None:
            both = sorted(set(ids) & set(self.image_ids("train")))
            if both:
                raise ValueError(f"{len(both)} image(s) are in both {KEY}.train_list and {KEY}.val_list, e.g. "
                                 f"'{both[0]}'; expected each image in one split (a test image seen in training "
                                 "inflates the scores)")
        return ids

    def _images(self) -> dict[str, Path]:
        """id -> file of every image below image_dir, listed once (the folder source's scan: hidden files
        skipped, links followed, two files of one id an error)."""
        if self._image_paths is None:
            self._image_paths = scan_image_folder(self.image_dir, f"{KEY}.image_dir")
        return self._image_paths

    def image_path(self, image_id: str, split: str) -> Path:
        """The one image file of the id, whatever its suffix (jpg, png, tif, bmp; any case)."""
        self.check_split(split)
        paths = self._images()
        if image_id not in paths:
            raise FileNotFoundError(f"image '{image_id}' of {KEY}.{split}_list has no file "
                                    f"'{self.image_dir / image_id}.jpg' (or .png, .tif, .bmp) (config key {KEY}.image_dir)"
                                    f"{_why_missing(image_id, paths)}")
        return paths[image_id]

    def label_path(self, image_id: str, split: str) -> Path:
        """`<label_dir>/<id>.png`, or `<id>.PNG` where only that exists (as some Windows tools name them)."""
        self.check_split(split)
        if not self.label_dir.is_dir():  # one error for the folder, not one per image
            state = "is not a folder" if self.label_dir.exists() else "does not exist"
            raise FileNotFoundError(f"mask folder '{self.label_dir}' {state} (config key {KEY}.label_dir); expected "
                                    "<id>.png class-index masks of the listed images")
        path = self.label_dir / f"{image_id}.png"
        upper = self.label_dir / f"{image_id}.PNG"
        return upper if not path.is_file() and upper.is_file() else path
