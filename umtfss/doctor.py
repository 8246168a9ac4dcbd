"""`umtfss doctor`: what this machine gives each stage (versions, GPUs, what `auto` picks), before a long run."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "faiss-cpu", "faiss-gpu", "zarr", "numcodecs", "numpy", "pandas", "pyarrow",
            "snakemake", "jsonschema")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cores() -> str:
    """'N cores', and the machine's count beside it when this process may use fewer (a cpuset, taskset)."""
    from umtfss.threads import usable_cores

    usable, machine = usable_cores(), os.cpu_count() or 1
    return f"{usable} cores" + (f" (of the machine's {machine})" if usable < machine else "")


def report(path: str | Path = ".") -> list[tuple[str, str]]:
    """(topic, finding) rows: package versions, CUDA devices, faiss GPUs, the k-means backend and device
    that `clustering.backend: auto` picks, CPU bfloat16 units, free disk at `path`."""
    import faiss
    import torch

    import umtfss
    from umtfss.clustering.fit import choose_backend
    from umtfss.devices import cpu_bfloat16_native

    rows = [("umtfss", umtfss.__version__), ("python", platform.python_version())]
    rows += [(name, version) for name in PACKAGES if (version := _version(name)) is not None]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append((f"cuda:{index}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, bfloat16 "
                                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no (float16 AMP)'}"))
        rows.append(("device auto", "cuda: embed, train, evaluate and predict run on the GPU with AMP"))
    else:
        rows.append(("cuda", "not available: every stage runs on the CPU"))
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rows.append(("faiss GPUs", str(faiss_gpus)))
    if _version("faiss-cpu") and _version("faiss-gpu"):
        rows.append(("faiss", "warning: faiss-cpu and faiss-gpu are both installed; they write the same 'faiss' "
                              "module, so the one installed last is imported (faiss GPUs above). Keep one: "
                              "pip uninstall -y faiss-cpu faiss-gpu && pip install faiss-gpu"))
    backend, device = choose_backend("auto", "auto")
    rows.append(("fit (backend auto)", f"{backend} k-means on {device}"))
    native = cpu_bfloat16_native()
    rows.append(("cpu", f"{_cores()}, torch uses {torch.get_num_threads()} threads; bfloat16 units "
                        + ("yes: cpu_precision bfloat16 runs a ResNet-50 or ViT backbone about 3x faster (README, "
                           "CPU-only machines)" if native
                           else "no: keep cpu_precision float32 (bfloat16 would be emulated, slower)")))
    rows.append(("disk", disk_row(path)))
    return rows


def disk_row(path: str | Path) -> str:
    """Free disk where results will go: a --path that does not exist yet is measured at its nearest existing
    parent (the stages create it there), a file at its folder; the row says which, and never stops the report."""
    path = Path(path).resolve()
    where, why = path, ""
    if path.is_file():
        where, why = path.parent, f" (the folder of the file {path}; --path expects a folder)"
    elif not path.exists():
        where = next((parent for parent in path.parents if parent.is_dir()), Path(path.anchor))
        why = f" (the nearest existing parent of {path}, which does not exist yet)"
    try:
        usage = shutil.disk_usage(where)
    except OSError as err:
        return f"not measured at {where}: {err.strerror or err}"
    return f"{usage.free / 2**30:.1f} GiB free at {where}{why}"


def cli(parser: argparse.ArgumentParser):
    """`umtfss doctor`: print the report."""
    parser.add_argument("--path", default=".", help="where results will be written (free disk is checked there)")

    def run(args: argparse.Namespace) -> None:
        rows = report(args.path)
        width = max(len(topic) for topic, _ in rows)
        print("\n".join(f"{topic:<{width}}  {finding}" for topic, finding in rows))

    return run
