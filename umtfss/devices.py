"""Device choice shared by every stage: config value 'auto' means CUDA when torch sees one."""

from __future__ import annotations

import torch


def resolve_device(device: str, key: str = "device") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it, checked.

    `key` is the config key the value came from, named in the error message.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{key} = '{device}' is not a valid device; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} = '{device}', but torch sees no CUDA device (use 'auto' or 'cpu')")
    return resolved
