"""PASCAL-5i: VOC2012 images with SBD-augmented class masks; fold i holds classes 5i+1 .. 5i+5."""

from __future__ import annotations

from pathlib import Path

from umtfss.data.base import SegmentationDataset, existing_root, resolve_under
from umtfss.io import is_image_path

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def read_id_list(path: Path, key: str) -> list[str]:
    """Image ids from a list file: one id per line, or PFENet's 'JPEGImages/x.jpg Seg.../x.png' lines.

    Repeated ids are dropped (the first occurrence keeps its place), blank lines ignored.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image list '{path}' does not exist (config key {key})")
    ids, seen = [], set()
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        first = fields[0]
        image_id = Path(first).stem if "/" in first or is_image_path(first) else first
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


class PascalDataset(SegmentationDataset):
    """Reads `root/<image_dir>/<id>.jpg` and `root/<label_dir>/<id>.png`; the splits come from the lists."""

    name = "pascal"
    class_names = list(PASCAL_CLASSES)
    config_key = "datasets.pascal"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.root = existing_root(cfg["root"], "datasets.pascal.root")
        self.image_dir = resolve_under(self.root, cfg["image_dir"])
        self.label_dir = resolve_under(self.root, cfg["label_dir"])

    def _fold_class_ids(self, fold: int) -> list[int]:
        return list(range(5 * fold + 1, 5 * fold + 6))

    def _list_ids(self, split: str) -> list[str]:
        key = f"{split}_list"
        return read_id_list(resolve_under(self.root, self.cfg[key]), f"datasets.pascal.{key}")

    def image_path(self, image_id: str, split: str) -> Path:
        self.check_split(split)
        return self.image_dir / f"{image_id}.jpg"

    def label_path(self, image_id: str, split: str) -> Path:
        self.check_split(split)
        return self.label_dir / f"{image_id}.png"
