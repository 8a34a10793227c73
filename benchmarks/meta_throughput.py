"""Meta-update throughput and peak memory of MAML (second-order) and first-order MAML through
their three execution paths: vmap over the meta-batch, chunked vmap, and a per-task loop.

    python benchmarks/meta_throughput.py [--device cpu|cuda] [--meta-batch 16] [--steps 7]
                                         [--chunk 4] [--conv] [--threads N] [--no-memory]

A meta-update (``meta_step``: meta-gradient and Adam step) runs on a pre-drawn batch of 5-way 5-shot
episodes (15 queries per class). The three paths of one algorithm start from the same seeded
model and see the same episodes. They take turns, update by update, in one process, so a
change in the machine's load (it may be shared) hits them alike; updates/s is 1 / the median
update time. Peak memory comes from a fresh subprocess per configuration (warm-up plus one
update), so it is not blurred by what another configuration left in the allocator: on CPU the
peak resident set size (VmHWM) above the resident size before the first update, on CUDA
torch.cuda.max_memory_allocated above the memory allocated before it. The last column is the
largest absolute difference between a path's meta-gradient at the initial weights and the
vmap path's: the paths compute the same numbers, so it should be at rounding level.

Encoders: the tabular MLP (32 features, hidden 128, embedding 64) and, with --conv, Conv4
(32 channels) on 1×28×28 images. Thread count is torch's default unless --threads is given
(or OMP_NUM_THREADS is set); when the cores are busy with other work, more threads than idle
cores slow every path down many times over, so compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from autometa_builtins.encoders import Conv4, TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import FOMAML, MAML

from autometa.components import Backbone, InputSpec
from autometa.types import Features, TrainingPool

ALGORITHMS = {"maml": MAML, "fomaml": FOMAML}
N_CLASSES, ROWS_PER_CLASS = 40, 25


def paths(chunk: int) -> dict[str, dict]:
    return {
        "vmap": {"vectorize": True},
        f"vmap chunk {chunk}": {"vectorize": True, "chunk_size": chunk},
        "per-task": {"vectorize": False},
    }


def problem(encoder: str, device: torch.device) -> tuple[Backbone, TrainingPool]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLASSES).repeat_interleave(ROWS_PER_CLASS)
    if encoder == "mlp":
        spec = InputSpec("tabular", (32,))
        x = torch.randn(len(labels), 32, generator=gen)
        torch.manual_seed(0)
        # No dropout: its random masks would differ between paths and blur the gradient check.
        module = TabularMLP(spec, hidden=128, out_dim=64, layers=2, dropout=0.0)
    else:
        spec = InputSpec("image", (1, 28, 28))
        x = torch.randn(len(labels), 1, 28, 28, generator=gen)
        torch.manual_seed(0)
        module = Conv4(spec, channels=32)
    features = Features({spec.modality: x}, {spec.modality: spec}).to(device)
    rows = np.arange(len(labels))
    pool = TrainingPool(
        features, labels.to(device), rows, [{c: rows[labels.numpy() == c] for c in range(N_CLASSES)}], device
    )
    backbone = Backbone({spec.modality: module}, Concat({spec.modality: module.out_dim})).to(device)
    return backbone, pool


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets VmHWM to the current resident size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def build(encoder: str, algorithm: str, options: dict, args: argparse.Namespace):
    """The algorithm set up on the seeded model, and its pre-drawn episode batches."""
    device = torch.device(args.device)
    backbone, pool = problem(encoder, device)
    alg = ALGORITHMS[algorithm](meta_batch=args.meta_batch, inner_steps=args.inner_steps, **options)
    alg.setup(backbone, pool, (args.ways, args.shots, args.queries))
    rng = np.random.default_rng(1)
    episodes = [pool.episodes(args.meta_batch, *alg.shape, rng) for _ in range(args.warmup + args.steps)]
    return alg, episodes


def update(alg, task) -> None:
    alg.meta_step(task)
    if alg.device.type == "cuda":
        torch.cuda.synchronize(alg.device)


def child(args: argparse.Namespace) -> None:
    """Peak memory of one configuration over its warm-up and one more meta-update."""
    alg, episodes = build(args.encoder, args.algorithm, json.loads(args.options), args)
    device = alg.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        base = _rss_kib("VmRSS")
    for task in episodes[: args.warmup + 1]:
        update(alg, task)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = _rss_kib("VmHWM")
        peak_mib = (peak - base) / 1024 if peak is not None and base is not None else float("nan")
    print(json.dumps({"peak_mib": peak_mib}))


def peak_memory(encoder: str, algorithm: str, options: dict, shared: list[str]) -> float:
    command = [
        sys.executable, __file__, "--child", *shared, "--encoder", encoder, "--algorithm", algorithm,
        "--options", json.dumps(options),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{encoder} {algorithm} {options} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def throughput(encoder: str, algorithm: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """Median seconds per meta-update of each path, and each path's initial meta-gradient.

    The paths take turns update by update, so a change in the machine's load (it may be
    shared) affects all of them alike and the ratios stay meaningful.
    """
    runs = {path: build(encoder, algorithm, options, args) for path, options in paths(args.chunk).items()}
    grads = {}
    for path, (alg, episodes) in runs.items():
        alg.meta_backward(episodes[0])
        grads[path] = torch.cat([p.grad.flatten() for p in alg.backbone.parameters()]).cpu()
        for p in alg.backbone.parameters():
            p.grad = None
    times = {path: [] for path in runs}
    for i in range(args.warmup + args.steps):
        for path, (alg, episodes) in runs.items():
            started = time.perf_counter()
            update(alg, episodes[i])
            if i >= args.warmup:
                times[path].append(time.perf_counter() - started)
    return {path: float(np.median(t)) for path, t in times.items()}, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=7, help="timed meta-updates per path (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-updates first")
    parser.add_argument("--chunk", type=int, default=4, help="vmap chunk size of the chunked path")
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--conv", action="store_true", help="also run Conv4 on 1x28x28 images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    # Internal: run one configuration (the parent starts one subprocess per configuration).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--encoder", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    shared = [
        "--device", args.device, "--meta-batch", str(args.meta_batch), "--warmup", str(args.warmup),
        "--inner-steps", str(args.inner_steps), "--ways", str(args.ways), "--shots", str(args.shots),
        "--queries", str(args.queries),
    ]
    if args.threads is not None:
        shared += ["--threads", str(args.threads)]
    memory = "peak CUDA MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), meta-batch {args.meta_batch}, "
        f"{args.ways}-way {args.shots}-shot {args.queries} queries, {args.inner_steps} inner steps, "
        f"median of {args.steps} updates after {args.warmup} warm-up"
    )
    header = (
        f"{'encoder':<7} {'algorithm':<9} {'path':<12} {'updates/s':>9} {'× per-task':>10} {memory:>13} {'max |Δgrad|':>12}"
    )
    print(header)
    print("-" * len(header))
    for encoder in ["mlp"] + (["conv4"] if args.conv else []):
        for algorithm in ALGORITHMS:
            seconds, grads = throughput(encoder, algorithm, args)
            for path, options in paths(args.chunk).items():
                mib = peak_memory(encoder, algorithm, options, shared) if args.memory else float("nan")
                diff = (grads[path] - grads["vmap"]).abs().max().item()
                print(
                    f"{encoder:<7} {algorithm:<9} {path:<12} {1 / seconds[path]:>9.2f} "
                    f"{seconds['per-task'] / seconds[path]:>10.2f} {mib:>13.1f} {diff:>12.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
