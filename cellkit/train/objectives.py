"""Training objectives: composable, weighted loss terms chosen by the caller.

Each objective reads a model output (any object with the :class:`cellkit.CellModelOutput` field
names) and a collated batch (the :class:`cellkit.data.Collator` keys) and returns one unweighted
scalar loss. The trainer sums ``weight × loss`` over the objectives and logs every term.

The definitions follow scGPT 0.2.4 (``scgpt.loss`` and ``TransformerModel.forward``):

============================  ==================================================================
objective (``name``)          loss
============================  ==================================================================
``Classification`` (cls)      cross-entropy of ``class_logits`` against ``labels`` (``-100``
                              ignored), optional label smoothing and class weights
``MaskedValueMSE`` (gep)      ``Σ((p·m − t·m)²) / Σm`` over the masked positions ``m``
``ZeroProbNLL`` (zero_nll)    mean over masked positions of ``−log Bernoulli(p)(t > 0)``
``MVC`` (mvc)                 masked MSE of the MVC (GEPC) prediction from the cell embedding
``MVCZeroProbNLL``            the Bernoulli NLL of the MVC zero-probabilities
``ECS`` (ecs)                 ``mean(1 − (relu(S_offdiag) − threshold)²)`` over all B×B entries,
                              ``S`` = cosine similarity of the cell embeddings (diagonal set to 0)
``CCE`` (cce)                 cross-entropy of ``cos(c1_i, c2_j) / temperature`` against the
                              diagonal, ``c1``/``c2`` from two encoder passes (dropout differs);
                              both are gathered from every rank under ``torch.distributed``
``DAB`` (dab)                 cross-entropy of the adversarial discriminator's ``batch_logits``
                              (behind gradient reversal) against ``batch_labels``
``MaskedTokenLM`` (mlm)       token cross-entropy of ``token_logits`` against ``mlm_labels``
                              (``-100`` ignored): Geneformer MLM, PerturbGene phenotypic MLM
============================  ==================================================================

A batch with no masked position gives a masked loss of ``0`` (connected to the graph), not NaN.
scGPT's default weights are 1 for every term except ECS and CCE (10).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._errors import ConfigError, DataError

if TYPE_CHECKING:
    from .metrics import Metric

__all__ = [
    "CCE",
    "DAB",
    "ECS",
    "MVC",
    "OBJECTIVES",
    "Classification",
    "MVCZeroProbNLL",
    "MaskedTokenLM",
    "MaskedValueMSE",
    "Objective",
    "ZeroProbNLL",
    "make_objectives",
    "masked_mse",
    "neg_log_bernoulli",
]

IGNORE_INDEX = -100


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``Σ((p·m − t·m)²) / Σm`` (scGPT's ``masked_mse_loss``); ``0`` when nothing is masked.

    Parameters
    ----------
    pred, target
        ``(B, L)`` float.
    mask
        ``(B, L)`` bool, True where the loss counts.
    """
    m = mask.to(pred.dtype)
    n = m.sum()
    sq = ((pred * m - target.to(pred.dtype) * m) ** 2).sum()
    return sq / n.clamp_min(1.0)


def neg_log_bernoulli(probs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of ``−log Bernoulli(probs)(target > 0)`` (scGPT's
    ``criterion_neg_log_bernoulli``); ``0`` when nothing is masked.

    Parameters
    ----------
    probs
        ``(B, L)`` predicted probability that the value is non-zero.
    target
        ``(B, L)`` true values.
    mask
        ``(B, L)`` bool.
    """
    m = mask.to(probs.dtype)
    log_p = torch.distributions.Bernoulli(probs=probs).log_prob((target > 0).to(probs.dtype))
    return -(log_p * m).sum() / m.sum().clamp_min(1.0)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _field(obj: Any, name: str, what: str) -> Tensor:
    value = _get(obj, name)
    if value is None:
        raise ConfigError(f"The {what} objective needs {name!r}, which the model output / batch lacks.")
    return value


def _batch(batch: Mapping[str, Any], key: str, what: str, hint: str) -> Tensor:
    if key not in batch or batch[key] is None:
        raise DataError(f"The {what} objective needs {key!r} in the batch; {hint}")
    return batch[key]


@dataclass
class Objective(abc.ABC):
    """Base class: one weighted loss term.

    Attributes
    ----------
    name
        Key of the term in the history (``loss/<name>``).
    weight
        Multiplier in the total loss.
    heads
        Model heads the term reads (the trainer runs only the heads some objective needs).
    batch_keys
        Batch keys the term needs (checked before training starts).
    second_pass
        The term needs a second forward pass of the same batch (``CCE``).
    title, description
        A plain name and a one-line plain description of what the term teaches the model (shown by
        the studio; :data:`OBJECTIVES` maps each ``name`` to its class).
    """

    weight: float = 1.0
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    heads: ClassVar[tuple[str, ...]] = ()
    batch_keys: ClassVar[tuple[str, ...]] = ()
    second_pass: ClassVar[bool] = False

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"The weight of objective {self.name!r} must be a number >= 0, got {self.weight!r}."
            )

    @abc.abstractmethod
    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        """The unweighted scalar loss of a batch (``out2``: the second pass, for ``second_pass``)."""

    def metrics(self) -> list[Metric]:
        """Fresh :class:`~cellkit.train.metrics.Metric` objects the trainer reports with this
        term (in its step, epoch and validation records); none by default."""
        return []

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """What the term's mean is over in ``batch`` (cells, labelled cells, masked positions, or
        their class weights), as a float tensor; ``None`` when the term compares the cells of a
        batch with each other (it cannot be split into micro-batches). A piece of a batch carries
        ``units(piece) / units(batch)`` of the batch's term (``TrainerConfig(micro_batch=...)``)."""
        return None


@dataclass
class Classification(Objective):
    """Cell-type classification: cross-entropy of ``class_logits`` vs ``labels`` (``-100`` ignored).

    Parameters
    ----------
    label_smoothing
        As in :class:`torch.nn.CrossEntropyLoss`.
    class_weights
        ``(n_classes,)`` per-class weights (e.g. inverse frequencies), or ``None``.
    """

    label_smoothing: float = 0.0
    class_weights: Sequence[float] | None = None
    name: ClassVar[str] = "cls"
    title: ClassVar[str] = "Cell-type classifier"
    description: ClassVar[str] = "predict each cell's label (e.g. its cell type) from its embedding"
    heads: ClassVar[tuple[str, ...]] = ("classifier",)
    batch_keys: ClassVar[tuple[str, ...]] = ("labels",)

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        logits = _field(out, "class_logits", "classification")
        labels = _batch(batch, "labels", "classification", "build the dataset with label_key=... .")
        w = None
        if self.class_weights is not None:
            w = torch.as_tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
        if (labels != IGNORE_INDEX).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits, labels, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )

    def metrics(self) -> list[Metric]:
        """:class:`~cellkit.train.metrics.Accuracy` and :class:`~cellkit.train.metrics.MacroF1`."""
        from .metrics import Accuracy, MacroF1

        return [Accuracy(), MacroF1()]

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Labelled cells (weighted by ``class_weights``: cross-entropy's mean divides by their sum)."""
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        if self.class_weights is None:
            return valid.sum().double()
        w = torch.as_tensor(self.class_weights, dtype=torch.float64, device=labels.device)
        return w[labels[valid]].sum()


@dataclass
class MaskedValueMSE(Objective):
    """Masked expression-value regression (scGPT's GEP / "MLM"): masked MSE of ``expression``."""

    name: ClassVar[str] = "gep"
    title: ClassVar[str] = "Masked expression"
    description: ClassVar[str] = "hide some genes' expression and predict it back from the other genes"
    heads: ClassVar[tuple[str, ...]] = ("expression",)
    batch_keys: ClassVar[tuple[str, ...]] = ("target_values", "mlm_mask")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        hint = "use a Collator with masking='values'."
        return masked_mse(
            _field(out, "expression", "gep"),
            _batch(batch, "target_values", "gep", hint),
            _batch(batch, "mlm_mask", "gep", hint),
        )

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Masked positions."""
        return batch["mlm_mask"].sum().double()


@dataclass
class ZeroProbNLL(Objective):
    """Explicit zero probability of the expression decoder: Bernoulli NLL at masked positions."""

    name: ClassVar[str] = "zero_nll"
    title: ClassVar[str] = "Zero-probability"
    description: ClassVar[str] = "predict whether each hidden gene is expressed at all (zero or not)"
    heads: ClassVar[tuple[str, ...]] = ("expression",)
    batch_keys: ClassVar[tuple[str, ...]] = ("target_values", "mlm_mask")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        probs = _get(out, "expression_zero_probs")
        if probs is None:
            raise ConfigError(
                "zero_nll needs the expression head built with explicit_zero_prob=True "
                "(model.remove_head('expression'); model.add_head('expression', explicit_zero_prob=True))."
            )
        hint = "use a Collator with masking='values'."
        return neg_log_bernoulli(
            probs,
            _batch(batch, "target_values", "zero_nll", hint),
            _batch(batch, "mlm_mask", "zero_nll", hint),
        )

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Masked positions."""
        return batch["mlm_mask"].sum().double()


@dataclass
class MVC(Objective):
    """Masked value prediction from the cell embedding (scGPT's GEPC / MVC): masked MSE of ``mvc``."""

    name: ClassVar[str] = "mvc"
    title: ClassVar[str] = "Cell-embedding expression"
    description: ClassVar[str] = "predict the hidden genes' expression from the cell embedding alone"
    heads: ClassVar[tuple[str, ...]] = ("mvc",)
    batch_keys: ClassVar[tuple[str, ...]] = ("target_values", "mlm_mask")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        hint = "use a Collator with masking='values'."
        return masked_mse(
            _field(out, "mvc", "mvc"),
            _batch(batch, "target_values", "mvc", hint),
            _batch(batch, "mlm_mask", "mvc", hint),
        )

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Masked positions."""
        return batch["mlm_mask"].sum().double()


@dataclass
class MVCZeroProbNLL(Objective):
    """Bernoulli NLL of the MVC head's zero probabilities at masked positions."""

    name: ClassVar[str] = "mvc_zero_nll"
    title: ClassVar[str] = "Cell-embedding zero-probability"
    description: ClassVar[str] = "predict from the cell embedding whether each hidden gene is expressed"
    heads: ClassVar[tuple[str, ...]] = ("mvc",)
    batch_keys: ClassVar[tuple[str, ...]] = ("target_values", "mlm_mask")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        probs = _get(out, "mvc_zero_probs")
        if probs is None:
            raise ConfigError("mvc_zero_nll needs the mvc head built with explicit_zero_prob=True.")
        hint = "use a Collator with masking='values'."
        return neg_log_bernoulli(
            probs,
            _batch(batch, "target_values", "mvc_zero_nll", hint),
            _batch(batch, "mlm_mask", "mvc_zero_nll", hint),
        )

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Masked positions."""
        return batch["mlm_mask"].sum().double()


@dataclass
class ECS(Objective):
    """Elastic cell similarity: ``mean(1 − (relu(S) − threshold)²)`` with ``S``'s diagonal zeroed.

    Parameters
    ----------
    threshold
        scGPT's ``ecs_thres`` (0.8 in its integration recipe); weight 10 there.
    """

    threshold: float = 0.8
    weight: float = 10.0
    name: ClassVar[str] = "ecs"
    title: ClassVar[str] = "Elastic cell similarity"
    description: ClassVar[str] = "push dissimilar cells' embeddings apart, keep similar ones together"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"The ECS threshold is a cosine similarity in [-1, 1], got {self.threshold}.")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        c = F.normalize(_field(out, "cell_embedding", "ecs"), p=2, dim=1)
        sim = c @ c.t()
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        sim = F.relu(sim.masked_fill(eye, 0.0))
        return torch.mean(1.0 - (sim - self.threshold) ** 2)


def _gather_keep_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` from every rank (dim 0); this rank's slice keeps its gradient."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not torch.is_grad_enabled():  # evaluation: each rank scores its own cells (as scGPT)
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


@dataclass
class CCE(Objective):
    """Contrastive cell embedding: two encoder passes, cosine / temperature, CE against the diagonal.

    Parameters
    ----------
    temperature
        scGPT's ``Similarity`` temperature (0.5).
    """

    temperature: float = 0.5
    weight: float = 10.0
    name: ClassVar[str] = "cce"
    title: ClassVar[str] = "Contrastive cells"
    description: ClassVar[str] = (
        "two noisy views of a cell must embed closer to each other than to other cells"
    )
    second_pass: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"The CCE temperature must be > 0, got {self.temperature}.")

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        if out2 is None:
            raise ConfigError("CCE needs a second forward pass (the trainer provides it).")
        c1 = _gather_keep_grad(_field(out, "cell_embedding", "cce"))
        c2 = _gather_keep_grad(_field(out2, "cell_embedding", "cce"))
        sim = F.cosine_similarity(c1.unsqueeze(1), c2.unsqueeze(0), dim=-1) / self.temperature
        target = torch.arange(sim.shape[0], device=sim.device)
        return F.cross_entropy(sim, target)


@dataclass
class DAB(Objective):
    """Domain adaptation by reverse back-propagation: CE of ``batch_logits`` vs ``batch_labels``."""

    name: ClassVar[str] = "dab"
    title: ClassVar[str] = "Batch correction, adversarial"
    description: ClassVar[str] = "make batches indistinguishable in the embedding (needs a batch column)"
    heads: ClassVar[tuple[str, ...]] = ("adversarial",)
    batch_keys: ClassVar[tuple[str, ...]] = ("batch_labels",)

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        logits = _field(out, "batch_logits", "dab")
        labels = _batch(batch, "batch_labels", "dab", "build the dataset with batch_key=... .")
        if (labels != IGNORE_INDEX).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Labelled cells."""
        return (batch["batch_labels"] != IGNORE_INDEX).sum().double()


@dataclass
class MaskedTokenLM(Objective):
    """Token-level masked LM: cross-entropy of ``token_logits`` vs ``mlm_labels`` (``-100`` ignored).

    Parameters
    ----------
    label_smoothing
        PerturbGene uses 0.5; BERT / Geneformer 0.
    """

    label_smoothing: float = 0.0
    name: ClassVar[str] = "mlm"
    title: ClassVar[str] = "Masked genes"
    description: ClassVar[str] = "hide some gene tokens and predict which gene was hidden"
    heads: ClassVar[tuple[str, ...]] = ("mlm",)
    batch_keys: ClassVar[tuple[str, ...]] = ("mlm_labels",)

    def __call__(self, out: Any, batch: Mapping[str, Any], out2: Any = None) -> Tensor:
        logits = _field(out, "token_logits", "mlm")
        labels = _batch(batch, "mlm_labels", "mlm", "use a Collator with masking='tokens' or 'phenotypic'.")
        if (labels != IGNORE_INDEX).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def units(self, batch: Mapping[str, Any]) -> Tensor | None:
        """Labelled tokens."""
        return (batch["mlm_labels"] != IGNORE_INDEX).sum().double()


#: objective name -> class
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        Classification,
        MaskedValueMSE,
        ZeroProbNLL,
        MVC,
        MVCZeroProbNLL,
        ECS,
        CCE,
        DAB,
        MaskedTokenLM,
    )
}


def make_objectives(spec: Any) -> list[Objective]:
    """Objectives from instances, names, ``{name: weight}`` or ``{name: {option: value}}``.

    Examples
    --------
    >>> [o.name for o in make_objectives(["cls"])]
    ['cls']
    >>> make_objectives({"gep": 1.0, "ecs": {"threshold": 0.6, "weight": 10}})[1].threshold
    0.6
    """
    if isinstance(spec, Objective):
        return [spec]
    items: list[tuple[Any, Any]]
    if spec is None or not isinstance(spec, Mapping | str | Sequence):
        raise ConfigError(
            f"objectives must be names, a dict or Objective instances, got {spec!r}; e.g. ['cls'] or {{'gep': 1.0}}."
        )
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = [(spec, None)]
    else:
        items = [(s, None) for s in spec]
    out: list[Objective] = []
    for key, opts in items:
        if isinstance(key, Objective):
            out.append(key)
            continue
        if key not in OBJECTIVES:
            raise ConfigError(f"Unknown objective {key!r}; available: {sorted(OBJECTIVES)}.")
        cls = OBJECTIVES[key]
        if opts is None:
            out.append(cls())
        elif isinstance(opts, int | float):
            out.append(cls(weight=float(opts)))
        elif isinstance(opts, Mapping):
            try:
                out.append(cls(**opts))
            except TypeError as e:
                raise ConfigError(f"Bad options for objective {key!r}: {e}") from None
        else:
            raise ConfigError(f"Objective {key!r}: give a weight or a dict of options, got {opts!r}.")
    names = [o.name for o in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"Objective(s) {dup} given more than once.")
    if not out:
        raise ConfigError(f"No objective given; choose at least one of {sorted(OBJECTIVES)}.")
    return out
