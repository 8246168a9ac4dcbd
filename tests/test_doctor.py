"""`umtfss doctor`: the report states this machine's facts, as the stages will find them."""

import os

import faiss
import pytest
import torch

from umtfss.cli import main
from umtfss.clustering.fit import choose_backend


def test_report_matches_what_the_stages_see(tmp_path, capsys):
    assert main(["doctor", "--path", str(tmp_path)]) == 0
    rows = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in capsys.readouterr().out.splitlines()}
    assert rows["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert rows["faiss GPUs"] == str(faiss.get_num_gpus())
    backend, device = choose_backend("auto", "auto")
    assert rows["fit (backend auto)"] == f"{backend} k-means on {device}"
    if torch.cuda.is_available():
        assert "cuda:0" in rows and "GiB" in rows["cuda:0"]
    else:
        assert rows["cuda"].startswith("not available")
    assert rows["disk"].endswith(f"free at {tmp_path.resolve()}")
    assert rows["cpu"].startswith(f"{os.cpu_count()} cores")
    assert ("faiss" in rows) == ("faiss-cpu" in rows and "faiss-gpu" in rows)  # the warning when both are there


def test_both_faiss_wheels_are_named_as_a_conflict(tmp_path, monkeypatch):
    from umtfss import doctor

    versions = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda name: versions.get(name) or real(name))
    rows = dict(doctor.report(tmp_path))
    assert "both installed" in rows["faiss"] and "pip uninstall -y faiss-cpu faiss-gpu" in rows["faiss"]
    monkeypatch.setattr(doctor, "_version", lambda name: None if name == "faiss-gpu" else real(name))
    assert "faiss" not in dict(doctor.report(tmp_path))


def test_a_path_not_created_yet_or_a_file_still_gets_every_row(tmp_path, capsys):
    """--path DIR that does not exist yet (the stages create it): free disk at its nearest existing parent,
    said so, and every other row; a file: its folder, said so."""
    assert main(["doctor", "--path", str(tmp_path)]) == 0
    topics = [line.split("  ", 1)[0].strip() for line in capsys.readouterr().out.splitlines()]
    missing = tmp_path / "results" / "run1"
    assert main(["doctor", "--path", str(missing)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in out.splitlines()}
    assert [line.split("  ", 1)[0].strip() for line in out.splitlines()] == topics
    assert f"free at {tmp_path.resolve()} " in rows["disk"] and str(missing.resolve()) in rows["disk"]
    assert "does not exist" in rows["disk"]
    (tmp_path / "notes.txt").write_text("a file")
    assert main(["doctor", "--path", str(tmp_path / "notes.txt")]) == 0
    disk = [line for line in capsys.readouterr().out.splitlines() if line.startswith("disk")][0]
    assert f"free at {tmp_path.resolve()} " in disk and "expects a folder" in disk
    assert not missing.exists()


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """A stage interrupted by Ctrl-C: `umtfss <stage>: interrupted` on stderr, exit 130, no traceback."""
    from umtfss import doctor

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(doctor, "report", interrupted)
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err.strip() == "umtfss doctor: interrupted"


def test_no_stage_is_a_usage_error(capsys):
    """`umtfss` alone prints the help and exits 2, as a usage error; --help itself exits 0."""
    assert main([]) == 2
    assert "usage: umtfss" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_an_error_starts_its_own_line_after_an_open_progress_bar(monkeypatch, capsys):
    """A stage failing inside a tqdm loop: the bar is ended before the error, not redrawn after it."""
    import sys

    from tqdm import tqdm

    from umtfss import cli

    def failing(args):
        bar = tqdm(total=10, desc="work", file=sys.stderr)
        bar.update(3)
        raise ValueError("boom")

    monkeypatch.setattr("umtfss.doctor.cli", lambda parser: failing)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "\numtfss doctor: error: boom" in err and err.rstrip().endswith("umtfss doctor: error: boom")
    assert not list(getattr(tqdm, "_instances", ()))


def test_a_stage_runs_no_more_torch_threads_than_usable_cores(tmp_path, monkeypatch, capsys):
    """Snakemake's OMP_NUM_THREADS can exceed the cores a job may use (a cluster cpuset): a stage run on one
    core with OMP_NUM_THREADS=2 uses one thread, in a fresh process (torch imported after the cap) and in
    this one (torch imported before it)."""
    import subprocess
    import sys

    script = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from umtfss.cli import main; sys.exit(main(['doctor', '--path', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True).stdout
    assert "torch uses 1 threads" in out, out
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        torch.set_num_threads(3)
        assert main(["doctor", "--path", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
        torch.set_num_threads(2)
        assert main(["doctor", "--path", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2  # fewer threads than cores, as asked: left alone
    finally:
        torch.set_num_threads(before)


def test_worker_pools_fit_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """On a cluster job's cpuset of a large node: image loaders, chunk readers and writers, and doctor's
    count follow the affinity mask, not the node's core count."""
    import zarr

    import umtfss.stores as stores
    from umtfss.doctor import report
    from umtfss.embedding import _default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(stores, "_READ_POOL", None)
    assert _default_workers() == 1  # one loader process beside the main one
    assert stores._read_pool()._max_workers == 2
    store = stores.create_label_store(tmp_path / "labels.zarr", 2, (4, 4), attrs={})
    writer = stores.BackgroundWriter(store["labels"])
    try:
        assert writer.pool._max_workers == 2
    finally:
        writer.close()
    assert dict(report(tmp_path))["cpu"].startswith("2 cores (of the machine's 64)")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(stores, "_READ_POOL", None)
    assert _default_workers() == 4 and stores._read_pool()._max_workers == 8
    assert dict(report(tmp_path))["cpu"].startswith("64 cores, torch")


def test_every_progress_bar_goes_through_umtfss_progress():
    """TQDM_DISABLE=1 reaches a bar only through umtfss.progress (tqdm reads it only for bars given no
    `disable`, and stages pass one): no module builds tqdm's own bars."""
    from pathlib import Path

    import umtfss

    package = Path(umtfss.__file__).parent
    direct = [str(path.relative_to(package)) for path in package.rglob("*.py")
              if path.name != "progress.py" and "from tqdm import tqdm" in path.read_text()]
    assert direct == [], f"import tqdm from umtfss.progress in {direct}"
