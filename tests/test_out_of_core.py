"""Out-of-core training: finetune / pretrain from a shard directory never load all tokens.

The split is an index set over the shards (:class:`cellkit.data.tokenized.ShardSubset`), the
label / split columns are read without the token arrays, and the datasets read cells lazily from
the memory-mapped shards. Results equal those from the same tokens in memory.
"""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

import cellkit
from cellkit import DataError
from cellkit.data.dataset import CellDataset
from cellkit.data.tokenized import ShardedTokens, ShardSubset, TokenizedCells
from cellkit.tasks import finetune, pretrain

from .test_finetune import FAST, make_adata, make_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same cells in memory and as shards of 37 cells (4 shards, the last one short)."""
    adata = make_adata()
    rng = np.random.default_rng(1)
    adata.obs["split"] = rng.choice(["train", "train", "train", "val", "test"], adata.n_obs)
    columns = ["cell_type", "batch", "split"]
    model = make_model()
    mem = cellkit.tokenize(adata, model, obs_columns=columns, progress=False)
    out = tmp_path_factory.mktemp("ooc") / "shards"
    disk = cellkit.tokenize(
        adata, model, obs_columns=columns, output=out, max_shard_samples=37, progress=False
    )
    assert isinstance(mem, TokenizedCells) and isinstance(disk, ShardedTokens) and disk.n_shards == 4
    return mem, disk


@pytest.fixture
def no_to_memory(monkeypatch):
    """Loading a shard directory (or a subset of one) into memory fails the test."""

    def refuse(self):
        raise AssertionError(f"{type(self).__name__}.to_memory() was called on the out-of-core path")

    monkeypatch.setattr(ShardedTokens, "to_memory", refuse)
    monkeypatch.setattr(ShardSubset, "to_memory", refuse)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


# ====================================================================================== finetune
def test_finetune_from_shards_equals_in_memory(data, no_to_memory):
    mem, disk = data
    a, b = make_model(), make_model()
    ra = finetune(mem, a, label_key="cell_type", **FAST)
    rb = finetune(disk, b, label_key="cell_type", **FAST)
    # same seed → same split, reported per cell name
    pd.testing.assert_series_equal(ra.split, rb.split)
    assert rb.split.value_counts().to_dict() == {"train": 96, "val": 12, "test": 12}
    assert ra.classes == rb.classes == ["type0", "type1", "type2"]
    assert_same_weights(a, b)
    assert ra.metrics.keys() == rb.metrics.keys()
    for k in ra.metrics:
        assert ra.metrics[k] == pytest.approx(rb.metrics[k], rel=1e-5, abs=1e-6), k
    pd.testing.assert_frame_equal(ra.confusion, rb.confusion)
    assert rb.confusion.to_numpy().sum() == 12  # the held-out test cells were predicted from the shards
    assert ra.baseline_metrics and ra.baseline_metrics == rb.baseline_metrics  # the baseline read the shards too


def test_finetune_from_a_shard_directory_path_with_split_key_and_options(data, no_to_memory):
    mem, disk = data
    a, b = make_model(), make_model()
    kw = {
        "label_key": "cell_type",
        "batch_key": "batch",
        "split_key": "split",
        "objectives": {"cls": 1.0, "dab": 0.1},
        "class_weight": "balanced",
        "bucket_by_length": True,
        **FAST,
        "epochs": 2,
    }
    ra = finetune(mem, a, **kw)
    rb = finetune(str(disk.path), b, **kw)  # a path of a shard directory is opened, not tokenized
    pd.testing.assert_series_equal(ra.split, rb.split)
    expected = mem.obs["split"].astype(str).to_numpy()
    assert (rb.split.to_numpy() == expected).all()
    assert_same_weights(a, b)


def test_pretrain_from_shards_equals_in_memory(data, no_to_memory):
    mem, disk = data
    a, b = make_model(), make_model()
    kw = {"objectives": {"gep": 1.0}, "val_size": 0.1, **FAST, "epochs": 2}
    ra = pretrain(mem, a, **kw)
    rb = pretrain(disk, b, **kw)
    assert ra.status == rb.status == "completed"
    assert_same_weights(a, b)
    assert ra.metrics["val/loss"] == pytest.approx(rb.metrics["val/loss"], rel=1e-5)


def test_finetune_from_shards_refuses_what_the_in_memory_path_refuses(data, tmp_path, no_to_memory):
    mem, disk = data
    with pytest.raises(DataError, match="carry no 'celltype' column"):
        finetune(disk, make_model(), label_key="celltype", **FAST)
    # duplicate cell names: the split is reported per name
    dup = TokenizedCells.concat([mem.subset(np.arange(10)), mem.subset(np.arange(10))])
    dup_disk = dup.to_shards(tmp_path / "dup", max_shard_samples=7)
    with pytest.raises(DataError, match="not unique: 10 name"):
        finetune(dup_disk, make_model(), label_key="cell_type", **FAST)
    # cells without a label
    obs = mem.obs.copy()
    obs["cell_type"] = obs["cell_type"].astype(object)
    obs.iloc[[3, 50], obs.columns.get_loc("cell_type")] = None
    holes = TokenizedCells(**{**vars(mem), "obs": obs, "rng": None}).to_shards(tmp_path / "holes")
    with pytest.raises(DataError, match=r"2 of 120 selected cells have no 'cell_type' value.*'cell3', 'cell50'"):
        finetune(holes, make_model(), label_key="cell_type", **FAST)
    # a split column with other values
    with pytest.raises(DataError, match="split_key='batch' must hold 'train', 'val' or 'test'"):
        finetune(disk, make_model(), label_key="cell_type", split_key="batch", **FAST)
    # a class too small to split
    one = mem.obs["cell_type"].astype(str).to_numpy().copy()
    one[7] = "lonely"
    small = TokenizedCells(**{**vars(mem), "obs": mem.obs.assign(cell_type=one), "rng": None})
    with pytest.raises(DataError, match="class 'lonely' has 1 cell"):
        finetune(small.to_shards(tmp_path / "small"), make_model(), label_key="cell_type", **FAST)


def test_finetune_from_shards_never_holds_the_tokens(data, tmp_path, no_to_memory):
    """Python-level allocations while fine-tuning from shards stay far below the tokens' size."""
    mem, _ = data
    n, length = 3_000, 500
    rng = np.random.default_rng(0)
    offsets = np.arange(n + 1, dtype=np.int64) * length
    gene_ids = rng.integers(0, 40, n * length).astype(np.int32)  # the model's genes
    gene_ids[offsets[:-1]] = mem.specials["cls"]
    big = TokenizedCells(
        **{
            **vars(mem),
            "gene_ids": gene_ids,
            "values": rng.integers(1, 10, n * length).astype(np.float32),
            "offsets": offsets,
            "obs_names": np.array([f"c{i}" for i in range(n)]),
            "obs": pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n)}),
            "rng": None,
        }
    )
    disk = big.to_shards(tmp_path / "big", max_shard_samples=300)
    token_bytes = big.n_tokens * (4 + 4)  # int32 ids + float32 values: 12 MB
    del big, gene_ids
    # the logistic baseline's own bound is tested in test_baselines.py (a capped subsample)
    opts = {**FAST, "max_steps": 3, "test_size": 0.01, "val_size": 0.01, "baseline": False}
    finetune(disk, make_model(), label_key="cell_type", **{**opts, "max_steps": 1})  # imports done
    model = make_model()
    tracemalloc.start()
    try:
        finetune(disk, model, label_key="cell_type", **opts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < token_bytes / 4, (peak, token_bytes)


# ====================================================================================== the pieces
def test_shard_subset_reads_cells_lazily_and_matches_memory(data):
    mem, disk = data
    idx = np.array([100, 3, 36, 37, 119, 74, 0])
    view = disk.subset(idx)
    ref = mem.subset(idx)
    assert isinstance(view, ShardSubset) and len(view) == 7
    np.testing.assert_array_equal(view.lengths, ref.lengths)
    np.testing.assert_array_equal(view.obs_names, ref.obs_names)
    assert list(view.obs_column("cell_type").astype(str)) == list(ref.obs["cell_type"].astype(str))
    for i in range(len(idx)):
        for f, arr in ref.cell(i).items():
            np.testing.assert_array_equal(view.cell(i)[f], arr)
    again = view.subset([6, 0])  # still lazy, positions compose
    assert isinstance(again, ShardSubset) and list(again.index) == [0, 100]
    loaded = view.to_memory()
    np.testing.assert_array_equal(loaded.gene_ids, ref.gene_ids)
    np.testing.assert_array_equal(loaded.offsets, ref.offsets)
    np.testing.assert_array_equal(loaded.obs_names, ref.obs_names)
    blob = pickle.dumps(view)
    assert len(blob) < 5_000  # the path and the index, not the memory maps
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.cell(2)["values"], ref.cell(2)["values"])
    with pytest.raises(IndexError):
        disk.subset([120])


def test_cell_dataset_over_a_shard_subset_matches_in_memory_subset(data, no_to_memory):
    mem, disk = data
    idx = np.random.default_rng(0).permutation(len(mem))[:50]
    a = CellDataset(mem.subset(idx), label_key="cell_type", batch_key="batch")
    b = CellDataset(disk.subset(idx), label_key="cell_type", batch_key="batch", max_open_shards=2)
    assert a.classes == b.classes and a.batch_classes == b.batch_classes
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.label_codes, b.label_codes)
    np.testing.assert_array_equal(a.batch_codes, b.batch_codes)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    back = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(back[9]["gene_ids"], a[9]["gene_ids"])


def test_obs_column_reads_only_the_codes(data, monkeypatch):
    mem, disk = data

    def no_tokens(*args, **kwargs):
        raise AssertionError("a shard's token arrays were opened")

    monkeypatch.setattr(ShardedTokens, "_read_shard", no_tokens)
    col = disk.obs_column("cell_type")
    assert list(col.astype(str)) == list(mem.obs["cell_type"].astype(str))
    assert col.codes.dtype == np.int8  # one byte per cell
    with pytest.raises(DataError, match="not an obs column"):
        disk.obs_column("donor")


def test_sharded_label_codes_errors_match_in_memory(data):
    mem, disk = data
    with pytest.raises(DataError, match="not among the classes"):
        CellDataset(disk, label_key="cell_type", classes=["type0", "type1"]).label_codes
    with pytest.raises(DataError, match="not among the classes"):
        CellDataset(mem, label_key="cell_type", classes=["type0", "type1"])
