"""A plain folder of images (searched recursively) as unlabeled training images; no labels, no folds."""

from __future__ import annotations

from pathlib import Path

from umtfss.data.base import SegmentationDataset
from umtfss.io import is_image_path


class FolderDataset(SegmentationDataset):
    """Ids are paths relative to the folder without the suffix ('sub/img'); one split, 'train'."""

    class_names: list[str] = []
    splits = ("train",)
    config_key = "unlabeled"

    def __init__(self, cfg: dict):
        if not cfg.get("folder"):
            raise ValueError("unlabeled.folder is not set; expected the image folder when unlabeled.source is folder")
        self.folder = Path(cfg["folder"]).expanduser()
        self.name = cfg.get("name") or "images"
        self._paths: dict[str, Path] | None = None

    def _scan(self) -> dict[str, Path]:
        if self._paths is None:
            if not self.folder.is_dir():
                raise FileNotFoundError(f"image folder '{self.folder}' does not exist (config key unlabeled.folder)")
            paths: dict[str, Path] = {}
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and is_image_path(p)):
                image_id = path.relative_to(self.folder).with_suffix("").as_posix()
                if image_id in paths:
                    raise ValueError(f"'{paths[image_id]}' and '{path}' have the same name up to the suffix; "
                                     "rename one, ids must be unique")
                paths[image_id] = path
            if not paths:
                raise ValueError(f"image folder '{self.folder}' holds no image (jpg, jpeg, png, tif, tiff, bmp)")
            self._paths = dict(sorted(paths.items()))
        return self._paths

    def _list_ids(self, split: str) -> list[str]:
        return list(self._scan())

    def image_path(self, image_id: str, split: str) -> Path:
        self.check_split(split)
        paths = self._scan()
        if image_id not in paths:
            raise FileNotFoundError(f"image '{image_id}' is not in folder '{self.folder}' (config key unlabeled.folder)")
        return paths[image_id]

    def label_path(self, image_id: str, split: str) -> None:
        self.check_split(split)
        return None

    def read_label(self, image_id: str, split: str):
        raise ValueError(f"data set '{self.name}' is a plain image folder and has no labels")
