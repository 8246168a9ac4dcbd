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


class TooFewImagesError(ValueError):
    """A class of the fold has fewer images than a query and its distinct supports need."""


def _check_enough_images(lists: dict[int, list[str]], shots: int, split: str) -> None:
    short = {c: len(ids) for c, ids in lists.items() if len(ids) < shots + 1}
    if short:
        detail = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items()))
        raise TooFewImagesError(
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


SAMPLING_SCHEMES = ("image_walk", "class_uniform")
WALK_STREAM = 0x57A1C  # generator stream of the image walk's order, apart from the per-episode streams


def sample_episodes(
    image_classes: pd.DataFrame,
    classes: Sequence[int],
    shots: int,
    episodes: int,
    seed: int,
    split: str = "val",
    scheme: str = "image_walk",
) -> pd.DataFrame:
    """Sample `episodes` test episodes over `classes`: columns episode, class_id, query_id, support_ids.

    Every episode e draws from its own generator numpy default_rng([seed, e]).

    'image_walk' (PFENet / CyCTR / UMTFSS test code):
      1. the query is image e (cyclically) of the split's images in which at least one of `classes` is
         present (>= the data set's min_class_pixels), in an order shuffled once per seed (the reference
         walks its list file in order; with fewer episodes than images, a seeded order keeps the queries
         a random sample, as the paper describes, instead of the first ids);
      2. the class uniformly among `classes` that have any pixel in the query (a small object counts);
      3. the supports among the other images where that class is present.
      Frequent classes (person) get more episodes, and small query objects are scored.
    'class_uniform': the class uniformly among `classes`, then the query among the images where it is
      present, then the supports as above: every class gets a similar number of episodes.

    The `shots` supports are drawn one at a time without repeats, so the 1-shot episode e has the same
    class and query as the 5-shot episode e, with its support first of the five; episode e does not
    depend on how many episodes are drawn.
    """
    if scheme not in SAMPLING_SCHEMES:
        raise ValueError(f"config key 'evaluation.sampling' is '{scheme}', expected one of {', '.join(SAMPLING_SCHEMES)}")
    if shots < 1 or episodes < 1:
        raise ValueError(f"shots and episodes must be >= 1, got shots={shots}, episodes={episodes}")
    class_ids = sorted({int(c) for c in classes})
    if not class_ids:
        raise ValueError("sample_episodes needs at least one class id, got an empty list")
    lists = class_image_lists(image_classes, class_ids, split)
    _check_enough_images(lists, shots, split)  # every class of the fold is scored, so each needs episodes
    if scheme == "image_walk":
        queries, choices = _walk_queries(image_classes, class_ids, lists, split)
        order = np.random.default_rng([int(seed) & 0xFFFFFFFF, WALK_STREAM]).permutation(len(queries))
    records = []
    for episode in range(episodes):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, episode])
        if scheme == "class_uniform":
            class_id = class_ids[int(rng.integers(len(class_ids)))]
            pool = lists[class_id]
            query_index = int(rng.integers(len(pool)))
            query_id = pool[query_index]
        else:
            walk = int(order[episode % len(queries)])
            query_id, options = queries[walk], choices[walk]
            class_id = options[int(rng.integers(len(options)))]
            pool = lists[class_id]
            query_index = pool.index(query_id) if query_id in pool else len(pool)  # tiny object: not a support
        supports = _distinct_supports(rng, len(pool) + (query_index == len(pool)), query_index, shots)
        records.append((episode, class_id, query_id, [pool[i] for i in supports]))
    return pd.DataFrame.from_records(records, columns=EPISODE_COLUMNS)


def _walk_queries(image_classes: pd.DataFrame, class_ids: list[int], lists: dict[int, list[str]],
                  split: str) -> tuple[list[str], list[list[int]]]:
    """The image walk's query ids (sorted) and, per query, the classes with any pixel in it."""
    if "pixels" not in image_classes.columns:
        raise ValueError("image_classes table lacks column 'pixels'; expected the prepare stage's image_classes.parquet")
    queries = sorted({image_id for ids in lists.values() for image_id in ids})
    rows = image_classes[(image_classes["split"] == split) & (image_classes["pixels"] > 0)
                         & image_classes["class_id"].isin(class_ids)]
    present = rows.groupby(rows["image_id"].astype(str))["class_id"].agg(lambda c: sorted({int(x) for x in c}))
    return queries, [list(present[q]) for q in queries]


def sample_episodes_per_seed(
    image_classes: pd.DataFrame,
    classes: Sequence[int],
    shots: int,
    episodes: int,
    seeds: Iterable[int],
    split: str = "val",
    scheme: str = "image_walk",
) -> dict[int, pd.DataFrame]:
    """One episode table per evaluation seed."""
    return {int(s): sample_episodes(image_classes, classes, shots, episodes, int(s), split, scheme) for s in seeds}
