"""`umtfss predict`: masks at the query's own size from a saved checkpoint, and clear input errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umtfss.cli import main
from umtfss.config import load
from umtfss.io import write_png
from umtfss.predict import predict_mask, read_support_mask
from umtfss.training import checkpoint as ckpt

torch.set_num_threads(1)

TINY_MODEL = {"backbone": "demo-colortexture", "dim": 16, "heads": 2, "layers": 1, "prototypes_fg": 4,
              "prototypes_bg": 8, "hash_bits": 8, "hash_iterations": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A freshly initialised tiny checkpoint, a grayscale query of odd size, one RGB support + 0/255 mask."""
    root = tmp_path_factory.mktemp("predict")
    config = load({"model": dict(TINY_MODEL), "training": {"crop_size": 64}})  # as the workflow's: no evaluation
    torch.manual_seed(0)
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(root / "model.pt", config=config, config_sections=["model", "training"], method="unsup",
              model=ckpt.trainable_state(model, backbone), epoch=0, step=0)
    Image.fromarray((np.random.default_rng(0).random((37, 53)) * 255).astype(np.uint8), mode="L").save(root / "query.jpg")
    support = np.zeros((30, 44, 3), np.uint8)
    support[5:20, 10:30] = (200, 30, 30)
    write_png(root / "support.png", support)
    mask = np.zeros((30, 44), np.uint8)
    mask[5:20, 10:30] = 255
    write_png(root / "mask.png", mask)
    write_png(root / "small_mask.png", mask[:20])
    return root


def test_predict_writes_a_binary_mask_of_the_query_size(files, tmp_path, capsys):
    out, overlay = tmp_path / "out" / "mask.png", tmp_path / "overlay.png"
    code = main(["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
                 str(files / "mask.png"), "--support", str(files / "support.png"), str(files / "mask.png"),
                 "--query", str(files / "query.jpg"), "--out", str(out), "--overlay", str(overlay), "--device", "cpu"])
    assert code == 0
    # a workflow checkpoint knows no evaluation.test_size: it segments at the crop it was trained at
    assert "size 64 (training.crop_size of the checkpoint" in capsys.readouterr().err
    result = np.asarray(Image.open(out))
    assert result.shape == (37, 53) and set(np.unique(result)) <= {0, 255}
    assert np.asarray(Image.open(overlay)).shape == (37, 53, 3)
    assert not list(out.parent.glob("*tmp*"))


class RedIsForeground(torch.nn.Module):
    """Stand-in model: foreground wherever the query is red; ignores the supports."""

    def forward(self, query, supports, support_masks, query_valid=None):
        score = query[:, 0] - query[:, 1:].amax(1) - 0.5
        return torch.stack([-score, score], dim=1)


def test_prediction_is_mapped_back_to_the_original_geometry():
    query = np.zeros((45, 90, 3), np.uint8)
    query[10:30, 50:80] = (255, 0, 0)
    support = (np.zeros((20, 20, 3), np.uint8), np.ones((20, 20), np.uint8))
    mask = predict_mask(RedIsForeground(), query, [support], size=64)
    expected = (query[..., 0] == 255).astype(np.uint8)
    assert mask.shape == (45, 90)
    assert (mask != expected).mean() < 0.02  # only boundary pixels may differ


class RecordsPrecision(RedIsForeground):
    """RedIsForeground that notes, per call, whether CPU bfloat16 autocast is on and the query's layout."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, query, supports, support_masks, query_valid=None):
        self.calls.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16,
                           query.is_contiguous(memory_format=torch.channels_last)))
        return super().forward(query, supports, support_masks, query_valid)


def test_cpu_bfloat16_prediction(files, tmp_path):
    """--cpu-precision bfloat16: the forward runs under CPU bfloat16 autocast on channels-last queries and
    still writes the query-sized mask; float32 (the default) runs without autocast."""
    from umtfss.predict import support_tensors, predict_masks

    query = np.zeros((45, 90, 3), np.uint8)
    query[10:30, 50:80] = (255, 0, 0)
    model = RecordsPrecision()
    images, masks = support_tensors([(np.zeros((20, 20, 3), np.uint8), np.ones((20, 20), np.uint8))], 64)
    for precision in ("float32", "bfloat16"):
        mask = predict_masks(model, [query], images, masks, 64, "cpu", precision)[0]
        assert (mask != (query[..., 0] == 255)).mean() < 0.02
    assert model.calls == [(False, False), (True, True)]
    out = tmp_path / "mask.png"
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
            str(files / "mask.png"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    assert main(base + ["--out", str(out), "--cpu-precision", "bfloat16"]) == 0
    assert np.asarray(Image.open(out)).shape == (37, 53)
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "bad.png"), "--cpu-precision", "half"])


def test_support_mask_reading_conventions(tmp_path):
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    write_png(tmp_path / "binary.png", binary)
    np.testing.assert_array_equal(read_support_mask(tmp_path / "binary.png"), [[0, 1], [1, 0]])
    indexed = np.array([[0, 7], [255, 3]], np.uint8)
    write_png(tmp_path / "indexed.png", indexed)
    np.testing.assert_array_equal(read_support_mask(tmp_path / "indexed.png"), [[0, 1], [255, 1]])
    write_png(tmp_path / "rgb.png", np.stack([binary * 0, binary, binary * 0], axis=2))
    np.testing.assert_array_equal(read_support_mask(tmp_path / "rgb.png"), [[0, 1], [1, 0]])
    # a class-index mask (a benchmark's, datasets.custom's): one class against the rest
    np.testing.assert_array_equal(read_support_mask(tmp_path / "indexed.png", 3), [[0, 0], [255, 1]])
    np.testing.assert_array_equal(read_support_mask(tmp_path / "indexed.png", 7), [[0, 1], [255, 0]])
    with pytest.raises(ValueError, match="rgb.png' is not a single-channel class-index PNG"):
        read_support_mask(tmp_path / "rgb.png", 3)
    with pytest.raises(ValueError, match="support class is 255, expected a mask value from 1 to 254"):
        read_support_mask(tmp_path / "indexed.png", 255)


def test_support_class_picks_one_class_of_a_class_index_mask(files, tmp_path, capsys):
    """--support-class K: the class-index mask's class K is the support foreground, the same mask as a 0/255
    file of that class gives; a mask without class K is named."""
    mask = np.asarray(Image.open(files / "mask.png"))
    classes = np.where(mask > 0, 2, 0).astype(np.uint8)
    classes[:3] = 5  # another class: background for class 2
    write_png(tmp_path / "classes.png", classes)
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    assert main(base + ["--support", str(files / "support.png"), str(files / "mask.png"),
                        "--out", str(tmp_path / "binary.png")]) == 0
    assert main(base + ["--support", str(files / "support.png"), str(tmp_path / "classes.png"),
                        "--support-class", "2", "--out", str(tmp_path / "class2.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "class2.png")),
                                  np.asarray(Image.open(tmp_path / "binary.png")))
    capsys.readouterr()
    assert main(base + ["--support", str(files / "support.png"), str(tmp_path / "classes.png"),
                        "--support-class", "4", "--out", str(tmp_path / "class4.png")]) == 1
    assert "classes.png' has no foreground pixel of support class 4" in capsys.readouterr().err


def test_missing_and_mismatched_files_are_named(files, tmp_path, capsys):
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"),
            "--out", str(tmp_path / "m.png"), "--device", "cpu"]
    assert main(base + ["--support", str(files / "support.png"), str(files / "nope.png")]) == 1
    err = capsys.readouterr().err
    assert "support mask" in err and "nope.png" in err
    assert main(base + ["--support", str(files / "support.png"), str(files / "small_mask.png")]) == 1
    err = capsys.readouterr().err
    assert "small_mask.png" in err and "same size" in err
    bad_ckpt = ["--checkpoint", str(tmp_path / "absent.pt")]
    assert main(base[:1] + bad_ckpt + base[3:] + ["--support", str(files / "support.png"), str(files / "mask.png")]) == 1
    assert "absent.pt" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_predict_a_folder_of_queries(files, tmp_path, capsys):
    """A folder (and loose files) of queries: one 0/255 mask per image under --out, same relative path."""
    queries = tmp_path / "queries"
    (queries / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((21, 34, 3), np.uint8)).save(queries / "a.jpg")
    Image.fromarray(np.zeros((40, 18), np.uint8), mode="L").save(queries / "sub" / "b.png")
    (queries / "notes.txt").write_text("not an image")
    (queries / "._a.jpg").write_bytes(b"\x00\x05AppleDouble")  # hidden files and folders are skipped
    (queries / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(queries / ".thumbnails" / "t.png")
    out, overlays = tmp_path / "masks", tmp_path / "overlays"
    support = ["--support", str(files / "support.png"), str(files / "mask.png")]
    common = ["predict", "--checkpoint", str(files / "model.pt"), *support, "--device", "cpu", "--batch", "2"]
    code = main(common + ["--query", str(queries), "--query", str(files / "query.jpg"), "--out", str(out),
                          "--overlay", str(overlays)])
    assert code == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a.png", "query.png", "sub/b.png"]
    for name, shape in (("a.png", (21, 34)), ("sub/b.png", (40, 18)), ("query.png", (37, 53))):
        mask = np.asarray(Image.open(out / name))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(overlays / name)).shape == (*shape, 3)
    # the batched masks equal one-at-a-time predictions
    assert main(common + ["--query", str(queries / "sub" / "b.png"), "--out", str(tmp_path / "single.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "single.png")), np.asarray(Image.open(out / "sub/b.png")))

    existing = tmp_path / "existing"
    existing.mkdir()  # one query into an existing folder: the mask goes inside it
    assert main(common + ["--query", str(queries / "a.jpg"), "--out", str(existing)]) == 0
    assert [p.name for p in existing.iterdir()] == ["a.png"]

    assert main(common + ["--query", str(queries), "--out", str(tmp_path / "one.png")]) == 1
    assert "one.png" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "other" / "a.png")
    assert main(common + ["--query", str(queries / "a.jpg"), "--query", str(tmp_path / "other" / "a.png"),
                          "--out", str(tmp_path / "clash")]) == 1
    assert "would both write 'a.png'" in capsys.readouterr().err


def test_a_model_that_draws_its_hash_at_every_call_predicts_the_same_each_run(tmp_path):
    """model.hash_draw per_call (the reference code) draws from torch's generator: predict seeds it, so
    two runs write the same mask, where two draws from different seeds give different masks."""
    from umtfss.predict import predict_masks, support_tensors

    config = load({"model": {**TINY_MODEL, "hash_draw": "per_call"}, "evaluation": {"test_size": 64}})
    torch.manual_seed(0)
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(tmp_path / "model.pt", config=config, config_sections=["evaluation", "model"], method="unsup",
              model=ckpt.trainable_state(model, backbone), epoch=0, step=0)
    rng = np.random.default_rng(0)
    query = (rng.random((37, 53, 3)) * 255).astype(np.uint8)
    support = (rng.random((30, 44, 3)) * 50).astype(np.uint8)
    support[5:20, 10:30] += np.array([200, 30, 30], np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[5:20, 10:30] = 1
    write_png(tmp_path / "query.png", query)
    write_png(tmp_path / "support.png", support)
    write_png(tmp_path / "mask.png", mask * 255)
    images, masks = support_tensors([(support, mask)], 64)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        draws.append(predict_masks(model.eval(), [query], images, masks, 64, torch.device("cpu"))[0])
    assert (draws[0] != draws[1]).any()  # the mask depends on the draw
    runs = []
    for name in ("a.png", "b.png"):
        torch.manual_seed(len(name) + len(runs))  # whatever state the process is in
        assert main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--support", str(tmp_path / "support.png"),
                     str(tmp_path / "mask.png"), "--query", str(tmp_path / "query.png"), "--out", str(tmp_path / name),
                     "--device", "cpu"]) == 0
        runs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(runs[0], runs[1])


def test_supports_drawn_from_a_prepared_labelled_data_set(files, tmp_path, capsys):
    """--support-from TABLES --support-class K --shots N: N train images where class K is present, seeded,
    named on stderr, the same masks as giving those files with --support; bad draws are named."""
    import json

    from fakes import make_custom_tree

    from umtfss.data.prepare import read_tables

    root = make_custom_tree(tmp_path / "mine", n_train=8, n_val=4, classes=4)
    datasets = {"custom": {"root": str(root), "classes": ["cat", "dog", "car", "tree"], "min_class_pixels": 500}}
    assert main(["prepare", "--config", json.dumps({"datasets": datasets}), "--dataset", "custom",
                 "--out", str(tmp_path / "tables"), "--no-progress"]) == 0
    tables = read_tables(tmp_path / "tables")
    rows = tables.image_classes
    with_dog = set(rows.loc[(rows["split"] == "train") & (rows["class_id"] == 2) & rows["present"], "image_id"])
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    capsys.readouterr()
    assert main(base + ["--support-from", str(tmp_path / "tables"), "--support-class", "2", "--shots", "2",
                        "--out", str(tmp_path / "drawn.png")]) == 0
    named = capsys.readouterr().err.split("umtfss predict: supports ")[1].splitlines()[0].split(", ")
    paths = dict(zip(tables.images["image_path"], tables.images["image_id"]))
    assert len(named) == 2 and {paths[p] for p in named} <= with_dog
    explicit = [arg for image in named for arg in ("--support", image, str(root / "masks" / f"{paths[image]}.png"))]
    assert main(base + explicit + ["--support-class", "2", "--out", str(tmp_path / "given.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "drawn.png")),
                                  np.asarray(Image.open(tmp_path / "given.png")))
    capsys.readouterr()
    draw = base + ["--support-from", str(tmp_path / "tables"), "--out", str(tmp_path / "x.png")]
    assert main(draw + ["--support-class", "2", "--shots", str(len(with_dog) + 1)]) == 1
    assert f"class 2 (dog) is present in {len(with_dog)} train image(s)" in capsys.readouterr().err
    assert main(draw + ["--support-class", "9"]) == 1
    assert "support class 9 is not a class of the tables" in capsys.readouterr().err
    assert main(draw) == 1
    assert "give it with --support-class K" in capsys.readouterr().err
    assert main(draw + ["--support-class", "2", "--support", str(files / "support.png"), str(files / "mask.png")]) == 1
    assert "not both" in capsys.readouterr().err


def test_the_supports_go_through_the_backbone_once_per_run(files, tmp_path, monkeypatch):
    """The supports are the same for every query: predict runs the frozen backbone on them once, not once
    per query and batch, and writes the masks the per-query path writes."""
    from umtfss import predict as predict_module
    from umtfss.backbones.demo import ColorTextureBackbone

    queries = tmp_path / "queries"
    queries.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        write_png(queries / f"{name}.png", (rng.random((30, 44, 3)) * 255).astype(np.uint8))
    forward = ColorTextureBackbone.forward
    seen = []
    monkeypatch.setattr(ColorTextureBackbone, "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    support = ["--support", str(files / "support.png"), str(files / "mask.png")] * 2
    common = ["predict", "--checkpoint", str(files / "model.pt"), *support, "--query", str(queries),
              "--device", "cpu", "--batch", "2"]
    assert main(common + ["--out", str(tmp_path / "shared")]) == 0
    assert sum(seen) == 3 + 2  # three queries, two supports once
    seen.clear()
    monkeypatch.setattr(predict_module, "takes_features", lambda model: False)
    assert main(common + ["--out", str(tmp_path / "per_query")]) == 0
    assert sum(seen) == 3 + 2 * 3  # the supports again with every query
    for name in ("a", "b", "c"):
        shared = np.asarray(Image.open(tmp_path / "shared" / f"{name}.png"))
        assert set(np.unique(shared)) == {0, 255}  # a mask with both sides: the comparison says something
        np.testing.assert_array_equal(shared, np.asarray(Image.open(tmp_path / "per_query" / f"{name}.png")))


def test_supports_drawn_from_workflow_tables_work_from_any_folder(files, tmp_path, monkeypatch, capsys):
    """The workflow writes its tables' paths relative to the folder it ran in: --support-from
    FOLDER/results/custom/prepare finds the images from elsewhere too."""
    import json

    from fakes import make_custom_tree

    workflow = tmp_path / "workflow"
    make_custom_tree(workflow / "data" / "mine", n_train=8, n_val=4, classes=4)
    monkeypatch.chdir(workflow)  # as Snakemake runs prepare: relative root, relative output
    datasets = {"custom": {"root": "data/mine", "classes": ["cat", "dog", "car", "tree"], "min_class_pixels": 500}}
    assert main(["prepare", "--config", json.dumps({"datasets": datasets}), "--dataset", "custom",
                 "--out", "results/custom/prepare", "--no-progress"]) == 0
    import pandas as pd

    assert not Path(pd.read_parquet("results/custom/prepare/images.parquet")["image_path"].iloc[0]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"),
                 "--device", "cpu", "--support-from", str(workflow / "results" / "custom" / "prepare"),
                 "--support-class", "2", "--out", "mask.png"]) == 0, capsys.readouterr().err
    named = capsys.readouterr().err.split("umtfss predict: supports ")[1].splitlines()[0]
    assert named.startswith(str(workflow / "data" / "mine"))
    assert (elsewhere / "mask.png").is_file()


def test_a_moved_checkpoint_names_its_backbone_file_and_takes_another(tmp_path, monkeypatch, capsys):
    """A model checkpoint holds the trained weights only: its frozen backbone is rebuilt from the
    model.checkpoint recorded at training, a relative path. Elsewhere the error says so, and
    --backbone-checkpoint (FewShotSegmenter.load's backbone_checkpoint) points at the file."""
    import torchvision

    from umtfss.api import FewShotSegmenter

    train_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (train_dir / "initmodel").mkdir(parents=True)
    elsewhere.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), train_dir / "initmodel" / "r50.pth")
    monkeypatch.chdir(train_dir)
    config = load({"model": {**TINY_MODEL, "backbone": "resnet50-imagenet", "checkpoint": "initmodel/r50.pth"},
                   "training": {"crop_size": 64}})
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(train_dir / "model.pt", config=config, config_sections=["model", "training"], method="unsup",
              model=ckpt.trainable_state(model, backbone), epoch=0, step=0)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=r"model.pt' holds the trained weights, not its frozen backbone's: backbone "
                                         r"'resnet50-imagenet' is rebuilt from model.checkpoint 'initmodel/r50.pth'"
                                         r".*--backbone-checkpoint PATH"):
        ckpt.load_model(train_dir / "model.pt")
    assert main(["predict", "--checkpoint", str(train_dir / "model.pt"), "--support", str(files_dir(tmp_path)[0]),
                 str(files_dir(tmp_path)[1]), "--query", str(files_dir(tmp_path)[0]), "--out", "m.png",
                 "--device", "cpu"]) == 1
    assert "--backbone-checkpoint PATH" in capsys.readouterr().err
    weights = train_dir / "initmodel" / "r50.pth"
    assert main(["predict", "--checkpoint", str(train_dir / "model.pt"), "--backbone-checkpoint", str(weights),
                 "--support", str(files_dir(tmp_path)[0]), str(files_dir(tmp_path)[1]),
                 "--query", str(files_dir(tmp_path)[0]), "--out", "m.png", "--device", "cpu"]) == 0
    loaded = FewShotSegmenter.load(train_dir / "model.pt", device="cpu", backbone_checkpoint=weights).model
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def files_dir(root):
    """(image, mask) of one small support written under root."""
    image, mask = root / "s.png", root / "s_mask.png"
    if not image.exists():
        write_png(image, np.full((40, 48, 3), 90, np.uint8))
        write_png(mask, (np.arange(40 * 48).reshape(40, 48) % 7 == 0).astype(np.uint8) * 255)
    return image, mask


def test_size_above_the_bound_is_refused_in_one_line(files, tmp_path, capsys):
    """--size 100000 would allocate a 100000x100000 canvas: refused, naming --size and the range."""
    assert main(["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
                 str(files / "mask.png"), "--query", str(files / "query.jpg"), "--out", str(tmp_path / "m.png"),
                 "--device", "cpu", "--size", "100000"]) == 1
    err = capsys.readouterr().err
    assert "--size is 100000, expected 32 to 4096" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.png").exists()


def test_outputs_never_overwrite_the_inputs(files, tmp_path, capsys):
    """A mask or overlay written over a query, support image or support mask, or an overlay over its mask,
    is refused before anything runs, naming the options and the path; the inputs stay as they were."""
    queries = tmp_path / "queries"
    queries.mkdir()
    write_png(queries / "a.png", np.full((21, 34, 3), 90, np.uint8))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(queries / "b.jpg")
    support, mask = tmp_path / "support.png", tmp_path / "mask.png"
    support.write_bytes((files / "support.png").read_bytes())
    mask.write_bytes((files / "mask.png").read_bytes())
    inputs = {path: path.read_bytes() for path in (queries / "a.png", queries / "b.jpg", support, mask)}
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--support", str(support), str(mask), "--device", "cpu"]
    cases = [
        (["--query", str(queries / "a.png"), "--out", str(queries / "a.png")], ("--out", "--query", "a.png")),
        (["--query", str(queries / "b.jpg"), "--out", str(support)], ("--out", "--support", "support.png")),
        (["--query", str(queries / "b.jpg"), "--out", str(tmp_path / "m.png"), "--overlay", str(mask)],
         ("--overlay", "--support", "mask.png")),
        (["--query", str(queries), "--out", str(queries)], ("--out", "--query", str(queries))),
        (["--query", str(queries / "b.jpg"), "--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "m.png")],
         ("--overlay", "--out", "m.png")),
        (["--query", str(queries), "--out", str(tmp_path / "masks"), "--overlay", str(tmp_path / "masks")],
         ("--overlay", "--out", "masks")),
    ]
    for arguments, named in cases:
        assert main(base + arguments) == 1, arguments
        err = capsys.readouterr().err
        assert all(word in err for word in named) and len(err.strip().splitlines()) == 1, (arguments, err)
    # --out a folder holding queries: the mask that would land on a query (a.png's own) is refused
    assert main(base + ["--query", str(queries / "b.jpg"), "--query", str(queries / "a.png"),
                        "--out", str(queries)]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "--query" in err and str(queries / "a.png") in err
    assert {path: path.read_bytes() for path in inputs} == inputs
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "masks").exists()
    assert sorted(p.name for p in queries.iterdir()) == ["a.png", "b.jpg"]


def test_a_single_out_file_must_be_a_png_name(files, tmp_path, capsys):
    """predict writes PNG data: --out o3.jpg (or --overlay o.jpg) would be PNG bytes under a JPEG name."""
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
            str(files / "mask.png"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "o3.jpg")]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "o3.jpg" in err and ".png" in err
    assert main(base + ["--out", str(tmp_path / "o.png"), "--overlay", str(tmp_path / "o.jpg")]) == 1
    assert "--overlay" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main(base + ["--out", str(tmp_path / "O.PNG")]) == 0


def test_a_class_index_mask_without_support_class_is_noted(files, tmp_path, capsys):
    """A class-index mask (0/1/11/20/255) given without --support-class: still every class one foreground,
    but stderr names the file and its values and suggests --support-class; a 0/255 or 0/1/255 mask is quiet."""
    mask = np.asarray(Image.open(files / "mask.png"))
    classes = np.where(mask > 0, 11, 0).astype(np.uint8)
    classes[:3], classes[-3:], classes[5:8, :5] = 1, 20, 255
    write_png(tmp_path / "classes.png", classes)
    binary = np.where(classes == 255, 255, (classes > 0) * 1).astype(np.uint8)
    write_png(tmp_path / "binary.png", binary)
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    capsys.readouterr()
    assert main(base + ["--support", str(files / "support.png"), str(tmp_path / "classes.png"),
                        "--out", str(tmp_path / "merged.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--support-class" in line]
    assert len(notes) == 1 and "classes.png" in notes[0] and "0, 1, 11, 20, 255" in notes[0]
    assert main(base + ["--support", str(files / "support.png"), str(tmp_path / "binary.png"),
                        "--support", str(files / "support.png"), str(files / "mask.png"),
                        "--out", str(tmp_path / "binary_out.png")]) == 0
    assert "--support-class" not in capsys.readouterr().err
    np.testing.assert_array_equal(read_support_mask(tmp_path / "classes.png"),
                                  read_support_mask(tmp_path / "binary.png"))


def test_a_folder_given_for_a_file_is_named_as_a_folder(files, tmp_path, capsys):
    base = ["predict", "--query", str(files / "query.jpg"), "--out", str(tmp_path / "m.png"), "--device", "cpu"]
    support = ["--support", str(files / "support.png"), str(files / "mask.png")]
    for arguments, named in ((["--checkpoint", str(files)] + support, f"checkpoint '{files}' is a folder"),
                             (["--checkpoint", str(files / "model.pt"), "--support", str(files), str(files / "mask.png")],
                              f"support image '{files}' is a folder")):
        assert main(base + arguments) == 1
        assert named in capsys.readouterr().err


def test_an_empty_query_folder_or_checkpoint_file_says_so(files, tmp_path, capsys):
    (tmp_path / "queries").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    support = ["--support", str(files / "support.png"), str(files / "mask.png"), "--device", "cpu"]
    cases = ((["--checkpoint", str(files / "model.pt"), "--query", str(tmp_path / "queries"), "--out", str(tmp_path / "o")],
              "holds no image", "(argument --query)"),
             (["--checkpoint", str(tmp_path / "empty.pt"), "--query", str(files / "query.jpg"),
               "--out", str(tmp_path / "o.png")], "empty.pt", "empty"))
    for arguments, *named in cases:
        assert main(["predict", *arguments, *support]) == 1
        err = capsys.readouterr().err
        assert all(part in err for part in named), err


def test_outputs_under_a_file_or_inside_a_query_folder_are_refused(files, tmp_path, capsys):
    """--out a/x.png where a is a file would fail in mkdir after the model ran; --out (or --overlay) inside a
    --query folder would be read back as queries by the next run on it. Both refused before any work."""
    queries = tmp_path / "queries"
    queries.mkdir()
    write_png(queries / "a.png", np.full((21, 34, 3), 90, np.uint8))
    (tmp_path / "afile").write_text("x")
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
            str(files / "mask.png"), "--device", "cpu"]
    cases = ((["--query", str(files / "query.jpg"), "--out", str(tmp_path / "afile" / "m.png")], "afile' is a file, not a folder"),
             (["--query", str(queries), "--out", str(tmp_path / "afile" / "sub")], "is a file, not a folder"),
             (["--query", str(queries), "--out", str(tmp_path / "m"), "--overlay", str(tmp_path / "afile" / "o")],
              "--overlay"),
             (["--query", str(queries), "--out", str(queries / "masks")], "is inside the --query folder"),
             (["--query", str(queries), "--out", str(tmp_path / "m"), "--overlay", str(queries / "sub" / "o")],
              "--overlay '" + str(queries / "sub" / "o") + "' is inside the --query folder"))
    for arguments, named in cases:
        assert main(base + arguments) == 1, arguments
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in queries.iterdir()) == ["a.png"] and not (tmp_path / "m").exists()


def test_an_unreadable_query_in_a_folder_is_skipped_and_reported(files, tmp_path, capsys):
    """One damaged file in a folder of queries: the others get their masks, each skipped file is named on
    stderr and the run ends with one error line (exit 1) counting them; a single unreadable query names
    --query."""
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a", "c", "d"):
        write_png(queries / f"{name}.png", np.full((21, 34, 3), 90, np.uint8))
    (queries / "b.png").write_bytes((queries / "a.png").read_bytes()[:60])  # truncated
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--support", str(files / "support.png"),
            str(files / "mask.png"), "--device", "cpu", "--batch", "2"]
    capsys.readouterr()
    assert main(base + ["--query", str(queries), "--out", str(tmp_path / "masks")]) == 1
    err = capsys.readouterr().err
    assert f"skipped --query image '{queries / 'b.png'}'" in err
    assert err.strip().splitlines()[-1].startswith("umtfss predict: error: 1 of 4 --query images cannot be read")
    assert "the other 3 masks are written" in err
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.png", "c.png", "d.png"]
    assert main(base + ["--query", str(queries / "b.png"), "--out", str(tmp_path / "b.png")]) == 1
    assert f"--query image '{queries / 'b.png'}' cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
    assert main(base[:4] + [str(queries / "b.png"), str(files / "mask.png"), "--device", "cpu",
                            "--query", str(files / "query.jpg"), "--out", str(tmp_path / "s.png")]) == 1
    assert f"support image '{queries / 'b.png'}' cannot be read" in capsys.readouterr().err


def test_a_photo_jpeg_or_colour_image_given_as_a_mask_is_noted(files, tmp_path, capsys):
    """Every nonzero pixel is foreground and 255 ignore: a JPEG-saved mask (shades near the edges, 250-255
    inside) or a photo silently gives a wrong support; an RGB mask of several colours merges them. Each is
    noted on stderr, naming the file; a 0/255 PNG stays quiet."""
    mask = np.asarray(Image.open(files / "mask.png"))
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=75)
    photo = np.asarray(Image.open(files / "support.png")).copy()
    photo += (np.random.default_rng(0).random(photo.shape) * 50).astype(np.uint8)
    write_png(tmp_path / "photo.png", photo)
    colours = np.zeros((*mask.shape, 3), np.uint8)
    colours[5:20, 10:20], colours[5:20, 20:30] = (128, 0, 0), (0, 64, 0)
    write_png(tmp_path / "colours.png", colours)
    base = ["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"), "--device", "cpu"]
    for name, said in (("mask.jpg", "JPEG-compressed"), ("photo.png", "distinct values"), ("colours.png", "colour image")):
        capsys.readouterr()
        assert main(base + ["--support", str(files / "support.png"), str(tmp_path / name),
                            "--out", str(tmp_path / f"{name}.png")]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        assert len(notes) == 1 and name in notes[0] and said in notes[0], notes
    assert main(base + ["--support", str(files / "support.png"), str(files / "mask.png"), "--out", str(tmp_path / "q.png")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_mask_drawn_only_in_the_alpha_channel_is_named(files, tmp_path, capsys):
    """An RGBA mask, black where opaque, with its shape as transparency: read on black it has no foreground,
    and the error says where the shape is instead of only 'no foreground'."""
    mask = np.asarray(Image.open(files / "mask.png"))
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., 3] = np.where(mask > 0, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert main(["predict", "--checkpoint", str(files / "model.pt"), "--query", str(files / "query.jpg"),
                 "--support", str(files / "support.png"), str(tmp_path / "alpha.png"), "--out", str(tmp_path / "o.png"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "alpha.png' is black where it is opaque" in err and "getchannel('A')" in err, err
