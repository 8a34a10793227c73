"""The gradient-based family (maml, fomaml, anil, metasgd, reptile) against independent code.

Meta-gradients from torch.func (grad, vmap, chunked vmap, per-task loop) are compared with a
plain torch.autograd loop over tasks whose forward pass is written by hand from the modules'
parameters, in float64 so the agreement can be asserted tightly. Reptile's update is compared
with plain torch.optim loops on copies of the modules.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from autometa_builtins.encoders import Conv4, TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import ANIL, FOMAML, MAML, META_ALGORITHMS, MetaSGD, Reptile
from helpers import class_pool, hidden_clusters, prototype_head, run_sequential, training_pool
from torch import nn

from autometa.components import Backbone, InputSpec
from autometa.data.scoring import evaluate
from autometa.plugins import validate_component
from autometa.types import Features, Task

INNER_LR = 0.3
INNER_STEPS = 2
N_WAY, SHOTS, QUERIES, N_TASKS = 3, 2, 2, 3
ROWS_PER_CLASS, N_CLASSES = 5, 5
FAMILY = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD, "reptile": Reptile}


# -- hand-written forward pass ------------------------------------------------------------------
def body_forward(backbone: Backbone, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The single encoder's ``net`` applied layer by layer with the tensors in ``params``."""
    (modality, encoder), = backbone.encoders.items()
    return run_sequential(encoder.net, f"encoders.{modality}.net", params, inputs[modality])


def _rows(task: Task, t: int):
    inputs = task.features.inputs
    return (
        {m: x[task.support[t]] for m, x in inputs.items()}, task.support_y[t],
        {m: x[task.query[t]] for m, x in inputs.items()}, task.query_y[t],
    )


def reference_meta_grads(alg, task: Task, *, algorithm: str, first_order: bool) -> dict[str, torch.Tensor]:
    """Per-task inner loop with torch.autograd.grad, mean query loss, backward.

    Returns the gradient of every meta-parameter: ``backbone.<name>``, and for metasgd
    ``inner_lrs.<key>`` for the learned learning rates.
    """
    backbone = alg.backbone
    leaves = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
    rates = {}
    if algorithm == "metasgd":
        rates = {k: r.detach().clone().requires_grad_() for k, r in alg.inner_lrs.items()}

    def rate(name: str):
        return rates[name.replace(".", ":")] if rates else INNER_LR

    losses = []
    for t in range(task.support.shape[0]):
        sx, sy, qx, qy = _rows(task, t)
        if algorithm == "anil":
            weight = torch.zeros(task.n_way, backbone.out_dim, dtype=torch.float64, requires_grad=True)
            bias = torch.zeros(task.n_way, dtype=torch.float64, requires_grad=True)
            # The body embeds once with the meta-parameters; only the head moves.
            support, query = body_forward(backbone, leaves, sx), body_forward(backbone, leaves, qx)
            for _ in range(INNER_STEPS):
                loss = F.cross_entropy(support @ weight.T + bias, sy)
                gw, gb = torch.autograd.grad(loss, [weight, bias], create_graph=not first_order)
                weight, bias = weight - INNER_LR * gw, bias - INNER_LR * gb
            losses.append(F.cross_entropy(query @ weight.T + bias, qy))
            continue
        # The others start the head at the support's class means (part of the meta-graph). The
        # inner loop's gradients are partial ones, each fast weight on its own: clones of the
        # leaves, so that the head's dependence on the body is not differentiated in them.
        weight, bias = prototype_head(body_forward(backbone, leaves, sx), sy, task.n_way)
        fast = {**{n: leaf.clone() for n, leaf in leaves.items()}, "head.weight": weight, "head.bias": bias}
        for _ in range(INNER_STEPS):
            logits = body_forward(backbone, fast, sx) @ fast["head.weight"].T + fast["head.bias"]
            keys = list(fast)
            grads = torch.autograd.grad(F.cross_entropy(logits, sy), [fast[k] for k in keys], create_graph=not first_order)
            # metasgd's head rate is one per embedding dimension (broadcast over classes).
            fast = {k: fast[k] - rate(k) * g for k, g in zip(keys, grads)}
        logits = body_forward(backbone, fast, qx) @ fast["head.weight"].T + fast["head.bias"]
        losses.append(F.cross_entropy(logits, qy))
    torch.stack(losses).mean().backward()
    out = {f"backbone.{n}": leaf.grad for n, leaf in leaves.items()}
    out.update({f"inner_lrs.{k}": r.grad for k, r in rates.items()})
    return out


# -- tiny problems ------------------------------------------------------------------------------
def _problem(kind: str) -> tuple[Backbone, Features, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = N_CLASSES * ROWS_PER_CLASS
    torch.manual_seed(0)
    if kind == "mlp":
        spec = InputSpec("tabular", (4,))
        encoder = TabularMLP(spec, hidden=7, out_dim=5, layers=2, dropout=0.0)
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    else:
        spec = InputSpec("image", (1, 8, 8))
        encoder = Conv4(spec, channels=4)
        x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    backbone = Backbone({spec.modality: encoder}, Concat({spec.modality: encoder.out_dim})).double()
    features = Features({spec.modality: x}, {spec.modality: spec})
    return backbone, features, torch.arange(N_CLASSES).repeat_interleave(ROWS_PER_CLASS)


def _setup(algorithm: str, kind: str = "mlp", **options):
    backbone, features, labels = _problem(kind)
    pool = training_pool(features, labels)
    alg = FAMILY[algorithm](inner_lr=INNER_LR, inner_steps=INNER_STEPS, meta_batch=N_TASKS, **options)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    assert alg.shape == (N_WAY, SHOTS, QUERIES)
    if algorithm == "metasgd":
        # Distinct positive rates, so that a rate applied to the wrong parameter shows.
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for r in alg.inner_lrs.values():
                r.copy_(INNER_LR * (0.5 + torch.rand(r.shape, generator=gen, dtype=r.dtype)))
    task = pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(3))
    return alg, pool, task


def _meta_grads(alg, task: Task, *, accumulate: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """The meta-gradient from ``meta_loss().backward()``, or from ``meta_backward`` (which
    accumulates it slice by slice: chunk by chunk, or task by task in the per-task loop)."""
    for p in alg._meta_parameters():
        p.grad = None
    if accumulate:
        loss = alg.meta_backward(task)
    else:
        loss = alg.meta_loss(task)
        assert loss.dtype == torch.float64 and loss.dim() == 0
        loss.backward()
        loss = loss.item()
    return loss, {
        f"{where}.{n}": p.grad for where, module in alg.modules().items() for n, p in module.named_parameters()
    }


def _assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


PATHS = {"vmap": {"vectorize": True}, "chunked": {"vectorize": True, "chunk_size": 2}, "per_task": {"vectorize": False}}
CASES = [
    (algorithm, kind, path)
    for algorithm in ("maml", "fomaml", "anil", "metasgd")
    for kind in ("mlp", "conv")
    for path in PATHS
    # chunking is shared code: conv through chunked vmap once (maml) is enough
    if not (kind == "conv" and path == "chunked" and algorithm != "maml")
]


@pytest.mark.parametrize("algorithm,kind,path", CASES)
def test_meta_gradient_matches_autograd_loop(algorithm, kind, path):
    alg, _, task = _setup(algorithm, kind, **PATHS[path])
    first_order = algorithm == "fomaml"
    expected = reference_meta_grads(alg, task, algorithm=algorithm, first_order=first_order)
    loss, actual = _meta_grads(alg, task)
    _assert_close(actual, expected)
    accumulated_loss, accumulated = _meta_grads(alg, task, accumulate=True)
    _assert_close(accumulated, expected)
    assert accumulated_loss == pytest.approx(loss, rel=1e-12)
    # Not vacuous: the body's meta-gradient is far from zero.
    assert sum(g.abs().sum() for k, g in expected.items() if k.startswith("backbone")) > 1e-3
    if algorithm == "metasgd":
        rate_grads = _flat({k: g for k, g in expected.items() if k.startswith("inner_lrs")})
        assert rate_grads.abs().sum() > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_first_order_anil_matches_reference(kind):
    alg, _, task = _setup("anil", kind, first_order=True)
    expected = reference_meta_grads(alg, task, algorithm="anil", first_order=True)
    _, actual = _meta_grads(alg, task)
    _assert_close(actual, expected)
    # Second-order ANIL also differentiates through the support features the head saw.
    second = reference_meta_grads(alg, task, algorithm="anil", first_order=False)
    assert not torch.allclose(_flat(actual), _flat(second), rtol=1e-3, atol=1e-6)


def test_anil_adapts_only_the_head():
    alg, _, task = _setup("anil")
    sx, sy, qx, qy = _rows(task, 0)
    body, head = alg._initial(N_WAY)
    fast_body, fast_head = alg.adapt((body, head), sx, sy)
    assert all(fast_body[n] is body[n] for n in body)
    assert not torch.equal(fast_head["weight"], head["weight"])
    # predict = the reference head fit on the unadapted body's embeddings.
    params = {n: p.detach() for n, p in alg.backbone.named_parameters()}
    support, query = body_forward(alg.backbone, params, sx), body_forward(alg.backbone, params, qx)
    weight, bias = torch.zeros(N_WAY, support.shape[1], dtype=torch.float64), torch.zeros(N_WAY, dtype=torch.float64)
    for _ in range(INNER_STEPS):
        probs = torch.softmax(support @ weight.T + bias, -1) - F.one_hot(sy, N_WAY)
        weight, bias = weight - INNER_LR * probs.T @ support / len(sy), bias - INNER_LR * probs.mean(0)
    one = Task(task.features, task.support[0], sy, task.query[0], qy, N_WAY)
    torch.testing.assert_close(alg.predict(one), query @ weight.T + bias, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps", range(MAML.search_space["inner_steps"].low, MAML.search_space["inner_steps"].high + 1))
def test_maml_is_not_anil(steps):
    """With a zero head, the body's inner-loop gradient is zero in the first step, so MAML at one
    step would compute exactly ANIL's loss and meta-gradient. The head starts at the class means
    instead: the first step moves the body, and the two differ at every searched step count."""
    grads = {}
    for name in ("maml", "anil"):
        alg, _, task = _setup(name)
        alg.inner_steps = steps
        loss, grads[name] = _meta_grads(alg, task)
    assert not torch.allclose(_flat(grads["maml"]), _flat(grads["anil"]), rtol=1e-3, atol=1e-8)
    alg, _, task = _setup("maml")
    sx, sy, _, _ = _rows(task, 0)
    body, head = alg._initial(N_WAY)
    moved, _ = alg.adapt((body, head), sx, sy, steps=1)
    assert max((moved[n] - body[n]).abs().max().item() for n in body) > 1e-4


def _norm_encoder(norm: Callable[[], nn.Module], supports_vmap: bool = True) -> type:
    class NormMLP(TabularMLP):
        """A third-party style encoder: Linear ▶ a normalisation ▶ ReLU ▶ Linear."""

        name = "norm_mlp"

        def __init__(self, spec, **_):
            nn.Module.__init__(self)
            self.net = nn.Sequential(nn.Linear(spec.shape[0], 6), norm(), nn.ReLU(), nn.Linear(6, 5))
            self.out_dim = 5

    if not supports_vmap:
        NormMLP.supports_vmap = False
    return NormMLP


def _norm_setup(encoder: type, **options):
    backbone, features, labels = _problem("mlp")
    torch.manual_seed(0)
    spec = features.specs["tabular"]
    backbone = Backbone({"tabular": encoder(spec)}, Concat({"tabular": 5})).double()
    pool = training_pool(features, labels)
    alg = MAML(inner_lr=INNER_LR, inner_steps=INNER_STEPS, meta_batch=N_TASKS, **options)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    return alg, pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(3))


@pytest.mark.parametrize("norm", [
    lambda: nn.BatchNorm1d(6, track_running_stats=False), lambda: nn.LayerNorm(6),
], ids=["batchnorm", "layernorm"])
def test_modules_vmap_gets_wrong_take_the_per_task_loop(norm):
    """vmap's batched second-order gradients through batch and layer norm are wrong (off by
    about 1e-4 here): a gradient learner asked to vectorise detects them and loops over tasks."""
    looped, task = _norm_setup(_norm_encoder(norm), vectorize=False)
    _, expected = _meta_grads(looped, task)
    alg, _ = _norm_setup(_norm_encoder(norm), vectorize=True)
    assert not alg.vectorized and "gives wrong batched second-order gradients" in alg.vmap_blocker
    _, actual = _meta_grads(alg, task)
    _, accumulated = _meta_grads(alg, task, accumulate=True)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(accumulated[name], expected[name], rtol=1e-9, atol=1e-14)
    # Not vacuous: vmapped anyway, the meta-gradient is wrong.
    alg.vmap_blocker = None
    _, wrong = _meta_grads(alg, task)
    assert (_flat(wrong) - _flat(expected)).abs().max() > 1e-6


def test_a_component_declaring_no_vmap_support_is_looped_over():
    alg, task = _norm_setup(_norm_encoder(lambda: nn.GroupNorm(1, 6), supports_vmap=False), vectorize=True)
    assert not alg.vectorized and alg.vmap_blocker == "NormMLP (encoders.tabular) declares supports_vmap = False"
    vmapped, _ = _norm_setup(_norm_encoder(lambda: nn.GroupNorm(1, 6)), vectorize=True)
    assert vmapped.vectorized and vmapped.vmap_blocker is None  # GroupNorm is fine under vmap
    _, looped = _meta_grads(alg, task)
    _, batched = _meta_grads(vmapped, task)
    _assert_close(looped, batched)


def test_first_order_variants():
    fo_alg, _, task = _setup("fomaml")
    loss_fo, fomaml = _meta_grads(fo_alg, task)
    maml_fo_alg, _, _ = _setup("maml", first_order=True)
    loss_mfo, maml_fo = _meta_grads(maml_fo_alg, task)
    maml_alg, _, _ = _setup("maml")
    loss_so, second = _meta_grads(maml_alg, task)
    assert loss_fo == loss_mfo == loss_so  # the forward is the same; only the gradient differs
    for name in fomaml:
        assert torch.equal(fomaml[name], maml_fo[name]), name
    assert not torch.allclose(_flat(fomaml), _flat(second), rtol=1e-3, atol=1e-6)
    cosine = F.cosine_similarity(_flat(fomaml), _flat(second), dim=0).item()
    assert 0.0 < cosine < 1.0 - 1e-6
    assert "first_order" not in FOMAML.search_space and FOMAML().first_order


@pytest.mark.parametrize("algorithm", list(FAMILY))
def test_vmap_and_per_task_paths_agree(algorithm):
    results = []
    for options in PATHS.values():
        alg, _, task = _setup(algorithm, **options)
        if algorithm == "reptile":
            deltas, loss = alg.meta_update(task)
            results.append((loss.item(), _flat(deltas)))
        else:
            for accumulate in (False, True):
                loss, grads = _meta_grads(alg, task, accumulate=accumulate)
                results.append((loss, _flat(grads)))
    (loss0, g0), *others = results
    assert g0.abs().sum() > 1e-4
    for loss, g in others:
        assert loss == pytest.approx(loss0, rel=1e-12)
        torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-14)


def _reference_reptile_step(alg: Reptile, task: Task, *, optimizer: str, epsilon: float) -> dict[str, torch.Tensor]:
    """θ + ε · mean over tasks of (θ'ᵢ − θ), each θ'ᵢ from torch.optim on module copies."""
    theta = {n: p.detach().clone() for n, p in alg.backbone.named_parameters()}
    adapted = []
    for t in range(task.support.shape[0]):
        sx, sy, qx, qy = _rows(task, t)
        x = {m: torch.cat([sx[m], qx[m]]) for m in sx}
        y = torch.cat([sy, qy])
        model = nn.Sequential(copy.deepcopy(alg.backbone), nn.Linear(alg.backbone.out_dim, N_WAY).double())
        with torch.no_grad():
            weight, bias = prototype_head(model[0](x), y, N_WAY)
            model[1].weight.copy_(weight), model[1].bias.copy_(bias)
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=INNER_LR, betas=(0.0, 0.999), eps=1e-8)
        for _ in range(INNER_STEPS):
            opt.zero_grad()
            F.cross_entropy(model[1](model[0](x)), y).backward()
            opt.step()
        adapted.append({n: p.detach() for n, p in model[0].named_parameters()})
    return {n: theta[n] + epsilon * torch.stack([a[n] - theta[n] for a in adapted]).mean(0) for n in theta}


@pytest.mark.parametrize("optimizer,vectorize", [("sgd", True), ("sgd", False), ("adam", True)])
def test_reptile_step_is_interpolation_towards_adapted_weights(optimizer, vectorize):
    alg, pool, _ = _setup("reptile", lr=0.4, inner_optimizer=optimizer, vectorize=vectorize)
    # The episodes train_step draws (same generator state).
    task = pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(5))
    expected = _reference_reptile_step(alg, task, optimizer=optimizer, epsilon=0.4)
    before = {n: p.detach().clone() for n, p in alg.backbone.named_parameters()}
    loss = alg.train_step(pool, np.random.default_rng(5))
    assert np.isfinite(loss)
    after = dict(alg.backbone.named_parameters())
    for n in expected:
        assert not torch.equal(after[n], before[n]), n
        torch.testing.assert_close(after[n].detach(), expected[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_metasgd_rates_are_state_and_learn():
    alg, pool, _ = _setup("metasgd", lr=0.01)
    rates = alg.modules()["inner_lrs"]
    names = {n.replace(".", ":") for n, _ in alg.backbone.named_parameters()}
    assert set(rates.state_dict()) == names | {"head:weight", "head:bias"}
    before = {k: r.detach().clone() for k, r in rates.items()}
    alg.train_step(pool, np.random.default_rng(0))
    assert all(not torch.equal(rates[k], before[k]) for k in before)
    # A fresh instance restores them from the saved state.
    other, _, _ = _setup("metasgd")
    other.modules()["inner_lrs"].load_state_dict(rates.state_dict())
    assert all(torch.equal(other.inner_lrs[k], rates[k]) for k in before)


def test_registration_and_search_spaces():
    names = [cls.name for cls in META_ALGORITHMS]
    assert len(names) == len(set(names))
    for cls in FAMILY.values():
        assert cls in META_ALGORITHMS
        validate_component("meta_algorithm", cls)
        assert set(cls.protocols) == {"fewshot", "grouped"}
        assert {"inner_lr", "inner_steps", "lr", "meta_batch", "train_ways", "train_shots"} <= set(cls.search_space)


def test_training_shape_is_clamped_to_the_pool():
    backbone, features, labels = _problem("mlp")
    pool = training_pool(features, labels)  # 5 classes of 5 rows
    alg = MAML(train_ways=10, train_shots=5)
    alg.setup(backbone, pool, (3, 2, 2))
    ways, shots, queries = alg.shape
    assert ways <= N_CLASSES and shots + queries <= ROWS_PER_CLASS and shots == 4
    assert np.isfinite(alg.train_step(pool, np.random.default_rng(0)))


# -- learning -----------------------------------------------------------------------------------
LEARNING = {
    "maml": {"inner_lr": 0.5, "lr": 0.01},
    "fomaml": {"inner_lr": 0.5, "lr": 0.03},
    "anil": {"inner_lr": 0.5, "inner_steps": 5, "lr": 0.03},
    "metasgd": {"inner_lr": 0.5, "lr": 0.03},
    "reptile": {"inner_lr": 0.5, "inner_steps": 5, "lr": 0.5},
}


@pytest.mark.parametrize("algorithm", list(FAMILY))
def test_learns_a_fewshot_problem(algorithm):
    features, labels = hidden_clusters()
    pool = class_pool(features, labels, range(10))
    torch.manual_seed(0)
    encoder = TabularMLP(features.specs["tabular"], hidden=16, out_dim=8, dropout=0.0)
    backbone = Backbone({"tabular": encoder}, Concat({"tabular": 8}))
    alg = FAMILY[algorithm](meta_batch=4, **LEARNING[algorithm])
    alg.setup(backbone, pool, (3, 2, 5))
    # 3-way 2-shot tasks from the held-out classes 10..15.
    batch = class_pool(features, labels, range(10, 16)).episodes(16, 3, 2, 5, np.random.default_rng(1))
    tasks = [Task(features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], 3) for i in range(16)]
    before = evaluate(alg, tasks).mean
    rng = np.random.default_rng(0)
    for _ in range(40):
        assert np.isfinite(alg.train_step(pool, rng))
    after = evaluate(alg, tasks).mean
    assert after > 0.55 and after > before + 0.15, (before, after)  # chance is 1/3


@pytest.mark.parametrize("algorithm", list(FAMILY))
def test_predict_on_variable_shape_tasks(algorithm):
    """Grouped-protocol tasks differ in ways and support/query sizes: predict takes one at a time."""
    features, labels = hidden_clusters()
    pool = class_pool(features, labels, range(16))
    torch.manual_seed(0)
    encoder = TabularMLP(features.specs["tabular"], hidden=8, out_dim=4, dropout=0.0)
    backbone = Backbone({"tabular": encoder}, Concat({"tabular": 4}))
    alg = FAMILY[algorithm]()
    alg.setup(backbone, pool, (3, 2, 3))
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    shapes = [(2, [3, 1], 5), (4, [2, 2, 5, 1], 3)]  # ways, shots per class, queries per class
    tasks, logits = [], []
    for n_way, shots, queries in shapes:
        support = torch.cat([torch.arange(c * 10, c * 10 + s) for c, s in enumerate(shots)])
        query = torch.cat([torch.arange(c * 10 + 5, c * 10 + 5 + queries) for c in range(n_way)])
        tasks.append(Task(features, support, labels[support], query, labels[query], n_way))
        logits.append(alg.predict(tasks[-1]))
        assert logits[-1].shape == (len(query), n_way) and torch.isfinite(logits[-1]).all()
        assert not logits[-1].requires_grad
    # Adaptation starts afresh for every task: the second task left nothing behind.
    assert torch.equal(alg.predict(tasks[0]), logits[0])
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())
