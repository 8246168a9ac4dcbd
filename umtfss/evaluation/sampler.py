"""Meta-test episode sampling: which query and support images each test episode uses, reproducibly."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

EPISODE_COLUMNS = ["episode", "class_id", "query_id", "support_ids"]
REQUIRED_COLUMNS = ("image_id", "split", "class_id", "present")


def class_image_lists(image_classes: pd.DataFrame, classes: Iterable[int], split: str = "val") -> dict[int, list[str]]:
    """Sorted image ids of `split` in which each class is present (row order of the table does not matter)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in image_classes.columns]
    if missing:
        raise ValueError(
            f"image_classes table lacks column(s) {missing}; expected columns {list(REQUIRED_COLUMNS)} "
            "(the prepare stage's image_classes.parquet)"
        )
    rows = image_classes[(image_classes["split"] == split) & image_classes["present"].astype(bool)]
    by_class = rows.groupby("class_id")["image_id"].agg(lambda ids: sorted(set(map(str, ids))))
    return {int(c): list(by_class.get(int(c), [])) for c in classes}


def _check_enough_images(lists: dict[int, list[str]], shots: int, split: str) -> None:
    short = {c: len(ids) for c, ids in lists.items() if len(ids) < shots + 1}
    if short:
        detail = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items()))
        raise ValueError(
            f"{shots}-shot episodes need at least {shots + 1} '{split}' images per class with the class present "
            f"(query + {shots} distinct supports); too few in {detail}"
        )


def _distinct_supports(rng: np.random.Generator, pool_size: int, query_index: int, shots: int) -> list[int]:
    """Draw `shots` distinct indices != query_index one by one, so a K-shot draw extends the (K-1)-shot one."""
    chosen: list[int] = []
    while len(chosen) < shots:
        index = int(rng.integers(pool_size - 1))
        index += index >= query_index  # skip the query without rejection
        if index not in chosen:
            chosen.append(index)
    return chosen


def sample_episodes(
    image_classes: pd.DataFrame,
    classes: Sequence[int],
    shots: int,
    episodes: int,
    seed: int,
    split: str = "val",
) -> pd.DataFrame:
    """Sample `episodes` test episodes over `classes`: columns episode, class_id, query_id, support_ids.

    Scheme (per episode e, from its own generator numpy default_rng([seed, e])):
      1. the class uniformly among `classes` (sorted),
      2. the query uniformly among the split's images where that class is present (sorted ids),
      3. the `shots` supports uniformly among the other such images, drawn one at a time without repeats
         (the reference code takes supports from the same val list, distinct from the query).
    Consequences: episode e does not depend on how many episodes are drawn, and the 1-shot episode e has
    the same class and query as the 5-shot episode e with its support as the first of the five. This
    differs from PFENet, which walks the val image list and picks a class present in each image (classes
    weighted by frequency); uniform classes give every class of the fold a similar number of episodes.
    """
    if shots < 1 or episodes < 1:
        raise ValueError(f"shots and episodes must be >= 1, got shots={shots}, episodes={episodes}")
    class_ids = sorted({int(c) for c in classes})
    if not class_ids:
        raise ValueError("sample_episodes needs at least one class id, got an empty list")
    lists = class_image_lists(image_classes, class_ids, split)
    _check_enough_images(lists, shots, split)
    records = []
    for episode in range(episodes):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, episode])
        class_id = class_ids[int(rng.integers(len(class_ids)))]
        pool = lists[class_id]
        query_index = int(rng.integers(len(pool)))
        supports = _distinct_supports(rng, len(pool), query_index, shots)
        records.append((episode, class_id, pool[query_index], [pool[i] for i in supports]))
    return pd.DataFrame.from_records(records, columns=EPISODE_COLUMNS)


def sample_episodes_per_seed(
    image_classes: pd.DataFrame,
    classes: Sequence[int],
    shots: int,
    episodes: int,
    seeds: Iterable[int],
    split: str = "val",
) -> dict[int, pd.DataFrame]:
    """One episode table per evaluation seed."""
    return {int(s): sample_episodes(image_classes, classes, shots, episodes, int(s), split) for s in seeds}
