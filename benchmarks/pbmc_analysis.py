"""Analysis of the demo model on real PBMC data (pbmc68k_reduced): embeddings, mapping, genes (issue 6).

What it runs, all on :func:`cellkit.datasets.pbmc_demo` (700 cells, 765 genes, 10 ``bulk_labels``):

1. **Embeddings**: the demo model's own pooling (mean) and ``pooling="cls"``; baselines: the
   shipped PCA (``obsm["X_pca"]``, 50 comps) and an *untrained* model of the same architecture
   (``cellkit.presets.build_model(..., seed=0)``, the demo model's own initialisation).
   :func:`cellkit.embedding_metrics` (NMI, ARI, ASW label, avg_bio) on all cells.
2. **Reference mapping**: seeded stratified half/half splits (``cellkit.tasks.stratified_split``),
   :func:`cellkit.transfer_labels` from the reference half to the query half: accuracy, macro-F1,
   mean confidence, accuracy and fraction of the confidence >= 0.8 cells.
3. **Genes**: token and contextual gene embeddings (demo and untrained model): cosine similarity of
   known marker pairs vs all gene pairs (mean, percentile), the pairs' co-expression in the data,
   top-10 similar genes, similarity networks, Leiden gene programs at a few resolutions and their
   scores per cell type (``score_programs``, ``.raw``).
4. **Attention**: scGPT's attention-GRN statistic within two cell types; top genes attending to a
   marker gene in each.

    OMP_NUM_THREADS=1 python benchmarks/pbmc_analysis.py [--seeds 0 1 2] [--threads 1] \
        [--json benchmarks/_out/pbmc_analysis.json] [--figures benchmarks/_out]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

LABEL = "bulk_labels"
MARKER_PAIRS = [
    ("CD79A", "CD79B"),
    ("LYZ", "S100A8"),
    ("S100A8", "S100A9"),
    ("CD3D", "CD3E"),
    ("NKG7", "GNLY"),
    ("HLA-DRA", "HLA-DRB1"),
]
#: marker sets looked for among the programs (only the genes in the vocabulary are used)
MARKER_SETS = {
    "monocyte": ["LYZ", "S100A8", "S100A9", "CST3", "FCN1", "TYROBP", "FCER1G", "LGALS2", "CD14"],
    "B cell": ["CD79A", "CD79B", "MS4A1", "CD19", "CD74", "HLA-DQA1", "HLA-DQB1", "TCL1A"],
    "NK / cytotoxic": ["NKG7", "GNLY", "GZMB", "GZMA", "GZMH", "PRF1", "CST7", "CTSW", "KLRD1"],
    "T cell": ["CD3D", "CD3E", "CD2", "IL7R", "LDHB", "CCR7", "CD8A", "CD8B"],
}
QUERY_GENES = ["CD79A", "LYZ", "S100A8", "NKG7", "CD3D", "HLA-DRA"]
RESOLUTIONS = [40.0, 10.0, 5.0]
THRESHOLDS = [0.3, 0.5, 0.7]
HIGH_CONF = 0.8


def log(msg: str) -> None:
    print(msg, flush=True)


def table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """Markdown table of a DataFrame (index as the first column; integer columns stay integers)."""
    cols = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=True, name=None):
        cells = [str(row[0])]
        for v in row[1:]:
            if isinstance(v, float | np.floating):
                cells.append("nan" if np.isnan(v) else floatfmt.format(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- models
def untrained_like(model: Any) -> Any:
    """A randomly initialised model of the demo model's architecture (seed 0), same input conventions."""
    from cellkit.presets import build_model

    arch = dict(model.config.metadata["architecture"])
    pooling = arch.pop("pooling")
    genes = [t for t in model.vocab.tokens if t not in set(model.vocab.specials.values())]
    fresh = build_model(genes, family="scgpt", seed=0, **arch)
    fresh.config.pooling = pooling
    fresh.config.input = model.config.input
    return fresh.eval()


# --------------------------------------------------------------------------------- 1. embeddings
def embed_all(adata: Any, models: dict[str, Any]) -> list[str]:
    import cellkit

    reps = ["X_pca"]
    for name, model in models.items():
        for pooling in (None, "cls"):
            key = f"X_{name}_{pooling or model.config.pooling}"
            cellkit.embed_cells(adata, model, use_raw=True, key_added=key, pooling=pooling, progress=False)
            reps.append(key)
    return reps


def metrics_table(adata: Any, reps: list[str]) -> pd.DataFrame:
    import cellkit

    rows = {}
    for rep in reps:
        m = cellkit.embedding_metrics(adata, label_key=LABEL, use_rep=rep)
        rows[rep] = {
            "dims": adata.obsm[rep].shape[1],
            "NMI": m["nmi"],
            "ARI": m["ari"],
            "ASW label": m["asw_label"],
            "avg_bio": m["avg_bio"],
            "Leiden res": m["resolution"],
        }
    out = pd.DataFrame(rows).T
    out.index.name = "embedding"
    out["dims"] = out["dims"].astype(int)
    return out


# ------------------------------------------------------------------------------------ 2. mapping
def mapping_table(adata: Any, reps: list[str], seeds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.metrics import accuracy_score, f1_score

    import cellkit
    from cellkit.tasks import stratified_split

    labels = adata.obs[LABEL].astype(str).to_numpy()
    per_seed = []
    for seed in seeds:
        split = stratified_split(labels, val_size=0.0, test_size=0.5, seed=seed)
        ref, query = adata[split == "train"].copy(), adata[split == "test"].copy()
        for rep in reps:
            cellkit.transfer_labels(query, ref, label_key=LABEL, use_rep=rep, key_added="pred")
            y = query.obs[LABEL].astype(str).to_numpy()
            pred = query.obs["pred"].astype(str).to_numpy()
            conf = query.obs["pred_confidence"].to_numpy()
            hi = conf >= HIGH_CONF
            per_seed.append(
                {
                    "embedding": rep,
                    "seed": seed,
                    "n_ref": ref.n_obs,
                    "n_query": query.n_obs,
                    "accuracy": accuracy_score(y, pred),
                    "macro_f1": f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0),
                    "mean_conf": float(conf.mean()),
                    "acc_conf>=0.8": float((y[hi] == pred[hi]).mean()) if hi.any() else float("nan"),
                    "frac_conf>=0.8": float(hi.mean()),
                }
            )
    raw = pd.DataFrame(per_seed)
    cols = ["accuracy", "macro_f1", "mean_conf", "acc_conf>=0.8", "frac_conf>=0.8"]
    agg = raw.groupby("embedding", sort=False)[cols]
    mean, sd = agg.mean(), agg.std(ddof=0)
    out = pd.DataFrame(index=mean.index)
    for c in cols:
        out[c] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[c], sd[c], strict=True)]
    return out, raw


# -------------------------------------------------------------------------------------- 3. genes
def pair_stats(sim: pd.DataFrame, pairs: list[tuple[str, str]]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Cosine of each pair, and its percentile among all distinct gene pairs of ``sim``."""
    s = sim.to_numpy()
    iu = np.triu_indices(len(s), k=1)
    allv = np.sort(s[iu])
    rows = {}
    for a, b in pairs:
        v = float(sim.loc[a, b])
        rows[f"{a}/{b}"] = {
            "cosine": v,
            "percentile": 100.0 * np.searchsorted(allv, v, side="right") / len(allv),
        }
    bg = {"mean": float(allv.mean()), "sd": float(allv.std()), "p95": float(np.percentile(allv, 95))}
    return pd.DataFrame(rows).T, bg


def set_stats(sim: pd.DataFrame, sets: dict[str, list[str]], bg_mean: float) -> dict[str, Any]:
    out = {}
    for name, genes in sets.items():
        g = [x for x in genes if x in sim.index]
        sub = sim.loc[g, g].to_numpy()
        iu = np.triu_indices(len(g), k=1)
        out[name] = {"genes": g, "mean_within": float(sub[iu].mean()), "background": bg_mean}
    return out


def coexpression(adata: Any, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Pearson correlation of the pair's ``.raw`` (log1p CP10k) values over cells, and its percentile."""
    x = adata.raw.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(x.T)
    names = list(adata.raw.var_names)
    iu = np.triu_indices(len(names), k=1)
    allv = np.sort(np.nan_to_num(c[iu]))
    out = {}
    for a, b in pairs:
        v = float(c[names.index(a), names.index(b)])
        out[f"{a}/{b}"] = (v, 100.0 * np.searchsorted(allv, v, side="right") / len(allv))
    return out


def program_report(
    adata: Any, emb: pd.DataFrame, resolution: float, tag: str, figures: str | None
) -> dict[str, Any]:
    from cellkit.analysis import gene_programs, score_programs

    programs = gene_programs(emb, resolution=resolution)
    n_all = len(gene_programs(emb, resolution=resolution, min_size=1))
    sizes = [len(g) for g in programs.values()]
    res: dict[str, Any] = {
        "n_clusters": n_all,
        "n_programs_ge5": len(programs),
        "genes_in_programs": int(sum(sizes)),
        "sizes": sizes,
    }
    if not programs:
        return res
    key = f"prog_{tag}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_programs(adata, programs, key_added=key, use_raw=True)
    cols = [f"{key}_{p}" for p in programs]
    means = adata.obs[cols].groupby(adata.obs[LABEL], observed=True).mean()
    means.columns = list(programs)
    # the cell type where each program scores highest, and by how much over the mean of the other types
    top = {}
    for p in programs:
        col = means[p].sort_values(ascending=False)
        top[p] = {"top_type": str(col.index[0]), "margin": float(col.iloc[0] - col.iloc[1:].mean())}
    # per cell type: the program that scores most above the other types there
    per_type = {}
    for ct in means.index:
        margin = means.loc[ct] - means.drop(index=ct).mean()
        best = str(margin.idxmax())
        per_type[str(ct)] = {"program": best, "margin": float(margin.max()), "genes": programs[best]}
    marker_hits = {}
    for set_name, genes in MARKER_SETS.items():
        hits = []
        for p, members in programs.items():
            inter = sorted(set(members) & set(genes))
            if len(inter) >= 2:
                hits.append({"program": p, "size": len(members), "markers": inter, **top[p]})
        marker_hits[set_name] = hits
    res.update(
        {
            "programs": programs,
            "top_type": top,
            "best_program_per_type": per_type,
            "marker_programs": marker_hits,
            "mean_scores": means.round(4).to_dict(),
        }
    )
    if figures:
        from cellkit import viz

        fig = viz.program_heatmap(means, title=f"{tag}: program scores per cell type")
        viz.save_html(fig, f"{figures}/pbmc_programs_{tag}.html")
    return res


def genes_section(adata: Any, models: dict[str, Any], figures: str | None) -> dict[str, Any]:
    from cellkit.analysis import (
        contextual_gene_embeddings,
        gene_embeddings,
        gene_network,
        gene_similarity,
        similar_genes,
    )

    demo = models["demo"]
    pairs = [(a, b) for a, b in MARKER_PAIRS if a in demo.vocab and b in demo.vocab]
    missing = sorted({g for p in MARKER_PAIRS for g in p if g not in demo.vocab})
    sets = {k: [g for g in v if g in demo.vocab] for k, v in MARKER_SETS.items()}
    set_missing = {k: [g for g in v if g not in demo.vocab] for k, v in MARKER_SETS.items()}
    out: dict[str, Any] = {"pairs_missing": missing, "marker_sets": sets, "marker_sets_missing": set_missing}
    log(f"\nmarker pairs missing from the vocabulary: {missing or 'none'}")
    log(f"marker sets (in vocabulary): {sets}\nmissing from the vocabulary: {set_missing}")

    coexp = coexpression(adata, pairs)
    embs: dict[str, pd.DataFrame] = {}
    for name, model in models.items():
        embs[f"{name} token"] = gene_embeddings(model)
        embs[f"{name} contextual"] = contextual_gene_embeddings(adata, model, use_raw=True, progress=False)
    for name in models:
        # contextual states share a large common direction (every pair has cosine ~0.86 in the demo
        # model): also compare them after subtracting the mean gene vector ("centred")
        e = embs[f"{name} contextual"]
        embs[f"{name} contextual centred"] = e - e.mean(axis=0)
    for k, e in embs.items():
        log(f"{k}: {e.shape[0]} genes x {e.shape[1]} dims")
    # how far pretraining moved the token embeddings from their initialisation (the untrained model
    # is the demo model's own seed-0 initialisation)
    iu = np.triu_indices(len(embs["demo token"]), k=1)
    s_demo = gene_similarity(embs["demo token"]).to_numpy()[iu]
    s_init = gene_similarity(embs["untrained token"].loc[embs["demo token"].index]).to_numpy()[iu]
    drift = float(np.corrcoef(s_demo, s_init)[0, 1])
    out["token_similarity_corr_with_init"] = drift
    log(f"Pearson r of all gene-pair token cosines, demo vs its initialisation: {drift:.3f}")

    # pair similarities
    pair_rows = {}
    backgrounds = {}
    set_rows = {}
    sims = {}
    for k, e in embs.items():
        sim = gene_similarity(e)
        sims[k] = sim
        ps, bg = pair_stats(sim, pairs)
        backgrounds[k] = bg
        for pair, r in ps.iterrows():
            pair_rows.setdefault(pair, {})[f"{k} cos (pct)"] = f"{r['cosine']:.2f} ({r['percentile']:.0f})"
        set_rows[k] = set_stats(sim, sets, bg["mean"])
    for pair, (v, pct) in coexp.items():
        pair_rows[pair]["co-expression r (pct)"] = f"{v:.2f} ({pct:.0f})"
    pair_df = pd.DataFrame(pair_rows).T
    pair_df.index.name = "pair"
    bg_df = pd.DataFrame(backgrounds).T
    bg_df.index.name = "all gene pairs"
    log("\n### Marker pairs: cosine (percentile among all gene pairs)\n")
    log(table(pair_df))
    log("\nbackground: all distinct gene pairs\n")
    log(table(bg_df))
    set_df = pd.DataFrame(
        {
            k: {s: v["mean_within"] for s, v in d.items()} | {"all pairs": backgrounds[k]["mean"]}
            for k, d in set_rows.items()
        }
    )
    set_df.index.name = "mean cosine within set"
    log("\n### Marker sets: mean pairwise cosine within the set\n")
    log(table(set_df))
    out.update(
        {
            "pairs": pair_df.to_dict(),
            "background": backgrounds,
            "sets_within": set_df.to_dict(),
            "n_genes": {k: int(e.shape[0]) for k, e in embs.items()},
        }
    )

    # top-10 similar genes (demo model)
    top10 = {}
    for k in ("demo token", "demo contextual", "demo contextual centred"):
        for g in QUERY_GENES:
            if g not in embs[k].index:
                continue
            s = similar_genes(embs[k], g, k=10)
            top10.setdefault(k, {})[g] = [
                f"{a} {b:.2f}" for a, b in zip(s["gene"], s["similarity"], strict=True)
            ]
        log(f"\n### Top-10 similar genes, {k}\n")
        for g, lst in top10[k].items():
            log(f"- {g}: {', '.join(lst)}")
    out["top10"] = top10

    # networks
    net_rows = {}
    import networkx as nx

    for k in (
        "demo token",
        "untrained token",
        "demo contextual",
        "demo contextual centred",
        "untrained contextual centred",
    ):
        for t in THRESHOLDS:
            graph = gene_network(embs[k], threshold=t)
            non_iso = [n for n in graph.nodes if graph.degree(n) > 0]
            comps = sorted((len(c) for c in nx.connected_components(graph.subgraph(non_iso))), reverse=True)
            net_rows[f"{k} @ {t}"] = {
                "nodes": graph.number_of_nodes(),
                "edges": graph.number_of_edges(),
                "non-isolated": len(non_iso),
                "components": len(comps),
                "largest": comps[0] if comps else 0,
            }
    net_df = pd.DataFrame(net_rows).T
    net_df.index.name = "network (threshold)"
    log("\n### Similarity networks (cosine >= threshold)\n")
    log(table(net_df))
    out["networks"] = net_df.to_dict()
    if figures:
        from cellkit import viz

        for k in ("demo token", "demo contextual centred"):
            fig = viz.gene_network(
                sims[k], threshold=0.5, highlight=[g for g in QUERY_GENES if g in sims[k].index], title=k
            )
            viz.save_html(fig, f"{figures}/pbmc_network_{k.replace(' ', '_')}.html")

    # programs
    progs: dict[str, Any] = {}
    for k in ("demo token", "demo contextual", "untrained token", "untrained contextual"):
        for r in RESOLUTIONS:
            tag = f"{k.replace(' ', '_')}_r{r:g}"
            progs[f"{k} @ {r:g}"] = program_report(
                adata, embs[k], r, tag, figures if k.startswith("demo") else None
            )
    prog_rows = {}
    for k, p in progs.items():
        sizes = p["sizes"]
        hits = p.get("marker_programs", {})
        prog_rows[k] = {
            "clusters": p["n_clusters"],
            "programs >=5": p["n_programs_ge5"],
            "genes in them": p["genes_in_programs"],
            "largest sizes": ", ".join(map(str, sizes[:5])),
            **{
                f"{s} programs (top type)": "; ".join(
                    f"{h['program']}[{'/'.join(h['markers'])}]→{h['top_type']}" for h in hits.get(s, [])
                )
                or "–"
                for s in MARKER_SETS
            },
        }
    prog_df = pd.DataFrame(prog_rows).T
    prog_df.index.name = "embedding @ resolution"
    log(
        "\n### Gene programs (Leiden, >= 5 genes); programs with >= 2 genes of a marker set → top cell type\n"
    )
    log(table(prog_df))
    for k in ("demo token @ 40", "demo contextual @ 40", "demo contextual @ 10", "demo token @ 10"):
        p = progs[k]
        if "programs" not in p:
            continue
        log(f"\nexample programs, {k}:")
        for name, genes in list(p["programs"].items())[:6]:
            t = p["top_type"][name]
            log(f"- {name} ({len(genes)}; top {t['top_type']}, +{t['margin']:.2f}): {', '.join(genes[:15])}")
    for k in ("demo contextual @ 10", "untrained contextual @ 10"):
        p = progs[k]
        if "programs" not in p:
            continue
        log(
            f"\nper cell type, the most specific program ({k}; margin = type mean − mean of the other types):"
        )
        for ct, b in p["best_program_per_type"].items():
            log(
                f"- {ct}: {b['program']} (+{b['margin']:.2f}; {len(b['genes'])} genes): {', '.join(b['genes'][:12])}"
            )
    out["programs"] = progs
    return out


# ---------------------------------------------------------------------------------- 4. attention
def attention_section(
    adata: Any, model: Any, key_gene: str, types: list[str], min_frac: float
) -> dict[str, Any]:
    from cellkit.analysis import gene_attention, top_influenced_genes

    out: dict[str, Any] = {"key_gene": key_gene, "min_cell_fraction": min_frac}
    tops = {}
    for t in types:
        uns_key = f"attn_{t}"
        gene_attention(
            adata,
            model,
            groupby=LABEL,
            groups=t,
            statistic="grn",
            use_raw=True,
            key_added=uns_key,
        )
        n_cells = adata.uns[uns_key]["params"]["n_cells"]
        top = top_influenced_genes(adata, key_gene, k=1000, key=uns_key)
        top = top[top["n_cells"] >= min_frac * n_cells].head(15).reset_index(drop=True)
        tops[t] = top
        out[t] = {
            "n_cells": n_cells,
            "top": [f"{g} {s:.3f}" for g, s in zip(top["gene"], top["score"], strict=True)],
        }
        log(f"\n{key_gene} in {t} ({n_cells} cells; genes co-occurring in >= {min_frac:.0%} of them):")
        log("  " + ", ".join(out[t]["top"]))
    if len(types) == 2:
        a, b = (set(tops[t]["gene"]) for t in types)
        out["overlap_top15"] = len(a & b)
        log(f"overlap of the two top-15 lists: {len(a & b)}")
    return out


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="half/half split seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--figures", default=None, help="folder for HTML figures (e.g. benchmarks/_out)")
    parser.add_argument("--no-attention", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import cellkit
    from cellkit.datasets import demo_model, pbmc_demo

    t0 = time.perf_counter()
    adata = pbmc_demo()
    demo = demo_model()
    models = {"demo": demo, "untrained": untrained_like(demo)}
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "date": _dt.date.today().isoformat(),
        "cellkit": cellkit.__version__,
        "torch": torch.__version__,
        "data": f"pbmc68k_reduced {adata.n_obs} cells x {adata.raw.n_vars} genes, {LABEL}",
        "model": {k: v for k, v in demo.config.metadata.items() if k in ("name", "architecture", "seed")},
    }
    log(f"machine: {report['machine']}; cellkit {report['cellkit']}, torch {report['torch']}")
    log(
        f"demo model: {demo.num_parameters():,} parameters; architecture {demo.config.metadata['architecture']}"
    )

    t = time.perf_counter()
    reps = embed_all(adata, models)
    log(f"embedded 700 cells with {len(models)} models x 2 poolings in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    mt = metrics_table(adata, reps)
    log(f"\n## 1. Embedding metrics on all {adata.n_obs} cells ({LABEL}) [{time.perf_counter() - t:.1f} s]\n")
    log(table(mt))
    report["metrics"] = mt.to_dict(orient="index")

    t = time.perf_counter()
    mp, raw = mapping_table(adata, reps, args.seeds)
    log(
        f"\n## 2. Reference mapping, stratified half/half (seeds {args.seeds}; mean ± sd; "
        f"{int(raw['n_ref'].iloc[0])} reference / {int(raw['n_query'].iloc[0])} query cells) "
        f"[{time.perf_counter() - t:.1f} s]\n"
    )
    log(table(mp))
    report["mapping"] = {"summary": mp.to_dict(orient="index"), "per_seed": raw.to_dict(orient="records")}

    if args.figures:
        from cellkit import viz

        for rep in ("X_demo_mean", "X_pca"):
            cellkit.analysis.umap(adata, use_rep=rep)
            fig = viz.embedding(adata, basis=f"{rep}_umap", color=LABEL, title=f"{rep} UMAP")
            viz.save_html(fig, f"{args.figures}/pbmc_umap_{rep}.html")

    t = time.perf_counter()
    log("\n## 3. Genes")
    report["genes"] = genes_section(adata, models, args.figures)
    log(f"[genes section {time.perf_counter() - t:.1f} s]")

    if not args.no_attention:
        t = time.perf_counter()
        log("\n## 4. Attention-GRN (last layer, mean over heads)")
        report["attention"] = {
            g: attention_section(adata, demo, g, ["CD14+ Monocyte", "CD19+ B"], 0.2)
            for g in ("HLA-DRA", "CD74")
        }
        log(f"[attention section {time.perf_counter() - t:.1f} s]")

    report["runtime_s"] = round(time.perf_counter() - t0, 1)
    log(f"\ntotal runtime: {report['runtime_s']} s")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
