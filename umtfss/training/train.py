"""The train stage: meta-training on pseudo or labelled episodes and fine-tuning, with exact resume."""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from umtfss.devices import resolve_device
from umtfss.io import atomic_path
from umtfss.training import checkpoint as ckpt
from umtfss.training.augment import Augmentation
from umtfss.training.losses import build_loss
from umtfss.training.sources import ALL_CLASSES, EpisodeDataset, EpisodeSource
from umtfss.progress import tqdm

# training keys that do not change the result: a resume may differ in them
RESUME_FREE_KEYS = {"workers", "device", "checkpoint_minutes"}
FINETUNE_METHOD = re.compile(r"^finetune-(\d+)%$")
SUP_FRACTION_METHOD = re.compile(r"^sup-(\d+)%$")  # supervised from scratch on P % (paper Table 2, "w/o" rows)


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class Schedule:
    """What differs between meta-training and fine-tuning: epochs, batch and every group's base lr."""

    epochs: int
    batch_size: int
    lr_sgd: float
    lr_adamw: float
    episodes_per_epoch: int | None  # None: one episode per query image (or region) / labelled image

    @classmethod
    def from_config(cls, training_cfg: dict, finetune: bool) -> "Schedule":
        if finetune:  # the paper's fine-tuning epochs are passes over the labelled subset
            return cls(int(training_cfg["finetune_epochs"]), int(training_cfg["finetune_batch_size"]),
                       float(training_cfg["finetune_lr"]), float(training_cfg["finetune_lr_adamw"]), None)
        return cls(int(training_cfg["epochs"]), int(training_cfg["batch_size"]),
                   float(training_cfg["lr_sgd"]), float(training_cfg["lr_adamw"]), training_cfg["episodes_per_epoch"])


def steps_in_epoch(episodes: int, batch_size: int, drop_last: bool, finetune: bool) -> int:
    """Optimisation steps per epoch; with drop_last (reference code) a short last batch is no step, and
    an epoch of fewer episodes than a batch is refused rather than trained for zero steps."""
    if not drop_last:
        return math.ceil(episodes / batch_size)
    if episodes < batch_size:
        key = "finetune_batch_size" if finetune else "batch_size"
        raise ValueError(f"an epoch has {episodes} episode(s), fewer than training.{key} {batch_size}, and "
                         "training.drop_last leaves out a short batch: no step would run. Lower "
                         f"training.{key} or set training.drop_last to false")
    return episodes // batch_size


def lr_factor(step: int, total_steps: int, power: float, warmup_steps: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then poly decay (1 - step/total)^power."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, 1.0 - step / max(1, total_steps)) ** power


def lr_factors(training_cfg: dict, total_steps: int, steps_per_epoch: int) -> dict[str, Callable[[int], float]]:
    """Per optimizer, the lr multiplier at a step: SGD warms up (warmup_steps; null = one epoch) and
    decays (poly); AdamW stays constant unless adamw_schedule is poly (reference code: constant)."""
    warmup = training_cfg["warmup_steps"]
    warmup = steps_per_epoch if warmup is None else int(warmup)
    power = training_cfg["poly_power"]

    def scheduled(step: int) -> float:
        return lr_factor(step, total_steps, power, warmup)

    def constant(step: int) -> float:
        return 1.0

    return {"sgd": scheduled, "adamw": scheduled if training_cfg["adamw_schedule"] == "poly" else constant}


def build_optimizers(model, training_cfg: dict, schedule: Schedule) -> dict[str, torch.optim.Optimizer]:
    """SGD over non-Transformer parameters, AdamW over Transformer ones; each group's lr stated explicitly.

    Transformer biases get no weight decay unless adamw_bias_decay (reference code)."""
    other = [p for p in model.other_parameters() if p.requires_grad]
    transformer = [(n, p) for n, p in model.named_transformer_parameters() if p.requires_grad]
    optimizers = {}
    if other:
        optimizers["sgd"] = torch.optim.SGD(
            [{"params": other, "lr": schedule.lr_sgd}], lr=schedule.lr_sgd,
            momentum=training_cfg["momentum"], weight_decay=training_cfg["weight_decay_sgd"],
        )
    if transformer:
        decay = training_cfg["weight_decay_adamw"]
        bias_decay = decay if training_cfg["adamw_bias_decay"] else 0.0
        groups = [{"params": [p for n, p in transformer if not n.endswith("bias")], "weight_decay": decay},
                  {"params": [p for n, p in transformer if n.endswith("bias")], "weight_decay": bias_decay}]
        optimizers["adamw"] = torch.optim.AdamW([dict(g, lr=schedule.lr_adamw) for g in groups if g["params"]],
                                                lr=schedule.lr_adamw, weight_decay=decay)
    if not optimizers:
        raise ValueError("the model has no trainable parameter")
    return optimizers


def _model_keys_that_differ(stored: dict, model_cfg: dict) -> list[str]:
    """model keys whose value in an --init checkpoint's config differs from this config's."""
    from umtfss.model.fss import MODEL_KEYS

    return [f"model.{key}: {stored[key]!r} -> {model_cfg.get(key)!r}" for key in ("backbone", *MODEL_KEYS)
            if key in stored and key in model_cfg and stored[key] != model_cfg[key]]


def _amp_settings(device: torch.device, enabled: bool) -> tuple[bool, torch.dtype | None]:
    """(autocast on?, dtype): bf16 where the GPU has bf16 units (Ampere and later), else fp16 (with a GradScaler).

    torch's default also says yes where bf16 is only emulated (V100, T4): slow, and 8 mantissa bits for 11."""
    if device.type != "cuda" or not enabled:
        return False, None
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_conflicts(stored: dict, config: dict, method_name: str) -> list[str]:
    """Config keys whose values differ between a stored run and this one (those that change its result).

    Only this config's keys count (one the schema no longer has cannot change a result), and the
    fine-tuning keys only for a fine-tuning run."""
    diffs = []
    for section in ("model", "training"):
        old, new = stored.get(section, {}), config.get(section, {})
        for key in sorted(new):
            if section == "training" and (key in RESUME_FREE_KEYS or (
                    key.startswith("finetune_") and not FINETUNE_METHOD.match(method_name))):
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


class StepLog:
    """Per-step rows (step, epoch, loss, lr per group, seconds), rewritten atomically with each checkpoint."""

    def __init__(self, path: Path, groups: list[str]):
        self.path = path
        self.columns = ["step", "epoch", "loss", *[f"lr_{g}" for g in groups], "seconds"]
        self.rows: list[dict] = []

    def resume(self, up_to_step: int) -> None:
        """Keep the rows of the steps a checkpoint covers (a killed epoch's rows are dropped)."""
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                self.rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= up_to_step]

    def add(self, **row) -> None:
        self.rows.append(row)

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_path(self.path) as tmp:
            tmp.write_text(buffer.getvalue())


def _tensorboard(out_dir: Path):
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def train(
    config: dict,
    source: EpisodeSource,
    out_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    finetune: bool = False,
    method_name: str = "unsup",
    progress: bool = True,
    inputs: str | None = None,
    config_sections: list[str] | None = None,
    labelled_classes: list[str] | None = None,
    pseudo_tasks: dict | None = None,
) -> Path:
    """Train the FSS model on `source` into out_dir (last.pt each epoch and every
    training.checkpoint_minutes within one, checkpoint.pt, log.csv).

    If out_dir/last.pt holds a run of the same method, result-changing config and `inputs` (a
    fingerprint of the training data, umtfss.io.fingerprint) the run continues from it and ends
    exactly as an uninterrupted run; a last.pt of another config or data is stale (the workflow reruns a
    job after its config or inputs changed) and the run starts over, saying why on stderr, without the
    earlier run's checkpoint.pt. An out_dir holding a model of another method is refused.
    `config_sections`: the top-level keys the config was given with (recorded: predict's default size).
    `labelled_classes`: names of the classes trained with labels (recorded: evaluate refuses a fold
    whose test classes are among them). `pseudo_tasks`: the embedder and N of the clustering whose pseudo
    episodes the model (or its --init) meta-trained on (recorded: the score table's columns).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, method_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = config["training"]
    schedule = Schedule.from_config(tcfg, finetune)
    device = resolve_device(tcfg["device"], "training.device")
    use_amp, amp_dtype = _amp_settings(device, tcfg["amp"])

    torch.manual_seed(tcfg["seed"])
    model, backbone = ckpt.build_fss_model(config["model"])
    if init_checkpoint is not None:
        init = ckpt.load(init_checkpoint)
        try:
            ckpt.load_trainable_state(model, backbone, init["model"], init_checkpoint)
        except ValueError as err:
            differ = _model_keys_that_differ(init.get("config", {}).get("model", {}), config["model"])
            if not differ:
                raise
            raise ValueError(f"--init checkpoint '{init_checkpoint}' was trained with another model: {'; '.join(differ)} "
                             "(checkpoint -> this config); fine-tune it with the model section it was trained "
                             f"with. ({str(err)[:300]}...)") from None
    model.to(device)

    dataset = EpisodeDataset(source, tcfg["shots"], tcfg["crop_size"], Augmentation.from_config(tcfg),
                             seed=tcfg["seed"], episodes_per_epoch=schedule.episodes_per_epoch)
    steps_per_epoch = steps_in_epoch(len(dataset), schedule.batch_size, tcfg["drop_last"], finetune)
    total_steps = schedule.epochs * steps_per_epoch

    optimizers = build_optimizers(model, tcfg, schedule)
    factors = lr_factors(tcfg, total_steps, steps_per_epoch)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, factors[name]) for name, opt in optimizers.items()}
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = build_loss(tcfg["loss"], tcfg["dice_ignore"])
    log = StepLog(out_dir / "log.csv", list(optimizers))

    start_epoch, step, resumed_steps = 0, 0, 0  # resumed_steps: of epoch start_epoch, done before a kill
    last_path = out_dir / "last.pt"
    stale = _stale_reason(last_path, config, method_name, inputs) if last_path.is_file() else None
    if stale:
        print(f"umtfss train: not resuming from '{last_path}': {stale}; starting over", file=sys.stderr)
    elif last_path.is_file():
        start_epoch, step, resumed_steps = _resume(last_path, model, backbone, optimizers, schedulers, scaler, device)
        log.resume(step)
    final_path = out_dir / "checkpoint.pt"
    if start_epoch < schedule.epochs and final_path.is_file():
        # the model of an earlier run: beside this run's last.pt and log.csv it would pass for this run's
        final_path.unlink()
        print(f"umtfss train: removed '{final_path}' of an earlier run; this run writes its own when it ends",
              file=sys.stderr)

    def save_last(epochs_done: int, epoch_steps: int) -> None:
        """last.pt: everything a resume needs, after `epoch_steps` steps of epoch `epochs_done` (0: at its start)."""
        log.write()
        ckpt.save(
            last_path, config=config, method=method_name, model=ckpt.trainable_state(model, backbone),
            optimizers={k: o.state_dict() for k, o in optimizers.items()},
            schedulers={k: s.state_dict() for k, s in schedulers.items()},
            scaler=scaler.state_dict(), epoch=epochs_done, epoch_step=epoch_steps, step=step,
            rng=_rng_state(device), inputs=inputs, labelled_classes=sorted(labelled_classes or []),
        )

    minutes = tcfg["checkpoint_minutes"]
    skipped = 0  # steps of this process the GradScaler skipped
    last_saved = time.monotonic()
    board = _tensorboard(out_dir)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {method_name}", unit="step", disable=not progress)
    for epoch in range(start_epoch, schedule.epochs):
        model.train()
        dataset.set_epoch(epoch)
        epoch_steps = resumed_steps if epoch == start_epoch else 0
        # item i is a function of (seed, epoch, i): the batches left after a mid-epoch kill are the same ones
        items = Subset(dataset, range(epoch_steps * schedule.batch_size, len(dataset))) if epoch_steps else dataset
        loader = DataLoader(
            items, batch_size=schedule.batch_size, shuffle=False, num_workers=tcfg["workers"],
            pin_memory=device.type == "cuda", drop_last=tcfg["drop_last"],
            generator=torch.Generator().manual_seed(tcfg["seed"] * 100_003 + epoch),
        )
        tick = time.perf_counter()
        for batch in loader:
            lrs = {name: opt.param_groups[0]["lr"] for name, opt in optimizers.items()}
            loss, stepped = _train_step(model, batch, loss_fn, optimizers, scaler, device, use_amp, amp_dtype)
            if not math.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(
                    f"training stopped: the loss is {loss} at step {step + 1} (epoch {epoch + 1}); "
                    f"the last good state is {last_path if last_path.exists() else 'none (first epoch)'}. "
                    "Lower training.lr_sgd / training.lr_adamw, or set training.amp to false."
                )
            if stepped:  # a step the fp16 GradScaler skipped (inf gradients) does not advance the lr schedule
                for scheduler in schedulers.values():
                    scheduler.step()
            else:
                skipped += 1
            step += 1
            now = time.perf_counter()
            log.add(step=step, epoch=epoch + 1, loss=loss, **{f"lr_{k}": v for k, v in lrs.items()}, seconds=round(now - tick, 6))
            tick = now
            if board is not None:
                board.add_scalar("loss", loss, step)
                for name, value in lrs.items():
                    board.add_scalar(f"lr/{name}", value, step)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
            epoch_steps += 1
            if (minutes is not None and epoch_steps < steps_per_epoch
                    and time.monotonic() - last_saved >= 60 * minutes):
                save_last(epoch, epoch_steps)
                last_saved = time.monotonic()
        save_last(epoch + 1, 0)
        last_saved = time.monotonic()
    bar.close()
    if skipped:
        print(f"umtfss train: the fp16 GradScaler skipped {skipped} of {step} steps (inf or NaN gradients, its "
              "scale then halves); the lr schedule waited for them", file=sys.stderr)
    if board is not None:
        board.close()
    if not (out_dir / "log.csv").exists():
        log.write()
    final = ckpt.save(final_path, config=config, method=method_name,
                      model=ckpt.trainable_state(model, backbone), epoch=schedule.epochs, step=step, inputs=inputs,
                      config_sections=sorted(config_sections or []), labelled_classes=sorted(labelled_classes or []),
                      pseudo_tasks=dict(pseudo_tasks or {}))  # config_sections: which were given (test_size)
    return final


def _train_step(model, batch, loss_fn, optimizers, scaler, device, use_amp, amp_dtype) -> tuple[float, bool]:
    """One optimisation step on a batch of episodes: (loss value, whether the optimisers stepped). A NaN
    loss is not applied; a fp16 GradScaler skips a step whose gradients overflowed (its scale drops)."""
    query = batch["query"].to(device, non_blocking=True)
    target = batch["query_mask"].to(device, non_blocking=True)
    supports = batch["supports"].to(device, non_blocking=True)
    support_masks = batch["support_masks"].float().to(device, non_blocking=True)  # 0/1, 255 = ignore or padding
    query_valid = batch["query_valid"].to(device, non_blocking=True)  # padding from resize / rotation / crop only
    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        logits = model(query, supports, support_masks, query_valid)
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    loss = loss_fn(logits.float(), target)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, False
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for opt in optimizers.values():
        scaler.step(opt)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.update()
    return value, scale is None or scaler.get_scale() >= scale


def _stale_reason(path: Path, config: dict, method_name: str, inputs: str | None) -> str | None:
    """Why last.pt cannot be resumed by this run (another method, config or input data), or None."""
    try:
        state = ckpt.load(path, mmap=True)  # its record only: _resume reads the tensors
    except ValueError as err:
        return str(err)
    if state.get("method") != method_name:
        return f"it belongs to method '{state.get('method')}', not '{method_name}'"
    conflicts = _resume_conflicts(state.get("config", {}), config, method_name)
    if conflicts:
        return f"it was trained with another configuration ({'; '.join(conflicts)})"
    if state.get("inputs") != inputs:
        return "it was trained on other input data (episodes, labels, tables or init checkpoint changed)"
    return None


def check_out_dir(out_dir: Path, method_name: str) -> None:
    """Refuse, before any work, an --out-dir that is a file or lies under one, or that holds a model of
    another method: a run there would replace it (a workflow rerun always finds its own method)."""
    from umtfss.io import check_output_paths

    check_output_paths({"--out-dir": out_dir}, kind="folder")
    for name in ("checkpoint.pt", "last.pt"):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            stored = ckpt.load(path, mmap=True).get("method")
        except ValueError:
            continue  # unreadable: no model to keep (a last.pt of a killed save is started over)
        if stored and stored != method_name:
            raise ValueError(f"--out-dir '{out_dir}' holds {name} of method '{stored}', not '{method_name}'; "
                             "training here would replace that model: give this method its own --out-dir")


def _restore_scaler(scaler: torch.amp.GradScaler, stored: dict) -> None:
    """A saved GradScaler state; {} (saved by a disabled scaler: CPU, bf16 GPU) leaves a fp16 resume its fresh scale."""
    if stored:
        scaler.load_state_dict(stored)


def _resume(path, model, backbone, optimizers, schedulers, scaler, device) -> tuple[int, int, int]:
    """Restore everything from last.pt (checked by _stale_reason first): (epochs done, steps done, steps
    done of the next epoch; 0 for a last.pt written at an epoch's end or before mid-epoch saves existed)."""
    state = ckpt.load(path)
    ckpt.load_trainable_state(model, backbone, state["model"], path)
    if set(state["optimizers"]) != set(optimizers):
        raise ValueError(f"'{path}' has optimisers {sorted(state['optimizers'])}, expected {sorted(optimizers)}")
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
        schedulers[name].load_state_dict(state["schedulers"][name])
    _restore_scaler(scaler, state["scaler"])
    _set_rng_state(state["rng"], device)
    return int(state["epoch"]), int(state["step"]), int(state.get("epoch_step", 0))


# ---------------------------------------------------------------- command line


def cli(parser: argparse.ArgumentParser):
    """`umtfss train`: unsup on pseudo episodes, sup / finetune-P% on labelled base-class episodes."""
    parser.add_argument("--config", required=True, help="YAML file or inline JSON")
    parser.add_argument("--method", required=True,
                        help="unsup, sup, sup-P%% (from scratch on P %% of the labels) or finetune-P%% (e.g. finetune-20%%)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for checkpoint.pt, last.pt, log.csv")
    parser.add_argument("--episodes", type=Path, help="unsup: folder with regions.parquet and candidates.parquet")
    parser.add_argument("--labels", nargs="+", type=Path, help="unsup: label store shards (labels/shard-*.zarr)")
    parser.add_argument("--images", type=Path, help="unsup: images.parquet of the unlabeled source")
    parser.add_argument("--tables", type=Path, help="sup/finetune: prepare folder (images/classes/image_classes parquet)")
    parser.add_argument("--dataset", help="sup/finetune: benchmark of the tables (pascal, coco, custom)")
    parser.add_argument("--fold", type=_fold_argument, metavar="{0,1,2,3,all}",
                        help="sup/finetune: fold whose base classes are trained; 'all': every class, for a model to "
                             "apply to classes beyond the data set (scoring it on the data set's own folds would "
                             "test classes it has seen)")
    parser.add_argument("--init", type=Path, help="finetune: checkpoint to start from (the unsup model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--runtime", metavar="JSON", default=os.environ.get("UMTFSS_RUNTIME"),
                        help="settings that change only speed, over --config's: training.workers and "
                             "training.checkpoint_minutes, e.g. '{\"training\": {\"workers\": 8}}' (default: "
                             "$UMTFSS_RUNTIME, where the workflow puts them, untracked, so that changing one reruns no job)")
    return run


def _fold_argument(text: str) -> int | str:
    if text == ALL_CLASSES:
        return text
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a fold; expected 0, 1, 2, 3 or {ALL_CLASSES}")
    return int(text)


def run(args: argparse.Namespace) -> Path:
    from umtfss.config import RUNTIME_KEYS, load, read_raw, with_runtime

    config = load(with_runtime(read_raw(args.config), args.runtime, ("training",)))
    if args.runtime:
        settings = ", ".join(f"{k} {config['training'][k]}" for k in RUNTIME_KEYS["training"])
        print(f"umtfss train: settings that change only speed (--runtime): {settings}", file=sys.stderr)
    method = args.method
    check_out_dir(args.out_dir, method)  # before the sources are read (a COCO index takes a while)
    finetune = FINETUNE_METHOD.match(method)
    fraction = finetune or SUP_FRACTION_METHOD.match(method)  # the labelled subset: P % of the train images
    if method == "unsup":
        _require(args, ["episodes", "labels", "images"], method)
        source = _pseudo_source(args, config)
    elif method == "sup" or fraction:
        _require(args, ["tables", "dataset", "fold"] + (["init"] if finetune else []), method)
        source = _labelled_source(args, config, int(fraction.group(1)) / 100 if fraction else None)
    else:
        raise ValueError(f"--method is '{method}', expected unsup, sup, sup-P% or finetune-P% (e.g. finetune-20%)")
    if args.init is not None and not args.init.is_file():
        raise FileNotFoundError(f"--init checkpoint '{args.init}' does not exist")
    if args.init is not None:
        _check_init_held_out(args, source)
    subset_file = args.out_dir / "train_subset.txt"
    if fraction and subset_file.is_file() and subset_file.read_text().split() != list(source.image_ids):
        subset_file.unlink()  # another run's subset: beside this run's log it would pass for this one's
    final = train(config, source, args.out_dir, init_checkpoint=args.init, finetune=bool(finetune),
                  method_name=method, progress=not args.quiet, inputs=_inputs_fingerprint(args),
                  config_sections=sorted(read_raw(args.config)), labelled_classes=_labelled_class_names(args, source),
                  pseudo_tasks=_pseudo_tasks(args, source))
    if fraction:  # which images the P % were, written once the model they trained exists
        with atomic_path(args.out_dir / "train_subset.txt") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in source.image_ids))
    return final


def _check_init_held_out(args, source) -> None:
    """Refuse to fine-tune for a fold from an --init trained with labels on that fold's test classes
    (another fold's sup model): evaluate would refuse the result, after the whole fine-tuning."""
    novel = getattr(source, "novel_classes", None)
    if not novel:
        return
    from umtfss.data.prepare import read_tables

    classes = read_tables(args.tables).classes
    by_id = dict(zip(classes["class_id"].astype(int), classes["name"].astype(str)))
    seen = sorted(set(ckpt.labelled_classes(ckpt.load(args.init))) & {by_id.get(int(c), str(c)) for c in novel})
    if seen:
        raise ValueError(f"--init checkpoint '{args.init}' was trained with labels on {', '.join(seen)}, test "
                         f"class(es) of fold {args.fold}: a model fine-tuned from it would not be few-shot on that "
                         "fold; start from the unsup model or from this fold's own sup model")


def _labelled_class_names(args, source) -> list[str]:
    """The classes this run trains on with labels, and those its --init was trained on with labels."""
    names = []
    if hasattr(source, "base_classes"):  # a labelled source (sup, sup-P%, finetune-P%)
        from umtfss.data.prepare import read_tables

        classes = read_tables(args.tables).classes
        by_id = dict(zip(classes["class_id"].astype(int), classes["name"].astype(str)))
        names = [by_id.get(int(c), str(c)) for c in source.base_classes]
    if args.init is not None:
        names += ckpt.labelled_classes(ckpt.load(args.init))
    return sorted(set(names))


def _pseudo_tasks(args, source) -> dict:
    """{embedder, clusters} of the pseudo episodes this run meta-trains on, or that its --init did; {} for
    a model that never saw any (sup, sup-P%) or a label store too old to say."""
    if getattr(source, "labels", None) is not None:  # pseudo episodes: their label store's record
        from umtfss.stores import embedder_name

        embedder = embedder_name(source.labels.attrs)
        return {"embedder": embedder, "clusters": source.labels.clusters} if embedder else {"clusters": source.labels.clusters}
    if args.init is not None:
        return dict(ckpt.load(args.init, mmap=True).get("pseudo_tasks") or {})
    return {}


def _inputs_fingerprint(args) -> str:
    """The identity of the training data named on the command line (see train(): resume or start over)."""
    from umtfss.io import fingerprint
    from umtfss.pseudo_episodes import CANDIDATES_FILE, FEATURES_FILE, REGIONS_FILE

    paths = []
    if args.episodes is not None:
        paths += [args.episodes / REGIONS_FILE, args.episodes / CANDIDATES_FILE, args.episodes / FEATURES_FILE]
    paths += list(args.labels or [])
    paths += [args.images] if args.images is not None else []
    paths += sorted(args.tables.glob("*.parquet")) if args.tables is not None else []
    paths += [args.init] if args.init is not None else []
    return fingerprint(paths, extra={"dataset": args.dataset, "fold": args.fold})


def _require(args, names: list[str], method: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--method {method} needs {', '.join(missing)}")


def _pseudo_source(args, config):
    """Pseudo episodes over all images ('all' setting), or, given --tables/--fold, over the fold's
    images (the paper's 'fold' setting; unlabeled.fold_images says which: by default, as the reference
    code, those where a base class is present)."""
    from umtfss.pseudo_episodes import PseudoEpisodes

    image_ids = None
    if args.fold == ALL_CLASSES:
        raise ValueError("--fold all is for sup and finetune (every labelled class); unsup trains on every image "
                         "without --tables and --fold")
    if args.tables is not None or args.fold is not None:
        _require(args, ["tables", "fold"], "unsup in the 'fold' setting")
        from umtfss.data.prepare import read_tables, train_images_for_fold

        rule = config["unlabeled"]["fold_images"]
        tables = read_tables(args.tables)
        image_ids = train_images_for_fold(tables, args.fold, remove_novel=rule == "no_novel",
                                          require_base_class=rule == "base_present")
        if not image_ids:
            which = "holds a base class" if rule == "base_present" else "is free of the fold's novel classes"
            raise ValueError(f"fold {args.fold} of '{args.tables}' has no train image that {which} "
                             f"(config key unlabeled.fold_images is '{rule}'): nothing to meta-train its unsup model on")
    source = PseudoEpisodes(args.episodes, args.labels, args.images, image_ids=image_ids,
                            sampling=config["training"]["episode_sampling"])
    if image_ids is not None:  # what the fold's model is trained on, for the log
        train = int((tables.images["split"] == "train").sum())
        print(f"umtfss train: fold {args.fold} ('fold' setting, fold_images {rule}): {len(image_ids)} of {train} "
              f"train images, {len(source)} query {source.sampling}s", file=sys.stderr)
    return source


def _labelled_source(args, config, fraction: float | None):
    from umtfss.data.prepare import read_tables
    from umtfss.training.sources import LabelledEpisodes, finetune_subset

    from umtfss.config import benchmark_kind

    dataset = benchmark_kind(config, args.dataset)  # the workflow names yours datasets.custom.name
    tables = read_tables(args.tables)
    dataset_cfg = config["datasets"][dataset]
    image_ids = None
    if fraction is not None:
        image_ids = finetune_subset(tables, fraction, config["training"]["seed"])
    return LabelledEpisodes(tables, dataset, args.fold, image_ids=image_ids,
                            min_class_pixels=dataset_cfg["min_class_pixels"],
                            remove_novel_train=dataset_cfg["remove_novel_train"],
                            class_draw=config["training"]["labelled_class_draw"])
