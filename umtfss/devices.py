"""Device choice shared by every stage: config value 'auto' means CUDA when torch sees one."""

from __future__ import annotations

import sys

import torch


def resolve_device(device: str, key: str = "device") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it, checked.

    `key` is the config key the value came from, named in the error message.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{key} = '{device}' is not a valid device; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} = '{device}', but torch sees no CUDA device (use 'auto' or 'cpu')")
    return resolved


CPU_PRECISIONS = ("float32", "bfloat16")


def cpu_bfloat16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, slower than float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def check_cpu_precision(value: str, key: str) -> str:
    """`value` if it is a CPU_PRECISIONS entry, else a ValueError naming `key`."""
    if value not in CPU_PRECISIONS:
        named = f"config key '{key}'" if "." in key else f"'{key}'"  # an API argument has no section
        raise ValueError(f"{named} is '{value}', expected one of {', '.join(CPU_PRECISIONS)}")
    return value


def lay_out_for_precision(module: torch.nn.Module, device: torch.device, cpu_precision: str, who: str) -> torch.nn.Module:
    """`module` in channels-last layout when it will run in bfloat16 on the CPU (oneDNN's fast bfloat16
    convolutions want it), with a note on stderr when this CPU only emulates bfloat16."""
    if device.type != "cpu" or cpu_precision != "bfloat16":
        return module
    if not cpu_bfloat16_native():
        print(f"umtfss {who}: note: bfloat16 was asked for on the CPU but this CPU has no bfloat16 units "
              "(AVX512-BF16 or AMX); the forward is emulated and slower than float32", file=sys.stderr)
    return module.to(memory_format=torch.channels_last)


def channels_last_input(images: torch.Tensor, cpu_precision: str) -> torch.Tensor:
    """Images in the layout lay_out_for_precision gave the module (unchanged unless bfloat16 on the CPU)."""
    if images.device.type == "cpu" and cpu_precision == "bfloat16" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def inference_autocast(device: torch.device, cuda_amp: bool, cpu_precision: str = "float32"):
    """The autocast context of a frozen forward pass: float16 on CUDA when `cuda_amp`, bfloat16 on the CPU
    when `cpu_precision` says so, else a disabled one (float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=cuda_amp)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_precision == "bfloat16")


def forward_precision(device: torch.device, cuda_amp: bool, cpu_precision: str = "float32") -> str:
    """What inference_autocast runs the forward in, as the artifacts record it."""
    if device.type == "cuda":
        return "float16 autocast (CUDA)" if cuda_amp else "float32"
    return "bfloat16 autocast, channels-last (CPU)" if cpu_precision == "bfloat16" else "float32"
