"""Episodes per second of FSS training steps and of evaluation forward passes on synthetic batches.

    python benchmarks/train_throughput.py                       # CPU: demo-colortexture, crop 160, batch 8
    python benchmarks/train_throughput.py --device cuda         # GPU: resnet50-imagenet, crop 473, batch 8
    python benchmarks/train_throughput.py --cpu-precision bfloat16   # evaluation forward in CPU bfloat16

The model has the default config (d 256, 8 heads, 2 layers, K_fg 50 / K_bg 100); the backbone has
random weights (throughput does not depend on them). Data loading is not included: batches are
random tensors already on the device, so the figures are the model's ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from umtfss.backbones import build_backbone
from umtfss.config import load
from umtfss.model.fss import build_model
from umtfss.training.losses import build_loss
from umtfss.devices import channels_last_input, inference_autocast, lay_out_for_precision, resolve_device
from umtfss.training.train import Schedule, _amp_settings, _train_step, build_optimizers


def synthetic_batch(batch: int, shots: int, size: int, device, generator: torch.Generator) -> dict:
    """Random images with a random rectangle as query and support mask."""
    masks = torch.zeros(batch, shots + 1, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(shots + 1):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            masks[b, k, top : top + size // 2, left : left + size // 2] = 1
    images = torch.rand(batch, shots + 1, 3, size, size, generator=generator)
    return {
        "query": images[:, 0].to(device), "query_mask": masks[:, 0].to(device),
        "query_valid": torch.ones(batch, size, size, dtype=torch.bool, device=device),
        "supports": images[:, 1:].to(device), "support_masks": masks[:, 1:].to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run_once, steps: int, warmup: int, device) -> float:
    """Seconds per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        run_once()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_once()
    _sync(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--backbone", help="default: demo-colortexture on CPU, resnet50-imagenet on CUDA")
    parser.add_argument("--crop", type=int, help="default: 160 on CPU, 473 on CUDA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--attention", default="prototype", choices=["prototype", "vanilla"])
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--cpu-precision", choices=["float32", "bfloat16"], default="float32",
                        help="evaluation.cpu_precision of the evaluation forward on a CPU (training stays float32)")
    parser.add_argument("--model-config", help="take the model section from this YAML (e.g. config.yaml, the demo's "
                                               "small model) instead of the defaults; --backbone and --attention still apply")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone_name = args.backbone or ("resnet50-imagenet" if device.type == "cuda" else "demo-colortexture")
    crop = args.crop or (473 if device.type == "cuda" else 160)
    model_section = dict(load(args.model_config)["model"]) if args.model_config else {}
    config = load({"model": {**model_section, "backbone": backbone_name, "attention": args.attention},
                   "training": {"batch_size": args.batch, "shots": args.shots, "crop_size": crop,
                                "amp": not args.no_amp}})
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, random_init=True)
    model = build_model(config["model"], backbone).to(device)
    use_amp, amp_dtype = _amp_settings(device, config["training"]["amp"])
    optimizers = build_optimizers(model, config["training"], Schedule.from_config(config["training"], False))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = build_loss(config["training"]["loss"], config["training"]["dice_ignore"])
    batch = synthetic_batch(args.batch, args.shots, crop, device, torch.Generator().manual_seed(0))

    def train_step():
        model.train()
        _train_step(model, batch, loss_fn, optimizers, scaler, device, use_amp, amp_dtype)

    @torch.no_grad()
    def eval_forward():  # as evaluate runs it: CPU bfloat16 with evaluation.cpu_precision, else as training does
        model.eval()
        autocast = (inference_autocast(device, False, args.cpu_precision) if device.type == "cpu"
                    else torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp))
        with autocast:
            model(channels_last_input(batch["query"], args.cpu_precision), batch["supports"],
                  (batch["support_masks"] == 1).float())

    train_s = measure(train_step, args.steps, args.warmup, device)
    lay_out_for_precision(model, device, args.cpu_precision, "benchmark")  # in place, after the training steps
    eval_s = measure(eval_forward, args.steps, args.warmup, device)
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "backbone": backbone_name, "crop": crop, "batch": args.batch, "shots": args.shots,
        "attention": args.attention, "amp": str(amp_dtype).replace("torch.", "") if use_amp else "off",
        "eval_cpu_precision": args.cpu_precision, "model_config": args.model_config or "defaults",
        "threads": args.threads,
        "train_episodes_per_s": round(args.batch / train_s, 2),
        "eval_episodes_per_s": round(args.batch / eval_s, 2),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
