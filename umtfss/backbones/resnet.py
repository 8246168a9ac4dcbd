"""ResNet-50 frozen feature backbones (dilated to stride 8 or 16): torchvision's, and the deep-stem one of the FSS reference code."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from umtfss.backbones import FeatureBackbone
from umtfss.backbones.checkpoints import unwrap_state_dict

# torchvision's IMAGENET1K_V1 weights (the paper's "ImageNet ResNet-50"; the reference code loads
# PSPNet's deep-stem resnet50_v2.pth instead, resnet50-deepstem); the file name carries the first
# 8 hex digits of the file's SHA-256, which we verify.
TORCHVISION_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
# The official MoCo v2 (800 epochs) release: a .pth.tar whose "state_dict" keys start with
# "module.encoder_q." (the query encoder) and include the MLP head "fc.*" and the key encoder.
MOCOV2_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"
MOCO_QUERY_PREFIXES = ("module.encoder_q.", "encoder_q.")

DEFAULT_URLS = {"resnet50-imagenet": TORCHVISION_RESNET50_URL, "resnet50-mocov2": MOCOV2_URL, "resnet50-deepstem": None}
DEFAULT_SHA256 = {"resnet50-imagenet": "0676ba61"}
# The deep-stem weights are PSPNet's ImageNet ResNet-50, which PFENet, CyCTR and UMTFSS ship as
# initmodel/resnet50_v2.pth behind cloud-drive links: there is no stable URL to download or pin.
WEIGHTS_HINTS = {
    "resnet50-deepstem": "its ImageNet weights are PSPNet's resnet50_v2.pth, which the PFENet / CyCTR / UMTFSS "
                         "repositories link to as initmodel/resnet50_v2.pth; download that file by hand and set "
                         "'checkpoint' (in the config section naming this backbone: 'model' or 'embedding') to its "
                         "path, and 'checkpoint_sha256' to pin it",
}

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

    def describe_checkpoint(self, state: dict[str, torch.Tensor]) -> str | None:
        """What network a checkpoint that does not fit holds: another depth, stem or format."""
        return describe_resnet(state, self)

    def stem(self, normalised: torch.Tensor) -> torch.Tensor:
        """The layers before layer1: 7x7 conv (stride 2), BatchNorm, ReLU, 3x3 max-pool (stride 2)."""
        net = self.net
        return net.maxpool(net.relu(net.bn1(net.conv1(normalised))))

    def extract(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(normalised)
        features = {}
        for layer in LAYERS:
            x = getattr(self.net, layer)(x)
            features[layer] = x
        return features


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class DeepStemResNet50Backbone(ResNet50Backbone):
    """ResNet-50 with PSPNet's deep stem, the backbone the FSS reference code (PFENet, CyCTR, UMTFSS) loads.

    The 7x7 stem conv is three 3x3 convs (3->64 at stride 2, 64->64, 64->128, each with BatchNorm
    and ReLU) before the max-pool, so layer1 takes 128 channels; the bottlenecks, their stride on
    the 3x3 conv and the dilation of layer3 / layer4 are torchvision's. Parameter names are those of
    the reference's `resnet50_v2.pth` (conv1..conv3, bn1..bn3, layer1..layer4, fc).
    """

    def __init__(self, name: str = "resnet50-deepstem", output_stride: int = 8):
        super().__init__(name, output_stride)
        net = self.net
        net.conv1, net.bn1 = _conv3x3(3, 64, stride=2), nn.BatchNorm2d(64)
        net.conv2, net.bn2 = _conv3x3(64, 64), nn.BatchNorm2d(64)
        net.conv3, net.bn3 = _conv3x3(64, 128), nn.BatchNorm2d(128)
        block = torchvision.models.resnet.Bottleneck
        widen = nn.Sequential(torchvision.models.resnet.conv1x1(128, 256), nn.BatchNorm2d(256))
        net.layer1 = nn.Sequential(block(128, 64, downsample=widen), block(256, 64), block(256, 64))

    def stem(self, normalised: torch.Tensor) -> torch.Tensor:
        """Three 3x3 conv + BatchNorm + ReLU (the first at stride 2), then the 3x3 max-pool (stride 2)."""
        net = self.net
        x = net.relu(net.bn1(net.conv1(normalised)))
        x = net.relu(net.bn2(net.conv2(x)))
        x = net.relu(net.bn3(net.conv3(x)))
        return net.maxpool(x)


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


# blocks per layer -> the torchvision name, to say what a checkpoint that does not fit is
_DEPTHS = {(2, 2, 2, 2): "ResNet-18", (3, 4, 6, 3): "ResNet-34/50", (3, 4, 23, 3): "ResNet-101",
           (3, 8, 36, 3): "ResNet-152"}


def describe_resnet(state: Mapping[str, torch.Tensor], model: ResNet50Backbone) -> str | None:
    """A hint naming what a ResNet checkpoint that does not fit holds, and the backbone that takes it."""
    if any(k.startswith(("encoder_q.", "encoder_k.")) for k in state):
        return "its keys start with 'encoder_q.': a MoCo checkpoint, for backbone 'resnet50-mocov2'"
    if "patch_embed.proj.weight" in state:
        return "the checkpoint holds a Vision Transformer: use a dino-vit* backbone"
    blocks = {layer: set() for layer in LAYERS}
    for key in state:
        if (m := re.match(r"(layer[1-4])\.(\d+)\.", key)):
            blocks[m.group(1)].add(int(m.group(2)))
    depths = tuple(len(blocks[layer]) for layer in LAYERS)
    hints = []
    if depths != (3, 4, 6, 3) and any(depths):
        hints.append(f"the checkpoint's ResNet has {list(depths)} blocks per layer "
                     f"({_DEPTHS.get(depths, 'not ResNet-50')}); ResNet-50 has [3, 4, 6, 3]")
    conv1 = state.get("conv1.weight")
    deep = isinstance(model, DeepStemResNet50Backbone)
    if isinstance(conv1, torch.Tensor) and conv1.ndim == 4:
        if conv1.shape[-1] == 7 and deep:
            hints.append("its 7x7 stem conv is torchvision's: use backbone 'resnet50-imagenet'")
        elif conv1.shape[-1] == 3 and not deep and "conv3.weight" in state:
            hints.append("its three 3x3 stem convs are the deep stem: use backbone 'resnet50-deepstem'")
    return "; ".join(hints) or None


CONVERTERS = {"resnet50-imagenet": convert_torchvision, "resnet50-mocov2": convert_mocov2,
              "resnet50-deepstem": convert_torchvision}
ARCHITECTURES = {"resnet50-imagenet": ResNet50Backbone, "resnet50-mocov2": ResNet50Backbone,
                 "resnet50-deepstem": DeepStemResNet50Backbone}
