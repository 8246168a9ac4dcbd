"""Prototype-aware vs vanilla cross-attention: time and peak-memory ratios next to the operation-count ratio.

Each (variant, batch) is measured in its own subprocess so that peak memory is not polluted by the
other runs: on CUDA torch.cuda.max_memory_allocated, on CPU the ru_maxrss growth during one
forward+backward. The prototype time includes the Hamming k-means that builds the prototypes.

    python benchmarks/attention_cost.py --quick            # CPU-sized: 30x30 grid, batch 1-2
    python benchmarks/attention_cost.py --device cuda      # the paper's 60x60 grid, batch 1-4
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

from umtfss.model.attention import PrototypeCrossAttention, VanillaCrossAttention


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--grid", type=int, default=60, help="feature grid side (473 px at stride 8 -> 60)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--prototypes-fg", type=int, default=50)
    parser.add_argument("--prototypes-bg", type=int, default=100)
    parser.add_argument("--hash-bits", type=int, default=32)
    parser.add_argument("--hash-iterations", type=int, default=10)
    parser.add_argument("--foreground", type=float, default=0.25, help="fraction of support pixels in the foreground")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--forward-only", action="store_true", help="time forward only (default forward+backward)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--quick", action="store_true", help="30x30 grid, batches 1 2, 2 repeats")
    parser.add_argument("--worker", choices=["prototype", "vanilla"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.batches, args.repeats = 30, [1, 2], 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def build_inputs(args, device):
    """Query and support tokens [B,HW,d] and a support foreground blob covering `foreground` of the grid."""
    generator = torch.Generator().manual_seed(0)
    tokens = args.grid * args.grid
    query = torch.randn(args.batch, tokens, args.dim, generator=generator).to(device).requires_grad_()
    support = torch.randn(args.batch, tokens, args.dim, generator=generator).to(device).requires_grad_()
    side = max(1, round(args.grid * args.foreground**0.5))
    foreground = torch.zeros(args.batch, args.grid, args.grid, dtype=torch.bool)
    foreground[:, :side, :side] = True
    return query, support, foreground.flatten(1).to(device)


def build_block(args, device) -> torch.nn.Module:
    if args.worker == "vanilla":
        block = VanillaCrossAttention(args.dim, args.heads, dropout=0.1)
    else:
        block = PrototypeCrossAttention(
            args.dim, args.heads, 0.1, args.prototypes_fg, args.prototypes_bg, args.hash_bits, args.hash_iterations
        )
    return block.to(device).train()


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> dict:
    """One variant at one batch size: peak memory of the first step, then median step time."""
    torch.set_num_threads(args.threads)
    device = args.device
    block = build_block(args, device)
    query, support, foreground = build_inputs(args, device)

    def step():
        out = block(query, support, foreground)
        if not args.forward_only:
            out.sum().backward()
        synchronise(device)

    synchronise(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        query.grad = support.grad = None
        block.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_bytes": int(peak)}


def run_worker(args, variant: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--batch", str(batch), "--device", args.device,
               "--grid", str(args.grid), "--dim", str(args.dim), "--heads", str(args.heads),
               "--prototypes-fg", str(args.prototypes_fg), "--prototypes-bg", str(args.prototypes_bg),
               "--hash-bits", str(args.hash_bits), "--hash-iterations", str(args.hash_iterations),
               "--foreground", str(args.foreground), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.forward_only:
        command.append("--forward-only")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {variant} batch {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    tokens = args.grid * args.grid
    prototypes = args.prototypes_fg + args.prototypes_bg
    ops_prototype = 2 * tokens * prototypes * args.dim
    ops_vanilla = 2 * tokens**2 * args.dim
    print("command:", shlex.join([sys.executable, *sys.argv]))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} thread(s))"
    print(f"device: {device_name}; grid {args.grid}x{args.grid} (HW={tokens}), d={args.dim}, heads={args.heads}, "
          f"K_fg={args.prototypes_fg}, K_bg={args.prototypes_bg}, b={args.hash_bits}, r={args.hash_iterations}, "
          f"1-shot, {'forward' if args.forward_only else 'forward+backward'}, median of {args.repeats}")
    print(f"attention op counts: prototype 2*HW*(K_fg+K_bg)*d = {ops_prototype:.3g}, vanilla 2*(HW)^2*d = "
          f"{ops_vanilla:.3g}, ratio {ops_prototype / ops_vanilla:.4f}")
    header = f"{'batch':>5} {'proto ms':>9} {'vanilla ms':>10} {'time ratio':>10} {'proto MiB':>9} {'vanilla MiB':>11} {'mem ratio':>9} {'op ratio':>8}"
    print(header)
    for batch in args.batches:
        proto = run_worker(args, "prototype", batch)
        vanilla = run_worker(args, "vanilla", batch)
        mem_ratio = proto["peak_bytes"] / vanilla["peak_bytes"] if vanilla["peak_bytes"] > 0 else float("nan")
        print(f"{batch:>5} {proto['time_s'] * 1e3:>9.2f} {vanilla['time_s'] * 1e3:>10.2f} "
              f"{proto['time_s'] / vanilla['time_s']:>10.3f} {proto['peak_bytes'] / 2**20:>9.1f} "
              f"{vanilla['peak_bytes'] / 2**20:>11.1f} {mem_ratio:>9.3f} {ops_prototype / ops_vanilla:>8.4f}", flush=True)
    print("ratios are prototype / vanilla; the prototype time includes hashing and Hamming k-means of fg and bg")


if __name__ == "__main__":
    main()
