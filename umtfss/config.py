"""Configuration: load, fill defaults from the JSON schema, validate with messages that name the key."""

from __future__ import annotations

import copy
import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

# Paper's meta-test sizes, used when evaluation.episodes is null.
DEFAULT_TEST_EPISODES = {"pascal": 1000, "coco": 5000, "custom": 1000}
# the model keys that evaluation reads (the reference predictors' frozen backbone; trained models carry
# their own configuration): the workflow passes evaluate these alone
REFERENCE_PREDICTOR_KEYS = ("backbone", "checkpoint", "checkpoint_url", "checkpoint_sha256")


# keys that change how fast a stage runs, never what it writes (tests hold each stage to that): the
# workflow gives them to the jobs apart from the config it tracks (--runtime), so changing one reruns nothing
RUNTIME_KEYS = {"training": ("workers", "checkpoint_minutes"), "evaluation": ("feature_cache_mb", "image_cache_mb")}


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


def schema() -> dict:
    """The configuration JSON schema (draft 2020-12) shipped with the package."""
    text = resources.files("umtfss").joinpath("schema/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return validators.extend(validator_class, {"properties": set_defaults})


def _strict_integer(checker, instance) -> bool:
    """JSON Schema calls 30.0 an integer; a count or size of 30.0 would end up in paths (clusters-30.0)
    and in range(), so an integer key takes only a whole number written without a point."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_DefaultFilling = validators.extend(
    _with_defaults(Draft202012Validator),
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


def _describe(error) -> str:
    key = ""
    for part in error.absolute_path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    key = key or "(top level)"
    sch = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(sch.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed) if isinstance(error.instance, dict) else []
        near = [f"'{k}' -> '{m[0]}'" for k in unknown if (m := difflib.get_close_matches(str(k), allowed, n=1))]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        return f"{error.message} at '{key}'{hint}; allowed keys: {', '.join(allowed)}"
    allowed = ""
    if "enum" in sch:
        allowed = "one of " + ", ".join(map(str, sch["enum"]))
    elif error.validator == "uniqueItems":
        allowed = "each item once"
    elif error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "type", "pattern", "minItems"):
        allowed = f"{error.validator} {error.validator_value}"
    desc = sch.get("description", "")
    msg = f"config key '{key}' has value {json.dumps(error.instance, default=str)}, expected {allowed or error.message}"
    return msg + (f" ({desc})" if desc else "")


# keys that existed once: a config that still sets one is told what replaced it
REMOVED_KEYS = {
    ("training", "finetune_fractions"): "the labelled fractions are the P of 'finetune-P%' and 'sup-P%' in "
                                        "evaluation.methods (the workflow trains what the score table lists)",
}


def _removed_keys(config: dict) -> list[str]:
    return [f"config key '{section}.{key}' was removed: {why}; delete it"
            for (section, key), why in REMOVED_KEYS.items()
            if isinstance(config.get(section), dict) and key in config[section]]


def _accepted_types(node: dict) -> set[str]:
    types = node.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    if "enum" in node:
        types |= {{str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}[type(v)]
                  for v in node["enum"]}
    return types


def _typed_value(text: str, node: dict):
    """A command-line string as the schema node wants it: Snakemake reads nested `--config` values with
    YAML's base loader, so `clustering={clusters: 30}` arrives as the string "30"."""
    types = _accepted_types(node)
    if not types - {"string"}:  # a string key, or one the schema does not know (the validator names it)
        return text
    if "string" in types and text not in ("null", "~"):  # [string, null] keys: only null is re-read
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # 1e-3: YAML 1.1 reads it as a string
        return _exponent_numbers(text, node)
    return text if isinstance(value, (dict, list)) else value


def type_command_line_values(config: dict, overrides: dict) -> dict:
    """Give the string leaves that Snakemake's `--config` put into `config` the types the schema asks
    for (integers, numbers, booleans, null), in place; `overrides` is what the command line set (Snakemake's
    overwrite_config: the --configfile contents and --config). Returns config."""
    def walk(target, given, node):
        if isinstance(given, dict) and isinstance(target, dict):
            for key, value in given.items():
                sub = node.get("properties", {}).get(key, {}) if isinstance(node, dict) else {}
                if isinstance(value, str) and key in target and target[key] == value:
                    target[key] = _typed_value(value, sub)
                elif key in target:
                    walk(target[key], value, sub)
        elif isinstance(given, list) and isinstance(target, list) and len(given) == len(target):
            items = node.get("items", {}) if isinstance(node, dict) else {}
            for i, value in enumerate(given):
                if isinstance(value, str) and target[i] == value:
                    target[i] = _typed_value(value, items)
                else:
                    walk(target[i], value, items)

    walk(config, overrides, schema())
    return config


EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3, which YAML 1.1 reads as text


def _exponent_numbers(value, node: dict):
    """`value` with the strings of number keys written as 1e-3 made floats: PyYAML (YAML 1.1) reads a
    number without a dot in its mantissa as text, so `lr_adamw: 1e-3` would be refused in one file and
    taken in another."""
    if isinstance(value, dict):
        properties = node.get("properties", {}) if isinstance(node, dict) else {}
        return {key: _exponent_numbers(sub, properties.get(key, {})) for key, sub in value.items()}
    if isinstance(value, list):
        items = node.get("items", {}) if isinstance(node, dict) else {}
        return [_exponent_numbers(sub, items) for sub in value]
    if (isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip())
            and "number" in _accepted_types(node) and "string" not in _accepted_types(node)):
        return float(value)
    return value


def validate(config: dict, check_paths: bool = False) -> dict:
    """Fill defaults in place and raise ConfigError listing every invalid key."""
    removed = _removed_keys(config)
    if removed:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(removed))
    config_schema = schema()
    config.update(_exponent_numbers(config, config_schema))
    validator = _DefaultFilling(config_schema)
    # two passes: defaults of nested objects are filled once the parent default exists
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        errors = list(validator.iter_errors(config))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    _check_consistency(config, check_paths)
    return config


def _check_consistency(config: dict, check_paths: bool) -> None:
    problems = []
    unl = config["unlabeled"]
    if unl["source"] == "folder" and not unl.get("folder"):
        problems.append("config key 'unlabeled.folder' is null, expected an image folder when unlabeled.source is 'folder'")
    custom = config["datasets"]["custom"]
    taken = ("pascal", "coco", "benchmarks")  # results/<name>/ of a benchmark, and of the jobs' benchmark files
    if custom["name"] in taken:
        problems.append(f"config key 'datasets.custom.name' is '{custom['name']}', a results folder umtfss writes "
                        f"itself (results/{custom['name']}/); expected another name for your labelled images")
    if unl["source"] == "folder" and unl.get("name") in (*taken, custom["name"]):
        owner = "datasets.custom.name's" if unl["name"] == custom["name"] else "a benchmark's or the jobs' benchmark files'"
        problems.append(f"config key 'unlabeled.name' is '{unl['name']}', the results folder of {owner} "
                        f"(results/{unl['name']}/); expected another name for an image folder")
    if unl["source"] == "folder" and unl["setting"] == "fold":
        problems.append("config key 'unlabeled.setting' is 'fold', which leaves out each fold's novel classes by their "
                        "labels; a folder of images has none: use 'all'")
    if unl["source"] == "custom" and not custom["root"]:
        problems.append("config key 'unlabeled.source' is 'custom', but 'datasets.custom.root' is null; expected the "
                        "folder of your labelled images, whose train_list images the pseudo tasks are built from")
    elif unl["source"] == "custom" and not custom["train_list"]:
        problems.append("config key 'unlabeled.source' is 'custom', but 'datasets.custom.train_list' is null; expected "
                        "the list of the train images the pseudo tasks are built from (the val_list images are the test set)")
    tr = config["training"]
    if tr["scale_min"] > tr["scale_max"]:
        problems.append(f"config key 'training.scale_min' ({tr['scale_min']}) exceeds 'training.scale_max' ({tr['scale_max']})")
    for i, method in enumerate(config["evaluation"]["methods"]):
        percent = re.fullmatch(r"(?:finetune|sup)-(\d+)%", method)
        if percent and not 1 <= int(percent.group(1)) <= 100:
            problems.append(f"config key 'evaluation.methods[{i}]' is '{method}', expected a percentage of the labelled "
                            "train images from 1 to 100")
    if custom["root"] or custom["classes"] or custom["folds"] is not None:
        from umtfss.data.custom import custom_folds

        try:
            custom_folds(custom)
        except ValueError as err:
            problems.append(str(err))
    if config["model"]["dim"] % config["model"]["heads"]:
        problems.append(f"config key 'model.dim' ({config['model']['dim']}) must be divisible by 'model.heads' ({config['model']['heads']})")
    if check_paths:
        for name in used_datasets(config):
            root = Path(config["datasets"][name]["root"]).expanduser()
            generated = name == "pascal" and config["demo"]["enabled"]
            if not generated and not root.is_dir():
                problems.append(f"config key 'datasets.{name}.root' is '{root}', which is not a directory; expected the data set root")
        custom_root = config["datasets"]["custom"]["root"]
        if custom_root and not Path(custom_root).expanduser().is_dir():
            problems.append(f"config key 'datasets.custom.root' is '{custom_root}', which is not a directory; expected "
                            "the folder of your labelled images (null when you have none)")
        if unl["source"] == "folder" and unl.get("folder") and not Path(unl["folder"]).expanduser().is_dir():
            problems.append(f"config key 'unlabeled.folder' is '{unl['folder']}', which is not a directory")
        for section in ("embedding", "model"):
            checkpoint = config[section].get("checkpoint")
            if checkpoint and not Path(checkpoint).expanduser().is_file():
                problems.append(f"config key '{section}.checkpoint' is '{checkpoint}', which is not a file; expected the "
                                f"weights of backbone '{config[section]['backbone']}' (null downloads checkpoint_url)")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def used_datasets(config: dict) -> list[str]:
    """Benchmarks that the configured unlabeled source reads."""
    src = config["unlabeled"]["source"]
    return [src] if src in ("pascal", "coco") else []


def load(source: str | Path | dict | None = None, check_paths: bool = False) -> dict:
    """Load a config from a YAML path, a JSON/YAML string, a dict, or None (all defaults), validated."""
    return validate(read_raw(source), check_paths=check_paths)


def read_raw(source: str | Path | dict | None = None) -> dict:
    """The config as given (load's sources), before validation fills the defaults: its top-level keys say
    which sections a stage was given (Snakemake passes each stage only those it reads)."""
    if source is None:
        data: Any = {}
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        text = str(source)
        if text.lstrip().startswith("{"):
            where = "the inline --config"
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # a YAML flow mapping, e.g. {clustering: {clusters: 30}}
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise ConfigError(f"inline --config '{text[:80]}' is neither JSON nor a YAML mapping: {err}") from None
        else:
            path = Path(text)
            where = f"config file '{path}'"
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration must be a mapping of sections (embedding:, clustering:, ...), got a "
                          f"{type(data).__name__}" + (f" in {where}" if source is not None and not isinstance(source, dict) else ""))
    return data


def with_runtime(raw: dict, runtime: str | None, sections: tuple[str, ...]) -> dict:
    """`raw` (read_raw's) with the --runtime settings of `sections` (those the stage reads) merged in: a
    JSON mapping of RUNTIME_KEYS only, so that nothing the workflow does not track can change a result."""
    if not runtime:
        return raw
    try:
        given = json.loads(runtime)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--runtime '{runtime[:80]}' is not JSON: {err}") from None
    allowed = ", ".join(f"{section}.{key}" for section, keys in RUNTIME_KEYS.items() for key in keys)
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise ConfigError(f"--runtime '{runtime[:80]}' must map sections to keys, e.g. "
                          '\'{"training": {"workers": 8}}\'' + f"; it takes {allowed}")
    other = [f"{section}.{key}" for section, keys in given.items() for key in keys
             if key not in RUNTIME_KEYS.get(section, ())]
    if other:
        raise ConfigError(f"--runtime sets {', '.join(other)}, which can change a result: give it in --config. "
                          f"--runtime takes only keys that change nothing but speed: {allowed}")
    merged = copy.deepcopy(raw)
    for section, keys in given.items():
        if section in sections:
            merged[section] = {**(merged.get(section) or {}), **keys}
    return merged


def runtime_settings(config: dict, sections: tuple[str, ...]) -> str:
    """The --runtime JSON of `sections` (their RUNTIME_KEYS in a loaded config), as the workflow passes it
    (in UMTFSS_RUNTIME, --runtime's default)."""
    return json.dumps({s: {k: config[s][k] for k in RUNTIME_KEYS[s]} for s in sections}, sort_keys=True)


def benchmark_kind(config: dict, name: str) -> str:
    """pascal, coco or custom: the benchmark named `name` in artifact paths (datasets.custom.name names yours)."""
    if name in ("pascal", "coco"):
        return name
    if name in ("custom", config["datasets"]["custom"]["name"]):
        return "custom"
    raise ValueError(f"--dataset is '{name}', expected pascal, coco or {config['datasets']['custom']['name']} "
                     "(datasets.custom.name: your labelled images), a labelled benchmark")


def test_episodes(config: dict, dataset: str) -> int:
    """Episodes per fold and seed: the configured number, else the paper's."""
    return config["evaluation"]["episodes"] or DEFAULT_TEST_EPISODES[dataset]
