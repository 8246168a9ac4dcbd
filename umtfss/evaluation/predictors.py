"""Predictors that the meta-test scores: reference baselines without training and trained FSS models."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from umtfss.evaluation.feature_cache import FeatureCache, takes_features

REFERENCE_METHODS = ("all-background", "prototype-threshold")


@runtime_checkable
class Predictor(Protocol):
    """Maps a batch of episodes at test size S to two-class logits (index 1 = the support's class).

    query [B,3,S,S] float in [0,1]; supports [B,K,3,S,S]; support_masks [B,K,S,S] float 0/1 with
    255 on ignored and padded pixels; query_valid [B,S,S] bool (the query's image pixels, None = all)
    -> logits [B,2,S,S]. Inputs are already on the predictor's device. A predictor with a frozen
    backbone may also offer use_feature_cache(max_mb); once it is on, predict takes image_ids =
    (query ids [B], support id lists [B][K]) and runs the backbone once per image id (FeatureCache).
    """

    def predict(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor,
                query_valid: torch.Tensor | None = None) -> torch.Tensor: ...


def _split_ids(image_ids, batch: int, shots: int) -> tuple[list[str] | None, list[str] | None]:
    """(query ids [B], support ids [B*K] in supports.flatten(0, 1) order) from image_ids = (query ids,
    per-episode support id lists), or (None, None)."""
    if image_ids is None:
        return None, None
    query_ids, support_ids = image_ids
    flat = [str(i) for ids in support_ids for i in ids]
    if len(query_ids) != batch or len(flat) != batch * shots:
        raise ValueError(f"image_ids name {len(query_ids)} queries and {len(flat)} supports for a batch of "
                         f"{batch} episodes of {shots} shots")
    return [str(i) for i in query_ids], flat


def _check_inputs(query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor) -> None:
    if query.ndim != 4 or supports.ndim != 5 or support_masks.ndim != 4:
        raise ValueError(
            "expected query [B,3,S,S], supports [B,K,3,S,S], support_masks [B,K,S,S]; got "
            f"{tuple(query.shape)}, {tuple(supports.shape)}, {tuple(support_masks.shape)}"
        )
    if supports.shape[:2] != support_masks.shape[:2] or supports.shape[0] != query.shape[0]:
        raise ValueError(
            f"batch/shot sizes disagree: query {tuple(query.shape)}, supports {tuple(supports.shape)}, "
            f"support_masks {tuple(support_masks.shape)}"
        )


class AllBackground:
    """Predicts background everywhere: the floor of every score (mIoU 0)."""

    def predict(self, query, supports, support_masks, query_valid=None):
        _check_inputs(query, supports, support_masks)
        b, _, h, w = query.shape
        logits = torch.zeros(b, 2, h, w, device=query.device)
        logits[:, 0] = 1.0
        return logits


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling: features [N,C,h,w], masks [N,H,W] 0/1 -> (prototypes [N,C], has_mask [N]).

    The mask is area-averaged to the feature grid, so small objects still weigh in.
    """
    weights = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="area")
    area = weights.sum(dim=(2, 3))
    prototypes = (features * weights).sum(dim=(2, 3)) / area.clamp_min(1e-6)
    return prototypes, area[:, 0] > 0


class PrototypeThreshold:
    """Training-free baseline: cosine similarity of query features to the support prototype, thresholded.

    Each support gives a masked-average prototype of the backbone's `layer` features; the K prototypes
    (those with a non-empty mask) are averaged. The query's cosine-similarity map is min-max normalised
    per query, upsampled to the input and compared with `threshold`.
    """

    def __init__(self, backbone: torch.nn.Module, layer: str | None = None, threshold: float = 0.5):
        self.backbone = backbone.eval()
        self.layer = layer or getattr(backbone, "high_layer", None)
        if self.layer is None:
            raise ValueError("PrototypeThreshold needs a feature layer: the backbone has no 'high_layer'")
        self.threshold = float(threshold)

        self.cache: FeatureCache | None = None

    def use_feature_cache(self, max_mb: float) -> FeatureCache:
        """Keep the backbone's features of each image id predict is given (the backbone is frozen)."""
        self.cache = FeatureCache(max_mb, [self.layer])
        return self.cache

    def _features(self, images: torch.Tensor, ids=None) -> torch.Tensor:
        if self.cache is not None and ids is not None:
            return self.cache.features(self.backbone, images, ids)[self.layer]
        outputs = self.backbone(images)
        if self.layer not in outputs:
            raise ValueError(f"backbone returned layers {sorted(outputs)}, not the requested '{self.layer}'")
        return outputs[self.layer]

    def similarity(self, query, supports, support_masks, query_valid=None, image_ids=None) -> torch.Tensor:
        """Min-max normalised cosine similarity to the support prototype, [B,h,w] at feature resolution;
        the min and max are taken over the query's image cells (query_valid [B,S,S]; None = all cells),
        so that padding does not set the scale."""
        b, k = supports.shape[:2]
        query_ids, support_ids = _split_ids(image_ids, b, k)
        query_features = self._features(query, query_ids)
        support_features = self._features(supports.flatten(0, 1), support_ids)
        foreground = (support_masks == 1).float()  # ignore and padding (255) are not foreground
        prototypes, has_mask = masked_average(support_features, foreground.flatten(0, 1))
        prototypes, has_mask = prototypes.view(b, k, -1), has_mask.view(b, k, 1).float()
        prototype = (prototypes * has_mask).sum(1) / has_mask.sum(1).clamp_min(1.0)
        cosine = F.cosine_similarity(query_features, prototype[:, :, None, None], dim=1)
        flat = cosine.flatten(1)
        if query_valid is None:
            cells = torch.ones_like(flat, dtype=torch.bool)
        else:
            cells = F.interpolate(query_valid[:, None].float(), size=cosine.shape[-2:], mode="nearest").flatten(1) > 0
            cells |= ~cells.any(dim=1, keepdim=True)  # no image cell at this resolution: all of them
        low = flat.masked_fill(~cells, float("inf")).min(1).values[:, None, None]
        high = flat.masked_fill(~cells, float("-inf")).max(1).values[:, None, None]
        return (cosine - low) / (high - low).clamp_min(1e-6)

    def predict(self, query, supports, support_masks, query_valid=None, image_ids=None):
        _check_inputs(query, supports, support_masks)
        similarity = self.similarity(query, supports, support_masks, query_valid, image_ids)
        similarity = F.interpolate(similarity[:, None], size=query.shape[-2:], mode="bilinear", align_corners=False)
        foreground = similarity[:, 0] - self.threshold
        return torch.stack([-foreground, foreground], dim=1)


class ModelPredictor:
    """Wraps any nn.Module with the FSSModel forward signature (query, supports, support_masks[, query_valid]).

    A forward without `query_valid` (another meta-learner) gets 0/1 support masks, ignore and padding
    as 0; FSSModel gets the 255s and the query's valid pixels, to leave padding out of its attention.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.takes_valid = "query_valid" in inspect.signature(model.forward).parameters
        self.cache: FeatureCache | None = None

    def use_feature_cache(self, max_mb: float) -> FeatureCache | None:
        """Keep the frozen backbone's features of each image id predict is given; None for a model
        that cannot take them (only FSSModel's forward does)."""
        if not takes_features(self.model):
            return None
        self.cache = FeatureCache(max_mb, self.model.backbone_layers)
        return self.cache

    def predict(self, query, supports, support_masks, query_valid=None, image_ids=None):
        _check_inputs(query, supports, support_masks)
        if self.cache is not None and image_ids is not None:
            query_ids, support_ids = _split_ids(image_ids, *supports.shape[:2])
            features = (self.cache.features(self.model.backbone, query, query_ids),
                        self.cache.features(self.model.backbone, supports.flatten(0, 1), support_ids))
            logits = self.model(query, supports, support_masks, query_valid=query_valid, features=features)
        elif self.takes_valid:
            logits = self.model(query, supports, support_masks, query_valid=query_valid)
        else:
            logits = self.model(query, supports, (support_masks == 1).float())
        if logits.ndim != 4 or logits.shape[:2] != (query.shape[0], 2):
            raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected [B,2,H,W]")
        if logits.shape[-2:] != query.shape[-2:]:
            logits = F.interpolate(logits, size=query.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def build_predictor(method: str, config: dict, checkpoint: str | Path | None = None, device="cpu") -> Predictor:
    """The predictor of an evaluation method: a reference baseline or a trained checkpoint.

    "all-background" and "prototype-threshold" take no checkpoint; any other method name (unsup, sup,
    finetune-20%, or a custom ablation name) is a trained model loaded from `checkpoint`.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if method in REFERENCE_METHODS and checkpoint is not None:
        raise ValueError(f"method '{method}' is a reference predictor and takes no checkpoint, got '{checkpoint}'")
    if method == "all-background":
        return AllBackground()
    if method == "prototype-threshold":
        from umtfss.backbones import build_backbone

        from umtfss.config import REFERENCE_PREDICTOR_KEYS

        name, *checkpoint_keys = REFERENCE_PREDICTOR_KEYS
        model_cfg = config["model"]
        backbone = build_backbone(model_cfg[name], **{k: model_cfg.get(k) for k in checkpoint_keys},
                                  output_stride=8, config_section="model").to(device)
        return PrototypeThreshold(backbone, backbone.high_layer, config["evaluation"]["threshold"])
    if checkpoint is None:
        raise ValueError(
            f"method '{method}' is a trained model and needs a checkpoint (--method {method}=PATH); "
            f"reference predictors without one: {', '.join(REFERENCE_METHODS)}"
        )
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint '{path}' of method '{method}' is a folder; expected a checkpoint file "
                         f"(e.g. {path / 'checkpoint.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' of method '{method}' does not exist")
    from umtfss.training.checkpoint import load_model

    model = load_model(path, device)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"checkpoint '{path}' did not load as a torch module (got {type(model).__name__})")
    return ModelPredictor(model.to(device))
