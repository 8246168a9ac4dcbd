"""How many CPU threads a stage may run: the cores of its affinity mask, not the machine's (imports no torch)."""

from __future__ import annotations

import os
import sys


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (a cluster job's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cap_cpu_threads() -> int:
    """Run a stage with no more CPU threads than usable cores; returns that count.

    Snakemake exports OMP_NUM_THREADS = a job's threads. torch caps it at the machine's cores, but not
    at the process's affinity: a cluster job given 4 of a node's 64 cores whose threads say 64 (the
    torch jobs' default without --cores, workflow/rules/common.smk) would run 64 threads on 4 cores.
    Oversubscribed like that, the demo's model trained 1.3-1.7x slower (benchmarks/train_throughput.py,
    --threads 8 vs 2 on 2 cores). The variables are lowered before torch is imported, torch's own
    count after.
    """
    cores = usable_cores()
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > cores:
            os.environ[name] = str(cores)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return cores
