"""The bilinear fusion: autometa's conformance checks, registration through the installed entry
point, and values computed by hand."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

from autometa.plugins import PluginHost
from autometa.testing import check_component, conformance_params
from autometa_bilinear import Bilinear


@pytest.mark.parametrize("cls, device", conformance_params([Bilinear]))
def test_conformance(cls, device):
    check_component(cls, device=device)


def test_registered_through_its_entry_point():
    host = PluginHost(strict=True)
    host.load_entry_points(importlib.metadata.entry_points(group="autometa", name="bilinear"))
    info = host.build_registry().get("fusion", "bilinear")
    assert info.cls is Bilinear
    assert (info.plugin, info.distribution) == ("bilinear", "autometa-bilinear")


def _hand_set():
    """tabular (2-d) and text (1-d) at rank 2, one output, with weights chosen so that
    tanh(U^T x) comes out as round numbers."""
    fusion = Bilinear({"tabular": 2, "text": 1}, rank=2, out_dim=1, dropout=0.0).double().eval()
    with torch.no_grad():
        fusion.project["tabular"].weight.copy_(torch.eye(2))
        fusion.project["tabular"].bias.zero_()
        fusion.project["text"].weight.copy_(torch.tensor([[1.0], [1.0]]))
        fusion.project["text"].bias.zero_()
        fusion.out.weight.copy_(torch.tensor([[1.0, 2.0]]))
        fusion.out.bias.fill_(0.5)
    # h_tabular = (0.5, -0.2), h_text = (0.4, 0.4)
    tabular = torch.tensor([[math.atanh(0.5), math.atanh(-0.2)]], dtype=torch.float64).repeat(4, 1)
    text = torch.tensor([[math.atanh(0.4)]], dtype=torch.float64).repeat(4, 1)
    return fusion, {"tabular": tabular, "text": text}


def test_hand_computed_values_with_missing_modalities():
    fusion, embeddings = _hand_set()
    masks = {"tabular": torch.tensor([True, True, False, False]), "text": torch.tensor([True, False, True, False])}
    out = fusion(embeddings, masks).squeeze(-1)
    expected = torch.tensor([
        1 * (0.5 * 0.4) + 2 * (-0.2 * 0.4) + 0.5,  # both: P^T (h_tab ⊙ h_text) + b = 0.54
        1 * 0.5 + 2 * -0.2 + 0.5,                   # no text: h_text = 1, so P^T h_tab + b = 0.6
        1 * 0.4 + 2 * 0.4 + 0.5,                    # no table: P^T h_text + b = 1.7
        1 * 1.0 + 2 * 1.0 + 0.5,                    # nothing: P^T 1 + b = 3.5
    ], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fusion(embeddings).squeeze(-1), expected[:1].expand(4))


def test_modality_order_of_the_dict_does_not_matter():
    fusion, embeddings = _hand_set()
    reversed_order = dict(reversed(list(embeddings.items())))
    torch.testing.assert_close(fusion(reversed_order), fusion(embeddings))


def test_nan_in_a_missing_modality_reaches_neither_output_nor_gradients():
    fusion = Bilinear({"tabular": 3, "text": 2}, rank=4, out_dim=2)
    tabular = torch.randn(2, 3)
    text = torch.tensor([[0.1, 0.2], [float("nan"), float("nan")]], requires_grad=True)
    out = fusion({"tabular": tabular, "text": text}, {"text": torch.tensor([True, False])})
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert torch.isfinite(text.grad).all() and (text.grad[1] == 0).all()
