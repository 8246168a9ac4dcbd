"""Episode sources for training: labelled base-class episodes, fine-tuning subsets, a torch Dataset."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import torch

from umtfss.episode import Episode, binary_mask
from umtfss.transforms import resize_pad, valid_pixels


class EpisodeSource(Protocol):
    """What training needs from an episode source (PseudoEpisodes, LabelledEpisodes, ...)."""

    def __len__(self) -> int: ...

    def episode(self, index: int, rng: np.random.Generator, shots: int) -> Episode: ...


def _table(tables, name: str) -> pd.DataFrame:
    """A prepare table by name, from a Tables object (attribute) or a dict."""
    value = tables.get(name) if isinstance(tables, dict) else getattr(tables, name, None)
    if value is None:
        raise ValueError(f"prepare tables have no '{name}' table; expected images, classes and image_classes")
    return value


ALL_CLASSES = "all"  # the 'fold' of a model trained on every labelled class (none held out)


def fold_base_classes(tables, dataset, fold: int | str) -> tuple[list[int], list[int]]:
    """(base, novel) class ids of a fold: novel from the data set (or classes.parquet), base = the rest;
    fold ALL_CLASSES: every class is a base class."""
    classes = _table(tables, "classes")
    all_ids = sorted(int(c) for c in classes["class_id"])
    if fold == ALL_CLASSES:
        return all_ids, []
    if hasattr(dataset, "fold_classes"):
        novel = sorted(int(c) for c in dataset.fold_classes(fold))
    elif hasattr(tables, "fold_classes"):
        novel = sorted(int(c) for c in tables.fold_classes(fold))
    else:
        if "fold" not in classes.columns:
            raise ValueError("classes table has no 'fold' column; pass a SegmentationDataset to get fold classes")
        novel = sorted(int(c) for c in classes.loc[classes["fold"] == fold, "class_id"])
    if not novel:
        raise ValueError(f"fold {fold} has no novel classes in data set '{getattr(dataset, 'name', dataset)}'")
    base = [c for c in all_ids if c not in set(novel)]
    return base, novel


CLASS_DRAWS = ("any_pixel", "present")


class LabelledEpisodes:
    """Supervised episodes over a fold's base classes on the train split (reference-code conventions);
    fold ALL_CLASSES: over every class, none held out.

    One query per train image where some base class is present (>= min_class_pixels) and has a second
    such image; the episode's class is drawn among the base classes with any pixel in the query that
    have a support image (class_draw 'any_pixel', PFENet's training draw: the pixel threshold picks
    images, not the class) or only among the present ones ('present'), supports among the other
    images where that class is present.
    """

    def __init__(
        self,
        tables,
        dataset,
        fold: int | str,
        image_ids: list[str] | None = None,
        min_class_pixels: int | None = None,
        remove_novel_train: bool = False,
        reader: Callable | None = None,
        class_draw: str = "any_pixel",
    ):
        if class_draw not in CLASS_DRAWS:
            raise ValueError(f"config key 'training.labelled_class_draw' is '{class_draw}', expected one of "
                             f"{', '.join(CLASS_DRAWS)}")
        self.fold = fold
        self.image_ids = None if image_ids is None else list(image_ids)  # the subset asked for (train_subset.txt)
        self.base_classes, self.novel_classes = fold_base_classes(tables, dataset, fold)
        if not self.base_classes:
            raise ValueError(f"fold {fold} of data set '{getattr(dataset, 'name', dataset)}' has no base class (every "
                             "class is novel in it), so there is nothing to train on; labelled training needs classes "
                             "outside the fold (datasets.custom.folds)")
        images = _table(tables, "images")
        train_images = images[images["split"] == "train"].set_index("image_id")
        self._paths = train_images[["image_path", "label_path"]]
        rows = _table(tables, "image_classes")
        rows = rows[rows["split"] == "train"]
        if image_ids is not None:
            unknown = sorted(set(image_ids) - set(train_images.index))[:5]
            if unknown:
                raise ValueError(f"image ids not in the train split of the prepare tables: {unknown}")
            rows = rows[rows["image_id"].isin(set(image_ids))]
        if remove_novel_train:
            with_novel = rows.loc[rows["class_id"].isin(self.novel_classes) & (rows["pixels"] > 0), "image_id"]
            rows = rows[~rows["image_id"].isin(set(with_novel))]
        rows = rows[rows["class_id"].isin(self.base_classes)]
        present = rows["pixels"] >= min_class_pixels if min_class_pixels is not None else rows["present"].astype(bool)
        self._build_index(rows[present], rows[rows["pixels"] > 0] if class_draw == "any_pixel" else rows[present])
        if not self.query_ids:
            raise ValueError(
                f"no train image of fold {fold} holds a base class present in at least two images "
                f"(image_ids={'all' if image_ids is None else len(image_ids)}, remove_novel_train={remove_novel_train})"
            )
        self._read = reader or _read_pair

    def _build_index(self, present: pd.DataFrame, touching: pd.DataFrame) -> None:
        """present: (image, base class) rows over the pixel threshold; touching: those with any pixel."""
        images_of_class: dict[int, list[str]] = defaultdict(list)
        for image_id, class_id in zip(present["image_id"], present["class_id"]):
            images_of_class[int(class_id)].append(str(image_id))
        # a class needs a second image to serve as support
        self.images_of_class = {c: sorted(ids) for c, ids in images_of_class.items() if len(set(ids)) >= 2}
        query_ids = {i for ids in self.images_of_class.values() for i in ids}
        classes_of_image: dict[str, list[int]] = defaultdict(list)
        for image_id, class_id in zip(touching["image_id"], touching["class_id"]):
            image_id, class_id = str(image_id), int(class_id)
            pool = self.images_of_class.get(class_id, ())
            if image_id in query_ids and any(i != image_id for i in pool):
                classes_of_image[image_id].append(class_id)
        self.classes_of_image = {i: sorted(set(c)) for i, c in classes_of_image.items()}
        self.query_ids = sorted(self.classes_of_image)

    def __len__(self) -> int:
        return len(self.query_ids)

    def episode(self, index: int, rng: np.random.Generator, shots: int) -> Episode:
        query_id = self.query_ids[index]
        class_id = int(rng.choice(self.classes_of_image[query_id]))
        candidates = [i for i in self.images_of_class[class_id] if i != query_id]
        support_ids = [str(s) for s in rng.choice(candidates, size=shots, replace=len(candidates) < shots)]
        query_image, query_mask = self._load(query_id, class_id)
        supports = [self._load(s, class_id) for s in support_ids]
        return Episode(
            query_image=query_image,
            query_mask=query_mask,
            support_images=[s[0] for s in supports],
            support_masks=[s[1] for s in supports],
            class_id=class_id,
            query_id=query_id,
            support_ids=support_ids,
        )

    def _load(self, image_id: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self._paths.loc[image_id]
        image, label = self._read(image_path, label_path)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image '{image_path}' {image.shape[:2]} and label '{label_path}' {label.shape[:2]} differ in size")
        return image, binary_mask(label, class_id)


def _read_pair(image_path, label_path):
    from umtfss.io import read_label, read_rgb

    return read_rgb(image_path), read_label(label_path)


def finetune_subset(tables, fraction: float, seed: int) -> list[str]:
    """floor(fraction * train images) random train image ids; each fraction drawn on its own (not nested).
    finetune-P% and sup-P% of one training seed get the same images, so the two compare like for like."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction is {fraction}, expected 0 < fraction <= 1 (a method's P % of 1..100)")
    images = _table(tables, "images")
    train_ids = sorted(str(i) for i in images.loc[images["split"] == "train", "image_id"])
    count = math.floor(fraction * len(train_ids) + 1e-9)
    if count == 0:
        raise ValueError(f"labelled fraction {fraction} of {len(train_ids)} train images selects no image")
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    chosen = rng.choice(len(train_ids), size=count, replace=False)
    return sorted(train_ids[i] for i in chosen)


class EpisodeDataset(torch.utils.data.Dataset):
    """Episodes as tensors: item i of epoch e is drawn with an rng seeded by (seed, e, i).

    The order of source episodes is a seeded permutation per epoch (repeated when
    `episodes_per_epoch` exceeds the source), so an epoch is a pure function of (seed, epoch):
    identical across worker counts and across an interrupted and resumed run.
    """

    def __init__(self, source: EpisodeSource, shots: int, crop_size: int, augment=None, seed: int = 0,
                 episodes_per_epoch: int | None = None):
        if len(source) == 0:
            raise ValueError("the episode source is empty: no episode to train on")
        self.source = source
        self.shots = shots
        self.crop_size = crop_size
        self.augment = augment
        self.seed = seed
        self.episodes_per_epoch = episodes_per_epoch or len(source)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Fix the episode order of `epoch` (call before creating the DataLoader iterator)."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        rounds = -(-self.episodes_per_epoch // len(self.source))
        order = np.concatenate([rng.permutation(len(self.source)) for _ in range(rounds)])
        self.order = order[: self.episodes_per_epoch]

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        episode = self.source.episode(int(self.order[i]), rng, self.shots)
        if episode.shots != self.shots:
            raise ValueError(f"episode {int(self.order[i])} has {episode.shots} supports, expected {self.shots}")
        query, query_mask, query_valid = self._transform(episode.query_image, episode.query_mask, rng)
        pairs = [self._transform(img, m, rng) for img, m in zip(episode.support_images, episode.support_masks)]
        return {
            "query": query,
            "query_mask": query_mask,
            "query_valid": query_valid,  # padding only: the label's own 255 pixels are no input
            "supports": torch.stack([p[0] for p in pairs]),
            "support_masks": torch.stack([p[1] for p in pairs]),
        }

    def _transform(self, image, mask, rng):
        """(image, mask, valid): the augmentation's, or the test transform's with its padding as invalid."""
        if self.augment is not None:
            return self.augment(image, mask, rng)
        image_t, mask_t, extent = resize_pad(image, mask, self.crop_size)
        return image_t, mask_t, valid_pixels([extent], self.crop_size)[0]
