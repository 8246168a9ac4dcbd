"""Image and label I/O that accepts what real folders hold, and atomic output paths."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes read as images everywhere (folder scans, converters); compared case-insensitively.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

# PIL refuses images over ~179 megapixels (decompression-bomb guard); UMTFSS_MAX_IMAGE_PIXELS sets
# another limit for trusted folders of huge images (0 = none).
_PIXEL_LIMIT_READ = False


def _apply_pixel_limit() -> None:
    """Set PIL's limit from UMTFSS_MAX_IMAGE_PIXELS before the first image is opened; read there, not
    at import, so that a bad value is an error naming the variable, not a traceback of an import."""
    global _PIXEL_LIMIT_READ
    if _PIXEL_LIMIT_READ:
        return
    text = os.environ.get("UMTFSS_MAX_IMAGE_PIXELS", "").strip()
    if text:
        try:
            limit = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"environment variable UMTFSS_MAX_IMAGE_PIXELS is '{text}', expected a pixel count "
                             "such as 300000000 (0 = no limit)") from None
        Image.MAX_IMAGE_PIXELS = limit if limit > 0 else None
    _PIXEL_LIMIT_READ = True


_TOO_LARGE = ("larger than PIL's decompression-bomb limit; if the file is trusted, set the environment variable "
              "UMTFSS_MAX_IMAGE_PIXELS to a higher pixel count (0 = no limit)")

# EXIF orientations that swap height and width (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(ValueError):
    """An image or label file exists but cannot be decoded; the message names the path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{path}': {reason}")

    def __reduce__(self):  # keeps (path, reason) when raised in a worker process
        return (type(self), (self.path, self.reason))


def first_line(error: BaseException | str, default: str = "") -> str:
    """The first non-blank line of an error's text (or of a text), stripped, for a one-line message:
    readers' errors run over lines (torch's advice, tracebacks); `default` when there is none (the
    EOFError of an empty file has no text)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), default)


def is_image_path(path: str | Path) -> bool:
    """True when the file name ends in one of IMAGE_SUFFIXES (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _open_image(path: str | Path) -> Iterator[Image.Image]:
    """Open and fully decode the first frame; decoding failures become ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file '{path}' does not exist")
    _apply_pixel_limit()
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"{_TOO_LARGE} ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(path, f"not a readable image ({err})") from None
    try:
        with image:
            try:
                image.seek(0)  # multi-page TIFF / animated files: the first frame
                image.load()
            except (OSError, ValueError, SyntaxError, EOFError) as err:
                raise ImageReadError(path, f"corrupt or truncated image data ({err})") from None
            yield image
    finally:
        image.close()


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF blocks are ignored, as viewers do
        return 1


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """16/32-bit integer and float grayscale -> uint8, by the value range of the format.

    Integer images are mapped from 0..65535 (16-bit range; values beyond are clipped), float images
    from 0..1 when they lie in it, otherwise min-max stretched. A fixed range keeps brightness
    comparable across the images of a folder, which a per-image stretch would not.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        else:
            scaled = (values - low) / max(high - low, 1e-12) * 255.0
    else:
        scaled = values / 257.0  # 65535 -> 255
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = _high_depth_to_uint8(image)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # composited on black: pixels hidden by alpha carry no colour (cut-outs have junk under alpha 0)
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:4] / 255.0)
        return rgb.round().astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """Any supported image file as uint8 HxWx3 RGB, upright.

    Grayscale (1, L), palette (P), CMYK, YCbCr -> RGB by PIL; alpha (RGBA, LA, PA, P with a
    transparent index) is composited on black; 16-bit (I;16, I) from 0..65535, float (F) from 0..1
    or min-max; multi-page TIFF: the first page. The EXIF orientation is applied (as OpenCV's
    imread does in the reference code), so `image_size` gives the same height and width.
    Raises FileNotFoundError for a missing file and ImageReadError for one that cannot be decoded.
    """
    with _open_image(path) as image:
        try:
            if _exif_orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            rgb = _to_rgb_array(image)
        except (OSError, ValueError) as err:
            raise ImageReadError(path, f"cannot convert mode {image.mode} to RGB ({err})") from None
    return _writable(rgb)


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array callers may modify (PIL hands out read-only buffers)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return array if array.flags.writeable else array.copy()


def _header_size(path: str | Path, kind: str, exif: bool) -> tuple[int, int]:
    """(height, width) from the file header only (no decoding); `exif` applies the EXIF rotation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file '{path}' does not exist")
    _apply_pixel_limit()
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif and _exif_orientation(image) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"{_TOO_LARGE} ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(path, f"not a readable image ({err})") from None
    return int(height), int(width)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as read_rgb returns it, from the header only (no decoding)."""
    return _header_size(path, "image", exif=True)


def label_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a label file from its header (labels are never EXIF-rotated)."""
    return _header_size(path, "label", exif=False)


def read_label(path: str | Path) -> np.ndarray:
    """A class-index mask as uint8 HxW (0 background, 1..C classes, 255 ignore).

    Palette PNGs (VOC SegmentationClass) keep their indices, not their colours; 16-bit masks are
    accepted when every value fits in 0..255; a 1-bit mask is 0 / 1 (background / class 1, not 0 / 255,
    which would be all ignore). Colour-coded RGB masks are rejected: they need a conversion to class
    indices first.
    """
    with _open_image(path) as image:
        mode = image.mode
        if mode == "1":
            values = np.asarray(image).astype(np.uint8)
        elif mode in ("P", "L"):
            values = np.asarray(image)
        elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            values = np.asarray(image, dtype=np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise ImageReadError(path, f"label values span {values.min()}..{values.max()}, expected 0..255")
        else:
            raise ImageReadError(
                path, f"label image has mode {mode}; expected a single-channel class-index PNG (L or P)")
    return _writable(values)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def voc_palette() -> list[tuple[int, int, int]]:
    """The 256-entry PASCAL VOC colour map (index 255 is the cream boundary colour)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= ((code >> 0) & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
        palette.append((red, green, blue))
    return palette


def _flat_palette(palette) -> list[int]:
    flat = np.asarray(palette, dtype=np.int64).reshape(-1)
    if flat.size % 3 or flat.size > 768 or flat.min(initial=0) < 0 or flat.max(initial=0) > 255:
        raise ValueError(f"palette must hold at most 256 RGB triples in 0..255, got {flat.size} values")
    return flat.tolist() + [0] * (768 - flat.size)


def write_png(path: str | Path, array: np.ndarray, palette: Sequence | np.ndarray | None = None) -> None:
    """Write uint8 HxW (grayscale, or palette indices when `palette` is given) or HxWx3 RGB, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png('{path}'): array dtype is {array.dtype}, expected uint8")
    if array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array))  # mode L
        if palette is not None:
            image.putpalette(_flat_palette(palette))  # mode P, same indices
    elif array.ndim == 3 and array.shape[2] == 3:
        if palette is not None:
            raise ValueError(f"write_png('{path}'): a palette needs a HxW index array, got shape {array.shape}")
        image = Image.fromarray(np.ascontiguousarray(array))  # mode RGB
    else:
        raise ValueError(f"write_png('{path}'): array shape is {array.shape}, expected HxW or HxWx3")
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


# --------------------------------------------------------------------------------------------
# CSV tables
# --------------------------------------------------------------------------------------------

def read_csv_table(path: str | Path, what: str, columns: Sequence[str], expected: str):
    """A CSV table the stages wrote, checked: a file (not a folder), readable as CSV, holding `columns`.
    `what` names the table and `expected` says where it comes from, in the errors."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a folder, expected a CSV file ({expected})")
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist (expected {expected})")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} '{path}' is not a CSV file ({err}); expected {expected}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} '{path}' lacks column(s) {', '.join(missing)}; expected {expected} "
                         f"({', '.join(columns)}; it has {', '.join(map(str, table.columns)) or 'none'})")
    return table


# --------------------------------------------------------------------------------------------
# paths in tables
# --------------------------------------------------------------------------------------------

TABLE_PATH_COLUMNS = ("image_path", "label_path")


def resolve_table_paths(frame, table_file: str | Path):
    """`frame` (an image table) with relative image_path / label_path usable from any folder.

    The workflow writes them relative to the folder it ran in (the one holding results/), so a stage run
    alone from elsewhere would not find them. When the first path is not found from here, the nearest
    folder above `table_file` from which it is found becomes their base. Paths found from here, and
    absolute ones, are left as they are (the workflow's own tables are unchanged)."""
    columns = [c for c in TABLE_PATH_COLUMNS if c in frame.columns]
    first = next((str(p) for c in columns for p in frame[c] if isinstance(p, str) and p), None)
    if first is None or Path(first).is_absolute() or Path(first).exists():
        return frame
    base = next((folder for folder in Path(table_file).resolve().parents if (folder / first).exists()), None)
    if base is None:
        return frame  # missing from everywhere: the reader names the file
    frame = frame.copy()
    for column in columns:
        frame[column] = frame[column].map(lambda p: str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p)
    return frame


# --------------------------------------------------------------------------------------------
# atomic outputs
# --------------------------------------------------------------------------------------------

def _temp_sibling(path: Path) -> Path:
    """`name.tmp-XXXXXXXX.suffix` next to `path`: same suffix, so writers that check it still work."""
    token = f"tmp-{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f"{path.stem}.{token}{path.suffix}" if path.suffix else f"{path.name}.{token}")


# atomic_path's temporary names: `<stem>.tmp-<pid>-<8 hex>[<suffix>]`.
_TEMP_NAME = re.compile(r"^(?P<stem>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>\.[^.]*)?$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, stem: str | None = None) -> int:
    """Delete temporaries that a killed run left in `folder` (only those of processes no longer alive).

    A killed job (SIGKILL, out of memory, a scheduler's time limit) cannot clean up its temporary
    sibling; the next writer of the same output removes it. COCO readers list every PNG in a label
    folder, so a leftover `x.tmp-123-abcd0123.png` would otherwise become an image id. `stem`
    restricts the clean-up to temporaries of one output name.
    """
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match or (stem is not None and match["stem"] != stem) or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(temp: Path, final: Path) -> None:
    """Move `temp` onto `final`; an existing directory is moved aside first and deleted after."""
    if final.is_dir() and not final.is_symlink():
        trash = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, trash)
        os.replace(temp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, final)  # atomic for files, also over an existing file


class OutputInTheWay(ValueError):
    """An output path names something that replacing it would destroy (a folder of files, an input)."""


def _check_replaceable(final: Path, folder: bool, marker: str | None) -> None:
    """Refuse, before any work, to replace what is not an earlier output of the same kind."""
    if folder and final.exists() and not final.is_dir():
        raise OutputInTheWay(f"output '{final}' is a file; expected a folder path (the file is left as it is)")
    if not folder and final.is_dir():
        raise OutputInTheWay(f"output '{final}' is a folder; expected the path of a file (the folder is left as it is)")
    if folder and marker and final.is_dir() and not (final / marker).exists() and any(final.iterdir()):
        raise OutputInTheWay(f"output '{final}' is a folder without '{marker}', so not an earlier output of this "
                             "stage; writing would replace it, so it is left as it is: give another path")


def check_output_paths(outputs: dict[str, str | Path | None], kind: str | None = None) -> None:
    """Refuse, before any work, an output (option -> path) whose folder path runs through a file: its mkdir
    would fail only after the work. `kind` 'file' also refuses an existing folder at the path, 'folder'
    an existing file (each left as it is)."""
    for option, given in outputs.items():
        if given is None:
            continue
        path = Path(given).expanduser()
        if kind == "file" and path.is_dir():
            raise OutputInTheWay(f"{option} '{given}' is a folder; expected the path of a file (the folder is left as it is)")
        if kind == "folder" and (path.exists() or path.is_symlink()) and not path.is_dir():
            raise OutputInTheWay(f"{option} '{given}' is a file; expected a folder (the file is left as it is)")
        blocking = next((parent for parent in path.parents if parent.exists() or parent.is_symlink()), None)
        if blocking is not None and not blocking.is_dir():
            raise OutputInTheWay(f"{option} '{given}': '{blocking}' is a file, not a folder to write into")


def check_outputs_apart(outputs: dict[str, str | Path], inputs: dict[str, str | Path | Sequence]) -> None:
    """Refuse an output that is an input or another output: the rename would replace it (named by option)."""
    seen: dict[Path, str] = {}
    for option, given in inputs.items():
        for path in ([given] if isinstance(given, (str, Path)) else given):
            seen.setdefault(Path(path).resolve(), option)
    for option, path in outputs.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise OutputInTheWay(f"{option} '{path}' is also {seen[resolved]}; writing it would replace that: "
                                 "give another path")
        seen[resolved] = option


@contextlib.contextmanager
def atomic_path(path: str | Path, sweep: bool = False, folder: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` on success, delete it on error.

    The caller creates the file (or, with `folder`, the directory) at the yielded path. A killed job
    thus never leaves a half-written output under the final name. An existing output of the same
    kind at `path` is replaced; a folder where a file goes, a file where a folder goes, and a
    non-empty folder without the file `marker` (e.g. 'features/zarr.json': a store of that kind) are refused before any work.
    `sweep` first deletes the temporaries of `path` that killed processes left behind (a scan of the
    folder: meant for big outputs such as stores, not for one file among thousands).
    """
    final = Path(path)
    _check_replaceable(final, folder, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale_temps(final.parent, stem=final.stem if final.suffix else final.name)
    temp = _temp_sibling(final)
    try:
        yield temp
    except BaseException:
        if temp.exists() or temp.is_symlink():
            _remove(temp)
        raise
    if not (temp.exists() or temp.is_symlink()):
        raise FileNotFoundError(f"nothing was written to the temporary path '{temp}' for '{final}'")
    _replace(temp, final)


def fingerprint(paths: Sequence[str | Path], extra: dict | None = None) -> str:
    """SHA-256 identity of a job's inputs, so that a stale resume state is never mistaken for this run's.

    A file counts by its content; a directory (a Zarr store) by its metadata files (zarr.json: shapes,
    codecs and attributes such as the centroids' hash) and the number and total size of its files,
    which stays cheap for stores of 10^5 chunks. `extra` (JSON-able) adds what is not in a file.
    """
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for path in map(Path, paths):
        digest.update(f"\0{path.name}\0".encode())
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp")
            digest.update(f"{len(files)} {sum(p.stat().st_size for p in files)}".encode())
            for meta in (p for p in files if p.name == "zarr.json"):
                digest.update(str(meta.relative_to(path)).encode() + meta.read_bytes())
        elif path.is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            raise FileNotFoundError(f"input '{path}' does not exist")
    return digest.hexdigest()
