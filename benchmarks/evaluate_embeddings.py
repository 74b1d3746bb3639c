"""Honest baselines (issue 19): the demo model's embedding beside HVG + PCA, Harmony and scVI, scIB metrics.

Data: scanpy's ``pbmc68k_reduced`` (:func:`cellkit.datasets.pbmc_demo`, 700 PBMCs, 765 genes, 10
``bulk_labels``), offline. Its ``.raw`` holds log1p CP10k of 765 genes and ``obs["n_counts"]`` the
cells' total counts (over all genes), so the counts of these genes are recovered exactly (up to
float32 round-off, < 0.1 before rounding) as ``round(expm1(raw) · n_counts / 1e4)`` — the
``counts`` layer every baseline reads (PCA normalises and log-transforms it again; scVI models it).

Two tables:

1. **bio only** (no ``batch_key``): the data have no batch column, so no batch metric is honest
   here; Harmony (a batch corrector) is skipped.
2. **``phase`` as a stand-in batch**: cell-cycle phase (G1 501 / S 182 / G2M 17 cells) is a
   *biological* covariate, not a technical batch; it only exercises the batch metrics and
   Harmony. A high "batch" score here means the embedding ignores the cell cycle, which is not
   necessarily desirable.

Rows: ``X_cellkit`` (the shipped demo model, embedded as ``cellkit demo`` does), ``X_random``
(Gaussian noise of the same width: the floor), and the baselines computed by their own libraries
(scanpy, harmonypy, scvi-tools) inside :func:`cellkit.evaluate_embeddings`.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evaluate_embeddings.py [--scvi-epochs 100] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import time
import warnings
from importlib import metadata

import numpy as np
import pandas as pd

LABEL = "bulk_labels"


def markdown(frame: pd.DataFrame) -> str:
    cols = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in frame.iterrows():
        cells = [str(name)] + ["" if pd.isna(v) else f"{v:.3f}" for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts_from_raw(adata) -> tuple[np.ndarray, float]:
    """The counts of ``.raw``'s genes: log1p CP10k back to counts with ``obs["n_counts"]``."""
    raw = adata.raw.X
    raw = raw.toarray() if hasattr(raw, "toarray") else np.asarray(raw)
    approx = np.expm1(raw.astype(np.float64)) * adata.obs["n_counts"].to_numpy()[:, None] / 1e4
    err = np.abs(approx - np.round(approx)).max()
    assert err < 0.25, f"not counts: {err}"
    return np.round(approx).astype(np.float32), float(err)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scvi-epochs", type=int, default=100, help="0: scvi-tools' own heuristic (400 here)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    import anndata as ad
    import torch

    import cellkit
    from cellkit.datasets import demo_model, pbmc_demo

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(
        f"# evaluate_embeddings on pbmc68k_reduced — {_dt.date.today()} — {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s), seeds {args.seeds}, scVI epochs {args.scvi_epochs or 'scvi-tools default'}"
    )
    adata, model = pbmc_demo(), demo_model()
    t = time.perf_counter()
    cellkit.embed_cells(adata, model, key_added="X_cellkit", progress=False)
    embed_s = time.perf_counter() - t
    width = adata.obsm["X_cellkit"].shape[1]
    counts, err = counts_from_raw(adata)
    work = ad.AnnData(counts, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.raw.var_names))
    work.layers["counts"] = counts
    work.obsm["X_cellkit"] = adata.obsm["X_cellkit"]
    print(
        f"data: {work.n_obs} cells × {work.n_vars} genes; counts recovered from .raw (max distance to an integer "
        f"{err:.3f}; median {int(np.median(counts.sum(1)))} counts per cell over these genes); "
        f"demo-model embedding {embed_s:.1f} s ({width} dims)"
    )
    versions = []
    for dist in ("scanpy", "harmonypy", "scvi-tools", "scikit-learn", "igraph"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    print("libraries: " + ", ".join(versions))

    epochs = args.scvi_epochs or None
    runs: dict[str, list[pd.DataFrame]] = {}
    for seed in args.seeds:
        work.obsm["X_random"] = (
            np.random.default_rng(seed).normal(size=(work.n_obs, width)).astype(np.float32)
        )
        for title, batch_key in (
            ("bio only (no batch column)", None),
            ("phase as a stand-in batch (biological!)", "phase"),
        ):
            t = time.perf_counter()
            table = cellkit.evaluate_embeddings(
                work,
                label_key=LABEL,
                keys=("X_cellkit", "X_random"),
                batch_key=batch_key,
                baselines=("pca", "harmony", "scvi"),
                layer="counts",
                scvi_epochs=epochs,
                random_state=seed,
            )
            total_s = time.perf_counter() - t
            runs.setdefault(title, []).append(table)
            print(
                f"\n## seed {seed}, {title}: {table.attrs['n_cells']} cells, label {LABEL!r}, batch {batch_key!r}\n"
            )
            print(markdown(table.dropna(axis=1, how="all")))
            fits = ", ".join(f"{k} {v:.1f} s" for k, v in table.attrs["seconds"].items())
            dims = ", ".join(f"{k} {v}" for k, v in table.attrs["n_dims"].items())
            print(
                f"\nbaseline fit times: {fits}; whole call {total_s:.1f} s (scoring included); dims: {dims}"
            )
    if len(args.seeds) > 1:
        for title, tables in runs.items():
            stacked = pd.concat(tables, keys=range(len(tables)))
            mean = stacked.groupby(level=1, sort=False).mean().dropna(axis=1, how="all")
            sd = stacked.groupby(level=1, sort=False).std().dropna(axis=1, how="all")
            print(f"\n## {title}: mean over seeds {args.seeds}\n")
            print(markdown(mean))
            print(
                "\nlargest standard deviation across seeds per column: "
                + ", ".join(f"{c} {sd[c].max():.3f}" for c in sd)
            )


if __name__ == "__main__":
    main()
