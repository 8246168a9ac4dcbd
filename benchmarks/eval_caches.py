"""Benchmark: the meta-test with and without one of its caches, side by side in one run.

--cache feature (evaluation.feature_cache_mb): the frozen backbone's features of each test image are
kept once computed, so the backbone runs once per image and fold instead of once per query and support
of every episode. --cache image (evaluation.image_cache_mb): each test image is decoded and brought to
test size once per fold, for every method, shot and seed, instead of once per batch. Runs `evaluate` on
a prepared benchmark with the cache off (0) and on, alternating `--repeats` times, and reports seconds,
episodes per second, their ratio, what the cache reused and held, and whether the two score tables are
identical (they must be).

    snakemake --cores 2 results/eval_pascal.csv    # first: the demo's tables and checkpoints
    python benchmarks/eval_caches.py               # features; the demo: fold 0, 1- and 5-shot, 300 episodes
    python benchmarks/eval_caches.py --method prototype-threshold --episodes 100
    python benchmarks/eval_caches.py --cache image --demo-methods   # the demo's four methods, test images
    python benchmarks/eval_caches.py --predict 64   # umtfss predict: 64 queries, 5 shots

With --predict Q: `umtfss predict` on the first Q test images with 5 supports drawn from the train
images (`--support-from`), the supports' backbone features computed once per run (the default) against
once per query batch (the path of a model that cannot take them), masks compared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

DEMO_MODELS = "results/pascal/demo-colortexture/clusters-50/models/demo-colortexture-prototype"
DEMO_CHECKPOINT = f"{DEMO_MODELS}/unsup/checkpoint.pt"
DEMO_METHODS = {"all-background": None, "prototype-threshold": None, "unsup": DEMO_CHECKPOINT,
                "finetune-20%": f"{DEMO_MODELS}/finetune-20%/pascal/fold{{fold}}/checkpoint.pt"}  # config.yaml's
CACHE_LINES = ("feature cache", "test-image cache")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--tables", default="results/pascal/prepare", help="prepare folder of the benchmark")
    parser.add_argument("--dataset", default="pascal")
    parser.add_argument("--method", default="unsup", help="unsup (with --checkpoint) or prototype-threshold")
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--cache", choices=["feature", "image"], default="feature",
                        help="which cache to turn off and on: evaluation.feature_cache_mb or image_cache_mb")
    parser.add_argument("--mb", type=float, help="its size when on (default: the schema's)")
    parser.add_argument("--demo-methods", action="store_true",
                        help="score the demo's four methods (config.yaml's evaluation.methods) instead of --method")
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs, alternating")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--predict", type=int, metavar="Q", help="measure umtfss predict on Q queries instead")
    parser.add_argument("--shots-predict", type=int, default=5)
    args = parser.parse_args(argv)
    if args.predict:
        return measure_predict(args)

    from umtfss.config import load
    from umtfss.evaluation.run import evaluate

    methods = dict(DEMO_METHODS) if args.demo_methods else {
        args.method: None if args.method == "prototype-threshold" else args.checkpoint}
    for checkpoint in filter(None, methods.values()):
        for fold in args.folds:
            if not Path(checkpoint.format(fold=fold)).is_file():
                raise SystemExit(f"checkpoint '{checkpoint.format(fold=fold)}' does not exist: run the demo first "
                                 "(snakemake --cores 2 results/eval_pascal.csv) or pass --checkpoint")
    torch.set_num_threads(args.threads)
    config = load(args.config)
    config["evaluation"].update(folds=args.folds, shots=args.shots, episodes=args.episodes, device=args.device,
                                seeds=[321])
    key = f"{args.cache}_cache_mb"
    size = args.mb if args.mb is not None else config["evaluation"][key]
    runs = {0.0: [], size: []}
    tables, logs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mb in runs:
                config["evaluation"][key] = mb
                err = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    scores, _ = evaluate(config, args.dataset, args.tables, methods, Path(tmp) / "s.csv",
                                         Path(tmp) / "c.csv")
                runs[mb].append(time.perf_counter() - start)
                tables[mb] = scores
                logs[mb] = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines()
                            if line.startswith(CACHE_LINES)]
    episodes = args.episodes * len(args.folds) * len(args.shots) * len(methods)
    off, on = min(runs[0.0]), min(runs[size])
    identical = tables[0.0].equals(tables[size])
    print(json.dumps({
        "cache": key, "methods": list(methods), "folds": args.folds, "shots": args.shots, "episodes": episodes,
        "threads": args.threads, "device": args.device,
        "seconds_off": [round(s, 2) for s in runs[0.0]], "seconds_on": [round(s, 2) for s in runs[size]],
        "episodes_per_s_off": round(episodes / off, 1), "episodes_per_s_on": round(episodes / on, 1),
        "speed-up": round(off / on, 2), "scores_identical": identical, "cache_lines_on": logs[size],
    }, indent=1))
    if not identical:
        raise SystemExit("the score tables differ between the cache off and on")


def measure_predict(args) -> None:
    """umtfss predict with the supports' features shared across query batches, and recomputed per batch."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from umtfss import predict as predict_module
    from umtfss.cli import main as cli

    images = pd.read_parquet(Path(args.tables) / "images.parquet")
    queries = images[images["split"] == "val"]["image_path"].head(args.predict).tolist()
    torch.set_num_threads(args.threads)
    shares = predict_module.takes_features
    runs = {"shared": [], "per_batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "queries"
        folder.mkdir()
        for path in queries:
            (folder / Path(path).name).symlink_to(Path(path).resolve())
        for repeat in range(args.repeats):
            for mode in runs:
                predict_module.takes_features = shares if mode == "shared" else (lambda model: False)
                start = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    code = cli(["predict", "--checkpoint", args.checkpoint, "--support-from", args.tables,
                                "--support-class", "1", "--shots", str(args.shots_predict), "--query", str(folder),
                                "--out", str(Path(tmp) / mode), "--device", args.device, "--batch", "8"])
                runs[mode].append(time.perf_counter() - start)
                if code:
                    raise SystemExit(f"umtfss predict failed ({mode})")
        predict_module.takes_features = shares
        same = all(np.array_equal(np.asarray(Image.open(Path(tmp) / "shared" / p.name)),
                                  np.asarray(Image.open(Path(tmp) / "per_batch" / p.name)))
                   for p in (Path(tmp) / "shared").glob("*.png"))
    print(json.dumps({"queries": len(queries), "shots": args.shots_predict, "threads": args.threads,
                      "seconds_shared": [round(s, 2) for s in runs["shared"]],
                      "seconds_per_batch": [round(s, 2) for s in runs["per_batch"]],
                      "speed-up": round(min(runs["per_batch"]) / min(runs["shared"]), 2), "masks_identical": same},
                     indent=1))
    if not same:
        raise SystemExit("the masks differ between the two paths")


if __name__ == "__main__":
    main()
