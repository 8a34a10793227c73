"""Built-in meta-algorithms checked against independent computations.

MAML's torch.func (grad + vmap) meta-gradient is compared with a plain autograd loop over
tasks whose forward pass is written by hand from the modules' parameters (F.linear, F.conv2d,
F.group_norm, ...), in float64 so that agreement can be asserted tightly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from autometa_builtins.encoders import Conv4, Identity, TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import MAML, FineTune, ProtoNet, prototype_logits
from helpers import prototype_head, run_sequential, training_pool

from autometa.components import Backbone, InputSpec
from autometa.types import Features, Task

INNER_LR = 0.3
INNER_STEPS = 2
N_WAY, SHOTS, QUERIES, N_TASKS = 3, 2, 2, 3
ROWS_PER_CLASS, N_CLASSES = 5, 5


# -- hand-written forward pass ------------------------------------------------------------------
def reference_forward(backbone: Backbone, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """encoders ▶ concat, then the linear head ``params['head.weight'] / ['head.bias']``."""
    return reference_embedding(backbone, params, inputs) @ params["head.weight"].T + params["head.bias"]


def reference_start(backbone: Backbone, params: dict[str, torch.Tensor], x: dict[str, torch.Tensor], y: torch.Tensor,
                    n_way: int) -> dict[str, torch.Tensor]:
    """A task's fast weights before adaptation: clones of ``params`` (the inner gradients are
    partial ones) and the head at the class means of the support's embeddings."""
    weight, bias = prototype_head(reference_embedding(backbone, params, x), y, n_way)
    return {**{k: v.clone() for k, v in params.items()}, "head.weight": weight, "head.bias": bias}


def reference_embedding(backbone: Backbone, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """encoders ▶ concat, by hand."""
    assert isinstance(backbone.fusion, Concat)
    parts = []
    for modality in backbone.fusion.order:
        encoder = backbone.encoders[modality]
        if isinstance(encoder, Identity):
            parts.append(inputs[modality])
        else:
            parts.append(run_sequential(encoder.net, f"encoders.{modality}.net", params, inputs[modality]))
    return torch.cat(parts, dim=-1)


def reference_meta_grads(alg: MAML, task: Task, *, first_order: bool) -> dict[str, torch.Tensor]:
    """Per-task inner loop with torch.autograd.grad, mean query loss, backward."""
    backbone = alg.backbone
    leaves = {name: p.detach().clone().requires_grad_() for name, p in backbone.named_parameters()}
    inputs = task.features.inputs
    losses = []
    for t in range(task.support.shape[0]):
        support_x = {m: x[task.support[t]] for m, x in inputs.items()}
        query_x = {m: x[task.query[t]] for m, x in inputs.items()}
        # Each task's head starts at the support's class means and is adapted with the body.
        fast = reference_start(backbone, leaves, support_x, task.support_y[t], task.n_way)
        for _ in range(INNER_STEPS):
            loss = F.cross_entropy(reference_forward(backbone, fast, support_x), task.support_y[t])
            keys = list(fast)
            grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {k: fast[k] - INNER_LR * g for k, g in zip(keys, grads)}
        losses.append(F.cross_entropy(reference_forward(backbone, fast, query_x), task.query_y[t]))
    torch.stack(losses).mean().backward()
    return {f"backbone.{name}": leaf.grad for name, leaf in leaves.items()}


# -- tiny problems ------------------------------------------------------------------------------
def _labels() -> torch.Tensor:
    return torch.arange(N_CLASSES).repeat_interleave(ROWS_PER_CLASS)


def _problem(kind: str) -> tuple[Backbone, Features, torch.Tensor]:
    """A float64 backbone and the inputs of N_CLASSES * ROWS_PER_CLASS rows."""
    gen = torch.Generator().manual_seed(1)
    n = N_CLASSES * ROWS_PER_CLASS
    torch.manual_seed(0)
    if kind == "mlp":
        spec = InputSpec("tabular", (4,))
        encoders = {"tabular": TabularMLP(spec, hidden=7, out_dim=5, layers=2, dropout=0.0)}
        features = Features({"tabular": torch.randn(n, 4, generator=gen, dtype=torch.float64)}, {"tabular": spec})
    elif kind == "conv":
        spec = InputSpec("image", (1, 8, 8))
        encoders = {"image": Conv4(spec, channels=4)}
        features = Features({"image": torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)}, {"image": spec})
    elif kind == "multimodal":
        tab, vec = InputSpec("tabular", (3,)), InputSpec("vector", (2,))
        encoders = {"tabular": TabularMLP(tab, hidden=6, out_dim=4, layers=2, dropout=0.0), "vector": Identity(vec)}
        features = Features(
            {
                "tabular": torch.randn(n, 3, generator=gen, dtype=torch.float64),
                "vector": torch.randn(n, 2, generator=gen, dtype=torch.float64),
            },
            {"tabular": tab, "vector": vec},
        )
    else:  # pragma: no cover
        raise ValueError(kind)
    backbone = Backbone(encoders, Concat({m: e.out_dim for m, e in encoders.items()})).double()
    return backbone, features, _labels()


def _maml(kind: str, **options) -> tuple[MAML, Task]:
    backbone, features, labels = _problem(kind)
    pool = training_pool(features, labels)
    alg = MAML(inner_lr=INNER_LR, inner_steps=INNER_STEPS, **options)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    assert alg.shape == (N_WAY, SHOTS, QUERIES)
    task = pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(3))
    assert task.support.shape == (N_TASKS, N_WAY * SHOTS) and task.query.shape == (N_TASKS, N_WAY * QUERIES)
    return alg, task


def _library_meta_grads(alg: MAML, task: Task) -> dict[str, torch.Tensor]:
    loss = alg.meta_loss(task)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    loss.backward()
    return {f"backbone.{name}": p.grad for name, p in alg.backbone.named_parameters()}


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


# -- MAML ---------------------------------------------------------------------------------------
MAML_CASES = {
    "vmap": ("mlp", {"vectorize": True}),
    "per_task": ("mlp", {"vectorize": False}),
    "vmap_chunked": ("mlp", {"vectorize": True, "chunk_size": 1}),
    "conv4_vmap": ("conv", {"vectorize": True}),
    "conv4_per_task": ("conv", {"vectorize": False}),
    "multimodal_vmap": ("multimodal", {"vectorize": True}),
}


@pytest.mark.parametrize("case", list(MAML_CASES))
def test_maml_second_order_meta_gradient_matches_autograd_loop(case):
    kind, options = MAML_CASES[case]
    alg, task = _maml(kind, first_order=False, **options)
    expected = reference_meta_grads(alg, task, first_order=False)
    actual = _library_meta_grads(alg, task)
    _assert_grads_close(actual, expected)
    # The comparison is not vacuous: backbone gradients are far from zero.
    assert sum(g.abs().sum() for g in expected.values()) > 1e-3


def test_maml_meta_loss_value_matches_reference():
    alg, task = _maml("mlp", vectorize=True)
    params = {name: p.detach() for name, p in alg.backbone.named_parameters()}
    losses = []
    for t in range(N_TASKS):
        sx = {m: x[task.support[t]] for m, x in task.features.inputs.items()}
        fast = {k: v.requires_grad_() for k, v in reference_start(alg.backbone, params, sx, task.support_y[t], N_WAY).items()}
        for _ in range(INNER_STEPS):
            keys = list(fast)
            grads = torch.autograd.grad(F.cross_entropy(reference_forward(alg.backbone, fast, sx), task.support_y[t]), [fast[k] for k in keys])
            fast = {k: (fast[k] - INNER_LR * g).detach().requires_grad_() for k, g in zip(keys, grads)}
        qx = {m: x[task.query[t]] for m, x in task.features.inputs.items()}
        losses.append(F.cross_entropy(reference_forward(alg.backbone, fast, qx), task.query_y[t]).item())
    assert alg.meta_loss(task).item() == pytest.approx(float(np.mean(losses)), rel=1e-10)


@pytest.mark.parametrize("kind,vectorize", [("mlp", True), ("mlp", False), ("conv", True)])
def test_maml_first_order_gradient(kind, vectorize):
    alg, task = _maml(kind, first_order=True, vectorize=vectorize)
    expected_fo = reference_meta_grads(alg, task, first_order=True)
    actual = _library_meta_grads(alg, task)
    _assert_grads_close(actual, expected_fo)

    second = reference_meta_grads(alg, task, first_order=False)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert not torch.allclose(flat(actual), flat(second), rtol=1e-3, atol=1e-6)
    # First-order MAML's gradient is the query gradient at the adapted parameters: it still
    # points in a similar direction as the full second-order one.
    cosine = F.cosine_similarity(flat(actual), flat(second), dim=0)
    assert 0.0 < cosine.item() < 1.0 - 1e-6


def test_maml_train_step_applies_adam_to_meta_gradient():
    """One train_step equals one hand-computed Adam step on the reference meta-gradient."""
    backbone, features, labels = _problem("mlp")
    pool = training_pool(features, labels)
    alg = MAML(inner_lr=INNER_LR, inner_steps=INNER_STEPS, lr=0.01, meta_batch=N_TASKS)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    before = {f"backbone.{n}": p.detach().clone() for n, p in backbone.named_parameters()}
    # The same episodes the step will draw (same generator state).
    task = pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(5))
    grads = reference_meta_grads(alg, task, first_order=False)
    loss = alg.train_step(pool, np.random.default_rng(5))
    assert np.isfinite(loss)
    after = {f"backbone.{n}": p.detach() for n, p in backbone.named_parameters()}
    for name, g in grads.items():
        # Adam's first step: -lr * g / (|g| + eps) elementwise (bias corrections cancel).
        step = -0.01 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name] - before[name], step, rtol=1e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _separable_task(features_dim: int = 2, *, shots: int = 5, queries: int = 10, seed: int = 0):
    """Two well separated clusters (class 0 around +2 on the first axis, class 1 around -2)."""
    gen = torch.Generator().manual_seed(seed)
    per_class = shots + queries
    centres = torch.zeros(2, features_dim)
    centres[0, 0], centres[1, 0] = 2.0, -2.0
    x = torch.cat([centres[c] + 0.3 * torch.randn(per_class, features_dim, generator=gen) for c in range(2)])
    y = torch.arange(2).repeat_interleave(per_class)
    rows = torch.arange(2 * per_class)
    support = torch.cat([rows[c * per_class: c * per_class + shots] for c in range(2)])
    query = torch.cat([rows[c * per_class + shots: (c + 1) * per_class] for c in range(2)])
    return x, y, support, query


def test_maml_predict_adapts_to_support_set():
    x, y, support, query = _separable_task(4)
    spec = InputSpec("tabular", (4,))
    features = Features({"tabular": x}, {"tabular": spec})
    torch.manual_seed(0)
    backbone = Backbone({"tabular": TabularMLP(spec, hidden=16, out_dim=8, layers=2, dropout=0.0)}, Concat({"tabular": 8}))
    alg = MAML(inner_lr=0.5, inner_steps=3)
    alg.setup(backbone, training_pool(features, y), (2, 5, 5))
    task = Task(features, support, y[support], query, y[query], 2)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}

    logits = alg.predict(task)
    assert logits.shape == (len(query), 2)
    adapted_acc = (logits.argmax(-1) == task.query_y).double().mean().item()

    params = torch.utils._pytree.tree_map(torch.Tensor.detach, alg._initial(2))
    unadapted = alg.adapt(params, task.support_inputs(), task.support_y, steps=0)
    with torch.no_grad():
        logits0 = alg._logits(unadapted, task.query_inputs())
        support, queries = (backbone(task.support_inputs()), backbone(task.query_inputs()))
    # Each task's head starts as the nearest-class-mean rule: |q|² - |q - c_k|².
    expected = prototype_logits(support, task.support_y, queries, 2) + (queries**2).sum(-1, keepdim=True)
    torch.testing.assert_close(logits0, expected, rtol=1e-5, atol=1e-5)
    assert adapted_acc == 1.0
    assert not torch.allclose(logits, logits0)  # three inner steps moved it
    # predict does not modify the meta-parameters.
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())


# -- ProtoNet -----------------------------------------------------------------------------------
def test_prototype_logits_hand_computed():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    support_y = torch.tensor([0, 0, 1, 1, 2])
    # prototypes: class 0 (1, 0), class 1 (0, 3), class 2 (5, 5)
    query = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]])
    expected = -torch.tensor(
        [
            [0.0 + 1, 1 + 4, 16 + 16],  # (1, 1)
            [4 + 9, 9 + 0, 4 + 4],  # (3, 3)
            [1 + 0, 0 + 9, 25 + 25],  # (0, 0)
        ]
    )
    torch.testing.assert_close(prototype_logits(support, support_y, query, 3), expected)


def test_protonet_predict_with_identity_backbone():
    spec = InputSpec("vector", (2,))
    points = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [3.0, 1.0], [4.0, 0.0], [2.0, 2.0], [-1.0, 0.0], [9.0, 9.0]]
    )
    features = Features({"vector": points}, {"vector": spec})
    backbone = Backbone({"vector": Identity(spec)}, Concat({"vector": 2}))
    alg = ProtoNet()
    # Identity has no parameters; predict only needs the backbone (see the note on setup).
    alg.backbone = backbone
    # Support rows 0, 1 are class 1 (prototype (0.5, 0.5)); rows 2, 3 are class 0 ((3.5, 0.5)).
    task = Task(features, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 0]), torch.tensor([4, 5, 6]), torch.tensor([0, 1, 0]), 2)
    logits = alg.predict(task)
    expected = -torch.tensor(
        [
            [1.5**2 + 1.5**2, 1.5**2 + 1.5**2],  # (2, 2)
            [4.5**2 + 0.5**2, 1.5**2 + 0.5**2],  # (-1, 0)
            [5.5**2 + 8.5**2, 8.5**2 + 8.5**2],  # (9, 9)
        ]
    )
    torch.testing.assert_close(logits, expected)


def test_protonet_train_step_loss_matches_hand_computation():
    """The loss train_step returns is the cross-entropy of prototype logits of one episode."""
    backbone, features, labels = _problem("mlp")
    pool = training_pool(features, labels)
    alg = ProtoNet(lr=1e-3)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    task = pool.episodes(1, *alg.shape, np.random.default_rng(11))
    params = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    embed = lambda rows: run_sequential(backbone.encoders["tabular"].net, "encoders.tabular.net", params, features.inputs["tabular"][rows])  # noqa: E731
    s, q = embed(task.support[0]), embed(task.query[0])
    protos = torch.stack([s[task.support_y[0] == c].mean(0) for c in range(N_WAY)])
    logits = -((q[:, None, :] - protos[None]) ** 2).sum(-1)
    expected = F.cross_entropy(logits, task.query_y[0]).item()
    assert alg.train_step(pool, np.random.default_rng(11)) == pytest.approx(expected, rel=1e-10)


# -- FineTune -----------------------------------------------------------------------------------
def test_finetune_standard_task_uses_trained_head():
    spec = InputSpec("tabular", (4,))
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(3).repeat_interleave(10)
    x = torch.randn(30, 4, generator=gen) + labels[:, None].float()
    features = Features({"tabular": x}, {"tabular": spec})
    torch.manual_seed(0)
    backbone = Backbone({"tabular": TabularMLP(spec, hidden=16, out_dim=8, layers=2, dropout=0.0)}, Concat({"tabular": 8}))
    pool = training_pool(features, labels)
    alg = FineTune(lr=1e-2, batch_size=8, head_steps=50)
    alg.setup(backbone, pool, (3, 5, 5))
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert np.isfinite(alg.train_step(pool, rng))
    train, test = torch.arange(0, 30, 2), torch.arange(1, 30, 2)
    task = Task(features, train, labels[train], test, labels[test], 3, same_classes_as_training=True)
    head_before = alg.head.weight.detach().clone()
    logits = alg.predict(task)
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    embedding = run_sequential(backbone.encoders["tabular"].net, "encoders.tabular.net", params, x[test])
    expected = embedding @ alg.head.weight.detach().T + alg.head.bias.detach()
    torch.testing.assert_close(logits, expected)
    assert torch.equal(alg.head.weight, head_before)


def test_finetune_new_task_fits_new_head():
    spec = InputSpec("vector", (2,))
    x, y, support, query = _separable_task(2, shots=3, queries=6, seed=1)
    # A training pool with 3 classes; the new task has 2 ways.
    pool_labels = torch.arange(3).repeat_interleave(6)
    pool_features = Features({"vector": torch.randn(18, 2, generator=torch.Generator().manual_seed(9))}, {"vector": spec})
    torch.manual_seed(0)
    backbone = Backbone({"vector": TabularMLP(spec, hidden=16, out_dim=8, layers=2, dropout=0.0)}, Concat({"vector": 8}))
    alg = FineTune(head_steps=100, head_lr=0.05)
    alg.setup(backbone, training_pool(pool_features, pool_labels), (3, 5, 5))
    assert alg.head.out_features == 3
    head_before = (alg.head.weight.detach().clone(), alg.head.bias.detach().clone())
    features = Features({"vector": x}, {"vector": spec})
    task = Task(features, support, y[support], query, y[query], 2)
    logits = alg.predict(task)
    assert logits.shape == (len(query), 2)
    assert (logits.argmax(-1) == task.query_y).double().mean().item() == 1.0
    # The trained (3-class) head is left alone.
    assert torch.equal(alg.head.weight, head_before[0]) and torch.equal(alg.head.bias, head_before[1])
