"""Seconds per stage of the demo pipeline, run stage by stage through `umtfss <stage>` without Snakemake.

For machines where Snakemake is not installed (or to time one device): the same commands the rules
run, on a fresh working folder, one shard, every device setting set to --device.

    python benchmarks/stage_timings.py --device cuda --work /tmp/umtfss-gpu
    python benchmarks/stage_timings.py --device cpu --skip-finetune

Prints one line per stage and the 1-shot / 5-shot mIoU averaged over folds of each evaluated method.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="benchmarks/results/stage_timings")
    parser.add_argument("--workers", type=int, default=4, help="data-loading workers of train / evaluate")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()

    config = load(str(ROOT / args.config))
    work = Path(args.work).resolve()
    root = work / "data" / "VOC2012"
    config["datasets"]["pascal"]["root"] = str(root)
    for section in ("embedding", "clustering", "training", "evaluation"):
        config[section]["device"] = args.device
    if args.device != "cpu":  # fit: 'auto' is faiss-gpu when installed, else torch k-means on the GPU
        config["clustering"]["device"] = "auto"
    config["training"]["workers"] = args.workers
    cfg = json.dumps(config)
    umtfss = [sys.executable, "-m", "umtfss.cli"]
    prep, emb, clus = work / "prepare", work / "embeddings.zarr", work / "clusters"
    models = clus / "models"
    methods = ["all-background", "prototype-threshold", f"unsup={models / 'unsup' / 'checkpoint.pt'}"]
    stages = [
        ("demo", ["demo", "--config", cfg, "--out", str(root), "--no-progress"]),
        ("prepare", ["prepare", "--config", cfg, "--dataset", "pascal", "--out", str(prep), "--no-progress"]),
        ("embed", ["embed", "--config", cfg, "--images", str(prep / "images.parquet"), "--shard", "0",
                   "--num-shards", "1", "--out", str(emb)]),
        ("fit", ["fit", "--config", cfg, "--embeddings", str(emb), "--out-centroids", str(clus / "centroids.npy"),
                 "--out-meta", str(clus / "fit.json")]),
        ("assign", ["assign", "--config", cfg, "--embeddings", str(emb), "--centroids", str(clus / "centroids.npy"),
                    "--images", str(prep / "images.parquet"), "--out", str(clus / "labels.zarr")]),
        ("episodes", ["episodes", "--config", cfg, "--labels", str(clus / "labels.zarr"), "--embeddings", str(emb),
                      "--out-dir", str(clus)]),
        ("train unsup", ["train", "--config", cfg, "--method", "unsup", "--out-dir", str(models / "unsup"),
                         "--episodes", str(clus), "--labels", str(clus / "labels.zarr"),
                         "--images", str(prep / "images.parquet"), "--quiet"]),
    ]
    if not args.skip_finetune:
        for fold in config["evaluation"]["folds"]:
            stages.append((f"finetune-20% fold {fold}", [
                "train", "--config", cfg, "--method", "finetune-20%", "--out-dir", str(models / f"finetune-fold{fold}"),
                "--init", str(models / "unsup" / "checkpoint.pt"), "--tables", str(prep), "--dataset", "pascal",
                "--fold", str(fold), "--quiet"]))
        methods.append(f"finetune-20%={models / 'finetune-fold{fold}' / 'checkpoint.pt'}")
    stages.append(("evaluate", ["evaluate", "--config", cfg, "--dataset", "pascal", "--tables", str(prep),
                                *[a for m in methods for a in ("--method", m)], "--out", str(work / "eval.csv"),
                                "--classes-out", str(work / "eval_classes.csv"), "--workers", str(args.workers)]))

    total = time.perf_counter()
    for name, command in stages:
        started = time.perf_counter()
        result = subprocess.run(umtfss + command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        if result.returncode:
            sys.exit(f"stage {name} failed:\n{result.stderr[-3000:]}")
        print(f"{name:24s} {time.perf_counter() - started:8.1f} s", flush=True)
    print(f"{'total':24s} {time.perf_counter() - total:8.1f} s")
    scores = pd.read_csv(work / "eval.csv")
    print(scores.groupby(["method", "shot"])[["miou", "fbiou"]].mean().round(2).unstack("shot").to_string())


if __name__ == "__main__":
    main()
