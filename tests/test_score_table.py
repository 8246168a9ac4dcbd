"""`umtfss score-table`: the score CSV in the papers' layout, numbers checked by hand."""

import pandas as pd
import pytest

from umtfss.cli import main
from umtfss.evaluation.tables import paper_table
from umtfss.inspect import summarise


def scores():
    """Two methods, folds 0 and 1, shots 1 and 5, seeds 321 and 322; mIoU = base + fold + shot + seed offset."""
    rows = []
    for method, base in (("unsup", 60.0), ("all-background", 0.0)):
        for fold in (0, 1):
            for shot in (1, 5):
                for seed, offset in ((321, 0.0), (322, 2.0)):
                    miou = base + 10 * fold + shot + offset if base else 0.0
                    rows.append({"method": method, "fold": fold, "shot": shot, "seed": seed, "miou": miou,
                                 "fbiou": 40.0 + offset, "episodes": 6})
    return pd.DataFrame(rows)


def test_folds_means_and_std_over_seeds():
    table = paper_table(scores()).set_index("method")
    assert list(table.index) == ["unsup", "all-background"]  # the CSV's order
    unsup = table.loc["unsup"]
    # fold 0, 1-shot: seeds give 61 and 63 -> 62.0; fold 1: 71 and 73 -> 72.0
    assert (unsup["1-shot fold0"], unsup["1-shot fold1"]) == ("62.0", "72.0")
    # the fold mean per seed: 66 (seed 321) and 68 (322) -> 67.0 ± 1.4 (sample std)
    assert unsup["1-shot mean"] == "67.0 ± 1.4"
    assert unsup["5-shot mean"] == "71.0 ± 1.4" and unsup["5-shot FB-IoU"] == "41.0 ± 1.4"
    assert table.loc["all-background", "1-shot mean"] == "0.0 ± 0.0"
    one_seed = paper_table(scores().query("seed == 321")).set_index("method")
    assert one_seed.loc["unsup", "1-shot mean"] == "66.0"  # one seed: no ± part


def test_cli_writes_markdown_and_inspect_shows_the_layout(tmp_path, capsys):
    csv = tmp_path / "eval_pascal.csv"
    scores().to_csv(csv, index=False)
    out = tmp_path / "eval_pascal.md"
    assert main(["score-table", str(csv), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    lines = text.splitlines()
    assert "mean over 2 evaluation seed(s), ± std over seeds" in lines[0]
    assert lines[2].startswith("| method | 1-shot fold0 | 1-shot fold1 | 1-shot mean | 1-shot FB-IoU | 5-shot fold0")
    assert lines[3].startswith("|---|") and lines[4].startswith("| unsup | 62.0 | 72.0 | 67.0 ± 1.4 |")
    assert "67.0 ± 1.4" in summarise(csv)


def test_errors_name_the_file_and_the_missing_columns(tmp_path):
    assert main(["score-table", str(tmp_path / "nope.csv")]) == 1
    with pytest.raises(ValueError, match=r"no column\(s\) seed, fbiou"):
        paper_table(pd.DataFrame({"method": ["a"], "fold": [0], "shot": [1], "miou": [1.0]}))


def test_a_file_that_is_not_a_csv_is_named(tmp_path, capsys):
    path = tmp_path / "eval_pascal.md"
    path.write_text("| method | 1-shot |\n|---|---|\nunsup, 80, 1, 2, 3\n")
    assert main(["score-table", str(path)]) == 1
    assert f"score table '{path}' is not a CSV file" in capsys.readouterr().err


def test_a_truncated_score_table_is_refused_with_its_line(tmp_path, capsys):
    csv = tmp_path / "eval_pascal.csv"
    scores().to_csv(csv, index=False)
    truncated = tmp_path / "t.csv"
    lines = csv.read_text().splitlines()  # as `head -c` leaves it: the header, a row, the second cut after miou
    truncated.write_text("\n".join(lines[:2]) + "\n" + lines[2].rsplit(",", 2)[0])
    for command in ("score-table", "inspect"):
        assert main([command, str(truncated)]) == 1
        captured = capsys.readouterr()
        assert f"score table '{truncated}' line 3: no fbiou" in captured.err and "nan" not in captured.out
    edited = scores()
    edited["miou"] = edited["miou"].astype(object)
    edited.loc[4, "miou"] = "61,0"
    edited.to_csv(csv, index=False)
    assert main(["score-table", str(csv)]) == 1
    assert "line 6: miou '61,0' (not a number)" in capsys.readouterr().err


def test_a_folder_is_not_a_score_table(tmp_path, capsys):
    assert main(["score-table", str(tmp_path)]) == 1
    assert f"score table '{tmp_path}' is a folder, expected a CSV file" in capsys.readouterr().err
