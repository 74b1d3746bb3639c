"""cellkit.Progress: every long call reports done / total and can be cancelled (issue 17 §2).

A cancelled call raises :class:`cellkit.Cancelled` and writes nothing into the AnnData.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cellkit
import cellkit.analysis as ca
from cellkit._utils import track

from .test_api_conventions import _keys
from .test_finetune import make_adata, make_model


@pytest.fixture(scope="module")
def model() -> cellkit.CellModel:
    return make_model().eval()


@pytest.fixture(scope="module")
def clf_model() -> cellkit.CellModel:
    m = make_model()
    m.add_head("classifier", n_classes=3, labels=["type0", "type1", "type2"])
    return m.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


@pytest.fixture
def adata():
    return make_adata(n_per_class=8)  # 24 cells


class Recorder:
    """A Progress callback that records (done, total) and cancels after ``cancel_after`` updates with work done."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.cancel_after = cancel_after
        self.stop_event = threading.Event()

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if self.cancel_after is not None and sum(d > 0 for d, _ in self.calls) >= self.cancel_after:
            self.stop_event.set()

    def progress(self) -> cellkit.Progress:
        return cellkit.Progress(self, stop_event=self.stop_event)


def _check_counts(calls: list[tuple[int, int]], total: int) -> None:
    done = [d for d, _ in calls]
    assert calls[0] == (0, total), calls
    assert all(t == total for _, t in calls)
    assert done == sorted(done), f"done counts go back: {done}"
    assert done[-1] == total, f"the count ends at {done[-1]}, not {total}"
    assert len(set(done)) > 2, f"no progress between start and end: {done}"


# ------------------------------------------------------------------------------ the object
def test_progress_estimates_and_cancels():
    p = cellkit.Progress()
    assert p.eta is None and p.fraction == 0 and not p.running and not p.cancelled
    with track(p, total=10, desc="work") as t:
        assert t is p and p.running
        p.advance(5)
        assert p.fraction == 0.5 and p.eta is not None and p.eta >= 0
        p.cancel()
        with pytest.raises(cellkit.Cancelled, match="after 6 of 10 cells; nothing was written"):
            p.advance(1)
    assert not p.running and "cancelled" in repr(p)
    p.reset()
    assert not p.cancelled
    # a cancelled Progress stops the next call before any work
    p.cancel()
    with pytest.raises(cellkit.Cancelled), track(p, total=3, desc="again"):
        pass


def test_nested_calls_share_one_count():
    rec = Recorder()
    p = rec.progress()
    with track(p, total=6, desc="outer"), track(p, total=99, desc="inner") as inner:
        inner.advance(3)
        inner.advance(3)
    assert p.total == 6 and p.desc == "outer"
    _check_counts(rec.calls, 6)


def test_progress_option_is_checked():
    with pytest.raises(cellkit.ConfigError, match="progress must be"):
        track("yes", total=1, desc="x")  # type: ignore[arg-type]
    with pytest.raises(cellkit.ConfigError, match="callable"):
        cellkit.Progress(callback=3)  # type: ignore[arg-type]
    assert issubclass(cellkit.Cancelled, cellkit.CellkitError)


# ------------------------------------------------------------------------------ the calls
def test_embed_cells_reports_every_batch(adata, model):
    rec = Recorder()
    cellkit.embed_cells(adata, model, batch_size=4, chunk_size=10, progress=rec.progress())
    _check_counts(rec.calls, adata.n_obs)  # one count over the chunks and their batches
    assert np.isfinite(adata.obsm["X_cellkit"]).all()


def test_embed_cells_cancelled_after_the_first_batch_writes_nothing(adata, model):
    rec = Recorder(cancel_after=1)
    before = _keys(adata)
    with pytest.raises(cellkit.Cancelled, match="after 4 of 24 cells"):
        cellkit.embed_cells(adata, model, batch_size=4, progress=rec.progress())
    assert _keys(adata) == before
    assert max(d for d, _ in rec.calls) == 4  # stopped right after the batch that cancelled


def test_predict_cancelled_writes_nothing(adata, clf_model):
    rec = Recorder(cancel_after=2)  # tokenizing counts once, then the first predict batch
    before = _keys(adata)
    with pytest.raises(cellkit.Cancelled):
        cellkit.predict(adata, clf_model, batch_size=4, progress=rec.progress())
    assert _keys(adata) == before


def test_tokenize_counts_and_cancels(adata, model):
    rec = Recorder()
    cellkit.tokenize(adata, model, chunk_size=5, progress=rec.progress())
    _check_counts(rec.calls, adata.n_obs)
    p = cellkit.Progress(lambda d, t: p.cancel() if d else None)
    with pytest.raises(cellkit.Cancelled):
        cellkit.tokenize(adata, model, chunk_size=5, progress=p)


def test_contextual_gene_embeddings_progress(adata, model):
    rec = Recorder()
    ca.contextual_gene_embeddings(adata, model, batch_size=4, progress=rec.progress())
    # two steps, each counted from 0: tokenizing, then the forward passes
    steps = [i for i, (done, _) in enumerate(rec.calls) if done == 0]
    assert len(steps) == 2
    assert rec.calls[steps[1] - 1] == (adata.n_obs, adata.n_obs)
    _check_counts(rec.calls[steps[1] :], adata.n_obs)
    with pytest.raises(cellkit.Cancelled):
        ca.contextual_gene_embeddings(adata, model, batch_size=4, progress=Recorder(1).progress())


def test_attention_maps_progress(adata, model):
    rec = Recorder()
    maps = ca.attention_maps(adata, model, cells=list(range(6)), batch_size=2, progress=rec.progress())
    assert len(maps) == 6
    _check_counts(rec.calls, 6)


def test_gene_attention_cancelled_stores_nothing(adata, model):
    rec = Recorder()
    ca.gene_attention(adata, model, batch_size=4, progress=rec.progress())
    _check_counts(rec.calls, adata.n_obs)
    before = _keys(adata)
    with pytest.raises(cellkit.Cancelled):
        ca.gene_attention(adata, model, batch_size=4, key_added="ga", progress=Recorder(1).progress())
    assert _keys(adata) == before


def test_attention_difference_progress(adata, model):
    rec = Recorder()
    ca.attention_difference(
        adata,
        model,
        groupby="cell_type",
        condition="type0",
        control="type1",
        batch_size=4,
        progress=rec.progress(),
    )
    _check_counts(rec.calls, 16)


def test_in_silico_perturb_cancelled_stores_nothing(adata, model):
    rec = Recorder()
    ca.in_silico_perturb(
        adata, model, genes=["G1", "G2", "G3"], cells=[0, 1, 2], n_null=1, progress=rec.progress()
    )
    assert rec.calls[-1] == (6, 6)  # 3 perturbations × (itself + 1 random draw)
    _check_counts(rec.calls, 6)
    before = _keys(adata)
    with pytest.raises(cellkit.Cancelled, match="perturbation"):
        ca.in_silico_perturb(
            adata,
            model,
            genes=["G1", "G2"],
            cells=[0, 1, 2],
            key_added="pert",
            progress=Recorder(1).progress(),
        )
    assert _keys(adata) == before
