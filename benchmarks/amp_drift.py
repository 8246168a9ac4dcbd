"""How far autocast rounding moves the model's rounding-sensitive parts, low-precision vs umtfss's float32.

Each row computes one part twice under CPU autocast (the stand-in for CUDA's: matmul, einsum and the
grid cast round the same way on both): as autocast would run it, and as umtfss runs it now (float32
inside), both against plain float32. Random inputs, seconds on a CPU:

    python benchmarks/amp_drift.py
"""

import argparse

import torch
import torch.nn.functional as F

from umtfss.model.attention import DeformableAttention
from umtfss.model.fss import prior_mask
from umtfss.model.prototypes import cluster_means, hash_codes, random_projection


def rounded_prior(query, support, masks, dtype):
    """The prior (1 shot, masks at the grid's size) with its cosine einsum in `dtype`, as autocast runs it."""
    query = F.normalize(query.flatten(2), dim=1, eps=1e-7).to(dtype)
    support = F.normalize((support[:, 0] * masks).flatten(2), dim=1, eps=1e-7).to(dtype)
    similarity = torch.einsum("bcn,bcm->bnm", query, support)
    similarity = similarity.masked_fill(masks.flatten(2) <= 0, float("-inf")).amax(dim=2)
    low, high = similarity.amin(dim=1, keepdim=True), similarity.amax(dim=1, keepdim=True)
    return ((similarity - low) / (high - low + 1e-7)).float().view(query.shape[0], 1, *masks.shape[-2:])


def prior_drift(grid: int, dtype) -> tuple[float, float]:
    """Largest change of the [0,1] prior: cosines in `dtype`, and umtfss's prior_mask under autocast."""
    query, support = torch.randn(2, 256, grid, grid), torch.randn(2, 1, 256, grid, grid)
    masks = (torch.rand(2, 1, grid, grid) > 0.5).float()
    exact = prior_mask(query, support, masks)
    rounded = rounded_prior(query, support, masks, dtype)
    with torch.autocast("cpu", dtype=dtype):
        now = prior_mask(query, support, masks)
    return float((rounded - exact).abs().max()), float((now - exact).abs().max())


def hash_flips(dtype) -> tuple[float, float]:
    """Share of pixels with at least one flipped hash bit: a projection in `dtype`, and umtfss's hash_codes."""
    features, projection = torch.randn(4, 3600, 256), random_projection(256, 32, seed=0)
    exact = hash_codes(features, projection)
    rounded = torch.where(features.to(dtype) @ projection.to(dtype) > 0, 1.0, -1.0)
    with torch.autocast("cpu", dtype=dtype):
        now = hash_codes(features, projection)
    return float((rounded != exact).any(-1).float().mean()), float((now != exact).any(-1).float().mean())


def grid_shift(grid: int, dtype) -> tuple[float, float]:
    """Largest move of a deformable sampling location, in cells: the grid cast to `dtype`, and float32 (0)."""
    torch.manual_seed(0)
    attention = DeformableAttention(64, 4, 9)
    with torch.no_grad():
        attention.to_offsets.weight.normal_(0, 0.02)  # non-zero offsets, as after training
        locations, _ = attention.sampling_grid(torch.randn(2, grid * grid, 64), grid, grid)
    return float((locations.to(dtype).float() - locations).abs().amax() * grid / 2), 0.0


def cluster_sum(dtype) -> tuple[float, float]:
    """The mean of a 15,000-cell cluster of 4.5s: summed by a `dtype` matmul, and by umtfss's cluster_means."""
    features, assign = torch.full((1, 15000, 1), 4.5), torch.zeros(1, 15000, dtype=torch.long)
    one_hot = F.one_hot(assign, 1).to(dtype)
    rounded = (one_hot.transpose(1, 2) @ features.to(dtype)).float() / 15000
    with torch.autocast("cpu", dtype=dtype):
        now = cluster_means(features, assign, 1).prototypes
    return float(rounded.flatten()[0]), float(now.flatten()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=60, help="feature grid side (60: 473 px at stride 8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'part':<44} {'dtype':<9} {'rounded':>10} {'umtfss':>10}")
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        rows = [(f"prior mask, max |change| ({args.grid}x{args.grid})", prior_drift(args.grid, dtype)),
                ("hash codes, pixels with a flipped bit", hash_flips(dtype)),
                (f"deformable sample, max move in cells ({args.grid}x{args.grid})", grid_shift(args.grid, dtype)),
                ("mean of a 15,000-cell cluster of 4.5", cluster_sum(dtype))]
        for part, (rounded, now) in rows:
            print(f"{part:<44} {name:<9} {rounded:>10.4g} {now:>10.4g}")


if __name__ == "__main__":
    main()
