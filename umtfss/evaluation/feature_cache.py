"""Frozen-backbone features of each test image, computed once per meta-test and reused by every episode it is in."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from umtfss.evaluation.bounded_store import MB, BoundedStore  # noqa: F401 (MB: the caches' unit)


def takes_features(model) -> bool:
    """Whether the model's forward takes its backbone's features computed beforehand (FSSModel, whose
    backbone is frozen: `backbone_layers` names the outputs it reads, `features=` takes them)."""
    return hasattr(model, "backbone_layers") and "features" in inspect.signature(model.forward).parameters


class FeatureCache(BoundedStore):
    """A least-recently-used store of a frozen backbone's outputs, keyed by image id.

    A test image appears in many episodes (the demo's fold 0: 2,400 query and support slots over 1-
    and 5-shot, about 60 distinct images), and the backbone is frozen, so its features depend on the
    image alone: `features` runs the backbone only on the images it has not kept, each once per batch.
    `max_mb` bounds what it keeps (0: nothing, every call runs the backbone); only `layers` are kept.
    Valid for one geometry: the caller keys the same id to the same input tensor (one evaluate call).
    """

    def __init__(self, max_mb: float, layers: Sequence[str]):
        super().__init__(max_mb, "evaluation.feature_cache_mb")
        self.layers = tuple(layers)

    def features(self, backbone: torch.nn.Module, images: torch.Tensor, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The backbone's `layers` for images [N,3,S,S] named `ids` (N of them, repeats allowed), as [N,...] each."""
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} image ids for {len(images)} images")
        found: dict[str, dict[str, torch.Tensor]] = {}  # held here: keeping new ones may drop them
        first_of: dict[str, int] = {}
        for index, image_id in enumerate(ids):
            if image_id in found or image_id in first_of:
                self.hits += 1  # twice in one batch: computed once
            elif (entry := self.lookup(image_id)) is not None:
                found[image_id] = entry
            else:
                first_of[image_id] = index
        if first_of:
            with torch.no_grad():
                outputs = backbone(images[list(first_of.values())])
            missing = [name for name in self.layers if name not in outputs]
            if missing:
                raise ValueError(f"backbone returned layers {sorted(outputs)}, not the requested {missing}")
            for row, image_id in enumerate(first_of):
                found[image_id] = {name: outputs[name][row].clone() for name in self.layers}
                self.keep(image_id, found[image_id], sum(t.numel() * t.element_size() for t in found[image_id].values()))
        entries = [found[i] for i in ids]
        return {name: torch.stack([entry[name] for entry in entries]) for name in self.layers}

    def summary(self) -> str:
        """One line for the log: how many backbone forwards it saved, and what it held."""
        return super().summary("feature cache", "image forwards")
