"""metalstm (learned update rule) and metatransfer (λ-weighted transfer) against independent code.

The references are plain torch.autograd loops whose forward pass is written by hand from the
modules' parameters, in float64 so agreement can be asserted tightly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from autometa_builtins.encoders import TabularMLP
from autometa_builtins.fusions import Concat
from autometa_builtins.meta_algorithms import MAML, META_ALGORITHMS, MetaLSTM, MetaTransfer
from helpers import class_pool, hidden_clusters, prototype_head
from torch import nn

from autometa import testing
from autometa.components import Backbone, InputSpec
from autometa.data.scoring import evaluate
from autometa.study.engine import search
from autometa.types import Features, PoolInfo, Task, TrainingPool

INNER_LR = 0.3
INNER_STEPS = 3
N_WAY, SHOTS, QUERIES, N_TASKS = 3, 2, 2, 3
ROWS_PER_CLASS, N_CLASSES = 5, 5
P = 10.0  # the preprocessing constant of Andrychowicz et al. 2016


@pytest.mark.parametrize("cls, device", testing.conformance_params([MetaLSTM, MetaTransfer]))
def test_conformance(cls, device):
    testing.check_component(cls, device=device)


def test_registered_with_the_family():
    assert MetaLSTM in META_ALGORITHMS and MetaTransfer in META_ALGORITHMS
    for cls in (MetaLSTM, MetaTransfer):
        assert set(cls.protocols) == {"fewshot", "grouped"}
    assert {"hidden_size", "first_order", "inner_steps", "lr"} <= set(MetaLSTM.search_space)
    assert 0.0 in MetaTransfer.search_space["target_weight"].choices


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (MetaLSTM, {"inner_lr": 1.0}, r"metalstm: inner_lr .* must lie in \(0, 1\)"),
        (MetaLSTM, {"hidden_size": 0}, "metalstm: hidden_size must be at least 1"),
        (MetaTransfer, {"target_weight": -1.0}, r"metatransfer: target_weight \(λ\) must be zero or positive"),
        (MetaTransfer, {"transfer_steps": -1}, "metatransfer: transfer_steps and source_tasks"),
    ],
)
def test_bad_parameters_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# -- tiny problem and hand-written model ---------------------------------------------------------
def _problem(n_features: int = 4):
    gen = torch.Generator().manual_seed(1)
    n = N_CLASSES * ROWS_PER_CLASS
    torch.manual_seed(0)
    spec = InputSpec("tabular", (n_features,))
    encoder = TabularMLP(spec, hidden=7, out_dim=5, layers=2, dropout=0.0)
    backbone = Backbone({"tabular": encoder}, Concat({"tabular": encoder.out_dim})).double()
    x = torch.randn(n, n_features, generator=gen, dtype=torch.float64)
    features = Features({"tabular": x}, {"tabular": spec})
    labels = torch.arange(N_CLASSES).repeat_interleave(ROWS_PER_CLASS)
    rows = np.arange(n)
    pool = TrainingPool(features, labels, rows, [{c: rows[labels.numpy() == c] for c in range(N_CLASSES)}])
    return backbone, pool


def body_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """TabularMLP(layers=2) ▶ concat: Linear, ReLU, Linear, ReLU."""
    key = "encoders.tabular.net"
    h = (x @ params[f"{key}.0.weight"].T + params[f"{key}.0.bias"]).clamp_min(0)
    return (h @ params[f"{key}.2.weight"].T + params[f"{key}.2.bias"]).clamp_min(0)


def model_loss(fast: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(body_forward(fast, x) @ fast["head.weight"].T + fast["head.bias"], y)


def _rows(task: Task, t: int):
    x = task.features.inputs["tabular"]
    return x[task.support[t]], task.support_y[t], x[task.query[t]], task.query_y[t]


def _leaves(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


def _start(body: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_way: int) -> dict[str, torch.Tensor]:
    """The inner loop's start: clones of the body's tensors (so that inner gradients are partial
    ones) and the head at the class means c_k of the body's features (w_k = 2 c_k, b_k = -|c_k|²)."""
    weight, bias = prototype_head(body_forward(body, x), y, n_way)
    return {**{n: v.clone() for n, v in body.items()}, "head.weight": weight, "head.bias": bias}


# -- metalstm ----------------------------------------------------------------------------------
def _metalstm(**options):
    backbone, pool = _problem()
    alg = MetaLSTM(inner_lr=INNER_LR, inner_steps=INNER_STEPS, meta_batch=N_TASKS, hidden_size=3, **options)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    task = pool.episodes(N_TASKS, N_WAY, SHOTS, QUERIES, np.random.default_rng(3))
    return alg, pool, task


def test_metalstm_with_sgd_gates_is_plain_sgd():
    """Gate weights 0, forget bias 40 (σ(40) = 1 in float64), input bias logit(lr): k steps of SGD."""
    alg, _, task = _metalstm()
    lr = 0.2
    with torch.no_grad():
        rule = alg.update_rule
        for gate, bias in ((rule.forget_gate, 40.0), (rule.input_gate, math.log(lr / (1 - lr)))):
            gate.weight.zero_()
            gate.bias.fill_(bias)
    sx, sy, _, _ = _rows(task, 0)
    start = _start({n: p.detach() for n, p in alg.backbone.named_parameters()}, sx, sy, N_WAY)
    fast = dict(start)
    for _ in range(INNER_STEPS):
        leaves = {k: v.requires_grad_() for k, v in fast.items()}
        grads = torch.autograd.grad(model_loss(leaves, sx, sy), list(leaves.values()))
        fast = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    with torch.no_grad():
        body, head = alg.adapt(alg._initial(N_WAY), {"tabular": sx}, sy)
    actual = {**body, "head.weight": head["weight"], "head.bias": head["bias"]}
    assert actual.keys() == fast.keys()
    for k in fast:
        assert not torch.equal(fast[k], start[k]), k
        torch.testing.assert_close(actual[k], fast[k], rtol=1e-12, atol=1e-15, msg=lambda m: f"{k}: {m}")


def reference_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Element by element from the paper's definition."""
    flat = x.reshape(-1)
    rows = []
    for v in flat:
        if v.abs() >= math.exp(-P):
            rows.append(torch.stack([torch.log(v.abs()) / P, torch.sign(v)]))
        else:
            rows.append(torch.stack([-torch.ones_like(v), math.exp(P) * v]))
    return torch.stack(rows).reshape(x.shape + (2,))


def reference_lstm_update(rule: dict[str, torch.Tensor], hidden: int, theta, gradient, loss, state):
    """θ ← f θ − i ∇ with an LSTM cell (gates i, f, g, o) and the two meta-gates, by hand."""
    h, c, f_prev, i_prev = state
    x = torch.cat([reference_preprocess(gradient), reference_preprocess(loss).expand(len(theta), 2), h], dim=1)
    z = x @ rule["cell_gates.weight"].T + rule["cell_gates.bias"]
    gi, gf, go = (z[:, k * hidden:(k + 1) * hidden] for k in range(3))
    gg = x @ rule["cell_candidate.weight"].T + rule["cell_candidate.bias"]
    c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    h = torch.sigmoid(go) * torch.tanh(c)

    def gate(name, previous):
        w = rule[f"{name}.weight"][0]
        return torch.sigmoid(h @ w[:hidden] + theta * w[hidden] + previous * w[hidden + 1] + rule[f"{name}.bias"][0])

    f, i = gate("forget_gate", f_prev), gate("input_gate", i_prev)
    return f * theta - i * gradient, (h, c, f, i)


def reference_metalstm_grads(alg: MetaLSTM, task: Task, *, first_order: bool) -> dict[str, torch.Tensor]:
    body0, rule = _leaves(alg.backbone), _leaves(alg.update_rule)
    hidden = alg.hidden_size
    losses = []
    for t in range(task.support.shape[0]):
        sx, sy, qx, qy = _rows(task, t)
        fast = _start(body0, sx, sy, N_WAY)
        keys = list(fast)
        theta = torch.cat([fast[k].reshape(-1) for k in keys])
        zeros = torch.zeros(len(theta), hidden, dtype=torch.float64)
        state = (zeros, zeros, torch.zeros_like(theta), torch.zeros_like(theta))
        for _ in range(INNER_STEPS):
            pieces = theta.split([fast[k].numel() for k in keys])
            current = {k: p.reshape(fast[k].shape) for k, p in zip(keys, pieces)}
            if first_order:
                current = {k: v.detach().requires_grad_() for k, v in current.items()}
            loss = model_loss(current, sx, sy)
            grads = torch.autograd.grad(loss, [current[k] for k in keys], create_graph=not first_order)
            gradient = torch.cat([g.reshape(-1) for g in grads])
            if first_order:
                gradient, loss = gradient.detach(), loss.detach()
            theta, state = reference_lstm_update(rule, hidden, theta, gradient, loss, state)
        pieces = theta.split([fast[k].numel() for k in keys])
        losses.append(model_loss({k: p.reshape(fast[k].shape) for k, p in zip(keys, pieces)}, qx, qy))
    torch.stack(losses).mean().backward()
    return {**{f"backbone.{n}": v.grad for n, v in body0.items()}, **{f"update_rule.{n}": v.grad for n, v in rule.items()}}


def _meta_grads(alg, task: Task) -> dict[str, torch.Tensor]:
    for p in alg._meta_parameters():
        p.grad = None
    alg.meta_loss(task).backward()
    return {f"{where}.{n}": p.grad for where, m in alg.modules().items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
def test_metalstm_meta_gradient_matches_autograd_loop(first_order, vectorize):
    alg, _, task = _metalstm(first_order=first_order, vectorize=vectorize)
    # Gate weights far from their near-SGD start, so that a miswired input would show.
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in alg.update_rule.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    expected = reference_metalstm_grads(alg, task, first_order=first_order)
    actual = _meta_grads(alg, task)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert expected[name] is not None and expected[name].abs().sum() > 1e-8, name  # every weight learns
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_metalstm_second_order_differs_and_rule_learns():
    first, pool, task = _metalstm(first_order=True)
    second, _, _ = _metalstm(first_order=False)
    g1, g2 = _meta_grads(first, task), _meta_grads(second, task)
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert not torch.allclose(flat(g1), flat(g2), rtol=1e-3, atol=1e-8)
    before = {n: p.detach().clone() for n, p in first.update_rule.named_parameters()}
    first.train_step(pool, np.random.default_rng(0))
    assert all(not torch.equal(p, before[n]) for n, p in first.update_rule.named_parameters())


# -- metatransfer -------------------------------------------------------------------------------
def _metatransfer(**options):
    backbone, pool = _problem()
    options = {"inner_lr": INNER_LR, "inner_steps": 2, "meta_batch": N_TASKS, **options}
    alg = MetaTransfer(**options)
    alg.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    return alg, pool


def test_metatransfer_meta_training_is_maml():
    transfer, pool = _metatransfer(target_weight=10.0)
    backbone, _ = _problem()
    maml = MAML(inner_lr=INNER_LR, inner_steps=2, meta_batch=N_TASKS)
    maml.setup(backbone, pool, (N_WAY, SHOTS, QUERIES))
    for alg in (transfer, maml):
        rng = np.random.default_rng(7)
        alg.losses = [alg.train_step(pool, rng) for _ in range(3)]
    assert transfer.losses == maml.losses
    for (name, a), b in zip(transfer.backbone.named_parameters(), maml.backbone.parameters()):
        assert torch.equal(a, b), name


def reference_transfer(alg: MetaTransfer, task: Task, sources: Task) -> dict[str, torch.Tensor]:
    """Adam on leaf copies of θ: mean over sources of the query loss after ``inner_steps`` of
    SGD on the support (second order), plus λ × the target's support loss after the same."""
    body = _leaves(alg.backbone)
    optimizer = torch.optim.Adam(body.values(), lr=alg.transfer_lr)

    def adapted(x, y, n_way):
        fast = _start(body, x, y, n_way)
        for _ in range(alg.inner_steps):
            keys = list(fast)
            grads = torch.autograd.grad(model_loss(fast, x, y), [fast[k] for k in keys], create_graph=True)
            fast = {k: fast[k] - alg.inner_lr * g for k, g in zip(keys, grads)}
        return fast

    for _ in range(alg.transfer_steps):
        losses = []
        for t in range(sources.support.shape[0]):
            sx, sy, qx, qy = _rows(sources, t)
            losses.append(model_loss(adapted(sx, sy, sources.n_way), qx, qy))
        loss = torch.stack(losses).mean()
        x, y = task.features.inputs["tabular"][task.support], task.support_y
        if alg.target_weight:
            loss = loss + alg.target_weight * model_loss(adapted(x, y, task.n_way), x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: b.detach() for n, b in body.items()}


def _target(pool: TrainingPool, n_way: int = 2, shots: int = 3) -> Task:
    rows = torch.cat([torch.arange(c * ROWS_PER_CLASS, c * ROWS_PER_CLASS + shots) for c in range(n_way)])
    query = torch.cat([torch.arange(c * ROWS_PER_CLASS + shots, (c + 1) * ROWS_PER_CLASS) for c in range(n_way)])
    y = torch.arange(n_way).repeat_interleave(shots)
    return Task(pool.features, rows, y, query, torch.arange(n_way).repeat_interleave(ROWS_PER_CLASS - shots), n_way)


@pytest.mark.parametrize("target_weight", [0.0, 2.5])
def test_transfer_matches_the_weighted_objective(target_weight):
    alg, pool = _metatransfer(target_weight=target_weight, transfer_steps=3, transfer_lr=0.05, source_tasks=2)
    # The kept sources are the episodes the fixed seed draws, stored with their inputs.
    sources = pool.episodes(2, *alg.shape, np.random.default_rng(MetaTransfer.SAMPLE_SEED))
    support, support_y, query, query_y = alg.sources.task_args()
    assert torch.equal(support["tabular"], sources.support_inputs()["tabular"]) and torch.equal(support_y, sources.support_y)
    assert torch.equal(query["tabular"], sources.query_inputs()["tabular"]) and torch.equal(query_y, sources.query_y)
    task = _target(pool)
    for seed in (0, 1):  # the source gradient cached in eval mode must follow the trained state
        alg.train_step(pool, np.random.default_rng(seed))
        expected = reference_transfer(alg, task, sources)
        before = {n: p.detach().clone() for n, p in alg.backbone.named_parameters()}
        for training in (True, False, False):
            alg.backbone.train(training)
            actual = alg.transfer(task)
            for n in expected:
                assert not torch.equal(actual[n], before[n]), n
                assert torch.equal(alg.backbone.get_parameter(n), before[n]), n  # the trained state is untouched
                torch.testing.assert_close(actual[n], expected[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    # predict = the inner loop from θ* on the support, then the queries.
    x = pool.features.inputs["tabular"]
    fast = _start(expected, x[task.support], task.support_y, task.n_way)
    for _ in range(alg.inner_steps):
        fast = {k: v.requires_grad_() for k, v in fast.items()}
        grads = torch.autograd.grad(model_loss(fast, x[task.support], task.support_y), list(fast.values()))
        fast = {k: (v - alg.inner_lr * g).detach() for (k, v), g in zip(fast.items(), grads)}
    logits = body_forward(fast, x[task.query]) @ fast["head.weight"].T + fast["head.bias"]
    torch.testing.assert_close(alg.predict(task), logits, rtol=1e-9, atol=1e-12)


def test_saved_model_keeps_its_sources():
    """A model rebuilt for prediction is set up from PoolInfo alone: the sources come from its state."""
    alg, pool = _metatransfer(target_weight=1.0, transfer_steps=2, transfer_lr=0.05, source_tasks=3)
    alg.train_step(pool, np.random.default_rng(0))
    state = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in alg.modules().items()}
    assert state["sources"]["support/tabular"].shape == (3, N_WAY * SHOTS, 4)
    backbone, _ = _problem()
    rebuilt = MetaTransfer(inner_lr=INNER_LR, inner_steps=2, meta_batch=N_TASKS, target_weight=1.0, transfer_steps=2,
                           transfer_lr=0.05, source_tasks=3)
    rebuilt.setup(backbone, PoolInfo(N_CLASSES), (N_WAY, SHOTS, QUERIES))
    assert len(rebuilt.sources) == 0
    for name, module in rebuilt.modules().items():
        module.load_state_dict(state[name])
    assert len(rebuilt.sources) == 3 and rebuilt.sources.n_way == N_WAY
    task = _target(pool)
    assert torch.equal(rebuilt.predict(task), alg.predict(task))


def _planted(seed: int = 0):
    """Source classes differ in features 0-1 only; the target's classes, closer together, in
    features 2-3 only. Meta-training on the sources teaches the body to read features 0-1 and
    to ignore the rest, which the target needs: λ > 0 lets the target's examples say so.
    """
    gen = torch.Generator().manual_seed(seed)
    n_source, per_class, dims = 12, 12, 6
    source_centres = torch.zeros(n_source, dims)
    source_centres[:, :2] = 3 * torch.randn(n_source, 2, generator=gen)
    target_centres = torch.zeros(4, dims)
    target_centres[:, 2:4] = 1.5 * torch.randn(4, 2, generator=gen)
    centres = torch.cat([source_centres, target_centres])
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    x = centres[labels] + 0.5 * torch.randn(len(labels), dims, generator=gen)
    features = Features({"tabular": x}, {"tabular": InputSpec("tabular", (dims,))})
    rows = np.arange(len(labels))
    sources = np.flatnonzero(labels.numpy() < n_source)
    pool = TrainingPool(features, labels, sources, [{c: rows[labels.numpy() == c] for c in range(n_source)}])
    targets = TrainingPool(features, labels, np.flatnonzero(labels.numpy() >= n_source),
                           [{c: rows[labels.numpy() == c] for c in range(n_source, n_source + 4)}])
    batch = targets.episodes(12, 2, 5, 7, np.random.default_rng(1))
    tasks = [Task(features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], 2) for i in range(12)]
    return pool, tasks


def test_target_weight_moves_towards_a_different_target():
    # Planted set 1: set 0's target classes lie so far apart that the class-mean start of the
    # inner loop already gets 0.94 at λ = 0, leaving nothing for λ to show.
    pool, tasks = _planted(seed=1)
    torch.manual_seed(0)
    encoder = TabularMLP(pool.features.specs["tabular"], hidden=16, out_dim=8, dropout=0.0)
    alg = MetaTransfer(inner_lr=0.5, inner_steps=2, lr=0.03, meta_batch=4, first_order=True, target_weight=0.0,
                       transfer_steps=15, transfer_lr=0.03, source_tasks=2)
    alg.setup(Backbone({"tabular": encoder}, Concat({"tabular": 8})), pool, (3, 2, 5))
    rng = np.random.default_rng(0)
    for _ in range(40):
        alg.train_step(pool, rng)
    accuracy = {}
    for weight in (0.0, 1.0, 10.0):
        alg.target_weight = weight
        accuracy[weight] = evaluate(alg, tasks).mean
    # 2-way tasks; measured 0.73 → 0.88 (λ = 1) → 0.89 (λ = 10). On planted sets 0-7 the gain of
    # λ = 1 and of λ = 10 over λ = 0 is 0.02 to 0.16, while which of the two is higher varies.
    assert accuracy[1.0] > accuracy[0.0] + 0.1 and accuracy[10.0] > accuracy[0.0] + 0.1, accuracy


def test_metalstm_learns_a_fewshot_problem():
    """3-way 2-shot tasks on held-out classes whose signal hides among louder noise dimensions."""
    features, labels = hidden_clusters()
    train = class_pool(features, labels, range(10))
    batch = class_pool(features, labels, range(10, 16)).episodes(16, 3, 2, 5, np.random.default_rng(1))
    tasks = [Task(features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], 3) for i in range(16)]
    torch.manual_seed(0)
    encoder = TabularMLP(features.specs["tabular"], hidden=16, out_dim=8, dropout=0.0)
    alg = MetaLSTM(inner_lr=0.3, lr=0.03, meta_batch=4, hidden_size=4)
    alg.setup(Backbone({"tabular": encoder}, Concat({"tabular": 8})), train, (3, 2, 5))
    before = evaluate(alg, tasks).mean
    rng = np.random.default_rng(0)
    for _ in range(40):
        assert np.isfinite(alg.train_step(train, rng))
    after = evaluate(alg, tasks).mean
    assert after > 0.7 and after > before + 0.2, (before, after)  # measured 0.45 → 0.83; chance 1/3


# -- search ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grouped_csv(tmp_path_factory):
    """6 sites × 3 classes × 6 rows; a class shifts two numeric columns the same way at every site."""
    rng = np.random.default_rng(0)
    rows = [
        {"site": f"s{g}", "a": c + 0.3 * rng.normal() + 0.2 * g, "b": -c + 0.3 * rng.normal(), "y": f"c{c}"}
        for g in range(6) for c in range(3) for _ in range(6)
    ]
    path = tmp_path_factory.mktemp("grouped") / "sites.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("name", ["metalstm", "metatransfer"])
def test_selectable_in_a_short_search(grouped_csv, tmp_path, name):
    result = search(
        grouped_csv, "y", group="site", protocol="grouped", ways=3, shots=2, queries=2, trials=2, steps=4,
        eval_every=2, db=f"sqlite:///{tmp_path}/s.db", include={"meta_algorithm": [name]}, isolate=False,
        output=tmp_path / "out", progress=False, echo=lambda s: None,
    )
    trials = result.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["meta_algorithm"] for t in trials} == {name}
    assert any(k.startswith(f"meta.{name}.") for k in trials[1].params)
    assert result.leaderboard and 0.0 <= result.best.test.mean <= 1.0


# -- learners sized to their inputs -----------------------------------------------------------
def _text_problem() -> tuple[Backbone, TrainingPool]:
    """hashbag over 512 buckets (4,096 table weights, a 8×8 layer) on 6 classes of 6 rows."""
    from autometa_builtins.encoders import HashBag

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(6)
    spec = InputSpec("text", (5,), vocab_size=512)
    features = Features({"text": torch.randint(1, 512, (len(labels), 5), generator=gen)}, {"text": spec})
    rows = np.arange(len(labels))
    pool = TrainingPool(features, labels, rows, [{c: rows[labels.numpy() == c] for c in range(6)}], torch.device("cpu"))
    torch.manual_seed(0)
    encoder = HashBag(spec, dim=8, out_dim=8)
    return Backbone({"text": encoder}, Concat({"text": 8})), pool


@pytest.mark.parametrize("name", ["metalstm", "metasgd"])
def test_per_weight_learner_leaves_a_large_table_out_of_its_inner_loop(name, caplog):
    """Over the limit, the largest tensor (the embedding table) stays fixed within a task — one
    warning line says so — while the rest still adapts and the meta-gradient still trains it."""
    base = next(cls for cls in META_ALGORITHMS if cls.name == name)
    assert base.max_adapted == 250_000  # hashbag's 1,052,736 default weights are over it, conv4's 111,936 not
    small = type(base.__name__, (base,), {"max_adapted": 1_000})
    backbone, pool = _text_problem()
    algorithm = small(meta_batch=2, inner_steps=2)
    with caplog.at_level("WARNING", logger="autometa.meta"):
        algorithm.setup(backbone, pool, (3, 1, 2))
    table = "encoders.text.embedding.weight"
    assert algorithm.fixed_in_task == {table}
    [record] = [r for r in caplog.records if r.name == "autometa.meta"]
    assert record.getMessage() == (
        f"{name} adapts 72 of the backbone's 4,168 weights per task (its inner loop costs time and memory per "
        f"weight; limit 1,000): {table} stay fixed within a task and are meta-learned only"
    )
    if name == "metasgd":
        assert "encoders:text:embedding:weight" not in algorithm.inner_lrs
        assert sum(p.numel() for p in algorithm.inner_lrs.parameters()) == 72 + 8 + 1

    task = pool.episodes(1, 3, 1, 2, np.random.default_rng(0))
    start = algorithm._initial(3)
    support = {k: v[0] for k, v in task.support_inputs().items()}
    body, _ = algorithm.adapt(start, support, task.support_y[0])
    assert body[table] is start[0][table]  # not even a copy: untouched
    assert not torch.equal(body["encoders.text.proj.weight"], start[0]["encoders.text.proj.weight"])

    before = backbone.encoders["text"].embedding.weight.detach().clone()
    algorithm.train_step(pool, np.random.default_rng(1))
    assert not torch.equal(backbone.encoders["text"].embedding.weight, before)  # meta-learned still


def test_under_the_limit_everything_adapts(caplog):
    backbone, pool = _text_problem()
    with caplog.at_level("WARNING", logger="autometa.meta"):
        MetaLSTM(meta_batch=1, inner_steps=1).setup(backbone, pool, (3, 1, 2))
        MAML().setup(backbone, pool, (3, 1, 2))
    assert not [r for r in caplog.records if r.name == "autometa.meta"]
