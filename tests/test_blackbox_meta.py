"""Black-box meta-learners (``mann``, ``snail``): they adapt by a forward pass, never a gradient step.

The conformance suite runs them through tests/test_conformance.py (they are registered built-ins).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from autometa_builtins.encoders import Identity, TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import MANN, SNAIL, metric
from autometa_builtins.meta_algorithms.blackbox import CausalAttention, SequenceReader
from click.testing import CliRunner

import autometa
from autometa.cli.main import cli
from autometa.components import Backbone, InputSpec
from autometa.data.scoring import evaluate
from autometa.errors import ProtocolError
from autometa.study.engine import search
from autometa.types import Features, PoolInfo, Task, TrainingPool

R2 = math.sqrt(2.0)


def _features(x: torch.Tensor, modality: str = "tabular") -> Features:
    return Features({modality: x}, {modality: InputSpec(modality, (x.shape[1],))})


def _pool(features: Features, y: torch.Tensor) -> TrainingPool:
    rows = np.arange(len(y))
    return TrainingPool(features, y, rows, [{int(c): rows[y.numpy() == c] for c in y.unique()}])


def _identity(dim: int) -> Backbone:
    spec = InputSpec("vector", (dim,))
    return Backbone({"vector": Identity(spec)}, Concat({"vector": dim}))


def _mlp(dim: int) -> Backbone:
    torch.manual_seed(0)
    encoder = TabularMLP(InputSpec("tabular", (dim,)), hidden=32, out_dim=16, layers=2, dropout=0.0)
    return Backbone({"tabular": encoder}, Concat({"tabular": 16}))


def _tasks(pool: TrainingPool, n: int, ways: int, shots: int, queries: int, seed: int) -> list[Task]:
    batch = pool.episodes(n, ways, shots, queries, np.random.default_rng(seed))
    return [
        Task(batch.features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], batch.n_way)
        for i in range(n)
    ]


# -- the memory read, by hand ---------------------------------------------------------------------
def test_mann_memory_read_hand_computed():
    """Support (1, 0) of class 0, (0, 2) and (1, 1) of class 1; queries (3, 4) and (-2, 0).

    Head 0 keys are the points themselves, with sharpness 2; head 1 keys are (x + y, 0), which
    all point the same way, so its weights are uniform and it reads the label frequencies."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 4.0], [-2.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 0])
    features = _features(x, "vector")
    alg = MANN(key_dim=2, heads=2)
    alg.setup(_identity(2), _pool(features, y), (2, 1, 1))
    with torch.no_grad():
        alg.head.project.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
        alg.head.log_sharpness.copy_(torch.tensor([math.log(2.0), 0.0]))
    task = Task(features, torch.tensor([0, 1, 2]), y[:3], torch.tensor([3, 4]), y[3:], 2)

    def head0(cosines):  # softmax of 2 × cosine over the three slots; class 0 holds slot 0
        w = [math.exp(2 * c) for c in cosines]
        return [w[0] / sum(w), (w[1] + w[2]) / sum(w)]

    reads = [head0([3 / 5, 4 / 5, 7 / (5 * R2)]), head0([-1.0, 0.0, -1 / R2])]
    uniform = [1 / 3, 2 / 3]
    expected = torch.tensor([[math.log((h + u) / 2) for h, u in zip(read, uniform)] for read in reads])
    logits = alg.predict(task)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2))


def test_mann_trains_its_keys_and_sharpness():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0)) + torch.arange(3).repeat_interleave(10)[:, None]
    y = torch.arange(3).repeat_interleave(10)
    pool = _pool(_features(x, "vector"), y)
    alg = MANN(lr=0.05)
    alg.setup(_identity(3), pool, (3, 2, 2))
    before = {k: v.clone() for k, v in alg.head.state_dict().items()}
    assert np.isfinite(alg.train_step(pool, np.random.default_rng(0)))
    assert all(not torch.equal(before[k], v) for k, v in alg.head.state_dict().items())


# -- the sequence learner: one sequence per query --------------------------------------------------
def _reference_logits(reader: SequenceReader, support, support_slot, query) -> torch.Tensor:
    """Each query as the last step of its own sequence, through plain causal self-attention."""
    centre = support.mean(0)
    out = []
    for q in query:
        steps = torch.cat([
            torch.cat([reader.norm(support - centre), torch.nn.functional.one_hot(support_slot, reader.slots).float()], -1),
            torch.cat([reader.norm(q - centre), torch.zeros(reader.slots)]).unsqueeze(0),
        ])
        n = len(steps)
        for block in reader.blocks:
            scores = block.scale * block.query(steps) @ block.key(steps).T
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            steps = torch.cat([steps, torch.softmax(scores, -1) @ block.value(steps)], -1)
        out.append(reader.out(steps[-1]))
    return torch.stack(out)


def test_snail_reader_matches_one_causal_sequence_per_query():
    torch.manual_seed(0)
    reader = SequenceReader(3, 4, key_size=5, value_size=6, blocks=2)
    support, slots, query = torch.randn(7, 3), torch.tensor([2, 0, 3, 2, 0, 3, 1]), torch.randn(5, 3)
    got = reader(support.unsqueeze(0), slots.unsqueeze(0), query.unsqueeze(0))[0]
    torch.testing.assert_close(got, _reference_logits(reader, support, slots, query))
    assert isinstance(reader.blocks[0], CausalAttention) and reader.blocks[1].out_dim == 3 + 4 + 6 + 6


@pytest.fixture(scope="module")
def small_snail():
    x, y = _blobs(8, 10, seed=5)
    pool = _pool(_features(x), y)
    alg = SNAIL(blocks=2)
    alg.setup(_mlp(BLOB_DIM), pool, (4, 2, 3))
    rng = np.random.default_rng(0)
    for _ in range(5):
        alg.train_step(pool, rng)
    return alg, pool


def test_snail_query_does_not_depend_on_other_queries(small_snail):
    alg, pool = small_snail
    task = _tasks(pool, 1, 4, 2, 3, seed=1)[0]
    logits = alg.predict(task)
    changed = task.query.clone()
    changed[0] = task.support[0]  # another row entirely
    other = alg.predict(Task(task.features, task.support, task.support_y, changed, task.query_y, task.n_way))
    assert not torch.equal(other[0], logits[0])
    assert torch.equal(other[1:], logits[1:])
    # One query alone gets the logits it gets among the others.
    alone = alg.predict(Task(task.features, task.support, task.support_y, task.query[3:4], task.query_y[3:4], 4))
    torch.testing.assert_close(alone, logits[3:4], rtol=0, atol=1e-6)


def test_snail_prediction_ignores_the_order_the_support_is_given_in(small_snail):
    alg, pool = small_snail
    task = _tasks(pool, 1, 4, 2, 3, seed=2)[0]
    logits = alg.predict(task)
    order = torch.randperm(len(task.support), generator=torch.Generator().manual_seed(0))
    shuffled = Task(task.features, task.support[order], task.support_y[order], task.query, task.query_y, 4)
    torch.testing.assert_close(alg.predict(shuffled), logits, rtol=0, atol=1e-6)
    # The reader itself is order-sensitive (causal attention): the invariance comes from sorting
    # the support before drawing the views, not from a model blind to order.
    with torch.no_grad():
        support = alg.backbone(task.support_inputs()).unsqueeze(0)
        query = alg.backbone(task.query_inputs()).unsqueeze(0)
        slots = task.support_y.unsqueeze(0)
        reversed_order = torch.arange(len(task.support) - 1, -1, -1)
        forward = alg.reader(support, slots, query)
        backward = alg.reader(support[:, reversed_order], slots[:, reversed_order], query)
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_snail_rejects_tasks_with_more_classes_than_label_slots():
    x, y = _blobs(6, 4, seed=6)
    features = _features(x)
    alg = SNAIL(blocks=1)
    alg.setup(_mlp(BLOB_DIM), _pool(features, y), (3, 1, 1))
    assert alg.slots == 3
    task = Task(features, torch.arange(0, 24, 4), y[0:24:4], torch.tensor([1, 5]), y[[1, 5]], 6)
    with pytest.raises(ProtocolError, match=r"3 one-hot slots .* task with 6 classes; raise --ways or max_ways to at least 6"):
        alg.predict(task)
    alg = SNAIL(blocks=1, max_ways=6)
    alg.setup(_mlp(BLOB_DIM), _pool(features, y), (3, 1, 1))
    assert alg.predict(task).shape == (2, 6)
    with pytest.raises(ValueError, match="max_ways"):
        SNAIL(max_ways=1)


def test_snail_label_slots_come_from_the_configuration_so_a_saved_model_rebuilds():
    x, y = _blobs(5, 6, seed=7)
    features = _features(x)
    pool = _pool(features, y)  # 5 classes: train_ways=10 is clamped to 5-way episodes
    trained = SNAIL(train_ways=10, blocks=1)
    trained.setup(_mlp(BLOB_DIM), pool, (3, 2, 2))
    assert trained.shape[0] == 5 and trained.slots == 10
    trained.train_step(pool, np.random.default_rng(0))
    rebuilt = SNAIL(train_ways=10, blocks=1)
    rebuilt.setup(_mlp(BLOB_DIM), PoolInfo(5), (3, 2, 2))
    for name, module in rebuilt.modules().items():
        module.load_state_dict(trained.modules()[name].state_dict(), strict=True)
    task = _tasks(pool, 1, 5, 2, 2, seed=3)[0]
    torch.testing.assert_close(rebuilt.predict(task), trained.predict(task))


# -- learning from the support set on a planted problem --------------------------------------------
BLOB_DIM = 4


def _blobs(n_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes are unit-variance Gaussian blobs around random centres, close enough to overlap:
    one example of a class locates it poorly, five do better."""
    gen = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(n_classes, BLOB_DIM, generator=gen)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), BLOB_DIM, generator=gen), y


LEARNERS = {
    "mann": lambda: MANN(lr=1e-2),
    "snail": lambda: SNAIL(train_shots=3),
}


@pytest.fixture(scope="module")
def blobs():
    """40 training classes; 5-way tasks over 10 unseen classes. An episode's labels are a random
    order of its classes, so a class has no fixed label: only the support set tells it."""
    train = _pool(_features(_blobs(40, 20, seed=0)[0]), _blobs(40, 20, seed=0)[1])
    held_out = _pool(_features(_blobs(10, 20, seed=1)[0]), _blobs(10, 20, seed=1)[1])
    return train, {shots: _tasks(held_out, 40, 5, shots, 5, seed=shots) for shots in (1, 5)}


def _state(alg) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in alg.modules().items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_accuracy_rises_with_support_size_without_test_time_gradients(name, blobs):
    train, tasks = blobs
    alg = LEARNERS[name]()
    alg.setup(_mlp(BLOB_DIM), train, (5, 3, 5))
    rng = np.random.default_rng(0)
    losses = [alg.train_step(train, rng) for _ in range(150)]
    assert np.isfinite(losses).all() and np.mean(losses[-50:]) < np.mean(losses[:50])

    # No gradient step at test time: nothing is differentiated, no parameter or optimiser state moves.
    parameters = [p for m in alg.modules().values() for p in m.parameters()]
    for p in parameters:
        p.grad = None
    state, optimiser = _state(alg), json.dumps(alg.optimizer.state_dict()["state"], default=lambda t: t.tolist())
    one, five = evaluate(alg, tasks[1]), evaluate(alg, tasks[5])
    task = tasks[5][0]
    logits = alg.predict(task)
    with torch.no_grad():
        assert torch.equal(alg.predict(task), logits)
    assert logits.grad_fn is None and not logits.requires_grad
    assert all(p.grad is None for p in parameters)
    assert all(torch.equal(v, _state(alg)[k]) for k, v in state.items())
    assert json.dumps(alg.optimizer.state_dict()["state"], default=lambda t: t.tolist()) == optimiser

    # Chance is 0.2. Measured: mann 0.66 (1-shot) and 0.76 (5-shot), snail 0.62 and 0.73.
    assert one.mean >= 0.5 and five.mean >= one.mean + 0.05, (one, five)

    # The answers come from the support's labels: relabelling the support (class c shown as
    # c + 1) moves the predictions with it, so the original labels score below chance (measured 0.06).
    def relabelled(t: Task) -> Task:
        return Task(t.features, t.support, (t.support_y + 1) % t.n_way, t.query, t.query_y, t.n_way)

    assert evaluate(alg, [relabelled(t) for t in tasks[5]]).mean < 0.2
    shifted = [Task(t.features, t.support, (t.support_y + 1) % 5, t.query, (t.query_y + 1) % 5, 5) for t in tasks[5]]
    assert evaluate(alg, shifted).mean == pytest.approx(five.mean, abs=0.05)


# -- grouped and standard tasks ------------------------------------------------------------------
def test_grouped_sources_and_tasks_of_varying_ways():
    x, y = _blobs(6, 8, seed=3)
    features = _features(x)
    rows = np.arange(len(y))
    # Three sources (groups) with 2, 3 and 4 classes: training episodes are at most 4-way.
    sources = [rows[np.isin(y.numpy(), c)] for c in ([0, 1], [1, 2, 3], [2, 3, 4, 5])]
    pool = TrainingPool(features, y, np.concatenate(sources),
                        [{int(c): g[y.numpy()[g] == c] for c in np.unique(y.numpy()[g])} for g in sources])
    tasks = []
    for classes, shots in (([0, 1], [1, 3]), ([2, 3, 4], [2, 1, 4]), ([1, 2, 3, 4, 5], [1, 1, 2, 3, 1])):
        support, query, sy, qy = [], [], [], []
        for local, (c, k) in enumerate(zip(classes, shots)):
            r = rows[y.numpy() == c].tolist()
            support, query = support + r[:k], query + r[k: k + 2 + local]
            sy, qy = sy + [local] * k, qy + [local] * (2 + local)
        tasks.append(Task(features, torch.tensor(support), torch.tensor(sy), torch.tensor(query), torch.tensor(qy), len(classes)))
    for alg in (MANN(), SNAIL(blocks=1)):
        alg.setup(_mlp(BLOB_DIM), pool, (5, 2, 3))
        assert alg.shape == (4, 2, 3)
        rng = np.random.default_rng(2)
        assert all(np.isfinite(alg.train_step(pool, rng)) for _ in range(3))
        for task in tasks:
            logits = alg.predict(task)
            assert logits.shape == (len(task.query), task.n_way) and torch.isfinite(logits).all(), alg.name


def test_mann_standard_task_reads_a_memory_of_every_training_row(monkeypatch):
    x, y = _blobs(3, 120, seed=4)
    features = _features(x)
    train = np.flatnonzero(np.arange(len(y)) % 120 < 100)
    held = np.setdiff1d(np.arange(len(y)), train)
    pool = TrainingPool(features, y, train, [{c: train[y.numpy()[train] == c] for c in range(3)}])
    task = Task(features, torch.as_tensor(train), y[train], torch.as_tensor(held), y[held], 3, same_classes_as_training=True)
    alg = MANN(lr=1e-2)
    alg.setup(_mlp(BLOB_DIM), pool, (3, 5, 5))
    rng = np.random.default_rng(1)
    for _ in range(20):
        alg.train_step(pool, rng)
    whole = alg.predict(task)
    assert evaluate(alg, [task]).mean >= 0.7  # three blobs; chance 1/3
    monkeypatch.setattr(metric, "CHUNK_ELEMENTS", 2000)  # queries read the 300 slots a few at a time
    torch.testing.assert_close(alg.predict(task), whole)


# -- plugins and search ----------------------------------------------------------------------------
def test_listed_by_autometa_plugins():
    result = CliRunner().invoke(cli, ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = {row["name"]: row for row in json.loads(result.output) if row["kind"] == "meta_algorithm"}
    assert listed["mann"]["protocols"] == ["fewshot", "grouped", "standard"]
    assert listed["snail"]["protocols"] == ["fewshot", "grouped"]
    assert {"key_dim", "heads", "sharpness", "lr"} <= set(listed["mann"]["hyperparameters"])
    assert {"key_size", "value_size", "blocks", "meta_batch"} <= set(listed["snail"]["hyperparameters"])


@pytest.fixture(scope="module")
def fewshot_csv(tmp_path_factory):
    """15 classes × 6 rows of three numeric columns around class centres."""
    rng = np.random.default_rng(0)
    centres = 3 * rng.normal(size=(15, 3))
    rows = [{"a": a, "b": b, "c": c, "y": f"k{k}"} for k in range(15) for a, b, c in centres[k] + rng.normal(size=(6, 3))]
    path = tmp_path_factory.mktemp("fewshot") / "blobs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("name", ["mann", "snail"])
def test_selectable_in_a_short_search_and_saved_model_predicts(fewshot_csv, tmp_path, name):
    result = search(
        fewshot_csv, "y", protocol="fewshot", ways=3, shots=2, queries=2, validation_tasks=3, test_tasks=4,
        trials=2, steps=4, eval_every=2, db=f"sqlite:///{tmp_path}/s.db", include={"meta_algorithm": [name]},
        isolate=False, output=tmp_path / "out", progress=False, echo=lambda s: None,
    )
    trials = result.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["meta_algorithm"] for t in trials} == {name}
    assert any(k.startswith(f"meta.{name}.") for k in trials[1].params)
    assert result.leaderboard and 0.0 <= result.best.test.mean <= 1.0
    # The saved model rebuilds and adapts to a support set of test classes.
    frame = pd.read_csv(fewshot_csv)
    test_classes = result.split.class_splits["test"]
    labelled = frame[frame.y.isin(test_classes)]
    support = labelled.groupby("y").head(2)
    query = labelled.drop(support.index).drop(columns="y")
    predicted = autometa.load(result.model_path).predict(query, support=support)
    assert len(predicted) == len(query) and set(predicted.prediction) <= set(test_classes)
    assert np.allclose(predicted[[f"proba_{c}" for c in sorted(test_classes)]].sum(axis=1), 1.0)
