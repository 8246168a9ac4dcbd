"""The Transformer FSS model of the paper (Fig. 2): frozen backbone, PFENet-style features, attention layers, FCN head.

Parameter groups for the two optimisers are explicit: `transformer_parameters()` (AdamW) and
`other_parameters()` (SGD); the frozen backbone contributes to neither.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from umtfss.episode import IGNORE  # support-mask value of ignored and padded pixels
from umtfss.model.attention import DeformableBlock, PrototypeCrossAttention, TransformerBlock, VanillaCrossAttention

__all__ = ["FSSModel", "build_model", "masked_average_pool", "prior_mask", "sine_positional_encoding", "MODEL_KEYS"]

# config["model"] keys that shape the network (the others name the backbone and its checkpoint)
MODEL_KEYS = ("dim", "heads", "layers", "dropout", "attention", "prototypes_fg", "prototypes_bg", "hash_bits", "hash_iterations",
              "mask_padding", "mlp_ratio", "head_dropout", "support_merge", "normalize_prototypes", "prototype_source",
              "self_attention", "deformable_points", "linear_bias", "grid_masks", "empty_support",
              "hash_bias", "hash_draw", "positional")
ATTENTIONS = ("prototype", "vanilla")
SELF_ATTENTIONS = ("global", "deformable")
SUPPORT_MERGES = ("own_prototype", "mask_channel")
PROTOTYPE_SOURCES = ("per_layer", "merged")
GRID_MASKS = ("nearest", "bilinear")
EMPTY_SUPPORTS = ("center_patch", "none")
HASH_DRAWS = ("fixed", "per_call")
POSITIONALS = ("sine", "learned", "none")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, the PFENet convention for features and masks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean feature [B,C] of features [B,C,h,w] under a soft mask [B,1,h,w] (PFENet's Weighted_GAP)."""
    area = mask.sum(dim=(2, 3)) + 5e-4
    return (features * mask).sum(dim=(2, 3)) / area


@torch.no_grad()
def prior_mask(query_high: torch.Tensor, support_high: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
    """PFENet prior [B,1,h,w]: per query pixel, max cosine to the masked support pixels, min-max normalised, shot mean.

    query_high [B,C,h,w]; support_high [B,K,C,h,w]; support_masks [B,K,H,W] float 0/1. The max runs over
    the support cells the mask touches: PFENet's masked-out cells are zero vectors (cosine 0), which
    changes nothing for ReLU features (ResNet) but would clamp the prior of signed features (ViT, the
    demo's filter bank) at 0. A support without foreground gives a prior of 0. Computed in float32 under
    any autocast, as the reference code (no mixed precision) computes it: in bfloat16 it moved by up to 0.008.
    """
    batch, shots, channels, height, width = support_high.shape
    with torch.autocast(query_high.device.type, enabled=False):
        masks = _resize(support_masks.flatten(0, 1)[:, None].float(), (height, width)).view(batch, shots, 1, height, width)
        query = F.normalize(query_high.flatten(2).float(), dim=1, eps=1e-7)  # [B,C,Nq]
        support = F.normalize((support_high.float() * masks).flatten(3), dim=2, eps=1e-7)  # [B,K,C,Ns]
        similarity = torch.einsum("bcn,bkcm->bknm", query, support)  # [B,K,Nq,Ns]
    outside = masks.flatten(3) <= 0  # [B,K,1,Ns]: broadcast over the query cells
    similarity = similarity.masked_fill_(outside, float("-inf")).amax(dim=3)  # [B,K,Nq], in place: it is large
    similarity = similarity.masked_fill_(torch.isinf(similarity), 0.0)  # no foreground cell
    low = similarity.amin(dim=2, keepdim=True)
    high = similarity.amax(dim=2, keepdim=True)
    normalised = (similarity - low) / (high - low + 1e-7)
    return normalised.mean(dim=1).view(batch, 1, query_high.shape[2], query_high.shape[3])


def sine_positional_encoding(height: int, width: int, dim: int, device=None, temperature: float = 10000.0,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed 2-D sine/cosine encoding [h*w, dim] (DETR style): half the channels encode y, half x.

    Cell i of an axis of length L sits at (i + 0.5) / L * 2 pi. With `valid` [B, h*w] bool (padded
    cells False) the encoding is per sample [B, h*w, dim] and each axis is normalised to the sample's
    valid extent, as the reference code's padding-aware encoding is: the image part of a padded grid
    gets the encoding an unpadded grid of its size would get.
    """
    def angles_to_code(coords: torch.Tensor, channels: int) -> torch.Tensor:  # coords [...] in [0, 2 pi]
        index = torch.arange(channels, device=coords.device)
        freq = temperature ** (2 * (index // 2) / max(channels, 1))
        angles = coords[..., None] / freq
        return torch.where(index % 2 == 0, angles.sin(), angles.cos())  # [..., channels]

    if valid is not None:
        cells = valid.reshape(-1, height, width).float()
        rows = cells.cumsum(dim=1)  # valid cells above and at each cell, per column
        cols = cells.cumsum(dim=2)
        y = (rows - 0.5).clamp(min=0) / (rows[:, -1:, :] + 1e-6) * 2 * math.pi
        x = (cols - 0.5).clamp(min=0) / (cols[:, :, -1:] + 1e-6) * 2 * math.pi
        code = torch.cat([angles_to_code(y, dim // 2), angles_to_code(x, dim - dim // 2)], dim=-1)
        return code.reshape(cells.shape[0], height * width, dim)
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    y = angles_to_code(y, dim // 2)[:, None, :].expand(height, width, dim // 2)
    x = angles_to_code(x, dim - dim // 2)[None, :, :].expand(height, width, dim - dim // 2)
    return torch.cat([y, x], dim=2).reshape(height * width, dim)


class LearnedPositionalEncoding(nn.Module):
    """Learned encoding on a base grid, bilinearly resized to the feature grid [h*w, dim]."""

    def __init__(self, dim: int, base: int = 32):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, dim, base, base))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, height: int, width: int) -> torch.Tensor:
        return _resize(self.table, (height, width))[0].flatten(1).transpose(0, 1)


class AttentionLayer(nn.Module):
    """One repeat of the Transformer part: self-attention on the query and (unless the support stays the
    merged features) on the support, then cross-attention from the query to the support.

    self_attention 'global' is the paper's multi-head self-attention, 'deformable' the reference code's
    single-scale deformable attention with `points` samples per head.
    """

    def __init__(self, cross: nn.Module, dim: int, heads: int, dropout: float, mlp_ratio: int = 3,
                 self_attention: str = "global", points: int = 9, support_self: bool = True, mlp_bias: bool = True):
        super().__init__()
        self.deformable = self_attention == "deformable"

        def block() -> nn.Module:
            if self.deformable:
                return DeformableBlock(dim, heads, dropout, mlp_ratio, points, mlp_bias=mlp_bias)
            return TransformerBlock(dim, heads, dropout, mlp_ratio, mlp_bias=mlp_bias)

        self.self_query = block()
        self.self_support = block() if support_self else None
        self.cross = cross

    def _self(self, block: nn.Module, tokens, valid, grid, positional):
        if self.deformable:
            return block(tokens, *grid, positional, valid)
        return block(tokens, key_padding_mask=valid)

    def forward(self, query, support, support_foreground, shots: int, query_valid=None, support_valid=None,
                grid=None, positional=None, support_positional=None, keys=None):
        """query [B,N,d]; support [B*K,N,d] (self-attention within each shot); fg bool [B,K*N];
        query_valid [B,N] / support_valid [B*K,N] bool: padded cells are never attended to (None: all valid);
        grid (h, w) and positional / support_positional ([N,d] or per sample): for deformable
        self-attention; keys: precomputed cross-attention keys."""
        query = self._self(self.self_query, query, query_valid, grid, positional)
        if self.self_support is not None:
            support = self._self(self.self_support, support, support_valid, grid, support_positional)
        pooled = support.reshape(query.shape[0], shots * support.shape[1], support.shape[2])
        pooled_valid = None if support_valid is None else support_valid.reshape(query.shape[0], -1)
        return self.cross(query, pooled, support_foreground, pooled_valid, keys=keys), support


def _reduce_layer(in_channels: int, dim: int) -> nn.Sequential:
    """PFENet's down layer: 1x1 conv, ReLU, Dropout2d(0.5)."""
    return nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))


class FSSModel(nn.Module):
    """Few-shot segmenter: forward(query [B,3,H,W], supports [B,K,3,H,W], support_masks [B,K,H,W]) -> logits [B,2,H,W].

    Images are RGB in [0,1] (the backbone normalises). Support masks are 0/1 with 255 on ignored and
    padded pixels; forward's optional query_valid [B,H,W] bool marks the query's image pixels. With
    mask_padding (reference code) padded cells are left out of every attention and of the support
    background; without it they count as background. The backbone stays frozen and in eval mode
    (BatchNorm statistics included) whatever `train()` is called with.

    Where the paper is silent the defaults follow the reference code: support_merge 'own_prototype'
    (query and support have their own merge conv; each support is merged with its own masked-average
    vector, without a mask channel), L2-normalised prototypes, MLP width 3*d, head Dropout2d(0.1),
    no biases in the cross-attention's projections and the MLPs, cell masks by nearest resize
    (grid_masks), a 2x2 centre patch for a support with no foreground cell (empty_support), and a
    bias row in the hashing projection (hash_bias). The projection stays one seeded draw
    (hash_draw 'fixed', deterministic inference) where the reference draws anew at every call.
    Where the paper and the reference code differ the defaults follow the paper (global self-attention
    on query and support, prototypes clustered in every layer); prototype_source 'merged' and
    self_attention 'deformable' give the reference code's model (see configs/reference-model.yaml).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = 256,
        heads: int = 8,
        layers: int = 2,
        dropout: float = 0.1,
        attention: str = "prototype",
        prototypes_fg: int = 50,
        prototypes_bg: int = 100,
        hash_bits: int = 32,
        hash_iterations: int = 10,
        positional: str = "sine",
        mask_padding: bool = True,
        mlp_ratio: int = 3,
        head_dropout: float = 0.1,
        support_merge: str = "own_prototype",
        normalize_prototypes: bool = True,
        prototype_source: str = "per_layer",
        self_attention: str = "global",
        deformable_points: int = 9,
        linear_bias: bool = False,
        grid_masks: str = "nearest",
        empty_support: str = "center_patch",
        hash_bias: bool = True,
        hash_draw: str = "fixed",
    ):
        super().__init__()
        self.mask_padding = bool(mask_padding)
        for key, value, allowed in (("attention", attention, ATTENTIONS), ("self_attention", self_attention, SELF_ATTENTIONS),
                                    ("support_merge", support_merge, SUPPORT_MERGES),
                                    ("prototype_source", prototype_source, PROTOTYPE_SOURCES),
                                    ("grid_masks", grid_masks, GRID_MASKS), ("empty_support", empty_support, EMPTY_SUPPORTS),
                                    ("hash_draw", hash_draw, HASH_DRAWS), ("positional", positional, POSITIONALS)):
            if value not in allowed:
                raise ValueError(f"model.{key} is {value!r}, expected one of {', '.join(allowed)}")
        for attr in ("channels", "mid_layers", "high_layer"):
            if not hasattr(backbone, attr):
                raise ValueError(f"backbone {type(backbone).__name__} lacks attribute '{attr}' of the FeatureBackbone contract")
        self.backbone = backbone
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        backbone.eval()
        self.mid_layers = tuple(backbone.mid_layers)
        self.high_layer = backbone.high_layer
        self.dim, self.attention_kind, self.positional_kind = dim, attention, positional
        self.support_merge, self.prototype_source, self.self_attention = support_merge, prototype_source, self_attention
        self.grid_masks, self.empty_support = grid_masks, empty_support

        mid_channels = sum(backbone.channels[name] for name in self.mid_layers)
        self.reduce_query = _reduce_layer(mid_channels, dim)
        self.reduce_support = _reduce_layer(mid_channels, dim)
        if support_merge == "own_prototype":
            # reference code: [features, global vector, prior] for the query; [features, the shot's own
            # masked-average vector] for each support, through a conv of its own
            self.merge_query = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, 1, bias=False), nn.ReLU(inplace=True))
            self.merge_support = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        else:
            # one shared merge of [features, shot-mean vector, one mask channel]: the prior for the
            # query, the support's own mask for the support
            self.merge = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.learned_positional = LearnedPositionalEncoding(dim) if positional == "learned" else None
        cross = dict(dim=dim, heads=heads, dropout=dropout, mlp_ratio=mlp_ratio, bias=bool(linear_bias))
        self.transformer = nn.ModuleList(
            AttentionLayer(self._cross_attention(index, cross, prototypes_fg, prototypes_bg, hash_bits, hash_iterations,
                                                 normalize_prototypes, hash_bias, hash_draw), dim, heads, dropout, mlp_ratio, self_attention,
                           deformable_points, support_self=prototype_source == "per_layer", mlp_bias=bool(linear_bias))
            for index in range(layers)
        )
        self.head = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                                  nn.Dropout2d(head_dropout), nn.Conv2d(dim, 2, 1))

    def _cross_attention(self, index, cross, prototypes_fg, prototypes_bg, hash_bits, hash_iterations, normalize,
                         hash_bias, hash_draw) -> nn.Module:
        if self.attention_kind == "vanilla":
            return VanillaCrossAttention(**cross)
        return PrototypeCrossAttention(**cross, prototypes_fg=prototypes_fg, prototypes_bg=prototypes_bg, hash_bits=hash_bits,
                                       hash_iterations=hash_iterations, seed=index, normalize=normalize,
                                       hash_bias=bool(hash_bias), hash_draw=hash_draw)

    # --- parameter groups -------------------------------------------------------------------
    def named_transformer_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the attention/Transformer parameters (AdamW group)."""
        named = [(f"transformer.{n}", p) for n, p in self.transformer.named_parameters()]
        if self.learned_positional is not None:
            named += [(f"learned_positional.{n}", p) for n, p in self.learned_positional.named_parameters()]
        return [(n, p) for n, p in named if p.requires_grad]

    def transformer_parameters(self) -> list[nn.Parameter]:
        """Attention/Transformer parameters (AdamW group)."""
        return [p for _, p in self.named_transformer_parameters()]

    def other_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (SGD group); the frozen backbone is excluded."""
        excluded = {id(p) for p in self.transformer_parameters()} | {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in excluded]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm: running statistics never update
        return self

    @property
    def backbone_layers(self) -> tuple[str, ...]:
        """The backbone outputs forward reads (what a feature cache needs to keep)."""
        return tuple(dict.fromkeys((*self.mid_layers, self.high_layer)))

    # --- parts of the forward pass ---------------------------------------------------------
    def _backbone_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.backbone(images)

    def _middle(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        first = features[self.mid_layers[0]]
        return torch.cat([_resize(features[name], first.shape[-2:]) for name in self.mid_layers], dim=1)

    def _positional(self, height: int, width: int, device, valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """[h*w, d], or [M, h*w, d] normalised to each sample's valid cells when `valid` [M, h*w] is given (sine)."""
        if self.positional_kind == "sine":
            return sine_positional_encoding(height, width, self.dim, device=device, valid=valid)
        if self.positional_kind == "learned":
            return self.learned_positional(height, width)
        return None

    def _foreground_cells(self, masks: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Binary support foreground [M,h,w] on the grid, from pixel masks [M,H,W] 0/1 and their
        bilinear grid resize `soft` [M,1,h,w].

        grid_masks 'nearest' (reference code): each cell takes one pixel's value (F.interpolate
        nearest); 'bilinear': cells at >= 0.5, or the peak cells of a tiny object. With empty_support
        'center_patch' (reference code) a support with no foreground cell gets the 2x2 centre cells,
        and one with no background cell loses its four corner cells to the background.
        """
        if self.grid_masks == "nearest":
            cells = F.interpolate(masks[:, None].float(), size=soft.shape[-2:], mode="nearest")[:, 0] > 0.5
        else:
            peak = soft.amax(dim=(2, 3), keepdim=True)
            cells = ((soft >= peak.clamp(max=0.5)) & (soft > 0))[:, 0]
        if self.empty_support == "center_patch":
            height, width = cells.shape[-2:]
            patch = torch.zeros_like(cells[0])
            patch[max(height // 2 - 1, 0):height // 2 + 1, max(width // 2 - 1, 0):width // 2 + 1] = True
            corners = torch.ones_like(cells[0])
            corners[0, 0] = corners[0, -1] = corners[-1, 0] = corners[-1, -1] = False
            cells = torch.where(~cells.flatten(1).any(dim=1)[:, None, None], patch, cells)
            cells = torch.where(cells.flatten(1).all(dim=1)[:, None, None], cells & corners, cells)
        return cells

    def _valid_cells(self, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Grid cells [M,h*w] bool of the image part, from pixel validity [M,H,W]: by nearest resize
        (grid_masks 'nearest', reference code) or where the bilinear resize is >= 0.5; an image with no
        such cell keeps all of them."""
        if self.grid_masks == "nearest":
            cells = (F.interpolate(valid[:, None].float(), size=size, mode="nearest") > 0.5).flatten(1)
        else:
            cells = (_resize(valid[:, None].float(), size) >= 0.5).flatten(1)
        return cells | ~cells.any(dim=1, keepdim=True)

    def forward(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor,
                query_valid: torch.Tensor | None = None,
                features: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """`features`: the frozen backbone's outputs for the query [B,...] and the supports [B*K,...],
        computed beforehand (the meta-test's feature cache); they must be those of `query` and `supports`."""
        self._check_shapes(query, supports, support_masks)
        batch, shots = supports.shape[:2]
        size = query.shape[-2:]
        support_ignored = support_masks == IGNORE
        support_masks = (support_masks == 1).to(query.dtype)  # ignore and padding are not foreground
        if features is None:
            query_features = self._backbone_features(query)
            support_features = self._backbone_features(supports.flatten(0, 1))
        else:
            query_features, support_features = features

        query_mid = self.reduce_query(self._middle(query_features))  # [B,d,h,w]
        support_mid = self.reduce_support(self._middle(support_features))  # [B*K,d,h,w]
        height, width = query_mid.shape[-2:]
        grid_masks = _resize(support_masks.flatten(0, 1)[:, None].to(query_mid.dtype), (height, width))
        query_cells = support_cells = None
        if self.mask_padding:
            if query_valid is not None:
                query_cells = self._valid_cells(query_valid, (height, width))
            if support_ignored.any():
                support_cells = self._valid_cells(~support_ignored.flatten(0, 1), (height, width))

        shot_vectors = masked_average_pool(support_mid, grid_masks)  # [B*K,d]
        global_vector = shot_vectors.view(batch, shots, self.dim).mean(dim=1)
        support_high = support_features[self.high_layer]
        prior = prior_mask(
            query_features[self.high_layer], support_high.view(batch, shots, *support_high.shape[1:]), support_masks
        )
        prior = _resize(prior, (height, width)).to(query_mid.dtype)

        def expand(vector: torch.Tensor) -> torch.Tensor:
            return vector[:, :, None, None].expand(-1, -1, height, width)

        if self.support_merge == "own_prototype":
            query_map = self.merge_query(torch.cat([query_mid, expand(global_vector), prior], dim=1))
            support_map = self.merge_support(torch.cat([support_mid, expand(shot_vectors)], dim=1))
        else:
            query_map = self.merge(torch.cat([query_mid, expand(global_vector), prior], dim=1))
            support_map = self.merge(
                torch.cat([support_mid, expand(global_vector.repeat_interleave(shots, dim=0)), grid_masks], dim=1)
            )

        query_tokens = query_map.flatten(2).transpose(1, 2)  # [B,hw,d]
        support_tokens = support_map.flatten(2).transpose(1, 2)  # [B*K,hw,d]
        positional = support_positional = self._positional(height, width, query.device)
        if positional is not None and self.self_attention == "global":
            query_tokens = query_tokens + positional
            support_tokens = support_tokens + positional
        elif self.self_attention == "deformable":  # reference code: positions normalised to the valid extent
            if query_cells is not None:
                positional = self._positional(height, width, query.device, valid=query_cells)
            if support_cells is not None:
                support_positional = self._positional(height, width, query.device, valid=support_cells)
        foreground = self._foreground_cells(support_masks.flatten(0, 1), grid_masks).reshape(batch, shots * height * width)
        keys = None
        if self.prototype_source == "merged":  # reference code: the keys are computed once, from the merged support
            pooled_valid = None if support_cells is None else support_cells.reshape(batch, -1)
            keys = self.transformer[0].cross.keys(support_tokens.reshape(batch, -1, self.dim), foreground, pooled_valid)

        for layer in self.transformer:
            query_tokens, support_tokens = layer(query_tokens, support_tokens, foreground, shots, query_cells, support_cells,
                                                 grid=(height, width), positional=positional,
                                                 support_positional=support_positional, keys=keys)

        output = query_tokens.transpose(1, 2).reshape(batch, self.dim, height, width)
        return _resize(self.head(output), tuple(size))

    @staticmethod
    def _check_shapes(query, supports, support_masks) -> None:
        if query.dim() != 4 or query.shape[1] != 3:
            raise ValueError(f"query must be [B,3,H,W], got {tuple(query.shape)}")
        expected = (query.shape[0], supports.shape[1] if supports.dim() == 5 else -1, 3, *query.shape[2:])
        if supports.dim() != 5 or tuple(supports.shape) != expected:
            raise ValueError(f"supports must be [B,K,3,H,W] = {expected} with K >= 1, got {tuple(supports.shape)}")
        if tuple(support_masks.shape) != (supports.shape[0], supports.shape[1], *query.shape[2:]):
            raise ValueError(
                f"support_masks must be [B,K,H,W] = {(supports.shape[0], supports.shape[1], *query.shape[2:])}, "
                f"got {tuple(support_masks.shape)}"
            )


def build_model(model_cfg: dict, backbone: nn.Module) -> FSSModel:
    """FSSModel from config["model"]; keys missing from model_cfg take the schema defaults."""
    from umtfss.config import schema

    defaults = {name: spec.get("default") for name, spec in schema()["properties"]["model"]["properties"].items()}
    settings = {key: model_cfg.get(key, defaults[key]) for key in MODEL_KEYS}
    if settings["dim"] % settings["heads"]:
        raise ValueError(f"config key 'model.dim' ({settings['dim']}) must be divisible by 'model.heads' ({settings['heads']})")
    return FSSModel(backbone, **settings)
