"""A simple baseline beside a fine-tuned model: logistic regression on the model's own inputs.

Published evaluations of single-cell foundation models found them often no better than a
linear model on the expression matrix, so :func:`cellkit.finetune` reports one on the same split
(``FinetuneResult.baseline_metrics``). This module fits it; :mod:`cellkit.tasks` scores it.

**The same inputs.** The logistic regression reads each cell's *tokens*, exactly the ones the
model is given: the gene token ids with their per-token values as the tokenizer produced them
(the scheme's normalisation: e.g. scGPT's per-cell value bins of the normalised, log1p
expression, or the continuous values of a continuous value encoder), the first ``max_len``
tokens of a cell as the collator truncates them, special tokens (``<cls>``, ``<pad>``, …) left
out. A cell becomes one sparse row over the model's vocabulary: ``x[cell, gene] = value`` (0 for
a gene the model is not shown). Rank-value schemes (Geneformer, TEDDY-G, PerturbGene) have no
values: the model reads the genes' *order*, so the feature is the gene's rank weight
``1 − rank / n`` (``n`` gene tokens in the cell; the top gene 1, the last ``1/n``). Each feature
is scaled to ``[-1, 1]`` by its largest absolute value over the training cells
(:class:`sklearn.preprocessing.MaxAbsScaler`, which keeps the matrix sparse).

**The same split.** Trained on the run's training cells, scored on its held-out (test) cells,
with the per-class weights of the fine-tune's ``class_weight``.

**Bounded cost.** At most :data:`MAX_TRAIN_CELLS` training cells (a uniform subsample drawn with
the run's seed; the training matrix holds 12 bytes per token, about twice that at its peak), and the held-out cells are featurised
and predicted :data:`CHUNK_CELLS` at a time, so a shard directory of millions of cells is never
loaded; cells from shards are read with the same positional reads training uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .._utils import get_logger
from ..data.tokenized import TokenizedCells

__all__ = ["CHUNK_CELLS", "LOGISTIC_SETTINGS", "MAX_TRAIN_CELLS", "logistic_baseline", "token_features"]

log = get_logger(__name__)

#: most training cells the logistic regression is fitted on (a seeded uniform subsample above it)
MAX_TRAIN_CELLS = 50_000
#: cells featurised (and predicted) at a time
CHUNK_CELLS = 4096
#: the :class:`sklearn.linear_model.LogisticRegression` settings (L2 penalty, multinomial lbfgs)
LOGISTIC_SETTINGS: dict[str, Any] = {"C": 1.0, "max_iter": 1000, "tol": 1e-4, "solver": "lbfgs"}

FEATURES_TEXT = (
    "the model's tokens per cell (gene ids + the tokenizer's values, rank weights for value-free schemes; "
    "first max_length tokens, special tokens left out) as a sparse cells x vocabulary matrix, MaxAbs-scaled"
)


def _arrays(cells: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``gene_ids``, ``values`` (or ``None``) and ``offsets`` of cells ``start:stop`` of ``cells``."""
    if isinstance(cells, TokenizedCells):
        a, b = int(cells.offsets[start]), int(cells.offsets[stop])
        values = None if cells.values is None else np.asarray(cells.values[a:b])
        return np.asarray(cells.gene_ids[a:b]), values, np.asarray(cells.offsets[start : stop + 1]) - a
    # a ShardSubset (or any per-cell reader): one cell at a time, positional reads
    parts = [cells.cell(i) for i in range(start, stop)]
    lengths = [len(p["gene_ids"]) for p in parts]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([p["gene_ids"] for p in parts]) if parts else np.zeros(0, np.int32)
    has_values = bool(parts) and all("values" in p for p in parts)
    values = np.concatenate([p["values"] for p in parts]) if has_values else None
    return ids, values, offsets


def _rows(
    gene_ids: np.ndarray,
    values: np.ndarray | None,
    offsets: np.ndarray,
    *,
    n_features: int,
    specials: Iterable[int],
    max_len: int | None,
) -> Any:
    """One CSR row per cell (see the module docstring), ``(n_cells, n_features)`` float64."""
    import scipy.sparse as sp

    n = len(offsets) - 1
    offsets = np.asarray(offsets, dtype=np.int64)
    ids = np.asarray(gene_ids)
    keep = (ids >= 0) & (ids < n_features)
    drop = np.fromiter(specials, dtype=np.int64)
    if len(drop):
        keep &= ~np.isin(ids, drop)
    if max_len:  # the collator keeps a cell's first max_len tokens
        keep &= np.arange(len(ids), dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets)) < int(max_len)
    before = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(keep, out=before[1:])
    indptr = before[offsets] - before[offsets[0]]  # kept tokens before each cell
    del before
    kept = np.diff(indptr)
    cols = ids[keep].astype(np.int32)
    if values is not None:
        data = np.asarray(values)[keep].astype(np.float64)
        data[~np.isfinite(data)] = 0.0
    else:  # rank-value scheme: the gene's place in the cell's order is what the model reads
        rank = np.arange(len(cols), dtype=np.float64) - np.repeat(indptr[:-1], kept)
        data = 1.0 - rank / np.repeat(np.maximum(kept, 1), kept)
    out = sp.csr_matrix((data, cols, indptr), shape=(n, n_features))
    out.sum_duplicates()
    return out


def token_features(
    cells: Any,
    *,
    n_features: int,
    specials: Iterable[int] = (),
    max_len: int | None = None,
    chunk: int = CHUNK_CELLS,
) -> Any:
    """Sparse ``(n_cells, n_features)`` float64 CSR matrix of the tokens the model reads (module docstring).

    Parameters
    ----------
    cells
        :class:`~cellkit.data.TokenizedCells` or a :class:`~cellkit.data.ShardSubset`.
    n_features
        The vocabulary size (token ids ``0 … n_features − 1``).
    specials
        Token ids left out (``<cls>``, ``<pad>``, …).
    max_len
        Only a cell's first ``max_len`` tokens (the collator's truncation); ``None``: all.
    chunk
        Cells read at a time.
    """
    import scipy.sparse as sp

    specials = tuple(specials)
    blocks = [
        _rows(
            *_arrays(cells, a, min(a + chunk, len(cells))),
            n_features=n_features,
            specials=specials,
            max_len=max_len,
        )
        for a in range(0, len(cells), chunk)
    ]
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_features))


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    """Positions ``0 … n − 1``, or ``cap`` of them drawn uniformly with ``seed`` (sorted)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def logistic_baseline(
    tokens: Any,
    train_idx: np.ndarray,
    train_codes: np.ndarray,
    test_idx: np.ndarray,
    *,
    n_features: int,
    specials: Iterable[int],
    max_len: int | None,
    class_weights: Sequence[float] | None,
    seed: int,
    max_train_cells: int = MAX_TRAIN_CELLS,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Fit a logistic regression on training cells' tokens; predict the held-out cells.

    Parameters
    ----------
    tokens
        All the run's cells (:class:`~cellkit.data.TokenizedCells` or
        :class:`~cellkit.data.ShardedTokens`); ``tokens.subset(idx)`` gives a part.
    train_idx, train_codes
        ``(n_train,)`` positions of the training cells and their class codes (``< 0``: no label).
    test_idx
        ``(n_test,)`` positions of the cells to predict (the model's held-out cells).
    n_features, specials, max_len
        See :func:`token_features`.
    class_weights
        One weight per class code (the fine-tune's ``class_weight``), or ``None``.
    seed
        Draws the training subsample when there are more than ``max_train_cells``.
    max_train_cells
        Cap on the training cells.

    Returns
    -------
    ``(y_pred, settings)``: ``(n_test,)`` predicted class codes (``None`` when no baseline could
    be fitted; ``settings["notes"]`` says why), and what was fitted (``method``, ``features``,
    the logistic regression's settings, ``class_weight``, ``n_train_cells``,
    ``n_train_cells_available``, ``n_test_cells``, ``seed``, ``notes``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    codes = np.asarray(train_codes)
    labelled = np.flatnonzero(codes >= 0)
    pick = labelled[_subsample(len(labelled), int(max_train_cells), seed)]
    y = codes[pick].astype(np.int64)
    present = np.unique(y)
    weight = None if class_weights is None else {int(c): float(class_weights[int(c)]) for c in present}
    settings: dict[str, Any] = {
        "method": "logistic regression",
        "features": FEATURES_TEXT,
        **LOGISTIC_SETTINGS,
        "class_weight": weight,
        "n_train_cells": len(pick),
        "n_train_cells_available": len(labelled),
        "n_test_cells": len(test_idx),
        "seed": int(seed),
        "notes": [],
    }
    if len(pick) < len(labelled):
        settings["notes"].append(
            f"trained on {len(pick):,} of {len(labelled):,} training cells (a uniform subsample, seed {seed})"
        )
    if len(present) < 2:
        settings["notes"].append("not fitted: the training cells hold fewer than 2 classes")
        return None, settings
    opts = {"n_features": n_features, "specials": tuple(specials), "max_len": max_len}
    train_idx = np.asarray(train_idx)
    x = token_features(tokens.subset(train_idx[pick]), chunk=CHUNK_CELLS, **opts)
    clf = make_pipeline(
        MaxAbsScaler(copy=False), LogisticRegression(class_weight=weight, **LOGISTIC_SETTINGS)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    del x
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        settings["notes"].append(f"lbfgs did not converge in {LOGISTIC_SETTINGS['max_iter']} iterations")
    test = tokens.subset(np.asarray(test_idx))
    y_pred = np.zeros(len(test), dtype=np.int64)
    for a in range(0, len(test), CHUNK_CELLS):  # the held-out cells, a chunk at a time
        b = min(a + CHUNK_CELLS, len(test))
        block = _rows(*_arrays(test, a, b), **opts)
        y_pred[a:b] = clf.predict(block)
    log.info("logistic regression baseline: %d training cells, %d held-out cells", len(pick), len(test))
    return y_pred, settings
