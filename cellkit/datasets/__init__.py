"""Offline demo data and a demo model: :func:`pbmc_demo` and :func:`demo_model`; a synthetic
perturb-seq screen with planted effects: :func:`synthetic_perturbation`.

The demo model is **a demo for exercising the kit, not a foundation model**: a small scGPT-style
transformer (d_model 128, 2 layers, 8 heads, value-weighted pooling, ~0.45 M parameters, 1.8 MB)
that cellkit built from scratch without labels on the 700 cells / 765 genes of scanpy's
``pbmc68k_reduced``: gene embeddings initialised from the genes' principal-component loadings,
then brief self-supervised pretraining (masked value regression + MVC, gene table frozen). It
knows only those 765 genes. The script that trains it
is :mod:`cellkit.datasets.make_demo_model`; its provenance is in ``model.config.metadata``.

Examples
--------
>>> from cellkit.datasets import demo_model, pbmc_demo
>>> adata, model = pbmc_demo(), demo_model()  # doctest: +SKIP
>>> tokens = cellkit.tokenize(adata, model, use_raw=True)  # doctest: +SKIP
>>> result = cellkit.finetune(adata, model, label_key="bulk_labels", use_raw=True)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..model import CellModel

from .perturbation import synthetic_perturbation

__all__ = [
    "DEMO_FINETUNE",
    "DEMO_TOKENIZE_OPTIONS",
    "demo_model",
    "demo_model_path",
    "pbmc_demo",
    "synthetic_perturbation",
]

#: Tokenize options for :func:`pbmc_demo` with :func:`demo_model` (together with ``use_raw=True``):
#: ``.raw`` already holds log1p CP10k values, so no further normalisation. (scGPT's per-cell
#: quantile bins do not change when a cell is rescaled, so the default ``normalize_total=1e4``
#: gives the same tokens; this states the convention the model was trained with.)
DEMO_TOKENIZE_OPTIONS: dict[str, Any] = {"normalize_total": None}

#: The recipe the demo model is fine-tuned with for cell types (keyword arguments of
#: :func:`cellkit.finetune`; ``benchmarks/finetune_pbmc.py`` measures it against logistic
#: regression): the PCA-initialised gene / value embeddings stay frozen, the rare classes are
#: up-weighted (``"balanced"``) and the epoch with the best validation macro-F1 is kept.
DEMO_FINETUNE: dict[str, Any] = {
    "epochs": 40,
    "lr": 1e-3,
    "batch_size": 16,
    "schedule": "cosine",
    "warmup_steps": 20,
    "class_weight": "balanced",
    "freeze_embeddings": True,
    "monitor": "val/macro_f1",
    "bucket_by_length": True,
}


def demo_model_path() -> Path:
    """Directory of the shipped demo model (``config.json``, ``model.safetensors``, ``vocab.json``)."""
    return Path(__file__).resolve().parent / "demo_model"


def demo_model() -> CellModel:
    """The shipped demo model, freshly loaded (a new object on every call; safe to train in place).

    A small scGPT-family model pretrained by cellkit on :func:`pbmc_demo` — a demo for exercising
    the kit offline (tokenize, embed, fine-tune, predict), **not a foundation model**. Tokenize
    its data with ``use_raw=True`` (see :data:`DEMO_TOKENIZE_OPTIONS`); ``model.config.metadata``
    records how it was made.

    Returns
    -------
    :class:`cellkit.CellModel` (CPU, eval mode as :func:`cellkit.load_model` returns it).
    """
    from ..model import load_model

    return load_model(demo_model_path())


def pbmc_demo() -> AnnData:
    """scanpy's ``pbmc68k_reduced``: 700 PBMCs, ships inside scanpy (no download).

    A fresh object on every call. What it holds:

    * ``.raw``: log1p of counts per 10k (CP10k), 765 genes (``.raw.X``) — what the demo model
      reads: tokenize with ``use_raw=True`` (and :data:`DEMO_TOKENIZE_OPTIONS`);
    * ``.X``: the same genes scaled (z-scores, negative values) — not tokenizable;
    * ``obs["bulk_labels"]``: 10 cell types (Dendritic 240 … CD4+/CD45RA+/CD25- Naive T 8 cells),
      ``obs["louvain"]``, ``obsm["X_pca"]``, ``obsm["X_umap"]``.

    Returns
    -------
    :class:`anndata.AnnData` with 700 cells.
    """
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()
