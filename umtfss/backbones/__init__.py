"""Backbone registry: frozen feature extractors by name, with their checkpoints resolved and verified."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from umtfss.backbones.checkpoints import config_key, load_into, load_state_dict, resolve_checkpoint, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureBackbone(nn.Module):
    """A frozen network mapping RGB in [0, 1] to named feature maps; it normalises its input itself.

    It stays in eval mode (BatchNorm statistics frozen) even when a parent model calls .train(),
    and none of its parameters require gradients.
    """

    def __init__(
        self,
        name: str,
        channels: dict[str, int],
        strides: dict[str, int],
        mid_layers: tuple[str, ...],
        high_layer: str,
        embed_layer: str,
    ):
        super().__init__()
        self.name = name
        self.channels = dict(channels)
        self.strides = dict(strides)
        self.mid_layers = tuple(mid_layers)
        self.high_layer = high_layer
        self.embed_layer = embed_layer
        self.checkpoint_sha256: str | None = None
        # not persistent: the module's state dict is exactly the network's weights
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"backbone '{self.name}' expects float images [B,3,H,W] with RGB in [0,1], "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        normalised = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        return self.extract(normalised)

    def extract(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps from ImageNet-normalised images; implemented by each architecture."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "FeatureBackbone":
        """Always eval: a frozen backbone must not update BatchNorm statistics or use dropout."""
        return super().train(False)

    def weights_module(self) -> nn.Module:
        """The sub-module whose state dict a checkpoint fills (its keys are the checkpoint's)."""
        return self

    def fit_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Resize what may legitimately differ between checkpoints of this architecture (ViT's
        position embedding grid) before `state` is loaded; the default changes nothing."""

    def describe_checkpoint(self, state: dict[str, torch.Tensor]) -> str | None:
        """A hint of what `state` looks like when it does not fit (another width, depth or patch)."""
        return None


def freeze(module: nn.Module) -> nn.Module:
    """Make `module` frozen: no parameter requires grad, eval mode, and .train() cannot undo it."""
    module.requires_grad_(False)
    module.eval()
    if type(module).train is nn.Module.train:
        # a backbone class that does not keep itself in eval mode gets the same guarantee
        module.train = types.MethodType(_train_always_eval, module)
    return module


def _train_always_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registry entry and where its published weights are."""

    factory: Callable[[int], nn.Module]  # output_stride -> untrained module
    url: str | None = None  # default checkpoint (used when the config gives no path or URL)
    sha256: str | None = None  # published digest (or prefix) of that default file
    convert: Callable[[dict, Path], dict] | None = None  # loaded checkpoint -> module state dict
    hint: str | None = None  # where to get the weights by hand, for a name with no published URL

    @property
    def has_weights(self) -> bool:
        return self.convert is not None


def _resnet(name: str) -> BackboneSpec:
    from umtfss.backbones import resnet

    return BackboneSpec(
        factory=lambda stride: resnet.ARCHITECTURES[name](name, output_stride=stride),
        url=resnet.DEFAULT_URLS[name],
        sha256=resnet.DEFAULT_SHA256.get(name),
        convert=resnet.CONVERTERS[name],
        hint=resnet.WEIGHTS_HINTS.get(name),
    )


def _dino(name: str) -> BackboneSpec:
    from umtfss.backbones import vit

    return BackboneSpec(
        factory=lambda stride: vit.build_dino_vit(name),
        url=vit.DINO_URLS[name],
        convert=vit.convert_dino_checkpoint,
    )


def _demo(name: str) -> BackboneSpec:
    def build(stride: int) -> nn.Module:
        from umtfss.backbones.demo import ColorTextureBackbone  # written separately; imported on use

        return ColorTextureBackbone(output_stride=stride)

    return BackboneSpec(factory=build)


# name -> function returning its spec; the architecture modules are imported only when used.
_REGISTRY: dict[str, Callable[[str], BackboneSpec]] = {
    "resnet50-imagenet": _resnet,
    "resnet50-mocov2": _resnet,
    "resnet50-deepstem": _resnet,
    "dino-vits8": _dino,
    "dino-vits16": _dino,
    "dino-vitb8": _dino,
    "dino-vitb16": _dino,
    "demo-colortexture": _demo,
}


def list_backbones() -> list[str]:
    """Names accepted by build_backbone."""
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`; unknown names raise ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"backbone '{name}' is not known; expected one of {', '.join(list_backbones())}")
    return _REGISTRY[name](name)


def build_backbone(
    name: str,
    checkpoint: str | Path | None = None,
    checkpoint_url: str | None = None,
    checkpoint_sha256: str | None = None,
    output_stride: int = 8,
    *,
    random_init: bool = False,
    cache_dir: str | Path | None = None,
    config_section: str | None = None,
) -> nn.Module:
    """Build a frozen, eval-mode backbone with its weights loaded.

    Weights come from `checkpoint` (a local file) if given, else from `checkpoint_url`, else from
    the name's published URL (downloaded once into `cache_dir`, default ~/.cache/umtfss). The
    published digest is checked whenever the file comes from the published URL (named or not), unless
    `checkpoint_sha256` is given; `checkpoint_sha256` is checked for any file.
    `random_init=True` loads nothing (tests, benchmarks, ablations): the weights are random.
    `config_section` ('embedding' or 'model') lets messages name the config key to fix.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride {output_stride} for backbone '{name}' is not allowed; expected 8, 16 or 32")
    spec = backbone_spec(name)
    if not spec.has_weights and (checkpoint is not None or checkpoint_url is not None):
        raise ValueError(
            f"backbone '{name}' has no weights to load, but a checkpoint was given "
            f"({checkpoint or checkpoint_url}); set checkpoint and checkpoint_url to null"
        )
    module = spec.factory(output_stride)
    if spec.has_weights and not random_init:
        sha256 = checkpoint_sha256
        if checkpoint is None and checkpoint_url in (None, spec.url) and sha256 is None:
            sha256 = spec.sha256  # the configs name the published URL: its digest still applies
        if checkpoint is None and checkpoint_url is None and spec.url is None:
            raise ValueError(f"backbone '{name}' has no download URL and no checkpoint was given: {spec.hint}")
        path = resolve_checkpoint(checkpoint, checkpoint_url or spec.url, sha256, cache_dir, section=config_section)
        target = module.weights_module() if isinstance(module, FeatureBackbone) else module
        state = None
        try:
            state = spec.convert(load_state_dict(path), path)
            if isinstance(module, FeatureBackbone):
                module.fit_checkpoint(state)
            load_into(target, state, path)
        except ValueError as err:
            # name the backbone and the config key: a config has two backbone sections (model, embedding)
            if checkpoint is not None:
                source = config_key(config_section, "checkpoint")
            elif checkpoint_url is not None:
                source = config_key(config_section, "checkpoint_url")
            else:
                source = f"its published checkpoint; {config_key(config_section, 'checkpoint')} is null"
            hint = None
            if state is not None and isinstance(module, FeatureBackbone):
                hint = module.describe_checkpoint(state)
            raise ValueError(f"backbone '{name}' ({source}): " + (f"{hint}; " if hint else "") + str(err)) from None
        module.checkpoint_sha256 = sha256_file(path)
    return freeze(module)


__all__ = [
    "FeatureBackbone",
    "BackboneSpec",
    "build_backbone",
    "backbone_spec",
    "list_backbones",
    "freeze",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
