"""Benchmark: the embed stage's throughput against the backbone's bare forward pass on the same batches.

Side by side in one run on the same JPEG images (random crops of the photographs shipped with
scikit-image): (1) images/s of the backbone's forward alone, inputs already decoded, resized and on
the device; (2) images/s of embed_shard end to end (decoding workers, forward, normalisation,
compression, Zarr writes, rename). Target: embed >= 80% of the bare forward.
embed also runs on the first quarter of the images alone: the difference of the two runs gives the
steady-state rate (start-up excluded: worker start, store creation, first batch, rename), which is what
a large data set sees, and the stored MB/s shows when the output volume itself is the limit.
Default backbone: demo-colortexture on CPU, resnet50-imagenet (random weights) when CUDA is present.

    python benchmarks/embed_throughput.py --quick
    python benchmarks/embed_throughput.py --backbone resnet50-imagenet --image-size 473 --images 2000 --workers 12
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
from PIL import Image


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> pd.DataFrame:
    """`count` JPEGs, random crops (0.6-1.0 of the photo) of scikit-image photographs resized around `size`."""
    from skimage import data as photos

    sources = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket(), photos.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(count):
        photo = sources[number % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw])
        scale = size * rng.uniform(0.8, 1.25) / max(ch, cw)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
        path = folder / f"img{number:06d}.jpg"
        crop.save(path, quality=90)
        rows.append({"image_id": path.stem, "split": "train", "image_path": str(path)})
    return pd.DataFrame(rows)


def bare_forward_seconds(backbone, layer: str, table: pd.DataFrame, image_size: int, batch: int,
                         device: torch.device, amp: bool, cpu_precision: str = "float32") -> float:
    """Seconds of the backbone forward alone over the same batches (decoded and on the device beforehand),
    in the precision and memory layout that embed_shard uses."""
    from umtfss.devices import inference_autocast
    from umtfss.io import read_rgb
    from umtfss.transforms import resize_pad

    tensors = [resize_pad(np.array(read_rgb(p)), None, image_size)[0] for p in table["image_path"]]
    layout = torch.channels_last if cpu_precision == "bfloat16" and device.type == "cpu" else torch.contiguous_format
    batches = [torch.stack(tensors[i:i + batch]).to(device).contiguous(memory_format=layout)
               for i in range(0, len(tensors), batch)]
    backbone = backbone.to(memory_format=layout)

    def forward_all():
        for images in batches:
            with torch.inference_mode(), inference_autocast(device, amp, cpu_precision):
                backbone(images)[layer]
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_all()  # warm-up (cuDNN autotuning, allocator)
    started = time.perf_counter()
    forward_all()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 images of 160 px")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--layer", default="default")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="decoding worker processes of the embed stage")
    parser.add_argument("--dim", type=int, default=None, help="stored channels (random projection); default all")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--cpu-precision", choices=["float32", "bfloat16"], default="float32",
                        help="embedding.cpu_precision: the CPU forward in float32 or bfloat16 autocast (both timed alike)")
    parser.add_argument("--resize-on", choices=["auto", "device", "workers"], default="auto",
                        help="where embed resize-pads: the device (default on a GPU) or the decoding workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from umtfss.backbones import build_backbone
    from umtfss.devices import resolve_device
    from umtfss.embedding import embed_shard, resolve_layer

    device = resolve_device(args.device)
    name = args.backbone or ("resnet50-imagenet" if device.type == "cuda" else "demo-colortexture")
    image_size = args.image_size or (160 if args.quick or name.startswith("demo") else 473)
    count = args.images or (48 if args.quick else 400)
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"parameters: backbone={name} (random weights) images={count} image_size={image_size} batch={args.batch} "
          f"workers={args.workers} dim={args.dim} dtype={args.dtype} threads={args.threads} device={device} "
          f"resize_on={args.resize_on} cpu_precision={args.cpu_precision}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    backbone = build_backbone(name, random_init=True).to(device).eval()
    layer = resolve_layer(backbone, args.layer)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        (work / "images").mkdir()
        table = make_images(work / "images", count, image_size)
        forward = bare_forward_seconds(backbone, layer, table, image_size, args.batch, device, amp=True,
                                       cpu_precision=args.cpu_precision)

        def embed_seconds(rows: pd.DataFrame, name: str) -> float:
            started = time.perf_counter()
            embed_shard(rows, 0, 1, work / name, backbone, layer=layer, image_size=image_size, dtype=args.dtype,
                        dim=args.dim, batch_size=args.batch, device=str(device), amp=True, workers=args.workers,
                        progress=False, resize_on_device={"auto": None, "device": True, "workers": False}[args.resize_on],
                        cpu_precision=args.cpu_precision)
            return time.perf_counter() - started

        quarter = max(args.batch, count // 4)
        embed_quarter = embed_seconds(table.iloc[:quarter], "quarter.zarr")
        embed = embed_seconds(table, "shard-0-of-1.zarr")
        stored = sum(f.stat().st_size for f in (work / "shard-0-of-1.zarr").rglob("*") if f.is_file())
    steady = (count - quarter) / max(embed - embed_quarter, 1e-9)
    print(f"bare forward : {forward:7.2f} s  {count / forward:8.1f} images/s  (layer {layer})")
    print(f"embed stage  : {embed:7.2f} s  {count / embed:8.1f} images/s  ({stored / count / 1e6:.2f} MB stored per image)")
    print(f"embed steady : {steady:8.1f} images/s  (images {quarter + 1}..{count}: {embed - embed_quarter:.2f} s "
          f"minus {embed_quarter:.2f} s for the first {quarter}), {steady * stored / count / 1e6:.0f} MB/s stored")
    print(f"embed throughput / bare forward throughput: {100 * forward / embed:.1f}% end to end, "
          f"{100 * steady * forward / count:.1f}% steady state (target >= 80%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
