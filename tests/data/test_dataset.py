"""CellDataset, ShardStreamDataset (worker × rank splitting) and LengthBucketSampler."""

from __future__ import annotations

import pickle
import weakref
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cellkit._errors import DataError
from cellkit.data.collate import Collator
from cellkit.data.dataset import CellDataset, LengthBucketSampler, ShardStreamDataset, split_slices
from cellkit.data.tokenized import ShardedTokens, TokenizedCells

N_CELLS, PAD, CLS = 103, 500, 501


def make_tokens(n: int = N_CELLS, *, seed: int = 0) -> TokenizedCells:
    """Cells with skewed lengths (most short, a few long), values and two obs columns."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(2 + rng.lognormal(2.5, 0.9, n).astype(int), 300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, 400, offsets[-1]).astype(np.int32)
    ids[offsets[:-1]] = CLS
    cell_type = rng.choice(["T", "B", "NK"], n).astype(object)
    cell_type[5] = None  # one unlabelled cell
    obs = pd.DataFrame({"cell_type": cell_type, "batch": rng.choice([1, 2, 10], n)})
    return TokenizedCells(
        gene_ids=ids,
        offsets=offsets,
        values=rng.integers(1, 51, offsets[-1]).astype(np.float32),
        obs_names=np.array([f"cell{i}" for i in range(n)]),
        obs=obs,
        scheme="scgpt",
        specials={"pad": PAD, "cls": CLS},
        pad_value=-2.0,
    )


@pytest.fixture(scope="module")
def tokens() -> TokenizedCells:
    return make_tokens()


@pytest.fixture(scope="module")
def shards(tokens, tmp_path_factory) -> ShardedTokens:
    sharded = tokens.to_shards(tmp_path_factory.mktemp("tok") / "shards", max_shard_samples=21)
    assert sharded.n_shards == 5
    return sharded


def _indices(items) -> list[int]:
    out: list[int] = []
    for it in items:
        idx = it["index"]
        out += idx.tolist() if isinstance(idx, torch.Tensor) else [int(idx)]
    return out


# ====================================================================================== CellDataset
def test_cell_dataset_items_in_memory_and_sharded_agree(tokens, shards):
    mem = CellDataset(tokens, label_key="cell_type", batch_key="batch")
    disk = CellDataset(shards, label_key="cell_type", batch_key="batch", max_open_shards=2)
    assert len(mem) == len(disk) == N_CELLS
    assert mem.classes == disk.classes == ["B", "NK", "T"]
    assert mem.batch_classes == disk.batch_classes == ["1", "2", "10"]  # numeric order
    np.testing.assert_array_equal(mem.lengths, disk.lengths)
    for i in [0, 5, 20, 21, 57, 102, 3, 90, -1]:
        a, b = mem[i], disk[i]
        assert a.keys() == b.keys() == {"gene_ids", "values", "index", "cell_key", "labels", "batch_labels"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    item = mem[7]
    expected = tokens.cell(7)
    np.testing.assert_array_equal(item["gene_ids"], expected["gene_ids"])
    assert item["index"] == 7
    assert mem.classes[item["labels"]] == tokens.obs["cell_type"][7]
    assert mem[5]["labels"] == -100  # missing label is ignored by the loss
    assert mem.batch_classes[item["batch_labels"]] == str(tokens.obs["batch"][7])
    with pytest.raises(IndexError):
        mem[N_CELLS]


def test_cell_dataset_label_errors(tokens, shards):
    with pytest.raises(DataError, match=r"available columns: \['cell_type', 'batch'\]"):
        CellDataset(tokens, label_key="celltype")
    with pytest.raises(DataError, match="available columns"):
        CellDataset(shards, batch_key="donor")
    with pytest.raises(DataError, match="not among the classes"):
        CellDataset(tokens, label_key="cell_type", classes=["T", "B"])
    with pytest.raises(DataError, match="batch_key must be set for every cell"):
        CellDataset(tokens, batch_key="cell_type")
    ds = CellDataset(tokens, label_key="cell_type", classes=["T", "B", "NK", "ILC"])
    assert ds.n_classes == 4
    assert ds[7]["labels"] == ["T", "B", "NK"].index(tokens.obs["cell_type"][7])


def test_cell_dataset_pickles_without_shard_arrays(shards):
    ds = CellDataset(shards, label_key="cell_type")
    _ = [ds[i] for i in range(0, N_CELLS, 7)]  # open every shard
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the path, not the memory maps
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[50]["gene_ids"], ds[50]["gene_ids"])


# ====================================================================================== stream
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=0, max_size=7),
    n=st.integers(1, 12),
)
def test_split_slices_partitions_cells(sizes, n):
    slices = [(k, 0, 1) for k in range(len(sizes))]
    seen = Counter()
    for i in range(n):
        for k, start, step in split_slices(slices, n, i):
            seen.update((k, j) for j in range(start, sizes[k], step))
    assert seen == Counter((k, j) for k, size in enumerate(sizes) for j in range(size))


def test_acceptance_two_workers_two_ranks_cover_every_cell_once(shards):
    """103 cells in 5 shards, 2 DataLoader workers × 2 ranks: every cell exactly once."""
    for shuffle, epoch in [(False, 0), (True, 3)]:
        seen: list[int] = []
        for rank in range(2):
            ds = ShardStreamDataset(shards, rank=rank, world_size=2, shuffle=shuffle, seed=1)
            ds.set_epoch(epoch)
            rank_seen = _indices(DataLoader(ds, batch_size=None, num_workers=2))
            assert len(rank_seen) == len(ds)
            seen += rank_seen
        assert sorted(seen) == list(range(N_CELLS))


def test_acceptance_more_consumers_than_shards(tokens, tmp_path):
    two = tokens.to_shards(tmp_path / "two", max_shard_samples=60)  # 2 shards for 3 ranks × 2 workers
    seen: list[int] = []
    for rank in range(3):
        ds = ShardStreamDataset(two, rank=rank, world_size=3, shuffle=True, batch_size=4, bucket_buffer=16)
        got = _indices(DataLoader(ds, batch_size=None, num_workers=2))
        assert got  # nobody idles: shards are split by stride
        seen += got
    assert sorted(seen) == list(range(N_CELLS))


@settings(max_examples=30, deadline=None)
@given(
    world=st.integers(1, 4),
    workers=st.integers(1, 4),
    shuffle=st.booleans(),
    epoch=st.integers(0, 5),
    batch=st.sampled_from([None, 1, 5]),
)
def test_stream_plan_covers_every_cell_once(shards, world, workers, shuffle, epoch, batch):
    seen: list[int] = []
    for rank in range(world):
        ds = ShardStreamDataset(
            shards, rank=rank, world_size=world, shuffle=shuffle, batch_size=batch,
            bucket_buffer=None if batch is None else 3 * batch,
        )  # fmt: skip
        ds.set_epoch(epoch)
        n_rank = 0
        for w in range(workers):
            cells = ds.iter_cells(num_workers=workers, worker=w)
            got = _indices(cells if batch is None else ds._batches(cells, consumer=w))
            n_rank += len(got)
            seen += got
        assert n_rank == ds.num_cells()
    assert sorted(seen) == list(range(N_CELLS))


def test_stream_items_match_the_cells_and_shuffle_changes_with_epoch(tokens, shards):
    ds = ShardStreamDataset(shards, label_key="cell_type", batch_key="batch")
    ref = CellDataset(tokens, label_key="cell_type", batch_key="batch")
    items = list(ds)
    assert _indices(items) == list(range(N_CELLS))  # no shuffle: input order
    for item in items[::10]:
        want = ref[item["index"]]
        for key in want:
            np.testing.assert_array_equal(item[key], want[key])
    sh = ShardStreamDataset(shards, shuffle=True, seed=4)
    e0 = _indices(sh)
    assert e0 == _indices(sh)  # deterministic
    sh.set_epoch(1)
    e1 = _indices(sh)
    assert e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(N_CELLS))


def test_stream_holds_one_shard_at_a_time(shards, monkeypatch):
    alive: list[weakref.ref] = []
    original = ShardedTokens.shard

    def tracking(self, k, **kwargs):
        cells = original(self, k, **kwargs)
        alive.append(weakref.ref(cells))
        return cells

    monkeypatch.setattr(ShardedTokens, "shard", tracking)
    ds = ShardStreamDataset(shards, shuffle=True)
    peak = 0
    for _ in ds:
        peak = max(peak, sum(r() is not None for r in alive))
    assert len(alive) == 5
    assert peak == 1


def test_stream_batches_are_bucketed_and_collated(shards):
    ds = ShardStreamDataset(shards, batch_size=8, bucket_buffer=48, shuffle=True)
    batches = list(DataLoader(ds, batch_size=None, num_workers=0))
    assert [len(b["index"]) for b in batches].count(8) >= len(batches) - 1
    assert set(batches[0]) == {"gene_ids", "values", "padding_mask", "index"}
    assert sorted(_indices(batches)) == list(range(N_CELLS))
    bucketed = sum(int(b["padding_mask"].sum()) for b in batches)
    plain = ShardStreamDataset(shards, batch_size=8, shuffle=True)
    unbucketed = sum(int(b["padding_mask"].sum()) for b in plain)
    assert bucketed < 0.5 * unbucketed
    dropped = ShardStreamDataset(shards, batch_size=8, bucket_buffer=48, drop_last=True)
    sizes = [len(b["index"]) for b in dropped]
    assert set(sizes) == {8}
    assert sum(sizes) == N_CELLS // 8 * 8
    with pytest.raises(TypeError, match="num_cells"):
        len(ds)


def test_stream_masks_identical_with_0_or_2_workers_and_set_epoch_reaches_collator(shards):
    def masks(num_workers: int, epoch: int = 0) -> dict[int, np.ndarray]:
        col = Collator.for_tokens(shards, masking="values", mask_ratio=0.3)
        ds = ShardStreamDataset(shards, batch_size=6, bucket_buffer=24, collate_fn=col, shuffle=True)
        ds.set_epoch(epoch)
        out = {}
        for b in DataLoader(ds, batch_size=None, num_workers=num_workers):
            lengths = (~b["padding_mask"]).sum(1)
            for row, i in enumerate(b["index"].tolist()):
                out[i] = np.concatenate(
                    [b["values"][row, : lengths[row]].numpy(), b["gene_ids"][row, : lengths[row]]]
                )
        return out

    zero, two = masks(0), masks(2)
    assert zero.keys() == two.keys() == set(range(N_CELLS))
    for i in zero:
        np.testing.assert_array_equal(zero[i], two[i])
    other = masks(0, epoch=1)
    assert any(not np.array_equal(zero[i], other[i]) for i in zero)


def test_stream_parquet_shards(tokens, tmp_path):
    pq = tokens.to_shards(tmp_path / "pq", max_shard_samples=40, format="parquet")
    ds = ShardStreamDataset(pq, label_key="cell_type", rank=1, world_size=2)
    ref = CellDataset(tokens, label_key="cell_type")
    items = list(ds)
    assert items
    for item in items:
        want = ref[item["index"]]
        np.testing.assert_array_equal(item["gene_ids"], want["gene_ids"])
        assert item["labels"] == want["labels"]


def test_stream_errors(tokens, shards):
    with pytest.raises(DataError, match="to_shards"):
        ShardStreamDataset(tokens)
    with pytest.raises(DataError, match="needs batch_size"):
        ShardStreamDataset(shards, bucket_buffer=10)
    with pytest.raises(DataError, match="rank"):
        ShardStreamDataset(shards, rank=2, world_size=2)
    with pytest.raises(DataError, match="not a cellkit shard directory"):
        ShardStreamDataset("/nonexistent/shards")


# ====================================================================================== sampler
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("replicas", [1, 3])
def test_bucket_sampler_uses_every_index_once(tokens, shuffle, replicas):
    seen: list[int] = []
    for rank in range(replicas):
        sampler = LengthBucketSampler(
            tokens, 8, bucket_size=30, shuffle=shuffle, seed=2, num_replicas=replicas, rank=rank
        )
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(1 <= len(b) <= 8 for b in batches)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(N_CELLS))


def test_bucket_sampler_drop_last_equalises_replicas(tokens):
    counts = []
    for rank in range(3):
        sampler = LengthBucketSampler(tokens, 8, drop_last=True, num_replicas=3, rank=rank)
        batches = list(sampler)
        assert all(len(b) == 8 for b in batches)
        assert len(batches) == len(sampler)
        counts.append(len(batches))
    assert counts == [4, 4, 4]  # 103 // 8 = 12 full batches, 4 per replica


def test_bucket_sampler_epochs_and_inference_order(tokens):
    sampler = LengthBucketSampler(tokens, 8, bucket_size=32, seed=0)
    e0 = list(sampler)
    assert e0 == list(LengthBucketSampler(tokens, 8, bucket_size=32, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != e0
    # shuffle=False: chunks of 32 in input order, sorted longest first within a chunk
    lengths = tokens.lengths
    batches = list(LengthBucketSampler(tokens, 8, bucket_size=32, shuffle=False))
    flat = [i for b in batches for i in b]
    for c in range(0, N_CELLS, 32):
        chunk = flat[c : c + 32]
        assert sorted(chunk) == list(range(c, min(c + 32, N_CELLS)))
        assert list(lengths[chunk]) == sorted(lengths[chunk], reverse=True)


def test_bucketing_reduces_padding_on_skewed_lengths():
    lengths = make_tokens(4000, seed=3).lengths
    rng = np.random.default_rng(0)

    def padding(batches) -> float:
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches) / lengths.sum()

    random_batches = np.array_split(rng.permutation(len(lengths)), len(lengths) // 32)
    bucketed = list(LengthBucketSampler(lengths, 32, seed=0))
    assert padding(bucketed) < 0.2 * padding(random_batches)


def test_map_style_masks_identical_with_0_or_2_workers(tokens):
    ds = CellDataset(tokens)
    col = Collator.for_tokens(tokens, masking="values", mask_ratio=0.25)

    def run(num_workers: int, seed: int) -> dict[int, np.ndarray]:
        sampler = LengthBucketSampler(ds, 7, seed=seed)
        out = {}
        for b in DataLoader(ds, batch_sampler=sampler, collate_fn=col, num_workers=num_workers):
            for row, i in enumerate(b["index"].tolist()):
                out[i] = b["mlm_mask"][row, : ds.lengths[i]].numpy()
        return out

    a, b = run(0, seed=0), run(2, seed=9)  # other workers *and* other batches
    assert a.keys() == b.keys() == set(range(N_CELLS))
    for i in a:
        np.testing.assert_array_equal(a[i], b[i])
