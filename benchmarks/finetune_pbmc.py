"""Fine-tune the demo model for cell type on pbmc68k_reduced vs logistic regression (issue 5).

For each seed: one stratified train / val / test split (``cellkit.tasks.stratified_split``,
val 10 %, test 20 %), then on the same test cells

* ``finetune``: :func:`cellkit.finetune` of :func:`cellkit.datasets.demo_model` (val picks the best epoch);
* ``logreg raw``: scikit-learn ``LogisticRegression`` on the 765 genes' ``.raw`` log1p CP10k values;
* ``logreg bins``: the same on the model's actual input — the tokenizer's per-cell value bins as a
  dense cells x genes matrix (0 where a gene is not expressed);

both baselines are trained on train + val. Prints held-out macro-F1 and accuracy per seed and
their mean, with fine-tuning wall time and throughput (training cells x epochs / wall seconds).

    python benchmarks/finetune_pbmc.py [--seeds 0 1 2] [--epochs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np

from cellkit.datasets import DEMO_FINETUNE as FINETUNE  # the demo model's fine-tune recipe


def binned_matrix(tokens, n_genes: int) -> np.ndarray:
    """Dense (cells, genes) matrix of the tokenizer's values (gene token ids < n_genes are genes)."""
    n = len(tokens)
    rows = np.repeat(np.arange(n), np.diff(tokens.offsets))
    out = np.zeros((n, n_genes), dtype=np.float32)
    keep = tokens.gene_ids < n_genes
    out[rows[keep], tokens.gene_ids[keep]] = tokens.values[keep]
    return out


def logreg(x: np.ndarray, y: np.ndarray, fit: np.ndarray, test: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(max_iter=5000).fit(x[fit], y[fit])
    pred = clf.predict(x[test])
    present = np.unique(y[test])
    return {
        "macro_f1": float(f1_score(y[test], pred, labels=present, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y[test], pred)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=FINETUNE["epochs"])
    parser.add_argument("--lr", type=float, default=FINETUNE["lr"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--val-size", type=float, default=0.1)
    parser.add_argument("--test-size", type=float, default=0.2)
    args = parser.parse_args()

    import scipy.sparse as sp
    import torch

    import cellkit
    from cellkit.datasets import DEMO_TOKENIZE_OPTIONS, demo_model, pbmc_demo
    from cellkit.tasks import stratified_split

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    adata = pbmc_demo()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    raw = adata.raw.X
    raw = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
    model0 = demo_model()
    n_genes = adata.raw.n_vars
    tokens = cellkit.tokenize(adata, model0, use_raw=True, progress=False, **DEMO_TOKENIZE_OPTIONS)
    bins = binned_matrix(tokens, len(model0.vocab))[:, [model0.vocab[g] for g in adata.raw.var_names]]
    assert bins.shape == (adata.n_obs, n_genes)

    opts = dict(FINETUNE, epochs=args.epochs, lr=args.lr)
    rows = []
    for seed in args.seeds:
        split = stratified_split(labels, val_size=args.val_size, test_size=args.test_size, seed=seed)
        data = adata.copy()
        data.obs["split"] = split
        fit, test = split != "test", split == "test"
        start = time.perf_counter()
        res = cellkit.finetune(
            data,
            demo_model(),
            label_key="bulk_labels",
            split_key="split",
            seed=seed,
            use_raw=True,
            tokenize_options=DEMO_TOKENIZE_OPTIONS,
            progress=False,
            device="cpu",
            **opts,
        )
        wall = time.perf_counter() - start
        assert (res.split.to_numpy() == split).all()
        n_epochs = len(res.history.epoch_records)
        rows.append(
            {
                "seed": seed,
                "finetune": {"macro_f1": res.metrics["macro_f1"], "accuracy": res.metrics["accuracy"]},
                "logreg raw": logreg(raw, labels, fit, test),
                "logreg bins": logreg(bins, labels, fit, test),
                "wall_s": wall,
                "cells_per_s": int((split == "train").sum()) * n_epochs / wall,
            }
        )
        r = rows[-1]
        print(
            f"seed {seed}: finetune F1 {r['finetune']['macro_f1']:.3f} | logreg raw {r['logreg raw']['macro_f1']:.3f}"
            f" | logreg bins {r['logreg bins']['macro_f1']:.3f} | {wall:.0f} s",
            flush=True,
        )

    methods = ["finetune", "logreg raw", "logreg bins"]
    print()
    print(
        f"pbmc68k_reduced, {adata.n_obs} cells, bulk_labels; test {args.test_size:.0%} stratified; torch threads {args.threads}"
    )
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU; finetune {opts}")
    print()
    header = (
        "| seed | "
        + " | ".join(f"{m} macro-F1 | {m} acc" for m in methods)
        + " | finetune wall s | cells/s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        cells = " | ".join(f"{r[m]['macro_f1']:.3f} | {r[m]['accuracy']:.3f}" for m in methods)
        print(f"| {r['seed']} | {cells} | {r['wall_s']:.0f} | {r['cells_per_s']:.0f} |")
    mean = " | ".join(
        f"{np.mean([r[m]['macro_f1'] for r in rows]):.3f} | {np.mean([r[m]['accuracy'] for r in rows]):.3f}"
        for m in methods
    )
    print(
        f"| mean | {mean} | {np.mean([r['wall_s'] for r in rows]):.0f} | {np.mean([r['cells_per_s'] for r in rows]):.0f} |"
    )
    ft = np.mean([r["finetune"]["macro_f1"] for r in rows])
    lr_raw = np.mean([r["logreg raw"]["macro_f1"] for r in rows])
    print(
        f"\ngoal (fine-tuned macro-F1 >= logreg raw): {'met' if ft >= lr_raw else 'NOT met'} ({ft:.3f} vs {lr_raw:.3f})"
    )


if __name__ == "__main__":
    main()
