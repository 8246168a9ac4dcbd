"""Readers for PASCAL-5i, COCO-20i and plain image folders: ids, paths, folds, errors."""

import numpy as np
import pytest
from PIL import Image

from umtfss import io
from umtfss.config import load
from umtfss.data import open_dataset
from umtfss.data.coco import COCO_CLASSES


def _config(**sections):
    return load(sections)


def test_pascal_reads_lists_images_and_labels(voc_root):
    dataset = open_dataset("pascal", _config(datasets={"pascal": {"root": str(voc_root)}}))
    train, val = dataset.image_ids("train"), dataset.image_ids("val")
    assert len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    image, label = dataset.read_image(train[0], "train"), dataset.read_label(train[0], "train")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8
    assert 255 in label and 0 < label[label != 255].max() <= 20
    assert dataset.label_path(train[0], "train") == voc_root / "SegmentationClassAug" / f"{train[0]}.png"


def test_pascal_folds_follow_the_published_split(voc_root):
    dataset = open_dataset("pascal", _config(datasets={"pascal": {"root": str(voc_root)}}))
    assert dataset.num_classes == 20
    assert [dataset.class_names[c - 1] for c in dataset.fold_classes(0)] == [
        "aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert dataset.fold_classes(3) == [16, 17, 18, 19, 20]
    assert dataset.class_names[19] == "tvmonitor" and dataset.fold_of_class(15) == 2
    assert dataset.base_classes(1) == [1, 2, 3, 4, 5] + list(range(11, 21))
    with pytest.raises(ValueError, match="fold 4"):
        dataset.fold_classes(4)


def test_pascal_accepts_pfenet_style_list_lines(voc_root, tmp_path):
    ids = open_dataset("pascal", _config(datasets={"pascal": {"root": str(voc_root)}})).image_ids("val")
    lines = [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in ids]
    (tmp_path / "pfenet_val.txt").write_text("\n".join(lines + [lines[0], ""]))
    config = _config(datasets={"pascal": {"root": str(voc_root), "val_list": str(tmp_path / "pfenet_val.txt")}})
    assert open_dataset("pascal", config).image_ids("val") == ids  # absolute list path, repeat dropped


def test_pascal_errors_name_the_path_and_key(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*datasets\.pascal\.root"):
        open_dataset("pascal", _config(datasets={"pascal": {"root": str(tmp_path / "nowhere")}}))
    dataset = open_dataset("pascal", _config(datasets={"pascal": {"root": str(voc_root), "train_list": "x.txt"}}))
    with pytest.raises(FileNotFoundError, match=r"x\.txt.*datasets\.pascal\.train_list"):
        dataset.image_ids("train")
    with pytest.raises(FileNotFoundError, match=r"missing_id\.jpg.*datasets\.pascal\.image_dir"):
        dataset.read_image("missing_id", "train")
    with pytest.raises(ValueError, match="split 'test'"):
        dataset.image_ids("test")


def test_coco_scans_label_dir_and_folds(coco_root):
    dataset = open_dataset("coco", _config(datasets={"coco": {"root": str(coco_root)}}))
    train = dataset.image_ids("train")
    assert len(train) == 8 and train == sorted(train) and train[0].startswith("COCO_train2014_")
    image, label = dataset.read_image(train[0], "train"), dataset.read_label(train[0], "train")
    assert image.shape == (64, 64, 3) and label.shape == (64, 64)
    assert len(COCO_CLASSES) == dataset.num_classes == 80
    fold0 = dataset.fold_classes(0)
    assert fold0 == list(range(1, 80, 4))
    assert [dataset.class_names[c - 1] for c in fold0[:4]] == ["person", "airplane", "boat", "parking meter"]
    assert dataset.fold_classes(3)[-1] == 80 and dataset.class_names[79] == "toothbrush"
    assert sorted(sum((dataset.fold_classes(f) for f in range(4)), [])) == list(range(1, 81))


def test_coco_contiguous_convention_and_missing_label_dir(coco_root):
    config = _config(datasets={"coco": {"root": str(coco_root), "fold_convention": "contiguous"}})
    dataset = open_dataset("coco", config)
    assert dataset.fold_classes(1) == list(range(21, 41))
    config = _config(datasets={"coco": {"root": str(coco_root), "val_label_dir": "nolabels"}})
    with pytest.raises(FileNotFoundError, match=r"nolabels.*datasets\.coco\.val_label_dir"):
        open_dataset("coco", config).image_ids("val")


def _save_odd_modes(folder):
    """One image per awkward mode; returns {id: (height, width)}."""
    sub = folder / "sub" / "deeper"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(gray).convert("LA").save(folder / "graya.png")
    Image.fromarray(np.dstack([gray] * 4)).save(sub / "rgba.PNG")
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(gray).convert("P").save(folder / "sub" / "palette.bmp")
    Image.fromarray((gray.astype(np.uint16) * 200)).save(sub / "sixteen.tif")
    (folder / "notes.txt").write_text("not an image")
    return {"gray", "graya", "sub/deeper/rgba", "cmyk", "sub/palette", "sub/deeper/sixteen"}


def test_folder_reads_every_mode_as_rgb(tmp_path):
    expected = _save_odd_modes(tmp_path / "imgs")
    dataset = open_dataset("folder", _config(unlabeled={"source": "folder", "folder": str(tmp_path / "imgs"),
                                                         "name": "mine"}))
    assert dataset.name == "mine" and dataset.num_classes == 0 and dataset.splits == ("train",)
    ids = dataset.image_ids("train")
    assert set(ids) == expected and ids == sorted(ids)
    for image_id in ids:
        image = dataset.read_image(image_id, "train")
        assert image.shape == (20, 30, 3) and image.dtype == np.uint8, image_id
    assert dataset.label_path(ids[0], "train") is None
    with pytest.raises(ValueError, match="no labels"):
        dataset.read_label(ids[0], "train")
    with pytest.raises(ValueError, match="split 'val'"):
        dataset.image_ids("val")


def test_folder_errors(tmp_path):
    config = _config(unlabeled={"source": "folder", "folder": str(tmp_path / "empty")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*holds no image"):
        open_dataset("folder", config).image_ids("train")
    (tmp_path / "dup").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "dup" / "a.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "dup" / "a.png")
    config = _config(unlabeled={"source": "folder", "folder": str(tmp_path / "dup")})
    with pytest.raises(ValueError, match=r"a\.jpg.*a\.png"):
        open_dataset("folder", config).image_ids("train")


def test_folder_scan_follows_links_skips_hidden_and_names_bad_files(tmp_path, capsys):
    import os

    from umtfss.data.folder import folder_fingerprint, scan_image_folder

    folder, extra = tmp_path / "f", tmp_path / "extra"
    (folder / ".thumbnails").mkdir(parents=True)
    extra.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "own.jpg")
    Image.new("RGB", (4, 4)).save(folder / "._own.jpg")            # macOS resource fork: hidden
    Image.new("RGB", (4, 4)).save(folder / ".thumbnails" / "t.jpg")
    Image.new("RGB", (4, 4)).save(extra / "e1.jpg")
    (folder / "linked").symlink_to(extra, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link loop is walked once
    (folder / "again.jpg").symlink_to(folder / "own.jpg")           # the same picture twice: used once
    assert list(scan_image_folder(folder)) == ["linked/e1", "own"]
    assert "again.jpg" in capsys.readouterr().err
    before = folder_fingerprint(folder)
    Image.new("RGB", (5, 5)).save(extra / "e2.png")
    assert folder_fingerprint(folder) != before  # a new image changes the fingerprint

    (folder / "broken.jpg").symlink_to(folder / "nowhere.jpg")
    with pytest.raises(FileNotFoundError, match=r"broken\.jpg.*symbolic link.*does not exist"):
        scan_image_folder(folder)
    (folder / "broken.jpg").unlink()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:  # a Latin-1 name from an archive
        handle.write((folder / "own.jpg").read_bytes())
    with pytest.raises(ValueError, match="not valid UTF-8"):
        scan_image_folder(folder)


def test_image_over_the_pixel_limit_is_named(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    Image.new("1", (300, 300)).save(tmp_path / "panorama.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)  # 300 x 300 > 2 x limit: PIL refuses
    for read in (io.image_size, io.read_rgb):
        with pytest.raises(io.ImageReadError, match=r"panorama\.png.*UMTFSS_MAX_IMAGE_PIXELS"):
            read(tmp_path / "panorama.png")


def test_the_pixel_limit_variable_is_read_at_the_first_image_and_a_bad_value_named(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    Image.new("1", (300, 300)).save(tmp_path / "panorama.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(io, "_PIXEL_LIMIT_READ", False)
    monkeypatch.setenv("UMTFSS_MAX_IMAGE_PIXELS", "300M")
    with pytest.raises(ValueError, match=r"UMTFSS_MAX_IMAGE_PIXELS is '300M', expected a pixel count"):
        io.read_rgb(tmp_path / "panorama.png")
    monkeypatch.setenv("UMTFSS_MAX_IMAGE_PIXELS", "0")  # no limit: the large image reads
    assert io.read_rgb(tmp_path / "panorama.png").shape == (300, 300, 3) and PILImage.MAX_IMAGE_PIXELS is None


def test_folder_corrupt_image_names_the_path(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = open_dataset("folder", _config(unlabeled={"source": "folder", "folder": str(tmp_path / "f")}))
    with pytest.raises(io.ImageReadError, match="broken.jpg"):
        dataset.read_image("broken", "train")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set 'voc'"):
        open_dataset("voc", _config())
