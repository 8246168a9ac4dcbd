"""Checkpoint files: find or download once, verify the SHA-256, load safely, check keys strictly."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

# Where downloaded checkpoints are kept; UMTFSS_CACHE overrides it.
DEFAULT_CACHE_DIR = Path(os.environ.get("UMTFSS_CACHE", Path.home() / ".cache" / "umtfss"))

# Keys that wrap the weights in the checkpoint formats we read, in the order they are preferred
# (DINO keeps both networks; its teacher is the one evaluated in the paper).
WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")
_LISTED = 10


# (resolved path, size, mtime_ns) -> digest: a checkpoint is verified and then recorded, read once
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints need little memory."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def verify_sha256(path: str | Path, expected: str | None) -> str:
    """Return the file's SHA-256; raise ValueError when it does not start with `expected`.

    `expected` may be a full digest or a prefix of at least 8 hex digits (torchvision publishes
    the first 8 in its file names).
    """
    actual = sha256_file(path)
    if expected is None:
        return actual
    expected = expected.strip().lower()
    if not _HEX.match(expected):
        raise ValueError(
            f"checkpoint_sha256 '{expected}' for '{path}' is not a SHA-256 digest; "
            "expected 8 to 64 hexadecimal digits"
        )
    if not actual.startswith(expected):
        raise ValueError(
            f"checkpoint '{path}' has SHA-256 {actual}, expected {expected}: the file is not the "
            "published checkpoint (a different release, a partial download, or a wrong path); "
            "replace the file or correct checkpoint_sha256"
        )
    return actual


def _download(url: str, target: Path) -> None:
    """Download `url` into `target` through a temporary sibling, so a broken transfer leaves nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    try:
        torch.hub.download_url_to_file(url, tmp_name, progress=True)
        os.replace(tmp_name, target)
    except Exception as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise ValueError(
            f"could not download checkpoint {url} into '{target}' ({type(err).__name__}: {err}); "
            "on a machine without internet, download it elsewhere and set the checkpoint path "
            "in the config"
        ) from None


def resolve_checkpoint(
    path: str | Path | None,
    url: str | None,
    sha256: str | None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The local checkpoint file to load: `path` if given, else `url` downloaded once into the cache.

    The SHA-256 (full or prefix) is verified in both cases when given.
    """
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint file '{local}' does not exist")
        verify_sha256(local, sha256)
        return local
    if not url:
        raise ValueError("no checkpoint: give a local checkpoint path or a checkpoint_url")
    name = Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"checkpoint_url '{url}' does not end in a file name")
    cached = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / name
    if not cached.is_file():
        _download(url, cached)
    verify_sha256(cached, sha256)
    return cached


def load_state_dict(path: str | Path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)`: tensors and plain containers only, plus
    argparse.Namespace (a bag of values that DINO's and MoCo's training scripts save as 'args')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated, garbage or unsafe files
        raise ValueError(
            f"checkpoint '{path}' could not be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "expected a file written by torch.save holding tensors (it may be truncated or not a "
            "PyTorch checkpoint)"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"checkpoint '{path}' holds a {type(loaded).__name__}, expected a dict of tensors (a state dict)"
        )
    return dict(loaded)


def unwrap_state_dict(checkpoint: Mapping, path: str | Path, prefixes=("module.", "backbone.")) -> dict:
    """The flat parameter dict inside a training checkpoint, with wrapper prefixes removed.

    Picks the first of WRAPPER_KEYS that holds a dict (repeatedly, for nested wrappers), then strips
    any of `prefixes` from the front of every key (DDP's `module.`, DINO's `backbone.`).
    """
    weights: Mapping = checkpoint
    while True:
        inner = next((weights[k] for k in WRAPPER_KEYS if isinstance(weights.get(k), Mapping)), None)
        if inner is None:
            break
        weights = inner
    flat = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. epoch counters stored beside the weights
        stripped = _strip_prefixes(str(key), prefixes)
        flat[stripped] = value
    if not flat:
        raise ValueError(
            f"checkpoint '{path}' holds no tensors (top-level keys: {sorted(map(str, checkpoint))[:_LISTED]}); "
            "expected a state dict"
        )
    return flat


def _strip_prefixes(key: str, prefixes) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return f"{len(keys)} {label}: {shown}{more}"


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str | Path) -> None:
    """Copy `state_dict` into `module`; every key and shape must match exactly.

    On a mismatch raises ValueError naming the checkpoint `name` and listing the missing,
    unexpected and wrongly shaped keys (the first 10 of each, with counts).
    """
    expected = module.state_dict()
    given = len(state_dict)
    state_dict = dict(state_dict)
    for key in expected:
        # BatchNorm's batch counter is not a weight (frozen backbones never use it), and checkpoints
        # saved before PyTorch 0.4.1 (or stripped of it) do not have it: keep the module's own
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = expected[key]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = [
            _listing(label, keys)
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys with a wrong shape (checkpoint vs model)", wrong_shape),
            )
            if keys
        ]
        raise ValueError(
            f"checkpoint '{name}' does not fit {type(module).__name__} "
            f"({len(expected)} tensors expected, {given} given): " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)
