"""The `evaluate` stage: meta-test every method on the held-out classes of each fold, write score tables."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from umtfss import config as config_module
from umtfss.episode import binary_mask
from umtfss.io import atomic_path, read_label, read_rgb
from umtfss.evaluation.evaluator import IoUAccumulator
from umtfss.evaluation.image_cache import ImageCache, PreparedImage, to_test_size
from umtfss.data.prepare import read_tables
from umtfss.devices import (channels_last_input, check_cpu_precision, inference_autocast, lay_out_for_precision,
                            resolve_device)
from umtfss.evaluation.predictors import Predictor, build_predictor
from umtfss.evaluation.sampler import TooFewImagesError, sample_episodes
from umtfss.transforms import unpad_to, valid_pixels
from umtfss.progress import tqdm

SPLIT = "val"
SCORE_COLUMNS = ["method", "backbone", "embedder", "clusters", "fold", "shot", "seed", "miou", "fbiou", "episodes",
                 "resolution", "geometry", "test_size", "sampling"]
CLASS_COLUMNS = ["method", "fold", "shot", "seed", "class_id", "class_name", "iou", "episodes"]


# ---------------------------------------------------------------- batches


class EpisodeBatches(Dataset):
    """Batches of test episodes as tensors; each image of a batch is decoded once (DataLoader workers welcome).

    An item holds the predictor inputs at test size and, per episode, the target to score against:
    the original-size mask (resolution 'original') or the mask resized to test size ('resized').
    `cache` (an ImageCache, in-process loading only) keeps each image at test size across batches
    and across the EpisodeBatches of one evaluate run, so that it is decoded once.
    """

    def __init__(self, episodes: pd.DataFrame, paths: dict[str, tuple[str, str]], batch_size: int,
                 test_size: int, resolution: str, geometry: str = "exact", cache: ImageCache | None = None):
        if resolution not in ("original", "resized"):
            raise ValueError(f"evaluation.resolution '{resolution}' is not allowed; expected original or resized")
        self.episodes = episodes.reset_index(drop=True)
        self.paths = paths
        self.batch_size = batch_size
        self.test_size = test_size
        self.resolution = resolution
        self.geometry = geometry  # of resize_pad (resolution original)
        self.cache = cache

    def __len__(self) -> int:
        return math.ceil(len(self.episodes) / self.batch_size)

    def _read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        if image_id not in self.paths:
            raise ValueError(f"image '{image_id}' of an episode is not in images.parquet (split '{SPLIT}')")
        image_path, label_path = self.paths[image_id]
        # writable copies: torch.from_numpy warns on the read-only arrays PIL hands out
        image = np.require(read_rgb(image_path), requirements="W")
        label = np.require(read_label(label_path), requirements="W")
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image '{image_path}' is {image.shape[:2]} but its label '{label_path}' is {label.shape}")
        return image, label

    def _prepared(self, image_id: str) -> PreparedImage:
        if self.cache is not None and (kept := self.cache.lookup(image_id)) is not None:
            return kept
        prepared = to_test_size(*self._read(image_id), self.test_size, self.resolution, self.geometry)
        if self.cache is not None:
            self.cache.keep(image_id, prepared, prepared.nbytes)
        return prepared

    def __getitem__(self, index: int) -> dict:
        rows = self.episodes.iloc[index * self.batch_size:(index + 1) * self.batch_size]
        needed = set(rows["query_id"]) | {s for ids in rows["support_ids"] for s in ids}
        images = {image_id: self._prepared(image_id) for image_id in sorted(needed)}
        queries, supports, support_masks, targets, valid = [], [], [], [], []
        for row in rows.itertuples(index=False):
            query = images[row.query_id]
            queries.append(query.image)
            valid.append(query.extent)
            targets.append(binary_mask(query.label if self.resolution == "original" else query.label_at_test_size,
                                       row.class_id))
            shots = [images[support_id] for support_id in row.support_ids]
            supports.append(torch.stack([shot.image for shot in shots]))
            # 0/1, 255 = ignore or padding
            support_masks.append(torch.stack([torch.from_numpy(binary_mask(shot.label_at_test_size, row.class_id)).float()
                                              for shot in shots]))
        return {
            "query": torch.stack(queries),
            "query_valid": valid_pixels(valid, self.test_size),
            "supports": torch.stack(supports),
            "support_masks": torch.stack(support_masks),
            "targets": targets,
            "valid": valid,
            "class_ids": [int(c) for c in rows["class_id"]],
            "query_ids": [str(i) for i in rows["query_id"]],
            "support_ids": [[str(i) for i in ids] for ids in rows["support_ids"]],
        }


def _collate_one(item):
    return item


def score_batch(logits: torch.Tensor, batch: dict, resolution: str, accumulator: IoUAccumulator,
                geometry: str = "exact") -> None:
    """Argmax each episode's logits at the scoring resolution and add it to the accumulator."""
    logits = logits.float().cpu()
    for b, (target, class_id) in enumerate(zip(batch["targets"], batch["class_ids"])):
        episode_logits = logits[b]
        if resolution == "original":
            episode_logits = unpad_to(episode_logits, batch["valid"][b], target.shape, geometry)
        pred = episode_logits.argmax(0).numpy().astype(np.uint8)
        accumulator.update(pred, target, class_id)


# ---------------------------------------------------------------- the stage


def _image_paths(images: pd.DataFrame) -> dict[str, tuple[str, str]]:
    rows = images[images["split"] == SPLIT]
    missing_labels = rows["label_path"].isna()
    if missing_labels.any():
        first = rows.loc[missing_labels, "image_id"].iloc[0]
        raise ValueError(f"images.parquet: '{SPLIT}' image '{first}' has no label_path; evaluation needs labels")
    return {str(i): (str(p), str(lab)) for i, p, lab in zip(rows["image_id"], rows["image_path"], rows["label_path"])}


def lay_out_predictor(predictor: Predictor, device: torch.device, cpu_precision: str) -> Predictor:
    """The predictor with its network ('model' or 'backbone') laid out for evaluation.cpu_precision."""
    for name in ("model", "backbone"):
        network = getattr(predictor, name, None)
        if isinstance(network, torch.nn.Module):
            lay_out_for_precision(network, device, cpu_precision, "evaluate")  # in place
    return predictor


def evaluate_predictor(predictor: Predictor, episodes: pd.DataFrame, paths, class_ids, eval_cfg: dict,
                       device: torch.device, workers: int = 0, progress: tqdm | None = None,
                       images: ImageCache | None = None) -> IoUAccumulator:
    """Score one predictor on one episode table (on a CPU in bfloat16 autocast when evaluation.cpu_precision says so).
    `images` keeps the test images at test size between calls (with workers=0 only: workers decode apart)."""
    cpu_precision = eval_cfg["cpu_precision"]
    batches = EpisodeBatches(episodes, paths, eval_cfg["batch_size"], eval_cfg["test_size"], eval_cfg["resolution"],
                             eval_cfg["geometry"], images if workers == 0 else None)
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_collate_one,
                        pin_memory=device.type == "cuda")
    accumulator = IoUAccumulator(class_ids)
    cached = getattr(predictor, "cache", None) is not None  # use_feature_cache was called: name the images
    with torch.no_grad(), inference_autocast(device, False, cpu_precision):
        for batch in loader:
            ids = {"image_ids": (batch["query_ids"], batch["support_ids"])} if cached else {}
            logits = predictor.predict(channels_last_input(batch["query"].to(device), cpu_precision),
                                       batch["supports"].to(device), batch["support_masks"].to(device),
                                       batch["query_valid"].to(device), **ids)
            score_batch(logits, batch, eval_cfg["resolution"], accumulator, eval_cfg["geometry"])
            if progress is not None:
                progress.update(len(batch["class_ids"]))
    return accumulator


def _with_feature_cache(predictor: Predictor, max_mb: float) -> Predictor:
    """The predictor, keeping its frozen backbone's features per test image (evaluation.feature_cache_mb;
    0: off) when it can: every method sees the same images in many episodes, fold by fold."""
    use = getattr(predictor, "use_feature_cache", None)
    if use is not None and max_mb > 0:
        use(max_mb)
    return predictor


def _report_cache(predictors: dict, folds_of: dict) -> None:
    """The feature cache's line in the log, once per predictor (its method and folds, what it saved and held)."""
    for (method, path), predictor in predictors.items():
        cache = getattr(predictor, "cache", None)
        if cache is not None:
            folds = ", ".join(map(str, folds_of.get((method, path), [])))
            tqdm.write(f"{method}, fold {folds}: {cache.summary()}", file=sys.stderr)


def _default_meta(config: dict, meta: dict) -> dict:
    """backbone / embedder / clusters from --meta, else from the config (a trained model's row takes its
    checkpoint's record of them instead, see _check_held_out)."""
    filled = {
        "backbone": config["model"]["backbone"],
        "embedder": config["embedding"]["backbone"],
        "clusters": config["clustering"]["clusters"],
    }
    filled.update(meta)
    return filled


TRAINED_METHOD = re.compile(r"unsup|sup|(?:finetune|sup)-\d+%")  # the methods train.py knows by name


def _check_held_out(method: str, path: str | None, test_classes: dict[int, list[str]],
                    require_file: bool = True) -> str | None:
    """Refuse to score a checkpoint on a fold (of `test_classes`: fold -> its test class names, the folds
    the checkpoint serves) whose test classes it was trained on with labels (a model of another fold, or
    of every class): its score would be inflated, and nothing else would say so. Returns what the
    checkpoint records of the score table's backbone, embedder and clusters columns ({} without one)."""
    from umtfss.evaluation.predictors import REFERENCE_METHODS

    if method in REFERENCE_METHODS and path is not None:
        raise ValueError(f"method '{method}' is a reference predictor and takes no checkpoint, got '{path}'")
    if path is None:
        return {}  # a reference predictor, or a trained method without one (build() names it)
    from umtfss.training import checkpoint as ckpt

    folds = ", ".join(map(str, test_classes))
    if not require_file and not Path(path).is_file():
        return {}  # a custom builder's model name
    if Path(path).is_dir():  # before any fold is scored: a later fold's missing model would waste the earlier ones
        raise ValueError(f"checkpoint '{path}' of method '{method}' (fold {folds}) is a folder; expected a "
                         f"checkpoint file (e.g. {Path(path) / 'checkpoint.pt'})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint '{path}' of method '{method}' (fold {folds}) does not exist")
    payload = ckpt.load(path, mmap=True)  # its record only: the predictor loads the weights
    for fold, names in test_classes.items():
        seen = sorted(set(ckpt.labelled_classes(payload)) & set(names))
        if seen:
            raise ValueError(f"checkpoint '{path}' of method '{method}' was trained with labels on {', '.join(seen)}, "
                             f"test class(es) of fold {fold}: its score would not be few-shot. Give each fold its own "
                             f"model (a '{{fold}}' in the --method path, e.g. {method}=.../fold{{fold}}/checkpoint.pt)")
    stored = payload.get("method")
    if stored and stored != method and TRAINED_METHOD.fullmatch(method):  # a custom name may be anything
        tqdm.write(f"note: method '{method}' scores checkpoint '{path}', which was trained as '{stored}'", file=sys.stderr)
    model_cfg = payload.get("config", {}).get("model", {}) if isinstance(payload.get("config"), dict) else {}
    recorded = {"backbone": model_cfg.get("backbone"), **(payload.get("pseudo_tasks") or {})}
    return {k: v for k, v in recorded.items() if k in ("backbone", "embedder", "clusters") and v is not None}


def config_file_input(text: str) -> dict[str, list[Path]]:
    """{'--config': [file]} when --config names a file (not inline JSON), for the outputs to keep apart."""
    given = Path(text)
    return {"--config": [given]} if not text.lstrip().startswith("{") and given.is_file() else {}


def protected_inputs(tables_dir, paths: dict[str, tuple[str, str]], checkpoints) -> dict[str, list]:
    """The files a meta-test reads, by what they are: its outputs must not replace any of them."""
    return {"a file of --tables": sorted(p for p in Path(tables_dir).iterdir() if p.is_file()),
            "a --method checkpoint": sorted({str(c) for c in checkpoints if c}),
            "a test image or label of --tables": [p for pair in paths.values() for p in pair]}


def check_outputs(outputs: dict[str, str | Path], inputs: dict[str, list]) -> None:
    """Refuse, before any work, an output that is a folder, lies under a file, or is an input or the
    other output: written at the end, it would fail after the whole meta-test or replace that file."""
    from umtfss.io import check_output_paths, check_outputs_apart

    check_output_paths(outputs, kind="file")
    check_outputs_apart(outputs, inputs)


def evaluate(config: dict, dataset_name: str, tables_dir: str | Path, methods: dict[str, str | None],
             out_csv: str | Path, classes_csv: str | Path, meta: dict | None = None, workers: int | str = 0,
             build: Callable[..., Predictor] | None = None,
             inputs: dict[str, list] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Meta-test each method over evaluation.folds x shots x seeds; write the score and per-class tables.

    Every method sees the same episodes for a given fold, shot and seed (paired comparison). `build`
    makes a predictor from (method, config, checkpoint, device), build_predictor when None, whose checkpoints
    must then be files (checked before any fold is scored); tests swap it for their own. `inputs`
    (option -> paths, e.g. the --config file) adds files that the outputs must not replace.
    `workers` 'auto': no decoding worker on a CPU (they only take cores from the forward: the demo's
    evaluation ran about 10 % slower with 1 or 2 workers on 2 cores), torch's thread count on a GPU.
    """
    checkpoint_files = build is None  # a builder of one's own may name its models otherwise
    build = build or build_predictor
    if dataset_name not in config_module.DEFAULT_TEST_EPISODES:
        raise ValueError(f"dataset '{dataset_name}' is not a benchmark; expected one of "
                         f"{', '.join(config_module.DEFAULT_TEST_EPISODES)}")
    if not methods:
        raise ValueError("no method to evaluate; pass at least one --method")
    eval_cfg = config["evaluation"]
    tables = read_tables(tables_dir)
    prepared_from = tables.meta.get("dataset")
    if prepared_from and prepared_from != dataset_name:  # its episode count and class table would be another's
        raise ValueError(f"tables '{tables_dir}' were prepared from data set '{prepared_from}', but the data set to "
                         f"score is '{dataset_name}' (--dataset); expected that data set's prepare folder")
    paths = _image_paths(tables["images"])
    class_names = {int(c): str(n) for c, n in zip(tables["classes"]["class_id"], tables["classes"]["name"])}
    n_episodes = config_module.test_episodes(config, dataset_name)
    device = resolve_device(eval_cfg["device"], "evaluation.device")
    cpu_precision = check_cpu_precision(eval_cfg["cpu_precision"], "evaluation.cpu_precision")
    if workers == "auto":
        workers = 0 if device.type == "cpu" else torch.get_num_threads()
    given = set(meta or {})  # --meta columns win over a checkpoint's record
    meta = _default_meta(config, dict(meta or {}))
    reserved = sorted(set(meta) & (set(SCORE_COLUMNS) - {"backbone", "embedder", "clusters"}))
    if reserved:
        raise ValueError(f"meta column(s) {reserved} would overwrite a score column; choose other names")

    plan = [(fold, shot, seed)
            for fold in eval_cfg["folds"] for shot in eval_cfg["shots"] for seed in eval_cfg["seeds"]]
    folds_present = tables.folds()
    absent = [f for f in eval_cfg["folds"] if f not in folds_present]
    if absent:
        raise ValueError(f"config key 'evaluation.folds' holds fold(s) {absent}, but data set '{dataset_name}' has folds "
                         f"{folds_present}; expected a subset of them")
    classes_of = {fold: tables.fold_classes(fold) for fold in eval_cfg["folds"]}
    episode_tables = {}
    for fold, shot, seed in plan:
        try:
            episode_tables[fold, shot, seed] = sample_episodes(tables["image_classes"], classes_of[fold], shot,
                                                               n_episodes, seed, SPLIT, eval_cfg["sampling"])
        except TooFewImagesError as err:  # name the config key and the fold's classes, not only the sampler's numbers
            named = ", ".join(f"{c} {class_names.get(c, '?')}" for c in classes_of[fold])
            raise ValueError(f"config key 'evaluation.shots' holds {shot}, fold {fold} (classes {named}) of "
                             f"'{tables_dir}': {err}") from None
    served: dict = {}  # (method, checkpoint path) -> {fold: its test class names}, each checkpoint read once
    for fold in eval_cfg["folds"]:
        for method, checkpoint in methods.items():
            path = checkpoint.format(fold=fold) if checkpoint else checkpoint
            served.setdefault((method, path), {})[fold] = [class_names.get(c, str(c)) for c in classes_of[fold]]
    check_outputs({"--out": out_csv, "--classes-out": classes_csv},
                   {**(inputs or {}), **protected_inputs(tables_dir, paths, [path for _, path in served])})
    # before any work: no model scored on classes it trained on; a trained model's row names the backbone it
    # runs and the embedder and N it meta-trained on (its checkpoint's), not the config's, unless --meta says otherwise
    recorded_of = {key: _check_held_out(*key, test_classes, checkpoint_files) for key, test_classes in served.items()}
    score_rows, class_rows = [], []
    # fold by fold, every method on it: a fold's test images, decoded once, serve all methods and shots
    images = ImageCache(eval_cfg["image_cache_mb"]) if workers == 0 and eval_cfg["image_cache_mb"] > 0 else None
    progress = tqdm(total=len(methods) * len(plan) * n_episodes, desc="evaluate", unit="episode", file=sys.stderr)
    predictors: dict = {}  # the predictor in use: a checkpoint path with "{fold}" names one model per fold
    folds_of: dict = {}  # the folds it served, for the log
    for fold in eval_cfg["folds"]:
        for method, checkpoint in methods.items():
            path = checkpoint.format(fold=fold) if checkpoint else checkpoint
            if (method, path) not in predictors:
                _report_cache(predictors, folds_of)
                predictors.clear()
                folds_of.clear()
                predictors[method, path] = _with_feature_cache(
                    lay_out_predictor(build(method, config, path, device), device, cpu_precision),
                    eval_cfg["feature_cache_mb"])
            predictor = predictors[method, path]
            folds_of.setdefault((method, path), []).append(fold)
            for shot in eval_cfg["shots"]:
                for seed in eval_cfg["seeds"]:
                    progress.set_description(f"{method} fold {fold} {shot}-shot seed {seed}")
                    torch.manual_seed(seed)  # a model that draws at inference (model.hash_draw per_call) repeats per seed
                    acc = evaluate_predictor(predictor, episode_tables[fold, shot, seed], paths, classes_of[fold],
                                             eval_cfg, device, workers, progress, images)
                    unseen = eval_cfg["unseen_classes"]
                    if acc.unseen():
                        tqdm.write(f"{method} fold {fold} {shot}-shot seed {seed}: class(es) "
                                   f"{', '.join(class_names.get(c, str(c)) for c in acc.unseen())} received no episode; "
                                   + ("counted as IoU 0 in the mIoU" if unseen == "zero" else "left out of the mIoU")
                                   + " (evaluation.unseen_classes)", file=sys.stderr)
                    score_rows.append({
                        **{k: meta[k] for k in ("backbone", "embedder", "clusters")},
                        **{k: v for k, v in recorded_of[method, path].items() if k not in given},
                        "method": method, "fold": fold, "shot": shot, "seed": seed,
                        "miou": round(100 * acc.miou(unseen), 2), "fbiou": round(100 * acc.fbiou(), 2),
                        "episodes": acc.total_episodes,
                        "resolution": eval_cfg["resolution"],
                        "geometry": eval_cfg["geometry"] if eval_cfg["resolution"] == "original" else "",
                        "test_size": eval_cfg["test_size"], "sampling": eval_cfg["sampling"],
                        **{k: v for k, v in meta.items() if k not in ("backbone", "embedder", "clusters")},
                    })
                    for class_id, iou in acc.per_class(unseen).items():
                        class_rows.append({"method": method, "fold": fold, "shot": shot, "seed": seed,
                                           "class_id": class_id, "class_name": class_names.get(class_id, str(class_id)),
                                           "iou": round(100 * iou, 2), "episodes": acc.episodes[class_id]})
    _report_cache(predictors, folds_of)
    if images is not None:
        tqdm.write(images.summary(), file=sys.stderr)
    progress.close()
    extra = [k for k in meta if k not in SCORE_COLUMNS]
    order = {method: rank for rank, method in enumerate(methods)}  # the tables list method by method, as given
    scores = _method_major(pd.DataFrame(score_rows, columns=SCORE_COLUMNS + extra), order)
    per_class = _method_major(pd.DataFrame(class_rows, columns=CLASS_COLUMNS), order)
    write_csv(scores, out_csv)
    write_csv(per_class, classes_csv)
    print(summary(scores).to_string(index=False))
    return scores, per_class


def _method_major(rows: pd.DataFrame, order: dict[str, int]) -> pd.DataFrame:
    """Rows run fold by fold, listed method by method (the order of --method), each in run order."""
    ranks = rows["method"].map(order)
    return rows.iloc[np.argsort(ranks.to_numpy(), kind="stable")].reset_index(drop=True)


def summary(scores: pd.DataFrame) -> pd.DataFrame:
    """mean ± std over seeds per method/shot/fold, then over the fold means per seed as fold 'mean'."""
    def spread(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        stats = frame.groupby(keys, sort=True)[["miou", "fbiou"]].agg(["mean", "std"])
        stats.columns = [f"{name}_{stat}" for name, stat in stats.columns]
        return stats.reset_index()

    by_fold = spread(scores, ["method", "shot", "fold"])
    by_fold["fold"] = by_fold["fold"].astype(str)
    fold_means = scores.groupby(["method", "shot", "seed"], sort=True)[["miou", "fbiou"]].mean().reset_index()
    over_folds = spread(fold_means, ["method", "shot"]).assign(fold="mean")
    table = pd.concat([by_fold, over_folds], ignore_index=True)
    table["_last"] = table["fold"] == "mean"
    table = table.sort_values(["method", "shot", "_last"], kind="stable")
    return pd.DataFrame({
        "method": table["method"], "shot": table["shot"], "fold": table["fold"],
        "mIoU": [_pm(m, s) for m, s in zip(table["miou_mean"], table["miou_std"])],
        "FB-IoU": [_pm(m, s) for m, s in zip(table["fbiou_mean"], table["fbiou_std"])],
    })


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {0.0 if pd.isna(std) else std:.2f}"


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV atomically (temporary sibling, then rename)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# ---------------------------------------------------------------- command line


def parse_method(text: str) -> tuple[str, str | None]:
    """NAME or NAME=CHECKPOINT."""
    name, sep, checkpoint = text.partition("=")
    if not name or (sep and not checkpoint):
        raise argparse.ArgumentTypeError(f"--method '{text}' is not NAME or NAME=CHECKPOINT")
    return name, checkpoint or None


def methods_of(pairs: list[tuple[str, str | None]]) -> dict[str, str | None]:
    """The --method (name, checkpoint) pairs as a dict; a name given twice is an error."""
    methods = dict(pairs)
    if len(methods) != len(pairs):
        raise ValueError(f"--method names repeat: {[m for m, _ in pairs]}")
    return methods


def parse_workers(text: str) -> int | str:
    """'auto' or a count >= 0."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--workers '{text}' is not auto or a count >= 0")
    return int(text)


def parse_meta(text: str) -> tuple[str, str]:
    """key=value."""
    key, sep, value = text.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError(f"--meta '{text}' is not key=value")
    return key, value


def cli(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, help="YAML file or inline JSON object")
    parser.add_argument("--dataset", required=True, choices=sorted(config_module.DEFAULT_TEST_EPISODES))
    parser.add_argument("--tables", required=True, help="folder with the prepare stage's parquet tables")
    parser.add_argument("--method", action="append", type=parse_method, required=True, metavar="NAME[=CHECKPOINT]",
                        help="method to evaluate (repeatable): all-background, prototype-threshold, or a trained "
                             "model name with its checkpoint")
    parser.add_argument("--out", required=True, help="score table CSV (results/eval_<dataset>.csv)")
    parser.add_argument("--classes-out", required=True, help="per-class IoU CSV (results/eval_<dataset>_classes.csv)")
    parser.add_argument("--meta", action="append", type=parse_meta, default=[], metavar="KEY=VALUE",
                        help="extra column of every score row (repeatable), "
                             "e.g. backbone=..., embedder=..., clusters=50")
    parser.add_argument("--workers", type=parse_workers, default="auto",
                        help="image-decoding worker processes (0 = in process; auto, the default: 0 on a CPU, "
                             "torch's thread count on a GPU)")
    parser.add_argument("--runtime", metavar="JSON", default=os.environ.get("UMTFSS_RUNTIME"),
                        help="settings that change only speed, over --config's: evaluation.feature_cache_mb and "
                             "image_cache_mb (default: $UMTFSS_RUNTIME, where the workflow puts them, untracked, "
                             "so that changing one reruns no job)")

    def run(args: argparse.Namespace) -> None:
        raw = config_module.with_runtime(config_module.read_raw(args.config), args.runtime, ("evaluation",))
        config = config_module.load(raw)
        if args.runtime:
            settings = ", ".join(f"{k} {config['evaluation'][k]}" for k in config_module.RUNTIME_KEYS["evaluation"])
            print(f"umtfss evaluate: settings that change only speed (--runtime): {settings}", file=sys.stderr)
        methods = methods_of(args.method)
        evaluate(config, args.dataset, args.tables, methods, args.out, args.classes_out, dict(args.meta),
                 workers=args.workers, inputs=config_file_input(args.config))

    return run
