"""The `umtfss` command: one subcommand per pipeline stage, each usable without Snakemake."""

from __future__ import annotations

import argparse
import importlib
import sys

from umtfss.threads import cap_cpu_threads

# name -> ("module:function", help). The function adds its arguments to the parser and returns
# the callable that runs the stage; modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("umtfss.doctor:cli", "what this machine gives each stage: versions, GPUs, what 'auto' picks"),
    "demo": ("umtfss.data.demo:cli", "generate the demo data set in PASCAL VOC layout"),
    "convert-sbd": ("umtfss.data.convert:cli_sbd", "merge SBD .mat masks with VOC into SegmentationClassAug PNGs"),
    "convert-coco": ("umtfss.data.convert:cli_coco", "write COCO per-image class-mask PNGs from instance JSON"),
    "prepare": ("umtfss.data.prepare:cli", "write the image list and class/fold tables (parquet)"),
    "embed": ("umtfss.embedding:cli", "per-pixel self-supervised features into a Zarr store (one shard)"),
    "fit": ("umtfss.clustering.fit:cli", "k-means centroids (spherical or euclidean) on a random pixel subset"),
    "assign": ("umtfss.clustering.assign:cli", "nearest-centroid cluster id for every pixel (one shard)"),
    "quality": ("umtfss.clustering.quality:cli", "pseudo-mask quality against ground truth (measurement only)"),
    "episodes": ("umtfss.pseudo_episodes:cli", "pseudo regions and support candidates (parquet)"),
    "train": ("umtfss.training.train:cli", "meta-train or fine-tune the FSS model"),
    "evaluate": ("umtfss.evaluation.run:cli", "meta-test methods on a benchmark, write the score tables"),
    "examples": ("umtfss.evaluation.examples:cli", "draw the first test episodes of a fold: support, truth, each method's mask"),
    "score-table": ("umtfss.evaluation.tables:cli", "a score table as papers print it: mIoU per fold and mean, per shot"),
    "predict": ("umtfss.predict:cli", "segment a query image from support images and masks"),
    "inspect": ("umtfss.inspect:cli", "summarise any artifact (Zarr, parquet, npy, csv, checkpoint) or a folder of them"),
    "plot-training": ("umtfss.figures:cli", "draw the loss curves of train logs into a PNG (for the report)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umtfss", description=__doc__)
    from umtfss import __version__

    parser.add_argument("--version", action="version", version=f"umtfss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no stage is a usage error: the help, on stderr, and exit 2
        build_parser().print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # --help, --version, or argparse's error on an unknown stage
        return 2
    name = argv[0]
    try:
        return _run(name, argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the stage was
        _close_progress_bars()
        print(f"umtfss {name}: interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End the bars a failing stage left open, so its error starts a line of its own and no bar is
    redrawn after it."""
    from umtfss.progress import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _run(name: str, argv: list[str]) -> int:
    target, help_text = COMMANDS[name]
    module_name, func_name = target.split(":")
    parser = argparse.ArgumentParser(prog=f"umtfss {name}", description=help_text)
    cap_cpu_threads()  # before the stage's module imports torch
    runner = getattr(importlib.import_module(module_name), func_name)(parser)
    args = parser.parse_args(argv)
    from umtfss.config import ConfigError

    try:
        runner(args)
    # a user's input (a path, a key, a value), named in one line; anything else is a bug: its traceback
    except (ConfigError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            ValueError) as err:
        _close_progress_bars()
        print(f"umtfss {name}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
