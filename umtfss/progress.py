"""Progress bars: tqdm's, except that TQDM_DISABLE=1 turns off every one, also those a stage asks for."""

from __future__ import annotations

import os

from tqdm import tqdm as _tqdm


def bars_off() -> bool:
    """Whether TQDM_DISABLE is set to a true value (tqdm itself reads it only for bars given no `disable`)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    """tqdm.tqdm, disabled under TQDM_DISABLE=1 whatever `disable` the caller passed."""

    def __init__(self, *args, **kwargs):
        if bars_off():
            kwargs["disable"] = True
        super().__init__(*args, **kwargs)
