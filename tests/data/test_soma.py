"""TileDB-SOMA experiments as a tokenize source: the same tokens as the AnnData path, for every scheme.

Each test builds a local experiment with ``tiledbsoma.io.from_anndata`` (``.X`` becomes the ``X``
layer ``"data"``, ``obs_names`` the ``obs_id`` column, ``soma_joinid`` = row position); nothing
is downloaded. The reference is the same cells of the AnnData, in the same (ascending
``soma_joinid`` = obs) order.
"""

from __future__ import annotations

import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellkit
from cellkit import DataError, GeneVocab
from cellkit._errors import MissingDependencyError
from cellkit.data import SomaSource
from cellkit.data.schemes import perturbgene as pg
from cellkit.data.tokenized import open_shards

tiledbsoma = pytest.importorskip("tiledbsoma")
soma_io = pytest.importorskip("tiledbsoma.io")

N_CELLS, N_GENES = 150, 40
GENES = [f"G{i}" for i in range(N_GENES)]
PHENOTYPES = {"tissue": ["lung", "blood"], "cell_type": ["T cell", "B cell"], "sex": ["female", "male"]}
ANNOTATIONS = {
    "disease": ["normal", "COVID-19"],
    "tissue": ["lung", "blood"],
    "cell": ["T cell", "B cell"],
    "sex": ["female", "male"],
}


def make_adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(N_CELLS, N_GENES, density=0.35, format="csr", dtype=np.float32, random_state=seed)
    x.data = rng.integers(1, 40, size=x.nnz).astype(np.float32)
    x.data[x.indptr[5] : x.indptr[6]] = 0  # an empty cell
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell"], N_CELLS)),
            "tissue": pd.Categorical(rng.choice(["lung", "blood"], N_CELLS)),
            "sex": pd.Categorical(rng.choice(["female", "male"], N_CELLS)),
            "disease": pd.Categorical(rng.choice(["normal", "COVID-19"], N_CELLS)),
            "donor": rng.integers(0, 4, N_CELLS),
            "filter_pass": (rng.random(N_CELLS) > 0.1).astype(np.int64),
        },
        index=[f"cell{i:04d}" for i in range(N_CELLS)],
    )
    obs["n_counts"] = np.asarray(x.sum(1)).ravel()
    return ad.AnnData(x, obs=obs, var=pd.DataFrame({"symbol": [g.lower() for g in GENES]}, index=GENES))


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """(AnnData, URI of the same cells as a SOMA experiment)."""
    adata = make_adata()
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiledbsoma's own deprecation notes
        soma_io.from_anndata(uri, adata, measurement_name="RNA")
    return adata, uri


# ---------------------------------------------------------------------------------- the schemes
def scgpt_vocab() -> GeneVocab:
    return GeneVocab(
        [*GENES, "<pad>", "<cls>", "<eoc>"], specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}
    )


def geneformer_vocab() -> GeneVocab:
    specials = {"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"}
    return GeneVocab(["<pad>", "<mask>", "<cls>", "<eos>", *GENES], specials=specials)


def teddy_vocab() -> GeneVocab:
    tokens = [*GENES, "<pad>", "<cls>", *(f"<{c}:{v}>" for c, vs in ANNOTATIONS.items() for v in vs)]
    return GeneVocab(tokens, specials={"pad": "<pad>", "cls": "<cls>"})


def teddy_mappings(vocab: GeneVocab) -> dict[str, dict[str, int]]:
    return {f"{c}_mapping": {v: vocab[f"<{c}:{v}>"] for v in vs} for c, vs in ANNOTATIONS.items()}


def scheme_case(name: str) -> tuple[GeneVocab, dict]:
    """(vocabulary, tokenize keywords) of a scheme case; several cases exercise each scheme's options."""
    if name == "scgpt":
        return scgpt_vocab(), {"scheme": "scgpt"}
    if name == "scgpt-compat":  # scGPT's RNG stream in cell order; sampling; median target; cell filter
        opts = {"mode": "compat", "seed": 3, "max_len": 8, "log1p": True, "filter_cell_by_counts": 60}
        return scgpt_vocab(), {"scheme": "scgpt", **opts}
    if name == "scgpt-continuous":
        return scgpt_vocab(), {"scheme": "scgpt", "n_bins": 0, "include_zero": True, "max_len": 12}
    if name == "geneformer":  # obs n_counts and filter_pass read from the SOMA obs
        return geneformer_vocab(), {
            "scheme": "geneformer",
            "resources": {"gene_median": {g: 1.0 + (i % 3) for i, g in enumerate(GENES)}},
            "model_input_size": 12,
        }
    if name == "geneformer-computed":  # totals computed from the matrix
        return geneformer_vocab(), {
            "scheme": "geneformer",
            "resources": {"gene_median": {g: 0.5 + (i % 5) for i, g in enumerate(GENES)}},
            "n_counts_column": "no_such_column",
            "filter_pass_column": None,
            "special_token": False,
        }
    if name == "teddy":
        return teddy_vocab(), {"scheme": "teddy", "max_seq_len": 10}
    if name == "teddy-annotated":  # bins, random genes, zero fill, annotation tokens, a label column
        vocab = teddy_vocab()
        return vocab, {
            "scheme": "teddy",
            "bins": 5,
            "random_genes": True,
            "include_zero_genes": True,
            "max_seq_len": 20,
            "gene_seed": 7,
            "bio_annotations": True,
            "label_column": "cell_type",
            **teddy_mappings(vocab),
        }
    if name == "perturbgene":
        return pg.perturbgene_vocab(PHENOTYPES, 2), {
            "scheme": "perturbgene",
            "genes": GENES[::-1],
            "bin_edges": [2.5, 10.0],
            "phenotype_columns": ["tissue", "cell_type", "sex"],
            "gene_order": "gene_list",
        }
    raise AssertionError(name)


CASES = [
    "scgpt",
    "scgpt-compat",
    "scgpt-continuous",
    "geneformer",
    "geneformer-computed",
    "teddy",
    "teddy-annotated",
    "perturbgene",
]


def tok(data, vocab, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cellkit.tokenize(data, vocab, **kw)


def assert_same_tokens(got, want) -> None:
    """Bit-identical: integer ids exactly, values bit for bit, names, carried obs and metadata."""
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.gene_ids, want.gene_ids)
    assert got.gene_ids.dtype == want.gene_ids.dtype
    for name in ("values", "token_type_ids"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype
            assert a.tobytes() == b.tobytes(), name  # bit for bit, NaN-safe
    np.testing.assert_array_equal(
        np.asarray(got.obs_names).astype(str), np.asarray(want.obs_names).astype(str)
    )
    if want.obs is None:
        assert got.obs is None
    else:
        assert list(got.obs.columns) == list(want.obs.columns)
        for c in want.obs.columns:
            np.testing.assert_array_equal(
                got.obs[c].astype(str).to_numpy(), want.obs[c].astype(str).to_numpy()
            )
    assert got.scheme == want.scheme
    assert got.specials == want.specials
    assert got.pad_value == want.pad_value
    assert got.options == want.options


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("obs_filter", [None, "tissue == 'lung' and donor < 3"])
def test_soma_tokens_equal_anndata_tokens(atlas, case, obs_filter):
    adata, uri = atlas
    vocab, kw = scheme_case(case)
    if obs_filter is None:
        want = tok(adata, vocab, obs_columns=["donor"], **kw)
    else:
        mask = ((adata.obs["tissue"] == "lung") & (adata.obs["donor"] < 3)).to_numpy()
        want = tok(adata[mask].copy(), vocab, obs_columns=["donor"], **kw)
    got = tok(SomaSource(uri, obs_filter=obs_filter), vocab, obs_columns=["donor"], chunk_size=16, **kw)
    assert_same_tokens(got, want)
    assert got.coverage == want.coverage
    assert got.notes == want.notes


def test_block_size_does_not_change_tokens(atlas):
    _, uri = atlas
    vocab, kw = scheme_case("teddy-annotated")
    one = tok(SomaSource(uri), vocab, chunk_size=3, **kw)
    many = tok(SomaSource(uri), vocab, chunk_size=1000, **kw)
    assert_same_tokens(one, many)


def test_experiment_object_uri_and_layer_argument(atlas):
    adata, uri = atlas
    vocab = scgpt_vocab()
    want = tok(adata, vocab, scheme="scgpt", obs_columns=["cell_type"])
    with tiledbsoma.Experiment.open(uri) as exp:
        from_object = tok(exp, vocab, scheme="scgpt", obs_columns=["cell_type"])
        assert not exp.closed  # an experiment the caller opened stays open
        from_source = tok(SomaSource(exp, layer="data"), vocab, scheme="scgpt", obs_columns=["cell_type"])
    from_uri = tok(uri, vocab, scheme="scgpt", layer="data", obs_columns=["cell_type"])
    for got in (from_object, from_source, from_uri):
        assert_same_tokens(got, want)


def test_var_filter_and_gene_column(atlas):
    adata, uri = atlas
    keep = GENES[3:30]
    vocab = scgpt_vocab()
    want = tok(adata[:, keep].copy(), vocab, scheme="scgpt")
    got = tok(SomaSource(uri, var_filter=f"var_id in {keep!r}"), vocab, scheme="scgpt")
    assert_same_tokens(got, want)
    assert got.coverage.n_genes == len(keep)
    # genes named by another var column (as Census's feature_name / feature_id)
    lower = GeneVocab(
        [*(g.lower() for g in GENES), "<pad>", "<cls>", "<eoc>"], specials=scgpt_vocab().specials
    )
    by_symbol = tok(SomaSource(uri, gene_column="symbol"), lower, scheme="scgpt")
    by_argument = tok(SomaSource(uri), lower, scheme="scgpt", gene_column="symbol")
    plain = tok(adata, scgpt_vocab(), scheme="scgpt")
    np.testing.assert_array_equal(by_symbol.values, plain.values)
    assert_same_tokens(by_argument, by_symbol)


def test_partitions_tokenize_to_the_whole(atlas):
    adata, uri = atlas
    vocab, kw = scheme_case("scgpt")
    src = SomaSource(uri, obs_filter="sex == 'male'")
    ids = src.cell_index()
    np.testing.assert_array_equal(ids, np.flatnonzero((adata.obs["sex"] == "male").to_numpy()))
    parts = src.partitions(max_cells=25)
    assert [len(p.obs_joinids) for p in parts[:-1]] == [25] * (len(parts) - 1)
    whole = tok(src, vocab, **kw)
    pieces = [tok(p, vocab, **kw) for p in parts]
    assert_same_tokens(cellkit.TokenizedCells.concat(pieces), whole)
    assert_same_tokens(tok(parts, vocab, **kw), whole)  # the partitions as one input, one after another
    with pytest.raises(DataError, match="partitions select their own cells"):
        tok(parts, vocab, cells=[0], **kw)


def test_census_root_collection_is_refused_with_the_experiment_to_pass(tmp_path):
    with tiledbsoma.Collection.create(str(tmp_path / "census")) as root:
        root.add_new_collection("census_data")
    root = tiledbsoma.Collection.open(str(tmp_path / "census"))
    with pytest.raises(DataError, match=r"Census root collection: pass census\['census_data'\]"):
        tok(root, scgpt_vocab(), scheme="scgpt")
    root.close()
    with pytest.raises(DataError, match="not a SOMA experiment"):
        tok(SomaSource(str(tmp_path / "census")), scgpt_vocab(), scheme="scgpt")


def test_shards_from_soma(atlas, tmp_path):
    adata, uri = atlas
    vocab, kw = scheme_case("perturbgene")
    want = tok(adata, vocab, obs_columns=["donor"], **kw)
    shards = tok(
        SomaSource(uri),
        vocab,
        obs_columns=["donor"],
        output=tmp_path / "shards",
        max_shard_samples=40,
        chunk_size=32,
        **kw,
    )
    assert shards.n_shards == 4
    back = open_shards(tmp_path / "shards").to_memory()
    np.testing.assert_array_equal(back.gene_ids, want.gene_ids)
    np.testing.assert_array_equal(back.token_type_ids, want.token_type_ids)
    assert back.values is None and want.values is None
    np.testing.assert_array_equal(back.obs_names.astype(str), want.obs_names.astype(str))
    np.testing.assert_array_equal(back.obs["donor"].astype(str), want.obs["donor"].astype(str))
    assert shards.manifest["n_cells"] == N_CELLS


def test_only_the_asked_obs_columns_are_read(atlas):
    _, uri = atlas
    src = SomaSource(uri, obs_filter="donor == 1").matrix_source(obs_columns=["sex"])
    try:
        assert list(src.obs.columns) == ["sex"]
        assert src.obs.index[0].startswith("cell")
    finally:
        src.close()


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("source", "kw", "message"),
    [
        (dict(measurement="ATAC"), {}, r"no measurement 'ATAC'; available: \['RNA'\]"),
        (dict(layer="raw"), {}, r"no X layer 'raw'; available: \['data'\].*layer="),
        (
            dict(obs_filter="tissue == 'liver'"),
            {},
            r"obs_filter=\"tissue == 'liver'\" matches none of the 150 cells",
        ),
        (dict(obs_filter="organ == 'lung'"), {}, r"obs_filter=\"organ == 'lung'\" failed.*obs columns"),
        (dict(obs_filter="tissue = = 'lung'"), {}, r"failed.*SOMA value filters"),
        (
            dict(var_filter="var_id == 'NOPE'"),
            {},
            r"var_filter=\"var_id == 'NOPE'\" selects none of the genes",
        ),
        (dict(gene_column="feature_name"), {}, r"gene_column='feature_name' is not a var column.*'symbol'"),
        (dict(obs_names="barcode"), {}, r"obs_names='barcode' is not an obs column"),
        (
            {},
            dict(obs_columns=["cell_type_ontology"]),
            r"obs column\(s\) \['cell_type_ontology'\] not found.*'tissue'",
        ),
        ({}, dict(cells="tissue == 'lung'"), r"cells= selects rows of an AnnData.*obs_filter"),
        ({}, dict(use_raw=True), r"use_raw=True.*pass layer="),
        (
            dict(layer="data"),
            dict(layer="counts"),
            r"layer='counts' and the SomaSource's layer='data' disagree",
        ),
    ],
)
def test_bad_inputs_name_the_fix(atlas, source, kw, message):
    _, uri = atlas
    with pytest.raises(DataError, match=message):
        tok(SomaSource(uri, **source), scgpt_vocab(), scheme="scgpt", **kw)


def test_missing_experiment_and_wrong_types(tmp_path, atlas):
    with pytest.raises(DataError, match="No SOMA experiment at"):
        tok(SomaSource(str(tmp_path / "nothing")), scgpt_vocab(), scheme="scgpt")
    with pytest.raises(DataError, match=r"SOMA experiment URI or an open tiledbsoma\.Experiment"):
        SomaSource(42)
    with pytest.raises(DataError, match="must be a string"):
        SomaSource(atlas[1], obs_filter=["tissue == 'lung'"])
    _, kw = scheme_case("perturbgene")
    with pytest.raises(DataError, match=r"obs column\(s\) \['stage'\] not found"):
        tok(
            SomaSource(atlas[1]),
            pg.perturbgene_vocab(PHENOTYPES, 2),
            **{**kw, "phenotype_columns": ["stage"]},
        )
    exp = tiledbsoma.Experiment.open(atlas[1])
    exp.close()
    with pytest.raises(DataError, match="closed"):
        tok(exp, scgpt_vocab(), scheme="scgpt")


def test_missing_tiledbsoma_says_how_to_install(atlas, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # `import tiledbsoma` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "cellkit\[soma\]"'):
        tok(SomaSource(atlas[1]), scgpt_vocab(), scheme="scgpt")
