"""The one interface every data set reader implements, and `open_dataset` to pick a reader by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umtfss import io

FOLDS = 4


class SegmentationDataset:
    """Images (and, for benchmarks, class masks) by split and id; the fold split of the classes.

    Subclasses set `name`, `class_names`, `splits` and implement `image_ids`, `image_path`,
    `label_path` and `_fold_class_ids`. Ids are strings; class ids are 1-based (0 is background,
    255 ignore), so `class_names[c - 1]` names class c.
    """

    name: str = ""
    class_names: list[str] = []
    splits: tuple[str, ...] = ("train", "val")
    config_key: str = ""  # "datasets.pascal", ...: named in error messages
    num_folds: int = FOLDS

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- folds

    def fold_classes(self, fold: int) -> list[int]:
        """1-based ids of the fold's novel classes."""
        if not self.class_names:
            raise ValueError(f"data set '{self.name}' has no classes, so no folds")
        if not isinstance(fold, (int, np.integer)) or not 0 <= fold < self.num_folds:
            raise ValueError(f"fold {fold} does not exist in data set '{self.name}'; expected 0..{self.num_folds - 1}")
        return self._fold_class_ids(int(fold))

    def _fold_class_ids(self, fold: int) -> list[int]:
        raise NotImplementedError

    def base_classes(self, fold: int) -> list[int]:
        """Every class that is not novel in the fold (what supervised meta-training may see)."""
        novel = set(self.fold_classes(fold))
        return [c for c in range(1, self.num_classes + 1) if c not in novel]

    def fold_of_class(self, class_id: int) -> int:
        for fold in range(self.num_folds):
            if class_id in self.fold_classes(fold):
                return fold
        raise ValueError(f"class {class_id} is not a class of data set '{self.name}' (1..{self.num_classes})")

    # ---- files

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split '{split}' does not exist in data set '{self.name}'; expected one of {list(self.splits)}")

    def image_ids(self, split: str) -> list[str]:
        """Ids of a split, in the data set's order; listed once, then cached."""
        self.check_split(split)
        cache = self.__dict__.setdefault("_id_cache", {})
        if split not in cache:
            cache[split] = self._list_ids(split)
        return list(cache[split])

    def _list_ids(self, split: str) -> list[str]:
        raise NotImplementedError

    def image_path(self, image_id: str, split: str) -> Path:
        raise NotImplementedError

    def label_path(self, image_id: str, split: str) -> Path | None:
        raise NotImplementedError

    def read_image(self, image_id: str, split: str) -> np.ndarray:
        """uint8 HxWx3 RGB, whatever the file's mode."""
        return io.read_rgb(self._existing(self.image_path(image_id, split), self.dir_key(split, "image")))

    def read_label(self, image_id: str, split: str) -> np.ndarray:
        """uint8 HxW: 0 background, 1..C classes, 255 ignore."""
        path = self.label_path(image_id, split)
        if path is None:
            raise ValueError(f"data set '{self.name}' has no labels (image '{image_id}')")
        return io.read_label(self._existing(path, self.dir_key(split, "label")))

    def dir_key(self, split: str, kind: str) -> str:
        """The config key of the folder holding a split's images or labels (for error messages)."""
        return f"{self.config_key}.{kind}_dir"

    def _existing(self, path: Path, key: str) -> Path:
        """The path, or a FileNotFoundError naming it and the config key that points at its folder."""
        if not path.is_file():
            raise FileNotFoundError(f"file '{path}' does not exist (looked up through {key})")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, classes={self.num_classes})"


def open_dataset(name: str, config: dict) -> SegmentationDataset:
    """The reader for `name` in {pascal, coco, custom, folder}, configured from a loaded (validated) config."""
    if name == "pascal":
        from umtfss.data.pascal import PascalDataset

        return PascalDataset(config["datasets"]["pascal"])
    if name == "coco":
        from umtfss.data.coco import CocoDataset

        return CocoDataset(config["datasets"]["coco"])
    if name == "custom":
        from umtfss.data.custom import CustomDataset

        return CustomDataset(config["datasets"]["custom"])
    if name == "folder":
        from umtfss.data.folder import FolderDataset

        return FolderDataset(config["unlabeled"])
    raise ValueError(f"unknown data set '{name}'; expected one of pascal, coco, custom, folder")


def resolve_under(root: Path, value: str) -> Path:
    """A config path relative to the data set root, unless absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def existing_root(value: str, key: str) -> Path:
    root = Path(value).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data set root '{root}' does not exist or is not a folder (config key {key})")
    return root
