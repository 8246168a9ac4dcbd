"""A plain Vision Transformer whose parameter names match DINO's released checkpoints (ViT-S/B, patch 8/16)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from umtfss.backbones import FeatureBackbone
from umtfss.backbones.checkpoints import unwrap_state_dict

_DINO_BASE = "https://dl.fbaipublicfiles.com/dino"
DINO_URLS = {
    "dino-vits8": f"{_DINO_BASE}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino-vits16": f"{_DINO_BASE}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino-vitb8": f"{_DINO_BASE}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino-vitb16": f"{_DINO_BASE}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}
# name -> (width, depth, heads, patch size); DINO trained at 224x224, which sizes pos_embed
DINO_ARCHS = {
    "dino-vits8": (384, 12, 6, 8),
    "dino-vits16": (384, 12, 6, 16),
    "dino-vitb8": (768, 12, 12, 8),
    "dino-vitb16": (768, 12, 12, 16),
}
PRETRAIN_SIZE = 224


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to tokens by a strided convolution."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images)  # [B, D, H/p, W/p]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (DINO's layout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    """Two-layer GELU feed-forward, 4x wide."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class DinoViTBackbone(FeatureBackbone):
    """ViT returning its final-layer patch tokens as a map {"last": [B, D, ceil(H/p), ceil(W/p)]}.

    The input is zero-padded (black, as the resize-and-pad transform pads) to a multiple of the
    patch size, and the 224-pixel position embedding is interpolated (bicubic) to the patch grid.
    """

    def __init__(self, name: str, dim: int, depth: int, heads: int, patch_size: int):
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by {heads} heads")
        super().__init__(
            name=name,
            channels={"last": dim},
            strides={"last": patch_size},
            mid_layers=("last",),
            high_layer="last",
            embed_layer="last",
        )
        self.patch_size = patch_size
        self.pretrain_grid = PRETRAIN_SIZE // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, dim))
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_random()

    def _init_random(self) -> None:
        """Truncated-normal init (as DINO's), so that a random backbone is a sensible baseline."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def fit_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Take the position-embedding grid of a checkpoint trained at another image size (e.g. 448).

        Any square grid of this width is valid ViT weights: the forward pass interpolates it to each
        input's grid anyway, so only its shape has to follow the checkpoint's.
        """
        pos = state.get("pos_embed")
        ours = self.pos_embed
        if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or pos.shape == ours.shape:
            return
        grid = math.isqrt(max(pos.shape[1] - 1, 0))
        if pos.shape[0] == 1 and pos.shape[2] == ours.shape[2] and grid > 0 and grid * grid == pos.shape[1] - 1:
            self.pos_embed = nn.Parameter(torch.zeros(pos.shape, dtype=ours.dtype, device=ours.device),
                                          requires_grad=ours.requires_grad)
            self.pretrain_grid = grid

    def describe_checkpoint(self, state: dict[str, torch.Tensor]) -> str | None:
        """What ViT (or other network) a checkpoint that does not fit holds, next to this one."""
        return describe_vit(state, self)

    def grid_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings [1, 1 + rows*cols, D] for a rows x cols patch grid.

        Bicubic with DINO's scale factors ((rows + 0.1) / n, (cols + 0.1) / n) rather than the output
        size, so the samples sit where DINO's own interpolation puts them (the sizes come out the same).
        """
        if (rows, cols) == (self.pretrain_grid, self.pretrain_grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        n = self.pretrain_grid
        grid = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic",
                             align_corners=False)  # output floor(rows + 0.1) x floor(cols + 0.1)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def extract(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        patch = self.patch_size
        height, width = normalised.shape[-2:]
        pad_h, pad_w = -height % patch, -width % patch
        if pad_h or pad_w:
            # pad with the normalised value of black, as resize_pad pads the [0,1] image with zeros
            black = -self.pixel_mean / self.pixel_std
            padded = black.to(normalised.dtype).expand(normalised.shape[0], 3, height + pad_h, width + pad_w).clone()
            padded[..., :height, :width] = normalised
            normalised = padded
        patches = self.patch_embed(normalised)
        batch, dim, rows, cols = patches.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.grid_pos_embed(rows, cols).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return {"last": tokens[:, 1:].transpose(1, 2).reshape(batch, dim, rows, cols)}


def _vit_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(width, patch size, blocks) of a ViT state dict, or None if it holds no patch embedding."""
    proj = state.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        return None
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    return int(proj.shape[0]), int(proj.shape[-1]), len(blocks)


def describe_vit(state: Mapping[str, torch.Tensor], model: DinoViTBackbone) -> str | None:
    """A hint naming the checkpoint's ViT size (and the registry name that fits it)."""
    found = _vit_shape(state)
    if found is None:
        if "layer1.0.conv1.weight" in state:
            return "the checkpoint holds a ResNet: use a resnet50-* backbone"
        return None
    width, patch, depth = found
    fits = [name for name, (w, d, _, p) in DINO_ARCHS.items() if (w, d, p) == (width, depth, patch)]
    ours = (model.channels["last"], model.patch_size, len(model.blocks))
    if found == ours:
        return None
    return (f"the checkpoint holds a ViT of width {width}, patch {patch}, {depth} blocks"
            f"{f' (backbone {fits[0]!r})' if fits else ''}; '{model.name}' is width {ours[0]}, "
            f"patch {ours[1]}, {ours[2]} blocks")


def build_dino_vit(name: str, depth: int | None = None) -> DinoViTBackbone:
    """The ViT of a DINO registry name; `depth` overrides the block count (only to keep tests small)."""
    if name not in DINO_ARCHS:
        raise ValueError(f"'{name}' is not a DINO ViT; expected one of {', '.join(sorted(DINO_ARCHS))}")
    dim, real_depth, heads, patch = DINO_ARCHS[name]
    return DinoViTBackbone(name, dim, real_depth if depth is None else depth, heads, patch)


def convert_dino_checkpoint(checkpoint: Mapping, path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights from a DINO release (flat) or a full training checkpoint (teacher preferred).

    `module.` and `backbone.` prefixes are stripped; the projection head (`head.*`) is dropped.
    """
    weights = unwrap_state_dict(checkpoint, path)
    return {k: v for k, v in weights.items() if not k.startswith("head.")}
