"""End-to-end `evaluate` on a tiny generated val set: scores against independently computed values."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from umtfss.cli import main
from umtfss.config import load
from umtfss.evaluation.predictors import build_predictor
from umtfss.evaluation.run import evaluate
from umtfss.evaluation.sampler import sample_episodes

GREY = 128
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0)}
TEST_SIZE = 80  # 40x20 and 20x40 images scale by whole factors: predictions map exactly onto labels


def _draw(image, label, class_id, top, left, height, width):
    """A coloured rectangle whose outermost ring is labelled ignore (255), like VOC's object borders."""
    image[top:top + height, left:left + width] = COLOURS[class_id]
    label[top:top + height, left:left + width] = 255
    label[top + 1:top + height - 1, left + 1:left + width - 1] = class_id


def _place(rng, h, w, taken):
    """A random box (top, left, height, width) at least 2 px away from every box in `taken`."""
    while True:
        bh, bw = int(rng.integers(5, h // 2 + 3)), int(rng.integers(5, w // 2 + 3))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        if all(top >= t + th + 2 or t >= top + bh + 2 or left >= lf + tw + 2 or lf >= left + bw + 2
               for t, lf, th, tw in taken):
            return top, left, bh, bw


def _make_val_set(root):
    """8 val PNGs, landscape 40x20 and portrait 20x40: class 1 (red) in images 0-5, class 2 (green) in 2-7."""
    rng = np.random.default_rng(0)
    images, image_classes = [], []
    for i in range(8):
        h, w = (20, 40) if i % 2 == 0 else (40, 20)
        image = np.full((h, w, 3), GREY, np.uint8)
        label = np.zeros((h, w), np.uint8)
        taken = []
        for class_id, present in ((1, i < 6), (2, i >= 2)):
            if present:
                taken.append(_place(rng, h, w, taken))
                _draw(image, label, class_id, *taken[-1])
        image_path, label_path = root / f"img{i}.png", root / f"img{i}_label.png"
        Image.fromarray(image).save(image_path)
        Image.fromarray(label).save(label_path)
        images.append((f"img{i}", "val", str(image_path), str(label_path), h, w))
        for class_id in (1, 2):
            pixels = int((label == class_id).sum())
            image_classes.append((f"img{i}", "val", class_id, pixels, pixels > 0))
    tables = root / "tables"
    tables.mkdir()
    pd.DataFrame(images, columns=["image_id", "split", "image_path", "label_path", "height", "width"]).to_parquet(
        tables / "images.parquet")
    pd.DataFrame([(1, "red", 0), (2, "green", 0), (3, "blue", 1)], columns=["class_id", "name", "fold"]).to_parquet(
        tables / "classes.parquet")
    pd.DataFrame(image_classes, columns=["image_id", "split", "class_id", "pixels", "present"]).to_parquet(
        tables / "image_classes.parquet")
    return tables


class QuadrantColourOracle:
    """Foreground = pixels of the supports' foreground colour, but only in the input's top-left quadrant.

    The quadrant covers different parts of the original image under the two resolutions, so the two
    scoring paths give different, independently computable scores.
    """

    def predict(self, query, supports, support_masks, query_valid=None):
        weights = (support_masks == 1).float()[:, :, None]  # 255 = ignore or padding
        colour = (supports * weights).sum((1, 3, 4)) / weights.sum((1, 3, 4))
        to_object = ((query - colour[:, :, None, None]) ** 2).sum(1)
        to_grey = ((query - GREY / 255) ** 2).sum(1)
        foreground = to_object < to_grey
        half = query.shape[-1] // 2
        foreground[:, half:, :] = False
        foreground[:, :, half:] = False
        return torch.stack([~foreground, foreground], 1).float()


def _oracle_build(method, config, checkpoint, device):
    return QuadrantColourOracle() if method == "oracle" else build_predictor(method, config, checkpoint, device)


def _config(resolution, **evaluation):
    evaluation = {"folds": [0], "shots": [1, 2], "seeds": [1, 2], "episodes": 12, "test_size": TEST_SIZE,
                  "batch_size": 5, "resolution": resolution, "device": "cpu", "geometry": "exact", **evaluation}
    return load({"evaluation": evaluation})


def _expected(tables, shot, seed, predicted_region):
    """mIoU, FB-IoU (percent) and per-class IoU computed with plain numpy at the original label size."""
    episodes = sample_episodes(pd.read_parquet(tables / "image_classes.parquet"), [1, 2], shot, 12, seed)
    labels = {r.image_id: np.asarray(Image.open(r.label_path))
              for r in pd.read_parquet(tables / "images.parquet").itertuples()}
    inter, union = {1: 0, 2: 0}, {1: 0, 2: 0}
    fb = np.zeros((2, 2))  # [fg, bg] x [I, U]
    for row in episodes.itertuples():
        label = labels[row.query_id]
        valid = label != 255
        truth = (label == row.class_id) & valid
        pred = (label == row.class_id) & predicted_region(label.shape) & valid
        inter[row.class_id] += (pred & truth).sum()
        union[row.class_id] += (pred | truth).sum()
        fb[0] += [(pred & truth).sum(), (pred | truth).sum()]
        fb[1] += [(~pred & ~truth & valid).sum(), ((~pred | ~truth) & valid).sum()]
    per_class = {c: 100 * inter[c] / union[c] for c in (1, 2) if union[c] or c in set(episodes["class_id"])}
    return np.mean(list(per_class.values())), 50 * (fb[0, 0] / fb[0, 1] + fb[1, 0] / fb[1, 1]), per_class


def _half_of_long_side(shape):  # original: the input quadrant is the first half of the long side
    h, w = shape
    rows, cols = np.indices(shape)
    return cols < w // 2 if w > h else rows < h // 2


def _top_left_quadrant(shape):  # resized: the quadrant is the top-left quarter of the image
    h, w = shape
    rows, cols = np.indices(shape)
    return (rows < h // 2) & (cols < w // 2)


@pytest.mark.parametrize("resolution, region", [("original", _half_of_long_side), ("resized", _top_left_quadrant)])
def test_oracle_scores_match_independent_computation(tmp_path, resolution, region):
    torch.set_num_threads(1)
    tables = _make_val_set(tmp_path)
    out, classes_out = tmp_path / "results" / "eval_pascal.csv", tmp_path / "results" / "eval_pascal_classes.csv"
    evaluate(_config(resolution), "pascal", tables, {"oracle": None}, out, classes_out,
             meta={"embedder": "demo", "run": "t"}, build=_oracle_build)
    scores, per_class = pd.read_csv(out), pd.read_csv(classes_out)
    assert list(scores.columns) == ["method", "backbone", "embedder", "clusters", "fold", "shot", "seed", "miou",
                                    "fbiou", "episodes", "resolution", "geometry", "test_size", "sampling", "run"]
    assert list(per_class.columns) == ["method", "fold", "shot", "seed", "class_id", "class_name", "iou", "episodes"]
    assert len(scores) == 4 and set(scores["episodes"]) == {12} and set(scores["resolution"]) == {resolution}
    assert set(scores["embedder"]) == {"demo"} and set(scores["backbone"]) == {"resnet50-imagenet"}
    assert set(per_class["class_id"]) <= {1, 2}  # fold 0 only
    for row in scores.itertuples():
        miou, fbiou, expected_class = _expected(tables, row.shot, row.seed, region)
        assert row.miou == pytest.approx(miou, abs=0.006)
        assert row.fbiou == pytest.approx(fbiou, abs=0.006)
        got = per_class[(per_class["shot"] == row.shot) & (per_class["seed"] == row.seed)]
        assert dict(zip(got["class_id"], got["iou"])) == pytest.approx(expected_class, abs=0.006)
        assert got["episodes"].sum() == 12
        assert set(got["class_name"]) <= {"red", "green"}
    # the two resolution paths score different pixels
    other = _top_left_quadrant if region is _half_of_long_side else _half_of_long_side
    assert abs(_expected(tables, 1, 1, other)[0] - _expected(tables, 1, 1, region)[0]) > 1


def test_all_background_via_cli(tmp_path, capsys):
    torch.set_num_threads(1)
    tables = _make_val_set(tmp_path)
    out, classes_out = tmp_path / "eval.csv", tmp_path / "eval_classes.csv"
    config = json.dumps({"evaluation": {"folds": [0], "shots": [1], "seeds": [3], "episodes": 7,
                                        "test_size": TEST_SIZE, "device": "cpu"}})
    code = main(["evaluate", "--config", config, "--dataset", "pascal", "--tables", str(tables),
                 "--method", "all-background", "--out", str(out), "--classes-out", str(classes_out),
                 "--meta", "clusters=30", "--meta", "setting=all", "--workers", "1"])
    assert code == 0
    scores = pd.read_csv(out)
    assert scores.loc[0, "miou"] == 0 and scores.loc[0, "clusters"] == 30 and scores.loc[0, "setting"] == "all"
    # all-background: fg IoU 0, bg IoU = true background / valid pixels, over the query images
    episodes = sample_episodes(pd.read_parquet(tables / "image_classes.parquet"), [1, 2], 1, 7, 3)
    background = valid = 0
    for row in episodes.itertuples():
        label = np.asarray(Image.open(tables.parent / f"{row.query_id}_label.png"))
        background += ((label != row.class_id) & (label != 255)).sum()
        valid += (label != 255).sum()
    assert scores.loc[0, "fbiou"] == pytest.approx(50 * background / valid, abs=0.006)
    assert "all-background" in capsys.readouterr().out  # the summary table
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_workers_auto_decodes_in_process_on_a_cpu(tmp_path, monkeypatch, capsys):
    """--workers auto (the workflow's): no worker process on a CPU, where they only take the forward's cores."""
    from umtfss.evaluation import run

    seen = []
    real_loader = run.DataLoader

    def recording_loader(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(run, "DataLoader", recording_loader)
    tables = _make_val_set(tmp_path)
    config = json.dumps({"evaluation": {"folds": [0], "shots": [1], "episodes": 3, "test_size": TEST_SIZE,
                                        "device": "cpu"}})
    args = ["evaluate", "--config", config, "--dataset", "pascal", "--tables", str(tables), "--method",
            "all-background", "--out", str(tmp_path / "o.csv"), "--classes-out", str(tmp_path / "c.csv")]
    assert main(args) == 0 and seen == [0]
    assert main(args + ["--workers", "1"]) == 0 and seen == [0, 1]
    with pytest.raises(SystemExit):
        main(args + ["--workers", "some"])
    assert "--workers 'some' is not auto or a count" in capsys.readouterr().err


def test_errors_are_reported(tmp_path, capsys):
    tables = _make_val_set(tmp_path)
    fold0 = json.dumps({"evaluation": {"folds": [0], "episodes": 4, "test_size": 32, "device": "cpu"}})
    args = ["evaluate", "--config", fold0, "--dataset", "pascal", "--tables", str(tables),
            "--out", str(tmp_path / "o.csv"), "--classes-out", str(tmp_path / "c.csv"), "--workers", "0"]
    assert main(args + ["--method", "unsup"]) == 1
    assert "needs a checkpoint" in capsys.readouterr().err
    assert main(args[:6] + [str(tmp_path / "nowhere")] + args[7:] + ["--method", "all-background"]) == 1
    assert "images.parquet" in capsys.readouterr().err
    # fold 1 holds class 3, which is in no image: a clear error, nothing written
    assert main(args[:2] + ['{"evaluation": {"folds": [0, 1]}}'] + args[3:] + ["--method", "all-background"]) == 1
    assert "class 3: 0" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_prototype_threshold_with_registry_backbone(tmp_path):
    """The training-free baseline built from the backbone registry separates the coloured objects."""
    torch.set_num_threads(1)
    tables = _make_val_set(tmp_path)
    config = load({"model": {"backbone": "demo-colortexture"},
                   "evaluation": {"folds": [0], "shots": [1], "seeds": [0], "episodes": 10, "test_size": 160,
                                  "device": "cpu", "threshold": 0.7}})
    scores, per_class = evaluate(config, "pascal", tables, {"prototype-threshold": None, "all-background": None},
                                 tmp_path / "e.csv", tmp_path / "c.csv")
    by_method = scores.set_index("method")
    assert by_method.loc["all-background", "miou"] == 0
    assert by_method.loc["prototype-threshold", "miou"] > 30
    assert by_method.loc["prototype-threshold", "fbiou"] > by_method.loc["all-background", "fbiou"]


def test_checkpoint_with_fold_placeholder_loads_one_model_per_fold(tmp_path):
    """sup and finetune models are trained per fold: '{fold}' in a checkpoint path picks the fold's model."""
    tables = _make_val_set(tmp_path)
    built = []

    def build(method, config, checkpoint, device):
        built.append(checkpoint)
        return _oracle_build(method, config, checkpoint, device)

    import pandas as pd

    classes = pd.read_parquet(tables / "classes.parquet")
    classes = classes[classes.class_id != 3].copy()
    classes.loc[classes.class_id == 2, "fold"] = 1  # one class per fold, both with val images
    classes.to_parquet(tables / "classes.parquet")
    config = _config("original", folds=[0, 1], shots=[1], seeds=[1, 2])
    scores, _ = evaluate(config, "pascal", tables, {"oracle": "models/fold{fold}/checkpoint.pt"},
                         tmp_path / "s.csv", tmp_path / "c.csv", build=build)
    assert built == ["models/fold0/checkpoint.pt", "models/fold1/checkpoint.pt"]
    assert sorted(scores["fold"]) == [0, 0, 1, 1]


class GeneratorDrawPredictor:
    """Foreground where torch's global generator says so: stands for a model that draws at inference
    (model.hash_draw per_call), whose scores depend on the generator's state."""

    def predict(self, query, supports, support_masks, query_valid=None):
        foreground = torch.rand(query.shape[0], *query.shape[-2:]) < 0.5
        return torch.stack([~foreground, foreground], 1).float()


def test_each_evaluation_seed_seeds_torch_so_drawing_models_repeat(tmp_path):
    """evaluate seeds torch's generator with each evaluation seed: a predictor that draws from it scores
    the same whatever state the process was in, and differently for another seed."""
    tables = _make_val_set(tmp_path)
    config = _config("original", shots=[1], seeds=[1, 2])
    runs = []
    for state in (11, 12):
        torch.manual_seed(state)
        scores, _ = evaluate(config, "pascal", tables, {"drawing": None}, tmp_path / f"s{state}.csv",
                             tmp_path / f"c{state}.csv", build=lambda *args: GeneratorDrawPredictor())
        runs.append(scores.sort_values("seed")["miou"].to_numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert runs[0][0] != runs[0][1]  # seed 1 and seed 2 draw differently


class RecordingModelPredictor:
    """A predictor around a one-conv network ('model', as ModelPredictor has) that notes, per batch,
    whether CPU bfloat16 autocast is on, the query's layout and the network's weight layout."""

    def __init__(self):
        self.model = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.calls = []

    def predict(self, query, supports, support_masks, query_valid=None):
        self.calls.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16,
                           query.is_contiguous(memory_format=torch.channels_last),
                           self.model.weight.is_contiguous(memory_format=torch.channels_last)))
        return self.model(query)


def test_cpu_bfloat16_evaluation(tmp_path):
    """evaluation.cpu_precision bfloat16: every meta-test batch runs under CPU bfloat16 autocast, on a
    channels-last query through a channels-last network; float32 (the default) uses neither. The
    prototype-threshold baseline still separates the coloured objects in bfloat16."""
    tables = _make_val_set(tmp_path)
    for precision in ("float32", "bfloat16"):
        predictor = RecordingModelPredictor()
        evaluate(_config("original", shots=[1], seeds=[1], cpu_precision=precision), "pascal", tables,
                 {"recording": None}, tmp_path / "s.csv", tmp_path / "c.csv", build=lambda *args: predictor)
        assert predictor.calls and set(predictor.calls) == {(precision == "bfloat16",) * 3}
    config = load({"model": {"backbone": "demo-colortexture"},
                   "evaluation": {"folds": [0], "shots": [1], "seeds": [0], "episodes": 10, "test_size": 160,
                                  "device": "cpu", "threshold": 0.7, "cpu_precision": "bfloat16"}})
    scores, _ = evaluate(config, "pascal", tables, {"prototype-threshold": None}, tmp_path / "e.csv", tmp_path / "c.csv")
    assert scores["miou"].iloc[0] > 30


@pytest.mark.parametrize("resolution, geometry, test_size", [("original", "exact", TEST_SIZE),
                                                             ("original", "reference", 75), ("resized", "exact", TEST_SIZE)])
def test_batches_mark_padding_for_the_model(tmp_path, resolution, geometry, test_size):
    """Query pixels outside the resized image are not valid; support masks are 255 there."""
    from umtfss.evaluation.run import EpisodeBatches, _image_paths
    from umtfss.evaluation.sampler import sample_episodes

    tables = _make_val_set(tmp_path)
    images = pd.read_parquet(tables / "images.parquet")
    episodes = sample_episodes(pd.read_parquet(tables / "image_classes.parquet"), [1, 2], 1, 6, 0)
    batch = EpisodeBatches(episodes, _image_paths(images), 3, test_size, resolution, geometry)[0]
    sizes = dict(zip(images["image_id"], zip(images["height"], images["width"])))

    def extent(image_id):
        h, w = sizes[image_id]
        if resolution == "resized":
            return test_size, test_size
        if geometry == "reference":  # 75 -> 72 (a multiple of 8), the short side 37.5 -> 37 -> 32
            return (72, 32) if h >= w else (32, 72)
        return (test_size, round(w * test_size / h)) if h >= w else (round(h * test_size / w), test_size)

    padded_somewhere = False
    for row in range(3):
        rows, cols = extent(episodes["query_id"][row])
        valid = batch["query_valid"][row]
        assert abs(int(valid.sum()) - rows * cols) <= (0 if geometry == "reference" else test_size)  # rounding
        assert not valid[rows:].any() and not valid[:, cols:].any() and valid[: rows - 1, : cols - 1].all()
        for shot, support_id in enumerate(episodes["support_ids"][row]):
            mask = batch["support_masks"][row, shot]
            rows, cols = extent(support_id)
            assert (mask[rows + 1:] == 255).all() and (mask[:, cols + 1:] == 255).all()
            padded_somewhere |= rows < test_size - 1 or cols < test_size - 1
    assert padded_somewhere == (resolution == "original")


def test_reference_geometry_extents_and_scoring_map():
    """The reference test code's pixel geometry, against numbers worked out by hand."""
    from umtfss.transforms import resized_extent, unpad_to

    assert resized_extent(375, 500, 473, "reference") == (352, 472)  # 354.75 -> 354 -> 352; 473 -> 472
    assert resized_extent(500, 375, 473, "reference") == (472, 352)
    assert resized_extent(375, 500, 473, "exact") == (355, 473)
    assert resized_extent(1000, 5, 473, "reference") == (472, 2)  # under 8 pixels: not floored to 0
    with pytest.raises(ValueError, match="geometry"):
        resized_extent(10, 10, 8, "hsnet")
    # a prediction that ramps with the canvas column: bilinear with align_corners maps label column x of
    # the longer side L = 500 onto canvas column x * (473 - 1) / (500 - 1), whatever the image's extent
    ramp = torch.arange(473, dtype=torch.float32).expand(473, 473)[None].repeat(2, 1, 1)
    scored = unpad_to(ramp, (352, 472), (375, 500), "reference")
    assert scored.shape == (2, 375, 500)
    torch.testing.assert_close(scored[0, 10], torch.arange(500, dtype=torch.float32) * 472 / 499, rtol=0, atol=1e-3)
    exact = unpad_to(ramp, (355, 473), (375, 500), "exact")
    assert exact.shape == (2, 375, 500) and float(exact[0, 0, -1]) == pytest.approx(472, abs=0.6)


def test_geometry_is_recorded_and_changes_the_scores(tmp_path):
    torch.set_num_threads(1)
    tables = _make_val_set(tmp_path)
    scores = {}
    for geometry in ("exact", "reference"):
        out = tmp_path / geometry / "eval_pascal.csv"
        evaluate(_config("original", geometry=geometry, test_size=75), "pascal", tables, {"oracle": None}, out,
                 tmp_path / geometry / "classes.csv", build=_oracle_build)
        scores[geometry] = pd.read_csv(out)
        assert set(scores[geometry]["geometry"]) == {geometry}
    assert not np.allclose(scores["exact"]["miou"], scores["reference"]["miou"])
    resized = tmp_path / "resized.csv"
    evaluate(_config("resized"), "pascal", tables, {"oracle": None}, resized, tmp_path / "rc.csv", build=_oracle_build)
    assert pd.read_csv(resized)["geometry"].isna().all()  # no pad geometry when scoring at test size


def test_feature_cache_reuses_the_backbone_and_scores_the_same(tmp_path, monkeypatch, capsys):
    """evaluation.feature_cache_mb: a trained model and prototype-threshold run their frozen backbone once per
    test image, not once per query and support, and score exactly as with the cache off (0)."""
    from umtfss.backbones.demo import ColorTextureBackbone
    from umtfss.training import checkpoint as ckpt

    torch.set_num_threads(1)
    tables = _make_val_set(tmp_path)
    model_cfg = {"backbone": "demo-colortexture", "dim": 16, "heads": 2, "layers": 1, "prototypes_fg": 4,
                 "prototypes_bg": 8, "hash_bits": 8, "hash_iterations": 2}
    config = load({"model": model_cfg, "evaluation": {"folds": [0], "shots": [1, 2], "seeds": [1], "episodes": 12,
                                                      "test_size": 96, "batch_size": 5, "device": "cpu"}})
    torch.manual_seed(0)
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(tmp_path / "model.pt", config=config, method="unsup", model=ckpt.trainable_state(model, backbone),
              epoch=0, step=0)
    forward = ColorTextureBackbone.forward
    seen = []
    monkeypatch.setattr(ColorTextureBackbone, "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    tables_by_cache = []
    for mb in (0, 64):
        seen.clear()
        config["evaluation"]["feature_cache_mb"] = mb
        scores, per_class = evaluate(config, "pascal", tables, {"prototype-threshold": None,
                                                                "unsup": str(tmp_path / "model.pt")},
                                     tmp_path / f"s{mb}.csv", tmp_path / f"c{mb}.csv")
        tables_by_cache.append((scores, per_class, sum(seen)))
    (off, off_classes, off_images), (on, on_classes, on_images) = tables_by_cache
    pd.testing.assert_frame_equal(off, on)
    pd.testing.assert_frame_equal(off_classes, on_classes)
    assert off["miou"].nunique() > 1  # the scores say something
    slots = 2 * 12 * (2 + 3)  # two methods; 12 episodes of 1 query + 1 support, 12 of 1 + 2
    assert off_images == slots
    assert on_images == 2 * 8  # each method: once per val image (each holds class 1 or 2, fold 0's)
    err = capsys.readouterr().err
    assert "unsup, fold 0: feature cache:" in err and "prototype-threshold, fold 0: feature cache:" in err


@pytest.mark.parametrize("resolution, geometry", [("original", "exact"), ("original", "reference"), ("resized", "exact")])
def test_one_resize_of_the_label_gives_every_class_its_episode_mask(resolution, geometry):
    """The test-image cache resizes an image's class-id label once; an episode's mask is binary_mask of it,
    which must equal resizing that class's binary mask (nearest neighbour commutes with the mapping)."""
    from umtfss.episode import binary_mask
    from umtfss.evaluation.image_cache import to_test_size
    from umtfss.transforms import resize_pad, resize_square

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 2, 7, 255], np.uint8), size=(37, 61))
    prepared = to_test_size(image, label, 80, resolution, geometry)
    for class_id in (1, 2, 7):
        if resolution == "original":
            tensor, mask, extent = resize_pad(image, binary_mask(label, class_id), 80, geometry)
        else:
            tensor, mask, extent = resize_square(image, binary_mask(label, class_id), 80)
        assert torch.equal(prepared.image, tensor) and prepared.extent == extent
        np.testing.assert_array_equal(binary_mask(prepared.label_at_test_size, class_id), mask.numpy())
    assert prepared.nbytes == 3 * 80 * 80 * 4 + label.nbytes + 80 * 80


@pytest.mark.parametrize("resolution", ["original", "resized"])
def test_image_cache_decodes_each_test_image_once_and_scores_the_same(tmp_path, monkeypatch, capsys, resolution):
    """evaluation.image_cache_mb: evaluate runs fold by fold and decodes each test image once for all
    methods, shots and seeds; the tables equal those of decoding per batch (0), listed method by method."""
    from umtfss.evaluation import run

    tables = _make_val_set(tmp_path)
    classes = pd.read_parquet(tables / "classes.parquet")
    classes = classes[classes.class_id != 3].copy()
    classes.loc[classes.class_id == 2, "fold"] = 1  # two folds of one class each
    classes.to_parquet(tables / "classes.parquet")
    read = run.read_rgb
    decoded = []
    monkeypatch.setattr(run, "read_rgb", lambda path: (decoded.append(path), read(path))[1])
    results = []
    for mb in (0, 64):
        decoded.clear()
        config = _config(resolution, folds=[0, 1], image_cache_mb=mb)
        scores, per_class = evaluate(config, "pascal", tables, {"oracle": None, "all-background": None},
                                     tmp_path / f"s{mb}.csv", tmp_path / f"c{mb}.csv", build=_oracle_build)
        results.append((scores, per_class, list(decoded)))
    (off, off_classes, off_decoded), (on, on_classes, on_decoded) = results
    pd.testing.assert_frame_equal(off, on)
    pd.testing.assert_frame_equal(off_classes, on_classes)
    assert off["miou"].nunique() > 1
    assert list(on["method"]) == ["oracle"] * 8 + ["all-background"] * 8  # folds x shots x seeds, per method
    assert list(on["fold"][:8]) == [0] * 4 + [1] * 4 and list(on["shot"][:4]) == [1, 1, 2, 2]
    assert len(on_decoded) == len(set(on_decoded)) <= 8 < len(off_decoded)  # once each, not once per batch
    assert "test-image cache: " in capsys.readouterr().err
    assert (tmp_path / "s0.csv").read_bytes() == (tmp_path / "s64.csv").read_bytes()


def test_a_class_without_episode_counts_as_zero_as_in_the_reference_codes(tmp_path, capsys):
    """evaluation.unseen_classes: with one episode, one of fold 0's two classes gets none; 'zero' (the
    default) divides by both classes and lists the missing one with 0 episodes, 'skip' leaves it out."""
    tables = _make_val_set(tmp_path)
    rows = {}
    for rule in ("zero", "skip"):
        config = _config("original", shots=[1], seeds=[1], episodes=1, unseen_classes=rule)
        scores, per_class = evaluate(config, "pascal", tables, {"oracle": None}, tmp_path / "s.csv",
                                     tmp_path / "c.csv", build=_oracle_build)
        rows[rule] = (float(scores["miou"].iloc[0]), per_class)
    zero, skip = rows["zero"], rows["skip"]
    assert list(skip[1]["episodes"]) == [1] and sorted(zero[1]["episodes"]) == [0, 1]
    assert skip[0] > 0 and zero[0] == pytest.approx(round(skip[0] / 2, 2), abs=0.01)
    assert zero[1].loc[zero[1]["episodes"] == 0, "iou"].item() == 0.0
    assert "received no episode; counted as IoU 0 in the mIoU (evaluation.unseen_classes)" in capsys.readouterr().err


# ------------------------------------------------------------ outputs and checkpoints checked first (audit)


def _never_build(method, config, checkpoint, device):
    raise AssertionError("a predictor was built: the check came after work had started")


def _two_fold_val_set(tmp_path):
    """The val set with class 1 as fold 0 and class 2 as fold 1."""
    tables = _make_val_set(tmp_path)
    classes = pd.read_parquet(tables / "classes.parquet")
    classes = classes[classes.class_id != 3].copy()
    classes.loc[classes.class_id == 2, "fold"] = 1
    classes.to_parquet(tables / "classes.parquet")
    return tables


def test_outputs_that_would_replace_an_input_or_fail_at_the_end_are_refused_before_any_work(tmp_path, capsys):
    from umtfss.training import checkpoint as ckpt

    tables = _make_val_set(tmp_path)
    model = tmp_path / "model.pt"
    ckpt.save(model, config=load({}), method="unsup", model={})
    afile = tmp_path / "afile"
    afile.write_text("x")
    inputs = {tables / "images.parquet": "a file of --tables", model: "a --method checkpoint",
              tmp_path / "img0_label.png": "a test image or label"}
    cases = [*((path, tmp_path / "c.csv", what) for path, what in inputs.items()),
             (tmp_path / "same.csv", tmp_path / "same.csv", "--classes-out '.*same.csv' is also --out"),
             (tmp_path, tmp_path / "c.csv", "is a folder"),
             (afile / "eval.csv", tmp_path / "c.csv", "'.*afile' is a file, not a folder")]
    for out, classes_out, expected in cases:
        before = {p: p.read_bytes() for p in inputs}
        with pytest.raises(ValueError, match=expected):
            evaluate(_config("original"), "pascal", tables, {"unsup": str(model)}, out, classes_out, build=_never_build)
        assert before == {p: p.read_bytes() for p in inputs}
    # the command line also keeps the --config file
    config_file = tmp_path / "config.yaml"
    config_file.write_text("evaluation: {folds: [0], shots: [1], episodes: 2, test_size: 80, device: cpu}\n")
    assert main(["evaluate", "--config", str(config_file), "--dataset", "pascal", "--tables", str(tables),
                 "--method", "all-background", "--out", str(config_file), "--classes-out", str(tmp_path / "c.csv")]) == 1
    assert "is also --config" in capsys.readouterr().err and config_file.read_text().startswith("evaluation:")


def test_a_later_folds_missing_checkpoint_is_reported_before_the_first_fold_is_scored(tmp_path, monkeypatch):
    from umtfss.evaluation import run
    from umtfss.training import checkpoint as ckpt

    monkeypatch.setattr(run, "build_predictor", _never_build)  # evaluate's own builder: checkpoints are files

    tables = _two_fold_val_set(tmp_path)
    ckpt.save(tmp_path / "fold0" / "checkpoint.pt", config=load({}), method="sup", model={})
    config = _config("original", folds=[0, 1], shots=[1], seeds=[1], episodes=2)
    for given, expected in ((tmp_path / "fold{fold}" / "checkpoint.pt", r"\(fold 1\) does not exist"),
                            (tmp_path / "fold{fold}", r"\(fold 0\) is a folder; expected a checkpoint file")):
        with pytest.raises((FileNotFoundError, ValueError), match=expected):
            evaluate(config, "pascal", tables, {"sup": str(given)}, tmp_path / "s.csv", tmp_path / "c.csv")
    with pytest.raises(ValueError, match="reference predictor and takes no checkpoint"):
        evaluate(config, "pascal", tables, {"all-background": None, "prototype-threshold": str(tmp_path / "fold0")},
                 tmp_path / "s.csv", tmp_path / "c.csv")


def test_a_trained_methods_rows_name_the_backbone_of_its_checkpoint(tmp_path):
    """A config without a model section (schema default resnet50-imagenet) must not label a demo model's
    scores; nor the embedding and clustering sections the embedder and N its pseudo episodes came from."""
    from umtfss.training import checkpoint as ckpt

    tables = _make_val_set(tmp_path)
    model = tmp_path / "model.pt"
    ckpt.save(model, config=load({"model": {"backbone": "demo-colortexture"}}), method="unsup", model={},
              pseudo_tasks={"embedder": "dino-vits8-d128", "clusters": 21})

    def build(method, config, checkpoint, device):
        return QuadrantColourOracle() if checkpoint else build_predictor(method, config, checkpoint, device)

    config = _config("original", shots=[1], seeds=[1], episodes=2)
    assert config["model"]["backbone"] == "resnet50-imagenet"
    scores, _ = evaluate(config, "pascal", tables, {"all-background": None, "unsup": str(model)},
                         tmp_path / "s.csv", tmp_path / "c.csv", build=build)
    assert dict(zip(scores["method"], scores["backbone"])) == {"all-background": "resnet50-imagenet",
                                                               "unsup": "demo-colortexture"}
    rows = scores.set_index("method")
    assert (rows.loc["unsup", "embedder"], int(rows.loc["unsup", "clusters"])) == ("dino-vits8-d128", 21)
    assert (rows.loc["all-background", "embedder"], int(rows.loc["all-background", "clusters"])) == (
        config["embedding"]["backbone"], config["clustering"]["clusters"])
    scores, _ = evaluate(config, "pascal", tables, {"unsup": str(model)}, tmp_path / "s.csv", tmp_path / "c.csv",
                         meta={"backbone": "mine", "clusters": "50"}, build=build)
    assert (list(scores["backbone"]), list(scores["embedder"]), list(scores["clusters"].astype(str))) == (
        ["mine"], ["dino-vits8-d128"], ["50"])


def test_too_few_images_for_the_shots_names_the_config_key_fold_and_classes(tmp_path):
    """Classes 1 and 2 are in 6 val images each: 6 shots need a query and 6 distinct supports. The error
    names the config key, the fold and its classes, not only the sampler's counts."""
    tables = _make_val_set(tmp_path)
    with pytest.raises(ValueError, match=r"config key 'evaluation.shots' holds 6, fold 0 \(classes 1 red, 2 green\)"):
        evaluate(_config("original", shots=[1, 6]), "pascal", tables, {"oracle": None}, tmp_path / "s.csv",
                 tmp_path / "c.csv", build=_never_build)
