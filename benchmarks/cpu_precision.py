"""Benchmark: embedding.cpu_precision bfloat16 against float32 on the CPU: speed, and how much the features move.

Side by side in one run, on the same photographs (random crops of scikit-image's): (1) images/s of
the backbone forward in float32 and in bfloat16 autocast with channels-last weights (what embed_shard
runs for each setting), interleaved; (2) the per-pixel cosine between the two runs' L2-normalised
features; (3) the nearest-centroid labels of both under the same 50 k-means centroids (fit on the
float32 features): the fraction of pixels whose pseudo class stays the same. Backbones have random
weights here (no checkpoint can be downloaded on the project's machines) except demo-colortexture,
whose filters are fixed.

    python benchmarks/cpu_precision.py                                  # resnet50-imagenet, 473 px, 24 images
    python benchmarks/cpu_precision.py --backbone demo-colortexture --image-size 160 --images 256
    python benchmarks/cpu_precision.py --fss-model --images 8 --batch 2   # what `umtfss predict --cpu-precision` runs
    python benchmarks/cpu_precision.py --no-channels-last --images 8      # bfloat16 without the channels-last layout

With --fss-model the timed forward is the whole FSS model (default config, that backbone, 1 shot) on
query/support pairs of the photographs, as `umtfss predict` runs it, and the agreement figure is the
fraction of query pixels whose predicted foreground/background stays the same.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import make_images  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50-imagenet")
    parser.add_argument("--image-size", type=int, default=473)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per precision, interleaved")
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--fss-model", action="store_true", help="time the FSS model's forward (predict) instead")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="bfloat16 without the channels-last layout that the stages use (shows what the layout buys)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from umtfss.backbones import build_backbone
    from umtfss.devices import cpu_bfloat16_native
    from umtfss.embedding import pixel_features
    from umtfss.io import read_rgb
    from umtfss.transforms import resize_pad

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"parameters: backbone={args.backbone} image_size={args.image_size} images={args.images} batch={args.batch} "
          f"threads={args.threads} bfloat16 units={cpu_bfloat16_native()} channels_last={not args.no_channels_last}")
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, random_init=True).eval()
    layer = backbone.embed_layer
    with tempfile.TemporaryDirectory() as work:
        table = make_images(Path(work), args.images, args.image_size)
        tensors = [resize_pad(np.array(read_rgb(p)), None, args.image_size)[0] for p in table["image_path"]]
    batches = [torch.stack(tensors[i:i + args.batch]) for i in range(0, len(tensors), args.batch)]

    if args.fss_model:
        from umtfss.config import load
        from umtfss.devices import channels_last_input, inference_autocast
        from umtfss.model.fss import build_model

        network = build_model(load({"model": {"backbone": args.backbone}})["model"], backbone).eval()
        square = torch.zeros(1, 1, args.image_size, args.image_size)
        square[..., args.image_size // 4:3 * args.image_size // 4, args.image_size // 4:3 * args.image_size // 4] = 1

    def run(precision: str) -> tuple[float, np.ndarray]:
        layout = torch.channels_last if precision == "bfloat16" else torch.contiguous_format
        started = time.perf_counter()
        if args.fss_model:  # query i with support i+1 (its centre square as the mask), as predict_masks calls it
            model = network.to(memory_format=layout)
            outputs = []
            with torch.no_grad(), inference_autocast(torch.device("cpu"), False, precision):
                for images in batches:
                    supports = torch.roll(images, 1, dims=0)[:, None]
                    logits = model(channels_last_input(images, precision), supports,
                                   square.expand(len(images), 1, -1, -1).contiguous())
                    outputs.append(logits.float().argmax(1).flatten())
            return time.perf_counter() - started, torch.cat(outputs).numpy()
        if args.no_channels_last:  # pixel_features would lay the input out channels-last: call the backbone directly
            from umtfss.devices import inference_autocast

            with torch.inference_mode(), inference_autocast(torch.device("cpu"), False, precision):
                maps = [backbone(images)[layer].float().permute(0, 2, 3, 1) for images in batches]
            features = [torch.nn.functional.normalize(m, dim=-1) for m in maps]
            return time.perf_counter() - started, torch.cat(features).flatten(0, 2).numpy()
        model = backbone.to(memory_format=layout)
        features = [pixel_features(model, layer, images, None, amp=False, cpu_precision=precision)
                    for images in batches]
        return time.perf_counter() - started, torch.cat(features).flatten(0, 2).numpy()

    for precision in ("float32", "bfloat16"):  # warm-up: oneDNN builds its kernels on the first call
        run(precision)
    seconds = {"float32": [], "bfloat16": []}
    for _ in range(args.repeats):
        for precision in seconds:
            elapsed, features = run(precision)
            seconds[precision].append(elapsed)
            if precision == "float32":
                reference = features
            else:
                lowered = features
    rates = {p: args.images / float(np.median(s)) for p, s in seconds.items()}
    for precision, rate in rates.items():
        print(f"{precision:9s}: {rate:7.2f} {'episodes' if args.fss_model else 'images'}/s forward (median of {args.repeats}; "
              + ", ".join(f"{s:.2f}" for s in seconds[precision]) + " s)")
    print(f"bfloat16 / float32 throughput: {rates['bfloat16'] / rates['float32']:.2f}x")
    if args.fss_model:
        print(f"query pixels with the same prediction: {100 * (reference == lowered).mean():.2f}% "
              f"(foreground in {100 * reference.mean():.1f}% of them with float32)")
        return 0

    cosine = (reference * lowered).sum(1)
    print(f"per-pixel cosine float32 vs bfloat16 ({len(cosine)} pixels, {reference.shape[1]} channels): "
          f"mean {cosine.mean():.5f}, 1st percentile {np.percentile(cosine, 1):.5f}, min {cosine.min():.5f}")
    kmeans = faiss.Kmeans(reference.shape[1], args.clusters, niter=20, spherical=True, seed=0,
                          max_points_per_centroid=len(reference))
    kmeans.train(np.ascontiguousarray(reference))
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(kmeans.centroids)
    same = index.search(np.ascontiguousarray(reference), 1)[1][:, 0] == index.search(np.ascontiguousarray(lowered), 1)[1][:, 0]
    print(f"pseudo class unchanged under the same {args.clusters} centroids: {100 * same.mean():.2f}% of pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
