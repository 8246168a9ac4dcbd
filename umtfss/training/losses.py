"""Training losses on 2-class logits [B,2,H,W] against masks [B,H,W] with 0/1 and 255 = ignore."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from umtfss.episode import IGNORE

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DICE_IGNORE = ("denominator", "excluded")


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0, eps: float = 1e-8,
                       ignore: str = "denominator") -> torch.Tensor:
    """Weighted Dice of the released UMTFSS code (CyCTR-PyTorch's).

    For every image b and both channels c in {background, foreground}:
        p = sigmoid(logit_c)  (each channel on its own, as the released code does),
        t = 1 where target == c, else 0 (so 0 in both channels on ignore pixels, 255),
        loss_bc = 1 - 2 * sum(p * t) / max(sum(p^2) + sum(t^2), eps).
    ignore='denominator' (released code): the sums run over every pixel, so ignore pixels still count
    in sum(p^2) and the loss pushes both channels down there; 'excluded': the sums run over the
    pixels != 255 only. The result is weight * sum over b and c of loss_bc / B.
    """
    _check_shapes(logits, target)
    if ignore not in DICE_IGNORE:
        raise ValueError(f"config key 'training.dice_ignore' is '{ignore}', expected one of {', '.join(DICE_IGNORE)}")
    one_hot = torch.stack([target == 0, target == 1], dim=1).to(logits.dtype)  # ignore -> all zero
    prob = torch.sigmoid(logits.float())
    if ignore == "excluded":
        prob = prob * (target != IGNORE).unsqueeze(1).float()
    one_hot = one_hot.float()
    overlap = (prob * one_hot).flatten(2).sum(-1)  # [B,2]
    energy = (prob.square().flatten(2).sum(-1) + one_hot.square().flatten(2).sum(-1)).clamp_min(eps)
    per_channel = 1.0 - 2.0 * overlap / energy
    return weight * per_channel.sum() / logits.shape[0]


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over valid pixels (255 ignored); 0 when none is valid."""
    _check_shapes(logits, target)
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE)


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"loss expects logits [B,2,H,W], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"loss expects a target [B,H,W] matching logits {tuple(logits.shape)}, got {tuple(target.shape)}")


LOSSES: dict[str, LossFn] = {"dice": weighted_dice_loss, "ce": cross_entropy_loss}


def build_loss(name: str, dice_ignore: str = "denominator") -> LossFn:
    """The loss called `name` (config key training.loss); dice_ignore is training.dice_ignore."""
    if name not in LOSSES:
        raise ValueError(f"config key 'training.loss' is '{name}', expected one of {', '.join(LOSSES)}")
    if name == "dice":
        if dice_ignore not in DICE_IGNORE:
            raise ValueError(f"config key 'training.dice_ignore' is '{dice_ignore}', expected one of {', '.join(DICE_IGNORE)}")
        return partial(weighted_dice_loss, ignore=dice_ignore)
    return LOSSES[name]
