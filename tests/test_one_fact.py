"""Each fact once (issue 16 item 5): one BERT-family encoder builder, one unknown-gene error, one
macro-F1, one FORWARD_KEYS, and finetune's tokenize options checked by name."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellkit import CellModel, ConfigError, GeneVocab, UnknownGeneError
from cellkit.core.config import EncoderConfig, bert_encoder_config
from cellkit.presets import geneformer_config, perturbgene_config, scgpt_config

PKG = Path(__file__).resolve().parents[1] / "cellkit"

BERT_FIXED = {
    "norm_scheme": "post",
    "final_norm": False,
    "gene_norm": False,
    "value_encoder": "none",
    "embedding_norm": True,
    "embedding_dropout": True,
    "n_value_bins": 0,
    "value_pad_id": None,
    "n_batch_labels": 0,
}


# ------------------------------------------------------------------------- BERT encoder builder
def _geneformer_vocab() -> GeneVocab:
    specials = {"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"}
    return GeneVocab([*specials.values(), *(f"G{i}" for i in range(20))], specials=specials)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_geneformer_config_is_the_bert_builder(version):
    vocab = _geneformer_vocab()
    enc = geneformer_config(vocab, d_model=32, n_heads=4, n_layers=2, d_ff=64, version=version).encoder
    want = {"V1": ("relu", 0.02, 2048), "V2": ("gelu", 0.1, 4096)}[version]
    assert (enc.activation, enc.dropout, enc.attention_dropout, enc.max_position_embeddings) == (
        want[0],
        want[1],
        want[1],
        want[2],
    )
    assert enc.type_vocab_size == 2 and enc.layer_norm_eps == 1e-12 and enc.pad_token_id == vocab.pad_id
    assert {k: enc.to_dict()[k] for k in BERT_FIXED} == BERT_FIXED
    same = bert_encoder_config(
        len(vocab),
        d_model=32,
        n_heads=4,
        n_layers=2,
        d_ff=64,
        activation=want[0],
        dropout=want[1],
        pad_token_id=vocab.pad_id,
        max_position_embeddings=want[2],
        type_vocab_size=2,
    )
    assert same == enc


def test_perturbgene_config_is_the_bert_builder():
    from cellkit.data.schemes.perturbgene import perturbgene_vocab

    vocab = perturbgene_vocab({"tissue": ["lung", "gut"]}, 4)
    enc = perturbgene_config(vocab, n_gene_types=6, n_categories=1, d_model=16, n_heads=2, dropout=0.2).encoder
    assert {k: enc.to_dict()[k] for k in BERT_FIXED} == BERT_FIXED
    assert (enc.activation, enc.max_position_embeddings, enc.type_vocab_size, enc.attention_dropout) == (
        "gelu",
        0,
        1 + 1 + 6,
        0.2,
    )


def test_bert_builder_separate_attention_dropout_and_errors():
    enc = bert_encoder_config(
        10,
        d_model=8,
        n_heads=2,
        n_layers=1,
        d_ff=16,
        activation="relu",
        dropout=0.1,
        attention_dropout=0.3,
        pad_token_id=0,
        max_position_embeddings=5,
        type_vocab_size=2,
        layer_norm_eps=1e-6,
    )
    assert isinstance(enc, EncoderConfig) and (enc.dropout, enc.attention_dropout, enc.layer_norm_eps) == (
        0.1,
        0.3,
        1e-6,
    )
    with pytest.raises(ConfigError, match="divisible"):
        bert_encoder_config(
            10,
            d_model=9,
            n_heads=2,
            n_layers=1,
            d_ff=16,
            activation="relu",
            dropout=0.0,
            pad_token_id=0,
            max_position_embeddings=0,
            type_vocab_size=0,
        )


def test_one_bert_builder_in_the_source():
    """BERT-style EncoderConfigs are spelled out in core/config.py only."""
    hits = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "embedding_norm=True" in p.read_text(encoding="utf-8")
    ]
    assert hits == ["core/config.py"], hits


# ------------------------------------------------------------------------- unknown gene error
def test_unknown_gene_error_message():
    from cellkit.data import unknown_gene_error

    known = ["CD3E", "CD3G", "LYZ", "MS4A1"]
    one = unknown_gene_error("CD3X", known)
    assert isinstance(one, UnknownGeneError)
    assert str(one).startswith("Gene not in the model's vocabulary: 'CD3X' (did you mean [")
    assert "CD3E" in str(one) and "CD3G" in str(one)
    case = unknown_gene_error(["lyz"], known, where="the gene embeddings")
    assert "not in the gene embeddings: 'lyz' (did you mean ['LYZ']?)" in str(case)
    many = str(unknown_gene_error(["A1", "B2", "Q9", "D4", "E5"], known))
    assert many.startswith("5 genes not in the model's vocabulary: 'A1', 'B2', 'Q9', … (2 more).")


def test_vocab_unknown_gene_error_never_suggests_specials():
    vocab = GeneVocab(["<pad>", "<cls>", "GENE1", "GENE2"], specials={"pad": "<pad>", "cls": "<cls>"})
    msg = str(vocab.unknown_gene_error("<pod>"))
    assert "'<pod>'" in msg and "<pad>" not in msg


def test_one_did_you_mean_for_genes_in_the_source():
    """No module but data/vocab.py builds an UnknownGeneError from difflib suggestions (the gene
    panel's prefix-matching search box aside)."""
    offenders = []
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        rel = str(p.relative_to(PKG))
        if rel in ("data/vocab.py", "widgets/_genes.py"):
            continue
        if "get_close_matches" in text and "UnknownGeneError(" in text:
            offenders.append(rel)
    assert not offenders, offenders


# ------------------------------------------------------------------------- macro-F1
def test_macro_f1_label_semantics():
    from sklearn.metrics import f1_score

    from cellkit.train.metrics import macro_f1

    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 3])  # class 3 only predicted, class 2 never predicted
    # default: every class seen as a label or a prediction (0, 1, 2, 3)
    f = [2 / 3, 0.8, 0.0, 0.0]
    assert macro_f1(y, p) == pytest.approx(np.mean(f), abs=1e-12)
    # labels of the truth only (finetune's test metric): class 3 adds no zero
    assert macro_f1(y, p, labels=np.unique(y)) == pytest.approx(np.mean(f[:3]), abs=1e-12)
    assert macro_f1(y, p) == f1_score(y, p, average="macro", zero_division=0)
    assert macro_f1([], []) == 0.0


def test_macro_f1_from_confusion_equals_the_label_form():
    from sklearn.metrics import confusion_matrix

    from cellkit.train.metrics import macro_f1, macro_f1_from_confusion
    from cellkit.train.trainer import macro_f1_from_confusion as from_trainer

    assert from_trainer is macro_f1_from_confusion
    rng = np.random.default_rng(3)
    for _ in range(25):
        n = int(rng.integers(1, 30))
        y, p = rng.integers(0, 6, n), rng.integers(0, 5, n)
        cm = confusion_matrix(y, p, labels=range(8))  # classes 6, 7 never occur
        assert macro_f1_from_confusion(cm) == pytest.approx(macro_f1(y, p), abs=1e-12)
    assert macro_f1_from_confusion(np.zeros((3, 3))) == 0.0


def test_finetune_metrics_average_over_the_true_classes():
    from cellkit.tasks import _classification_metrics

    y = np.array([0, 0, 1, 1])
    p = np.array([0, 2, 1, 1])  # class 2 predicted once, never true
    m = _classification_metrics(y, p, ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 1.0]), abs=1e-12)


def test_one_macro_f1_in_the_source():
    users = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if 'average="macro"' in p.read_text(encoding="utf-8")
    ]
    assert users == ["train/metrics.py"], users


# ------------------------------------------------------------------------- FORWARD_KEYS
def test_forward_keys_beside_the_collator():
    from cellkit._inference import FORWARD_KEYS as inference_keys
    from cellkit.data.collate import FORWARD_KEYS, Collator
    from cellkit.train import FORWARD_KEYS as train_keys

    assert train_keys is FORWARD_KEYS and inference_keys is FORWARD_KEYS
    batch = Collator(pad_id=0)(
        [{"gene_ids": np.array([1, 2, 3]), "values": np.array([1.0, 2.0, 3.0]), "labels": 1, "batch_labels": 0}]
    )
    assert {"gene_ids", "values", "padding_mask", "batch_labels"} <= set(FORWARD_KEYS)
    assert set(batch) - set(FORWARD_KEYS) == {"labels"}  # a target, not an input


def test_forward_keys_defined_once():
    hits = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "FORWARD_KEYS = " in p.read_text(encoding="utf-8")]
    hits += [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "FORWARD_KEYS: tuple" in p.read_text(encoding="utf-8")
    ]
    assert hits == ["_utils/_batch.py"], hits


# ------------------------------------------------------------------------- finetune tokenize options
def _adata(n: int = 24) -> ad.AnnData:
    r = np.random.default_rng(0)
    x = r.poisson(2.0, (n, 12)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.repeat(["a", "b"], n // 2))}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(12)]))


def _model() -> CellModel:
    vocab = GeneVocab([*(f"G{i}" for i in range(12)), "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(0)
    return CellModel(scgpt_config(vocab, d_model=8, n_heads=2, n_layers=1, d_ff=16, dropout=0.0, n_bins=5), vocab)


FAST = {"label_key": "cell_type", "epochs": 1, "batch_size": 8, "progress": False}


def test_finetune_unknown_tokenize_option_names_close_matches():
    from cellkit.tasks import finetune

    with pytest.raises(ConfigError, match=r"Unknown tokenize option\(s\) \['max_lenn'\].*did you mean \['max_len'"):
        finetune(_adata(), _model(), tokenize_options={"max_lenn": 8}, **FAST)


def test_finetune_tokenize_option_that_is_a_task_parameter():
    from cellkit.tasks import finetune

    with pytest.raises(ConfigError, match=r"\['layer'\] are parameters of this function: pass layer=\.\.\. directly"):
        finetune(_adata(), _model(), tokenize_options={"layer": "counts"}, **FAST)
    with pytest.raises(ConfigError, match="names must be strings"):
        finetune(_adata(), _model(), tokenize_options={1: 2}, **FAST)


def test_finetune_lets_other_type_errors_through(monkeypatch):
    import cellkit.tasks as tasks

    def broken(*args, **kwargs):
        raise TypeError("a bug inside tokenize")

    monkeypatch.setattr(tasks, "tokenize", broken)
    with pytest.raises(TypeError, match="a bug inside tokenize"):
        tasks.finetune(_adata(), _model(), tokenize_options={"max_len": 8}, **FAST)


def test_finetune_accepts_scheme_options_and_tokenize_keywords():
    from cellkit.tasks import _check_tokenize_options

    model = _model()
    opts = {"max_len": 8, "chunk_size": 4, "scheme": "scgpt"}
    assert _check_tokenize_options(model, opts) == opts
    assert _check_tokenize_options(model, None) == {}
