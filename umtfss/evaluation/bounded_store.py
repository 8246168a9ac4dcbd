"""The least-recently-used store, bounded in bytes, behind the meta-test's caches (backbone features, test images)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

MB = 1 << 20


class BoundedStore:
    """Entries keyed by image id; once `max_mb` is full the least recently used go first (0: keeps nothing).

    It counts what it saved (hits, misses) and what it held (bytes, peak_bytes, dropped), so that a
    cache can say in one log line whether its bound (config key `key`) was large enough.
    """

    def __init__(self, max_mb: float, key: str):
        if max_mb < 0:
            raise ValueError(f"config key '{key}' is {max_mb}; expected a size in MB >= 0")
        self.key = key
        self.max_bytes = int(max_mb * MB)
        self._kept: OrderedDict[str, Any] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # kept, then dropped for room
        self._seen: set[str] = set()
        self._entry_bytes = 0  # of the last entry offered: one image's worth

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._kept

    def lookup(self, image_id: str):
        """The entry kept for `image_id` (now the most recently used), else None; counts a hit or a miss."""
        if image_id in self._kept:
            self._kept.move_to_end(image_id)
            self.hits += 1
            return self._kept[image_id]
        self.misses += 1
        return None

    def keep(self, image_id: str, entry, size: int) -> None:
        """Keep `entry` of `size` bytes, dropping the least recently used entries to make room."""
        self._seen.add(image_id)
        self._entry_bytes = size
        if size > self.max_bytes:
            return
        while self._kept and self.bytes + size > self.max_bytes:
            evicted, _ = self._kept.popitem(last=False)
            self.bytes -= self._sizes.pop(evicted)
            self.dropped += 1
        self._kept[image_id] = entry
        self._sizes[image_id] = size
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def summary(self, name: str, what: str) -> str:
        """One log line: how many of the `what` (e.g. 'image forwards') it saved, and what it held."""
        total = self.hits + self.misses
        share = 100.0 * self.hits / total if total else 0.0
        line = (f"{name}: {self.hits} of {total} {what} reused ({share:.0f} %), "
                f"{len(self)} images kept, peak {self.peak_bytes / MB:.1f} of {self.max_bytes / MB:.0f} MB")
        if len(self._seen) > len(self):  # some did not fit: say what would hold them all
            need = math.ceil(len(self._seen) * self._entry_bytes / MB)
            line += (f"; {len(self._seen) - len(self)} of {len(self._seen)} images did not stay, "
                     f"{self.key} {need} would keep them all")
        return line
