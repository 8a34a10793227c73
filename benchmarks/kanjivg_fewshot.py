"""Few-shot accuracy of the meta-algorithms on rendered KanjiVG glyphs (an Omniglot-like set).

Builds (or reuses from the cache folder) a KanjiVG set, splits its characters into disjoint
train / validation / test classes (autometa's fewshot protocol, 60/20/20), and for each
meta-algorithm meta-trains a conv4 image model with fixed hyperparameters — no search —
for 5-way 1-shot and 5-way 5-shot episodes. Prints test accuracy with its 95% CI over the
test episodes side by side, with timings.

    pip install "autometa[kanjivg]"
    python benchmarks/kanjivg_fewshot.py [--classes 1000] [--instances 20] [--steps N]
        [--algorithms protonet maml anil finetune] [--shots 1 5] [--test-tasks 600] [--seeds 0 1]

With several ``--seeds`` every algorithm is trained and tested once per seed (its own class split,
episodes and initialisation; the same rendered set) and the table shows the mean over seeds with
each seed's figure, and every algorithm's gap to the first one listed.

Literature on Omniglot (human handwriting, 1,623 classes, conv4): ProtoNet ≈ 98.8% and MAML
≈ 98.7% 5-way 1-shot. These images are rendered glyphs, not handwriting, so the figures are
a sanity check for the learners, not a comparison with those papers.
Data: KanjiVG © Ulrich Apel and contributors, CC BY-SA 3.0 (https://kanjivg.tagaini.net).
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

import torch

from autometa.config import Config
from autometa.data.builders.kanjivg import write_kanjivg
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.data.scoring import evaluate, format_score
from autometa.plugins import get_registry
from autometa.study.training import train

# Fixed, not tuned per setting: the point is whether each learner works at sensible values.
# Steps differ because a step costs very different amounts (one episode for ProtoNet, four
# episodes with second-order inner loops for MAML, one batch of rows for fine-tuning).
HYPERPARAMETERS = {
    "protonet": {"lr": 1e-3},
    # MAML runs at the plugin's defaults (one inner step of 0.01 from the class-mean head): the
    # point of its row is whether the default configuration converges in a search's budget.
    "maml": {},
    "anil": {"inner_lr": 0.1, "inner_steps": 5, "lr": 1e-3, "meta_batch": 4, "first_order": False},
    "finetune": {"lr": 1e-3, "batch_size": 64, "head_steps": 100, "head_lr": 1e-2},
    # The learned rule runs an LSTM over every coordinate (113k for conv4): 8 units, not the
    # paper's 20, keep a step about as dear as MAML's.
    "metalstm": {"inner_lr": 0.1, "inner_steps": 3, "lr": 1e-3, "meta_batch": 4, "hidden_size": 8, "first_order": True},
    # One transfer step: its source term is computed once per trained model, so each test task
    # pays only for its own term.
    "metatransfer": {"inner_lr": 0.1, "inner_steps": 3, "lr": 1e-3, "meta_batch": 4, "first_order": True,
                     "target_weight": 1.0, "transfer_steps": 1, "transfer_lr": 1e-3, "source_tasks": 4},
    "mann": {"lr": 1e-3, "key_dim": 32, "heads": 2, "sharpness": 10.0},
    "snail": {"lr": 3e-3, "meta_batch": 2, "key_size": 64, "value_size": 32, "blocks": 2, "views": 4},
}
# Sized so the default run (4 algorithms × 1- and 5-shot, 600 test tasks each) takes about
# 25 minutes on 2 CPU cores; a GPU or more time allows many more steps.
DEFAULT_STEPS = {"protonet": 1000, "maml": 200, "anil": 300, "finetune": 1000, "mann": 1000, "snail": 600, "metalstm": 100, "metatransfer": 200}
FALLBACK_STEPS = 300


def dataset_file(cache: Path, classes: int, instances: int, size: int, seed: int) -> Path:
    path = cache / f"kanjivg-c{classes}-i{instances}-s{size}-seed{seed}.npz"
    if path.exists():
        print(f"reusing {path}", flush=True)
    else:
        started = time.perf_counter()
        write_kanjivg(path, classes, instances, size=size, seed=seed)
        print(f"built {path} in {time.perf_counter() - started:.0f}s", flush=True)
    return path


def parameters_for(registry, name: str) -> dict:
    """The fixed values this algorithm's constructor accepts (a newer plugin may differ)."""
    accepted = inspect.signature(registry.get("meta_algorithm", name).cls.__init__).parameters
    wanted = HYPERPARAMETERS.get(name, {})
    dropped = sorted(set(wanted) - set(accepted))
    if dropped:
        print(f"note: {name} takes no {', '.join(dropped)}; using its defaults for those", flush=True)
    if name not in HYPERPARAMETERS:
        print(f"note: no fixed hyperparameters for {name}; using its defaults", flush=True)
    return {k: v for k, v in wanted.items() if k in accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000, help="characters in the set (60%% train classes)")
    parser.add_argument("--instances", type=int, default=20, help="renders per character")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=None,
                        help="meta-training steps for every algorithm (default: per algorithm, "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--algorithms", nargs="+", default=["protonet", "maml", "anil", "finetune"])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15, help="query examples per class in every episode")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--validation-tasks", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the rendered set's seed (and the only run's, without --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="split, episode and training seeds: one run per seed on the same rendered set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "autometa-benchmarks",
                        help="folder where the rendered set is kept between runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    seeds = args.seeds or [args.seed]

    if args.threads:
        torch.set_num_threads(args.threads)
    registry = get_registry()
    available = {info.name for info in registry.meta_algorithms_for("fewshot")}
    algorithms = []
    for name in args.algorithms:
        if name in available:
            algorithms.append(name)
        else:
            print(f"note: meta-algorithm {name!r} is not registered here; skipped "
                  f"(available: {', '.join(sorted(available))})", flush=True)
    if not algorithms:
        raise SystemExit("no requested meta-algorithm is available")

    started = time.perf_counter()
    path = dataset_file(args.cache, args.classes, args.instances, args.size, args.seed)
    dataset = load_dataset(path, "label")
    print(f"{dataset.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}",
          flush=True)

    # results[name][shots] is one record per seed.
    results: dict[str, dict[int, list[dict]]] = {name: {s: [] for s in args.shots} for name in algorithms}
    split = None
    for seed in seeds:
        for shots in args.shots:
            split = make_split(dataset, "fewshot", ways=args.ways, shots=shots, queries=args.queries,
                               validation_tasks=args.validation_tasks, test_tasks=args.test_tasks,
                               seed=seed, device=args.device)
            print(f"seed {seed}: {split.describe()}", flush=True)
            for name in algorithms:
                steps = args.steps or DEFAULT_STEPS.get(name, FALLBACK_STEPS)
                config = Config(name, "concat", {"image": "conv4"}, meta_params=parameters_for(registry, name))
                t0, cpu0 = time.perf_counter(), time.process_time()
                algorithm, validation = train(config, split, seed=seed, steps=steps, eval_every=steps,
                                              registry=registry)
                t1, cpu1 = time.perf_counter(), time.process_time()
                test = evaluate(algorithm, split.test)
                t2 = time.perf_counter()
                results[name][shots].append({
                    "seed": seed, "steps": steps, "validation": validation.mean, "test": test.mean,
                    "ci95": [test.low, test.high], "test_tasks": test.n, "train_s": t1 - t0,
                    "s_per_step": (t1 - t0) / steps, "cpu_s_per_step": (cpu1 - cpu0) / steps, "test_s": t2 - t1,
                    "hyperparameters": effective_parameters(registry, name, config.meta_params),
                })
                print(f"seed {seed} {args.ways}-way {shots}-shot {name:<9} test {test} (validation "
                      f"{100 * validation.mean:.1f}%) | {steps} steps in {t1 - t0:.0f}s "
                      f"({1000 * (t1 - t0) / steps:.0f} ms/step, {1000 * (cpu1 - cpu0) / steps:.0f} ms CPU time), "
                      f"{test.n} test tasks in {t2 - t1:.0f}s", flush=True)

    elapsed = time.perf_counter() - started
    sizes = ", ".join(f"{k} {len(v)}" for k, v in split.class_splits.items())
    print(f"\nKanjiVG rendered glyphs, {args.classes} classes × {args.instances} ({args.size}×{args.size}); classes "
          f"{sizes}; conv4, {args.queries} queries per class; test accuracy [95% CI, Student's t] over "
          f"{args.test_tasks} test episodes; seeds {' '.join(map(str, seeds))}; chance {100 / args.ways:.0f}%; "
          f"{elapsed / 60:.1f} min in all")
    print(table(results, algorithms, args.shots, args.ways, len(seeds)))
    print("(ms/step includes one pass over the validation tasks at the end of training)")
    if args.json:
        args.json.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "seconds": elapsed}, indent=2))


def effective_parameters(registry, name: str, given: dict) -> dict:
    """The constructor's defaults overridden by ``given``: what the run actually used."""
    signature = inspect.signature(registry.get("meta_algorithm", name).cls.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **given}


def table(results: dict, algorithms: list[str], shots: list[int], ways: int, n_seeds: int) -> str:
    """Markdown: per algorithm and setting the test accuracy (one seed: with its CI; several: the
    mean over seeds, then each seed's), and the gap to the first algorithm listed."""
    settings = [f"{ways}-way {s}-shot" for s in shots]
    reference = algorithms[0]
    lines = [
        "| algorithm | steps | " + " | ".join(settings) + f" | gap to {reference} ("
        + " / ".join(f"{s}-shot" for s in shots) + ") | ms/step (" + " / ".join(f"{s}-shot" for s in shots)
        + ") | train + test time |",
        "|---|---|" + "---|" * len(settings) + "---|---|---|",
    ]

    def mean_test(name: str, s: int) -> float:
        return sum(r["test"] for r in results[name][s]) / len(results[name][s])

    for name in algorithms:
        cells = []
        for s in shots:
            runs = results[name][s]
            if n_seeds == 1:
                cells.append(format_score(runs[0]["test"], *runs[0]["ci95"]))
            else:
                each = " / ".join(format_score(r["test"], *r["ci95"]) for r in runs)
                cells.append(f"{100 * mean_test(name, s):.1f} ({each})")
        gaps = " / ".join(f"{100 * (mean_test(name, s) - mean_test(reference, s)):+.1f}" for s in shots)
        per_step = " / ".join(
            f"{1000 * sum(r['s_per_step'] for r in results[name][s]) / len(results[name][s]):.0f}" for s in shots)
        total = sum(r["train_s"] + r["test_s"] for s in shots for r in results[name][s])
        lines.append(f"| {name} | {results[name][shots[0]][0]['steps']} | " + " | ".join(cells)
                     + f" | {gaps} | {per_step} | {total / 60:.1f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
