"""The data types the plugin contract names: what an encoder receives (``InputSpec``), the model
inputs of every row (``Features``), the tasks a meta-algorithm adapts to (``Task``), the pool it
meta-trains on (``TrainingPool``) and what a saved model is rebuilt from (``PoolInfo``).

They depend on nothing but torch, numpy and scipy, so components, the data layer and plugin
authors all import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import sparse

from autometa.errors import ProtocolError
from autometa.inputs import MASK_PREFIX, InputSpec


@dataclass
class Features:
    """Model inputs for every row (``inputs[modality]`` has the row count as first dimension)."""

    inputs: dict[str, torch.Tensor]  # modality tensors, plus MASK_PREFIX + modality presence masks
    specs: dict[str, InputSpec]
    # Derived input key -> the state its encoder fitted on training rows (Encoder.fit_input).
    fitted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Features":
        return Features({m: t.to(device) for m, t in self.inputs.items()}, self.specs, self.fitted)

    @property
    def modalities(self) -> list[str]:
        """The dataset's modalities (specs also hold encoders' derived inputs)."""
        return [m for m in self.specs if "@" not in m]

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def present(self, modality: str) -> torch.Tensor:
        """Bool [rows]: which rows have ``modality`` (all True when no mask is stored)."""
        key = MASK_PREFIX + modality
        if key in self.inputs:
            return self.inputs[key]
        return torch.ones(len(self), dtype=torch.bool)

    def take(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather rows; ``rows`` may carry leading task dims, e.g. ``[tasks, shots]``."""
        return {m: t[rows] for m, t in self.inputs.items()}

    def design_matrix(self, text: Callable[[sparse.csr_matrix], sparse.csr_matrix] | None = None) -> sparse.csr_matrix:
        """Every row's inputs as one flat float64 row for a plain model (the baselines).

        The dataset's modalities side by side, in their fixed order: tabular and vector columns
        as preprocessed, text as a bag of its hashed words (counts per token id, or what ``text``
        makes of each text's counts, e.g. TF-IDF weights), images flattened. Encoders' derived
        inputs are left out: they are not "the same inputs".
        """
        blocks = []
        for m in self.modalities:
            x = self.inputs[m].cpu()
            if self.specs[m].vocab_size is not None:  # token ids, 0 padding
                rows, positions = torch.nonzero(x, as_tuple=True)
                ids = x[rows, positions].numpy()
                shape = (len(x), self.specs[m].vocab_size)
                counts = sparse.csr_matrix((np.ones(len(ids)), (rows.numpy(), ids)), shape=shape)
                blocks.append(counts if text is None else text(counts))
            else:
                blocks.append(sparse.csr_matrix(x.reshape(len(x), -1).double().numpy()))
        return sparse.hstack(blocks, format="csr")

    def subset(self, rows: torch.Tensor) -> "Features":
        """These rows, with the same fitted encoder states (fitted on the training rows, not on them)."""
        return Features(self.take(rows), self.specs, self.fitted)

    @staticmethod
    def concat(first: "Features", second: "Features") -> "Features":
        """Rows of ``first`` then ``second`` (same inputs; a mask missing on one side means present),
        with ``first``'s fitted encoder states where both have one."""
        keys = [k for k in first.inputs if not k.startswith(MASK_PREFIX)]
        inputs = {k: torch.cat([first.inputs[k], second.inputs[k]]) for k in keys}
        for m in first.modalities:
            if MASK_PREFIX + m in first.inputs or MASK_PREFIX + m in second.inputs:
                inputs[MASK_PREFIX + m] = torch.cat([first.present(m), second.present(m)])
        return Features(inputs, first.specs, {**second.fitted, **first.fitted})


@dataclass
class Task:
    """Row indices and task-local labels (0..n_way-1) of a support and a query set.

    Batched tasks (from ``TrainingPool.episodes``) carry a leading task dimension.
    """

    features: Features
    support: torch.Tensor
    support_y: torch.Tensor
    query: torch.Tensor
    query_y: torch.Tensor
    n_way: int
    # True when labels are the training label space itself (standard protocol), so a head
    # trained on the training rows applies directly.
    same_classes_as_training: bool = False

    def support_inputs(self) -> dict[str, torch.Tensor]:
        return self.features.take(self.support)

    def query_inputs(self) -> dict[str, torch.Tensor]:
        return self.features.take(self.query)

    def __len__(self) -> int:
        return self.support.shape[0] if self.support.dim() > 1 else 1


@dataclass
class TrainingPool:
    """Everything meta-training may touch: training rows, by class and by source (group)."""

    features: Features
    labels: torch.Tensor  # global class index of every row (on the device)
    rows: np.ndarray  # training rows
    sources: list[dict[int, np.ndarray]]  # per group (or one): class -> rows
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    protocol: str | None = None  # names the fix when episodes cannot be drawn

    def __post_init__(self):
        self.classes = np.unique(self.labels.cpu().numpy()[self.rows])
        self._local = torch.full((int(self.labels.max()) + 1,), -1, dtype=torch.long)
        self._local[torch.as_tensor(self.classes)] = torch.arange(len(self.classes))
        self._local = self._local.to(self.device)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def over(self, rows: np.ndarray) -> "TrainingPool":
        """This pool's features and labels over ``rows`` instead of its own (one source: the
        standard protocol's), for a refit on more rows or a cross-validation fold on others.
        Rows of a class the pool lacks are left out, so the classes, and the labels
        0..n_classes-1, stay; ``rows`` must hold every one of them."""
        if len(self.sources) != 1:
            raise ValueError("only a pool with one source (the standard protocol's) takes other rows")
        labels = self.labels.cpu().numpy()
        rows = np.asarray(rows)[np.isin(labels[rows], self.classes)]
        pool = TrainingPool(self.features, self.labels, rows, [{c: rows[labels[rows] == c] for c in self.classes}],
                            self.device, self.protocol)
        if not np.array_equal(pool.classes, self.classes):
            raise ValueError(f"rows lack class(es) {sorted(set(self.classes) - set(pool.classes))} of this pool")
        return pool

    def rows_batch(self, batch_size: int, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A random batch of training rows with labels 0..n_classes-1 over the training classes."""
        pick = rng.choice(self.rows, size=min(batch_size, len(self.rows)), replace=False)
        rows = torch.as_tensor(pick, device=self.device)
        return self.features.take(rows), self._local[self.labels[rows]]

    def episode_shape(self, ways: int, shots: int, queries: int) -> tuple[int, int, int]:
        """The largest (ways, shots, queries) no larger than asked that some source can supply."""
        for n_way in range(ways, 1, -1):
            for n_query in range(queries, 0, -1):
                if self._eligible(n_way, shots + n_query):
                    return n_way, shots, n_query
        if self.protocol != "standard":
            raise ProtocolError(
                f"no training source has 2 classes with {shots + 1}+ examples for {shots}-shot episodes; "
                "lower --shots or use --protocol standard"
            )
        second = sorted(len(r) for r in self.sources[0].values())[-2]  # the 2nd largest training class
        lower = f"lower --shots to {second - 1} or less, or " if second >= 2 else ""
        raise ProtocolError(
            f"episodic learners need 2 training classes with {shots + 1}+ rows for {shots}-shot episodes, and the "
            f"second largest has {second}; {lower}search only learners that train on rows (--meta-algorithm finetune)"
        )

    def _eligible(self, n_way: int, need: int) -> list[list[int]]:
        out = []
        for source in self.sources:
            ok = [c for c, r in source.items() if len(r) >= need]
            if len(ok) >= n_way:
                out.append(ok)
        return out

    def episodes(self, n_tasks: int, ways: int, shots: int, queries: int, rng: np.random.Generator) -> Task:
        """``n_tasks`` same-shape episodes stacked on a leading task dimension."""
        n_way, shots, queries = self.episode_shape(ways, shots, queries)
        sources = [i for i, s in enumerate(self.sources) if sum(len(r) >= shots + queries for r in s.values()) >= n_way]
        support, query = [], []
        for _ in range(n_tasks):
            source = self.sources[sources[rng.integers(len(sources))]]
            ok = [c for c, r in source.items() if len(r) >= shots + queries]
            chosen = rng.choice(ok, size=n_way, replace=False)
            picks = [rng.choice(source[int(c)], size=shots + queries, replace=False) for c in chosen]
            support.append(np.concatenate([p[:shots] for p in picks]))
            query.append(np.concatenate([p[shots:] for p in picks]))
        sy = np.repeat(np.arange(n_way), shots)
        qy = np.repeat(np.arange(n_way), queries)
        dev = self.device
        return Task(
            self.features,
            torch.as_tensor(np.stack(support), device=dev),
            torch.as_tensor(np.tile(sy, (n_tasks, 1)), device=dev),
            torch.as_tensor(np.stack(query), device=dev),
            torch.as_tensor(np.tile(qy, (n_tasks, 1)), device=dev),
            n_way,
        )


@dataclass(frozen=True)
class TaskSize:
    """How large a search's tasks are, known before any trial runs: what
    ``Component.fits_task`` judges whether a component can work at all."""

    protocol: str
    ways: int  # classes in a training episode at the protocol's shape (standard: every class)
    task_ways: int  # most classes one validation or test task can have
    shots: int
    classes: int  # classes in the data
    rows: int  # rows in the data


@dataclass
class PoolInfo:
    """What ``MetaAlgorithm.setup`` may rely on besides drawing tasks: the size of the training
    label space, the device and episode shapes. A saved model is rebuilt from this alone."""

    n_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def episode_shape(self, ways: int, shots: int, queries: int) -> tuple[int, int, int]:
        return ways, shots, queries
