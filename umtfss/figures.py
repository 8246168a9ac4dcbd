"""Training-curve figures for `snakemake --report`: loss per step of each trained method, one panel per method."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from umtfss.io import atomic_path, read_csv_table

LOG_COLUMNS = ("step", "loss")  # what a train log.csv must hold for a curve (it also has epoch, lr_*, seconds)


def read_training_log(path: str | Path) -> pd.DataFrame:
    """A train stage's log.csv (step, loss, ...), checked: the file exists, has the columns and one row or more."""
    log = read_csv_table(path, "training log", LOG_COLUMNS, "the log.csv beside a checkpoint.pt")
    if log.empty:
        raise ValueError(f"training log '{path}' has no step (a header only)")
    return log


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each step (fewer at the start); NaN losses are left out."""
    return pd.Series(values, dtype=np.float64).rolling(window, min_periods=1).mean().to_numpy()


def pyplot():
    """matplotlib's pyplot drawing into files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(figure, out: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically and free it."""
    out = Path(out)
    with atomic_path(out) as temp:
        figure.savefig(temp, format="png", dpi=dpi)
    pyplot().close(figure)
    return out


def plot_training_curves(logs: list[tuple[str, str | Path]], out: str | Path, smooth: int = 25) -> Path:
    """A PNG with one panel per method: the loss of every step (thin) and its running mean over `smooth`
    steps (bold), one line per log of that method (the folds of a fine-tuning, labelled by their folder).

    `logs` is a list of (method, log.csv path); all logs are read and checked before anything is drawn.
    """
    if not logs:
        raise ValueError("no training log to plot (expected one or more METHOD=PATH)")
    if smooth < 1:
        raise ValueError(f"smoothing window is {smooth}, expected >= 1 step")
    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for method, path in logs:
        panels.setdefault(method, []).append((Path(path).parent.name, read_training_log(path)))
    plt = pyplot()
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (method, runs) in zip(axes.flat, panels.items()):
        for index, (name, log) in enumerate(runs):
            colour = f"C{index % 10}"
            steps, loss = log["step"].to_numpy(), log["loss"].to_numpy(dtype=np.float64)
            ax.plot(steps, loss, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, running_mean(loss, smooth), color=colour, linewidth=1.8,
                    label=name if len(runs) > 1 else f"mean of {smooth} steps")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.tight_layout()
    return save_figure(figure, out)


def _method_and_path(text: str) -> tuple[str, str]:
    method, sep, path = text.partition("=")
    if not sep or not method or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not METHOD=PATH (e.g. unsup=results/.../unsup/log.csv)")
    return method, path


def cli(parser: argparse.ArgumentParser):
    """`umtfss plot-training`: the loss curves of train logs into one PNG."""
    parser.add_argument("--log", action="append", type=_method_and_path, required=True, metavar="METHOD=PATH",
                        help="a train log.csv and its method's name (repeatable; logs of one method share a panel)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--smooth", type=int, default=25, help="steps in the running mean (default 25)")

    def run(args: argparse.Namespace) -> None:
        print(f"training curves written to {plot_training_curves(args.log, args.out, args.smooth)}")

    return run
