"""Your own labelled images as a benchmark (datasets.custom): reader, folds, errors, prepare / evaluate / train."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from umtfss.cli import main
from umtfss.config import ConfigError, load
from umtfss.data import open_dataset
from umtfss.data.pascal import PASCAL_CLASSES
from umtfss.data.prepare import build_tables, read_tables

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture
def custom_root(tmp_path):
    from fakes import make_custom_tree

    return make_custom_tree(tmp_path / "mine", n_train=8, n_val=8, classes=len(CLASSES))


def _custom(root, **keys):
    return {"root": str(root), "classes": CLASSES, **keys}


def test_a_voc_tree_read_as_custom_gives_pascals_tables(voc_root):
    """The same files through datasets.custom (20 names, default folds) and datasets.pascal: identical tables."""
    custom = {"root": str(voc_root), "image_dir": "JPEGImages", "label_dir": "SegmentationClassAug",
              "train_list": "lists/train_aug.txt", "val_list": "lists/val.txt", "classes": list(PASCAL_CLASSES)}
    config = load({"datasets": {"pascal": {"root": str(voc_root)}, "custom": custom}})
    pascal, mine = (build_tables(open_dataset(name, config), 2048, progress=False) for name in ("pascal", "custom"))
    for name in ("images", "classes", "image_classes"):
        assert mine[name].equals(pascal[name]), name
    assert open_dataset("custom", config).fold_classes(3) == [16, 17, 18, 19, 20]  # contiguous, as PASCAL-5i


def test_ids_keep_subfolders_and_any_image_suffix(custom_root):
    dataset = open_dataset("custom", load({"datasets": {"custom": _custom(custom_root)}}))
    train, val = dataset.image_ids("train"), dataset.image_ids("val")
    assert train[:2] == ["a/img00", "b/img01"] and val == [f"{'ab'[i % 2]}/img{i:02d}" for i in range(8, 16)]
    assert dataset.image_path("b/img01", "train") == custom_root / "images" / "b" / "img01.JPG"
    assert dataset.read_image("a/img00", "train").shape == (64, 64, 3)
    assert dataset.label_path("b/img09", "val") == custom_root / "masks" / "b" / "img09.png"
    assert dataset.num_folds == 4 and [dataset.fold_classes(f) for f in range(4)] == [[1], [2], [3], [4]]
    # a file name with spaces: the whole line is the id
    shutil.copy(custom_root / "images" / "a" / "img00.png", custom_root / "images" / "a" / "my photo 1.png")
    (custom_root / "val.txt").write_text("  a/my photo 1.png \n\n# done\n")
    spaced = open_dataset("custom", load({"datasets": {"custom": _custom(custom_root, train_list=None)}}))
    assert spaced.image_ids("val") == ["a/my photo 1"]
    assert spaced.image_path("a/my photo 1", "val").name == "my photo 1.png"


@pytest.mark.parametrize("entry, hint", [
    ("a\\img00", r"list ids separate folders with '/', not '\\'"),
    ("a/photo.webp", r"if '\.webp' is its suffix: umtfss reads jpg, jpeg, png"),
    ("a/cafe\u0301", r"the file '.*caf.*\.png' has this name in other Unicode code points"),  # macOS-style name
])
def test_a_list_id_without_a_file_says_why_when_the_id_shows_it(custom_root, entry, hint):
    """Windows separators, an unread suffix, a file name in decomposed Unicode: the error says which."""
    shutil.copy(custom_root / "images" / "a" / "img00.png", custom_root / "images" / "a" / "caf\u00e9.png")
    typed = entry.replace("cafe\u0301", "caf\u00e9") if "\u0301" in entry else entry  # the list holds the composed form
    if "\u0301" in entry:  # the file holds the decomposed one
        (custom_root / "images" / "a" / "caf\u00e9.png").rename(custom_root / "images" / "a" / "cafe\u0301.png")
    (custom_root / "val.txt").write_text(typed + "\n")
    dataset = open_dataset("custom", load({"datasets": {"custom": _custom(custom_root, train_list=None)}}))
    with pytest.raises(FileNotFoundError, match=r"has no file .*image_dir\); " + hint):
        dataset.image_path(dataset.image_ids("val")[0], "val")


def test_explicit_folds_and_a_class_of_no_fold(custom_root, tmp_path):
    """Two folds; 'tree' is in none: fold -1 in classes.parquet, a base class of both folds."""
    section = _custom(custom_root, folds=[[1, 3], [2]])
    out = tmp_path / "tables"
    assert main(["prepare", "--config", json.dumps({"datasets": {"custom": section}}), "--dataset", "custom",
                 "--out", str(out), "--no-progress"]) == 0
    tables = read_tables(out)
    assert tables.classes["fold"].tolist() == [0, 1, 0, -1] and tables.classes["name"].tolist() == CLASSES
    assert tables.fold_classes(0) == [1, 3] and tables.fold_classes(1) == [2]
    with pytest.raises(ValueError, match=r"fold 2 has no classes; folds present: \[0, 1\]"):
        tables.fold_classes(2)
    dataset = open_dataset("custom", load({"datasets": {"custom": section}}))
    assert dataset.base_classes(0) == [2, 4] and dataset.base_classes(1) == [1, 3, 4]
    with pytest.raises(ValueError, match="fold 2 does not exist.*expected 0..1"):
        dataset.fold_classes(2)
    # the split the lists define: 8 train and 8 val images, each with its large object present
    assert tables.images["split"].value_counts().to_dict() == {"train": 8, "val": 8}
    assert int(tables.image_classes["present"].sum()) == 16


@pytest.mark.parametrize("keys, message", [
    ({"classes": []}, r"datasets\.custom\.classes' is empty"),
    ({"classes": ["cat", "cat", "dog", "car"]}, r"names \['cat'\] more than once"),
    ({"classes": ["cat", " ", "dog", "car"]}, r"datasets\.custom\.classes\[1\]' is blank"),
    ({"classes": ["cat", "dog ", "dog", "car"]}, r"names \['dog'\] more than once"),  # up to spaces around
    ({"classes": [f"c{i}" for i in range(255)], "folds": [[1]]}, r"names 255 classes; expected at most 254"),
    ({"classes": ["cat", "dog"]}, r"2 classes, too few to cut into 4 folds; set 'datasets\.custom\.folds'"),
    ({"folds": [[1, 5]]}, r"datasets\.custom\.folds\[0\]' holds class 5.*names 4 classes; expected class ids 1\.\.4"),
    ({"folds": [[1, 2], [2]]}, r"puts class 2 in folds 0 and 1"),
    ({"folds": [[1], [2], [3], [4], [1]]}, r"datasets\.custom\.folds"),  # at most 4 folds (schema)
])
def test_bad_classes_or_folds_name_the_key(custom_root, keys, message):
    with pytest.raises(ConfigError, match=message):
        load({"datasets": {"custom": {**_custom(custom_root), **keys}}})


def test_a_custom_root_that_is_not_a_folder_stops_the_workflow_config(tmp_path):
    config = {"datasets": {"custom": {"root": str(tmp_path / "nowhere"), "classes": CLASSES}}}
    load(config)  # the package reads paths when it opens the data set
    with pytest.raises(ConfigError, match=r"datasets\.custom\.root' is '.*nowhere', which is not a directory"):
        load(config, check_paths=True)  # what the workflow checks before any job


def test_folder_source_may_not_take_the_custom_results_folder(tmp_path):
    with pytest.raises(ConfigError, match="unlabeled.name' is 'custom'"):
        load({"unlabeled": {"source": "folder", "folder": str(tmp_path), "name": "custom"}})


def test_bad_files_are_named_with_their_key(custom_root, tmp_path):
    def tables(**keys):
        return build_tables(open_dataset("custom", load({"datasets": {"custom": _custom(custom_root, **keys)}})),
                            2048, progress=False)

    with pytest.raises(ValueError, match=r"datasets\.custom\.root' is null"):
        open_dataset("custom", load({"datasets": {"custom": {"classes": CLASSES}}}))
    with pytest.raises(ValueError, match=r"'datasets\.custom\.image_dir' and 'datasets\.custom\.label_dir' name "
                                         r"the same folder"):
        tables(label_dir="images")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*datasets\.custom\.val_list"):
        tables(val_list="nope.txt")
    (custom_root / "val.txt").write_text((custom_root / "val.txt").read_text() + "a/img00\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) are in both .*train_list and .*val_list, e\.g\. 'a/img00'"):
        tables()
    (custom_root / "val.txt").write_text("b/img09\nb/missing\n")
    with pytest.raises(FileNotFoundError, match=r"image 'b/missing' of datasets\.custom\.val_list has no file"):
        tables()
    (custom_root / "val.txt").write_text("b/img09\n")
    shutil.copy(custom_root / "images" / "b" / "img09.png", custom_root / "images" / "b" / "img09.jpg")
    with pytest.raises(ValueError, match=r"img09\.(jpg|png)' and '.*img09\.(jpg|png)' have the same name up to the "
                                         r"suffix; rename one, ids must be unique "
                                         r"\(config key datasets\.custom\.image_dir\)"):
        tables()
    (custom_root / "images" / "b" / "img09.jpg").unlink()
    (custom_root / "masks" / "b" / "img09.png").rename(tmp_path / "kept.png")
    with pytest.raises(FileNotFoundError, match=r"label '.*masks/b/img09\.png' of val image 'b/img09' does not "
                                                r"exist \(looked up through datasets\.custom\.label_dir\)"):
        tables()
    label = np.asarray(Image.open(tmp_path / "kept.png")).copy()
    label[:2, :2] = 7  # a value past the 4 named classes
    Image.fromarray(label).save(custom_root / "masks" / "b" / "img09.png")
    with pytest.raises(ValueError, match=r"img09\.png' holds class value\(s\) \[7\].*classes 1\.\.4.*custom\.classes"):
        tables()
    Image.fromarray(np.where(label > 0, 255, 0).astype(np.uint8)).save(custom_root / "masks" / "b" / "img09.png")
    with pytest.raises(ValueError, match=r"no label of data set 'custom' holds a class value 1\.\.4.*Binary 0/255"):
        tables(train_list=None)  # a binary 0/255 mask: all ignore
    shutil.copy(tmp_path / "kept.png", custom_root / "masks" / "b" / "img09.png")
    assert len(tables(train_list=None).images) == 1  # evaluation only: no train list


def test_windows_lists_upper_case_masks_and_linked_folders_read_as_their_files(custom_root):
    """A list saved with a byte-order mark, a mask named <id>.PNG, and a link to a subfolder whose name sorts
    first: the ids stay the real folder's, so the lists find their images."""
    crlf = (custom_root / "train.txt").read_text().replace("\n", "\r\n")
    (custom_root / "train.txt").write_bytes(b"\xef\xbb\xbf" + crlf.encode())
    (custom_root / "masks" / "a" / "img00.png").rename(custom_root / "masks" / "a" / "img00.PNG")
    (custom_root / "images" / "0_all").symlink_to(custom_root / "images" / "b", target_is_directory=True)
    dataset = open_dataset("custom", load({"datasets": {"custom": _custom(custom_root)}}))
    assert dataset.image_ids("train")[:2] == ["a/img00", "b/img01"]
    assert dataset.image_path("b/img01", "train") == custom_root / "images" / "b" / "img01.JPG"
    assert dataset.label_path("a/img00", "train") == custom_root / "masks" / "a" / "img00.PNG"
    tables = build_tables(dataset, 2048, progress=False)
    assert len(tables.images) == 16 and int(tables.image_classes["present"].sum()) == 16
    (custom_root / "images" / "0_all").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask folder '.*labels' does not exist \(config key "
                                                r"datasets\.custom\.label_dir\)"):
        open_dataset("custom", load({"datasets": {"custom": _custom(custom_root, label_dir="labels")}})
                     ).label_path("b/img09", "val")
    (custom_root / "photos.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"image folder '.*photos\.zip' is not a folder \(config key "
                                                r"datasets\.custom\.image_dir\)"):
        open_dataset("custom", load({"datasets": {"custom": _custom(custom_root, image_dir="photos.zip")}})
                     ).image_path("b/img09", "val")


def test_evaluate_and_train_sup_on_custom_tables(custom_root, tmp_path, capsys):
    """The CLI path of the workflow: prepare, evaluate the training-free baseline, train sup on the base classes."""
    import torch

    from umtfss.training import checkpoint as ckpt

    torch.set_num_threads(1)
    out = tmp_path / "tables"
    datasets = {"custom": _custom(custom_root, folds=[[1, 2], [3, 4]], min_class_pixels=500)}
    assert main(["prepare", "--config", json.dumps({"datasets": datasets}), "--dataset", "custom", "--out", str(out),
                 "--no-progress"]) == 0
    evaluation = {"folds": [0, 1], "shots": [1], "seeds": [0], "episodes": 12, "test_size": 64, "device": "cpu"}
    args = ["evaluate", "--tables", str(out), "--dataset", "custom", "--method", "all-background",
            "--method", "prototype-threshold", "--out", str(tmp_path / "e.csv"), "--classes-out", str(tmp_path / "c.csv"),
            "--workers", "0"]
    config = {"model": {"backbone": "demo-colortexture"}, "evaluation": evaluation}
    assert main([*args, "--config", json.dumps(config)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert {(r["method"], r["fold"]) for r in rows} == {(m, f) for m in ("all-background", "prototype-threshold")
                                                        for f in ("0", "1")}
    per_class = {r["class_name"] for r in csv.DictReader(open(tmp_path / "c.csv"))}
    assert per_class == set(CLASSES)  # folds 0 and 1 hold every class
    capsys.readouterr()
    config["evaluation"] = {**evaluation, "folds": [0, 3]}
    assert main([*args, "--config", json.dumps(config)]) == 1
    assert "'evaluation.folds' holds fold(s) [3], but data set 'custom' has folds [0, 1]" in capsys.readouterr().err
    config["evaluation"] = evaluation
    as_pascal = [a if a != "custom" else "pascal" for a in args]  # your tables scored as PASCAL: refused
    assert main([*as_pascal, "--config", json.dumps(config)]) == 1
    assert "were prepared from data set 'custom', but the data set to score is 'pascal'" in capsys.readouterr().err

    model = {"backbone": "demo-colortexture", "dim": 16, "heads": 2, "layers": 1, "prototypes_fg": 4, "prototypes_bg": 4}
    train = {"epochs": 1, "batch_size": 4, "crop_size": 48, "workers": 0, "device": "cpu"}
    assert main(["train", "--method", "sup", "--out-dir", str(tmp_path / "sup"), "--tables", str(out), "--dataset",
                 "custom", "--fold", "1", "--quiet",
                 "--config", json.dumps({"model": model, "training": train, "datasets": datasets})]) == 0
    state = ckpt.load(tmp_path / "sup" / "checkpoint.pt")
    assert state["method"] == "sup" and (tmp_path / "sup" / "log.csv").is_file()
    # --fold all: fine-tuned on every class (a model to apply to new classes), none held out
    from umtfss.training.sources import LabelledEpisodes

    tables = read_tables(out)
    assert LabelledEpisodes(tables, "custom", "all", min_class_pixels=500).base_classes == [1, 2, 3, 4]
    assert LabelledEpisodes(tables, "custom", 1, min_class_pixels=500).base_classes == [1, 2]
    train_ft = {**train, "finetune_epochs": 1, "finetune_batch_size": 2}
    assert main(["train", "--method", "finetune-100%", "--out-dir", str(tmp_path / "all"), "--tables", str(out),
                 "--dataset", "custom", "--fold", "all", "--init", str(tmp_path / "sup" / "checkpoint.pt"), "--quiet",
                 "--config", json.dumps({"model": model, "training": train_ft, "datasets": datasets})]) == 0
    assert ckpt.load(tmp_path / "all" / "checkpoint.pt")["method"] == "finetune-100%"
    # a checkpoint records the classes it trained on with labels; evaluate refuses a fold whose test classes they are
    assert state["labelled_classes"] == sorted(CLASSES[:2])  # fold 1's base classes
    assert ckpt.load(tmp_path / "all" / "checkpoint.pt")["labelled_classes"] == sorted(CLASSES)
    capsys.readouterr()
    scored = ["evaluate", "--tables", str(out), "--dataset", "custom", "--out", str(tmp_path / "m.csv"),
              "--classes-out", str(tmp_path / "mc.csv"), "--workers", "0"]
    config_model = {"model": model, "evaluation": {**evaluation, "episodes": 4}}
    sup = f"sup={tmp_path / 'sup' / 'checkpoint.pt'}"
    assert main([*scored, "--method", sup, "--config", json.dumps(config_model)]) == 1
    err = capsys.readouterr().err
    assert f"was trained with labels on {', '.join(sorted(CLASSES[:2]))}, test class(es) of fold 0" in err
    assert not (tmp_path / "m.csv").exists()  # refused before any work
    config_model["evaluation"]["folds"] = [1]
    assert main([*scored, "--method", sup, "--config", json.dumps(config_model)]) == 0
    assert main([*scored, "--method", f"finetune-100%={tmp_path / 'all' / 'checkpoint.pt'}",
                 "--config", json.dumps(config_model)]) == 1
    assert "test class(es) of fold 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "sup", "--out-dir", str(tmp_path / "x"), "--fold", "5", "--config", "{}"])
    assert "'5' is not a fold; expected 0, 1, 2, 3 or all" in capsys.readouterr().err
    assert main(["train", "--method", "unsup", "--out-dir", str(tmp_path / "x"), "--fold", "all", "--episodes", "e",
                 "--labels", "l", "--images", "i", "--config", "{}"]) == 1
    assert "--fold all is for sup and finetune" in capsys.readouterr().err

    # one fold of every class: evaluation works, but there is no base class to train on
    one_fold = {"custom": {**datasets["custom"], "folds": [[1, 2, 3, 4]]}}
    assert main(["prepare", "--config", json.dumps({"datasets": one_fold}), "--dataset", "custom", "--out",
                 str(tmp_path / "one"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "sup", "--out-dir", str(tmp_path / "none"), "--tables", str(tmp_path / "one"),
                 "--dataset", "custom", "--fold", "0", "--quiet",
                 "--config", json.dumps({"model": model, "training": train, "datasets": one_fold})]) == 1
    assert "fold 0 of data set 'custom' has no base class" in capsys.readouterr().err
    # the same for an unsup model of that fold (unlabeled.source custom, 'fold' setting): no image to train on
    assert main(["train", "--method", "unsup", "--out-dir", str(tmp_path / "none"), "--tables", str(tmp_path / "one"),
                 "--dataset", "custom", "--fold", "0", "--episodes", "e", "--labels", "l", "--images", "i", "--quiet",
                 "--config", json.dumps({"model": model, "training": train})]) == 1
    assert "fold 0 of '" in (err := capsys.readouterr().err) and "has no train image that holds a base class" in err
