"""Pseudo-mask quality against ground truth; labels are read here for measurement only, never for training.

Per image of the label stores that has a ground-truth mask (images.parquet `label_path`), labels and
mask are compared at one of two resolutions (255 pixels are ignored):

- `grid` (default for unrefined stores): the mask is brought to the grid by nearest-neighbour
  downsampling of the whole mask to the image's valid grid extent (the cells that are not padding);
- `input` (default for superpixel-refined stores): the embed input resolution, i.e. the mask resized
  nearest with resize_pad's geometry (longer side -> the store's image_size, padding excluded); the
  refined labels are compared as they are, grid labels after nearest upsampling of their valid part.
  This is where refinement can be seen: at the grid, refined and unrefined labels look alike.

A confusion matrix clusters x classes (0 = background, 1..C) is accumulated over the data set, then:

- many-to-one: each cluster is mapped to its majority class; IoU per class over the data set
  (sum of intersections / sum of unions), mIoU = mean over the classes present in the ground truth,
  background included; pixel accuracy = share of cells whose cluster's class is right.
- Hungarian one-to-one: scipy's linear_sum_assignment maximising the summed cluster-class IoU;
  classes left without a cluster (fewer clusters than classes) count IoU 0.
- best-cluster IoU of each class: the largest IoU any single cluster reaches with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from umtfss.episode import IGNORE
from umtfss.io import atomic_path, check_outputs_apart, read_label, resolve_table_paths
from umtfss.pseudo_episodes import resize_nearest, valid_extent
from umtfss.stores import LabelStore
from umtfss.transforms import resized_extent
from umtfss.progress import tqdm

LABEL_VALUES = 256  # uint8 ground truth: class ids 0..254, 255 ignored
RESOLUTIONS = ("auto", "grid", "input")


def label_paths_by_image(images_table: str | Path | pd.DataFrame) -> dict[str, str]:
    """image_id -> ground-truth mask path for the images of the table that have one."""
    source = "images table"
    if isinstance(images_table, (str, Path)):
        if not Path(images_table).is_file():
            raise FileNotFoundError(f"images table '{images_table}' does not exist")
        source = f"images table '{images_table}'"
        images_table = resolve_table_paths(pd.read_parquet(images_table), images_table)
    missing = {"image_id", "label_path"} - set(images_table.columns)
    if missing:
        raise ValueError(f"{source} lacks column(s) {sorted(missing)}; expected image_id and label_path "
                         "(the prepare stage's images.parquet)")
    labelled = images_table[images_table["label_path"].notna()].drop_duplicates("image_id")
    return dict(zip(labelled["image_id"].astype(str), labelled["label_path"].astype(str)))


def grid_ground_truth(ground_truth: np.ndarray, valid: tuple[int, int]) -> np.ndarray:
    """Ground truth HxW brought to the valid grid extent (rows, cols) by nearest-neighbour downsampling."""
    return resize_nearest(ground_truth, valid)


def resolve_resolution(store: LabelStore, resolution: str = "auto") -> str:
    """'grid' or 'input': 'auto' is 'input' for a refined store (its labels live there), else 'grid'."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"quality resolution '{resolution}' is not one of {', '.join(RESOLUTIONS)}")
    if resolution == "auto":
        return "input" if store.has_refined else "grid"
    return resolution


def input_resolution_pair(store: LabelStore, index: int, cells: np.ndarray, truth: np.ndarray,
                          image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, ground truth) of one image at the embed input resolution (valid part, resize_pad geometry)."""
    height, width = resized_extent(truth.shape[0], truth.shape[1], image_size)
    if store.has_refined:
        refined = store.refined(index)
        if valid_extent(refined) != (height, width):
            raise ValueError(f"image '{store.image_ids[index]}': refined labels cover {valid_extent(refined)} pixels but "
                             f"its {truth.shape} ground truth resizes to {(height, width)} at image_size {image_size}; "
                             "expected the images the label store was built from")
        return refined[:height, :width], resize_nearest(truth, (height, width))
    truth = resize_nearest(truth, (height, width))
    vh, vw = valid_extent(cells)
    return resize_nearest(cells[:vh, :vw], (height, width)), truth


def confusion_matrix(label_paths: Sequence[str | Path], images_table, clusters: int | None = None,
                     progress: bool = True, resolution: str = "auto") -> tuple[np.ndarray, int]:
    """(confusion int64 [clusters, 256] counting grid cells (or input pixels, see `resolution`) per
    cluster x ground-truth value, images measured)."""
    store = LabelStore(label_paths)
    resolution = resolve_resolution(store, resolution)
    image_size = store.attrs.get("image_size") if resolution == "input" else None
    if resolution == "input" and not isinstance(image_size, int):
        raise ValueError(f"label store '{store.paths[0]}' has image_size={image_size!r}; quality at the input "
                         "resolution needs the embed input size (int)")
    clusters = int(clusters or store.clusters or 0)
    if clusters < 1:
        raise ValueError(f"label store(s) {[str(p) for p in label_paths]} have no 'clusters' attribute; pass --clusters")
    ground_truth_path = label_paths_by_image(images_table)
    confusion = np.zeros((clusters, LABEL_VALUES), np.int64)
    measured = 0
    bar = tqdm(total=len(store), desc="quality", unit="img", disable=not progress)
    for index_range, block in store.iter_batches(16):
        for offset, index in enumerate(index_range):
            bar.update(1)
            path = ground_truth_path.get(store.image_ids[index])
            if path is None:
                continue
            cells = block[offset]
            vh, vw = valid_extent(cells)
            if vh == 0:
                continue
            if resolution == "input":
                cells, truth = input_resolution_pair(store, index, cells, read_label(path), image_size)
            else:
                cells, truth = cells[:vh, :vw], grid_ground_truth(read_label(path), (vh, vw))
            cells, truth = cells.astype(np.int64).ravel(), truth.astype(np.int64).ravel()
            if cells.max() >= clusters:
                raise ValueError(f"image '{store.image_ids[index]}' has cluster id {cells.max()}, expected < {clusters}")
            confusion += np.bincount(cells * LABEL_VALUES + truth, minlength=clusters * LABEL_VALUES).reshape(clusters, LABEL_VALUES)
            measured += 1
    bar.close()
    return confusion, measured


def iou_matrix(confusion: np.ndarray) -> np.ndarray:
    """IoU of every cluster (rows) with every class (columns)."""
    rows = confusion.sum(axis=1, keepdims=True)
    cols = confusion.sum(axis=0, keepdims=True)
    union = rows + cols - confusion
    return np.divide(confusion, union, out=np.zeros(confusion.shape, np.float64), where=union > 0)


def quality_metrics(confusion: np.ndarray) -> dict:
    """Many-to-one, Hungarian and best-cluster IoUs of a clusters x classes confusion (255 column dropped)."""
    confusion = np.asarray(confusion, np.int64)
    if confusion.shape[1] > IGNORE:
        confusion = confusion[:, :IGNORE]
    num_classes = confusion.shape[1]
    class_cells = confusion.sum(axis=0)
    present = class_cells > 0
    if not present.any():
        raise ValueError("the confusion matrix is empty: no labelled cell was measured")

    majority = confusion.argmax(axis=1)
    used = confusion.sum(axis=1) > 0
    intersection = np.zeros(num_classes, np.int64)
    predicted = np.zeros(num_classes, np.int64)
    np.add.at(intersection, majority[used], confusion[used, majority[used]])
    np.add.at(predicted, majority[used], confusion[used].sum(axis=1))
    union = predicted + class_cells - intersection
    many_to_one = np.divide(intersection, union, out=np.zeros(num_classes), where=union > 0)

    ious = iou_matrix(confusion)
    cluster_rows, class_cols = linear_sum_assignment(ious[:, present], maximize=True)
    present_ids = np.flatnonzero(present)
    hungarian = np.zeros(num_classes)
    hungarian_cluster = np.full(num_classes, -1)
    hungarian[present_ids[class_cols]] = ious[cluster_rows, present_ids[class_cols]]
    hungarian_cluster[present_ids[class_cols]] = cluster_rows

    return {
        "present": present,
        "class_cells": class_cells,
        "many_to_one_iou": many_to_one,
        "many_to_one_miou": float(many_to_one[present].mean()),
        "many_to_one_pixel_accuracy": float(intersection.sum() / class_cells.sum()),
        "hungarian_iou": hungarian,
        "hungarian_cluster": hungarian_cluster,
        "hungarian_miou": float(hungarian[present].mean()),
        "best_cluster_iou": ious.max(axis=0),
        "best_cluster": ious.argmax(axis=0),
        "mean_best_cluster_iou": float(ious.max(axis=0)[present].mean()),
        "majority_class": np.where(used, majority, -1),
    }


def quality_table(metrics: dict, images: int, class_names: dict[int, str] | None = None,
                  resolution: str = "grid") -> pd.DataFrame:
    """Tidy table (metric, class_id, class_name, value, resolution): summaries with an empty class, then per
    class; `resolution` (grid or input) says where cells were counted."""
    names = {0: "background", **(class_names or {})}
    rows = [{"metric": "images", "class_id": None, "class_name": "", "value": images}]
    for key in ("many_to_one_miou", "hungarian_miou", "mean_best_cluster_iou", "many_to_one_pixel_accuracy"):
        rows.append({"metric": key, "class_id": None, "class_name": "", "value": metrics[key]})
    for class_id in np.flatnonzero(metrics["present"]):
        for key in ("many_to_one_iou", "hungarian_iou", "hungarian_cluster", "best_cluster_iou", "best_cluster", "class_cells"):
            rows.append({"metric": key, "class_id": int(class_id), "class_name": names.get(int(class_id), str(class_id)),
                         "value": float(metrics[key][class_id])})
    table = pd.DataFrame(rows)
    table["class_id"] = table["class_id"].astype("Int64")
    table["resolution"] = resolution
    return table


def read_class_names(path: str | Path | None) -> dict[int, str]:
    """class_id -> name from classes.parquet (class_id, name, fold), or {} without one."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"classes table '{path}' does not exist")
    table = pd.read_parquet(path)
    if not {"class_id", "name"} <= set(table.columns):
        raise ValueError(f"classes table '{path}' has columns {list(table.columns)}, expected class_id and name")
    return dict(zip(table["class_id"].astype(int), table["name"].astype(str)))


def summary(metrics: dict, images: int, resolution: str = "grid") -> str:
    """A few lines for the log."""
    where = "the feature grid" if resolution == "grid" else "the embed input resolution"
    return (f"pseudo-mask quality at {where} over {images} labelled images, {int(metrics['present'].sum())} classes present: "
            f"many-to-one mIoU {metrics['many_to_one_miou']:.4f} (pixel accuracy {metrics['many_to_one_pixel_accuracy']:.4f}), "
            f"Hungarian mIoU {metrics['hungarian_miou']:.4f}, mean best-cluster IoU {metrics['mean_best_cluster_iou']:.4f}")


def cli(parser: argparse.ArgumentParser):
    """`umtfss quality`: confusion of clusters with ground-truth classes, written as a tidy CSV."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON (no key is read; kept for uniformity)")
    parser.add_argument("--labels", nargs="+", required=True, help="label store shards (*.zarr)")
    parser.add_argument("--images", required=True, help="images.parquet (image_id, label_path)")
    parser.add_argument("--classes", default=None, help="classes.parquet for class names (optional)")
    parser.add_argument("--out", required=True, help="output CSV (metric, class_id, class_name, value, resolution)")
    parser.add_argument("--resolution", choices=RESOLUTIONS, default="auto",
                        help="where to compare: grid cells, or input pixels (the embed input size); auto (default): "
                             "input for superpixel-refined label stores, grid otherwise")

    def run(args: argparse.Namespace) -> None:
        from umtfss.config import load

        load(args.config)
        check_outputs_apart({"--out": args.out}, {"--labels": args.labels, "--images": [args.images],
                                                  "--classes": [args.classes] if args.classes else []})
        names = read_class_names(args.classes)
        resolution = resolve_resolution(LabelStore(args.labels), args.resolution)
        confusion, images = confusion_matrix(args.labels, args.images, resolution=resolution)
        if images == 0:
            raise ValueError(f"no image of the label stores has a ground-truth mask in '{args.images}' (label_path); "
                             f"pseudo-mask quality needs a labelled source")
        metrics = quality_metrics(confusion)
        with atomic_path(args.out) as temp:
            quality_table(metrics, images, names, resolution).to_csv(temp, index=False)
        print(summary(metrics, images, resolution))

    return run
