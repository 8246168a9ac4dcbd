"""Transformer blocks of the FSS model: multi-head attention, post-LN block (Eq. 2), and the two cross-attentions.

`PrototypeCrossAttention` is the paper's prototype-aware cross-attention (Eq. 5-6): the query attends
only to K_fg + K_bg support prototypes found by Hamming k-means; `VanillaCrossAttention` attends to every
support pixel (Table 3 baseline). Both take the same arguments so the model can swap them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from umtfss.model.prototypes import Clusters, hamming_kmeans, random_projection

__all__ = ["MultiHeadAttention", "TransformerBlock", "PrototypeCrossAttention", "VanillaCrossAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Eq. 1 with `heads` heads) on `F.scaled_dot_product_attention`.

    key_padding_mask: bool [B,M], True = the key may be attended to. A row with no allowed key
    gets a zero output instead of NaN.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} must be divisible by heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.to_value = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

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


class TransformerBlock(nn.Module):
    """Post-LayerNorm residual block, Eq. 2: X' = LN(X + MHA(X, Y)); X'' = LN(X' + MLP(X'))."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, mlp_ratio: int = 4):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm_attention = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim * mlp_ratio, dim),
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


class VanillaCrossAttention(nn.Module):
    """Query tokens attend to every support pixel (cost 2*(HW)^2*d per shot; paper Table 3 baseline)."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.block = TransformerBlock(dim, heads, dropout)

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_foreground: torch.Tensor,
        support_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B,N,d], support [B,M,d] (shots pooled), support_foreground/support_valid bool [B,M]."""
        return self.block(query, support, support_valid)


def _take(clusters: Clusters, rows: slice, k: int) -> Clusters:
    """The given samples of a batched clustering, keeping their first k clusters."""
    return Clusters(clusters.assign[rows], clusters.prototypes[rows, :k], clusters.counts[rows, :k], clusters.valid[rows, :k])


class PrototypeCrossAttention(nn.Module):
    """Prototype-aware cross-attention (Eq. 5-6): the query attends only to K_fg + K_bg support prototypes.

    The support foreground and background pixels (all shots pooled) are clustered separately by
    Hamming k-means into at most `prototypes_fg` / `prototypes_bg` prototypes; empty prototypes are
    masked out of the attention. The hashing projection is a seeded buffer, so inference is
    deterministic and saved with the model. When a part has no more pixels than prototypes, every
    pixel is its own prototype and the block computes exactly what `VanillaCrossAttention` does.
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
    ):
        super().__init__()
        self.block = TransformerBlock(dim, heads, dropout)
        self.prototypes_fg, self.prototypes_bg = prototypes_fg, prototypes_bg
        self.hash_iterations, self.seed = hash_iterations, seed
        self.register_buffer("projection", random_projection(dim, hash_bits, seed))
        self.last_clusters: tuple[Clusters, Clusters] | None = None  # (fg, bg) of the latest call, for inspection

    def prototypes(
        self, support: torch.Tensor, support_foreground: torch.Tensor, support_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype tokens [B,K_fg+K_bg,d] and their validity mask [B,K_fg+K_bg] bool."""
        valid = torch.ones_like(support_foreground) if support_valid is None else support_valid
        batch = support.shape[0]
        k = max(self.prototypes_fg, self.prototypes_bg)
        # one clustering call for both parts (fg samples then bg samples) halves the kernel launches
        both = hamming_kmeans(
            torch.cat([support, support]),
            torch.cat([support_foreground & valid, ~support_foreground & valid]),
            k,
            iterations=self.hash_iterations,
            seed=self.seed,
            projection=self.projection,
            limit=torch.tensor([self.prototypes_fg] * batch + [self.prototypes_bg] * batch),
        )
        fg = _take(both, slice(0, batch), self.prototypes_fg)
        bg = _take(both, slice(batch, 2 * batch), self.prototypes_bg)
        self.last_clusters = tuple(c._replace(prototypes=c.prototypes.detach()) for c in (fg, bg))
        tokens = torch.cat([fg.prototypes, bg.prototypes], dim=1)
        token_valid = torch.cat([fg.valid, bg.valid], dim=1)
        return tokens, token_valid

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_foreground: torch.Tensor,
        support_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B,N,d], support [B,M,d] (shots pooled), support_foreground/support_valid bool [B,M]."""
        tokens, token_valid = self.prototypes(support, support_foreground, support_valid)
        return self.block(query, tokens, token_valid)
