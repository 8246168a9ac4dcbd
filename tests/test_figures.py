"""The report's training-curve figure: panels per method, running mean, clear errors, nothing half-written."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from umtfss import cli
from umtfss.figures import plot_training_curves, read_training_log, running_mean


def write_log(path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, len(losses) + 1)
    pd.DataFrame({"step": steps, "epoch": 1, "loss": losses, "lr_adamw": 1e-4, "seconds": 0.1}).to_csv(path, index=False)
    return path


def test_running_mean_averages_the_last_window_and_skips_nan():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0, 9.0])
    mean = running_mean(values, 3)
    assert mean[0] == 1.0 and mean[1] == 2.0  # fewer steps at the start
    assert mean[2] == 2.0  # a NaN step is left out of its window
    assert mean[3] == 4.0 and mean[4] == 6.0 and mean[5] == 7.0
    np.testing.assert_allclose(running_mean(values[[0, 1, 3]], 1), values[[0, 1, 3]])


def test_one_panel_per_method_and_folds_share_their_method_panel(tmp_path):
    unsup = write_log(tmp_path / "unsup/log.csv", np.linspace(0.7, 0.2, 60))
    folds = [write_log(tmp_path / f"finetune/fold{f}/log.csv", np.full(30, 0.1 + f / 100)) for f in range(4)]
    one = plot_training_curves([("unsup", unsup)], tmp_path / "one.png")
    two = plot_training_curves([("unsup", unsup)] + [("finetune-20%", p) for p in folds], tmp_path / "two.png")
    four = plot_training_curves([(f"m{i}", unsup) for i in range(4)], tmp_path / "four.png")
    # 5 x 3.4 inches per panel at 100 dpi; at most 3 panels a row
    assert Image.open(one).size == (500, 340)
    assert Image.open(two).size == (1000, 340)
    assert Image.open(four).size == (1500, 680)
    # the curve is drawn from the data: another loss gives another picture
    write_log(tmp_path / "other/log.csv", np.linspace(0.2, 0.7, 60))
    other = plot_training_curves([("unsup", tmp_path / "other/log.csv")], tmp_path / "other.png")
    assert not np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(other)))


def test_a_nan_loss_step_is_drawn_around(tmp_path):
    losses = np.linspace(0.7, 0.2, 40)
    losses[10] = np.nan
    out = plot_training_curves([("unsup", write_log(tmp_path / "u/log.csv", losses))], tmp_path / "nan.png")
    assert Image.open(out).size == (500, 340)


def test_bad_logs_name_the_file_and_leave_no_figure(tmp_path):
    good = write_log(tmp_path / "good/log.csv", np.linspace(0.7, 0.2, 10))
    out = tmp_path / "curves.png"
    with pytest.raises(FileNotFoundError, match="missing/log.csv"):
        plot_training_curves([("unsup", good), ("sup", tmp_path / "missing/log.csv")], out)
    no_loss = tmp_path / "noloss/log.csv"
    no_loss.parent.mkdir()
    no_loss.write_text("step,epoch\n1,1\n")
    with pytest.raises(ValueError, match=r"noloss/log.csv' lacks column\(s\) loss"):
        plot_training_curves([("unsup", no_loss)], out)
    header_only = tmp_path / "empty/log.csv"
    header_only.parent.mkdir()
    header_only.write_text("step,epoch,loss\n")
    with pytest.raises(ValueError, match="has no step"):
        read_training_log(header_only)
    with pytest.raises(ValueError, match="smoothing window is 0"):
        plot_training_curves([("unsup", good)], out, smooth=0)
    assert not out.exists() and list(tmp_path.glob("*.png")) == []


def test_cli_writes_the_figure_and_refuses_a_log_without_method(tmp_path, capsys):
    log = write_log(tmp_path / "unsup/log.csv", np.linspace(0.7, 0.2, 10))
    out = tmp_path / "training.png"
    assert cli.main(["plot-training", "--log", f"unsup={log}", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert cli.main(["plot-training", "--log", f"unsup={tmp_path / 'none.csv'}", "--out", str(tmp_path / "x.png")]) == 1
    assert "none.csv' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot-training", "--log", str(log), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "is not METHOD=PATH" in capsys.readouterr().err


def test_a_folder_given_as_log_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "unsup").mkdir()
    assert cli.main(["plot-training", "--log", f"unsup={tmp_path / 'unsup'}", "--out", str(tmp_path / "x.png")]) == 1
    assert f"training log '{tmp_path / 'unsup'}' is a folder, expected a CSV file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
