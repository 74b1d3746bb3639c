"""``batch_size="auto"``: out-of-memory errors halve the batch size; the results are exactly those
of the fixed batch size that worked.

The out-of-memory errors are injected (``CELLKIT_OOM_ABOVE_CELLS``: a forward over more cells
raises ``torch.OutOfMemoryError``) or raised by a patched model forward. The model is wide enough
(d_model 64, ~100 genes a cell) that other batches move results by ~1e-7 on this CPU (the control
in the first test), so keeping batches of a larger size, or running a batch in pieces, would fail
these exact comparisons.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import CellModel, ConfigError, GeneVocab
from cellkit._inference import (
    OOM_ABOVE_CELLS_ENV,
    AutoBatchSize,
    class_probabilities,
    is_out_of_memory,
    run_inference,
    to_batch_size,
)
from cellkit.analysis.embeddings import cell_embeddings, embed_cells
from cellkit.data.tokenize import tokenize
from cellkit.presets import scgpt_config

N_GENES = 160


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def make_adata(n: int = 72, seed: int = 0) -> ad.AnnData:
    """Cells of ~80-130 expressed genes (lengths vary, so batches are padded)."""
    r = np.random.default_rng(seed)
    x = r.poisson(r.uniform(0.4, 1.4, size=(n, 1)), size=(n, N_GENES)).astype(np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))


def make_model(*, classifier: bool = False) -> CellModel:
    genes = [f"G{i}" for i in range(N_GENES)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(0)
    model = CellModel(
        scgpt_config(vocab, d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.0, n_bins=11), vocab
    )
    if classifier:
        model.add_head("classifier", n_classes=3, labels=["a", "b", "c"])
    return model.eval()


@pytest.fixture
def adata():
    return make_adata()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def tokens(adata, model):
    return tokenize(adata, model, progress=False)


def embed(model, tokens, batch_size):
    return cell_embeddings(model, tokens, batch_size=batch_size, progress=False)


# ---------------------------------------------------------------------------------------- detection
def test_out_of_memory_is_recognised_and_nothing_else():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(RuntimeError("not enough memory: you tried to allocate 1 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error
    assert not is_out_of_memory(MemoryError())  # numpy / Python running out: not a batch to shrink


def test_batch_size_argument_is_checked():
    assert isinstance(to_batch_size("auto"), AutoBatchSize)
    assert to_batch_size("auto").start == 64
    assert to_batch_size(8) == 8 and to_batch_size(np.int64(8)) == 8 and to_batch_size("8") == 8
    a = AutoBatchSize(16)
    assert to_batch_size(a) is a and a.size == 16
    for bad in (0, -1, True, 2.5, "big", "0", None):
        with pytest.raises(ConfigError, match="batch_size"):
            to_batch_size(bad)
    with pytest.raises(ConfigError):
        AutoBatchSize(0)


# ------------------------------------------------------------------------------- embeddings, exact
def test_auto_after_injected_oom_equals_the_fixed_size_exactly(model, tokens, monkeypatch, caplog):
    fixed = embed(model, tokens, 4)
    assert np.abs(embed(model, tokens, 32) - fixed).max() > 0  # the control: other batches round differently
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "7")  # 32 -> 16 -> 8 -> 4 cells per batch
    auto = AutoBatchSize(32)
    with caplog.at_level(logging.WARNING, logger="cellkit"):
        got = embed(model, tokens, auto)
    np.testing.assert_array_equal(got, fixed)
    assert auto.size == 4 and auto.reductions == [(32, 16), (16, 8), (8, 4)]
    assert auto.describe() == "batch_size auto: 32 → 4 after out-of-memory"
    assert "batch_size auto: 32 → 16 after out-of-memory" in caplog.text
    assert "batch_size auto: 8 → 4 after out-of-memory" in caplog.text


def test_auto_without_oom_is_the_default_batch_size(model, tokens):
    auto = AutoBatchSize()
    np.testing.assert_array_equal(embed(model, tokens, auto), embed(model, tokens, 64))
    assert auto.size == 64 and not auto.reductions


def test_embed_cells_auto_equals_the_size_that_worked(adata, model, monkeypatch, caplog):
    want = adata.copy()
    embed_cells(want, model, batch_size=16, chunk_size=40, progress=False)  # chunks of 40 and 32 cells
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "20")  # 64 -> 32 -> 16
    with caplog.at_level(logging.WARNING, logger="cellkit"):
        embed_cells(adata, model, batch_size="auto", chunk_size=40, progress=False)
    np.testing.assert_array_equal(adata.obsm["X_cellkit"], want.obsm["X_cellkit"])
    # one AutoBatchSize over all chunks: the size that worked carries over (two halvings, not four)
    assert caplog.text.count("after out-of-memory") == 2


def test_embed_cells_redoes_chunks_when_a_later_chunk_halves(model, monkeypatch, caplog):
    adata = make_adata()
    adata = adata[np.argsort(adata.X.getnnz(axis=1), kind="stable")].copy()  # the long cells last
    lengths = tokenize(adata, model, progress=False).lengths
    l0, l1 = int(lengths[:40].max()), int(lengths[40:].max())
    assert l0 < l1 <= 2 * l0
    want = adata.copy()
    embed_cells(want, model, batch_size=8, chunk_size=40, progress=False)
    forward = CellModel.forward

    def token_budget(self, gene_ids, *args, **kw):  # 16 cells of the first chunk fit, not of the second
        if gene_ids.numel() > 16 * l0:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return forward(self, gene_ids, *args, **kw)

    monkeypatch.setattr(CellModel, "forward", token_budget)
    auto = AutoBatchSize()
    with caplog.at_level(logging.WARNING, logger="cellkit"):
        embed_cells(adata, model, batch_size=auto, chunk_size=40, progress=False)
    assert auto.reductions == [(64, 32), (32, 16), (16, 8)]
    np.testing.assert_array_equal(adata.obsm["X_cellkit"], want.obsm["X_cellkit"])


def test_a_progress_counts_each_cell_once(model, tokens, monkeypatch):
    seen = []
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "5")
    cell_embeddings(model, tokens, batch_size="auto", progress=cellkit.Progress(lambda d, t: seen.append((d, t))))
    assert seen[-1] == (len(tokens), len(tokens))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cpu_allocator_failures_are_halved_too(model, tokens, monkeypatch):
    fixed = embed(model, tokens, 2)
    forward = CellModel.forward

    def short_of_memory(self, gene_ids, *args, **kw):
        if gene_ids.shape[0] > 3:
            raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return forward(self, gene_ids, *args, **kw)

    monkeypatch.setattr(CellModel, "forward", short_of_memory)
    auto = AutoBatchSize(16)
    np.testing.assert_array_equal(embed(model, tokens, auto), fixed)
    assert auto.size == 2


# ---------------------------------------------------------------------------- errors stay errors
def test_halving_stops_at_one_cell_with_advice(model, tokens, monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "0")
    auto = AutoBatchSize(8)
    with pytest.raises(ConfigError, match=r"single cell.*max_length.*bf16") as err:
        embed(model, tokens, auto)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert err.value.param == "batch_size"
    assert auto.reductions == [(8, 4), (4, 2), (2, 1)]


def test_other_errors_are_not_swallowed(model, tokens):
    calls = []

    def broken(out, batch):
        calls.append(len(batch["gene_ids"]))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    auto = AutoBatchSize(16)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_inference(model, tokens, broken, batch_size=auto, progress=False)
    assert len(calls) == 1 and not auto.reductions  # raised at once, no retry


def test_a_fixed_batch_size_does_not_catch_out_of_memory(model, tokens, monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "7")
    with pytest.raises(torch.OutOfMemoryError):
        embed(model, tokens, 8)


# ------------------------------------------------------------------------------------------ predict
def test_predict_auto_equals_fixed_and_records_the_size(adata, monkeypatch):
    model = make_model(classifier=True)
    want = adata.copy()
    cellkit.predict(want, model, batch_size=16, progress=False)
    assert "batch_size" not in want.uns["cellkit_prediction"]
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "30")
    cellkit.predict(adata, model, batch_size="auto", progress=False)
    np.testing.assert_array_equal(
        adata.obsm["cellkit_prediction_probabilities"], want.obsm["cellkit_prediction_probabilities"]
    )
    assert list(adata.obs["cellkit_prediction"]) == list(want.obs["cellkit_prediction"])
    assert adata.uns["cellkit_prediction"]["batch_size"] == {"auto": 64, "worked": 16}


def test_class_probabilities_auto(tokens, monkeypatch):
    model = make_model(classifier=True)
    fixed = class_probabilities(model, tokens, batch_size=8, progress=False)
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "9")
    np.testing.assert_array_equal(class_probabilities(model, tokens, batch_size="auto", progress=False), fixed)
