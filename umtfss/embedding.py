"""The embed stage: L2-normalised per-pixel self-supervised features of one shard of images into a Zarr store."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

import umtfss
from umtfss.devices import (channels_last_input, check_cpu_precision, forward_precision, inference_autocast,
                            lay_out_for_precision, resolve_device)
from umtfss.io import atomic_path, check_outputs_apart, read_rgb, resolve_table_paths
from umtfss.stores import BackgroundWriter, create_embedding_store
from umtfss.transforms import resize_pad, resize_pad_image, resized_extent, uint8_tensor
from umtfss.progress import tqdm

PROJECTION_SEED = 0  # the random orthogonal projection is fixed so that every shard uses the same one
REQUIRED_COLUMNS = ("image_id", "split", "image_path")


# --------------------------------------------------------------------------------------------
# the image list and its shards
# --------------------------------------------------------------------------------------------

def load_image_table(images: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The prepare stage's image table (a parquet path or a DataFrame), checked for the needed columns."""
    name = "<DataFrame>"
    if not isinstance(images, pd.DataFrame):
        name = str(images)
        if not Path(images).is_file():
            raise FileNotFoundError(f"image table '{images}' does not exist (expected the prepare stage's images.parquet)")
        images = resolve_table_paths(pd.read_parquet(images), images)
    missing = [c for c in REQUIRED_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(f"image table '{name}' lacks column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}")
    return images


def shard_rows(table: pd.DataFrame, shard: int, num_shards: int, split: str = "train",
               image_filter: Collection[str] | Callable[[str], bool] | None = None) -> pd.DataFrame:
    """The rows of one shard: the split's images sorted by image_id, cut by np.array_split into
    `num_shards` contiguous slices (sizes differ by at most one), slice number `shard`.

    Sorting makes the split a pure function of the image list, so shards of a rerun line up.
    `image_filter` keeps only some image ids (a collection, or a predicate) before the split.
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards} is not valid; expected 0 <= shard < num_shards")
    rows = table[table["split"] == split]
    if len(rows) == 0 and len(table):
        raise ValueError(f"the image table has no image in split '{split}'; its splits are "
                         f"{', '.join(sorted(map(str, table['split'].unique())))}")
    if image_filter is not None:
        if not callable(image_filter):
            wanted = set(image_filter)
            unknown = sorted(wanted - set(rows["image_id"].astype(str)))
            if unknown:
                raise ValueError(f"{len(unknown)} image id(s) to keep are not in split '{split}' of the image table, "
                                 f"e.g. {unknown[:3]}")
        keep = image_filter if callable(image_filter) else wanted.__contains__
        rows = rows[[bool(keep(str(i))) for i in rows["image_id"]]]
    rows = rows.sort_values("image_id", kind="stable").reset_index(drop=True)
    if rows["image_id"].duplicated().any():
        dup = rows.loc[rows["image_id"].duplicated(), "image_id"].iloc[0]
        raise ValueError(f"image table lists image_id '{dup}' twice in split '{split}'")
    bounds = np.array_split(np.arange(len(rows)), num_shards)[shard]
    return rows.iloc[bounds].reset_index(drop=True) if len(bounds) else rows.iloc[0:0]


class _ShardImages(Dataset):
    """Decodes the images of a shard (in DataLoader workers) and resize-pads them there, or, with
    `resize` False, leaves them uint8 at their own size for the device to resize; errors come back as text."""

    def __init__(self, paths: list[str], image_size: int, resize: bool = True):
        self.paths = paths
        self.image_size = image_size
        self.resize = resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = read_rgb(path)
            if self.resize:
                tensor, _, valid_hw = resize_pad(image, None, self.image_size)
            else:
                tensor, valid_hw = uint8_tensor(image), resized_extent(*image.shape[:2], self.image_size)
        except Exception as err:  # reported by the main process with the image path
            return {"index": index, "error": f"{type(err).__name__}: {err}"}
        return {"index": index, "error": None, "image": tensor, "valid_hw": valid_hw, "size": image.shape[:2]}


def _collate(items):
    return items


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------

DEFAULT_LAYER = "layer4"  # the schema default of embedding.layer: a ResNet's; other backbones use their own


def resolve_layer(backbone, layer: str | None, key: str = "embedding.layer") -> str:
    """The backbone output to store: `layer` when the backbone has it; the default (or null) falls back to
    the backbone's embed_layer (a ViT's 'last', the demo's 'features'), any other missing name is an error."""
    if layer in backbone.channels:
        return layer
    if layer in (None, "default", DEFAULT_LAYER):
        if layer == DEFAULT_LAYER:
            print(f"umtfss embed: note: backbone '{backbone.name}' has no layer '{layer}' (the default of "
                  f"{key}); using its embed layer '{backbone.embed_layer}'", file=sys.stderr)
        return backbone.embed_layer
    named = f"config key '{key}'" if "." in key else f"'{key}'"
    raise ValueError(f"{named} is '{layer}', but backbone '{backbone.name}' has layers "
                     f"{', '.join(backbone.channels)}; expected one of them (or '{DEFAULT_LAYER}', the default, "
                     f"for the backbone's embed layer '{backbone.embed_layer}')")


def random_projection(in_dim: int, out_dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """A seeded [in_dim, out_dim] matrix with orthonormal columns (QR of a Gaussian matrix)."""
    if not 1 <= out_dim <= in_dim:
        raise ValueError(f"config key 'embedding.dim' is {out_dim}, expected 1..{in_dim} (the layer's channels)")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))[None]  # unique QR: the draw, not the LAPACK build, fixes the signs
    return q.float()


def pixel_features(backbone, layer: str, images: torch.Tensor, projection: torch.Tensor | None,
                   amp: bool, cpu_precision: str = "float32") -> torch.Tensor:
    """[B,3,S,S] images -> [B,gh,gw,C] float32 features, projected (optional) then L2-normalised per pixel.

    The backbone runs under inference_autocast: float16 on CUDA with `amp`, bfloat16 on the CPU with
    `cpu_precision` 'bfloat16' (channels-last input, as embed_shard lays out the backbone's weights).
    """
    images = channels_last_input(images, cpu_precision)
    with torch.inference_mode(), inference_autocast(images.device, amp, cpu_precision):
        maps = backbone(images)[layer]
    maps = maps.float().permute(0, 2, 3, 1)
    if projection is not None:
        maps = maps @ projection
    return torch.nn.functional.normalize(maps, dim=-1, eps=1e-12)


def _probe(backbone, layer: str, image_size: int, device: torch.device) -> tuple[int, int, int]:
    """(gh, gw, channels) of the layer for an image_size square input, from one blank forward."""
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, image_size, image_size, device=device))[layer]
    return int(out.shape[2]), int(out.shape[3]), int(out.shape[1])


def _valid_cells(valid_hw: tuple[int, int], stride: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Grid rows/cols that overlap the resized image (cell j spans pixels [j*stride, (j+1)*stride))."""
    return (min(grid[0], max(1, math.ceil(valid_hw[0] / stride))),
            min(grid[1], max(1, math.ceil(valid_hw[1] / stride))))


def _device_batch(items: list[dict], image_size: int, device: torch.device) -> torch.Tensor:
    """[B,3,S,S] on `device` from decoded uint8 images: each is copied as uint8 (a quarter of the float
    bytes; asynchronously from pinned memory) and resize-padded there, exactly as the workers would."""
    batch = torch.empty(len(items), 3, image_size, image_size, device=device)
    for row, item in enumerate(items):
        batch[row] = resize_pad_image(item["image"].to(device, non_blocking=True), image_size)[0]
    return batch


def _to_host(features: torch.Tensor):
    """(host copy, ready) of device features: on a GPU the copy into pinned memory is only queued, and
    ready() waits for it, so that the writer thread waits instead of the loop that feeds the GPU."""
    if features.device.type != "cuda":
        return features.cpu(), None
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied.synchronize


def _default_workers() -> int:
    """Loader processes beside the main one: up to 4, within the cores this job may use."""
    from umtfss.threads import usable_cores

    return max(0, min(4, usable_cores() - 1))


def embed_shard(images, shard: int, num_shards: int, out: str | Path, backbone, layer: str | None = None,
                image_size: int = 473, dtype: str = "float16", dim: int | None = None, batch_size: int = 32,
                device: str = "auto", amp: bool = True, split: str = "train",
                image_filter: Collection[str] | Callable[[str], bool] | None = None,
                workers: int | None = None, progress: bool = True, resize_on_device: bool | None = None,
                cpu_precision: str = "float32") -> Path:
    """Embed shard `shard` of `num_shards` of the split's images into the Zarr store `out`.

    `backbone` is a FeatureBackbone (see docs/architecture.md). The store is written into a temporary
    sibling and renamed at the end, so a killed job leaves nothing under `out`. Returns `out`.
    `resize_on_device` (default: on a GPU) moves the resize-pad from the decoding workers to the
    device; the features are the same up to the device's float rounding. On a GPU the loop never
    waits for the device: features come back by a queued copy that the writer thread waits for.
    `cpu_precision` 'bfloat16' runs a CPU forward in bfloat16 autocast with channels-last weights (about
    4x a float32 ResNet-50 on a CPU with AMX; see benchmarks/embed_throughput.py); the store's
    'forward_precision' attribute says which ran.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"config key 'embedding.dtype' is '{dtype}', expected float16 or float32")
    if batch_size < 1:
        raise ValueError(f"config key 'embedding.batch_size' is {batch_size}, expected >= 1")
    rows = shard_rows(load_image_table(images), shard, num_shards, split, image_filter)
    check_cpu_precision(cpu_precision, "embedding.cpu_precision")
    torch_device = resolve_device(device, "embedding.device")
    backbone = backbone.to(torch_device).eval()
    backbone = lay_out_for_precision(backbone, torch_device, cpu_precision, "embed")
    layer = resolve_layer(backbone, layer)
    gh, gw, channels = _probe(backbone, layer, image_size, torch_device)
    stride = int(backbone.strides[layer])
    projection = random_projection(channels, dim) if dim is not None and dim != channels else None
    stored_dim = channels if projection is None else dim
    paths = [str(p) for p in rows["image_path"]]
    ids = [str(i) for i in rows["image_id"]]
    attrs = {
        "image_ids": ids, "backbone": backbone.name, "layer": layer, "stride": stride, "image_size": image_size,
        "dim": stored_dim, "input_dim": channels, "projected": projection is not None, "dtype": dtype,
        "grid": [gh, gw], "checkpoint_sha256": getattr(backbone, "checkpoint_sha256", None),
        "preprocessing": (f"RGB in [0,1]; longer side resized to {image_size} (bilinear), padded bottom/right with 0 "
                          f"to {image_size}x{image_size}; backbone layer '{layer}' (stride {stride}); "
                          + (f"random orthogonal projection {channels}->{stored_dim} (seed {PROJECTION_SEED}, array "
                             "'projection'); " if projection is not None else "")
                          + f"L2-normalised per pixel; stored as {dtype}"),
        "forward_precision": forward_precision(torch_device, amp, cpu_precision),
        "split": split, "shard": shard, "num_shards": num_shards, "umtfss_version": umtfss.__version__,
    }
    proj_device = projection.to(torch_device) if projection is not None else None
    on_device = torch_device.type == "cuda" if resize_on_device is None else bool(resize_on_device)
    loader = DataLoader(_ShardImages(paths, image_size, resize=not on_device), batch_size=batch_size, shuffle=False,
                        num_workers=_default_workers() if workers is None else workers, collate_fn=_collate,
                        pin_memory=torch_device.type == "cuda")
    valid = np.zeros((len(ids), 2), np.int32)
    sizes = np.zeros((len(ids), 2), np.int32)
    with atomic_path(out, sweep=True, folder=True, marker="features/zarr.json") as temp:
        group = create_embedding_store(temp, len(ids), (gh, gw), stored_dim, dtype, attrs)
        if projection is not None:
            group.create_array("projection", data=projection.numpy(), chunks=projection.shape)
        writer = BackgroundWriter(group["features"])
        try:
            bar = tqdm(total=len(ids), desc=f"embed shard {shard}/{num_shards}", unit="img", file=sys.stderr,
                       disable=not progress)
            for items in loader:
                for item in items:
                    if item["error"] is not None:
                        raise ValueError(f"cannot read image '{paths[item['index']]}' (image_id '{ids[item['index']]}'): {item['error']}")
                if on_device:
                    batch = _device_batch(items, image_size, torch_device)
                else:
                    batch = torch.stack([item["image"] for item in items]).to(torch_device, non_blocking=True)
                feats = pixel_features(backbone, layer, batch, proj_device, amp, cpu_precision).to(getattr(torch, dtype))
                writer.put(items[0]["index"], *_to_host(feats))
                for item in items:
                    valid[item["index"]] = _valid_cells(item["valid_hw"], stride, (gh, gw))
                    sizes[item["index"]] = item["size"]
                bar.update(len(items))
            bar.close()
        finally:
            writer.close()
        group["valid"][:] = valid
        group["sizes"][:] = sizes
    return Path(out)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _read_id_list(path: str) -> set[str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image id list '{path}' does not exist")
    # ids may start or end with spaces (file names do): only the line ending is removed
    return {line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}


def cli(parser):
    """`umtfss embed`: one shard of the embedding store."""
    parser.add_argument("--config", required=True, help="YAML path or inline JSON (section 'embedding')")
    parser.add_argument("--images", required=True, help="images.parquet from the prepare stage")
    parser.add_argument("--shard", type=int, required=True, help="shard number, 0-based")
    parser.add_argument("--num-shards", type=int, required=True, help="number of shards")
    parser.add_argument("--out", required=True, help="output store, e.g. shard-0-of-8.zarr")
    parser.add_argument("--split", default="train", help="split of the image table to embed (default train)")
    parser.add_argument("--image-ids", default=None, help="optional text file of image ids to keep (one per line)")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding worker processes")

    def run(args):
        from umtfss.config import load

        cfg = load(args.config)["embedding"]
        check_outputs_apart({"--out": args.out}, {"--images": [args.images]})
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers is {args.workers}, expected 0 (decode in this process) or more")
        from umtfss.backbones import build_backbone

        backbone = build_backbone(cfg["backbone"], checkpoint=cfg["checkpoint"], checkpoint_url=cfg["checkpoint_url"],
                                  checkpoint_sha256=cfg["checkpoint_sha256"], output_stride=cfg["output_stride"],
                                  config_section="embedding")
        embed_shard(args.images, args.shard, args.num_shards, args.out, backbone, layer=cfg["layer"],
                    image_size=cfg["image_size"], dtype=cfg["dtype"], dim=cfg["dim"], batch_size=cfg["batch_size"],
                    device=cfg["device"], amp=cfg["amp"], cpu_precision=cfg["cpu_precision"], split=args.split,
                    image_filter=_read_id_list(args.image_ids) if args.image_ids else None, workers=args.workers)

    return run
