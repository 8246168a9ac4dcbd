"""Training: augmentation, labelled episodes, fine-tuning subsets, the loop, its log and exact resume."""

import csv
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from umtfss.config import load
from umtfss.episode import Episode
from umtfss.io import write_png
from umtfss.training import checkpoint as ckpt
from umtfss.training.augment import Augmentation
from umtfss.training.sources import EpisodeDataset, LabelledEpisodes, finetune_subset
from umtfss.training.train import NonFiniteLossError, _resume_conflicts, _train_step, lr_factor, train

torch.set_num_threads(1)

TINY_MODEL = {"backbone": "demo-colortexture", "dim": 16, "heads": 2, "layers": 1, "prototypes_fg": 4,
              "prototypes_bg": 8, "hash_bits": 8, "hash_iterations": 2}


def tiny_config(**training):
    settings = {"epochs": 2, "batch_size": 2, "crop_size": 48, "workers": 0, "device": "cpu"}
    settings.update(training)
    return load({"model": dict(TINY_MODEL), "training": settings})


def square_pair(seed: int, size=(40, 52)):
    """An image with a red square on dark noise and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 60).astype(np.uint8)
    mask = np.zeros(size, np.uint8)
    top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    mask[top : top + size[0] // 2, left : left + size[1] // 2] = 1
    image[mask == 1] = (210, 40, 40)
    return image, mask


class SquareEpisodes:
    """A stand-in pseudo-episode source: red squares to segment."""

    def __init__(self, count=6):
        self.count = count

    def __len__(self):
        return self.count

    def episode(self, index, rng, shots):
        query = square_pair(int(rng.integers(1 << 30)))
        supports = [square_pair(int(rng.integers(1 << 30))) for _ in range(shots)]
        return Episode(query[0], query[1], [s[0] for s in supports], [s[1] for s in supports], class_id=index)


# ------------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((70, 90), np.uint8)
    mask[10:50, 20:70] = 1
    mask[60:, :] = 255
    image = np.zeros((70, 90, 3), np.uint8)
    image[..., 1] = 255  # green = background
    image[mask == 1] = (255, 0, 0)  # red = object
    image[mask == 255] = (0, 0, 255)  # blue = ignore region
    aug = Augmentation(crop_size=64, scale_min=0.8, scale_max=1.2, rotation=20, pad_fill="zero")
    ignore_seen = False
    for _ in range(10):
        img, msk, valid = aug(image, mask, rng)
        assert img.shape == (3, 64, 64) and msk.shape == (64, 64) and msk.dtype == torch.long
        # away from edges (bilinear blur), the colour tells the mask value
        dominant = img.argmax(0)
        bright = img.max(0).values > 0.9
        agree = ((msk == 1) & (dominant == 0)) | ((msk == 0) & (dominant == 1)) | ((msk == 255) & (dominant == 2))
        assert agree[bright].float().mean() > 0.97
        # where the image is black (rotation/pad fill), the mask is 255
        black = img.max(0).values == 0
        assert (msk[black] == 255).all()
        # validity is False exactly on the fill: the mask's own ignore region (blue) stays valid input
        assert not valid[black].any() and valid[bright].all()
        ignore_seen |= bool(valid[(msk == 255) & bright].any())
    assert ignore_seen


def test_the_crop_is_drawn_again_until_it_keeps_the_object():
    """training.crop_foreground (reference 0.85, up to 31 more draws): a crop rarely cuts the object away."""
    mask = np.zeros((120, 120), np.uint8)
    mask[20:52, 70:102] = 1  # an object that 17 % of the 64 px windows keep at 85 %
    image = np.zeros((120, 120, 3), np.uint8)
    kept = {}
    for fraction in (0.85, 0.0):
        aug = Augmentation(crop_size=64, scale_min=1.0, scale_max=1.0, rotation=0, flip=False, blur=False,
                           crop_foreground=fraction)
        rng = np.random.default_rng(0)
        kept[fraction] = [int((aug(image, mask, rng)[1] == 1).sum()) / int(mask.sum()) for _ in range(40)]
    assert sum(k >= 0.85 for k in kept[0.85]) >= 38  # 1 - 0.83 ** 32 = 99.8 % of the crops
    assert sum(k >= 0.85 for k in kept[0.0]) <= 15  # one uniform draw: 17 %
    rng = np.random.default_rng(0)
    empty = Augmentation(crop_size=64, rotation=0, crop_foreground=0.85)(image, np.zeros_like(mask), rng)
    assert empty[0].shape == (3, 64, 64)  # no foreground: the first crop


@pytest.mark.parametrize("p, low, high", [(0.0, 0, 0), (0.5, 25, 55), (1.0, 76, 80)])
def test_rotation_happens_with_its_probability(p, low, high):
    """training.rotation_p (reference 0.5): a rotated square image shows fill in its corners."""
    image = np.full((64, 64, 3), 255, np.uint8)
    aug = Augmentation(crop_size=64, scale_min=1.0, scale_max=1.0, rotation=30, rotation_p=p, blur=False,
                       pad_fill="zero")
    rng = np.random.default_rng(1)
    rotated = sum(bool((aug(image, np.zeros((64, 64), np.uint8), rng)[2] == 0).any()) for _ in range(80))
    assert low <= rotated <= high


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_small_image_is_padded_with_the_fill_and_ignore(fill):
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.ones((20, 30), np.uint8)
    aug = Augmentation(crop_size=48, scale_min=1.0, scale_max=1.0, rotation=0, pad_fill=fill)
    img, msk, valid = aug(image, mask, np.random.default_rng(1))
    assert img.shape == (3, 48, 48)
    assert torch.equal(valid, msk == 1)  # the image's 20 x 30 pixels, nothing of the padding
    assert (msk == 1).sum() == 20 * 30 and (msk == 255).sum() == 48 * 48 - 600
    expected = torch.tensor([0.485, 0.456, 0.406] if fill == "mean" else [0.0, 0.0, 0.0])  # reference: ImageNet mean
    torch.testing.assert_close(img[:, msk == 255], expected[:, None].expand(3, int((msk == 255).sum())))
    assert torch.allclose(img[:, msk == 1], torch.tensor(200 / 255))
    with pytest.raises(ValueError, match="pad_fill"):
        Augmentation(crop_size=48, pad_fill="grey")


def test_blur_and_flip_switches():
    """Half the draws blur the image (a sharp edge gets intermediate values); blur / flip false never do."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 12:] = 255
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 12:] = 1

    def draws(**switches):
        aug = Augmentation(crop_size=32, scale_min=1.0, scale_max=1.0, rotation=0, **switches)
        return [aug(image, mask, np.random.default_rng(seed))[:2] for seed in range(16)]

    def blurred(img):
        return bool(((img > 0.05) & (img < 0.95)).any())

    def flipped(msk):
        return bool(msk[0, 0] == 1)  # the object was on the right

    both = draws()
    assert 3 <= sum(blurred(img) for img, _ in both) <= 13 and 3 <= sum(flipped(m) for _, m in both) <= 13
    assert not any(blurred(img) for img, _ in draws(blur=False))
    assert not any(flipped(m) for _, m in draws(flip=False))


def test_rotation_fills_corners_with_ignore():
    image = np.full((64, 64, 3), 255, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    aug = Augmentation(crop_size=64, scale_min=1.0, scale_max=1.0, rotation=30)
    rotated = [aug(image, mask, np.random.default_rng(s)) for s in range(6)]
    assert any((m == 255).sum() > 50 for _, m, _ in rotated)
    assert all(set(torch.unique(m).tolist()) <= {0, 255} for _, m, _ in rotated)
    assert all(torch.equal(valid, m == 0) for _, m, valid in rotated)  # the corners are fill, not image


# ------------------------------------------------------------------------- labelled episodes

NOVEL = [1, 2]  # fold 0 of a 4-class toy data set: classes 1, 2 novel, 3, 4 base


@pytest.fixture(scope="module")
def toy_tables(tmp_path_factory):
    """Six train images: each label holds some of classes 1..4, 255 on a border row."""
    root = tmp_path_factory.mktemp("toy")
    contents = {"a": [3], "b": [3, 1], "c": [4, 2], "d": [4], "e": [3, 4], "f": [1]}
    images, image_classes = [], []
    for image_id, classes in contents.items():
        label = np.zeros((32, 40), np.uint8)
        for k, class_id in enumerate(classes):
            label[4 + 12 * k : 14 + 12 * k, 5:35] = class_id
        label[-1, :] = 255
        image = np.zeros((32, 40, 3), np.uint8)
        image[..., 0] = label * 40
        write_png(root / f"{image_id}.png", image)
        write_png(root / f"{image_id}_label.png", label)
        images.append({"image_id": image_id, "split": "train", "image_path": str(root / f"{image_id}.png"),
                       "label_path": str(root / f"{image_id}_label.png"), "height": 32, "width": 40})
        for class_id in classes:
            image_classes.append({"image_id": image_id, "split": "train", "class_id": class_id,
                                  "pixels": 300, "present": True})
    classes = pd.DataFrame({"class_id": [1, 2, 3, 4], "name": list("wxyz"), "fold": [0, 0, 1, 1]})
    return SimpleNamespace(images=pd.DataFrame(images), classes=classes, image_classes=pd.DataFrame(image_classes))


def test_labelled_episodes_use_base_classes_and_hide_novel_pixels(toy_tables):
    source = LabelledEpisodes(toy_tables, "toy", fold=0)
    assert source.base_classes == [3, 4] and source.novel_classes == NOVEL
    assert source.query_ids == ["a", "b", "c", "d", "e"]  # f holds only a novel class
    for index in range(len(source)):
        for seed in range(4):
            episode = source.episode(index, np.random.default_rng(seed), shots=2)
            assert episode.class_id in (3, 4)
            assert episode.query_id not in episode.support_ids
            label = np.asarray(Image.open(toy_tables.images.set_index("image_id").loc[episode.query_id, "label_path"]))
            assert set(np.unique(episode.query_mask)) <= {0, 1, 255}
            np.testing.assert_array_equal(episode.query_mask == 1, label == episode.class_id)
            assert (episode.query_mask[np.isin(label, NOVEL)] == 0).all()  # novel pixels -> background
            assert (episode.query_mask[label == 255] == 255).all()
            for sid, smask in zip(episode.support_ids, episode.support_masks):
                assert (smask == 1).any(), f"support {sid} lacks class {episode.class_id}"


def test_episode_class_is_any_base_class_in_the_query_supports_where_it_is_present(toy_tables, tmp_path):
    """PFENet's training draw: the pixel threshold picks query and support images, not the query's class."""
    label = np.zeros((32, 40), np.uint8)
    label[4:14, 5:35] = 3  # present
    label[20:22, 5:10] = 4  # 10 pixels: under the threshold, still a class of the episode
    image = np.zeros((32, 40, 3), np.uint8)
    write_png(tmp_path / "g.png", image)
    write_png(tmp_path / "g_label.png", label)
    write_png(tmp_path / "h_label.png", np.where(label == 4, 4, 0).astype(np.uint8))
    write_png(tmp_path / "h.png", image)
    rows = [{"image_id": i, "split": "train", "image_path": str(tmp_path / f"{i}.png"),
             "label_path": str(tmp_path / f"{i}_label.png"), "height": 32, "width": 40} for i in "gh"]
    counts = [("g", 3, 300, True), ("g", 4, 10, False), ("h", 4, 10, False)]
    tables = SimpleNamespace(
        images=pd.concat([toy_tables.images, pd.DataFrame(rows)], ignore_index=True),
        classes=toy_tables.classes,
        image_classes=pd.concat([toy_tables.image_classes, pd.DataFrame(
            counts, columns=["image_id", "class_id", "pixels", "present"]).assign(split="train")], ignore_index=True))
    source = LabelledEpisodes(tables, "toy", fold=0)
    assert "g" in source.query_ids and "h" not in source.query_ids  # h holds no present class
    assert source.classes_of_image["g"] == [3, 4]
    drawn = {source.episode(source.query_ids.index("g"), np.random.default_rng(seed), shots=1).class_id
             for seed in range(12)}
    assert drawn == {3, 4}
    present_only = LabelledEpisodes(tables, "toy", fold=0, class_draw="present")
    assert present_only.classes_of_image["g"] == [3]  # training.labelled_class_draw: present
    with pytest.raises(ValueError, match="labelled_class_draw"):
        LabelledEpisodes(tables, "toy", fold=0, class_draw="largest")
    for seed in range(12):
        episode = source.episode(source.query_ids.index("g"), np.random.default_rng(seed), shots=2)
        assert set(episode.support_ids) <= set(source.images_of_class[episode.class_id]) - {"g", "h"}
        assert episode.query_mask.sum() == (label == episode.class_id).sum()


def test_remove_novel_and_subset_and_threshold(toy_tables):
    removed = LabelledEpisodes(toy_tables, "toy", fold=0, remove_novel_train=True)
    assert removed.query_ids == ["a", "d", "e"]
    subset = LabelledEpisodes(toy_tables, "toy", fold=0, image_ids=["a", "e", "d"])
    assert subset.query_ids == ["a", "d", "e"]
    with pytest.raises(ValueError, match="no train image"):
        LabelledEpisodes(toy_tables, "toy", fold=0, min_class_pixels=301)
    with pytest.raises(ValueError, match="not in the train split"):
        LabelledEpisodes(toy_tables, "toy", fold=0, image_ids=["zz"])


def test_finetune_subset_sizes_determinism_and_independence():
    ids = [f"img{i:05d}" for i in range(5953)]
    tables = SimpleNamespace(images=pd.DataFrame({"image_id": ids, "split": "train"}))
    sizes = {p: len(finetune_subset(tables, p, seed=0)) for p in (0.05, 0.1, 0.2, 1.0)}
    assert sizes == {0.05: 297, 0.1: 595, 0.2: 1190, 1.0: 5953}  # the reference lists' sizes
    assert finetune_subset(tables, 0.1, 0) == finetune_subset(tables, 0.1, 0)
    assert finetune_subset(tables, 0.1, 0) != finetune_subset(tables, 0.1, 1)
    small, large = set(finetune_subset(tables, 0.05, 0)), set(finetune_subset(tables, 0.1, 0))
    assert not small <= large  # drawn independently, not nested
    with pytest.raises(ValueError, match="fraction"):
        finetune_subset(tables, 0.0, 0)


def test_episode_dataset_is_deterministic_per_epoch_and_index():
    dataset = EpisodeDataset(SquareEpisodes(5), shots=2, crop_size=48, augment=Augmentation(48), seed=3,
                             episodes_per_epoch=7)
    first = dataset[4]
    assert first["query"].shape == (3, 48, 48) and first["supports"].shape == (2, 3, 48, 48)
    assert first["support_masks"].shape == (2, 48, 48)
    assert torch.equal(dataset[4]["query"], first["query"])
    assert sorted(dataset.order[:5].tolist()) == list(range(5))  # a permutation, then repeats
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["query"], first["query"])



class BandedEpisodes(SquareEpisodes):
    """SquareEpisodes whose query labels carry an ignore band, as VOC's object outlines do."""

    def episode(self, index, rng, shots):
        episode = super().episode(index, rng, shots)
        episode.query_mask[:6] = 255
        return episode


@pytest.mark.parametrize("augment", [None, Augmentation(48, scale_min=1.0, scale_max=1.0, rotation=0)],
                         ids=["resize-pad", "augmentation"])
def test_training_tells_the_model_only_where_the_padding_is(augment):
    """The query's validity is the padding alone, as at test time: its label's own 255 pixels are the
    answer, and marking them invalid would hand the model the object outlines."""
    dataset = EpisodeDataset(BandedEpisodes(3), shots=1, crop_size=48, augment=augment)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    valid, target = batch["query_valid"], batch["query_mask"]
    assert valid.dtype == torch.bool and valid.shape == target.shape
    band = target == 255
    assert (band & valid).any() and (band & ~valid).any()  # the labelled band stays valid; padding does not
    # 40 x 52 images: resize-pad gives 37 x 48 of image, the augmentation pads 40 rows to 48 and crops 48 columns
    image_pixels = 37 * 48 if augment is None else 40 * 48
    assert valid.sum(dim=(1, 2)).tolist() == [image_pixels, image_pixels]

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(2, 1, 1))

        def forward(self, query, supports, support_masks, query_valid):
            seen["query_valid"] = query_valid
            return query.new_zeros(query.shape[0], 2, *query.shape[-2:]) + self.bias

    model = Recorder()
    optimizers = {"sgd": torch.optim.SGD(model.parameters(), lr=0.1)}
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss, stepped = _train_step(model, batch, torch.nn.CrossEntropyLoss(ignore_index=255), optimizers, scaler,
                                torch.device("cpu"), False, None)
    assert math.isfinite(loss) and stepped and torch.equal(seen["query_valid"], valid)
    # a GradScaler whose scaled gradients overflow skips the step: reported, so the schedule can wait
    overflowing = torch.amp.GradScaler("cpu", init_scale=3e38)
    before = model.bias.detach().clone()
    ce = torch.nn.CrossEntropyLoss(ignore_index=255)
    loss, stepped = _train_step(model, batch, lambda logits, target: 1e3 * ce(logits, target), optimizers,
                                overflowing, torch.device("cpu"), False, None)
    assert math.isfinite(loss) and not stepped and torch.equal(model.bias, before)


def test_a_step_the_grad_scaler_skipped_does_not_advance_the_lr_schedule(tmp_path, capsys, monkeypatch):
    """fp16 on CUDA: a skipped step (inf gradients) leaves the lr where it was, as if the step had not been."""
    import umtfss.training.train as train_module

    real_step, calls = train_module._train_step, []

    def second_step_skipped(*args):
        loss, stepped = real_step(*args)
        calls.append(1)
        return loss, stepped and len(calls) != 2

    monkeypatch.setattr(train_module, "_train_step", second_step_skipped)
    train(tiny_config(epochs=1, warmup_steps=0), SquareEpisodes(), tmp_path / "out", progress=False)
    lrs = [float(r["lr_sgd"]) for r in csv.DictReader(open(tmp_path / "out" / "log.csv"))]
    assert lrs[0] > lrs[1] == lrs[2]  # the lr of step 3 is the one step 2 had: step 2 did not count
    assert "skipped 1 of 3 steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the loop


def final_weights(path):
    return ckpt.load(path)["model"]


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = train(tiny_config(epochs=2), SquareEpisodes(), tmp_path / "straight", progress=False)
    killed = tmp_path / "killed"
    _run_first_epoch_then_kill(killed)
    resumed = train(tiny_config(epochs=2), SquareEpisodes(), killed, progress=False)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not any(k.startswith("backbone.") for k in a)  # frozen backbone is not stored
    log = list(csv.DictReader(open(killed / "log.csv")))
    straight_log = list(csv.DictReader(open(tmp_path / "straight" / "log.csv")))
    assert [r["step"] for r in log] == [r["step"] for r in straight_log]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]


class _Killed(Exception):
    pass


def _run_first_epoch_then_kill(out_dir):
    """Run a 2-epoch training and kill it right after last.pt of epoch 1 is written."""
    original = ckpt.save

    def save_then_die(path, **payload):
        result = original(path, **payload)
        if path.name == "last.pt" and payload["epoch"] == 1:
            raise _Killed()
        return result

    ckpt.save = save_then_die
    try:
        with pytest.raises(_Killed):
            train(tiny_config(epochs=2), SquareEpisodes(), out_dir, progress=False)
    finally:
        ckpt.save = original
    assert (out_dir / "last.pt").exists() and not (out_dir / "checkpoint.pt").exists()


def test_a_kill_within_an_epoch_resumes_from_the_step_it_saved(tmp_path):
    """training.checkpoint_minutes: last.pt also within an epoch (0: after every step), and a resume from
    such a save ends exactly as an uninterrupted run, its log without the killed steps' rows."""
    straight = train(tiny_config(epochs=2), SquareEpisodes(), tmp_path / "straight", progress=False)
    original, saves = ckpt.save, []

    def save_then_die(path, **payload):
        result = original(path, **payload)
        if path.name == "last.pt":
            saves.append((payload["epoch"], payload["epoch_step"], payload["step"]))
            if payload["step"] == 5:  # two steps into the second epoch (3 steps each)
                raise _Killed()
        return result

    killed = tmp_path / "killed"
    ckpt.save = save_then_die
    try:
        with pytest.raises(_Killed):
            train(tiny_config(epochs=2, checkpoint_minutes=0), SquareEpisodes(), killed, progress=False)
    finally:
        ckpt.save = original
    assert saves == [(0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5)]
    # the rows of a killed step after the save are dropped on resume, not kept twice
    with open(killed / "log.csv", "a") as handle:
        handle.write("6,2,0.5,0.01,0.0001,0.1\n")
    # resumed with a loader worker: the rest of the epoch is the same batches whichever process draws them
    resumed = train(tiny_config(epochs=2, checkpoint_minutes=None, workers=1), SquareEpisodes(), killed, progress=False)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)
    log = list(csv.DictReader(open(killed / "log.csv")))
    straight_log = list(csv.DictReader(open(tmp_path / "straight" / "log.csv")))
    assert [(r["step"], r["loss"]) for r in log] == [(r["step"], r["loss"]) for r in straight_log]
    saves.clear()
    ckpt.save = save_then_die
    try:  # null: after each epoch only
        train(tiny_config(epochs=2, checkpoint_minutes=None), SquareEpisodes(), tmp_path / "epochs", progress=False)
    finally:
        ckpt.save = original
    assert saves == [(1, 0, 3), (2, 0, 6)]


def test_drop_last_leaves_out_the_short_batch_as_the_reference_code(tmp_path):
    """training.drop_last (PFENet / CyCTR / UMTFSS: drop_last=True): 7 episodes in batches of 2 are 3 steps
    an epoch, and the schedule counts those; false trains the short batch too; an epoch shorter than a
    batch is refused by key rather than trained for zero steps."""
    steps = {}
    for drop in (True, False):
        out = tmp_path / str(drop)
        train(tiny_config(epochs=2, drop_last=drop, warmup_steps=0), SquareEpisodes(count=7), out, progress=False)
        rows = list(csv.DictReader(open(out / "log.csv")))
        steps[drop] = [int(r["epoch"]) for r in rows]
        assert float(rows[-1]["lr_sgd"]) == pytest.approx(0.01 * (1 / len(rows)) ** 0.9)  # poly over these steps
    assert steps == {True: [1, 1, 1, 2, 2, 2], False: [1, 1, 1, 1, 2, 2, 2, 2]}
    with pytest.raises(ValueError, match=r"an epoch has 1 episode\(s\), fewer than training.batch_size 2.*drop_last"):
        train(tiny_config(drop_last=True), SquareEpisodes(count=1), tmp_path / "one", progress=False)


def test_stale_state_of_another_config_or_data_is_not_resumed(tmp_path, capsys):
    """The workflow reruns train after a config or input change: last.pt of the old run must not be resumed."""
    changed = tiny_config(epochs=2, lr_sgd=0.5)
    straight = final_weights(train(changed, SquareEpisodes(), tmp_path / "straight", progress=False))
    _run_first_epoch_then_kill(tmp_path / "config")
    capsys.readouterr()
    again = final_weights(train(changed, SquareEpisodes(), tmp_path / "config", progress=False))
    assert "training.lr_sgd: 0.01 -> 0.5" in capsys.readouterr().err
    assert all(torch.equal(straight[k], again[k]) for k in straight)  # a fresh run, not a resumed one
    # the same config on other input data (e.g. re-clustered pseudo episodes) starts over too
    original = ckpt.save
    ckpt.save = lambda path, **payload: original(path, **{**payload, "inputs": "old data"})
    try:
        _run_first_epoch_then_kill(tmp_path / "data")
    finally:
        ckpt.save = original
    train(tiny_config(epochs=2), SquareEpisodes(), tmp_path / "data", progress=False, inputs="new data")
    assert "other input data" in capsys.readouterr().err
    assert ckpt.load(tmp_path / "data" / "checkpoint.pt")["inputs"] == "new data"
    rows = list(csv.DictReader(open(tmp_path / "data" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))


def test_meta_training_resumes_across_a_fine_tuning_key_or_a_removed_key(tmp_path, capsys):
    """The workflow no longer retrains unsup or sup when a fine-tuning key changes, so a killed one
    must resume under the new value; a key the schema dropped (finetune_fractions) is no conflict."""
    straight = final_weights(train(tiny_config(epochs=2), SquareEpisodes(), tmp_path / "straight", progress=False))
    original = ckpt.save

    def save_with_a_removed_key(path, **payload):
        payload["config"] = {**payload["config"], "training": {**payload["config"]["training"],
                                                               "finetune_fractions": [0.2]}}
        return original(path, **payload)

    ckpt.save = save_with_a_removed_key
    try:
        _run_first_epoch_then_kill(tmp_path / "killed")
    finally:
        ckpt.save = original
    capsys.readouterr()
    resumed = final_weights(train(tiny_config(epochs=2, finetune_lr=0.5), SquareEpisodes(), tmp_path / "killed",
                                  progress=False))
    assert "not resuming" not in capsys.readouterr().err
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_inputs_fingerprint_covers_every_file_meta_training_reads(tmp_path):
    """regions, candidates and the region features (the support draw reads all three): a change to
    any one makes a killed run's last.pt stale."""
    import argparse

    from umtfss.pseudo_episodes import CANDIDATES_FILE, FEATURES_FILE, REGIONS_FILE
    from umtfss.training.train import _inputs_fingerprint

    for name in (REGIONS_FILE, CANDIDATES_FILE, FEATURES_FILE):
        (tmp_path / name).write_bytes(b"before")
    args = argparse.Namespace(episodes=tmp_path, labels=[], images=None, tables=None, init=None, dataset=None, fold=None)
    seen = {_inputs_fingerprint(args)}
    for name in (REGIONS_FILE, CANDIDATES_FILE, FEATURES_FILE):
        (tmp_path / name).write_bytes(b"after")
        seen.add(_inputs_fingerprint(args))
    assert len(seen) == 4


def test_fine_tuning_keys_conflict_only_for_a_fine_tuning_run():
    stored = tiny_config(finetune_lr=0.1)
    changed = tiny_config(finetune_lr=0.5)
    assert _resume_conflicts(stored, changed, "unsup") == []
    assert _resume_conflicts(stored, changed, "sup-20%") == []
    assert _resume_conflicts(stored, changed, "finetune-20%") == ["training.finetune_lr: 0.1 -> 0.5"]
    assert _resume_conflicts(stored, tiny_config(lr_sgd=0.5), "unsup") == ["training.lr_sgd: 0.01 -> 0.5"]


def test_log_columns_and_explicit_learning_rates(tmp_path):
    config = tiny_config(epochs=2, lr_sgd=0.02, lr_adamw=3e-4, warmup_steps=2, poly_power=0.9, adamw_schedule="poly")
    train(config, SquareEpisodes(4), tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert list(rows[0]) == ["step", "epoch", "loss", "lr_sgd", "lr_adamw", "seconds"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    for row in rows:
        factor = lr_factor(int(row["step"]) - 1, 4, 0.9, 2)
        assert float(row["lr_sgd"]) == pytest.approx(0.02 * factor)
        assert float(row["lr_adamw"]) == pytest.approx(3e-4 * factor)
        assert math.isfinite(float(row["loss"])) and float(row["seconds"]) > 0
    assert float(rows[0]["lr_sgd"]) == pytest.approx(0.01)  # warm-up: step 1 of 2


def test_reference_schedule_by_default(tmp_path):
    """Reference code: SGD warms up over one epoch then decays; AdamW stays constant, biases undecayed."""
    config = tiny_config(epochs=2, batch_size=1, lr_sgd=0.02, lr_adamw=3e-4, poly_power=0.9)
    assert config["training"]["warmup_steps"] is None and config["training"]["adamw_schedule"] == "constant"
    train(config, SquareEpisodes(3), tmp_path, progress=False)  # 3 steps per epoch, 6 in all
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [float(r["lr_sgd"]) for r in rows] == pytest.approx([0.02 * lr_factor(s, 6, 0.9, 3) for s in range(6)])
    assert float(rows[0]["lr_sgd"]) == pytest.approx(0.02 / 3)  # step 1 of a one-epoch warm-up
    assert {float(r["lr_adamw"]) for r in rows} == {3e-4}

    from umtfss.training.train import Schedule, build_optimizers

    model, _ = ckpt.build_fss_model(config["model"])
    adamw = build_optimizers(model, config["training"], Schedule.from_config(config["training"], False))["adamw"]
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    for name, parameter in model.named_transformer_parameters():
        assert decays[id(parameter)] == (0.0 if name.endswith("bias") else config["training"]["weight_decay_adamw"])
    assert any(name.endswith("bias") for name, _ in model.named_transformer_parameters())
    everything = tiny_config(adamw_bias_decay=True)["training"]
    adamw = build_optimizers(model, everything, Schedule.from_config(everything, False))["adamw"]
    assert {g["weight_decay"] for g in adamw.param_groups} == {everything["weight_decay_adamw"]}


def test_finetune_uses_finetune_settings_and_init(tmp_path):
    base = train(tiny_config(epochs=1), SquareEpisodes(4), tmp_path / "base", progress=False)
    # episodes_per_epoch sets meta-training epochs only: a fine-tuning epoch is one pass over the subset
    config = tiny_config(finetune_epochs=1, finetune_batch_size=4, finetune_lr=5e-3, episodes_per_epoch=40)
    tuned = train(config, SquareEpisodes(4), tmp_path / "tuned", init_checkpoint=base, finetune=True,
                  method_name="finetune-20%", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "tuned" / "log.csv")))
    # finetune_lr is the SGD groups' (the paper's 1e-4 / 2.5e-3); AdamW keeps finetune_lr_adamw (reference 1e-4)
    assert len(rows) == 1 and float(rows[0]["lr_sgd"]) == 5e-3 and float(rows[0]["lr_adamw"]) == 1e-4
    assert ckpt.load(tuned)["method"] == "finetune-20%"
    model = ckpt.load_model(tuned)
    assert not model.training


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    import umtfss.training.train as train_module

    calls = {"n": 0}

    def loss_that_breaks(logits, target):
        calls["n"] += 1
        value = logits.float().mean() * 0 + 1.0
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(train_module, "build_loss", lambda name, dice_ignore: loss_that_breaks)
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(epoch 2\)"):
        train(tiny_config(epochs=2), SquareEpisodes(4), tmp_path, progress=False)
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        ckpt.load(tmp_path / "junk.pt")


def test_checkpoint_of_an_older_model_layout_names_the_missing_keys(tmp_path):
    """A checkpoint whose config predates model keys (here the shared merge of older versions) is
    refused with the keys it lacks, not loaded into a model of another shape."""
    config = load({"model": {**TINY_MODEL, "support_merge": "mask_channel"}})
    model, _ = ckpt.build_fss_model(config["model"])
    old = {key: value for key, value in config["model"].items() if key != "support_merge"}
    ckpt.save(tmp_path / "old.pt", config={"model": old}, model=ckpt.trainable_state(model, model.backbone))
    with pytest.raises(ValueError, match=r"old\.pt.*lacks model key\(s\) support_merge.*retrain"):
        ckpt.load_model(tmp_path / "old.pt")
    ckpt.save(tmp_path / "current.pt", config={"model": dict(config["model"])},
              model=ckpt.trainable_state(model, model.backbone))
    assert ckpt.load_model(tmp_path / "current.pt").support_merge == "mask_channel"


def test_checkpoint_from_before_the_reference_layer_keys_keeps_the_behaviour_it_was_trained_with(tmp_path):
    """Checkpoints predating linear_bias / grid_masks / empty_support were trained with biases, bilinear
    cell masks and no centre patch: they load with those, not with the newer reference defaults."""
    config = load({"model": {**TINY_MODEL, **ckpt.LEGACY_MODEL_VALUES}})
    model, _ = ckpt.build_fss_model(config["model"])
    old = {key: value for key, value in config["model"].items() if key not in ckpt.LEGACY_MODEL_VALUES}
    ckpt.save(tmp_path / "old.pt", config={"model": old}, model=ckpt.trainable_state(model, model.backbone))
    loaded = ckpt.load_model(tmp_path / "old.pt")
    assert (loaded.grid_masks, loaded.empty_support) == ("bilinear", "none")
    assert loaded.transformer[0].cross.block.attention.to_query.bias is not None
    assert load({})["model"]["linear_bias"] is False  # what a new run trains


# --------------------------------------------------------------------------- command line


def test_cli_sup_then_finetune_on_prepare_tables(toy_tables, tmp_path, capsys):
    import json

    from umtfss.cli import main

    tables_dir = tmp_path / "prepare"
    tables_dir.mkdir()
    for name in ("images", "classes", "image_classes"):
        getattr(toy_tables, name).to_parquet(tables_dir / f"{name}.parquet")
    config = json.dumps({"model": TINY_MODEL, "training": {"epochs": 1, "batch_size": 4, "crop_size": 48, "workers": 0,
                                                           "device": "cpu", "finetune_epochs": 1, "finetune_batch_size": 2},
                         "datasets": {"pascal": {"min_class_pixels": 100}}})
    common = ["--config", config, "--tables", str(tables_dir), "--dataset", "pascal", "--fold", "0", "--quiet"]
    assert main(["train", "--method", "sup", "--out-dir", str(tmp_path / "sup"), *common]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sup" / "log.csv")))
    assert len(rows) == 1  # 5 eligible query images, batch 4, the short batch left out (training.drop_last)
    assert main(["train", "--method", "finetune-50%", "--out-dir", str(tmp_path / "ft"), "--init",
                 str(tmp_path / "sup" / "checkpoint.pt"), *common]) == 0
    subset = (tmp_path / "ft" / "train_subset.txt").read_text().split()
    assert len(subset) == 3 and subset == finetune_subset(toy_tables, 0.5, 0)
    assert ckpt.load(tmp_path / "ft" / "checkpoint.pt")["method"] == "finetune-50%"
    # an --init of another architecture: the keys that differ, not torch's list of every mismatching tensor
    other = json.loads(config)
    other["model"] = {**other["model"], "dim": other["model"]["dim"] * 2}
    other_common = ["--config", json.dumps(other), *common[2:]]
    assert main(["train", "--method", "finetune-50%", "--out-dir", str(tmp_path / "ft2"), "--init",
                 str(tmp_path / "sup" / "checkpoint.pt"), *other_common]) == 1
    dim = other["model"]["dim"]
    assert f"was trained with another model: model.dim: {dim // 2} -> {dim}" in capsys.readouterr().err
    assert not (tmp_path / "ft2" / "train_subset.txt").exists()  # nothing of a run that failed
    # sup-50%: from scratch (no --init) on the very subset finetune-50% fine-tuned on, the sup schedule
    sup50 = json.loads(config)
    sup50["training"].update(batch_size=2, finetune_batch_size=1)
    assert main(["train", "--method", "sup-50%", "--out-dir", str(tmp_path / "sup50"), "--config", json.dumps(sup50),
                 *common[2:]]) == 0
    assert (tmp_path / "sup50" / "train_subset.txt").read_text().split() == subset
    state = ckpt.load(tmp_path / "sup50" / "checkpoint.pt")
    assert state["method"] == "sup-50%"
    # 2 episodes of the 3 images (one has no second image of its class) in batches of 2 (sup's batch_size): one
    # step; the fine-tuning batch of 1 would take 2
    assert len(list(csv.DictReader(open(tmp_path / "sup50" / "log.csv")))) == 1
    # the sections the config gave are recorded: a workflow job gets no evaluation section, so predict's
    # default size is the crop the model was trained at, not evaluation.test_size's schema default (473)
    assert state["config_sections"] == ["datasets", "model", "training"]
    assert ckpt.test_size(state) == (48, "training.crop_size")
    with_evaluation = json.dumps({**sup50, "evaluation": {"test_size": 40}})
    assert main(["train", "--method", "sup-50%", "--out-dir", str(tmp_path / "sup50e"), "--config", with_evaluation,
                 *common[2:]]) == 0
    assert ckpt.test_size(ckpt.load(tmp_path / "sup50e" / "checkpoint.pt")) == (40, "evaluation.test_size")


def test_cli_names_missing_arguments(tmp_path, capsys):
    from umtfss.cli import main

    assert main(["train", "--config", "{}", "--method", "finetune-20%", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--tables" in err and "--init" in err
    assert main(["train", "--config", "{}", "--method", "unsup", "--out-dir", str(tmp_path)]) == 1
    assert "--episodes" in capsys.readouterr().err
    assert main(["train", "--config", "{}", "--method", "semi", "--out-dir", str(tmp_path)]) == 1
    assert "sup-P% or finetune-P%" in capsys.readouterr().err
    assert main(["train", "--config", "{}", "--method", "sup-20%", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--tables" in err and "--init" not in err


def test_worker_processes_do_not_change_the_result(tmp_path):
    single = train(tiny_config(epochs=1), SquareEpisodes(4), tmp_path / "w0", progress=False)
    multi = train(tiny_config(epochs=1, workers=2), SquareEpisodes(4), tmp_path / "w2", progress=False)
    a, b = final_weights(single), final_weights(multi)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_unsup_trains_on_real_pseudo_episodes(tmp_path):
    import json

    from test_pseudo_episodes import write_dataset

    from umtfss.cli import main

    import zarr

    labels, embeddings, images = write_dataset(tmp_path)
    for path in [*labels, *embeddings]:  # as embed and assign record them: a projected embedding here
        zarr.open_group(str(path)).attrs.update(backbone="demo-colortexture", projected=True)
    for path in labels:
        zarr.open_group(str(path)).attrs.update(dim=zarr.open_group(str(embeddings[0])).attrs["dim"])
    episodes = tmp_path / "episodes"
    assert main(["episodes", "--config", '{"episodes": {"min_region_pixels": 2, "area_unit": "grid"}}', "--labels", *map(str, labels),
                 "--embeddings", *map(str, embeddings), "--out-dir", str(episodes)]) == 0
    config = json.dumps({"model": TINY_MODEL, "training": {"epochs": 1, "batch_size": 4, "crop_size": 48,
                                                           "workers": 0, "device": "cpu", "episodes_per_epoch": 6}})
    out = tmp_path / "unsup"
    assert main(["train", "--config", config, "--method", "unsup", "--out-dir", str(out), "--episodes", str(episodes),
                 "--labels", *map(str, labels), "--images", str(images), "--quiet"]) == 0
    assert len(list(csv.DictReader(open(out / "log.csv")))) == 1  # 6 episodes, batch 4, the short batch left out
    assert not ckpt.load_model(out / "checkpoint.pt").training
    # the embedder and N of its pseudo episodes are recorded (the score table's columns), and a fine-tuning keeps them
    from umtfss.stores import LabelStore, embedder_name

    assert ckpt.load(out / "checkpoint.pt")["pseudo_tasks"] == {"embedder": "demo-colortexture-d6", "clusters": 3}
    assert embedder_name({**LabelStore(labels).attrs, "projected": False}) == "demo-colortexture"
    assert embedder_name({"backbone": "x", "dim": 16}) is None  # a store from before 'projected' was recorded
    from umtfss.training.train import _pseudo_tasks

    fine_tuning = SimpleNamespace(init=out / "checkpoint.pt")  # a labelled source: the --init's record carries over
    assert _pseudo_tasks(fine_tuning, SimpleNamespace()) == {"embedder": "demo-colortexture-d6", "clusters": 3}
    assert _pseudo_tasks(SimpleNamespace(init=None), SimpleNamespace()) == {}


@pytest.mark.parametrize("rule, expected", [("base_present", ["a", "b", "c", "d", "e"]), ("no_novel", ["a", "d", "e"])])
def test_fold_setting_images(toy_tables, tmp_path, monkeypatch, capsys, rule, expected):
    """'fold' setting: by default (reference code) the images where a base class is present, novel
    classes allowed (b, c hold novel 1, 2; f holds only novel 1); no_novel drops every image with one."""
    import umtfss.pseudo_episodes
    from umtfss.config import load
    from umtfss.training.train import _pseudo_source

    tables_dir = tmp_path / "prepare"
    tables_dir.mkdir()
    for name in ("images", "classes", "image_classes"):
        getattr(toy_tables, name).to_parquet(tables_dir / f"{name}.parquet")
    seen = {}

    class Episodes:  # records the images it is restricted to; a query image each
        def __init__(self, *args, image_ids, sampling):
            seen.update(ids=image_ids)
            self.sampling = sampling

        def __len__(self):
            return len(seen["ids"])

    monkeypatch.setattr(umtfss.pseudo_episodes, "PseudoEpisodes", Episodes)
    args = SimpleNamespace(tables=tables_dir, fold=0, episodes=None, labels=None, images=None)
    config = load({"unlabeled": {"setting": "fold", "fold_images": rule}})
    _pseudo_source(args, config)
    assert seen["ids"] == expected
    train = int((toy_tables.images["split"] == "train").sum())
    assert f"fold 0 ('fold' setting, fold_images {rule}): {len(expected)} of {train} train images" in capsys.readouterr().err


def test_amp_takes_float16_where_bfloat16_is_only_emulated(monkeypatch):
    """V100 / T4: torch.cuda.is_bf16_supported() says yes by emulation; training must take fp16 + GradScaler."""
    from umtfss.training.train import _amp_settings

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert _amp_settings(torch.device("cuda"), True) == (True, torch.float16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert _amp_settings(torch.device("cuda"), True) == (True, torch.bfloat16)
    assert _amp_settings(torch.device("cpu"), True) == (False, None)
    assert _amp_settings(torch.device("cuda"), False) == (False, None)


def test_a_float16_resume_takes_the_state_of_a_disabled_scaler():
    """last.pt of a CPU or bf16 run holds {} for the scaler; an fp16 run resuming it must not fail on it."""
    from umtfss.training.train import _restore_scaler

    stored = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    _restore_scaler(scaler, stored)
    assert scaler.get_scale() == 1024.0
    trained = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    _restore_scaler(scaler, trained.state_dict())
    assert scaler.get_scale() == 8.0


def test_a_checkpoint_that_cannot_be_read_says_why_without_torchs_advice(tmp_path):
    """torch suggests weights_only=False (running the file's code); umtfss names the file and why instead."""
    import collections

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="garbage.pt. cannot be read: truncated, or not a torch file") as info:
        ckpt.load(garbage)
    objects = tmp_path / "objects.pt"
    torch.save({"format": "umtfss-checkpoint-1", "counts": collections.OrderedDict(a=1), "x": argparse_namespace()},
               objects)
    with pytest.raises(ValueError, match="not a file of tensors and plain values") as objects_info:
        ckpt.load(objects)
    for err in (info.value, objects_info.value):
        assert "weights_only` set to `False`" not in str(err) and "file an issue" not in str(err)
    with pytest.raises(ValueError, match="is a folder; expected a checkpoint file"):
        ckpt.load(tmp_path)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a umtfss checkpoint"):
        ckpt.load(tmp_path / "other.pt")


def argparse_namespace():
    import argparse

    return argparse.Namespace(a=1)


# ------------------------------------------------------------------ out-dir, stale outputs, --init (audit)


def test_out_dir_that_is_a_file_or_holds_another_methods_model_is_refused(tmp_path):
    """Before any work: a file (or a path under one) is no folder, and a folder with another method's
    model would have that model replaced (a workflow rerun always finds its own method there)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expected in ((afile, "'.*afile' is a file"), (afile / "a" / "b", "'.*afile' is a file, not a folder")):
        with pytest.raises(ValueError, match=expected):
            train(tiny_config(epochs=1), SquareEpisodes(2), out, progress=False)
    sup = tmp_path / "sup"
    ckpt.save(sup / "checkpoint.pt", config=tiny_config(), method="sup", model={})
    before = (sup / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="holds checkpoint.pt of method 'sup', not 'unsup'"):
        train(tiny_config(epochs=1), SquareEpisodes(2), sup, progress=False)
    assert (sup / "checkpoint.pt").read_bytes() == before and sorted(p.name for p in sup.iterdir()) == ["checkpoint.pt"]


def test_a_run_that_starts_over_does_not_leave_the_earlier_runs_checkpoint(tmp_path, capsys):
    """A run started over (another config) and killed after its first epoch must not leave the old
    checkpoint.pt beside its own last.pt and log.csv, where it would pass for this run's model."""
    out = tmp_path / "run"
    train(tiny_config(epochs=2, lr_sgd=0.5), SquareEpisodes(4), out, progress=False)
    capsys.readouterr()
    _run_first_epoch_then_kill(out)  # asserts that checkpoint.pt is gone
    assert "removed" in capsys.readouterr().err
    assert ckpt.load(out / "last.pt")["config"]["training"]["lr_sgd"] == 0.01


def test_tqdm_disable_turns_the_training_bar_off(tmp_path):
    """README: TQDM_DISABLE=1 turns every bar off; an explicit disable=False would override it.
    tqdm reads TQDM_* at import, hence the subprocess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; torch.set_num_threads(1)\n"
            "from test_training import SquareEpisodes, tiny_config\n"
            "from umtfss.training.train import train\n"
            f"train(tiny_config(epochs=1, batch_size=2), SquareEpisodes(2), {str(tmp_path / 'out')!r}, progress=True)\n")
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train unsup" not in done.stderr
    assert (tmp_path / "out" / "checkpoint.pt").is_file()


FAST_LABELLED = {"model": TINY_MODEL, "datasets": {"pascal": {"min_class_pixels": 100}},
                 "training": {"epochs": 1, "finetune_epochs": 1, "batch_size": 4, "finetune_batch_size": 4,
                              "crop_size": 48, "workers": 0, "device": "cpu"}}


def _prepare_dir(toy_tables, tmp_path):
    tables_dir = tmp_path / "prepare"
    tables_dir.mkdir(exist_ok=True)
    for name in ("images", "classes", "image_classes"):
        getattr(toy_tables, name).to_parquet(tables_dir / f"{name}.parquet")
    return tables_dir


def test_finetuning_a_fold_from_a_model_that_saw_its_test_classes_is_refused(toy_tables, tmp_path, capsys):
    """--init of another fold's sup model (trained with labels on this fold's novel classes): evaluate
    would refuse the result, so train refuses before the fine-tuning, naming the classes."""
    import json

    from umtfss.cli import main

    tables_dir = _prepare_dir(toy_tables, tmp_path)
    config = tiny_config(epochs=1)
    init = tmp_path / "sup-fold1.pt"  # fold 1's base classes are fold 0's novel ones, w and x
    model, backbone = ckpt.build_fss_model(config["model"])
    ckpt.save(init, config=config, method="sup", model=ckpt.trainable_state(model, backbone), labelled_classes=["w", "x"])
    args = ["train", "--method", "finetune-50%", "--config", json.dumps(FAST_LABELLED), "--tables",
            str(tables_dir), "--dataset", "pascal", "--fold", "0", "--init", str(init), "--quiet"]
    assert main([*args, "--out-dir", str(tmp_path / "ft")]) == 1
    err = capsys.readouterr().err
    assert "was trained with labels on w, x, test class(es) of fold 0" in err
    assert not (tmp_path / "ft").exists()


def test_a_stale_train_subset_is_removed_before_training(toy_tables, tmp_path, monkeypatch):
    """sup-P% writes train_subset.txt once its model exists; another run's list must not sit beside this run's log."""
    import json

    from umtfss.cli import main
    from umtfss.training import train as train_module

    tables_dir = _prepare_dir(toy_tables, tmp_path)
    out = tmp_path / "sup50"
    out.mkdir()
    (out / "train_subset.txt").write_text("z1\nz2\n")

    def interrupted(*args, **kwargs):
        raise ValueError("stopped before the end")

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", "--method", "sup-50%", "--config", json.dumps(FAST_LABELLED), "--tables",
                 str(tables_dir), "--dataset", "pascal", "--fold", "0", "--out-dir", str(out), "--quiet"]) == 1
    assert not (out / "train_subset.txt").exists()
