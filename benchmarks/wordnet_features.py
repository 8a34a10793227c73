"""What lifts few-shot text above a TF-IDF nearest class mean? Fixed and learned maps over `lsa`.

On the AutoML benchmark's WordNet split (benchmarks/automl.py: 27 / 9 / 9 train / validation /
test lexicographer files, its 100 validation and 600 test episodes, 5-way, 15 queries per class)
this prints, side by side, validation and test accuracy ± 95 % CI of:

- nearest class mean (cosine) over the benchmark's TF-IDF (word 1-2 + character 2-5-grams), as it
  is and centred on the training rows' mean (SimpleShot's CL2N, Wang et al. 2019);
- nearest class mean over `lsa` features of several SVD sizes, as they are and centred on the
  training rows' mean;
- ProtoNet on fixed `lsa` (256) features with a learned map trained on training-class episodes
  (``linear``: x + Wx + b from zero, as `lsa`'s projection; ``mlp``: x + B relu(A x)), squared
  Euclidean distance or cosine with a learned temperature, on `lsa` as it is and (``--centred``)
  centred on the training rows' mean; the map is checkpointed every quarter of ``--steps`` and the
  one best on the validation episodes is tested.

Nothing is chosen on test episodes. One CPU thread (the maps are small).

    apt-get install wordnet-base
    python benchmarks/wordnet_features.py [--shots 1] [--dims 64 256 1024] [--steps 2000] [--centred]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.preprocessing import normalize

sys.path.insert(0, str(Path(__file__).parent))
import automl  # noqa: E402  (the benchmark's split and TF-IDF baseline)

from autometa.plugins import get_registry  # noqa: E402


def interval(accuracies: list[float]) -> str:
    a = 100 * np.asarray(accuracies)
    return f"{a.mean():.1f} ± {1.96 * a.std(ddof=1) / math.sqrt(len(a)):.1f}"


def nearest_mean(x, episodes, centre=None) -> list[float]:
    """Cosine nearest class mean per episode (x: rows × features, dense or sparse); with ``centre``
    (a mean row), each row is first centred on it and scaled to unit norm (SimpleShot's CL2N)."""
    found = []
    for e in episodes:
        rows = lambda r: x[r] if centre is None else normalize(np.asarray(x[r].todense() if hasattr(x, "todense") else x[r]) - centre)  # noqa: E731
        support = rows(e.support)
        means = np.stack([np.asarray(support[e.support_y == c].mean(0)).ravel() for c in range(e.support_y.max() + 1)])
        scores = normalize(rows(e.query)) @ normalize(means).T
        found.append(float((np.asarray(scores).argmax(1) == e.query_y).mean()))
    return found


class Map(torch.nn.Module):
    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        self.a = torch.nn.Linear(dim, dim)
        self.b = torch.nn.Linear(dim, dim)
        for layer in (self.b,) if kind == "mlp" else (self.a,):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, x):
        return x + (self.a(x) if self.kind == "linear" else self.b(F.relu(self.a(x))))


def logits(support, support_y, query, ways: int, metric: str, scale):
    means = torch.stack([support[support_y == c].mean(0) for c in range(ways)])
    if metric == "cosine":
        return scale * F.normalize(query, dim=-1) @ F.normalize(means, dim=-1).T
    return -scale * ((query[:, None] - means[None]) ** 2).sum(-1)


def protonet(x, prepared, kind: str, metric: str, steps: int, shots: int, seed: int = 0) -> tuple[list, list, int]:
    labels, rows = prepared.labels, prepared.fit_rows
    by_class = [rows[labels[rows] == c] for c in sorted(set(labels[rows]))]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    f = Map(x.shape[1], kind)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0 if metric == "cosine" else 1.0)))
    optimizer = torch.optim.Adam([*f.parameters(), log_scale], lr=1e-3, weight_decay=1e-6)

    def score(episodes):
        with torch.no_grad():
            return [float((logits(f(x[e.support]), torch.as_tensor(e.support_y), f(x[e.query]), 5, metric,
                                  log_scale.exp()).argmax(1).numpy() == e.query_y).mean()) for e in episodes]

    best = (-1.0, 0, None)
    for step in range(1, steps + 1):
        classes = rng.choice(len(by_class), 5, replace=False)
        drawn = [rng.choice(by_class[c], shots + 15, replace=False) for c in classes]
        support = np.concatenate([d[:shots] for d in drawn])
        query = np.concatenate([d[shots:] for d in drawn])
        support_y, query_y = torch.arange(5).repeat_interleave(shots), torch.arange(5).repeat_interleave(15)
        loss = F.cross_entropy(logits(f(x[support]), support_y, f(x[query]), 5, metric, log_scale.exp()), query_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0:
            validation = float(np.mean(score(prepared.validation)))
            if validation > best[0]:
                best = (validation, step, ({k: v.clone() for k, v in f.state_dict().items()}, log_scale.detach().clone()))
    f.load_state_dict(best[2][0])
    with torch.no_grad():
        log_scale.copy_(best[2][1])
    return score(prepared.validation), score(prepared.test), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--centred", action="store_true", help="also train the maps on centred lsa features")
    parser.add_argument("--maps", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--metrics", nargs="+", default=["euclidean", "cosine"], choices=["euclidean", "cosine"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepared = automl.prepare(f"wordnet-{args.shots}shot", 0, automl.suite_dir())
    texts = prepared.frame["gloss"].fillna("").astype(str).tolist()
    print("| features | learner | validation | test | note |\n|---|---|---|---|---|")
    tfidf = automl._fewshot_inputs(prepared)
    print(f"| TF-IDF (benchmark's) | nearest class mean | {interval(nearest_mean(tfidf, prepared.validation))} | "
          f"{interval(nearest_mean(tfidf, prepared.test))} | |", flush=True)
    mean = np.asarray(tfidf[prepared.fit_rows].mean(0))
    print(f"| TF-IDF, centred | nearest class mean | {interval(nearest_mean(tfidf, prepared.validation, mean))} | "
          f"{interval(nearest_mean(tfidf, prepared.test, mean))} | |", flush=True)
    lsa = get_registry().get("encoder", "lsa").cls
    lsa_module = sys.modules[lsa.__module__]
    default_dims, features = lsa_module.DIMS, {}
    for dims in args.dims:
        lsa_module.DIMS = dims
        started = time.perf_counter()
        x = lsa.prepare(texts, lsa.fit_input(texts, prepared.fit_rows)).numpy()
        took = time.perf_counter() - started
        features[dims] = x
        centred = normalize(x - x[prepared.fit_rows].mean(0))
        for name, z in ((f"lsa {dims}", x), (f"lsa {dims}, centred", centred)):
            print(f"| {name} | nearest class mean | {interval(nearest_mean(z, prepared.validation))} | "
                  f"{interval(nearest_mean(z, prepared.test))} | fitted in {took:.0f} s |", flush=True)
    lsa_module.DIMS = default_dims
    raw = features.get(default_dims, features[max(features)])
    inputs = {"": raw}
    if args.centred:
        inputs[", centred"] = normalize(raw - raw[prepared.fit_rows].mean(0)).astype(np.float32)
    for kind in args.maps:
        for metric in args.metrics:
            for label, z in inputs.items():
                x = torch.from_numpy(z)
                started = time.perf_counter()
                validation, test, step = protonet(x, prepared, kind, metric, args.steps, args.shots)
                print(f"| lsa {x.shape[1]}{label} | protonet, {kind} map, {metric} | {interval(validation)} | "
                      f"{interval(test)} | best at step {step} of {args.steps}; {time.perf_counter() - started:.0f} s |",
                      flush=True)


if __name__ == "__main__":
    main()
