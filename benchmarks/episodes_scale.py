"""Scale benchmark of the episodes stage's support candidates: build time and bytes on disk at COCO scale.

Synthetic region set: N regions in 50 clusters, d = 256 (COCO-20i: ~8*10^5 regions), features =
normalised(cluster centre + noise) stored float16, ~10 regions per image (<= 1 per cluster per image).
Times `compute_candidates` (blocked similarity + k-th value selection), writes the three artifacts
exactly as `build_episodes` does, reports their sizes and the expected rejection-sampling trials per
support draw (eligible / k).

    python benchmarks/episodes_scale.py --quick        # 10^5 regions
    python benchmarks/episodes_scale.py                # 8*10^5 regions (targets: < 10 min, < 1 GB)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from umtfss.pseudo_episodes import CANDIDATES_FILE, FEATURES_FILE, REGIONS_FILE, write_parquet, compute_candidates


def synthetic_regions(regions: int, clusters: int, dim: int, seed: int = 0):
    """(table, float16 features, image codes) of a synthetic region set, sorted by cluster like the stage's."""
    rng = np.random.default_rng(seed)
    cluster = np.sort(rng.integers(0, clusters, size=regions)).astype(np.int16)
    images = max(1, regions // 10)
    image_code = np.empty(regions, np.int64)
    for c in range(clusters):  # within a cluster, distinct images (one region per image x cluster)
        rows = np.flatnonzero(cluster == c)
        image_code[rows] = rng.choice(images, size=rows.size, replace=rows.size > images)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    features = np.empty((regions, dim), np.float16)
    for start in range(0, regions, 65536):
        block = slice(start, start + 65536)
        x = centres[cluster[block]] + 1.5 * rng.normal(size=(len(cluster[block]), dim)).astype(np.float32)
        features[block] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    table = pd.DataFrame({
        "region_id": np.arange(regions, dtype=np.int32),
        "image_id": np.char.add("COCO_train2014_", np.char.zfill(image_code.astype(str), 12)),
        "cluster": cluster,
        "area": rng.integers(32, 3600, size=regions).astype(np.int32),
        **{name: rng.integers(0, 60, size=regions).astype(np.int16) for name in ("y0", "x0", "y1", "x1")},
        "valid_h": np.full(regions, 60, np.int16), "valid_w": np.full(regions, 60, np.int16),
    })
    return table, features, image_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^5 regions instead of 8*10^5")
    parser.add_argument("--regions", type=int, default=None)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="where to write the artifacts (default: a temp folder)")
    args = parser.parse_args()
    regions = args.regions or (100_000 if args.quick else 800_000)
    torch.set_num_threads(args.threads)

    table, features, image_code = synthetic_regions(regions, args.clusters, args.dim)
    start = time.perf_counter()
    candidates = compute_candidates(features, table["cluster"].to_numpy(), image_code)
    build_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out_dir or scratch)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / FEATURES_FILE, "wb") as handle:
            np.save(handle, features)
        write_parquet(table, out / REGIONS_FILE, {"benchmark": True})
        write_parquet(candidates, out / CANDIDATES_FILE, {"benchmark": True})
        sizes = {name: (out / name).stat().st_size for name in (REGIONS_FILE, FEATURES_FILE, CANDIDATES_FILE)}

    usable = candidates["num_candidates"] > 0
    trials = (candidates["eligible"][usable] / candidates["num_candidates"][usable]).mean()
    report = {
        "regions": regions, "clusters": args.clusters, "dim": args.dim, "torch_threads": args.threads,
        "candidate_build_seconds": round(build_seconds, 1),
        "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 1),
        "median_candidates": int(candidates["num_candidates"].median()),
        "expected_trials_per_draw": round(float(trials), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
