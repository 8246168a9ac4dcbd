"""`umtfss examples`: the evaluation's first test episodes of a fold, each method's masks and IoU, drawn as a figure."""

import json

import numpy as np
import pytest
from PIL import Image

from umtfss.cli import main
from umtfss.config import load
from umtfss.data.prepare import read_tables
from umtfss.evaluation.examples import draw_examples, episode_iou, predict_examples
from umtfss.evaluation.sampler import sample_episodes

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture
def tables(tmp_path):
    from fakes import make_custom_tree

    root = make_custom_tree(tmp_path / "mine", n_train=4, n_val=12, classes=len(CLASSES))
    datasets = {"custom": {"root": str(root), "classes": CLASSES, "folds": [[1, 2], [3, 4]], "min_class_pixels": 500}}
    assert main(["prepare", "--config", json.dumps({"datasets": datasets}), "--dataset", "custom",
                 "--out", str(tmp_path / "tables"), "--no-progress"]) == 0
    return tmp_path / "tables"


def _config():
    evaluation = {"folds": [1, 0], "shots": [1], "seeds": [7], "episodes": 12, "test_size": 64, "device": "cpu"}
    return load({"model": {"backbone": "demo-colortexture"}, "evaluation": evaluation})


def test_examples_are_the_first_episodes_evaluate_scores(tables, tmp_path):
    config = _config()
    examples = predict_examples(config, "custom", tables, {"all-background": None, "prototype-threshold": None}, count=3)
    expected = sample_episodes(read_tables(tables).image_classes, [3, 4], 1, 12, 7, "val", "image_walk").head(3)
    assert (examples.fold, examples.shot, examples.seed) == (1, 1, 7)  # the first of evaluation.folds / shots / seeds
    assert examples.episodes[["query_id", "class_id"]].equals(expected[["query_id", "class_id"]].reset_index(drop=True))
    assert list(examples.episodes["support_ids"]) == list(expected["support_ids"])
    for method, masks in examples.masks.items():
        assert [m.shape for m in masks] == [t.shape for t in examples.targets] == [(64, 64)] * 3
        ious = [round(100 * episode_iou(m, t), 1) for m, t in zip(masks, examples.targets)]
        assert list(examples.episodes[f"iou_{method}"]) == ious
    assert (examples.episodes["iou_all-background"] == 0).all()  # every query holds its class
    assert all((t == 1).any() for t in examples.targets)
    out = draw_examples(examples, tables, tmp_path / "examples.png")
    assert Image.open(out).size == (4 * 220, 3 * 220)  # support, query and truth, two methods; a row per episode


def test_examples_command_writes_the_figure_and_names_bad_input(tables, tmp_path, capsys):
    config = json.dumps({"model": {"backbone": "demo-colortexture"}, "evaluation": {
        "folds": [0], "shots": [1], "seeds": [0], "episodes": 8, "test_size": 64, "device": "cpu"}})
    base = ["examples", "--config", config, "--dataset", "custom", "--tables", str(tables),
            "--method", "prototype-threshold"]
    assert main(base + ["--out", str(tmp_path / "e.png"), "--count", "2", "--shot", "2"]) == 0
    assert Image.open(tmp_path / "e.png").size == (3 * 220, 2 * 220)
    assert "examples written to" in capsys.readouterr().out
    assert main(base + ["--out", str(tmp_path / "x.png"), "--fold", "5"]) == 1
    assert "fold 5 has no classes" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "x.png"), "--count", "0"]) == 1
    assert "--count is 0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_per_fold_checkpoint_is_the_drawn_folds(tables):
    """A checkpoint path with {fold} (sup, finetune-P%) names the model of the fold drawn."""
    from umtfss.evaluation.predictors import AllBackground

    built = []

    def build(method, config, checkpoint, device):
        built.append((method, checkpoint))
        return AllBackground()

    examples = predict_examples(_config(), "custom", tables, {"finetune-20%": "ft/fold{fold}/checkpoint.pt"}, count=2,
                                fold=0, build=build)
    assert built == [("finetune-20%", "ft/fold0/checkpoint.pt")] and examples.fold == 0
    assert list(examples.episodes["iou_finetune-20%"]) == [0.0, 0.0]


def test_counts_beyond_the_evaluations_episodes_and_non_png_names_are_refused(tables, tmp_path, capsys):
    """The figure draws the first of the episodes evaluate scores: --count above evaluation.episodes is
    refused, naming the maximum (by default 6, or all of a shorter table); --out must be a .png name."""
    evaluation = {"folds": [0], "shots": [1], "seeds": [0], "episodes": 4, "test_size": 64, "device": "cpu"}
    base = ["examples", "--config", json.dumps({"model": {"backbone": "demo-colortexture"}, "evaluation": evaluation}),
            "--dataset", "custom", "--tables", str(tables), "--method", "all-background"]
    assert main(base + ["--out", str(tmp_path / "x.png"), "--count", "100000"]) == 1
    err = capsys.readouterr().err
    assert "--count is 100000, expected 1 to 4 episodes" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--out", str(tmp_path / "b.jpg")]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "b.jpg" in err and ".png" in err
    assert not list(tmp_path.glob("x.png")) and not list(tmp_path.glob("b.jpg"))
    assert main(base + ["--out", str(tmp_path / "all.png")]) == 0  # the default 6, of a 4-episode table: 4
    assert Image.open(tmp_path / "all.png").size == (3 * 220, 4 * 220)


def test_a_figure_that_would_replace_an_input_or_a_model_of_the_folds_classes_is_refused(tables, tmp_path, capsys):
    """As evaluate: --out must not be a test label (PNG too) or the --config file, and another fold's
    sup model would draw inflated IoUs; both refused before any model runs."""
    from umtfss.training import checkpoint as ckpt

    images = read_tables(tables).images
    label = images.loc[images["split"] == "val", "label_path"].iloc[0]
    label = label if label.startswith("/") else str(tables.parent / label)
    before = open(label, "rb").read()
    config_file = tmp_path / "config.png"
    config_file.write_text(json.dumps({"evaluation": {"folds": [1], "shots": [1], "episodes": 4, "test_size": 64,
                                                      "device": "cpu"}}))
    common = ["examples", "--dataset", "custom", "--tables", str(tables), "--method", "all-background"]
    assert main([*common, "--config", str(config_file), "--out", label]) == 1
    assert "is also a test image or label of --tables" in capsys.readouterr().err
    assert open(label, "rb").read() == before
    assert main([*common, "--config", str(config_file), "--out", str(config_file)]) == 1
    assert "is also --config" in capsys.readouterr().err and config_file.read_text().startswith("{")
    sup = tmp_path / "sup.pt"  # trained with labels on dog and car: fold 1 tests car
    ckpt.save(sup, config=load({}), method="sup", model={}, labelled_classes=["car", "dog"])
    with pytest.raises(ValueError, match="trained with labels on car, test class"):
        predict_examples(_config(), "custom", tables, {"sup": str(sup)}, count=2)
