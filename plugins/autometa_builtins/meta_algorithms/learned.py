"""A learned inner-loop update rule and meta-transfer, on the gradient family's functional core.

- ``metalstm`` (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning"): the
  inner loop's update is a small recurrent network applied to every parameter coordinate,
  meta-learned together with the initialisation.
- ``metatransfer``: MAML meta-training on the source tasks; to predict a target task, the
  meta-trained initialisation is first moved under Σᵢ L(Tᵢ; θ) + λ·L(T_target; θ).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn
from torch.func import grad_and_value
from torch.utils._pytree import tree_flatten, tree_unflatten

from autometa.components import MASK_PREFIX, Backbone
from autometa.types import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import make_optimizer, placement
from autometa_builtins.meta_algorithms.gradient import _SHARED_SPACE, MAML, GradientMetaLearner, Params, _detach

# Andrychowicz et al. 2016's input scaling (the paper's p): gradients and losses span many
# orders of magnitude, which an LSTM cannot read raw.
PREPROCESS_P = 10.0


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2]``: (log|x| / p, sign x) where |x| ≥ e^-p, else (-1, e^p · x)."""
    floor = math.exp(-PREPROCESS_P)
    large = x.abs() >= floor
    # Clamped before the log, so the branch `where` discards yields no inf (nor NaN gradients).
    magnitude = torch.where(large, torch.log(x.abs().clamp_min(floor)) / PREPROCESS_P, -torch.ones_like(x))
    direction = torch.where(large, torch.sign(x), x / floor)
    return torch.stack([magnitude, direction], dim=-1)


def _flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree_flatten(tree)[0]])


class LearnedUpdate(nn.Module):
    """Ravi & Larochelle's meta-learner: θₜ = fₜ ⊙ θₜ₋₁ − iₜ ⊙ ∇ₜ for every coordinate of θ.

    A coordinate's preprocessed gradient and the task's preprocessed loss feed an LSTM cell of
    ``hidden_size`` units whose weights all coordinates share; each gate reads the cell's output
    hₜ, the coordinate's current value and the gate's own previous value:
    fₜ = σ(w_f · [hₜ, θₜ₋₁, fₜ₋₁] + b_f), iₜ = σ(w_i · [hₜ, θₜ₋₁, iₜ₋₁] + b_i). As in the paper the
    rule starts close to SGD: small gate weights, b_f = ``FORGET_BIAS`` (f ≈ 1, almost no decay)
    and b_i = logit(``inner_lr``) (i ≈ ``inner_lr``). The previous gates start at 0.
    """

    FORGET_BIAS = 5.0
    GATE_INIT = 0.01  # half-width of the uniform initialisation of the gates' weights

    def __init__(self, hidden_size: int, inner_lr: float):
        super().__init__()
        self.hidden_size = hidden_size
        # The LSTM cell over [preprocessed gradient, preprocessed loss, hₜ₋₁]: its input, forget
        # and output gates in one matrix, the candidate in another, so that the sigmoid and tanh
        # over millions of coordinates run on contiguous outputs (about twice as fast on CPU).
        self.cell_gates = nn.Linear(4 + hidden_size, 3 * hidden_size)
        self.cell_candidate = nn.Linear(4 + hidden_size, hidden_size)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        with torch.no_grad():
            input_bias = math.log(inner_lr / (1 - inner_lr))
            for gate, bias in ((self.forget_gate, self.FORGET_BIAS), (self.input_gate, input_bias)):
                gate.weight.uniform_(-self.GATE_INIT, self.GATE_INIT)
                gate.bias.fill_(bias)

    def initial_state(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(h, c, f, i) for the coordinates ``theta`` (1-D): all zero."""
        hidden = theta.new_zeros(theta.shape + (self.hidden_size,))
        gate = torch.zeros_like(theta)
        return hidden, hidden, gate, gate

    def forward(self, theta: torch.Tensor, gradient: torch.Tensor, loss: torch.Tensor, state: tuple) -> tuple:
        """The updated coordinates and the new state, from 1-D ``theta`` and ``gradient`` and the
        0-dim ``loss``."""
        h, c, f, i = state
        x = torch.cat([preprocess(gradient), preprocess(loss).expand(gradient.shape + (2,)), h], -1)
        i_cell, f_cell, o_cell = torch.sigmoid(self.cell_gates(x)).chunk(3, -1)
        c = f_cell * c + i_cell * torch.tanh(self.cell_candidate(x))
        h = o_cell * torch.tanh(c)
        f, i = self._gate(self.forget_gate, h, theta, f), self._gate(self.input_gate, h, theta, i)
        return f * theta - i * gradient, (h, c, f, i)

    def _gate(self, linear: nn.Linear, h: torch.Tensor, theta: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """σ(w · [h, θ, previous] + b), without building the concatenation."""
        w = linear.weight[0]
        return torch.sigmoid(h @ w[:-2] + theta * w[-2] + previous * w[-1] + linear.bias[0])


class MetaLSTM(GradientMetaLearner):
    """Meta-LSTM (Ravi & Larochelle 2017): the inner loop's update rule is learned.

    Every coordinate of the fast weights (backbone and the per-task head, started at the class means) is
    updated by one :class:`LearnedUpdate` (``modules()['update_rule']``), whose weights are
    meta-learned through the unrolled inner loop together with the backbone's initialisation
    θ₀. ``first_order`` (the paper's choice, and the default) treats the gradient and loss the
    rule reads as inputs, not differentiated through; the meta-gradient still reaches θ₀ through
    fₜ ⊙ θₜ₋₁ and the gates. ``inner_lr`` is the input gate's starting value, below 1 as the
    gate is a sigmoid; ``hidden_size`` the rule's LSTM width. Beyond ``max_adapted`` backbone
    weights the largest tensors stay fixed within a task (a one-line warning says which).
    """

    name = "metalstm"
    # About 4-10 µs and 1-1.4 KB per adapted weight, task and inner step on one CPU core
    # (benchmarks/meta_sizes.py; a hashed embedding table's million: 10 s and 1 GB per meta-update
    # at 1 task × 1 step). 250,000 covers conv4 (111,936) and lsa (65,792), not such a table.
    max_adapted = 250_000
    search_space = {
        **_SHARED_SPACE,
        "inner_lr": FloatDistribution(1e-3, 0.5, log=True),
        "hidden_size": IntDistribution(4, 32, log=True),
        "first_order": CategoricalDistribution([True, False]),
    }

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        lr: float = 1e-3,
        meta_batch: int = 4,
        hidden_size: int = 20,
        first_order: bool = True,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        if not 0 < inner_lr < 1:
            raise ValueError(
                f"metalstm: inner_lr is the input gate's starting value, a sigmoid: it must lie in (0, 1), got {inner_lr}"
            )
        if hidden_size < 1:
            raise ValueError(f"metalstm: hidden_size must be at least 1, got {hidden_size}")
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, train_ways=train_ways,
            train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )
        self.hidden_size = hidden_size
        self.first_order = first_order

    def _build(self) -> None:
        self.update_rule = LearnedUpdate(self.hidden_size, self.inner_lr).to(**placement(self.backbone, self.device))

    def _meta_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.update_rule.parameters()]

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "update_rule": self.update_rule}

    def adapt(self, params: Params, x, y, *, steps: int | None = None) -> Params:
        fixed, params = self._split(self._start(params, x, y))
        # The rule sees all adapted coordinates as one vector; the model reads them back as its tensors.
        leaves, spec = tree_flatten(params)
        sizes = [t.numel() for t in leaves]

        def unflatten(theta: torch.Tensor) -> Params:
            return tree_unflatten([t.reshape(leaf.shape) for t, leaf in zip(theta.split(sizes), leaves)], spec)

        def loss(adapted: Params, x, y) -> torch.Tensor:
            return self._loss(self._join(fixed, adapted), x, y)

        theta = _flat(params)
        state = self.update_rule.initial_state(theta)
        for _ in range(self.inner_steps if steps is None else steps):
            current = unflatten(theta)
            grads, value = grad_and_value(loss)(_detach(current) if self.first_order else current, x, y)
            theta, state = self.update_rule(theta, _flat(grads), value, state)
        return self._join(fixed, unflatten(theta))


class SourceSample(nn.Module):
    """Source episodes kept from meta-training, as buffers so that a saved model keeps them.

    ``support_y`` and ``query_y`` are ``[tasks, rows]``; every model input has a
    ``support/<key>`` and a ``query/<key>`` buffer. Loading a state dict takes the saved
    sample's names and sizes: a model rebuilt for prediction has no training pool to draw from.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def keep(self, episodes: Task, keys: set[str]) -> None:
        for part, inputs in (("support", episodes.support_inputs()), ("query", episodes.query_inputs())):
            for key in sorted(keys & set(inputs)):
                self.register_buffer(f"{part}/{key}", inputs[key])
        self.register_buffer("support_y", episodes.support_y)
        self.register_buffer("query_y", episodes.query_y)

    def __len__(self) -> int:
        return self.support_y.shape[0] if hasattr(self, "support_y") else 0

    @property
    def n_way(self) -> int:
        return int(self.support_y.max()) + 1  # every class of an episode has support rows

    def task_args(self) -> tuple:
        """(support inputs, support labels, query inputs, query labels), batched over tasks."""
        buffers = dict(self.named_buffers())

        def part(name: str) -> dict[str, torch.Tensor]:
            return {k.split("/", 1)[1]: v for k, v in buffers.items() if k.startswith(name + "/")}

        return part("support"), self.support_y, part("query"), self.query_y

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name, _ in list(self.named_buffers()):
            delattr(self, name)
        for name, value in state_dict.items():
            self.register_buffer(name, torch.empty_like(value, device=self.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class MetaTransfer(MAML):
    """Meta-transfer: meta-train on source tasks, then adapt to a target task under the
    λ-weighted objective  mean over sources Σᵢ L(Tᵢ; θ)/n + λ·L(T_target; θ).

    - Meta-training is MAML's, on episodes from the training pool (the sources: the training
      classes under ``fewshot``, the training groups under ``grouped``); with the same seeds
      it makes exactly MAML's updates. L(Tᵢ; θ) is MAML's loss: the query loss after the inner
      loop adapts on the support set.
    - ``setup`` keeps ``source_tasks`` training episodes (drawn with a fixed seed) in
      ``modules()['sources']``, so a saved model has them too.
    - ``predict(task)``: the task is the target (a held-out group, or a few-shot episode); only
      its support set is labelled, so L(T_target; θ) is the support loss after the inner loop
      adapts on the support. From the meta-trained θ, ``transfer_steps`` Adam steps
      (``transfer_lr``, a fresh optimiser) on the objective above give θ*; the inner loop then
      adapts θ* on the support and predicts the queries. The trained state is not touched.
    - ``target_weight`` is λ: 0 continues plain meta-training on the kept sources; a large λ
      fine-tunes θ on the target's own examples. Searched over 0 and a log-spaced grid.
    """

    name = "metatransfer"
    search_space = {
        **MAML.search_space,
        "target_weight": CategoricalDistribution([0.0, 0.01, 0.1, 1.0, 10.0, 100.0]),
        "transfer_steps": IntDistribution(1, 10),
        "transfer_lr": FloatDistribution(1e-5, 1e-2, log=True),
        "source_tasks": IntDistribution(1, 8),
    }
    SAMPLE_SEED = 0  # which source episodes are kept; fixed, so that predictions are reproducible

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        lr: float = 1e-3,
        meta_batch: int = 4,
        first_order: bool = False,
        target_weight: float = 1.0,
        transfer_steps: int = 3,
        transfer_lr: float = 1e-3,
        source_tasks: int = 2,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        if not target_weight >= 0:
            raise ValueError(f"metatransfer: target_weight (λ) must be zero or positive, got {target_weight}")
        if transfer_steps < 0 or source_tasks < 0:
            raise ValueError(
                "metatransfer: transfer_steps and source_tasks must be zero or positive, "
                f"got {transfer_steps} and {source_tasks}"
            )
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, first_order=first_order,
            train_ways=train_ways, train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )
        self.target_weight = target_weight
        self.transfer_steps = transfer_steps
        self.transfer_lr = transfer_lr
        self.source_tasks = source_tasks

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        super().setup(backbone, pool, shape)
        self.sources = SourceSample(self.device)
        # A saved model is set up from PoolInfo, without rows: it loads its sample instead.
        if self.source_tasks and hasattr(pool, "episodes"):
            keys = set(backbone.input_keys.values()) | {MASK_PREFIX + m for m in backbone.input_keys}
            rng = np.random.default_rng(self.SAMPLE_SEED)
            self.sources.keep(pool.episodes(self.source_tasks, *self.shape, rng), keys)

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "sources": self.sources}

    def source_loss(self, body: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σᵢ L(Tᵢ; θ)/n over the kept sources, θ = ``body`` (zero without any)."""
        if not len(self.sources):
            return torch.zeros((), **placement(self.backbone, self.device))
        head = self._initial(self.sources.n_way)[1]
        return self._map_tasks(self._task_loss, (body, head), *self.sources.task_args()).mean()

    def target_loss(self, body: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        """L(T_target; θ): the support loss after the inner loop adapts θ = ``body`` on the support."""
        x, y = task.support_inputs(), task.support_y
        return self._loss(self.adapt((body, self._initial(task.n_way)[1]), x, y), x, y)

    def transfer_loss(self, body: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        """Σᵢ L(Tᵢ; θ)/n + λ·L(T_target; θ)."""
        loss = self.source_loss(body)
        return loss + self.target_weight * self.target_loss(body, task) if self.target_weight else loss

    def _source_gradient(self) -> dict[str, torch.Tensor]:
        """The source term's gradient at the trained θ, by parameter name.

        It is the same for every target, so it is computed once per trained state (compared
        tensor by tensor, which costs next to nothing): the first transfer step, the only one
        with ``transfer_steps=1``, then costs only the target's term.
        """
        state = [p.detach() for p in self.backbone.parameters()] + list(self.sources.buffers())
        cached = getattr(self, "_source_cache", None)
        if cached is None or len(cached[0]) != len(state) or not all(map(torch.equal, cached[0], state)):
            trainable = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
            body = {n: p.detach().clone().requires_grad_() for n, p in trainable}
            with torch.enable_grad():
                grads = torch.autograd.grad(self.source_loss(body), list(body.values()), allow_unused=True)
            gradient = {n: torch.zeros_like(b) if g is None else g for (n, b), g in zip(body.items(), grads)}
            self._source_cache = ([t.clone() for t in state], gradient)
        return self._source_cache[1]

    def transfer(self, task: Task) -> dict[str, torch.Tensor]:
        """θ*: the backbone's parameters after ``transfer_steps`` Adam steps on ``transfer_loss``."""
        body = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in self.backbone.named_parameters()}
        optimizer = make_optimizer(body.values(), lr=self.transfer_lr)
        if optimizer is None or not (len(self.sources) or self.target_weight):
            return _detach(body)
        with torch.enable_grad():
            for step in range(self.transfer_steps):
                # Dropout (train mode) would make the source term random: no cache then.
                if step == 0 and len(self.sources) and not self.backbone.training:
                    # A linear term whose gradient is the cached source gradient at θ.
                    source = sum((g * body[n]).sum() for n, g in self._source_gradient().items())
                    loss = source + self.target_weight * self.target_loss(body, task) if self.target_weight else source
                else:
                    loss = self.transfer_loss(body, task)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return _detach(body)

    def _predict_initial(self, task: Task) -> Params:
        return self.transfer(task), _detach(self._initial(task.n_way)[1])
