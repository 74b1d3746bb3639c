"""Perturbation-response prediction: the expression of a cell after one or two genes are perturbed.

The design is scGPT's ``TransformerGenerator`` and its perturbation tutorial (GEARS data layout):

* **Input**: a *control* cell — its genes as tokens, its log1p-normalised expression as continuous
  values (``value_encoder="continuous"``) — plus a per-token **perturbation flag**: 0 = not
  perturbed, 1 = perturbed, 2 = padding. The flag is embedded and added to the gene and value
  embeddings, ``h0 = LN(E_gene[g]) + f_value(x) + E_flag[flag]``. cellkit's core already adds a
  token-type embedding at exactly that place (:class:`cellkit.core.CellEmbeddings`, after the
  gene LayerNorm and the value encoder, before any embedding norm), so the flags are the core's
  ``token_type_ids`` with ``type_vocab_size=3``; no new input was needed.
* **Output**: the expression decoder (``expression`` head, scGPT's ``ExprDecoder``) predicts
  every input gene's expression in the *perturbed* state.
* **Training**: every perturbed cell is paired with a random control cell (seeded; GEARS and
  the tutorial do the same); the loss is the MSE over the cell's genes (scGPT's
  ``masked_mse_loss`` with every real token counted: :class:`cellkit.train.MaskedValueMSE`).
  Control cells are trained on too, with no flag set and a random control cell as input, so
  "no flag" means "the control state". With more genes than ``max_genes`` each cell gets a
  random subset of its genes (the perturbed ones always included), as scGPT samples to
  ``max_seq_len``.
* **Prediction**: the mean predicted expression over control cells, per perturbation; with more
  genes than ``max_genes`` the genes are split into chunks that each carry the perturbed genes.

Differences from scGPT, on purpose: no BatchNorm after the embedding sum (scGPT's "hotfix"
``bn``); the flag embedding has no frozen padding row (padded tokens are masked out of attention
and loss anyway) and starts at zero, so a pretrained model's outputs are unchanged until training
moves it; genes are drawn per cell rather than per batch; a gene never perturbed in training is
refused at prediction unless ``allow_unseen=True`` (scGPT would flag any vocabulary gene, but
its flag then carries no learned meaning for that gene).

Examples
--------
>>> import cellkit
>>> from cellkit.datasets import synthetic_perturbation
>>> adata = synthetic_perturbation(n_genes=60, n_single=6, n_double=3, seed=0)  # doctest: +SKIP
>>> double = [c for c in adata.obs["condition"].cat.categories if "ctrl" not in c][0]  # doctest: +SKIP
>>> train = adata[adata.obs["condition"] != double].copy()  # an unseen combination of seen genes  # doctest: +SKIP
>>> result = cellkit.fit_perturbation_model(train)  # doctest: +SKIP
>>> pred = result.predict([double])  # genes x perturbations  # doctest: +SKIP
>>> cellkit.evaluate_perturbation(adata, pred)  # Pearson delta vs the mean baseline  # doctest: +SKIP
"""

from __future__ import annotations

import copy as _copy
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._anndata import check_adata
from ._errors import CheckpointError, ConfigError, DataError
from ._inference import resolve_device
from ._utils import get_logger
from .model import CellModel, load_model
from .train.events import Callback, Event
from .train.objectives import MaskedValueMSE
from .train.trainer import History, Trainer, TrainerConfig

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData

__all__ = [
    "FLAG_NOT_PERTURBED",
    "FLAG_PAD",
    "FLAG_PERTURBED",
    "PerturbationArchitecture",
    "PerturbationCollator",
    "PerturbationModel",
    "check_conditions",
    "evaluate_perturbation",
    "fit_perturbation_model",
    "load_perturbation_model",
    "pair_controls",
    "parse_condition",
]

log = get_logger(__name__)

#: per-token perturbation flags (the core's ``token_type_ids``)
FLAG_NOT_PERTURBED, FLAG_PERTURBED, FLAG_PAD = 0, 1, 2
N_FLAGS = 3
FORMAT_NAME = "cellkit-perturbation"
FORMAT_VERSION = 1
META_FILE, CONTROL_FILE, MODEL_DIR = "perturbation.json", "control_cells.safetensors", "model"


# ============================================================================== conditions
def parse_condition(condition: str, *, control: str = "ctrl") -> tuple[str, ...]:
    """The perturbed genes of a GEARS-style condition label.

    Parameters
    ----------
    condition
        ``"A+ctrl"`` (single), ``"A+B"`` (double; any number of ``+``-joined genes is accepted)
        or the control label alone. Whitespace around the parts is ignored.
    control
        The control label.

    Returns
    -------
    The genes in the order written: ``"A+ctrl"`` → ``("A",)``, ``"A+B"`` → ``("A", "B")``,
    ``"ctrl"`` → ``()``.

    Raises
    ------
    DataError
        For a non-string, an empty part (``"A+"``, ``"+A"``, ``""``), a gene named twice
        (``"A+A"``) or a label made of control parts only (``"ctrl+ctrl"``).

    Examples
    --------
    >>> parse_condition("KLF1+ctrl"), parse_condition("KLF1+MAP2K6"), parse_condition("ctrl")
    (('KLF1',), ('KLF1', 'MAP2K6'), ())
    """
    hint = f"write '{control}', 'GENE+{control}' or 'GENE1+GENE2'."
    if not isinstance(condition, str):
        raise DataError(f"A perturbation condition must be a string, got {condition!r}; {hint}")
    parts = [p.strip() for p in condition.split("+")]
    if any(not p for p in parts):
        raise DataError(f"Perturbation condition {condition!r} has an empty part; {hint}")
    if parts == [control]:
        return ()
    genes = tuple(p for p in parts if p != control)
    if not genes:
        raise DataError(f"Perturbation condition {condition!r} names no gene; {hint}")
    if len(set(genes)) != len(genes):
        raise DataError(f"Perturbation condition {condition!r} names a gene twice; {hint}")
    return genes


def _condition_genes(labels: Iterable[str], control: str) -> dict[str, tuple[str, ...]]:
    """label → genes for every distinct label; all bad labels reported at once."""
    out: dict[str, tuple[str, ...]] = {}
    bad: list[str] = []
    for lab in dict.fromkeys(labels):
        try:
            out[lab] = parse_condition(lab, control=control)
        except DataError:
            bad.append(lab)
    if bad:
        raise DataError(
            f"{len(bad)} condition label(s) do not parse: {bad[:5]}; write '{control}', 'GENE+{control}' or "
            "'GENE1+GENE2'."
        )
    return out


def pair_controls(
    conditions: Sequence[str] | np.ndarray, *, control: str = "ctrl", seed: int = 0
) -> np.ndarray:
    """For every cell, the index of a random control cell to use as its input (seeded).

    Parameters
    ----------
    conditions
        ``(n_cells,)`` condition labels.
    control
        The control label.
    seed
        Seed of the draw; the same labels and seed give the same pairing.

    Returns
    -------
    ``(n_cells,)`` int64 indices into ``conditions``, each pointing at a control cell (control
    cells are paired with a random control cell too).

    Raises
    ------
    DataError
        When there is no control cell.
    """
    labels = np.asarray(conditions).astype(str)
    ctrl = np.flatnonzero(labels == control)
    if len(ctrl) == 0:
        found = list(dict.fromkeys(labels.tolist()))[:8]
        raise DataError(
            f"No control cells: no condition equals {control!r} (found {found}). Pass control=... with the "
            "label of the unperturbed cells."
        )
    rng = np.random.default_rng(seed)
    return ctrl[rng.integers(0, len(ctrl), size=len(labels))].astype(np.int64)


# ============================================================================== data
class _PairedCells(torch.utils.data.Dataset):
    """Items ``{index, input, target, perturbed}``: a control row, the target row, flagged positions."""

    def __init__(self, x: Any, rows: np.ndarray, pairs: np.ndarray, perturbed: list[np.ndarray]) -> None:
        self.x, self.rows, self.pairs, self.perturbed = x, rows, pairs, perturbed

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, i: int) -> np.ndarray:
        r = self.x[i]
        r = r.toarray() if hasattr(r, "toarray") else r
        return np.asarray(r, dtype=np.float32).reshape(-1)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.rows[k])
        return {
            "index": i,
            "input": self._row(int(self.pairs[i])),
            "target": self._row(i),
            "perturbed": self.perturbed[i],
        }


@dataclass
class PerturbationCollator:
    """Turn paired cells into a batch of :meth:`cellkit.CellModel.forward` kwargs plus MSE targets.

    Parameters
    ----------
    token_ids
        ``(n_genes,)`` vocabulary ids of the data's genes (column order of the expression rows).
    pad_id
        Token id at padding.
    max_genes
        Genes per cell; with more genes, each cell keeps its perturbed genes and a random
        sample of the others (a hash of ``seed``, ``epoch`` and the cell index, so any batch
        order gives the same draw); a cell with more perturbed genes than that keeps just them.
        ``None``: all genes.
    pad_value
        Input and target value at padding.
    seed, epoch
        Randomness of the gene sampling (:meth:`set_epoch` is called by the trainer).

    Notes
    -----
    Items are ``{"index": int, "input": (n_genes,), "target": (n_genes,), "perturbed": (k,)}``
    (``perturbed``: column positions of the perturbed genes). The batch holds ``gene_ids``
    ``(B, L)`` int64, ``values`` ``(B, L)`` float32 (the control cell), ``token_type_ids``
    ``(B, L)`` int64 (flags 0 / 1 / 2), ``padding_mask`` ``(B, L)`` bool, ``target_values``
    ``(B, L)`` float32 (the perturbed cell), ``mlm_mask`` ``(B, L)`` bool (every real token:
    where the MSE counts), ``positions`` ``(B, L)`` int64 (gene column, -1 at padding) and
    ``index`` ``(B,)``. Tokens are in gene-column order (the core has no positional encoding).
    """

    token_ids: np.ndarray
    pad_id: int
    max_genes: int | None = None
    pad_value: float = 0.0
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        if self.max_genes is not None and self.max_genes < 1:
            raise ConfigError(f"max_genes must be a positive integer or None, got {self.max_genes!r}.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def positions(self, index: int, perturbed: np.ndarray) -> np.ndarray:
        """Sorted gene columns kept for one cell (all of them, or ``max_genes`` incl. the perturbed)."""
        n = len(self.token_ids)
        if self.max_genes is None or n <= self.max_genes:
            return np.arange(n)
        perturbed = np.asarray(perturbed, dtype=np.int64)
        if len(perturbed) >= self.max_genes:  # the perturbed genes are always kept
            return np.sort(perturbed)
        rest = np.setdiff1d(np.arange(n), perturbed)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        pick = rng.choice(rest, size=self.max_genes - len(perturbed), replace=False)
        return np.sort(np.concatenate([perturbed, pick]))

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pos = [self.positions(int(it["index"]), it["perturbed"]) for it in items]
        b, width = len(items), max(len(p) for p in pos)
        gene_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        values = np.full((b, width), self.pad_value, dtype=np.float32)
        target = np.full((b, width), self.pad_value, dtype=np.float32)
        flags = np.full((b, width), FLAG_PAD, dtype=np.int64)
        cols = np.full((b, width), -1, dtype=np.int64)
        for r, (it, p) in enumerate(zip(items, pos, strict=True)):
            n = len(p)
            gene_ids[r, :n] = self.token_ids[p]
            values[r, :n] = np.asarray(it["input"], dtype=np.float32)[p]
            target[r, :n] = np.asarray(it["target"], dtype=np.float32)[p]
            flags[r, :n] = np.where(np.isin(p, it["perturbed"]), FLAG_PERTURBED, FLAG_NOT_PERTURBED)
            cols[r, :n] = p
        pad = cols < 0
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "values": torch.from_numpy(values),
            "token_type_ids": torch.from_numpy(flags),
            "padding_mask": torch.from_numpy(pad),
            "target_values": torch.from_numpy(target),
            "mlm_mask": torch.from_numpy(~pad),
            "positions": torch.from_numpy(cols),
            "index": torch.as_tensor([int(it["index"]) for it in items], dtype=torch.int64),
        }


def _expression(adata: AnnData, genes: Sequence[str], layer: str | None) -> Any:
    """Cells × ``genes`` matrix (dense float32 or CSR), checked to be non-negative and finite."""
    import scipy.sparse as sp

    cols = adata.var_names.get_indexer(list(genes))
    m = adata.layers[layer] if layer is not None else adata.X
    if m is None:
        raise DataError("The AnnData has no expression matrix (.X is None); pass layer=... .")
    m = m[:, cols]
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float32)
        data = m.data
    else:
        m = np.asarray(m, dtype=np.float32)
        data = m
    if data.size and (not np.isfinite(data).all() or data.min() < 0):
        raise DataError(
            "The expression values must be finite and non-negative: log1p-normalised expression as in scGPT's "
            "perturbation recipe (sc.pp.normalize_total + sc.pp.log1p), not z-scores."
        )
    if data.size and data.max() > 30:
        log.warning(
            "expression values go up to %.0f: this looks like raw counts; scGPT's recipe uses log1p-normalised "
            "expression (sc.pp.normalize_total(adata, 1e4); sc.pp.log1p(adata)).",
            float(data.max()),
        )
    return m


def _dense_rows(m: Any, rows: np.ndarray) -> np.ndarray:
    r = m[rows]
    return np.asarray(r.toarray() if hasattr(r, "toarray") else r, dtype=np.float32)


def _mean_value(m: Any, rows: np.ndarray) -> float:
    sub = m[rows]
    return float(sub.sum() / max(1, sub.shape[0] * sub.shape[1]))


def _check_column(adata: AnnData, key: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise DataError(
            f"condition_key={key!r} is not an obs column; available: {list(adata.obs.columns)[:20]}."
        )
    col = adata.obs[key]
    if col.isna().any():
        raise DataError(f"{int(col.isna().sum())} cells have no {key!r} value; drop them or fill the labels.")
    return col.astype(str).to_numpy()


# ============================================================================== model
def _enable_flags(model: CellModel) -> None:
    """Give ``model`` the 3-row perturbation-flag embedding (as token types) and an expression head."""
    enc = model.config.encoder
    if enc.value_encoder != "continuous":
        raise ConfigError(
            "Perturbation-response prediction reads continuous log1p expression values "
            f"(value_encoder='continuous'); this model has value_encoder={enc.value_encoder!r}."
        )
    if enc.type_vocab_size == 0:
        ref = model.encoder.embeddings.gene.weight
        emb = nn.Embedding(N_FLAGS, enc.d_model, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(emb.weight)  # flags start as a no-op: a pretrained model's outputs are unchanged
        enc.type_vocab_size = N_FLAGS  # the one EncoderConfig shared by config, encoder and embeddings
        model.encoder.embeddings.token_type = emb
    elif enc.type_vocab_size != N_FLAGS:
        raise ConfigError(
            f"This model already uses {enc.type_vocab_size} token types for something else; perturbation flags "
            f"need a model without token types (or with exactly {N_FLAGS}: a perturbation model)."
        )
    if "expression" not in model.heads:
        model.add_head("expression")
    model.config.metadata["perturbation_flags"] = {
        str(FLAG_NOT_PERTURBED): "not perturbed",
        str(FLAG_PERTURBED): "perturbed",
        str(FLAG_PAD): "pad",
    }


@dataclass(frozen=True)
class PerturbationArchitecture:
    """The shape of a fresh perturbation-response model (an scGPT-style transformer).

    :func:`fit_perturbation_model` builds it with :func:`cellkit.presets.build_model`
    (``family="scgpt"``, no MVC decoder; the gene-token table re-drawn from N(0, 1), see
    :meth:`build`) when no ``model`` is given; training options are separate keywords of
    :func:`fit_perturbation_model`.

    Parameters
    ----------
    d_model
        Width of the token states.
    n_heads
        Attention heads (must divide ``d_model``).
    n_layers
        Transformer layers.
    d_ff
        Width of the feed-forward block.
    dropout
        Dropout probability in the transformer.

    Examples
    --------
    >>> arch = PerturbationArchitecture(d_model=32, n_heads=2, n_layers=1, d_ff=64)
    >>> fit_perturbation_model(adata, architecture=arch, epochs=5)  # doctest: +SKIP
    """

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(
                    f"PerturbationArchitecture: {name} must be a positive integer, got {value!r}."
                )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"PerturbationArchitecture: n_heads={self.n_heads} must divide d_model={self.d_model}."
            )
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ConfigError(f"PerturbationArchitecture: dropout must be in [0, 1), got {self.dropout!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the keywords of :func:`cellkit.presets.scgpt_config`)."""
        return {
            "d_model": int(self.d_model),
            "n_heads": int(self.n_heads),
            "n_layers": int(self.n_layers),
            "d_ff": int(self.d_ff),
            "dropout": float(self.dropout),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationArchitecture:
        """Build from a dict of the fields (missing ones take their defaults).

        Parameters
        ----------
        data
            ``{"d_model": ..., "n_heads": ..., ...}``.

        Raises
        ------
        ConfigError
            For a key that is not a field, or an invalid value.
        """
        unknown = sorted(set(data) - {"d_model", "n_heads", "n_layers", "d_ff", "dropout"})
        if unknown:
            raise ConfigError(
                f"Unknown architecture option(s) {unknown}; a PerturbationArchitecture has d_model, n_heads, "
                "n_layers, d_ff and dropout."
            )
        return cls(**dict(data))

    def build(self, genes: Sequence[str], *, seed: int = 0) -> CellModel:
        """A fresh, seeded scGPT-style model over ``genes`` with this shape (no flags yet).

        :func:`cellkit.presets.build_model`'s weights, except the gene-token table: N(0, 1)
        (``nn.Embedding``'s default, padding row 0) instead of scGPT's U(-0.1, 0.1), the scale
        the training defaults of :func:`fit_perturbation_model` are tuned at.

        Parameters
        ----------
        genes
            The model's genes.
        seed
            Seed of the initial weights.
        """
        from .presets import build_model

        model = build_model(list(genes), family="scgpt", mvc=False, seed=seed, **self.to_dict())
        _draw_gene_table(model, seed)
        return model


#: std of a fresh perturbation model's gene-token table: ``nn.Embedding``'s default N(0, 1), the
#: scale :func:`fit_perturbation_model`'s defaults (lr 3e-3, 15 epochs, batch 16) were tuned at
GENE_TABLE_INIT_STD = 1.0


@torch.no_grad()
def _draw_gene_table(model: CellModel, seed: int) -> None:
    """Re-draw the gene-token table of a fresh model from N(0, GENE_TABLE_INIT_STD), seeded; padding row 0.

    :func:`cellkit.presets.build_model` draws it from scGPT's U(-0.1, 0.1) (std 0.058). Behind
    the gene LayerNorm only each row's direction matters, but Adam moves an entry by about ``lr``
    per step whatever its scale, so a 17x smaller table turns far faster at the same lr (the
    benchmark's rows after 3 epochs: cosine 0.86 to their start instead of 0.998). With
    that table the defaults (lr 3e-3, 15 epochs) stall near the mean-response loss
    (``benchmarks/perturbation_response.py``: validation MSE 0.205 instead of 0.154, held-out
    Pearson delta 0.65 instead of 0.89). The same generator seed gives the table the old
    ``nn.Embedding`` default draw exactly (the gene table is the first tensor a model draws).
    """
    emb = model.encoder.embeddings.gene
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    w = torch.randn(emb.weight.shape, generator=gen, dtype=torch.float32) * GENE_TABLE_INIT_STD
    emb.weight.copy_(w.to(device=emb.weight.device, dtype=emb.weight.dtype))
    if emb.padding_idx is not None:
        emb.weight[emb.padding_idx].zero_()


# ============================================================================== result
@dataclass
class PerturbationModel:
    """A trained perturbation-response model (what :func:`fit_perturbation_model` returns).

    Attributes
    ----------
    model
        The :class:`cellkit.CellModel` (flags as ``token_type_ids``, ``expression`` head).
    genes
        The genes the model reads and predicts, in column order.
    seen_genes
        Genes perturbed in the training cells; :meth:`predict` accepts perturbations of these.
    train_conditions
        The perturbation conditions of the training cells (control excluded).
    control_cells
        ``(n_control, n_genes)`` float32 expression of control cells, the default input of
        :meth:`predict` (all training control cells; at most ``max_saved_control`` after loading).
    history
        Training history (:class:`cellkit.train.History`).
    status
        ``"completed"``, ``"early_stopped"``, ``"stopped"``, ``"interrupted"`` or ``"loaded"``.
    metrics
        Last validation / training metrics.
    condition_key, control, max_genes, seed
        The settings of the fit.
    trainer
        The :class:`cellkit.train.Trainer` (``None`` after loading).
    """

    model: CellModel
    genes: list[str]
    seen_genes: list[str]
    train_conditions: list[str]
    control_cells: np.ndarray = field(repr=False)
    history: History = field(default_factory=History, repr=False)
    status: str = "completed"
    metrics: dict[str, float] = field(default_factory=dict)
    condition_key: str = "condition"
    control: str = "ctrl"
    max_genes: int | None = None
    seed: int = 0
    trainer: Trainer | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"PerturbationModel(status={self.status!r}, {len(self.genes)} genes, {len(self.seen_genes)} perturbable "
            f"genes seen in {len(self.train_conditions)} conditions, {len(self.control_cells)} control cells, "
            f"{len(self.history.epoch_records)} epochs)"
        )

    # ------------------------------------------------------------------ predict
    def check_perturbations(
        self, perturbations: str | Sequence[str], *, allow_unseen: bool = False
    ) -> list[tuple[str, ...]]:
        """The genes of each perturbation, checked to be predictable (what :meth:`predict` checks first).

        Parameters
        ----------
        perturbations
            Condition labels (``"A+ctrl"``, ``"A+B"``), or one label.
        allow_unseen
            Accept genes never perturbed in training.

        Returns
        -------
        One tuple of genes per label (``()`` for the control label).

        Raises
        ------
        DataError
            For a label that does not parse, a gene outside :attr:`genes` (the message names close
            matches) or a gene never perturbed in training (unless ``allow_unseen``).
        """
        from .data.vocab import unknown_gene_error

        if isinstance(perturbations, str):
            perturbations = [perturbations]
        parsed = [parse_condition(p, control=self.control) for p in perturbations]
        known, seen = set(self.genes), set(self.seen_genes)
        missing = list(dict.fromkeys(g for gs in parsed for g in gs if g not in known))
        if missing:
            err = unknown_gene_error(
                missing, self.genes, where=f"the response model's {len(self.genes)} genes"
            )
            raise DataError(f"{err} They cannot be flagged.") from None
        unseen = list(dict.fromkeys(g for gs in parsed for g in gs if g not in seen))
        if unseen and not allow_unseen:
            shown = ", ".join(self.seen_genes[:10]) + (" …" if len(seen) > 10 else "")
            raise DataError(
                f"Gene(s) {unseen[:10]} were never perturbed in training; the model has learned no effect for them. "
                f"Perturbations of the {len(seen)} seen genes ({shown}) and new combinations of them are supported; "
                "pass allow_unseen=True to predict anyway."
            )
        return parsed

    def changes(
        self,
        prediction: pd.DataFrame,
        adata: AnnData | None = None,
        *,
        condition_key: str | None = None,
        layer: str | None = None,
    ) -> pd.DataFrame:
        """The predicted change of every gene against the control cells, and the observed one where known.

        Parameters
        ----------
        prediction
            A :meth:`predict` frame (genes × perturbations).
        adata
            Observed cells (GEARS layout): for each predicted perturbation with cells there (``"A+B"``
            and ``"B+A"`` match), the observed change is their mean minus the mean of its control cells.
        condition_key
            The obs column of ``adata`` with the conditions (default :attr:`condition_key`).
        layer
            Read ``adata`` expression from this layer instead of ``.X``.

        Returns
        -------
        Long :class:`pandas.DataFrame`, per perturbation its genes by decreasing ``|predicted_change|``:
        ``perturbation``, ``gene``, ``control_mean`` (mean of :attr:`control_cells`),
        ``predicted_mean``, ``predicted_change`` and ``observed_change`` (NaN where ``adata`` has no
        cell of the perturbation, or lacks the gene).

        Raises
        ------
        DataError
            When ``adata``'s condition column is missing, holds labels that do not parse, or has no
            control cells.
        """
        import pandas as pd

        genes = [str(g) for g in prediction.index]
        col = {g: i for i, g in enumerate(self.genes)}
        ctrl_mean = np.asarray(self.control_cells, dtype=np.float64).mean(axis=0)
        control_mean = np.asarray([ctrl_mean[col[g]] if g in col else np.nan for g in genes])
        observed = {} if adata is None else self._observed_changes(prediction, adata, condition_key, layer)
        frames = []
        for p in prediction.columns:
            f = pd.DataFrame(
                {
                    "perturbation": str(p),
                    "gene": genes,
                    "control_mean": control_mean,
                    "predicted_mean": prediction[p].to_numpy(dtype=np.float64),
                }
            )
            f["predicted_change"] = f["predicted_mean"] - f["control_mean"]
            obs = observed.get(str(p))
            f["observed_change"] = (
                obs.reindex(genes).to_numpy(dtype=np.float64) if obs is not None else np.nan
            )
            order = np.argsort(-np.abs(f["predicted_change"].to_numpy()), kind="stable")
            frames.append(f.iloc[order])
        return pd.concat(frames, ignore_index=True)

    def _observed_changes(
        self, prediction: pd.DataFrame, adata: AnnData, condition_key: str | None, layer: str | None
    ) -> dict[str, pd.Series]:
        """Perturbation → observed mean change (a Series over the genes ``adata`` has)."""
        import pandas as pd

        check_adata(adata, what="PerturbationModel.changes")
        key = self.condition_key if condition_key is None else condition_key
        labels = _check_column(adata, key)
        genes_of = _condition_genes(labels, self.control)
        by_genes = {frozenset(gs): lab for lab, gs in genes_of.items() if gs}
        ctrl_rows = np.flatnonzero(labels == self.control)
        if not len(ctrl_rows):
            raise DataError(f"adata has no control cells ({key} == {self.control!r}).")
        genes = [str(g) for g in prediction.index if str(g) in adata.var_names]
        matched = {}
        for p in map(str, prediction.columns):
            gs = frozenset(parse_condition(p, control=self.control))
            if gs and gs in by_genes:
                matched[p] = by_genes[gs]
        if not matched or not genes:
            return {}
        x = _expression(adata, genes, layer)
        ctrl = np.asarray(x[ctrl_rows].mean(axis=0), dtype=np.float64).reshape(-1)
        out = {}
        for p, lab in matched.items():
            mean = np.asarray(x[np.flatnonzero(labels == lab)].mean(axis=0), dtype=np.float64).reshape(-1)
            out[p] = pd.Series(mean - ctrl, index=pd.Index(genes))
        return out

    def _controls(self, control_cells: Any) -> np.ndarray:
        from anndata import AnnData

        if control_cells is None:
            x = self.control_cells
        elif isinstance(control_cells, AnnData):
            check_adata(control_cells, what="PerturbationModel.predict (control_cells)")
            missing = [g for g in self.genes if g not in control_cells.var_names]
            if missing:
                raise DataError(
                    f"control_cells lacks {len(missing)} of the model's genes, e.g. {missing[:5]}."
                )
            m = _expression(control_cells, self.genes, None)
            x = _dense_rows(m, np.arange(control_cells.n_obs))
        else:
            x = np.asarray(control_cells, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != len(self.genes):
                raise DataError(
                    f"control_cells must be (n_cells, {len(self.genes)}) in the model's gene order, got {x.shape}."
                )
            if not np.isfinite(x).all():
                raise DataError(
                    "control_cells holds NaN or infinite values; pass finite log1p-normalised expression."
                )
        if len(x) == 0:
            raise DataError(
                "No control cells to predict from; pass control_cells=... with at least one cell."
            )
        return x

    def _chunks(self, perturbed: np.ndarray, order: np.ndarray) -> list[np.ndarray]:
        """Gene columns per forward pass: all genes, or ``max_genes``-sized chunks of ``order``
        (a permutation of the columns) that each carry the perturbed genes."""
        n = len(self.genes)
        if self.max_genes is None or n <= self.max_genes:
            return [np.arange(n)]
        rest = order[~np.isin(order, perturbed)]
        room = max(1, self.max_genes - len(perturbed))
        return [np.sort(np.concatenate([perturbed, rest[i : i + room]])) for i in range(0, len(rest), room)]

    @torch.inference_mode()
    def predict(
        self,
        perturbations: str | Sequence[str],
        *,
        n_cells: int | None = None,
        control_cells: AnnData | np.ndarray | None = None,
        allow_unseen: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device | None = "auto",
    ) -> pd.DataFrame:
        """Mean predicted expression after each perturbation, over control cells.

        Parameters
        ----------
        perturbations
            Condition labels (``"A+ctrl"``, ``"A+B"``; ``"ctrl"`` predicts the unperturbed state).
            Combinations never seen in training are fine as long as every gene was perturbed in
            training.
        n_cells
            Average over this many control cells (a seeded random subset; ``None``: all).
        control_cells
            The input cells: an AnnData with the model's genes (``.X`` log1p-normalised) or an
            ``(n_cells, n_genes)`` array in :attr:`genes` order. Default: :attr:`control_cells`.
        allow_unseen
            Also flag genes never perturbed in training (the flag then carries no learned effect
            for them: expect little more than the generic response).
        batch_size
            Cells per forward pass.
        seed
            Seed of the cell subset and of the gene chunks (when there are more genes than
            ``max_genes``).
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, …

        Returns
        -------
        :class:`pandas.DataFrame` ``(n_genes, n_perturbations)``: index :attr:`genes`, one column
        per perturbation as given.

        Raises
        ------
        DataError
            For a label that does not parse, a gene outside :attr:`genes`, a gene never perturbed
            in training (unless ``allow_unseen``), or no control cells.
        """
        import pandas as pd

        if isinstance(perturbations, str):
            perturbations = [perturbations]
        perturbations = list(perturbations)
        parsed = self.check_perturbations(perturbations, allow_unseen=allow_unseen)
        x = self._controls(control_cells)
        rng = np.random.default_rng(seed)
        if n_cells is not None:
            if n_cells < 1:
                raise ConfigError(f"n_cells must be a positive integer or None, got {n_cells!r}.")
            if n_cells < len(x):
                x = x[np.sort(rng.choice(len(x), size=n_cells, replace=False))]
        # one gene order for every perturbation, so "A+B" and "B+A" get the same chunks
        order = np.random.default_rng([seed, 1]).permutation(len(self.genes))
        col = {g: i for i, g in enumerate(self.genes)}
        token_ids = torch.as_tensor(self.model.vocab.lookup(self.genes), dtype=torch.int64)
        dev = resolve_device(device)
        model = self.model
        was_training = model.training
        model.eval().to(dev)
        out = np.zeros((len(self.genes), len(perturbations)), dtype=np.float64)
        try:
            for j, gs in enumerate(parsed):
                pert = np.sort(np.asarray([col[g] for g in gs], dtype=np.int64))
                sums = np.zeros(len(self.genes))
                counts = np.zeros(len(self.genes))
                for pos in self._chunks(pert, order):
                    ids = token_ids[pos].to(dev)
                    flags = torch.as_tensor(
                        np.where(np.isin(pos, pert), FLAG_PERTURBED, FLAG_NOT_PERTURBED), device=dev
                    )
                    for s in range(0, len(x), batch_size):
                        vals = torch.from_numpy(x[s : s + batch_size][:, pos]).to(dev)
                        b = vals.shape[0]
                        res = model(
                            ids.expand(b, -1),
                            vals,
                            None,
                            token_type_ids=flags.expand(b, -1),
                            heads=("expression",),
                        )
                        sums[pos] += res.expression.float().sum(0).cpu().numpy()
                        counts[pos] += b
                out[:, j] = sums / np.maximum(counts, 1)
        finally:
            model.train(was_training)
        bad = ~np.isfinite(out).all(axis=0)
        if bad.any():
            raise DataError(
                f"The predicted expression of {int(bad.sum())} perturbation(s) came out NaN or infinite, e.g. "
                f"{[perturbations[j] for j in np.flatnonzero(bad)[:3]]}. Likely causes: non-finite control cell "
                "values or a model whose weights diverged during training (lower lr and fit again)."
            )
        return pd.DataFrame(
            out.astype(np.float32),
            index=pd.Index(self.genes, name="gene"),
            columns=pd.Index(perturbations, name="perturbation"),
        )

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str], *, max_saved_control: int = 2000) -> Path:
        """Save to a directory: ``model/`` (cellkit format), ``control_cells.safetensors`` and
        ``perturbation.json`` (genes, seen genes, settings, history).

        The directory is written as a whole (a hidden sibling swapped in at the end): after an
        interruption at any moment ``path`` holds the old save or the new one, never a mix.

        Parameters
        ----------
        path
            Directory (created if needed).
        max_saved_control
            Keep at most this many control cells (a random subset, seeded by :attr:`seed`).

        Returns
        -------
        The directory written.
        """
        from safetensors.torch import save_file

        from ._utils import atomic_directory

        path = Path(path)
        x = self.control_cells
        if len(x) > max_saved_control:
            rng = np.random.default_rng(self.seed)
            x = x[np.sort(rng.choice(len(x), size=max_saved_control, replace=False))]
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "genes": list(self.genes),
            "seen_genes": list(self.seen_genes),
            "train_conditions": list(self.train_conditions),
            "condition_key": self.condition_key,
            "control": self.control,
            "max_genes": self.max_genes,
            "seed": self.seed,
            "status": self.status,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "history": self.history.to_dict(),
        }
        text = json.dumps(doc, indent=2, default=_json_default)
        with atomic_directory(
            path, may_replace=_is_saved_perturbation_model, what="perturbation model"
        ) as tmp:
            self.model.save(tmp / MODEL_DIR)
            save_file(
                {"control_cells": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))},
                str(tmp / CONTROL_FILE),
            )
            (tmp / META_FILE).write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None
    ) -> PerturbationModel:
        """Load a directory written by :meth:`save` (see :func:`load_perturbation_model`)."""
        from safetensors.torch import load_file

        from ._utils import recover_directory

        path = recover_directory(path)
        meta = path / META_FILE
        if not meta.is_file():
            raise CheckpointError(
                f"{path} has no {META_FILE}; it is not a saved perturbation model (or the save was interrupted)."
            )
        from ._utils import read_json

        doc = read_json(meta, what="perturbation model file", expect=dict, error=CheckpointError)
        if doc.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{meta} is not a {FORMAT_NAME} file (format={doc.get('format')!r}).")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer cellkit (format {doc['format_version']}).")
        model = load_model(path / MODEL_DIR, format="cellkit", device=device)
        if model.config.encoder.type_vocab_size != N_FLAGS or "expression" not in model.heads:
            raise CheckpointError(f"{path / MODEL_DIR} is not a perturbation model (no flag embedding).")
        missing = [g for g in doc["genes"] if g not in model.vocab]
        if missing:
            raise CheckpointError(f"{path}: genes {missing[:5]} are missing from the model's vocabulary.")
        x = load_file(str(path / CONTROL_FILE))["control_cells"].numpy()
        h = doc.get("history") or {}
        return cls(
            model=model,
            genes=list(doc["genes"]),
            seen_genes=list(doc["seen_genes"]),
            train_conditions=list(doc["train_conditions"]),
            control_cells=x,
            history=History(h.get("steps"), h.get("epochs")),
            status="loaded",
            metrics=dict(doc.get("metrics") or {}),
            condition_key=doc["condition_key"],
            control=doc["control"],
            max_genes=doc["max_genes"],
            seed=int(doc["seed"]),
        )


def _is_saved_perturbation_model(path: Path) -> bool:
    """A directory a save may replace: an earlier save (or an empty directory)."""
    return (path / META_FILE).is_file() or not any(path.iterdir())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_perturbation_model(
    path: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> PerturbationModel:
    """Load a :class:`PerturbationModel` saved with :meth:`PerturbationModel.save`.

    Parameters
    ----------
    path
        The directory.
    device
        Where to put the model (default: CPU).
    """
    return PerturbationModel.load(path, device=device)


# ============================================================================== fit
#: the architecture keywords of earlier versions of :func:`fit_perturbation_model`
_ARCH_KEYS = ("d_model", "n_heads", "n_layers", "d_ff", "dropout")


def check_conditions(adata: AnnData, *, condition_key: str = "condition", control: str = "ctrl") -> pd.Series:
    """Check an AnnData's perturbation conditions before training on it.

    Parameters
    ----------
    adata
        Perturb-seq cells with GEARS labels in ``obs[condition_key]`` (``"ctrl"``, ``"A+ctrl"``,
        ``"A+B"``).
    condition_key
        The obs column with the conditions.
    control
        The label of control cells.

    Returns
    -------
    :class:`pandas.Series`: the number of cells per condition label, the control label first.

    Raises
    ------
    DataError
        For a missing column, cells without a label, labels that do not parse, no control cells,
        or only control cells.

    Examples
    --------
    >>> counts = check_conditions(adata)  # doctest: +SKIP
    >>> counts["ctrl"], counts.sum() - counts["ctrl"]  # control and perturbed cells  # doctest: +SKIP
    """
    import pandas as pd

    if not isinstance(control, str) or not control.strip():
        raise ConfigError(f"control must be the label of the control cells (e.g. 'ctrl'), got {control!r}.")
    labels = _check_column(adata, condition_key)
    _condition_genes(labels, control)
    counts = pd.Series(labels).value_counts(sort=False)
    if control not in counts.index:
        found = list(dict.fromkeys(labels.tolist()))[:8]
        raise DataError(
            f"No control cells: no {condition_key!r} value equals {control!r} (found e.g. {found}). Pass control=... "
            "with the label of the unperturbed cells."
        )
    if counts[control] == len(labels):
        raise DataError(f"Every cell is a control ({control!r}); there is no perturbation to learn from.")
    order = [control, *[lab for lab in counts.index if lab != control]]
    return counts.reindex(order).rename("n_cells").rename_axis(condition_key)


def _model_genes(adata: AnnData, model: CellModel | None, genes: Sequence[str] | None) -> list[str]:
    """The genes to model, checked against the data and the model's vocabulary."""
    if genes is None:
        genes = [str(g) for g in adata.var_names if model is None or g in model.vocab]
    else:
        genes = [str(g) for g in genes]
        absent = [g for g in genes if g not in adata.var_names]
        if absent:
            raise DataError(f"{len(absent)} of genes= are not in adata.var_names, e.g. {absent[:5]}.")
        if model is not None:
            unknown = [g for g in genes if g not in model.vocab]
            if unknown:
                raise DataError(
                    f"{len(unknown)} of genes= are not in the model's vocabulary, e.g. {unknown[:5]}."
                )
    if len(set(genes)) != len(genes):
        raise DataError("The genes are not unique; make var_names unique (adata.var_names_make_unique()).")
    if not genes:
        raise DataError("No genes to model (none of the data's genes is in the model's vocabulary).")
    return genes


def _architecture(
    model: CellModel | None,
    architecture: PerturbationArchitecture | Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> PerturbationArchitecture | None:
    """The architecture of a fresh model (``None`` with a given ``model``), checked."""
    old = [k for k in _ARCH_KEYS if k in options]
    if old:
        raise ConfigError(
            f"{old} describe the architecture: pass architecture=PerturbationArchitecture("
            + ", ".join(f"{k}={options[k]!r}" for k in old)
            + ") instead."
        )
    if model is not None and architecture is not None:
        raise ConfigError(
            "Pass either model= (a model to fine-tune) or architecture= (the shape of a fresh model), not both."
        )
    if model is not None:
        return None
    if architecture is None:
        return PerturbationArchitecture()
    if isinstance(architecture, Mapping):
        return PerturbationArchitecture.from_dict(architecture)
    if not isinstance(architecture, PerturbationArchitecture):
        raise ConfigError(
            f"architecture must be a PerturbationArchitecture (or a dict of its fields), got {type(architecture).__name__}."
        )
    return architecture


def _split(labels: np.ndarray, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a random split over cells, seeded."""
    perm = np.random.default_rng(seed + 1).permutation(len(labels))
    n_val = round(len(labels) * val_size)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_perturbation_model(
    adata: AnnData,
    model: CellModel | None = None,
    *,
    architecture: PerturbationArchitecture | Mapping[str, Any] | None = None,
    condition_key: str = "condition",
    control: str = "ctrl",
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 16,
    max_genes: int | None = 1536,
    val_size: float = 0.1,
    seed: int = 0,
    copy_model: bool = False,
    callbacks: Iterable[Callback | Callable[[Event], Any]] = (),
    stop_event: threading.Event | None = None,
    progress: bool = True,
    device: str = "auto",
    **trainer_options: Any,
) -> PerturbationModel:
    """Train a model to predict expression after perturbing genes (scGPT's perturbation recipe).

    The model is either given (``model=``, fine-tuned) or built fresh from an ``architecture``;
    every other keyword is a training option.

    Parameters
    ----------
    adata
        Perturb-seq cells: log1p-normalised expression (``.X`` or ``layer``) and
        ``obs[condition_key]`` with GEARS labels (``"ctrl"``, ``"A+ctrl"``, ``"A+B"``); see
        :func:`cellkit.datasets.synthetic_perturbation`. Not modified.
    model
        A model to fine-tune (e.g. a pretrained scGPT-family model with a continuous value
        encoder); it gets the flag embedding and an ``expression`` head when it lacks them and is
        trained in place (``copy_model=True``: a copy). ``None``: a fresh model of ``architecture``.
    architecture
        The shape of a fresh scGPT-style model (:class:`PerturbationArchitecture`, or a dict of its
        fields; default ``PerturbationArchitecture()``), seeded by ``seed``, with an N(0, 1)
        gene-token table (:meth:`PerturbationArchitecture.build`) and an expression decoder whose
        output bias starts at the mean expression of the training cells. Only without ``model``.
    condition_key, control
        The obs column with the conditions and the label of control cells (checked with
        :func:`check_conditions`).
    genes
        Genes to model (default: every gene of ``adata`` — that the model's vocabulary knows,
        when ``model`` is given). Every perturbed gene must be among them.
    layer
        Read expression from this layer instead of ``.X``.
    epochs, lr, batch_size
        Training length, learning rate, cells per step. The defaults suit a small model trained
        from scratch (a cosine schedule; see ``**trainer_options``); scGPT fine-tunes its
        pretrained model with lr 1e-4 and batch 64.
    max_genes
        Genes per cell and step (scGPT's ``max_seq_len``, 1536); with more genes each cell gets
        a random subset that always includes its perturbed genes. ``None``: all genes.
    val_size
        Fraction of cells held out (random, seeded) for the validation loss that picks the best
        epoch; 0 for none.
    seed
        Seeds the control pairing, the split, the gene sampling, the model's initial weights
        and the training order.
    copy_model
        Train a copy of ``model``, leaving the given one as it was.
    callbacks, stop_event, progress
        As in :func:`cellkit.finetune` (live events, a cooperative stop, a progress bar).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, …
    **trainer_options
        Further :class:`cellkit.train.TrainerConfig` fields (``schedule``, ``warmup_steps``, …).

    Returns
    -------
    :class:`PerturbationModel` with ``.model``, ``.history``, ``.genes``, ``.seen_genes``,
    ``.predict(...)`` and ``.save(...)``.

    Raises
    ------
    DataError
        For a condition label that does not parse, no control cells, no perturbed cells, a
        perturbed gene outside ``genes``, or negative / non-finite expression.
    ConfigError
        For invalid settings, both ``model`` and ``architecture``, architecture keywords
        (``d_model=`` …) outside ``architecture``, or a ``model`` that cannot take continuous
        values or flags.

    Examples
    --------
    >>> fit = fit_perturbation_model(adata, architecture=PerturbationArchitecture(d_model=32, n_heads=2),
    ...                              epochs=5)  # doctest: +SKIP
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise DataError(f"fit_perturbation_model takes an AnnData, got {type(adata).__name__}.")
    check_adata(adata, what="cellkit.fit_perturbation_model")
    arch = _architecture(model, architecture, trainer_options)
    config = TrainerConfig.from_dict(
        {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "device": device,
            "progress": progress,
            "schedule": "cosine",
            **trainer_options,
        }
    )
    if not 0 <= val_size < 1:
        raise ConfigError(f"val_size must be a fraction in [0, 1), got {val_size}.")
    if max_genes is not None and (
        isinstance(max_genes, bool) or not isinstance(max_genes, int) or max_genes < 1
    ):
        raise ConfigError(f"max_genes must be a positive integer or None, got {max_genes!r}.")

    # -- conditions and genes
    check_conditions(adata, condition_key=condition_key, control=control)
    labels = _check_column(adata, condition_key)
    genes_of = _condition_genes(labels, control)
    genes = _model_genes(adata, model, genes)
    col = {g: i for i, g in enumerate(genes)}
    outside = sorted({g for gs in genes_of.values() for g in gs if g not in col})
    if outside:
        raise DataError(
            f"Perturbed gene(s) {outside[:10]} are not among the modelled genes, so they cannot be flagged; add them "
            "to genes= (and to the model's vocabulary) or drop their cells."
        )
    pairs = pair_controls(labels, control=control, seed=seed)
    is_ctrl = labels == control
    perturbed = [np.sort(np.asarray([col[g] for g in genes_of[lab]], dtype=np.int64)) for lab in labels]

    # -- split (random over cells, seeded)
    train_rows, val_rows = _split(labels, val_size, seed)
    train_conditions = sorted({lab for lab in labels[train_rows] if lab != control})
    seen = {g for lab in train_conditions for g in genes_of[lab]}
    seen_genes = [g for g in genes if g in seen]
    if not seen_genes:
        raise DataError("The training part has no perturbed cell; lower val_size.")

    # -- model
    x = _expression(adata, genes, layer)
    if arch is not None:
        model_ = arch.build(genes, seed=seed)
    else:
        model_ = _copy.deepcopy(model) if copy_model else model
    _enable_flags(model_)
    if arch is not None:
        # start the fresh decoder at the mean expression (else Adam needs ~mean/lr steps to get there)
        with torch.no_grad():
            model_.heads["expression"].fc[-1].bias.fill_(_mean_value(x, train_rows))
    model_.config.metadata["perturbation"] = {"condition_key": condition_key, "control": control}
    torch.manual_seed(seed)

    # -- data and training
    collate = PerturbationCollator(
        model_.vocab.lookup(genes), pad_id=model_.vocab.pad_id, max_genes=max_genes, seed=seed
    )
    train_ds = _PairedCells(x, train_rows, pairs, perturbed)
    val_ds = _PairedCells(x, val_rows, pairs, perturbed) if len(val_rows) else None
    trainer = Trainer(model_, [MaskedValueMSE()], config, callbacks=callbacks, stop_event=stop_event)
    fit = trainer.fit(train_ds, val_ds, collate_fn=collate, val_collate_fn=_copy.deepcopy(collate))
    model_.eval()
    return PerturbationModel(
        model=model_,
        genes=genes,
        seen_genes=seen_genes,
        train_conditions=train_conditions,
        control_cells=_dense_rows(x, np.flatnonzero(is_ctrl)),
        history=fit.history,
        status=fit.status,
        metrics=dict(fit.metrics),
        condition_key=condition_key,
        control=control,
        max_genes=max_genes,
        seed=seed,
        trainer=trainer,
    )


# ============================================================================== evaluate
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def evaluate_perturbation(
    adata_true: AnnData,
    predicted: pd.DataFrame,
    *,
    condition_key: str = "condition",
    control: str = "ctrl",
    top_de: int = 20,
    baseline_conditions: Sequence[str] | None = None,
    layer: str | None = None,
) -> pd.DataFrame:
    """Score predicted perturbation responses against observed cells (GEARS / scGPT "Pearson delta").

    For each predicted perturbation, with ``c`` the mean expression of the control cells of
    ``adata_true``, ``t`` the mean of that perturbation's cells and ``p`` the prediction:

    * ``pearson_delta``: Pearson correlation of ``p − c`` and ``t − c`` over all genes;
    * ``pearson_delta_de``: the same over the ``top_de`` genes with the largest observed
      ``|t − c|`` (GEARS ranks its DE genes by a t-test; this uses the mean change);
    * ``baseline_*``: the same scores for the "mean of training perturbations" baseline, which
      predicts ``c + mean_k (t_k − c)`` for every perturbation, ``k`` over
      ``baseline_conditions`` (each condition weighted equally);
    * ``additive_*``: the same scores for the additive baseline of a combination ``A+B``, which
      predicts ``c + (t_A − c) + (t_B − c)`` (every gene's single-gene effect summed) from the
      observed single perturbations ``A+ctrl`` and ``B+ctrl`` among ``baseline_conditions``. NaN
      for a single perturbation and for a combination with a single that is not observed there;
      ``table.attrs["notes"]`` says which.

    Published evaluations found that deep models often do not beat these two baselines: compare
    the model's columns with them, row by row. The ``"mean"`` row averages each column over the
    perturbations where it is defined, so its ``additive_*`` entries are means over the scored
    combinations only.

    Parameters
    ----------
    adata_true
        Observed cells: control cells, the predicted perturbations' cells and (for the baseline)
        the training perturbations' cells; same expression convention as the prediction.
    predicted
        ``(genes, perturbations)`` predicted mean expression, e.g. from
        :meth:`PerturbationModel.predict`. ``"A+B"`` and ``"B+A"`` name the same perturbation.
    condition_key, control
        The obs column of condition labels and the control label.
    top_de
        Number of most-changed genes for the ``_de`` scores.
    baseline_conditions
        Conditions averaged by the baseline, and whose single perturbations the additive
        baseline sums (default: every non-control condition of ``adata_true`` that is not a
        predicted one, i.e. the training perturbations).
    layer
        Read ``adata_true`` expression from this layer instead of ``.X``.

    Returns
    -------
    :class:`pandas.DataFrame` indexed by perturbation (the predicted columns) with ``n_cells``,
    ``pearson_delta``, ``pearson_delta_de``, ``baseline_pearson_delta``,
    ``baseline_pearson_delta_de``, ``additive_pearson_delta``, ``additive_pearson_delta_de``, and
    a last row ``"mean"`` (means over perturbations); ``attrs["notes"]``: what was not scored and why.

    Raises
    ------
    DataError
        For no control cells, a predicted perturbation with no cells in ``adata_true``, a label
        that does not parse, or no gene shared by ``predicted`` and ``adata_true``.
    """
    import pandas as pd

    check_adata(adata_true, what="cellkit.evaluate_perturbation")
    if top_de < 1:
        raise ConfigError(f"top_de must be a positive integer, got {top_de!r}.")
    labels = _check_column(adata_true, condition_key)
    genes_of = _condition_genes(labels, control)
    genes = [g for g in map(str, predicted.index) if g in adata_true.var_names]
    if not genes:
        raise DataError("predicted and adata_true share no gene (compare predicted.index with var_names).")
    x = _expression(adata_true, genes, layer)
    ctrl_rows = np.flatnonzero(labels == control)
    if len(ctrl_rows) == 0:
        raise DataError(f"adata_true has no control cells ({condition_key} == {control!r}).")

    def mean_of(rows: np.ndarray) -> np.ndarray:
        r = x[rows]
        return np.asarray(r.mean(0), dtype=np.float64).reshape(-1)

    ctrl = mean_of(ctrl_rows)
    by_key: dict[frozenset[str], str] = {frozenset(gs): lab for lab, gs in genes_of.items() if gs}
    pred = predicted.copy()
    pred.index = pred.index.map(str)
    pred = pred.loc[genes]
    if not np.isfinite(pred.to_numpy(dtype=np.float64)).all():
        raise DataError(
            "predicted holds NaN or infinite values; predict again (PerturbationModel.predict) from a model whose "
            "training did not diverge."
        )
    matched: dict[str, str] = {}
    for name in pred.columns:
        key = frozenset(parse_condition(str(name), control=control))
        if key not in by_key:
            raise DataError(f"Predicted perturbation {name!r} has no cells in adata_true[{condition_key!r}].")
        matched[str(name)] = by_key[key]
    if baseline_conditions is None:
        used = set(matched.values())
        baseline_conditions = [lab for lab, gs in genes_of.items() if gs and lab not in used]
    else:
        baseline_conditions = list(baseline_conditions)
        unknown = [c for c in baseline_conditions if c not in genes_of]
        if unknown:
            raise DataError(f"baseline_conditions {unknown[:5]} have no cells in adata_true.")
    if baseline_conditions:
        baseline = np.mean([mean_of(np.flatnonzero(labels == c)) - ctrl for c in baseline_conditions], axis=0)
    else:
        log.warning("No training perturbations in adata_true: the mean baseline is not computed.")
        baseline = None
    additive, notes = _additive_deltas(
        matched, genes_of, baseline_conditions, lambda c: mean_of(np.flatnonzero(labels == c)) - ctrl
    )
    k = min(top_de, len(genes))
    rows = []
    for name, lab in matched.items():
        cell_rows = np.flatnonzero(labels == lab)
        obs = mean_of(cell_rows) - ctrl
        delta = pred[name].to_numpy(dtype=np.float64) - ctrl
        de = np.argsort(-np.abs(obs), kind="stable")[:k]
        rec = {
            "perturbation": name,
            "n_cells": len(cell_rows),
            "pearson_delta": _pearson(delta, obs),
            "pearson_delta_de": _pearson(delta[de], obs[de]),
            "baseline_pearson_delta": _pearson(baseline, obs) if baseline is not None else float("nan"),
            "baseline_pearson_delta_de": _pearson(baseline[de], obs[de])
            if baseline is not None
            else float("nan"),
            "additive_pearson_delta": _pearson(additive[name], obs) if name in additive else float("nan"),
            "additive_pearson_delta_de": _pearson(additive[name][de], obs[de])
            if name in additive
            else float("nan"),
        }
        rows.append(rec)
    table = pd.DataFrame(rows).set_index("perturbation")
    if len(table):
        mean = table.mean(numeric_only=True)
        mean["n_cells"] = table["n_cells"].sum()
        table.loc["mean"] = mean
    table["n_cells"] = table["n_cells"].astype(int)
    table.attrs["notes"] = notes
    return table


def _additive_deltas(
    matched: Mapping[str, str],
    genes_of: Mapping[str, tuple[str, ...]],
    pool: Sequence[str],
    delta_of: Callable[[str], np.ndarray],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The additive baseline's change ``Σ_g (t_g − c)`` for each predicted combination whose every
    gene has an observed single perturbation in ``pool``; notes on the combinations left out.

    ``matched``: predicted name → its condition label; ``delta_of(label)``: observed ``t − c``.
    """
    singles = {genes_of[lab][0]: lab for lab in pool if len(genes_of[lab]) == 1}
    out: dict[str, np.ndarray] = {}
    missing: dict[str, list[str]] = {}
    for name, lab in matched.items():
        genes = genes_of[lab]
        if len(genes) < 2:
            continue
        lacking = [g for g in genes if g not in singles]
        if lacking:
            missing[name] = lacking
            continue
        out[name] = np.sum([delta_of(singles[g]) for g in genes], axis=0)
    notes = []
    if missing:
        listed = "; ".join(
            f"{n} (no single perturbation of {', '.join(gs)})" for n, gs in list(missing.items())[:5]
        )
        notes.append(
            f"additive baseline not scored for {len(missing)} combination(s) whose single perturbations are not "
            f"all observed among the training perturbations: {listed}{' …' if len(missing) > 5 else ''}."
        )
        log.info(notes[-1])
    return out, notes
