"""Frozen-backbone features of each test image, computed once per meta-test and reused by every episode it is in."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

MB = 1 << 20


def takes_features(model) -> bool:
    """Whether the model's forward takes its backbone's features computed beforehand (FSSModel, whose
    backbone is frozen: `backbone_layers` names the outputs it reads, `features=` takes them)."""
    return hasattr(model, "backbone_layers") and "features" in inspect.signature(model.forward).parameters


class FeatureCache:
    """A least-recently-used store of a frozen backbone's outputs, keyed by image id.

    A test image appears in many episodes (the demo's fold 0: 2,400 query and support slots over 1-
    and 5-shot, about 60 distinct images), and the backbone is frozen, so its features depend on the
    image alone: `features` runs the backbone only on the images it has not kept, each once per batch.
    `max_mb` bounds what it keeps (0: nothing, every call runs the backbone); only `layers` are kept.
    Valid for one geometry: the caller keys the same id to the same input tensor (one evaluate call).
    """

    def __init__(self, max_mb: float, layers: Sequence[str]):
        if max_mb < 0:
            raise ValueError(f"config key 'evaluation.feature_cache_mb' is {max_mb}; expected a size in MB >= 0")
        self.max_bytes = int(max_mb * MB)
        self.layers = tuple(layers)
        self._kept: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # kept, then dropped for room
        self._seen: set[str] = set()
        self._entry_bytes = 0  # of the last entry computed: one image's features

    def __len__(self) -> int:
        return len(self._kept)

    def features(self, backbone: torch.nn.Module, images: torch.Tensor, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The backbone's `layers` for images [N,3,S,S] named `ids` (N of them, repeats allowed), as [N,...] each."""
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} image ids for {len(images)} images")
        found: dict[str, dict[str, torch.Tensor]] = {}  # held here: keeping new ones may drop them
        first_of: dict[str, int] = {}
        for index, image_id in enumerate(ids):
            if image_id in found or image_id in first_of:
                self.hits += 1  # twice in one batch: computed once
            elif image_id in self._kept:
                self._kept.move_to_end(image_id)
                found[image_id] = self._kept[image_id]
                self.hits += 1
            else:
                first_of[image_id] = index
                self.misses += 1
        if first_of:
            with torch.no_grad():
                outputs = backbone(images[list(first_of.values())])
            missing = [name for name in self.layers if name not in outputs]
            if missing:
                raise ValueError(f"backbone returned layers {sorted(outputs)}, not the requested {missing}")
            for row, image_id in enumerate(first_of):
                found[image_id] = {name: outputs[name][row].clone() for name in self.layers}
                self._keep(image_id, found[image_id])
        entries = [found[i] for i in ids]
        return {name: torch.stack([entry[name] for entry in entries]) for name in self.layers}

    def _keep(self, image_id: str, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        self._seen.add(image_id)
        self._entry_bytes = size
        if size > self.max_bytes:
            return
        while self._kept and self.bytes + size > self.max_bytes:
            _, evicted = self._kept.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in evicted.values())
            self.dropped += 1
        self._kept[image_id] = entry
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def summary(self) -> str:
        """One line for the log: how many backbone forwards it saved, and what it held."""
        total = self.hits + self.misses
        share = 100.0 * self.hits / total if total else 0.0
        line = (f"feature cache: {self.hits} of {total} image forwards reused ({share:.0f} %), "
                f"{len(self)} images kept, peak {self.peak_bytes / MB:.1f} of {self.max_bytes / MB:.0f} MB")
        if len(self._seen) > len(self):  # some did not fit: say what would hold them all
            need = math.ceil(len(self._seen) * self._entry_bytes / MB)
            line += (f"; {len(self._seen) - len(self)} of {len(self._seen)} images did not stay, "
                     f"evaluation.feature_cache_mb {need} would keep them all")
        return line
