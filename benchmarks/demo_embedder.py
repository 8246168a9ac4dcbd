"""Are the demo classes discoverable without labels? Pseudo-mask mIoU of k-means on demo embedder features.

Protocol (the unsupervised path of the pipeline, scored against the demo's ground truth):
features on the stride-8 grid of the train images (160 px), L2-normalised per pixel; spherical
faiss k-means (20 iterations, seed 0) on a random subset of at most 200,000 pixels; every cell gets
its nearest centroid; the label is downsampled to the grid (nearest, 255 excluded). Scores:
many-to-one mIoU (each cluster -> the class it overlaps most) over background + 20 classes,
Hungarian-matched mIoU at N = 21, and per class the IoU of its best single cluster.
Baseline: layer3 of a randomly initialised torchvision ResNet-50 (dilated to stride 8).

    python benchmarks/demo_embedder.py            # default demo set (300 train images), N = 30
    python benchmarks/demo_embedder.py --quick    # 60 images, a few seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from umtfss.backbones.demo import ColorTextureBackbone
from umtfss.data.demo import VOC_CLASSES, generate_demo

IGNORE = 255
NUM_LABELS = len(VOC_CLASSES) + 1  # background + 20


class RandomResNetLayer3(torch.nn.Module):
    """Randomly initialised ResNet-50 up to layer3, dilated to stride 8 (the issue's baseline)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        import torchvision

        torch.manual_seed(seed)
        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        self.body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.eval()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @torch.no_grad()
    def forward(self, x):
        return {"layer3": self.body((x - self.mean) / self.std)}


def read_split(root: Path, split: str, limit: int | None):
    ids = (root / "lists" / f"{split}.txt").read_text().split()[:limit]
    images = np.stack([np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    labels = np.stack([np.asarray(Image.open(root / "SegmentationClassAug" / f"{i}.png")) for i in ids])
    return images, labels


def grid_features(backbone, layer: str, images: np.ndarray, size: int = 160, batch: int = 16) -> np.ndarray:
    """[n, gh, gw, C] float32 features, L2-normalised per cell."""
    out = []
    for start in tqdm(range(0, len(images), batch), desc=f"features {layer}", file=sys.stderr, leave=False):
        x = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        f = F.normalize(backbone(x)[layer], dim=1)
        out.append(f.permute(0, 2, 3, 1).numpy())
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def grid_labels(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest downsampling of the label maps to the feature grid."""
    t = torch.from_numpy(labels).float()[:, None]
    return F.interpolate(t, size=grid, mode="nearest")[:, 0].to(torch.int64).numpy()


def cluster(features: np.ndarray, clusters: int, subset: int = 200_000, seed: int = 0) -> np.ndarray:
    """Spherical k-means on a random pixel subset, then nearest centroid for every cell."""
    flat = features.reshape(-1, features.shape[-1])
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(flat), size=min(subset, len(flat)), replace=False)
    kmeans = faiss.Kmeans(flat.shape[1], clusters, niter=20, spherical=True, seed=seed,
                          max_points_per_centroid=10 ** 7, verbose=False)
    kmeans.train(np.ascontiguousarray(flat[pick]))
    _, assignment = kmeans.index.search(flat, 1)
    return assignment[:, 0].reshape(features.shape[:-1])


def confusion(assignment: np.ndarray, gt: np.ndarray, clusters: int) -> np.ndarray:
    """[clusters, 21] cell counts, ignore cells excluded."""
    keep = gt != IGNORE
    return np.bincount(assignment[keep] * NUM_LABELS + gt[keep], minlength=clusters * NUM_LABELS).reshape(
        clusters, NUM_LABELS)


def many_to_one_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU when every cluster is mapped to the class it overlaps most."""
    mapping = conf.argmax(1)
    merged = np.zeros((NUM_LABELS, NUM_LABELS))
    np.add.at(merged, mapping, conf)
    return _iou(merged)


def hungarian_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU under the one-to-one cluster-class matching that maximises total IoU."""
    pair_iou = _pair_iou(conf)
    rows, cols = linear_sum_assignment(-pair_iou)
    out = np.zeros(NUM_LABELS)
    out[cols] = pair_iou[rows, cols]
    return out


def best_cluster_iou(conf: np.ndarray) -> np.ndarray:
    return _pair_iou(conf).max(0)


def _pair_iou(conf: np.ndarray) -> np.ndarray:
    inter = conf.astype(np.float64)
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - inter
    return inter / np.maximum(union, 1)


def _iou(square: np.ndarray) -> np.ndarray:
    inter = np.diag(square)
    union = square.sum(0) + square.sum(1) - inter
    return inter / np.maximum(union, 1)


def evaluate(features: np.ndarray, gt: np.ndarray, clusters: int, seed: int = 0) -> dict:
    conf = confusion(cluster(features, clusters, seed=seed), gt, clusters)
    conf21 = confusion(cluster(features, NUM_LABELS, seed=seed), gt, NUM_LABELS)
    return {"many_to_one": many_to_one_iou(conf), "hungarian21": hungarian_iou(conf21),
            "best_cluster": best_cluster_iou(conf)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="an existing demo data set root; default: generate one in a temp dir")
    parser.add_argument("--seed", type=int, default=0, help="demo generator seed (when generating)")
    parser.add_argument("--clusters", type=int, nargs="+", default=[30], help="N values for many-to-one")
    parser.add_argument("--images", type=int, default=None, help="use only the first this many train images")
    parser.add_argument("--quick", action="store_true", help="60 train images, only the demo embedder")
    parser.add_argument("--no-resnet", action="store_true", help="skip the random ResNet-50 baseline")
    parser.add_argument("--per-class", action="store_true", help="print the per-class table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    limit = 60 if args.quick and args.images is None else args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else generate_demo(
            Path(tmp) / "VOC2012", seed=args.seed, train_images=max(limit or 300, 20), progress=False)
        images, labels = read_split(root, "train_aug", limit)
    backbones = [("demo-colortexture", ColorTextureBackbone(), "features")]
    if not (args.quick or args.no_resnet):
        backbones.append(("resnet50-random layer3", RandomResNetLayer3(), "layer3"))
    print(f"{len(images)} train images, {images.shape[1]} px; many-to-one over background + 20 classes")
    print(f"{'backbone':<24} {'N':>4} {'m2o mIoU':>9} {'hung21':>7} {'best-cl mean':>12} {'best-cl min..max':>17} {'s':>6}")
    for name, backbone, layer in backbones:
        start = time.perf_counter()
        feats = grid_features(backbone, layer, images)
        gt = grid_labels(labels, feats.shape[1:3])
        for n in args.clusters:
            scores = evaluate(feats, gt, n)
            best = scores["best_cluster"][1:]
            print(f"{name:<24} {n:>4} {scores['many_to_one'].mean():>9.3f} {scores['hungarian21'].mean():>7.3f} "
                  f"{best.mean():>12.3f} {best.min():>8.2f}..{best.max():<8.2f} {time.perf_counter() - start:>6.1f}")
            if args.per_class:
                names = ("background",) + VOC_CLASSES
                for c, cname in enumerate(names):
                    print(f"    {cname:<12} m2o {scores['many_to_one'][c]:.3f}  best-cluster "
                          f"{scores['best_cluster'][c]:.3f}  hungarian21 {scores['hungarian21'][c]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
