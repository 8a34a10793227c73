"""The three kinds of component plugins provide: Encoder, Fusion and MetaAlgorithm.

Every component class has a unique lowercase ``name``, explicit keyword ``__init__``
parameters, and a ``search_space`` mapping some of those parameter names to Optuna
distributions. A class whose space is conditional overrides ``suggest``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

from autometa.crossmodal import CrossModalMapper
from autometa.errors import DataError
from autometa.inputs import MASK_PREFIX, MODALITIES, InputSpec, derived_key  # noqa: F401 - the plugin API names them here too

if TYPE_CHECKING:
    import numpy as np

    from autometa.types import Task, TaskSize, TrainingPool


def suggest_value(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Ask ``trial`` for one value of ``distribution`` under ``name`` through the public API."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise TypeError(f"unsupported distribution {type(distribution).__name__} for {name!r}")


class Component:
    """Behaviour shared by the three kinds: a name and a declared search space."""

    name: ClassVar[str] = ""
    search_space: ClassVar[Mapping[str, BaseDistribution]] = {}
    # The keyword arguments under which this encoder or fusion learns nothing (a fixed feature
    # map: no parameters), or None when it always learns. Only such components, at these
    # arguments, serve meta-algorithms that read fixed features (MetaAlgorithm.fixed_features).
    fixed_params: ClassVar[Mapping[str, Any] | None] = None

    @classmethod
    def suggest(cls, trial: optuna.Trial, prefix: str) -> dict[str, Any]:
        """Sample keyword arguments for ``__init__``; parameter names are ``prefix + key``."""
        return {key: suggest_value(trial, prefix + key, dist) for key, dist in cls.search_space.items()}

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this component cannot run here (e.g. an optional package is missing), or None.

        Unavailable components are listed but left out of searches; asking for one explicitly
        is an error that shows this text.
        """
        return None

    @classmethod
    def fits_task(cls, size: "TaskSize") -> str | None:
        """Why this component cannot work on tasks of ``size`` (e.g. too many ways), or None.

        Asked once per search, before any trial: a component that does not fit is left out of
        the search's choices with a one-line note giving this text; asking for it explicitly is
        an error that shows it.
        """
        return None


class Encoder(Component, nn.Module):
    """One modality in, a ``[batch, out_dim]`` embedding out.

    ``__init__(self, spec: InputSpec, *, ...)`` receives the input spec positionally and
    its hyperparameters as keywords, and must set ``self.out_dim``.
    """

    modality: ClassVar[str] = ""
    # Protocols whose searches start from this encoder for its modality (the default trials, and
    # warm-start seeds that name no encoder for it) instead of the first registered one, where it
    # is available and allowed. For pretrained features that transfer to what training never
    # saw: few-shot tasks on new classes, held-out groups (``("fewshot", "grouped")``).
    default_for: ClassVar[tuple[str, ...]] = ()
    out_dim: int

    @classmethod
    def prepare(cls, raw: Any, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Optionally derive this encoder's own per-row input from the modality's raw data.

        Called once per dataset for encoders that override it, with text: a list of strings
        (a row's text columns joined), image: uint8 ``[N, H, W, C]``, tabular: the DataFrame of
        tabular columns, vector: float ``[N, D]``. The tensor returned (first dim N) becomes the
        encoder's input, and its spec ``InputSpec(modality, tensor.shape[1:])``. A fixed,
        unlearned transform (pretrained embeddings) may keep the one-argument form
        ``prepare(cls, raw)``; an encoder that also overrides ``fit_input`` gets its fitted
        ``state``. Each row's input must depend on that row (and ``state``) only.
        """
        return None

    @classmethod
    def fit_input(cls, raw: Any, rows: "np.ndarray") -> dict[str, torch.Tensor] | None:
        """Optionally fit the transform ``prepare`` applies, on the training rows ``raw[rows]`` only.

        ``raw`` is the whole dataset's raw data (as for ``prepare``) and ``rows`` the split's
        training rows (few-shot: rows of training classes); nothing else may be read, so no
        vocabulary or statistic of validation or test rows leaks into the features. Return
        named tensors (no strings or Python objects): they are saved with the model
        (safetensors) and passed as ``prepare(raw, state)`` for training and new rows alike.
        """
        return None

    @classmethod
    def derives_input(cls) -> bool:
        return getattr(cls.prepare, "__func__", None) is not Encoder.prepare.__func__

    @classmethod
    def fits_input(cls) -> bool:
        """True when ``prepare`` needs state fitted on training rows (``fit_input`` overridden)."""
        return getattr(cls.fit_input, "__func__", None) is not Encoder.fit_input.__func__

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Fusion(Component, nn.Module):
    """Per-modality embeddings in, one ``[batch, out_dim]`` representation out.

    ``__init__(self, in_dims: dict[str, int], *, ...)`` gets each modality's embedding size
    (in the fixed modality order) and must set ``self.out_dim``. ``forward`` receives
    ``masks`` (modality → bool ``[batch]``, True where present) or None when every row has
    every modality; a missing modality's embedding must not influence the output.
    """

    out_dim: int

    def forward(
        self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# Modules whose batched second-order gradients under torch.func.vmap are wrong (in torch up to
# at least 2.13; pytorch/functorch#534 for batch norm): a per-task loop gets them right.
VMAP_UNSAFE: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def vmap_blocker(module: nn.Module) -> str | None:
    """Why vmapping gradient-based inner loops over tasks must not be trusted with ``module``
    (it or a submodule declares ``supports_vmap = False``, or is one of ``VMAP_UNSAFE``), or None."""
    for name, sub in module.named_modules():
        where = f"{type(sub).__name__}" + (f" ({name})" if name else "")
        if getattr(sub, "supports_vmap", True) is False:
            return f"{where} declares supports_vmap = False"
        if isinstance(sub, VMAP_UNSAFE):
            return f"{where} gives wrong batched second-order gradients under vmap"
    return None


class Backbone(nn.Module):
    """encoders ▶ fusion: maps a dict of modality inputs to one embedding per row.

    With ``crossmodal_weight`` > 0 and two or more modalities it also owns a
    :class:`~autometa.crossmodal.CrossModalMapper` (``self.mapper``): a row's absent modality
    (mask False, or no input at all) is imputed from the others before fusion, and
    ``embed_with_aux`` returns ``crossmodal_weight`` × the mapping loss for training.
    """

    def __init__(
        self,
        encoders: dict[str, Encoder],
        fusion: Fusion,
        input_keys: dict[str, str] | None = None,
        *,
        crossmodal_weight: float = 0.0,
    ):
        super().__init__()
        if not crossmodal_weight >= 0:
            raise ValueError(f"crossmodal_weight must be zero or positive, got {crossmodal_weight}")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.out_dim = fusion.out_dim
        # Which input each encoder reads: its modality, or its own derived input (see prepare).
        self.input_keys = {m: (input_keys or {}).get(m, m) for m in encoders}
        self.crossmodal_weight = float(crossmodal_weight)
        self.mapper = None
        if crossmodal_weight > 0 and len(encoders) >= 2:
            self.mapper = CrossModalMapper({m: enc.out_dim for m, enc in encoders.items()})

    def forward(self, inputs: dict[str, torch.Tensor], *, aux: bool = False):
        """``[..., batch, out_dim]`` features, or ``(features, aux_loss)`` when ``aux`` (the
        keyword lets ``torch.func.functional_call`` ask for it: see ``embed_with_aux``)."""
        embeddings, masks = self._embed(inputs)
        aux_loss = None
        if self.mapper is not None and (aux or masks):
            predictions = self.mapper.predict(embeddings, masks)
            if aux:
                aux_loss = self.crossmodal_weight * self.mapper.loss(embeddings, masks, predictions)
            embeddings, masks = self.mapper.impute(embeddings, masks, predictions)
        features = self.fusion(embeddings, masks or None)
        if not aux:
            return features
        return features, features.new_zeros(()) if aux_loss is None else aux_loss

    def embed_with_aux(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, auxiliary loss already weighted) for a meta-algorithm's training loss.

        The loss is a 0-dim tensor, exactly zero without a mapper, so adding it changes nothing
        then. Under ``torch.func`` call ``functional_call(backbone, params, (inputs,), {"aux": True})``.
        """
        return self(inputs, aux=True)

    def _embed(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each modality's embedding and presence masks; a modality without an input is absent
        from every row (zeros in its place, which fusions and the mapper ignore)."""
        embeddings = {m: enc(inputs[self.input_keys[m]]) for m, enc in self.encoders.items() if self.input_keys[m] in inputs}
        if not embeddings:
            raise DataError(f"the model got none of its inputs ({', '.join(self.input_keys.values())}); give at least one")
        masks = {m: inputs[MASK_PREFIX + m] for m in embeddings if MASK_PREFIX + m in inputs}
        like = next(iter(embeddings.values()))
        for m, enc in self.encoders.items():
            if m not in embeddings:
                embeddings[m] = like.new_zeros(like.shape[:-1] + (enc.out_dim,))
                masks[m] = torch.zeros(like.shape[:-1], dtype=torch.bool, device=like.device)
        return {m: embeddings[m] for m in self.encoders}, masks


def assemble_backbone(config: Any, specs: Mapping[str, InputSpec], input_keys: Mapping[str, str],
                      build: Callable[..., Any]) -> Backbone:
    """The backbone ``config`` (an ``autometa.config.Config``) describes: its encoders on their inputs' ``specs``, its fusion,
    its cross-modal weight. ``build(key, *args, **kwargs)`` constructs the component ``config``
    names under ``key`` (``encoder.<modality>``, ``fusion``) and says whose it is if that fails;
    a trial and a saved model differ only in that. One place, so both build the same model."""
    encoders = {
        m: build(f"encoder.{m}", specs[input_keys[m]], **config.encoder_params.get(m, {})) for m in config.encoders
    }
    fusion = build("fusion", {m: e.out_dim for m, e in encoders.items()}, **config.fusion_params)
    return Backbone(encoders, fusion, dict(input_keys), crossmodal_weight=config.crossmodal_weight)


class MetaAlgorithm(Component):
    """Meta-trains a backbone on a stream of tasks and adapts it to new tasks.

    The host drives the loop: ``setup`` once, then ``train_step`` repeatedly (validating and
    pruning in between), then ``predict`` for each validation or test task.
    """

    protocols: ClassVar[tuple[str, ...]] = ("fewshot", "grouped", "standard")
    # True when the training loss adds the backbone's auxiliary loss (``Backbone.embed_with_aux``);
    # only then does the search try cross-modal mapping weights with this meta-algorithm.
    uses_auxiliary_loss: ClassVar[bool] = False
    # True when the learner fits on the backbone's output without training the backbone (a
    # tree ensemble): the search then builds its backbone only from components with
    # ``fixed_params``, at those parameters, so no trial is spent on encoder, fusion or
    # hyperparameter choices it would ignore (parameter keys ``fixed.fusion``, ``fixed.encoder.<modality>``).
    fixed_features: ClassVar[bool] = False
    # True when the first ``train_step`` trains the learner completely (a tree ensemble fitted
    # once): the host then scores it on every validation task and ends its training there
    # instead of stepping on to the trial's --steps.
    fits_in_one_step: ClassVar[bool] = False
    # Fixed feature maps (encoder names) the default trial of a fixed-features learner reads where
    # the search allows them; other modalities get their first-registered fixed map.
    preferred_features: ClassVar[tuple[str, ...]] = ()
    # Where the learner's default trial goes among the others of its kind (fixed-features learners
    # first, then the rest; lower ranks first, ties by name): a learner that adds most as an
    # ensemble member (the built-in forest) ranks after the stronger single models.
    default_rank: ClassVar[int] = 0

    def setup(self, backbone: Backbone, pool: "TrainingPool", shape: tuple[int, int, int]) -> None:  # pragma: no cover
        """Build heads and optimisers for ``backbone``; ``shape`` is the protocol's
        (ways, shots, queries) for training episodes (``pool.episode_shape`` fits it)."""
        raise NotImplementedError

    def train_step(self, pool: "TrainingPool", rng: "np.random.Generator") -> float:  # pragma: no cover
        """One meta-update from tasks or rows drawn from ``pool``; returns the training loss."""
        raise NotImplementedError

    def predict(self, task: "Task") -> torch.Tensor:  # pragma: no cover
        """Adapt to ``task``'s support set and return ``[n_query, task.n_way]`` logits."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Everything with trainable state (for parameter counts and saving)."""
        return {"backbone": self.backbone}

