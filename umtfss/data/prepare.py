"""The prepare stage: the image list and the class / fold / per-image class tables, as parquet."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from umtfss import io
from umtfss.data.base import SegmentationDataset, open_dataset
from umtfss.progress import tqdm

TABLE_NAMES = ("images", "classes", "image_classes")
META_KEY = b"umtfss"
NO_FOLD = -1  # classes.parquet's fold of a class in no fold (datasets.custom.folds may leave one out)
POOL_FROM = 64  # below this many images a process pool costs more than it saves

IMAGE_COLUMNS = ["image_id", "split", "image_path", "label_path", "height", "width"]
CLASS_COLUMNS = ["class_id", "name", "fold"]
IMAGE_CLASS_COLUMNS = ["image_id", "split", "class_id", "pixels", "present"]


@dataclass
class Tables:
    """The three prepare tables and the settings they were made with (`meta`)."""

    images: pd.DataFrame
    classes: pd.DataFrame
    image_classes: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        """tables["images"] as well as tables.images."""
        if name not in TABLE_NAMES:
            raise KeyError(f"no table '{name}'; expected one of {list(TABLE_NAMES)}")
        return getattr(self, name)

    def folds(self) -> list[int]:
        """The folds of the classes table (a class of no fold is no fold)."""
        return sorted({int(f) for f in self.classes["fold"]} - {NO_FOLD})

    def fold_classes(self, fold: int) -> list[int]:
        """Novel class ids of a fold, from the classes table."""
        if self.classes.empty:
            raise ValueError(f"tables of data set '{self.meta.get('dataset')}' have no classes (an unlabeled "
                             "folder), so no folds")
        ids = sorted(int(c) for c in self.classes.loc[self.classes["fold"] == fold, "class_id"])
        if not ids:
            raise ValueError(f"fold {fold} has no classes; folds present: {self.folds()}")
        return ids


# ---------------------------------------------------------------- scanning

def _tasks(dataset: SegmentationDataset) -> list[tuple]:
    """One picklable task per (split, image): id, split, paths and the config keys behind the paths."""
    tasks = []
    for split in dataset.splits:
        for image_id in dataset.image_ids(split):
            label = dataset.label_path(image_id, split)
            tasks.append((image_id, split, str(dataset.image_path(image_id, split)),
                          None if label is None else str(label), dataset.dir_key(split, "image"),
                          dataset.dir_key(split, "label")))
    return tasks


def _scan_image(task: tuple) -> tuple[int, int, dict[int, int]]:
    """(height, width, {class id: pixels}) of one image; the label must have the image's size."""
    image_id, split, image_path, label_path, image_key, label_key = task
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image '{image_path}' of {split} image '{image_id}' does not exist "
                                f"(looked up through {image_key})")
    height, width = io.image_size(image_path)
    if label_path is None:
        return height, width, {}
    if not Path(label_path).is_file():
        raise FileNotFoundError(f"label '{label_path}' of {split} image '{image_id}' does not exist "
                                f"(looked up through {label_key})")
    label = io.read_label(label_path)
    if label.shape != (height, width):
        turned = io.label_size(image_path) == label.shape  # the stored pixels match; the EXIF tag turns them
        why = (f"; the image's EXIF orientation tag turns it to {height}x{width} (umtfss reads images as viewers "
               "show them): draw the mask on the turned image, or save the image without the tag") if turned else ""
        raise ValueError(f"label '{label_path}' is {label.shape[0]}x{label.shape[1]} but image '{image_path}' "
                         f"is {height}x{width} (height x width); expected the same size (looked up through "
                         f"{label_key}){why}")
    counts = np.bincount(label.ravel(), minlength=256)
    return height, width, {int(c): int(counts[c]) for c in np.flatnonzero(counts[1:255]) + 1}


def _scan_all(tasks: list[tuple], workers: int, progress: bool, desc: str) -> Iterator[tuple]:
    """_scan_image over every task, in task order; in a process pool for large lists."""
    bar = dict(total=len(tasks), desc=desc, unit="img", disable=not progress)
    if workers <= 1 or len(tasks) < POOL_FROM:
        yield from tqdm(map(_scan_image, tasks), **bar)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(_scan_image, tasks, chunksize=16), **bar)


# ---------------------------------------------------------------- tables

def _class_table(dataset: SegmentationDataset) -> pd.DataFrame:
    if not dataset.class_names:
        return pd.DataFrame({"class_id": pd.Series(dtype="int64"), "name": pd.Series(dtype="str"),
                             "fold": pd.Series(dtype="int64")})
    fold_of = {c: fold for fold in range(dataset.num_folds) for c in dataset.fold_classes(fold)}
    ids = list(range(1, dataset.num_classes + 1))
    # a class of no fold is a base class of every fold
    return pd.DataFrame({"class_id": ids, "name": dataset.class_names, "fold": [fold_of.get(c, NO_FOLD) for c in ids]})


def build_tables(dataset: SegmentationDataset, min_class_pixels: int | None, workers: int = 1,
                 progress: bool = True) -> Tables:
    """Scan every image (header) and label (pixel counts per class) of the data set."""
    tasks = _tasks(dataset)
    images, rows = [], []
    # strict: zip then asks the scan for one more item after the last task, so its bar counts the last image
    scans = _scan_all(tasks, workers, progress, f"prepare {dataset.name}")
    for task, (height, width, counts) in zip(tasks, scans, strict=True):
        image_id, split, image_path, label_path = task[:4]
        unknown = [c for c in counts if c > dataset.num_classes] if dataset.class_names else []
        if unknown:
            raise ValueError(f"label '{label_path}' holds class value(s) {sorted(unknown)}, but data set '{dataset.name}' "
                             f"has classes 1..{dataset.num_classes} (0 background, 255 ignore); add the class names "
                             f"({dataset.config_key}.classes) or relabel the mask")
        images.append((image_id, split, image_path, label_path, height, width))
        rows.extend((image_id, split, c, n) for c, n in sorted(counts.items()))
    image_table = pd.DataFrame(images, columns=IMAGE_COLUMNS).astype({"height": "int64", "width": "int64"})
    image_classes = pd.DataFrame(rows, columns=IMAGE_CLASS_COLUMNS[:-1]).astype({"class_id": "int64", "pixels": "int64"})
    image_classes["present"] = image_classes["pixels"] >= (min_class_pixels or 1)
    if dataset.class_names and len(image_table) and image_classes.empty:
        raise ValueError(f"no label of data set '{dataset.name}' holds a class value 1..{dataset.num_classes}, e.g. "
                         f"'{image_table['label_path'].iloc[0]}': every pixel is background (0) or ignore (255). "
                         "Binary 0/255 masks need their 255 turned into 1, the first class")
    meta = {"dataset": dataset.name, "min_class_pixels": min_class_pixels, "images": len(image_table)}
    return Tables(image_table, _class_table(dataset), image_classes, meta)


def write_tables(tables: Tables, out_dir: str | Path) -> None:
    """The three parquet files, each written atomically; the settings go into each file's metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLE_NAMES:
        table = pa.Table.from_pandas(getattr(tables, name), preserve_index=False)
        metadata = dict(table.schema.metadata or {})
        metadata[META_KEY] = json.dumps(tables.meta).encode()
        with io.atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(table.replace_schema_metadata(metadata), tmp)


def read_tables(out_dir: str | Path) -> Tables:
    """The tables written by `prepare`, with their settings (`meta`)."""
    out_dir = Path(out_dir)
    frames, meta = {}, {}
    for name in TABLE_NAMES:
        path = out_dir / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"table '{path}' does not exist; expected the prepare stage's output in '{out_dir}'")
        table = pq.read_table(path)
        frames[name] = io.resolve_table_paths(table.to_pandas(), path)
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return Tables(frames["images"], frames["classes"], frames["image_classes"], meta)


def prepare(dataset: SegmentationDataset, config: dict, out_dir: str | Path, workers: int = 1,
            progress: bool = True) -> Tables:
    """Scan the data set and write images / classes / image_classes parquet tables into out_dir."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # refused before the scan, not after it
        raise ValueError(f"output '{out_dir}' (prepare --out) is a file, expected a folder for the tables "
                         f"{', '.join(n + '.parquet' for n in TABLE_NAMES)}")
    section = config["datasets"].get(dataset.name) if dataset.class_names else None
    tables = build_tables(dataset, section["min_class_pixels"] if section else None, workers, progress)
    if section:
        tables.meta["remove_novel_train"] = section["remove_novel_train"]
        if "fold_convention" in section:
            tables.meta["fold_convention"] = section["fold_convention"]
    write_tables(tables, out_dir)
    return tables


# ---------------------------------------------------------------- fold selections

def train_images_for_fold(tables: Tables, fold: int, remove_novel: bool,
                          require_base_class: bool = False) -> list[str]:
    """Train image ids (table order) usable for a fold.

    remove_novel drops images holding any pixel of a novel class (BAM-style);
    require_base_class keeps only images where some base class is present (>= min_class_pixels): the
    reference code's 'fold' setting, novel classes allowed.
    """
    novel = set(tables.fold_classes(fold))
    train = tables.images.loc[tables.images["split"] == "train", "image_id"].tolist()
    rows = tables.image_classes[tables.image_classes["split"] == "train"]
    keep = set(train)
    if remove_novel:
        keep -= set(rows.loc[rows["class_id"].isin(novel), "image_id"])
    if require_base_class:
        keep &= set(rows.loc[~rows["class_id"].isin(novel) & rows["present"], "image_id"])
    return [i for i in train if i in keep]


# ---------------------------------------------------------------- CLI

def cli(parser):
    parser.add_argument("--config", required=True, help="YAML file or inline JSON (datasets / unlabeled sections)")
    parser.add_argument("--dataset", required=True, choices=["pascal", "coco", "custom", "folder"])
    parser.add_argument("--out", required=True, type=Path, help="output folder for the three parquet tables")
    parser.add_argument("--workers", type=int, default=1, help="processes scanning the labels")
    parser.add_argument("--no-progress", action="store_true")

    def run(args):
        from umtfss.config import load

        config = load(args.config)
        tables = prepare(open_dataset(args.dataset, config), config, args.out, workers=args.workers,
                         progress=not args.no_progress)
        print(f"prepare {args.dataset}: {len(tables.images)} images, {len(tables.classes)} classes, "
              f"{int(tables.image_classes['present'].sum())} (image, class) pairs present -> {args.out}")

    return run
