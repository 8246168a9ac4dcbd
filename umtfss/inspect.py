"""`umtfss inspect`: a readable summary of any artifact (Zarr store, parquet, npy, json, checkpoint), and overlays."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from umtfss.io import OutputInTheWay, atomic_path, check_output_paths, first_line, read_rgb, resolve_table_paths
from umtfss.pseudo_episodes import METADATA_KEY, resize_nearest, valid_extent
from umtfss.progress import tqdm

BAR_WIDTH = 40
NORM_SAMPLE_ROWS = 10000
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt")


def summarise(path: str | Path, n: int = 16) -> str:
    """A multi-line text summary of the artifact at `path`; the kind is told by its suffix / layout."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist")
    if path.is_dir():
        if _is_zarr(path):
            return summarise_zarr(path)
        return summarise_folder(path)
    suffix = path.suffix.lower()
    try:
        return _summarise_file(path, suffix, n)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError, RuntimeError, KeyError) as err:  # readers do not say which file they read
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"'{path}' is not a readable {suffix[1:]} file: {_reason(err)}") from None


def json_lines(value, n: int, key: str = "", depth: int = 0) -> list[str]:
    """A JSON value as indented lines; a list of plain values on one line, its first `n` items and a count
    (fit.json's objective per iteration, a list of image ids), so that a long record stays readable."""
    pad, label = "  " * depth, f"{json.dumps(key)}: " if key else ""
    if isinstance(value, dict) and value:
        return ([f"{pad}{label}{{"] + [line for k, v in value.items() for line in json_lines(v, n, str(k), depth + 1)]
                + [f"{pad}}}"])
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [f"{pad}{label}["] + [line for v in value[:n] for line in json_lines(v, n, "", depth + 1)] + (
            [f"{pad}  ... {len(value) - n} more"] if len(value) > n else []) + [f"{pad}]"]
    if isinstance(value, list) and len(value) > n:
        shown = ", ".join(json.dumps(v) for v in value[:n])
        return [f"{pad}{label}[{shown}, ... {len(value) - n} more; {len(value)} items, last {json.dumps(value[-1])}]"]
    return [f"{pad}{label}{json.dumps(value)}"]


def _reason(err: BaseException) -> str:
    """A reader's error in one line; an empty message (numpy's and torch's EOFError) says truncated."""
    text = first_line(err)
    if isinstance(err, EOFError):
        return f"it ends early, truncated or empty ({text or 'EOFError'})"
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def _summarise_file(path: Path, suffix: str, n: int) -> str:
    if suffix == ".parquet":
        return summarise_parquet(path)
    if suffix == ".npy":
        return summarise_npy(path)
    if suffix == ".json":
        return f"{path} (JSON, {_size(path.stat().st_size)})\n" + "\n".join(json_lines(json.loads(path.read_text()), n))
    if suffix in (".csv", ".tsv"):  # score tables, cluster_quality.csv, log.csv; Snakemake benchmark .tsv files
        table = pd.read_csv(path, sep="," if suffix == ".csv" else "\t")
        head = f"{path} ({suffix[1:].upper()}, {len(table)} rows, {_size(path.stat().st_size)})\n"
        from umtfss.evaluation.tables import check_score_rows, is_score_table, paper_table

        if is_score_table(table.columns):  # results/eval_<dataset>.csv: as papers print it
            check_score_rows(table, path)
            return head + paper_table(table).to_string(index=False)
        return head + table.head(n).to_string()
    if suffix in CHECKPOINT_SUFFIXES:
        return summarise_checkpoint(path)
    if suffix == ".png":
        return summarise_png(path)
    raise ValueError(f"'{path}' has suffix '{suffix}'; expected a .zarr store, .parquet, .npy, .json, .csv, .tsv, .png or "
                     f"a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")


def summarise_png(path: Path, shown: int = 12) -> str:
    """Size and mode of a PNG (a figure, an overlay, a predicted or class-index mask) and, for one channel,
    its pixel values: what a mask means depends on them (0/255, 0/1/255, class indices)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # a truncated file fails here (OSError), named by summarise
        lines = [f"{path} (PNG, {image.width}x{image.height} {image.mode}, {_size(path.stat().st_size)})"]
        if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            return "\n".join(lines)
        values = np.asarray(image)
    distinct, counts = np.unique(values, return_counts=True)
    listed = ", ".join(f"{int(v)} ({c / values.size:.1%})" for v, c in zip(distinct[:shown], counts[:shown]))
    more = f", ... ({len(distinct)} values)" if len(distinct) > shown else ""
    lines.append(f"  pixel values (share of pixels): {listed}{more}")
    return "\n".join(lines)


ARTIFACT_SUFFIXES = (".parquet", ".npy", ".json", ".csv", ".tsv", ".png", *CHECKPOINT_SUFFIXES)


def _is_zarr(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file() or path.suffix == ".zarr"


def _is_embedding_store(path: Path) -> bool:
    return path.is_dir() and (path / "features" / "zarr.json").is_file()


def _artifacts(folder: Path, seen: set[Path] | None = None) -> list[Path]:
    """The artifacts under `folder` in path order: Zarr stores (not descended into) and files of a known
    kind; a linked folder is read once (a link back up the tree ends there)."""
    seen = set() if seen is None else seen
    seen.add(folder.resolve())
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_zarr(entry):
                found.append(entry)
            elif entry.resolve() not in seen:
                found += _artifacts(entry, seen)
        elif entry.suffix.lower() in ARTIFACT_SUFFIXES:
            found.append(entry)
    return found


def one_line(path: Path) -> str:
    """The main fact of an artifact in a few words (shapes, rows, method and step), cheap to compute."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            import zarr

            from umtfss.stores import ZARR_METADATA

            if not any((path / name).is_file() for name in ZARR_METADATA):
                return "unreadable (no Zarr metadata file: not a store, or one whose writing stopped early)"
            node = zarr.open(str(path), mode="r")
            arrays = _arrays(node)
            shapes = ", ".join(f"{name or 'array'} {tuple(a.shape)} {a.dtype}" for name, a in arrays.items()
                               if name in MAIN_ARRAYS)
            images = len(node.attrs.get("image_ids", [])) if "image_ids" in node.attrs else None
            gaps = [f"'{name or 'array'}' {p} of {t} chunks present" for name, a in arrays.items()
                    for p, t in [_chunk_counts(a)] if p < t and name in MAIN_ARRAYS]
            if isinstance(node, zarr.Group):
                gaps += [f"folder '{f.name}' has no metadata" for f in _folders_without_metadata(path, arrays)]
            temp = _temp_note(path)
            return (("HALF-WRITTEN (temporary of a job) " if temp else "") + "Zarr store: "
                    + (shapes or f"{len(arrays)} arrays") + (f"; {images} images" if images is not None else "")
                    + (f"; INCOMPLETE: {', '.join(gaps)}" if gaps else ""))
        if suffix == ".parquet":
            meta = pq.ParquetFile(path).metadata
            return f"parquet: {meta.num_rows} rows x {meta.num_columns} columns"
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return f"npy: shape {array.shape}, {array.dtype}"
        if suffix == ".json":
            data = json.loads(path.read_text())
            keys = list(data)[:6] if isinstance(data, dict) else []
            return "JSON: " + (", ".join(keys) + (", ..." if len(data) > 6 else "") if keys else type(data).__name__)
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="," if suffix == ".csv" else "\t")
            return f"{suffix[1:].upper()}: {len(table)} rows; {', '.join(map(str, table.columns[:6]))}" + (
                ", ..." if len(table.columns) > 6 else "")
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return f"PNG: {image.width}x{image.height} {image.mode}"
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        facts = [f"{key} {data[key]}" for key in ("method", "epoch", "epoch_step", "step") if isinstance(data, dict) and key in data]
        return "checkpoint: " + (", ".join(facts) or "no method recorded")
    except Exception as err:  # a damaged file is listed with the reason, the others still shown
        from umtfss.stores import damaged_metadata

        bad = damaged_metadata(path)
        if bad is not None:
            return f"unreadable ('{bad[0].relative_to(path)}' is not valid JSON: {bad[1]})"
        return f"unreadable ({type(err).__name__}: {err})"


def summarise_folder(path: Path) -> str:
    """Every artifact under a results folder, one line each (kind, size on disk, main fact)."""
    artifacts = _artifacts(path)
    if not artifacts:
        raise ValueError(f"'{path}' is a folder with no artifact umtfss knows under it (Zarr stores, "
                         f"{', '.join(ARTIFACT_SUFFIXES)})")
    lines = [f"{path} (folder, {len(artifacts)} artifacts, {_size(_disk_size(path))} on disk; "
             "`umtfss inspect` on one of them for the whole summary)"]
    width = max(len(str(a.relative_to(path))) for a in artifacts)
    # a bar only when the folder is slow to read (large stores: their size on disk walks every chunk file)
    for artifact in tqdm(artifacts, desc="inspect", unit="artifact", file=sys.stderr, leave=False, delay=2):
        name = str(artifact.relative_to(path)) + ("/" if artifact.is_dir() else "")
        lines.append(f"  {name:<{width + 1}}  {_size(_disk_size(artifact)):>9}  {one_line(artifact)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------

def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(_disk_sizes(path).values())


def _disk_sizes(path: Path) -> dict[str, int]:
    """Bytes under each top-level entry of a folder ('' for its own files), in one walk: a COCO store
    holds a file per image and array, and a network disk makes every stat count."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(path):
        top = Path(root).relative_to(path).parts[:1]
        key = top[0] if top else ""
        sizes[key] = sizes.get(key, 0) + sum(os.stat(os.path.join(root, f)).st_size for f in files
                                             if os.path.isfile(os.path.join(root, f)))
    return sizes


def bars(counts: dict, label: str = "cluster") -> list[str]:
    """Text histogram lines: '  cluster 3   1234  ########'."""
    if not counts:
        return ["  (none)"]
    top = max(counts.values()) or 1
    width = max(len(str(k)) for k in counts)
    return [f"  {label} {str(k).rjust(width)} {v:>10d}  {'#' * max(1 if v else 0, round(BAR_WIDTH * v / top))}"
            for k, v in counts.items()]


def _short(value, limit: int = 200) -> str:
    if isinstance(value, list) and len(value) > 5:
        return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _norm_stats(rows: np.ndarray) -> str:
    norms = np.linalg.norm(np.asarray(rows, np.float32).reshape(len(rows), -1), axis=1)
    return f"min {norms.min():.4f}, mean {norms.mean():.4f}, max {norms.max():.4f}"


# --------------------------------------------------------------------------------------------
# Zarr
# --------------------------------------------------------------------------------------------

MAIN_ARRAYS = ("features", "labels", "refined", "")  # one chunk per image; "" is a store that is one array


def _damaged_store(path: Path, err: Exception) -> Exception:
    """A damaged metadata file named, when that is why zarr failed on `path`; else `err` itself."""
    from umtfss.stores import damaged_metadata

    bad = damaged_metadata(path)
    if bad is None:
        return err
    return ValueError(f"'{bad[0]}' is not valid JSON ({bad[1]}): the Zarr metadata of store '{path}' is damaged; "
                      "rerun the stage that wrote the store")


def _chunk_counts(array) -> tuple[int, int]:
    """(chunks present in the store, chunks of the array's grid): zarr reads a missing chunk as the fill
    value without a word, so an interrupted copy looks like a whole store."""
    return int(array.nchunks_initialized), int(array.nchunks)


def _missing_images(array, limit: int = 5) -> list[int]:
    """The first image indices (axis 0) whose chunk file is missing, for a local one-image-per-chunk array."""
    from zarr.storage import LocalStore

    if not isinstance(array.store, LocalStore) or array.chunks[0] != 1:
        return []
    folder = Path(array.store.root) / array.path
    rest = (0,) * (array.ndim - 1)
    missing = []
    for index in range(array.shape[0]):
        if not (folder / array.metadata.encode_chunk_key((index, *rest))).is_file():
            missing.append(index)
            if len(missing) == limit:
                break
    return missing


def chunk_line(name: str, array) -> str | None:
    """'chunks: N of M present' of a main array, with what the missing ones mean; other arrays only when
    chunks are missing. The stages write every chunk of features, labels and refined themselves (one
    file per image); zarr leaves out a chunk only when it equals the fill value (write_empty_chunks is
    false by default), which an image's chunk never does (every image has a valid grid cell)."""
    present, total = _chunk_counts(array)
    if present == total and name not in MAIN_ARRAYS:
        return None
    line = f"    chunks: {present} of {total} present"
    if present == total:
        return line
    missing = _missing_images(array)
    where = (f" (image{'s' if total - present > 1 else ''} {', '.join(map(str, missing))}"
             f"{', ...' if total - present > len(missing) else ''})" if missing else "")
    if name == "features":
        meaning = "they read as zeros (fill value 0), not as an error; embed writes every chunk: rerun embed"
    elif name in ("labels", "refined"):
        meaning = ("they read as -1 (all padding, no pseudo mask); assign writes every chunk (zarr would leave out "
                   "only an all-padding one): rerun assign")
    else:
        meaning = (f"they read as the fill value {array.fill_value}; zarr leaves out only a chunk equal to the "
                   "fill value, check that this is one")
    return f"{line} -- WARNING: {total - present} missing{where}: the store is incomplete, {meaning}"


def summarise_zarr(path: Path) -> str:
    """Arrays (shape, dtype, chunks, codecs, bytes on disk, chunks present), attributes, and a label
    store's cluster sizes."""
    import zarr

    from umtfss.stores import ZARR_METADATA

    if not any((path / name).is_file() for name in ZARR_METADATA):
        raise ValueError(f"'{path}' has no Zarr metadata file ({', '.join(ZARR_METADATA)}): it is not a Zarr store, or "
                         "a copy or job that stopped before writing it; rerun the stage that writes the store")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for unreadable folders
        named = _damaged_store(path, err)
        raise (named if named is not err else ValueError(f"'{path}' is not a readable Zarr store: {err}")) from None
    try:
        return _temp_note(path) + _summarise_zarr(path, node)
    except Exception as err:  # a member's metadata is read on first access
        named = _damaged_store(path, err)
        if named is err:
            raise
        raise named from None


def _temp_note(path: Path) -> str:
    """A first line for a store under atomic_path's temporary name: the output of a job still running or
    killed, never a finished one."""
    from umtfss.io import _TEMP_NAME, _process_alive

    match = _TEMP_NAME.match(path.name)
    if match is None:
        return ""
    final = path.with_name(match["stem"] + (match["suffix"] or ""))
    state = "still running" if _process_alive(int(match["pid"])) else "no longer running (killed?)"
    return (f"WARNING: '{path.name}' is the temporary of a job writing '{final.name}', process {match['pid']} {state}: "
            "a half-written store; the next run of that stage removes it\n")


def _arrays(node) -> dict:
    """The arrays of a group in name order (zarr lists them in no fixed order), zarr's warning about a
    member folder without metadata silenced: _folders_without_metadata names those."""
    import warnings

    import zarr

    if not isinstance(node, zarr.Group):
        return {"": node}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(sorted(node.arrays()))


def _folders_without_metadata(path: Path, arrays: dict) -> list[Path]:
    """Folders of a group that are no array and hold no metadata file: an array whose zarr.json was lost
    (or not yet written), which zarr leaves out without a word."""
    from umtfss.stores import ZARR_METADATA

    return [folder for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            if folder.name not in arrays and not any((folder / name).is_file() for name in ZARR_METADATA)]


def _chunk_file(array, index: int) -> str:
    """The chunk file of image `index` (axis 0) of a local array, for error lines."""
    from zarr.storage import LocalStore

    key = array.metadata.encode_chunk_key((index, *(0,) * (array.ndim - 1)))
    if isinstance(array.store, LocalStore):
        return str(Path(array.store.root) / array.path / key)
    return key


def _summarise_zarr(path: Path, node) -> str:
    import zarr

    sizes = _disk_sizes(path)
    lines = [f"{path} (Zarr v{node.metadata.zarr_format} {'group' if isinstance(node, zarr.Group) else 'array'}, "
             f"{_size(sum(sizes.values()))} on disk)"]
    arrays = _arrays(node)
    for name, array in arrays.items():
        codecs = [type(c).__name__ + _codec_detail(c) for c in getattr(array.metadata, "codecs", [])]
        stored = sizes.get(name, 0) if name else sum(sizes.values())
        raw = int(np.prod(array.shape)) * array.dtype.itemsize
        lines.append(f"  array '{name}': shape {tuple(array.shape)}, dtype {array.dtype}, chunks {tuple(array.chunks)}, "
                     f"codecs {codecs}, {_size(stored)} on disk ({_size(raw)} raw)")
        chunks = chunk_line(name, array)
        if chunks:
            lines.append(chunks)
    if isinstance(node, zarr.Group):
        lines += [f"  folder '{folder.name}': WARNING: no Zarr metadata file ({_size(_disk_size(folder))} of data): an "
                  "array whose zarr.json is lost, which zarr does not see: rerun the stage that wrote the store"
                  for folder in _folders_without_metadata(path, arrays)]
    lines.append("  attributes:")
    lines += [f"    {key}: {_short(value)}" for key, value in dict(node.attrs).items()]
    if isinstance(node, zarr.Group) and "labels" in arrays:
        sizes, unreadable = cluster_sizes(arrays["labels"])
        lines.append("  cluster sizes (grid cells over all images" + (", the unreadable ones left out):" if unreadable else "):"))
        lines += bars(sizes)
        lines += _unreadable_lines(arrays["labels"], unreadable, "assign")
    if isinstance(node, zarr.Group) and "features" in arrays and arrays["features"].shape[0]:
        lines.append(_first_norms(node, arrays))
    return "\n".join(lines)


def _unreadable_lines(array, unreadable: list[tuple[int, Exception]], stage: str, shown: int = 3) -> list[str]:
    """WARNING lines naming the first chunk files that could not be decoded, and how many there are."""
    if not unreadable:
        return []
    lines = [f"  WARNING: {len(unreadable)} image(s) of '{array.path}' cannot be read (corrupt chunk files): rerun {stage}"]
    lines += [f"    image {index}: '{_chunk_file(array, index)}': {type(err).__name__}: {err}"
              for index, err in unreadable[:shown]]
    return lines + ([f"    ... and {len(unreadable) - shown} more"] if len(unreadable) > shown else [])


def _first_norms(node, arrays: dict) -> str:
    """The feature norms line of image 0 over its valid cells, or why there is none."""
    features = arrays["features"]
    try:
        first = np.asarray(features[0])
    except Exception as err:  # a corrupt chunk: blosc's RuntimeError and others
        return f"  feature norms of image 0: not read, chunk file '{_chunk_file(features, 0)}' is corrupt ({type(err).__name__}: {err})"
    rows = np.asarray(node["valid"][0]) if "valid" in arrays else first.shape[:2]
    cells = first[: int(rows[0]), : int(rows[1])].reshape(-1, first.shape[-1])
    if not len(cells):  # `valid` is written last: a store that a killed embed job left has none yet
        return f"  feature norms of image 0: none, 'valid' gives it {int(rows[0])}x{int(rows[1])} cells"
    return f"  feature norms of image 0 (valid cells): {_norm_stats(cells)}"


def _codec_detail(codec) -> str:
    detail = [f"{k}={getattr(codec, k)}" for k in ("cname", "clevel", "level") if getattr(codec, k, None) is not None]
    return f"({', '.join(str(d).replace('BloscCname.', '') for d in detail)})" if detail else ""


CLUSTER_SIZE_BATCH = 256  # label images read at once (a few MB at most)


def cluster_sizes(labels) -> tuple[dict[int, int], list[tuple[int, Exception]]]:
    """Grid cells per cluster id (padding -1 excluded), streamed image by image, without the images whose
    chunk cannot be decoded; and those, as (index, error), for the summary to name."""
    from umtfss.stores import read_images

    total = np.zeros(0, np.int64)
    unreadable = []

    def add(cells: np.ndarray) -> None:
        nonlocal total
        counts = np.bincount(cells[cells >= 0].astype(np.int64))
        if counts.size > total.size:
            total = np.pad(total, (0, counts.size - total.size))
        total[: counts.size] += counts

    images = labels.shape[0]
    with tqdm(total=images, desc="cluster sizes", unit="img", disable=images < 200) as bar:
        for start in range(0, images, CLUSTER_SIZE_BATCH):
            stop = min(start + CLUSTER_SIZE_BATCH, images)
            try:  # the stores' parallel chunk reader: about 4x zarr's image by image on a 10,000-image store
                add(read_images(labels, start, stop).ravel())
            except Exception:  # a missing or corrupt chunk in this batch: image by image, to name it
                for index in range(start, stop):
                    try:
                        add(np.asarray(labels[index]).ravel())  # a missing chunk reads as padding (-1)
                    except Exception as err:  # a corrupt chunk file: blosc's RuntimeError and others
                        unreadable.append((index, err))
            bar.update(stop - start)
    return {int(k): int(v) for k, v in enumerate(total)}, unreadable


# --------------------------------------------------------------------------------------------
# parquet, npy, checkpoints
# --------------------------------------------------------------------------------------------

def summarise_parquet(path: Path) -> str:
    """Rows, columns and dtypes, recorded parameters, and region / candidate statistics when present."""
    file = pq.ParquetFile(path)
    schema = file.schema_arrow
    lines = [f"{path} (parquet, {file.metadata.num_rows} rows, {file.metadata.num_row_groups} row groups, "
             f"{_size(path.stat().st_size)})", "  columns:"]
    lines += [f"    {field.name}: {field.type}" for field in schema]
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw:
        lines.append("  umtfss metadata:")
        lines += [f"    {key}: {_short(value)}" for key, value in json.loads(raw).items()]
    names = set(schema.names)
    if {"cluster", "area"} <= names:
        clusters = file.read(columns=["cluster"]).column("cluster").to_numpy()
        lines.append("  regions per cluster:")
        lines += bars({int(k): int(v) for k, v in zip(*np.unique(clusters, return_counts=True))})
    if "num_candidates" in names:
        counts = file.read(columns=["num_candidates"]).column("num_candidates").to_numpy()
        if counts.size:
            lines.append(f"  candidate-list lengths: min {counts.min()}, median {np.median(counts):.0f}, mean {counts.mean():.1f}, "
                         f"max {counts.max()}; {(counts == 0).sum()} regions without candidates")
    return "\n".join(lines)


def summarise_npy(path: Path) -> str:
    """Shape, dtype and (for float arrays) row norms of the first rows."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    lines = [f"{path} (npy, shape {array.shape}, dtype {array.dtype}, {_size(path.stat().st_size)})"]
    if np.issubdtype(array.dtype, np.floating) and array.size:
        rows = array[:NORM_SAMPLE_ROWS] if array.ndim > 1 else array[None]
        lines.append(f"  row norms (first {len(rows)} rows): {_norm_stats(rows)}")
    return "\n".join(lines)


def summarise_checkpoint(path: Path) -> str:
    """Keys (tensor shapes, state-dict sizes), step / epoch and the recorded config of a torch checkpoint."""
    import torch

    from umtfss.training.checkpoint import _load_failure

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types, some with no message
        raise ValueError(f"'{path}' is not a checkpoint loadable with weights_only=True: {_load_failure(err)}") from None
    lines = [f"{path} (torch checkpoint, {_size(path.stat().st_size)})"]
    if not isinstance(data, dict):
        return "\n".join(lines + [f"  {_describe_value(data)}"])
    for key, value in data.items():
        if key == "config":
            continue
        lines.append(f"  {key}: {_describe_value(value)}")
    if "config" in data:
        lines.append("  config:")
        lines += ["    " + line for line in json.dumps(data["config"], indent=2, default=str).splitlines()]
    return "\n".join(lines)


def _describe_value(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if tensors:
            return f"dict of {len(value)} entries, {len(tensors)} tensors, {sum(t.numel() for t in tensors):,} values"
        return _short(value)
    return _short(value)


# --------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------

def cluster_colours(clusters: int) -> np.ndarray:
    """uint8 [clusters, 3] distinct, deterministic colours (golden-ratio hues)."""
    import colorsys

    hues = (np.arange(clusters) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95 - 0.25 * (i % 2))]
                     for i, h in enumerate(hues)], np.uint8).reshape(-1, 3)


def overlay_image(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An image with its labels (grid or refined; valid part resized nearest to the image size) blended in colour."""
    vh, vw = valid_extent(labels)
    if vh == 0:
        return image
    cells = resize_nearest(labels[:vh, :vw], image.shape[:2]).astype(np.int64)
    coloured = colours[cells % len(colours)].astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + coloured * alpha).round().astype(np.uint8)


def ground_truth_colours() -> np.ndarray:
    """uint8 [256, 3] colours of class ids: background 0 dark grey, ignore 255 white, classes as clusters."""
    colours = cluster_colours(256)
    colours[0], colours[255] = (64, 64, 64), (255, 255, 255)
    return colours


def write_overlay(label_store: str | Path, images_table: str | Path, out: str | Path, n: int = 16,
                  tile: int = 192, ground_truth: bool = False) -> Path:
    """A PNG grid of the first n images of a label store with their pseudo masks (the refined ones when the
    store has them) coloured by cluster; with `ground_truth`, each beside its labelled classes (for a look
    only: the colours of clusters and classes do not correspond). An image without a label gets a grey tile."""
    from umtfss.io import read_label
    from umtfss.stores import LabelStore

    store = _open_reader(LabelStore, label_store)
    if len(store) == 0:
        raise ValueError(f"label store '{label_store}' holds no image (a shard of a folder with fewer images than "
                         "embedding.shards); inspect another shard")
    shown, paths, labels_of = _images_of_store(store, images_table, n, f"'{label_store}'", label_paths=ground_truth)
    colours = cluster_colours(max(store.clusters, 1))
    truth_colours = ground_truth_colours()
    grid = TileGrid(len(shown), 2 if ground_truth else 1, tile)  # tiles per image: pseudo masks (+ truth)
    for slot, index in enumerate(tqdm(shown, desc="overlay", unit="img", file=sys.stderr, disable=len(shown) < 32)):
        image_id = store.image_ids[index]
        image = read_rgb(paths[image_id])
        labels = store.refined(index) if store.has_refined else store.labels(index)  # refined: image resolution
        grid.paste(overlay_image(image, labels, colours), slot, 0)
        if ground_truth:
            label_path = labels_of[image_id]
            truth = read_label(label_path).astype(np.int64) if isinstance(label_path, str) and label_path else None
            if truth is not None and truth.shape != image.shape[:2]:
                raise ValueError(f"label '{label_path}' is {truth.shape[1]}x{truth.shape[0]}, its image "
                                 f"'{paths[image_id]}' {image.shape[1]}x{image.shape[0]}")
            grid.paste(overlay_image(image, truth, truth_colours) if truth is not None
                       else np.full_like(image, 96), slot, 1)
    return grid.save(out)


class TileGrid:
    """A near-square grid of images, `width` tiles side by side per image, each fitted into tile x tile."""

    def __init__(self, images: int, width: int, tile: int):
        from PIL import Image

        self.width, self.tile = width, tile
        self.columns = math.ceil(math.sqrt(images))
        rows = math.ceil(images / self.columns)
        self.canvas = Image.new("RGB", (self.columns * width * tile, rows * tile), (32, 32, 32))

    def paste(self, array: np.ndarray, slot: int, position: int) -> None:
        from PIL import Image

        picture = Image.fromarray(array)
        scale = self.tile / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST)
        x = ((slot % self.columns) * self.width + position) * self.tile
        self.canvas.paste(picture, (x, (slot // self.columns) * self.tile))

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        with atomic_path(out) as temp:
            self.canvas.save(temp, format="PNG")
        return out


IMAGE_COLUMNS = ("image_id", "image_path")


def check_images_table(images_table: str | Path, label_paths: bool = False) -> list[str]:
    """The columns an overlay reads from the images table, after checking that the file is a parquet
    table that has them (the prepare stage's images.parquet, not another table)."""
    path = Path(images_table)
    if path.is_dir():
        raise ValueError(f"images table '{path}' (--images) is a folder, expected a parquet file "
                         "(the prepare stage's images.parquet)")
    if not path.is_file():
        raise FileNotFoundError(f"images table '{path}' does not exist")
    try:
        present = pq.read_schema(path).names
    except Exception as err:  # truncated or not parquet: pyarrow's error does not name the file
        raise ValueError(f"images table '{path}' is not a readable parquet file: {err}") from None
    missing = [c for c in IMAGE_COLUMNS if c not in present]
    if missing:
        raise ValueError(f"images table '{path}' lacks column(s) {missing}; expected {', '.join(IMAGE_COLUMNS)} "
                         f"(the prepare stage's images.parquet; it has {', '.join(present) or 'none'})")
    if label_paths and "label_path" not in present:
        raise ValueError(f"images table '{path}' has no column label_path, needed for the ground truth "
                         f"(it has {', '.join(present)})")
    return list(IMAGE_COLUMNS) + (["label_path"] if label_paths else [])


def _open_reader(reader, path: str | Path):
    """A store reader of umtfss.stores on `path`, a damaged metadata file named when that is why it failed."""
    try:
        return reader([path])
    except ValueError as err:
        named = _damaged_store(Path(path), err)
        if named is err:
            raise
        raise named from None


def _read_images_table(images_table: str | Path, columns: list[str]) -> pd.DataFrame:
    """`columns` of the images table, its relative image and label paths usable from here."""
    try:
        table = pd.read_parquet(images_table, columns=columns)
    except Exception as err:  # a damaged row group: pyarrow's error does not name the file
        raise ValueError(f"images table '{images_table}' is not a readable parquet file: {err}") from None
    return resolve_table_paths(table, images_table)


def check_overlay_apart(overlay: str | Path, images_table: str | Path, config: str | None = None) -> None:
    """Refuse an --overlay path that is (the same file, through a link or not) the images table, the
    --config file, or an image or label file the table lists: the overlay would replace it. Only an
    existing file can be one of them, so a new path costs nothing; the table's files are each checked
    (not only the n the overlay shows: any is a file of the data set)."""
    out = Path(overlay)
    try:
        target = out.stat()
    except OSError:  # nothing there (or a dangling link): it is no file the overlay reads
        return
    inputs = [(f"--images '{images_table}'", images_table)]
    if config is not None and Path(config).is_file():  # --config may be inline JSON
        inputs.append((f"--config '{config}'", config))
    columns = [c for c in ("image_path", "label_path") if c in pq.read_schema(images_table).names]
    table = _read_images_table(images_table, columns)
    for column in columns:
        kind = column.split("_")[0]
        inputs += [(f"{kind} '{p}' listed in --images '{images_table}'", p) for p in table[column].unique()
                   if isinstance(p, str) and p]
    for named, path in inputs:
        try:
            same = os.path.samestat(target, os.stat(path))
        except OSError:  # a missing image: the overlay names it if it is shown
            continue
        if same:
            raise OutputInTheWay(f"--overlay '{overlay}' is the same file as {named}; writing the overlay would "
                                 "replace it: give another path")


def _images_of_store(store, images_table: str | Path, n: int, what: str, label_paths: bool = False
                     ) -> tuple[list[int], dict[str, str], dict[str, object]]:
    """The first n image indices of a store that the images table holds, the table's image paths and,
    with `label_paths`, its label paths (else an empty dict)."""
    if n < 1:
        raise ValueError(f"n is {n}; expected >= 1 image in the overlay")
    table = _read_images_table(images_table, check_images_table(images_table, label_paths)).drop_duplicates("image_id")
    ids = table["image_id"].astype(str)
    paths = dict(zip(ids, table["image_path"].astype(str)))
    labels_of = dict(zip(ids, table["label_path"])) if label_paths else {}
    shown = [i for i, image_id in enumerate(store.image_ids) if image_id in paths][:n]
    if not shown:
        raise ValueError(f"none of the images of {what} is in the images table '{images_table}'")
    return shown, paths, labels_of


PCA_SAMPLE_CELLS = 20000


def feature_colours(cells: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """uint8 [h, w, 3] per [h, w, C] feature grid: the first three principal components of all the grids'
    cells as RGB, each stretched between its 1st and 99th percentile (one projection for all, so equal
    colours mean similar features across images)."""
    flat = np.concatenate([c.reshape(-1, c.shape[-1]) for c in cells]).astype(np.float32)
    rng = np.random.default_rng(seed)
    sample = flat[rng.choice(len(flat), min(len(flat), PCA_SAMPLE_CELLS), replace=False)]
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    basis = vt[:3].T
    if basis.shape[1] < 3:  # fewer than 3 channels or cells: pad with zeros
        basis = np.pad(basis, ((0, 0), (0, 3 - basis.shape[1])))
    projected = (sample - mean) @ basis
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    span = np.where(high > low, high - low, 1.0)
    out = []
    for grid in cells:
        values = (grid.reshape(-1, grid.shape[-1]).astype(np.float32) - mean) @ basis
        rgb = np.clip((values - low) / span, 0, 1) * 255
        out.append(rgb.round().astype(np.uint8).reshape(*grid.shape[:2], 3))
    return out


def write_feature_overlay(embedding_store: str | Path, images_table: str | Path, out: str | Path, n: int = 16,
                          tile: int = 192) -> Path:
    """A PNG grid of the first n images of an embedding store, each beside its features' first three
    principal components as colours (the look DINO papers give features): what the clustering will see."""
    from umtfss.stores import EmbeddingStore

    store = _open_reader(EmbeddingStore, embedding_store)
    if len(store) == 0:
        raise ValueError(f"embedding store '{embedding_store}' holds no image; inspect another shard")
    shown, paths, _ = _images_of_store(store, images_table, n, f"'{embedding_store}'")
    grids = []
    for index in tqdm(shown, desc="overlay features", unit="img", file=sys.stderr, disable=len(shown) < 32):
        rows, cols = store.valid(index)
        grids.append(np.asarray(store.features(index))[:rows, :cols])
    empty = [store.image_ids[index] for index, cells in zip(shown, grids) if cells.size == 0]
    if empty:  # embed writes `valid` last: a store whose job stopped gives every image 0x0 cells
        raise ValueError(f"embedding store '{embedding_store}' gives image(s) {', '.join(empty[:5])} no valid cell "
                         "(array 'valid' is 0x0 there): the store is incomplete; rerun embed")
    grid = TileGrid(len(shown), 2, tile)
    pairs = zip(shown, feature_colours(grids))
    for slot, (index, colours) in enumerate(tqdm(pairs, desc="overlay", unit="img", file=sys.stderr,
                                                 total=len(shown), disable=len(shown) < 32)):
        image = read_rgb(paths[store.image_ids[index]])
        grid.paste(image, slot, 0)
        grid.paste(resize_nearest(colours, image.shape[:2]), slot, 1)
    return grid.save(out)


def check_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that would be ignored or fail only after the summary is printed."""
    if args.n < 1:
        raise ValueError(f"--n is {args.n}; expected >= 1 (images in the overlay / table rows shown)")
    if not args.overlay:
        if args.ground_truth:
            raise ValueError("--ground-truth applies to the overlay; add --overlay OUT.png (and --images images.parquet)")
        return
    if not args.images:
        raise ValueError("--overlay needs --images images.parquet to find the image files")
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist")
    if not (path.is_dir() and _is_zarr(path)):
        raise ValueError(f"--overlay draws a label or embedding store; '{path}' is not a Zarr store")
    if _is_embedding_store(path) and args.ground_truth:
        raise ValueError("--ground-truth applies to label stores; an embedding store's overlay shows "
                         "each image beside its features' principal components")
    out = Path(args.overlay)
    if out.is_dir():
        raise ValueError(f"--overlay '{args.overlay}' is a folder, expected the path of a PNG file to write")
    if out.suffix.lower() != ".png":  # PNG bytes under another name, or over another artifact (centroids.npy)
        raise ValueError(f"--overlay '{args.overlay}' does not end in .png, but inspect writes a PNG there; "
                         "expected a file name ending in .png")
    check_output_paths({"--overlay": args.overlay})
    check_images_table(args.images, label_paths=args.ground_truth)
    check_overlay_apart(args.overlay, args.images, args.config)


def cli(parser: argparse.ArgumentParser):
    """`umtfss inspect PATH`: print the summary; `--overlay OUT.png` renders a label store's pseudo masks."""
    parser.add_argument("path", help="a Zarr store, parquet, npy, json, csv or checkpoint file, or a folder of them")
    parser.add_argument("--config", default=None, help="YAML file or inline JSON (optional; no key is read)")
    parser.add_argument("--overlay", default=None, help="write a PNG grid: images with their pseudo masks (label "
                        "stores) or beside their features' first 3 principal components as colours (embedding stores)")
    parser.add_argument("--images", default=None, help="images.parquet, needed by --overlay")
    parser.add_argument("--ground-truth", action="store_true",
                        help="--overlay: each image's labelled classes beside its pseudo masks (label_path of --images)")
    parser.add_argument("--n", type=int, default=16, help="images in the overlay, table rows and JSON list items shown (default 16)")

    def run(args: argparse.Namespace) -> None:
        if args.config is not None:
            from umtfss.config import load

            load(args.config)
        check_options(args)  # before the summary, which can be long
        print(summarise(args.path, n=args.n))
        if args.overlay:
            if _is_embedding_store(Path(args.path)):
                written = write_feature_overlay(args.path, args.images, args.overlay, n=args.n)
            else:
                written = write_overlay(args.path, args.images, args.overlay, n=args.n, ground_truth=args.ground_truth)
            print(f"overlay written to {written}")

    return run
