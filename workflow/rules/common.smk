"""Helpers shared by every rule: validated config, artifact paths, per-stage config slices."""

import json
import os
import re
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

from umtfss.config import (REFERENCE_PREDICTOR_KEYS, RUNTIME_KEYS, ConfigError, benchmark_kind as _benchmark_kind,
                           runtime_settings as _runtime_settings, type_command_line_values,
                           validate as _validate_config)
from umtfss.data.custom import custom_folds as _custom_folds
from umtfss.data.folder import folder_fingerprint as _folder_fingerprint, scan_image_folder as _scan_image_folder
from umtfss.data.overlap import check_test_images_unseen as _check_test_images_unseen
from umtfss.threads import usable_cores as _usable_cores

# the jobs' progress bars go to log files: a frame every 10 s rather than ten a second (tqdm reads
# TQDM_* variables; TQDM_DISABLE=1 turns every bar off)
os.environ.setdefault("TQDM_MININTERVAL", "10")

try:  # --config clustering='{clusters: 30}' gives the string "30": read it as the schema's integer
    # (overwrite_config holds the --configfile values too; YAML typed those already, but for 1e-3)
    type_command_line_values(config, workflow.config_settings.overwrite_config or {})
except AttributeError:  # a Snakemake without config_settings: nested --config values stay strings
    pass
try:
    _validate_config(config, check_paths=True)
except ConfigError as err:
    sys.exit(f"umtfss: {err}")


wildcard_constraints:
    shard=r"\d+",
    nshards=r"\d+",
    clusters=r"\d+",
    fold=r"\d|all",  # all: sup / finetune on every labelled class, a model for new classes (never scored)
    pct=r"\d+",
    dataset="|".join(["pascal", "coco", re.escape(config["datasets"]["custom"]["name"])]),
    src=r"[^/]+",
    embedder=r"[^/]+",
    model=r"[^/]+",


DEMO = config["demo"]["enabled"]
SOURCE = config["unlabeled"]["source"]
CUSTOM = config["datasets"]["custom"]["name"]  # your labelled images in paths: results/<name>/, eval_<name>.csv
SRC = {"folder": config["unlabeled"]["name"], "custom": CUSTOM}.get(SOURCE, SOURCE)
LABELLED = ("pascal", "coco", CUSTOM)  # sources with labels: the pseudo masks can be measured against them


def kind(ds):
    """The package's name of the benchmark named `ds` in paths: pascal, coco, or custom (datasets.custom.name)."""
    return _benchmark_kind(config, ds)

EMBEDDER = config["embedding"]["backbone"] + (
    f"-d{config['embedding']['dim']}" if config["embedding"]["dim"] else ""
)
CLUSTERS = config["clustering"]["clusters"]
NSHARDS = config["embedding"]["shards"]
# A torch job (train, finetune, evaluate) claims every core Snakemake was given: such jobs then run
# one at a time, which is fastest on a CPU (torch already uses all cores; two jobs thrash) and keeps
# jobs from sharing one GPU. Executors without --cores (clusters) get the cores Snakemake itself may
# use (its affinity mask); set per-rule threads there with --set-threads.
try:
    _CORES = workflow.cores
except Exception:  # no --cores: a dry run, --report, --dag
    _CORES = None
TORCH_JOB_THREADS = _CORES if _CORES and _CORES <= 1024 else _usable_cores()
CONDA_ENV = f"../../envs/{config['software_env']}.yaml"  # relative to the rule files
# the keys that change only speed (umtfss.config.RUNTIME_KEYS) reach the jobs in the environment, not in
# params: Snakemake reruns a job whose params changed (train and evaluate read UMTFSS_RUNTIME)
os.environ.update(UMTFSS_RUNTIME=_runtime_settings(config, tuple(RUNTIME_KEYS)))
# the checkout that envs/*.post-deploy.sh installs into a new conda environment (a relative path in the
# environment file would resolve under .snakemake/conda/, where Snakemake copies it)
if (Path(workflow.basedir).parent / "pyproject.toml").is_file():
    os.environ.update(UMTFSS_SOURCE=str(Path(workflow.basedir).parent))  # set, not read: no envvars directive


def gpus(section):
    """The `gpu` resource of a job whose device is config[section].device: one unless it is 'cpu', so that
    `--resources gpu=1` (or a cluster executor) gives every torch or faiss job a GPU, one at a time."""
    return 1 if config[section]["device"] != "cpu" else 0

# the model's folder: backbone and cross-attention, plus the reference code's architecture choices
# when set (configs/reference-model.yaml), so that paper and reference models sit side by side
MODEL_TAG = "-".join([config["model"]["backbone"], config["model"]["attention"]]
                     + (["deformable"] if config["model"]["self_attention"] == "deformable" else [])
                     + (["merged"] if config["model"]["prototype_source"] == "merged" else []))


_FOLDER_SCAN = {}


def folder_scan():
    """id -> file of every image of the unlabeled folder, scanned once per Snakemake start."""
    if "paths" not in _FOLDER_SCAN:
        try:
            _FOLDER_SCAN["paths"] = _scan_image_folder(config["unlabeled"]["folder"])
        except (OSError, ValueError) as err:
            sys.exit(f"umtfss: {err}")
    return _FOLDER_SCAN["paths"]


def folder_images():
    """Fingerprint of the unlabeled image folder's image list (a params value of prepare_folder)."""
    try:
        return _folder_fingerprint(config["unlabeled"]["folder"], paths=folder_scan())
    except OSError as err:  # a file gone since the scan
        sys.exit(f"umtfss: {err}")


def custom_root():
    """datasets.custom.root, or a ValueError saying it is needed (a target of the custom data set was asked for)."""
    root = config["datasets"]["custom"]["root"]
    if not root:
        raise ValueError("config key 'datasets.custom.root' is null; expected the folder of your labelled "
                         "images (README 'Your own labelled images')")
    return root


def custom_files():
    """Fingerprint of datasets.custom's image and mask folders (a params value of prepare_custom): adding,
    rewriting or removing an image or mask reruns its prepare."""
    custom = config["datasets"]["custom"]
    root = os.path.expanduser(custom["root"])
    try:
        return ":".join(_folder_fingerprint(os.path.join(root, custom[key]), f"datasets.custom.{key}")
                        for key in ("image_dir", "label_dir"))
    except (OSError, ValueError) as err:
        sys.exit(f"umtfss: {err}")


# datasets keys that only a converter reads: left out of every other stage's slice, so that setting one
# reruns that conversion (and what its masks feed), not every stage that reads the datasets section
CONVERT_ONLY_KEYS = {"coco": ("crowd", "keep_unannotated", "overlap")}


def _section(name, converter=False, dataset=None):
    """A config section; `datasets` cut to the one data set a job reads (its name in paths or its kind; but
    for a converter, without the converter-only keys), so that editing another data set's keys reruns nothing here."""
    if name != "datasets":  # less the keys that change only speed: they go to the job untracked (RUNTIME)
        return {k: v for k, v in config[name].items() if k not in RUNTIME_KEYS.get(name, ())}
    if dataset is None:
        raise ValueError("a stage reading the datasets section must name its data set")
    dataset = kind(dataset)
    left_out = () if converter else CONVERT_ONLY_KEYS.get(dataset, ())
    if dataset == "custom" and CUSTOM == "custom":  # the default name: slices (and params) as before the key
        left_out += ("name",)
    return {dataset: {k: v for k, v in config[name][dataset].items() if k not in left_out}}


def _slices(sections, converter=False, dataset=None, only=None):
    sliced = {s: _section(s, converter, dataset) for s in sections}
    sliced.update({s: {k: config[s][k] for k in keys} for s, keys in (only or {}).items()})
    return sliced


def stage_config(*sections, converter=False, dataset=None, only=None):
    """Only the config sections a stage reads, as JSON: other edits do not rerun it. `only` maps a
    section to the keys of it the stage reads, when it reads a few."""
    return json.dumps(_slices(sections, converter, dataset, only), sort_keys=True)


# training keys that only labelled episodes (sup, sup-P%, finetune-P%) read, and only pseudo episodes
LABELLED_ONLY_KEYS = ("labelled_class_draw",)
UNLABELLED_ONLY_KEYS = ("episode_sampling",)


def meta_training_config(*sections, labelled=False, finetune=False, dataset=None, only=None):
    """stage_config for training: the training section without the keys of the other kind of episodes
    and, but for fine-tuning (labelled episodes too), without the fine-tuning keys, so that changing
    those does not retrain the model."""
    other_kind = UNLABELLED_ONLY_KEYS if labelled or finetune else LABELLED_ONLY_KEYS
    training = {k: v for k, v in config["training"].items()
                if (finetune or not k.startswith("finetune_")) and k not in other_kind + RUNTIME_KEYS["training"]}
    return json.dumps({"training": training, **_slices(sections, dataset=dataset, only=only)}, sort_keys=True)


# clustering: the slices fit and assign read
REFINE = config["clustering"]["refine"] == "superpixel"
# read by assign only: changing them reruns assign and what follows, never fit or embed
SUPERPIXEL_KEYS = ("superpixel_scale", "superpixel_sigma", "superpixel_min_size", "refine_upsample")


def fit_config(clusters):
    section = {k: v for k, v in config["clustering"].items() if k not in ("refine", *SUPERPIXEL_KEYS)}
    return json.dumps({"clustering": {**section, "clusters": int(clusters)}}, sort_keys=True)


def assign_config():
    """What assign reads of the clustering section: its device and refinement (the superpixel keys
    only when they are used); the centroids carry the rest."""
    keys = ("device", "refine") + (SUPERPIXEL_KEYS if REFINE else ())
    return json.dumps({"clustering": {k: config["clustering"][k] for k in keys}}, sort_keys=True)


def prepared(ds):
    return {
        "images": f"results/{ds}/prepare/images.parquet",
        "classes": f"results/{ds}/prepare/classes.parquet",
        "image_classes": f"results/{ds}/prepare/image_classes.parquet",
    }


def dataset_inputs(ds):
    """Files that must exist before a data set can be prepared (generated demo, converted masks)."""
    if ds == "pascal":
        root = config["datasets"]["pascal"]["root"]
        if DEMO:
            return [f"{root}/demo.json"]
        if config["datasets"]["pascal"]["sbd_root"]:
            return [f"{root}/{config['datasets']['pascal']['train_list']}"]
    if ds == "coco" and config["datasets"]["coco"]["instances_dir"]:
        return [f"{config['datasets']['coco']['root']}/.umtfss-converted"]
    if ds == CUSTOM:  # its lists: editing one reruns prepare and what reads its tables
        custom = config["datasets"]["custom"]
        root = os.path.expanduser(custom_root())
        return [os.path.join(root, custom[key]) for key in ("train_list", "val_list") if custom[key]]
    return []


def embedding_shards(src=SRC, embedder=EMBEDDER):
    return [f"results/{src}/{embedder}/embeddings/shard-{i}-of-{NSHARDS}.zarr" for i in range(NSHARDS)]


def cluster_dir(src=SRC, embedder=EMBEDDER, clusters=CLUSTERS):
    return f"results/{src}/{embedder}/clusters-{clusters}"


def label_shards(src=SRC, embedder=EMBEDDER, clusters=CLUSTERS):
    return [f"{cluster_dir(src, embedder, clusters)}/labels/shard-{i}-of-{NSHARDS}.zarr" for i in range(NSHARDS)]


def method_checkpoint(method):
    """Checkpoint (path, possibly with {fold}) behind an evaluation method; None for reference predictors."""
    if method in ("all-background", "prototype-threshold"):
        return None
    models = f"{cluster_dir()}/models/{MODEL_TAG}"
    if method == "unsup":
        if config["unlabeled"]["setting"] == "fold":
            return f"{models}/unsup-fold{{fold}}/checkpoint.pt"
        return f"{models}/unsup/checkpoint.pt"
    if method == "sup":
        return f"results/{{dataset}}/supervised/{MODEL_TAG}/fold{{fold}}/checkpoint.pt"
    if method.startswith("sup-"):  # sup-P%: from scratch on P % of the labelled train images
        return f"results/{{dataset}}/supervised/{MODEL_TAG}/{method}/fold{{fold}}/checkpoint.pt"
    return f"{models}/{method}/{{dataset}}/fold{{fold}}/checkpoint.pt"  # fine-tuned on the benchmark's labels


_UNSEEN_CHECKED = set()


def check_test_images_unseen(dataset):
    """Stop before any job when the unlabeled folder holds a test image of the benchmark scored with a model
    meta-trained on it (once per data set and Snakemake start)."""
    pseudo = any(m == "unsup" or m.startswith("finetune-") for m in config["evaluation"]["methods"])
    if SOURCE == "folder" and pseudo and dataset not in _UNSEEN_CHECKED:
        # passed once, an unchanged folder and test set are not compared again
        memo = f".snakemake/umtfss/test-images-{SRC}-{dataset}.txt"
        _check_test_images_unseen(config, kind(dataset), folder_scan().values(), memo=Path(memo))
        _UNSEEN_CHECKED.add(dataset)


def trained_checkpoints(w):
    """(method, checkpoint.pt) of every trained method the evaluation of {dataset} scores, each fold's own."""
    check_test_images_unseen(w.dataset)
    if config["unlabeled"]["setting"] == "fold" and "unsup" in config["evaluation"]["methods"] \
            and w.dataset != SRC:  # fold i of one data set is not fold i of another (COCO's, PASCAL's, yours)
        named = {ds: "datasets.custom" if ds == CUSTOM else ds for ds in (SRC, w.dataset)}
        raise ValueError(f"config key 'unlabeled.setting' is 'fold': its unsup models leave out the novel classes "
                         f"of the folds of {named[SRC]}, not of {named[w.dataset]}; score {w.dataset} in the 'all' "
                         f"setting, or set unlabeled.source to {w.dataset}")
    if w.dataset == CUSTOM:  # its own fold count: say so before any fine-tuning job fails on a fold
        custom_root()
        count = len(_custom_folds(config["datasets"]["custom"]))
        absent = [f for f in config["evaluation"]["folds"] if f >= count]
        if absent:
            raise ValueError(f"config key 'evaluation.folds' holds fold(s) {absent}, but datasets.custom has "
                             f"{count} fold(s), 0..{count - 1}")
    found = []
    for method in config["evaluation"]["methods"]:
        ckpt = method_checkpoint(method)
        if ckpt:
            paths = {ckpt.format(fold=f, dataset=w.dataset) for f in config["evaluation"]["folds"]}
            found += [(method, path) for path in sorted(paths)]
    return found


def evaluation_inputs(w):
    """Tables of the benchmark and the checkpoint of every trained method, for every fold."""
    return sorted(set(prepared(w.dataset).values()) | {path for _, path in trained_checkpoints(w)})


def evaluation_methods(w):
    args = []
    for method in config["evaluation"]["methods"]:
        ckpt = method_checkpoint(method)
        args.append(method if ckpt is None else f"{method}={ckpt.replace('{dataset}', w.dataset)}")
    return " ".join(f"--method '{a}'" for a in args)


def all_targets():
    """The demo's default: the PASCAL score table (COCO's with a COCO source; also in the paper layout), the pseudo-mask quality
    table, and the report's figures (stored features, pseudo masks, test episodes with each method's mask;
    the loss curves of the trained methods the table scores); the same tables and curves for datasets.custom when its root is set, and only
    those when the pseudo tasks come from its images (unlabeled.source custom)."""
    trains = any(method_checkpoint(m) for m in config["evaluation"]["methods"])
    # PASCAL's tables, but for pseudo tasks from your labelled images (scored on them; PASCAL stays a target)
    # COCO's tables for pseudo tasks from COCO (configs/coco.yaml), PASCAL's for a PASCAL or folder source
    benchmarks = {"custom": [], "coco": ["coco"]}.get(SOURCE, ["pascal"]) + (
        [CUSTOM] if config["datasets"]["custom"]["root"] else [])
    targets = [f"results/{SRC}/{EMBEDDER}/embeddings/features.png", f"{cluster_dir()}/pseudo_masks.png"]
    if SRC in LABELLED:
        targets.append(f"{cluster_dir()}/cluster_quality.csv")
    for ds in benchmarks:
        targets += [f"results/eval_{ds}.csv", f"results/eval_{ds}.md", f"results/eval_{ds}_examples.png"]
        targets += [f"results/training_{ds}.png"] if trains else []
    return targets
