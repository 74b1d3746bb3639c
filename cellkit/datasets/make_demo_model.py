"""Train the demo model shipped in ``cellkit/datasets/demo_model/`` (with cellkit itself).

Run ``python -m cellkit.datasets.make_demo_model [--out DIR] [--seed 0]``. It builds a small
scGPT-style model for all 765 genes of scanpy's ``pbmc68k_reduced`` (ships with scanpy, no
download) and trains it with no label at all, in two label-free steps:

1. **Gene-embedding initialisation from the data** (:func:`pca_gene_embeddings`): the gene-token
   embedding table starts from the genes' loadings on the top ``d_model`` principal components of
   the centred log-normalised ``.raw`` matrix of the 700 cells (``V[:, :d] * S[:d]``, rescaled to
   a mean squared norm of 1; the model's gene LayerNorm follows) — an unsupervised gene
   representation in the spirit of gene2vec / GenePT initialisations, instead of random vectors;
2. **self-supervised pretraining** on all 700 cells — masked value regression (``gep``) and masked
   value prediction from the cell embedding (``mvc``) — kept *gentle*: 3 epochs at a low constant
   learning rate with the gene table frozen, so the data-derived gene geometry survives.

No cell-type label is seen, so a later fine-tune/test split does not leak (the test cells'
expression is seen unlabelled, as a logistic regression's feature scaling or PCA would). The
cell embedding is scGPT's value-weighted pooling (``"weighted"``, w-pool). On a 2-core CPU it
takes a few minutes and, for a fixed seed, gives the same weights every time.

This is a demo for exercising the kit (tokenize, embed, fine-tune, predict, widgets) offline,
not a foundation model: it knows 765 genes and has seen 700 cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import time
from pathlib import Path
from typing import Any

#: architecture of the demo model (scGPT family; see :func:`cellkit.presets.scgpt_config`)
ARCH: dict[str, Any] = {
    "d_model": 128,
    "n_heads": 8,
    "n_layers": 2,
    "d_ff": 256,
    "dropout": 0.1,
    "mvc": True,
    "n_bins": 51,
}
#: pretraining recipe (arguments of :func:`cellkit.pretrain`)
PRETRAIN: dict[str, Any] = {
    "objectives": {"gep": 1.0, "mvc": 1.0},
    "mask_ratio": 0.4,
    "epochs": 3,
    "lr": 3e-4,
    "batch_size": 16,
    "val_size": 0.05,
    "schedule": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.01,
    "bucket_by_length": True,
    # keep the PCA-initialised gene table: longer / stronger reconstruction training (10 epochs at
    # lr 3e-3, table trainable) washed out the cell-type geometry the classifier needs
    # (benchmarks/RESULTS.md, issue 5)
    "freeze": ("encoder.embeddings.gene",),
}
#: pooling of the cell embedding: scGPT's value-weighted w-pool (with the PCA-initialised gene
#: embeddings the cell embedding starts near an expression-weighted PCA projection)
POOLING = "weighted"
#: how the gene-token embeddings are initialised (see :func:`pca_gene_embeddings`)
GENE_INIT = "pca"
#: how the demo data are tokenized: ``.raw`` already holds log1p CP10k values
TOKENIZE_OPTIONS: dict[str, Any] = {"normalize_total": None}
DEFAULT_OUT = Path(__file__).resolve().parent / "demo_model"


def pca_gene_embeddings(x: Any, d_model: int) -> Any:
    """Label-free gene vectors: loadings on the top ``d_model`` principal components of ``x``.

    ``x`` is cells x genes (log-normalised expression); returns a float32 genes x ``d_model``
    array ``V[:, :d] * S[:d]`` of the column-centred matrix's SVD, rescaled so that the mean
    squared row norm is 1.
    """
    import numpy as np
    import scipy.sparse as sp

    x = x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(d_model, len(s))
    out = np.zeros((x.shape[1], d_model))
    out[:, :k] = vt[:k].T * s[:k]
    out /= np.sqrt((out**2).sum(axis=1).mean())
    return out.astype(np.float32)


def init_gene_embeddings(model: Any, genes: list[str], vectors: Any) -> None:
    """Write ``vectors`` (genes x d_model) into the model's gene-token embedding table."""
    import torch

    table = model.encoder.embeddings.gene.weight
    ids = torch.tensor([model.vocab[g] for g in genes])
    with torch.no_grad():
        table[ids] = torch.as_tensor(vectors, dtype=table.dtype)


def train(seed: int = 0, *, epochs: int | None = None, progress: bool = False) -> Any:
    """Pretrain the demo model and return it (not saved)."""
    import torch

    from ..presets import build_model
    from ..tasks import pretrain
    from . import pbmc_demo

    adata = pbmc_demo()
    genes = list(adata.raw.var_names)
    model = build_model(genes, family="scgpt", seed=seed, **ARCH)
    model.config.pooling = POOLING
    init_gene_embeddings(model, genes, pca_gene_embeddings(adata.raw.X, ARCH["d_model"]))
    opts = dict(PRETRAIN)
    if epochs is not None:
        opts["epochs"] = epochs
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = pretrain(
        adata,
        model,
        use_raw=True,
        tokenize_options=TOKENIZE_OPTIONS,
        seed=seed,
        device="cpu",
        progress=progress,
        **opts,
    )
    wall = time.perf_counter() - start
    last = result.history.epoch_records[-1] if result.history.epoch_records else {}
    model.config.input = dataclasses.replace(
        model.config.input, use_raw=True, normalize_total=False, log1p=False
    )
    model.config.metadata = {
        "name": "cellkit demo model",
        "what": (
            "A demo for exercising cellkit offline, NOT a foundation model: a small scGPT-style model "
            "pretrained from scratch by cellkit on the 700 cells / 765 genes of scanpy's pbmc68k_reduced."
        ),
        "gene_init": (
            "pca: gene-token embeddings initialised label-free from the genes' loadings on the top "
            "d_model principal components of the centred .raw matrix (V[:, :d] * S[:d], mean squared "
            "norm 1), then pretrained"
        ),
        "trained_by": "cellkit.datasets.make_demo_model",
        "command": f"python -m cellkit.datasets.make_demo_model --seed {seed}",
        "data": "scanpy.datasets.pbmc68k_reduced() .raw (log1p CP10k, 700 cells x 765 genes)",
        "labels_seen": False,
        "tokenize": {"use_raw": True, **TOKENIZE_OPTIONS},
        "architecture": dict(ARCH, pooling=POOLING),
        "pretrain": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
        "seed": seed,
        "date": _dt.date.today().isoformat(),
        "final_losses": {k: round(float(v), 3) for k, v in last.items() if "loss" in k},
        "train_seconds": round(wall, 1),
    }
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory to write (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = train(args.seed, epochs=args.epochs, progress=args.progress)
    path = model.save(args.out)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    print(f"saved {path} ({size / 1e6:.2f} MB); {model.config.metadata['final_losses']}")


if __name__ == "__main__":
    main()
