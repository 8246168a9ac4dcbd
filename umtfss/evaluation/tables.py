"""The score table as FSS papers print it: a row per method, each fold's mIoU and their mean per shot."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from umtfss.io import atomic_path, read_csv_table

REQUIRED = ("method", "fold", "shot", "seed", "miou", "fbiou")
NUMERIC = ("fold", "shot", "seed", "miou", "fbiou")
EXPECTED = "results/eval_<dataset>.csv from the evaluate stage"


def is_score_table(columns) -> bool:
    return set(REQUIRED) <= set(columns)


def check_score_rows(scores: pd.DataFrame, source: str | Path) -> None:
    """Refuse a row without one of the required fields, or with text where a number goes: a truncated
    or hand-edited CSV would otherwise print a partial table (a 'nan' mean) with exit status 0."""
    problems: dict[int, list[str]] = {}
    for column in REQUIRED:
        values = scores[column]
        for row in values.index[values.isna()]:
            problems.setdefault(row, []).append(f"no {column}")
        if column in NUMERIC:
            text = values.notna() & pd.to_numeric(values, errors="coerce").isna()
            for row in values.index[text]:
                problems.setdefault(row, []).append(f"{column} {values[row]!r} (not a number)")
    if problems:
        first = min(problems)
        line = scores.index.get_loc(first) + 2  # line 1 is the header
        raise ValueError(f"score table '{source}' line {line}: {', '.join(problems[first])}; expected every row to "
                         f"hold {', '.join(REQUIRED)} ({len(problems)} of {len(scores)} rows do not: a truncated "
                         f"or edited file? rerun the evaluate stage)")


def read_score_table(path: str | Path) -> pd.DataFrame:
    """The score CSV at `path`, checked: a CSV file with the required columns, each row complete."""
    scores = read_csv_table(path, "score table", REQUIRED, EXPECTED)
    check_score_rows(scores, path)
    return scores


def _mean_std(values: pd.Series) -> str:
    """'80.4' for one seed, '80.4 ± 0.4' (std over seeds) for several."""
    if len(values) < 2:
        return f"{values.mean():.1f}"
    return f"{values.mean():.1f} ± {values.std():.1f}"


def paper_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method (in the table's order) and shot: each fold's mIoU (mean over seeds), the 4-fold mean
    mIoU and mean FB-IoU, each ± its std over seeds when there are several (the mean over folds is
    taken per seed first, as the reference code reports a run)."""
    missing = [c for c in REQUIRED if c not in scores.columns]
    if missing:
        raise ValueError(f"score table has no column(s) {', '.join(missing)}; expected the evaluate stage's "
                         f"results/eval_<dataset>.csv ({', '.join(REQUIRED)})")
    folds = sorted(scores["fold"].unique())
    rows = []
    for method in scores["method"].drop_duplicates():
        row = {"method": method}
        for shot in sorted(scores["shot"].unique()):
            part = scores[(scores["method"] == method) & (scores["shot"] == shot)]
            for fold in folds:
                cell = part.loc[part["fold"] == fold, "miou"]
                row[f"{shot}-shot fold{fold}"] = f"{cell.mean():.1f}" if len(cell) else ""
            per_seed = part.groupby("seed")[["miou", "fbiou"]].mean()
            row[f"{shot}-shot mean"] = _mean_std(per_seed["miou"]) if len(per_seed) else ""
            row[f"{shot}-shot FB-IoU"] = _mean_std(per_seed["fbiou"]) if len(per_seed) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def cli(parser: argparse.ArgumentParser):
    """`umtfss score-table`: the paper-layout table of a score CSV, printed and optionally written as Markdown."""
    parser.add_argument("scores", type=Path, help="results/eval_<dataset>.csv from the evaluate stage")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as Markdown to this file")

    def run(args: argparse.Namespace) -> None:
        scores = read_score_table(args.scores)
        seeds = scores["seed"].nunique()
        text = (f"mIoU and FB-IoU (%) of {args.scores}; mean over {seeds} evaluation seed(s)"
                + (", ± std over seeds" if seeds > 1 else "") + "\n\n" + markdown(paper_table(scores)))
        print(text, end="")
        if args.out is not None:
            with atomic_path(args.out) as tmp:
                tmp.write_text(text)

    return run
