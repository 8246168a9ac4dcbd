"""Pseudo-mask quality: hand-computed many-to-one / Hungarian values and the stage end to end."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from umtfss import cli
from umtfss.clustering.quality import confusion_matrix, grid_ground_truth, quality_metrics


def confusion_of(pairs, clusters, classes):
    """Confusion [clusters, classes] from {(cluster, class): cells}."""
    matrix = np.zeros((clusters, classes), np.int64)
    for (k, c), n in pairs.items():
        matrix[k, c] = n
    return matrix


def test_perfect_clustering_scores_one():
    m = quality_metrics(confusion_of({(0, 0): 50, (1, 1): 30, (2, 2): 20}, 3, 3))
    assert m["many_to_one_miou"] == m["hungarian_miou"] == m["mean_best_cluster_iou"] == 1.0
    assert m["hungarian_cluster"].tolist() == [0, 1, 2]


def test_split_class_many_to_one_versus_hungarian():
    # background: cluster 0 (50 cells); class 1 split over clusters 1 (30) and 2 (20)
    m = quality_metrics(confusion_of({(0, 0): 50, (1, 1): 30, (2, 1): 20}, 3, 2))
    assert m["many_to_one_miou"] == 1.0                      # both clusters map to class 1
    assert m["hungarian_iou"].tolist() == pytest.approx([1.0, 30 / 50])
    assert m["hungarian_miou"] == pytest.approx((1.0 + 0.6) / 2)
    assert m["best_cluster"].tolist() == [0, 1]


def test_merged_classes_and_unmatched_class():
    # one cluster covers class 1 (30) and class 2 (10); cluster 1 is pure background (60)
    m = quality_metrics(confusion_of({(0, 1): 30, (0, 2): 10, (1, 0): 60}, 2, 3))
    # many-to-one: cluster 0 -> class 1: IoU(1) = 30 / 40, class 2 never predicted -> 0
    assert m["many_to_one_iou"].tolist() == pytest.approx([1.0, 0.75, 0.0])
    assert m["many_to_one_miou"] == pytest.approx(1.75 / 3)
    assert m["many_to_one_pixel_accuracy"] == pytest.approx(90 / 100)
    # Hungarian: 2 clusters for 3 classes -> class 2 unmatched scores 0
    assert m["hungarian_iou"].tolist() == pytest.approx([1.0, 0.75, 0.0])
    # ignore column (255) is dropped; absent classes are left out of the mean
    wide = np.zeros((2, 256), np.int64)
    wide[:, :3] = confusion_of({(0, 1): 30, (0, 2): 10, (1, 0): 60}, 2, 3)
    wide[0, 255] = 1000
    assert quality_metrics(wide)["many_to_one_miou"] == pytest.approx(1.75 / 3)


def test_grid_ground_truth_is_nearest_downsampling():
    truth = np.zeros((40, 30), np.uint8)
    truth[20:, 10:] = 7
    assert grid_ground_truth(truth, (4, 3)).tolist() == [[0, 0, 0], [0, 0, 0], [0, 7, 7], [0, 7, 7]]
    noise = np.random.default_rng(0).integers(0, 20, (37, 23)).astype(np.uint8)
    torch_nearest = F.interpolate(torch.from_numpy(noise).float()[None, None], size=(5, 4), mode="nearest")[0, 0]
    assert grid_ground_truth(noise, (5, 4)).tolist() == torch_nearest.long().tolist()


def test_quality_stage_writes_tidy_csv(tmp_path, capsys):
    labels = np.full((3, 4, 4), -1, np.int16)
    labels[:, :4, :3] = [[0, 0, 1], [0, 0, 1], [2, 2, 1], [2, 2, 1]]    # valid 4 x 3
    store = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    store.create_array("labels", data=labels, chunks=(1, 4, 4))
    store.attrs.update({"image_ids": ["a", "b", "c"], "clusters": 3})
    truth = np.zeros((40, 30), np.uint8)                  # 10 x 10 pixels per grid cell
    truth[:, 20:] = 1                                     # class 1 = the cluster-1 column
    truth[20:, :20] = 2                                   # class 2 = cluster 2
    truth[:10, :10] = 255                                 # ignored
    rows = []
    for image_id in "ab":                                 # c has no ground truth
        Image.fromarray(truth).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "split": "train", "image_path": "x", "label_path": str(tmp_path / f"{image_id}.png")})
    rows.append({"image_id": "c", "split": "train", "image_path": "x", "label_path": None})
    pd.DataFrame(rows).to_parquet(tmp_path / "images.parquet")
    pd.DataFrame({"class_id": [1, 2], "name": ["cat", "dog"], "fold": [0, 0]}).to_parquet(tmp_path / "classes.parquet")

    confusion, measured = confusion_matrix([tmp_path / "labels.zarr"], tmp_path / "images.parquet", progress=False)
    assert measured == 2 and confusion[:, 255].sum() == 2 and confusion[:, :3].trace() == 2 * 11

    out = tmp_path / "cluster_quality.csv"
    assert cli.main(["quality", "--config", "{}", "--labels", str(tmp_path / "labels.zarr"), "--images",
                     str(tmp_path / "images.parquet"), "--classes", str(tmp_path / "classes.parquet"), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["metric", "class_id", "class_name", "value", "resolution"]
    assert set(table["resolution"]) == {"grid"}  # unrefined stores: the grid, as before refinement existed
    value = table.set_index(["metric", "class_name"])["value"]
    summary = table[table["class_id"].isna()].set_index("metric")["value"]
    assert summary["images"] == 2 and summary["hungarian_miou"] == pytest.approx(1.0)
    assert value[("hungarian_iou", "dog")] == pytest.approx(1.0) and value[("class_cells", "cat")] == 8
    assert "Hungarian mIoU 1.0000" in capsys.readouterr().out
