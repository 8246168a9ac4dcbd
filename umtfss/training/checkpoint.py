"""Checkpoints: atomic save, safe load (weights_only), and the model rebuilt from the stored config."""

from __future__ import annotations

from pathlib import Path

import torch

from umtfss.io import atomic_path, first_line

FORMAT = "umtfss-checkpoint-1"
# model keys added after checkpoints existed, with the behaviour a checkpoint written before them was
# trained with (their schema defaults now follow the reference code)
LEGACY_MODEL_VALUES = {"linear_bias": True, "grid_masks": "bilinear", "empty_support": "none", "hash_bias": False, "positional": "sine",
                       "hash_draw": "fixed"}


def save(path: str | Path, **payload) -> Path:
    """Write a checkpoint atomically; the payload must hold only tensors, numbers, strings, lists, dicts."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return Path(path)


def test_size(payload: dict) -> tuple[int, str]:
    """(size, the key it comes from) to segment at with a checkpoint: its config's evaluation.test_size
    when the training config set one, else the crop it was trained at. The workflow gives a training job
    no evaluation section (changing it must not retrain), so there the crop is the size it knows."""
    config = payload["config"]
    if "evaluation" in payload.get("config_sections", ()):
        return int(config["evaluation"]["test_size"]), "evaluation.test_size"
    return int(config["training"]["crop_size"]), "training.crop_size"


def _load_failure(err: Exception) -> str:
    """torch's reason without its advice to retry with weights_only=False (that would run the file's code)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        reason = first_line(text.split("WeightsUnpickler error:", 1)[1])
        if reason.startswith("Unsupported global"):
            return (f"not a file of tensors and plain values ({reason.split(' was not', 1)[0]}); umtfss reads "
                    "checkpoints with weights_only=True and never runs code from one")
        return f"truncated, or not a torch file ({reason})"
    return f"{type(err).__name__}: {first_line(text, 'the file ends at once: empty')} (truncated, or not a torch file)"


def labelled_classes(payload: dict) -> list[str]:
    """Names of the classes a checkpoint was trained on with labels (none for unsup, or one saved before this was recorded)."""
    return list(payload.get("labelled_classes") or [])


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by `save` (torch.load with weights_only=True: no code runs). mmap: map
    the tensors instead of reading them, for a look at the method or config (a 400 MB file: 8 ms, not 0.2 s)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint '{path}' is a folder; expected a checkpoint file (checkpoint.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated file, pickle with objects, not a torch file
        raise ValueError(f"checkpoint '{path}' cannot be read: {_load_failure(err)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a umtfss checkpoint (expected format '{FORMAT}')")
    return data


def build_backbone_from_config(model_cfg: dict):
    """The frozen backbone named in config['model'], its weights from the configured checkpoint."""
    from umtfss.backbones import build_backbone

    return build_backbone(
        model_cfg["backbone"],
        checkpoint=model_cfg.get("checkpoint"),
        checkpoint_url=model_cfg.get("checkpoint_url"),
        checkpoint_sha256=model_cfg.get("checkpoint_sha256"),
        output_stride=8,
        config_section="model",
    )


def build_fss_model(model_cfg: dict):
    """(model, backbone): the FSS model of config['model'] around a freshly built frozen backbone."""
    from umtfss.model.fss import build_model

    backbone = build_backbone_from_config(model_cfg)
    return build_model(model_cfg, backbone), backbone


def _backbone_prefix(model: torch.nn.Module, backbone: torch.nn.Module | None) -> str | None:
    for name, module in model.named_modules():
        if module is backbone and name:
            return name + "."
    return None


def trainable_state(model: torch.nn.Module, backbone: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The model's state dict without the frozen backbone (rebuilt from the registry on load)."""
    prefix = _backbone_prefix(model, backbone)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if prefix is None or not k.startswith(prefix)}


def load_trainable_state(model: torch.nn.Module, backbone, state: dict, source: str | Path) -> None:
    """Load a trainable state; every non-backbone key must match, or the error names the checkpoint."""
    prefix = _backbone_prefix(model, backbone)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"checkpoint '{source}' does not fit the configured model: {err}") from None
    missing = [k for k in result.missing_keys if prefix is None or not k.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint '{source}' does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]} (was it trained with another model config?)"
        )


def load_model(path: str | Path, device="cpu", backbone_checkpoint: str | Path | None = None):
    """The trained FSSModel of a checkpoint, in eval mode on `device`.

    The checkpoint holds the trained weights only; the frozen backbone is rebuilt from the stored
    config (its model.checkpoint file, else its URL). `backbone_checkpoint` replaces that file, for a
    checkpoint moved to another folder or machine (a recorded checkpoint_sha256 still has to match).
    """
    data = load(path)
    config = data.get("config")
    if not isinstance(config, dict) or "model" not in config or "model" not in data:
        raise ValueError(f"checkpoint '{path}' holds no model config or weights")
    # a checkpoint from before a behaviour key existed was trained with the behaviour of that time
    model_cfg = {**LEGACY_MODEL_VALUES, **config["model"]}
    if backbone_checkpoint is not None:
        model_cfg["checkpoint"] = str(backbone_checkpoint)
    try:
        model, backbone = build_fss_model(model_cfg)
    except (FileNotFoundError, ValueError) as err:
        recorded = model_cfg.get("checkpoint")
        if recorded is None or backbone_checkpoint is not None:
            raise
        raise ValueError(f"checkpoint '{path}' holds the trained weights, not its frozen backbone's: backbone "
                         f"'{model_cfg['backbone']}' is rebuilt from model.checkpoint '{recorded}', as recorded at "
                         f"training time (relative paths from {Path.cwd()}), and that failed: {err}. Point at the "
                         "backbone's weights with --backbone-checkpoint PATH (umtfss predict) or "
                         "backbone_checkpoint= (FewShotSegmenter.load)") from None
    try:
        load_trainable_state(model, backbone, data["model"], path)
    except ValueError as err:
        from umtfss.model.fss import MODEL_KEYS

        absent = [key for key in MODEL_KEYS if key not in config["model"]]
        if absent:  # keys added to the model after this checkpoint was written took their new defaults
            raise ValueError(f"{err}; its config lacks model key(s) {', '.join(absent)}: it was written by an older "
                             "umtfss whose model differs; retrain it (snakemake reruns train when its config changes)") from None
        raise
    return model.to(device).eval()
