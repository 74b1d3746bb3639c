"""In-silico perturbation: per-family token rules, shifts, null genes, goal shift, storage, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import cellkit
from cellkit import ConfigError, DataError, UnknownGeneError
from cellkit.analysis import InSilicoResult, cell_embeddings, in_silico_perturb, perturb_tokens
from cellkit.data import TokenizedCells
from cellkit.presets import build_model

from ..test_presets import EDGES, GENES, PHENOTYPES, TINY, counts_adata

pytestmark = pytest.mark.timeout(300)
MEDIANS = {g: 1.0 + (i % 3) * 0.5 for i, g in enumerate(GENES)}
PG_OPTIONS = {"phenotype_columns": ["cell_type", "sex"]}
QUIET = {"progress": False}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def tiny(family: str, **arch):
    if family == "geneformer":
        arch = {"version": "V2", "max_len": 16, "resources": {"gene_median": MEDIANS}, **arch}
    elif family == "perturbgene":
        arch = {"phenotypes": PHENOTYPES, "bin_edges": EDGES, **arch}
    return build_model(GENES, family=family, seed=0, **TINY, **arch).eval()


def cells_of(tokens: TokenizedCells, field: str = "gene_ids") -> list[list[float]]:
    arr = getattr(tokens, field)
    return [arr[a:b].tolist() for a, b in zip(tokens.offsets[:-1], tokens.offsets[1:], strict=True)]


def same_bytes(a: TokenizedCells, b: TokenizedCells) -> bool:
    return (
        all(
            getattr(a, f).dtype == getattr(b, f).dtype and getattr(a, f).tobytes() == getattr(b, f).tobytes()
            for f in ("gene_ids", "offsets", *a.fields[1:])
        )
        and a.fields == b.fields
    )


def quiet_tokenize(adata, model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cellkit.tokenize(adata, model, progress=False, **options)


# ================================================================================ token rules
def geneformer_tokens(cells, *, v2: bool = True, size: int = 6) -> TokenizedCells:
    specials = {"pad": 0, "mask": 1, **({"cls": 2, "eos": 3} if v2 else {})}
    ids = np.concatenate([np.asarray(c, np.int32) for c in cells])
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    return TokenizedCells(
        ids,
        offsets,
        scheme="geneformer",
        specials=specials,
        options={"model_input_size": size, "special_token": v2, "max_length": size},
    )


def test_rank_rule_geneformer_v2_and_v1():
    t = geneformer_tokens([[2, 4, 5, 6, 7, 3], [2, 8, 5, 3], [2, 3]])
    assert cells_of(perturb_tokens(t, [5], "delete")) == [[2, 4, 6, 7, 3], [2, 8, 3], [2, 3]]
    assert cells_of(perturb_tokens(t, [6], "overexpress")) == [[2, 6, 4, 5, 7, 3], [2, 6, 8, 5, 3], [2, 6, 3]]
    # inserted into a cell at model_input_size: the last gene goes, <eos> stays last
    assert cells_of(perturb_tokens(t, 9, "overexpress"))[0] == [2, 9, 4, 5, 6, 3]
    # a combination: moved / inserted in the order given, then re-truncated
    assert cells_of(perturb_tokens(t, [9, 7], "overexpress"))[0] == [2, 9, 7, 4, 5, 3]
    assert cells_of(perturb_tokens(t, [9, 7], "overexpress", max_len=None))[0] == [2, 9, 7, 4, 5, 6, 3]
    # delete of an absent gene: byte-identical tokens; the input is never modified
    before = t.gene_ids.copy()
    assert same_bytes(perturb_tokens(t, [9], "delete"), t)
    np.testing.assert_array_equal(t.gene_ids, before)
    v1 = geneformer_tokens([[4, 5, 6]], v2=False, size=3)
    assert cells_of(perturb_tokens(v1, [7], "overexpress")) == [[7, 4, 5]]
    assert cells_of(perturb_tokens(v1, [6], "overexpress")) == [[6, 4, 5]]
    assert cells_of(perturb_tokens(v1, [4], "delete")) == [[5, 6]]


def test_rank_rule_teddy_prefix_and_values():
    t = TokenizedCells(
        np.array([2, 20, 4, 5, 6], np.int32),
        np.array([0, 5]),
        values=np.array([0, 0, 3, 2, 1], np.float32),
        scheme="teddy",
        specials={"pad": 0, "cls": 2},
        options={"cls_token_id": 2, "n_annotation_tokens": 1, "max_seq_len": 5, "max_length": 5},
    )
    out = perturb_tokens(t, [6], "overexpress")  # after <cls> and the annotation, with the top value
    assert cells_of(out) == [[2, 20, 6, 4, 5]]
    assert cells_of(out, "values") == [[0, 0, 3, 3, 2]]
    assert cells_of(perturb_tokens(t, [20], "delete")) == [[2, 20, 4, 5, 6]]  # annotations are not genes


def test_binned_rule_scgpt():
    t = TokenizedCells(
        np.array([11, 0, 1, 2, 3, 11, 4], np.int32),
        np.array([0, 5, 7]),
        values=np.array([-2, 3, 1, 5, 1, -2, 2], np.float32),
        scheme="scgpt",
        specials={"pad": 10, "cls": 11, "eos": 12},
        options={"max_len": 5, "n_bins": 11, "max_length": 5},
    )
    out = perturb_tokens(t, [1], "delete")
    assert cells_of(out) == [[11, 0, 2, 3], [11, 4]]
    assert cells_of(out, "values") == [[-2, 3, 5, 1], [-2, 2]]
    out = perturb_tokens(t, [1], "overexpress")  # present: its value becomes the cell's top value
    assert cells_of(out) == [[11, 0, 1, 2, 3], [11, 1, 4]]
    assert cells_of(out, "values") == [[-2, 3, 5, 5, 1], [-2, 2, 2]]
    # absent, cell at max_len: inserted after <cls>; the lowest-value gene (the last of equals) goes
    out = perturb_tokens(t, [7], "overexpress")
    assert cells_of(out)[0] == [11, 7, 0, 1, 2]
    assert cells_of(out, "values")[0] == [-2, 5, 3, 1, 5]
    assert out.values.dtype == np.float32 and out.gene_ids.dtype == np.int32


def test_perturbgene_rule():
    # [CLS]=0 [EOS]=1, phenotype token 4 (type 1), bins bin_0…bin_3 = 5…8, genes are types 2 + index
    t = TokenizedCells(
        np.array([0, 4, 6, 7, 1, 0, 4, 8, 1], np.int32),
        np.array([0, 5, 9]),
        token_type_ids=np.array([0, 1, 5, 2, 0, 0, 1, 4, 0], np.int32),
        scheme="perturbgene",
        specials={"cls": 0, "eos": 1, "mask": 2, "pad": 3},
        options={"gene_type_offset": 2, "num_bins": 3, "bin_0_id": 5, "max_length": 5},
    )
    out = perturb_tokens(t, [2], "delete")
    assert cells_of(out) == [[0, 4, 6, 1], [0, 4, 8, 1]]
    assert cells_of(out, "token_type_ids") == [[0, 1, 5, 0], [0, 1, 4, 0]]
    out = perturb_tokens(t, [4], "overexpress")  # absent at max_length: top bin first, last gene dropped
    assert cells_of(out) == [[0, 4, 8, 6, 1], [0, 4, 8, 1]]
    assert cells_of(out, "token_type_ids") == [[0, 1, 4, 5, 0], [0, 1, 4, 0]]
    out = perturb_tokens(t, [2], "overexpress")
    assert cells_of(out) == [[0, 4, 8, 6, 1], [0, 4, 8, 8, 1]]
    assert cells_of(out, "token_type_ids") == [[0, 1, 2, 5, 0], [0, 1, 2, 4, 0]]


def test_perturb_tokens_checks():
    t = geneformer_tokens([[2, 4, 3]])
    with pytest.raises(ConfigError, match="mode"):
        perturb_tokens(t, [4], "knockdown")
    with pytest.raises(ConfigError, match="empty"):
        perturb_tokens(t, [], "delete")
    with pytest.raises(ConfigError, match="more than once"):
        perturb_tokens(t, [4, 4], "delete")
    with pytest.raises(DataError, match="values"):
        perturb_tokens(t, [4], "delete", rule="binned")


# ================================================================================ shifts
def test_shift_and_goal_shift_match_a_hand_computation():
    adata, model = counts_adata(12), tiny("scgpt")
    gene = GENES[2]
    res = in_silico_perturb(
        adata, model, genes=gene, mode="overexpress", goal="cell_type == 'T cell'", **QUIET
    )
    summary, per_cell = res.summary, res.cells
    tokens = quiet_tokenize(adata, model)
    orig = cell_embeddings(model, tokens, progress=False).astype(np.float64)
    pert = cell_embeddings(
        model, perturb_tokens(tokens, [model.vocab[gene]], "overexpress"), progress=False
    ).astype(np.float64)
    goal = cell_embeddings(
        model, quiet_tokenize(adata, model, cells="cell_type == 'T cell'"), progress=False
    ).mean(0)

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    np.testing.assert_allclose(per_cell["shift"], 1 - cos(orig, pert), atol=1e-6)
    np.testing.assert_allclose(per_cell["goal_shift"], cos(pert, goal) - cos(orig, goal), atol=1e-6)
    np.testing.assert_allclose(per_cell["cosine"], 1 - per_cell["shift"], atol=0)
    row = summary.iloc[0]
    assert (row["perturbation"], row["mode"], row["n_cells"]) == (gene, "overexpress", 12)
    assert row["mean_shift"] == pytest.approx(per_cell["shift"].mean())
    assert row["goal_shift"] == pytest.approx(per_cell["goal_shift"].mean())
    assert np.isnan(row["null_mean"]) and np.isnan(row["p"])  # no null asked
    assert row["distinguishable"] is np.False_ or row["distinguishable"] is False  # nothing to compare with


def test_gene_shifts_match_a_hand_computation():
    adata, model = counts_adata(8), tiny("geneformer")
    gene = GENES[5]
    in_silico_perturb(adata, model, genes=gene, gene_shifts=True, key_added="p", **QUIET)
    got = adata.uns["p"]["gene_shifts"].set_index("gene")
    tokens = quiet_tokenize(adata, model)
    deleted = perturb_tokens(tokens, [model.vocab[gene]], "delete")
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(len(tokens)):
            before, after = tokens.cell(i)["gene_ids"], deleted.cell(i)["gene_ids"]
            if len(before) == len(after):
                continue  # the gene is absent: the cell is not counted under delete
            h0 = model(torch.as_tensor(before[None], dtype=torch.long), heads=()).last_hidden_state[0]
            h1 = model(torch.as_tensor(after[None], dtype=torch.long), heads=()).last_hidden_state[0]
            for j, tok in enumerate(before.tolist()):
                name = model.vocab.token(tok)
                if name in GENES and name != gene:
                    k = after.tolist().index(tok)
                    cos = torch.nn.functional.cosine_similarity(h0[j], h1[k], dim=0).item()
                    sums.setdefault(name, []).append(1 - cos)
    assert sums and sorted(got.index) == sorted(sums)
    for name, values in sums.items():
        assert got.loc[name, "n_cells"] == len(values)
        assert got.loc[name, "mean_shift"] == pytest.approx(np.mean(values), abs=1e-5)


@pytest.mark.parametrize("family", ["scgpt", "geneformer", "perturbgene"])
def test_delete_of_an_absent_gene_is_exactly_zero(family):
    adata, model = counts_adata(12), tiny(family)
    options = PG_OPTIONS if family == "perturbgene" else {}
    gene = GENES[1]
    res = in_silico_perturb(adata, model, genes=[gene, GENES[4]], tokenize_options=options, **QUIET)
    summary, per_cell = res.summary, res.cells
    rows = per_cell[per_cell["perturbation"] == gene]
    absent = rows["n_present"] == 0
    assert absent.any() and (~absent).any()
    assert (rows.loc[absent, "shift"] == 0.0).all() and (rows.loc[absent, "cosine"] == 1.0).all()
    assert (rows.loc[~absent, "shift"] > 0).all()
    assert summary.set_index("perturbation").loc[gene, "n_cells"] == int((~absent).sum())
    assert not rows.loc[absent, "counted"].any()
    # the token level: cells without the gene keep byte-identical tokens
    tokens = quiet_tokenize(adata, model, **options)
    key = model.vocab[gene] if family != "perturbgene" else tokens.options["gene_type_offset"] + 1
    lacking = np.flatnonzero(absent.to_numpy())
    assert same_bytes(perturb_tokens(tokens.subset(lacking), [key], "delete"), tokens.subset(lacking))


def test_results_do_not_depend_on_batch_size():
    adata, model = counts_adata(14), tiny("geneformer")
    runs = [
        in_silico_perturb(
            adata,
            model,
            genes=[GENES[3], GENES[7]],
            mode="overexpress",
            goal="sex == 'male'",
            n_null=2,
            null_bins=3,
            gene_shifts=True,
            batch_size=bs,
            **QUIET,
        ).to_dict()
        for bs in (1, 3, 8)
    ]
    for other in runs[1:]:
        for name in ("summary", "cells", "null", "gene_shifts"):
            a, b = runs[0][name], other[name]
            num = a.select_dtypes("number").columns
            pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num))
            z = [c for c in num if c.endswith("z")]  # (shift - null mean) / null std amplifies rounding
            close = [c for c in num if c not in z]
            np.testing.assert_allclose(a[close].to_numpy(float), b[close].to_numpy(float), atol=1e-5, rtol=0)
            np.testing.assert_allclose(a[z].to_numpy(float), b[z].to_numpy(float), rtol=1e-4)


def test_null_distribution_shapes_and_seed():
    adata, model = counts_adata(16), tiny("scgpt")
    genes = [GENES[2], GENES[9], GENES[20]]

    def run(seed):
        return in_silico_perturb(
            adata, model, genes=genes, n_null=3, null_bins=4, seed=seed, **QUIET
        ).to_dict()

    a, b, c = run(0), run(0), run(1)
    null = a["null"]
    assert len(null) == 3 * 3 and list(null["draw"]) == [0, 1, 2] * 3
    assert not set(null["genes"]) & set(genes)  # perturbed genes are never null genes
    tokens = quiet_tokenize(adata, model)
    seen = {model.vocab.token(int(i)) for i in np.unique(tokens.gene_ids)}
    assert set(null["genes"]) <= seen  # null genes are tokenized in the selected cells
    pd.testing.assert_frame_equal(a["null"], b["null"])
    pd.testing.assert_frame_equal(a["summary"], b["summary"])
    assert list(a["null"]["genes"]) != list(c["null"]["genes"])
    s = a["summary"].set_index("perturbation")
    for g in genes:
        draws = null[null["perturbation"] == g]["mean_shift"].to_numpy()
        assert s.loc[g, "null_mean"] == pytest.approx(draws.mean())
        assert s.loc[g, "null_std"] == pytest.approx(draws.std(ddof=1))
        assert s.loc[g, "z"] == pytest.approx((s.loc[g, "mean_shift"] - draws.mean()) / draws.std(ddof=1))
        assert s.loc[g, "p"] == pytest.approx((1 + (draws >= s.loc[g, "mean_shift"]).sum()) / 4)
    assert a["summary"]["distinguishable"].dtype == bool
    assert not a["summary"]["distinguishable"].any()  # 3 random genes: p is at least 1/4


def test_distinguishable_rule():
    from cellkit.analysis.perturb import DISTINGUISHABLE_P, DISTINGUISHABLE_Z, _distinguishable

    assert (DISTINGUISHABLE_P, DISTINGUISHABLE_Z) == (0.05, 2.0)
    assert _distinguishable(z=3.0, p=0.01)
    assert not _distinguishable(z=3.0, p=0.05)  # p at the threshold: not distinguishable
    assert not _distinguishable(z=1.5, p=0.01)  # a small effect against a tight null
    assert not _distinguishable(z=-4.0, p=0.99)  # smaller than random genes' shifts
    assert not _distinguishable(z=np.nan, p=np.nan)  # no null
    assert not _distinguishable(z=0.1, p=0.4)  # shifts of 1e-7 with p 0.2-0.8


def test_combos_groupby_and_gene_shifts():
    adata, model = counts_adata(16), tiny("perturbgene")
    res = in_silico_perturb(
        adata,
        model,
        combos=[(GENES[1], GENES[5]), (GENES[7],)],
        mode="overexpress",
        groupby="cell_type",
        gene_shifts=True,
        tokenize_options=PG_OPTIONS,
        key_added="p",
        **QUIET,
    )
    summary = res.summary
    pd.testing.assert_frame_equal(res.gene_shifts, adata.uns["p"]["gene_shifts"])
    assert list(summary["perturbation"]) == [f"{GENES[1]}+{GENES[5]}"] * 2 + [GENES[7]] * 2
    assert summary["genes"].iloc[0] == f"{GENES[1]},{GENES[5]}"
    assert list(summary["group"]) == ["B cell", "T cell"] * 2
    assert summary.groupby("perturbation")["n_cells"].sum().tolist() == [16, 16]
    shifts = adata.uns["p"]["gene_shifts"]
    assert list(shifts.columns) == ["perturbation", "gene", "n_cells", "mean_shift"]
    first = shifts[shifts["perturbation"] == f"{GENES[1]}+{GENES[5]}"]
    assert len(first) and not {GENES[1], GENES[5]} & set(first["gene"])
    assert ((first["mean_shift"] >= 0) & (first["mean_shift"] <= 2)).all()
    assert (first["n_cells"] <= 16).all()
    together = in_silico_perturb(
        adata,
        model,
        genes=[GENES[1], GENES[5]],
        combos=True,
        tokenize_options=PG_OPTIONS,
        key_added=None,
        **QUIET,
    )
    assert list(together.summary["perturbation"]) == [f"{GENES[1]}+{GENES[5]}"]
    assert together.gene_shifts is None


def test_results_go_to_uns_only(tmp_path):
    adata, model = counts_adata(10), tiny("scgpt")
    adata.obsm["X_keep"] = np.ones((10, 2))
    before = adata.copy()
    out = in_silico_perturb(
        adata, model, genes=GENES[3], goal=[0, 1], n_null=1, null_bins=2, key_added="isp", **QUIET
    )
    assert isinstance(out, InSilicoResult) and out.gene_shifts is None
    assert set(adata.uns) == {"isp", "cellkit"} and set(adata.uns["isp"]) == {
        "summary",
        "cells",
        "null",
        "params",
    }
    assert adata.uns["isp"]["params"]["mode"] == "delete"
    for name in ("summary", "cells", "null"):
        pd.testing.assert_frame_equal(adata.uns["isp"][name], getattr(out, name))
    back = InSilicoResult.from_dict(adata.uns["isp"])
    pd.testing.assert_frame_equal(back.cells, out.cells)
    assert back.params == out.params
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert set(adata.obsm) == {"X_keep"} and not adata.layers and adata.raw is None
    assert (adata.X != before.X).nnz == 0
    adata.write_h5ad(tmp_path / "a.h5ad")  # plain frames and values: writable
    fresh = counts_adata(10)
    assert in_silico_perturb(fresh, model, genes=GENES[3], key_added=None, **QUIET) is not None
    assert not fresh.uns
    with pytest.raises(DataError, match="lacks"):
        InSilicoResult.from_dict({"summary": out.summary})


def test_bad_inputs():
    adata, model = counts_adata(10), tiny("scgpt")
    with pytest.raises(UnknownGeneError, match=r"'G0003' \(did you mean"):
        in_silico_perturb(adata, model, genes=["G0003"], **QUIET)
    with pytest.raises(ConfigError, match="empty"):
        in_silico_perturb(adata, model, genes=[], **QUIET)
    with pytest.raises(ConfigError, match="genes="):
        in_silico_perturb(adata, model, **QUIET)
    with pytest.raises(ConfigError, match="mode"):
        in_silico_perturb(adata, model, genes=GENES[1], mode="knockout", **QUIET)
    with pytest.raises(ConfigError, match="not both"):
        in_silico_perturb(adata, model, genes=GENES[1], combos=[(GENES[2],)], **QUIET)
    with pytest.raises(ConfigError, match="twice"):
        in_silico_perturb(adata, model, combos=[(GENES[2], GENES[2])], **QUIET)
    with pytest.raises(DataError, match="cells="):
        in_silico_perturb(adata, model, genes=GENES[1], cells="cell_type == 'NK'", **QUIET)
    with pytest.raises(DataError, match="goal"):
        in_silico_perturb(adata, model, genes=GENES[1], goal="cell_type == 'NK'", **QUIET)
    with pytest.raises(ConfigError, match="n_null=50"):
        in_silico_perturb(adata, model, genes=GENES[1], n_null=50, **QUIET)
    with pytest.raises(ConfigError, match="n_null"):
        in_silico_perturb(adata, model, genes=GENES[1], n_null=-1, **QUIET)
    with pytest.raises(DataError, match="groupby"):
        in_silico_perturb(adata, model, genes=GENES[1], groupby="tissue", **QUIET)
    with pytest.raises(ConfigError, match="pooling"):
        in_silico_perturb(adata, model, genes=GENES[1], pooling="max", **QUIET)
    assert not adata.uns


def test_max_cells_is_a_seeded_subsample_of_the_cells_and_the_goal():
    adata, model = counts_adata(16), tiny("scgpt")
    run = {
        seed: in_silico_perturb(
            adata, model, genes=GENES[3], goal="cell_type == 'T cell'", max_cells=5, seed=seed, **QUIET
        )
        for seed in (0, 1)
    }
    res = run[0]
    cells = list(res.cells["cell"])
    assert len(cells) == 5 and cells == [c for c in adata.obs_names if c in set(cells)]  # obs order kept
    assert cells != list(run[1].cells["cell"])
    assert (
        res.params["max_cells"] == 5 and res.params["n_cells_selected"] == 16 and res.params["n_cells"] == 5
    )
    assert res.params["goal"] == "cell_type == 'T cell'"
    again = in_silico_perturb(
        adata, model, genes=GENES[3], goal="cell_type == 'T cell'", max_cells=5, **QUIET
    )
    pd.testing.assert_frame_equal(again.cells, res.cells)
    everything = in_silico_perturb(adata, model, genes=GENES[3], **QUIET)
    assert everything.params["max_cells"] == -1 and len(everything.cells) == 16
    with pytest.raises(ConfigError, match="max_cells"):
        in_silico_perturb(adata, model, genes=GENES[3], max_cells=0, **QUIET)


# ================================================================================ demo model
def test_demo_model_overexpressing_monocyte_markers_moves_t_cells_toward_monocytes():
    from cellkit.datasets import demo_model, pbmc_demo

    adata, model = pbmc_demo(), demo_model()
    t_cells = np.flatnonzero(adata.obs["bulk_labels"].str.startswith("CD4+").to_numpy())[:20]
    res = in_silico_perturb(
        adata,
        model,
        genes=["S100A8", "LYZ", "CST3"],
        combos=True,
        mode="overexpress",
        cells=t_cells,
        goal="bulk_labels == 'CD14+ Monocyte'",
        n_null=3,
        null_bins=5,
        key_added=None,
        **QUIET,
    )
    row = res.summary.iloc[0]
    assert row["n_cells"] == 20
    assert row["goal_shift"] > 0 and row["goal_shift"] > row["goal_null_mean"]
    assert row["mean_shift"] > 0
