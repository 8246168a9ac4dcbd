"""Converters: SBD .mat + VOC palette PNGs -> SegmentationClassAug and lists; COCO JSON -> class masks."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from scipy.sparse import csc_matrix

from fakes import write_instances_json
from umtfss import io
from umtfss.cli import main
from umtfss.config import load
from umtfss.data import open_dataset
from umtfss.data.convert import convert_coco, convert_sbd, pascal_lists, read_sbd_mat

VOC_TRAIN, VOC_VAL = ["a", "b", "c"], ["d", "e"]
SBD_TRAIN, SBD_VAL, SBD_NOVAL = ["b", "c", "d", "f", "g", "x"], ["e", "h"], ["b", "f", "g"]
SIZE = (12, 16)


def _sbd_mask(index):
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[2:8, 3:11] = 1 + index % 20
    return mask


def _voc_mask(index):
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[4:10, 5:12] = 255
    mask[5:9, 6:11] = 1 + (index + 7) % 20
    return mask


def _ids():
    return sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))


def _lines(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def voc_and_sbd(tmp_path):
    """VOC root (palette masks for VOC train/val, JPEGs for all) and an SBD dataset folder."""
    voc, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (sbd / "cls").mkdir(parents=True)
    _lines(voc / "ImageSets" / "Segmentation" / "train.txt", VOC_TRAIN)
    _lines(voc / "ImageSets" / "Segmentation" / "val.txt", VOC_VAL)
    _lines(sbd / "train.txt", SBD_TRAIN)
    _lines(sbd / "val.txt", SBD_VAL)
    _lines(sbd / "train_noval.txt", SBD_NOVAL)
    for index, image_id in enumerate(_ids()):
        Image.new("RGB", SIZE[::-1], (index, 0, 0)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        if image_id in VOC_TRAIN + VOC_VAL:
            io.write_png(voc / "SegmentationClass" / f"{image_id}.png", _voc_mask(index), palette=io.voc_palette())
        if image_id in SBD_TRAIN + SBD_VAL:
            boundaries = np.empty((20, 1), dtype=object)  # SBD: a cell of sparse edge maps per class
            for row in range(20):
                boundaries[row, 0] = csc_matrix(SIZE, dtype=np.uint8)
            gt = {"Segmentation": _sbd_mask(index), "Boundaries": boundaries,
                  "CategoriesPresent": np.array([1 + index % 20], dtype=np.uint8)}
            savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": gt})
    return voc, sbd


def test_pascal_list_rules():
    train, val = pascal_lists(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL, SBD_NOVAL, "reference")
    assert train == ["b", "f", "g", "a", "c"] and val == VOC_VAL  # SBD first, as PFENet's merged list
    train, _ = pascal_lists(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL, None, "reference")
    assert train == ["b", "c", "f", "g", "x", "a"]  # fallback: SBD train minus VOC val
    train, _ = pascal_lists(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL, SBD_NOVAL, "trainaug")
    assert train == ["a", "b", "c", "f", "g", "x", "h"]
    # the reference sizes: 1,464 VOC train + 5,623 SBD train_noval, 1,134 shared -> 5,953
    voc_train = [f"v{i}" for i in range(1464)]
    noval = [f"v{i}" for i in range(1464 - 1134, 1464)] + [f"s{i}" for i in range(5623 - 1134)]
    assert len(pascal_lists(voc_train, ["z"], [], [], noval)[0]) == 5953


def test_read_sbd_mat(voc_and_sbd, tmp_path):
    _, sbd = voc_and_sbd
    assert np.array_equal(read_sbd_mat(sbd / "cls" / "f.mat"), _sbd_mask(_ids().index("f")))
    savemat(tmp_path / "bad.mat", {"other": np.zeros(3)})
    with pytest.raises(ValueError, match=r"bad\.mat.*GTcls"):
        read_sbd_mat(tmp_path / "bad.mat")


def test_convert_sbd_merges_masks_and_writes_lists(voc_and_sbd, tmp_path):
    voc, sbd = voc_and_sbd
    summary = convert_sbd(voc, sbd, voc / "SegmentationClassAug", voc / "lists" / "train_aug.txt",
                          voc / "lists" / "val.txt", progress=False)
    assert summary["train"] == 5 and summary["val"] == 2 and summary["train_noval"]
    assert summary["masks"] == len(_ids()) and summary["from_voc"] == 5
    for index, image_id in enumerate(_ids()):
        out = voc / "SegmentationClassAug" / f"{image_id}.png"
        assert Image.open(out).mode == "L"
        expected = _voc_mask(index) if image_id in VOC_TRAIN + VOC_VAL else _sbd_mask(index)
        assert np.array_equal(io.read_label(out), expected), image_id  # VOC wins for b, c, d, e
    assert (voc / "lists" / "train_aug.txt").read_text().split() == ["b", "f", "g", "a", "c"]
    assert not [p for p in voc.iterdir() if ".tmp-" in p.name]


def test_convert_sbd_cli_round_trip_through_reader(voc_and_sbd, tmp_path):
    voc, sbd = voc_and_sbd
    config = json.dumps({"datasets": {"pascal": {"root": str(voc), "sbd_root": str(sbd)}}})
    assert main(["convert-sbd", "--config", config, "--rule", "trainaug", "--no-progress"]) == 0
    dataset = open_dataset("pascal", load(json.loads(config)))
    assert dataset.image_ids("train") == ["a", "b", "c", "f", "g", "x", "h"]
    assert np.array_equal(dataset.read_label("h", "train"), _sbd_mask(_ids().index("h")))
    assert dataset.read_image("h", "train").shape == SIZE + (3,)


def test_convert_sbd_reports_missing_masks(voc_and_sbd, capsys):
    voc, sbd = voc_and_sbd
    (sbd / "cls" / "g.mat").unlink()
    config = json.dumps({"datasets": {"pascal": {"root": str(voc), "sbd_root": str(sbd)}}})
    assert main(["convert-sbd", "--config", config, "--no-progress"]) == 1
    assert "'g'" in capsys.readouterr().err
    assert not (voc / "SegmentationClassAug").exists()


def test_lists_with_a_byte_order_mark_and_one_file_for_both_lists(voc_and_sbd, tmp_path):
    """A list saved by a Windows editor (BOM, CRLF) reads as any other; one path for both lists is refused
    before anything is written (the train list would replace the val list)."""
    voc, sbd = voc_and_sbd
    (sbd / "train.txt").write_bytes(b"\xef\xbb\xbf" + "".join(f"{i}\r\n" for i in SBD_TRAIN).encode())
    summary = convert_sbd(voc, sbd, tmp_path / "aug", tmp_path / "train.txt", tmp_path / "val.txt", progress=False)
    assert summary["masks"] == len(_ids()) and (tmp_path / "aug" / "b.png").is_file()
    with pytest.raises(ValueError, match=r"train list and val list are both '.*same\.txt'.*datasets\.pascal\.train_list"):
        convert_sbd(voc, sbd, tmp_path / "aug2", tmp_path / "same.txt", tmp_path / "same.txt", progress=False)
    assert not (tmp_path / "aug2").exists() and not (tmp_path / "same.txt").exists()


def test_the_reference_list_without_train_noval_stops_before_writing(voc_and_sbd, capsys):
    """Without SBD's train_noval.txt the reference rule would give a larger list than the paper's: an error
    naming the file and both ways on; the trainaug rule does not need it."""
    voc, sbd = voc_and_sbd
    (sbd / "train_noval.txt").unlink()
    config = json.dumps({"datasets": {"pascal": {"root": str(voc), "sbd_root": str(sbd)}}})
    assert main(["convert-sbd", "--config", config, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"'{sbd / 'train_noval.txt'}' does not exist" in err and "--rule trainaug" in err
    assert not (voc / "SegmentationClassAug").exists() and not (voc / "lists").exists()
    assert main(["convert-sbd", "--config", config, "--rule", "trainaug", "--no-progress"]) == 0


def _rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask):
    """Run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    starts = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, starts, flat.size]).tolist()
    return ([0] + runs) if flat[0] else runs


def _coco_json(path):
    from pycocotools import mask as mask_utils

    height, width = 40, 50
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[25:35, 30:45] = 1
    counts = _uncompressed_rle(crowd)  # as COCO stores crowds
    small = np.zeros((height, width), dtype=np.uint8, order="F")
    small[32:36, 5:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(small))
    compressed["counts"] = compressed["counts"].decode()
    images = [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": height, "width": width},
              {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 20, "width": 30}]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 25.0,
         "segmentation": _rect_polygon(10, 10, 15, 15)},   # small, under the big one in annotation order
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 400.0,
         "segmentation": _rect_polygon(2, 2, 22, 22)},
        {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 150.0,
         "segmentation": {"counts": counts, "size": [height, width]}},
        {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 16.0, "segmentation": compressed},
    ]
    return write_instances_json(path, images, annotations, category_ids=[90, 3, 1])


@pytest.mark.parametrize("crowd, crowd_value", [("ignore", 255), ("class", 2), ("skip", 0)])
def test_convert_coco_masks(tmp_path, crowd, crowd_value):
    source = _coco_json(tmp_path / "instances_train2014.json")
    summary = convert_coco(source, tmp_path / "masks", crowd=crowd, progress=False, keep_unannotated=True,
                           overlap="small_on_top")
    assert summary["images"] == 2 and summary["unannotated"] == 1 and summary["classes"] == 3
    mask = io.read_label(tmp_path / "masks" / "COCO_train2014_000000000007.png")
    assert mask.shape == (40, 50)
    assert mask[5, 5] == 1 and mask[20, 20] == 1           # category 1 -> class 1 (sorted ids 1, 3, 90)
    assert mask[12, 12] == 3 and 15 <= (mask == 3).sum() <= 40  # category 90 -> 3, smaller object on top
    assert mask[30, 38] == crowd_value and mask[0, 49] == 0
    assert mask[33, 6] == 2 and (mask[32:36, 5:9] == 2).all()  # compressed RLE, category 3 -> class 2
    empty = io.read_label(tmp_path / "masks" / "COCO_train2014_000000000009.png")
    assert empty.shape == (20, 30) and not empty.any()


def test_convert_coco_overlaps_in_annotation_order_by_default(tmp_path):
    """The reference's masks: a later annotation paints over an earlier one, whatever their sizes."""
    source = _coco_json(tmp_path / "instances_train2014.json")
    summary = convert_coco(source, tmp_path / "masks", progress=False)
    mask = io.read_label(tmp_path / "masks" / "COCO_train2014_000000000007.png")
    assert summary["overlap"] == "annotation_order"
    assert (mask[10:15, 10:15] == 1).all() and not (mask == 3).any()  # the big object (2nd) covers the small (1st)
    with pytest.raises(ValueError, match="datasets.coco.overlap"):
        convert_coco(source, tmp_path / "masks", progress=False, overlap="largest")


def test_convert_coco_leaves_out_images_without_annotations_by_default(tmp_path):
    """The reference's COCO train set is the 82,081 annotated images; a mask written earlier goes."""
    source = _coco_json(tmp_path / "instances_train2014.json")
    convert_coco(source, tmp_path / "masks", progress=False, keep_unannotated=True)
    summary = convert_coco(source, tmp_path / "masks", progress=False)  # the defaults: skip, leave out
    assert summary["images"] == 1 and summary["unannotated"] == 1 and summary["crowd"] == "skip"
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["COCO_train2014_000000000007.png"]
    assert io.read_label(tmp_path / "masks" / "COCO_train2014_000000000007.png")[30, 38] == 0  # crowd: background


def test_convert_coco_cli_round_trip(tmp_path, capsys):
    root = tmp_path / "coco"
    _coco_json(tmp_path / "ann" / "instances_train2014.json")
    (root / "train2014").mkdir(parents=True)
    for stem in ("COCO_train2014_000000000007", "COCO_train2014_000000000009"):
        Image.new("RGB", (50, 40) if stem.endswith("7") else (30, 20)).save(root / "train2014" / f"{stem}.jpg")
    config = json.dumps({"datasets": {"coco": {"root": str(root), "instances_dir": str(tmp_path / "ann")}}})
    assert main(["convert-coco", "--config", config, "--split", "train", "--no-progress"]) == 0
    dataset = open_dataset("coco", load(json.loads(config)))
    assert dataset.image_ids("train") == ["COCO_train2014_000000000007"]  # 9 has no annotation
    assert dataset.read_label("COCO_train2014_000000000007", "train")[12, 12] == 1  # annotation order
    assert dataset.read_label("COCO_train2014_000000000007", "train")[30, 38] == 0  # datasets.coco.crowd: skip
    kept = json.dumps({"datasets": {"coco": {"root": str(root), "instances_dir": str(tmp_path / "ann"),
                                             "keep_unannotated": True, "crowd": "ignore",
                                             "overlap": "small_on_top"}}})
    assert main(["convert-coco", "--config", kept, "--split", "train", "--no-progress"]) == 0
    dataset = open_dataset("coco", load(json.loads(kept)))
    assert dataset.image_ids("train") == ["COCO_train2014_000000000007", "COCO_train2014_000000000009"]
    assert dataset.read_label("COCO_train2014_000000000007", "train")[30, 38] == 255
    assert dataset.read_label("COCO_train2014_000000000007", "train")[12, 12] == 3  # datasets.coco.overlap
    assert main(["convert-coco", "--config", kept, "--split", "train", "--crowd", "class", "--no-progress"]) == 0
    assert dataset.read_label("COCO_train2014_000000000007", "train")[30, 38] == 2  # the flag wins
    assert main(["convert-coco", "--config", config, "--split", "val", "--no-progress"]) == 1
    assert "instances_val2014.json" in capsys.readouterr().err


@pytest.mark.parametrize("images, message", [
    ([{"id": 1, "file_name": "site1/a.jpg"}, {"id": 2, "file_name": "site2/a.jpg"}],
     r"images 1 \('site1/a\.jpg'\) and 2 \('site2/a\.jpg'\) would both get the mask 'a\.png'"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.png"}],
     r"images 1 .* and 2 \('a\.png'\) would both get"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], r"image id 1 is in 'images' twice"),
    ([{"id": 1, "file_name": "a.jpg", "height": 0}], r"image 1 has 'height' 0, expected a positive whole number"),
    ([{"id": 1, "file_name": "a.jpg", "width": "ten"}], r"image 1 has 'width' 'ten', expected a positive whole number"),
])
def test_convert_coco_refuses_images_it_cannot_give_a_mask_of_their_own(tmp_path, images, message):
    """Your own COCO export: two images of one file stem would write one mask (the second silently over the
    first), a repeated image id would lose one, a bad size would fail mid-way; all stop before writing."""
    images = [{"height": 10, "width": 10, **image} for image in images]
    annotations = [{"id": n, "image_id": image["id"], "category_id": 1, "iscrowd": 0,
                    "segmentation": _rect_polygon(1, 1, 5, 5)} for n, image in enumerate(images)]
    source = write_instances_json(tmp_path / "instances.json", images, annotations, category_ids=[1])
    with pytest.raises(ValueError, match=r"COCO annotation file '.*instances\.json': " + message):
        convert_coco(source, tmp_path / "masks", progress=False)
    assert not (tmp_path / "masks").exists()
