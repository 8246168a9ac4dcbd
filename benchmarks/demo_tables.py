"""The shape of the paper's Tables 1-4 on the demo: reference predictors, unsup, finetune-20%, vanilla attention, K_fg/K_bg.

Runs the default pipeline (snakemake, so existing artifacts are reused) including

  * `finetune-20%`: the unsup model fine-tuned per fold on 20 % of the labelled train images
    (base classes only; paper Table 2; training.finetune_epochs of config.yaml),

then trains, on the same pseudo episodes with the same schedule,

  * `unsup-vanilla`: unsupervised meta-training with vanilla cross-attention (paper Table 3),
  * with `--prototypes FG:BG ...`, `unsup-K<FG>-<BG>`: prototype attention with FG foreground and BG
    background prototypes (paper Table 4; the config's own pair is `unsup`),

and meta-tests everything on the same 1-shot episodes (several evaluation seeds give the noise):

    python benchmarks/demo_tables.py                       # default config.yaml, seeds 321 322 323
    python benchmarks/demo_tables.py --training-seeds 0 1  # Table 3 over two training seeds as well
    python benchmarks/demo_tables.py --prototypes 1:100 10:100 50:20 50:50   # Table 4 too

Each extra training seed trains `unsup` and `unsup-vanilla` once more on the same pseudo episodes
(training.seed changes episode order, augmentation and initialisation; about 3 min each on the demo
CPU), evaluated as `unsup@seed<s>` and `unsup-vanilla@seed<s>` (and each `unsup-K<FG>-<BG>@seed<s>`):
one training seed can move the demo's score by a point or two, more than the prototype/vanilla difference.

Writes benchmarks/results/demo_tables.csv (one row per method, fold, seed) and prints the 1-shot mIoU
per method, averaged over folds, as mean +- std over the evaluation seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from umtfss.config import load

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[:3]), "...", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def pipeline_paths(config: dict) -> dict[str, str]:
    """The default pipeline's artifact paths (the naming of workflow/rules/common.smk)."""
    src = config["unlabeled"]["name"] if config["unlabeled"]["source"] == "folder" else config["unlabeled"]["source"]
    embedder = config["embedding"]["backbone"] + (f"-d{config['embedding']['dim']}" if config["embedding"]["dim"] else "")
    shards = config["embedding"]["shards"]
    clusters = f"results/{src}/{embedder}/clusters-{config['clustering']['clusters']}"
    model_tag = f"{config['model']['backbone']}-{config['model']['attention']}"
    return {
        "src": src, "clusters_dir": clusters,
        "labels": [f"{clusters}/labels/shard-{i}-of-{shards}.zarr" for i in range(shards)],
        "images": f"results/{src}/prepare/images.parquet", "tables": f"results/{src}/prepare",
        "unsup": f"{clusters}/models/{model_tag}/unsup/checkpoint.pt",
        "finetune": f"{clusters}/models/{model_tag}/finetune-20%/pascal/fold{{fold}}/checkpoint.pt",
        "embedder": embedder,
    }


def prototype_pair(text: str) -> tuple[int, int]:
    fg, sep, bg = text.partition(":")
    if not sep or not fg.isdigit() or not bg.isdigit() or int(fg) < 1 or int(bg) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not FG:BG with two positive prototype counts (e.g. 10:100)")
    return int(fg), int(bg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[321, 322, 323], help="evaluation seeds")
    parser.add_argument("--training-seeds", type=int, nargs="+", default=None,
                        help="training seeds of unsup and unsup-vanilla (default: config's training.seed only)")
    parser.add_argument("--prototypes", type=prototype_pair, nargs="+", default=[], metavar="FG:BG",
                        help="Table 4: also train with FG foreground and BG background prototypes per pair")
    parser.add_argument("--out", default="benchmarks/results/demo_tables.csv")
    args = parser.parse_args()

    config = load(str(ROOT / args.config))
    if config["unlabeled"]["source"] != "pascal":
        sys.exit("demo_tables.py measures on the PASCAL-layout benchmark; set unlabeled.source: pascal")
    paths = pipeline_paths(config)
    work = ROOT / "benchmarks/results/demo_tables"
    umtfss = [sys.executable, "-m", "umtfss.cli"]
    started = time.perf_counter()
    finetune = paths["finetune"]
    folds = config["evaluation"]["folds"]
    run(["snakemake", "results/eval_pascal.csv", *[finetune.format(fold=f) for f in folds], "--cores", str(args.cores),
         "--configfile", args.config, "--rerun-triggers", "mtime"])

    timings = {}
    base_seed = config["training"]["seed"]
    training_seeds = list(dict.fromkeys(args.training_seeds or [base_seed]))
    own_pair = (config["model"]["prototypes_fg"], config["model"]["prototypes_bg"])
    variants = {"unsup": {}, "unsup-vanilla": {"attention": "vanilla"}}  # method -> model keys changed
    pair_of = {"unsup": own_pair}  # Table 4's models -> (K_fg, K_bg)
    pair_of.update({f"unsup-K{fg}-{bg}": (fg, bg) for fg, bg in dict.fromkeys(args.prototypes) if (fg, bg) != own_pair})
    variants.update({name: {"attention": "prototype", "prototypes_fg": fg, "prototypes_bg": bg}
                     for name, (fg, bg) in pair_of.items() if name != "unsup"})
    models = {}  # method name -> checkpoint
    for seed in training_seeds:
        suffix = "" if seed == base_seed else f"@seed{seed}"
        folder = work if seed == base_seed else work / f"seed{seed}"
        for variant, changes in variants.items():
            name = variant + suffix
            if variant == "unsup" and seed == base_seed:
                models[name] = paths["unsup"]  # the pipeline's own model
                continue
            out_dir = folder / variant
            # always run: train resumes a finished run of the same config and inputs at once, and starts over otherwise
            section = {"model": {**config["model"], **changes},
                       "training": {**config["training"], "seed": seed}, "unlabeled": config["unlabeled"]}
            t = time.perf_counter()
            run(umtfss + ["train", "--config", json.dumps(section), "--method", "unsup", "--out-dir", str(out_dir),
                          "--episodes", paths["clusters_dir"], "--labels", *paths["labels"],
                          "--images", paths["images"], "--quiet"])
            timings[f"train {name}"] = time.perf_counter() - t
            models[name] = str(out_dir / "checkpoint.pt")
    evaluation = {**config["evaluation"], "shots": [1], "seeds": args.seeds}
    out = ROOT / args.out
    t = time.perf_counter()
    run(umtfss + ["evaluate", "--config", json.dumps({"evaluation": evaluation, "model": config["model"],
                                                      "datasets": config["datasets"]}),
                  "--dataset", "pascal", "--tables", paths["tables"],
                  "--method", "all-background", "--method", "prototype-threshold",
                  *[part for name, checkpoint in models.items() for part in ("--method", f"{name}={checkpoint}")],
                  "--method", f"finetune-20%={finetune}",
                  "--out", str(out), "--classes-out", str(out.with_name(out.stem + "_classes.csv")),
                  "--meta", f"embedder={paths['embedder']}", "--meta", f"clusters={config['clustering']['clusters']}",
                  "--meta", f"unlabeled={paths['src']}"])
    timings["evaluate"] = time.perf_counter() - t

    scores = pd.read_csv(out)
    per_seed = scores.groupby(["method", "seed"])[["miou", "fbiou"]].mean()  # mean over folds
    summary = per_seed.groupby("method").agg(["mean", "std"]).round(2)
    folds = scores.groupby(["method", "fold"])["miou"].mean().unstack().round(1)
    print(f"\n1-shot, {evaluation['episodes'] or 1000} episodes per fold, seeds {args.seeds}; "
          f"mIoU / FB-IoU mean over folds, mean and std over seeds:")
    print(summary.to_string())
    print("\nmIoU per fold (mean over seeds):")
    print(folds.to_string())
    if len(training_seeds) > 1:
        scores["model"] = scores["method"].str.split("@").str[0]
        per_run = scores[scores["model"].isin(["unsup", "unsup-vanilla"])].groupby(
            ["model", "method", "seed"])[["miou", "fbiou"]].mean()  # mean over folds
        by_training_seed = per_run.groupby(["model", "method"]).mean().round(2)
        print(f"\nTable 3 over training seeds {training_seeds} (mean over evaluation seeds, then over training seeds):")
        print(by_training_seed.to_string())
        print(by_training_seed.groupby("model").agg(["mean", "std"]).round(2).to_string())
    if args.prototypes:
        scores["model"] = scores["method"].str.split("@").str[0]
        table4 = scores[scores["model"].isin(pair_of)].copy()
        table4["K_fg"] = table4["model"].map(lambda m: pair_of[m][0])
        table4["K_bg"] = table4["model"].map(lambda m: pair_of[m][1])
        grid = table4.groupby(["K_bg", "K_fg"])["miou"].mean().unstack().round(2)  # over folds, seeds, training seeds
        print("\nTable 4: 1-shot mIoU by K_bg (rows) and K_fg (columns), mean over folds and seeds:")
        print(grid.to_string())
    print("\nseconds:", {k: round(v) for k, v in timings.items()}, "total", round(time.perf_counter() - started))


if __name__ == "__main__":
    main()
