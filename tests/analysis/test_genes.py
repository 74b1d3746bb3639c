"""Gene embeddings, similarity, network, programs and program scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellkit import ConfigError, DataError, UnknownGeneError
from cellkit.analysis import (
    contextual_gene_embeddings,
    gene_embeddings,
    gene_network,
    gene_programs,
    gene_similarity,
    score_programs,
    similar_genes,
)

from ..test_finetune import make_adata, make_model


def planted(n_programs: int = 4, size: int = 8, d: int = 6, seed: int = 0) -> pd.DataFrame:
    """Gene vectors in tight, well-separated groups."""
    r = np.random.default_rng(seed)
    centers = r.normal(0, 1, (n_programs, d)) * 5
    rows = [centers[p] + r.normal(0, 0.05, d) for p in range(n_programs) for _ in range(size)]
    names = [f"P{p}_g{i}" for p in range(n_programs) for i in range(size)]
    return pd.DataFrame(np.asarray(rows), index=names)


def test_gene_embeddings_are_the_token_embeddings():
    model = make_model().eval()
    emb = gene_embeddings(model)
    assert list(emb.index) == [f"G{i}" for i in range(40)]  # specials left out
    ids = torch.tensor([model.vocab["G3"], model.vocab["G7"]])
    with torch.no_grad():
        want = model.token_embeddings(ids).numpy()
    np.testing.assert_allclose(emb.loc[["G3", "G7"]].to_numpy(), want, atol=0)
    sub = gene_embeddings(model, ["G5", "G1"])
    assert list(sub.index) == ["G5", "G1"]
    assert list(gene_embeddings(model, make_adata()[:, :5]).index) == ["G0", "G1", "G2", "G3", "G4"]
    with pytest.raises(UnknownGeneError, match=r"'G400' \(did you mean"):
        gene_embeddings(model, ["G1", "G400"])


def test_similarity_topk_and_network():
    emb = planted()
    top = similar_genes(emb, "P1_g0", k=7)
    assert list(top.columns) == ["gene", "similarity"]
    assert all(g.startswith("P1_") for g in top["gene"])  # its own program comes first
    assert top["similarity"].is_monotonic_decreasing
    assert "P1_g0" not in set(top["gene"])
    assert similar_genes(emb, "P1_g0", k=1, include_self=True)["gene"][0] == "P1_g0"
    sim = gene_similarity(emb)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-12)
    assert sim.loc["P0_g1", "P0_g2"] > 0.99
    graph = gene_network(emb, threshold=0.95)
    assert graph.number_of_nodes() == 32
    assert graph.has_edge("P2_g0", "P2_g5")
    assert not graph.has_edge("P2_g0", "P3_g0")
    with pytest.raises(UnknownGeneError, match="NOPE"):
        similar_genes(emb, "NOPE")
    with pytest.raises(ConfigError, match="threshold"):
        gene_network(emb, threshold=2)


def test_gene_programs_recover_planted_groups():
    programs = gene_programs(planted(), resolution=1.0, n_neighbors=5, min_size=5)
    assert len(programs) == 4
    for genes in programs.values():
        assert len(genes) == 8
        assert len({g.split("_")[0] for g in genes}) == 1
    small = gene_programs(planted(), resolution=1.0, n_neighbors=5, min_size=9)
    assert small == {}
    with pytest.raises(DataError, match="n_neighbors"):
        gene_programs(planted(n_programs=1, size=4), n_neighbors=15)


def test_score_programs_into_obs_only():
    adata = make_adata()
    before = adata.obs.copy()
    programs = {"A": ["G0", "G1", "G2", "G3"], "B": ["G30", "G31", "G32"], "none": ["X1"]}
    with pytest.warns(UserWarning, match="'none'"):
        score_programs(adata, programs, key_added="prog", use_raw=False)
    new = set(adata.obs.columns) - set(before.columns)
    assert new == {"prog_A", "prog_B", "prog_none"}
    pd.testing.assert_frame_equal(adata.obs[before.columns], before)
    assert adata.uns["prog"]["none"] == []
    a = adata.obs["prog_A"]
    assert a.between(0, 1).all()
    assert a.max() == 1
    assert a.min() == 0
    # program A is type0's genes (G0..G12 are high in type0)
    means = adata.obs.groupby("cell_type", observed=True)["prog_A"].mean()
    assert means.idxmax() == "type0"
    assert (adata.obs["prog_none"] == 0).all()
    with pytest.raises(DataError, match="No programs"):
        score_programs(adata, {})


def test_contextual_gene_embeddings_average_over_cells():
    adata = make_adata()
    model = make_model().eval()
    ctx = contextual_gene_embeddings(adata, model, progress=False, batch_size=16)
    assert ctx.shape[1] == 16
    n_cells = ctx.attrs["n_cells"]
    expressed = (adata.X.toarray() > 0).sum(0)
    assert n_cells["G5"] == expressed[5]
    again = contextual_gene_embeddings(adata, model, progress=False, batch_size=3, genes=["G5", "G6"])
    np.testing.assert_allclose(again.to_numpy(), ctx.loc[["G5", "G6"]].to_numpy(), atol=1e-5)


def test_centering_removes_a_shared_direction():
    emb = planted()
    shifted = emb + 50.0  # one dominant shared direction: every pair looks alike
    assert gene_similarity(shifted).to_numpy().min() > 0.9
    centred = gene_similarity(shifted, center=True)
    assert centred.loc["P0_g0", "P1_g0"] < 0.5 < centred.loc["P0_g0", "P0_g1"]
    top = similar_genes(shifted, "P2_g0", k=7, center=True)
    assert all(g.startswith("P2_") for g in top["gene"])
    assert gene_network(shifted, threshold=0.9, center=True).number_of_edges() == 4 * 28
