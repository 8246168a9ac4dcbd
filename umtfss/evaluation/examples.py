"""`umtfss examples`: the first test episodes of a fold drawn as a figure: support, query and truth, each method's mask."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from umtfss import config as config_module
from umtfss.data.prepare import read_tables
from umtfss.devices import channels_last_input, check_cpu_precision, inference_autocast, resolve_device
from umtfss.episode import binary_mask
from umtfss.evaluation.predictors import Predictor, build_predictor
from umtfss.evaluation.run import (SPLIT, EpisodeBatches, _check_held_out, _image_paths, check_outputs,
                                   config_file_input, lay_out_predictor, methods_of, parse_method, protected_inputs)
from umtfss.evaluation.sampler import sample_episodes
from umtfss.io import read_label, read_rgb
from umtfss.transforms import unpad_to

TRUTH, PREDICTION = (1.0, 0.9, 0.0), (1.0, 0.1, 0.1)  # yellow: the labelled mask (outlined); red: a method's
DEFAULT_COUNT = 6


def episode_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Foreground IoU of one episode (255 ignored); 1 when both are empty."""
    valid = target != 255
    inter = np.logical_and(pred == 1, target == 1)[valid].sum()
    union = np.logical_or(pred == 1, target == 1)[valid].sum()
    return float(inter / union) if union else 1.0


@dataclass
class Examples:
    """Test episodes (an `iou_<method>` column per method), their truths and each method's masks, at the
    query images' own size."""

    episodes: pd.DataFrame
    targets: list[np.ndarray]
    masks: dict[str, list[np.ndarray]]
    fold: int
    shot: int
    seed: int


def predict_examples(config: dict, dataset: str, tables_dir: str | Path, methods: dict[str, str | None],
                     count: int | None = None, fold: int | None = None, shot: int | None = None,
                     seed: int | None = None, build: Callable[..., Predictor] = build_predictor,
                     out: str | Path | None = None, inputs: dict | None = None) -> Examples:
    """The first `count` episodes of the evaluation's table for (fold, shot, seed), by default the first of
    evaluation.folds / shots / seeds: the episodes `umtfss evaluate` scores first, and each method's masks
    (the same masks as evaluate's but for models that draw at inference, `model.hash_draw: per_call`,
    whose draws follow the batching). `count` is at most the table's episodes (refused above: the table
    holds no more); by default DEFAULT_COUNT, or all of a shorter table. `out` (the figure to write) is
    refused before any work if it would replace an input (`inputs` adds some, e.g. the --config file); a
    checkpoint trained with labels on the fold's test classes is refused, as evaluate refuses it."""
    eval_cfg = config["evaluation"]
    fold = eval_cfg["folds"][0] if fold is None else fold
    shot = eval_cfg["shots"][0] if shot is None else shot
    seed = eval_cfg["seeds"][0] if seed is None else seed
    episodes_per_fold = config_module.test_episodes(config, dataset)
    count = min(DEFAULT_COUNT, episodes_per_fold) if count is None else count
    if not 1 <= count <= episodes_per_fold:
        raise ValueError(f"--count is {count}, expected 1 to {episodes_per_fold} episodes: the figure draws the "
                         f"first of the {episodes_per_fold} test episodes per fold that evaluate scores "
                         "(evaluation.episodes)")
    tables = read_tables(tables_dir)
    episodes = sample_episodes(tables["image_classes"], tables.fold_classes(fold), shot,
                               episodes_per_fold, seed, SPLIT, eval_cfg["sampling"])
    episodes = episodes.head(count).reset_index(drop=True)
    paths = _image_paths(tables["images"])
    checkpoints = {method: checkpoint.format(fold=fold) if checkpoint else None for method, checkpoint in methods.items()}
    if out is not None:
        check_outputs({"--out": out}, {**(inputs or {}), **protected_inputs(tables_dir, paths, checkpoints.values())})
    names = dict(zip(tables.classes["class_id"].astype(int), tables.classes["name"].astype(str)))
    for method, path in checkpoints.items():
        _check_held_out(method, path, {fold: [names.get(c, str(c)) for c in tables.fold_classes(fold)]},
                        build is build_predictor)
    batch = EpisodeBatches(episodes, paths, len(episodes), eval_cfg["test_size"],
                           "original", eval_cfg["geometry"])[0]
    device = resolve_device(eval_cfg["device"], "evaluation.device")
    cpu_precision = check_cpu_precision(eval_cfg["cpu_precision"], "evaluation.cpu_precision")
    masks: dict[str, list[np.ndarray]] = {}
    for method, checkpoint in checkpoints.items():
        predictor = lay_out_predictor(build(method, config, checkpoint, device), device, cpu_precision)
        torch.manual_seed(seed)  # as evaluate: a model that draws at inference repeats per seed
        with torch.no_grad(), inference_autocast(device, False, cpu_precision):
            logits = predictor.predict(channels_last_input(batch["query"].to(device), cpu_precision),
                                       batch["supports"].to(device), batch["support_masks"].to(device),
                                       batch["query_valid"].to(device)).float().cpu()
        masks[method] = [unpad_to(logits[b], batch["valid"][b], target.shape, eval_cfg["geometry"]).argmax(0)
                         .numpy().astype(np.uint8) for b, target in enumerate(batch["targets"])]
        episodes[f"iou_{method}"] = [round(100 * episode_iou(m, t), 1) for m, t in zip(masks[method], batch["targets"])]
    return Examples(episodes, batch["targets"], masks, fold, shot, seed)


def _tinted(image: np.ndarray, mask: np.ndarray | None, colour: tuple[float, float, float]) -> np.ndarray:
    tinted = image.astype(np.float32) / 255
    if mask is not None:
        tinted[mask == 1] = 0.45 * tinted[mask == 1] + 0.55 * np.asarray(colour, np.float32)
    return tinted


def _outline(ax, mask: np.ndarray) -> None:
    """The labelled mask's border, readable on any image (the demo's objects are bright textures)."""
    if (mask == 1).any() and (mask != 1).any():
        ax.contour((mask == 1).astype(np.float32), levels=[0.5], colors=[TRUTH], linewidths=1.6)


def draw_examples(examples: Examples, tables_dir: str | Path, out: str | Path, tile: float = 2.2) -> Path:
    """One row per episode: its first support and its query, the labelled masks outlined in yellow, then
    each method's mask tinted red (the truth outlined over it), titled with its episode IoU."""
    from umtfss.figures import pyplot, save_figure

    plt = pyplot()
    episodes, masks = examples.episodes, examples.masks
    tables = read_tables(tables_dir)
    paths = _image_paths(tables["images"])
    names = dict(zip(tables.classes["class_id"].astype(int), tables.classes["name"].astype(str)))
    columns = 2 + len(masks)
    figure, axes = plt.subplots(len(episodes), columns, figsize=(tile * columns, tile * len(episodes)), squeeze=False)
    for row in range(len(episodes)):
        episode = episodes.iloc[row]
        supports, class_id = list(episode["support_ids"]), int(episode["class_id"])
        support_image, support_label = read_rgb(paths[supports[0]][0]), read_label(paths[supports[0]][1])
        query = read_rgb(paths[episode["query_id"]][0])
        support_mask = binary_mask(support_label, class_id)
        tiles = [(_tinted(support_image, None, TRUTH), support_mask,
                  "support" + (f" 1 of {len(supports)}" if len(supports) > 1 else "")),
                 (_tinted(query, None, TRUTH), examples.targets[row], "query, truth")]
        tiles += [(_tinted(query, masks[m][row], PREDICTION), examples.targets[row], f"{m}: IoU {episode[f'iou_{m}']}")
                  for m in masks]
        for ax, (picture, truth, title) in zip(axes[row], tiles):
            ax.imshow(picture)
            _outline(ax, truth)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(names.get(class_id, str(class_id)), fontsize=9)
    figure.suptitle(f"fold {examples.fold}, {examples.shot}-shot, seed {examples.seed}: "
                    f"the first {len(episodes)} test episodes", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, out)


def cli(parser: argparse.ArgumentParser):
    """Arguments of `umtfss examples`."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON object (evaluation section)")
    parser.add_argument("--dataset", required=True, choices=sorted(config_module.DEFAULT_TEST_EPISODES))
    parser.add_argument("--tables", required=True, help="folder with the prepare stage's parquet tables")
    parser.add_argument("--method", action="append", type=parse_method, required=True, metavar="NAME[=CHECKPOINT]",
                        help="method to draw (repeatable), as for umtfss evaluate ({fold} in a checkpoint path)")
    parser.add_argument("--out", required=True, help="the PNG to write (results/eval_<dataset>_examples.png)")
    parser.add_argument("--count", type=int, help=f"episodes to draw (default {DEFAULT_COUNT}; at most "
                                                 "evaluation.episodes, the episodes evaluate scores per fold)")
    parser.add_argument("--fold", type=int, help="fold (default: the first of evaluation.folds)")
    parser.add_argument("--shot", type=int, help="shots (default: the first of evaluation.shots)")
    parser.add_argument("--seed", type=int, help="evaluation seed (default: the first of evaluation.seeds)")

    def run(args: argparse.Namespace) -> None:
        if Path(args.out).suffix.lower() != ".png":  # the figure is PNG data, whatever the name says
            raise ValueError(f"--out '{args.out}' does not end in .png, but examples writes a PNG figure; "
                             "expected a file name ending in .png")
        config = config_module.load(args.config)
        methods = methods_of(args.method)
        examples = predict_examples(config, args.dataset, args.tables, methods, args.count, args.fold, args.shot,
                                    args.seed, out=args.out, inputs=config_file_input(args.config))
        draw_examples(examples, args.tables, args.out)
        episodes = examples.episodes
        shown = episodes[["query_id", "class_id"] + [c for c in episodes.columns if c.startswith("iou_")]]
        print(shown.to_string(index=False))
        print(f"examples written to {args.out}")

    return run
