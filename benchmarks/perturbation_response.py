"""Perturbation-response prediction on a synthetic perturb-seq screen with planted effects (issue 8).

Data: :func:`cellkit.datasets.synthetic_perturbation` — 200 genes, 300 control cells, 24 single
and 16 double perturbations of 50 cells each, a shared response to every perturbation and a small
non-additive interaction in the doubles. Held out: ``--n-heldout`` doubles, i.e. *unseen
combinations of seen genes* (each of their genes was perturbed alone in training). The model
(:func:`cellkit.fit_perturbation_model`, a fresh scGPT-style transformer) is trained on the
control cells, the singles and the other doubles, on the CPU.

Scores per held-out perturbation (:func:`cellkit.evaluate_perturbation`, against the held-out
cells' observed mean change from the control mean):

* ``Pearson Δ``: correlation of predicted and observed change over all genes;
* ``Pearson Δ DE``: the same on the 20 genes with the largest observed change;
* ``planted top-20``: fraction of the 20 genes with the largest *planted* effect (the ground
  truth, noise-free) that are among the 20 genes with the largest predicted change.

Each for the model and for the "mean of training perturbations" baseline (the mean observed
change over the training perturbations, the same prediction for every held-out one), and the
Pearson scores of the additive baseline (``additive_pearson_delta*`` of
:func:`cellkit.evaluate_perturbation`: the sum of the two genes' observed single-perturbation
changes, both singles being training perturbations here): a strong non-learned baseline the
model has to beat. The script checks those against its own sum of the single changes.

    OMP_NUM_THREADS=1 python benchmarks/perturbation_response.py [--epochs 15] [--threads 1] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def markdown(df) -> str:
    """A pipe table (no tabulate dependency)."""
    head = [df.index.name or "", *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for name, row in df.iterrows():
        lines.append("| " + " | ".join([str(name), *(f"{v:.3f}" for v in row)]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-heldout", type=int, default=6)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    import cellkit
    from cellkit.datasets import synthetic_perturbation
    from cellkit.perturbation import parse_condition

    adata = synthetic_perturbation(
        n_genes=200,
        n_control=300,
        n_cells_per_perturbation=50,
        n_single=24,
        n_double=16,
        n_targets=10,
        interaction=0.2,
        seed=args.seed,
    )
    conditions = [c for c in adata.obs["condition"].cat.categories if c != "ctrl"]
    doubles = [c for c in conditions if "ctrl" not in c.split("+")]
    rng = np.random.default_rng(args.seed)
    held = sorted(rng.choice(doubles, size=args.n_heldout, replace=False).tolist())
    train = adata[~adata.obs["condition"].isin(held)].copy()

    t0 = time.perf_counter()
    result = cellkit.fit_perturbation_model(
        train,
        architecture=cellkit.PerturbationArchitecture(
            d_model=args.d_model, n_heads=4, n_layers=args.n_layers, d_ff=2 * args.d_model
        ),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device="cpu",
        progress=False,
    )
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = result.predict(held, device="cpu")
    pred_s = time.perf_counter() - t0
    table = cellkit.evaluate_perturbation(adata, pred, top_de=20)

    # -- ground-truth recovery and the additive reference
    x = adata.X
    labels = adata.obs["condition"].astype(str).to_numpy()
    ctrl = x[labels == "ctrl"].mean(0)
    genes = list(adata.var_names)
    truth = adata.uns["perturbation_truth"]
    common = adata.uns["perturbation_common"].reindex(genes).fillna(0).to_numpy()
    train_conditions = result.train_conditions
    base = np.mean([x[labels == c].mean(0) - ctrl for c in train_conditions], axis=0)

    def top(v: np.ndarray, k: int = 20) -> set[int]:
        return set(np.argsort(-np.abs(v), kind="stable")[:k].tolist())

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    rows = []
    for cond in held:
        a, b = parse_condition(cond)
        planted = common + sum(truth[g].reindex(genes).fillna(0).to_numpy() for g in (a, b))
        inter = adata.uns["perturbation_interaction"].get(cond)
        if inter is not None:
            planted = planted + inter.reindex(genes).fillna(0).to_numpy()
        obs = x[labels == cond].mean(0) - ctrl
        model_delta = pred[cond].to_numpy() - ctrl
        additive = sum(x[labels == f"{g}+ctrl"].mean(0) - ctrl for g in (a, b))
        de = np.argsort(-np.abs(obs), kind="stable")[:20]
        t = table.loc[cond]
        assert abs(t["additive_pearson_delta_de"] - pearson(additive[de], obs[de])) < 1e-6, cond
        rows.append(
            {
                "held-out perturbation": cond,
                "model Pearson Δ": t["pearson_delta"],
                "mean baseline Pearson Δ": t["baseline_pearson_delta"],
                "additive Pearson Δ": t["additive_pearson_delta"],
                "model Pearson Δ DE": t["pearson_delta_de"],
                "mean baseline Pearson Δ DE": t["baseline_pearson_delta_de"],
                "additive Pearson Δ DE": t["additive_pearson_delta_de"],
                "model planted top-20": len(top(model_delta) & top(planted)) / 20,
                "mean baseline planted top-20": len(top(base) & top(planted)) / 20,
                "additive planted top-20": len(top(additive) & top(planted)) / 20,
            }
        )
    out = pd.DataFrame(rows).set_index("held-out perturbation")
    out.loc["**mean**"] = out.mean()

    n_train = int((train.obs["condition"] != "ctrl").sum())
    lines = [
        f"Synthetic screen: {adata.n_vars} genes, {int((labels == 'ctrl').sum())} control cells, "
        f"{len(conditions)} perturbations ({len(conditions) - len(doubles)} single, {len(doubles)} double) × 50 cells; "
        f"held out {len(held)} doubles of seen genes; trained on {len(train_conditions)} perturbations "
        f"({n_train} perturbed + {int((train.obs['condition'] == 'ctrl').sum())} control cells, 10% of them for validation).",
        "",
        f"Model: d_model {args.d_model}, {args.n_layers} layers, {result.model.num_parameters():,} parameters; "
        f"{args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, cosine schedule; seed {args.seed}. "
        f"Training {fit_s:.1f} s, prediction {pred_s:.1f} s ({len(held)} perturbations × "
        f"{len(result.control_cells)} control cells) on {args.threads} CPU thread(s), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}. "
        f"Final validation MSE {result.metrics.get('val/loss', float('nan')):.4f}.",
        "",
        markdown(out),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
