"""Transformer blocks of the FSS model: multi-head and deformable attention, post-LN block (Eq. 2), two cross-attentions.

`PrototypeCrossAttention` is the paper's prototype-aware cross-attention (Eq. 5-6): the query attends
only to K_fg + K_bg support prototypes found by Hamming k-means; `VanillaCrossAttention` attends to every
support pixel (Table 3 baseline). Both take the same arguments so the model can swap them.
`DeformableAttention` is the single-scale deformable self-attention the reference code uses in place
of the paper's global multi-head self-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from umtfss.model.prototypes import Clusters, hamming_kmeans, random_projection

__all__ = ["MultiHeadAttention", "DeformableAttention", "TransformerBlock", "DeformableBlock",
           "PrototypeCrossAttention", "VanillaCrossAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Eq. 1 with `heads` heads) on `F.scaled_dot_product_attention`.

    key_padding_mask: bool [B,M], True = the key may be attended to. A row with no allowed key
    gets a zero output instead of NaN. bias: whether the four projections have biases.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} must be divisible by heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.to_query = nn.Linear(dim, dim, bias=bias)
        self.to_key = nn.Linear(dim, dim, bias=bias)
        self.to_value = nn.Linear(dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split_heads(self.to_query(x))
        k = self._split_heads(self.to_key(y))
        v = self._split_heads(self.to_value(y))
        attn_mask, no_key = None, None
        if key_padding_mask is not None:
            no_key = ~key_padding_mask.any(dim=1)  # [B]
            allowed = key_padding_mask | no_key[:, None]  # keep softmax finite; zeroed below
            attn_mask = allowed[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)
        if no_key is not None:
            out = out.masked_fill(no_key[:, None, None], 0.0)
        return self.to_out(out)


class DeformableAttention(nn.Module):
    """Single-scale deformable attention (Deformable DETR's MSDeformAttn with one level) on a token grid.

    Each token attends, per head, to `points` bilinear samples of the value map around its own cell;
    the sampling offsets (in cells) and the softmax weights over the points are predicted from the
    token plus its positional encoding. Cost O(HW * heads * points * d/heads) instead of O((HW)^2 d).
    Padded cells (valid False) contribute zero values; samples outside the grid read zeros.
    """

    def __init__(self, dim: int, heads: int = 8, points: int = 9):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} must be divisible by heads {heads}")
        if points < 1:
            raise ValueError(f"deformable attention needs points >= 1, got {points}")
        self.dim, self.heads, self.points = dim, heads, points
        self.to_offsets = nn.Linear(dim, heads * points * 2)
        self.to_weights = nn.Linear(dim, heads * points)
        self.to_value = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's start: zero offset weights; head h's points spread along direction 2*pi*h/heads
        at 1..points cells; uniform weights over the points."""
        nn.init.zeros_(self.to_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=1)
        directions = directions / directions.abs().amax(dim=1, keepdim=True)
        steps = torch.arange(1, self.points + 1, dtype=torch.float32)
        with torch.no_grad():
            self.to_offsets.bias.copy_((directions[:, None, :] * steps[None, :, None]).flatten())
        nn.init.zeros_(self.to_weights.weight)
        nn.init.zeros_(self.to_weights.bias)
        for linear in (self.to_value, self.to_out):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def sampling_grid(self, query: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """grid_sample coordinates [B*heads, N, points, 2] in [-1, 1] (x, y) and weights [B*heads, 1, N, points]."""
        batch, tokens, _ = query.shape
        # float32 locations: in half precision a cell index near 60 would move by up to 1/32 of a cell
        offsets = self.to_offsets(query).float().view(batch, tokens, self.heads, self.points, 2)
        weights = self.to_weights(query).float().view(batch, tokens, self.heads, self.points).softmax(dim=-1)
        rows = (torch.arange(height, device=query.device, dtype=offsets.dtype) + 0.5)
        cols = (torch.arange(width, device=query.device, dtype=offsets.dtype) + 0.5)
        centres = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1).reshape(tokens, 2)  # (x, y) in cells
        scale = torch.tensor([width, height], device=query.device, dtype=offsets.dtype)
        locations = (centres[None, :, None, None, :] + offsets) / scale  # [0, 1] spans the grid's outer edges
        grid = (2.0 * locations - 1.0).permute(0, 2, 1, 3, 4).reshape(batch * self.heads, tokens, self.points, 2)
        return grid, weights.permute(0, 2, 1, 3).reshape(batch * self.heads, 1, tokens, self.points)

    def forward(self, x: torch.Tensor, height: int, width: int, positional: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,N=h*w,d] tokens of an h x w grid (row-major); positional [N,d], [B,N,d] or None; valid [B,N] bool or None."""
        batch, tokens, _ = x.shape
        if tokens != height * width:
            raise ValueError(f"deformable attention got {tokens} tokens for a {height}x{width} grid")
        value = self.to_value(x)
        if valid is not None:
            value = value.masked_fill(~valid[..., None], 0.0)
        head_dim = self.dim // self.heads
        value = value.view(batch, height, width, self.heads, head_dim).permute(0, 3, 4, 1, 2)
        value = value.reshape(batch * self.heads, head_dim, height, width)
        grid, weights = self.sampling_grid(x if positional is None else x + positional, height, width)
        # sampled in float32 at the float32 locations: a bfloat16 grid moved samples by up to 0.12 cells at 60x60
        sampled = F.grid_sample(value.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = (sampled * weights).sum(dim=-1).to(value.dtype)  # [B*heads, head_dim, N]
        out = out.view(batch, self.heads, head_dim, tokens).permute(0, 3, 1, 2).reshape(batch, tokens, self.dim)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    """Post-LayerNorm residual block, Eq. 2: X' = LN(X + MHA(X, Y)); X'' = LN(X' + MLP(X')).

    mlp_ratio: hidden width of the MLP in units of dim (reference code 3, ViT/DETR 4);
    attention: the attention module (default multi-head attention with `heads` heads);
    mlp_bias / attention_bias: biases of the MLP's and of the default attention's linear layers."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, mlp_ratio: int = 3,
                 attention: nn.Module | None = None, mlp_bias: bool = True, attention_bias: bool = True):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, dropout, attention_bias) if attention is None else attention
        self.attention_dropout = nn.Dropout(dropout)
        self.norm_attention = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio, bias=mlp_bias),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim * mlp_ratio, dim, bias=mlp_bias),
            nn.Dropout(dropout),
        )
        self.norm_mlp = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention when y is None, else x attends to y."""
        context = x if y is None else y
        x = self.norm_attention(x + self.attention_dropout(self.attention(x, context, key_padding_mask)))
        return self.norm_mlp(x + self.mlp(x))


class DeformableBlock(TransformerBlock):
    """The post-LN block of Eq. 2 around deformable self-attention (reference code): the positional
    encoding enters only the prediction of the sampling offsets and weights, never the values."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, mlp_ratio: int = 3, points: int = 9,
                 mlp_bias: bool = True):
        super().__init__(dim, heads, dropout, mlp_ratio, attention=DeformableAttention(dim, heads, points),
                         mlp_bias=mlp_bias)

    def forward(self, x: torch.Tensor, height: int, width: int, positional: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm_attention(x + self.attention_dropout(self.attention(x, height, width, positional, valid)))
        return self.norm_mlp(x + self.mlp(x))


class VanillaCrossAttention(nn.Module):
    """Query tokens attend to every support pixel (cost 2*(HW)^2*d per shot; paper Table 3 baseline).
    bias: biases in the projections and the MLP."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, mlp_ratio: int = 3, bias: bool = True):
        super().__init__()
        self.block = TransformerBlock(dim, heads, dropout, mlp_ratio, mlp_bias=bias, attention_bias=bias)

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_foreground: torch.Tensor,
        support_valid: torch.Tensor | None = None,
        keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """query [B,N,d], support [B,M,d] (shots pooled), support_foreground/support_valid bool [B,M];
        keys: (tokens, valid) to attend to instead of the support pixels."""
        if keys is not None:
            return self.block(query, *keys)
        return self.block(query, support, support_valid)

    def keys(self, support: torch.Tensor, support_foreground: torch.Tensor,
             support_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the query attends to: every support pixel."""
        return support, support_valid


def _take(clusters: Clusters, rows: slice, k: int) -> Clusters:
    """The given samples of a batched clustering, keeping their first k clusters."""
    return Clusters(clusters.assign[rows], clusters.prototypes[rows, :k], clusters.counts[rows, :k], clusters.valid[rows, :k])


class PrototypeCrossAttention(nn.Module):
    """Prototype-aware cross-attention (Eq. 5-6): the query attends only to K_fg + K_bg support prototypes.

    The support foreground and background pixels (all shots pooled) are clustered separately by
    Hamming k-means into at most `prototypes_fg` / `prototypes_bg` prototypes; empty prototypes are
    masked out of the attention. The hashing projection is a seeded buffer, so inference is
    deterministic and saved with the model (hash_draw 'fixed'); 'per_call' draws a new one from
    torch's random generator for every support set and part at every call, as the reference code
    does. hash_bias adds a Gaussian bias row to it (reference code). When a part has no more pixels
    than prototypes, every pixel is its own prototype (as in the reference code). With `normalize`
    (reference code) the prototypes are L2-normalised before they become keys and values; without
    it, and with few pixels, the block computes exactly what `VanillaCrossAttention` does. bias:
    biases in the projections and the MLP (the reference code has none).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dropout: float = 0.1,
        prototypes_fg: int = 50,
        prototypes_bg: int = 100,
        hash_bits: int = 32,
        hash_iterations: int = 10,
        seed: int = 0,
        mlp_ratio: int = 3,
        normalize: bool = True,
        bias: bool = True,
        hash_bias: bool = False,
        hash_draw: str = "fixed",
    ):
        super().__init__()
        if hash_draw not in ("fixed", "per_call"):
            raise ValueError(f"model.hash_draw is {hash_draw!r}, expected fixed or per_call")
        self.block = TransformerBlock(dim, heads, dropout, mlp_ratio, mlp_bias=bias, attention_bias=bias)
        self.normalize = bool(normalize)
        self.prototypes_fg, self.prototypes_bg = prototypes_fg, prototypes_bg
        self.hash_iterations, self.seed, self.hash_draw = hash_iterations, seed, hash_draw
        self.register_buffer("projection", random_projection(dim + int(bool(hash_bias)), hash_bits, seed))
        self.last_clusters: tuple[Clusters, Clusters] | None = None  # (fg, bg) of the latest call, for inspection

    def prototypes(
        self, support: torch.Tensor, support_foreground: torch.Tensor, support_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype tokens [B,K_fg+K_bg,d] and their validity mask [B,K_fg+K_bg] bool."""
        valid = torch.ones_like(support_foreground) if support_valid is None else support_valid
        batch = support.shape[0]
        k = max(self.prototypes_fg, self.prototypes_bg)
        projection = self.projection
        if self.hash_draw == "per_call":  # one draw per sample and part, like the reference's per-set calls
            projection = torch.randn(2 * batch, *projection.shape, device=projection.device, dtype=projection.dtype)
        # one clustering call for both parts (fg samples then bg samples) halves the kernel launches
        both = hamming_kmeans(
            torch.cat([support, support]),
            torch.cat([support_foreground & valid, ~support_foreground & valid]),
            k,
            iterations=self.hash_iterations,
            seed=self.seed,
            projection=projection,
            limit=torch.tensor([self.prototypes_fg] * batch + [self.prototypes_bg] * batch),
        )
        fg = _take(both, slice(0, batch), self.prototypes_fg)
        bg = _take(both, slice(batch, 2 * batch), self.prototypes_bg)
        self.last_clusters = tuple(c._replace(prototypes=c.prototypes.detach()) for c in (fg, bg))
        tokens = torch.cat([fg.prototypes, bg.prototypes], dim=1)
        if self.normalize:
            tokens = F.normalize(tokens, dim=-1)  # empty prototypes stay zero (and masked)
        token_valid = torch.cat([fg.valid, bg.valid], dim=1)
        return tokens, token_valid

    keys = prototypes  # what the query attends to, shared by both cross-attentions

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_foreground: torch.Tensor,
        support_valid: torch.Tensor | None = None,
        keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """query [B,N,d], support [B,M,d] (shots pooled), support_foreground/support_valid bool [B,M];
        keys: prototypes computed once beforehand (model.prototype_source merged), else clustered here."""
        tokens, token_valid = keys if keys is not None else self.prototypes(support, support_foreground, support_valid)
        return self.block(query, tokens, token_valid)
