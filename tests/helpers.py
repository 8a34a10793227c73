"""What several test modules share (importable as ``helpers``: pytest's ``pythonpath`` holds tests/)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from torch import nn

from autometa.components import InputSpec
import autometa.config
from autometa.config import Config
from autometa.plugins import get_registry
from autometa.types import Features, TrainingPool

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Subprocesses run the installed command line with one thread each (2-core machines).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-c", "from autometa.cli.main import main; main()"]


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


def prototype_head(features: torch.Tensor, y: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head the gradient learners (but ANIL) start a task at: w_k = 2 c_k, b_k = -|c_k|², c_k
    the mean feature of class k (logits = |x|² - |x - c_k|²), by hand."""
    means = torch.stack([features[y == k].mean(0) for k in range(n_way)])
    return 2 * means, -(means * means).sum(1)


def training_pool(features: Features, labels: torch.Tensor) -> TrainingPool:
    """Every row of ``features`` as one training pool, grouped by its label."""
    rows = np.arange(len(labels))
    by_class = {int(c): rows[labels.numpy() == c] for c in labels.unique()}
    return TrainingPool(features, labels, rows, [by_class])


def make_distribution(root: Path, module: str, dist_name: str, version: str, ep_name: str, source: str) -> None:
    """An installed-looking distribution with an ``autometa`` entry point: importable (and found
    by importlib.metadata) once ``root`` is on sys.path."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[autometa]\n{ep_name} = {module}\n")


def _open_storage_after(barrier, db: str, outcomes) -> None:
    from autometa.store.storage import storage_for

    barrier.wait(30)
    try:
        storage_for(db).engine.dispose()
        outcomes.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcomes.put(f"{type(exc).__name__}: {exc}")


def open_storages_together(db: str, processes: int = 4) -> list[str]:
    """``storage_for(db)`` in ``processes`` processes released at the same moment: "ok" or the
    error of each (as two searches started together on a new database)."""
    context = mp.get_context("fork")  # plain storage work: no need to pay for spawning
    barrier, outcomes = context.Barrier(processes), context.Queue()
    started = [context.Process(target=_open_storage_after, args=(barrier, db, outcomes)) for _ in range(processes)]
    for p in started:
        p.start()
    for p in started:
        p.join(60)
    return [outcomes.get(timeout=5) for _ in started]


def hidden_clusters(n_classes: int = 16, per_class: int = 10, informative: int = 2, noise: int = 10, seed: int = 0):
    """``n_classes`` class clusters in 2 informative dimensions, hidden among 10 louder noise dimensions: a
    random body's features are dominated by the noise, so a few shots barely beat chance until
    meta-training teaches the body where to look."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, informative, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    signal = centres[labels] + 0.1 * torch.randn(len(labels), informative, generator=gen)
    x = torch.cat([signal, torch.randn(len(labels), noise, generator=gen)], dim=1)
    return Features({"tabular": x}, {"tabular": InputSpec("tabular", (informative + noise,))}), labels


def class_pool(features: Features, labels: torch.Tensor, classes: range) -> TrainingPool:
    rows = np.arange(len(labels))
    keep = np.isin(labels.numpy(), list(classes))
    return TrainingPool(features, labels, rows[keep], [{c: rows[labels.numpy() == c] for c in classes}])


def requires(distribution_name: str, extra: str):
    """Skip a test unless a pip distribution is installed; asks the package metadata, since a
    data-only wheel (kanjivg) has no module that ``pytest.importorskip`` could import."""
    from importlib.metadata import PackageNotFoundError, distribution

    import pytest

    try:
        distribution(distribution_name)
        missing = False
    except PackageNotFoundError:
        missing = True
    return pytest.mark.skipif(missing, reason=f'needs pip install "autometa[{extra}]"')


def fake_wordnet(folder, classes: int = 16, per_class: int = 8, seed: int = 0):
    """WordNet-format ``data.{noun,verb,adj,adv}`` files in ``folder``: a licence header, then
    synsets of lexicographer files 3, 4, … (noun.Tops, noun.act, …), each class glossed with
    words of its own (``c3w0`` …) and shared ones, plus one duplicate gloss; returns the folder."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shared = ["a", "the", "of", "kind", "thing", "used", "for", "act"]
    # Each class also has two topic words of a pool every class draws from, so held-out classes
    # are told apart by words the training classes use too.
    topics = ["stone", "river", "music", "bread", "horse", "light", "metal", "cloud", "paper", "salt", "wheel", "fever"]
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by Princeton\n"]
    for lex in range(3, 3 + classes):
        own = [f"c{lex}w{j}" for j in range(5)]
        topic = [topics[lex % len(topics)], topics[(5 * lex + 1) % len(topics)]]
        for i in range(per_class):
            words = rng.choice(own, size=2).tolist() + topic + rng.choice(shared, size=2).tolist()
            gloss = " ".join(rng.permutation(words)) + f" {i}"
            lines.append(f"{lex:08d}{i:02d} {lex:02d} n 01 word{lex}_{i} 0 000 | {gloss}  \n")
    lines.append(f"99999999 03 n 01 again 0 000 | {lines[1].split(' | ')[1].strip()}  \n")  # a duplicate gloss
    (folder / "data.noun").write_text("".join(lines), encoding="latin-1")
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(lines[0], encoding="latin-1")
    return folder


def assert_fitted_state_kept(result, key: str, fitted_alone: dict[str, torch.Tensor]) -> None:
    """A search's fitted input ``key`` equals ``fitted_alone`` (the state fitted on its training rows
    alone: nothing else was read), and its saved model keeps exactly that state."""
    import autometa

    state = result.split.pool.features.fitted[key]
    assert sorted(state) == sorted(fitted_alone)
    for name, value in fitted_alone.items():
        assert torch.equal(state[name], value), name
    model = autometa.load(result.model_path)
    assert set(model.fitted) == {key}
    for name, value in state.items():
        assert torch.equal(model.fitted[key][name], value), name


def split_inputs(folder: str, data: str, label: str, out) -> None:
    """A worker process's view of a search's shared inputs (the target of a spawned process):
    per input key, the file its tensor's memory is mapped from, that mapping's permissions (as
    /proc/self/maps has them) and the tensor's bytes."""
    from autometa.data.loading import load_dataset
    from autometa.data.protocols import make_split

    split = make_split(load_dataset(data, label), "standard", shared=folder)
    with open("/proc/self/maps") as maps:
        mappings = [line.split(maxsplit=5) for line in maps]
    found = {}
    for key, tensor in split.pool.features.inputs.items():
        pointer = tensor.data_ptr()
        where = [(m[5].strip(), m[1]) for m in mappings
                 if len(m) == 6 and int(m[0].split("-")[0], 16) <= pointer < int(m[0].split("-")[1], 16)]
        found[key] = (*(where[0] if where else (None, None)), tensor.numpy().tobytes())
    out.put(found)


def predicted_by_the_cli(result, data: Path, label: str, folder: Path) -> tuple[np.ndarray, "pd.DataFrame"]:
    """What the search's own model gives the first test task's query rows (class probabilities)
    and what ``autometa predict`` writes for the test rows of ``data`` from the saved model."""
    from click.testing import CliRunner

    from autometa.cli.main import cli

    expected = torch.softmax(result.best.algorithm.predict(result.split.test[0]).double(), dim=-1).numpy()
    rows, out = folder / "rows.csv", folder / "pred.csv"
    frame = pd.read_csv(data)
    frame.iloc[result.split.row_splits["test"]].drop(columns=[label]).to_csv(rows, index=False)
    run = CliRunner().invoke(cli, ["predict", str(result.model_path), str(rows), "--output", str(out)])
    assert run.exit_code == 0, run.output
    return expected, pd.read_csv(out)


def benchmark_script(file_name: str, module_name: str):
    """A generator that imports ``benchmarks/FILE_NAME`` as ``module_name``, yields it and forgets it
    again (for a module-scoped fixture: the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / file_name
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def default_config(choices: dict, meta: str, **params) -> Config:
    """The default trial of meta-algorithm ``meta`` in a search of ``choices``, with ``params`` of
    its own changed, as the search would build it."""
    return autometa.config.default_config(get_registry(), choices, meta, **params)
