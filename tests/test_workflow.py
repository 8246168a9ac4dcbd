"""The Snakemake workflow end to end on a tiny demo: artifacts, score table, and what a change of N reruns."""

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]

TINY = {
    "demo": {"enabled": True, "seed": 1, "train_images": 40, "val_images": 24, "image_size": 96},
    "datasets": {"pascal": {"root": "data/demo/VOC2012", "min_class_pixels": 300}},
    "embedding": {"backbone": "demo-colortexture", "image_size": 96, "shards": 2, "batch_size": 8, "device": "cpu"},
    "clustering": {"clusters": 12, "subset_pixels": 5000, "iterations": 5},
    "episodes": {"min_region_pixels": 2, "area_unit": "grid"},
    "model": {"backbone": "demo-colortexture", "dim": 32, "heads": 4, "layers": 1, "prototypes_fg": 8, "prototypes_bg": 8},
    "training": {"epochs": 1, "episodes_per_epoch": 8, "batch_size": 4, "crop_size": 96, "workers": 0, "device": "cpu"},
    "evaluation": {"folds": [0], "shots": [1], "episodes": 6, "seeds": [321], "test_size": 96, "device": "cpu",
                   "methods": ["all-background", "prototype-threshold", "unsup"]},
}


def snakemake(workdir, *args, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(plan: str) -> set[str]:
    """Rule names in the job-stats table of a dry run."""
    return {line.split()[0] for line in plan.splitlines() if len(line.split()) == 2 and line.split()[1].isdigit()}


def write_config(workdir, config):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@contextmanager
def edited_config(workdir):
    """The workdir's config as a dict; write_config(workdir, it) applies an edit, and TINY is back after the block."""
    try:
        yield yaml.safe_load((workdir / "config.yaml").read_text())
    finally:
        write_config(workdir, TINY)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the whole tiny demo once: images -> score table."""
    workdir = tmp_path_factory.mktemp("workflow")
    write_config(workdir, TINY)
    snakemake(workdir, "--cores", "2", "results/eval_pascal.csv", "results/pascal/demo-colortexture/clusters-12/cluster_quality.csv")
    return workdir


def test_report_of_the_run(pipeline, tmp_path):
    """`snakemake --report` (README) builds an HTML report holding the score tables; its dependency is declared."""
    out = tmp_path / "report.html"
    snakemake(pipeline, "--report", str(out), "results/eval_pascal.csv")
    assert out.is_file() and out.stat().st_size > 10_000
    required = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
    assert '"pygments' in required  # snakemake's report needs it; pytest brings it to the test install only


def test_all_rule_draws_the_report_figures(pipeline, tmp_path):
    """`snakemake` without a target (the `all` rule) adds the pseudo-mask grid and the loss curves of the
    trained methods, and the report of that run shows both; with no trained method there is no curve."""
    from PIL import Image

    plan = planned_jobs(snakemake(pipeline, "-n", "--cores", "2").stdout)
    assert {"score_table", "feature_pca", "examples"} <= plan and not plan & {"train_unsup", "evaluate", "embed"}
    snakemake(pipeline, "--cores", "2")
    masks = pipeline / "results/pascal/demo-colortexture/clusters-12/pseudo_masks.png"
    curves = pipeline / "results/training_pascal.png"
    # the first 16 of the shard's 20 images, each beside its ground truth (a PASCAL-layout source)
    assert Image.open(masks).size == (2 * 4 * 192, 4 * 192)
    features = pipeline / "results/pascal/demo-colortexture/embeddings/features.png"
    assert Image.open(features).size == (2 * 4 * 192, 4 * 192)  # 16 images, each beside its feature colours
    assert Image.open(curves).size == (500, 340)  # one panel: unsup is the only trained method
    # the first 6 test episodes of fold 0: support, query and truth, then all-background, prototype-threshold, unsup
    assert Image.open(pipeline / "results/eval_pascal_examples.png").size == (5 * 220, 6 * 220)
    assert "unsup" in (pipeline / "logs/examples-pascal.log").read_text()
    assert (pipeline / "logs/training_pascal.log").is_file()
    table = (pipeline / "results/eval_pascal.md").read_text()  # the score table in the papers' layout
    assert "| method | 1-shot fold0 | 1-shot mean | 1-shot FB-IoU |" in table and "\n| unsup | " in table
    out = tmp_path / "report.html"
    snakemake(pipeline, "--report", str(out))
    html = out.read_text(errors="replace")
    assert "pseudo_masks.png" in html and "training_pascal.png" in html and "cluster_quality.csv" in html
    assert "eval_pascal.md" in html and "features.png" in html and "eval_pascal_examples.png" in html
    with edited_config(pipeline) as config:
        config["evaluation"]["methods"] = ["all-background", "prototype-threshold"]
        write_config(pipeline, config)
        plan = snakemake(pipeline, "-n", "--cores", "2", "--forceall").stdout
    jobs = planned_jobs(plan)
    assert "pseudo_masks" in jobs and "evaluate" in jobs
    assert not jobs & {"training_curves", "train_unsup"}


def test_sup_fraction_trains_from_scratch_per_fold_and_is_scored(pipeline):
    """evaluation.methods sup-20%: one supervised run per fold, no --init, on the labels only (no pseudo
    episode upstream reruns), given no fine-tuning key (editing one does not retrain it, nor sup);
    evaluate scores it."""
    with edited_config(pipeline) as config:
        config["evaluation"]["methods"] = ["unsup", "sup-20%"]
        config["evaluation"]["folds"] = [0, 1]
        write_config(pipeline, config)
        proc = snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv")
    out = proc.stdout + proc.stderr
    jobs = planned_jobs(out)
    assert "train_sup_fraction" in jobs and "evaluate" in jobs
    assert not jobs & {"embed", "fit", "assign", "episodes", "train_unsup"}
    blocks = [b for b in re.split(r"\n(?:local)?rule ", out) if b.startswith("train_sup_fraction:")]
    assert len(blocks) == 2
    for fold in (0, 1):
        assert any(f"results/pascal/supervised/demo-colortexture-prototype/sup-20%/fold{fold}/checkpoint.pt" in b
                   for b in blocks)
    for block in blocks:
        assert "--method sup-20%" in block and "--init" not in block and "finetune_" not in block
    # sup on all the labels likewise gets no fine-tuning key
    with edited_config(pipeline) as config:
        config["evaluation"]["methods"] = ["sup"]
        write_config(pipeline, config)
        proc = snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv")
    blocks = [b for b in re.split(r"\n(?:local)?rule ", proc.stdout + proc.stderr) if b.startswith("train_sup:")]
    assert len(blocks) == 1 and "--method sup " in blocks[0] and "finetune_" not in blocks[0]
    # evaluate fills in each fold itself
    assert "--method 'sup-20%=results/pascal/supervised/demo-colortexture-prototype/sup-20%/fold{fold}/checkpoint.pt'" in out


def test_pipeline_writes_inspectable_artifacts_and_scores(pipeline):
    base = pipeline / "results/pascal/demo-colortexture"
    assert (base / "embeddings/shard-0-of-2.zarr").is_dir() and (base / "embeddings/shard-1-of-2.zarr").is_dir()
    clusters = base / "clusters-12"
    for name in ["centroids.npy", "fit.json", "regions.parquet", "candidates.parquet", "cluster_quality.csv"]:
        assert (clusters / name).is_file(), name
    assert (clusters / "labels/shard-0-of-2.zarr").is_dir()
    scores = pd.read_csv(pipeline / "results/eval_pascal.csv")
    for column in ["method", "fold", "shot", "seed", "miou", "fbiou", "episodes"]:
        assert column in scores.columns
    assert set(scores["method"]) == {"all-background", "prototype-threshold", "unsup"}
    assert (scores["episodes"] == 6).all()
    assert scores.loc[scores.method == "all-background", "miou"].eq(0).all()
    assert (pipeline / "results/eval_pascal_classes.csv").is_file()
    for log in ["logs/demo.log", "logs/pascal/prepare.log"]:
        assert (pipeline / log).is_file()


def test_changing_clusters_reruns_clustering_but_never_embed(pipeline):
    with edited_config(pipeline) as config:
        config["clustering"]["clusters"] = 10
        write_config(pipeline, config)
        plan = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
    jobs = planned_jobs(plan)
    assert "fit" in jobs and "assign" in jobs and "episodes" in jobs and "evaluate" in jobs
    assert "embed" not in jobs and "demo" not in jobs and "prepare" not in jobs


def test_clusters_set_with_config_on_the_command_line(pipeline):
    """Snakemake reads nested --config values as strings ("10"); the workflow types them by the schema,
    so N can be changed without editing config.yaml, with the same plan, and a bad value is still named."""
    plan = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv",
                     "--config", "clustering={clusters: 10}").stdout
    jobs = planned_jobs(plan)
    assert "fit" in jobs and "evaluate" in jobs and not jobs & {"embed", "demo", "prepare"}
    assert "clusters-10/centroids.npy" in plan
    bad = snakemake(pipeline, "-n", "results/eval_pascal.csv", "--config", "clustering={clusters: 1}", check=False)
    assert bad.returncode != 0 and "config key 'clustering.clusters' has value 1, expected minimum 2" in bad.stdout + bad.stderr


def test_changing_refine_reruns_assign_and_after_but_never_fit_or_embed(pipeline):
    with edited_config(pipeline) as config:
        config["clustering"]["superpixel_min_size"] = 50  # not read while refine is none
        write_config(pipeline, config)
        assert "Nothing to be done" in snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
        config["clustering"]["refine"] = "superpixel"
        write_config(pipeline, config)
        proc = snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv")
    jobs = planned_jobs(proc.stdout)
    assert "assign" in jobs and "episodes" in jobs and "train_unsup" in jobs and "evaluate" in jobs
    assert not jobs & {"embed", "fit", "demo", "prepare"}
    assert "--images results/pascal/prepare/images.parquet" in proc.stdout + proc.stderr


def test_fine_tuning_keys_do_not_retrain_the_unsupervised_model(pipeline):
    with edited_config(pipeline) as config:
        config["training"]["finetune_epochs"] = 3
        config["training"]["labelled_class_draw"] = "present"  # read by labelled episodes alone
        write_config(pipeline, config)
        assert "Nothing to be done" in snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
        config["training"]["batch_size"] = 2
        write_config(pipeline, config)
        plan = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
    assert "train_unsup" in planned_jobs(plan) and "embed" not in planned_jobs(plan)


def test_keys_that_change_only_speed_rerun_nothing_and_reach_the_jobs(pipeline, tmp_path):
    """umtfss.config.RUNTIME_KEYS (training.workers, checkpoint_minutes, the evaluation caches) go to the
    jobs apart from their tracked config: editing them leaves a finished run done, yet a job that runs gets them."""
    import shutil

    with edited_config(pipeline) as config:
        config["training"].update(workers=0, checkpoint_minutes=2.5)
        config["evaluation"].update(image_cache_mb=16, feature_cache_mb=8)
        write_config(pipeline, config)
        assert "Nothing to be done" in snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
        jobs = _job_configs(snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv",
                                      "--forcerun", "train_unsup", "evaluate"))
        copy = tmp_path / "run"  # a job run here would make the module's run out of date
        shutil.copytree(pipeline, copy, symlinks=True)
    assert not {"workers", "checkpoint_minutes"} & set(jobs["train_unsup"][0]["training"])
    assert not {"image_cache_mb", "feature_cache_mb"} & set(jobs["evaluate"][0]["evaluation"])
    (target,) = copy.glob("results/pascal/*/clusters-12/models/*/unsup/checkpoint.pt")
    snakemake(copy, "--cores", "2", "--forcerun", "train_unsup", str(target.relative_to(copy)))
    (log,) = copy.glob("logs/pascal/*/clusters-12/*/train-unsup.log")
    assert "settings that change only speed (--runtime): workers 0, checkpoint_minutes 2.5" in log.read_text()


def test_another_data_sets_keys_rerun_nothing_of_a_pascal_run(pipeline):
    """Each job reads its own data set's keys: COCO's (converter keys or not) leave the PASCAL run done,
    and so do the keys that no job of it reads (fold_images in the 'all' setting, the reference
    predictors' unused model keys); a PASCAL key reruns its prepare."""
    with edited_config(pipeline) as config:
        config["datasets"]["coco"] = {"crowd": "ignore", "keep_unannotated": True, "overlap": "small_on_top",
                                      "min_class_pixels": 100, "root": "elsewhere"}
        (pipeline / "mine").mkdir(exist_ok=True)
        config["datasets"]["custom"] = {"root": "mine", "classes": ["a", "b", "c", "d"], "min_class_pixels": 100}
        config["unlabeled"] = {"fold_images": "no_novel"}
        config["training"]["episode_sampling"] = "image"  # the default, spelt out
        write_config(pipeline, config)
        assert "Nothing to be done" in snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
        config["datasets"]["pascal"]["min_class_pixels"] = 301
        write_config(pipeline, config)
        plan = planned_jobs(snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout)
    assert "prepare" in plan and "demo" not in plan


def _job_blocks(text: str):
    """(rule name, the job's block of lines) for each job a dry run printed."""
    for block in re.split(r"\n(?:local)?rule ", "\n" + text)[1:]:
        yield block.split(":", 1)[0], block


def _job_configs(proc) -> dict[str, list[dict]]:
    """rule name -> the --config JSON of each of its jobs in a dry run's printed commands (-p)."""
    import json
    import shlex

    found: dict[str, list[dict]] = {}
    for name, block in _job_blocks(proc.stdout + proc.stderr):
        for line in block.splitlines():
            if "umtfss " in line and "--config" in line:
                words = shlex.split(line[line.index("umtfss "):])
                found.setdefault(name, []).append(json.loads(words[words.index("--config") + 1]))
    return found


def test_each_job_gets_only_the_keys_it_reads(tmp_path):
    """The config slices of a fresh plan: one data set per job, assign's and evaluate's few keys, no
    keys of the other kind of episodes in any training job."""
    from umtfss.config import REFERENCE_PREDICTOR_KEYS

    config = {**TINY, "evaluation": {**TINY["evaluation"], "methods": ["prototype-threshold", "unsup", "sup",
                                                                        "finetune-20%"]}}
    write_config(tmp_path, config)
    jobs = _job_configs(snakemake(tmp_path, "-n", "-p", "--cores", "2", "results/eval_pascal.csv"))
    assert {"demo", "prepare", "assign", "train_unsup", "train_sup", "finetune", "evaluate"} <= set(jobs)
    for name, slices in jobs.items():
        for cfg in slices:
            assert set(cfg.get("datasets", {})) <= {"pascal"}, name
    assert all(set(c) == {"clustering"} and set(c["clustering"]) == {"device", "refine"} for c in jobs["assign"])
    (evaluate,) = jobs["evaluate"]
    assert set(evaluate) == {"evaluation", "model"} and set(evaluate["model"]) == set(REFERENCE_PREDICTOR_KEYS)
    (unsup,) = jobs["train_unsup"]
    assert "unlabeled" not in unsup and "datasets" not in unsup
    assert "episode_sampling" in unsup["training"] and "labelled_class_draw" not in unsup["training"]
    assert not any(k.startswith("finetune_") for k in unsup["training"])
    for name in ("train_sup", "finetune"):
        for cfg in jobs[name]:
            assert "labelled_class_draw" in cfg["training"] and "episode_sampling" not in cfg["training"], name
            assert any(k.startswith("finetune_") for k in cfg["training"]) == (name == "finetune"), name


def test_reference_model_overlay_trains_into_its_own_model_folder(pipeline):
    """configs/reference-model.yaml on top of the config: a new model folder is trained, nothing upstream reruns."""
    proc = snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv",
                     "--configfile", str(REPO / "configs" / "reference-model.yaml"))
    jobs = planned_jobs(proc.stdout)
    assert "train_unsup" in jobs and "evaluate" in jobs
    assert not jobs & {"embed", "fit", "assign", "episodes", "demo", "prepare"}
    assert "-prototype-deformable-merged/unsup/checkpoint.pt" in proc.stdout


def test_reference_tasks_overlay_refits_but_never_embeds(pipeline):
    """configs/reference-tasks.yaml changes fit keys only: fit and what follows rerun, embed never."""
    proc = snakemake(pipeline, "-n", "-p", "--cores", "2", "results/eval_pascal.csv",
                     "--configfile", str(REPO / "configs" / "reference-tasks.yaml"))
    jobs = planned_jobs(proc.stdout)
    assert {"fit", "assign", "episodes", "train_unsup", "evaluate"} <= jobs
    assert not jobs & {"embed", "demo", "prepare"}
    assert '"fit_mode": "minibatch"' in proc.stdout


def test_unchanged_config_has_nothing_to_do(pipeline):
    plan = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv").stdout
    assert "Nothing to be done" in plan


def test_bad_configuration_fails_before_any_job(tmp_path):
    write_config(tmp_path, {**TINY, "evaluation": {"folds": [7], "shots": [0]}})
    proc = snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "evaluation.folds[0]" in out and "evaluation.shots[0]" in out
    assert not (tmp_path / "results").exists()


def test_changing_a_demo_key_regenerates_the_demo(tmp_path):
    """Snakemake removes demo.json before the demo rule reruns; the generator must still replace the tree."""
    write_config(tmp_path, TINY)
    target = "data/demo/VOC2012/demo.json"
    snakemake(tmp_path, "--cores", "1", target)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["demo"]["seed"] = 2
    write_config(tmp_path, config)
    snakemake(tmp_path, "--cores", "1", target)
    assert yaml.safe_load((tmp_path / target).read_text())["seed"] == 2


def test_missing_dataset_root_is_named(tmp_path):
    write_config(tmp_path, {"demo": {"enabled": False}, "datasets": {"pascal": {"root": "nowhere"}}})
    proc = snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0 and "datasets.pascal.root" in proc.stdout + proc.stderr


def test_custom_target_without_its_root_is_named(tmp_path):
    write_config(tmp_path, TINY)
    proc = snakemake(tmp_path, "-n", "--cores", "1", "results/eval_custom.csv", check=False)
    assert proc.returncode != 0 and "'datasets.custom.root' is null" in proc.stdout + proc.stderr


def test_repo_default_config_dry_run():
    # --forceall: the plan of a fresh clone, also in a checkout that already ran the demo
    # and no --cores: a plain `snakemake -n` from the repo root must work
    proc = snakemake(REPO, "-n", "--forceall", "results/eval_pascal.csv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert {"demo", "prepare", "embed", "fit", "assign", "episodes", "train_unsup", "finetune", "evaluate"} <= jobs


@pytest.mark.parametrize("software_env", ["cpu", "gpu"])
def test_conda_environment_runs_the_checkouts_umtfss(tmp_path, software_env):
    """`--software-deployment-method conda`: the environment gets umtfss from this checkout and runs a job.
    conda-forge cannot be reached here, so tests/conda_standin.py stands in for conda; it resolves the
    environment file's pip entries from the copy under .snakemake/conda/, as conda does."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import conda_standin
    finally:
        sys.path.pop(0)
    conda_bin = conda_standin.install(tmp_path / "conda")
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, {**TINY, "software_env": software_env})
    # no scripts of this interpreter's environment on PATH: `umtfss` must come from the conda environment
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join([str(conda_bin)] + [p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin])
    env = {**os.environ, "PATH": path, "PIP_NO_BUILD_ISOLATION": "0"}  # "0": no isolated build, no download
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--sdm", "conda", "--cores", "1",
                           "data/demo/VOC2012/demo.json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (workdir / "data/demo/VOC2012/demo.json").is_file()
    (prefix,) = [p for p in (workdir / ".snakemake" / "conda").iterdir() if p.is_dir()]
    assert (prefix / "bin" / "umtfss").is_file()
    where = subprocess.run([str(prefix / "bin" / "python"), "-c", "import umtfss; print(umtfss.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert Path(where.strip()).resolve().is_relative_to(REPO)


def test_workflow_passes_snakemake_lint():
    """`snakemake --lint` (the workflow catalog's check): logs, no hard-coded path prefixes, helpers in common.smk."""
    proc = snakemake(REPO, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "good condition" in out, out[-3000:]


# the stages whose seconds and memory results/benchmarks/ keeps (README, "What runs, and what it writes")
HEAVY_RULES = {"convert_sbd", "convert_coco", "prepare", "prepare_custom", "prepare_folder", "embed", "fit", "assign",
               "episodes", "train_unsup", "train_unsup_fold", "train_sup", "train_sup_fraction", "finetune", "evaluate"}


def test_every_rule_logs_its_stderr_and_heavy_ones_a_benchmark():
    """Read from the rule files, so that rules behind an `if` (converters, custom, folder source) count too:
    each has a log that receives the command's stdout and stderr, the heavy ones a benchmark, and every
    report caption exists."""
    rules, derived = {}, set()  # derived: `use rule ... with:`, which keeps its parent's command
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        starts = list(re.finditer(r"^\s*(?:rule (\w+):|use rule \w+ as (\w+) with:)", text, re.M))
        for start, end in zip(starts, starts[1:] + [None]):
            rules[start.group(1) or start.group(2)] = text[start.start():end.start() if end else None]
            derived |= {start.group(2)} - {None}
        for caption in re.findall(r'caption="([^"]+)"', text):
            assert (path.parent / caption).is_file(), f"{path.name}: caption {caption} does not exist"
    assert HEAVY_RULES <= set(rules), sorted(HEAVY_RULES - set(rules))
    for name, body in rules.items():
        assert re.search(r"^\s+log:", body, re.M), f"rule {name} has no log"
        if name in HEAVY_RULES:
            assert re.search(r"^\s+benchmark:", body, re.M), f"rule {name} has no benchmark"
        command = re.search(r"^\s+shell:\n((?:[ \t]+\".*\"\n?)+)", body, re.M)  # the lines of its string
        if name not in derived or "shell:" in body:
            assert command and command.group(1).rstrip().endswith('> {log} 2>&1"'), \
                f"rule {name}: its command's stdout and stderr do not all go to its log"


def test_workflow_passes_snakemake_lint_with_a_folder_source(tmp_path):
    """The folder source defines prepare_folder, datasets.custom prepare_custom: the linter passes with them too."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    write_config(tmp_path, {**TINY, "unlabeled": {"source": "folder", "folder": str(tmp_path / "images"), "name": "mine"},
                            "datasets": {**TINY["datasets"], "custom": {"root": str(tmp_path), "classes": list("abcd")}}})
    proc = snakemake(tmp_path, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "good condition" in out, out[-3000:]
    assert "prepare_folder" not in out and "prepare_custom" not in out, out[-3000:]


@pytest.mark.parametrize("name", ["pascal", "coco"])
def test_real_data_configs_never_generate_the_demo(tmp_path, name):
    """The README's real-data command plans the converters, not the demo: the demo rule replaces its root."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    for root in {config["datasets"][name]["root"], config["datasets"].get("pascal", {}).get("root", "data/demo")}:
        (tmp_path / root).mkdir(parents=True, exist_ok=True)
    command = f"results/eval_{name}.csv --cores 16 --resources gpu=1 --configfile {REPO / 'configs' / f'{name}.yaml'}"
    assert command.replace(str(REPO / "configs") + "/", "configs/") in (REPO / "README.md").read_text() + (
        REPO / "configs" / f"{name}.yaml").read_text()
    proc = snakemake(tmp_path, "-n", "-p", *command.split(), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert "demo" not in jobs and f"convert_{'sbd' if name == 'pascal' else 'coco'}" in jobs and "evaluate" in jobs
    # layered over the demo's config.yaml, the jobs get the paper's values, not the demo's
    (unsup,) = _job_configs(proc)["train_unsup"]
    assert (unsup["model"]["dim"], unsup["model"]["heads"], unsup["training"]["adamw_schedule"]) == (256, 8, "constant")
    # every torch or faiss job asks for the GPU that `--resources gpu=1` hands out one at a time
    resources = {}
    for rule, block in _job_blocks(out):
        found = re.search(r"\n\s*resources: (.*)", block)
        resources.setdefault(rule, set()).add(found.group(1) if found else "")
    for rule in ("embed", "fit", "assign", "train_unsup", "finetune", "evaluate", "examples"):
        if rule in resources:
            assert all("gpu=1" in r for r in resources[rule]), (rule, resources[rule])
    assert {"embed", "fit", "assign", "train_unsup", "finetune", "evaluate"} <= set(resources)
    assert not any("gpu=1" in r for r in resources.get("prepare", set()) | resources.get("episodes", set()))
    # the workflow-catalog linter, with the real-data rules (the converters) defined
    lint = snakemake(tmp_path, "--lint", "--configfile", str(REPO / "configs" / f"{name}.yaml"), check=False)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, (lint.stdout + lint.stderr)[-3000:]
    # the `all` rule scores the benchmark whose train images the pseudo tasks come from
    every = snakemake(tmp_path, "-n", "--cores", "16", "--configfile", str(REPO / "configs" / f"{name}.yaml"))
    other = "coco" if name == "pascal" else "pascal"
    assert f"results/eval_{name}.md" in every.stdout and f"results/eval_{other}.csv" not in every.stdout
    # fold i of COCO is not fold i of PASCAL: fold-setting unsup models of one do not score the other
    refused = snakemake(tmp_path, "-n", f"results/eval_{other}.csv", "--cores", "16", "--configfile",
                        str(REPO / "configs" / f"{name}.yaml"), "--config", "unlabeled={setting: fold}", check=False)
    assert refused.returncode != 0 and f"leave out the novel classes of the folds of {name}, not of {other}" in (
        refused.stdout + refused.stderr), (refused.stdout + refused.stderr)[-3000:]


def test_reference_backbone_overlay_needs_its_checkpoint_and_trains_its_own_model(tmp_path):
    """configs/reference-backbone.yaml (the deep-stem ResNet-50) on the PASCAL setting: a missing
    resnet50_v2.pth is named before any job; present, the model trains into its own folder."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    config = yaml.safe_load((REPO / "configs" / "pascal.yaml").read_text())
    (tmp_path / config["datasets"]["pascal"]["root"]).mkdir(parents=True)
    overlays = ["--configfile", *(str(REPO / "configs" / f"{name}.yaml") for name in ("pascal", "reference-backbone"))]
    proc = snakemake(tmp_path, "-n", "-p", "--cores", "2", "results/eval_pascal.csv", *overlays, check=False)
    assert proc.returncode != 0
    assert "'model.checkpoint' is 'initmodel/resnet50_v2.pth', which is not a file" in proc.stdout + proc.stderr
    (tmp_path / "initmodel").mkdir()
    (tmp_path / "initmodel" / "resnet50_v2.pth").write_bytes(b"stand-in: a dry run does not read it")
    proc = snakemake(tmp_path, "-n", "-p", "--cores", "2", "results/eval_pascal.csv", *overlays, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "models/resnet50-deepstem-prototype/unsup/checkpoint.pt" in out


def test_folder_source_fine_tunes_on_the_benchmark_labels(tmp_path):
    """U_train from a folder: the fine-tuning of the score table uses the benchmark's (PASCAL) labels."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "a.jpg")
    config = {**TINY, "unlabeled": {"source": "folder", "folder": str(tmp_path / "images"), "name": "mine"},
              "evaluation": {**TINY["evaluation"], "methods": ["unsup", "finetune-20%"]}}
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n", "-p", "--cores", "2", "results/eval_pascal.csv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "results/mine/demo-colortexture/clusters-12/models/demo-colortexture-prototype/finetune-20%/pascal/fold0" in out
    assert "--tables results/pascal/prepare --dataset pascal" in out
    inputs = [line for line in out.splitlines() if line.strip().startswith("input:")]
    assert not any("results/mine/prepare/classes.parquet" in line for line in inputs)


def test_a_folder_holding_the_test_images_stops_before_any_job(pipeline, tmp_path):
    """U_train from a folder that holds PASCAL's (the demo's) val images, as copies: the score table of a
    model meta-trained on it is refused, naming an image; a folder of the train images only is fine."""
    images = pipeline / "data/demo/VOC2012/JPEGImages"
    train = (pipeline / "data/demo/VOC2012/lists/train_aug.txt").read_text().split()
    val = (pipeline / "data/demo/VOC2012/lists/val.txt").read_text().split()
    folder = tmp_path / "mine"
    folder.mkdir()
    for image_id in train + val[:3]:
        shutil.copy(images / f"{image_id}.jpg", folder / f"copy_{image_id}.jpg")
    with edited_config(pipeline) as config:
        config["unlabeled"] = {"source": "folder", "folder": str(folder), "name": "mine"}
        write_config(pipeline, config)
        proc = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"3 of the {len(val)} test images of pascal (datasets.pascal.val_list)" in out
        assert f"copy_{val[0]}.jpg" in out
        for image_id in val[:3]:
            (folder / f"copy_{image_id}.jpg").unlink()
        proc = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv", check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert (pipeline / ".snakemake/umtfss/test-images-mine-pascal.txt").is_file()  # passed: not compared again
        shutil.copy(images / f"{val[5]}.jpg", folder / "late.jpg")  # unless an image comes in
        proc = snakemake(pipeline, "-n", "--cores", "2", "results/eval_pascal.csv", check=False)
        assert proc.returncode != 0 and "late.jpg" in proc.stdout + proc.stderr


def test_folder_changes_rerun_prepare(tmp_path):
    """Adding an image to the folder reruns prepare_folder (and so everything after it)."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "a.jpg")
    config = {**TINY, "demo": {**TINY["demo"], "enabled": False},
              "unlabeled": {"source": "folder", "folder": str(tmp_path / "images"), "name": "mine"}}
    write_config(tmp_path, config)
    target = "results/mine/prepare/images.parquet"
    snakemake(tmp_path, "--cores", "1", target)
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(tmp_path, "-n", "--cores", "1", target))
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "b.png")
    proc = snakemake(tmp_path, "-n", "--cores", "1", target)
    assert "prepare_folder" in planned_jobs(proc.stdout + proc.stderr)


def test_own_labelled_images_are_scored_like_a_benchmark(pipeline, tmp_path):
    """datasets.custom over the demo's own files (its 20 class names, default folds): results/eval_custom.csv
    reuses the trained model, runs only prepare and evaluate, and repeats the PASCAL scores; fine-tuning
    on it uses its labels; editing its val list or rewriting a mask reruns its prepare."""

    work = tmp_path / "copy"
    shutil.copytree(pipeline, work, symlinks=True)
    config = _demo_as_custom(yaml.safe_load((work / "config.yaml").read_text()))
    write_config(work, config)
    plan = planned_jobs(snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv").stdout)
    assert {"prepare_custom", "evaluate"} <= plan
    assert not plan & {"prepare", "demo", "embed", "fit", "assign", "episodes", "train_unsup"}
    snakemake(work, "--cores", "2", "results/eval_custom.csv")
    keys = ["method", "fold", "shot", "seed"]
    custom = pd.read_csv(work / "results/eval_custom.csv").sort_values(keys).reset_index(drop=True)
    pascal = pd.read_csv(work / "results/eval_pascal.csv").sort_values(keys).reset_index(drop=True)
    assert len(custom) == 3 and custom[keys + ["miou", "fbiou", "episodes"]].equals(pascal[keys + ["miou", "fbiou", "episodes"]])
    assert (work / "results/custom/prepare/classes.parquet").is_file() and (work / "logs/custom/prepare.log").is_file()
    everything = snakemake(work, "-n", "--cores", "2").stdout  # the all rule: your tables and curves too
    assert "results/eval_custom.md" in everything and "results/training_custom.png" in everything
    assert "results/eval_custom_examples.png" in everything

    config["evaluation"]["methods"] = ["unsup", "finetune-20%"]
    write_config(work, config)
    proc = snakemake(work, "-n", "-p", "--cores", "2", "results/eval_custom.csv")
    out = proc.stdout + proc.stderr
    assert "models/demo-colortexture-prototype/finetune-20%/custom/fold0/checkpoint.pt" in out
    assert "--tables results/custom/prepare --dataset custom --fold 0" in out
    # a model fine-tuned on every labelled class, to apply to new classes (never in the score table)
    deploy = "results/pascal/demo-colortexture/clusters-12/models/demo-colortexture-prototype/finetune-100%/custom/foldall/checkpoint.pt"
    proc = snakemake(work, "-n", "-p", "--cores", "2", deploy)
    assert "--method finetune-100% " in proc.stdout and "--dataset custom --fold all" in proc.stdout
    config["evaluation"]["folds"] = [0, 3]
    config["datasets"]["custom"]["folds"] = [[1, 2], [3, 4]]
    write_config(work, config)
    proc = snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv", check=False)
    assert proc.returncode != 0 and "holds fold(s) [3], but datasets.custom has 2 fold(s)" in proc.stdout + proc.stderr

    config["evaluation"]["folds"] = [0]
    config["unlabeled"] = {"setting": "fold"}
    write_config(work, config)
    proc = snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv", check=False)
    assert proc.returncode != 0 and "not of datasets.custom;" in proc.stdout + proc.stderr

    config["unlabeled"] = {}
    config["evaluation"] = yaml.safe_load((pipeline / "config.yaml").read_text())["evaluation"]
    config["datasets"]["custom"].pop("folds")
    write_config(work, config)
    assert "Nothing to be done" in snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv").stdout
    val_list = work / "data/demo/VOC2012/lists/val.txt"
    val_list.write_text("".join(line + "\n" for line in val_list.read_text().split()[:-1]))  # one test image fewer
    assert "prepare_custom" in planned_jobs(snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv").stdout)
    snakemake(work, "--cores", "2", "results/custom/prepare/images.parquet")
    mask = next((work / "data/demo/VOC2012/SegmentationClassAug").iterdir())
    mask.write_bytes(mask.read_bytes())  # a mask rewritten in place (a newer file): its prepare reruns
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    assert "prepare_custom" in planned_jobs(snakemake(work, "-n", "--cores", "2", "results/eval_custom.csv").stdout)


def _demo_as_custom(config):
    """The demo's own VOC files as datasets.custom (configs/demo-custom.yaml: its 20 class names), in PASCAL's
    default folds and at the tiny demo's min_class_pixels."""
    from umtfss.data.pascal import PASCAL_CLASSES

    custom = yaml.safe_load((REPO / "configs" / "demo-custom.yaml").read_text())["datasets"]["custom"]
    assert custom.pop("folds") and custom["classes"] == list(PASCAL_CLASSES)
    config["datasets"]["custom"] = {**custom, "min_class_pixels": config["datasets"]["pascal"]["min_class_pixels"]}
    return config


def test_a_named_labelled_set_keeps_its_results_beside_another(pipeline, tmp_path):
    """datasets.custom.name: its tables, score table and fine-tunings live under the name (results/site_a/,
    eval_site_a.csv, finetune-20%/site_a/), the jobs still read datasets.custom, and a second name is a
    second set beside the first; the unsupervised model is the one both reuse."""
    work = tmp_path / "copy"
    shutil.copytree(pipeline, work, symlinks=True)
    config = _demo_as_custom(yaml.safe_load((work / "config.yaml").read_text()))
    config["datasets"]["custom"]["name"] = "site_a"
    write_config(work, config)
    others = {"prepare", "demo", "embed", "fit", "assign", "episodes", "train_unsup", "finetune"}
    plan = planned_jobs(snakemake(work, "-n", "--cores", "2", "results/eval_site_a.csv").stdout)
    assert {"prepare_custom", "evaluate"} <= plan and not plan & others
    snakemake(work, "--cores", "2", "results/eval_site_a.csv")
    keys = ["method", "fold", "shot", "seed"]
    named = pd.read_csv(work / "results/eval_site_a.csv").sort_values(keys).reset_index(drop=True)
    pascal = pd.read_csv(work / "results/eval_pascal.csv").sort_values(keys).reset_index(drop=True)
    assert named[keys + ["miou", "fbiou"]].equals(pascal[keys + ["miou", "fbiou"]])
    assert (work / "results/site_a/prepare/images.parquet").is_file() and (work / "logs/site_a/prepare.log").is_file()
    assert not (work / "results/custom").exists()
    everything = snakemake(work, "-n", "--cores", "2").stdout  # the all rule: the named tables
    assert "results/eval_site_a.md" in everything and "results/eval_custom" not in everything
    # a fine-tuning on the named set: its own folder, the package told the data set by its name
    finetuned = "results/pascal/demo-colortexture/clusters-12/models/demo-colortexture-prototype/finetune-20%/site_a/fold0/checkpoint.pt"
    proc = snakemake(work, "-p", "--cores", "2", finetuned)
    assert "--tables results/site_a/prepare --dataset site_a --fold 0" in proc.stdout + proc.stderr
    assert (work / finetuned).is_file()
    # a second labelled set (here the same files) beside the first: the first's results stay
    config["datasets"]["custom"]["name"] = "site_b"
    write_config(work, config)
    plan = planned_jobs(snakemake(work, "-n", "--cores", "2", "results/eval_site_b.csv").stdout)
    assert {"prepare_custom", "evaluate"} <= plan and not plan & others
    config["datasets"]["custom"]["name"] = "site_a"
    write_config(work, config)
    assert "Nothing to be done" in snakemake(work, "-n", "--cores", "2", "results/eval_site_a.csv", finetuned).stdout
    # its train images as the pseudo-task source: embed, clustering and quality under the name
    config["unlabeled"] = {"source": "custom"}
    write_config(work, config)
    proc = snakemake(work, "-n", "--cores", "2")
    assert "results/site_a/demo-colortexture/clusters-12/cluster_quality.csv" in proc.stdout
    assert "results/site_a/demo-colortexture/embeddings/shard-0-of-2.zarr" in proc.stdout


def test_pseudo_tasks_from_own_labelled_images_in_the_fold_setting(pipeline, tmp_path):
    """unlabeled.source custom: the pseudo tasks are built from datasets.custom's train_list images only (the
    demo's files: the same stores and clusters as the PASCAL source's), and the 'fold' setting trains one
    unsup model per fold of your own classes and scores it on them; PASCAL is then refused in that setting,
    and the all rule asks for your tables only."""
    import zarr

    work = tmp_path / "copy"
    shutil.copytree(pipeline, work, symlinks=True)
    config = _demo_as_custom(yaml.safe_load((work / "config.yaml").read_text()))
    config["unlabeled"] = {"source": "custom"}
    write_config(work, config)
    quality = "results/{}/demo-colortexture/clusters-12/cluster_quality.csv"
    plan = planned_jobs(snakemake(work, "-n", "--cores", "2", quality.format("custom")).stdout)
    assert {"prepare_custom", "embed", "fit", "assign", "quality"} <= plan and not plan & {"prepare", "demo"}
    snakemake(work, "--cores", "2", quality.format("custom"))
    train_ids = (work / "data/demo/VOC2012/lists/train_aug.txt").read_text().split()
    embedded = []
    for shard in range(2):
        ours = zarr.open_group(work / f"results/custom/demo-colortexture/embeddings/shard-{shard}-of-2.zarr", mode="r")
        theirs = zarr.open_group(work / f"results/pascal/demo-colortexture/embeddings/shard-{shard}-of-2.zarr", mode="r")
        assert ours.attrs["image_ids"] == theirs.attrs["image_ids"]
        assert np.array_equal(ours["features"][:], theirs["features"][:])
        embedded += ours.attrs["image_ids"]
    assert sorted(embedded) == sorted(train_ids)  # never a test image of val.txt
    assert pd.read_csv(work / quality.format("custom")).equals(pd.read_csv(work / quality.format("pascal")))

    config["unlabeled"] = yaml.safe_load((REPO / "configs" / "demo-custom-fold.yaml").read_text())["unlabeled"]
    assert config["unlabeled"] == {"source": "custom", "setting": "fold"}
    write_config(work, config)
    proc = snakemake(work, "-n", "-p", "--cores", "2", "results/eval_custom.csv")
    out = proc.stdout + proc.stderr
    assert "results/custom/demo-colortexture/clusters-12/models/demo-colortexture-prototype/unsup-fold0/checkpoint.pt" in out
    assert "--tables results/custom/prepare --dataset custom --fold 0" in out
    snakemake(work, "--cores", "2", "results/eval_custom.csv")
    scores = pd.read_csv(work / "results/eval_custom.csv")
    assert set(scores["method"]) == {"all-background", "prototype-threshold", "unsup"}
    assert (scores["unlabeled"] == "custom").all()
    log = (work / "logs/custom/demo-colortexture/clusters-12/demo-colortexture-prototype/train-unsup-fold0.log").read_text()
    from umtfss.data.prepare import read_tables, train_images_for_fold

    fold_images = train_images_for_fold(read_tables(work / "results/custom/prepare"), 0, remove_novel=False,
                                        require_base_class=True)
    assert 0 < len(fold_images) < len(train_ids) and f": {len(fold_images)} of {len(train_ids)} train images" in log

    proc = snakemake(work, "-n", "--cores", "2", "results/eval_pascal.csv", check=False)
    assert proc.returncode != 0 and "of datasets.custom, not of pascal;" in proc.stdout + proc.stderr
    everything = snakemake(work, "-n", "--cores", "2").stdout
    assert "results/eval_custom.md" in everything and "results/eval_pascal.md" not in everything


def test_rerun_after_an_input_change_trains_afresh(pipeline, tmp_path):
    """A rerun of train_unsup after its episodes changed must not resume the old run's last.pt."""
    import torch

    work = tmp_path / "copy"
    shutil.copytree(pipeline, work, symlinks=True)  # copy2 keeps the mtimes: nothing is stale yet
    model = "results/pascal/demo-colortexture/clusters-12/models/demo-colortexture-prototype/unsup"
    before = torch.load(work / model / "checkpoint.pt", weights_only=True)["inputs"]
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["episodes"]["min_region_pixels"] = 3
    write_config(work, config)
    snakemake(work, "--cores", "2", f"{model}/checkpoint.pt")
    after = torch.load(work / model / "checkpoint.pt", weights_only=True)["inputs"]
    assert before and after and before != after
    log = next((work / "logs").rglob("train-unsup.log")).read_text()
    assert "not resuming" in log and "other input data" in log
