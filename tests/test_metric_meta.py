"""Metric-based (ProtoNet, RelationNet, MatchingNet) and transfer (Baseline, Baseline++) learners.

Hand computations use 2-D points through identity ▶ concat, so every embedding is the point
itself and each expected logit below is written out from the points.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import optuna
import pytest
import torch
from autometa_builtins.encoders import Identity, TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import FineTune, MatchingNet, ProtoNet, RelationNet, metric
from autometa_builtins.meta_algorithms._common import EMBED_BATCH
from autometa_builtins.meta_algorithms.finetune import CosineClassifier
from optuna.distributions import CategoricalDistribution

from autometa.components import Backbone, InputSpec
from autometa.data.scoring import evaluate
from autometa.plugins import validate_component
from autometa.types import Features, Task, TrainingPool

R2 = math.sqrt(2.0)
sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731

# -- identity ▶ concat on 2-D points -------------------------------------------------------------
# rows 0-3: support (class 0: (1, 0), (3, 0) → mean (2, 0); class 1: (0, 2), (0, 4) → mean (0, 3))
# rows 4-6: queries (1, 1), (3, 4), (-2, 0)
POINTS = [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [1.0, 1.0], [3.0, 4.0], [-2.0, 0.0]]
LABELS = [0, 0, 1, 1, 0, 1, 0]
SUPPORT, QUERY = [0, 1, 2, 3], [4, 5, 6]


def _identity(points=POINTS, dtype=torch.float32) -> tuple[Backbone, Features]:
    x = torch.tensor(points, dtype=dtype)
    spec = InputSpec("vector", (x.shape[1],))
    return Backbone({"vector": Identity(spec)}, Concat({"vector": x.shape[1]})), Features({"vector": x}, {"vector": spec})


def _pool(features: Features, labels, sources=None) -> TrainingPool:
    labels = torch.as_tensor(labels)
    rows = np.arange(len(labels)) if sources is None else np.concatenate(sources)
    groups = [rows] if sources is None else sources
    by_source = [{int(c): g[labels.numpy()[g] == c] for c in np.unique(labels.numpy()[g])} for g in groups]
    return TrainingPool(features, labels, rows, by_source)


def _task(features: Features, support, query, labels=LABELS, n_way: int = 2, **kw) -> Task:
    labels = torch.as_tensor(labels)
    s, q = torch.as_tensor(support), torch.as_tensor(query)
    return Task(features, s, labels[s], q, labels[q], n_way, **kw)


def _hand_setup(alg, dtype=torch.float32):
    backbone, features = _identity(dtype=dtype)
    alg.setup(backbone, _pool(features, LABELS), (2, 1, 1))
    return alg, features


# -- hand computations ------------------------------------------------------------------------------
def test_protonet_euclidean_hand_computed():
    alg, features = _hand_setup(ProtoNet(distance="euclidean"))
    expected = -torch.tensor([[1 + 1, 1 + 4], [1 + 16, 9 + 1], [16 + 0, 4 + 9.0]])
    torch.testing.assert_close(alg.predict(_task(features, SUPPORT, QUERY)), expected)
    assert alg.head is None and alg.optimizer is None  # nothing to learn on identity ▶ concat


def test_protonet_cosine_hand_computed():
    alg, features = _hand_setup(ProtoNet(distance="cosine"))
    # Cosines with the class means (2, 0) and (0, 3).
    cosines = torch.tensor([[1 / R2, 1 / R2], [3 / 5, 4 / 5], [-1.0, 0.0]])
    torch.testing.assert_close(alg.predict(_task(features, SUPPORT, QUERY)), 10.0 * cosines)
    # The temperature is learned: it is a parameter the optimiser updates.
    assert alg.head.log_scale.requires_grad and alg.optimizer is not None
    with torch.no_grad():
        alg.head.log_scale.fill_(math.log(4.0))
    torch.testing.assert_close(alg.predict(_task(features, SUPPORT, QUERY)), 4.0 * cosines)


# MatchingNet attends to rows, not class means: support (1, 0), (3, 0) of class 0, (0, 2) of class 1.
MATCHING_SUPPORT = [0, 1, 2]


def _matching_expected(scale: float) -> torch.Tensor:
    # Each query's cosine with the three support rows.
    cosines = [[1 / R2, 1 / R2, 1 / R2], [3 / 5, 3 / 5, 4 / 5], [-1.0, -1.0, 0.0]]
    rows = []
    for c in cosines:
        w = [math.exp(scale * v) for v in c]
        p0 = (w[0] + w[1]) / sum(w)
        rows.append([math.log(p0), math.log(1 - p0)])
    return torch.tensor(rows)


def test_matchingnet_paper_attention_hand_computed():
    alg, features = _hand_setup(MatchingNet(learn_scale=False))
    logits = alg.predict(_task(features, MATCHING_SUPPORT, QUERY))
    expected = torch.tensor(
        [
            [math.log(2 / 3), math.log(1 / 3)],  # equal cosines: attention 1/3 per row
            [math.log(2 * math.exp(0.6) / (2 * math.exp(0.6) + math.exp(0.8))),
             math.log(math.exp(0.8) / (2 * math.exp(0.6) + math.exp(0.8)))],
            [math.log(2 * math.exp(-1) / (2 * math.exp(-1) + 1)), math.log(1 / (2 * math.exp(-1) + 1))],
        ]
    )
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits, _matching_expected(1.0))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(3))


def test_matchingnet_learned_scale_hand_computed():
    alg, features = _hand_setup(MatchingNet())
    torch.testing.assert_close(alg.predict(_task(features, MATCHING_SUPPORT, QUERY)), _matching_expected(10.0))


def _hand_relation(alg: RelationNet) -> None:
    """Relation logit of concat(q, p) = 1 - |q0 - p0| - 0.5 |q1 - p1| (ReLU(a) + ReLU(-a) = |a|)."""
    first, _, second = alg.head
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0, -1, 0], [-1, 0, 1, 0], [0, 1, 0, -1], [0, -1, 0, 1]]))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[-1.0, -1.0, -0.5, -0.5]]))
        second.bias.fill_(1.0)


def test_relationnet_hand_computed():
    alg, features = _hand_setup(RelationNet(hidden=4))
    _hand_relation(alg)
    logits = alg.predict(_task(features, SUPPORT, QUERY))
    # Against the class means (2, 0) and (0, 3):
    expected = torch.tensor(
        [
            [1 - 1 - 0.5 * 1, 1 - 1 - 0.5 * 2],  # (1, 1)
            [1 - 1 - 0.5 * 4, 1 - 3 - 0.5 * 1],  # (3, 4)
            [1 - 4 - 0.5 * 0, 1 - 2 - 0.5 * 3],  # (-2, 0)
        ]
    )
    torch.testing.assert_close(logits, expected)
    scores = torch.tensor([[sigmoid(-0.5), sigmoid(-1.0)], [sigmoid(-2.0), sigmoid(-2.5)], [sigmoid(-3.0), sigmoid(-2.5)]])
    torch.testing.assert_close(torch.sigmoid(logits), scores)


def test_relationnet_train_loss_is_mse_against_one_hot():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    points = [[1, 0], [2, 1], [0, 0], [0, 2], [1, 3], [-1, 2], [4, 4], [3, 5], [5, 2]]
    backbone, features = _identity(points, dtype=torch.float64)
    pool = _pool(features, labels)
    alg = RelationNet(hidden=4, lr=0.1)
    alg.setup(backbone, pool, (3, 2, 1))
    assert alg.shape == (3, 2, 1) and alg.head[0].weight.dtype == torch.float64
    _hand_relation(alg)
    episode = pool.episodes(1, *alg.shape, np.random.default_rng(7))
    x = features.inputs["vector"]
    s, q = x[episode.support[0]], x[episode.query[0]]
    sy, qy = episode.support_y[0].tolist(), episode.query_y[0].tolist()
    total = 0.0
    for i, row in enumerate(q.tolist()):
        for c in range(3):
            p = s[[j for j, y in enumerate(sy) if y == c]].mean(0).tolist()
            score = sigmoid(1 - abs(row[0] - p[0]) - 0.5 * abs(row[1] - p[1]))
            total += (score - (1.0 if qy[i] == c else 0.0)) ** 2
    before = alg.head[2].bias.item()
    assert alg.train_step(pool, np.random.default_rng(7)) == pytest.approx(total / (3 * len(qy)), rel=1e-12)
    assert alg.head[2].bias.item() != before  # the relation module is trained


def test_cosine_classifier_hand_computed():
    head = CosineClassifier(2, 3, scale=5.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    query = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    expected = 5.0 * torch.tensor([[3 / 5, 4 / 5, 7 / (5 * R2)], [-1.0, 0.0, -1 / R2]])
    torch.testing.assert_close(head(query), expected)


def test_baseline_plus_plus_standard_task_uses_trained_cosine_head():
    alg, features = _hand_setup(FineTune(head="cosine", scale=5.0))
    assert isinstance(alg.head, CosineClassifier) and alg.head.out_features == 2
    with torch.no_grad():
        alg.head.weight.copy_(torch.tensor([[0.0, -3.0], [1.0, 1.0]]))
    logits = alg.predict(_task(features, SUPPORT, QUERY, same_classes_as_training=True))
    expected = 5.0 * torch.tensor([[-1 / R2, 1.0], [-4 / 5, 7 / (5 * R2)], [0.0, -1 / R2]])
    torch.testing.assert_close(logits, expected)


def test_baseline_plus_plus_new_head_starts_at_normalised_class_means():
    # Class 0 rows point along (1, 0), class 1 rows along (0, 1): imprinted weights are those.
    alg, features = _hand_setup(FineTune(head="cosine", scale=5.0, head_steps=0))
    logits = alg.predict(_task(features, SUPPORT, QUERY))
    torch.testing.assert_close(logits, 5.0 * torch.tensor([[1 / R2, 1 / R2], [3 / 5, 4 / 5], [-1.0, 0.0]]))


# -- learning on a few-shot problem ----------------------------------------------------------------
SIGNAL, NOISE = 3, 8


def _clusters(n_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes are tight clusters in SIGNAL dims, hidden among NOISE dims of larger variance:
    an untrained network's distances are mostly noise; a trained one learns to ignore it."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_classes, SIGNAL, generator=gen)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    signal = centres[y] + 0.3 * torch.randn(len(y), SIGNAL, generator=gen)
    return torch.cat([signal, 3 * torch.randn(len(y), NOISE, generator=gen)], dim=1), y


def _mlp_backbone(dtype=torch.float32) -> Backbone:
    spec = InputSpec("tabular", (SIGNAL + NOISE,))
    torch.manual_seed(0)
    encoder = TabularMLP(spec, hidden=32, out_dim=16, layers=2, dropout=0.0)
    return Backbone({"tabular": encoder}, Concat({"tabular": 16})).to(dtype)


def _features(x: torch.Tensor) -> Features:
    return Features({"tabular": x}, {"tabular": InputSpec("tabular", (x.shape[1],))})


ALGORITHMS = {
    "protonet": lambda: ProtoNet(lr=1e-2),
    "protonet_cosine": lambda: ProtoNet(lr=1e-2, distance="cosine"),
    "relationnet": lambda: RelationNet(lr=1e-2, hidden=32),
    "matchingnet": lambda: MatchingNet(lr=1e-2),
    "finetune": lambda: FineTune(lr=1e-2, batch_size=32, head_steps=30, head_lr=0.05),
    "finetune_cosine": lambda: FineTune(lr=1e-2, batch_size=32, head="cosine", head_steps=30, head_lr=0.05),
}


@pytest.fixture(scope="module")
def fewshot():
    """Training classes for meta-training, and 5-way 2-shot tasks over 8 unseen classes."""
    x, y = _clusters(12, 10, seed=0)
    pool = _pool(_features(x), y)
    xt, yt = _clusters(8, 10, seed=1)
    held_out = _pool(_features(xt), yt)
    batch = held_out.episodes(10, 5, 2, 5, np.random.default_rng(0))
    tasks = [Task(batch.features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], 5) for i in range(10)]
    return pool, tasks


@pytest.mark.parametrize("case", list(ALGORITHMS))
def test_learns_few_shot_tasks_of_unseen_classes(case, fewshot):
    pool, tasks = fewshot
    alg = ALGORITHMS[case]()
    alg.setup(_mlp_backbone(), pool, (5, 2, 5))
    before = evaluate(alg, tasks).mean
    rng = np.random.default_rng(0)
    losses = [alg.train_step(pool, rng) for _ in range(120)]
    after = evaluate(alg, tasks).mean
    assert np.isfinite(losses).all()
    # 5-way: chance is 0.2; noise dimensions keep the untrained backbone well below 0.6.
    assert after >= 0.6 and after >= before + 0.1, (before, after)


# -- the standard protocol's single task -------------------------------------------------------------
@pytest.fixture(scope="module")
def standard():
    """3 classes; the support is all training rows (more than one embedding slice)."""
    x, y = _clusters(3, 420, seed=2)
    train = np.concatenate([np.arange(c * 420, c * 420 + 380) for c in range(3)])
    held = np.setdiff1d(np.arange(len(y)), train)
    features = _features(x)
    pool = TrainingPool(features, y, train, [{c: train[y.numpy()[train] == c] for c in range(3)}])
    task = Task(features, torch.as_tensor(train), y[train], torch.as_tensor(held), y[held], 3, same_classes_as_training=True)
    assert len(train) > EMBED_BATCH
    return pool, task


@pytest.mark.parametrize("case", list(ALGORITHMS))
def test_standard_protocol_task(case, standard, monkeypatch):
    pool, task = standard
    alg = ALGORITHMS[case]()
    alg.setup(_mlp_backbone(), pool, (3, 5, 15))
    rng = np.random.default_rng(1)
    for _ in range(30):
        alg.train_step(pool, rng)
    score = evaluate(alg, [task])
    assert score.n == len(task.query) and score.mean >= 0.9
    if isinstance(alg, FineTune):
        return
    # Scoring the queries in small chunks changes nothing.
    whole = alg.predict(task)
    monkeypatch.setattr(metric, "CHUNK_ELEMENTS", 1000)
    torch.testing.assert_close(alg.predict(task), whole)


# -- tasks of varying shape (grouped protocol) -------------------------------------------------------
def test_grouped_sources_and_variable_way_tasks():
    x, y = _clusters(6, 8, seed=3)
    features = _features(x)
    rows = np.arange(len(y))
    # Three sources (groups) with 2, 3 and 4 classes: training episodes are at most 4-way.
    pool = _pool(features, y, [rows[np.isin(y.numpy(), c)] for c in ([0, 1], [1, 2, 3], [2, 3, 4, 5])])
    # Held-out tasks of 2, 3 and 5 ways with unequal shots and queries per class.
    tasks = []
    for classes, shots in (([0, 1], [1, 3]), ([2, 3, 4], [2, 1, 4]), ([1, 2, 3, 4, 5], [1, 1, 2, 3, 1])):
        support, query, sy, qy = [], [], [], []
        for local, (c, k) in enumerate(zip(classes, shots)):
            r = rows[y.numpy() == c].tolist()
            support += r[:k]
            query += r[k: k + 2 + local]
            sy += [local] * k
            qy += [local] * (2 + local)
        t = torch.tensor
        tasks.append(Task(features, t(support), t(sy), t(query), t(qy), len(classes)))
    for case, make in ALGORITHMS.items():
        alg = make()
        alg.setup(_mlp_backbone(), pool, (5, 2, 3))
        if not isinstance(alg, FineTune):
            assert alg.shape == (4, 2, 3), case
        rng = np.random.default_rng(2)
        assert all(np.isfinite(alg.train_step(pool, rng)) for _ in range(5)), case
        for task in tasks:
            logits = alg.predict(task)
            assert logits.shape == (len(task.query), task.n_way) and torch.isfinite(logits).all(), case


# -- parameterless and float64 models ---------------------------------------------------------------
PARAMETERLESS = {
    "protonet": (ProtoNet, {}, False),
    "protonet_cosine": (ProtoNet, {"distance": "cosine"}, True),
    "relationnet": (RelationNet, {"hidden": 8}, True),
    "matchingnet_paper": (MatchingNet, {"learn_scale": False}, False),
    "matchingnet": (MatchingNet, {}, True),
    "finetune": (FineTune, {"head_steps": 5}, True),
    "finetune_cosine": (FineTune, {"head": "cosine", "head_steps": 5}, True),
}


@pytest.mark.parametrize("case", list(PARAMETERLESS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_concat_in_float32_and_float64(case, dtype):
    cls, options, trainable = PARAMETERLESS[case]
    x, y = _clusters(4, 6, seed=4)
    spec = InputSpec("vector", (x.shape[1],))
    features = Features({"vector": x.to(dtype)}, {"vector": spec})
    backbone = Backbone({"vector": Identity(spec)}, Concat({"vector": x.shape[1]}))
    pool = _pool(features, y)
    alg = cls(**options)
    alg.setup(backbone, pool, (3, 2, 2))
    assert (alg.optimizer is not None) == trainable
    loss = alg.train_step(pool, np.random.default_rng(0))
    assert np.isfinite(loss)
    for same in (False, True):
        task = _task(features, [0, 6, 12, 18, 1, 7], [2, 8, 13, 19, 20], labels=y, n_way=4, same_classes_as_training=same)
        logits = alg.predict(task)
        assert logits.dtype == dtype and logits.shape == (5, 4)


@pytest.mark.parametrize("case", ["protonet_cosine", "relationnet", "matchingnet", "finetune_cosine"])
def test_float64_mlp_backbone(case):
    x, y = _clusters(4, 6, seed=5)
    features = _features(x.double())
    pool = _pool(features, y)
    alg = ALGORITHMS[case]()
    alg.setup(_mlp_backbone(torch.float64), pool, (3, 2, 2))
    assert all(p.dtype == torch.float64 for m in alg.modules().values() for p in m.parameters())
    assert np.isfinite(alg.train_step(pool, np.random.default_rng(0)))
    logits = alg.predict(_task(features, [0, 6, 12], [1, 7, 13], labels=y, n_way=3))
    assert logits.dtype == torch.float64


# -- rebuilding a saved model ------------------------------------------------------------------------
class _SavedPoolInfo:
    """What a saved model is rebuilt from (autometa.PoolInfo): no rows, no features."""

    def __init__(self, n_classes: int):
        self.n_classes, self.device = n_classes, torch.device("cpu")

    def episode_shape(self, ways: int, shots: int, queries: int) -> tuple[int, int, int]:
        return ways, shots, queries


@pytest.mark.parametrize("case", list(ALGORITHMS))
@pytest.mark.parametrize("parameterless", [False, True])
def test_rebuilt_from_pool_info_and_state_dicts_predicts_the_same(case, parameterless):
    x, y = _clusters(4, 6, seed=7)
    if parameterless:
        spec = InputSpec("vector", (x.shape[1],))
        features = Features({"vector": x}, {"vector": spec})
        make_backbone = lambda: Backbone({"vector": Identity(spec)}, Concat({"vector": x.shape[1]}))  # noqa: E731
    else:
        features, make_backbone = _features(x), _mlp_backbone
    pool = _pool(features, y)
    trained = ALGORITHMS[case]()
    trained.setup(make_backbone(), pool, (3, 2, 2))
    rng = np.random.default_rng(0)
    for _ in range(3):
        trained.train_step(pool, rng)
    rebuilt = ALGORITHMS[case]()
    rebuilt.setup(make_backbone(), _SavedPoolInfo(4), (3, 2, 2))
    assert rebuilt.modules().keys() == trained.modules().keys()
    for name, module in rebuilt.modules().items():
        module.load_state_dict(trained.modules()[name].state_dict(), strict=True)
    for same in (False, True):
        task = _task(features, [0, 6, 12, 18, 1], [2, 8, 13, 19], labels=y, n_way=4, same_classes_as_training=same)
        torch.testing.assert_close(rebuilt.predict(task), trained.predict(task))


# -- training episode shape ------------------------------------------------------------------------
def test_train_ways_and_shots_override_and_clamp():
    x, y = _clusters(5, 6, seed=6)
    pool = _pool(_features(x), y)
    cases = [
        ({}, (3, 2, 2)),
        ({"train_ways": 4, "train_shots": 3}, (4, 3, 2)),
        ({"train_ways": 20}, (5, 2, 2)),  # only 5 training classes
        ({"train_shots": 10}, (3, 5, 1)),  # 6 rows per class: 5 shots and 1 query at most
    ]
    for options, shape in cases:
        for cls in (ProtoNet, RelationNet, MatchingNet):
            alg = cls(**options)
            alg.setup(_mlp_backbone(), pool, (3, 2, 2))
            assert alg.shape == shape, (cls.name, options)
    alg = ProtoNet(train_ways=4, train_shots=3)
    alg.setup(_mlp_backbone(), pool, (3, 2, 2))
    episode = pool.episodes(1, *alg.shape, np.random.default_rng(0))
    assert episode.support.shape == (1, 12) and episode.query.shape == (1, 8)
    with pytest.raises(ValueError, match="train_ways"):
        ProtoNet(train_ways=1)


# -- registration and search spaces ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ProtoNet, RelationNet, MatchingNet, FineTune])
def test_registers_and_samples_its_space(cls):
    validate_component("meta_algorithm", cls)
    assert set(cls.protocols) == {"fewshot", "grouped", "standard"}
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    for key, dist in cls.search_space.items():
        value = defaults[key]
        if isinstance(dist, CategoricalDistribution):
            assert value in dist.choices, key
        else:
            assert dist.low <= value <= dist.high, key
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        params = cls.suggest(study.ask(), f"meta.{cls.name}.")
        cls(**params)


def test_finetune_samples_scale_only_for_cosine_head():
    base = {"meta.finetune." + k: FineTune.__init__.__kwdefaults__[k] for k in FineTune.search_space}
    linear = FineTune.suggest(optuna.trial.FixedTrial({**base, "meta.finetune.head": "linear"}), "meta.finetune.")
    cosine = FineTune.suggest(optuna.trial.FixedTrial({**base, "meta.finetune.head": "cosine"}), "meta.finetune.")
    assert "scale" not in linear and cosine["scale"] == 10.0
    assert FineTune(**linear).head_kind == "linear" and FineTune(**cosine).head_kind == "cosine"
    with pytest.raises(ValueError, match="head"):
        FineTune(head="mlp")
