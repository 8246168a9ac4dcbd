"""Meta-test scores: per-class foreground IoU (mIoU) and foreground/background IoU (FB-IoU), accumulated."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from umtfss.episode import IGNORE


def _as_array(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D HxW mask, got shape {arr.shape}")
    return arr


def _iou(intersection: int, union: int) -> float:
    """ΣI/ΣU; an empty union counts as 0 (reference code: I / (U + 1e-10), HSNet: I / max(U, 1))."""
    return intersection / union if union > 0 else 0.0


UNSEEN_RULES = ("zero", "skip")


def _check_unseen(unseen: str) -> None:
    if unseen not in UNSEEN_RULES:
        raise ValueError(f"config key 'evaluation.unseen_classes' is '{unseen}', expected one of {', '.join(UNSEEN_RULES)}")


class IoUAccumulator:
    """Sums intersections and unions over episodes; scores are ratios of sums, not means of per-episode IoUs.

    mIoU follows PFENet/HSNet: for each class of the fold, Σ intersection / Σ union of the foreground over
    the episodes of that class, then the mean over the fold's classes, where a class that received no
    episode counts as 0, as both reference codes count it (`unseen='zero'`); `unseen='skip'` leaves it
    out of the mean instead. `unseen()` lists such classes; `miou()` raises if no class was seen.
    FB-IoU: Σ I / Σ U over all episodes for the foreground and for the background, averaged. Pixels
    whose target is 255 are excluded from every count.
    """

    def __init__(self, class_ids: Iterable[int]):
        self.class_ids = sorted({int(c) for c in class_ids})
        if not self.class_ids:
            raise ValueError("IoUAccumulator needs at least one class id")
        self.intersection = dict.fromkeys(self.class_ids, 0)
        self.union = dict.fromkeys(self.class_ids, 0)
        self.episodes = dict.fromkeys(self.class_ids, 0)
        self.fg_intersection = self.fg_union = 0
        self.bg_intersection = self.bg_union = 0

    def update(self, pred, target, class_id: int) -> None:
        """Add one episode: pred HxW in {0,1}, target HxW in {0,1,255} (255 = ignore), same shape."""
        pred = _as_array(pred, "pred")
        target = _as_array(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
        class_id = int(class_id)
        if class_id not in self.intersection:
            raise ValueError(f"class id {class_id} is not one of this accumulator's classes {self.class_ids}")
        if pred.size and (pred.min() < 0 or pred.max() > 1):
            raise ValueError(f"pred must hold 0/1 values, got range [{pred.min()}, {pred.max()}]")
        valid = target != IGNORE
        if np.any(valid & (target != 0) & (target != 1)):
            raise ValueError("target must hold 0, 1 or 255 (ignore); got other values")
        pred_fg = (pred == 1) & valid
        true_fg = (target == 1) & valid
        pred_bg = (pred == 0) & valid
        true_bg = (target == 0) & valid
        fg_i, fg_u = int(np.count_nonzero(pred_fg & true_fg)), int(np.count_nonzero(pred_fg | true_fg))
        bg_i, bg_u = int(np.count_nonzero(pred_bg & true_bg)), int(np.count_nonzero(pred_bg | true_bg))
        self.intersection[class_id] += fg_i
        self.union[class_id] += fg_u
        self.episodes[class_id] += 1
        self.fg_intersection += fg_i
        self.fg_union += fg_u
        self.bg_intersection += bg_i
        self.bg_union += bg_u

    def seen(self) -> list[int]:
        """Classes that received at least one episode."""
        return [c for c in self.class_ids if self.episodes[c] > 0]

    def unseen(self) -> list[int]:
        """Classes that received no episode (0 in mIoU, or left out of it with unseen='skip')."""
        return [c for c in self.class_ids if self.episodes[c] == 0]

    def per_class(self, unseen: str = "zero") -> dict[int, float]:
        """IoU of every class of the fold, as a fraction, an unseen one as 0 ('zero'); of the seen ones ('skip')."""
        _check_unseen(unseen)
        classes = self.class_ids if unseen == "zero" else self.seen()
        return {c: _iou(self.intersection[c], self.union[c]) for c in classes}

    def miou(self, unseen: str = "zero") -> float:
        """Mean of Σ I / Σ U (fraction) over the fold's classes, an unseen one as 0 ('zero', the reference
        codes') or over the seen classes only ('skip')."""
        if not self.seen():
            raise ValueError("mIoU is undefined: no episode was accumulated")
        return float(np.mean(list(self.per_class(unseen).values())))

    def fbiou(self) -> float:
        """Mean of the foreground and background Σ I / Σ U over all episodes (fraction)."""
        if not self.seen():
            raise ValueError("FB-IoU is undefined: no episode was accumulated")
        return 0.5 * (_iou(self.fg_intersection, self.fg_union) + _iou(self.bg_intersection, self.bg_union))

    @property
    def total_episodes(self) -> int:
        return sum(self.episodes.values())
