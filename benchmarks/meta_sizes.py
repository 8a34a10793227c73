"""Cost of per-weight meta-learners (metalstm, metasgd) against the number of weights they adapt,
with and without their ``max_adapted`` limit, beside MAML, on a text backbone.

    python benchmarks/meta_sizes.py [--updates 3] [--unlimited-defaults]

Backbone: ``hashbag`` at the search's defaults (2^14 hash buckets × 64 = 1,048,576 embedding
weights + a 64×64 layer) or ``lsa``'s learned map (256² + 256 weights) on random inputs of the
right shape (the cost depends on the weight count, not on the text); 5-way 1-shot episodes, 15
queries per class. Each row runs in a fresh subprocess on one thread: seconds per meta-update
(median of ``--updates`` after a warm-up) and the peak resident memory above the resident size
before the first update (Linux VmHWM). metalstm over the whole embedding table is measured at
meta_batch 1 × 1 inner step only, unless ``--unlimited-defaults``: at its defaults (4 × 3) it
takes about a minute and 10 GB per meta-update.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from autometa.components import Backbone, InputSpec
from autometa.data.preprocessing import TEXT_BUCKETS
from autometa.types import Features, TrainingPool
from autometa_builtins.encoders import HashBag
from autometa_builtins.fusions import Concat
from autometa_builtins.lsa import LatentSemantic
from autometa_builtins.meta_algorithms import MAML, MetaLSTM, MetaSGD
from meta_throughput import _reset_peak_rss, _rss_kib

ALGORITHMS = {"maml": MAML, "metasgd": MetaSGD, "metalstm": MetaLSTM}
N_CLASSES, ROWS_PER_CLASS, LENGTH, LSA_DIMS = 40, 20, 32, 256


def problem(encoder: str) -> tuple[Backbone, TrainingPool]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLASSES).repeat_interleave(ROWS_PER_CLASS)
    if encoder == "hashbag":
        spec = InputSpec("text", (LENGTH,), vocab_size=TEXT_BUCKETS)
        x = torch.randint(1, TEXT_BUCKETS, (len(labels), LENGTH), generator=gen)
        module = HashBag(spec)
    else:
        spec = InputSpec("text", (LSA_DIMS,))
        x = torch.nn.functional.normalize(torch.randn(len(labels), LSA_DIMS, generator=gen), dim=1)
        module = LatentSemantic(spec)
    features = Features({"text": x}, {"text": spec})
    rows = np.arange(len(labels))
    pool = TrainingPool(features, labels, rows, [{c: rows[labels.numpy() == c] for c in range(N_CLASSES)}], torch.device("cpu"))
    return Backbone({"text": module}, Concat({"text": module.out_dim})), pool


def child(row: dict, updates: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone, pool = problem(row["encoder"])
    cls = ALGORITHMS[row["algorithm"]]
    if not row["limited"]:
        cls = type(cls.__name__, (cls,), {"max_adapted": None})
    alg = cls(meta_batch=row["meta_batch"], inner_steps=row["inner_steps"])
    alg.setup(backbone, pool, (5, 1, 15))
    adapted = sum(p.numel() for n, p in backbone.named_parameters() if n not in alg.fixed_in_task)
    rng = np.random.default_rng(1)
    episodes = [pool.episodes(alg.meta_batch, *alg.shape, rng) for _ in range(updates + 1)]
    _reset_peak_rss()
    base = _rss_kib("VmRSS")
    times = []
    for task in episodes:
        start = time.perf_counter()
        alg.meta_step(task)
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"adapted": adapted, "seconds": float(np.median(times[1:])), "peak_mib": (peak - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--unlimited-defaults", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), args.updates)
        return
    big = (4, 3) if args.unlimited_defaults else (1, 1)
    rows = [
        dict(algorithm="maml", encoder="hashbag", limited=True, meta_batch=4, inner_steps=3),
        dict(algorithm="metasgd", encoder="hashbag", limited=False, meta_batch=4, inner_steps=1),
        dict(algorithm="metasgd", encoder="hashbag", limited=True, meta_batch=4, inner_steps=1),
        dict(algorithm="metalstm", encoder="hashbag", limited=False, meta_batch=big[0], inner_steps=big[1]),
        dict(algorithm="metalstm", encoder="hashbag", limited=True, meta_batch=1, inner_steps=1),
        dict(algorithm="metalstm", encoder="hashbag", limited=True, meta_batch=4, inner_steps=3),
        dict(algorithm="metalstm", encoder="lsa", limited=True, meta_batch=4, inner_steps=3),
    ]
    print(f"{'algorithm':9s} {'encoder':8s} {'limit':>9s} {'meta-batch × steps':>18s} {'adapted weights':>16s} "
          f"{'s/update':>9s} {'peak MiB':>9s}")
    for row in rows:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(row), "--updates", str(args.updates)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{row}: failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        limit = ALGORITHMS[row["algorithm"]].max_adapted if row["limited"] else None
        limit = f"{limit:,}" if limit else "none"
        print(f"{row['algorithm']:9s} {row['encoder']:8s} {limit:>9s} {row['meta_batch']:>9d} × {row['inner_steps']:<6d} "
              f"{r['adapted']:>16,d} {r['seconds']:>9.2f} {r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
