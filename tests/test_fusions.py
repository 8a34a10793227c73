"""The built-in fusions: shapes, gradients, modality order, missing-modality masks, values
against their papers' formulas computed by hand, and torch.func (vmap, grad of grad)."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from autometa_builtins.fusions import (
    FUSIONS,
    Attention,
    Concat,
    FiLM,
    Gated,
    Late,
    LowRank,
    Mean,
    Sum,
    TensorFusion,
    Transformer,
    masked_softmax,
)
from torch import nn
from torch.func import functional_call, grad, vmap

from autometa.plugins import validate_component

DIMS = {"a": 5, "b": 3, "c": 4}
B = 5
# Row 0: a, c; row 1: a, b; row 2: a only; row 3: nothing; row 4: everything.
MASKS = {
    "a": torch.tensor([True, True, True, False, True]),
    "b": torch.tensor([False, True, False, False, True]),
    "c": torch.tensor([True, False, False, False, True]),
}
by_name = pytest.mark.parametrize("cls", FUSIONS, ids=[cls.name for cls in FUSIONS])


def dims_for(n: int) -> dict[str, int]:
    return dict(list(DIMS.items())[:n])


def build(cls, in_dims=DIMS, seed=0, **params):
    torch.manual_seed(seed)
    return cls(dict(in_dims), **params).double().eval()


def embeddings_for(in_dims, *lead, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(*lead, d, generator=g, dtype=torch.float64) for m, d in in_dims.items()}


# --------------------------------------------------------------------------- every fusion


def test_names_are_unique_and_registrable():
    assert len({cls.name for cls in FUSIONS}) == len(FUSIONS)
    for cls in FUSIONS:
        validate_component("fusion", cls)


@by_name
def test_no_batchnorm_and_sampled_params_build(cls):
    # BatchNorm's batched double backward is wrong under vmap (see encoders.py).
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        params = cls.suggest(study.ask(), f"fusion.{cls.name}.")
        assert set(params) == set(cls.search_space)
        fusion = build(cls, **params)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fusion.modules())
        assert fusion(embeddings_for(DIMS, B)).shape == (B, fusion.out_dim)


@by_name
@pytest.mark.parametrize("n", [1, 2, 3])
def test_shapes_and_finite(cls, n):
    in_dims = dims_for(n)
    fusion = build(cls, in_dims)
    out = fusion(embeddings_for(in_dims, B))
    assert out.shape == (B, fusion.out_dim)
    assert torch.isfinite(out).all()
    masks = {m: MASKS[m] for m in in_dims}
    assert torch.isfinite(fusion(embeddings_for(in_dims, B), masks)).all()
    # An extra leading (task) dim, with masks carrying it too.
    out = fusion(embeddings_for(in_dims, 3, B), {m: mask.expand(3, B) for m, mask in masks.items()})
    assert out.shape == (3, B, fusion.out_dim)
    assert torch.isfinite(out).all()


@by_name
@pytest.mark.parametrize("n", [1, 2, 3])
def test_gradients_reach_parameters_and_embeddings(cls, n):
    in_dims = dims_for(n)
    fusion = build(cls, in_dims)
    embeddings = {m: e.requires_grad_() for m, e in embeddings_for(in_dims, B).items()}
    out = fusion(embeddings)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # With one modality, weights over modalities (softmax over a single entry) are
        # constant, so their gradient is legitimately zero.
        if n > 1:
            assert p.grad.abs().sum() > 0, name
    for m, e in embeddings.items():
        assert e.grad.abs().sum() > 0, m


# --------------------------------------------------------------------------- modality order


@by_name
def test_output_ignores_dict_order(cls):
    fusion = build(cls)
    embeddings = embeddings_for(DIMS, B)
    reversed_embeddings = dict(reversed(list(embeddings.items())))
    reversed_masks = dict(reversed(list(MASKS.items())))
    assert torch.equal(fusion(embeddings), fusion(reversed_embeddings))
    assert torch.equal(fusion(embeddings, MASKS), fusion(reversed_embeddings, reversed_masks))


def test_concat_is_the_concatenation_in_construction_order():
    fusion = build(Concat, {"c": 4, "a": 5, "b": 3})
    embeddings = embeddings_for(DIMS, B)
    assert fusion.out_dim == 12
    assert torch.equal(fusion(embeddings), torch.cat([embeddings["c"], embeddings["a"], embeddings["b"]], dim=-1))


# --------------------------------------------------------------------------- missing modalities


@by_name
@pytest.mark.parametrize("modality", list(DIMS))
def test_missing_modality_has_no_influence(cls, modality):
    fusion = build(cls)
    embeddings = embeddings_for(DIMS, B)
    base = fusion(embeddings, MASKS)
    changed = dict(embeddings, **{modality: embeddings[modality] + 3.0})
    out = fusion(changed, MASKS)
    missing = ~MASKS[modality]
    torch.testing.assert_close(out[missing], base[missing], rtol=0, atol=1e-6)
    assert (out[~missing] - base[~missing]).abs().amax(dim=-1).min() > 1e-4
    # Not even NaN or inf in a missing row leaks through (encoders may produce them for
    # inputs that are absent).
    poisoned = embeddings[modality].clone()
    poisoned[missing] = float("nan")
    poisoned[missing.nonzero()[0]] = float("inf")
    out = fusion(dict(embeddings, **{modality: poisoned}), MASKS)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    if out.requires_grad:  # concat has no parameters
        out.sum().backward()
        for name, p in fusion.named_parameters():
            assert torch.isfinite(p.grad).all(), name


@by_name
def test_missing_rows_get_no_gradient_and_empty_rows_are_finite(cls):
    fusion = build(cls)
    embeddings = {m: e.requires_grad_() for m, e in embeddings_for(DIMS, B).items()}
    out = fusion(embeddings, MASKS)
    assert torch.isfinite(out[3]).all()  # the row with no modality at all
    out.sum().backward()
    for m, e in embeddings.items():
        assert torch.all(e.grad[~MASKS[m]] == 0), m
    for name, p in fusion.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cls", [Concat, Sum, Mean, Attention, Gated, Late, Transformer], ids=lambda c: c.name)
def test_a_row_with_nothing_fuses_to_zeros(cls):
    out = build(cls)(embeddings_for(DIMS, B), MASKS)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_transformer_ignores_missing_tokens():
    # The missing tokens' own state (here their modality embeddings) must not reach the
    # output: they are neither attended to nor pooled.
    fusion = build(Transformer)
    embeddings = embeddings_for(DIMS, B)
    base = fusion(embeddings, MASKS)
    with torch.no_grad():
        # Not a constant: LayerNorm would remove that.
        fusion.modality_embedding[1:].add_(torch.randn_like(fusion.modality_embedding[1:]))  # "b" and "c"
    out = fusion(embeddings, MASKS)
    only_a = torch.tensor([False, False, True, True, False])
    torch.testing.assert_close(out[only_a], base[only_a], rtol=0, atol=1e-6)
    assert not torch.allclose(out[~only_a], base[~only_a])


@by_name
def test_no_masks_equals_all_present(cls):
    fusion = build(cls)
    embeddings = embeddings_for(DIMS, B)
    expected = fusion(embeddings)
    everything = {m: torch.ones(B, dtype=torch.bool) for m in DIMS}
    torch.testing.assert_close(fusion(embeddings, everything), expected, rtol=0, atol=1e-6)
    # A modality absent from masks counts as present everywhere.
    torch.testing.assert_close(fusion(embeddings, {"b": everything["b"]}), expected, rtol=0, atol=1e-6)


def test_masked_softmax():
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, -1.0, 0.0]])
    keep = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    out = masked_softmax(scores, keep, dim=-1)
    torch.testing.assert_close(out[0], torch.softmax(scores[0], dim=-1))
    torch.testing.assert_close(out[1], torch.tensor([1 / (1 + math.e**2), 0.0, math.e**2 / (1 + math.e**2)]))
    assert torch.equal(out[2], torch.zeros(3))


# --------------------------------------------------------------------------- values by hand


def _identity_projections(fusion, dim):
    with torch.no_grad():
        for linear in fusion.project.values():
            linear.weight.copy_(torch.eye(dim, dtype=linear.weight.dtype))
            linear.bias.zero_()


def test_attention_matches_the_seed_formula():
    fusion = build(Attention, {"a": 2, "b": 2}, dim=2)
    _identity_projections(fusion, 2)
    with torch.no_grad():
        fusion.score.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        fusion.score.bias.copy_(torch.tensor([0.1, -0.2]))
    h = {"a": [1.0, 2.0], "b": [-1.0, 0.5]}
    s = {m: [v[0] - v[1] + 0.1, 0.5 * v[0] + 2.0 * v[1] - 0.2] for m, v in h.items()}
    expected = []
    for k in range(2):
        total = math.exp(s["a"][k]) + math.exp(s["b"][k])
        expected.append(sum(math.exp(s[m][k]) / total * h[m][k] for m in h))
    out = fusion({m: torch.tensor([v], dtype=torch.float64) for m, v in h.items()})
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))
    # With "b" missing, all the weight goes to "a": z = h_a.
    out = fusion({m: torch.tensor([v], dtype=torch.float64) for m, v in h.items()}, {"b": torch.tensor([False])})
    torch.testing.assert_close(out, torch.tensor([h["a"]], dtype=torch.float64))


def test_tensor_fusion_is_the_outer_product_through_a_linear():
    fusion = build(TensorFusion, {"a": 3, "b": 3}, dim=3, out_dim=6)
    _identity_projections(fusion, 3)
    assert fusion.flat_dim == 16
    embeddings = embeddings_for({"a": 3, "b": 3}, B)
    one = torch.ones(B, 1, dtype=torch.float64)
    va = torch.cat([embeddings["a"], one], dim=-1)
    vb = torch.cat([embeddings["b"], one], dim=-1)
    flat = torch.stack([torch.outer(va[i], vb[i]).flatten() for i in range(B)])
    expected = flat @ fusion.out.weight.T + fusion.out.bias
    torch.testing.assert_close(fusion(embeddings), expected)
    # A missing modality is the vector (0, 0, 0, 1): only the other's terms remain.
    neutral = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    flat = torch.stack([torch.outer(va[i], neutral).flatten() for i in range(B)])
    out = fusion(embeddings, {"b": torch.zeros(B, dtype=torch.bool)})
    torch.testing.assert_close(out, flat @ fusion.out.weight.T + fusion.out.bias)


def test_tensor_fusion_size_is_bounded():
    four = {"a": 5, "b": 3, "c": 4, "d": 2}
    fusion = TensorFusion(four, dim=16)
    assert fusion.factor_dim == 7 and fusion.flat_dim == 8**4
    assert TensorFusion(DIMS, dim=16).flat_dim == 16**3
    assert TensorFusion(DIMS, dim=4).flat_dim == 5**3
    out = fusion({m: e.float() for m, e in embeddings_for(four, B).items()})
    assert out.shape == (B, fusion.out_dim) and torch.isfinite(out).all()


def test_lowrank_matches_its_formula():
    in_dims = {"a": 3, "b": 2}
    fusion = build(LowRank, in_dims, rank=3, out_dim=4)
    with torch.no_grad():
        fusion.bias.normal_()
    embeddings = embeddings_for(in_dims, B)
    masks = {"b": torch.tensor([True, False, True, True, False])}
    out = fusion(embeddings, masks)
    for i in range(B):
        total = fusion.bias.clone()
        for j in range(3):
            term = torch.ones(4, dtype=torch.float64)
            for m in in_dims:
                x = embeddings[m][i] if m not in masks or masks[m][i] else torch.zeros(in_dims[m], dtype=torch.float64)
                term = term * (torch.cat([x, torch.ones(1, dtype=torch.float64)]) @ fusion.factors[m][j])
            total = total + fusion.rank_weight[0, j] * term
        torch.testing.assert_close(out[i], total)


def test_mean_is_the_masked_mean():
    fusion = build(Mean)
    embeddings = embeddings_for(DIMS, B)
    out = fusion(embeddings, MASKS)
    for i in range(B):
        present = [fusion.project[m](embeddings[m][i]) for m in DIMS if MASKS[m][i]]
        expected = torch.stack(present).mean(dim=0) if present else torch.zeros(fusion.out_dim, dtype=torch.float64)
        torch.testing.assert_close(out[i], expected)


def test_gated_with_two_modalities_is_the_gmu():
    in_dims = {"a": 5, "b": 3}
    fusion = build(Gated, in_dims, dim=4)
    embeddings = embeddings_for(in_dims, B)
    logits = fusion.gate(torch.cat([embeddings["a"], embeddings["b"]], dim=-1)).unflatten(-1, (2, 4))
    z = torch.sigmoid(logits[..., 0, :] - logits[..., 1, :])
    ha, hb = (torch.tanh(fusion.hidden[m](embeddings[m])) for m in in_dims)
    torch.testing.assert_close(fusion(embeddings), z * ha + (1 - z) * hb)


def test_film_modulates_by_the_first_modality():
    in_dims = {"a": 5, "b": 3, "c": 4}
    fusion = build(FiLM, in_dims, dim=6)
    embeddings = embeddings_for(in_dims, B)
    h = fusion.project(torch.cat([embeddings["b"], embeddings["c"]], dim=-1))
    delta_gamma, beta = fusion.film(embeddings["a"]).chunk(2, dim=-1)
    torch.testing.assert_close(fusion(embeddings), (1 + delta_gamma) * h + beta)
    # Without the conditioner: γ = 1, β = 0.
    torch.testing.assert_close(fusion(embeddings, {"a": torch.zeros(B, dtype=torch.bool)}), h)
    single = build(FiLM, {"a": 5}, dim=6)
    torch.testing.assert_close(single({"a": embeddings["a"]}), single.project(embeddings["a"]))


def test_transformer_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        Transformer(DIMS, dim=30, heads=4)
    for dim in Transformer.search_space["dim"].choices:
        for heads in Transformer.search_space["heads"].choices:
            Transformer(DIMS, dim=dim, heads=heads)


# --------------------------------------------------------------------------- torch.func


@by_name
def test_vmap_matches_a_loop_over_tasks(cls):
    fusion = build(cls)
    embeddings = embeddings_for(DIMS, 3, B)
    masks = {m: torch.stack([mask, mask.roll(1), mask.roll(2)]) for m, mask in MASKS.items()}
    params = dict(fusion.named_parameters())
    out = vmap(lambda e, k: functional_call(fusion, params, (e, k)))(embeddings, masks)
    for t in range(3):
        expected = fusion({m: e[t] for m, e in embeddings.items()}, {m: k[t] for m, k in masks.items()})
        torch.testing.assert_close(out[t], expected)


@by_name
def test_second_order_gradients_under_vmap(cls):
    """The MAML pattern: grad of a vmapped query loss after an inner gradient step."""
    torch.manual_seed(0)
    fusion = cls(dict(DIMS)).train()  # float32 and dropout on, as in meta-training
    embeddings = {m: e.float() for m, e in embeddings_for(DIMS, 3, B).items()}
    masks = {m: torch.stack([mask, mask.roll(1), mask]) for m, mask in MASKS.items()}
    params = {k: v.detach() for k, v in fusion.named_parameters()}

    def loss(p, e, k):
        return functional_call(fusion, p, (e, k)).tanh().square().mean()

    def task_loss(p, e, k):
        g = grad(loss)(p, e, k)
        fast = {name: p[name] - 0.1 * g[name] for name in p}
        return loss(fast, e, k)

    def meta_loss(p):
        return vmap(task_loss, in_dims=(None, 0, 0), randomness="different")(p, embeddings, masks).mean()

    meta_grad = grad(meta_loss)(params)
    assert set(meta_grad) == set(params)
    for name, g in meta_grad.items():
        assert g.shape == params[name].shape
        assert torch.isfinite(g).all(), name
    # And without masks (the common case).
    meta_grad = grad(lambda p: vmap(lambda e: task_loss(p, e, None), randomness="different")(embeddings).mean())(params)
    assert all(torch.isfinite(g).all() for g in meta_grad.values())
