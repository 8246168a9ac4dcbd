"""Pseudo-mask quality of clustering.fit_mode subset vs minibatch (the reference's fit), over k-means seeds.

    python benchmarks/fit_modes_quality.py            # the demo's embeddings (run the demo first)
    python benchmarks/fit_modes_quality.py --embeddings results/pascal/<embedder>/embeddings/*.zarr \
        --images results/pascal/prepare/images.parquet --minibatch-images 3200

For each seed, mode and N: fit, assign every shard, and score the labels against the ground truth
(many-to-one and Hungarian mIoU, as the pipeline's quality rule). Prints one CSV row per run and a
mean/std summary per mode and N.
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
from pathlib import Path

import numpy as np

from umtfss.clustering.assign import assign_shard
from umtfss.clustering.fit import fit_centroids
from umtfss.clustering.quality import confusion_matrix, quality_metrics
from umtfss.stores import EmbeddingStore

DEMO = "results/pascal/demo-colortexture"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", nargs="+", default=None, help=f"shard stores (default {DEMO}/embeddings/*)")
    parser.add_argument("--images", default="results/pascal/prepare/images.parquet")
    parser.add_argument("--clusters", type=int, nargs="+", default=[50, 21])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--minibatch-images", type=int, nargs="+", default=None,
                        help="group sizes to compare (default: about half and a quarter of the images)")
    parser.add_argument("--subset-pixels", type=int, default=200_000, help="the demo config's value")
    parser.add_argument("--metric", default="spherical")
    args = parser.parse_args()
    shards = args.embeddings or sorted(glob.glob(f"{DEMO}/embeddings/shard-*.zarr"))
    if not shards:
        sys.exit(f"no embedding shards under {DEMO}/embeddings: run the demo first (README) or pass --embeddings")
    images = len(EmbeddingStore(shards))
    groups = args.minibatch_images or [images * 8 // 15, images // 4]  # 8/15: PASCAL's 3,200 of 5,953
    modes = [("subset", None)] + [("minibatch", size) for size in groups]
    print(f"{images} images in {len(shards)} shard(s); minibatch groups {groups}", file=sys.stderr)
    print("clusters,seed,mode,minibatch_images,many_to_one_miou,hungarian_miou")
    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for clusters in args.clusters:
            for seed in args.seeds:
                for mode, size in modes:
                    centroids, _ = fit_centroids(shards, clusters, args.subset_pixels, seed=seed, device="cpu",
                                                 metric=args.metric, fit_mode=mode, minibatch_images=size or 1,
                                                 progress=False)
                    labels = [assign_shard(shard, centroids, Path(scratch) / f"labels-{i}.zarr", device="cpu",
                                           progress=False) for i, shard in enumerate(shards)]
                    confusion, _ = confusion_matrix(labels, args.images, clusters=clusters, progress=False)
                    metrics = quality_metrics(confusion)
                    row = (metrics["many_to_one_miou"], metrics["hungarian_miou"])
                    results.setdefault((clusters, mode, size), []).append(row)
                    print(f"{clusters},{seed},{mode},{size or ''},{row[0]:.4f},{row[1]:.4f}", flush=True)
    print("\nclusters  mode        group  many-to-one mIoU   Hungarian mIoU", file=sys.stderr)
    for (clusters, mode, size), rows in results.items():
        values = np.asarray(rows)
        print(f"{clusters:8d}  {mode:10s} {size or '':>6}  {values[:, 0].mean():.3f} ± {values[:, 0].std():.3f}"
              f"    {values[:, 1].mean():.3f} ± {values[:, 1].std():.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
