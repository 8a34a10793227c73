"""autometa.testing: every registered component conforms, and broken ones are caught.

The registered components are read from the registry when tests are collected, so components
added to any installed plugin are covered without editing this file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

from autometa import testing
from autometa.components import Encoder, Fusion, InputSpec, MetaAlgorithm
from autometa.plugins import get_registry
from autometa.types import Features
from autometa_builtins.lsa import LatentSemantic

# "kind:name" -> why it fails; strict, so a fix makes the xfail fail and gets it removed here.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("cls, device", testing.conformance_params(xfail=KNOWN_FAILURES))
def test_registered_component_conforms(cls, device):
    testing.check_component(cls, device=device)


def test_every_installed_plugin_loaded():
    # A plugin that fails to load is skipped with a warning, and so would escape the checks above.
    assert get_registry().problems == []


def test_conformance_params_cover_the_registry():
    ids = {p.id for p in testing.conformance_params()}
    for info in get_registry().all():
        assert {f"{info.kind}:{info.name}", f"{info.kind}:{info.name}:cuda"} <= ids


# -- small components that conform ---------------------------------------------------------------
class TinyEncoder(Encoder):
    name = "tiny_encoder"
    modality = "tabular"
    search_space = {"out_dim": IntDistribution(2, 8), "dropout": FloatDistribution(0.0, 0.5)}

    def __init__(self, spec: InputSpec, *, out_dim: int = 4, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(spec.shape[0], out_dim)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = out_dim

    def forward(self, x):
        return self.dropout(torch.tanh(self.linear(x)))


class TinyFusion(Fusion):
    """Masked mean of per-modality projections."""

    name = "tiny_fusion"
    search_space = {"dim": IntDistribution(2, 8)}

    def __init__(self, in_dims, *, dim: int = 4):
        super().__init__()
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        self.out_dim = dim

    def weights(self, embeddings, masks):
        ones = lambda e: torch.ones(e.shape[:-1], dtype=e.dtype, device=e.device)  # noqa: E731
        return {m: masks[m].to(e.dtype) if masks and m in masks else ones(e) for m, e in embeddings.items()}

    def forward(self, embeddings, masks=None):
        w = self.weights(embeddings, masks)
        total = sum(self.project[m](e) * w[m].unsqueeze(-1) for m, e in embeddings.items())
        return total / sum(w.values()).clamp_min(1.0).unsqueeze(-1)


class TinyProto(MetaAlgorithm):
    """Nearest class mean, with a backbone trained on episodes."""

    name = "tiny_proto"
    search_space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}

    def __init__(self, *, lr: float = 1e-3):
        self.lr = lr

    def setup(self, backbone, pool, shape):
        self.backbone = backbone
        self.shape = pool.episode_shape(*shape)
        params = list(backbone.parameters())
        self.optimizer = torch.optim.SGD(params, lr=self.lr) if params else None

    @staticmethod
    def logits(support, support_y, query, n_way):
        prototypes = torch.stack([support[support_y == c].mean(0) for c in range(n_way)])
        return -torch.cdist(query, prototypes)

    def train_step(self, pool, rng):
        task = pool.episodes(1, *self.shape, rng)
        first = lambda inputs: {m: t[0] for m, t in inputs.items()}  # noqa: E731
        support, query = self.backbone(first(task.support_inputs())), self.backbone(first(task.query_inputs()))
        loss = F.cross_entropy(self.logits(support, task.support_y[0], query, task.n_way), task.query_y[0])
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, task):
        support, query = self.backbone(task.support_inputs()), self.backbone(task.query_inputs())
        return self.logits(support, task.support_y, query, task.n_way)


@pytest.mark.parametrize("cls", [TinyEncoder, TinyFusion, TinyProto], ids=lambda c: c.name)
def test_small_correct_components_conform(cls):
    testing.check_component(cls)


# -- broken components: each must fail with the property named -----------------------------------
class WrongShape(TinyEncoder):
    name = "wrong_shape"

    def forward(self, x):
        return super().forward(x)[:, :-1]


class FitsOnEveryRow(LatentSemantic):
    """Fits its derived input on all rows it is given, not only the training rows."""

    name = "fits_on_every_row"

    @classmethod
    def fit_input(cls, raw, rows):
        return super().fit_input(raw, np.arange(len(raw)))


class DependsOnOtherRows(LatentSemantic):
    """Scales each prepared row by the batch's mean norm: a row's input depends on the others."""

    name = "depends_on_other_rows"

    @classmethod
    def prepare(cls, raw, state=None):
        z = super().prepare(raw, state)
        return z * (1 + z.abs().mean())


class IgnoresMasks(TinyFusion):
    name = "ignores_masks"

    def forward(self, embeddings, masks=None):
        return super().forward(embeddings, None)


class Nondeterministic(TinyEncoder):
    """Draws from numpy's global generator, which the host never seeds."""

    name = "nondeterministic"

    def forward(self, x):
        return super().forward(x) + torch.from_numpy(np.random.standard_normal(self.out_dim)).to(x)


class UnusedParameter(TinyEncoder):
    name = "unused_parameter"

    def __init__(self, spec, *, out_dim: int = 4, dropout: float = 0.1):
        super().__init__(spec, out_dim=out_dim, dropout=dropout)
        self.extra = nn.Linear(spec.shape[0], self.out_dim)


class WrongLogits(TinyProto):
    name = "wrong_logits"

    def predict(self, task):
        return super().predict(task)[:, :1]


class BadName(TinyEncoder):
    name = "Bad Name"


class OutOfRangeSuggest(TinyEncoder):
    name = "out_of_range_suggest"

    @classmethod
    def suggest(cls, trial, prefix):
        return {"out_dim": trial.suggest_int(prefix + "out_dim", 2, 8) * 10}


class UnsavedState(TinyEncoder):
    """A random projection kept as a plain attribute: not in the state dict."""

    name = "unsaved_state"

    def __init__(self, spec, *, out_dim: int = 4, dropout: float = 0.1):
        super().__init__(spec, out_dim=out_dim, dropout=dropout)
        self.projection = torch.randn(self.out_dim, self.out_dim)

    def forward(self, x):
        return super().forward(x) @ self.projection.to(x)


class CapturedParameters(TinyEncoder):
    """Reads its weights through a list made in __init__, which functional_call cannot swap."""

    name = "captured_parameters"

    def __init__(self, spec, *, out_dim: int = 4, dropout: float = 0.1):
        super().__init__(spec, out_dim=out_dim, dropout=dropout)
        self.captured = [self.linear.weight, self.linear.bias]

    def forward(self, x):
        return torch.tanh(F.linear(x, *self.captured))


class DataDependentBranch(TinyEncoder):
    """Python control flow on tensor values, which vmap cannot batch."""

    name = "data_dependent_branch"

    def forward(self, x):
        if (x.abs() > 100).any():
            x = x.clamp(-100, 100)
        return super().forward(x)


class TensorLoss(TinyProto):
    name = "tensor_loss"

    def train_step(self, pool, rng):
        return torch.tensor(super().train_step(pool, rng))


class GlobalNumpyRandom(TinyProto):
    """Samples episodes from numpy's global generator instead of the rng it is given."""

    name = "global_numpy_random"

    def train_step(self, pool, rng):
        return super().train_step(pool, np.random.default_rng(np.random.randint(2**31)))


class PredictTrains(TinyProto):
    """Adapts the shared backbone in place, so each validation task sees the previous ones."""

    name = "predict_trains"

    def predict(self, task):
        with torch.no_grad():
            for p in self.backbone.parameters():
                p.mul_(0.9)
        return super().predict(task)


BROKEN = {
    WrongShape: "shape",
    IgnoresMasks: "masking",
    Nondeterministic: "determinism",
    UnusedParameter: "gradients",
    WrongLogits: "shape",
    BadName: "registration",
    OutOfRangeSuggest: "search space",
    UnsavedState: "state dict",
    CapturedParameters: "functional_call",
    DataDependentBranch: "vmap",
    TensorLoss: "train_step",
    GlobalNumpyRandom: "determinism",
    PredictTrains: "predict",
    FitsOnEveryRow: "fitted input",
    DependsOnOtherRows: "fitted input",
}


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.__name__)
def test_broken_component_fails_naming_the_property(cls):
    with pytest.raises(AssertionError) as info:
        testing.check_component(cls, device="cpu")
    message = str(info.value)
    assert f"fails {BROKEN[cls]!r}" in message, message
    assert repr(cls.name) in message and cls.__qualname__ in message, message


def test_unused_parameter_is_named():
    with pytest.raises(AssertionError, match=r"parameter 'extra\.weight' receives no gradient"):
        testing.check_encoder(UnusedParameter, device="cpu")


def test_wrong_predict_shape_names_the_task_and_expected_shape():
    expected = r"predict on a 3-way 2-shot task returned shape \[9, 1\]; expected .* \[9, 3\]"
    with pytest.raises(AssertionError, match=expected):
        testing.check_meta_algorithm(WrongLogits, device="cpu")


def test_supports_vmap_false_skips_only_the_vmap_check():
    class OptedOut(DataDependentBranch):
        name = "opted_out"
        supports_vmap = False

    testing.check_encoder(OptedOut, device="cpu")


def test_checks_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    testing.check_encoder(TinyEncoder, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_checks_compare_in_full_float32_and_restore_the_callers_tf32_settings():
    # On a GPU, cuDNN's default TF32 convolutions made every conv encoder fail the vmap check by
    # rounding alone (seen on an H200); the flags are plain attributes on a CPU build as well.
    seen = []

    class RecordsPrecision(TinyEncoder):
        name = "records_precision"

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().forward(x)

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        testing.check_encoder(RecordsPrecision, device="cpu")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen and set(seen) == {(False, False)}


def test_check_component_rejects_other_classes():
    with pytest.raises(AssertionError, match="not a subclass"):
        testing.check_component(nn.Linear)


def test_toy_pool_and_task_constructors():
    x = torch.arange(12.0).reshape(6, 2)
    labels = torch.tensor([3, 3, 7, 7, 3, 7])
    features = Features({"vector": x}, {"vector": InputSpec("vector", (2,))})
    pool = testing.toy_pool(features, labels, rows=range(4))
    assert pool.rows.tolist() == [0, 1, 2, 3] and pool.n_classes == 2
    assert {c: r.tolist() for c, r in pool.sources[0].items()} == {3: [0, 1], 7: [2, 3]}
    task = testing.toy_task(features, labels, support=[0, 2, 1, 3], query=[5, 4])
    assert task.support_y.tolist() == [0, 1, 0, 1] and task.query_y.tolist() == [1, 0] and task.n_way == 2
    assert torch.equal(task.query_inputs()["vector"], x[[5, 4]])
