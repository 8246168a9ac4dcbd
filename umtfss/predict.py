"""`umtfss predict`: segment query images (files or whole folders) from K support images and masks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from umtfss.devices import CPU_PRECISIONS, channels_last_input, inference_autocast, lay_out_for_precision
from umtfss.episode import IGNORE, binary_mask
from umtfss.evaluation.feature_cache import takes_features
from umtfss.transforms import resize_pad, unpad_to, valid_pixels

MIN_SIZE, MAX_SIZE = 32, 4096  # a test size beyond 4096 px asks for canvases no machine here holds
MANY_VALUES = 64  # distinct values in a support mask beyond which it is no class map but shades (photo, JPEG)


def read_support_mask(path: str | Path, class_id: int | None = None,
                      note: Callable[[str], None] | None = None) -> np.ndarray:
    """A support mask file as uint8 0/1/255 (see as_support_mask); RGB(A) masks are reduced by their
    brightest channel. With `class_id`, a class-index mask (a benchmark's or datasets.custom's) read as
    that class against the rest. Without it, `note` gets class_index_note's line for a single-channel
    mask that looks like class indices (its classes are merged into one foreground)."""
    from umtfss.io import ImageReadError, read_label, read_rgb

    try:
        values = read_label(path)
    except ImageReadError:
        if class_id is not None:
            raise ValueError(f"support mask '{path}' is not a single-channel class-index PNG, which a support "
                             f"class ({class_id}) needs") from None
        values, colour = read_rgb(path).max(axis=2), True  # colour-coded masks: any lit channel is foreground
        if not values.any() and _drawn_in_alpha(path):
            raise ValueError(f"support mask '{path}' is black where it is opaque and holds its shape only in the "
                             "alpha channel (transparency), which is not read as the mask; expected a 0/255 PNG: "
                             "save its alpha channel as one (PIL: Image.open(f).getchannel('A').save('mask.png'))")
    else:
        colour = False
    if class_id is None and note is not None and (line := class_index_note(path, values, colour=colour)):
        note(line)
    return as_support_mask(values, class_id)


def _drawn_in_alpha(path: str | Path) -> bool:
    """Whether the image's alpha channel varies (some pixels opaque, some not): a mask drawn as transparency."""
    from PIL import Image

    with Image.open(path) as image:
        if "A" not in image.getbands():
            return False
        low, high = image.getchannel("A").getextrema()
    return low != high


def class_index_note(path: str | Path, values: np.ndarray, shown: int = 12, colour: bool = False) -> str | None:
    """A line for a mask with several values besides 0 and 255: likely class indices (or, `colour`, an RGB
    mask's brightest channel), which without a support class all count as one foreground, silently; or, with
    very many values, a photo or lossy JPEG given as a mask. None for 0/255 and 0/1/255 masks."""
    distinct = np.unique(values)
    if np.count_nonzero((distinct > 0) & (distinct != IGNORE)) < 2:
        return None
    if len(distinct) > MANY_VALUES or Path(path).suffix.lower() in (".jpg", ".jpeg"):  # shades, not classes
        share = np.count_nonzero((values > 0) & (values != IGNORE)) / values.size
        ignored = np.count_nonzero(values == IGNORE) / values.size
        return (f"support mask '{path}' holds {len(distinct)} distinct values, like a photo or a JPEG-compressed mask, "
                f"not a mask: every nonzero value but 255 is read as foreground ({share:.0%} of its pixels) and 255 as "
                f"ignore ({ignored:.0%}); expected a lossless 0/255 (or 0/1/255) PNG mask")
    listed = ", ".join(str(int(v)) for v in distinct[:shown]) + (f", ... ({len(distinct)} values)"
                                                                   if len(distinct) > shown else "")
    if colour:
        return (f"support mask '{path}' is a colour image whose brightest channel holds the values {listed}: every "
                "lit pixel is read as one foreground; to pick one class, convert it to a class-index PNG and give "
                "--support-class K")
    return (f"support mask '{path}' holds the values {listed}: every nonzero value but 255 is read as one "
            "foreground; if they are class indices, give the class with --support-class K")


def as_support_mask(values: np.ndarray, class_id: int | None = None) -> np.ndarray:
    """uint8 0/1/255 from an HxW array: nonzero = foreground, 255 = ignore.

    A 0/255 mask (its only nonzero value is 255, e.g. one written by `umtfss predict`) counts as
    0/1: its 255 is foreground, not ignore. With `class_id` (1..254), the array holds class indices:
    that class is foreground, 255 ignore, every other value background.
    """
    values = np.asarray(values)
    if class_id is not None:
        if not 1 <= class_id < IGNORE:
            raise ValueError(f"support class is {class_id}, expected a mask value from 1 to {IGNORE - 1}")
        return binary_mask(values, class_id)
    nonzero = values[values > 0]
    if nonzero.size and np.all(nonzero == IGNORE):
        return (values > 0).astype(np.uint8)
    mask = ((values > 0) & (values != IGNORE)).astype(np.uint8)
    mask[values == IGNORE] = IGNORE
    return mask


def check_support(image: np.ndarray, mask: np.ndarray, image_name: str, mask_name: str,
                  class_id: int | None = None) -> None:
    """A support mask must have its image's size and some foreground; the message names both."""
    if image.shape[:2] != mask.shape:
        raise ValueError(
            f"support mask {mask_name} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
            f"{image_name} is {image.shape[1]}x{image.shape[0]}; they must have the same size"
        )
    if not (mask == 1).any():
        what = "(nonzero, not 255)" if class_id is None else f"of support class {class_id}"
        raise ValueError(f"support mask {mask_name} has no foreground pixel {what}")


def _check_file(path: Path, what: str) -> Path:
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a folder, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    return path


def load_supports(pairs: list[tuple[str, str]], class_id: int | None = None,
                  note: Callable[[str], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) per --support pair; each mask must have its image's size and some foreground
    (pixels of `class_id` in class-index masks, when given). `note` as for read_support_mask."""
    from umtfss.io import ImageReadError, read_rgb

    supports = []
    for image_path, mask_path in pairs:
        try:
            image = read_rgb(_check_file(Path(image_path), "support image"))
        except ImageReadError as err:  # its own message does not say which argument the file is
            raise ValueError(f"support image '{image_path}' cannot be read: {err.reason}") from None
        try:
            mask = read_support_mask(_check_file(Path(mask_path), "support mask"), class_id, note)
        except ImageReadError as err:
            raise ValueError(f"support mask '{mask_path}' cannot be read: {err.reason}") from None
        check_support(image, mask, f"'{image_path}'", f"'{mask_path}'", class_id)
        supports.append((image, mask))
    return supports


def draw_supports(tables_dir: str | Path, class_id: int, shots: int, split: str = "train",
                  seed: int = 0) -> list[tuple[str, str]]:
    """(image, mask) paths of `shots` images of a prepared data set (`umtfss prepare`'s tables) where the
    class is present, drawn with `seed` from the split's images in table order."""
    from umtfss.data.prepare import read_tables
    from umtfss.evaluation.sampler import class_image_lists

    tables = read_tables(tables_dir)
    names = dict(zip(tables.classes["class_id"].astype(int), tables.classes["name"].astype(str)))
    if class_id not in names:
        raise ValueError(f"support class {class_id} is not a class of the tables in '{tables_dir}'; their classes: "
                         + ", ".join(f"{c} {n}" for c, n in sorted(names.items())))
    present = class_image_lists(tables.image_classes, [class_id], split)[class_id]
    images = tables.images[(tables.images["split"] == split) & tables.images["image_id"].isin(present)]
    if len(images) < shots:
        raise ValueError(f"class {class_id} ({names[class_id]}) is present in {len(images)} {split} image(s) of "
                         f"'{tables_dir}', fewer than the {shots} support(s) asked for")
    picked = np.sort(np.random.default_rng(seed).choice(len(images), shots, replace=False))
    return [(str(images["image_path"].iloc[i]), str(images["label_path"].iloc[i])) for i in picked]  # usable from here


def support_tensors(supports: list[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, 3, size, size] images and [K, size, size] masks (0/1, 255 on ignore and padding), resized and
    padded as the queries are."""
    images, masks = [], []
    for image, mask in supports:
        image_t, mask_t, _ = resize_pad(image, mask, size)
        images.append(image_t)
        masks.append(mask_t.float())  # 0/1, 255 = ignore or padding
    return torch.stack(images), torch.stack(masks)


@torch.no_grad()
def backbone_features(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The frozen backbone's outputs that the model reads, for images [N,3,S,S] on the model's device."""
    outputs = model.backbone(images)
    return {name: outputs[name] for name in model.backbone_layers}


@torch.no_grad()
def predict_masks(model, queries: list[np.ndarray], support_images: torch.Tensor, support_masks: torch.Tensor,
                  size: int, device="cpu", cpu_precision: str = "float32",
                  support_features: dict[str, torch.Tensor] | None = None) -> list[np.ndarray]:
    """Foreground 0/1 uint8 masks of several queries (one forward pass), each at its query's own size.

    `cpu_precision` 'bfloat16' runs a CPU forward in bfloat16 autocast (the model laid out by
    devices.lay_out_for_precision); elsewhere the forward is float32. The supports are the same for
    every query, so a model with a frozen backbone (takes_features) runs it on them once, not once per
    query; `support_features` (backbone_features of the supports, under the same autocast) saves even
    that across calls.
    """
    device = torch.device(device)
    prepared = [resize_pad(query, None, size) for query in queries]
    batch = channels_last_input(torch.stack([query_t for query_t, _, _ in prepared]).to(device), cpu_precision)
    query_valid = valid_pixels([extent for _, _, extent in prepared], size)
    images = support_images[None].expand(len(queries), *support_images.shape).to(device)
    masks = support_masks[None].expand(len(queries), *support_masks.shape).to(device)
    with inference_autocast(device, False, cpu_precision):
        features = {}
        if takes_features(model):
            if support_features is None:
                support_features = backbone_features(model, support_images.to(device))
            shared = {name: t[None].expand(len(queries), *t.shape).flatten(0, 1) for name, t in support_features.items()}
            features = {"features": (backbone_features(model, batch), shared)}
        logits = model(batch, images, masks, query_valid.to(device), **features).float()
    if logits.shape[-2:] != (size, size):
        logits = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return [unpad_to(logits[row].cpu(), valid, query.shape[:2]).argmax(0).numpy().astype(np.uint8)
            for row, ((_, _, valid), query) in enumerate(zip(prepared, queries))]


def predict_mask(model, query: np.ndarray, supports: list[tuple[np.ndarray, np.ndarray]], size: int,
                 device="cpu") -> np.ndarray:
    """Foreground 0/1 uint8 mask at the query's own size (resize longer side to `size`, pad, unpad back)."""
    return predict_masks(model, [query], *support_tensors(supports, size), size, device)[0]


def query_plan(queries: list[Path], out: Path, overlay: Path | None) -> list[tuple[Path, Path, Path | None]]:
    """(query image, mask file, overlay file or None) for each image of the --query files and folders.

    One query file and `out` not an existing folder: `out` (and `overlay`) are the files themselves.
    Otherwise they are folders: a folder's images (searched recursively) keep their relative path,
    loose files their name, with .png.
    """
    from umtfss.data.folder import scan_image_folder
    from umtfss.io import IMAGE_SUFFIXES

    single = len(queries) == 1 and not queries[0].is_dir() and not out.is_dir()  # an existing folder takes the mask
    if single:
        for option, path in (("--out", out), ("--overlay", overlay)):
            if path is not None and path.suffix.lower() != ".png":
                raise ValueError(f"{option} '{path}' does not end in .png, but predict writes a PNG there for the "
                                 "one query; expected a file name ending in .png (or an existing folder)")
        return [(_check_file(queries[0], "query image"), out, overlay)]
    for option, path in (("--out", out), ("--overlay", overlay)):
        if path is not None and (path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES):
            raise ValueError(f"{option} '{path}' is a file name, but the queries are {len(queries)} path(s) "
                             "including a folder or several files; expected a folder to write one PNG per query into")
    named: dict[Path, Path] = {}
    for query in queries:
        if query.is_dir():
            scanned = scan_image_folder(query, "--query")  # as the folder source: hidden files skipped, links once
            found, names = list(scanned.values()), [Path(f"{image_id}.png") for image_id in scanned]
        else:
            found, names = [_check_file(query, "query image")], [Path(query.name).with_suffix(".png")]
        for path, name in zip(found, names):
            if name in named:
                raise ValueError(f"query images '{named[name]}' and '{path}' would both write '{name}'; "
                                 "rename one or predict them separately")
            named[name] = path
    return [(path, out / name, overlay / name if overlay is not None else None) for name, path in named.items()]


def check_outputs(plan: list[tuple[Path, Path, Path | None]], supports: list[tuple[str, str]], out: Path,
                  overlay: Path | None, query_folders: list[Path] = (), support_option: str = "--support") -> None:
    """Refuse, before any work, a plan that would write over what it reads: a mask or overlay file that is a
    query image, a support image or mask, an --overlay that is --out, an --out or --overlay folder that is
    a --query folder (its next run would read the masks as queries). Paths are compared resolved."""
    from umtfss.io import check_output_paths

    inputs = {Path(query).resolve(): ("--query image", query) for query, _, _ in plan}
    for image, mask in supports:
        inputs.setdefault(Path(image).resolve(), (f"{support_option} image", image))
        inputs.setdefault(Path(mask).resolve(), (f"{support_option} mask", mask))
    folders = {Path(folder).resolve(): folder for folder in query_folders}
    for option, path in (("--out", out), ("--overlay", overlay)):
        if path is None:
            continue
        if path.resolve() in folders:
            raise ValueError(f"{option} '{path}' is the --query folder '{folders[path.resolve()]}'; predict would "
                             "write its masks among the query images: expected another folder")
        inside = next((folders[parent] for parent in path.resolve().parents if parent in folders), None)
        if inside is not None:
            raise ValueError(f"{option} '{path}' is inside the --query folder '{inside}'; the next run on that folder "
                             "would segment the PNGs written there as query images: expected a folder outside it")
    for _, mask, overlay_file in plan:  # under a file (also a subfolder of --out): mkdir would fail after the work
        check_output_paths({"--out": mask, "--overlay": overlay_file})
    if overlay is not None and overlay.resolve() == out.resolve():
        raise ValueError(f"--overlay '{overlay}' is --out '{out}'; each overlay would replace its mask: "
                         "expected another path")
    masks = {}
    for _, mask_file, overlay_file in plan:
        for option, path in (("--out", mask_file), ("--overlay", overlay_file)):
            if path is None:
                continue
            resolved, given = path.resolve(), out if option == "--out" else overlay
            writes = "is" if path == given else f"would write '{path}' over"  # one query: the file itself
            if resolved in inputs:
                what, source = inputs[resolved]
                raise ValueError(f"{option} '{given}' {writes} the {what} '{source}'; expected an output path "
                                 "apart from the inputs")
            if option == "--out":
                masks[resolved] = path
            elif resolved in masks:
                raise ValueError(f"--overlay '{overlay}' {writes} the mask of --out '{out}'; each overlay would "
                                 "replace a mask: expected another path")


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the foreground tinted red (for a quick look)."""
    tinted = image.astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    tinted[mask == 1] = (1 - alpha) * tinted[mask == 1] + alpha * red
    return tinted.round().clip(0, 255).astype(np.uint8)


def cli(parser: argparse.ArgumentParser):
    """Arguments of `umtfss predict`."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by umtfss train")
    parser.add_argument("--backbone-checkpoint", type=Path, metavar="PATH",
                        help="the frozen backbone's weights, when the model.checkpoint file recorded at training "
                             "is not at its path here (a model checkpoint holds only the trained weights)")
    parser.add_argument("--support", action="append", nargs=2, metavar=("IMAGE", "MASK"),
                        help="a support image and its mask PNG (nonzero = foreground); repeat for K shots")
    parser.add_argument("--support-class", type=int, metavar="K",
                        help="the masks are class-index PNGs (a benchmark's, datasets.custom's): class K is the "
                             "foreground, 255 ignore, every other value background")
    parser.add_argument("--support-from", type=Path, metavar="TABLES",
                        help="instead of --support: draw the supports from a prepared labelled data set "
                             "(results/<dataset>/prepare), --shots images where --support-class is present")
    parser.add_argument("--shots", type=int, default=1, help="supports drawn by --support-from (default 1)")
    parser.add_argument("--support-split", default="train", help="split --support-from draws from (default train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --support-from draw (default 0)")
    parser.add_argument("--query", required=True, action="append", type=Path,
                        help="image to segment, or a folder of images (searched recursively); repeatable")
    parser.add_argument("--out", required=True, type=Path,
                        help="output mask PNG (0/255, the query's size); a folder when --query is a folder or repeated")
    parser.add_argument("--size", type=int, help="test size (default: the checkpoint's evaluation.test_size when its "
                                                 "training config set one, else the crop it was trained at)")
    parser.add_argument("--overlay", type=Path, help="also write the query with the mask tinted red (file or folder, as --out)")
    parser.add_argument("--batch", type=int, default=8, help="queries per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--cpu-precision", default="float32", choices=CPU_PRECISIONS,
                        help="forward on a CPU in float32 (default) or bfloat16 autocast (about 3x faster with a "
                             "ResNet-50 on CPUs with AMX; masks may differ at the boundary)")
    return run


def check_size(size: int) -> None:
    """The test size must give the model a few feature cells and still fit in memory."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size is {size}, expected {MIN_SIZE} to {MAX_SIZE} (pixels of the longer side)")


def run(args: argparse.Namespace) -> Path:
    import sys

    from umtfss.progress import tqdm

    from umtfss.io import ImageReadError, read_rgb, write_png
    from umtfss.training.checkpoint import load, load_model, test_size
    from umtfss.devices import resolve_device

    checkpoint = _check_file(args.checkpoint, "checkpoint")
    if args.batch < 1:
        raise ValueError(f"--batch is {args.batch}, expected at least 1")
    if args.size is not None:
        check_size(args.size)
    plan = query_plan(list(args.query), args.out, args.overlay)
    if (args.support is None) == (args.support_from is None):
        raise ValueError("give the supports with --support IMAGE MASK (repeatable) or draw them with --support-from "
                         "TABLES --support-class K, not both")
    if args.support_from is not None:
        if args.support_class is None:
            raise ValueError("--support-from draws the images where a class is present: give it with --support-class K")
        if args.shots < 1:
            raise ValueError(f"--shots is {args.shots}, expected at least 1")
        args.support = draw_supports(args.support_from, args.support_class, args.shots, args.support_split, args.seed)
        print("umtfss predict: supports " + ", ".join(image for image, _ in args.support), file=sys.stderr)
    check_outputs(plan, args.support, args.out, args.overlay, [query for query in args.query if query.is_dir()],
                  "--support" if args.support_from is None else "--support-from")
    supports = load_supports(args.support, args.support_class,
                             lambda line: print(f"umtfss predict: note: {line}", file=sys.stderr))
    size = args.size
    if size is None:
        size, source = test_size(load(checkpoint))
        print(f"umtfss predict: size {size} ({source} of the checkpoint; --size to change)", file=sys.stderr)
        check_size(size)
    device = resolve_device(args.device, "--device")
    model = lay_out_for_precision(load_model(checkpoint, device, args.backbone_checkpoint), device, args.cpu_precision, "predict")
    torch.manual_seed(0)  # a model that draws at inference (model.hash_draw per_call) predicts the same each run
    support_images, support_masks = support_tensors(supports, size)
    shared = None  # the supports' backbone features, computed once for every query batch
    if takes_features(model):
        with inference_autocast(device, False, args.cpu_precision):
            shared = backbone_features(model, channels_last_input(support_images.to(device), args.cpu_precision))
    bar = tqdm(total=len(plan), desc="predict", unit="img", file=sys.stderr, disable=len(plan) == 1)
    unreadable = []  # (path, reason): one damaged file of a large folder does not stop the others
    for start in range(0, len(plan), args.batch):
        chunk, queries = [], []
        for entry in plan[start:start + args.batch]:
            try:
                queries.append(read_rgb(entry[0]))
            except ImageReadError as err:
                if len(plan) == 1:
                    raise ValueError(f"--query image '{entry[0]}' cannot be read: {err.reason}") from None
                unreadable.append((entry[0], err.reason))
                bar.write(f"umtfss predict: skipped --query image '{entry[0]}': {err.reason}", file=sys.stderr)
                continue
            chunk.append(entry)
        masks = predict_masks(model, queries, support_images, support_masks, size, device, args.cpu_precision,
                              shared) if queries else []
        for (_, out, overlay_path), query, mask in zip(chunk, queries, masks):
            write_png(out, (mask * 255).astype(np.uint8))
            if overlay_path is not None:
                write_png(overlay_path, overlay(query, mask))
        bar.update(len(plan[start:start + args.batch]))
    bar.close()
    if unreadable:
        path, reason = unreadable[0]
        raise ValueError(f"{len(unreadable)} of {len(plan)} --query images cannot be read and have no mask, the first "
                         f"'{path}' ({reason}); the other {len(plan) - len(unreadable)} masks are written under "
                         f"'{args.out}'")
    return args.out
