"""Losses: weighted Dice and cross-entropy on 2-class logits, with 255 pixels ignored."""

import pytest
import torch

from umtfss.training.losses import build_loss, cross_entropy_loss, weighted_dice_loss


def logits_for(mask: torch.Tensor, confidence: float = 30.0) -> torch.Tensor:
    """Logits that predict `mask` (0/1) with the given confidence."""
    fg = (mask == 1).float() * 2 - 1
    return torch.stack([-fg, fg], dim=1) * confidence


def random_mask(seed=0, shape=(2, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.6).long()


def test_dice_of_perfect_prediction_is_zero_and_of_inverse_is_two():
    mask = random_mask()
    assert weighted_dice_loss(logits_for(mask), mask).item() == pytest.approx(0.0, abs=1e-6)
    # both channels completely wrong: 1 per channel, 2 per image
    assert weighted_dice_loss(logits_for(1 - mask), mask).item() == pytest.approx(2.0, abs=1e-6)


def test_dice_matches_formula_on_a_small_case():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # [1,2,1,2]: channel 0 bg, channel 1 fg
    target = torch.tensor([[[1, 0]]])
    p = torch.sigmoid(logits)[0, :, 0]  # [2 channels, 2 pixels]
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected = sum(1 - 2 * (p[c] * t[c]).sum() / (p[c].square().sum() + t[c].square().sum()) for c in range(2))
    assert weighted_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ignore_pixels_do_not_change_either_loss():
    mask = random_mask(1)
    logits = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    ignored = mask.clone()
    ignored[:, :, 8:] = 255
    # wildly wrong logits on the ignored half must not matter
    noisy = logits.clone()
    noisy[..., 8:] = 100.0 * torch.sign(torch.randn_like(noisy[..., 8:]))
    excluded = build_loss("dice", "excluded")
    for loss in (excluded, cross_entropy_loss):
        left = loss(logits[..., :8].contiguous(), mask[..., :8].contiguous())
        assert loss(noisy, ignored).item() == pytest.approx(left.item(), rel=1e-5)


def test_dice_reference_keeps_ignore_pixels_in_the_denominator():
    """Reference code: sigmoid^2 of ignore pixels adds to sum(p^2) of both channels (t is 0 there)."""
    logits = torch.tensor([[[[0.0, 2.0, 3.0]], [[1.0, -1.0, -2.0]]]])  # [1,2,1,3]; the third pixel ignored
    target = torch.tensor([[[1, 0, 255]]])
    p = torch.sigmoid(logits)[0, :, 0]  # [2, 3]
    t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    expected = sum(1 - 2 * (p[c] * t[c]).sum() / (p[c].square().sum() + t[c].square().sum()) for c in range(2))
    assert weighted_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert build_loss("dice")(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # excluded drops the third pixel entirely: a different value
    assert build_loss("dice", "excluded")(logits, target).item() == pytest.approx(
        weighted_dice_loss(logits[..., :2].contiguous(), target[..., :2].contiguous()).item(), rel=1e-6)
    assert build_loss("dice", "excluded")(logits, target).item() != pytest.approx(expected.item(), rel=1e-3)
    with pytest.raises(ValueError, match="training.dice_ignore"):
        build_loss("dice", "sometimes")


def test_dice_gradient_moves_towards_the_target():
    mask = random_mask(3)
    logits = torch.zeros(2, 2, 16, 16, requires_grad=True)
    weighted_dice_loss(logits, mask).backward()
    fg_grad = logits.grad[:, 1]
    assert (fg_grad[mask == 1] < 0).all() and (fg_grad[mask == 0] > 0).all()


def test_cross_entropy_all_ignored_is_zero_and_build_loss_rejects_unknown():
    target = torch.full((1, 4, 4), 255)
    assert cross_entropy_loss(torch.randn(1, 2, 4, 4), target).item() == 0.0
    assert build_loss("ce") is cross_entropy_loss
    with pytest.raises(ValueError, match="training.loss"):
        build_loss("focal")
    with pytest.raises(ValueError, match="logits"):
        weighted_dice_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
