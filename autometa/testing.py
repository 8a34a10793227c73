"""Conformance checks every encoder, fusion and meta-algorithm must pass.

Plugin authors run them from their own test suite; autometa's built-ins pass them too::

    import pytest
    from autometa.testing import check_component, conformance_params

    def test_my_encoder_conforms():
        check_component(MyEncoder)  # on CPU, and on CUDA when it is available

    # One case per component and device (ids like ``encoder:my_encoder``); without
    # arguments, every component the installed plugins register.
    @pytest.mark.parametrize("cls, device", conformance_params([MyEncoder, MyFusion]))
    def test_conformance(cls, device):
        check_component(cls, device=device)

A failed check raises AssertionError that names the component and the property, e.g.
``encoder 'my_encoder' (MyEncoder) fails 'shape': ...``. The properties:

- ``registration``: ``autometa.plugins.validate_component`` accepts the class.
- ``search space``: defaults lie inside the declared distributions (the search starts from
  them); ``suggest(trial, prefix)`` names its parameters with the prefix, returns values inside
  the distributions (at the corners of the space and at random points) that construct a
  working component.
- ``shape``: encoders map ``[batch, ...]`` inputs of two specs to ``[batch, out_dim]``, batch 1
  included; fusions do so for 1, 2 and 3 modalities, with and without masks; a
  meta-algorithm's ``predict`` returns finite ``[n_query, n_way]`` logits.
- ``masking`` (fusions): a masked-out embedding does not influence the output, a row that
  lacks every modality stays finite, and all-True masks act like ``masks=None``.
- ``determinism``: the same ``torch.manual_seed`` (and numpy ``rng``) gives identical outputs.
- ``gradients``: the output's gradient reaches every trainable parameter and every float input,
  is finite, and is non-zero for at least one input.
- ``state dict``: a differently initialised instance that loads the state dict (for
  meta-algorithms: every ``modules()`` entry) gives identical outputs.
- ``functional_call``: ``torch.func.functional_call`` with the module's own parameters equals
  ``forward``, and parameters passed to it are the ones used (MAML adapts them this way).
- ``vmap``: in train mode under ``torch.func.vmap`` over a leading task dimension with
  per-task parameters, outputs and second-order (MAML-style) gradients equal a loop over tasks
  (each vmapped alone, so dropout draws the same masks), and ``randomness="different"`` works.
  Results are compared in full float32 (TF32 is off during the checks). A component that
  cannot support this sets the class attribute ``supports_vmap = False``; the check is then
  skipped (functional_call still applies) and the built-in gradient-based meta-algorithms
  loop over tasks for it.
- ``fitted input`` (encoders that override ``fit_input``): the state is a dict of named
  tensors that survives a safetensors round trip; it does not change when only rows outside
  the training rows do (nothing leaks from them); ``prepare(raw, state)`` gives one finite row
  per row, and a row's input does not depend on the other rows (new rows get the features
  training rows got).
- meta-algorithms also: ``setup``, ``modules`` (covers every backbone parameter, as it is what
  gets saved), ``train_step`` (returns a finite float), ``predict`` (leaves the trained state
  unchanged; works for a new n_way, and for a ``same_classes_as_training`` task when
  'standard' is in ``protocols``), and all of them with a backbone without parameters.

Everything runs on tiny inputs: a component checks in a second or two on one CPU core.
Encoders that ``prepare`` their own input are fed float ``[batch, d]`` tensors, the usual
prepared form (pretrained embeddings).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import unittest
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.func import functional_call, grad, vmap

from autometa.components import Backbone, Encoder, Fusion, MetaAlgorithm
from autometa.inputs import MODALITIES, InputSpec
from autometa.plugins import Registry, get_registry, validate_component
from autometa.types import Features, Task, TrainingPool

__all__ = [
    "ConformanceError",
    "check_component",
    "check_encoder",
    "check_fusion",
    "check_meta_algorithm",
    "conformance_params",
]

BATCH = 4
TASKS, VMAP_BATCH = 2, 2  # leading task dimension and rows per task of the vmap checks
RANDOM_SEARCH_SEEDS = (0, 1, 2)
FUSION_DIMS = (5, 3, 7)  # embedding sizes of the 1st, 2nd and 3rd modality: all different
# A second spec per modality, unlike InputSpec.example, to catch hard-coded sizes.
OTHER_SPECS = {
    "tabular": InputSpec("tabular", (11,)),
    "vector": InputSpec("vector", (3,)),
    "text": InputSpec("text", (5,), vocab_size=50),
    "image": InputSpec("image", (3, 20, 20)),
}
# Meta-algorithm problem: 4 classes of 8 training rows (+2 held out for a standard task).
CLASSES, POOL_ROWS, HELD_OUT_ROWS = 4, 8, 2
EPISODE = (3, 2, 2)  # (ways, shots, queries) asked of setup
TRAIN_STEPS = 2
HINTS = {
    "vmap": " (a component that cannot support torch.func.vmap declares `supports_vmap = False`)",
}


class ConformanceError(AssertionError):
    """A component lacks a property every component of its kind must have."""


# -- public API ----------------------------------------------------------------------------------
def check_component(cls: type, *, device: str | torch.device | None = None) -> None:
    """Run the checks for ``cls``'s kind (encoder, fusion or meta-algorithm)."""
    {"encoder": check_encoder, "fusion": check_fusion, "meta_algorithm": check_meta_algorithm}[_kind_of(cls)](
        cls, device=device
    )


def check_encoder(cls: type, *, device: str | torch.device | None = None) -> None:
    """Check an Encoder subclass; ``device=None`` means CPU, then CUDA when available."""

    def probe(kwargs: dict) -> None:
        spec = _encoder_specs(cls)[0]
        encoder = cls(spec, **kwargs)
        _expect_rows(encoder(_encoder_input(cls, spec, 2, 0, torch.device("cpu"))), 2, encoder.out_dim, "its output")

    with _sandbox():
        _registration("encoder", cls)
        if cls.fits_input():
            _fitted_input(cls)
        for dev in _devices(device):
            _encoder_on(cls, dev)
        _search_space("encoder", cls, probe)


def check_fusion(cls: type, *, device: str | torch.device | None = None) -> None:
    """Check a Fusion subclass; ``device=None`` means CPU, then CUDA when available."""

    def probe(kwargs: dict) -> None:
        fusion = cls(_fusion_dims(2), **kwargs)
        cpu = torch.device("cpu")
        _expect_rows(fusion(_embeddings(_fusion_dims(2), 2, 0, cpu)), 2, fusion.out_dim, "its output")

    with _sandbox():
        _registration("fusion", cls)
        for dev in _devices(device):
            _fusion_on(cls, dev)
        _search_space("fusion", cls, probe)


def check_meta_algorithm(cls: type, *, device: str | torch.device | None = None) -> None:
    """Check a MetaAlgorithm subclass; ``device=None`` means CPU, then CUDA when available."""
    with _sandbox():
        _registration("meta_algorithm", cls)
        for dev in _devices(device):
            _meta_algorithm_on(cls, dev)
        _search_space("meta_algorithm", cls, lambda kwargs: cls(**kwargs))


def conformance_params(
    classes: Iterable[type] | None = None,
    *,
    xfail: Mapping[str, str] | None = None,
    registry: Registry | None = None,
) -> list:
    """``pytest.param(cls, device)`` for each class (default: every registered component) on
    CPU and CUDA (skipped when unavailable), with ids ``kind:name`` (``kind:name:cuda``).
    ``xfail`` maps such a ``kind:name`` to the reason it is known to fail (strict xfail)."""
    import pytest  # only needed by callers that parametrise tests

    if classes is None:
        classes = [info.cls for info in (registry or get_registry()).all()]
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    xfail = xfail or {}
    params = []
    for cls in classes:
        ident = f"{_kind_of(cls)}:{cls.name}"
        marks = [pytest.mark.xfail(reason=xfail[ident], raises=AssertionError, strict=True)] if ident in xfail else []
        params.append(pytest.param(cls, "cpu", id=ident, marks=marks))
        params.append(pytest.param(cls, "cuda", id=f"{ident}:cuda", marks=[no_cuda, *marks]))
    return params


def toy_pool(features: Features, labels: Any, rows: Iterable[int] | None = None, *,
             device: str | torch.device = "cpu") -> TrainingPool:
    """A training pool over ``rows`` of ``features`` (default: every row), one source: for a
    plugin's own tests of ``setup`` and ``train_step``. ``labels`` are every row's class."""
    labels = torch.as_tensor(labels)
    rows = np.arange(len(labels)) if rows is None else np.asarray(list(rows))
    y = labels.cpu().numpy()
    by_class = {int(c): rows[y[rows] == c] for c in np.unique(y[rows])}
    return TrainingPool(features, labels.to(device), rows, [by_class], torch.device(device))


def toy_task(features: Features, labels: Any, support: Iterable[int], query: Iterable[int]) -> Task:
    """One task of ``features``: ``support`` and ``query`` rows, their classes (``labels`` of every
    row) numbered 0..n_way-1 in sorted order: for a plugin's own tests of ``predict``."""
    labels = torch.as_tensor(labels)
    support, query = torch.as_tensor(list(support)), torch.as_tensor(list(query))
    classes = torch.unique(labels[support])
    local = torch.searchsorted(classes, labels)  # every row's index among the support's classes
    return Task(features, support, local[support], query, local[query], len(classes))


# -- plumbing ------------------------------------------------------------------------------------
def _kind_of(cls: Any) -> str:
    for kind, base in (("encoder", Encoder), ("fusion", Fusion), ("meta_algorithm", MetaAlgorithm)):
        if inspect.isclass(cls) and issubclass(cls, base):
            return kind
    raise ConformanceError(f"{cls!r} is not a subclass of autometa's Encoder, Fusion or MetaAlgorithm")


class _Checker:
    """``with check("property"):`` turns any failure inside into one ConformanceError naming
    the component and the property."""

    def __init__(self, kind: str, cls: type, device: torch.device | None = None):
        where = f" on {device}" if device is not None and device.type != "cpu" else ""
        name = getattr(cls, "name", "") or "?"
        self.label = f"{kind.replace('_', '-')} {name!r} ({cls.__qualname__}){where}"

    @contextlib.contextmanager
    def __call__(self, prop: str) -> Iterator[None]:
        try:
            yield
        except ConformanceError:
            raise
        except Exception as exc:
            detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            raise ConformanceError(f"{self.label} fails {prop!r}: {detail}{HINTS.get(prop, '')}") from exc


def _devices(device: str | torch.device | None) -> list[torch.device]:
    if device is None:
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise unittest.SkipTest("CUDA is not available")  # pytest reports this as a skip too
    return [device]


@contextlib.contextmanager
def _sandbox() -> Iterator[None]:
    """The checks seed torch freely and compare batched with looped results in full float32: the
    caller's random state and TF32 settings are left as they were. (cuDNN convolutions default
    to TF32 on Ampere and later GPUs, which rounds a batched and a looped call differently,
    by far more than the checks' tolerance.)"""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _expect_rows(out: Any, batch: int, out_dim: Any, what: str) -> None:
    assert isinstance(out_dim, int) and out_dim > 0, f"out_dim must be a positive int, got {out_dim!r}"
    assert isinstance(out, torch.Tensor), f"{what} is a {type(out).__name__}, not a tensor"
    assert tuple(out.shape) == (batch, out_dim), f"{what} has shape {list(out.shape)}; expected [{batch}, {out_dim}]"
    assert out.is_floating_point(), f"{what} has dtype {out.dtype}; expected a floating dtype"
    assert torch.isfinite(out).all(), f"{what} has non-finite values"


def _same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Bitwise on CPU; CUDA kernels may reorder float sums between otherwise identical calls.
    if actual.device.type == "cpu":
        assert actual.shape == expected.shape, f"{what}: shapes {list(actual.shape)} vs {list(expected.shape)}"
        difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
        assert torch.equal(actual, expected), f"{what} (max |difference| {difference:.3g})"
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _close_overall(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Second-order float32 gradients summed in another order differ by rounding in single
    # elements; a real batching error (e.g. BatchNorm under vmap) is off by far more.
    error, scale = (actual - expected).norm().item(), expected.norm().item()
    assert error <= 1e-3 * scale + 1e-6, f"{what}: relative error {error / max(scale, 1e-12):.3g}"


def _seeded(seed: int, make: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return make().to(device)


# -- registration and search space ---------------------------------------------------------------
def _registration(kind: str, cls: type) -> None:
    with _Checker(kind, cls)("registration"):
        validate_component(kind, cls)


def _search_space(kind: str, cls: type, probe: Callable[[dict], Any]) -> None:
    """Run after the other checks, so that a fault at the defaults is reported as what it is."""
    with _Checker(kind, cls)("search space"), _quiet_optuna():
        defaults = inspect.signature(cls.__init__).parameters
        for key, dist in cls.search_space.items():
            default = defaults[key].default
            assert _within(dist, default), (
                f"the default {key}={default!r} lies outside {dist!r}; the search starts from the defaults"
            )
        for kwargs in _sampled_kwargs(cls):
            try:
                probe(kwargs)
            except Exception as exc:
                raise AssertionError(f"sampled parameters {kwargs} do not give a working component: "
                                     f"{type(exc).__name__}: {exc}") from exc


def _sampled_kwargs(cls: type, prefix: str = "component.") -> Iterator[dict]:
    """kwargs from ``cls.suggest`` at the low and high corners of the space, then at random."""
    space: Mapping[str, BaseDistribution] = cls.search_space
    corners = [{prefix + k: _corner(d, high) for k, d in space.items()} for high in (False, True)] if space else []
    for seed, fixed in enumerate([*corners, *([None] * len(RANDOM_SEARCH_SEEDS))]):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        if fixed:
            study.enqueue_trial(fixed)  # parameters a conditional suggest does not ask are ignored
        trial = study.ask()
        kwargs = cls.suggest(trial, prefix)
        assert isinstance(kwargs, dict), f"suggest returned {type(kwargs).__name__}; expected a dict of kwargs"
        stray = [name for name in trial.params if not name.startswith(prefix)]
        assert not stray, f"suggest(trial, {prefix!r}) asked for {stray} without the prefix (names would clash)"
        for key, value in kwargs.items():
            if key in space:
                assert _within(space[key], value), f"suggest gave {key}={value!r}, outside {space[key]!r}"
        yield kwargs


def _corner(dist: BaseDistribution, high: bool) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[-1 if high else 0]
    return dist.high if high else dist.low


def _within(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not dist.low <= value <= dist.high:
            return False
        if isinstance(dist, IntDistribution):
            return float(value).is_integer() and (int(value) - dist.low) % dist.step == 0
        return True
    return True  # another distribution type: optuna itself validates it


# -- inputs --------------------------------------------------------------------------------------
def _encoder_specs(cls: type) -> tuple[InputSpec, InputSpec]:
    if cls.derives_input():
        # What prepare returns is unknown here; the usual case (pretrained embeddings) is float [N, d].
        return InputSpec(cls.modality, (8,)), InputSpec(cls.modality, (3,))
    return InputSpec.example(cls.modality), OTHER_SPECS[cls.modality]


def _encoder_input(cls: type, spec: InputSpec, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if spec.modality == "text" and not cls.derives_input():
        length = spec.shape[-1]
        ids = torch.randint(1, spec.vocab_size, (batch, *spec.shape), generator=gen)
        # Padded rows of every length, an all-padding row (no text) among them.
        lengths = torch.randint(0, length + 1, (batch,), generator=gen)
        lengths[0] = length
        if batch > 2:
            lengths[-1] = 0
        return (ids * (torch.arange(length) < lengths[:, None])).to(device)
    return torch.randn(batch, *spec.shape, generator=gen).to(device)


def _raw_example(modality: str, rows: int, seed: int) -> Any:
    """Raw data as ``Encoder.prepare`` receives it; each seed draws from its own vocabulary."""
    rng = np.random.default_rng(seed)
    if modality == "text":
        words = [f"{w}{seed}" for w in ("red", "blue", "stone", "river", "walks", "slowly", "under", "the", "old", "bridge")]
        return [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(rows)]
    if modality == "image":
        return rng.integers(0, 256, size=(rows, 8, 8, 1), dtype=np.uint8)
    if modality == "tabular":
        return pd.DataFrame({f"x{j}": rng.normal(size=rows) for j in range(3)})
    return rng.normal(size=(rows, 4)).astype(np.float32)


def _raw_rows(raw: Any, rows: np.ndarray) -> Any:
    if isinstance(raw, list):
        return [raw[i] for i in rows]
    if isinstance(raw, pd.DataFrame):
        return raw.iloc[rows].reset_index(drop=True)
    return raw[rows]


def _fitted_input(cls: type) -> None:
    check = _Checker("encoder", cls)
    with check("fitted input"):
        n = 24
        raw, other = _raw_example(cls.modality, n, 0), _raw_example(cls.modality, n, 1)
        train = np.arange(0, n, 2)
        state = cls.fit_input(raw, train)
        assert isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ), f"fit_input returned {type(state).__name__}; expected a non-empty dict of named tensors"
        # Rows outside the training rows replaced by rows of another vocabulary: same state.
        swap = np.ones(n, dtype=bool)
        swap[train] = False
        if isinstance(raw, list):
            mixed = [o if s else r for r, o, s in zip(raw, other, swap)]
        elif isinstance(raw, pd.DataFrame):
            mixed = raw.where(~swap[:, None], other)
        else:
            mixed = np.where(swap.reshape(-1, *[1] * (raw.ndim - 1)), other, raw)
        again = cls.fit_input(mixed, train)
        assert sorted(again) == sorted(state) and all(torch.equal(again[k], state[k]) for k in state), (
            "fit_input's state changed when only rows outside the training rows changed: it must fit on raw[rows] only"
        )
        loaded = safetensors_load(safetensors_save({k: v.contiguous() for k, v in state.items()}))
        out = cls.prepare(raw, state)
        assert isinstance(out, torch.Tensor) and out.shape[0] == n, f"prepare returned {getattr(out, 'shape', out)!r} for {n} rows"
        assert torch.isfinite(out.float()).all(), "prepare returned non-finite values"
        _same(cls.prepare(raw, loaded), out, "prepare with the state after a safetensors round trip")
        subset = np.array([5, 2, 17])
        _same(cls.prepare(_raw_rows(raw, subset), state), out[subset], "rows prepared on their own vs among all rows")


def _fusion_dims(k: int) -> dict[str, int]:
    return dict(zip(MODALITIES[:k], FUSION_DIMS[:k]))


def _embeddings(dims: Mapping[str, int], batch: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=gen).to(device) for m, d in dims.items()}


def _presence(modalities: list[str], batch: int, shift: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Masks cycling through: all present, first missing, only last present, none present."""
    k = len(modalities)
    pattern = [lambda j: True, lambda j: j != 0, lambda j: j == k - 1, lambda j: False]
    return {
        m: torch.tensor([pattern[(r + shift) % 4](j) for r in range(batch)], device=device)
        for j, m in enumerate(modalities)
    }


def _float_leaves(args: tuple) -> Iterator[tuple[str, torch.Tensor]]:
    for i, arg in enumerate(args):
        items = arg.items() if isinstance(arg, dict) else [(None, arg)]
        for key, value in items:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield (f"input {i}" if key is None else f"input {i}[{key!r}]"), value


def _stack(items: list) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {k: _stack([item[k] for item in items]) for k in first}
    return tuple(_stack(list(group)) for group in zip(*items))


# -- encoders and fusions ------------------------------------------------------------------------
Case = Callable[[int, int], tuple]  # (seed, batch) -> forward args


def _encoder_on(cls: type, device: torch.device) -> None:
    check = _Checker("encoder", cls, device)
    specs = _encoder_specs(cls)
    spec = specs[0]
    with check("shape"):
        for s in specs:
            encoder = _seeded(0, lambda s=s: cls(s), device)
            for batch in (BATCH, 1):
                for training in (True, False):
                    out = encoder.train(training)(_encoder_input(cls, s, batch, 1, device))
                    mode = "train" if training else "eval"
                    _expect_rows(out, batch, encoder.out_dim,
                                 f"the output for {s.modality} input {list(s.shape)}, batch {batch}, {mode} mode")
    _module_checks(
        check,
        cls,
        lambda seed: _seeded(seed, lambda: cls(spec), device),
        [lambda seed, batch: (_encoder_input(cls, spec, batch, seed, device),)],
    )


def _fusion_on(cls: type, device: torch.device) -> None:
    check = _Checker("fusion", cls, device)
    with check("shape"):
        for k in (1, 2, 3):
            dims = _fusion_dims(k)
            fusion = _seeded(0, lambda: cls(dims), device).eval()
            for batch in (BATCH, 1):
                emb = _embeddings(dims, batch, 1, device)
                _expect_rows(fusion(emb), batch, fusion.out_dim, f"the output for {dims} with batch {batch}")
    with check("masking"):
        for k in (1, 2, 3):
            dims = _fusion_dims(k)
            fusion = _seeded(0, lambda: cls(dims), device).eval()
            emb = _embeddings(dims, BATCH, 1, device)
            present = {m: torch.ones(BATCH, dtype=torch.bool, device=device) for m in dims}
            _close(fusion(emb, present), fusion(emb), f"all-True masks vs masks=None for {dims}")
            # With 2+ modalities also a mask for only some of them (the others fully present).
            for masked in [list(dims)] + ([list(dims)[1:]] if k > 1 else []):
                masks = _presence(masked, BATCH, 0, device)
                out = fusion(emb, masks)
                _expect_rows(out, BATCH, fusion.out_dim, f"the output for {dims} with masks for {masked}")
                noise = _embeddings(dims, BATCH, 2, device)
                swapped = {
                    m: torch.where(masks[m][:, None], e, 10 * noise[m]) if m in masks else e for m, e in emb.items()
                }
                _close(fusion(swapped, masks), out, f"output after changing masked-out embeddings of {masked}")
    dims = _fusion_dims(3)
    _module_checks(
        check,
        cls,
        lambda seed: _seeded(seed, lambda: cls(dims), device),
        [
            lambda seed, batch: (_embeddings(dims, batch, seed, device),),
            lambda seed, batch: (_embeddings(dims, batch, seed, device), _presence(list(dims), batch, seed, device)),
        ],
    )


def _module_checks(check: _Checker, cls: type, build: Callable[[int], nn.Module], cases: list[Case]) -> None:
    """The properties encoders and fusions share; ``build(seed)`` makes a module on the device."""
    with check("determinism"):
        for case in cases:
            first, second = (build(0).train()(*case(1, BATCH)) for _ in range(2))
            _same(second, first, "two runs (construct, forward in train mode) under torch.manual_seed(0) differ")
    with check("gradients"):
        _gradients(build(0).train(), cases)
    with check("state dict"):
        source, target = build(0).eval(), build(1).eval()
        target.load_state_dict(source.state_dict())
        for case in cases:
            args = case(1, BATCH)
            _same(target(*args), source(*args), "an instance that loaded the state dict gives other outputs")
    with check("functional_call"):
        _functional(build(0).eval(), cases)
    if getattr(cls, "supports_vmap", True):
        with check("vmap"):
            _vmapped(build(0), cases)


def _weights(out: torch.Tensor) -> torch.Tensor:
    # Losses are a random projection of the output: a plain sum can have an exactly zero
    # gradient (e.g. after a normalisation), which would hide a real one.
    gen = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=gen).to(out)


def _gradients(module: nn.Module, cases: list[Case]) -> None:
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    nonzero: set[str] = set()
    seen: set[str] = set()
    for case in cases:
        for seed in (1, 2):
            args = case(seed, BATCH)
            inputs = dict(_float_leaves(args))
            for t in inputs.values():
                t.requires_grad_(True)
            module.zero_grad(set_to_none=True)
            out = module(*args)
            (out * _weights(out)).sum().backward()
            for name, tensor in [*params.items(), *inputs.items()]:
                what = f"parameter {name!r}" if name in params else name
                assert tensor.grad is not None, (
                    f"{what} receives no gradient (unused in forward, or cut off by .detach(), .data or no_grad)"
                )
                assert torch.isfinite(tensor.grad).all(), f"{what} receives a non-finite gradient"
                seen.add(name)
                if tensor.grad.any():
                    nonzero.add(name)
    zero = sorted(seen - nonzero)
    assert not zero, f"{', '.join(zero)} receive(s) an all-zero gradient for every input tried"


def _functional(module: nn.Module, cases: list[Case]) -> None:
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    for case in cases:
        args = case(1, BATCH)
        _same(functional_call(module, state, args), module(*args),
              "functional_call with the module's own parameters differs from forward")
        if not trainable:
            continue
        copies = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in state.items()}
        out = functional_call(module, copies, args)
        (out * _weights(out)).sum().backward()
        unused = [k for k in trainable if copies[k].grad is None]
        assert not unused, (
            f"parameters {unused} passed to functional_call are not used (forward reads them from elsewhere, "
            "e.g. a list or tensor captured in __init__), so gradient-based meta-learners cannot adapt them"
        )


def _vmapped(module: nn.Module, cases: list[Case]) -> None:
    """Train mode, as meta-training runs it. The reference is a loop that vmaps one task at a
    time: with randomness="same" and one seed, every call draws the same dropout masks whatever
    the number of tasks, so the results are comparable. (A plain unbatched call is not a
    reference on CUDA: its fused dropout kernel draws other masks than vmap's batching rule.)"""
    module.train()
    trainable = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    fixed = {k: p.detach() for k, p in module.named_parameters() if not p.requires_grad}
    fixed.update(module.named_buffers())
    # Distinct parameters per task, as after MAML's inner-loop steps.
    per_task = [{k: p * (1 + 0.1 * t) for k, p in trainable.items()} for t in range(TASKS)]
    params = _stack(per_task) if trainable else {}

    def forward(p: dict, args: tuple) -> torch.Tensor:
        return functional_call(module, {**fixed, **p}, args)

    def seeded(function: Callable, *args: Any) -> Any:
        torch.manual_seed(0)
        return function(*args)

    for case in cases:
        per_args = [case(10 + t, VMAP_BATCH) for t in range(TASKS)]
        args = _stack(per_args)
        alone = [(_stack([p]), _stack([a])) for p, a in zip(per_task, per_args)]  # batches of one task
        looped = torch.cat([seeded(vmap(forward, randomness="same"), p, a) for p, a in alone])
        weights = _weights(looped[0])  # drawn here: vmap refuses random calls inside

        def loss(p: dict, args: tuple) -> torch.Tensor:
            return (forward(p, args) * weights).sum()

        def adapted_loss(p: dict, args: tuple) -> torch.Tensor:
            g = grad(loss)(p, args)
            return loss({k: p[k] - 0.1 * g[k] for k in p}, args)

        out = seeded(vmap(forward, randomness="same"), params, args)
        assert tuple(out.shape) == tuple(looped.shape), (
            f"vmapped output has shape {list(out.shape)}; expected [{TASKS}, {VMAP_BATCH}, {module.out_dim}]"
        )
        _close(out, looped, "vmapped outputs vs a loop over tasks")
        out = vmap(forward, randomness="different")(params, args)
        assert torch.isfinite(out).all(), "vmapped output with randomness='different' has non-finite values"
        if trainable:
            # One task of the loop suffices: a batching error shows in every task.
            meta = seeded(vmap(grad(adapted_loss), randomness="same"), params, args)
            expected = seeded(vmap(grad(adapted_loss), randomness="same"), *alone[-1])
            for k in trainable:
                what = f"vmapped second-order gradient of {k!r} vs a loop over tasks"
                _close_overall(meta[k][-1], expected[k][0], what)


# -- meta-algorithms -----------------------------------------------------------------------------
def _pool(modality: str, device: torch.device) -> TrainingPool:
    """CLASSES classes, the first POOL_ROWS rows of each for training, the rest held out."""
    spec = InputSpec.example(modality)
    per_class = POOL_ROWS + HELD_OUT_ROWS
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(labels), *spec.shape, generator=gen) + labels[:, None].float()
    rows = np.flatnonzero(np.arange(len(labels)) % per_class < POOL_ROWS)
    by_class = {c: rows[labels.numpy()[rows] == c] for c in range(CLASSES)}
    features = Features({modality: x}, {modality: spec}).to(device)
    return TrainingPool(features, labels.to(device), rows, [by_class], device)


def _tasks(pool: TrainingPool, protocols: tuple[str, ...]) -> list[tuple[str, Task]]:
    per_class = POOL_ROWS + HELD_OUT_ROWS
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), device=pool.device)  # noqa: E731

    def episode(classes: tuple[int, ...], shots: int, queries: tuple[int, ...]) -> Task:
        support = [c * per_class + i for c in classes for i in range(shots)]
        query = [c * per_class + shots + i for c, q in zip(classes, queries) for i in range(q)]
        support_y = np.repeat(np.arange(len(classes)), shots)
        query_y = np.repeat(np.arange(len(classes)), queries)
        return Task(pool.features, as_tensor(support), as_tensor(support_y), as_tensor(query), as_tensor(query_y),
                    len(classes))

    tasks = [
        ("a 3-way 2-shot task", episode((0, 1, 2), 2, (3, 3, 3))),
        ("a 2-way 3-shot task with 2 and 4 queries", episode((3, 1), 3, (2, 4))),
    ]
    if "standard" in protocols:
        held_out = np.flatnonzero(np.arange(CLASSES * per_class) % per_class >= POOL_ROWS)
        labels = pool.labels
        tasks.append(("a standard task (same_classes_as_training=True)", Task(
            pool.features, as_tensor(pool.rows), labels[as_tensor(pool.rows)], as_tensor(held_out),
            labels[as_tensor(held_out)], CLASSES, same_classes_as_training=True,
        )))
    return tasks


def _backbone(pool: TrainingPool, parameterless: bool, seed: int) -> Backbone:
    """The built-in mlp (or identity) encoder ▶ concat, initialised from ``seed``."""
    # Looked up before seeding: loading the registry constructs components, drawing random numbers.
    registry = get_registry()
    encoder_cls = registry.get("encoder", "identity" if parameterless else "mlp").cls
    fusion_cls = registry.get("fusion", "concat").cls
    (modality, spec), = pool.features.specs.items()
    torch.manual_seed(seed)
    encoder = encoder_cls(spec) if parameterless else encoder_cls(spec, hidden=16, out_dim=8)
    return Backbone({modality: encoder}, fusion_cls({modality: encoder.out_dim})).to(pool.device)


def _state(algorithm: MetaAlgorithm) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in algorithm.modules().items() for k, v in m.state_dict().items()}


def _predict(algorithm: MetaAlgorithm, task: Task) -> Any:
    """As autometa.data.scoring.evaluate calls it: modules in eval mode."""
    modules = algorithm.modules().values()
    for m in modules:
        m.eval()
    try:
        return algorithm.predict(task)
    finally:
        for m in modules:
            m.train()


def _run(cls: type, pool: TrainingPool, tasks: list, seed: int, check: Callable, parameterless: bool = False):
    """Build, set up, train and predict; returns the algorithm, its losses and its logits."""
    backbone = _backbone(pool, parameterless, seed)
    algorithm = cls()
    with check("setup"):
        algorithm.setup(backbone, pool, EPISODE)
    with check("modules"):
        modules = algorithm.modules()
        assert isinstance(modules, dict) and all(isinstance(m, nn.Module) for m in modules.values()), (
            f"modules() returned {modules!r}; expected a dict of name -> torch.nn.Module"
        )
        saved = {id(p) for m in modules.values() for p in m.parameters()}
        missing = [n for n, p in backbone.named_parameters() if id(p) not in saved]
        assert not missing, f"modules() leaves out backbone parameters {missing[:3]}; they would not be saved"
    rng = np.random.default_rng(seed)
    losses = []
    with check("train_step"):
        for i in range(TRAIN_STEPS):
            loss = algorithm.train_step(pool, rng)
            assert isinstance(loss, numbers.Real), (
                f"train_step returned a {type(loss).__name__}; return a float (e.g. loss.item())"
            )
            assert np.isfinite(loss), f"train_step {i + 1} returned loss {loss}"
            losses.append(float(loss))
    logits = []
    for label, task in tasks:
        before = _state(algorithm)
        with check("predict"):
            out = _predict(algorithm, task)
        with check("shape"):
            expected = (task.query.shape[0], task.n_way)
            assert isinstance(out, torch.Tensor), f"predict on {label} returned a {type(out).__name__}, not a tensor"
            assert tuple(out.shape) == expected, (
                f"predict on {label} returned shape {list(out.shape)}; expected [n_query, n_way] = {list(expected)}"
            )
            assert out.is_floating_point() and torch.isfinite(out).all(), f"predict on {label} gave non-finite logits"
        with check("predict"):
            after = _state(algorithm)
            changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
            assert not changed, f"predict on {label} changed the trained state {changed[:3]}"
        logits.append(out.detach())
    return algorithm, losses, logits


def _meta_algorithm_on(cls: type, device: torch.device) -> None:
    check = _Checker("meta_algorithm", cls, device)
    pool = _pool("tabular", device)
    tasks = _tasks(pool, tuple(cls.protocols))
    algorithm, losses, logits = _run(cls, pool, tasks, 0, check)
    with check("determinism"):
        _, again, again_logits = _run(cls, pool, tasks, 0, check)
        assert again == losses, f"train_step losses {losses} vs {again} under the same seeds"
        for (label, _), a, b in zip(tasks, logits, again_logits):
            _same(b, a, f"predictions on {label} under the same seeds differ")
    with check("state dict"):
        fresh = cls()
        fresh.setup(_backbone(pool, False, seed=1), pool, EPISODE)
        source, target = algorithm.modules(), fresh.modules()
        assert source.keys() == target.keys(), f"modules() names differ: {sorted(source)} vs {sorted(target)}"
        for name, module in source.items():
            target[name].load_state_dict(module.state_dict())
        for (label, task), expected in zip(tasks, logits):
            what = f"after loading modules() state dicts, predictions on {label}"
            _same(_predict(fresh, task).detach(), expected, what)
    # The search may pick identity ▶ concat, which has nothing to train.
    vector_pool = _pool("vector", device)
    _run(cls, vector_pool, _tasks(vector_pool, tuple(cls.protocols)), 0,
         lambda prop: check(f"{prop} (backbone without parameters)"), parameterless=True)
