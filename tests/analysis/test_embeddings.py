"""Cell embeddings: scGPT embed_data / Geneformer EmbExtractor semantics, order, batching, AnnData manners."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import ConfigError, DataError
from cellkit.analysis import cell_embeddings, embed_cells, umap
from cellkit.data.tokenized import TokenizedCells
from tests._tolerance import FP32_PARITY, assert_close_scaled
from tests.checkpoints.scgpt_fixtures import build_checkpoint, expected
from tests.checkpoints.test_geneformer import (  # noqa: F401 - the fixture is used by name
    N_LAYERS,
    _batch,
    _geneformer_cell_mean,
    _hf,
    _reference_dir,
    ckpts,
)

from ..test_finetune import make_adata, make_model

# fp32 parity (scGPT fixture made on another CPU; Geneformer vs transformers' kernels): 1e-5 relative to
# max(1, max|expected|). Measured on an Intel Xeon (AVX-512): scGPT L2-normalised CLS ≤ 1.8e-7 (|x| ≤ 1),
# Geneformer mean / CLS embeddings ≤ 1.1e-6: ≥ 9x margin, and the bound is the parity contract itself.
ATOL = FP32_PARITY


def _tokens_from_padded(ids, values, mask, specials) -> TokenizedCells:
    keep = ~np.asarray(mask)
    lengths = keep.sum(1)
    return TokenizedCells(
        gene_ids=np.asarray(ids)[keep].astype(np.int32),
        values=None if values is None else np.asarray(values)[keep].astype(np.float32),
        offsets=np.r_[0, np.cumsum(lengths)],
        specials=specials,
        pad_value=-2.0,
    )


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_scgpt_embed_data_semantics(tmp_path, batch_size):
    """CLS of the last layer, L2-normalised, equals scGPT 0.2.4's (golden fixture), any batch size."""
    model = cellkit.load_model(build_checkpoint("tiny", tmp_path))
    exp = expected("tiny")
    specials = {r: model.vocab[t] for r, t in model.vocab.specials.items()}
    tokens = _tokens_from_padded(exp["src"], exp["values"], exp["mask"], specials)
    emb = cell_embeddings(model, tokens, batch_size=batch_size, progress=False)
    assert_close_scaled(emb, exp["cell_emb_l2"], rel=ATOL, what="cell_emb_l2")
    # input order is kept whatever order the length buckets run in
    perm = np.array([3, 0, 4, 1, 2])
    emb_p = cell_embeddings(model, tokens.subset(perm), batch_size=batch_size, progress=False)
    assert_close_scaled(emb_p, exp["cell_emb_l2"][perm], rel=ATOL, what="cell_emb_l2 (permuted)")


@pytest.mark.parametrize("kind", ["V1", "V2"])
def test_geneformer_cell_and_cls_modes(ckpts, kind):  # noqa: F811
    """EmbExtractor: 'cell' = mean without <cls>/<eos> at emb_layer (-1 = second-to-last), 'cls' = position 0."""
    folder = _reference_dir(ckpts, kind)
    model = cellkit.load_model(folder)
    ids, pad = _batch(model.vocab, lengths=[9, 4, 12, 7], seed=3)
    v2 = kind == "V2"
    specials = {r: model.vocab[t] for r, t in model.vocab.specials.items()}
    tokens = _tokens_from_padded(ids.numpy(), None, pad.numpy(), specials)
    with torch.no_grad():
        ref = _hf(transformers_bert_mlm(), folder)(
            input_ids=ids, attention_mask=(~pad).long(), output_hidden_states=True
        )
    for emb_layer, hidden_layer in ((-1, -2), (0, -1)):
        theirs = ref.hidden_states[N_LAYERS + emb_layer]
        want = _geneformer_cell_mean(theirs, pad, has_cls=v2, has_eos=v2).numpy()
        got = cell_embeddings(
            model, tokens, pooling="mean", hidden_layer=hidden_layer, batch_size=3, progress=False
        )
        assert_close_scaled(got, want, rel=ATOL, what=f"cell embedding (emb_layer={emb_layer})")
        if v2:
            got_cls = cell_embeddings(model, tokens, pooling="cls", hidden_layer=hidden_layer, progress=False)
            assert_close_scaled(got_cls, theirs[:, 0].numpy(), rel=ATOL, what="cls embedding")


def transformers_bert_mlm():
    from transformers import BertForMaskedLM

    return BertForMaskedLM


def test_embed_cells_writes_only_key_added_in_input_order():
    adata = make_adata()
    model = make_model().eval()
    before_obs, before_keys = adata.obs.copy(), (set(adata.obsm), set(adata.uns), set(adata.layers))
    embed_cells(adata, model, progress=False, batch_size=7, chunk_size=50)
    assert (set(adata.obsm) - before_keys[0]) == {"X_cellkit"}
    # besides the result, only cellkit's record of the keys it wrote (uns["cellkit"])
    assert (set(adata.uns) - {"cellkit"}, set(adata.layers)) == before_keys[1:]
    assert adata.uns["cellkit"] == {"written": {"obsm": ["X_cellkit"]}}
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    x = adata.obsm["X_cellkit"]
    assert x.shape == (120, 16)
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)  # scGPT family: L2-normalised
    # the same cells embedded alone, in another batch size or order give the same vectors
    sub = adata[[5, 77, 3]].copy()
    embed_cells(sub, model, progress=False, batch_size=1, key_added="e")
    np.testing.assert_allclose(sub.obsm["e"], x[[5, 77, 3]], atol=1e-6)
    out = embed_cells(adata, model, cells="batch == 'b1'", key_added="half", progress=False, copy=True)
    assert "half" not in adata.obsm
    sel = (adata.obs["batch"] == "b1").to_numpy()
    assert np.isnan(out.obsm["half"][~sel]).all()
    np.testing.assert_allclose(out.obsm["half"][sel], x[sel], atol=1e-6)


def test_embed_cells_on_backed_file(tmp_path):
    adata = make_adata()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    model = make_model().eval()
    embed_cells(adata, model, progress=False)
    backed = ad.read_h5ad(path, backed="r")
    embed_cells(backed, model, progress=False, chunk_size=32)
    np.testing.assert_allclose(backed.obsm["X_cellkit"], adata.obsm["X_cellkit"], atol=1e-6)
    backed.file.close()


def test_cells_without_vocabulary_genes_are_reported():
    adata = make_adata()
    x = adata.X.toarray()
    x[[2, 9]] = 0
    adata.X = sp.csr_matrix(x)
    model = make_model().eval()
    with pytest.raises(DataError, match=r"2 cells have no gene in the model's vocabulary.*cell2"):
        embed_cells(adata, model, progress=False)
    assert "X_cellkit" not in adata.obsm
    with pytest.warns(UserWarning, match="2 cells have no gene"):
        embed_cells(adata, model, progress=False, on_empty="nan")
    assert np.isnan(adata.obsm["X_cellkit"][[2, 9]]).all()
    assert not np.isnan(adata.obsm["X_cellkit"][[0, 1]]).any()


def test_layer_out_of_range_and_bad_options():
    adata = make_adata()
    model = make_model().eval()
    with pytest.raises(ConfigError, match="hidden_layer=5 is out of range"):
        embed_cells(adata, model, hidden_layer=5, progress=False)
    with pytest.raises(ConfigError, match="pooling"):
        embed_cells(adata, model, pooling="max", progress=False)
    with pytest.raises(DataError, match="empty"):
        embed_cells(adata, model, cells="cell_type == 'none'", progress=False)
    assert "X_cellkit" not in adata.obsm


def test_mean_pooling_of_an_intermediate_layer():
    adata = make_adata()
    model = make_model().eval()
    embed_cells(adata, model, pooling="mean", hidden_layer=1, normalize=False, key_added="m", progress=False)
    tokens = cellkit.tokenize(adata, model, progress=False)
    batch = {k: torch.as_tensor(v) for k, v in tokens.pad([0, 1]).items()}
    with torch.no_grad():
        out = model(
            batch["gene_ids"].long(),
            batch["values"],
            batch["padding_mask"],
            heads=(),
            output_hidden_states=True,
        )
    h = out.hidden_states[1]
    keep = ~batch["padding_mask"] & (batch["gene_ids"] != model.vocab.special_id("cls"))
    want = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    np.testing.assert_allclose(adata.obsm["m"][:2], want.numpy(), atol=1e-6)


def test_umap_into_obsm():
    adata = make_adata()
    embed_cells(adata, make_model().eval(), progress=False)
    umap(adata, n_neighbors=10)
    assert adata.obsm["X_cellkit_umap"].shape == (120, 2)
    assert "neighbors" not in adata.uns
    assert not adata.obsp
    with pytest.raises(DataError, match="embed_cells"):
        umap(adata, use_rep="X_nothing")
