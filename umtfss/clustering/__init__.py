"""Pixel clustering (paper Eq. 3-4): k-means centroids on a pixel subset, then nearest-centroid labels."""

from __future__ import annotations

from pathlib import Path


def check_output_folders(outputs: dict, files: bool = False) -> None:
    """Refuse, before any work, an output (option -> path) whose folder path runs through a file, and
    with `files` an output file that is an existing folder.

    Both would fail only at the end, after the work (minutes of k-means or candidate ranking), the
    first with FileExistsError, which the command line does not turn into one line naming the option.
    """
    for option, path in outputs.items():
        if files and Path(path).is_dir():
            raise IsADirectoryError(f"{option} '{path}' is a folder; expected the path of a file "
                                    "(the folder is left as it is)")
        for parent in Path(path).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(f"{option} '{path}': '{parent}' is a file, expected a folder "
                                             "(or a path that does not exist yet)")
                break
