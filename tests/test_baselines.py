"""The logistic regression baseline :func:`cellkit.finetune` reports beside the model.

Same split (the model's training and held-out cells), the model's inputs (its tokens), seeded,
bounded on shard directories.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import ConfigError
from cellkit.analysis import _baselines
from cellkit.analysis._baselines import logistic_baseline, token_features
from cellkit.data.tokenized import TokenizedCells
from cellkit.tasks import finetune

from .test_finetune import FAST, N_GENES, make_adata, make_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def noisy_adata(seed: int = 0):
    """Three classes with a weak signal, so neither the model nor the baseline is perfect."""
    a = make_adata(n_per_class=40, seed=seed)
    r = np.random.default_rng(seed + 10)
    x = r.poisson(1.0, size=a.shape).astype(np.float32)
    block = N_GENES // 3
    for c in range(3):
        rows = np.flatnonzero(a.obs["cell_type"] == f"type{c}")
        x[np.ix_(rows, np.arange(c * block, (c + 1) * block))] += r.poisson(0.35, size=(len(rows), block))
    a.X = sp.csr_matrix(x)
    return a


def hand_features(tokens: TokenizedCells, n_features: int, specials: set[int], max_len: int | None) -> np.ndarray:
    """Dense (cells, vocabulary) values of the tokens a model reads, cell by cell."""
    out = np.zeros((len(tokens), n_features))
    for i, cell in enumerate(tokens):
        ids, vals = cell["gene_ids"][:max_len], cell["values"][:max_len]
        for g, v in zip(ids.tolist(), vals.tolist(), strict=True):
            if g not in specials:
                out[i, g] += v
    return out


# ------------------------------------------------------------------------------ finetune's result
@pytest.fixture(scope="module")
def run():
    spy: dict = {}
    real = _baselines.logistic_baseline

    def record(tokens, train_idx, train_codes, test_idx, **kw):
        spy.update(tokens=tokens, train_idx=np.array(train_idx), test_idx=np.array(test_idx), kw=kw)
        return real(tokens, train_idx, train_codes, test_idx, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(_baselines, "logistic_baseline", record)
    try:
        torch.set_num_threads(1)
        adata = noisy_adata()
        result = finetune(adata, make_model(), label_key="cell_type", **FAST)
    finally:
        mp.undo()
    return adata, result, spy


def test_baseline_is_reported_beside_the_model(run):
    _, result, _ = run
    assert set(result.baseline_metrics) == {"accuracy", "macro_f1", "weighted_f1"}
    assert all(0 <= v <= 1 for v in result.baseline_metrics.values())
    table = result.comparison
    assert list(table.index) == ["model", "logistic regression"]
    assert list(table.columns) == ["accuracy", "macro_f1", "weighted_f1"]
    assert table.loc["model", "accuracy"] == result.metrics["accuracy"]
    assert table.loc["logistic regression", "macro_f1"] == result.baseline_metrics["macro_f1"]
    assert f"logistic baseline accuracy {result.baseline_metrics['accuracy']:.3f}" in repr(result)
    settings = result.baseline_settings
    assert settings["method"] == "logistic regression" and settings["max_iter"] == 1000
    assert settings["n_train_cells"] == (result.split == "train").sum() == 96
    assert settings["n_test_cells"] == (result.split == "test").sum() == 12


def test_baseline_uses_the_models_split(run):
    _, result, spy = run
    names = np.asarray(spy["tokens"].obs_names).astype(str)
    assert set(names[spy["test_idx"]]) == set(result.split.index[result.split == "test"])
    assert set(names[spy["train_idx"]]) == set(result.split.index[result.split == "train"])


def test_baseline_equals_a_hand_fit_on_the_models_tokens(run):
    """A logistic regression fitted by hand on the tokens (ids + values) gives the same metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import MaxAbsScaler

    from cellkit.tasks import _classification_metrics

    _, result, _ = run
    tokens, model = result.tokens, result.model
    specials = set(model.vocab.special_ids)
    x = hand_features(tokens, len(model.vocab), specials, model.config.input.max_length)
    labels = tokens.obs["cell_type"].astype(str).to_numpy()
    y = np.array([result.classes.index(v) for v in labels])
    split = result.split.reindex(np.asarray(tokens.obs_names).astype(str)).to_numpy()
    train, test = split == "train", split == "test"
    scaler = MaxAbsScaler().fit(x[train])
    clf = LogisticRegression(C=1.0, max_iter=1000, tol=1e-4).fit(scaler.transform(x[train]), y[train])
    pred = clf.predict(scaler.transform(x[test]))
    expected = _classification_metrics(y[test], pred, result.classes)
    assert result.baseline_metrics == pytest.approx(expected, abs=1e-12)
    assert result.baseline_metrics["accuracy"] < 1.0  # the data are noisy enough to tell splits apart


def test_baseline_is_deterministic_and_can_be_turned_off():
    adata = noisy_adata(seed=3)
    a = finetune(adata, make_model(), label_key="cell_type", **{**FAST, "epochs": 1})
    b = finetune(adata, make_model(), label_key="cell_type", **{**FAST, "epochs": 1})
    assert a.baseline_metrics == b.baseline_metrics
    off = finetune(adata, make_model(), label_key="cell_type", baseline=False, **{**FAST, "epochs": 1})
    assert off.baseline_metrics == {} and list(off.comparison.index) == ["model"]
    assert "logistic" not in repr(off)
    with pytest.raises(ConfigError, match="baseline"):
        finetune(adata, make_model(), label_key="cell_type", baseline="yes", **FAST)


def test_baseline_mirrors_class_weight():
    adata = noisy_adata()
    keep = np.r_[0:40, 40:60, 80:120]  # class 1 rarer
    result = finetune(adata[keep].copy(), make_model(), label_key="cell_type", class_weight="balanced", **FAST)
    weights = result.baseline_settings["class_weight"]
    codes = (result.split == "train").groupby(adata[keep].obs["cell_type"].astype(str).to_numpy()).sum()
    n = codes.sum()
    assert weights == pytest.approx({i: n / (3 * codes.iloc[i]) for i in range(3)})
    assert weights[1] > weights[0]


# ------------------------------------------------------------------------------ features
def test_token_features_read_what_the_model_reads():
    cells = TokenizedCells(
        gene_ids=np.array([9, 0, 2, 1, 9, 3, 0], dtype=np.int32),
        offsets=np.array([0, 4, 7]),
        values=np.array([0, 5, 1, 2, 0, 7, 3], dtype=np.float32),
    )
    x = token_features(cells, n_features=10, specials=[9], max_len=3).toarray()
    expected = np.zeros((2, 10))
    expected[0, [0, 2]] = [5, 1]  # the 4th token is past max_len; <cls> (9) is left out
    expected[1, [3, 0]] = [7, 3]
    np.testing.assert_array_equal(x, expected)
    # a rank-value scheme: the gene's place in the order, 1 - rank / n
    ranks = token_features(TokenizedCells(gene_ids=cells.gene_ids, offsets=cells.offsets), n_features=10, specials=[9])
    np.testing.assert_allclose(ranks.toarray()[0, [0, 2, 1]], [1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(ranks.toarray()[1, [3, 0]], [1, 0.5])


def test_features_from_shards_equal_those_in_memory(tmp_path):
    adata = make_adata()
    model = make_model()
    mem = cellkit.tokenize(adata, model, obs_columns=["cell_type"], progress=False)
    disk = cellkit.tokenize(
        adata, model, obs_columns=["cell_type"], output=tmp_path / "s", max_shard_samples=37, progress=False
    )
    idx = np.array([100, 3, 36, 37, 119, 74, 0])
    opts = {"n_features": len(model.vocab), "specials": model.vocab.special_ids, "max_len": 20, "chunk": 3}
    a = token_features(mem.subset(idx), **opts)
    b = token_features(disk.subset(idx), **opts)
    assert (a != b).nnz == 0 and a.shape == (7, len(model.vocab))


def test_training_cells_are_capped_with_the_seed():
    n = 1000
    a = _baselines._subsample(n, 100, seed=0)
    assert len(a) == 100 and np.array_equal(a, _baselines._subsample(n, 100, seed=0))
    assert not np.array_equal(a, _baselines._subsample(n, 100, seed=1))
    assert np.array_equal(_baselines._subsample(50, 100, seed=0), np.arange(50))


def test_baseline_from_shards_stays_bounded(tmp_path, monkeypatch):
    """From a shard directory the baseline reads a capped subsample and the held-out cells in chunks."""
    n, length = 3_000, 500
    rng = np.random.default_rng(0)
    offsets = np.arange(n + 1, dtype=np.int64) * length
    big = TokenizedCells(
        gene_ids=rng.integers(0, 40, n * length).astype(np.int32),
        values=rng.integers(1, 10, n * length).astype(np.float32),
        offsets=offsets,
        obs_names=np.array([f"c{i}" for i in range(n)]),
        obs=pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n)}),
    )
    disk = big.to_shards(tmp_path / "big", max_shard_samples=300)
    token_bytes = big.n_tokens * (4 + 4)  # 12 MB
    codes = pd.Categorical(big.obs["cell_type"]).codes.astype(np.int64)
    del big
    monkeypatch.setattr(_baselines, "CHUNK_CELLS", 100)
    train, test = np.arange(0, 2000), np.arange(2000, n)
    kw = {"n_features": 42, "specials": [], "max_len": None, "class_weights": None, "seed": 0}
    logistic_baseline(disk, train, codes[train], test[:10], max_train_cells=50, **kw)  # imports done
    tracemalloc.start()
    try:
        pred, settings = logistic_baseline(disk, train, codes[train], test, max_train_cells=200, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(pred) == 1000 and settings["n_train_cells"] == 200 and settings["n_train_cells_available"] == 2000
    assert any("200 of 2,000" in note for note in settings["notes"])
    assert peak < token_bytes / 4, (peak, token_bytes)
