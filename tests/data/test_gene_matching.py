"""Gene matching: scGPT's exact ``gene in vocab`` in compat mode, the retries as options, the rule report.

The golden case ``tests/fixtures/tokenize/scgpt/cases/pbmc_mixedcase_vocab`` was made by the real
scGPT 0.2.4 (``make_scgpt_tokens.py``): pbmc68k_reduced counts whose var names upper-case half of
the mixed-case symbols (``C1ORF228`` against the token ``C1orf228``), include ``ZHX1-C8ORF76``
(token ``ZHX1-C8orf76``), a versioned Ensembl id and one var name twice.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellkit
from cellkit import DataError, GeneVocab
from cellkit.data.collate import scgpt_random_mask_value
from cellkit.data.genes import matching_options, resolve_genes, rules_report

from .test_tokenize import compat_options

CASE = (
    Path(__file__).resolve().parents[1] / "fixtures" / "tokenize" / "scgpt" / "cases" / "pbmc_mixedcase_vocab"
)
SPECIALS = {"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}


def vocab_of(tokens) -> GeneVocab:
    return GeneVocab([*map(str, tokens), "<pad>", "<cls>", "<eoc>"], specials=SPECIALS)


@pytest.fixture(scope="module")
def golden():
    case = json.loads((CASE / "case.json").read_text())
    exp = dict(np.load(CASE / "expected.npz"))
    stoi = json.loads((CASE / "vocab.json").read_text())
    vocab = GeneVocab.from_dict(stoi, specials=SPECIALS)
    adata = ad.read_h5ad(CASE.parents[1] / case["dataset"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Variable names are not unique": intended
        adata.var_names = pd.Index(exp["data_var_names"])
    return case, exp, vocab, adata


def compat_tokens(case, vocab, adata, **extra):
    return cellkit.tokenize(adata, vocab, progress=False, **{**compat_options(case), **extra})


# ------------------------------------------------------------------------------ golden case (scGPT 0.2.4)
def test_compat_matches_scgpt_exactly_on_mixed_case_symbols(golden):
    case, exp, vocab, adata = golden
    before = adata.var_names.copy()
    tokens = compat_tokens(case, vocab, adata)
    padded = tokens.pad()
    assert padded["gene_ids"].shape == exp["genes"].shape
    # exact: token ids and bins are integers (the same vocab.json ids on both sides)
    np.testing.assert_array_equal(padded["gene_ids"], exp["genes"])
    np.testing.assert_array_equal(padded["values"], exp["values"])
    masked = scgpt_random_mask_value(padded["values"], rng=tokens.rng, **case["mask_kwargs"])
    np.testing.assert_array_equal(masked, exp["masked_values"])
    assert adata.var_names.equals(before)
    # the report: every kept gene matched exactly; what the retries would have added is said
    assert tokens.coverage.n_matched == case["n_genes_kept"] == 755
    assert tokens.options["case_fold"] is False and tokens.options["strip_versions"] is False
    note = next(n for n in tokens.notes if n.startswith("genes matched by rule"))
    assert "755 exact, 0 model mapping, 0 gene table, 0 outdated symbol, 0 version stripped, 0 case folded, 0 ortholog" in note
    assert "9 more with case_fold=True" in note and "1 more with strip_versions=True" in note


def test_retries_on_in_compat_mode_change_the_tokens(golden):
    """ZHX1-C8ORF76 and 8 upper-cased symbols matched by case folding shift scGPT's random stream."""
    case, exp, vocab, adata = golden
    tokens = compat_tokens(case, vocab, adata, case_fold=True, strip_versions=True)
    assert tokens.coverage.n_matched == 765
    note = next(n for n in tokens.notes if n.startswith("genes matched by rule"))
    assert "755 exact, 0 model mapping, 0 gene table, 0 outdated symbol, 1 version stripped, 9 case folded" in note
    padded = tokens.pad()
    assert vocab["ZHX1-C8orf76"] in padded["gene_ids"]
    assert vocab["ZHX1-C8orf76"] not in exp["genes"]
    assert (padded["values"] != exp["values"]).mean() > 0.3


def test_duplicate_var_name_keeps_both_columns_like_scgpt(golden):
    case, exp, vocab, adata = golden
    match = resolve_genes(adata.var_names, vocab, case_fold=False, strip_versions=False)
    hes4 = np.flatnonzero(np.asarray(adata.var_names) == "HES4")
    assert len(hes4) == 2 and (match.token_ids[hes4] == vocab["HES4"]).all()
    assert hes4.tolist() == [int(j) for j in match.columns if adata.var_names[j] == "HES4"]
    assert list(exp["var_names"]).count("HES4") == case["duplicate_columns_kept"] == 2
    assert match.n_duplicated == 1


# ------------------------------------------------------------------------------ resolve_genes rules
@pytest.fixture
def vocab():
    return vocab_of(["ZHX1-C8orf76", "C1orf228", "ENSG00000116649", "CD3E", "Gm12345"])


DATA = ["ZHX1-C8ORF76", "C1orf228", "ENSG00000116649.9", "cd3e", "Gm12345", "NOPE", "ensg00000116649.3"]


def test_exact_only_when_both_retries_are_off(vocab):
    m = resolve_genes(DATA, vocab, case_fold=False, strip_versions=False)
    assert m.token_ids.tolist() == [-1, 1, -1, -1, 4, -1, -1]
    assert m.rule_counts == {"exact": 2, "model mapping": 0, "gene table": 0, "outdated symbol": 0, "version stripped": 0, "case folded": 0, "ortholog": 0}
    assert m.missed == {"version stripped": 2, "case folded": 2}
    assert "2 more with case_fold=True" in m.rules_summary()


def test_each_retry_on_its_own(vocab):
    folded = resolve_genes(DATA, vocab, case_fold=True, strip_versions=False)
    assert folded.token_ids.tolist() == [0, 1, -1, 3, 4, -1, -1]
    assert folded.rule_counts["case folded"] == 2 and folded.missed == {"version stripped": 2}
    stripped = resolve_genes(DATA, vocab, case_fold=False, strip_versions=True)
    assert stripped.token_ids.tolist() == [-1, 1, 2, -1, 4, -1, -1]  # lower-case ensg… needs case folding too
    assert stripped.rule_counts["version stripped"] == 1
    assert stripped.missed == {"case folded": 3}
    both = resolve_genes(DATA, vocab)  # the defaults: both on
    assert both.token_ids.tolist() == [0, 1, 2, 3, 4, -1, 2]
    assert both.rule_counts == {"exact": 2, "model mapping": 0, "gene table": 0, "outdated symbol": 0, "version stripped": 2, "case folded": 2, "ortholog": 0}
    assert both.missed == {}


def test_mapping_table_is_its_own_rule(vocab):
    m = resolve_genes(["CD3", "C1orf228", "X"], vocab, mapping={"CD3": "CD3E", "X": "Y"})
    assert m.token_ids.tolist() == [3, 1, -1]
    assert m.rule_counts == {"exact": 1, "model mapping": 1, "gene table": 0, "outdated symbol": 0, "version stripped": 0, "case folded": 0, "ortholog": 0}


def test_rules_report_adds_sources(vocab):
    a = resolve_genes(DATA, vocab, case_fold=False, strip_versions=False)
    b = resolve_genes(DATA, vocab)
    assert rules_report([a, b]) == (
        "genes matched by rule: 4 exact, 0 model mapping, 0 gene table, 0 outdated symbol, 2 version stripped, "
        "2 case folded, 0 ortholog "
        "(2 more with strip_versions=True; 2 more with case_fold=True)"
    )


def test_matching_options_defaults_and_errors():
    off = dict.fromkeys(("case_fold", "strip_versions", "gene_tables", "orthologs"), False)
    assert matching_options({}, compat=True) == off
    assert matching_options({}, compat=False) == dict.fromkeys(off, True)
    assert matching_options({"case_fold": True}, compat=True) == {**off, "case_fold": True}
    with pytest.raises(DataError, match="case_fold must be True, False or None"):
        matching_options({"case_fold": "yes"}, compat=True)


# ------------------------------------------------------------------------------ tokenize options
def small_adata(names) -> ad.AnnData:
    x = np.arange(1, 3 * len(names) + 1, dtype=np.float32).reshape(3, len(names))
    return ad.AnnData(X=x, var=pd.DataFrame(index=names))


@pytest.mark.filterwarnings("ignore:.*genes the model will not see:UserWarning")
def test_scgpt_deterministic_mode_keeps_the_retries_by_default(vocab):
    adata = small_adata(DATA)
    on = cellkit.tokenize(adata, vocab, scheme="scgpt", progress=False)
    assert on.coverage.n_matched == 6 and on.options["case_fold"] is True
    off = cellkit.tokenize(
        adata, vocab, scheme="scgpt", case_fold=False, strip_versions=False, progress=False
    )
    assert off.coverage.n_matched == 2
    assert off.options["case_fold"] is False and off.options["strip_versions"] is False
    with pytest.raises(DataError, match="strip_versions must be True, False or None"):
        cellkit.tokenize(adata, vocab, scheme="scgpt", strip_versions="no", progress=False)


@pytest.mark.filterwarnings("ignore:.*genes the model will not see:UserWarning")
def test_teddy_and_perturbgene_accept_the_retry_options(vocab):
    from cellkit.data.schemes import get_scheme

    for scheme in ("scgpt", "teddy", "perturbgene"):
        assert {"case_fold", "strip_versions"} <= set(get_scheme(scheme).OPTIONS)
    adata = small_adata(DATA)
    teddy = cellkit.tokenize(adata, vocab, scheme="teddy", case_fold=False, progress=False)
    assert teddy.coverage.n_matched == 3  # exact 2 + the versioned id (strip_versions stays on)
