"""A plain folder of images (searched recursively) as unlabeled training images; no labels, no folds."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from umtfss.data.base import SegmentationDataset
from umtfss.io import IMAGE_SUFFIXES, is_image_path


def scan_image_folder(folder: str | Path, key: str = "unlabeled.folder") -> dict[str, Path]:
    """image id ('sub/img': path relative to the folder, no suffix) -> file, for every image below `folder`.

    Follows symbolic links to folders (each real folder once) and files; skips hidden files and
    folders (names starting with '.', e.g. macOS '._x.jpg', '.thumbnails/'). A link to an image found
    elsewhere in the folder is used once (said on stderr); linked folders are walked after the real
    ones, so a folder's images keep its own path as id whatever the link is called. A dangling link,
    a name that is not valid UTF-8 and two files with the same id are errors naming the files.
    """
    folder = Path(folder).expanduser()
    named = f"argument {key}" if key.startswith("-") else f"config key {key}"  # predict's --query, or a config key
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"image folder '{folder}' {state} ({named})")
    paths: dict[str, Path] = {}
    by_target: dict[str, Path] = {}
    duplicates: list[tuple[Path, Path]] = []
    seen_folders: set[str] = set()
    walks = [str(folder)]  # the folder, then each linked folder met on the way
    for top, dirs, files in (entry for start in walks for entry in os.walk(start)):
        real = os.path.realpath(top)
        if real in seen_folders:  # a link loop, or a second link to the same folder
            dirs[:] = []
            continue
        seen_folders.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        walks.extend(os.path.join(top, d) for d in dirs if os.path.islink(os.path.join(top, d)))
        for name in sorted(files):
            path = Path(top) / name
            if name.startswith(".") or not is_image_path(path):
                continue
            try:
                str(path).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"image file {str(path)!r} has a name that is not valid UTF-8 (e.g. unpacked from an "
                                 "archive made on another system); rename it") from None
            if not path.exists():
                raise FileNotFoundError(f"image file '{path}' is a symbolic link to '{os.readlink(path)}', which does "
                                        "not exist; remove the link or restore its target")
            target = os.path.realpath(path)
            kept = by_target.get(target)
            if kept is None or (kept.is_symlink() and not path.is_symlink()):  # the file itself beats a link to it
                by_target[target] = path
                if kept is not None:
                    duplicates.append((kept, path))
            else:
                duplicates.append((path, kept))
    for path in by_target.values():
        image_id = path.relative_to(folder).with_suffix("").as_posix()
        if image_id in paths:
            raise ValueError(f"'{paths[image_id]}' and '{path}' have the same name up to the suffix; "
                             f"rename one, ids must be unique ({named})")
        paths[image_id] = path
    if duplicates:
        path, first = duplicates[0]
        print(f"umtfss: image folder '{folder}': {len(duplicates)} file(s) are links to images already used, e.g. "
              f"'{path}' -> '{first}'; each image is used once", file=sys.stderr)
    if not paths:
        raise ValueError(f"image folder '{folder}' holds no image ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) "
                         f"({named})")
    return dict(sorted(paths.items()))


def folder_fingerprint(folder: str | Path, key: str = "unlabeled.folder", paths: dict[str, Path] | None = None) -> str:
    """sha256 of the folder's image list (ids, sizes, modification times): it changes when an image is
    added, removed, renamed or rewritten, so the workflow reruns `prepare` and what follows. `paths`:
    the folder's scan_image_folder, when the caller has it already."""
    digest = hashlib.sha256()
    for image_id, path in (scan_image_folder(folder, key) if paths is None else paths).items():
        stat = path.stat()
        digest.update(f"{image_id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


class FolderDataset(SegmentationDataset):
    """Ids are paths relative to the folder without the suffix ('sub/img'); one split, 'train'."""

    class_names: list[str] = []
    splits = ("train",)
    config_key = "unlabeled"

    def __init__(self, cfg: dict):
        if not cfg.get("folder"):
            raise ValueError("unlabeled.folder is not set; expected the image folder when unlabeled.source is folder")
        self.folder = Path(cfg["folder"]).expanduser()
        self.name = cfg.get("name") or "images"
        self._paths: dict[str, Path] | None = None

    def _scan(self) -> dict[str, Path]:
        if self._paths is None:
            self._paths = scan_image_folder(self.folder)
        return self._paths

    def _list_ids(self, split: str) -> list[str]:
        return list(self._scan())

    def image_path(self, image_id: str, split: str) -> Path:
        self.check_split(split)
        paths = self._scan()
        if image_id not in paths:
            raise FileNotFoundError(f"image '{image_id}' is not in folder '{self.folder}' (config key unlabeled.folder)")
        return paths[image_id]

    def label_path(self, image_id: str, split: str) -> None:
        self.check_split(split)
        return None

    def read_label(self, image_id: str, split: str):
        raise ValueError(f"data set '{self.name}' is a plain image folder and has no labels")
