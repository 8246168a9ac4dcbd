"""Does superpixel refinement (clustering.refine: superpixel) make better pseudo masks on the demo? At what cost?

Protocol, per demo seed: generate the demo data set (train images only are used), embed them with
demo-colortexture at 160 px (stride 8: a 20x20 grid), fit spherical k-means with the package's fit
stage (N = 50 and N = 21, 200,000 pixels, 20 iterations, seed 0), then run the assign stage without
refinement and with each Felzenszwalb setting and each clustering.refine_upsample (nearest-resized grid
labels, or the bilinearly interpolated centroid scores of the reference code) on the same centroids. Scores come from the quality
stage at the embed input resolution (160 px; unrefined grid labels upsampled nearest, ground truth
resized nearest with resize_pad's geometry, 255 ignored): many-to-one mIoU at N = 50 and Hungarian
mIoU at N = 21, over background + 20 classes; grid-resolution many-to-one is printed for reference.
Cost: assign's seconds per image with refinement minus without (image decoding, resize,
Felzenszwalb, both votes), the median of --repeats interleaved runs; disk: the 'refined' array's
bytes per image. The cost at the paper's input size is timed too (--cost-size, default 473): refine_labels
+ grid_majority on 20 demo images upsampled to that size (smoother than photographs: a lower bound),
and the episodes stage's region step on those refined labels against the grid's.

    python benchmarks/refine_quality.py                      # seeds 0 and 1, 300 images, reference + small setting
    python benchmarks/refine_quality.py --seeds 0 --images 60   # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from umtfss.backbones import build_backbone
from umtfss.clustering.assign import assign_shard, bilinear_labels
from umtfss.clustering.fit import fit_centroids
from umtfss.clustering.quality import confusion_matrix, quality_metrics
from umtfss.clustering.refine import embedded_view, grid_majority, refine_labels
from umtfss.data.demo import generate_demo
from umtfss.embedding import embed_shard
from umtfss.pseudo_episodes import image_regions, refined_image_regions, valid_extent
from umtfss.stores import EmbeddingStore, LabelStore, create_label_store

IMAGE_SIZE = 160


def demo_table(root: Path) -> pd.DataFrame:
    """The demo's train images as an image table (image_id, split, image_path, label_path)."""
    ids = (root / "lists" / "train_aug.txt").read_text().split()
    return pd.DataFrame({"image_id": ids, "split": "train",
                         "image_path": [str(root / "JPEGImages" / f"{i}.jpg") for i in ids],
                         "label_path": [str(root / "SegmentationClassAug" / f"{i}.png") for i in ids]})


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_setting(text: str) -> tuple[float, int]:
    scale, min_size = text.split(":")
    return float(scale), int(min_size)


def run_seed(seed: int, args, work: Path) -> list[dict]:
    root = generate_demo(work / "VOC2012", seed=seed, train_images=args.images, val_images=20,
                         image_size=IMAGE_SIZE, progress=False)
    table = demo_table(root)
    embeddings = embed_shard(table, 0, 1, work / "emb.zarr", build_backbone("demo-colortexture"),
                             image_size=IMAGE_SIZE, batch_size=16, device="cpu", workers=0, progress=False)
    variants = [("none", None)] + [(f"superpixel {s:g}/{args.sigma:g}/{m} {up}", (s, m, up))
                                   for s, m in args.settings for up in args.upsample]
    rows, fitted = [], {}
    for clusters in (args.clusters, args.hungarian_clusters):
        centroids, _ = fit_centroids([embeddings], clusters, subset_pixels=200_000, iterations=20, seed=0,
                                     device="cpu", progress=False)
        fitted[clusters] = centroids
        seconds: dict[str, list[float]] = {name: [] for name, _ in variants}
        for repeat in range(args.repeats):  # interleaved, so that machine load hits every variant alike
            for name, setting in variants:
                out = work / f"labels-{clusters}-{variants.index((name, setting))}.zarr"
                extra = {} if setting is None else {
                    "refine": "superpixel", "images": table, "superpixel_scale": setting[0],
                    "superpixel_sigma": args.sigma, "superpixel_min_size": setting[1], "upsample": setting[2]}
                started = time.perf_counter()
                assign_shard(embeddings, centroids, out, batch_images=32, device="cpu", progress=False, **extra)
                seconds[name].append(time.perf_counter() - started)
        for index, (name, setting) in enumerate(variants):
            out = work / f"labels-{clusters}-{index}.zarr"
            fine = quality_metrics(confusion_matrix([out], table, progress=False, resolution="input")[0])
            grid = quality_metrics(confusion_matrix([out], table, progress=False, resolution="grid")[0])
            rows.append({"seed": seed, "N": clusters, "refine": name,
                         "m2o_input": fine["many_to_one_miou"], "hungarian_input": fine["hungarian_miou"],
                         "m2o_grid": grid["many_to_one_miou"],
                         "assign_s_per_image": float(np.median(seconds[name])) / len(table),
                         "refined_bytes_per_image": disk_bytes(out / "refined") / len(table) if setting else 0.0})
    labels = LabelStore([work / f"labels-{args.clusters}-0.zarr"])
    seconds, stored, regions_refined, regions_grid = cost_at_size(table, labels, args.cost_size, args.settings[0],
                                                                   work / "large.zarr")
    bilinear = bilinear_cost_at_size(table, EmbeddingStore([embeddings]), fitted[args.clusters], args.cost_size)
    rows.append({"seed": seed, "cost_size_s_per_image": seconds, "cost_size_bytes_per_image": stored,
                 "bilinear_size_s_per_image": bilinear, "regions_refined_s": regions_refined,
                 "regions_grid_s": regions_grid})
    return rows


def bilinear_cost_at_size(table: pd.DataFrame, store: EmbeddingStore, centroids: np.ndarray, size: int,
                          n: int = 20) -> float:
    """Median seconds per image of bilinear_labels alone (refine_upsample bilinear's extra step) at `size`."""
    centroid_tensor = torch.from_numpy(centroids)
    seconds = []
    for index in range(min(n, len(store))):
        view, _ = embedded_view(table["image_path"][index], size)
        rows, cols = store.valid(index)
        cells = store.features(index)[:rows, :cols]
        started = time.perf_counter()
        bilinear_labels(cells, centroid_tensor, view.shape[:2])
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def cost_at_size(table: pd.DataFrame, labels: LabelStore, size: int, setting: tuple[float, int], out: Path,
                 n: int = 20) -> tuple[float, float, float, float]:
    """Per image, for images resize-padded to `size` (decoding excluded; the grid labels are the demo's
    20x20 ones): median seconds of refine_labels + grid_majority, stored bytes of the refined labels,
    and the episodes stage's region step on them, median seconds from the refined labels
    (refined_image_regions) and from the grid labels (image_regions), with random unit features of
    d = 256 on the stride-8 grid of `size` (the PASCAL config's)."""
    n = min(n, len(labels))
    refined = create_label_store(out, n, labels.grid, {}, refined_size=size)["refined"]
    rng = np.random.default_rng(0)
    seconds, from_refined, from_grid = [], [], []
    for index in range(n):
        view, _ = embedded_view(table["image_path"][index], size)
        rows, cols = valid_extent(labels.labels(index))
        grid = labels.labels(index)[:rows, :cols]
        started = time.perf_counter()
        fine = refine_labels(grid, view, setting[0], 0.8, setting[1])
        grid_majority(fine, (rows, cols))
        seconds.append(time.perf_counter() - started)
        padded = np.full((size, size), -1, np.int16)
        padded[:fine.shape[0], :fine.shape[1]] = fine
        refined[index] = padded
        cells = (-(-fine.shape[0] // 8), -(-fine.shape[1] // 8))
        features = rng.normal(size=(*cells, 256))
        features = (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float16)
        started = time.perf_counter()
        refined_image_regions(fine, features)
        from_refined.append(time.perf_counter() - started)
        coarse = grid_majority(fine, cells)
        started = time.perf_counter()
        image_regions(coarse, features)
        from_grid.append(time.perf_counter() - started)
    return (float(np.median(seconds)), disk_bytes(out / "refined") / n, float(np.median(from_refined)),
            float(np.median(from_grid)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="demo generator seeds")
    parser.add_argument("--images", type=int, default=300, help="demo train images")
    parser.add_argument("--clusters", type=int, default=50, help="N for many-to-one")
    parser.add_argument("--hungarian-clusters", type=int, default=21, help="N for Hungarian (21 = classes + background)")
    parser.add_argument("--settings", type=parse_setting, nargs="+", default=[(100.0, 200), (50.0, 50)],
                        help="Felzenszwalb scale:min_size pairs (default: the reference 100:200 and 50:50)")
    parser.add_argument("--sigma", type=float, default=0.8, help="Felzenszwalb sigma (reference 0.8)")
    parser.add_argument("--upsample", nargs="+", default=["nearest", "bilinear"], choices=["nearest", "bilinear"],
                        help="clustering.refine_upsample variants (bilinear: the reference's interpolated scores)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cost-size", type=int, default=473, help="input size of the extra cost measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_seed(seed, args, Path(tmp))
    frame = pd.DataFrame(rows)
    cost = frame.pop("cost_size_s_per_image").dropna()
    cost_bytes = frame.pop("cost_size_bytes_per_image").dropna()
    bilinear_cost = frame.pop("bilinear_size_s_per_image").dropna()
    regions_refined = frame.pop("regions_refined_s").dropna()
    regions_grid = frame.pop("regions_grid_s").dropna()
    frame = frame.dropna(subset=["refine"])
    print(f"demo, {args.images} train images of {IMAGE_SIZE} px, demo-colortexture, stride 8 (20x20 grid); "
          f"mIoU over background + 20 classes at the {IMAGE_SIZE} px input resolution (grid for reference)")
    print(f"{'seed':>4} {'refine (scale/sigma/min_size up)':<40} {'m2o N=' + str(args.clusters):>9} "
          f"{'hung N=' + str(args.hungarian_clusters):>10} {'m2o grid':>9} {'assign ms/img':>13} "
          f"{'refine ms/img':>13} {'refined B/img':>13}")
    for seed in args.seeds:
        for name in frame["refine"].unique():
            m2o = frame[(frame.seed == seed) & (frame.N == args.clusters) & (frame.refine == name)].iloc[0]
            hung = frame[(frame.seed == seed) & (frame.N == args.hungarian_clusters) & (frame.refine == name)].iloc[0]
            base = frame[(frame.seed == seed) & (frame.N == args.clusters) & (frame.refine == "none")].iloc[0]
            extra = (m2o.assign_s_per_image - base.assign_s_per_image) * 1000
            print(f"{seed:>4} {name:<40} {m2o.m2o_input:>9.3f} {hung.hungarian_input:>10.3f} {m2o.m2o_grid:>9.3f} "
                  f"{m2o.assign_s_per_image * 1000:>13.2f} {extra if name != 'none' else 0:>13.2f} "
                  f"{m2o.refined_bytes_per_image:>13.0f}")
    if len(args.seeds) > 1:
        means = frame.groupby(["N", "refine"], sort=False)[["m2o_input", "hungarian_input"]].mean()
        print("mean over seeds:")
        for name in frame["refine"].unique():
            print(f"     {name:<40} {means.loc[(args.clusters, name), 'm2o_input']:>9.3f} "
                  f"{means.loc[(args.hungarian_clusters, name), 'hungarian_input']:>10.3f}")
    print(f"refinement at {args.cost_size} px input, scale/min_size {args.settings[0][0]:g}/{args.settings[0][1]}: "
          f"{cost.median() * 1000:.0f} ms per image (median over seeds of the median of 20 images; decoding excluded), "
          f"'refined' array {cost_bytes.mean() / 1000:.1f} kB per image on disk ({args.cost_size ** 2 * 2 / 1000:.0f} kB raw); "
          f"bilinear upsampling of the N = {args.clusters} scores adds {bilinear_cost.median() * 1000:.0f} ms per image")
    print(f"episodes' regions at {args.cost_size} px (d = 256, stride 8): {regions_refined.median() * 1000:.1f} ms per "
          f"image from the refined labels vs {regions_grid.median() * 1000:.1f} ms from the grid "
          f"({regions_refined.median() / regions_grid.median():.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
