"""Hamming-space k-means vs Lloyd (cosine) k-means on the same support features: time and agreement.

Features are a realistic stand-in for one support image at stride 8 (3,600 x 256): a mixture of
`--groups` semantic directions with Dirichlet-distributed sizes and noise, L2-normalised; or real
features from `--features file.npy` ([N,d]). Agreement: adjusted Rand index between the two
assignments (and of each against the generating groups), and the mean cosine of each point to its
prototype under both.

    python benchmarks/hamming_kmeans.py --quick
    python benchmarks/hamming_kmeans.py --device cuda
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from umtfss.model.prototypes import Clusters, hamming_kmeans, lloyd_kmeans


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--points", type=int, default=3600)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--groups", type=int, default=30, help="semantic groups of the synthetic features")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the group direction")
    parser.add_argument("--features", help="optional .npy [N,d] of real features instead of the synthetic ones")
    parser.add_argument("--ks", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="support sets clustered at once (copies of the features)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="ks 50 100, bits 32, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.bits, args.repeats = [32], 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def synthetic_features(args) -> tuple[torch.Tensor, np.ndarray | None]:
    """Gaussian mixture on the sphere with uneven group sizes, like the regions of one image."""
    if args.features:
        data = np.load(args.features)
        if data.ndim != 2:
            raise ValueError(f"--features {args.features}: expected an [N,d] array, got shape {data.shape}")
        return torch.nn.functional.normalize(torch.from_numpy(data).float(), dim=1), None
    rng = np.random.default_rng(args.seed)
    sizes = rng.multinomial(args.points, rng.dirichlet(np.full(args.groups, 0.7)))
    groups = np.repeat(np.arange(args.groups), sizes)
    directions = rng.standard_normal((args.groups, args.dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    noise = rng.standard_normal((args.points, args.dim)) * args.noise / np.sqrt(args.dim)
    features = torch.from_numpy(directions[groups] + noise).float()
    return torch.nn.functional.normalize(features, dim=1), groups


def timed(function, device: str, repeats: int) -> tuple[Clusters, float]:
    """Median wall time of `repeats` runs after one warm-up."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    result = function()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        sync()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def mean_cosine_to_prototype(features: torch.Tensor, clusters: Clusters) -> float:
    assign = clusters.assign[0]
    prototypes = torch.nn.functional.normalize(clusters.prototypes[0], dim=1)
    return float((features * prototypes[assign]).sum(dim=1).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features, groups = synthetic_features(args)
    batch = features[None].expand(args.batch, -1, -1).contiguous().to(args.device)
    mask = torch.ones(batch.shape[:2], dtype=torch.bool, device=args.device)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} thread(s))"
    source = args.features or f"synthetic: {args.groups} groups, noise {args.noise}"
    print(f"device: {device_name}; {features.shape[0]} x {features.shape[1]} features ({source}), "
          f"batch {args.batch}, r={args.iterations}, median of {args.repeats}")
    print(f"{'k':>4} {'bits':>4} {'hamming ms':>10} {'lloyd ms':>9} {'time ratio':>10} {'ARI h-l':>7} "
          f"{'ARI h-gt':>8} {'ARI l-gt':>8} {'cos h':>6} {'cos l':>6}")
    for k in args.ks:
        lloyd, lloyd_time = timed(lambda: lloyd_kmeans(batch, mask, k, args.iterations, args.seed), args.device, args.repeats)
        lloyd_assign = lloyd.assign[0].cpu().numpy()
        for bits in args.bits:
            hamming, hamming_time = timed(
                lambda: hamming_kmeans(batch, mask, k, bits, args.iterations, args.seed), args.device, args.repeats
            )
            hamming_assign = hamming.assign[0].cpu().numpy()
            truth = "n/a" if groups is None else f"{adjusted_rand_score(groups, hamming_assign):.3f}"
            truth_lloyd = "n/a" if groups is None else f"{adjusted_rand_score(groups, lloyd_assign):.3f}"
            print(f"{k:>4} {bits:>4} {hamming_time * 1e3:>10.2f} {lloyd_time * 1e3:>9.2f} "
                  f"{hamming_time / lloyd_time:>10.3f} {adjusted_rand_score(lloyd_assign, hamming_assign):>7.3f} "
                  f"{truth:>8} {truth_lloyd:>8} {mean_cosine_to_prototype(features, hamming.__class__(*[t.cpu() for t in hamming])):>6.3f} "
                  f"{mean_cosine_to_prototype(features, lloyd.__class__(*[t.cpu() for t in lloyd])):>6.3f}", flush=True)
    print("time ratio = hamming / lloyd (hamming includes hashing); ARI = adjusted Rand index; "
          "cos = mean cosine of a point to its prototype")


if __name__ == "__main__":
    main()
