"""torchvision ResNet-50 as a frozen feature backbone (dilated to stride 8 or 16), with its checkpoint formats."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from umtfss.backbones import FeatureBackbone
from umtfss.backbones.checkpoints import unwrap_state_dict

# torchvision's IMAGENET1K_V1 weights (the ones CyCTR/UMTFSS load); the file name carries the first
# 8 hex digits of the file's SHA-256, which we verify.
TORCHVISION_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
# The official MoCo v2 (800 epochs) release: a .pth.tar whose "state_dict" keys start with
# "module.encoder_q." (the query encoder) and include the MLP head "fc.*" and the key encoder.
MOCOV2_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"
MOCO_QUERY_PREFIXES = ("module.encoder_q.", "encoder_q.")

DEFAULT_URLS = {"resnet50-imagenet": TORCHVISION_RESNET50_URL, "resnet50-mocov2": MOCOV2_URL}
DEFAULT_SHA256 = {"resnet50-imagenet": "0676ba61"}

LAYERS = ("layer1", "layer2", "layer3", "layer4")
LAYER_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
# output stride -> which of layer2, layer3, layer4 trade their stride-2 for dilation
DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def layer_strides(output_stride: int) -> dict[str, int]:
    """Stride of each layer's output relative to the input, for a given output stride."""
    strides, stride = {}, 4
    for layer, dilated in zip(LAYERS, [True] + DILATION[output_stride]):
        if not dilated:
            stride *= 2
        strides[layer] = stride
    return strides


class ResNet50Backbone(FeatureBackbone):
    """ResNet-50 returning layer1..layer4; layer3/layer4 dilated for output stride 8 (as CyCTR/UMTFSS)."""

    def __init__(self, name: str = "resnet50-imagenet", output_stride: int = 8):
        if output_stride not in DILATION:
            raise ValueError(f"output_stride {output_stride} for '{name}' is not allowed; expected 8, 16 or 32")
        super().__init__(
            name=name,
            channels=LAYER_CHANNELS,
            strides=layer_strides(output_stride),
            mid_layers=("layer2", "layer3"),
            high_layer="layer4",
            embed_layer="layer4",
        )
        self.output_stride = output_stride
        self.net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=DILATION[output_stride])
        self.net.fc = nn.Identity()  # the classifier is never used; its weights are dropped on load

    def weights_module(self) -> nn.Module:
        return self.net

    def extract(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(normalised))))
        features = {}
        for layer in LAYERS:
            x = getattr(net, layer)(x)
            features[layer] = x
        return features


def _without_classifier(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if not k.startswith("fc.")}


def convert_torchvision(checkpoint: Mapping, path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict (possibly wrapped / DDP-prefixed) without the classifier."""
    return _without_classifier(unwrap_state_dict(checkpoint, path))


def convert_mocov2(checkpoint: Mapping, path: str | Path) -> dict[str, torch.Tensor]:
    """MoCo v2 `.pth.tar`: the query encoder's weights (prefix stripped), without its MLP head."""
    weights = checkpoint.get("state_dict", checkpoint)
    if not isinstance(weights, Mapping):
        raise ValueError(f"checkpoint '{path}': 'state_dict' is a {type(weights).__name__}, expected a dict")
    query = {}
    for key, value in weights.items():
        prefix = next((p for p in MOCO_QUERY_PREFIXES if str(key).startswith(p)), None)
        if prefix is not None and isinstance(value, torch.Tensor):
            query[str(key)[len(prefix):]] = value
    if not query:
        sample = ", ".join(sorted(map(str, weights))[:5])
        raise ValueError(
            f"checkpoint '{path}' is not a MoCo checkpoint: no key starts with 'module.encoder_q.' "
            f"(first keys: {sample}); expected the official MoCo v2 .pth.tar, or use backbone "
            "'resnet50-imagenet' for a plain torchvision state dict"
        )
    return _without_classifier(query)


CONVERTERS = {"resnet50-imagenet": convert_torchvision, "resnet50-mocov2": convert_mocov2}
