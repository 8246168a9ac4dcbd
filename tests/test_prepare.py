"""The prepare stage: tables, the >= min_class_pixels rule, remove_novel, the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from umtfss.cli import main
from umtfss.config import load
from umtfss.data import open_dataset
from umtfss.data.prepare import prepare, read_tables, train_images_for_fold


def _expected_counts(voc_root, image_id):
    label = np.asarray(Image.open(voc_root / "SegmentationClassAug" / f"{image_id}.png"))
    return {int(c): int((label == c).sum()) for c in np.unique(label) if c not in (0, 255)}


@pytest.fixture(scope="module")
def pascal_tables(voc_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepare")
    code = main(["prepare", "--config", json.dumps({"datasets": {"pascal": {"root": str(voc_root)}}}),
                 "--dataset", "pascal", "--out", str(out), "--workers", "1", "--no-progress"])
    assert code == 0
    return out, read_tables(out)


def test_cli_writes_three_tables(pascal_tables, voc_root):
    out, tables = pascal_tables
    assert sorted(p.name for p in out.iterdir()) == ["classes.parquet", "image_classes.parquet", "images.parquet"]
    images = tables.images
    assert list(images.columns) == ["image_id", "split", "image_path", "label_path", "height", "width"]
    assert (images["split"] == "train").sum() == 8 and (images["split"] == "val").sum() == 4
    assert (images["height"] == 64).all() and (images["width"] == 64).all()
    assert images["image_path"].str.endswith(".jpg").all() and images["label_path"].str.endswith(".png").all()
    assert list(tables.classes["class_id"]) == list(range(1, 21))
    assert list(tables.classes.loc[tables.classes["fold"] == 0, "name"]) == [
        "aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert tables.meta["min_class_pixels"] == 2048 and tables.meta["dataset"] == "pascal"


def test_pixel_counts_and_presence_rule(pascal_tables, voc_root):
    _, tables = pascal_tables
    rows = tables.image_classes
    for image_id in tables.images["image_id"]:
        mine = rows[rows["image_id"] == image_id]
        assert dict(zip(mine["class_id"], mine["pixels"])) == _expected_counts(voc_root, image_id)
    assert (rows["present"] == (rows["pixels"] >= 2048)).all()
    # every fake image has exactly one large (present) and one small (absent) object
    assert rows.groupby("image_id")["present"].sum().eq(1).all()
    assert (~rows["present"]).sum() == 12


def test_min_class_pixels_is_configurable(voc_root, tmp_path):
    config = load({"datasets": {"pascal": {"root": str(voc_root), "min_class_pixels": 1}}})
    tables = prepare(open_dataset("pascal", config), config, tmp_path, progress=False)
    assert tables.image_classes["present"].all()


def test_remove_novel_and_require_base(pascal_tables):
    _, tables = pascal_tables
    train = tables.images.loc[tables.images["split"] == "train", "image_id"].tolist()
    rows = tables.image_classes[tables.image_classes["split"] == "train"]
    for fold in range(4):
        novel = set(tables.fold_classes(fold))
        assert train_images_for_fold(tables, fold, remove_novel=False) == train
        kept = train_images_for_fold(tables, fold, remove_novel=True)
        with_novel = set(rows.loc[rows["class_id"].isin(novel), "image_id"])  # any pixel, even the small object
        assert kept == [i for i in train if i not in with_novel]
        based = train_images_for_fold(tables, fold, remove_novel=False, require_base_class=True)
        has_base = set(rows.loc[~rows["class_id"].isin(novel) & rows["present"], "image_id"])
        assert based == [i for i in train if i in has_base]
    assert any(len(train_images_for_fold(tables, f, True)) < len(train) for f in range(4))


def test_coco_prepare_in_parallel(coco_root, tmp_path):
    config = load({"datasets": {"coco": {"root": str(coco_root)}}})
    dataset = open_dataset("coco", config)
    serial = prepare(dataset, config, tmp_path / "a", workers=1, progress=False)
    # the pool is only used from 64 images up: scan a longer task list with 2 workers, compare in order
    from umtfss.data import prepare as stage

    tasks = stage._tasks(dataset) * 6
    parallel = list(stage._scan_all(tasks, workers=2, progress=False, desc="t"))
    assert parallel == [stage._scan_image(t) for t in tasks]
    assert [p[2] for p in parallel[:12]] == [
        dict(zip(g["class_id"], g["pixels"])) for _, g in serial.image_classes.groupby("image_id", sort=False)]
    assert len(serial.classes) == 80 and serial.classes.loc[serial.classes["class_id"] == 5, "fold"].item() == 0
    assert set(serial.image_classes["class_id"]).issubset(range(1, 81))


def test_folder_prepare_writes_only_images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "x").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(folder / "a.jpg")
    Image.new("L", (7, 9)).save(folder / "x" / "b.png")
    config = json.dumps({"unlabeled": {"source": "folder", "folder": str(folder)}})
    assert main(["prepare", "--config", config, "--dataset", "folder", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    tables = read_tables(tmp_path / "out")
    assert tables.images[["image_id", "height", "width"]].values.tolist() == [["a", 20, 30], ["x/b", 9, 7]]
    assert tables.images["label_path"].isna().all() and tables.classes.empty and tables.image_classes.empty
    with pytest.raises(ValueError, match="no classes"):
        train_images_for_fold(tables, 0, remove_novel=True)


def test_errors_reach_the_cli(voc_root, tmp_path, capsys):
    broken = tmp_path / "VOC"
    (broken / "lists").mkdir(parents=True)
    (broken / "lists" / "train_aug.txt").write_text("2008_000000\n")
    (broken / "lists" / "val.txt").write_text("")
    (broken / "JPEGImages").mkdir()
    config = json.dumps({"datasets": {"pascal": {"root": str(broken)}}})
    assert main(["prepare", "--config", config, "--dataset", "pascal", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "2008_000000.jpg" in err and "datasets.pascal.image_dir" in err
    assert not (tmp_path / "o" / "images.parquet").exists()


def test_label_size_mismatch_is_reported(tmp_path, voc_root):
    import shutil

    root = tmp_path / "VOC"
    shutil.copytree(voc_root, root)
    image_id = (root / "lists" / "val.txt").read_text().split()[0]
    Image.new("L", (10, 10)).save(root / "SegmentationClassAug" / f"{image_id}.png")
    config = load({"datasets": {"pascal": {"root": str(root)}}})
    with pytest.raises(ValueError, match=f"{image_id}.png.*10x10.*64x64.*looked up through datasets.pascal"):
        prepare(open_dataset("pascal", config), config, tmp_path / "o", progress=False)
    # a photo whose EXIF tag turns it, with a mask drawn on its stored pixels: the error says why
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{image_id}.jpg", exif=exif)
    Image.new("L", (64, 48)).save(root / "SegmentationClassAug" / f"{image_id}.png")
    with pytest.raises(ValueError, match=r"is 48x64 but image .* is 64x48 .*EXIF orientation tag turns it"):
        prepare(open_dataset("pascal", config), config, tmp_path / "o", progress=False)


def test_progress_bar_reaches_its_total(voc_root, capsys):
    from umtfss.data.prepare import build_tables

    config = load({"datasets": {"pascal": {"root": str(voc_root)}}})
    build_tables(open_dataset("pascal", config), 2048, progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "12/12" in last, last


def test_an_output_file_is_refused_before_the_scan(voc_root, tmp_path, capsys):
    (tmp_path / "out").write_text("")
    config = json.dumps({"datasets": {"pascal": {"root": str(voc_root)}}})
    assert main(["prepare", "--config", config, "--dataset", "pascal", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert f"output '{tmp_path / 'out'}' (prepare --out) is a file, expected a folder" in capsys.readouterr().err
