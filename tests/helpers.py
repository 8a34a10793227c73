"""What several test modules share (importable as ``helpers``: pytest's ``pythonpath`` holds tests/)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from torch import nn

from autometa.features import Features
from autometa.tasks import TrainingPool

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Subprocesses run the installed command line with one thread each (2-core machines).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-c", "from autometa.cli import main; main()"]


def default_sigint() -> None:
    """``preexec_fn`` of launched commands that a test interrupts: a shell running pytest in the
    background ignores SIGINT, its children inherit that, and a Python started with SIGINT
    ignored never installs its Ctrl-C handler. Default handling, as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_blobs_csv(path: Path, per_class: int = 20, seed: int = 0, shift: float = 0.8) -> Path:
    """Three classes a, b, c of numeric rows: ``x1`` shifted by ``shift`` per class, ``x2`` noise."""
    rng = np.random.default_rng(seed)
    rows = [
        {"x1": c * shift + rng.normal(), "x2": rng.normal(), "y": label}
        for c, label in enumerate("abc")
        for _ in range(per_class)
    ]
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(path, index=False)
    return path


def run_sequential(net: nn.Sequential, prefix: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``net``'s layers by hand (independently of their modules) with the tensors in
    ``params``, named as ``named_parameters`` names them under ``prefix``."""
    for index, layer in enumerate(net):
        key = f"{prefix}.{index}"
        if isinstance(layer, nn.Linear):
            x = x @ params[f"{key}.weight"].T + params[f"{key}.bias"]
        elif isinstance(layer, nn.Conv2d):
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.stride == (1, 1)
            x = F.conv2d(x, params[f"{key}.weight"], params[f"{key}.bias"], padding=1)
        elif isinstance(layer, nn.GroupNorm):
            assert layer.num_groups == 1
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + layer.eps)
            x = x * params[f"{key}.weight"].view(1, -1, 1, 1) + params[f"{key}.bias"].view(1, -1, 1, 1)
        elif isinstance(layer, nn.ReLU):
            x = x.clamp_min(0)
        elif isinstance(layer, nn.MaxPool2d):
            x = F.max_pool2d(x, 2)
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            x = x.mean(dim=(2, 3), keepdim=True)
        elif isinstance(layer, nn.Flatten):
            x = x.flatten(1)
        else:  # pragma: no cover - a layer this reference does not know
            raise AssertionError(f"reference forward does not handle {layer!r}")
    return x


def training_pool(features: Features, labels: torch.Tensor) -> TrainingPool:
    """Every row of ``features`` as one training pool, grouped by its label."""
    rows = np.arange(len(labels))
    by_class = {int(c): rows[labels.numpy() == c] for c in labels.unique()}
    return TrainingPool(features, labels, rows, [by_class])
