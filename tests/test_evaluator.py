"""IoU accumulation against hand-computed values, and the predictors on crafted inputs."""

import numpy as np
import pytest
import torch

from umtfss.evaluation.evaluator import IoUAccumulator
from umtfss.evaluation.predictors import AllBackground, ModelPredictor, PrototypeThreshold, build_predictor

I = 255  # ignore


def test_ignore_pixels_are_excluded():
    acc = IoUAccumulator([1])
    pred = np.array([[1, 1, 0, 0]])
    target = np.array([[1, I, 1, 0]])
    acc.update(pred, target, 1)
    # fg: I = 1 (col 0), U = 2 (cols 0, 2; col 1 ignored); bg: I = 1 (col 3), U = 2 (cols 2, 3)
    assert acc.per_class() == {1: pytest.approx(0.5)}
    assert acc.miou() == pytest.approx(0.5)
    assert acc.fbiou() == pytest.approx(0.5)


def test_empty_prediction_and_empty_ground_truth():
    acc = IoUAccumulator([1])
    acc.update(np.zeros((2, 2), int), np.array([[1, 1], [0, 0]]), 1)  # empty prediction
    assert acc.miou() == 0.0
    assert acc.fbiou() == pytest.approx(0.5 * (0 + 2 / 4))
    empty = IoUAccumulator([1])
    empty.update(np.zeros((2, 2), int), np.zeros((2, 2), int), 1)  # empty gt, empty pred
    assert empty.miou() == 0.0  # union 0 counts as 0 (reference convention)
    assert empty.fbiou() == pytest.approx(0.5 * (0 + 1))
    fp = IoUAccumulator([1])
    fp.update(np.array([[1, 0], [0, 0]]), np.zeros((2, 2), int), 1)  # empty gt, one false positive
    assert fp.miou() == 0.0
    assert fp.fbiou() == pytest.approx(0.5 * (0 + 3 / 4))


def test_sums_across_episodes_not_mean_of_episode_ious():
    acc = IoUAccumulator([1, 2, 3])
    # class 1, episode a: I=1, U=1; episode b: I=0, U=3  -> 1/4 (mean of episode IoUs would be 0.5)
    acc.update(np.array([[1, 0, 0, 0]]), np.array([[1, 0, 0, 0]]), 1)
    acc.update(np.array([[1, 0, 0, 0]]), np.array([[0, 1, 1, 0]]), 1)
    # class 2: I=2, U=3 -> 2/3
    acc.update(torch.tensor([[1, 1, 1, 0]]), np.array([[1, 1, 0, I]]), 2)
    assert acc.per_class("skip") == {1: pytest.approx(1 / 4), 2: pytest.approx(2 / 3)}
    assert acc.miou("skip") == pytest.approx((1 / 4 + 2 / 3) / 2)  # unseen class 3 left out
    # the reference codes divide by the fold's classes: unseen class 3 counts as 0
    assert acc.per_class() == {1: pytest.approx(1 / 4), 2: pytest.approx(2 / 3), 3: 0.0}
    assert acc.miou() == pytest.approx((1 / 4 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="evaluation.unseen_classes' is 'drop'"):
        acc.miou("drop")
    assert acc.unseen() == [3] and acc.seen() == [1, 2]
    # fg over all episodes: I = 1+0+2 = 3, U = 1+3+3 = 7; bg: I = 3+1+0 = 4, U = 3+4+1 = 8
    assert acc.fbiou() == pytest.approx(0.5 * (3 / 7 + 4 / 8))
    assert acc.total_episodes == 3 and acc.episodes[1] == 2


def test_bad_inputs_are_errors():
    acc = IoUAccumulator([1])
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="class id 4"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 2)), 4)
    with pytest.raises(ValueError, match="0/1"):
        acc.update(np.full((2, 2), 2), np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="0, 1 or 255"):
        acc.update(np.zeros((2, 2)), np.full((2, 2), 7), 1)
    with pytest.raises(ValueError, match="no episode"):
        acc.miou()


def _colour_batch():
    """Query: red square on grey with a green square; one support with a red square and its mask."""
    size = 16
    grey, red, green = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    query = grey[:, None, None].repeat(1, size, size)
    query[:, 2:8, 2:8] = red[:, None, None]
    query[:, 10:14, 10:14] = green[:, None, None]
    support = grey[:, None, None].repeat(1, size, size)
    support[:, 4:12, 4:12] = red[:, None, None]
    mask = torch.zeros(size, size)
    mask[4:12, 4:12] = 1
    return query[None], support[None, None], mask[None, None]


class _RGBBackbone(torch.nn.Module):
    """Stand-in backbone: the image itself at stride 2 as 'layer4' features."""

    high_layer = "layer4"

    def forward(self, images):
        return {"layer4": torch.nn.functional.avg_pool2d(images, 2)}


def test_prototype_threshold_segments_the_support_colour():
    query, supports, masks = _colour_batch()
    logits = PrototypeThreshold(_RGBBackbone(), threshold=0.8).predict(query, supports, masks)
    assert logits.shape == (1, 2, 16, 16)
    pred = logits.argmax(1)[0]
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[2:8, 2:8] = 1
    # bilinear upsampling may blur one pixel at the square's border; the interior and far regions are exact
    assert torch.equal(pred[3:7, 3:7], expected[3:7, 3:7])
    assert pred[10:14, 10:14].sum() == 0 and pred[:, 9:].sum() == 0
    # empty support masks give no prototype: nothing is foreground
    empty = PrototypeThreshold(_RGBBackbone(), threshold=0.5).predict(query, supports, torch.zeros_like(masks))
    assert empty.argmax(1).sum() == 0


def test_prototype_threshold_normalises_over_the_image_not_the_padding():
    """Black padding (cosine 0) would set the minimum and lift the grey background over the threshold."""
    query, supports, masks = _colour_batch()
    query[:, :, :, 10:] = 0  # the right six columns are padding
    valid = torch.zeros(1, 16, 16, dtype=torch.bool)
    valid[:, :, :10] = True
    predictor = PrototypeThreshold(_RGBBackbone(), threshold=0.5)
    pred = predictor.predict(query, supports, masks, query_valid=valid).argmax(1)[0]
    assert torch.equal(pred[3:7, 3:7], torch.ones(4, 4, dtype=torch.long))  # the red square
    assert pred[10:, :8].sum() == 0 and pred[:2, :8].sum() == 0  # grey background stays background
    unmasked = predictor.predict(query, supports, masks).argmax(1)[0]
    assert unmasked[10:, :8].all()  # what the padding did to it


def test_all_background_and_model_predictor():
    query, supports, masks = _colour_batch()
    assert AllBackground().predict(query, supports, masks).argmax(1).sum() == 0

    class HalfModel(torch.nn.Module):
        def forward(self, q, s, m):  # foreground in the left half, at half resolution
            out = torch.zeros(q.shape[0], 2, q.shape[2] // 2, q.shape[3] // 2)
            out[:, 1, :, : q.shape[3] // 4] = 1
            return out

    logits = ModelPredictor(HalfModel()).predict(query, supports, masks)
    assert logits.shape == (1, 2, 16, 16)
    pred = logits.argmax(1)[0]  # upsampled bilinearly: the boundary column may go either way
    assert pred[:, :8].all() and not pred[:, 9:].any()

    class WrongModel(torch.nn.Module):
        def forward(self, q, s, m):
            return torch.zeros(q.shape[0], 3, 4, 4)

    with pytest.raises(ValueError, match="expected \\[B,2,H,W\\]"):
        ModelPredictor(WrongModel()).predict(query, supports, masks)


def test_build_predictor_errors():
    from umtfss.config import load

    config = load({})
    assert isinstance(build_predictor("all-background", config), AllBackground)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_predictor("unsup", config)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        build_predictor("all-background", config, checkpoint="x.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_predictor("finetune-20%", config, checkpoint="missing.pt")
