"""Converters from the released annotation formats to class-mask PNGs: SBD + VOC2012, and COCO instances JSON."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from umtfss import io
from umtfss.progress import tqdm

PASCAL_CLASSES = 20
IGNORE = 255
LIST_RULES = ("reference", "trainaug")
CROWD_MODES = ("ignore", "class", "skip")
OVERLAP_ORDERS = ("annotation_order", "small_on_top")  # who wins where two objects overlap



# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _unique(ids: Iterable[str]) -> list[str]:
    """Ids in first-seen order without repeats, so lists stay stable across runs."""
    return list(dict.fromkeys(ids))


def _read_ids(path: Path, what: str) -> list[str]:
    """One image id per line (blank lines and a byte-order mark ignored); `what` names the file's role in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    return _unique(line.split()[0] for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    with io.atomic_path(path) as temp:
        temp.write_text("".join(f"{i}\n" for i in ids))


def _quoted(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _check_class_ids(mask: np.ndarray, num_classes: int, path: Path) -> None:
    """Values outside 0..C and 255 mean a wrong file (e.g. an instance mask), not a class mask."""
    bad = np.unique(mask[(mask > num_classes) & (mask != IGNORE)])
    if bad.size:
        raise ValueError(f"mask '{path}' holds values {bad[:10].tolist()}, expected class ids 0..{num_classes} "
                         f"or {IGNORE} (ignore)")


# --------------------------------------------------------------------------------------------
# PASCAL VOC2012 + SBD -> SegmentationClassAug
# --------------------------------------------------------------------------------------------

def read_sbd_mat(path: str | Path) -> np.ndarray:
    """The class mask of an SBD `cls/<id>.mat` (struct GTcls, field Segmentation) as uint8 HxW.

    SBD stores it dense or, in some releases, as a sparse matrix; both are accepted. A missing,
    unreadable or differently structured file raises an error that names it.
    """
    from scipy.io import loadmat
    from scipy.sparse import issparse

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SBD mask file '{path}' does not exist")
    try:
        data = loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as err:  # scipy raises several types for truncated or non-MATLAB files
        raise ValueError(f"SBD mask file '{path}' is not a readable MATLAB file ({err})") from None
    gt = data.get("GTcls")
    if gt is None:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"SBD mask file '{path}' has no 'GTcls' struct (variables: {found or 'none'}); "
                         f"expected an SBD cls/<id>.mat file")
    if isinstance(gt, np.ndarray) and gt.dtype == object and gt.size == 1:
        gt = gt.item()
    segmentation = getattr(gt, "Segmentation", None)
    if segmentation is None:
        raise ValueError(f"SBD mask file '{path}': struct 'GTcls' has no field 'Segmentation'")
    if issparse(segmentation):
        segmentation = segmentation.toarray()
    mask = np.asarray(segmentation)
    if mask.ndim != 2 or mask.dtype.kind not in "uib" or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise ValueError(f"SBD mask file '{path}': 'GTcls.Segmentation' is a {mask.dtype} array of shape "
                         f"{mask.shape}, expected a 2-D integer class mask with values 0..255")
    return np.ascontiguousarray(mask, dtype=np.uint8)


def pascal_lists(voc_train: Sequence[str], voc_val: Sequence[str], sbd_train: Sequence[str],
                 sbd_val: Sequence[str], sbd_train_noval: Sequence[str] | None = None,
                 rule: str = "reference") -> tuple[list[str], list[str]]:
    """The (train, val) image lists of PASCAL-5i; val is always VOC2012 val (1,449 images).

    rule 'reference' (PFENet / CyCTR / UMTFSS): SBD `train_noval.txt` ∪ VOC train
    minus VOC val -> 5,953 images on the real data (5,623 + 1,464 - 1,134 shared), in the order of
    PFENet's `voc_sbd_merge_noduplicate.txt`: SBD's ids first, then the VOC train ids SBD lacks (the
    order matters where list order is used: `clustering.fit_mode: minibatch`). Without
    train_noval.txt it falls back to SBD train ∪ VOC train minus VOC val, which is larger.
    rule 'trainaug' (the common SegmentationClassAug list, HSNet-style): VOC train ∪ SBD train ∪
    SBD val minus VOC val -> 10,582 images. Order: first appearance in that union, no repeats;
    removing VOC val keeps meta-test images out of training.
    """
    if rule not in LIST_RULES:
        raise ValueError(f"PASCAL list rule is '{rule}', expected one of {', '.join(LIST_RULES)}")
    val = _unique(voc_val)
    if rule == "reference":
        candidates = list(sbd_train if sbd_train_noval is None else sbd_train_noval) + list(voc_train)
    else:
        candidates = list(voc_train) + list(sbd_train) + list(sbd_val)
    held_out = set(val)
    return [i for i in _unique(candidates) if i not in held_out], val


def convert_sbd(voc_root: str | Path, sbd_root: str | Path, label_dir: str | Path | None = None,
                train_list: str | Path | None = None, val_list: str | Path | None = None,
                rule: str = "reference", image_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Write SegmentationClassAug (mode-L class-id PNGs) and the train / val lists from VOC2012 + SBD.

    Inputs: `voc_root/ImageSets/Segmentation/{train,val}.txt` with palette PNGs in
    `voc_root/SegmentationClass/`, and `sbd_root/{train,val}.txt` (+ `train_noval.txt`, which rule
    'reference' needs) with `sbd_root/cls/<id>.mat`. Every image of these lists gets a mask; VOC's own mask is used
    whenever it exists (finer, and it keeps VOC's 255 boundary band), otherwise SBD's. Lists
    follow `pascal_lists(rule)`. Everything is checked before anything is written; the mask folder
    is built under a temporary name and renamed at the end, then the val and train lists are
    written (the train list last: it is the workflow's output). Re-running replaces all three.
    `image_dir`, when given, must hold `<id>.jpg` for every listed image.
    """
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    label_dir = Path(label_dir) if label_dir is not None else voc_root / "SegmentationClassAug"
    train_list = Path(train_list) if train_list is not None else voc_root / "lists" / "train_aug.txt"
    val_list = Path(val_list) if val_list is not None else voc_root / "lists" / "val.txt"
    if rule not in LIST_RULES:
        raise ValueError(f"PASCAL list rule is '{rule}', expected one of {', '.join(LIST_RULES)}")
    voc_masks, sbd_masks = voc_root / "SegmentationClass", sbd_root / "cls"
    if label_dir.resolve() == voc_masks.resolve():
        raise ValueError(f"output mask folder '{label_dir}' is VOC's own SegmentationClass folder, which it "
                         f"would replace; expected a separate folder such as SegmentationClassAug")
    if train_list.resolve() == val_list.resolve():
        raise ValueError(f"train list and val list are both '{train_list}' (config keys datasets.pascal.train_list "
                         "and datasets.pascal.val_list); expected two files, or the train list would replace the "
                         "val list")

    voc_sets = voc_root / "ImageSets" / "Segmentation"
    voc_train = _read_ids(voc_sets / "train.txt", "VOC2012 segmentation list")
    voc_val = _read_ids(voc_sets / "val.txt", "VOC2012 segmentation list")
    sbd_train = _read_ids(sbd_root / "train.txt", "SBD list")
    sbd_val = _read_ids(sbd_root / "val.txt", "SBD list")
    noval_path = sbd_root / "train_noval.txt"
    noval = _read_ids(noval_path, "SBD list") if noval_path.is_file() else None
    if rule == "reference" and noval is None:  # without it the list would be silently larger than the paper's
        raise FileNotFoundError(
            f"'{noval_path}' does not exist: the reference 5,953-image train list is SBD's train_noval.txt plus "
            "VOC train, minus VOC val. Download train_noval.txt from the SBD page into that folder (README, "
            "'Real data'), or run 'umtfss convert-sbd --rule trainaug --config ...' once for the 10,582-image "
            "list (the workflow then uses the lists it wrote)")
    train, val = pascal_lists(voc_train, voc_val, sbd_train, sbd_val, noval, rule)

    ids = _unique(voc_train + voc_val + sbd_train + sbd_val + (noval or []))
    sources: dict[str, Path] = {}
    missing = []
    for image_id in ids:
        voc_png, sbd_mat = voc_masks / f"{image_id}.png", sbd_masks / f"{image_id}.mat"
        if voc_png.is_file():
            sources[image_id] = voc_png
        elif sbd_mat.is_file():
            sources[image_id] = sbd_mat
        else:
            missing.append(image_id)
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed image(s) have neither a VOC mask in '{voc_masks}' nor an "
                                f"SBD mask in '{sbd_masks}': {_quoted(missing)}")
    if image_dir is not None:
        no_image = [i for i in _unique(train + val) if not (Path(image_dir) / f"{i}.jpg").is_file()]
        if no_image:
            raise FileNotFoundError(f"{len(no_image)} listed image(s) have no '<id>.jpg' in '{image_dir}': "
                                    f"{_quoted(no_image)}")

    io.remove_stale_temps(label_dir.parent, stem=label_dir.name)
    from_voc = 0
    with io.atomic_path(label_dir, folder=True) as temp:
        temp.mkdir()
        for image_id in tqdm(ids, desc="convert-sbd", unit="mask", file=sys.stderr, disable=not progress):
            source = sources[image_id]
            if source.suffix == ".png":
                mask = io.read_label(source)
                from_voc += 1
            else:
                mask = read_sbd_mat(source)
            _check_class_ids(mask, PASCAL_CLASSES, source)
            io.write_png(temp / f"{image_id}.png", mask)
    _write_ids(val_list, val)
    _write_ids(train_list, train)
    return {"rule": rule, "train": len(train), "val": len(val),
            "train_noval": rule == "reference" and noval is not None,
            "masks": len(ids), "from_voc": from_voc, "from_sbd": len(ids) - from_voc,
            "label_dir": str(label_dir), "train_list": str(train_list), "val_list": str(val_list)}


# --------------------------------------------------------------------------------------------
# COCO instances JSON -> per-image class masks
# --------------------------------------------------------------------------------------------

def _load_instances(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file '{path}' does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file '{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file '{path}' holds a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file '{path}' has no list '{key}', expected a COCO instances file")
    return data


def _field(record: dict, key: str, kind: str, path: Path):
    """record[key], or an error naming the file, the record and the key."""
    try:
        return record[key]
    except (KeyError, TypeError):
        ident = record.get("id", "?") if isinstance(record, dict) else "?"
        raise ValueError(f"COCO annotation file '{path}': {kind} {ident} has no '{key}'") from None


def _image_side(image: dict, key: str, path: Path) -> int:
    """image[key] (height or width) as a positive int, or an error naming the file, the image and the key."""
    value = _field(image, key, "image", path)
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not whole or value < 1:
        raise ValueError(f"COCO annotation file '{path}': image {image.get('id')} has '{key}' {value!r}, expected a "
                         "positive whole number of pixels")
    return int(value)


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray | None:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a bool HxW mask.

    Polygons with fewer than 3 points are dropped: pycocotools would read a 4-number polygon as a
    box. Returns None when nothing drawable remains.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [[float(v) for v in p] for p in segmentation
                    if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"counts": counts, "size": size}, height, width)
        else:
            rle = {"counts": counts.encode() if isinstance(counts, str) else counts, "size": size}
    else:
        raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")
    with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 copy= DeprecationWarning per call
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def convert_coco(instances_json: str | Path, label_dir: str | Path, crowd: str = "skip",
                 progress: bool = True, keep_unannotated: bool = False, overlap: str = "annotation_order") -> dict:
    """Write one class-mask PNG per annotated image of a COCO instances file: `<label_dir>/<file stem>.png`.

    Category ids (80 non-contiguous ids in COCO) map to 1..C in increasing id order, 0 is
    background. Where objects overlap, overlap 'annotation_order' lets a later annotation of the
    file paint over an earlier one (the reference code's masks, CyCTR's prepare script);
    'small_on_top' paints from the largest object to the smallest (ties by annotation id), so a
    small object lying on a big one stays visible. Crowd regions, when drawn, go first either way.
    crowd: 'skip' leaves crowd regions background (the reference code's masks, CyCTR's
    prepare script), 'ignore' paints them 255 (not scored), 'class' paints them with their class.
    Images without any annotation get no mask (the reference's 82,081 train images of 82,783; a mask
    an earlier run wrote for one is removed), or an all-zero one with keep_unannotated. Each PNG is
    written atomically; re-running overwrites.
    """
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd handling is '{crowd}', expected one of {', '.join(CROWD_MODES)}")
    if overlap not in OVERLAP_ORDERS:
        raise ValueError(f"config key 'datasets.coco.overlap' is '{overlap}', expected one of {', '.join(OVERLAP_ORDERS)}")
    path, label_dir = Path(instances_json), Path(label_dir)
    data = _load_instances(path)
    category_ids = sorted({int(_field(c, "id", "category", path)) for c in data["categories"]})
    if len(category_ids) >= IGNORE:
        raise ValueError(f"COCO annotation file '{path}' has {len(category_ids)} categories, expected at most "
                         f"{IGNORE - 1} (class ids must fit below the ignore value {IGNORE})")
    class_of = {cat: index + 1 for index, cat in enumerate(category_ids)}

    images, by_stem = {}, {}
    for image in data["images"]:
        image_id = _field(image, "id", "image", path)
        if image_id in images:
            raise ValueError(f"COCO annotation file '{path}': image id {image_id} is in 'images' twice; expected "
                             "one record per image")
        name = str(_field(image, "file_name", "image", path))
        stem = Path(name).stem
        if stem in by_stem:  # both would write <stem>.png, the second over the first
            raise ValueError(f"COCO annotation file '{path}': images {by_stem[stem][0]} ('{by_stem[stem][1]}') and "
                             f"{image_id} ('{name}') would both get the mask '{stem}.png'; expected file names "
                             "unique up to their folder and suffix")
        by_stem[stem] = (image_id, name)
        images[image_id] = (stem, *(_image_side(image, side, path) for side in ("height", "width")))
    per_image: dict = {image_id: [] for image_id in images}
    annotated = set()
    crowds = 0
    for ann in data["annotations"]:
        image_id, category = _field(ann, "image_id", "annotation", path), _field(ann, "category_id", "annotation", path)
        if image_id not in per_image:
            raise ValueError(f"COCO annotation file '{path}': annotation {ann.get('id')} refers to image {image_id}, "
                             f"which is not in 'images'")
        if category not in class_of:
            raise ValueError(f"COCO annotation file '{path}': annotation {ann.get('id')} has category_id {category}, "
                             f"expected one of the {len(category_ids)} ids in 'categories'")
        is_crowd = bool(ann.get("iscrowd", 0))
        crowds += is_crowd
        annotated.add(image_id)
        if not (is_crowd and crowd == "skip"):
            per_image[image_id].append(ann)

    io.remove_stale_temps(label_dir)
    label_dir.mkdir(parents=True, exist_ok=True)
    drawn = written = 0
    order = sorted(images, key=lambda i: images[i][0])
    for image_id in tqdm(order, desc=f"convert-coco {path.stem}", unit="img", file=sys.stderr,
                         disable=not progress):
        stem, height, width = images[image_id]
        if image_id not in annotated and not keep_unannotated:
            (label_dir / f"{stem}.png").unlink(missing_ok=True)
            continue
        layers = []
        for position, ann in enumerate(per_image[image_id]):
            segmentation = _field(ann, "segmentation", "annotation", path)
            try:
                region = _decode_segmentation(segmentation, height, width)
            except Exception as err:  # pycocotools raises bare Exceptions for malformed input
                raise ValueError(f"COCO annotation file '{path}': annotation {ann.get('id')} of image "
                                 f"'{stem}' cannot be decoded ({err})") from None
            if region is None or not region.any():
                continue
            is_crowd = bool(ann.get("iscrowd", 0))
            value = IGNORE if is_crowd and crowd == "ignore" else class_of[ann["category_id"]]
            rank = (position,) if overlap == "annotation_order" else (-int(region.sum()), ann.get("id", 0))
            layers.append(((not is_crowd, *rank), value, region))
        mask = np.zeros((height, width), dtype=np.uint8)
        for _, value, region in sorted(layers, key=lambda layer: layer[0]):
            mask[region] = value
        drawn += len(layers)
        written += 1
        io.write_png(label_dir / f"{stem}.png", mask)
    return {"images": written, "unannotated": len(images) - len(annotated), "classes": len(category_ids),
            "annotations": len(data["annotations"]), "drawn": drawn, "crowd": crowd, "crowd_annotations": crowds,
            "overlap": overlap,
            "label_dir": str(label_dir)}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def cli_sbd(parser):
    """`umtfss convert-sbd`: SegmentationClassAug and the lists from datasets.pascal (root, sbd_root)."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON (section 'datasets')")
    parser.add_argument("--rule", choices=LIST_RULES, default="reference",
                        help="train list: 'reference' (5,953 images, PFENet/CyCTR/UMTFSS) or 'trainaug' (10,582)")
    parser.add_argument("--no-progress", action="store_true")

    def run(args):
        from umtfss.config import ConfigError, load
        from umtfss.data.base import existing_root, resolve_under

        cfg = load(args.config)["datasets"]["pascal"]
        if not cfg["sbd_root"]:
            raise ConfigError("config key 'datasets.pascal.sbd_root' is null, expected the SBD "
                              "benchmark_RELEASE/dataset folder (cls/*.mat, train.txt, val.txt, train_noval.txt)")
        root = existing_root(cfg["root"], "datasets.pascal.root")
        sbd_root = existing_root(cfg["sbd_root"], "datasets.pascal.sbd_root")
        summary = convert_sbd(root, sbd_root, resolve_under(root, cfg["label_dir"]),
                              resolve_under(root, cfg["train_list"]), resolve_under(root, cfg["val_list"]),
                              rule=args.rule, image_dir=resolve_under(root, cfg["image_dir"]),
                              progress=not args.no_progress)
        print(f"convert-sbd ({summary['rule']}): {summary['masks']} masks ({summary['from_voc']} from VOC, "
              f"{summary['from_sbd']} from SBD) -> {summary['label_dir']}; train {summary['train']} images -> "
              f"{summary['train_list']}; val {summary['val']} images -> {summary['val_list']}")

    return run


def cli_coco(parser):
    """`umtfss convert-coco`: class-mask PNGs from datasets.coco.instances_dir into the label folders."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON (section 'datasets')")
    parser.add_argument("--split", choices=["train", "val", "all"], default="all", help="split(s) to convert")
    parser.add_argument("--crowd", choices=CROWD_MODES, default=None,
                        help="crowd regions: background (skip), 255 ignore, or their class; "
                             "default: datasets.coco.crowd")
    parser.add_argument("--no-progress", action="store_true")

    def run(args):
        from umtfss.config import ConfigError, load
        from umtfss.data.base import resolve_under

        cfg = load(args.config)["datasets"]["coco"]
        if not cfg["instances_dir"]:
            raise ConfigError("config key 'datasets.coco.instances_dir' is null, expected the folder holding "
                              "instances_train2014.json and instances_val2014.json")
        instances_dir, root = Path(cfg["instances_dir"]).expanduser(), Path(cfg["root"]).expanduser()
        splits = ["train", "val"] if args.split == "all" else [args.split]
        sources = {split: instances_dir / f"instances_{split}2014.json" for split in splits}
        for split, source in sources.items():  # all inputs checked before any output is written
            if not source.is_file():
                raise FileNotFoundError(f"COCO annotation file '{source}' does not exist (config key "
                                        f"datasets.coco.instances_dir is '{instances_dir}'; expected "
                                        f"instances_{split}2014.json from annotations_trainval2014.zip)")
        for split, source in sources.items():
            label_dir = resolve_under(root, cfg[f"{split}_label_dir"])
            summary = convert_coco(source, label_dir, crowd=args.crowd or cfg["crowd"], progress=not args.no_progress,
                                   keep_unannotated=cfg["keep_unannotated"], overlap=cfg["overlap"])
            print(f"convert-coco {split}: {summary['images']} masks ({summary['unannotated']} images without "
                  f"annotations {'kept' if cfg['keep_unannotated'] else 'left out'}), {summary['classes']} classes, "
                  f"{summary['drawn']} regions drawn (crowd: {summary['crowd']}, overlap: {summary['overlap']}) -> {label_dir}")

    return run
