"""Tasks — AnnData in, trained model out: :func:`finetune` (cell-type annotation), :func:`predict`, :func:`pretrain`.

These are the functions the studio's fine-tune panel and the ``cellkit finetune`` / ``cellkit
pretrain`` commands call. They tokenize with the model's own scheme, split the cells (stratified,
seeded), build datasets and collators, and hand the loop to :class:`cellkit.train.Trainer`.

The caller's AnnData is never modified by :func:`finetune` / :func:`pretrain`; :func:`predict`
writes only the keys it is asked to (``key_added``, recorded in ``uns["cellkit"]``; see
:mod:`cellkit._anndata`) and never over an entry cellkit did not write unless ``overwrite=True``.
The model is trained in place (as PyTorch does); pass ``copy_model=True`` to train a copy.
"""

from __future__ import annotations

import copy as _copy
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import pandas as pd
import torch

from ._anndata import check_adata, check_finite_rows, check_keys_free, check_obs_names, record_written
from ._errors import ConfigError, DataError
from ._inference import class_probabilities
from ._utils import Progress, ensure_writable_dir, get_logger
from ._utils._run import RunRecord
from .analysis._runs import recorded
from .data.collate import Collator
from .data.dataset import CellDataset
from .data.sources import select_rows
from .data.tokenize import tokenize
from .data.tokenized import ShardedTokens, ShardSubset, TokenizedCells
from .model import CellModel
from .train.events import Callback, Event
from .train.metrics import macro_f1
from .train.objectives import Objective, make_objectives
from .train.trainer import History, Trainer, TrainerConfig, exclusive_training_run

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "FinetuneResult",
    "PretrainResult",
    "check_finetune_options",
    "finetune",
    "label_columns",
    "objective_support",
    "predict",
    "pretrain",
    "stratified_split",
]

log = get_logger(__name__)


_F = TypeVar("_F", bound=Callable[..., Any])


def _one_run(fn: _F) -> _F:
    """Hold the process's training slot for the whole task, from before anything is seeded
    (a second concurrent run is refused; see :func:`cellkit.train.trainer.exclusive_training_run`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exclusive_training_run(fn.__name__):
            return fn(*args, **kwargs)

    return cast(_F, wrapper)


Tokens = TokenizedCells | ShardedTokens
_VALUE_OBJECTIVES = {"gep", "zero_nll", "mvc", "mvc_zero_nll"}
#: the model head each objective needs (``cls`` and ``dab`` create theirs)
_HEAD_NEEDS = {
    "gep": "expression",
    "zero_nll": "expression",
    "mvc": "mvc",
    "mvc_zero_nll": "mvc",
    "mlm": "mlm",
}


# ============================================================================== results
class _BuiltOnFirstUse:
    """A dataclass field that may be given as a zero-argument function, called once on first access.

    :func:`finetune` on a shard directory reports its split per cell name; the names of millions
    of cells are only read (and kept) when ``result.split`` is looked at.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}_value"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self.attr)  # no class-level default
        value = obj.__dict__[self.attr]
        if callable(value) and not isinstance(value, pd.Series | pd.DataFrame):
            value = obj.__dict__[self.attr] = value()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.attr] = value


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes
    ----------
    model
        The fine-tuned model (best validation weights), with a ``classifier`` head whose
        ``labels`` are ``classes``.
    status
        ``"completed"``, ``"early_stopped"``, ``"stopped"`` or ``"interrupted"``.
    history
        Per-step and per-epoch records (:class:`cellkit.train.History`).
    metrics
        Held-out metrics on the test cells (``accuracy``, ``macro_f1``, ``weighted_f1``) and the
        last validation metrics (``val/...``).
    report
        Per-class precision / recall / F1 / support on the test cells.
    confusion
        Test confusion matrix (rows: true class, columns: predicted class).
    classes
        Class names; the classifier's output order.
    split
        ``"train"`` / ``"val"`` / ``"test"`` per cell (indexed by cell name). From a shard
        directory it is built on first access (it reads every cell name).
    trainer
        The :class:`cellkit.train.Trainer` (resume a stopped run with ``trainer.fit(..., resume=True)``
        or call :func:`finetune` again with ``resume=True``).
    tokens
        The tokenized cells used.
    run
        The run's record (options, model and data identity, seeds, environment, metrics;
        :class:`cellkit.RunRecord`), also on ``model.run`` and saved with the model; written to
        ``checkpoint_dir/run.json`` when a ``checkpoint_dir`` is given.
    baseline_metrics
        The same held-out metrics (``accuracy``, ``macro_f1``, ``weighted_f1``) of a logistic
        regression trained on the training cells' tokens (the model's inputs) and scored on the
        same held-out cells; empty with ``baseline=False`` or without held-out metrics.
    baseline_settings
        What that baseline was (features, the logistic regression's settings, training cells used,
        notes); see :mod:`cellkit.analysis._baselines`.
    comparison
        (property) The model and the baseline side by side: rows ``"model"`` and
        ``"logistic regression"``, columns ``accuracy``, ``macro_f1``, ``weighted_f1``.
    """

    model: CellModel
    status: str
    history: History
    metrics: dict[str, float]
    report: pd.DataFrame
    confusion: pd.DataFrame
    classes: list[str]
    split: pd.Series = _BuiltOnFirstUse()  # type: ignore[assignment]
    trainer: Trainer = field(repr=False)
    tokens: Any = field(default=None, repr=False)
    run: RunRecord | None = field(default=None, repr=False)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    baseline_settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def comparison(self) -> pd.DataFrame:
        """Held-out ``accuracy`` / ``macro_f1`` / ``weighted_f1`` of ``"model"`` and ``"logistic regression"``."""
        keys = list(_HELD_OUT_KEYS)
        rows = {"model": self.metrics}
        if self.baseline_metrics:
            rows["logistic regression"] = self.baseline_metrics
        table = pd.DataFrame(
            [[float(m.get(k, float("nan"))) for k in keys] for m in rows.values()],
            index=pd.Index(list(rows), name="method"),
            columns=keys,
        )
        return table

    def __repr__(self) -> str:
        m, b = self.metrics, self.baseline_metrics
        base = (
            f"logistic baseline accuracy {b.get('accuracy', float('nan')):.3f}, "
            f"macro-F1 {b.get('macro_f1', float('nan')):.3f}, "
            if b
            else ""
        )
        return (
            f"FinetuneResult(status={self.status!r}, {len(self.classes)} classes, "
            f"test accuracy {m.get('accuracy', float('nan')):.3f}, macro-F1 {m.get('macro_f1', float('nan')):.3f}, "
            f"{base}{len(self.history.epoch_records)} epochs)"
        )


#: the held-out metrics of the model and of its baseline
_HELD_OUT_KEYS = ("accuracy", "macro_f1", "weighted_f1")


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: ``model``, ``status``, ``history``, ``metrics``, ``trainer`` and
    ``run`` (the run's record, as in :class:`FinetuneResult`)."""

    model: CellModel
    status: str
    history: History
    metrics: dict[str, float]
    trainer: Trainer = field(repr=False)
    run: RunRecord | None = field(default=None, repr=False)


# ============================================================================== helpers
def stratified_split(
    labels: Sequence[Any] | np.ndarray, *, val_size: float, test_size: float, seed: int
) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"test"`` per cell, stratified by ``labels`` (sklearn), seeded.

    Raises
    ------
    DataError
        When a class is too small to appear in every part.
    """
    labels = np.asarray(labels).astype(str)
    classes, codes = np.unique(labels, return_inverse=True)  # sorted classes, as sklearn stratifies
    parts = _stratified_codes(codes, list(classes), val_size=val_size, test_size=test_size, seed=seed)
    return np.asarray(_PARTS, dtype=object)[parts]


def _small_classes(labels: Any, parts: int) -> pd.Series:
    """Cell counts of the classes of ``labels`` with fewer than ``parts`` cells (smallest first)."""
    counts = pd.Series(np.asarray(labels).astype(str)).value_counts()
    return counts[counts < parts].sort_values(kind="stable")


def _classes_text(counts: pd.Series, limit: int = 5) -> str:
    """``class 'x' has 2 cells, class 'y' has 1 cell`` (plain text, at most ``limit`` classes)."""
    shown = [
        f"class {name!r} has {int(n):,} cell{'' if int(n) == 1 else 's'}"
        for name, n in counts.head(limit).items()
    ]
    more = f" and {len(counts) - limit:,} more" if len(counts) > limit else ""
    return ", ".join(shown) + more


def _check_class_sizes(labels: Any, *, val_size: float, test_size: float) -> None:
    """Every class must have a cell for each part of a stratified split (train, and val / test if asked)."""
    parts = 1 + (val_size > 0) + (test_size > 0)
    small = _small_classes(labels, parts)
    if len(small):
        names = ", ".join(["training"] + ["validation"] * (val_size > 0) + ["test"] * (test_size > 0))
        problem = (
            f"Some classes are too small to split into {names} parts (each class needs at least {parts} cells): "
            f"{_classes_text(small)}."
        )
        raise DataError(
            f"{problem} Drop or merge these classes (cells=...), lower the number of parts "
            "(val_size=0 / test_size=0), or give your own split with split_key=... .",
            param="label_key",
            problem=problem,
        )


def _check_fractions(val_size: float, test_size: float) -> None:
    """The held-out fractions: each in [0, 1), together leaving cells for training."""
    for name, frac in (("val_size", val_size), ("test_size", test_size)):
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {frac!r}.", param=name)
    if val_size + test_size >= 1:
        raise ConfigError(
            f"val_size + test_size must leave cells for training (got {val_size} + {test_size}).",
            param="val_size",
        )


def _check_label_column(obs: pd.DataFrame, key: str, what: str) -> pd.Series:
    if key not in obs.columns:
        close = [c for c in obs.columns if key.lower() in c.lower() or c.lower() in key.lower()]
        raise DataError(
            f"{what}={key!r} is not an obs column. Available: {list(obs.columns)[:20]}"
            + (f"; did you mean {close[:3]}?" if close else "."),
            param=what,
        )
    col = obs[key]
    missing = col.isna() | col.astype(str).isin(["nan", "NaN", "None", ""])
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} of {len(col)} selected cells have no {key!r} value (NaN/empty), e.g. "
            f"{list(col.index[missing][:3])}. Select labelled cells with cells=~adata.obs[{key!r}].isna() "
            "or fill the labels.",
            param=what,
        )
    return col


def _obs_of(data: Any, cells: Any) -> pd.DataFrame:
    """The obs rows the tokenizer will use (for validating columns before the work starts)."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data.obs.iloc[select_rows(data.obs, cells)]
    return pd.DataFrame()


def _check_tokens(model: CellModel, tokens: Tokens) -> None:
    """Pre-tokenized cells must come from this model's vocabulary."""
    mine = {role: model.vocab[tok] for role, tok in model.vocab.specials.items()}
    theirs = dict(tokens.specials)
    clash = {r: (theirs[r], mine.get(r)) for r in theirs if mine.get(r) != theirs[r]}
    n_vocab = len(model.vocab)
    biggest = int(tokens.gene_ids.max()) if isinstance(tokens, TokenizedCells) and tokens.n_tokens else -1
    if clash or biggest >= n_vocab:
        raise DataError(
            "These tokens were not made with this model's vocabulary: "
            + (f"special token ids differ ({clash}); " if clash else "")
            + (f"token id {biggest} ≥ vocabulary size {n_vocab}; " if biggest >= n_vocab else "")
            + "tokenize the AnnData with this model: cellkit.tokenize(adata, model)."
        )


def _tokens_for(
    data: Any,
    model: CellModel,
    *,
    cells: Any,
    obs_columns: list[str],
    tokenize_options: Mapping[str, Any] | None,
    layer: str | None,
    use_raw: bool | None,
    gene_column: str | None,
    progress: bool | Progress,
) -> Tokens:
    if _is_shard_directory(data):
        data = ShardedTokens(data)
    if isinstance(data, TokenizedCells | ShardedTokens):
        if len(data) == 0:
            raise DataError("No cells selected: these tokens hold no cell; tokenize a non-empty selection.")
        _check_tokens(model, data)
        if cells is not None:
            raise DataError(
                "cells= selects cells of an AnnData; subset pre-tokenized cells with tokens.subset(...)."
            )
        return data
    opts = _check_tokenize_options(model, tokenize_options)
    tokens = tokenize(
        data,
        model,
        cells=cells,
        obs_columns=obs_columns,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        progress=progress,
        **opts,
    )
    if len(tokens) == 0:
        raise DataError("No cells selected: the selection is empty, nothing to work on. Check cells=... .")
    return tokens


def _is_shard_directory(data: Any) -> bool:
    """A path (``str`` / ``os.PathLike``) of a token shard directory (one with a manifest)."""
    import os
    from pathlib import Path

    if not isinstance(data, str | os.PathLike):
        return False
    path = Path(data)
    return path.is_dir() and (path / "manifest.json").is_file()


#: tokenize() arguments the task functions pass themselves (they are the task's own parameters)
_TASK_TOKENIZE_ARGS = ("cells", "obs_columns", "layer", "use_raw", "gene_column", "progress")


def _check_tokenize_options(model: CellModel, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``tokenize_options`` checked by name: the scheme's ``OPTIONS`` and :func:`cellkit.tokenize`'s
    own keywords (``scheme``, ``output``, ``chunk_size``, …) are accepted; anything else is a
    :class:`~cellkit.ConfigError` naming close matches."""
    import difflib
    import inspect

    from .data.schemes import get_scheme

    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"tokenize_options must be a dict of option -> value, got {type(options).__name__}.",
            param="tokenize_options",
        )
    opts = dict(options)
    bad_keys = [k for k in opts if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(
            f"tokenize_options names must be strings, got {bad_keys[:5]}.", param="tokenize_options"
        )
    own = sorted(set(opts) & set(_TASK_TOKENIZE_ARGS))
    if own:
        raise ConfigError(
            f"tokenize_options {own} are parameters of this function: pass {own[0]}=... directly, "
            "not inside tokenize_options.",
            param="tokenize_options",
        )
    scheme = opts.get("scheme") or model.config.family
    try:
        impl = get_scheme(str(scheme))
    except DataError:
        return opts  # an unknown scheme: tokenize() says which ones exist
    keywords = {
        p.name
        for p in inspect.signature(tokenize).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    allowed = sorted((keywords - set(_TASK_TOKENIZE_ARGS)) | set(impl.OPTIONS))
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        close = {u: difflib.get_close_matches(u, allowed, n=3) for u in unknown}
        hint = "; ".join(f"{u!r}: did you mean {c}?" for u, c in close.items() if c)
        raise ConfigError(
            f"Unknown tokenize option(s) {unknown} for the {scheme!r} scheme"
            + (f" ({hint})" if hint else "")
            + f". Allowed: {allowed}.",
            param="tokenize_options",
        )
    return opts


def _collator(
    model: CellModel, tokens: Tokens, objectives: list[Objective], *, mask_ratio: float | None
) -> Collator:
    names = {o.name for o in objectives}
    kw: dict[str, Any] = {}
    if names & _VALUE_OBJECTIVES:
        kw["masking"] = "values"
        kw["mask_ratio"] = 0.4 if mask_ratio is None else mask_ratio
        mask_value = model.config.input.mask_value
        kw["mask_value"] = -1.0 if mask_value is None else float(mask_value)
    if "mlm" in names:
        kw["masking"] = "phenotypic" if tokens.scheme == "perturbgene" else "tokens"
        if mask_ratio is not None:
            kw["gene_mask_prob" if kw["masking"] == "phenotypic" else "mlm_probability"] = mask_ratio
        if kw["masking"] == "tokens":
            kw.setdefault("vocab_size", len(model.vocab))
    max_len = model.config.input.max_length  # the most tokens per cell the model takes
    if max_len:
        kw["max_len"] = int(max_len)
    return Collator.for_tokens(tokens, **kw)


def _subset(tokens: Tokens, idx: np.ndarray) -> TokenizedCells | ShardSubset:
    """The cells at ``idx``: a copy for in-memory tokens, a lazy index set over a shard directory."""
    return tokens.subset(idx)


def _ensure_heads(
    model: CellModel,
    objectives: list[Objective],
    *,
    n_classes: int | None,
    classes: list[str] | None,
    n_batches: int | None,
) -> None:
    """Create the heads the objectives need (a classifier for these classes, a discriminator...)."""
    names = {o.name for o in objectives}
    if "cls" in names:
        existing = model.config.heads.get("classifier")
        if existing is None or existing.get("labels") != classes:
            if existing is not None:
                log.info(
                    "replacing the model's classifier head (%s) with one for %d classes",
                    existing.get("labels"),
                    n_classes,
                )
                model.remove_head("classifier")
            model.add_head("classifier", n_classes=n_classes, labels=classes)
    if "dab" in names:
        existing = model.config.heads.get("adversarial")
        if existing is None or existing["n_batches"] != n_batches:
            if existing is not None:
                model.remove_head("adversarial")
            model.add_head("adversarial", n_batches=n_batches)
    _ensure_heads_possible(model, names)


def _freeze_prefixes(model: CellModel, freeze_embeddings: bool, freeze_layers: int) -> tuple[str, ...]:
    n_layers = model.config.encoder.n_layers
    if (
        isinstance(freeze_layers, bool)
        or not isinstance(freeze_layers, int)
        or not 0 <= freeze_layers <= n_layers
    ):
        raise ConfigError(
            f"freeze_layers must be between 0 and {n_layers} (this model's layers), got {freeze_layers!r}.",
            param="freeze_layers",
        )
    out = ["encoder.embeddings"] if freeze_embeddings else []
    out += [f"encoder.layers.{i}" for i in range(freeze_layers)]
    return tuple(out)


def _class_weights(
    codes: np.ndarray, n_classes: int, mode: str | Sequence[float] | None
) -> list[float] | None:
    if mode is None:
        return None
    if isinstance(mode, str):
        _check_class_weight(mode)
        counts = np.bincount(codes[codes >= 0], minlength=n_classes).astype(float)
        return (len(codes) / (n_classes * np.maximum(counts, 1))).tolist()
    weights = [float(w) for w in mode]
    if len(weights) != n_classes:
        raise ConfigError(
            f"class_weight has {len(weights)} entries for {n_classes} classes.", param="class_weight"
        )
    return weights


def _check_class_weight(mode: Any) -> None:
    if isinstance(mode, str) and mode != "balanced":
        raise ConfigError(
            f"class_weight must be None, 'balanced' or a list of weights, got {mode!r}.", param="class_weight"
        )


def _trainer_config(options: dict[str, Any], defaults: dict[str, Any]) -> TrainerConfig:
    known = set(TrainerConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown}; training options are {sorted(known)}.")
    return TrainerConfig.from_dict({**defaults, **options})


# ============================================================================== finetune
@_one_run
@recorded("cellkit.finetune")
def finetune(
    adata: AnnData | Tokens | str,
    model: CellModel,
    *,
    label_key: str,
    batch_key: str | None = None,
    cells: Any = None,
    objectives: Any = ("cls",),
    val_size: float = 0.1,
    test_size: float = 0.1,
    split_key: str | None = None,
    seed: int = 0,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 32,
    class_weight: str | Sequence[float] | None = None,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    mask_ratio: float | None = None,
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    callbacks: Iterable[Callback | Callable[[Event], Any]] = (),
    stop_event: threading.Event | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    copy_model: bool = False,
    baseline: bool = True,
    progress: bool | Progress = True,
    **trainer_options: Any,
) -> FinetuneResult:
    """Fine-tune a model for cell-type annotation (and optional integration objectives).

    Parameters
    ----------
    adata
        Cells with raw or normalised expression (what the model's tokenizer expects): an AnnData
        (in memory or backed), an ``.h5ad`` path, or cells already tokenized with this model. A
        token shard directory (a :class:`~cellkit.data.ShardedTokens`, e.g. from
        ``cellkit.tokenize(..., output=...)``, or its path) is trained on out of core: the split is
        an index set over its cells, the label / batch / split columns are read without the
        tokens, and each batch reads its cells from the shards, so memory does not grow with the
        number of cells (npy shards; parquet shards are read a whole shard at a time).
    model
        A loaded :class:`cellkit.CellModel`; a ``classifier`` head for the classes is created
        (or replaced) and the model is trained in place (``copy_model=True``: on a copy).
    label_key
        ``obs`` column with the cell types (every selected cell needs one).
    batch_key
        ``obs`` column with batches / domains (for the ``"dab"`` objective).
    cells
        Which cells (mask, positions, names or a query string, see :func:`cellkit.data.select_cells`); default all.
    objectives
        Loss terms: ``("cls",)`` by default; add ``"gep"``, ``"mvc"``, ``"ecs"``, ``"dab"``, ... or
        pass ``{name: weight}`` (see :mod:`cellkit.train.objectives`).
    val_size, test_size
        Fractions of the cells held out (stratified by label, seeded): validation picks the best
        epoch, test gives the held-out metrics.
    split_key
        ``obs`` column with ``"train"`` / ``"val"`` / ``"test"`` per cell instead of a random split.
    seed
        Seeds the split, the data order, dropout and the new head's initialisation.
    epochs, lr, batch_size
        Training length, learning rate, cells per step.
    class_weight
        ``None``, ``"balanced"`` (inverse class frequency, for rare types) or one weight per class.
        Balanced weights can stall a small or weakly pretrained model (it stays at a uniform
        prediction for several epochs); prefer ``monitor="val/macro_f1"`` with no weights there.
    freeze_embeddings, freeze_layers
        Keep the gene/value embeddings and/or the first ``freeze_layers`` transformer layers fixed.
    mask_ratio
        Fraction of values masked for the ``gep`` / ``mvc`` objectives (default 0.4).
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize`.
    callbacks
        Receive every training :class:`~cellkit.train.Event` (live plots).
    stop_event
        A :class:`threading.Event`; setting it (e.g. from a Stop button) ends the run at the next
        step with a resumable state.
    checkpoint_dir, resume
        Write resumable checkpoints there; ``resume=True`` goes on from the latest one.
    copy_model
        Train a deep copy and leave ``model`` untouched.
    baseline
        Also fit a logistic regression on the training cells' tokens (the model's inputs: gene ids
        and the tokenizer's values) and score it on the same held-out cells
        (``result.baseline_metrics``, ``result.comparison``). Its cost is bounded: at most 50,000
        training cells (a subsample drawn with ``seed``), held-out cells read in chunks; see
        :mod:`cellkit.analysis._baselines`. ``False`` skips it.
    progress
        ``True``: progress bars (tokenizing, training). A :class:`cellkit.Progress` follows the
        tokenizing of an AnnData (and cancelling it raises :class:`cellkit.Cancelled` before any
        training); the training itself reports through ``callbacks`` and stops with ``stop_event``.
    **trainer_options
        Any :class:`cellkit.train.TrainerConfig` field (``schedule``, ``warmup_steps``, ``amp``,
        ``device``, ``grad_accum``, ``early_stopping_patience``, ``monitor``, ...).

    Returns
    -------
    :class:`FinetuneResult`

    Examples
    --------
    >>> model = cellkit.datasets.demo_model()  # doctest: +SKIP
    >>> result = cellkit.finetune(adata, model, label_key="bulk_labels", epochs=5)  # doctest: +SKIP
    >>> result.metrics["macro_f1"], result.confusion  # doctest: +SKIP
    >>> result.comparison  # the model beside a logistic regression on the same cells  # doctest: +SKIP
    """
    # -- everything that can be checked before any work (first statement: locals() are the arguments)
    config, objs = _plan_from(locals())
    names = {o.name for o in objs}
    if not isinstance(baseline, bool):
        raise ConfigError(f"baseline must be True or False, got {baseline!r}.", param="baseline")

    # -- tokens, split, datasets
    columns = [c for c in dict.fromkeys([label_key, batch_key, split_key]) if c is not None]
    tokens = _tokens_for(
        adata,
        model,
        cells=cells,
        obs_columns=columns,
        tokenize_options=tokenize_options,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        progress=progress,
    )
    if isinstance(tokens, ShardedTokens):
        # out of core: the split is an index set over the shards, built from the label / split
        # columns alone (one small code per cell); no token array is loaded
        classes_all, split_codes = _sharded_split(
            tokens, label_key=label_key, split_key=split_key, val_size=val_size, test_size=test_size, seed=seed
        )
        # positions as int32 below 2**31 cells: the index sets are the only per-cell arrays kept
        pos = np.int32 if len(tokens) < 2**31 else np.int64
        train_idx, val_idx, test_idx = (
            np.flatnonzero(split_codes == p).astype(pos) for p in range(len(_PARTS))
        )
        split_of: pd.Series | Callable[[], pd.Series] = functools.partial(_split_series, tokens, split_codes)
    else:
        obs_tok, names_tok = tokens.obs, np.asarray(tokens.obs_names).astype(str)
        # the split is reported per cell name: names must identify cells (files and tokens too)
        check_obs_names(names_tok, what="cellkit.finetune")
        if obs_tok is None or label_key not in obs_tok:
            raise _no_label_column(label_key)
        labels = _check_label_column(obs_tok, label_key, "label_key").astype(str).to_numpy()
        classes_all = sorted(set(labels))
        _check_two_classes(label_key, classes_all)
        split = _finetune_split(
            obs_tok, labels, split_key=split_key, val_size=val_size, test_size=test_size, seed=seed
        )
        train_idx, val_idx, test_idx = (np.flatnonzero(split == p) for p in _PARTS)
        split_of = pd.Series(split, index=pd.Index(names_tok), name="split")
    model_ = _copy.deepcopy(model) if copy_model else model
    train_ds, val_ds, test_ds = _finetune_datasets(
        tokens, (train_idx, val_idx, test_idx), label_key=label_key, batch_key=batch_key, classes=classes_all
    )
    classes = train_ds.classes
    batch_classes = train_ds.batch_classes
    for o in objs:
        if o.name == "cls" and getattr(o, "class_weights", None) is None and class_weight is not None:
            # the training labels from the label column, not by reading every training cell
            o.class_weights = _class_weights(train_ds.label_codes, len(classes), class_weight)
    torch.manual_seed(seed)
    _ensure_heads(
        model_, objs, n_classes=len(classes), classes=classes, n_batches=len(batch_classes or []) or None
    )
    collate = _collator(model_, tokens, objs, mask_ratio=mask_ratio)
    val_collate = _copy.deepcopy(collate)

    # -- train
    trainer = Trainer(model_, objs, config, callbacks=callbacks, stop_event=stop_event)
    fit = trainer.fit(train_ds, val_ds, collate_fn=collate, val_collate_fn=val_collate, resume=resume)

    # -- held-out evaluation
    held = test_ds if test_ds is not None else val_ds
    metrics, report, confusion, base = _held_out_evaluation(
        model_,
        tokens,
        fit,
        held=held,
        part_idx=test_idx if test_ds is not None else val_idx,
        is_test=test_ds is not None,
        with_cls="cls" in names,
        classes=classes,
        batch_size=batch_size,
        device=trainer.device,
        baseline=(train_idx, train_ds.label_codes, objs, seed) if baseline else None,
    )
    return FinetuneResult(
        model=model_,
        status=fit.status,
        history=fit.history,
        metrics=metrics,
        report=report,
        confusion=confusion,
        classes=list(classes),
        split=split_of,
        trainer=trainer,
        tokens=tokens,
        baseline_metrics=base.pop("metrics", {}),
        baseline_settings=base,
    )


def check_finetune_options(adata: AnnData | Tokens | str, model: CellModel, **options: Any) -> TrainerConfig:
    """Check :func:`finetune`'s options without training: what it would refuse before any work.

    The same checks, in the same words, that :func:`finetune` runs first (it calls this); a UI or
    a script calls it to answer a bad setting at once instead of from a background thread. It
    reads only ``obs`` (the label, batch and split columns of the selected cells) and the model's
    configuration; what needs the tokens (a class too small to split, a single class after
    tokenization) is only found by :func:`finetune` itself.

    Parameters
    ----------
    adata
        As in :func:`finetune` (an AnnData's columns are checked; paths and tokens are not opened).
    model
        The model to fine-tune.
    **options
        :func:`finetune`'s keyword options, checked as it checks them: ``label_key``, ``batch_key``,
        ``cells``, ``split_key`` (the columns must exist and hold a value for every selected cell;
        ``batch_key`` must differ from ``label_key`` and is needed by ``"dab"``), ``objectives``
        (known, usable with the model's heads), ``val_size`` / ``test_size`` (must leave training
        cells), ``class_weight``, ``freeze_layers`` (0 … the model's layers), ``tokenize_options``
        (names of the model's scheme), ``checkpoint_dir`` (writable; created if missing) and the
        :class:`cellkit.train.TrainerConfig` fields (``seed``, ``epochs``, ``lr``, ``batch_size``,
        ``**trainer_options``). Options that only matter while training (``callbacks``,
        ``stop_event``, ``resume``, ...) are accepted and not used; an unknown name is refused.

    Returns
    -------
    :class:`cellkit.train.TrainerConfig`
        The training configuration :func:`finetune` would use.

    Raises
    ------
    ConfigError
        A bad option value or combination.
    DataError
        A missing or incomplete obs column, an AnnData with duplicate cell names.

    Examples
    --------
    >>> cellkit.tasks.check_finetune_options(adata, model, label_key="bulk_labels", lr=0)  # doctest: +SKIP
    Traceback (most recent call last):
    ConfigError: The learning rate must be a positive number, got lr=0.
    """
    try:
        bound = inspect.signature(finetune).bind(adata, model, **options)
    except TypeError as exc:
        raise ConfigError(f"check_finetune_options takes finetune's options: {exc}.") from None
    bound.apply_defaults()
    config, _ = _plan_from(bound.arguments)
    return config


#: finetune arguments checked by _finetune_plan, and those that become TrainerConfig fields
_PLAN_ARGS = (
    "label_key",
    "batch_key",
    "cells",
    "objectives",
    "val_size",
    "test_size",
    "split_key",
    "class_weight",
    "freeze_embeddings",
    "freeze_layers",
    "tokenize_options",
)
_TRAINER_ARGS = ("checkpoint_dir", "epochs", "lr", "batch_size", "seed", "progress")


def _plan_from(args: Mapping[str, Any]) -> tuple[TrainerConfig, list[Objective]]:
    """:func:`_finetune_plan` of :func:`finetune`'s arguments (its ``locals()`` or a bound signature)."""
    trainer_options = {**args["trainer_options"], **{k: args[k] for k in _TRAINER_ARGS}}
    if isinstance(trainer_options["progress"], Progress):  # it follows the tokenizing; bars as it says
        trainer_options["progress"] = trainer_options["progress"].bar
    plan = {k: args[k] for k in _PLAN_ARGS}
    return _finetune_plan(args["adata"], args["model"], **plan, trainer_options=trainer_options)


def _finetune_plan(
    adata: Any,
    model: CellModel,
    *,
    label_key: Any,
    batch_key: str | None,
    cells: Any,
    objectives: Any,
    val_size: float,
    test_size: float,
    split_key: str | None,
    class_weight: Any,
    freeze_embeddings: bool,
    freeze_layers: int,
    tokenize_options: Mapping[str, Any] | None,
    trainer_options: dict[str, Any],
) -> tuple[TrainerConfig, list[Objective]]:
    """Every check :func:`finetune` makes before any work; its trainer config and objectives."""
    config = _trainer_config(trainer_options, {"schedule": "step", "step_gamma": 0.9})
    objs = make_objectives(objectives)
    names = {o.name for o in objs}
    if not objs:
        raise ConfigError(
            "No objective: pass at least one, e.g. objectives=('cls',) (trains the classifier).",
            param="objectives",
        )
    if not isinstance(label_key, str) or not label_key:
        raise DataError(
            f"label_key must name the obs column with the cell types, got {label_key!r}.", param="label_key"
        )
    if "dab" in names and batch_key is None:
        raise ConfigError(
            "The 'dab' objective needs batch_key=... (the obs column with batches).", param="batch_key"
        )
    if batch_key is not None and batch_key == label_key:
        raise ConfigError(
            f"batch_key must differ from label_key (both are {label_key!r}).", param="batch_key"
        )
    if split_key is None:
        _check_fractions(val_size, test_size)
    _check_class_weight(class_weight)
    _ensure_heads_possible(model, names)
    freeze = _freeze_prefixes(model, freeze_embeddings, freeze_layers)
    if freeze:
        config.freeze = tuple(dict.fromkeys((*config.freeze, *freeze)))
    if config.checkpoint_dir:  # an unwritable output fails now, not after the training
        ensure_writable_dir(config.checkpoint_dir, what="checkpoint_dir")
    tokens_given = isinstance(adata, TokenizedCells | ShardedTokens) or _is_shard_directory(adata)
    if not tokens_given:
        _check_tokenize_options(model, tokenize_options)
    if not tokens_given and not isinstance(adata, str):
        _check_finetune_columns(adata, cells, label_key=label_key, batch_key=batch_key, split_key=split_key)
        if split_key is None:  # classes too small to split stay too small in any tokenization
            _check_class_sizes(_obs_of(adata, cells)[label_key], val_size=val_size, test_size=test_size)
    return config, objs


def objective_support(model: CellModel) -> dict[str, str | None]:
    """Which objectives ``model`` can be trained with: ``{name: None}`` when usable, else why not.

    ``cls`` and ``dab`` create their heads; the masked-value objectives need the model's
    ``expression`` / ``mvc`` heads (with explicit zero probabilities for the ``*zero_nll`` terms)
    and ``mlm`` an ``mlm`` head. The reason is the message :func:`finetune` / :func:`pretrain`
    would raise.

    Parameters
    ----------
    model
        A :class:`cellkit.CellModel` (only its ``config.heads`` is read).

    Returns
    -------
    dict
        One entry per name of :data:`cellkit.train.OBJECTIVES`.
    """
    from .train.objectives import OBJECTIVES

    out: dict[str, str | None] = {}
    for name in OBJECTIVES:
        try:
            _ensure_heads_possible(model, {name})
        except ConfigError as e:
            out[name] = str(e)
        else:
            out[name] = None
    return out


def label_columns(
    adata: AnnData,
    *,
    cells: Any = None,
    max_classes: int = 50,
    max_numeric_values: int = 10,
    min_class_size: int = 3,
) -> dict[str, str | None]:
    """Which obs columns can be :func:`finetune`'s ``label_key``: ``{column: None}`` if usable, else why not.

    A label column names a class per cell: categorical / text / boolean columns with 2 …
    ``max_classes`` values, or numeric columns with few distinct values (at most
    ``max_numeric_values``, e.g. a cluster number). Not offered, each with its reason: a numeric
    column with many distinct values (a measurement such as ``n_genes``, not a class), a column with
    a single value (nothing to tell apart), one with more than ``max_classes`` classes, one with
    cells lacking a value, and one with a class of fewer than ``min_class_size`` cells (too small
    for the train / validation / test split).

    Parameters
    ----------
    adata
        The AnnData (only ``obs`` is read).
    cells
        The cells that would be trained on, as :func:`finetune`'s ``cells`` (``None``: all).
    max_classes
        The most classes a label column may have.
    max_numeric_values
        The most distinct values a numeric column may have to count as labels.
    min_class_size
        The fewest cells a class may have (3 for a train / validation / test split; 1 accepts all).

    Returns
    -------
    dict
        One entry per obs column (in obs order): ``None`` when it can be a label column, else the
        reason in plain words.
    """
    obs = adata.obs.iloc[select_rows(adata.obs, cells)]
    return {
        str(c): _label_column_problem(obs[c], max_classes, max_numeric_values, min_class_size)
        for c in obs.columns
    }


def _label_column_problem(col: pd.Series, max_classes: int, max_numeric: int, min_size: int) -> str | None:
    """Why ``col`` cannot be a label column, or ``None`` when it can."""
    counts = col.dropna().astype(str).value_counts()
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if numeric and len(counts) > max_numeric:
        return f"numbers with more than {max_numeric} distinct values: a measurement, not a cell class"
    if len(counts) < 2:
        return "a single value: nothing to tell apart" if len(counts) else "no values"
    if len(counts) > max_classes:
        return f"{len(counts):,} classes, more than {max_classes}"
    if col.isna().any():
        return f"{int(col.isna().sum()):,} cells have no value"
    small = counts[counts < min_size]
    if len(small):
        return f"classes too small to split, under {min_size} cells: {_classes_text(small.sort_values(), 3)}"
    return None


def _ensure_heads_possible(model: CellModel, names: set[str]) -> None:
    """The heads the masked-value / MLM objectives need must exist (``cls`` and ``dab`` create theirs)."""
    heads = model.config.heads
    for name, head in _HEAD_NEEDS.items():
        if name in names and head not in heads:
            raise ConfigError(
                f"The {name!r} objective needs the model's {head!r} head, which it lacks (heads: {sorted(heads)})."
            )
    for name, head in (("zero_nll", "expression"), ("mvc_zero_nll", "mvc")):
        if name in names and not (heads[head] or {}).get("explicit_zero_prob"):
            raise ConfigError(
                f"The {name!r} objective needs the {head!r} head with explicit_zero_prob=True; this model's has none."
            )


def _check_finetune_columns(
    adata: AnnData, cells: Any, *, label_key: str, batch_key: str | None, split_key: str | None
) -> None:
    """Check the AnnData and its label / batch / split columns before any tokenization."""
    check_adata(adata, what="cellkit.finetune")
    obs = _obs_of(adata, cells)
    _check_label_column(obs, label_key, "label_key")
    if batch_key is not None:
        _check_label_column(obs, batch_key, "batch_key")
    if split_key is not None:
        _check_label_column(obs, split_key, "split_key")


#: the parts of a fine-tuning split, in the order of their codes
_PARTS = ("train", "val", "test")


def _no_label_column(label_key: str) -> DataError:
    return DataError(
        f"The tokens carry no {label_key!r} column; tokenize with obs_columns=[{label_key!r}].",
        param="label_key",
    )


def _check_two_classes(label_key: str, classes_all: Sequence[str]) -> None:
    if len(classes_all) < 2:
        raise DataError(
            f"label_key={label_key!r} has a single class ({list(classes_all)}) in the selected cells; a classifier "
            "needs at least two.",
            param="label_key",
            problem=f"The label column {label_key!r} has a single class ({classes_all[0]!r}) in the selected cells; "
            "a classifier needs at least two.",
        )


def _check_shard_names(tokens: ShardedTokens) -> None:
    """:func:`check_obs_names` for a shard directory, in bounded memory.

    One 64-bit hash per cell (a shard's names at a time); only names whose hashes collide are
    compared as strings, so the check is exact.
    """

    def shard_hashes(k: int) -> np.ndarray:
        names = np.asarray(tokens.shard(k, cache=False).obs_names).astype(str).astype(object)
        return pd.util.hash_array(names, categorize=False)

    hashes = np.empty(len(tokens), dtype=np.uint64)
    for k in range(tokens.n_shards):
        hashes[int(tokens.shard_offsets[k]) : int(tokens.shard_offsets[k + 1])] = shard_hashes(k)
    hashes.sort()  # in place: no index array
    twice = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if not len(twice):
        return
    # a hash seen twice: compare those cells' names themselves (hashes may collide)
    clash = np.concatenate(
        [np.flatnonzero(np.isin(shard_hashes(k), twice)) + int(tokens.shard_offsets[k]) for k in range(tokens.n_shards)]
    )
    check_obs_names(tokens.subset(clash).obs_names, what="cellkit.finetune")


def _sharded_split(
    tokens: ShardedTokens,
    *,
    label_key: str,
    split_key: str | None,
    val_size: float,
    test_size: float,
    seed: int,
) -> tuple[list[str], np.ndarray]:
    """The classes and the split codes (``_PARTS`` order) of a shard directory, out of core.

    Reads the label and split columns as category codes (no token array, no string per cell).
    The checks and the split are those of the in-memory path, and give the same split: the
    stratification sees the classes in the same (sorted) order.
    """
    _check_shard_names(tokens)
    if label_key not in tokens.obs_columns:
        raise _no_label_column(label_key)
    col = tokens.obs_column(label_key)
    cats = np.asarray(col.categories).astype(str)
    bad_cat = np.append(np.isin(cats, ["nan", "NaN", "None", ""]), True)  # the last: no category (-1)
    codes = np.asarray(col.codes)
    missing = bad_cat[codes]
    if missing.any():
        first = np.flatnonzero(missing)[:3]
        raise DataError(
            f"{int(missing.sum())} of {len(codes)} selected cells have no {label_key!r} value (NaN/empty), e.g. "
            f"{[str(n) for n in tokens.subset(first).obs_names]}. Select labelled cells before tokenizing "
            f"(cells=~adata.obs[{label_key!r}].isna()) or fill the labels.",
            param="label_key",
        )
    del missing
    counts = np.bincount(codes, minlength=len(cats))
    present = np.flatnonzero(counts)
    order = present[np.argsort(cats[present], kind="stable")]  # sorted class names, as sorted(set(labels))
    classes_all = [str(c) for c in cats[order]]
    _check_two_classes(label_key, classes_all)
    dtype = np.int8 if len(order) < 2**7 else np.int16 if len(order) < 2**15 else np.int32
    lut = np.full(len(cats), -1, dtype=dtype)
    lut[order] = np.arange(len(order), dtype=dtype)
    label_codes = lut[codes]
    del codes, col
    if split_key is not None:
        split = _split_from_column(tokens, split_key)
    else:
        split = _stratified_codes(
            label_codes, classes_all, val_size=val_size, test_size=test_size, seed=seed
        )
    if not (split == 0).any():
        raise DataError("No cell is in the training part of the split.")
    return classes_all, split


def _split_from_column(tokens: ShardedTokens, split_key: str) -> np.ndarray:
    """Split codes from a ``"train"`` / ``"val"`` / ``"test"`` obs column of a shard directory."""
    if split_key not in tokens.obs_columns:
        raise DataError(
            f"split_key={split_key!r} is not a column of these tokens; available columns: "
            f"{tokens.obs_columns or 'none'}. Keep it when tokenizing (obs_columns=[...]).",
            param="split_key",
        )
    col = tokens.obs_column(split_key)
    cats = pd.Index(np.asarray(col.categories).astype(str)).str.lower()
    codes = np.asarray(col.codes)
    used = np.unique(codes)
    names = ["nan" if c < 0 else cats[c] for c in used.tolist()]
    bad = sorted(set(names) - set(_PARTS))
    if bad:
        raise DataError(
            f"split_key={split_key!r} must hold 'train', 'val' or 'test'; found {bad[:5]}.", param="split_key"
        )
    lut = np.array([_PARTS.index(c) if c in _PARTS else -1 for c in cats], dtype=np.int8)
    return lut[codes]


def _stratified_codes(
    codes: np.ndarray, classes: Sequence[str], *, val_size: float, test_size: float, seed: int
) -> np.ndarray:
    """:func:`stratified_split` on class codes (``codes[i]`` indexes the sorted ``classes``).

    The same draws as :func:`stratified_split` on the class names (sklearn stratifies by the
    sorted classes either way), in codes: ``0`` train, ``1`` val, ``2`` test (int8).
    """
    from sklearn.model_selection import train_test_split

    n = len(codes)
    _check_fractions(val_size, test_size)
    counts = pd.Series(np.bincount(codes, minlength=len(classes)), index=pd.Index(list(classes)))
    parts = 1 + (val_size > 0) + (test_size > 0)
    if (counts < parts).any():  # the in-memory path's message (it counts the names themselves)
        names = np.asarray(classes, dtype=object)[np.flatnonzero(counts < parts)]
        _check_class_sizes(np.repeat(names, counts[counts < parts].to_numpy()), val_size=val_size, test_size=test_size)
    out = np.zeros(n, dtype=np.int8)
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # the draws do not depend on the dtype
    part = "test_size"
    try:
        rest = idx
        if test_size > 0:
            rest, test = train_test_split(idx, test_size=test_size, stratify=codes, random_state=seed)
            out[test] = 2
            del test
        part = "val_size"
        if val_size > 0:
            _, val = train_test_split(
                rest, test_size=val_size / (1 - test_size), stratify=codes[rest], random_state=seed + 1
            )
            out[val] = 1
    except ValueError as e:
        held_out = "test" if part == "test_size" else "validation"
        problem = (
            f"Cannot split {n:,} cells of {len(classes)} classes with stratification: the {held_out} part is too "
            f"small to hold a cell of every class."
        )
        raise DataError(
            f"Cannot split {n} cells of {len(classes)} classes into val_size={val_size}, test_size={test_size} "
            f"with stratification: {e}. Use larger fractions, fewer classes, or split_key=... .",
            param=part,
            problem=problem,
        ) from None
    return out


def _split_series(tokens: ShardedTokens, split_codes: np.ndarray) -> pd.Series:
    """``FinetuneResult.split`` of a shard directory: the part of each cell, indexed by cell name."""
    values = np.asarray(_PARTS, dtype=object)[split_codes]
    return pd.Series(values, index=pd.Index(tokens.obs_names), name="split")


def _finetune_split(
    obs: pd.DataFrame,
    labels: np.ndarray,
    *,
    split_key: str | None,
    val_size: float,
    test_size: float,
    seed: int,
) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"test"`` per cell: from ``split_key`` or a seeded stratified split."""
    if split_key is not None:
        split = obs[split_key].astype(str).str.lower().to_numpy()
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise DataError(
                f"split_key={split_key!r} must hold 'train', 'val' or 'test'; found {bad[:5]}.",
                param="split_key",
            )
    else:
        split = stratified_split(labels, val_size=val_size, test_size=test_size, seed=seed)
    if not (split == "train").any():
        raise DataError("No cell is in the training part of the split.")
    return split


def _finetune_datasets(
    tokens: Tokens,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    label_key: str,
    batch_key: str | None,
    classes: Sequence[str],
) -> tuple[CellDataset, CellDataset | None, CellDataset | None]:
    """The train / validation / test datasets (``None`` for an empty part), sharing the train classes."""
    train_idx, val_idx, test_idx = parts
    train_ds = CellDataset(
        _subset(tokens, train_idx), label_key=label_key, batch_key=batch_key, classes=classes
    )

    def held_out(idx: np.ndarray) -> CellDataset | None:
        if not len(idx):
            return None
        return CellDataset(
            _subset(tokens, idx),
            label_key=label_key,
            batch_key=batch_key,
            classes=train_ds.classes,
            batch_classes=train_ds.batch_classes,
        )

    return train_ds, held_out(val_idx), held_out(test_idx)


def _best_epoch_metrics(fit: Any) -> dict[str, Any]:
    """The metrics of the epoch whose weights were kept (the best one), not of the last epoch."""
    if fit.best_step is not None:
        for rec in fit.history.epoch_records:
            if rec.get("step") == fit.best_step and any(k.startswith("val/") for k in rec):
                return rec
    return fit.metrics


def _held_out_evaluation(
    model: CellModel,
    tokens: Tokens,
    fit: Any,
    *,
    held: CellDataset | None,
    part_idx: np.ndarray,
    is_test: bool,
    with_cls: bool,
    classes: Sequence[str],
    batch_size: int,
    device: Any,
    baseline: tuple[np.ndarray, np.ndarray, list[Objective], int] | None = None,
) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Validation metrics of the best epoch plus classification metrics, report and confusion on held-out cells.

    ``baseline``: ``(train_idx, train_codes, objectives, seed)`` to fit the logistic regression
    baseline on the training cells and score it on the same held-out cells; the last item returned
    is its settings with its ``metrics`` (empty without it).
    """
    chosen = _best_epoch_metrics(fit)
    metrics: dict[str, float] = {k: v for k, v in chosen.items() if k.startswith("val/")}
    report = pd.DataFrame()
    confusion = pd.DataFrame()
    base: dict[str, Any] = {}
    if held is not None and with_cls and fit.status in ("completed", "early_stopped"):
        part = _subset(tokens, part_idx)
        probs = class_probabilities(
            model, part, batch_size=max(batch_size, 64), progress=False, device=device
        )
        y_true = held.label_codes  # from the label column; the cells' tokens are not read again
        y_pred = probs.argmax(1)
        metrics.update(_classification_metrics(y_true, y_pred, classes))
        report, confusion = _report(y_true, y_pred, classes)
        if not is_test:
            log.warning(
                "test_size=0: the held-out metrics are on the validation cells that chose the best epoch."
            )
        if baseline is not None:
            base = _baseline_evaluation(model, tokens, part_idx, y_true, classes, *baseline)
    return metrics, report, confusion, base


def _baseline_evaluation(
    model: CellModel,
    tokens: Tokens,
    part_idx: np.ndarray,
    y_true: np.ndarray,
    classes: Sequence[str],
    train_idx: np.ndarray,
    train_codes: np.ndarray,
    objectives: list[Objective],
    seed: int,
) -> dict[str, Any]:
    """The logistic regression baseline on the model's inputs, scored on the held-out cells ``part_idx``."""
    from .analysis._baselines import logistic_baseline

    weights = next((getattr(o, "class_weights", None) for o in objectives if o.name == "cls"), None)
    y_base, settings = logistic_baseline(
        tokens,
        train_idx,
        train_codes,
        part_idx,
        n_features=len(model.vocab),
        specials={*model.vocab.special_ids, *(int(i) for i in tokens.specials.values())},
        max_len=model.config.input.max_length,
        class_weights=weights,
        seed=seed,
    )
    if y_base is not None:
        settings["metrics"] = _classification_metrics(y_true, y_base, classes)
    return settings


def _classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    labels = np.arange(len(classes))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # averaged over the classes of the test cells' truth (a class only predicted adds no zero)
        "macro_f1": macro_f1(y_true, y_pred, labels=np.unique(y_true)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
    }


def _report(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    report = pd.DataFrame(
        {"precision": p, "recall": r, "f1": f, "support": s}, index=pd.Index(classes, name="class")
    )
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    confusion = pd.DataFrame(
        cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted")
    )
    return report, confusion


# ============================================================================== predict
def predict(
    adata: AnnData,
    model: CellModel,
    *,
    key_added: str = "cellkit_prediction",
    cells: Any = None,
    batch_size: int | str = 64,
    device: str = "auto",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
    progress: bool | Progress = True,
    precision: str = "fp32",
    output: str | os.PathLike[str] | None = None,
    chunk_size: int = 20_000,
) -> AnnData | None:
    """Predict cell types with a fine-tuned model's classifier.

    Writes ``obs[key_added]`` (categorical label), ``obs[key_added + "_confidence"]`` (the
    label's probability), ``obsm[key_added + "_probabilities"]`` (``(n_obs, n_classes)``) and
    ``uns[key_added] = {"classes": [...]}``. Cells outside ``cells`` get NaN.

    Parameters
    ----------
    adata
        The cells (same expression convention as the model was fine-tuned on).
    model
        A model with a ``classifier`` head (from :func:`finetune`).
    key_added
        Base name of the keys written. Existing entries that cellkit did not write (e.g. the true
        labels in ``obs["cell_type"]``) are refused unless ``overwrite``.
    cells
        Which cells to predict (default all).
    batch_size, device
        Inference batch size and device (``"auto"``: CUDA when available). ``batch_size="auto"``:
        64, halved after each out-of-memory error (the pass starts over), so the probabilities are
        exactly those of the fixed size that worked; it is logged and recorded as
        ``uns[key_added]["batch_size"]`` (see :class:`cellkit._inference.AutoBatchSize`).
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize`.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Replace the entries even when cellkit did not write them.
    progress
        ``True``: progress bars (tokenizing, predicting); a :class:`cellkit.Progress` follows both
        steps and can cancel them (:class:`cellkit.Cancelled`; nothing is written).
    precision
        ``"fp32"`` (default, exact), ``"bf16"`` (GPUs and CPUs with bf16 units; elsewhere it stays
        fp32 with a warning) or ``"fp16"`` (CUDA).
    output, chunk_size
        Write the predictions to a file instead of ``adata`` — ``OUT.h5ad`` (a copy of the input with
        the same keys) or a directory of ``.npy`` arrays — in chunks of ``chunk_size`` cells,
        resumable and ``torchrun``-parallel (:func:`cellkit.analysis.atlas.predict_to_output`; what
        ``cellkit predict`` runs). ``adata`` may then also be tokens or a shard directory.

    Returns
    -------
    ``None`` (``adata`` updated, or ``output`` written), or the updated copy with ``copy=True``.

    Raises
    ------
    DataError
        Duplicate ``obs_names``, a taken ``key_added``, or probabilities that come out NaN / infinite.
    """
    if output is not None:
        if copy:
            raise ConfigError("output= writes a file; copy=True (a modified AnnData) does not go with it.")
        from .analysis.atlas import predict_to_output

        predict_to_output(
            adata,
            model,
            output=output,
            key_added=key_added,
            cells=cells,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=device,
            precision=precision,
            tokenize_options=tokenize_options,
            layer=layer,
            use_raw=use_raw,
            gene_column=gene_column,
            overwrite=overwrite,
            progress=progress,
        )
        return None
    from ._inference import AutoBatchSize, check_precision, to_batch_size

    check_adata(adata, what="cellkit.predict")
    check_precision(precision)  # before any tokenizing
    batch_size = to_batch_size(batch_size)
    written = [
        ("obs", key_added),
        ("obs", f"{key_added}_confidence"),
        ("obsm", f"{key_added}_probabilities"),
        ("uns", key_added),
    ]
    check_keys_free(adata, written, overwrite=overwrite, what="cellkit.predict")
    head = model.config.heads.get("classifier")
    if head is None:
        raise ConfigError(
            "This model has no classifier head; fine-tune it first: result = cellkit.finetune(adata, model, label_key=...)."
        )
    classes = head.get("labels") or [str(i) for i in range(head["n_classes"])]
    tokens = _tokens_for(
        adata,
        model,
        cells=cells,
        obs_columns=[],
        tokenize_options=tokenize_options,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        progress=progress,
    )
    probs = class_probabilities(
        model, tokens, batch_size=batch_size, progress=progress, device=device, precision=precision
    )
    check_finite_rows(probs, what="class probabilities", names=tokens.obs_names)
    target = adata.copy() if copy else adata
    pos = target.obs_names.get_indexer(np.asarray(tokens.obs_names).astype(str))
    if (pos < 0).any():  # pragma: no cover - tokenize keeps obs names
        raise DataError("Predicted cells could not be matched back to the AnnData's obs names.")
    full = np.full((target.n_obs, len(classes)), np.nan, dtype=np.float32)
    full[pos] = probs
    label = np.full(target.n_obs, None, dtype=object)
    label[pos] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    conf = np.full(target.n_obs, np.nan, dtype=np.float32)
    conf[pos] = probs.max(1)
    target.obs[key_added] = pd.Categorical(label, categories=classes)
    target.obs[f"{key_added}_confidence"] = conf
    target.obsm[f"{key_added}_probabilities"] = full
    target.uns[key_added] = {"classes": list(classes)}
    if isinstance(batch_size, AutoBatchSize):  # what ran: planned batches, cells per forward pass
        target.uns[key_added]["batch_size"] = {"auto": batch_size.start, "worked": batch_size.size}
    record_written(target, written)
    return target if copy else None


# ============================================================================== pretrain
_PRETRAIN_DEFAULTS = {
    "scgpt": {"gep": 1.0, "mvc": 1.0},
    "geneformer": {"mlm": 1.0},
    "perturbgene": {"mlm": {"label_smoothing": 0.5}},
    "cellkit": {"gep": 1.0},
}


@_one_run
@recorded("cellkit.pretrain")
def pretrain(
    adata: AnnData | Tokens | str,
    model: CellModel,
    *,
    objectives: Any = None,
    cells: Any = None,
    obs_columns: Sequence[str] = (),
    val_size: float = 0.05,
    seed: int = 0,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 32,
    mask_ratio: float | None = None,
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    callbacks: Iterable[Callback | Callable[[Event], Any]] = (),
    stop_event: threading.Event | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    **trainer_options: Any,
) -> PretrainResult:
    """Pretrain a model (e.g. fresh from :func:`cellkit.presets.build_model`) with self-supervision.

    Parameters
    ----------
    adata
        Cells (AnnData, ``.h5ad`` path) or cells tokenized with this model; a token shard
        directory (or its path) is trained on out of core, as in :func:`finetune`.
    model
        The model to train in place; its family picks the default objectives: scGPT → masked
        value regression (``gep``) + ``mvc`` (if the head exists); Geneformer → token MLM;
        PerturbGene → phenotypic MLM with label smoothing 0.5.
    objectives
        Override the objectives (names, ``{name: weight}``, instances).
    cells, obs_columns
        Cell selection; obs columns carried into the tokens (PerturbGene phenotypes).
    val_size
        Fraction of cells held out for validation loss (random, seeded).
    seed, epochs, lr, batch_size, mask_ratio
        As in :func:`finetune`; ``mask_ratio`` is the masked fraction (scGPT values: 0.4,
        Geneformer tokens: 0.15, PerturbGene genes: 0.15).
    tokenize_options, layer, use_raw, gene_column, callbacks, stop_event, checkpoint_dir, resume, progress
        As in :func:`finetune`.
    **trainer_options
        :class:`cellkit.train.TrainerConfig` fields.

    Returns
    -------
    :class:`PretrainResult`
    """
    config = _trainer_config(
        {**trainer_options, "checkpoint_dir": checkpoint_dir},
        {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "progress": progress},
    )
    if config.checkpoint_dir:  # an unwritable output fails now, not after the training
        ensure_writable_dir(config.checkpoint_dir, what="checkpoint_dir")
    family = model.config.family
    if objectives is None:
        spec = dict(_PRETRAIN_DEFAULTS.get(family, {"gep": 1.0}))
        if "mvc" in spec and "mvc" not in model.heads:
            del spec["mvc"]
        objectives = spec
    objs = make_objectives(objectives)
    if any(o.name in ("cls", "dab") for o in objs):
        raise ConfigError(
            "pretrain is self-supervised; use finetune(...) for the 'cls' and 'dab' objectives."
        )
    if not objs:
        raise ConfigError(
            "No objective: pass at least one (e.g. objectives={'gep': 1.0}) or None for the default."
        )
    _check_fractions(val_size, 0.0)
    _ensure_heads(model, objs, n_classes=None, classes=None, n_batches=None)
    check_adata(adata, what="cellkit.pretrain", allow_other=True)
    tokens = _tokens_for(
        adata,
        model,
        cells=cells,
        obs_columns=list(obs_columns),
        tokenize_options=tokenize_options,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        progress=progress,
    )
    n = len(tokens)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = round(n * val_size)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    train_ds = CellDataset(_subset(tokens, train_idx))
    val_ds = CellDataset(_subset(tokens, val_idx)) if n_val else None
    collate = _collator(model, tokens, objs, mask_ratio=mask_ratio)
    val_collate = _copy.deepcopy(collate)
    trainer = Trainer(model, objs, config, callbacks=callbacks, stop_event=stop_event)
    fit = trainer.fit(train_ds, val_ds, collate_fn=collate, val_collate_fn=val_collate, resume=resume)
    return PretrainResult(
        model=model, status=fit.status, history=fit.history, metrics=fit.metrics, trainer=trainer
    )
