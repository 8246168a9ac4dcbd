"""Feature-to-prototype assignment (paper Eq. 5): sign-of-random-projection hashing + Hamming k-means.

Every function works on a batch of pixel sets at once: `features [B,N,d]` with a boolean `mask [B,N]`
saying which of the N pixels belong to the set (e.g. the foreground of a support image). There is no
Python loop over the batch or over pixels, and a sample's result does not depend on the other samples
in its batch (the random initialisation keys depend only on the seed and the pixel index).

Prototypes are the MEAN of the original (un-hashed) features assigned to each cluster, i.e. Eq. 5's
P = S^T X normalised by the cluster sizes, so that a prototype lives on the same scale as the features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Clusters",
    "random_projection",
    "hash_codes",
    "hamming_kmeans",
    "lloyd_kmeans",
    "identity_assignment",
    "cluster_means",
]


class Clusters(NamedTuple):
    """Result of a clustering of masked pixel sets.

    assign: long [B,N], cluster index in [0,k), -1 where the mask is False.
    prototypes: [B,k,d], mean original feature of each cluster (zeros for empty clusters).
    counts: long [B,k], pixels per cluster (sums to the number of masked pixels).
    valid: bool [B,k], True for non-empty clusters; attention must ignore the others.
    """

    assign: torch.Tensor
    prototypes: torch.Tensor
    counts: torch.Tensor
    valid: torch.Tensor


def random_projection(dim: int, bits: int, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian projection [dim, bits] for sign-of-random-projection hashing (SimHash)."""
    if dim < 1 or bits < 1:
        raise ValueError(f"random_projection needs dim >= 1 and bits >= 1, got dim={dim}, bits={bits}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(dim, bits, generator=generator)


def hash_codes(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Hash bits as +-1 floats [B,N,b]: sign(x W). Two codes' dot product is b - 2*Hamming.

    `projection` is [d,b] or [d+1,b], whose last row is then a bias: sign(x W + w0), the reference
    code's hash_bias, under which Hamming distance follows the L2 distance rather than the angle. A
    leading batch axis ([B,d(+1),b]) hashes each sample with its own projection.
    """
    weights = projection.to(device=features.device, dtype=torch.float32)
    dim = features.shape[-1]
    with torch.autocast(features.device.type, enabled=False):  # in bfloat16, 2.4 % of pixels flipped a bit
        projected = features.detach().float() @ weights[..., :dim, :]
    if weights.shape[-2] == dim + 1:
        projected = projected + weights[..., dim:, :]
    return torch.where(projected > 0, 1.0, -1.0).to(features.dtype)


def _check_inputs(features: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be [B,N,d], got shape {tuple(features.shape)}")
    if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(features.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if k < 1:
        raise ValueError(f"number of prototypes k must be >= 1, got {k}")


def _pixel_keys(n: int, seed: int, device) -> torch.Tensor:
    """Seeded pseudo-random keys [n] in [0, 2^31) from an integer hash of the pixel index.

    Computed on the features' device with exact integer arithmetic, so the initialisation is the
    same on CPU and GPU and needs no host-to-device copy.
    """
    x = torch.arange(n, device=device, dtype=torch.int64) * 0x9E3779B1 + (int(seed) * 0x85EBCA77 + 0x165667B1)
    x = x & 0xFFFFFFFF
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * factor) & 0xFFFFFFFF
    return (x ^ (x >> 16)) >> 1


def _initial_indices(
    mask: torch.Tensor, k: int, seed: int, limit: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct masked pixels per sample, chosen by seeded keys shared across the batch.

    Returns (indices [B,k] long, alive [B,k] bool); alive is False where the sample has fewer than
    k masked pixels, or for slots at or beyond the sample's `limit` [B] (its own number of clusters).
    """
    batch, n = mask.shape
    keys = _pixel_keys(n, seed, mask.device).expand(batch, n).masked_fill(~mask, -1)
    taken = min(k, n)
    top_keys, indices = keys.topk(taken, dim=1)
    alive = top_keys >= 0
    if taken < k:
        pad = k - taken
        indices = torch.cat([indices, indices.new_zeros(batch, pad)], dim=1)
        alive = torch.cat([alive, alive.new_zeros(batch, pad)], dim=1)
    if limit is not None:
        alive = alive & (torch.arange(k, device=mask.device)[None, :] < limit[:, None])
    return indices, alive


def identity_assignment(mask: torch.Tensor) -> torch.Tensor:
    """Each masked pixel its own cluster, numbered in pixel order; -1 elsewhere."""
    ranks = mask.long().cumsum(dim=1) - 1
    return torch.where(mask, ranks, torch.full_like(ranks, -1))


def cluster_means(features: torch.Tensor, assign: torch.Tensor, k: int) -> Clusters:
    """Prototypes = S^T X / counts (Eq. 5 normalised by cluster size); differentiable in the features.

    S is the one-hot assignment [B,N,k]; a matmul (not an atomic scatter) keeps GPU results
    deterministic, which the hashing of the next layer needs. Summed in float32 under any autocast: a
    float16 sum over a large cluster passes 65,504 and would make the prototype inf, then NaN.
    """
    with torch.autocast(features.device.type, enabled=False):
        one_hot = (assign[..., None] == torch.arange(k, device=assign.device)).float()  # -1 matches nothing
        counts = one_hot.sum(dim=1).round().long()
        sums = one_hot.transpose(1, 2) @ features.float()
        prototypes = (sums / counts.clamp(min=1).float()[..., None]).to(features.dtype)
    return Clusters(assign, prototypes, counts, counts > 0)


def _cluster_limit(limit: torch.Tensor | None, batch: int, k: int, device) -> torch.Tensor:
    """Per-sample number of clusters [B], k by default."""
    if limit is None:
        return torch.full((batch,), k, dtype=torch.long, device=device)
    if limit.device.type == "cpu" and (limit.shape != (batch,) or bool((limit < 0).any()) or bool((limit > k).any())):
        raise ValueError(f"limit must be a [B]={batch} tensor with values in [0, k={k}], got {limit.tolist()}")
    return limit.to(device=device, dtype=torch.long)


def _assign_nearest(scores: torch.Tensor, alive: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Arg-max of a [B,N,k] similarity over alive centroids; ties go to the lowest index; -1 off-mask."""
    scores = scores.masked_fill(~alive[:, None, :], float("-inf"))
    assign = scores.argmax(dim=2)
    return torch.where(mask, assign, torch.full_like(assign, -1))


def _with_identity_where_small(mask: torch.Tensor, assign: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Samples with at most `limit` masked pixels: every pixel becomes its own prototype (exact degenerate case)."""
    small = mask.sum(dim=1) <= limit
    return torch.where(small[:, None], identity_assignment(mask), assign)


@torch.no_grad()
def _hamming_assign(
    codes: torch.Tensor, mask: torch.Tensor, k: int, iterations: int, seed: int, limit: torch.Tensor
) -> torch.Tensor:
    """Lloyd iterations in Hamming space on +-1 codes: nearest binary centroid, then per-bit majority vote."""
    batch, n, bits = codes.shape
    init, alive = _initial_indices(mask, k, seed, limit)
    centroids = codes.gather(1, init[..., None].expand(batch, k, bits))  # +-1 [B,k,b]
    assign = _assign_nearest(codes @ centroids.transpose(1, 2), alive, mask, k)
    for _ in range(iterations):
        bins = torch.where(assign >= 0, assign, torch.full_like(assign, k))
        votes = codes.new_zeros(batch, k + 1, bits).scatter_add_(1, bins[..., None].expand(batch, n, bits), codes)
        majority = torch.sign(votes[:, :k])  # 0 on a tie or an empty cluster: keep the previous bit
        centroids = torch.where(majority == 0, centroids, majority)
        new_assign = _assign_nearest(codes @ centroids.transpose(1, 2), alive, mask, k)
        if _converged(new_assign, assign):
            break
        assign = new_assign
    return assign


def _converged(new_assign: torch.Tensor, assign: torch.Tensor) -> bool:
    """Early stop at a fixed point (later iterations would change nothing); checked on CPU only,
    since on a GPU the host synchronisation costs more than the iterations it saves."""
    return new_assign.device.type == "cpu" and torch.equal(new_assign, assign)


def hamming_kmeans(
    features: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    bits: int = 32,
    iterations: int = 10,
    seed: int = 0,
    projection: torch.Tensor | None = None,
    limit: torch.Tensor | None = None,
) -> Clusters:
    """Cluster the masked pixels of each sample into at most k prototypes via Hamming-space k-means.

    Hash: sign of a seeded Gaussian projection [d,bits] (or the given `projection`, e.g. a model buffer;
    [d+1,bits] adds a bias row, [B,...] one projection per sample).
    Init: k distinct masked pixels chosen by seeded keys. Iterate: assign each pixel to the binary
    centroid at the smallest Hamming distance (b - x.c over +-1 codes, one batched matmul), update each
    centroid bit by majority vote. Cost O(N*d*b) hashing + O(N*k*b*r) for the matmuls.
    A sample with at most k masked pixels gets one prototype per pixel (the others empty); a sample
    with none gets only empty prototypes (valid all False). `limit` (long [B], each <= k) lets samples
    of one batch use fewer clusters, e.g. foreground (K_fg) and background (K_bg) sets in one call.
    """
    _check_inputs(features, mask, k)
    if iterations < 0:
        raise ValueError(f"hash iterations must be >= 0, got {iterations}")
    if projection is None:
        projection = random_projection(features.shape[2], bits, seed)
    elif projection.shape[-2] not in (features.shape[2], features.shape[2] + 1):
        raise ValueError(f"projection has {projection.shape[-2]} rows, expected feature dim {features.shape[2]} "
                         "(or one more: a bias row)")
    limit = _cluster_limit(limit, features.shape[0], k, features.device)
    codes = hash_codes(features.float(), projection.float())
    assign = _hamming_assign(codes, mask, k, iterations, seed, limit)
    assign = _with_identity_where_small(mask, assign, limit)
    return cluster_means(features, assign, k)


def lloyd_kmeans(
    features: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    iterations: int = 10,
    seed: int = 0,
    metric: str = "cosine",
) -> Clusters:
    """Plain Lloyd k-means on the raw features (cosine or squared Euclidean), for comparison.

    Same initialisation and degenerate cases as `hamming_kmeans`; cost O(N*k*d*r).
    """
    _check_inputs(features, mask, k)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"lloyd_kmeans metric must be 'cosine' or 'euclidean', got {metric!r}")
    with torch.no_grad():
        points = features.detach().float()
        if metric == "cosine":
            points = torch.nn.functional.normalize(points, dim=2)
        batch, n, dim = points.shape
        init, alive = _initial_indices(mask, k, seed)
        limit = _cluster_limit(None, batch, k, points.device)
        centroids = points.gather(1, init[..., None].expand(batch, k, dim))

        def similarity(c: torch.Tensor) -> torch.Tensor:
            dots = points @ c.transpose(1, 2)
            return dots if metric == "cosine" else 2 * dots - (c * c).sum(dim=2)[:, None, :]

        assign = _assign_nearest(similarity(centroids), alive, mask, k)
        for _ in range(iterations):
            means = cluster_means(points, assign, k)
            updated = means.prototypes
            if metric == "cosine":
                updated = torch.nn.functional.normalize(updated, dim=2)
            centroids = torch.where(means.valid[..., None], updated, centroids)  # empty: keep the old one
            new_assign = _assign_nearest(similarity(centroids), alive, mask, k)
            if _converged(new_assign, assign):
                break
            assign = new_assign
        assign = _with_identity_where_small(mask, assign, limit)
    return cluster_means(features, assign, k)
