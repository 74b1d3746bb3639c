"""The ``perturbgene`` tokenization scheme: layout, bins, token types, phenotypes, properties, errors.

``tests/fixtures/tokenize/perturbgene/bin_edges.txt`` holds the edges 0.1, 1, 2, 4 (one per line).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellkit._errors import DataError, VocabError
from cellkit.data.schemes import perturbgene as pg
from cellkit.data.tokenize import tokenize

EDGES_FILE = Path(__file__).parents[1] / "fixtures" / "tokenize" / "perturbgene" / "bin_edges.txt"
PHENOTYPES = {"tissue": ["lung", "blood"], "cell_type": ["T cell", "B cell"], "sex": ["female", "male"]}
GENES = [f"G{i}" for i in range(8)]
CLS, EOS, MASK, PAD = 0, 1, 2, 3


# ---------------------------------------------------------------------------------- helpers
def make_vocab(n_bins: int = 2):
    return pg.perturbgene_vocab(PHENOTYPES, n_bins)


def make_adata(x, genes=None, obs=None, names=None) -> ad.AnnData:
    x = np.asarray(x, dtype=np.float32)
    genes = GENES[: x.shape[1]] if genes is None else list(genes)
    names = [f"cell{i}" for i in range(x.shape[0])] if names is None else list(names)
    obs = pd.DataFrame(index=names) if obs is None else pd.DataFrame(obs, index=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-unique var names are part of some cases
        return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


def tok(adata, model=None, **options):
    options.setdefault("genes", GENES)
    options.setdefault("bin_edges", [0.5, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tokenize(adata, model or make_vocab(), scheme="perturbgene", progress=False, **options)


def cell(t, i: int) -> tuple[list[int], list[int]]:
    c = t.cell(i)
    return c["gene_ids"].tolist(), c["token_type_ids"].tolist()


def bin_token(vocab, k: int) -> int:
    return vocab[f"bin_{k}"]


OBS = {"cell_type": ["T cell", "B cell"], "sex": ["male", "female"], "tissue": ["lung", "blood"]}


# ---------------------------------------------------------------------------------- vocabulary
def test_perturbgene_vocab_layout():
    v = make_vocab(3)
    assert v.tokens[:4] == ["[CLS]", "[EOS]", "[MASK]", "[PAD]"]
    assert v.specials == {"cls": "[CLS]", "eos": "[EOS]", "mask": "[MASK]", "pad": "[PAD]"}
    # categories sorted by name, values in the given order, then bin_0 … bin_3
    assert v.tokens[4:] == [
        "[T_cell]",
        "[B_cell]",
        "[female]",
        "[male]",
        "[lung]",
        "[blood]",
        "bin_0",
        "bin_1",
        "bin_2",
        "bin_3",
    ]
    # values that already are tokens are kept as they are
    assert pg.perturbgene_vocab({"sex": ["[female]", "male"]}, 1).tokens[4:6] == ["[female]", "[male]"]
    assert pg.phenotype_token("CD4-positive, alpha-beta T cell") == "[CD4-positive,_alpha-beta_T_cell]"
    with pytest.raises(DataError, match="n_bins"):
        pg.perturbgene_vocab(PHENOTYPES, 0)
    with pytest.raises(DataError, match="list of values"):
        pg.perturbgene_vocab({"sex": "female"}, 1)
    with pytest.raises(VocabError, match="Duplicate"):
        pg.perturbgene_vocab({"a": ["x"], "b": ["x"]}, 1)


# ---------------------------------------------------------------------------------- layout
def test_layout_bins_types_and_column_order():
    v = make_vocab()
    a = make_adata([[0.0, 3.0, 1.0, 0.2, 0.0, 2.0], [0, 0, 0, 0, 0, 0]], obs=OBS)
    t = tok(a, v, phenotype_columns=["cell_type", "sex"])
    ids, types = cell(t, 0)
    # [CLS] [T_cell] [male], then genes in column order: G1 bin 2, G2 bin 1, G3 (0.2) bin 0 dropped, G5 bin 2
    assert ids == [CLS, v["[T_cell]"], v["[male]"], bin_token(v, 2), bin_token(v, 1), bin_token(v, 2), EOS]
    offset = 1 + 2  # 1 + n_categories: without phenotype_categories, the included ones (cell_type, sex)
    assert types == [0, 1, 2, offset + 1, offset + 2, offset + 5, 0]
    assert cell(t, 1) == ([CLS, v["[B_cell]"], v["[female]"], EOS], [0, 1, 2, 0])
    assert t.values is None
    assert t.specials == {"cls": CLS, "eos": EOS, "mask": MASK, "pad": PAD}
    o = t.options
    assert (o["gene_type_offset"], o["n_gene_types"], o["num_bins"], o["bin_0_id"]) == (3, 8, 2, v["bin_0"])
    assert o["phenotype_categories"] == ["cell_type", "sex"]
    json.dumps(o)


def test_token_type_offset_counts_all_model_categories():
    v = make_vocab()
    a = make_adata([[1.0, 0.0, 3.0]], obs={k: vals[:1] for k, vals in OBS.items()})
    t = tok(a, v, phenotype_columns=["sex"], phenotype_categories=sorted(PHENOTYPES))
    ids, types = cell(t, 0)
    assert ids == [CLS, v["[male]"], bin_token(v, 1), bin_token(v, 2), EOS]
    assert types == [0, 2, 4 + 0, 4 + 2, 0]  # sex is category 1 of 3; genes start at 1 + 3
    # the same through a model's "phenotypes" resource
    t2 = tok(
        a, v, phenotype_columns=["sex"], genes=None, resources={"phenotypes": PHENOTYPES, "genes": GENES}
    )
    assert cell(t2, 0) == (ids, types)
    with pytest.raises(DataError, match="not among the model's categories"):
        tok(a, v, phenotype_columns=["sex"], phenotype_categories=["tissue"])


def test_phenotype_columns_mapping_and_order():
    v = make_vocab()
    a = make_adata([[1.0]], obs={"gender": ["female"], "organ": ["blood"]})
    t = tok(
        a, v, phenotype_columns={"tissue": "organ", "sex": "gender"}, phenotype_categories=sorted(PHENOTYPES)
    )
    ids, types = cell(t, 0)
    assert ids == [CLS, v["[blood]"], v["[female]"], bin_token(v, 1), EOS]
    assert types == [0, 3, 2, 4, 0]
    assert t.options["phenotype_columns"] == {"tissue": "organ", "sex": "gender"}


def test_truncation_keeps_eos():
    v = make_vocab()
    a = make_adata([[1, 1, 1, 1, 1, 1]], obs={k: vals[:1] for k, vals in OBS.items()})
    t = tok(a, v, phenotype_columns=["sex"], max_length=5)
    ids, types = cell(t, 0)
    assert ids == [CLS, v["[male]"], bin_token(v, 1), bin_token(v, 1), EOS]
    assert types == [0, 1, 2, 3, 0]
    assert t.lengths.tolist() == [5]
    assert cell(tok(a, v, max_length=2), 0) == ([CLS, EOS], [0, 0])
    with pytest.raises(DataError, match="max_length"):
        tok(a, v, phenotype_columns=["sex"], max_length=2)
    model = SimpleNamespace(
        vocab=v, config=SimpleNamespace(family="perturbgene", input={"max_len": 3}), resources={}
    )
    assert tok(a, model).lengths.tolist() == [3]


def test_gene_list_coverage_duplicates_and_order():
    v = make_vocab()
    # data columns: G3, Z (not in the list), G1, G3 again (duplicate: the first column wins)
    a = make_adata([[1.0, 5.0, 3.0, 9.0]], genes=["G3", "Z", "G1", "G3"])
    t = tok(a, v, genes=["G1", "G2", "G3"])
    ids, types = cell(t, 0)
    assert ids == [CLS, bin_token(v, 1), bin_token(v, 2), EOS]
    assert types == [0, 1 + 2, 1 + 0, 0]  # no categories: offset 1; G3 = index 2, G1 = index 0
    assert (t.coverage.n_genes, t.coverage.n_matched) == (4, 3)
    assert "Z" in t.coverage.unmatched_examples
    # gene_order="gene_list": by the index in the model's gene list
    assert cell(tok(a, v, genes=["G1", "G2", "G3"], gene_order="gene_list"), 0)[1] == [0, 1, 3, 0]
    with pytest.raises(DataError, match="gene_order"):
        tok(a, v, gene_order="value")


def test_genes_from_model_resource_and_errors():
    v = make_vocab()
    a = make_adata([[1.0, 3.0]], genes=["G1", "G0"])
    model = SimpleNamespace(
        vocab=v, config=SimpleNamespace(family="perturbgene", input={}), resources={"genes": GENES}
    )
    t = tok(model=model, adata=a, genes=None)
    assert cell(t, 0)[1] == [0, 2, 1, 0]
    assert t.options["genes"] is None  # the model's list is not copied into the options
    with pytest.raises(DataError, match="gene list"):
        tok(a, v, genes=None)
    with pytest.raises(DataError, match="None of the 2 genes"):
        tok(a, v, genes=["A", "B"])
    with pytest.raises(DataError, match="not usable"):
        tok(a, v, genes=["G0", "G0"])


def test_bin_edges_file_and_options(tmp_path):
    v = make_vocab(4)
    a = make_adata([[0.05, 0.1, 0.5, 1.0, 3.0, 100.0]])
    t = tok(a, v, bin_edges=None, bin_edges_file=EDGES_FILE)
    ids, types = cell(t, 0)
    assert ids == [CLS, *(bin_token(v, k) for k in (1, 1, 2, 3, 4)), EOS]  # 0.05 is below the first edge
    assert types == [0, 2, 3, 4, 5, 6, 0]
    assert t.options["bin_edges"] == [0.1, 1.0, 2.0, 4.0]
    shards = tok(a, v, bin_edges=None, bin_edges_file=EDGES_FILE, output=tmp_path / "s")
    assert shards.manifest["options"]["bin_edges_file"] == str(EDGES_FILE)
    one_line = tmp_path / "edges.txt"
    one_line.write_text("0.1 1.0, 2.0  4.\n")  # PerturbGene's own file is space separated
    assert cell(tok(a, v, bin_edges=None, bin_edges_file=one_line), 0) == (ids, types)
    assert pg.read_bin_edges(one_line) == [0.1, 1.0, 2.0, 4.0]
    # on/off edges
    on_off = tok(a, make_vocab(1), bin_edges=[0.1])
    assert cell(on_off, 0)[0] == [CLS, *[make_vocab(1)["bin_1"]] * 5, EOS]
    assert tok(a, make_vocab(1), bin_edges=0.1).options["bin_edges"] == [0.1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bin_edges": None}, "needs shared bin edges"),
        ({"bin_edges": [1.0, 0.5]}, "strictly increasing"),
        ({"bin_edges": []}, "strictly increasing"),
        ({"bin_edges": [0.1, np.nan]}, "strictly increasing"),
        ({"bin_edges": ["a"]}, "must be numbers"),
        ({"bin_edges": [0.1, 1.0, 2.0]}, r"lacks \['bin_3'\]"),
        ({"bin_edges_file": "x.txt"}, "not both"),
        ({"unknown_option": 1}, "Unknown option"),
        ({"phenotype_columns": ["sex", "sex"]}, "twice"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(DataError, match=message):
        tok(make_adata([[1.0]], obs={"sex": ["male"]}), **options)


def test_bad_edges_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0.1\nlots\n")
    with pytest.raises(DataError, match="'lots'"):
        tok(make_adata([[1.0]]), bin_edges=None, bin_edges_file=bad)
    with pytest.raises(DataError, match="does not exist"):
        tok(make_adata([[1.0]]), bin_edges=None, bin_edges_file=tmp_path / "absent.txt")


def test_phenotype_errors():
    v = make_vocab()
    a = make_adata([[1.0], [1.0]], obs={"sex": ["male", "unknown sex"], "tissue": ["lung", None]})
    with pytest.raises(DataError, match=r"not in the vocabulary: \['\[unknown_sex\]'\]"):
        tok(a, v, phenotype_columns=["sex"])
    assert len(tok(a, v, phenotype_columns=["sex"], cells=[0])) == 1  # only the selected cells count
    with pytest.raises(DataError, match="missing values"):
        tok(a, v, phenotype_columns=["tissue"])
    with pytest.raises(DataError, match=r"'cell_type'.*available.*sex"):
        tok(a, v, phenotype_columns=["cell_type"])
    no_eos = make_vocab().with_specials({"cls": "[CLS]", "pad": "[PAD]"})
    with pytest.raises(DataError, match="no 'eos' token"):
        tok(a, no_eos)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_values(bad):
    with pytest.raises(DataError, match=r"negative|NaN"):
        tok(make_adata([[1.0, 2.0], [bad, 1.0]]))


def test_caller_anndata_unchanged_and_shards(tmp_path):
    a = make_adata(
        [[0.0, 3.0, 1.0], [2.0, 0.0, 0.7], [0.0, 0.0, 0.0]], obs={k: [*v, v[0]] for k, v in OBS.items()}
    )
    a.uns["note"] = {"x": [1, 2]}
    before = (a.X.copy(), a.obs.copy(), a.var.copy(), copy.deepcopy(a.uns))
    mem = tok(a, phenotype_columns=["tissue", "sex"], obs_columns=["cell_type"])
    shards = tok(
        a,
        phenotype_columns=["tissue", "sex"],
        obs_columns=["cell_type"],
        output=tmp_path / "s",
        max_shard_samples=2,
    )
    assert (before[0] != a.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, before[1])
    pd.testing.assert_frame_equal(a.var, before[2])
    assert a.uns == before[3]
    assert shards.n_shards == 2
    back = shards.to_memory()
    np.testing.assert_array_equal(back.gene_ids, mem.gene_ids)
    np.testing.assert_array_equal(back.token_type_ids, mem.token_type_ids)
    assert shards.manifest["options"]["gene_type_offset"] == 3
    assert mem.obs["cell_type"].tolist() == ["T cell", "B cell", "T cell"]


def test_collator_reads_the_options():
    from cellkit.data.collate import Collator

    t = tok(make_adata([[1.0, 3.0]], obs={"sex": ["male"]}), phenotype_columns=["sex"])
    c = Collator.for_tokens(t, masking="phenotypic")
    assert (c.gene_type_offset, c.n_gene_types, c.num_bins, c.bin_0_id) == (2, 8, 2, make_vocab()["bin_0"])
    assert (c.pad_id, c.mask_id) == (PAD, MASK)


# ---------------------------------------------------------------------------------- properties
VALUES = [0.0, 0.0, 0.0, 0.05, 0.1, 0.3, 1.0, 2.0, 4.0, 1e7, 3e38]
EDGE_POOL = [0.1, 0.5, 1.0, 2.0, 5.0, 1e6]
CATEGORIES = sorted(PHENOTYPES)


@st.composite
def cases(draw, max_cells: int = 5, max_genes: int = 7):
    n_cells = draw(st.integers(1, max_cells))
    n_genes = draw(st.integers(1, max_genes))
    genes = [draw(st.sampled_from(GENES))]
    genes += draw(st.lists(st.sampled_from([*GENES, "G8", "Z"]), min_size=n_genes - 1, max_size=n_genes - 1))
    x = draw(
        st.lists(
            st.lists(st.sampled_from(VALUES), min_size=n_genes, max_size=n_genes),
            min_size=n_cells,
            max_size=n_cells,
        )
    )
    obs = {
        c: draw(st.lists(st.sampled_from(PHENOTYPES[c]), min_size=n_cells, max_size=n_cells))
        for c in CATEGORIES
    }
    edges = sorted(draw(st.lists(st.sampled_from(EDGE_POOL), min_size=1, max_size=4, unique=True)))
    return np.array(x, dtype=np.float32), genes, obs, edges


def reference(x, genes, obs, edges, included, categories, max_length, gene_order):
    """PerturbGene tokens of each cell, written out plainly from dense rows."""
    vocab = make_vocab(len(edges))
    first: dict[str, int] = {}
    for c, name in enumerate(genes):
        if name in GENES and name not in first:
            first[name] = c
    cols = sorted(first.values())
    if gene_order == "gene_list":
        cols = sorted(cols, key=lambda c: GENES.index(genes[c]))
    offset = 1 + len(categories)
    out = []
    for r, row in enumerate(x):
        ids = [CLS] + [vocab[pg.phenotype_token(obs[cat][r])] for cat in included] + [EOS]
        types = [0] + [1 + categories.index(cat) for cat in included] + [0]
        gene_ids, gene_types = [], []
        for c in cols:
            if row[c] == 0:
                continue
            b = int(np.digitize(row[c], edges))
            if b > 0:
                gene_ids.append(vocab[f"bin_{b}"])
                gene_types.append(offset + GENES.index(genes[c]))
        if max_length is not None:
            keep = max_length - len(ids)
            gene_ids, gene_types = gene_ids[:keep], gene_types[:keep]
        out.append((ids[:-1] + gene_ids + [EOS], types[:-1] + gene_types + [0]))
    return out


@settings(max_examples=350, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=cases(),
    included=st.lists(st.sampled_from(CATEGORIES), unique=True, max_size=3),
    all_categories=st.booleans(),
    extra_length=st.one_of(st.none(), st.integers(0, 6)),
    gene_order=st.sampled_from(["column", "gene_list"]),
)
def test_property_matches_reference(case, included, all_categories, extra_length, gene_order):
    x, genes, obs, edges = case
    categories = CATEGORIES if all_categories else sorted(included)
    max_length = None if extra_length is None else 2 + len(included) + extra_length
    vocab = make_vocab(len(edges))
    t = tok(
        make_adata(x, genes, obs=obs),
        vocab,
        bin_edges=edges,
        phenotype_columns=included,
        phenotype_categories=categories if all_categories else None,
        max_length=max_length,
        gene_order=gene_order,
        chunk_size=2,
    )
    expected = reference(x, genes, obs, edges, included, categories, max_length, gene_order)
    offset = 1 + len(categories)
    bins = {vocab[f"bin_{k}"] for k in range(1, len(edges) + 1)}
    phenotype_ids = set(range(4, 4 + sum(len(v) for v in PHENOTYPES.values())))
    assert len(t) == len(x)
    assert PAD not in t.gene_ids
    assert MASK not in t.gene_ids
    if max_length is not None:
        assert (t.lengths <= max_length).all()
    for i, (ids, types) in enumerate(expected):
        got_ids, got_types = cell(t, i)
        assert (got_ids, got_types) == (ids, types)
        assert got_ids[0] == CLS
        assert got_ids[-1] == EOS
        for token, ttype in zip(got_ids, got_types, strict=True):
            if ttype == 0:
                assert token in (CLS, EOS)
            elif ttype < offset:
                assert token in phenotype_ids
            else:
                assert token in bins
                assert offset <= ttype < offset + len(GENES)
        gene_types = [tt for tt in got_types if tt >= offset]
        assert len(set(gene_types)) == len(gene_types)  # a gene appears at most once


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=cases(max_cells=6),
    order_seed=st.integers(0, 1000),
    max_length=st.one_of(st.none(), st.integers(3, 6)),
)
def test_property_cell_tokens_do_not_depend_on_batch(case, order_seed, max_length):
    x, genes, obs, edges = case
    opts = {"bin_edges": edges, "phenotype_columns": ["sex"], "max_length": max_length}
    vocab = make_vocab(len(edges))
    whole = tok(make_adata(x, genes, obs=obs), vocab, **opts)
    perm = np.random.default_rng(order_seed).permutation(len(x))
    obs_perm = {k: [v[p] for p in perm] for k, v in obs.items()}
    shuffled = tok(
        make_adata(x[perm], genes, obs=obs_perm, names=[f"cell{p}" for p in perm]),
        vocab,
        chunk_size=1,
        **opts,
    )
    alone = tok(make_adata(x, genes, obs=obs), vocab, cells=[int(perm[0])], **opts)
    for j, p in enumerate(perm):
        assert cell(shuffled, j) == cell(whole, int(p))
    assert cell(alone, 0) == cell(whole, int(perm[0]))
