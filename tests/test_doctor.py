"""`umtfss doctor`: the report states this machine's facts, as the stages will find them."""

import os

import faiss
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
