"""COCO-20i: COCO2014 images with per-image class-mask PNGs; the interleaved or contiguous fold split."""

from __future__ import annotations

from pathlib import Path

from umtfss.data.base import SegmentationDataset, existing_root, resolve_under

# The 80 object categories in increasing COCO category id: class c (1..80) is COCO_CLASSES[c - 1].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


class CocoDataset(SegmentationDataset):
    """Ids are the mask PNG stems found in the split's label folder (so images without a mask file,
    which the converter always writes, are never used); images are `<image_dir>/<id>.jpg`."""

    name = "coco"
    class_names = list(COCO_CLASSES)
    config_key = "datasets.coco"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.root = existing_root(cfg["root"], "datasets.coco.root")
        self.convention = cfg["fold_convention"]

    def _fold_class_ids(self, fold: int) -> list[int]:
        if self.convention == "contiguous":
            return list(range(20 * fold + 1, 20 * fold + 21))
        return list(range(fold + 1, 81, 4))  # interleaved: 4k + fold + 1

    def _dir(self, split: str, kind: str) -> Path:
        self.check_split(split)
        return resolve_under(self.root, self.cfg[f"{split}_{kind}_dir"])

    def _list_ids(self, split: str) -> list[str]:
        folder = self._dir(split, "label")
        if not folder.is_dir():
            raise FileNotFoundError(f"class-mask folder '{folder}' does not exist (config key "
                                    f"datasets.coco.{split}_label_dir; the convert_coco rule writes it)")
        return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() == ".png")

    def image_path(self, image_id: str, split: str) -> Path:
        return self._dir(split, "image") / f"{image_id}.jpg"

    def label_path(self, image_id: str, split: str) -> Path:
        return self._dir(split, "label") / f"{image_id}.png"

    def dir_key(self, split: str, kind: str) -> str:
        return f"datasets.coco.{split}_{kind}_dir"
