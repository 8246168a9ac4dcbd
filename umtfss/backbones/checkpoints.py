"""Checkpoint files: find or download once, verify the SHA-256, load safely, check keys strictly."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
from torch import nn

from umtfss.io import first_line
from umtfss.progress import tqdm

# Where downloaded checkpoints are kept; UMTFSS_CACHE overrides it.
def default_cache_dir() -> Path:
    """Where downloads go: $UMTFSS_CACHE, read at each download (a notebook may set it late), else ~/.cache/umtfss."""
    return Path(os.environ.get("UMTFSS_CACHE") or Path.home() / ".cache" / "umtfss")

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


def config_key(section: str | None, key: str) -> str:
    """How a message names a config key: 'embedding.checkpoint' when the section is known."""
    return f"'{section}.{key}'" if section else f"'{key}'"


def _expected_digest(expected: str | None, path: str | Path, section: str | None = None) -> str | None:
    if expected is None:
        return None
    expected = expected.strip().lower()
    if not _HEX.match(expected):
        raise ValueError(
            f"{config_key(section, 'checkpoint_sha256')} '{expected}' for '{path}' is not a SHA-256 digest; "
            "expected 8 to 64 hexadecimal digits"
        )
    return expected


def verify_sha256(path: str | Path, expected: str | None, section: str | None = None, *,
                  source: str | None = None) -> str:
    """Return the file's SHA-256; raise ValueError when it does not start with `expected`.

    `expected` may be a full digest or a prefix of at least 8 hex digits (torchvision publishes
    the first 8 in its file names). `source` is the URL a cached file was downloaded from.
    """
    expected = _expected_digest(expected, path, section)
    actual = sha256_file(path)
    if expected is None or actual.startswith(expected):
        return actual
    sha_key = config_key(section, "checkpoint_sha256")
    if source is not None:
        # a cached download: it was verified (or unpinned) when downloaded, so the pin or the file changed
        remedy = f"delete '{path}' to download {source} again, or correct {sha_key}"
        what = f"the cached download of {source}"
    else:
        remedy = f"replace the file or correct {sha_key}"
        what = f"{config_key(section, 'checkpoint')}"
    raise ValueError(
        f"checkpoint '{path}' ({what}) has SHA-256 {actual}, expected {expected} ({sha_key}): the file is "
        f"not the pinned checkpoint (a different release, a partial download, or a wrong path); {remedy}"
    )


_URL_SCHEMES = ("http", "https", "ftp", "file")


def _source_record(cached: Path) -> Path:
    """The hidden file beside a download naming the URL it came from."""
    return cached.with_name(f".{cached.name}.url")


def cache_path(url: str, cache_dir: str | Path | None = None, section: str | None = None) -> Path:
    """Where `url` is (or will be) cached: `<cache>/<file name>`, unless that file came from another URL.

    Two URLs ending in the same name (two runs' `checkpoint.pth`) must not share one cached file: the
    second goes to `<cache>/by-url/<hash of the URL>/<name>`. A file with no record (put there by hand,
    or by an older umtfss) is taken as the URL's.
    """
    parsed = urlparse(url)
    if parsed.scheme.lower() not in _URL_SCHEMES:
        raise ValueError(
            f"{config_key(section, 'checkpoint_url')} is '{url}', which is not a URL (expected http://, "
            f"https:// or file://); for a file on this machine set {config_key(section, 'checkpoint')} to its path"
        )
    name = Path(parsed.path).name
    if not name:
        raise ValueError(f"{config_key(section, 'checkpoint_url')} '{url}' does not end in a file name")
    root = Path(cache_dir or default_cache_dir()).expanduser()
    cached = root / name
    record = _source_record(cached)
    if cached.exists() and record.is_file() and record.read_text().strip() != url:
        cached = root / "by-url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    return cached


def _download(url: str, target: Path, expected: str | None, section: str | None = None) -> None:
    """Download `url` into `target` through a temporary sibling that is checked before it is renamed.

    A transfer that stops early (fewer bytes than announced) or a digest other than `expected`
    leaves nothing in the cache, even when interrupted (Ctrl-C), so a rerun downloads again.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    advice = ("on a machine without internet, download it elsewhere and set the checkpoint path in the "
              f"config ({config_key(section, 'checkpoint')})")
    try:
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(handle, "wb") as out, urlopen(Request(url, headers={"User-Agent": "umtfss"}),
                                                         timeout=60) as response:
                announced = response.headers.get("Content-Length")
                print(f"downloading {url} to '{target}'", file=sys.stderr)
                total = int(announced) if announced is not None and announced.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=f"download {target.name}") as bar:
                    while block := response.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
                        bar.update(len(block))
        except (OSError, ValueError, HTTPException) as err:  # URLError, HTTPError, timeouts are OSErrors
            raise ValueError(
                f"could not download checkpoint {url} into '{target}' ({type(err).__name__}: {err}); {advice}"
            ) from None
        if announced is not None and announced.isdigit() and size != int(announced):
            raise ValueError(
                f"the download of checkpoint {url} stopped after {size} of {announced} bytes; nothing was "
                f"kept in '{target.parent}': run again, or {advice}"
            )
        actual = digest.hexdigest()
        if expected is not None and not actual.startswith(expected):
            raise ValueError(
                f"checkpoint {url} downloaded with SHA-256 {actual}, expected {expected} "
                f"({config_key(section, 'checkpoint_sha256')}): the URL serves another file (a new release, "
                f"or an error page); nothing was kept in '{target.parent}'; correct "
                f"{config_key(section, 'checkpoint_url')} or {config_key(section, 'checkpoint_sha256')}"
            )
        os.replace(tmp, target)
        try:
            _source_record(target).write_text(url + "\n")
        except OSError:
            pass  # the file is verified and in place; without the record it is taken as this URL's
        stat = target.stat()
        _DIGESTS[(str(target.resolve()), stat.st_size, stat.st_mtime_ns)] = actual
    finally:
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(
    path: str | Path | None,
    url: str | None,
    sha256: str | None,
    cache_dir: str | Path | None = None,
    section: str | None = None,
) -> Path:
    """The local checkpoint file to load: `path` if given, else `url` downloaded once into the cache.

    The SHA-256 (full or prefix) is verified in both cases when given; a download is verified
    before it enters the cache. `section` ('embedding', 'model') names the config keys in messages.
    """
    if path is not None:
        local = Path(path).expanduser()
        key = config_key(section, "checkpoint")
        if local.is_dir():
            inside = sorted(p.name for p in local.iterdir() if p.name.endswith((".pth", ".pt", ".tar", ".bin")))
            found = f" (it holds {', '.join(inside[:5])})" if inside else ""
            raise IsADirectoryError(f"{key} is '{local}', a folder{found}; expected the checkpoint file itself")
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint file '{local}' ({key}) does not exist")
        verify_sha256(local, sha256, section)
        return local
    if not url:
        raise ValueError(
            f"no checkpoint: give a local checkpoint path ({config_key(section, 'checkpoint')}) or a "
            f"{config_key(section, 'checkpoint_url')}"
        )
    cached = cache_path(url, cache_dir, section)
    expected = _expected_digest(sha256, url, section)
    if not cached.is_file():
        _download(url, cached, expected, section)
    verify_sha256(cached, expected, section, source=url)
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
            f"checkpoint '{path}' could not be read ({type(err).__name__}: {first_line(err, 'no message')}); "
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
