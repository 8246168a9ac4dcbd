"""Configuration: defaults from the schema, and errors that name the key, the value and what is allowed."""

import copy
import json

import pytest
import yaml

from pathlib import Path

from umtfss import config as cfg

REPO = Path(__file__).resolve().parents[1]


def test_defaults_fill_every_section():
    c = cfg.load(None)
    assert c["clustering"]["clusters"] == 50
    assert c["model"]["prototypes_fg"] == 50 and c["model"]["prototypes_bg"] == 100
    assert c["datasets"]["pascal"]["min_class_pixels"] == 2048
    assert c["datasets"]["coco"]["fold_convention"] == "interleaved"
    assert c["training"]["lr_sgd"] == 0.01 and c["training"]["lr_adamw"] == 1e-4


def test_schema_documents_every_key():
    def walk(node, path):
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}{name} has no description"
            if sub.get("type") == "object":
                walk(sub, f"{path}{name}.")
            else:
                assert "default" in sub, f"{path}{name} has no default"

    walk(cfg.schema(), "")


def test_repo_config_is_valid():
    c = cfg.load(REPO / "config.yaml")
    assert c["demo"]["enabled"] is True


@pytest.mark.parametrize("setting", ["pascal.yaml", "coco.yaml"])
def test_reference_model_overlay_is_valid_on_each_setting(setting):
    """configs/reference-model.yaml merged over a setting (as Snakemake merges --configfile files)."""
    import yaml

    merged = yaml.safe_load((REPO / "configs" / setting).read_text())
    for key, value in yaml.safe_load((REPO / "configs" / "reference-model.yaml").read_text()).items():
        merged[key] = {**merged.get(key, {}), **value}
    model = cfg.load(merged)["model"]
    assert (model["self_attention"], model["prototype_source"], model["prototypes_fg"], model["prototypes_bg"]) == (
        "deformable", "merged", 20, 50)
    assert model["backbone"] == yaml.safe_load((REPO / "configs" / setting).read_text())["model"]["backbone"]


@pytest.mark.parametrize("setting", ["pascal.yaml", "coco.yaml"])
def test_reference_tasks_overlay_is_valid_on_each_setting(setting):
    """configs/reference-tasks.yaml over a setting: the reference fit, N and the embedding untouched."""
    import yaml

    base = yaml.safe_load((REPO / "configs" / setting).read_text())
    merged = {**base}
    for key, value in yaml.safe_load((REPO / "configs" / "reference-tasks.yaml").read_text()).items():
        merged[key] = {**merged.get(key, {}), **value}
    loaded = cfg.load(merged)
    clustering = loaded["clustering"]
    assert (clustering["fit_mode"], clustering["minibatch_images"], clustering["minibatch_sample_images"],
            clustering["metric"], clustering["iterations"]) == ("minibatch", 3200, 20000, "euclidean", 30)
    assert clustering["clusters"] == base["clustering"]["clusters"]
    assert (loaded["episodes"]["all_candidates_below"], loaded["episodes"]["rank_among"]) == (20, "all_regions")
    assert loaded["episodes"]["top_fraction"] == cfg.load(base)["episodes"]["top_fraction"]
    assert loaded["embedding"] == cfg.load(base)["embedding"]



def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("files", [["pascal.yaml"], ["coco.yaml"], ["pascal.yaml", "reference-model.yaml"],
                                   ["pascal.yaml", "reference-tasks.yaml"], ["coco.yaml", "reference-backbone.yaml"]])
def test_a_setting_leaves_nothing_of_the_demo_over(files):
    """Snakemake layers --configfile files over the workflow's config.yaml (the demo) key by key: a
    setting must set every key config.yaml sets, or a paper run silently keeps the demo's (dim 64, ...)."""
    from snakemake.utils import update_config  # the merge Snakemake itself applies

    alone: dict = {}
    for name in files:
        update_config(alone, yaml.safe_load((REPO / "configs" / name).read_text()))
    layered = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(layered, copy.deepcopy(alone))
    expected, got = _flat(cfg.load(alone)), _flat(cfg.load(layered))
    left_over = {key: (got[key], value) for key, value in expected.items()
                 if got[key] != value and not (key.startswith("demo.") and key != "demo.enabled")}
    assert left_over == {}, f"config.yaml's values (left) survive under {files}: {left_over}"
    assert got["demo.enabled"] is False

def test_the_schema_lists_every_registered_backbone():
    """A backbone name typo stops the run before any job, by the schema's list: it must be the registry's."""
    from umtfss.backbones import list_backbones

    properties = cfg.schema()["properties"]
    for section in ("embedding", "model"):
        assert sorted(properties[section]["properties"]["backbone"]["enum"]) == list_backbones(), section


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_torch_takes_are_accepted(device):
    assert cfg.load({"training": {"device": device}})["training"]["device"] == device


@pytest.mark.parametrize(
    "override, words",
    [
        ({"unlabeled": {"source": "imagenet"}}, ["unlabeled.source", "imagenet", "pascal, coco, custom, folder"]),
        ({"evaluation": {"folds": [7]}}, ["evaluation.folds[0]", "7", "maximum 3"]),
        ({"evaluation": {"shots": [0]}}, ["evaluation.shots[0]", "0", "minimum 1"]),
        ({"clustering": {"clustrs": 4}}, ["clustrs", "clusters"]),
        ({"model": {"dim": 30, "heads": 8}}, ["model.dim", "model.heads"]),
        ({"evaluation": {"methods": ["unsup", "finetune-0%"]}}, ["evaluation.methods[1]", "finetune-0%", "1 to 100"]),
        ({"evaluation": {"methods": ["sup-150%"]}}, ["evaluation.methods[0]", "sup-150%", "1 to 100"]),
        ({"evaluation": {"seeds": [321, 321]}}, ["evaluation.seeds", "[321, 321]", "each item once"]),
        ({"evaluation": {"methods": ["unsup", "unsup"]}}, ["evaluation.methods", "each item once"]),
        ({"training": {"finetune_fractions": [0.2]}}, ["training.finetune_fractions", "was removed",
                                                        "finetune-P%", "evaluation.methods"]),
        ({"model": {"backbone": "resnet51-imagenet"}}, ["model.backbone", "resnet51-imagenet", "resnet50-imagenet"]),
        ({"embedding": {"backbone": "dino-vits"}}, ["embedding.backbone", "dino-vits", "dino-vits8, dino-vits16"]),
        ({"training": {"device": "gpu"}}, ["training.device", '"gpu"', "cuda"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, words):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(override)
    for word in words:
        assert word in str(err.value)


def test_missing_root_is_reported_when_paths_are_checked(tmp_path):
    c = {"demo": {"enabled": False}, "datasets": {"pascal": {"root": str(tmp_path / "nope")}}}
    cfg.load(c)  # paths are not checked by default
    with pytest.raises(cfg.ConfigError, match="datasets.pascal.root"):
        cfg.load(c, check_paths=True)


def test_missing_checkpoint_file_is_reported_before_any_job(tmp_path):
    c = {"model": {"backbone": "resnet50-deepstem", "checkpoint": str(tmp_path / "initmodel" / "resnet50_v2.pth")},
         "demo": {"enabled": True}}
    cfg.load(c)
    with pytest.raises(cfg.ConfigError, match=r"'model.checkpoint' is '.*resnet50_v2.pth', which is not a file.*resnet50-deepstem"):
        cfg.load(c, check_paths=True)
    (tmp_path / "initmodel").mkdir()
    (tmp_path / "initmodel" / "resnet50_v2.pth").write_bytes(b"weights")
    assert cfg.load(c, check_paths=True)["model"]["checkpoint"].endswith("resnet50_v2.pth")


def test_folder_source_needs_a_folder():
    with pytest.raises(cfg.ConfigError, match="unlabeled.folder"):
        cfg.load({"unlabeled": {"source": "folder"}})
    with pytest.raises(cfg.ConfigError, match="unlabeled.setting' is 'fold'.*use 'all'"):
        cfg.load({"unlabeled": {"source": "folder", "folder": "imgs", "setting": "fold"}})


def test_custom_source_needs_the_labelled_images_and_their_train_list():
    """unlabeled.source custom builds the pseudo tasks from datasets.custom's train_list images."""
    with pytest.raises(cfg.ConfigError, match="'unlabeled.source' is 'custom', but 'datasets.custom.root' is null"):
        cfg.load({"unlabeled": {"source": "custom"}})
    custom = {"root": "mine", "classes": ["a", "b", "c", "d"]}
    with pytest.raises(cfg.ConfigError, match="'datasets.custom.train_list' is null"):
        cfg.load({"unlabeled": {"source": "custom"}, "datasets": {"custom": {**custom, "train_list": None}}})
    loaded = cfg.load({"unlabeled": {"source": "custom", "setting": "fold"}, "datasets": {"custom": custom}})
    assert loaded["unlabeled"]["source"] == "custom" and loaded["datasets"]["custom"]["train_list"] == "train.txt"


def test_folder_names_that_would_clash_are_refused(tmp_path, monkeypatch):
    for name in ("pascal", "coco", "benchmarks", "custom", "..", ".hidden"):
        with pytest.raises(cfg.ConfigError, match="unlabeled.name"):
            cfg.load({"unlabeled": {"source": "folder", "folder": "imgs", "name": name}})
    with pytest.raises(cfg.ConfigError, match=r"the results folder of datasets.custom.name's \(results/site_a/\)"):
        cfg.load({"unlabeled": {"source": "folder", "folder": "imgs", "name": "site_a"},
                  "datasets": {"custom": {"name": "site_a"}}})
    assert cfg.load({"unlabeled": {"source": "folder", "folder": "imgs", "name": "custom"},
                     "datasets": {"custom": {"name": "site_a"}}})["unlabeled"]["name"] == "custom"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine").mkdir()
    loaded = cfg.load({"unlabeled": {"source": "folder", "folder": "~/mine", "name": "mine"}}, check_paths=True)
    assert loaded["unlabeled"]["folder"] == "~/mine"  # '~' is the user's home, as for umtfss prepare


def test_labelled_set_names_that_would_clash_are_refused():
    for name in ("pascal", "coco", "benchmarks"):
        with pytest.raises(cfg.ConfigError, match=f"'datasets.custom.name' is '{name}', a results folder"):
            cfg.load({"datasets": {"custom": {"name": name}}})
    for name in ("a/b", "site.a", "-x", ""):
        with pytest.raises(cfg.ConfigError, match="datasets.custom.name"):
            cfg.load({"datasets": {"custom": {"name": name}}})
    config = cfg.load({"datasets": {"custom": {"name": "site_a"}}})
    assert [cfg.benchmark_kind(config, n) for n in ("pascal", "coco", "site_a", "custom")] == ["pascal", "coco",
                                                                                              "custom", "custom"]
    with pytest.raises(ValueError, match="--dataset is 'site_b', expected pascal, coco or site_a"):
        cfg.benchmark_kind(config, "site_b")


def test_load_accepts_inline_json_and_yaml_file(tmp_path):
    inline = json.dumps({"clustering": {"clusters": 7}})
    assert cfg.load(inline)["clustering"]["clusters"] == 7
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"clustering": {"clusters": 9}}))
    assert cfg.load(str(path))["clustering"]["clusters"] == 9
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(str(tmp_path / "missing.yaml"))
    # the README's flow style works inline too; what is no mapping names where it came from
    assert cfg.load("{clustering: {clusters: 30}}")["clustering"]["clusters"] == 30
    with pytest.raises(cfg.ConfigError, match="inline --config .* is neither JSON nor a YAML mapping"):
        cfg.load("{clustering: {clusters: 30}")
    path.write_text("- clustering\n")
    with pytest.raises(cfg.ConfigError, match=r"mapping of sections .* got a list in config file '.*c.yaml'"):
        cfg.load(str(path))


def test_paper_episode_counts():
    c = cfg.load(None)
    assert cfg.test_episodes(c, "pascal") == 1000 and cfg.test_episodes(c, "coco") == 5000
    c["evaluation"]["episodes"] = 5000
    assert cfg.test_episodes(c, "pascal") == 5000


def test_command_line_strings_get_the_schema_types():
    """What `snakemake --config` puts in for nested keys (all strings) is read as the schema's types;
    strings stay strings, and what cannot be read stays for the validator to name."""
    given = {"clustering": {"clusters": "30", "metric": "euclidean", "subset_pixels": "abc"},
             "training": {"lr_adamw": "1e-3", "amp": "false"},
             "evaluation": {"seeds": ["1", "2"], "episodes": "null"},
             "embedding": {"dim": "null", "checkpoint": "null"},
             "unlabeled": {"name": "2024"}}
    config = copy.deepcopy(given)
    cfg.type_command_line_values(config, given)
    assert config["clustering"] == {"clusters": 30, "metric": "euclidean", "subset_pixels": "abc"}
    assert config["training"] == {"lr_adamw": 1e-3, "amp": False}
    assert config["evaluation"] == {"seeds": [1, 2], "episodes": None}
    assert config["embedding"] == {"dim": None, "checkpoint": None}
    assert config["unlabeled"] == {"name": "2024"}  # a string key keeps its text
    with pytest.raises(cfg.ConfigError, match="'clustering.subset_pixels' has value \"abc\", expected type integer"):
        cfg.validate(config)
    file_values = {"clustering": {"clusters": "30"}}  # a value the command line did not set is left alone
    cfg.type_command_line_values(file_values, {"clustering": {"clusters": "40"}})
    assert file_values == {"clustering": {"clusters": "30"}}


def test_a_misspelled_key_gets_the_nearest_name():
    with pytest.raises(cfg.ConfigError, match=r"'clusterz' was unexpected\) at 'clustering' \(did you mean "
                                              r"'clusterz' -> 'clusters'\?\); allowed keys: .*clusters"):
        cfg.load({"clustering": {"clusterz": 30}})
    with pytest.raises(cfg.ConfigError, match=r"'trainnig' -> 'training'"):  # a section too
        cfg.load({"trainnig": {"epochs": 1}})


@pytest.mark.parametrize("section, key", [("clustering", "clusters"), ("embedding", "shards")])
def test_an_integer_key_refuses_a_whole_float(section, key):
    """30.0 passes JSON Schema's integer; here it is refused before it reaches a path (clusters-30.0) or range()."""
    with pytest.raises(cfg.ConfigError, match=rf"'{section}.{key}' has value 30.0, expected type integer"):
        cfg.load({section: {key: 30.0}})
    assert cfg.load({section: {key: 30}})[section][key] == 30


def test_numbers_written_1e_3_are_numbers_in_every_file(tmp_path):
    """PyYAML reads 1e-3 (no dot) as text; a number key takes it as the number, a string key keeps it."""
    path = tmp_path / "c.yaml"
    path.write_text("training: {lr_adamw: 1e-3, finetune_lr_adamw: 2E-4}\nunlabeled: {name: 1e3}\n"
                    "clustering: {subset_pixels: 1e6}\n")
    assert yaml.safe_load(path.read_text())["training"]["lr_adamw"] == "1e-3"  # what PyYAML hands over
    with pytest.raises(cfg.ConfigError, match=r"'clustering.subset_pixels' has value \"1e6\", expected type integer"):
        cfg.load(path)  # an integer key is not made a float
    path.write_text(path.read_text().replace("subset_pixels: 1e6", "subset_pixels: 1000000"))
    loaded = cfg.load(path)
    assert (loaded["training"]["lr_adamw"], loaded["training"]["finetune_lr_adamw"]) == (1e-3, 2e-4)
    assert loaded["unlabeled"]["name"] == "1e3"


def test_runtime_settings_merge_only_keys_that_change_speed():
    """--runtime (UMTFSS_RUNTIME in the workflow) is untracked, so it must refuse any key that could change a result."""
    from umtfss.config import RUNTIME_KEYS, read_raw, runtime_settings, with_runtime

    raw = read_raw({"training": {"workers": 4, "lr_sgd": 0.5}})
    merged = with_runtime(raw, '{"training": {"workers": 0}, "evaluation": {"image_cache_mb": 1}}', ("training",))
    assert merged == {"training": {"workers": 0, "lr_sgd": 0.5}} and raw["training"]["workers"] == 4
    assert with_runtime(raw, None, ("training",)) is raw
    with pytest.raises(cfg.ConfigError, match=r"--runtime sets training\.lr_sgd, which can change a result"):
        with_runtime(raw, '{"training": {"lr_sgd": 1.0}}', ("training",))
    with pytest.raises(cfg.ConfigError, match="--runtime .* is not JSON"):
        with_runtime(raw, "{training: 1", ("training",))
    with pytest.raises(cfg.ConfigError, match="must map sections to keys"):
        with_runtime(raw, '{"training": 3}', ("training",))
    settings = json.loads(runtime_settings(cfg.load({}), tuple(RUNTIME_KEYS)))
    assert settings["training"] == {"workers": 2, "checkpoint_minutes": 10}
    assert cfg.load(with_runtime({}, json.dumps(settings), tuple(RUNTIME_KEYS)))["training"]["checkpoint_minutes"] == 10
