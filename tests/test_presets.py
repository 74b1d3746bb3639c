"""Presets: Geneformer / PerturbGene configs and ``build_model``, end to end with their tokenizers.

Each family: build a tiny model, tokenize a small synthetic AnnData with the family's scheme,
collate (with its masking) and run the MLM head; save → load round trips bit for bit.
"""

from __future__ import annotations

import inspect
import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import CellModel, ConfigError, GeneVocab, InputSpec, VocabError, load_model
from cellkit.data import CellDataset, Collator
from cellkit.data.schemes.perturbgene import perturbgene_vocab
from cellkit.data.synthetic import synthetic_batch, synthetic_vocab
from cellkit.presets import build_model, geneformer_config, perturbgene_config, scgpt_config

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 24}
GENES = [f"G{i:05d}" for i in range(40)]
PHENOTYPES = {"sex": ["female", "male"], "cell_type": ["T cell", "B cell"]}
EDGES = [0.5, 2.0, 5.0]


def counts_adata(n_cells: int = 12, *, seed: int = 0) -> ad.AnnData:
    """Sparse Poisson counts (some all-zero genes), var_names = GENES, obs with n_counts and phenotypes."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.05, 3.0, size=len(GENES)), size=(n_cells, len(GENES))).astype(np.float32)
    x[0, :] = 0
    x[0, :3] = [4, 1, 2]  # a short cell
    obs = pd.DataFrame(
        {
            "n_counts": x.sum(1),
            "sex": rng.choice(PHENOTYPES["sex"], n_cells),
            "cell_type": rng.choice(PHENOTYPES["cell_type"], n_cells),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))


def forward_keys(model: CellModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = set(inspect.signature(model.forward).parameters)
    return {k: v for k, v in batch.items() if k in params}


def run_mlm(model: CellModel, batch: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(**forward_keys(model, batch), heads=("mlm",))


def tokenize(adata, model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cellkit.tokenize(adata, model, progress=False, **options)


def assert_same_outputs(a, b, names=("last_hidden_state", "cell_embedding", "token_logits")):
    for name in names:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ================================================================================ geneformer
def geneformer_model(version: str = "V1", *, max_len: int = 24) -> CellModel:
    medians = {g: 1.0 + (i % 3) * 0.5 for i, g in enumerate(GENES)}
    return build_model(
        counts_adata(),
        family="geneformer",
        version=version,
        max_len=max_len,
        seed=0,
        resources={"gene_median": medians},
        **TINY,
    ).eval()


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_geneformer_config_is_a_bert(version):
    model = geneformer_model(version)
    c = model.config
    e = c.encoder
    v2 = version == "V2"
    assert (c.family, c.pooling) == ("geneformer", "mean")
    assert (e.norm_scheme, e.gene_norm, e.value_encoder) == ("post", False, "none")
    assert (e.max_position_embeddings, e.type_vocab_size, e.embedding_norm, e.embedding_dropout) == (
        24,
        2,
        True,
        True,
    )
    assert e.activation == ("gelu" if v2 else "relu")
    assert e.dropout == e.attention_dropout == (0.1 if v2 else 0.02)
    assert e.layer_norm_eps == 1e-12
    assert e.pad_token_id == model.vocab.pad_id == 0
    assert c.heads["mlm"]["activation"] == e.activation
    assert c.heads["mlm"]["tied"]
    assert c.input == InputSpec(version=version, max_length=24, special_token=v2)
    specials = ["<pad>", "<mask>", *(["<cls>", "<eos>"] if v2 else [])]
    assert model.vocab.tokens == specials + GENES  # Geneformer's layout: specials first
    assert model.heads["mlm"].decoder.weight is model.encoder.embeddings.gene.weight
    # defaults follow the released V1 / V2 configs
    assert geneformer_config(model.vocab, version=version).encoder.max_position_embeddings == (
        4096 if v2 else 2048
    )


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_geneformer_tokens_collate_and_train_step(version):
    model = geneformer_model(version)
    tokens = tokenize(counts_adata(), model)
    v2 = version == "V2"
    assert len(tokens) == 12
    assert tokens.lengths.max() == 24
    assert tokens.lengths.min() == (3 + 2 if v2 else 3)
    assert tokens.gene_ids.min() >= 0
    assert tokens.gene_ids.max() < len(model.vocab)
    first = tokens.cell(0)["gene_ids"].tolist()
    genes = [model.vocab[g] for g in ("G00000", "G00002", "G00001")]  # ranked by count / median
    assert first == ([model.vocab["<cls>"], *genes, model.vocab["<eos>"]] if v2 else genes)

    collate = Collator.for_tokens(tokens, masking="tokens", vocab_size=len(model.vocab), seed=1)
    batch = collate([CellDataset(tokens)[i] for i in range(len(tokens))])
    assert (batch["gene_ids"] == model.vocab["<mask>"]).any()
    out = run_mlm(model, batch)
    assert out.token_logits.shape == (12, 24, len(model.vocab))
    assert out.cell_embedding.shape == (12, 16)
    assert torch.isfinite(out.token_logits).all()
    # one training step: the MLM loss has gradients everywhere it should
    model.train()
    out = model(**forward_keys(model, batch), heads=("mlm",))
    loss = torch.nn.functional.cross_entropy(
        out.token_logits.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.embeddings.position.weight.grad.abs().sum() > 0


def test_geneformer_mean_pooling_leaves_out_cls_and_eos():
    model = geneformer_model("V2")
    tokens = tokenize(counts_adata(), model)
    batch = Collator.for_tokens(tokens)([CellDataset(tokens)[i] for i in range(3)])
    with torch.no_grad():
        out = model(**forward_keys(model, batch), heads=())
    n = int((~batch["padding_mask"][0]).sum())
    expected = out.last_hidden_state[0, 1 : n - 1].mean(0)
    assert (out.cell_embedding[0] - expected).abs().max() < 1e-6


def test_geneformer_save_load_round_trip(tmp_path):
    model = geneformer_model("V2")
    batch = synthetic_batch(model.vocab, [10, 4, 1], add_cls=True)
    del batch["values"]
    before = run_mlm(model, batch)
    model.save(tmp_path / "gf")
    loaded = load_model(tmp_path / "gf")
    assert_same_outputs(before, run_mlm(loaded, batch))
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.resources == model.resources
    a, b = tokenize(counts_adata(), model), tokenize(counts_adata(), loaded)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)


def test_geneformer_config_needs_its_special_tokens():
    no_mask = synthetic_vocab(10, specials=("<pad>", "<cls>"))
    with pytest.raises(ConfigError, match=r"'mask' \(<mask>\).*with_specials"):
        geneformer_config(no_mask)
    v1 = synthetic_vocab(10, specials=("<pad>", "<mask>"))
    assert geneformer_config(v1).input.special_token is False
    with pytest.raises(ConfigError, match=r"'cls' \(<cls>\), 'eos' \(<eos>\)"):
        geneformer_config(v1, version="V2")
    with pytest.raises(ConfigError, match="version"):
        geneformer_config(v1, version="V3")
    with pytest.raises(ConfigError, match="max_len"):
        geneformer_config(v1, max_len=0)


# ================================================================================ perturbgene
def perturbgene_model(**arch) -> CellModel:
    return build_model(
        GENES, family="perturbgene", phenotypes=PHENOTYPES, bin_edges=EDGES, seed=0, **TINY, **arch
    ).eval()


def test_perturbgene_config_is_genebert():
    model = perturbgene_model(max_length=20)
    c, e = model.config, model.config.encoder
    assert (c.family, c.pooling) == ("perturbgene", "cls")
    assert (e.norm_scheme, e.activation, e.layer_norm_eps, e.gene_norm, e.value_encoder) == (
        "post",
        "gelu",
        1e-12,
        False,
        "none",
    )
    assert e.max_position_embeddings == 0
    assert model.encoder.embeddings.position is None
    assert e.type_vocab_size == 1 + 2 + len(GENES)
    assert (e.embedding_norm, e.embedding_dropout, e.dropout, e.attention_dropout) == (True, True, 0.1, 0.1)
    assert c.heads["mlm"]["activation"] == "gelu"
    assert c.heads["mlm"]["tied"]
    assert c.input == InputSpec(gene_type_offset=3, n_gene_types=40, bin_edges=tuple(EDGES), max_length=20)
    assert model.vocab == perturbgene_vocab(PHENOTYPES, len(EDGES))
    assert model.resources == {"genes": GENES, "phenotypes": PHENOTYPES}


def test_perturbgene_tokens_collate_and_mlm():
    model = perturbgene_model(max_length=20)
    adata = counts_adata()
    tokens = tokenize(adata, model, phenotype_columns=["cell_type", "sex"])
    # the scheme's layout agrees with the model's type vocabulary
    assert tokens.options["gene_type_offset"] == model.config.input.gene_type_offset
    assert tokens.options["n_gene_types"] == model.config.input.n_gene_types
    assert tokens.options["bin_edges"] == EDGES
    assert tokens.lengths.max() <= 20
    assert tokens.gene_ids.max() < len(model.vocab)
    assert tokens.token_type_ids.max() < model.config.encoder.type_vocab_size
    c0 = tokens.cell(1)
    assert c0["gene_ids"][0] == model.vocab["[CLS]"]
    assert c0["gene_ids"][-1] == model.vocab["[EOS]"]
    assert c0["gene_ids"][1] == model.vocab[f"[{adata.obs['cell_type'].iloc[1].replace(' ', '_')}]"]
    # a dataset naming only some categories keeps the model's type layout (resource "phenotypes")
    fewer = tokenize(adata, model, phenotype_columns=["sex"])
    assert fewer.options["gene_type_offset"] == 3

    collate = Collator.for_tokens(tokens, masking="phenotypic", seed=2)
    batch = collate([CellDataset(tokens)[i] for i in range(len(tokens))])
    assert batch["token_type_ids"].max() < model.config.encoder.type_vocab_size
    assert (batch["mlm_labels"] != -100).any()
    out = run_mlm(model, batch)
    assert out.token_logits.shape == (*batch["gene_ids"].shape, len(model.vocab))
    assert out.cell_embedding.shape == (12, 16)
    assert torch.equal(out.cell_embedding, out.last_hidden_state[:, 0])
    assert torch.isfinite(out.token_logits).all()


def test_perturbgene_save_load_round_trip(tmp_path):
    model = perturbgene_model()
    tokens = tokenize(counts_adata(), model, phenotype_columns=["cell_type", "sex"])
    batch = Collator.for_tokens(tokens)([CellDataset(tokens)[i] for i in range(5)])
    before = run_mlm(model, batch)
    model.save(tmp_path / "pg")
    loaded = load_model(tmp_path / "pg")
    assert_same_outputs(before, run_mlm(loaded, batch))
    assert loaded.resources == model.resources
    assert loaded.vocab == model.vocab
    again = tokenize(counts_adata(), loaded, phenotype_columns=["cell_type", "sex"])
    np.testing.assert_array_equal(again.token_type_ids, tokens.token_type_ids)


def test_perturbgene_config_checks():
    vocab = perturbgene_vocab(PHENOTYPES, 2)
    cfg = perturbgene_config(vocab, n_gene_types=7, n_categories=2)
    assert cfg.encoder.type_vocab_size == 10
    assert cfg.input.bin_edges is None
    with pytest.raises(ConfigError, match=r"'cls' \(\[CLS\]\)"):
        perturbgene_config(vocab.with_specials({"pad": "[PAD]", "mask": "[MASK]"}), n_gene_types=3)
    with pytest.raises(ConfigError, match="bin_2"):
        perturbgene_config(vocab, n_gene_types=3, bin_edges=[0.1, 1.0, 2.0])
    with pytest.raises(ConfigError, match="strictly increasing"):
        perturbgene_config(vocab, n_gene_types=3, bin_edges=[1.0, 0.5])
    with pytest.raises(ConfigError, match="n_gene_types"):
        perturbgene_config(vocab, n_gene_types=0)
    no_bins = GeneVocab(["[CLS]", "[EOS]", "[MASK]", "[PAD]"], specials=vocab.specials)
    with pytest.raises(ConfigError, match="bin"):
        perturbgene_config(no_bins, n_gene_types=3)
    with pytest.raises(ConfigError, match="bin edges"):
        build_model(GENES, family="perturbgene")
    with pytest.raises(ConfigError, match="derives n_gene_types"):
        build_model(GENES, family="perturbgene", bin_edges=[0.1], n_gene_types=3)


# ================================================================================ build_model
def test_build_model_scgpt_matches_synthetic_vocab():
    model = build_model(GENES, seed=0, **TINY)
    assert model.vocab == synthetic_vocab(len(GENES))
    assert model.config.family == "scgpt"
    assert model.training
    assert model.config.to_dict()["encoder"] == scgpt_config(model.vocab, **TINY).to_dict()["encoder"]
    out = model.eval()(**synthetic_batch(model.vocab, [8, 3]))
    assert out.expression.shape == (2, 8)


def test_build_model_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model(GENES, family="geneformer", seed=3, **TINY).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(GENES, family="geneformer", seed=3, **TINY).state_dict()
    c = build_model(GENES, family="geneformer", seed=4, **TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.embeddings.gene.weight"], c["encoder.embeddings.gene.weight"])


def test_build_model_accepts_anndata_and_custom_specials():
    model = build_model(counts_adata(), family="geneformer", specials={"pad": "[PAD]", "mask": "[M]"}, **TINY)
    assert model.vocab.tokens[:3] == ["[PAD]", "[M]", "G00000"]
    assert model.vocab.specials == {"pad": "[PAD]", "mask": "[M]"}
    with pytest.raises(ConfigError, match="mapping"):
        build_model(GENES, specials=["<pad>"], **TINY)


def test_build_model_rejects_bad_genes_and_family():
    with pytest.raises(VocabError, match=r"more than once.*G00001.*var_names_make_unique"):
        build_model([*GENES, "G00001"], **TINY)
    with pytest.raises(VocabError, match="special tokens"):
        build_model([*GENES, "<cls>"], **TINY)
    with pytest.raises(ConfigError, match="family"):
        build_model(GENES, family="teddy")
    with pytest.raises(ConfigError, match="sequence of gene names"):
        build_model("G00001")
    with pytest.raises(ConfigError, match="phenotypes"):
        build_model(GENES, phenotypes=PHENOTYPES, **TINY)


def test_exports():
    import cellkit.presets as presets

    assert {"build_model", "geneformer_config", "perturbgene_config", "scgpt_config"} <= set(presets.__all__)


@pytest.mark.parametrize("family", ["geneformer", "perturbgene"])
def test_build_model_bert_families_start_from_berts_init(family):
    """N(0, 0.02) weights: the tied MLM decoder's first loss is chance level, ln(vocab)."""
    kw = {"phenotypes": PHENOTYPES, "bin_edges": EDGES} if family == "perturbgene" else {}
    model = build_model(GENES, family=family, seed=0, **kw, **TINY)
    emb = model.encoder.embeddings.gene
    assert abs(float(emb.weight.detach().std()) - 0.02) < 0.005
    if emb.padding_idx is not None:
        assert torch.count_nonzero(emb.weight[emb.padding_idx]) == 0
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in linears)
    gen = torch.Generator().manual_seed(0)
    n_vocab = len(model.vocab)
    ids = torch.randint(0, n_vocab, (4, 12), generator=gen)
    types = torch.randint(0, 3, (4, 12), generator=gen) if family == "perturbgene" else None
    logits = model.eval()(ids, token_type_ids=types, heads=("mlm",)).token_logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_vocab), ids.reshape(-1))
    assert abs(float(loss.detach()) - math.log(n_vocab)) < 0.5


def test_build_model_scgpt_gene_table_as_scgpt_init_weights():
    model = build_model(GENES, seed=0, **TINY)
    table = model.encoder.embeddings.gene.weight.detach()
    assert float(table.abs().max()) <= 0.1
    assert float(table.std()) > 0.04  # U(-0.1, 0.1): std 0.058
