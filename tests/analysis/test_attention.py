"""Attention analysis: probabilities vs a hand softmax, gene alignment, scGPT's GRN statistic, bad inputs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

import cellkit
from cellkit import CellModel, ConfigError, DataError, GeneVocab, UnknownGeneError
from cellkit.analysis.attention import (
    attention_difference,
    attention_maps,
    gene_attention,
    top_influenced_genes,
)
from cellkit.data.tokenized import TokenizedCells
from cellkit.presets import scgpt_config

from ..test_finetune import assert_unchanged, make_adata, make_model, snapshot

ATOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def make_pre_norm_model(seed: int = 1) -> CellModel:
    genes = [f"G{i}" for i in range(40)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    cfg = scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, n_bins=11)
    cfg.encoder = dataclasses.replace(cfg.encoder, norm_scheme="pre", final_norm=True)
    torch.manual_seed(seed)
    model = CellModel(cfg, vocab)
    assert all(layer.norm_first for layer in model.encoder.layers)
    return model


def hand_qk(model: CellModel, hidden: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, K ``(B, H, L, dh)`` from the layer's packed projection applied to its attention input."""
    lyr = model.encoder.layers[layer]
    x = lyr.norm1(hidden) if model.config.encoder.norm_scheme == "pre" else hidden
    qkv = lyr.self_attn.qkv(x)  # (B, L, 3d): rows [q; k; v], head h owns rows h*dh … (h+1)*dh-1
    d, n_heads = model.config.encoder.d_model, model.config.encoder.n_heads
    dh = d // n_heads
    q = qkv[..., :d].reshape(*qkv.shape[:2], n_heads, dh).transpose(1, 2)
    k = qkv[..., d : 2 * d].reshape(*qkv.shape[:2], n_heads, dh).transpose(1, 2)
    return q, k


def hidden_states(model: CellModel, tokens: TokenizedCells):
    batch = {k: torch.as_tensor(v) for k, v in tokens.pad().items()}
    model.eval()
    with torch.no_grad():
        out = model(
            **batch, heads=(), attn_backend="explicit", output_hidden_states=True, output_attentions=True
        )
    return batch, out


def hand_tokens(model: CellModel, cells: list[list[str]], obs: pd.DataFrame | None = None, seed: int = 0):
    """Cells as given (``<cls>`` first, then genes in the given order) with random bin values."""
    r = np.random.default_rng(seed)
    ids = [np.asarray([model.vocab["<cls>"]] + [model.vocab[g] for g in c], dtype=np.int32) for c in cells]
    vals = [np.r_[-2.0, r.integers(1, 11, len(c))].astype(np.float32) for c in cells]
    return TokenizedCells(
        gene_ids=np.concatenate(ids),
        values=np.concatenate(vals),
        offsets=np.r_[0, np.cumsum([len(i) for i in ids])],
        obs_names=np.asarray([f"c{i}" for i in range(len(cells))]),
        obs=obs,
        specials={"pad": model.vocab["<pad>"], "cls": model.vocab["<cls>"]},
        pad_value=-2.0,
    )


# ----------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_probabilities_equal_hand_softmax(norm):
    """softmax(q kᵀ/√dh + padding mask) by hand from the layer's qkv, for two layers and single heads."""
    adata = make_adata()
    snap = snapshot(adata)
    model = make_model() if norm == "post" else make_pre_norm_model()
    cells = [0, 45, 100]  # different classes → different lengths → padding in the batch
    tokens = cellkit.tokenize(adata, model, cells=cells, progress=False)
    assert len(set(tokens.lengths.tolist())) > 1
    batch, out = hidden_states(model, tokens)
    mask = batch["padding_mask"]
    dh = model.config.encoder.d_model // model.config.encoder.n_heads
    for layer in (0, 1):
        with torch.no_grad():
            q, k = hand_qk(model, out.hidden_states[layer], layer)
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
            probs = torch.softmax(scores.masked_fill(mask[:, None, None, :], float("-inf")), dim=-1)
        for heads in (None, [1], 0):
            maps = attention_maps(adata, model, cells=cells, hidden_layer=layer - 2, heads=heads, device="cpu")
            sel = [0, 1] if heads is None else ([heads] if isinstance(heads, int) else heads)
            for b, m in enumerate(maps):
                n = int(tokens.lengths[b])
                assert m.hidden_layer == layer
                assert m.heads == sel
                assert m.obs_name == adata.obs_names[cells[b]]
                assert m.probs.shape == (len(sel), n, n)
                assert list(m.tokens[:1]) == ["<cls>"]
                assert np.array_equal(m.gene_ids, tokens.cell(b)["gene_ids"])
                ref = probs[b][sel][:, :n, :n].numpy()
                assert np.abs(m.probs - ref).max() <= ATOL
                # the model's own output_attentions agree too
                assert np.abs(m.probs - out.attentions[layer][b][sel][:, :n, :n].numpy()).max() <= ATOL
                np.testing.assert_allclose(m.probs.sum(-1), 1.0, atol=1e-5)
    rev = attention_maps(adata, model, cells=cells[::-1], hidden_layer=1, device="cpu")  # selection order kept
    assert [m.obs_name for m in rev] == list(adata.obs_names[cells[::-1]])
    f = maps[0].frame(head=0)
    assert f.shape == (int(tokens.lengths[0]),) * 2
    assert f.index[0] == "<cls>"
    assert_unchanged(adata, snap)


def test_probabilities_from_tokens_and_sdpa_prefix():
    model = make_model()
    tokens = hand_tokens(model, [["G1", "G2", "G3"], ["G4", "G1"]])
    exp = attention_maps(tokens, model, hidden_layer=1, device="cpu")
    got = attention_maps(tokens, model, hidden_layer=1, attn_backend="sdpa", device="cpu")
    for e, g in zip(exp, got, strict=True):
        assert np.abs(e.probs - g.probs).max() <= 1e-5
    by_name = attention_maps(tokens, model, cells=["c1"], hidden_layer=1, device="cpu")
    assert len(by_name) == 1
    assert np.abs(by_name[0].probs - exp[1].probs).max() <= ATOL


# ----------------------------------------------------------------------------- gene × gene
def test_gene_attention_aligns_genes_by_identity():
    model = make_model()
    cells = [["G1", "G2", "G3"], ["G3", "G5", "G1"], ["G2", "G5", "G7"]]
    tokens = hand_tokens(model, cells)
    maps = attention_maps(tokens, model, hidden_layer=-1, device="cpu")

    def entry(i, a, b, head=None):
        f = maps[i].frame(head)
        return float(f.loc[a, b])

    for head in (None, 1):
        df, counts = gene_attention(tokens, model, head=head, return_counts=True, device="cpu")
        assert list(df.index) == ["G1", "G2", "G3", "G5", "G7"] == list(df.columns)  # vocabulary order
        assert df.index.name == "query"
        assert df.columns.name == "key"
        # G1→G3 occurs in cells 0 and 1 (at different positions), G2→G5 only in cell 2
        assert df.loc["G1", "G3"] == pytest.approx(
            (entry(0, "G1", "G3", head) + entry(1, "G1", "G3", head)) / 2
        )
        assert df.loc["G3", "G1"] == pytest.approx(
            (entry(0, "G3", "G1", head) + entry(1, "G3", "G1", head)) / 2
        )
        assert df.loc["G2", "G5"] == pytest.approx(entry(2, "G2", "G5", head))
        assert counts.loc["G1", "G3"] == 2
        assert counts.loc["G2", "G5"] == 1
        assert counts.loc["G1", "G1"] == 2
        assert np.isnan(df.loc["G7", "G1"])
        assert counts.loc["G7", "G1"] == 0
        assert df.attrs["n_cells"] == 3
    # independent of batch size and cell order
    base = gene_attention(tokens, model, batch_size=3, device="cpu")
    for bs, order in ((1, [0, 1, 2]), (2, [2, 0, 1]), (3, [1, 2, 0])):
        other = gene_attention(tokens.subset(order), model, batch_size=bs, device="cpu")
        # mean attention probabilities (≤ 1): batching changes only the fp32 padding width / summation order
        pd.testing.assert_frame_equal(base, other, atol=1e-6, rtol=0)
    # <cls> kept on request; a given gene space keeps its order
    with_cls = gene_attention(tokens, model, include_special=True, device="cpu")
    assert "<cls>" in with_cls.index
    sub = gene_attention(tokens, model, genes=["G5", "G1"], device="cpu")
    assert list(sub.index) == ["G5", "G1"]
    assert sub.loc["G1", "G5"] == pytest.approx(base.loc["G1", "G5"], abs=1e-6)


def test_gene_attention_on_anndata_groups():
    adata = make_adata()
    snap = snapshot(adata)
    model = make_model()
    df = gene_attention(adata, model, groupby="cell_type", groups="type1", batch_size=7, device="cpu")
    small = gene_attention(
        adata, model, groupby="cell_type", groups=["type1"], batch_size=40, chunk_size=15, device="cpu"
    )
    # mean attention probabilities (≤ 1); batch / chunk sizes change only the fp32 summation order
    pd.testing.assert_frame_equal(df, small, atol=1e-6, rtol=0)
    assert df.attrs["n_cells"] == 40
    assert df.attrs["groups"] == ["type1"]
    pooled = gene_attention(adata, model, groupby="cell_type", groups=["type0", "type1"], device="cpu")
    assert pooled.attrs["n_cells"] == 80
    assert_unchanged(adata, snap)
    # key_added: written only when asked, and readable by top_influenced_genes
    gene_attention(adata, model, groupby="cell_type", groups="type1", key_added="attn", device="cpu")
    assert set(adata.uns) == {"attn", "cellkit"}  # + cellkit's record of the keys it wrote
    top = top_influenced_genes(adata, "G20", k=5, key="attn")
    exp = top_influenced_genes(df, "G20", k=5)
    assert list(top["gene"]) == list(exp["gene"])
    assert "n_cells" in top


# ----------------------------------------------------------------------------- scGPT GRN statistic
def _stable_ranks(values: list[float]) -> list[int]:
    """0-based rank of each entry; ties by position (argsort of a stable argsort)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def direct_grn(
    model: CellModel, tokens: TokenizedCells, layer: int, skip_first: bool = False
) -> pd.DataFrame:
    """Facts §6.3 written out with loops: q·kᵀ, row ranks / M, column ranks / M, head mean, sum / n."""
    _, out = hidden_states(model, tokens)
    with torch.no_grad():
        q, k = hand_qk(model, out.hidden_states[layer], layer)
    names = np.asarray(model.vocab.tokens)
    total: dict[tuple[str, str], float] = {}
    n_heads = q.shape[1]
    for c in range(len(tokens)):
        genes = list(names[tokens.cell(c)["gene_ids"]])
        m = len(genes)
        avg = np.zeros((m, m))
        for h in range(n_heads):
            s = [[float(q[c, h, i] @ k[c, h, j]) for j in range(m)] for i in range(m)]
            rows = [[r / m for r in _stable_ranks(s[i])] for i in range(m)]
            cols = [_stable_ranks([rows[i][j] for i in range(m)]) for j in range(m)]
            for i in range(m):
                for j in range(m):
                    avg[i, j] += cols[j][i] / m / n_heads
        if skip_first and c == 0:  # the tutorial's bug: the first cell only initialises the sum
            continue
        for i in range(m):
            for j in range(m):
                total[genes[i], genes[j]] = total.get((genes[i], genes[j]), 0.0) + avg[i, j]
    genes = sorted({g for g, _ in total if g != "<cls>"}, key=lambda g: model.vocab[g])
    mat = np.array([[total[a, b] / len(tokens) for b in genes] for a in genes])
    return pd.DataFrame(mat, index=genes, columns=genes)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_grn_statistic_equals_direct_implementation(norm):
    model = make_model(seed=3) if norm == "post" else make_pre_norm_model(seed=3)
    genes = ["G0", "G3", "G7", "G9", "G12", "G20", "G31"]
    r = np.random.default_rng(0)
    cells = [list(r.permutation(genes)) for _ in range(3)]  # same genes, different orders
    obs = pd.DataFrame({"condition": ["ctrl"] * 3}, index=[f"c{i}" for i in range(3)])
    tokens = hand_tokens(model, cells, obs=obs, seed=1)
    for layer in (0, 1):
        exp = direct_grn(model, tokens, layer)
        got = gene_attention(
            tokens, model, statistic="grn", hidden_layer=layer, groupby="condition", groups="ctrl", device="cpu"
        )
        assert list(got.index) == list(exp.index)
        assert np.abs(got.to_numpy() - exp.to_numpy()).max() <= ATOL
        # every cell counted: the tutorial's skipped first cell would differ
        buggy = direct_grn(model, tokens, layer, skip_first=True)
        assert np.abs(got.to_numpy() - buggy.to_numpy()).max() > 1e-2


def test_difference_and_top_genes():
    model = make_model(seed=2)
    genes = ["G1", "G4", "G6", "G8", "G11", "G15"]
    r = np.random.default_rng(5)
    cells = [list(r.permutation(genes)) for _ in range(5)]
    obs = pd.DataFrame(
        {"condition": ["ctrl", "stim", "ctrl", "stim", "ctrl"]}, index=[f"c{i}" for i in range(5)]
    )
    tokens = hand_tokens(model, cells, obs=obs, seed=2)
    ctrl = direct_grn(model, tokens.subset([0, 2, 4]), layer=1)
    stim = direct_grn(model, tokens.subset([1, 3]), layer=1)
    diff = attention_difference(
        tokens, model, groupby="condition", condition="stim", control="ctrl", statistic="grn", device="cpu"
    )
    assert len(diff) == len(genes) ** 2
    assert list(diff.columns) == [
        "query_gene",
        "key_gene",
        "condition",
        "control",
        "difference",
        "n_cells_condition",
        "n_cells_control",
    ]
    assert diff["difference"].is_monotonic_decreasing
    row = diff[(diff.query_gene == "G4") & (diff.key_gene == "G11")].iloc[0]
    assert row.condition == pytest.approx(stim.loc["G4", "G11"], abs=ATOL)
    assert row.control == pytest.approx(ctrl.loc["G4", "G11"], abs=ATOL)
    assert row.difference == pytest.approx(stim.loc["G4", "G11"] - ctrl.loc["G4", "G11"], abs=ATOL)
    assert (row.n_cells_condition, row.n_cells_control) == (2, 3)
    # the genes most influenced by G6 (column G6), ranked by the difference
    top = attention_difference(
        tokens, model, groupby="condition", condition="stim", control="ctrl", gene="G6", k=3, statistic="grn"
    )
    exp = (stim["G6"] - ctrl["G6"]).sort_values(ascending=False).head(3)
    assert list(top["query_gene"]) == list(exp.index)
    assert (top["key_gene"] == "G6").all()
    np.testing.assert_allclose(top["difference"], exp.to_numpy(), atol=ATOL)
    # top_influenced_genes on a map: column = the key gene, itself left out by default
    stim_map = gene_attention(
        tokens, model, statistic="grn", groupby="condition", groups="stim", device="cpu"
    )
    t = top_influenced_genes(stim_map, "G6", k=3)
    exp = stim["G6"].drop("G6").sort_values(ascending=False).head(3)
    assert list(t["gene"]) == list(exp.index)
    assert list(t["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(t["score"], exp.to_numpy(), atol=ATOL)
    assert "G6" in set(top_influenced_genes(stim_map, "G6", k=10, include_self=True)["gene"])


def test_min_cells_drops_rarely_co_occurring_pairs():
    model = make_model(seed=2)
    common = ["G1", "G4", "G6"]
    cells = [[*common, "G8"], [*common, "G8"], [*common, "G11"], common, ["G1", "G6", "G15"], [*common, "G8"]]
    obs = pd.DataFrame({"condition": ["ctrl", "stim"] * 3}, index=[f"c{i}" for i in range(6)])
    tokens = hand_tokens(model, cells, obs=obs, seed=3)
    values, counts = gene_attention(tokens, model, statistic="grn", return_counts=True, device="cpu")
    everything = top_influenced_genes(values, "G6", k=10, counts=counts)
    assert set(everything["gene"]) == {"G1", "G4", "G8", "G11", "G15"}
    kept = top_influenced_genes(values, "G6", k=10, counts=counts, min_cells=3)
    assert set(kept["gene"]) == {"G1", "G4", "G8"}  # G11 / G15 co-occur with G6 in one cell only
    assert (kept["n_cells"] >= 3).all()
    assert kept["score"].is_monotonic_decreasing
    with pytest.raises(ConfigError, match="counts"):
        top_influenced_genes(values, "G6", min_cells=3)
    with pytest.raises(ConfigError, match="min_cells"):
        top_influenced_genes(values, "G6", counts=counts, min_cells=0)
    full = attention_difference(
        tokens, model, groupby="condition", condition="stim", control="ctrl", device="cpu"
    )
    pruned = attention_difference(
        tokens, model, groupby="condition", condition="stim", control="ctrl", min_cells=2, device="cpu"
    )
    expected = full[(full.n_cells_condition >= 2) & (full.n_cells_control >= 2)]
    assert len(pruned) == len(expected) < len(full)
    assert set(zip(pruned.query_gene, pruned.key_gene)) == set(zip(expected.query_gene, expected.key_gene))
    assert pruned.attrs["min_cells"] == 2


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    adata = make_adata()
    snap = snapshot(adata)
    model = make_model()
    with pytest.raises(ConfigError, match=r"hidden_layer=2 is out of range.*0 … 1"):
        attention_maps(adata, model, cells=[0], hidden_layer=2)
    with pytest.raises(ConfigError, match="out of range"):
        gene_attention(adata, model, hidden_layer=-3)
    with pytest.raises(ConfigError, match="expression layer as layer="):
        gene_attention(adata, model, hidden_layer="counts")
    with pytest.raises(ConfigError, match="head 2 is out of range"):
        attention_maps(adata, model, cells=[0], heads=[0, 2])
    with pytest.raises(ConfigError, match="head 5 is out of range"):
        gene_attention(adata, model, head=5)
    with pytest.raises(UnknownGeneError, match=r"not in the model's vocabulary.*'G1x' \(did you mean"):
        gene_attention(adata, model, genes=["G1", "G1x"])
    with pytest.raises(UnknownGeneError, match="ACTB"):
        attention_difference(
            adata, model, groupby="cell_type", condition="type0", control="type1", gene="ACTB"
        )
    with pytest.raises(DataError, match=r"Group 'type9' does not exist.*type0"):
        gene_attention(adata, model, groupby="cell_type", groups="type9")
    with pytest.raises(DataError, match=r"groupby='celltype' is not an obs column.*cell_type"):
        gene_attention(adata, model, groupby="celltype", groups="type0")
    with pytest.raises(DataError, match="does not exist"):
        attention_difference(adata, model, groupby="cell_type", condition="type0", control="nope")
    with pytest.raises(ConfigError, match="gene_attention"):
        attention_maps(adata, model, cells=np.arange(65))
    with pytest.raises(DataError, match="more than once"):
        gene_attention(adata, model, cells=[0, 0])
    with pytest.raises(ConfigError, match="statistic"):
        gene_attention(adata, model, statistic="rank")
    with pytest.raises(ConfigError, match="max_genes"):
        gene_attention(adata, model, cells=[0, 1], max_genes=5)
    df = gene_attention(adata, model, cells=[0, 1, 2])
    with pytest.raises(UnknownGeneError, match="not in this attention map"):
        top_influenced_genes(df, "G99")
    with pytest.raises(DataError, match="key_added"):
        top_influenced_genes(adata, "G1", key="missing")
    assert_unchanged(adata, snap)
